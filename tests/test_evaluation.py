"""Held-out cross-entropy: checked against TransformerLens's own loss and a brute-force loop."""

import math

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from lnfree.evaluation import CEResult, cross_entropy


def _tl_per_token(model, tokens):
    with torch.no_grad():
        return model(tokens, return_type="loss", loss_per_token=True).double()  # [batch, pos - 1]


def test_matches_transformer_lens_loss(model, tokens):
    res = cross_entropy(model, tokens, batch_size=4)
    per_tok = _tl_per_token(model, tokens)
    assert res.value == pytest.approx(float(per_tok.mean()), rel=1e-6)
    torch.testing.assert_close(res.per_sequence.double(), per_tok.mean(1), rtol=1e-5, atol=1e-6)
    assert res.n_tokens == per_tok.numel() and res.labels[0] == "seq0" and res.mean.n == tokens.shape[0]
    assert res.mean.low <= res.value <= res.mean.high
    # the CI is the cluster bootstrap of the pooled per-token losses, sequences as clusters
    from lnfree.stats import bootstrap

    seq = torch.arange(tokens.shape[0]).repeat_interleave(per_tok.shape[1])
    ref = bootstrap(per_tok.flatten(), clusters=seq, n_boot=res.n_boot, seed=res.seed)
    assert (res.mean.low, res.mean.high) == pytest.approx((ref.low, ref.high), rel=1e-6)


def test_brute_force_and_exclude_position_0(model, tokens):
    with torch.no_grad():
        logits = model(tokens).double()
    nll = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        for p in range(tokens.shape[1] - 1):
            row = logits[b, p]
            nll[b, p] = math.log(sum(math.exp(v) for v in row.tolist())) - float(row[tokens[b, p + 1]])
    res = cross_entropy(model, tokens, exclude_position_0=True)
    assert res.value == pytest.approx(float(nll[:, 1:].mean()), rel=1e-5)
    assert res.n_tokens == nll[:, 1:].numel() and res.exclude_position_0
    assert cross_entropy(model, tokens).value == pytest.approx(float(nll.mean()), rel=1e-5)


def test_batch_size_numpy_and_plain_hooked_transformer(model, tokens):
    a = cross_entropy(model, tokens, batch_size=1)
    b = cross_entropy(model, tokens.numpy(), batch_size=5)
    torch.testing.assert_close(a.per_sequence, b.per_sequence, rtol=1e-5, atol=1e-6)
    ht = HookedTransformer(model.cfg)
    ht.load_state_dict(model.state_dict())
    ht.train()
    c = cross_entropy(ht, tokens)
    assert c.value == pytest.approx(a.value, rel=1e-6) and ht.training  # mode restored


def test_ln_free_model_equals_frozen(model, tokens, ln_free_model):
    with model.ln_frozen(scales=model.estimate_ln_scales(tokens)):  # the fixture's scales, not folded
        frozen = cross_entropy(model, tokens).value
    assert ln_free_model.is_ln_free
    assert cross_entropy(ln_free_model, tokens).value == pytest.approx(frozen, rel=1e-4)


def test_ci_and_bits_per_byte(model, tokens):
    same = tokens[:1].repeat(6, 1)
    res = cross_entropy(model, same)
    assert res.mean.low == pytest.approx(res.value) and res.mean.high == pytest.approx(res.value)
    res = cross_entropy(model, tokens)
    n_bytes = 3 * res.n_tokens
    total_nats = float(_tl_per_token(model, tokens).sum())
    bpb = res.bits_per_byte(n_bytes)
    assert bpb.value == pytest.approx(total_nats / math.log(2) / n_bytes, rel=1e-6)
    assert bpb.low <= bpb.value <= bpb.high
    with pytest.raises(ValueError, match="n_bytes"):
        res.bits_per_byte(0)


def test_frame_plot_top(model, tokens):
    res = cross_entropy(model, tokens)
    assert isinstance(res, CEResult)
    df = res.to_frame()
    assert list(df.columns) == ["sequence", "metric", "value"] and len(df) == tokens.shape[0]
    top = res.top(2)
    assert len(top) == 2 and top["value"].iloc[0] == pytest.approx(float(res.per_sequence.max()))
    assert res.plot().data and "nats/token" in str(res)


def test_bad_input(model, tokens):
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(model, tokens.float())
    with pytest.raises(ValueError, match="token ids"):
        cross_entropy(model, tokens + 100)
    with pytest.raises(ValueError, match="batch_size"):
        cross_entropy(model, tokens, batch_size=0)
    with pytest.raises(ValueError, match="no prediction"):
        cross_entropy(model, tokens[:, :2], exclude_position_0=True)
    # nested lists are token ids too (the shared check accepts them), with the same numbers
    assert cross_entropy(model, tokens[:2].tolist()).value == pytest.approx(cross_entropy(model, tokens[:2]).value)
    with pytest.raises(TypeError, match="rectangular"):
        cross_entropy(model, [[1, 2, 3], [4]])
    assert np.isfinite(cross_entropy(model, tokens[:, :2]).value)


def test_result_contract_and_plot_axis_is_tight(model, tokens, ln_free_model):
    res = cross_entropy(model, tokens, n_boot=200, level=0.9, seed=1)
    assert (res.n_boot, res.level, res.seed, res.model_name) == (200, 0.9, 1, "custom (LN)")
    assert res.mean.level == 0.9 and float(res.mean) == res.value and res.tokens_per_sequence.tolist() == [11] * 6
    text = repr(res)
    assert text.startswith("CEResult(model='custom (LN)'") and "mean=" in text and "tensor" not in text
    assert res == res and hash(res) and "<table" in res._repr_html_()
    fig = res.plot()
    lo, hi = fig.layout.yaxis.range
    assert lo > 0.5 * float(res.per_sequence.min()) and hi < 1.5 * float(res.per_sequence.max())  # not from 0
    assert fig.layout.yaxis.title.text and res.mean.low >= lo and res.mean.high <= hi
    with pytest.raises(TypeError, match="positional"):
        cross_entropy(model, tokens, 4)


def test_compare_cross_entropy_paired_difference(model, tokens, ln_free_model):
    from lnfree.evaluation import CEComparison, compare_cross_entropy
    from lnfree.stats import bootstrap

    cmp = compare_cross_entropy(ln_free_model, model, tokens, n_boot=300)
    assert isinstance(cmp, CEComparison) and cmp.names == ("custom (LN-free)", "custom (LN)")
    diff = cmp.difference()
    a, b = cross_entropy(ln_free_model, tokens), cross_entropy(model, tokens)
    assert diff.value == pytest.approx(a.value - b.value, rel=1e-9)
    # equal-length rows: the paired CI is the bootstrap of per-sequence differences
    ref = bootstrap(a.per_sequence.double() - b.per_sequence.double(), n_boot=300)
    assert diff.low == pytest.approx(ref.low, rel=1e-5) and diff.high == pytest.approx(ref.high, rel=1e-5)
    frame = cmp.to_frame()
    assert list(frame.columns) == ["model", "sequence", "metric", "value"] and len(frame) == 12
    fig = cmp.plot()
    lo, hi = fig.layout.yaxis.range
    assert lo > 0 and fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text
    assert "difference=" in repr(cmp)
