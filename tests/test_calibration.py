"""Calibration of the next-token distribution: ECE, mean entropy and top-1 accuracy.

The reference is an independent numpy binning of torch's own softmax; padding is checked against
each row alone.
"""

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from conftest import make_model, pad_rows
from lnfree import _checks
from lnfree._checks import TokenBatch
from lnfree.analysis.calibration import Calibration, calibration
from lnfree.stats import Estimate


def numpy_calibration(logits_list, labels_list, n_bins):
    """ECE, per-bin counts/accuracy/confidence, mean entropy over prompts, accuracy: plain numpy.

    logits_list / labels_list: per prompt, the [n, vocab] logits of its real predictions and labels.
    """
    probs = [torch.softmax(lg.double(), -1).numpy() for lg in logits_list]
    conf = np.concatenate([p.max(1) for p in probs])
    correct = np.concatenate([(p.argmax(1) == y.numpy()).astype(float) for p, y in zip(probs, labels_list)])
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.digitize(conf, edges[1:-1], right=True)  # bins (lo, hi]
    ece = sum(abs(correct[b == i].mean() - conf[b == i].mean()) * (b == i).mean()
              for i in range(n_bins) if (b == i).any())
    ent = [float(-(p * np.log(np.where(p > 0, p, 1.0))).sum(1).mean()) for p in probs]  # 0 log 0 = 0
    return dict(ece=ece, b=b, conf=conf, correct=correct, entropy=np.mean(ent), per_prompt_entropy=ent,
                counts=np.bincount(b, minlength=n_bins), accuracy=correct.mean())


@pytest.mark.parametrize("n_bins", [15, 4])
def test_calibration_matches_numpy(model, tokens, n_bins):
    cal = calibration(model, tokens, n_bins=n_bins, batch_size=4)
    logits = model(tokens)[:, :-1].detach()
    ref = numpy_calibration(list(logits), list(tokens[:, 1:]), n_bins)
    assert cal.ece.value == pytest.approx(ref["ece"], abs=1e-6)
    assert cal.ece.low <= cal.ece.value <= cal.ece.high
    assert cal.count.tolist() == ref["counts"].tolist()
    b, conf, correct = ref["b"], ref["conf"], ref["correct"]
    for i in np.flatnonzero(ref["counts"]):
        assert cal.accuracy[i] == pytest.approx(correct[b == i].mean(), abs=1e-6)
        assert cal.confidence[i] == pytest.approx(conf[b == i].mean(), abs=1e-6)
    assert torch.isnan(cal.accuracy[torch.as_tensor(ref["counts"] == 0)]).all()
    assert cal.mean_entropy.value == pytest.approx(ref["entropy"], rel=1e-5)
    assert cal.accuracy_top1.value == pytest.approx(ref["accuracy"])
    assert cal.n_predictions == tokens.numel() - tokens.shape[0] and not cal.padded


def test_calibration_result_contract(model, tokens):
    cal = calibration(model, tokens, n_bins=5, n_boot=300, level=0.8, seed=2)
    assert isinstance(cal, Calibration) and (cal.n_boot, cal.level, cal.seed) == (300, 0.8, 2)
    assert cal.model_name == _checks.model_label(model) and cal.model_id == _checks.model_id(model)
    assert cal == cal and cal != calibration(model, tokens, n_bins=5) and hash(cal) != 0
    text = repr(cal)
    assert text.startswith("Calibration(") and "ece=" in text and "tensor" not in text and len(text) <= 240
    assert "<table" in cal._repr_html_()
    assert all(isinstance(e, Estimate) and e.level == 0.8 for e in cal.headline().values())
    assert set(cal.headline()) == {"mean_entropy", "ece", "accuracy_top1"}
    assert float(cal.ece) == cal.ece.value
    assert cal.ece.low != calibration(model, tokens, n_bins=5, n_boot=300, level=0.8, seed=3).ece.low
    df = cal.to_frame()
    assert list(df.columns) == ["bin", "lo", "hi", "quantity", "value", "low", "high", "n"]
    per_bin = df[df.bin != "all"]
    assert len(per_bin) == 5 * 5 and set(per_bin.quantity) == {"count", "accuracy", "confidence", "gap",
                                                               "ece_contribution"}
    # the per-bin ECE contributions add up to the ECE
    assert per_bin[per_bin.quantity == "ece_contribution"]["value"].sum() == pytest.approx(cal.ece.value, abs=1e-6)
    overall = df[df.bin == "all"].set_index("quantity")
    assert overall.loc["ece", "value"] == cal.ece.value and overall.loc["ece", "low"] == cal.ece.low
    top = cal.top(2)
    assert len(top) == 2 and top["ece_contribution"].is_monotonic_decreasing
    assert top["ece_contribution"].iloc[0] == pytest.approx(per_bin[per_bin.quantity == "ece_contribution"]["value"].max())
    fig = cal.plot()
    assert isinstance(fig, go.Figure) and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert list(cal.summary().metric) == ["mean_entropy", "ece", "accuracy_top1"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_calibration_equals_each_row_alone(model, side):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 61, (n,), generator=g) for n in (12, 4, 8, 2, 10)]
    toks, mask = pad_rows(rows, side)
    cal = calibration(model, toks, attention_mask=mask, n_bins=6, batch_size=2)
    assert cal.padded and cal.n_predictions == sum(len(r) - 1 for r in rows)
    for p, r in enumerate(rows):
        alone = calibration(model, r[None], n_bins=6)
        torch.testing.assert_close(cal.per_prompt_entropy[p], alone.per_prompt_entropy[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(cal.per_prompt_bins[p], alone.per_prompt_bins[0], atol=1e-5, rtol=0)
    # pooled numbers against numpy on the rows scored alone
    ref = numpy_calibration([model(r[None])[0, :-1].detach() for r in rows], [r[1:] for r in rows], 6)
    assert cal.ece.value == pytest.approx(ref["ece"], abs=1e-5)
    assert cal.mean_entropy.value == pytest.approx(ref["entropy"], abs=1e-5)
    assert cal.accuracy_top1.value == pytest.approx(ref["accuracy"])
    same = calibration(model, TokenBatch(toks, mask), n_bins=6)
    assert same.ece.value == pytest.approx(cal.ece.value, abs=1e-12)
    assert calibration(model, toks, n_bins=6).ece.value != pytest.approx(cal.ece.value, abs=1e-4)  # pads scored


def test_pad_ids_inside_real_rows_are_not_padding(model, tokens):
    """Without a mask nothing is guessed from the ids: rows containing the pad id 0 count fully."""
    toks = tokens.clone()
    toks[:, 3] = 0
    full = calibration(model, toks)
    ones = calibration(model, toks, attention_mask=torch.ones_like(toks))
    assert full.n_predictions == ones.n_predictions == toks.numel() - toks.shape[0]
    assert full.ece.value == pytest.approx(ones.ece.value, abs=1e-12)


def test_one_prompt_has_no_confidence_interval(model, tokens):
    cal = calibration(model, tokens[:1])
    for est in cal.headline().values():
        assert est.n == 1 and math.isnan(est.low) and math.isnan(est.high)
    assert "no CI" in repr(cal) and isinstance(cal.plot(), go.Figure)


def test_calibration_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="2 positions"):
        calibration(model, tokens[:, :1])
    with pytest.raises(ValueError, match="n_bins must be a positive int, got 0"):
        calibration(model, tokens, n_bins=0)
    with pytest.raises(ValueError, match="batch_size"):
        calibration(model, tokens, batch_size=0)
    with pytest.raises(ValueError, match="n_boot"):
        calibration(model, tokens, n_boot=0)
    with pytest.raises(ValueError, match="level"):
        calibration(model, tokens, level=1.5)
    with pytest.raises(TypeError, match="model"):
        calibration("gpt2", tokens)
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        calibration(model, tokens, attention_mask=torch.cat([torch.ones(6, 1), torch.zeros(6, 11)], 1).long())
    with pytest.raises(ValueError, match="TokenBatch"):
        calibration(model, TokenBatch(tokens, torch.ones_like(tokens)), attention_mask=torch.ones_like(tokens))
    with pytest.raises(TypeError, match="positional"):
        calibration(model, tokens, 15)


def test_non_finite_logits_are_refused(model, tokens):
    with torch.no_grad():
        model.unembed.b_U[4] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits"):
        calibration(model, tokens)


def test_shared_cfg_is_refused(tokens):
    m, other = make_model(), make_model()
    other.cfg = m.cfg
    m.estimate_ln_scales(tokens)
    m.remove_ln()
    with pytest.raises(ValueError, match="normalization_type"):
        calibration(other, tokens)


def test_confidence_module_reexports_calibration():
    from lnfree.analysis import confidence

    assert confidence.calibration is calibration and confidence.Calibration is Calibration


# ---- SmolLM2-135M: a real model, left padding with rotary positions -------------------------------
# (the `smollm2` session fixture is in conftest.py)

@pytest.mark.slow
def test_smollm2_calibration_matches_numpy_with_left_padding(smollm2):
    from lnfree import zoo

    text = zoo.tokenizer().decode(zoo.heldout("persuasion")[:4, 1:].reshape(-1).tolist())
    ids = torch.tensor(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"][200:])
    rows = [ids[:32], ids[40:60]]
    toks = torch.full((2, 32), smollm2.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(toks)
    toks[0], mask[0] = rows[0], 1
    toks[1, 12:], mask[1, 12:] = rows[1], 1  # left padding: rotary positions must start at the first real token
    cal = calibration(smollm2, toks, attention_mask=mask, n_bins=10)
    with torch.no_grad():
        alone = [smollm2(r[None])[0, :-1] for r in rows]
    ref = numpy_calibration(alone, [r[1:] for r in rows], 10)
    assert cal.n_predictions == 31 + 19
    assert cal.ece.value == pytest.approx(ref["ece"], abs=1e-5)
    assert cal.mean_entropy.value == pytest.approx(ref["entropy"], abs=1e-4)
    assert cal.accuracy_top1.value == pytest.approx(ref["accuracy"])
    assert cal.count.tolist() == ref["counts"].tolist()
    torch.testing.assert_close(cal.per_prompt_entropy.double(), torch.tensor(ref["per_prompt_entropy"], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert 0.0 < cal.accuracy_top1.value < 1.0 and cal.model_name == "smollm2-135m (RMSNorm)"
