"""DLA and exact direct effect: DE against brute-force forward passes, DLA against TransformerLens,
LN-free exactness (DLA == DE, components sum to the logit), the LN gap, and bad input."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from conftest import make_model
from lnfree.stats import Estimate
from lnfree.analysis.dla import DLAComparison, DLAResult, compare_dla, direct_logit_attribution


# ---- independent reference computations ------------------------------------------------------
def _pick(logits, b_idx, p_idx, t, o=None):
    out = logits[b_idx, p_idx, t]
    return out if o is None else out - logits[b_idx, p_idx, o]


def _brute_de(model, tokens, vec, b_idx, p_idx, t, o=None):
    """logit(r) - logit(r - vec): one forward pass with vec [batch, pos, d] subtracted from the
    residual stream feeding ln_final (blocks.{L-1}.hook_resid_post)."""
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda r, hook: r - vec)])
    return _pick(clean, b_idx, p_idx, t, o) - _pick(ablated, b_idx, p_idx, t, o)


def _at(vec_sel, shape, b_idx, p_idx):
    """Scatter per-token vectors [n, d] into a [batch, pos, d] tensor (zeros elsewhere)."""
    out = torch.zeros(shape)
    out[b_idx, p_idx] = vec_sel
    return out


def _cache(model, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return cache


def _last(tokens):
    b = tokens.shape[0]
    return torch.arange(b), torch.full((b,), tokens.shape[1] - 1)


# ---- DE == brute force -----------------------------------------------------------------------
def test_head_de_matches_brute_force_and_dla_matches_transformer_lens(model, tokens):
    targets = tokens[:, 0]
    other = (tokens[:, 0] + 7) % model.cfg.d_vocab
    for tgt in (targets, (targets, other)):
        res = direct_logit_attribution(model, tokens, targets=tgt, components="heads", pos=-1, batch_size=4)
        assert res.dla.shape == res.direct_effect.shape == (model.cfg.n_layers * model.cfg.n_heads, tokens.shape[0])
        assert res.labels[:5] == ("L0H0", "L0H1", "L0H2", "L0H3", "L1H0")

        model.set_use_attn_result(True)  # TL's own per-head outputs, independent of hook_z @ W_O here
        cache = _cache(model, tokens)
        model.set_use_attn_result(False)
        b_idx, p_idx = _last(tokens)
        t, o = (tgt, None) if isinstance(tgt, torch.Tensor) else tgt
        for k, label in enumerate(res.labels):
            l, h = int(label[1]), int(label[3])
            head = cache[f"blocks.{l}.attn.hook_result"][:, :, h]
            expected = _brute_de(model, tokens, _at(head[b_idx, p_idx], head.shape, b_idx, p_idx), b_idx, p_idx, t, o)
            torch.testing.assert_close(res.direct_effect[k], expected, atol=2e-4, rtol=1e-4)

        # DLA: TransformerLens's stacked head results with ln_final's cached scale, times ln_final.w
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [heads, batch, d]
        u = model.W_U[:, t].T - (0 if o is None else model.W_U[:, o].T)
        expected_dla = (stack * model.ln_final.w * u).sum(-1)
        torch.testing.assert_close(res.dla, expected_dla.detach(), atol=1e-5, rtol=1e-5)
        # the reported logit is the model's own
        torch.testing.assert_close(res.logit, _pick(model(tokens).detach(), b_idx, p_idx, t, o), atol=1e-5, rtol=1e-5)


def test_layer_de_matches_brute_force_including_bias(model, tokens):
    pos = torch.tensor([3, 11, 0, 7, 5, -1])  # per-prompt positions, one negative
    targets = (tokens[:, 2] * 3) % model.cfg.d_vocab
    res = direct_logit_attribution(model, tokens, targets=targets, components="layers", pos=pos)
    L = model.cfg.n_layers
    assert res.labels == ("embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out", "bias")
    assert torch.equal(res.positions, pos % tokens.shape[1])
    cache = _cache(model, tokens)
    b_idx, p_idx = torch.arange(tokens.shape[0]), pos % tokens.shape[1]
    vecs = {"embed": cache["hook_embed"], "pos_embed": cache["hook_pos_embed"].expand_as(cache["hook_embed"])}
    for i in range(L):
        vecs[f"{i}_attn_out"] = cache[f"blocks.{i}.hook_attn_out"]
        vecs[f"{i}_mlp_out"] = cache[f"blocks.{i}.hook_mlp_out"]
    for k, label in enumerate(res.labels[:-1]):
        v = vecs[label]
        expected = _brute_de(model, tokens, _at(v[b_idx, p_idx], v.shape, b_idx, p_idx), b_idx, p_idx, targets)
        torch.testing.assert_close(res.direct_effect[k], expected, atol=2e-4, rtol=1e-4)

    # bias: remove the rest of the residual stream (~0 here) and zero ln_final.b and b_U
    rest = cache[f"blocks.{L - 1}.hook_resid_post"] - sum(vecs.values())
    no_bias = copy.deepcopy(model)
    with torch.no_grad():
        no_bias.ln_final.b.zero_()
        no_bias.b_U.zero_()
        hook = f"blocks.{L - 1}.hook_resid_post"
        ablated = no_bias.run_with_hooks(tokens, fwd_hooks=[(hook, lambda r, hook: r - rest)])
    expected = res.logit - ablated[b_idx, p_idx, targets]
    torch.testing.assert_close(res.direct_effect[-1], expected, atol=2e-4, rtol=1e-4)
    # in an LN model the bias DLA is exactly ln_final.b . W_U[:, t] + b_U[t] (the rest is ~0)
    torch.testing.assert_close(
        res.dla[-1], (model.ln_final.b @ model.W_U[:, targets] + model.b_U[targets]).detach(), atol=1e-4, rtol=1e-4
    )


def test_neuron_de_matches_brute_force_next_token_all_positions(model, tokens):
    layer = 1
    res = direct_logit_attribution(model, tokens, components="neurons", layer=layer)  # targets=None -> pos="all"
    n_pos = tokens.shape[1] - 1
    assert res.dla.shape == (model.cfg.d_mlp, tokens.shape[0], n_pos)
    assert res.labels[0] == "L1N0" and res.targets == "next-token" and res.positions is None
    cache = _cache(model, tokens)
    post = cache[f"blocks.{layer}.mlp.hook_post"]
    W_out = model.blocks[layer].mlp.W_out.detach()
    b_idx = torch.arange(tokens.shape[0]).repeat_interleave(n_pos)
    p_idx = torch.arange(n_pos).repeat(tokens.shape[0])
    labels = tokens[:, 1:].reshape(-1)
    for n in range(model.cfg.d_mlp):
        vec = post[:, :, n, None] * W_out[n]
        vec[:, -1] = 0  # the last position has no label and is not part of the result
        # positions do not interact after the last block, so one pass gives every position's DE
        expected = _brute_de(model, tokens, vec, b_idx, p_idx, labels).reshape(tokens.shape[0], n_pos)
        torch.testing.assert_close(res.direct_effect[n], expected, atol=2e-4, rtol=1e-4)


# ---- LN-free: DLA is exact -------------------------------------------------------------------
@pytest.mark.parametrize("components,layer", [("heads", None), ("layers", None), ("all", None), ("neurons", 0)])
def test_ln_free_dla_equals_de(ln_free_model, tokens, components, layer):
    assert ln_free_model.is_ln_free
    res = direct_logit_attribution(ln_free_model, tokens, targets=tokens[:, 3], components=components, layer=layer, pos="all")
    assert res.ln_final_mode == "removed"
    rel = (res.dla - res.direct_effect).norm() / res.direct_effect.norm()
    assert rel < 1e-5
    overall, per_component = res.nmae(), res.nmae_by_component()
    assert abs(overall.value) < 1e-5 and overall.high < 1e-5
    assert np.nanmax(np.abs(per_component.to_numpy())) < 1e-5


def test_ln_free_components_sum_to_logit_and_logit_difference(ln_free_model, tokens):
    with torch.no_grad():
        logits = ln_free_model(tokens)
    t, o = tokens[:, 5], (tokens[:, 5] + 11) % 61
    b_idx, p_idx = _last(tokens)
    for tgt, expected in ((t, logits[b_idx, p_idx, t]), ((t, o), logits[b_idx, p_idx, t] - logits[b_idx, p_idx, o])):
        for components in ("layers", "all"):
            res = direct_logit_attribution(ln_free_model, tokens, targets=tgt, components=components)
            assert res.labels[-1] == "bias"
            torch.testing.assert_close(res.dla.sum(0), expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(res.direct_effect.sum(0), expected, atol=1e-4, rtol=0)
    # next-token targets at every position: the decomposition holds everywhere
    res = direct_logit_attribution(ln_free_model, tokens, components="layers")
    n_pos = tokens.shape[1] - 1
    expected = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(res.dla.sum(0), expected, atol=1e-4, rtol=0)
    assert res.dla.shape == (7, tokens.shape[0], n_pos)


# ---- LN model: DLA != DE unless ln_final is frozen ---------------------------------------------
def test_ln_model_has_a_gap_and_frozen_ln_final_closes_it(model, tokens):
    cache = _cache(model, tokens)
    scale = cache["ln_final.hook_scale"][:, -1, 0]
    assert scale.std() / scale.mean() > 0.01  # ln_final's scale really varies: the gap must exist
    res = direct_logit_attribution(model, tokens, targets=tokens[:, 0], components="heads")
    assert res.ln_final_mode == "live"
    overall, per_head = res.nmae(), res.nmae_by_component()
    assert overall.value > 1.0 and overall.low > 0.5  # percent
    assert (per_head > 0.1).all()
    gap = (res.dla - res.direct_effect).abs()
    assert gap.max() > 1e-2

    frozen = copy.deepcopy(model).freeze_ln("ln_final", scales=float(scale.mean()))
    res_f = direct_logit_attribution(frozen, tokens, targets=tokens[:, 0], components="all")
    assert res_f.ln_final_mode == "frozen"
    torch.testing.assert_close(res_f.dla, res_f.direct_effect, atol=1e-5, rtol=1e-5)
    assert res_f.nmae().value < 1e-3
    # frozen: layers also sum to the logit (LN on the path is affine)
    res_l = direct_logit_attribution(frozen, tokens, targets=tokens[:, 0], components="layers")
    torch.testing.assert_close(res_l.dla.sum(0), res_l.logit, atol=1e-4, rtol=0)


def test_nmae_definition_and_aggregates(model, tokens):
    res = direct_logit_attribution(model, tokens, targets=tokens[:, 0], components="heads")
    err, de = (res.dla - res.direct_effect).abs().double(), res.direct_effect.abs().double()
    overall, per = res.nmae(), res.nmae_by_component()
    assert overall.value == pytest.approx(float(100 * err.mean() / de.mean()), rel=1e-9)
    assert overall.low <= overall.value <= overall.high and overall.n == tokens.shape[0]
    np.testing.assert_allclose(per.to_numpy(), (100 * err.mean(1) / de.mean(1)).numpy(), rtol=1e-9)
    mean_est = res.nmae(aggregate="mean")
    assert mean_est.value == pytest.approx(float((100 * err.mean(1) / de.mean(1)).mean()), rel=1e-9)
    by_layer = res.nmae_frame("layer", n_boot=100)
    assert list(by_layer["group"]) == ["0", "1"]
    assert by_layer["nmae"][0] == pytest.approx(float(100 * err[:4].mean() / de[:4].mean()), rel=1e-9)


# ---- streaming, wrapping, views ----------------------------------------------------------------
def test_batching_and_hooked_transformer_input_give_the_same_numbers(model, tokens):
    a = direct_logit_attribution(model, tokens, components="all", batch_size=16)
    b = direct_logit_attribution(model, tokens, components="all", batch_size=4)
    torch.testing.assert_close(a.dla, b.dla, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.direct_effect, b.direct_effect, atol=1e-6, rtol=1e-6)
    ht = HookedTransformer(model.cfg)
    ht.load_state_dict(model.state_dict())
    c = direct_logit_attribution(ht, tokens, components="all", batch_size=5)
    torch.testing.assert_close(a.direct_effect, c.direct_effect, atol=1e-6, rtol=1e-6)


def test_frame_top_plot(model, tokens):
    res = direct_logit_attribution(model, tokens, targets=tokens[:, 1], components="heads")
    frame = res.to_frame()
    assert len(frame) == 8 * 6 and {"component", "layer", "prompt", "dla", "direct_effect", "logit"} <= set(frame)
    row = frame[(frame.component == "L1H2") & (frame.prompt == 4)].iloc[0]
    assert row.dla == pytest.approx(float(res.dla[6, 4])) and row.layer == "1"
    top = res.top(3)
    assert len(top) == 3
    means = res.direct_effect.abs().mean(1)
    assert top.component[0] == res.labels[int(means.argmax())]
    assert res.plot().data and res.plot("bar").data
    with pytest.raises(ValueError, match="kind"):
        res.plot("pie")
    res_all = direct_logit_attribution(model, tokens, components="heads", pos="all", targets=tokens[:, 1])
    assert "position" in res_all.to_frame() and res_all.dla.shape == (8, 6, 12)


def test_compare_dla(model, ln_free_model, tokens):
    cmp = compare_dla(model, ln_free_model, tokens, targets=tokens[:, 2], components="heads", n_boot=100)
    assert isinstance(cmp, DLAComparison) and isinstance(cmp.a, DLAResult)
    ln, free = cmp.names  # labelled from the models' norm state, not the argument position
    assert (ln, free) == ("custom (LN)", "custom (LN-free)")
    table = cmp.to_frame()
    overall = table[table.group == "overall"].set_index("model")["nmae"]
    assert overall[ln] > 1.0 and abs(overall[free]) < 1e-5
    assert set(table.group) == {"overall", "0", "1"}
    assert cmp.nmae_difference["overall"] == pytest.approx(overall[ln] - overall[free])
    assert len(cmp.plot().data) > 4
    with pytest.raises(ValueError, match="d_vocab"):
        compare_dla(model, make_model(d_vocab=50), tokens % 50)


def test_compare_dla_names_follow_the_models_and_difference_has_a_paired_ci(model, ln_free_model, tokens):
    swapped = compare_dla(ln_free_model, model, tokens, components="heads", n_boot=200)
    assert swapped.names == ("custom (LN-free)", "custom (LN)")  # the bug: position-based names said "LN" here
    assert swapped.a.model_name == "custom (LN-free)" and swapped.b.model_name == "custom (LN)"
    assert swapped.a.model_id != swapped.b.model_id
    named = compare_dla(model, ln_free_model, tokens, names=("mine", "theirs"), n_boot=50)
    assert named.names == ("mine", "theirs") and set(named.to_frame().model) == {"mine", "theirs"}
    diff = swapped.difference()
    assert list(diff.columns) == ["group", "difference", "low", "high", "n"] and list(diff.group) == ["overall", "0", "1"]
    np.testing.assert_allclose(diff.difference.to_numpy(), swapped.nmae_difference.to_numpy(), rtol=1e-9)
    row = diff.iloc[0]
    assert row.low <= row.difference <= row.high < 0  # LN-free minus LN: clearly negative
    est = swapped.overall_difference()
    assert float(est) == pytest.approx(row.difference) and est.n == tokens.shape[0]
    # the difference CI resamples prompts jointly: a hand-written paired bootstrap agrees
    rng = np.random.default_rng(0)
    e_a = (swapped.a.dla - swapped.a.direct_effect).abs().double().sum(0).mean(-1).numpy()
    d_a = swapped.a.direct_effect.abs().double().sum(0).mean(-1).numpy()
    e_b = (swapped.b.dla - swapped.b.direct_effect).abs().double().sum(0).mean(-1).numpy()
    d_b = swapped.b.direct_effect.abs().double().sum(0).mean(-1).numpy()
    idx = rng.integers(0, len(e_a), size=(200, len(e_a)))
    boots = [100 * (e_a[i].sum() / d_a[i].sum() - e_b[i].sum() / d_b[i].sum()) for i in idx]
    assert est.low == pytest.approx(np.quantile(boots, 0.025), rel=1e-6)
    fig = swapped.plot()
    assert fig.layout.yaxis.title.text == "NMAE (%)" and fig.layout.xaxis.title.text == "layer"
    assert "custom (LN-free)" in repr(swapped) and "overall_difference=" in repr(swapped)


def test_result_contract(model, tokens):
    res = direct_logit_attribution(model, tokens, components="heads", n_boot=100, level=0.9, seed=3)
    assert res.model_name == "custom (LN)" and res.model_id
    assert (res.n_boot, res.level, res.seed) == (100, 0.9, 3)
    est = res.nmae()
    assert isinstance(est, Estimate) and est.level == 0.9 and float(est) == est.value
    assert res.nmae(seed=3, n_boot=100, level=0.9).low == est.low  # the stored settings are the defaults
    assert res.nmae(seed=4).low != est.low
    text = repr(res)
    assert text.startswith("DLAResult(model='custom (LN)'") and "nmae=" in text and len(text) <= 240
    assert "tensor" not in text and "<table" in res._repr_html_()
    assert res == res and res != direct_logit_attribution(model, tokens, components="heads") and hash(res)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.components = "layers"
    fig = res.plot()
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and "custom (LN)" in fig.layout.title.text
    with pytest.raises(TypeError, match="positional"):
        direct_logit_attribution(model, tokens, tokens[:, 0])  # targets is keyword-only


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "targets must have shape"),
        (dict(targets=torch.zeros(6, 12, dtype=torch.long)), ValueError, "targets must have shape"),
        (dict(targets=torch.full((6,), 61)), ValueError, r"targets must lie in \[0, 61\)"),
        (dict(targets=torch.full((6,), -1)), ValueError, "targets must lie"),
        (dict(targets=torch.zeros(6)), TypeError, "integer token ids"),
        (dict(targets=(torch.zeros(6, dtype=torch.long),) * 3), ValueError, "target_ids, other_ids"),
        (dict(targets=(torch.zeros(6, dtype=torch.long), torch.full((6,), 99))), ValueError, r"targets\[1\] must lie"),
        (dict(targets="cat"), TypeError, "targets must be a tensor"),
        (dict(targets=torch.zeros(6, dtype=torch.long), pos=12), ValueError, "positions must lie"),
        (dict(targets=torch.zeros(6, dtype=torch.long), pos=-13), ValueError, "positions must lie"),
        (dict(pos=-1), ValueError, "has no label"),
        (dict(pos=torch.tensor([0, 1])), ValueError, "one integer position per prompt"),
        (dict(pos=torch.zeros(6)), ValueError, "one integer position per prompt"),
        (dict(pos="last"), ValueError, "pos must be"),
        (dict(pos=1.5), TypeError, "pos must be"),
        (dict(components="mlps"), ValueError, "components must be one of"),
        (dict(components="neurons"), ValueError, "needs layer="),
        (dict(components="neurons", layer=2), ValueError, "layer must be"),
        (dict(components="heads", layer=0), ValueError, "layer is only used"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_input(model, tokens, kwargs, error, match):
    with pytest.raises(error, match=match):
        direct_logit_attribution(model, tokens, **kwargs)


def test_bad_model_and_tokens(model, tokens):
    with pytest.raises(TypeError, match="model must be"):
        direct_logit_attribution(torch.nn.Linear(2, 2), tokens)
    with pytest.raises(ValueError, match="token ids must lie"):
        direct_logit_attribution(model, tokens + 100)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        direct_logit_attribution(model, tokens[:, :1])
    with pytest.raises(ValueError, match="names"):
        compare_dla(model, model, tokens, names=("a", "a"))


def test_model_id_is_cached_but_follows_weight_edits_and_removal(model, tokens):
    from lnfree import _checks

    first = direct_logit_attribution(model, tokens, components="heads").model_id
    assert _checks.model_id(model) == first  # cached, same answer
    with torch.no_grad():
        model.W_U[0, 0] += 1.0  # in place: the tensor's version changes
    edited = _checks.model_id(model)
    assert edited != first
    model.estimate_ln_scales(tokens)
    assert _checks.model_id(model.remove_ln()) not in (first, edited)
