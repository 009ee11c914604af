"""The shared result contract (lnfree._results) and input checks (lnfree._checks)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import lnfree
from lnfree import _checks
from lnfree._results import Result, result
from lnfree.stats import Estimate, bootstrap

from conftest import make_model


@result
class _Toy(Result):
    score: Estimate
    values: torch.Tensor
    labels: tuple
    model_name: str
    n_boot: int = 1000


def _toy():
    return _Toy(Estimate(1.5, 1.0, 2.0, 10), torch.randn(500, 40), ("a", "b"), "toy (LN)")


def test_result_is_frozen_identity_dataclass_with_short_reprs():
    r = _toy()
    params = type(r).__dataclass_params__
    assert dataclasses.is_dataclass(r) and params.frozen and not params.eq
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n_boot = 3
    assert r == r and r != _toy() and len({r, _toy()}) == 2  # no tensor truth-value error
    text = repr(r)
    assert text.startswith("_Toy(") and "score=1.5 [1, 2]" in text and "n_boot=1000" in text
    assert len(text) < 240 and "tensor" not in text
    html = r._repr_html_()
    assert "<table" in html and "score" in html and "tensor" not in html and len(html) < 2000


def test_estimate_float_format_and_single_sample():
    e = Estimate(0.25, 0.2, 0.3, 5)
    assert float(e) == 0.25 and f"{e:.2f}" == "0.25 [0.20, 0.30]"
    one = bootstrap(np.array([26.38]))
    assert one.value == pytest.approx(26.38) and math.isnan(one.low) and math.isnan(one.high)
    assert str(one) == "26.38 [no CI: n=1]"


def test_check_tokens_accepts_lists_and_arrays_refuses_floats():
    m = make_model()
    assert _checks.check_tokens(m, [[1, 2, 3]]).dtype == torch.long
    assert _checks.check_tokens(m, np.array([1, 2], dtype=np.int32)).shape == (1, 2)
    with pytest.raises(TypeError, match="integer token ids"):
        _checks.check_tokens(m, np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="rectangular"):
        _checks.check_tokens(m, [[1, 2], [3]])
    with pytest.raises(ValueError, match=r"lie in \[0, 61\)"):
        _checks.check_tokens(m, [[1, 99]])


def test_attention_mask_checks_and_last_positions():
    toks = torch.zeros(3, 5, dtype=torch.long)
    mask = _checks.check_attention_mask(toks, torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert mask.dtype == torch.bool
    assert _checks.last_positions(mask, 5).tolist() == [2, 4, 4]
    assert _checks.next_token_mask(mask)[0].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="contiguous"):
        _checks.check_attention_mask(toks[:1], torch.tensor([[1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no real token"):
        _checks.check_attention_mask(toks[:1], torch.tensor([[0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        _checks.check_attention_mask(toks[:1], torch.tensor([[2, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        _checks.check_attention_mask(toks, torch.ones(3, 4))


def test_labels_come_from_the_model_state():
    a, b = make_model(), make_model()
    a.cfg.model_name = b.cfg.model_name = "toy"
    b.estimate_ln_scales(torch.randint(0, 61, (2, 8)))
    b.remove_ln()
    assert _checks.compare_names(b, a) == ("toy (LN-free)", "toy (LN)")
    assert _checks.compare_names(a, b, names=("x", "y")) == ("x", "y")
    assert _checks.model_id(a) != _checks.model_id(b)
    with pytest.raises(ValueError, match="distinct"):
        _checks.compare_names(a, b, names=("x", "x"))


def test_check_device_without_cuda():
    if torch.cuda.is_available():
        assert _checks.check_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="no CUDA device is available.*device='cpu'"):
            _checks.check_device("cuda")
    assert _checks.check_device("cpu").type == "cpu"


def test_public_exports():
    assert lnfree.Result is Result and lnfree.TokenBatch is _checks.TokenBatch


def test_rms_models_are_labelled_norm_free_after_removal():
    from transformer_lens import HookedTransformerConfig

    from lnfree.model import LNFreeTransformer

    m = LNFreeTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=61,
                                                  n_ctx=8, act_fn="silu", normalization_type="RMS"))
    assert _checks.ln_state_label(m) == "RMSNorm"
    m.estimate_ln_scales(torch.randint(0, 61, (2, 8)))
    m.remove_ln()
    assert _checks.ln_state_label(m) == "norm-free"


def test_zoo_models_are_labelled_by_name_and_state_in_either_order():
    ln, free = lnfree.zoo.load("tiny-ln"), lnfree.zoo.load("tiny-lnfree")
    toks = lnfree.zoo.heldout("persuasion")[:2, :16]
    cmp = lnfree.compare_dla(free, ln, toks)
    assert cmp.names == ("tiny-lnfree (LN-free)", "tiny-ln (LN)")
    assert cmp.a.model_name == "tiny-lnfree (LN-free)"


def test_freeze_ln_accepts_zero_dim_tensor_scales():
    m = make_model()
    m.freeze_ln(scales=torch.tensor(1.5))
    assert m.ln_scale("ln_final") == 1.5
    m.freeze_ln(scales={s: np.float32(2.0) for s in m.ln_sites})
    assert m.ln_scale("blocks.0.ln2") == 2.0
    with pytest.raises(TypeError, match="scales must be"):
        m.freeze_ln(scales=torch.ones(3))
