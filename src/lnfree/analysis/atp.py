"""Attribution patching: AtP and its AtP* fixes (QK fix, GradDrop), separately or together.

AtP (Nanda 2022; Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components", arXiv:2403.00745, Eq. 4) linearises a patch:
``(a_source - a_base) . dM/da`` at the base run, for every component from one forward pass over
the source prompts (no gradient) and one forward + backward pass over the base prompts.

AtP*'s two fixes, selected by ``method`` ("atp", "atp+qk", "atp+graddrop", "atp*"):
- QK fix (their Sec. 3.1, attention saturation): for query and key nodes the attention softmax
  is recomputed exactly with the patched query/key and only the attention probabilities are
  linearised: ``sum_q (pattern_patched - pattern_base)[q] . dM/dpattern[q]``. Rotary models:
  the patched q/k is rotated at its own position, which is the source run's rotated q/k, so the
  scores come from the recorded ``hook_rot_q`` / ``hook_rot_k``. Grouped-query attention: a key
  node is one key/value head and changes the scores of every query head of its group.
- GradDrop (their Sec. 3.2, cancellation): L backward passes, pass l zeroing the gradient
  through layer l's residual write (its attn_out and mlp_out), I_l(n; x) the AtP estimate with
  that gradient, and ``c_AtP+GD(n) = E_x[ 1/(L-1) sum_l |I_l(n; x)| ]``: a *magnitude*
  (``result.signed=False``). A node inside block l(n) gets an exact zero from its own layer's
  pass, hence L-1; residual-stream nodes (resid_pre/mid/post, not in the paper's node set)
  survive every pass and are divided by L, the same "number of terms the node survives" rule.
  (Combination rule as quoted by two independent public implementations of the paper, their
  Eq. 11/12; see docs/patching.md.)
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from jaxtyping import Int

from lnfree._checks import check_choice, forward_kwargs, progress as progress_bar
from lnfree.analysis.patching_core import (
    BLOCK_INTERNAL,
    Metric,
    PatchingResult,
    eval_metric,
    hook_name,
    tl_weight_layout,
    make_result,
    prepare,
    site_enabled,
)

METHODS = ("atp", "atp+qk", "atp+graddrop", "atp*")
LN_OPTIONS = ("live", "frozen")


def method_name(qk_fix: bool, grad_drop: bool) -> str:
    return {(False, False): "atp", (True, False): "atp+qk", (False, True): "atp+graddrop",
            (True, True): "atp*"}[(qk_fix, grad_drop)]


class _GradGate(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient when `state['drop']` is this layer (GradDrop)."""

    @staticmethod
    def forward(ctx, x, state, layer):
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.state["drop"] == ctx.layer:
            return torch.zeros_like(grad), None, None
        return grad, None, None


def _ln_scale_hooks(model) -> list[str]:
    if hasattr(model, "ln_sites"):
        return [model.site_hook(s) for s in model.ln_sites if model.ln_mode(s) != "removed"]
    return [n for n in model.hook_dict if n.endswith("hook_scale")]


def _attn_supports_qk_fix(model) -> None:
    cfg = model.cfg
    bad = {
        "alibi/relative positions": cfg.positional_embedding_type not in ("standard", "shortformer", "rotary"),
        "attention score soft-capping": bool((getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0),
        "attention sinks": bool(getattr(cfg, "use_attention_sinks", False)),
        "log-n attention scaling": bool(getattr(cfg, "use_logn_attn", False)),
        "qk norm": bool(getattr(cfg, "use_qk_norm", False)),
        "clipped qkv": getattr(cfg, "clip_qkv", None) is not None,
    }
    unsupported = [k for k, v in bad.items() if v]
    if unsupported:
        raise NotImplementedError(f"the AtP* QK fix does not support models with {', '.join(unsupported)}; "
                                  "pass method='atp' or 'atp+graddrop' (or qk_fix=False)")


def _resolve_method(method: str, qk_fix, grad_drop) -> tuple[bool, bool]:
    check_choice(method, METHODS, "method")
    for name, flag in (("qk_fix", qk_fix), ("grad_drop", grad_drop)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(flag).__name__}")
    qk = method in ("atp+qk", "atp*") if qk_fix is None else qk_fix
    gd = method in ("atp+graddrop", "atp*") if grad_drop is None else grad_drop
    return qk, gd


def attribution_patching(
    model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupt: Int[torch.Tensor, "batch pos"],
    metric: Metric,
    *,
    site: str = "z",
    by_pos: bool = True,
    method: str = "atp",
    ln: str = "live",
    direction: str = "denoise",
    attention_mask=None,
    qk_fix: Optional[bool] = None,
    grad_drop: Optional[bool] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> PatchingResult:
    """Attribution patching (AtP) or AtP* estimates of every component's patching effect.

    AtP: ``(a_clean - a_corrupt) . dM/da`` at the corrupted run (denoising; noising mirrors it),
    per prompt: a forward pass over the source prompts and a forward + backward pass over the base
    prompts. `method`: "atp", "atp+qk" (the QK fix, q and k sites), "atp+graddrop" (GradDrop: the
    scores become magnitudes) or "atp*" (both); `qk_fix` / `grad_drop` override the method's
    choice and the result's ``method`` names what ran. See the module docstring.

    `ln`: "live" differentiates through the norm scales; "frozen" holds every live scale at its
    value in the gradient run (the gradient treats the normalisation as a fixed linear map); no
    effect on a norm-free model. `attention_mask` / `TokenBatch`: as in `activation_patching`.

    Example:
        >>> atp = attribution_patching(model, batch.clean, batch.corrupt, metric, site="z")  # doctest: +SKIP
        >>> act = activation_patching(model, batch.clean, batch.corrupt, metric, site="z")  # doctest: +SKIP
        >>> patching_error(atp, act).per_layer                                              # doctest: +SKIP
    """
    model, clean, corrupt, mask, spec, base, source = prepare(
        model, clean, corrupt, attention_mask, site=site, by_pos=by_pos, direction=direction,
        n_boot=n_boot, level=level, seed=seed, metric=metric)
    check_choice(ln, LN_OPTIONS, "ln")
    qk_fix, grad_drop = _resolve_method(method, qk_fix, grad_drop)
    B, L = clean.shape[0], spec.n_layers
    use_qk = qk_fix and site in ("q", "k")
    if use_qk:
        _attn_supports_qk_fix(model)
    n_terms = L - 1 if site in BLOCK_INTERNAL else L
    if grad_drop and n_terms < 1:
        raise ValueError(f"GradDrop on site {site!r} needs a model with at least 2 layers (1/(L-1) normalisation)")
    site_names = [hook_name(site, l) for l in range(L)]

    with site_enabled(model, site), tl_weight_layout(model):
        src, m_src = _source_run(model, source, mask, B, metric, site_names, use_qk, L)
        total, m_base, base_acts, state = _gradient_run(model, base, mask, B, metric, site_names, use_qk, ln,
                                                        grad_drop, L)

    grad_names = [hook_name("pattern", l) for l in range(L)] if use_qk else site_names
    targets = [base_acts[n] for n in grad_names]
    variants = list(range(L)) if grad_drop else [None]
    acc = None
    for j, drop in enumerate(progress_bar(variants, enabled=progress, desc="AtP backward")):
        state["drop"] = drop
        grads = torch.autograd.grad(total, targets, retain_graph=j < len(variants) - 1, allow_unused=True)
        with torch.no_grad():
            est = torch.stack([
                _estimate(model, spec, l, base_acts, src, grads[l], use_qk, mask) for l in range(L)
            ], dim=1)  # [batch, layer, ...]
        # GradDrop: the absolute value per prompt and per dropped layer, then the mean over prompts.
        acc = (est.abs() if grad_drop else est) if acc is None else acc + est.abs()
    per_prompt = (acc / n_terms if grad_drop else acc).float().cpu()
    m_clean, m_corrupt = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    return make_result(
        model, spec, per_prompt=per_prompt, clean_pp=m_clean, corrupt_pp=m_corrupt, clean=clean, corrupt=corrupt,
        mask=mask, metric=metric, direction=direction, method=method_name(qk_fix, grad_drop),
        n_boot=n_boot, level=level, seed=seed, signed=not grad_drop, ln=ln, qk_fix=use_qk, grad_drop=grad_drop,
    )


def _recorded_names(model, site_names, use_qk, L) -> list[str]:
    """What each run records: the site itself, or (QK fix) q, k (rotated for rotary), scores, pattern."""
    if not use_qk:
        return list(site_names)
    rotary = model.cfg.positional_embedding_type == "rotary"
    q, k = ("rot_q", "rot_k") if rotary else ("q", "k")
    return [hook_name(n, l) for l in range(L) for n in (q, k, "attn_scores", "pattern")]


@contextlib.contextmanager
def _no_param_grads(model):
    """Only activation gradients are needed: a graph without weight gradients is ~25% cheaper to build."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _source_run(model, source, mask, B, metric, site_names, use_qk, L):
    """The source prompts' activations and metric: a forward pass without gradients."""
    names = _recorded_names(model, site_names, use_qk, L)
    with torch.no_grad():
        logits, cache = model.run_with_cache(source, names_filter=names, return_cache_object=False,
                                             **forward_kwargs(model, source, mask))
        m_src = eval_metric(metric, logits, B).float().cpu()
    return cache, m_src


def _gradient_run(model, base, mask, B, metric, site_names, use_qk, ln, grad_drop, L):
    """Forward the base prompts with the hooks AtP needs, keeping the graph for the backward passes.

    Returns (sum of the base prompts' metric, its per-prompt values, recorded activations,
    GradDrop state). Prompts in a batch do not interact, so d(sum)/d(a_b) is prompt b's own gradient.
    """
    recorded: dict[str, torch.Tensor] = {}
    state = {"drop": None}
    grad_targets = {hook_name("pattern", l) for l in range(L)} if use_qk else set(site_names)

    def record(act, hook):
        recorded[hook.name] = act if hook.name in grad_targets else act.detach()
        return act

    def needs_grad(act, hook):  # params may be frozen: make the graph start at the embedding
        return act if act.requires_grad else act.detach().requires_grad_(True)

    hooks = [("hook_embed", needs_grad)] + [(n, record) for n in _recorded_names(model, site_names, use_qk, L)]
    if ln == "frozen":
        hooks += [(n, lambda act, hook: act.detach()) for n in _ln_scale_hooks(model)]
    if grad_drop:  # registered after the record hooks: a recorded attn_out/mlp_out sits before its gate
        for l in range(L):
            gate = lambda act, hook, l=l: _GradGate.apply(act, state, l)  # noqa: E731
            hooks.append((f"blocks.{l}.hook_attn_out", gate))
            if not model.cfg.attn_only:
                hooks.append((f"blocks.{l}.hook_mlp_out", gate))
    with torch.enable_grad(), _no_param_grads(model), model.hooks(fwd_hooks=hooks):
        logits = model(base, **forward_kwargs(model, base, mask))
        m = eval_metric(metric, logits, B)
        if not m.requires_grad:
            raise ValueError("metric output does not depend differentiably on the logits (attribution "
                             "patching needs its gradient); avoid .detach()/.item()/argmax inside the metric")
        total = m.sum()
    return total, m.detach().float().cpu(), recorded, state


def _estimate(model, spec, l: int, base_acts, src, grad, use_qk: bool, mask) -> torch.Tensor:
    """Per-prompt estimates [batch, *component dims] for layer l."""
    if use_qk:
        return _qk_fix_estimate(model, spec, l, base_acts, src, grad, mask)
    name = hook_name(spec.site, l)
    act = base_acts[name].detach()
    if grad is None:  # no path from this activation to the metric
        grad = torch.zeros_like(act)
    diff = src[name] - act
    real = spec.real(mask)
    if real is not None:  # a padded position is never patched
        diff = diff * real
    return spec.reduce(diff * grad)


def _masked_softmax(scores: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    p = scores.masked_fill(ignore, float("-inf")).softmax(-1)
    return torch.where(torch.isnan(p), torch.zeros_like(p), p)


def _qk_fix_estimate(model, spec, l: int, base_acts, src, g_pattern, mask) -> torch.Tensor:
    """AtP* QK fix (Kramár et al. 2024, Sec. 3.1): exact softmax, linear in the pattern only."""
    attn = model.blocks[l].attn
    rotary = model.cfg.positional_embedding_type == "rotary"
    qn, kn = hook_name("rot_q" if rotary else "q", l), hook_name("rot_k" if rotary else "k", l)
    q_b, k_b, q_src, k_src = base_acts[qn], base_acts[kn], src[qn], src[kn]
    base_scores = base_acts[hook_name("attn_scores", l)]  # [batch, head, q, k], masked with -inf
    ignore = torch.isinf(base_scores) & (base_scores < 0)
    s_b = attn.calculate_attention_scores(q_b, k_b)
    p_b = _masked_softmax(s_b, ignore)
    if not torch.allclose(p_b, base_acts[hook_name("pattern", l)].detach(), atol=1e-5, rtol=1e-4):
        raise NotImplementedError(f"layer {l}: recomputing the attention pattern from q and k does not reproduce "
                                  "the model's pattern; the QK fix does not support this attention variant")
    if g_pattern is None:
        g_pattern = torch.zeros_like(p_b)
    Bt, H, Q, K = s_b.shape
    real = torch.ones(Bt, K, dtype=torch.bool, device=s_b.device) if mask is None else mask
    base_term = (p_b * g_pattern).sum(-1)  # [batch, head, q]
    if spec.site == "q":
        p_new = _masked_softmax(attn.calculate_attention_scores(q_src, k_b), ignore)
        est = ((p_new * g_pattern).sum(-1) - base_term) * real[:, None, :]  # one term per query row
        return est if spec.by_pos else est.sum(-1)
    G = spec.n_heads  # key/value heads: each changes the scores of H // G query heads
    cross = attn.calculate_attention_scores(q_b, k_src)  # [batch, head, q, k]
    if not spec.by_pos:  # every real key position patched at once
        p_new = _masked_softmax(torch.where(real[:, None, None, :], cross, s_b), ignore)
        est = ((p_new * g_pattern).sum(-1) - base_term).sum(-1)  # [batch, head]
        return est.reshape(Bt, G, H // G).sum(-1)
    # Patching key position s changes column s of every query row: softmax per s, chunked over s.
    out = torch.empty(Bt, H, K, dtype=s_b.dtype, device=s_b.device)
    step = max(1, (1 << 24) // max(1, Bt * H * Q * K))
    eye = torch.eye(K, dtype=torch.bool, device=s_b.device)
    for s0 in range(0, K, step):
        cols = eye[s0 : s0 + step]  # [n_s, K]
        scores = torch.where(cols[None, None, :, None, :], cross[:, :, None], s_b[:, :, None])
        p_new = _masked_softmax(scores, ignore[:, :, None])
        out[:, :, s0 : s0 + step] = ((p_new * g_pattern[:, :, None]).sum(-1) - base_term[:, :, None]).sum(-1)
    out = out * real[:, None, :]
    return out.reshape(Bt, G, H // G, K).sum(2)
