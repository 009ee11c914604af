"""Activation patching vs TransformerLens; AtP exactness where linear; AtP* QK fix and GradDrop; errors."""

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from conftest import make_model
from lnfree.analysis.patching import (
    PatchingResult,
    activation_patching,
    attribution_patching,
    compare_patching,
    patching_error,
)

ANS, WRONG = torch.tensor([3, 17, 40]), torch.tensor([9, 2, 55])


def metric(logits):
    """Per-prompt logit difference at the last position (linear in the logits)."""
    i = torch.arange(logits.shape[0])
    return logits[i, -1, ANS] - logits[i, -1, WRONG]


@pytest.fixture
def pair(tokens):
    return tokens[:3, :8], tokens[3:, :8]


def tl_mean(logits):
    return metric(logits).mean()


# (our site, by_pos, TransformerLens function, permutation of TL's dims into ours)
TL_CASES = [
    ("z", True, tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("k", True, tlp.get_act_patch_attn_head_k_by_pos, (0, 2, 1)),
    ("pattern", True, tlp.get_act_patch_attn_head_pattern_by_pos, None),
    ("resid_pre", True, tlp.get_act_patch_resid_pre, None),
    ("attn_out", True, tlp.get_act_patch_attn_out, None),
    ("mlp_out", True, tlp.get_act_patch_mlp_out, None),
    ("z", False, tlp.get_act_patch_attn_head_out_all_pos, None),
    ("v", False, tlp.get_act_patch_attn_head_v_all_pos, None),
    ("pattern", False, tlp.get_act_patch_attn_head_pattern_all_pos, None),
]


@pytest.mark.parametrize("site,by_pos,tl_fn,perm", TL_CASES, ids=[f"{c[0]}-{c[1]}" for c in TL_CASES])
def test_activation_patching_matches_transformer_lens(model, pair, site, by_pos, tl_fn, perm):
    clean, corrupt = pair[0][:, :6], pair[1][:, :6]
    _, clean_cache = model.run_with_cache(clean)
    ref = tl_fn(model, corrupt, clean_cache, tl_mean)
    ref = ref.permute(*perm) if perm else ref
    # batch_size=5 makes chunks that straddle layers and split them
    res = activation_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos, batch_size=5)
    assert res.values.shape == ref.shape
    assert torch.allclose(res.values, ref.cpu(), atol=1e-5, rtol=0)
    assert torch.allclose(res.scores, ref.cpu() - res.metric_corrupt, atol=1e-5, rtol=0)


def test_noise_direction_and_resid_post_match_transformer_lens(model, pair):
    clean, corrupt = pair
    _, corrupt_cache = model.run_with_cache(corrupt)
    ref = tlp.generic_activation_patch(model, clean, corrupt_cache, tl_mean, tlp.layer_pos_patch_setter,
                                       "resid_post", index_axis_names=("layer", "pos"))
    res = activation_patching(model, clean, corrupt, metric, site="resid_post", direction="noise")
    assert torch.allclose(res.values, ref.cpu(), atol=1e-5, rtol=0)
    assert res.baseline == res.metric_clean


def test_patching_everything_restores_the_source_metric(model, pair):
    clean, corrupt = pair
    with torch.no_grad():
        m_clean, m_corrupt = metric(model(clean)).mean(), metric(model(corrupt)).mean()
    den = activation_patching(model, clean, corrupt, metric, site="resid_pre", by_pos=False)
    noi = activation_patching(model, clean, corrupt, metric, site="resid_pre", by_pos=False, direction="noise")
    assert abs(den.values[0] - m_clean) < 1e-5 and abs(noi.values[0] - m_corrupt) < 1e-5
    assert abs(den.metric_clean - m_clean) < 1e-5 and abs(den.metric_corrupt - m_corrupt) < 1e-5
    # patching the result of a head at all positions == patching its z (result = z @ W_O)
    z = activation_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    result = activation_patching(model, clean, corrupt, metric, site="result", by_pos=True)
    assert torch.allclose(z.values, result.values, atol=1e-5)
    assert not model.cfg.use_attn_result  # switched back off


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", ["mlp_out", "resid_post"])
def test_atp_exact_where_metric_is_linear_in_site(ln_free_model, model, pair, site, direction):
    """LN-free model, last layer: logits are affine in these sites, so AtP == activation patching."""
    clean, corrupt = pair
    act = activation_patching(ln_free_model, clean, corrupt, metric, site=site, direction=direction)
    atp = attribution_patching(ln_free_model, clean, corrupt, metric, site=site, direction=direction)
    assert torch.allclose(atp.scores[-1], act.scores[-1], atol=2e-5, rtol=0)
    scale = act.scores[-1].abs().max()
    assert scale > 1e-2  # the comparison is not vacuous
    # nonlinearity enters: earlier layers of the LN-free model, and the LN model's last layer (ln_final)
    gap_early = (atp.scores[0] - act.scores[0]).abs().max()
    act_ln = activation_patching(model, clean, corrupt, metric, site=site, direction=direction)
    atp_ln = attribution_patching(model, clean, corrupt, metric, site=site, direction=direction)
    gap_ln = (atp_ln.scores[-1] - act_ln.scores[-1]).abs().max()
    assert gap_early > 1e-3 and gap_ln > 1e-3


def test_ln_frozen_equals_patching_with_fixed_final_scale(model, pair):
    """ln='frozen' linearises with the corrupted run's LN scales held fixed: on the last layer's
    resid_post that is exactly activation patching with ln_final's per-token scale pinned."""
    clean, corrupt = pair
    _, cache = model.run_with_cache(corrupt, names_filter="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"]
    hook = lambda x, hook: scale.repeat(x.shape[0] // scale.shape[0], 1, 1)  # noqa: E731
    model.add_hook("ln_final.hook_scale", hook)
    try:
        pinned = activation_patching(model, clean, corrupt, metric, site="resid_post")
    finally:
        model.reset_hooks()
    frozen = attribution_patching(model, clean, corrupt, metric, site="resid_post", ln="frozen")
    live = attribution_patching(model, clean, corrupt, metric, site="resid_post", ln="live")
    assert torch.allclose(frozen.scores[-1], pinned.scores[-1], atol=2e-5)
    assert (live.scores[-1] - pinned.scores[-1]).abs().max() > 1e-3
    assert frozen.ln == "frozen"


def test_ln_option_has_no_effect_on_ln_free_model(ln_free_model, pair):
    clean, corrupt = pair
    a = attribution_patching(ln_free_model, clean, corrupt, metric, site="z", ln="live")
    b = attribution_patching(ln_free_model, clean, corrupt, metric, site="z", ln="frozen")
    assert torch.equal(a.scores, b.scores)


def _one_layer_attn_only(tokens):
    m = make_model(n_layers=1, attn_only=True)
    m.estimate_ln_scales(tokens)
    return m.remove_ln()


@pytest.mark.parametrize("by_pos", [True, False])
@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_exact_when_only_the_softmax_is_nonlinear(tokens, site, by_pos):
    """1-layer attention-only LN-free model: logits are linear in the pattern, so the QK fix is exact."""
    model = _one_layer_attn_only(tokens)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(3.0)  # make the softmax matter
    clean, corrupt = tokens[:3, :8], tokens[3:, :8]
    act = activation_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos)
    fix = attribution_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos, method="atp*",
                               grad_drop=False)
    atp = attribution_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos)
    assert fix.qk_fix and fix.signed
    assert torch.allclose(fix.scores, act.scores, atol=1e-4)
    assert (atp.scores - act.scores).abs().max() > 1e-2


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_beats_atp_under_saturated_attention(pair, site):
    model = make_model()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.W_Q.mul_(6.0)  # saturate the softmax
    clean, corrupt = pair
    _, cache = model.run_with_cache(corrupt, names_filter=lambda n: n.endswith("hook_pattern"))
    assert cache["blocks.1.attn.hook_pattern"][:, :, 2:].max(-1).values.mean() > 0.7  # saturated (0.36 unscaled)
    act = activation_patching(model, clean, corrupt, metric, site=site)
    atp = attribution_patching(model, clean, corrupt, metric, site=site)
    fix = attribution_patching(model, clean, corrupt, metric, site=site, method="atp*", grad_drop=False)
    e_atp, e_fix = patching_error(atp, act, n_boot=50), patching_error(fix, act, n_boot=50)
    assert e_fix.total < 0.5 * e_atp.total
    assert e_fix.pearson.value > e_atp.pearson.value


def _per_prompt_atp_z(model, clean, corrupt, drop_layer=None):
    """Independent AtP on z per prompt: [batch, layer, head, pos], optionally with layer
    `drop_layer`'s attn_out/mlp_out gradient cut (a detach hook)."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x
        return x

    hooks = [(n, keep) for n in names]
    if drop_layer is not None:
        hooks += [(f"blocks.{drop_layer}.hook_attn_out", lambda x, hook: x.detach()),
                  (f"blocks.{drop_layer}.hook_mlp_out", lambda x, hook: x.detach())]
    logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
    grads = torch.autograd.grad(metric(logits).sum(), [acts[n] for n in names], allow_unused=True)
    out = []
    for n, g in zip(names, grads):
        g = torch.zeros_like(acts[n]) if g is None else g
        out.append(((clean_cache[n] - acts[n].detach()) * g).sum(-1).transpose(1, 2))  # [batch, head, pos]
    return torch.stack(out, 1).detach()


def test_grad_drop_matches_independent_computation(pair):
    model = make_model(n_layers=3)
    clean, corrupt = pair
    L = 3
    terms = sum(_per_prompt_atp_z(model, clean, corrupt, drop_layer=l).abs() for l in range(L))
    expected = (terms / (L - 1)).mean(0)  # Kramar et al. 2024: E_x[1/(L-1) sum_l |I_l|]
    got = attribution_patching(model, clean, corrupt, metric, site="z", method="atp*")
    assert got.grad_drop and not got.signed and not got.qk_fix  # no QK fix on z
    assert torch.allclose(got.scores, expected, atol=1e-5)
    # the plain AtP baseline agrees with the same independent gradient
    plain = attribution_patching(model, clean, corrupt, metric, site="z")
    assert torch.allclose(plain.scores, _per_prompt_atp_z(model, clean, corrupt).mean(0), atol=1e-5)
    # last-layer nodes: only their own layer's pass is zero, the others are plain |AtP|
    assert torch.allclose(got.scores[-1], _per_prompt_atp_z(model, clean, corrupt)[:, -1].abs().mean(0), atol=1e-5)


def _avg_rank(x):
    """Ranks with ties (e.g. exact zeros) sharing their average rank, as Spearman's rho needs."""
    _, inv, counts = np.unique(x.flatten().numpy(), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inv]


def test_result_objects(model, pair):
    clean, corrupt = pair
    act = activation_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    atp = attribution_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    assert act.dims == ("layer", "head", "pos") and act.scores.shape == (2, 4, 8)
    assert len(act.labels) == act.scores.numel() and act.labels[0] == "L0H0@0" and act.labels[9] == "L0H1@1"
    df = act.to_frame()
    assert len(df) == 64 and df.loc[9, "score"] == pytest.approx(float(act.scores[0, 1, 1]))
    assert {"layer", "head", "pos", "label", "score", "value"} <= set(df.columns)
    top = act.top(3)
    assert top["score"].abs().iloc[0] == pytest.approx(float(act.scores.abs().max()))
    resid = activation_patching(model, clean, corrupt, metric, site="attn_out", by_pos=False)
    assert resid.dims == ("layer",) and resid.labels == ("0_attn_out", "1_attn_out")
    for r in (act, atp, resid):
        assert r.plot().data  # a plotly figure with a trace

    err = patching_error(atp, act, n_boot=200)
    diff = (atp.scores - act.scores).abs()
    assert torch.allclose(err.per_layer, diff.sum((1, 2)))
    assert err.total == pytest.approx(float(diff.sum()), rel=1e-5)
    r = np.corrcoef(atp.scores.flatten().numpy(), act.scores.flatten().numpy())[0, 1]
    assert err.pearson.value == pytest.approx(r, abs=1e-6)
    assert err.pearson.low <= err.pearson.value <= err.pearson.high
    rho = np.corrcoef(_avg_rank(atp.scores), _avg_rank(act.scores))[0, 1]
    assert err.spearman.value == pytest.approx(rho, abs=1e-6)
    assert len(err.to_frame()) == 2 and err.plot().data
    with pytest.raises(ValueError, match="site"):
        patching_error(attribution_patching(model, clean, corrupt, metric, site="v"), act)
    with pytest.raises(ValueError, match="activation_patching"):
        patching_error(atp, atp)


def test_compare_patching(model, ln_free_model, pair):
    clean, corrupt = pair
    cmp = compare_patching(model, ln_free_model, clean, corrupt, metric, site="z", by_pos=False, n_boot=100)
    a, b = cmp.errors
    assert torch.allclose(cmp.improvement, a.per_layer - b.per_layer)
    imp = (a.per_layer - b.per_layer).double().numpy()
    assert cmp.improvement_mean == pytest.approx(imp.mean()) and cmp.improvement_sd == pytest.approx(imp.std(ddof=1))
    # each side is the same as calling the functions directly
    act_b = activation_patching(ln_free_model, clean, corrupt, metric, site="z", by_pos=False)
    assert torch.allclose(cmp.act[1].scores, act_b.scores)
    assert cmp.table().shape == (2, 4) and len(cmp.to_frame()) == 4 and cmp.plot().data
    assert set(cmp.summary()) >= {"improvement_mean", "improvement_sd", "pearson LN", "pearson LN-free"}
    with pytest.raises(ValueError, match="d_vocab"):
        compare_patching(model, make_model(d_vocab=70), clean, corrupt, metric)
    with pytest.raises(ValueError, match="layers"):
        compare_patching(model, make_model(n_layers=3), clean, corrupt, metric)


def test_bad_input(model, pair):
    clean, corrupt = pair
    for fn in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match="same shape"):
            fn(model, clean, corrupt[:, :6], metric)
        with pytest.raises(ValueError, match="one scalar per prompt"):
            fn(model, clean, corrupt, lambda lg: metric(lg).mean())
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(model, clean, corrupt, lambda lg: 1.0)
        with pytest.raises(ValueError, match="unknown site"):
            fn(model, clean, corrupt, metric, site="mlp_post")
        with pytest.raises(ValueError, match="direction"):
            fn(model, clean, corrupt, metric, direction="sideways")
        with pytest.raises(ValueError, match="clean token ids"):
            fn(model, clean + 100, corrupt, metric)
        with pytest.raises(TypeError, match="corrupt must be a torch.Tensor"):
            fn(model, clean, corrupt.tolist(), metric)
        with pytest.raises(TypeError, match="by_pos"):
            fn(model, clean, corrupt, metric, by_pos="yes")
    with pytest.raises(ValueError, match="batch_size"):
        activation_patching(model, clean, corrupt, metric, batch_size=0)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(model, clean, corrupt, metric, method="eap")
    with pytest.raises(ValueError, match="method='atp\\*'"):
        attribution_patching(model, clean, corrupt, metric, qk_fix=True)
    with pytest.raises(ValueError, match="ln"):
        attribution_patching(model, clean, corrupt, metric, ln="removed")
    with pytest.raises(ValueError, match="differentiabl"):
        attribution_patching(model, clean, corrupt, lambda lg: metric(lg).detach())
    with pytest.raises(ValueError, match="2 layers"):
        attribution_patching(make_model(n_layers=1), clean, corrupt, metric, method="atp*")
    with pytest.raises(ValueError, match="attention-only"):
        activation_patching(make_model(attn_only=True), clean, corrupt, metric, site="mlp_out")
    assert isinstance(activation_patching(model, clean[0], corrupt[0], lambda lg: metric(lg)[:1], site="attn_out"),
                      PatchingResult)  # a single prompt as 1-D tokens


def test_ioi_end_to_end(model):
    """IOI prompts + normalised logit difference: patching the whole clean residual stream in gives 1."""
    from test_tasks import word_level

    from lnfree.tasks import ioi, make_metric

    batch = ioi(word_level(), 4, seed=0)
    m = make_metric(batch, "normalized_logit_diff", model)
    act = activation_patching(model, batch.clean, batch.corrupt, m, site="resid_pre", by_pos=False)
    assert act.metric_clean == pytest.approx(1.0, abs=1e-5) and act.metric_corrupt == pytest.approx(0.0, abs=1e-5)
    assert act.values[0] == pytest.approx(1.0, abs=1e-5)
    atp = attribution_patching(model, batch.clean, batch.corrupt, m, site="z", by_pos=True, method="atp*")
    assert atp.scores.shape == (2, 4, batch.n_pos) and (atp.scores >= 0).all()
