"""Entropy neurons and their ablation (total vs direct effect); calibration is in test_calibration.py.

Every number is checked against an independent computation: TransformerLens's own LN folding
for detection, brute-force hooked forward passes for ablations, each row alone for padding.
"""

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from conftest import make_llama, make_model, pad_rows
from lnfree import _checks
from lnfree._checks import TokenBatch
from lnfree.analysis.calibration import calibration
from lnfree.analysis.confidence import (
    ConfidenceAnalysis,
    EntropyNeurons,
    NeuronAblation,
    ablate_neurons,
    compare_confidence,
    find_entropy_neurons,
)
from lnfree.stats import Estimate

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


def planted_llama() -> "LNFreeTransformer":  # noqa: F821
    """make_llama() whose diag(w) W_U has the all-ones direction as an exact null direction, and
    whose last-layer neuron PLANTED writes along it: an entropy neuron only an RMSNorm can have
    (a LayerNorm would center the write away)."""
    m = make_llama()
    d, V = m.cfg.d_model, m.cfg.d_vocab
    g = torch.Generator().manual_seed(6)
    M = torch.randn(d, V, generator=g, dtype=torch.float64)
    M = M - M.mean(0, keepdim=True)  # ones^T M = 0: the mean direction moves no logit directly
    w = m.ln_final.w.detach().double()
    with torch.no_grad():
        m.unembed.W_U.copy_((M / w[:, None]).float())  # diag(w) W_U = M
        mlp = m.blocks[-1].mlp
        mlp.W_out[PLANTED] = torch.full((d,), 10 * d**-0.5)
        mlp.W_in[:, PLANTED] = 0.5 * torch.randn(d, generator=g)
        mlp.W_gate[:, PLANTED] = 0.5 * torch.randn(d, generator=g) + 0.3
    return m


# ---- independent references ------------------------------------------------------------------
def brute_force_logits(model, tokens, layer, neurons, means, freeze_final_scale):
    """Full forward pass with hook_post[..., neurons] := means, optionally with the final norm
    scale replaced by the clean run's per-token value."""
    def ablate(act, hook):
        act = act.clone()
        act[..., list(neurons)] = means
        return act

    hooks = [(f"blocks.{layer}.mlp.hook_post", ablate)]
    if freeze_final_scale:
        name = model.site_hook("ln_final")
        _, cache = model.run_with_cache(tokens, names_filter=name)
        hooks.append((name, lambda act, hook: cache[name]))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def _planted_logit_changes(m, tokens, means):
    """(direct, total): the logit changes of mean-ablating layer 1's planted neuron, with the final norm's
    scale held at its clean value and not, each centred over the vocabulary (a logit difference sees that)."""
    clean = m(tokens)
    direct = brute_force_logits(m, tokens, 1, [PLANTED], means, True) - clean
    total = brute_force_logits(m, tokens, 1, [PLANTED], means, False) - clean
    return direct - direct.mean(-1, keepdim=True), total - total.mean(-1, keepdim=True)


def per_token(logits, tokens):
    """Per-token entropy and CE of every position with a next token (torch.distributions)."""
    lg = logits[:, :-1].double()
    ent = torch.distributions.Categorical(logits=lg).entropy()
    ce = F.cross_entropy(lg.transpose(1, 2), tokens[:, 1:], reduction="none")
    return ent, ce


def per_prompt(logits, tokens):
    ent, ce = per_token(logits, tokens)
    return ent.mean(1), ce.mean(1)


# ---- detection -------------------------------------------------------------------------------
def test_detection_matches_transformer_lens_processed_weights(model):
    """LogitVar, norm and rho from TL's own fold_ln / center_writing_weights / center_unembed."""
    res = find_entropy_neurons(model, null_dim=2, n_top=5)
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
    assert res.pairs() == [(1, int(i)) for i in order[:5]] and res.labels[0] == f"L1N{int(order[0])}"
    assert list(res.to_frame().columns[:4]) == ["rank", "label", "layer", "neuron"]
    assert isinstance(res.plot(), go.Figure)


def test_planted_entropy_neuron_ranks_first_and_survives_ln_removal(tokens):
    m = planted_model()
    res = find_entropy_neurons(m, null_dim=3)
    assert res.neurons(1) == [f"L1N{PLANTED}"]
    assert res.rho[0] > 0.999 and res.rho[1:].max() < 0.9
    assert res.logit_var[0] < 1e-6 * res.logit_var[1:].min()
    # remove_ln folds C diag(w) / sigma into W_U: same geometry, same ranking
    free = find_entropy_neurons(ln_free_copy(planted_model(), tokens), null_dim=3)
    assert free.neurons(5) == res.neurons(5)
    torch.testing.assert_close(free.rho, res.rho, rtol=1e-4, atol=1e-5)


def test_rms_detection_matches_an_independent_computation():
    """RMSNorm: effective unembedding diag(w) W_U (vocabulary-centered only), w_out uncentered."""
    m = make_llama()
    res = find_entropy_neurons(m, null_dim=3, n_top=4)
    assert not res.centered and len(res.singular_values) == m.cfg.d_model
    W_eff = m.ln_final.w.detach().double()[:, None] * m.W_U.detach().double()
    W_eff = W_eff - W_eff.mean(1, keepdim=True)  # softmax ignores a uniform logit shift
    W_out = m.blocks[-1].mlp.W_out.detach().double()
    cos = torch.nn.functional.cosine_similarity(W_out[:, :, None], W_eff[None], dim=1)  # [d_mlp, V]
    U, S, _ = torch.linalg.svd(W_eff, full_matrices=False)
    rho = (W_out @ U[:, -3:]).norm(dim=1) / W_out.norm(dim=1)
    order = res.neuron
    torch.testing.assert_close(res.norm, W_out.norm(dim=1)[order].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.logit_var, cos.var(dim=1)[order].float(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res.rho, rho[order].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.singular_values, S.float(), rtol=1e-4, atol=1e-6)
    assert torch.equal(order, torch.argsort(W_out.norm(dim=1) / cos.var(dim=1), descending=True))


def test_rms_entropy_neuron_along_the_mean_direction(tokens):
    """The all-ones direction is an ordinary direction for RMSNorm: a neuron writing along it, in
    diag(w) W_U's null space, is the top candidate and acts only through the final RMS."""
    m = planted_llama()
    res = find_entropy_neurons(m, null_dim=1)
    assert res.neurons(1) == [f"L1N{PLANTED}"]
    assert res.norm[0] == pytest.approx(10.0, rel=1e-5)  # not centered away (a LayerNorm readout would give 0)
    assert res.rho[0] > 1 - 1e-6 and res.logit_var[0] < 1e-10
    abl = ablate_neurons(m, tokens, [f"L1N{PLANTED}", "L1N20"])
    assert abl.ln_final_frozen and abl.ln_mediated_fraction(0).value > 0.999
    assert abs(abl.relative_change(0).value) > 1.0
    assert abl.ln_mediated_fraction(1).value < 0.9
    # brute force: the direct effect (final RMS scale hooked to its clean value) moves no logit difference
    means = abl.mean_activation[:1]
    direct, total = _planted_logit_changes(m, tokens, means)
    assert direct.abs().max() < 1e-4 * total.abs().max() and total.abs().max() > 0.1
    # fold the final RMS away: the same geometry (diag(w) / sigma W_U), the same ranking, no norm pathway
    free = ln_free_copy(planted_llama(), tokens)
    fres = find_entropy_neurons(free, null_dim=1)
    assert not fres.centered and fres.neurons(5) == res.neurons(5)
    torch.testing.assert_close(fres.rho, res.rho, rtol=1e-4, atol=1e-5)
    fabl = ablate_neurons(free, tokens, [f"L1N{PLANTED}"])
    assert not fabl.ln_final_frozen and fabl.entropy_total.abs().max() < 1e-3 * abl.entropy_total[0].abs().mean()


def test_top_is_a_frame_of_layered_labels_and_k_is_deprecated(model):
    res = find_entropy_neurons(model, layer=0, n_top=3)
    top = res.top(3)
    assert list(top["label"]) == list(res.labels[:3]) and set(top["layer"]) == {0}
    assert all(lbl.startswith("L0N") for lbl in top["label"]) and len(res.top()) == 10
    assert res.neurons() == list(res.labels[:3]) and res.pairs(2) == [(0, int(i)) for i in res.neuron[:2]]
    with pytest.warns(DeprecationWarning, match="null_dim"):
        old = find_entropy_neurons(model, layer=0, k=2)
    assert old.null_dim == 2 and torch.equal(old.rho, find_entropy_neurons(model, layer=0, null_dim=2).rho)
    with pytest.warns(DeprecationWarning, match="n_top"):
        assert find_entropy_neurons(model, top=4).n_top == 4
    with pytest.warns(DeprecationWarning):
        assert old.k == 2
    with pytest.raises(ValueError, match="null_dim= only"):
        find_entropy_neurons(model, k=2, null_dim=2)


def test_non_finite_weights_are_refused(model):
    """A NaN in a neuron's w_out used to drop that neuron silently from the ranking."""
    with torch.no_grad():
        model.blocks[-1].mlp.W_out[5, 3] = float("nan")
    with pytest.raises(ValueError, match="W_out contains 1 non-finite"):
        find_entropy_neurons(model)
    m = make_model()
    with torch.no_grad():
        m.unembed.W_U[0, 0] = float("inf")
    with pytest.raises(ValueError, match="W_U contains 1 non-finite"):
        find_entropy_neurons(m)


# ---- ablation --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_ablation_matches_brute_force(tokens, layer, arch):
    model = make_model() if arch == "gpt2" else make_llama()
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
    tok_ent0, tok_ce0 = per_token(model(tokens), tokens)
    for i, s in enumerate(abl.sets):
        for effect, freeze in (("total", False), ("direct", True)):
            logits = brute_force_logits(model, tokens, L, s, means[: len(s)], freeze)
            ent, ce = per_prompt(logits, tokens)
            torch.testing.assert_close(getattr(abl, f"entropy_{effect}")[i].double(), ent - ent0, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(getattr(abl, f"ce_{effect}")[i].double(), ce - ce0, atol=2e-5, rtol=1e-4)
            tok_ent, tok_ce = per_token(logits, tokens)  # per token, row-major
            torch.testing.assert_close(abl.per_token(i, "entropy", effect).double(), (tok_ent - tok_ent0).flatten(),
                                       atol=3e-5, rtol=1e-4)
            torch.testing.assert_close(abl.per_token(i, "ce", effect).double(), (tok_ce - tok_ce0).flatten(),
                                       atol=3e-5, rtol=1e-4)
    assert abl.token_prompt.tolist() == np.repeat(np.arange(6), 11).tolist()
    assert abl.token_position.tolist() == list(range(11)) * 6 and abl.n_tokens == 66
    # freezing the final scale is a real intervention on this model, so total != direct
    assert not torch.allclose(abl.entropy_total, abl.entropy_direct, atol=1e-4)
    est = abl.ln_mediated_fraction(2)
    tot, dirc = float(abl.entropy_total[2].double().mean()), float(abl.entropy_direct[2].double().mean())
    assert est.value == pytest.approx(1 - abs(dirc) / abs(tot), rel=1e-6)


def test_planted_neuron_effect_is_all_through_the_final_layernorm(tokens):
    m = planted_model()
    abl = ablate_neurons(m, tokens, [f"L1N{PLANTED}", "L1N20"])
    means = abl.mean_activation[:1]
    # direct effect (scale frozen at clean value) on every logit difference is ~0 ...
    direct, total = _planted_logit_changes(m, tokens, means)
    assert direct.abs().max() < 1e-3 * total.abs().max()
    assert total.abs().max() > 1.0
    # ... while its total effect on entropy is large and entirely LN-mediated
    assert abs(abl.relative_change(0, "entropy", "total").value) > 5.0
    assert abs(abl.change(0, "entropy", "direct").value) < 1e-3 * abs(abl.change(0, "entropy", "total").value)
    assert abl.ln_mediated_fraction(0, "entropy").value > 0.99
    assert abl.ln_mediated_fraction(0, "ce").value > 0.99
    # an ordinary neuron is mostly direct
    assert abl.ln_mediated_fraction(1, "entropy").value < 0.9
    top = abl.top(1)
    assert list(top["set"]) == [f"L1N{PLANTED}"] and top["ln_mediated_fraction_entropy"][0] > 0.99


def test_ln_free_total_equals_direct(tokens):
    ln_abl = ablate_neurons(planted_model(), tokens, [(1, PLANTED), (1, 20)])
    free = ln_free_copy(planted_model(), tokens)
    abl = ablate_neurons(free, tokens, [(1, PLANTED), (1, 20)])
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
    abl = ablate_neurons(m, tokens, [f"L1N{PLANTED}", "L1N20"])
    assert abl.ln_final_frozen  # the hook path is exercised: freezing a frozen scale changes nothing
    torch.testing.assert_close(abl.entropy_total, abl.entropy_direct, atol=1e-6, rtol=0)


def test_neuron_references_carry_their_layer(model, tokens):
    """find_entropy_neurons(layer=0) results land in layer 0, whichever form is passed."""
    found = find_entropy_neurons(model, layer=0, n_top=2)
    idx = [int(i) for i in found.neuron[:2]]
    ref = ablate_neurons(model, tokens, idx, layer=0)
    for form in (found, found.neurons(), found.pairs(), found.top(2), [f"L0N{idx[0]}", (0, idx[1])],
                 [(-2, idx[0]), (0, idx[1])]):
        abl = ablate_neurons(model, tokens, form)
        assert abl.layer == 0 and abl.neurons == tuple(idx)
        torch.testing.assert_close(abl.entropy_total, ref.entropy_total, rtol=0, atol=0)
    assert ablate_neurons(model, tokens, found).neurons_from == found.model_name
    assert ablate_neurons(model, tokens, found).references(0) == [f"L0N{idx[0]}"]
    # independent check that layer 0 (not the last layer) was ablated
    ent0, _ = per_prompt(model(tokens), tokens)
    ent, _ = per_prompt(brute_force_logits(model, tokens, 0, idx[:1], ref.mean_activation[:1], False), tokens)
    torch.testing.assert_close(ref.entropy_total[0].double(), ent - ent0, atol=2e-5, rtol=1e-4)


def test_ambiguous_neuron_references_are_refused(model, tokens):
    found = find_entropy_neurons(model, layer=0, n_top=2)
    with pytest.raises(ValueError, match=r"bare indices.*'L1N3'.*layer="):
        ablate_neurons(model, tokens, [3, 4])
    with pytest.raises(ValueError, match="bare indices"):
        ablate_neurons(model, tokens, (0, 5))  # a pair or two neurons? only [(0, 5)] is a pair
    with pytest.raises(ValueError, match="bare indices"):
        ablate_neurons(model, tokens, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="in layer 0, but layer=1"):
        ablate_neurons(model, tokens, found, layer=1)
    with pytest.raises(ValueError, match="in layer 0, but layer=1"):
        ablate_neurons(model, tokens, ["L0N3"], layer=1)
    with pytest.raises(ValueError, match=r"layers \[0, 1\]; .* one layer at a time"):
        ablate_neurons(model, tokens, ["L0N3", "L1N3"])
    with pytest.raises(ValueError, match="mixes bare indices"):
        ablate_neurons(model, tokens, ["L0N3", 4])
    with pytest.raises(ValueError, match="not of the form"):
        ablate_neurons(model, tokens, ["N3"])
    with pytest.raises(ValueError, match="neuron layer must be in"):
        ablate_neurons(model, tokens, ["L5N3"])
    with pytest.raises(TypeError, match="not a neuron reference"):
        ablate_neurons(model, tokens, [(0, 1, 2)])
    with pytest.raises(ValueError, match="non-empty"):
        ablate_neurons(model, tokens, [])


def test_ablation_result_contract(tokens):
    m = planted_model()
    found = find_entropy_neurons(m, n_top=2)
    abl = ablate_neurons(m, tokens, found, n_boot=200, level=0.9, seed=3)
    assert (abl.n_boot, abl.level, abl.seed) == (200, 0.9, 3)
    assert abl.model_name == _checks.model_label(m) == found.model_name
    assert abl.model_id == _checks.model_id(m) == found.model_id
    assert abl == abl and abl != ablate_neurons(m, tokens, found) and len({abl, found}) == 2
    text = repr(abl)
    assert text.startswith("NeuronAblation(") and len(text) <= 240 and "tensor" not in text
    assert "relative_change=" in text and "<table" in abl._repr_html_()
    head = abl.headline()
    assert set(head) == {"relative_change", "ln_mediated_fraction"} and all(isinstance(e, Estimate) for e in head.values())
    assert head["relative_change"].level == 0.9
    # the stored seed drives the CIs: a different seed gives a different interval
    other = ablate_neurons(m, tokens, found, n_boot=200, level=0.9, seed=4)
    assert head["relative_change"].low != other.relative_change().low
    df = abl.to_frame()
    assert set(df.quantity) == {"change_total", "change_direct", "relative_total_%", "relative_direct_%",
                                "ln_mediated_fraction", "clean"}
    row = df[(df.set == abl.labels[0]) & (df.metric == "entropy") & (df.quantity == "change_total")].iloc[0]
    assert row.value == pytest.approx(float(abl.entropy_total[0].double().mean()), rel=1e-6)
    assert row.low <= row.value <= row.high and row.level == 0.9
    rel = df[(df.set == abl.labels[0]) & (df.metric == "entropy") & (df.quantity == "relative_total_%")].iloc[0]
    assert rel.value == pytest.approx(100 * row.value / float(abl.clean_entropy.double().mean()), rel=1e-5)
    fig = abl.plot()
    assert isinstance(fig, go.Figure) and fig.layout.title.text
    for axis in (fig.layout.xaxis, fig.layout.xaxis2, fig.layout.yaxis, fig.layout.yaxis2):
        assert axis.title.text
    assert found.plot().layout.xaxis.title.text and found.plot().layout.yaxis.title.text
    assert "EntropyNeurons(" in repr(found) and "null_dim=" in repr(found) and len(repr(found)) <= 240


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_ablation_equals_each_row_alone(side, arch):
    model = make_model() if arch == "gpt2" else make_llama()
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 61, (n,), generator=g) for n in (12, 5, 9, 2)]
    toks, mask = pad_rows(rows, side)
    neurons = ["L0N3", "L0N50"]
    abl = ablate_neurons(model, toks, neurons, attention_mask=mask, cumulative=True, batch_size=3)
    assert abl.padded and abl.n_tokens == sum(len(r) - 1 for r in rows)
    # mean activations: over the real tokens only, i.e. pooled over the rows alone
    acts = [model.run_with_cache(r[None], names_filter="blocks.0.mlp.hook_post")[1]["blocks.0.mlp.hook_post"][0]
            for r in rows]
    pooled = torch.cat(acts)[:, [3, 50]].mean(0)
    torch.testing.assert_close(abl.mean_activation, pooled, rtol=1e-5, atol=1e-6)
    for p, r in enumerate(rows):
        alone = ablate_neurons(model, r[None], neurons, cumulative=True, means=abl.mean_activation)
        for name in ("clean_entropy", "clean_ce"):
            torch.testing.assert_close(getattr(abl, name)[p], getattr(alone, name)[0], atol=1e-5, rtol=0)
        for name in ("entropy_total", "entropy_direct", "ce_total", "ce_direct"):
            torch.testing.assert_close(getattr(abl, name)[:, p], getattr(alone, name)[:, 0], atol=1e-5, rtol=0)
        mine = abl.token_prompt == p
        assert abl.token_position[mine].tolist() == list(range(len(r) - 1))
        torch.testing.assert_close(abl.token_delta[..., mine], alone.token_delta, atol=1e-5, rtol=0)
    same = ablate_neurons(model, TokenBatch(toks, mask), neurons, cumulative=True, batch_size=3)
    torch.testing.assert_close(same.entropy_total, abl.entropy_total, atol=0, rtol=0)
    # without the mask the pads are scored: a different (wrong) number
    assert not torch.allclose(ablate_neurons(model, toks, neurons, cumulative=True).clean_entropy,
                              abl.clean_entropy, atol=1e-3)


def test_non_finite_activations_and_means_are_refused(model, tokens):
    with torch.no_grad():
        model.blocks[0].mlp.b_in[3] = float("nan")
    with pytest.raises(ValueError, match="activations of the ablated neurons contains .* non-finite"):
        ablate_neurons(model, tokens, ["L0N3"])
    with pytest.raises(ValueError, match="means contains 1 non-finite"):
        ablate_neurons(make_model(), tokens, ["L0N3", "L0N4"], means=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match=r"means must have shape \(2,\)"):
        ablate_neurons(make_model(), tokens, ["L0N3", "L0N4"], means=torch.zeros(3))


def test_one_prompt_has_no_confidence_interval(model, tokens):
    abl = ablate_neurons(model, tokens[:1], ["L1N3"])
    est = abl.relative_change()
    assert est.n == 1 and math.isnan(est.low) and math.isnan(est.high) and "no CI" in str(est)
    assert "no CI" in repr(abl) and math.isnan(abl.ln_mediated_fraction().low)
    assert isinstance(abl.plot(), go.Figure)  # nan bounds draw no error bar rather than failing


# ---- comparison ------------------------------------------------------------------------------
def test_compare_confidence(model, ln_free_model, tokens):
    cmp = compare_confidence(model, ln_free_model, tokens, n_top=2, batch_size=4)
    assert cmp.names == (_checks.model_label(model), _checks.model_label(ln_free_model)) == ("custom (LN)", "custom (LN-free)")
    assert isinstance(cmp.a, ConfidenceAnalysis) and isinstance(cmp.a.ablation, NeuronAblation)
    assert all(isinstance(n, EntropyNeurons) for n in cmp.neurons)
    assert cmp.ablations[0].sets == tuple(tuple(int(i) for i in cmp.neurons[0].neuron[: i + 1]) for i in range(2))
    cal_free = calibration(ln_free_model, tokens)
    assert cmp.calibrations[1].ece.value == pytest.approx(cal_free.ece.value)
    df = cmp.to_frame()
    assert set(df.model) == set(cmp.names) and set(df.section) == {"ablation", "calibration"}
    ece_rows = df[(df.section == "calibration") & (df.metric == "ece")].set_index("model")["value"]
    assert ece_rows[cmp.names[1]] == pytest.approx(cal_free.ece.value)
    diff = cmp.difference()
    assert len(diff) == len(cmp.labels) == 3 + 2 * 2
    ece = diff.set_index("metric").loc["ece"]
    assert ece["value"] == pytest.approx(cal_free.ece.value - cmp.calibrations[0].ece.value)
    assert ece["low"] <= ece["value"] <= ece["high"]
    assert cmp.ece_difference().value == pytest.approx(ece["value"])
    # in the LN-free model no effect goes through a final LN scale
    fr = diff[diff.metric == "ln_mediated_fraction_entropy"]
    assert fr["b"].abs().max() == pytest.approx(0.0, abs=1e-12)
    fig = cmp.plot()
    assert isinstance(fig, go.Figure) and fig.layout.yaxis.title.text and fig.layout.xaxis2.title.text
    assert "ece_difference=" in repr(cmp) and " vs " in repr(cmp)
    with pytest.warns(DeprecationWarning):
        cmp.differences()
    shared = compare_confidence(model, ln_free_model, tokens, neurons=["L1N5", "L1N9"], names=("ln", "free"),
                                batch_size=4)
    assert shared.ablations[0].neurons == shared.ablations[1].neurons == (5, 9)
    assert shared.names == ("ln", "free")


def test_compare_confidence_refuses_different_tokenizers(model, tokens):
    from lnfree.tokenizer import gpt2_tokenizer

    other = make_model(seed=1)
    with pytest.raises(ValueError, match="different vocabularies"):
        compare_confidence(model, make_model(d_vocab=50), tokens % 50)
    a, b = make_model(d_vocab=50257, n_ctx=16), make_model(d_vocab=50257, n_ctx=16, seed=1)
    a.tokenizer = gpt2_tokenizer()

    class Shuffled:  # same size, encodes differently
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text):
            return {"input_ids": [i + 1 for i in self.tok(text)["input_ids"]]}

        def __len__(self):
            return len(self.tok)

    b.tokenizer = Shuffled(a.tokenizer)
    with pytest.raises(ValueError, match="different tokenizers"):
        compare_confidence(a, b, tokens)
    with pytest.raises(ValueError, match="names must be"):
        compare_confidence(model, other, tokens, names=("x", "x"))


# ---- bad input -------------------------------------------------------------------------------
def test_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="neurons"):
        ablate_neurons(model, tokens, [model.cfg.d_mlp], layer=-1)
    with pytest.raises(ValueError, match="neurons"):
        ablate_neurons(model, tokens, [-1], layer=-1)
    with pytest.raises(ValueError, match="duplicates"):
        ablate_neurons(model, tokens, ["L1N1", (1, 1)])
    with pytest.raises(TypeError, match="neurons"):
        ablate_neurons(model, tokens, [1.5], layer=-1)
    with pytest.raises(ValueError, match="layer"):
        find_entropy_neurons(model, layer=2)
    with pytest.raises(ValueError, match="layer"):
        ablate_neurons(model, tokens, [0], layer=-3)
    with pytest.raises(ValueError, match="no MLP"):
        find_entropy_neurons(make_model(attn_only=True))
    with pytest.raises(ValueError, match="no MLP"):
        ablate_neurons(make_model(attn_only=True), tokens, ["L0N0"])
    with pytest.raises(ValueError, match="null_dim"):
        find_entropy_neurons(model, null_dim=model.cfg.d_model)
    with pytest.raises(ValueError, match="2 positions"):
        ablate_neurons(model, tokens[:, :1], ["L1N0"])
    with pytest.raises(ValueError, match="batch_size"):
        ablate_neurons(model, tokens, ["L1N0"], batch_size=0)
    with pytest.raises(ValueError, match="n_boot"):
        ablate_neurons(model, tokens, ["L1N0"], n_boot=0)
    with pytest.raises(ValueError, match="level"):
        ablate_neurons(model, tokens, ["L1N0"], level=95)
    with pytest.raises(ValueError, match="n_top"):
        find_entropy_neurons(model, n_top=0)
    with pytest.raises(TypeError, match="model"):
        find_entropy_neurons("gpt2")
    with pytest.raises(TypeError, match="positional"):
        find_entropy_neurons(model, -1)  # keyword-only after the model
    with pytest.raises(ValueError, match="attention_mask"):
        ablate_neurons(model, tokens, ["L1N0"], attention_mask=torch.ones(2, 2))


def test_inconsistent_shared_cfg_is_refused(tokens):
    """remove_ln() on a model sharing its cfg object would make the other model skip ln_final."""
    m = make_model()
    other = make_model()
    other.cfg = m.cfg  # shared config object
    m.estimate_ln_scales(tokens)
    m.remove_ln()  # sets the shared cfg.normalization_type = None
    with pytest.raises(ValueError, match="normalization_type"):
        ablate_neurons(other, tokens, ["L0N0"])


# ---- SmolLM2-135M: a real RMSNorm model --------------------------------------------------------
# (the `smollm2` session fixture is in conftest.py)

def smollm2_rows(model, n_rows: int, seq_len: int) -> torch.Tensor:
    """Rows of the zoo's held-out text, re-tokenized with the model's own tokenizer."""
    from lnfree import zoo

    text = zoo.tokenizer().decode(zoo.heldout("persuasion")[:4, 1:].reshape(-1).tolist())
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][200:]  # past the title page
    return torch.tensor(ids[: n_rows * seq_len]).reshape(n_rows, seq_len)


@pytest.mark.slow
def test_smollm2_entropy_neurons_against_independent_computations(smollm2):
    """Detection on the real RMSNorm readout vs an explicit SVD and cosine matrix; total and direct
    ablation effects vs brute-force forward passes (the direct one with the final RMS scale hooked
    to the clean run's value)."""
    m = smollm2
    res = find_entropy_neurons(m, layer=-1, n_top=2)
    assert not res.centered and res.layer == m.cfg.n_layers - 1 and res.null_dim == 9
    W_eff = m.ln_final.w.detach().double()[:, None] * m.W_U.detach().double()
    W_eff = W_eff - W_eff.mean(1, keepdim=True)
    U, S, _ = torch.linalg.svd(W_eff, full_matrices=False)
    top = res.neuron[:2]
    w = m.blocks[-1].mlp.W_out.detach().double()[top]
    cos = torch.nn.functional.cosine_similarity(w[:, :, None], W_eff[None], dim=1)  # [2, vocab]
    torch.testing.assert_close(res.logit_var[:2], cos.var(dim=1).float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.rho[:2], ((w @ U[:, -9:]).norm(dim=1) / w.norm(dim=1)).float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.singular_values, S.float(), rtol=1e-4, atol=1e-6)

    tokens = smollm2_rows(m, 1, 32)  # one forward of SmolLM2 costs seconds on a busy CPU: keep it small
    n = int(top[0])
    abl = ablate_neurons(m, tokens, res.neurons(1), batch_size=1)
    assert abl.ln_final_frozen and abl.sets == ((n,),)
    scale_hook, post_hook = m.site_hook("ln_final"), "blocks.29.mlp.hook_post"
    with torch.no_grad():
        clean_logits, cache = m.run_with_cache(tokens, names_filter=[scale_hook, post_hook])
        mean = cache[post_hook][..., n].mean()
        assert abl.mean_activation.item() == pytest.approx(mean.item(), rel=1e-4, abs=1e-6)

        def ablate(act, hook):
            act = act.clone()
            act[..., n] = mean
            return act

        ent0, ce0 = per_token(clean_logits, tokens)
        for effect, hooks in (("total", [(post_hook, ablate)]),
                              ("direct", [(post_hook, ablate), (scale_hook, lambda act, hook: cache[scale_hook])])):
            ent, ce = per_token(m.run_with_hooks(tokens, fwd_hooks=hooks), tokens)
            torch.testing.assert_close(abl.per_token(0, "entropy", effect).double(), (ent - ent0).flatten(),
                                       atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(abl.per_token(0, "ce", effect).double(), (ce - ce0).flatten(),
                                       atol=2e-4, rtol=1e-3)
    assert not torch.allclose(abl.token_delta[0, :, 0], abl.token_delta[0, :, 1], atol=1e-5)
