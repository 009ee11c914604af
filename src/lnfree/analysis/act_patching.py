"""Activation patching, many patches per forward pass.

Activation patching (the ground truth) runs the *base* prompt with one component's activation
taken from the *source* prompt and records the metric: ``direction="denoise"`` patches clean
activations into the corrupted run, ``"noise"`` corrupted activations into the clean run. The
base batch is replicated k times along the batch dim and replica r gets component r patched
(one hook per layer, a boolean mask per replica); the pass starts at the first patched layer
from the cached base residual stream.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Int

from lnfree._checks import batches, forward_kwargs, positive_int
from lnfree.analysis.patching_core import (
    Metric,
    PatchingResult,
    eval_metric,
    hook_name,
    tl_weight_layout,
    make_result,
    prepare,
    site_enabled,
)


def _can_start_at_layer(model) -> bool:
    """Whether a forward pass may start from a cached residual (not for shortformer positions)."""
    return model.cfg.positional_embedding_type != "shortformer"


def _plan_chunks(n_per_layer: int, layers, k: int) -> list[list[tuple[int, int]]]:
    """Group (layer, local index) components into forward passes of at most k replicas.

    Whole layers are merged while they fit; a larger layer is split into near-equal chunks so
    that no pass is a nearly empty tail.
    """
    chunks, cur = [], []
    for layer in (range(layers) if isinstance(layers, int) else layers):
        comps = [(layer, i) for i in range(n_per_layer)]
        if len(cur) + len(comps) <= k:
            cur += comps
            continue
        if cur:
            chunks.append(cur)
        n_chunks = math.ceil(len(comps) / k)
        size = math.ceil(len(comps) / n_chunks)
        pieces = [comps[i : i + size] for i in range(0, len(comps), size)]
        chunks += pieces[:-1]
        cur = pieces[-1]
    if cur:
        chunks.append(cur)
    return chunks


def _auto_batch_size(model, n_prompts: int, n_pos: int) -> int:
    # Bound the replicated batch's largest tensors (logits, MLP hidden) to ~2^26 floats.
    width = max(model.cfg.d_vocab, model.cfg.d_mlp or 0, model.cfg.d_model)
    return max(1, (1 << 26) // (n_prompts * n_pos * width))


@torch.no_grad()
def activation_patching(
    model,
    clean: Int[torch.Tensor, "batch pos"],
    corrupt: Int[torch.Tensor, "batch pos"],
    metric: Metric,
    *,
    site: str = "z",
    by_pos: bool = True,
    direction: str = "denoise",
    attention_mask=None,
    layers: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> PatchingResult:
    """Activation patching of every component of `site`, many patches per forward pass.

    `metric(logits) -> tensor[batch]` gives one value per prompt (it must read each row's last
    *real* token when the batch is padded, as `lnfree.tasks` metrics do). `attention_mask`
    ([batch, pos], 1 = real; or a (clean, corrupt) pair, which must be equal; or pass
    `TokenBatch`es): padded positions are never patched and never counted. `batch_size` is the
    number of patches (replicas of the prompt batch) per forward pass (None: ~256 MB worth).
    `layers`: patch only these layers (the others' scores are NaN), e.g. to check a few layers of
    a large model.
    ``result.values`` is the patched mean metric (TransformerLens's `patching` functions return
    it); ``result.scores`` is that minus the unpatched base run's mean metric, and
    ``result.per_prompt`` the same per prompt pair. `n_boot`, `level`, `seed`: the bootstrap CI
    of ``result.effect`` (clean minus corrupt metric over prompts).

    Example:
        >>> import lnfree, torch
        >>> from lnfree.tasks import logit_diff_metric
        >>> model = lnfree.zoo.load("tiny-ln")                                   # doctest: +SKIP
        >>> clean, corrupt = torch.randint(0, 100, (2, 2, 8))                    # doctest: +SKIP
        >>> metric = logit_diff_metric(torch.tensor([5, 6]), torch.tensor([7, 8]))  # doctest: +SKIP
        >>> res = activation_patching(model, clean, corrupt, metric, site="resid_pre")  # doctest: +SKIP
        >>> res.scores.shape  # [layer, pos]                                      # doctest: +SKIP
        torch.Size([4, 8])
    """
    model, clean, corrupt, mask, spec, base, source = prepare(
        model, clean, corrupt, attention_mask, site=site, by_pos=by_pos, direction=direction,
        n_boot=n_boot, level=level, seed=seed, metric=metric)
    B, P = clean.shape
    batch_size = _auto_batch_size(model, B, P) if batch_size is None else positive_int(batch_size, "batch_size")
    L = spec.n_layers
    layers = _check_layers(layers, L)
    site_names = [hook_name(site, l) for l in layers]
    resid_names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    fwd = forward_kwargs(model, base, mask)

    with site_enabled(model, site), tl_weight_layout(model):
        src_logits, src_cache = model.run_with_cache(source, names_filter=site_names, return_cache_object=False, **fwd)
        base_logits, base_cache = model.run_with_cache(base, names_filter=resid_names, return_cache_object=False, **fwd)
        m_src = eval_metric(metric, src_logits, B).float().cpu()
        m_base = eval_metric(metric, base_logits, B).float().cpu()
        del src_logits, base_logits

        n_local = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else 1
        local_idx = torch.tensor(list(itertools.product(*(range(n) for n in spec.shape[1:]))),
                                 dtype=torch.long).reshape(n_local, len(spec.shape) - 1)
        values = torch.full((L * n_local, B), float("nan"))
        chunks = _plan_chunks(n_local, layers, batch_size)
        for c in batches(len(chunks), 1, enabled=progress, desc=f"patching {site}"):
            chunk = chunks[c.start]
            values[[l * n_local + i for l, i in chunk]] = _patch_chunk(
                model, spec, chunk, local_idx, src_cache, base_cache, base, mask, metric)

    values_pp = values.T.reshape((B,) + spec.shape)
    m_clean, m_corrupt = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    base_pp = m_base.reshape((B,) + (1,) * len(spec.shape))
    return make_result(
        model, spec, per_prompt=values_pp - base_pp, values_pp=values_pp, clean_pp=m_clean, corrupt_pp=m_corrupt,
        clean=clean, corrupt=corrupt, mask=mask, metric=metric, direction=direction, method="activation",
        n_boot=n_boot, level=level, seed=seed, layers=None if len(layers) == L else tuple(layers),
    )


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    try:
        out = sorted({int(positive_int(l, "layers", allow_zero=True)) for l in layers})
    except TypeError:
        raise TypeError(f"layers must be a sequence of layer indices, got {type(layers).__name__}") from None
    if not out or out[-1] >= n_layers:
        raise ValueError(f"layers must be a non-empty set of indices in [0, {n_layers}), got {layers!r}")
    return out


def _patch_chunk(model, spec, chunk, local_idx, src_cache, base_cache, base, mask, metric) -> torch.Tensor:
    """Metric [k, batch] of each patched replica in one forward pass."""
    k, (B, P) = len(chunk), base.shape
    layers = torch.tensor([l for l, _ in chunk])
    idx = local_idx[torch.tensor([i for _, i in chunk])]
    device = base.device
    real = spec.real(mask)
    hooks = []
    for layer in sorted(set(layers.tolist())):
        sel = spec.replica_mask(idx)
        sel[layers != layer] = False
        sel = sel.to(device)[:, None]  # [k, 1, *cell]
        if real is not None:  # never patch a padded position
            sel = sel & real[None]
        src = src_cache[hook_name(spec.site, layer)]

        def hook(act, hook, sel=sel, src=src):
            a = act.view(k, B, *act.shape[1:])
            return torch.where(sel, src[None], a).view(act.shape)

        hooks.append((hook_name(spec.site, layer), hook))
    start = int(layers.min())
    rep_mask = None if mask is None else mask.repeat(k, 1)
    fwd = forward_kwargs(model, base.repeat(k, 1), rep_mask)
    with model.hooks(fwd_hooks=hooks):
        if _can_start_at_layer(model):
            resid = base_cache[f"blocks.{start}.hook_resid_pre"].repeat(k, 1, 1)
            logits = model(resid, start_at_layer=start, **fwd)
        else:
            logits = model(base.repeat(k, 1), **fwd)
    logits = logits.view(k, B, *logits.shape[1:])
    return torch.stack([eval_metric(metric, logits[r], B) for r in range(k)]).float().cpu()
