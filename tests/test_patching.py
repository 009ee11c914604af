"""Activation patching vs TransformerLens; AtP exactness where linear; AtP* QK fix and GradDrop; errors."""

import dataclasses

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from conftest import make_model, pad_rows
from lnfree.stats import bootstrap
from lnfree.analysis.patching import (
    PatchingComparison,
    PatchingError,
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
    # per prompt: the scores are their mean, and one prompt alone gives its own row
    assert res.per_prompt.shape == (3,) + tuple(ref.shape)
    assert torch.allclose(res.per_prompt.mean(0), res.scores, atol=1e-6)


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
    fix = attribution_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos, method="atp+qk")
    flags = attribution_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos, method="atp*",
                                 grad_drop=False)
    atp = attribution_patching(model, clean, corrupt, metric, site=site, by_pos=by_pos)
    assert fix.qk_fix and fix.signed and fix.method == "atp+qk" and flags.method == "atp+qk"
    assert torch.allclose(fix.scores, act.scores, atol=1e-4)
    assert torch.allclose(fix.per_prompt, act.per_prompt, atol=1e-4)  # exact per prompt, not only on average
    assert torch.equal(fix.scores, flags.scores)
    assert (atp.scores - act.scores).abs().max() > 1e-2
    # exact estimates rank perfectly: the true top-5 of every prompt are the first 5 verified
    err = patching_error(fix, act, k=5, n_boot=50)
    assert err.recall.value == 1.0 and err.cost.value == min(5, act.scores.numel())


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
    fix = attribution_patching(model, clean, corrupt, metric, site=site, method="atp+qk")
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
    assert torch.allclose(got.per_prompt, terms / (L - 1), atol=1e-5)
    gd = attribution_patching(model, clean, corrupt, metric, site="z", method="atp+graddrop")
    assert gd.method == "atp+graddrop" and torch.equal(gd.scores, got.scores)
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


# ---- the result contract (issue 12) ----------------------------------------------------------
def test_result_objects(model, pair):
    clean, corrupt = pair
    act = activation_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    atp = attribution_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    assert act.dims == ("layer", "head", "pos") and act.scores.shape == (2, 4, 8)
    assert len(act.labels) == act.scores.numel() and act.labels[0] == "L0H0@0" and act.labels[9] == "L0H1@1"
    df = act.to_frame()
    assert len(df) == 64 and df.loc[9, "score"] == pytest.approx(float(act.scores[0, 1, 1]))
    assert {"layer", "head", "pos", "label", "score", "value", "token"} <= set(df.columns)
    long = act.to_frame(per_prompt=True)
    assert len(long) == 3 * 64 and long.loc[64 + 9, "score"] == pytest.approx(float(act.per_prompt[1, 0, 1, 1]))
    top = act.top(3)
    assert len(top) == 3 and top["score"].abs().iloc[0] == pytest.approx(float(act.scores.abs().max()))
    resid = activation_patching(model, clean, corrupt, metric, site="attn_out", by_pos=False)
    assert resid.dims == ("layer",) and resid.labels == ("0_attn_out", "1_attn_out")
    for r in (act, atp, resid):
        fig = r.plot()
        assert fig.data and fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    # provenance, short repr, HTML repr, identity equality
    from lnfree._checks import model_id, model_label

    assert act.model_name == model_label(model) and act.model_id == model_id(model)
    text = repr(act)
    assert "\n" not in text and len(text) <= 240 and "effect=" in text and "site='z'" in text
    assert "<table" in act._repr_html_() and "effect" in act._repr_html_()
    assert act == act and act != atp and len({act, atp}) == 2
    assert act.effect.n == 3 and float(act.effect) == pytest.approx(act.metric_clean - act.metric_corrupt, abs=1e-6)
    # no tokenizer: positions are labelled by index
    assert act.pos_labels == tuple(str(p) for p in range(8))
    assert act.n_boot == 1000 and act.seed == 0


def test_heatmap_positions_are_labelled_by_tokens():
    from test_tasks import hf_word_level

    from lnfree.tasks import ioi, make_metric

    model = make_model()
    model.tokenizer = hf_word_level()
    batch = ioi(model, 3, seed=0)
    m = make_metric(batch, "logit_diff")
    res = activation_patching(model, batch.clean, batch.corrupt, m, site="resid_pre")
    io, s = batch.io_names[0], batch.s_names[0]
    # BABA: position 3 holds B (S) in the clean prompt and A (IO) in the corrupted one
    assert res.pos_labels[0] == "0: '<s>'" and res.pos_labels[2] == "2: ','"
    assert res.pos_labels[3] == f"3: '{s}'/'{io}'"
    assert list(res.plot().data[0].x) == list(res.pos_labels)
    assert batch.model_name == res.model_name and batch.model_id == res.model_id


def test_patching_error_values_and_ranking(model, pair):
    clean, corrupt = pair
    act = activation_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    atp = attribution_patching(model, clean, corrupt, metric, site="z", by_pos=True)
    err = patching_error(atp, act, n_boot=200, k=4)
    diff = (atp.scores - act.scores).abs()
    per_prompt = (atp.per_prompt - act.per_prompt).abs()  # [prompt, layer, head, pos]
    # the paper's per-layer error: mean over prompts of each prompt's sum; the error of the means apart
    assert torch.allclose(err.per_layer, per_prompt.sum((2, 3)).mean(0))
    assert torch.allclose(err.per_layer_of_means, diff.sum((1, 2)))
    assert err.total == pytest.approx(float(per_prompt.sum() / 3), rel=1e-5)
    r = np.corrcoef(atp.scores.flatten().numpy(), act.scores.flatten().numpy())[0, 1]
    assert err.pearson.value == pytest.approx(r, abs=1e-6)
    assert err.pearson.low <= err.pearson.value <= err.pearson.high
    # every CI resamples prompts and recomputes from the drawn prompts (brute force, same draws)
    draws = np.random.default_rng(0).integers(0, 3, size=(200, 3))
    e_pp, t_pp = (x.per_prompt.reshape(3, -1).double().numpy() for x in (atp, act))
    boots = {"pearson": [], "mean_abs": []}
    for d in draws:
        boots["pearson"].append(np.corrcoef(e_pp[d].mean(0), t_pp[d].mean(0))[0, 1])
        boots["mean_abs"].append(np.abs(e_pp[d] - t_pp[d]).mean())
    for name, b in boots.items():
        est = getattr(err, name)
        assert est.n == 3 and (est.low, est.high) == pytest.approx(tuple(np.quantile(b, [0.025, 0.975])), rel=1e-9)
    assert err.mean_abs.value == pytest.approx(float(per_prompt.mean()), rel=1e-5)
    rho = np.corrcoef(_avg_rank(atp.scores), _avg_rank(act.scores))[0, 1]
    assert err.spearman.value == pytest.approx(rho, abs=1e-6)
    # ranking, brute force per prompt: verify in order of |AtP|, find the true top-4 by |act|
    recalls, costs = [], []
    for b in range(3):
        est, truth = atp.per_prompt[b].abs().flatten().tolist(), act.per_prompt[b].abs().flatten().tolist()
        order = sorted(range(len(est)), key=lambda i: -est[i])
        top = set(sorted(range(len(truth)), key=lambda i: -truth[i])[:4])
        recalls.append(len(top & set(order[:4])) / 4)
        costs.append(max(order.index(i) for i in top) + 1)
    assert err.recall.value == pytest.approx(np.mean(recalls)) and err.cost.value == pytest.approx(np.mean(costs))
    assert float(err.recall_at(10)) >= float(err.recall) and err.cost_curve[-1] == 1.0
    assert err.cost_curve.shape == (64,) and (np.diff(err.cost_curve.numpy()) >= 0).all()
    assert len(err.to_frame()) == 64 and len(err.per_layer_frame()) == 2 and len(err.cost_frame()) == 64
    assert err.top(3)["abs_error"].iloc[0] == pytest.approx(float(per_prompt.mean(0).max()))
    fig = err.plot()
    assert len(fig.data) >= 4 and all(fig.layout[a].title.text for a in ("xaxis", "xaxis2", "xaxis3", "yaxis"))
    assert "\n" not in repr(err) and len(repr(err)) <= 240 and "recall=" in repr(err)
    assert "PatchingError" in err._repr_html_()


def test_atp_star_judged_on_magnitudes(model, pair):
    """GradDrop scores are magnitudes: compared with per-prompt |activation patching|."""
    clean, corrupt = pair
    act = activation_patching(model, clean, corrupt, metric, site="z")
    star = attribution_patching(model, clean, corrupt, metric, site="z", method="atp*")
    err = patching_error(star, act, n_boot=50)
    assert err.vs_magnitude
    assert torch.allclose(err.truth, act.per_prompt.abs().mean(0)) and torch.allclose(err.estimate, star.scores)
    plain = attribution_patching(model, clean, corrupt, metric, site="z")
    mag = patching_error(plain, act, magnitude=True, n_boot=50)
    assert torch.allclose(mag.estimate, plain.per_prompt.abs().mean(0))
    with pytest.raises(ValueError, match="magnitude=True"):
        patching_error(star, act, magnitude=False)


def test_patching_error_refuses_mixed_results(model, pair):
    """Issue 13: an AtP of model A against activation patching of model B is refused, and so are
    different sites, prompts or metrics."""
    clean, corrupt = pair
    other = make_model(seed=3)
    act = activation_patching(model, clean, corrupt, metric, site="z")
    atp = attribution_patching(model, clean, corrupt, metric, site="z")
    with pytest.raises(ValueError, match="different models"):
        patching_error(attribution_patching(other, clean, corrupt, metric, site="z"), act)
    with pytest.raises(ValueError, match="site"):
        patching_error(attribution_patching(model, clean, corrupt, metric, site="v"), act)
    with pytest.raises(ValueError, match="different prompts"):
        patching_error(attribution_patching(model, clean.flip(0), corrupt.flip(0), lambda lg: metric(lg), site="z"),
                       act)
    with pytest.raises(ValueError, match="different metrics"):
        patching_error(attribution_patching(model, clean, corrupt, lambda lg: 2 * metric(lg), site="z"), act)
    with pytest.raises(ValueError, match="activation_patching"):
        patching_error(atp, atp)
    assert isinstance(patching_error(atp, act, n_boot=20), PatchingError)


# ---- padding (issue 13) ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("site,method", [("resid_pre", "atp"), ("z", "atp*"), ("k", "atp+qk"), ("q", "atp+qk")])
def test_padded_batch_equals_each_row_alone(side, site, method):
    from lnfree._checks import TokenBatch
    from lnfree.tasks import logit_diff_metric

    model = make_model(n_layers=3)
    g = torch.Generator().manual_seed(5)
    lengths = [9, 6, 7]
    cl = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lengths]
    co = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lengths]
    ans, wrong = torch.tensor([3, 17, 40]), torch.tensor([9, 2, 55])
    clean, mask = pad_rows(cl, side, width=9)
    corrupt, _ = pad_rows(co, side, width=9)
    m = logit_diff_metric(ans, wrong, attention_mask=mask)
    act = activation_patching(model, TokenBatch(clean, mask), TokenBatch(corrupt, mask), m, site=site, batch_size=7)
    atp = attribution_patching(model, clean, corrupt, m, site=site, method=method, attention_mask=mask)
    assert act.padded and atp.padded
    for b, n in enumerate(lengths):
        pos = torch.arange(n) if side == "right" else torch.arange(9 - n, 9)
        one = logit_diff_metric(ans[b : b + 1], wrong[b : b + 1])
        a1 = activation_patching(model, torch.tensor([cl[b]]), torch.tensor([co[b]]), one, site=site)
        t1 = attribution_patching(model, torch.tensor([cl[b]]), torch.tensor([co[b]]), one, site=site, method=method)
        assert torch.allclose(act.per_prompt[b][..., pos], a1.per_prompt[0], atol=1e-5)
        assert torch.allclose(atp.per_prompt[b][..., pos], t1.per_prompt[0], atol=1e-5)
        pad = torch.ones(9, dtype=torch.bool)
        pad[pos] = False
        assert torch.isnan(act.per_prompt[b][..., pad]).all() and torch.isnan(atp.per_prompt[b][..., pad]).all()
        assert act.clean_metric[b] == pytest.approx(float(a1.clean_metric[0]), abs=1e-5)
    # means over prompts skip padded entries; every position is real in the longest row
    assert not torch.isnan(act.scores).any()
    assert torch.allclose(act.scores, torch.nanmean(act.per_prompt, 0), atol=1e-6)
    err = patching_error(atp, act, magnitude=True, n_boot=20)  # NaNs are left out of every statistic
    assert np.isfinite(err.total) and np.isfinite(err.pearson.value) and np.isfinite(err.recall.value)


def test_padding_all_positions_and_refusals(model):
    from lnfree.tasks import logit_diff_metric

    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    clean, mask = pad_rows(rows, "right", width=5)
    corrupt, _ = pad_rows([[1, 2, 3, 4, 9], [13, 14, 15]], "right", width=5)
    m = logit_diff_metric(torch.tensor([3, 4]), torch.tensor([9, 2]), attention_mask=mask)
    act = activation_patching(model, clean, corrupt, m, site="resid_pre", by_pos=False, attention_mask=mask)
    one = activation_patching(model, torch.tensor([rows[1]]), torch.tensor([[13, 14, 15]]),
                              logit_diff_metric(torch.tensor([4]), torch.tensor([2])), site="resid_pre", by_pos=False)
    assert torch.allclose(act.per_prompt[1], one.per_prompt[0], atol=1e-5)
    # clean and corrupt padded differently: no position-to-position patch exists
    other = mask.clone()
    other[1, 3] = 1
    for fn in (activation_patching, attribution_patching):
        with pytest.raises(ValueError, match="padded differently"):
            fn(model, clean, corrupt, m, attention_mask=(mask, other))
    with pytest.raises(ValueError, match="contiguous"):
        activation_patching(model, clean, corrupt, m, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))


# ---- comparison --------------------------------------------------------------------------------
def _four_prompts(model, site="z"):
    clean, corrupt = torch.arange(32).reshape(4, 8) % 61, (torch.arange(32).reshape(4, 8) * 7 + 3) % 61
    four = lambda lg: lg[:, -1, 3] - lg[:, -1, 9]  # noqa: E731
    return activation_patching(model, clean, corrupt, four, site=site, by_pos=False)


def _estimate(act, per_prompt):
    """An attribution result of `act`'s sweep with the given per-prompt estimates."""
    from lnfree.analysis.patching_core import masked_mean

    return dataclasses.replace(act, method="atp", per_prompt=per_prompt, scores=masked_mean(per_prompt), values=None)


def _shifted(act, d):
    """Estimate = truth + (-1)^prompt * d per prompt: the mean over prompts is exact."""
    sign = torch.tensor([(-1.0) ** b for b in range(act.per_prompt.shape[0])]).reshape(-1, 1, 1)
    return _estimate(act, act.per_prompt + sign * d)


def test_per_layer_error_is_the_mean_of_per_prompt_errors(model):
    """Errors of opposite sign on different prompts cancel in the error of the means, not in the paper's."""
    act = _four_prompts(model)
    err = patching_error(_shifted(act, 0.25), act, n_boot=50)
    n_heads = act.scores.shape[1]
    assert torch.allclose(err.per_layer, torch.full((2,), 0.25 * n_heads), atol=1e-6)  # d per component
    assert torch.allclose(err.per_layer_of_means, torch.zeros(2), atol=1e-6)  # what per_layer used to be
    assert err.mean_abs.value == pytest.approx(0.25, abs=1e-6) and err.total == pytest.approx(0.5 * n_heads, abs=1e-5)


def test_improvement_ci_resamples_prompts_not_layers(model):
    """Duplicating every layer adds no information: the CI must not narrow (it did by ~sqrt 2 over layers)."""
    from lnfree.analysis.patching_metrics import improvement_over_prompts

    act = _four_prompts(model)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(act.per_prompt.shape, generator=g) * s for s in (0.3, 0.1)]
    errs = [patching_error(_estimate(act, act.per_prompt + n), act, n_boot=20) for n in noise]
    act2 = _stack_layers(act)
    doubled = [patching_error(_estimate(act2, _stack_layers(act, act.per_prompt + n).per_prompt), act2, n_boot=20)
               for n in noise]
    assert doubled[0].per_layer.shape == (4,)
    one = improvement_over_prompts(*errs, n_boot=300)
    two = improvement_over_prompts(*doubled, n_boot=300)
    assert (two.value, two.low, two.high, two.n) == pytest.approx((one.value, one.low, one.high, one.n), rel=1e-6)
    assert one.n == 4 and one.high > one.low


def _stack_layers(res, per_prompt=None):
    """`res` with every layer repeated once more (per_prompt [prompt, layer, head] -> [prompt, 2 layer, head])."""
    from lnfree.analysis.patching_core import masked_mean

    per_prompt = res.per_prompt if per_prompt is None else per_prompt
    pp = torch.cat([per_prompt, per_prompt], 1)
    return dataclasses.replace(res, per_prompt=pp, scores=masked_mean(pp), values=None, labels=res.labels * 2)


def test_compare_patching(model, ln_free_model, pair):
    clean, corrupt = pair
    cmp = compare_patching(model, ln_free_model, clean, corrupt, metric, site="z", by_pos=False, n_boot=100)
    assert isinstance(cmp, PatchingComparison)
    a, b = cmp.a, cmp.b
    assert cmp.errors == (a, b)
    assert torch.allclose(cmp.improvement, a.per_layer - b.per_layer)
    imp = (a.per_layer - b.per_layer).double().numpy()
    assert cmp.improvement_mean == pytest.approx(imp.mean()) and cmp.improvement_sd == pytest.approx(imp.std(ddof=1))
    assert float(cmp.improvement_ci) == pytest.approx(imp.mean(), rel=1e-5)
    # its CI resamples the 3 prompts: each prompt's mean over layers of its own error difference
    per_prompt = [(e.atp.per_prompt - e.act.per_prompt).abs().sum(2).double() for e in (a, b)]  # [prompt, layer]
    ref = bootstrap((per_prompt[0] - per_prompt[1]).mean(1).numpy(), n_boot=100)
    assert cmp.improvement_ci.n == 3 and (cmp.improvement_ci.low, cmp.improvement_ci.high) == pytest.approx(
        (ref.low, ref.high), rel=1e-5)
    # names come from the models' norm state, not the argument order
    assert cmp.names == ("custom (LN)", "custom (LN-free)")
    flipped = compare_patching(ln_free_model, model, clean, corrupt, metric, site="z", by_pos=False, n_boot=20)
    assert flipped.names == ("custom (LN-free)", "custom (LN)")
    named = compare_patching(model, ln_free_model, clean, corrupt, metric, names=("x", "y"), by_pos=False, n_boot=20)
    assert named.names == ("x", "y")
    # each side is the same as calling the functions directly
    act_b = activation_patching(ln_free_model, clean, corrupt, metric, site="z", by_pos=False)
    assert torch.allclose(cmp.act[1].scores, act_b.scores) and cmp.b.model_id == act_b.model_id
    assert cmp.difference().shape == (2, 4) and len(cmp.to_frame()) == 4
    fig = cmp.plot()
    assert fig.data and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert set(cmp.summary()) >= {"improvement_mean", "improvement_sd", "pearson custom (LN)"}
    assert "models=" in repr(cmp) and len(repr(cmp)) <= 240
    with pytest.raises(ValueError, match="d_vocab"):
        compare_patching(model, make_model(d_vocab=70), clean, corrupt, metric)
    with pytest.raises(ValueError, match="layers"):
        compare_patching(model, make_model(n_layers=3), clean, corrupt, metric)
    with pytest.raises(ValueError, match="names"):
        compare_patching(model, ln_free_model, clean, corrupt, metric, names=("x", "x"))


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
        with pytest.raises(ValueError, match="clean: token ids"):
            fn(model, clean + 100, corrupt, metric)
        with pytest.raises(TypeError, match="corrupt must be"):
            fn(model, clean, "corrupt", metric)
        with pytest.raises(TypeError, match="by_pos"):
            fn(model, clean, corrupt, metric, by_pos="yes")
        with pytest.raises(ValueError, match="n_boot"):
            fn(model, clean, corrupt, metric, n_boot=0)
        with pytest.raises(TypeError, match="model must be"):
            fn("gpt2", clean, corrupt, metric)
    with pytest.raises(ValueError, match="batch_size"):
        activation_patching(model, clean, corrupt, metric, batch_size=0)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(model, clean, corrupt, metric, method="eap")
    with pytest.raises(TypeError, match="qk_fix"):
        attribution_patching(model, clean, corrupt, metric, qk_fix="yes")
    with pytest.raises(ValueError, match="ln"):
        attribution_patching(model, clean, corrupt, metric, ln="removed")
    with pytest.raises(ValueError, match="differentiabl"):
        attribution_patching(model, clean, corrupt, lambda lg: metric(lg).detach())
    with pytest.raises(ValueError, match="2 layers"):
        attribution_patching(make_model(n_layers=1), clean, corrupt, metric, method="atp*")
    with pytest.raises(ValueError, match="attention-only"):
        activation_patching(make_model(attn_only=True), clean, corrupt, metric, site="mlp_out")
    # a single prompt as 1-D tokens, and token lists
    assert isinstance(activation_patching(model, clean[0], corrupt[0], lambda lg: metric(lg)[:1], site="attn_out"),
                      PatchingResult)
    lists = activation_patching(model, clean.tolist(), corrupt.tolist(), metric, site="attn_out")
    assert torch.allclose(lists.scores, activation_patching(model, clean, corrupt, metric, site="attn_out").scores)
    act = activation_patching(model, clean, corrupt, metric, site="z")
    atp = attribution_patching(model, clean, corrupt, metric, site="z")
    with pytest.raises(ValueError, match="k must be"):
        patching_error(atp, act, k=0)
    with pytest.raises(ValueError, match="k must be"):
        act.top(0)


def test_ioi_end_to_end(model):
    """IOI prompts + normalised logit difference: patching the whole clean residual stream in gives 1."""
    from test_tasks import word_level

    from lnfree.tasks import ioi, make_metric

    batch = ioi(word_level(), 4, seed=0)
    m = make_metric(batch, "normalized_logit_diff", model)
    act = activation_patching(model, batch.clean, batch.corrupt, m, site="resid_pre", by_pos=False)
    assert act.metric_clean == pytest.approx(1.0, abs=1e-5) and act.metric_corrupt == pytest.approx(0.0, abs=1e-5)
    assert act.values[0] == pytest.approx(1.0, abs=1e-5) and act.metric == "normalized_logit_diff"
    atp = attribution_patching(model, batch.clean, batch.corrupt, m, site="z", by_pos=True, method="atp*")
    assert atp.scores.shape == (2, 4, batch.n_pos) and (atp.scores >= 0).all()


def test_layers_subset_and_model_id_cache(model, pair):
    clean, corrupt = pair
    full = activation_patching(model, clean, corrupt, metric, site="z")
    part = activation_patching(model, clean, corrupt, metric, site="z", layers=[1])
    assert part.layers == (1,) and torch.isnan(part.scores[0]).all()
    assert torch.allclose(part.scores[1], full.scores[1], atol=1e-6)
    err = patching_error(attribution_patching(model, clean, corrupt, metric, site="z"), part, n_boot=20)
    assert torch.isnan(err.per_layer[0]) and not torch.isnan(err.per_layer[1])
    with pytest.raises(ValueError, match="layers"):
        activation_patching(model, clean, corrupt, metric, layers=[2])
    # the fingerprint follows in-place edits of the weights it reads
    from lnfree._checks import model_id

    before = full.model_id
    with torch.no_grad():
        model.W_E[0, 0] += 1.0
    after = activation_patching(model, clean, corrupt, metric, site="attn_out").model_id
    assert after != before and after == model_id(model)
