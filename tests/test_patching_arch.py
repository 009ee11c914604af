"""Patching on modern architectures (RMSNorm, grouped-query attention, rotary, split qkv), each
checked against an independent computation:

- activation patching vs TransformerLens's own `patching.generic_activation_patch`;
- AtP vs a central finite difference of the metric along the patch direction (AtP is the
  derivative at alpha = 0 of M(a_base + alpha (a_source - a_base)));
- the QK fix vs the pattern the model itself computes with the source q (or k) patched in, times
  the gradient of the metric with respect to the pattern from a separate backward pass.

The helpers take any model and prompt pair; tests/test_patching_smollm2.py runs them on SmolLM2.
"""

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens import patching as tlp

from conftest import pad_rows, spread_norms
from lnfree.analysis.patching import activation_patching, attribution_patching
from lnfree.analysis.patching_core import hook_name, n_heads_at
from lnfree.model import LNFreeTransformer

ARCHS = {
    "llama": dict(normalization_type="RMS", n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8,
                  gated_mlp=True, act_fn="silu", final_rms=True),
    "neox-split": dict(normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4,
                       parallel_attn_mlp=True, use_split_qkv_input=True, act_fn="gelu"),
}


def arch_model(arch: str) -> LNFreeTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, d_vocab=61, n_ctx=16,
                                  seed=0, **ARCHS[arch])
    model = spread_norms(LNFreeTransformer(cfg), ln_bias=False, bias=None)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(3.0)  # a peaked softmax: the QK fix has something to fix
    return model.eval()


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return arch_model(request.param)


def _pair(d_vocab, n=2, pos=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_vocab, (n, pos), generator=g), torch.randint(0, d_vocab, (n, pos), generator=g)


def make_metric(d_vocab):
    ans, wrong = torch.tensor([3, 17, 40, 8]), torch.tensor([9, 2, 55, 11])

    def metric(logits):
        i = torch.arange(logits.shape[0])
        return logits[i, -1, ans[i] % d_vocab] - logits[i, -1, wrong[i] % d_vocab]

    return metric


# ---- independent computations --------------------------------------------------------------
def check_against_transformer_lens(model, clean, corrupt, metric, site, n_check=12, layers=None):
    """Our batched activation patching == TransformerLens's generic_activation_patch on a spread subset."""
    res = activation_patching(model, clean, corrupt, metric, site=site, layers=layers)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(f"hook_{site}"))
    L, P = model.cfg.n_layers, clean.shape[1]
    L = range(L) if layers is None else layers
    if res.dims == ("layer", "pos"):
        rows = [(l, p) for l in L for p in range(P)]
        cols, setter, get = ["layer", "pos"], tlp.layer_pos_patch_setter, lambda l, p: res.values[l, p]
    else:
        H = n_heads_at(model, site)
        rows = [(l, p, h) for l in L for p in range(P) for h in range(H)]
        cols, setter, get = ["layer", "pos", "head"], tlp.layer_pos_head_vector_patch_setter, \
            lambda l, p, h: res.values[l, h, p]
    pick = torch.linspace(0, len(rows) - 1, min(n_check, len(rows))).round().long().tolist()
    df = pd.DataFrame([rows[i] for i in pick], columns=cols)
    ref = tlp.generic_activation_patch(model, corrupt, clean_cache, lambda lg: metric(lg).mean(), setter, site,
                                       index_df=df)
    ours = torch.stack([get(*r) for r in df.itertuples(index=False)])
    return float((ours - ref.cpu()).abs().max()), res


def finite_difference(model, clean, corrupt, metric, site, component, eps=1e-3):
    """Per-prompt d/dalpha M(a_base + alpha (a_src - a_base)) at 0 for one (layer, [head,] pos) component."""
    layer, rest = component[0], component[1:]
    name = hook_name(site, layer)
    _, cache = model.run_with_cache(clean, names_filter=name)
    src = cache[name]

    def run(alpha):
        def hook(act, hook):
            act = act.clone()
            if len(rest) == 1:  # resid site: [batch, pos, d]
                p = rest[0]
                act[:, p] = act[:, p] + alpha * (src[:, p] - act[:, p])
            else:  # head site: [batch, pos, head, d]
                h, p = rest
                act[:, p, h] = act[:, p, h] + alpha * (src[:, p, h] - act[:, p, h])
            return act

        with torch.no_grad():
            return metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])).double()

    return (run(eps) - run(-eps)) / (2 * eps)


def qk_fix_reference(model, clean, corrupt, metric, site, layer, head, pos):
    """Per-prompt QK-fix estimate for one (layer, head, pos) q or k component, independently:
    the model's own pattern with the source q/k patched in, against the gradient dM/dpattern."""
    name = hook_name(site, layer)
    pat = hook_name("pattern", layer)
    _, cache = model.run_with_cache(clean, names_filter=name)
    src = cache[name]

    def patch(act, hook):
        act = act.clone()
        act[:, pos, head] = src[:, pos, head]
        return act

    store = {}

    def keep(act, hook):
        store["p"] = act
        return act

    logits = model.run_with_hooks(corrupt, fwd_hooks=[(pat, keep)])
    g = torch.autograd.grad(metric(logits).sum(), store["p"])[0]
    p_new = _patched_pattern(model, corrupt, name, patch, pat)
    delta = (p_new - store["p"].detach()) * g  # [batch, head, q, k]
    return delta.sum((1, 2, 3)).double()


def _patched_pattern(model, tokens, name, patch, pat):
    out = {}

    def keep(act, hook):
        out["p"] = act.detach()
        return act

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, patch), (pat, keep)])
    return out["p"]


# ---- tests on tiny modern architectures --------------------------------------------------------
@pytest.mark.parametrize("site", ["resid_pre", "z", "k", "q", "v"])
def test_activation_patching_matches_transformer_lens(arch, site):
    clean, corrupt = _pair(arch.cfg.d_vocab)
    diff, res = check_against_transformer_lens(arch, clean, corrupt, make_metric(arch.cfg.d_vocab), site)
    assert diff < 1e-5
    if site in ("k", "v"):  # grouped-query attention: one component per key/value head
        assert res.scores.shape[1] == n_heads_at(arch, site)


@pytest.mark.parametrize("site,component", [("resid_pre", (1, 4)), ("z", (0, 1, 5)), ("k", (1, 1, 2))])
def test_atp_is_the_derivative_along_the_patch(arch, site, component):
    clean, corrupt = _pair(arch.cfg.d_vocab)
    metric = make_metric(arch.cfg.d_vocab)
    atp = attribution_patching(arch, clean, corrupt, metric, site=site)
    layer, rest = component[0], component[1:]
    idx = (slice(None), layer) + tuple(rest)
    fd = finite_difference(arch, clean, corrupt, metric, site, component)
    assert torch.allclose(atp.per_prompt[idx].double(), fd, atol=2e-3, rtol=2e-3)
    assert fd.abs().max() > 1e-3  # not vacuous


@pytest.mark.parametrize("site", ["q", "k"])
def test_qk_fix_matches_the_recomputed_pattern(arch, site):
    clean, corrupt = _pair(arch.cfg.d_vocab)
    metric = make_metric(arch.cfg.d_vocab)
    fix = attribution_patching(arch, clean, corrupt, metric, site=site, method="atp+qk")
    assert fix.qk_fix
    n = n_heads_at(arch, site)
    for layer, head, pos in [(0, 0, 3), (1, n - 1, 5), (1, 1 % n, 6)]:
        ref = qk_fix_reference(arch, clean, corrupt, metric, site, layer, head, pos)
        assert torch.allclose(fix.per_prompt[:, layer, head, pos].double(), ref, atol=1e-5, rtol=1e-4)
    # the fix is not a no-op: plain AtP differs
    atp = attribution_patching(arch, clean, corrupt, metric, site=site)
    assert (atp.per_prompt - fix.per_prompt).abs().max() > 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rotary_gqa_batch_equals_each_row_alone(side):
    """Rotary positions under left padding come from the mask: a padded row equals the row alone."""

    from lnfree.tasks import logit_diff_metric

    model = arch_model("llama")
    g = torch.Generator().manual_seed(2)
    lengths = [8, 5]
    cl = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lengths]
    co = [torch.randint(0, 61, (n,), generator=g).tolist() for n in lengths]
    ans, wrong = torch.tensor([3, 17]), torch.tensor([9, 2])
    clean, mask = pad_rows(cl, side, width=8)
    corrupt, _ = pad_rows(co, side, width=8)
    m = logit_diff_metric(ans, wrong, attention_mask=mask)
    for site, method in (("resid_pre", "atp"), ("k", "atp*")):
        act = activation_patching(model, clean, corrupt, m, site=site, attention_mask=mask)
        atp = attribution_patching(model, clean, corrupt, m, site=site, method=method, attention_mask=mask)
        for b, n in enumerate(lengths):
            pos = torch.arange(n) if side == "right" else torch.arange(8 - n, 8)
            one = logit_diff_metric(ans[b : b + 1], wrong[b : b + 1])
            pair = torch.tensor([cl[b]]), torch.tensor([co[b]])
            a1 = activation_patching(model, *pair, one, site=site)
            t1 = attribution_patching(model, *pair, one, site=site, method=method)
            assert torch.allclose(act.per_prompt[b][..., pos], a1.per_prompt[0], atol=1e-5)
            assert torch.allclose(atp.per_prompt[b][..., pos], t1.per_prompt[0], atol=1e-5)
