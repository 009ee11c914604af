"""Entropy neurons, their ablation (total vs direct effect) and calibration.

Every number is checked against an independent computation: TransformerLens's own LN folding
for detection, brute-force hooked forward passes for ablations, numpy binning for the ECE.
"""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from conftest import make_model
from lnfree.analysis.confidence import (
    EntropyNeurons,
    ablate_neurons,
    calibration,
    compare_confidence,
    find_entropy_neurons,
)

PLANTED = 7  # the planted entropy neuron of the last layer


def planted_model() -> "LNFreeTransformer":  # noqa: F821
    """make_model() whose effective unembedding C diag(w) W_U has a 3-dim near-null space, and
    whose last-layer neuron PLANTED writes a large vector into it."""
    m = make_model()
    d, V = m.cfg.d_model, m.cfg.d_vocab
    g = torch.Generator().manual_seed(5)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    M[:, 0] = 1.0
    Q = torch.linalg.qr(M)[0][:, 1:]  # orthonormal basis of the centered subspace
    U, S, Vh = torch.linalg.svd(torch.randn(d - 1, V, generator=g, dtype=torch.float64), full_matrices=False)
    S[-3:] *= 1e-5
    W_eff = Q @ (U * S) @ Vh  # what the centered, w-scaled residual is multiplied by
    with torch.no_grad():
        m.unembed.W_U.copy_((W_eff / m.ln_final.w.double()[:, None]).float())  # C diag(w) W_U = W_eff
        mlp = m.blocks[-1].mlp
        mlp.W_out[PLANTED] = (10 * Q @ U[:, -1]).float()
        mlp.W_in[:, PLANTED] = 0.5 * torch.randn(d, generator=g)  # activation varies across tokens
    return m


def ln_free_copy(m, tokens):
    m.estimate_ln_scales(tokens)
    return m.remove_ln()


# ---- independent references ------------------------------------------------------------------
def brute_force_logits(model, tokens, layer, neurons, means, freeze_final_scale):
    """Full forward pass with hook_post[..., neurons] := means, optionally with the final LN
    scale replaced by the clean run's per-token value."""
    def ablate(act, hook):
        act = act.clone()
        act[..., list(neurons)] = means
        return act

    hooks = [(f"blocks.{layer}.mlp.hook_post", ablate)]
    if freeze_final_scale:
        _, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
        hooks.append(("ln_final.hook_scale", lambda act, hook: cache["ln_final.hook_scale"]))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def per_prompt(logits, tokens):
    """Per-prompt mean entropy and CE over positions with a next token (torch.distributions)."""
    lg = logits[:, :-1].double()
    ent = torch.distributions.Categorical(logits=lg).entropy().mean(1)
    ce = F.cross_entropy(lg.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
    return ent, ce


# ---- detection -------------------------------------------------------------------------------
def test_detection_matches_transformer_lens_processed_weights(model):
    """LogitVar, norm and rho from TL's own fold_ln / center_writing_weights / center_unembed."""
    res = find_entropy_neurons(model, k=2, top=5)
    ht = HookedTransformer(model.cfg)
    ht.load_and_process_state_dict(
        model.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=True
    )
    W_out, W_U = ht.W_out[-1].double(), ht.W_U.double()  # as in Stolfo et al.'s fig1.py
    cos = (W_out / W_out.norm(dim=1, keepdim=True)) @ (W_U / W_U.norm(dim=0))
    U = torch.linalg.svd(W_U, full_matrices=True)[0]
    null = U[:, -3:-1]  # bottom 2 non-trivial directions (the last is the all-ones one, sv 0)
    order = res.neuron
    torch.testing.assert_close(res.norm, W_out.norm(dim=1)[order].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.logit_var, cos.var(dim=1)[order].float(), rtol=1e-3, atol=1e-9)
    rho = (W_out @ null).norm(dim=1) / W_out.norm(dim=1)
    torch.testing.assert_close(res.rho, rho[order].float(), rtol=1e-3, atol=1e-5)
    # sorted by score = norm / LogitVar
    score = W_out.norm(dim=1) / cos.var(dim=1)
    assert torch.equal(res.neuron, torch.argsort(score, descending=True))
    assert res.top() == order[:5].tolist() and res.labels[0] == f"L1N{int(order[0])}"
    assert list(res.to_frame().columns[:4]) == ["rank", "label", "layer", "neuron"]
    assert isinstance(res.plot(), go.Figure)


def test_planted_entropy_neuron_ranks_first_and_survives_ln_removal(tokens):
    m = planted_model()
    res = find_entropy_neurons(m, k=3)
    assert res.top(1) == [PLANTED]
    assert res.rho[0] > 0.999 and res.rho[1:].max() < 0.9
    assert res.logit_var[0] < 1e-6 * res.logit_var[1:].min()
    # remove_ln folds C diag(w) / sigma into W_U: same geometry, same ranking
    free = find_entropy_neurons(ln_free_copy(planted_model(), tokens), k=3)
    assert free.top(5) == res.top(5)
    torch.testing.assert_close(free.rho, res.rho, rtol=1e-4, atol=1e-5)


# ---- ablation --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [-1, 0])
def test_ablation_matches_brute_force(model, tokens, layer):
    neurons = [3, 50, 11]
    abl = ablate_neurons(model, tokens, neurons, layer=layer, cumulative=True, batch_size=4)
    L = layer % model.cfg.n_layers
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{L}.mlp.hook_post")
    means = cache[f"blocks.{L}.mlp.hook_post"][..., neurons].mean((0, 1))
    torch.testing.assert_close(abl.mean_activation, means, rtol=1e-5, atol=1e-6)
    ent0, ce0 = per_prompt(model(tokens), tokens)
    torch.testing.assert_close(abl.clean_entropy.double(), ent0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(abl.clean_ce.double(), ce0, rtol=1e-5, atol=1e-5)
    assert abl.sets == ((3,), (3, 50), (3, 50, 11)) and abl.labels[-1] == f"L{L}N3+50+11"
    for i, s in enumerate(abl.sets):
        for effect, freeze in (("total", False), ("direct", True)):
            ent, ce = per_prompt(brute_force_logits(model, tokens, L, s, means[: len(s)], freeze), tokens)
            torch.testing.assert_close(getattr(abl, f"entropy_{effect}")[i].double(), ent - ent0, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(getattr(abl, f"ce_{effect}")[i].double(), ce - ce0, atol=2e-5, rtol=1e-4)
    # freezing the final scale is a real intervention on this model, so total != direct
    assert not torch.allclose(abl.entropy_total, abl.entropy_direct, atol=1e-4)
    est = abl.ln_mediated_fraction(2)
    tot, dirc = float(abl.entropy_total[2].double().mean()), float(abl.entropy_direct[2].double().mean())
    assert est.value == pytest.approx(1 - abs(dirc) / abs(tot), rel=1e-6)


def test_planted_neuron_effect_is_all_through_the_final_layernorm(tokens):
    m = planted_model()
    abl = ablate_neurons(m, tokens, [PLANTED, 20])
    means = abl.mean_activation[:1]
    # direct effect (scale frozen at clean value) on every logit difference is ~0 ...
    clean = m(tokens)
    direct = brute_force_logits(m, tokens, 1, [PLANTED], means, True) - clean
    total = brute_force_logits(m, tokens, 1, [PLANTED], means, False) - clean
    direct, total = direct - direct.mean(-1, keepdim=True), total - total.mean(-1, keepdim=True)
    assert direct.abs().max() < 1e-3 * total.abs().max()
    assert total.abs().max() > 1.0
    # ... while its total effect on entropy is large and entirely LN-mediated
    assert abs(abl.relative_change(0, "entropy", "total").value) > 5.0
    assert abs(abl.change(0, "entropy", "direct").value) < 1e-3 * abs(abl.change(0, "entropy", "total").value)
    assert abl.ln_mediated_fraction(0, "entropy").value > 0.99
    assert abl.ln_mediated_fraction(0, "ce").value > 0.99
    # an ordinary neuron is mostly direct
    assert abl.ln_mediated_fraction(1, "entropy").value < 0.9
    assert abl.top(1) == [f"L1N{PLANTED}"]


def test_ln_free_total_equals_direct(tokens):
    ln_abl = ablate_neurons(planted_model(), tokens, [PLANTED, 20])
    free = ln_free_copy(planted_model(), tokens)
    abl = ablate_neurons(free, tokens, [PLANTED, 20])
    assert not abl.ln_final_frozen
    assert torch.equal(abl.entropy_total, abl.entropy_direct) and torch.equal(abl.ce_total, abl.ce_direct)
    # the brute-force total effect in the LN-free model agrees, and the null-space write is inert
    ent0, _ = per_prompt(free(tokens), tokens)
    ent, _ = per_prompt(brute_force_logits(free, tokens, 1, [PLANTED], abl.mean_activation[:1], False), tokens)
    torch.testing.assert_close(abl.entropy_total[0].double(), ent - ent0, atol=2e-5, rtol=1e-4)
    assert abl.entropy_total[0].abs().max() < 1e-3 * ln_abl.entropy_total[0].abs().mean()
    assert abl.ln_mediated_fraction(1).value == pytest.approx(0.0, abs=1e-12)


def test_frozen_final_ln_total_equals_direct(tokens):
    m = planted_model()
    m.estimate_ln_scales(tokens)
    m.freeze_ln("ln_final")
    abl = ablate_neurons(m, tokens, [PLANTED, 20])
    assert abl.ln_final_frozen  # the hook path is exercised: freezing a frozen scale changes nothing
    torch.testing.assert_close(abl.entropy_total, abl.entropy_direct, atol=1e-6, rtol=0)


def test_ablation_accepts_entropy_neurons_and_frames(tokens):
    m = planted_model()
    found = find_entropy_neurons(m, top=2)
    abl = ablate_neurons(m, tokens, found)
    assert abl.neurons == tuple(found.top())
    df = abl.to_frame()
    assert set(df.quantity) == {"change_total", "change_direct", "relative_total_%", "relative_direct_%",
                                "ln_mediated_fraction", "clean"}
    row = df[(df.set == abl.labels[0]) & (df.metric == "entropy") & (df.quantity == "change_total")].iloc[0]
    assert row.value == pytest.approx(float(abl.entropy_total[0].double().mean()), rel=1e-6)
    assert row.low <= row.value <= row.high
    rel = df[(df.set == abl.labels[0]) & (df.metric == "entropy") & (df.quantity == "relative_total_%")].iloc[0]
    assert rel.value == pytest.approx(100 * row.value / float(abl.clean_entropy.double().mean()), rel=1e-5)
    assert isinstance(abl.plot(), go.Figure)


# ---- calibration -----------------------------------------------------------------------------
@pytest.mark.parametrize("n_bins", [15, 4])
def test_calibration_matches_numpy(model, tokens, n_bins):
    cal = calibration(model, tokens, n_bins=n_bins, batch_size=4)
    logits = model(tokens)[:, :-1].double().detach()
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1]).numpy()
    labels = tokens[:, 1:].reshape(-1).numpy()
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.digitize(conf, edges[1:-1], right=True)  # bins (lo, hi]
    ece = sum(
        abs(correct[b == i].mean() - conf[b == i].mean()) * (b == i).mean() for i in range(n_bins) if (b == i).any()
    )
    assert cal.ece.value == pytest.approx(ece, abs=1e-6)
    assert cal.ece.low <= cal.ece.value <= cal.ece.high
    counts = np.bincount(b, minlength=n_bins)
    assert cal.count.tolist() == counts.tolist()
    for i in np.flatnonzero(counts):
        assert cal.accuracy[i] == pytest.approx(correct[b == i].mean(), abs=1e-6)
        assert cal.confidence[i] == pytest.approx(conf[b == i].mean(), abs=1e-6)
    assert torch.isnan(cal.accuracy[counts == 0]).all()
    ent = torch.distributions.Categorical(logits=logits).entropy()
    assert cal.mean_entropy.value == pytest.approx(float(ent.mean()), rel=1e-5)
    assert cal.accuracy_top1.value == pytest.approx(correct.mean())
    assert len(cal.to_frame()) == n_bins and isinstance(cal.plot(), go.Figure)


# ---- comparison ------------------------------------------------------------------------------
def test_compare_confidence(model, ln_free_model, tokens):
    cmp = compare_confidence(model, ln_free_model, tokens, top=2, batch_size=4)
    assert cmp.names == ("LN", "LN-free")
    assert all(isinstance(n, EntropyNeurons) for n in cmp.neurons)
    assert cmp.ablations[0].sets == tuple(tuple(cmp.neurons[0].top()[: i + 1]) for i in range(2))
    cal_free = calibration(ln_free_model, tokens)
    assert cmp.calibrations[1].ece.value == pytest.approx(cal_free.ece.value)
    df = cmp.to_frame()
    assert set(df.model) == {"LN", "LN-free"} and set(df.section) == {"ablation", "calibration"}
    ece_rows = df[(df.section == "calibration") & (df.metric == "ece")].set_index("model")["value"]
    assert ece_rows["LN-free"] == pytest.approx(cal_free.ece.value)
    diff = cmp.differences().set_index("metric")
    assert diff.loc["ece", "difference"] == pytest.approx(cal_free.ece.value - cmp.calibrations[0].ece.value)
    # in the LN-free model no effect goes through a final LN scale
    assert diff.loc["ln_mediated_fraction_entropy", "LN-free"].max() == pytest.approx(0.0, abs=1e-12)
    assert isinstance(cmp.plot(), go.Figure)
    shared = compare_confidence(model, ln_free_model, tokens, neurons=[5, 9], batch_size=4)
    assert shared.ablations[0].neurons == shared.ablations[1].neurons == (5, 9)


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="neurons"):
        ablate_neurons(model, tokens, [model.cfg.d_mlp])
    with pytest.raises(ValueError, match="neurons"):
        ablate_neurons(model, tokens, [-1])
    with pytest.raises(ValueError, match="duplicates"):
        ablate_neurons(model, tokens, [1, 1])
    with pytest.raises(TypeError, match="neurons"):
        ablate_neurons(model, tokens, [1.5])
    with pytest.raises(ValueError, match="layer"):
        find_entropy_neurons(model, layer=2)
    with pytest.raises(ValueError, match="layer"):
        ablate_neurons(model, tokens, [0], layer=-3)
    with pytest.raises(ValueError, match="no MLP"):
        find_entropy_neurons(make_model(attn_only=True))
    with pytest.raises(ValueError, match="no MLP"):
        ablate_neurons(make_model(attn_only=True), tokens, [0])
    with pytest.raises(ValueError, match="k"):
        find_entropy_neurons(model, k=model.cfg.d_model)
    with pytest.raises(ValueError, match="2 positions"):
        calibration(model, tokens[:, :1])
    with pytest.raises(ValueError, match="n_bins"):
        calibration(model, tokens, n_bins=0)
    with pytest.raises(ValueError, match="batch_size"):
        calibration(model, tokens, batch_size=0)
    with pytest.raises(ValueError, match="d_vocab"):
        compare_confidence(model, make_model(d_vocab=50), tokens % 50)
    with pytest.raises(TypeError, match="model"):
        calibration("gpt2", tokens)
    found = find_entropy_neurons(model, layer=0)
    with pytest.raises(ValueError, match="layer"):
        ablate_neurons(model, tokens, found, layer=1)


def test_inconsistent_shared_cfg_is_refused(tokens):
    """remove_ln() on a model sharing its cfg object would make the other model skip ln_final."""
    m = make_model()
    other = make_model()
    other.cfg = m.cfg  # shared config object
    m.estimate_ln_scales(tokens)
    m.remove_ln()  # sets the shared cfg.normalization_type = None
    with pytest.raises(ValueError, match="normalization_type"):
        ablate_neurons(other, tokens, [0])
    with pytest.raises(ValueError, match="normalization_type"):
        calibration(other, tokens)
