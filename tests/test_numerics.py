"""Numerical safety: LN-free models refuse float16 (overflow), run in bfloat16 and float32."""

import pytest
import torch

from conftest import make_model


def _big_ln_free(tokens):
    m = make_model()
    with torch.no_grad():
        m.W_E.mul_(1e5)  # residual norms far beyond float16's 65504, as in released LN-free GPT-2s
    m.estimate_ln_scales(tokens)
    return m.remove_ln()


def test_float32_ln_free_is_finite_and_float16_would_overflow(tokens):
    from transformer_lens import HookedTransformer

    m = _big_ln_free(tokens)
    assert torch.isfinite(m(tokens)).all()
    m16 = _big_ln_free(tokens).to(torch.float16)
    unguarded = HookedTransformer.forward(m16, tokens)  # what running without the guard would give
    assert not torch.isfinite(unguarded).all()


def test_float16_ln_free_is_refused_with_fix(tokens):
    m = _big_ln_free(tokens).to(torch.float16)
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        m(tokens)


def test_bfloat16_ln_free_runs_close_to_float32(tokens):
    m = _big_ln_free(tokens)
    ref = m(tokens)
    got = m.to(torch.bfloat16)(tokens).float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() / ref.abs().max() < 0.05


def test_float16_live_ln_model_still_allowed(model, tokens):
    ref = model(tokens)
    got = model.to(torch.float16)(tokens).float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_released_ln_free_checkpoint_in_float16_is_upcast(tmp_path, tokens):
    from lnfree.loading import load_model
    m = make_model()
    m.estimate_ln_scales(tokens)
    m.remove_ln().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="float32"):
        loaded = load_model(tmp_path, dtype=torch.float16, tokenizer=False)
    assert loaded.W_E.dtype == torch.float32 and loaded.is_ln_free
    torch.testing.assert_close(loaded(tokens), m(tokens), rtol=1e-4, atol=1e-4)
