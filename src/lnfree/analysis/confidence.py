"""Confidence (entropy) neurons: detection, ablation (total vs direct effect) and calibration.

Entropy neurons (Gurnee et al. 2024; Stolfo et al. 2024, "Confidence regulation neurons in
language models") are final-layer MLP neurons with a large output weight ``w_out`` that lies
mostly in the effective null space of the unembedding. They barely move any logit directly;
instead they change the norm of the residual stream, hence the final LayerNorm's scale, hence
the temperature of every logit. Removing LayerNorm removes that pathway, which is what the
LN-free paper (Baroni et al. 2025) checks: ablating GPT-2's entropy neurons changes entropy by
several percent with LN and not measurably without.

Conventions used here:

- Effective unembedding. The final LN centers its input and multiplies by ``w`` before ``W_U``,
  and softmax ignores a uniform shift of the logits, so what a residual direction does to the
  output distribution is read through ``C_d diag(w) W_U C_V`` (``C_d`` centering over d_model,
  ``C_V`` over the vocabulary): exactly TransformerLens's processed ``W_U`` (fold_ln,
  center_unembed), as used by Stolfo et al. Detection uses that matrix and centered ``w_out``
  (TransformerLens's center_writing_weights; a centering LN cannot see the all-ones direction).
  After ``remove_ln`` the folded ``W_U`` equals ``C_d diag(w) W_U / sigma``, so detection gives the
  same ranking before and after removal (cosines and singular vectors ignore ``1/sigma``).
- LogitVar: variance over the vocabulary of the cosine between ``w_out`` and each column of the
  effective unembedding (Stolfo et al.). Score for ranking: ``||w_out|| / LogitVar``.
- Null-space fraction rho = ||N^T w_out|| / ||w_out||, N the bottom-k left singular vectors
  of the effective unembedding (inside the centered subspace when the LN centers). Default
  ``k = max(1, d_model // 64)``: 12 for GPT-2 Small, where its ``W_U`` singular values drop;
  Stolfo et al. use k of about 0.01 d_model for larger models.
- Ablation: mean ablation of ``hook_post`` (mean over every token of the same data, computed in a
  first pass). Total effect: ordinary forward pass. Direct effect: final LN scale frozen at the
  clean run's per-token value (hooking ``model.site_hook("ln_final")``). Both are measured on
  the per-prompt mean over positions that have a next token (all but the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer

from lnfree.model import LNFreeTransformer
from lnfree.stats import Estimate, bootstrap

__all__ = [
    "EntropyNeurons",
    "NeuronAblation",
    "Calibration",
    "ConfidenceComparison",
    "find_entropy_neurons",
    "ablate_neurons",
    "calibration",
    "compare_confidence",
]


# ---- shared helpers ------------------------------------------------------------------------
def _as_lnfree(model, name: str = "model") -> LNFreeTransformer:
    if isinstance(model, HookedTransformer) and not isinstance(model, LNFreeTransformer):
        model = LNFreeTransformer.from_hooked(model)
    if not isinstance(model, LNFreeTransformer):
        raise TypeError(f"{name} must be a HookedTransformer / LNFreeTransformer, got {type(model).__name__}")
    if hasattr(model, "ln_final") and model.ln_mode("ln_final") != "removed" and model.cfg.normalization_type is None:
        # HookedTransformer.forward then skips ln_final: every number here would be wrong.
        raise ValueError(
            f"{name}: ln_final is {model.ln_mode('ln_final')!r} but cfg.normalization_type is None, so the "
            "forward pass skips the final LayerNorm. Was this cfg object shared with a model on which "
            "remove_ln() ran? Give each model its own cfg (copy.deepcopy)."
        )
    return model


def _mlp_layer(model: LNFreeTransformer, layer) -> int:
    """Validate `layer` (negative indexing allowed) for a layer that has an MLP."""
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not -n <= layer < n:
        raise ValueError(f"layer must be in [{-n}, {n - 1}] for a model with n_layers={n}, got {layer}")
    if model.cfg.attn_only or not hasattr(model.blocks[int(layer) % n], "mlp"):
        raise ValueError(f"layer {layer} has no MLP (attn_only model): entropy neurons are MLP neurons")
    return int(layer) % n


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _check_next_token_tokens(model: LNFreeTransformer, tokens, name: str = "tokens") -> torch.Tensor:
    tokens = model._check_tokens(tokens)
    if tokens.shape[1] < 2:
        raise ValueError(f"{name} need at least 2 positions (next-token labels), got shape {tuple(tokens.shape)}")
    return tokens


def _batches(tokens: torch.Tensor, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, disable=not progress, desc=desc):
        yield tokens[start : start + batch_size]


def _next_token_stats(
    logits: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token with a next token: entropy, CE, top-1 probability, top-1 correct ([batch, pos-1]).

    From max-shifted logits x (max 0): Z = sum exp(x), H = log Z - sum exp(x) x / Z,
    CE = log Z - x[label], top-1 probability = 1 / Z; five passes over the logits, no copies
    of log-probabilities.
    """
    logits = logits[:, :-1]
    top, pred = logits.max(-1, keepdim=True)
    x = logits.float() - top.float()
    e = x.exp()
    Z = e.sum(-1)
    logZ = Z.log()
    entropy = logZ - (e * x).sum(-1) / Z
    labels = tokens[:, 1:].to(x.device)
    ce = logZ - x.gather(-1, labels[..., None])[..., 0]
    if not bool(torch.isfinite(entropy).all() and torch.isfinite(ce).all()):
        raise ValueError("the model produced non-finite logits; entropy / CE are undefined")
    return entropy, ce, 1.0 / Z, pred[..., 0] == labels


def _readout(model: LNFreeTransformer) -> tuple[torch.Tensor, bool]:
    """Effective unembedding C_d diag(w) W_U C_V [d_model, d_vocab], and whether the readout
    centers its input (C_d present). C_V (centering over the vocabulary) drops the uniform
    logit shift, which softmax ignores; together this is TransformerLens's processed W_U
    (fold_ln + center_unembed), the matrix Stolfo et al. use."""
    W_U = model.W_U.detach().double()
    centered = False
    if hasattr(model, "ln_final"):
        if model.ln_mode("ln_final") == "removed":
            # remove_ln folded centering (and w, 1/sigma) into W_U, whose columns are then
            # centered; a natively LN-free readout is read as is.
            col_mean = W_U.mean(0).abs().max()
            centered = bool(col_mean <= 1e-6 * W_U.abs().max().clamp(min=1e-30))
        else:
            if model.ln_final.has_params:
                W_U = W_U * model.ln_final.w.detach().double()[:, None]
            W_U, centered = W_U - W_U.mean(0, keepdim=True), True
    return W_U - W_U.mean(1, keepdim=True), centered


def _centered_basis(d: int, centered: bool, device=None) -> torch.Tensor:
    """Orthonormal basis [d, d-1] of the complement of the all-ones direction (centered), else I.

    Columns 1.. of the Householder reflection that maps e_0 to ones / sqrt(d).
    """
    if not centered:
        return torch.eye(d, dtype=torch.float64, device=device)
    v = -torch.full((d,), d**-0.5, dtype=torch.float64, device=device)
    v[0] += 1.0
    H = torch.eye(d, dtype=torch.float64, device=device) - 2 * torch.outer(v, v) / (v @ v)
    return H[:, 1:]


# ---- detection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EntropyNeurons:
    """Neurons of one MLP layer ranked as entropy-neuron candidates (all `d_mlp`, best first).

    Tensors (all [d_mlp], sorted by `score`, descending):
        neuron: neuron index; norm: ||w_out|| (centered when the final LN centers);
        logit_var: variance over the vocabulary of cos(w_out, effective W_U columns);
        rho: fraction of ||w_out|| in the bottom-`k` singular directions of the effective W_U;
        score: norm / logit_var.
    singular_values: [r] singular values of the effective unembedding, descending
        (r = d_model - 1 when the final LN centers, else d_model).
    labels: "L{layer}N{neuron}" in ranking order. n_top: how many `top()` and `plot()` pick.
    """

    layer: int
    k: int
    n_top: int
    centered: bool
    neuron: Int[torch.Tensor, "d_mlp"]
    norm: Float[torch.Tensor, "d_mlp"]
    logit_var: Float[torch.Tensor, "d_mlp"]
    rho: Float[torch.Tensor, "d_mlp"]
    score: Float[torch.Tensor, "d_mlp"]
    singular_values: Float[torch.Tensor, "r"]
    labels: list[str] = field(repr=False)

    def top(self, n: Optional[int] = None) -> list[int]:
        """Indices of the `n` (default `n_top`) highest-scoring neurons."""
        n = self.n_top if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return [int(i) for i in self.neuron[:n]]

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron: rank, label, neuron, norm, logit_var, rho, score."""
        return pd.DataFrame(
            {
                "rank": np.arange(len(self.neuron)),
                "label": self.labels,
                "layer": self.layer,
                "neuron": self.neuron.numpy(),
                "norm": self.norm.numpy(),
                "logit_var": self.logit_var.numpy(),
                "rho": self.rho.numpy(),
                "score": self.score.numpy(),
            }
        )

    def plot(self):
        """Scatter of ||w_out|| vs LogitVar (log y), colour = rho, the top `n_top` labelled."""
        import plotly.graph_objects as go

        df = self.to_frame()
        top = df.iloc[: self.n_top]
        fig = go.Figure()
        fig.add_trace(
            go.Scatter(
                x=df["norm"], y=df["logit_var"], mode="markers", text=df["label"], name="neurons",
                marker=dict(color=df["rho"], colorscale="Viridis", colorbar=dict(title="rho"), size=5),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=top["norm"], y=top["logit_var"], mode="markers+text", text=top["neuron"].astype(str),
                textposition="top center", name=f"top {self.n_top}",
                marker=dict(color="red", size=9, symbol="circle-open"),
            )
        )
        fig.update_layout(
            title=f"Entropy-neuron candidates, layer {self.layer}",
            xaxis_title="||w_out||", yaxis_title="LogitVar(w_out)",
        )
        fig.update_yaxes(type="log")
        return fig


@torch.no_grad()
def find_entropy_neurons(model, layer: int = -1, k: Optional[int] = None, top: int = 10) -> EntropyNeurons:
    """Rank a layer's MLP neurons by ||w_out|| / LogitVar, with the null-space fraction rho.

    See the module docstring for the effective unembedding and the choice of `k`.

    Example:
        >>> res = find_entropy_neurons(model)              # last layer
        >>> res.top(3)                                     # doctest: +SKIP
        [584, 2123, 2870]                                  # GPT-2 Small
        >>> res.to_frame().head()                          # doctest: +SKIP
    """
    model = _as_lnfree(model)
    layer = _mlp_layer(model, layer)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    W_eff, centered = _readout(model)
    d = model.cfg.d_model
    r = d - 1 if centered else d  # dimension of the space the readout sees
    if k is None:
        k = max(1, d // 64)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < r:
        raise ValueError(f"k (null-space dimension) must be an int in [1, {r - 1}], got {k!r}")
    basis = _centered_basis(d, centered, W_eff.device)  # [d, r]
    # left singular vectors of basis^T W_eff (the unembedding in the readout's coordinates)
    evals, evecs = torch.linalg.eigh(basis.T @ (W_eff @ W_eff.T) @ basis)  # ascending
    null = basis @ evecs[:, :k]  # [d, k]

    W_out = model.blocks[layer].mlp.W_out.detach().double()  # [d_mlp, d]
    if centered:
        W_out = W_out - W_out.mean(1, keepdim=True)
    norm = W_out.norm(dim=1)
    rho = (W_out @ null).norm(dim=1) / norm.clamp(min=1e-30)
    logit_var = _logit_var(W_out, W_eff)
    score = torch.where(norm > 0, norm / logit_var.clamp(min=1e-30), torch.zeros_like(norm))
    order = torch.argsort(score, descending=True, stable=True)
    norm, logit_var, rho, score, order, evals = (t.cpu() for t in (norm, logit_var, rho, score, order, evals))
    return EntropyNeurons(
        layer=layer, k=k, n_top=min(top, len(order)), centered=centered,
        neuron=order,
        norm=norm[order].float(), logit_var=logit_var[order].float(), rho=rho[order].float(),
        score=score[order].float(),
        singular_values=evals.clamp(min=0).sqrt().flip(0).float(),
        labels=[f"L{layer}N{int(i)}" for i in order],
    )


def _logit_var(W_out: torch.Tensor, W_eff: torch.Tensor) -> torch.Tensor:
    """Variance over the vocabulary (unbiased) of cos(w_out, W_eff[:, t]), per neuron.

    Uses the d_model x d_model Gram matrix of the normalised columns instead of the
    [d_mlp, d_vocab] cosine matrix: sum_t c_t^2 = w^T G w and mean_t c_t = w^T m.
    """
    V = W_eff.shape[1]
    cols = W_eff / W_eff.norm(dim=0, keepdim=True).clamp(min=1e-30)
    rows = W_out / W_out.norm(dim=1, keepdim=True).clamp(min=1e-30)
    sum_sq = ((rows @ (cols @ cols.T)) * rows).sum(1)
    mean = rows @ cols.mean(1)
    return ((sum_sq - V * mean**2) / (V - 1)).clamp(min=0)


# ---- ablation ------------------------------------------------------------------------------
_METRICS = ("entropy", "ce")
_EFFECTS = ("total", "direct")


@dataclass(frozen=True)
class NeuronAblation:
    """Mean-ablation effects of single neurons or cumulative sets, total vs direct.

    sets: the ablated neuron sets (one per row of the tensors below); labels: "L{l}N{a}+{b}...".
    mean_activation: [n_neurons] dataset mean of each of `neurons`' hook_post activation.
    clean_entropy, clean_ce: [prompt] per-prompt mean entropy / CE (nats) of the clean run.
    entropy_total, entropy_direct, ce_total, ce_direct: [set, prompt] per-prompt change
        (ablated - clean) with the final LN scale recomputed (total) or frozen (direct).
    ln_final_frozen: False when the model has no live/frozen final LN (direct == total).
    """

    layer: int
    neurons: tuple[int, ...]
    sets: tuple[tuple[int, ...], ...]
    labels: list[str]
    cumulative: bool
    ln_final_frozen: bool
    mean_activation: Float[torch.Tensor, "n_neurons"]
    clean_entropy: Float[torch.Tensor, "prompt"]
    clean_ce: Float[torch.Tensor, "prompt"]
    entropy_total: Float[torch.Tensor, "set prompt"]
    entropy_direct: Float[torch.Tensor, "set prompt"]
    ce_total: Float[torch.Tensor, "set prompt"]
    ce_direct: Float[torch.Tensor, "set prompt"]

    def _delta(self, metric: str, effect: str) -> torch.Tensor:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if effect not in _EFFECTS:
            raise ValueError(f"effect must be one of {_EFFECTS}, got {effect!r}")
        return getattr(self, f"{metric}_{effect}")

    def _index(self, i) -> int:
        if isinstance(i, str):
            if i not in self.labels:
                raise ValueError(f"unknown set {i!r}; labels are {self.labels}")
            return self.labels.index(i)
        if isinstance(i, bool) or not isinstance(i, int) or not -len(self.sets) <= i < len(self.sets):
            raise ValueError(f"set index must be an int in [0, {len(self.sets) - 1}] or a label, got {i!r}")
        return i

    def change(self, i: Union[int, str], metric: str = "entropy", effect: str = "total") -> Estimate:
        """Mean change of `metric` when ablating set `i`, with a bootstrap CI over prompts."""
        return bootstrap(self._delta(metric, effect)[self._index(i)])

    def relative_change(self, i: Union[int, str], metric: str = "entropy", effect: str = "total") -> Estimate:
        """100 * mean change / mean clean value (%), paired bootstrap over prompts."""
        clean = self.clean_entropy if metric == "entropy" else self.clean_ce
        delta = self._delta(metric, effect)[self._index(i)]
        return bootstrap(delta, lambda a, b: 100.0 * a.mean() / b.mean(), paired=clean)

    def ln_mediated_fraction(self, i: Union[int, str], metric: str = "entropy") -> Estimate:
        """1 - |mean direct| / |mean total| (paired bootstrap CI); nan where the total is exactly 0.

        Near 1: the effect goes through the final LN scale (entropy neurons). Negative when the
        LN pathway counteracts the direct effect; unstable (wide CI) when the total is near 0.
        """
        i = self._index(i)
        direct, total = self._delta(metric, "direct")[i], self._delta(metric, "total")[i]

        def frac(d, t):
            t_mean = abs(t.mean())
            return 1.0 - abs(d.mean()) / t_mean if t_mean > 0 else float("nan")

        return bootstrap(direct, frac, paired=total)

    def top(self, n: int = 3) -> list[str]:
        """Labels of the `n` sets with the largest |mean total entropy change|."""
        size = self.entropy_total.mean(1).abs()
        return [self.labels[int(i)] for i in torch.argsort(size, descending=True)[:n]]

    def to_frame(self) -> pd.DataFrame:
        """Long format: set, metric (entropy/ce), quantity, value, low, high, n.

        quantities: change_total, change_direct (nats), relative_total_%, relative_direct_%,
        ln_mediated_fraction, and clean (the clean mean, same for every set).
        """
        rows = []
        for i, label in enumerate(self.labels):
            for metric in _METRICS:
                clean = self.clean_entropy if metric == "entropy" else self.clean_ce
                ests = {
                    "change_total": self.change(i, metric, "total"),
                    "change_direct": self.change(i, metric, "direct"),
                    "relative_total_%": self.relative_change(i, metric, "total"),
                    "relative_direct_%": self.relative_change(i, metric, "direct"),
                    "ln_mediated_fraction": self.ln_mediated_fraction(i, metric),
                    "clean": bootstrap(clean),
                }
                for quantity, est in ests.items():
                    rows.append({"set": label, "n_ablated": len(self.sets[i]), "metric": metric,
                                 "quantity": quantity, **est.to_dict()})
        return pd.DataFrame(rows)

    def plot(self):
        """Bars of the relative entropy and CE change (%), total vs direct, with 95% CIs."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        df = self.to_frame()
        fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy change (%)", "CE change (%)"))
        for col, metric in enumerate(_METRICS, start=1):
            for effect, color in (("total", "#EF553B"), ("direct", "#636EFA")):
                sub = df[(df.metric == metric) & (df.quantity == f"relative_{effect}_%")]
                fig.add_trace(
                    go.Bar(
                        x=sub["set"], y=sub["value"], name=effect, marker_color=color, showlegend=col == 1,
                        error_y=dict(type="data", symmetric=False, array=sub["high"] - sub["value"],
                                     arrayminus=sub["value"] - sub["low"]),
                    ),
                    row=1, col=col,
                )
        fig.update_layout(barmode="group", title=f"Mean ablation of layer-{self.layer} neurons")
        return fig


def _neuron_list(model: LNFreeTransformer, neurons, layer: int) -> tuple[int, ...]:
    if isinstance(neurons, EntropyNeurons):
        if neurons.layer != layer:
            raise ValueError(f"neurons were found in layer {neurons.layer}, but layer={layer} was given")
        neurons = neurons.top()
    if isinstance(neurons, (int, np.integer)) and not isinstance(neurons, bool):
        neurons = [neurons]
    if isinstance(neurons, torch.Tensor):
        neurons = neurons.flatten().tolist()
    try:
        neurons = list(neurons)
    except TypeError:
        raise TypeError(f"neurons must be an int, a sequence of ints or an EntropyNeurons; got {neurons!r}") from None
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in neurons):
        raise TypeError(f"neurons must be integer indices, got {neurons!r}")
    neurons = [int(n) for n in neurons]
    d_mlp = model.blocks[layer].mlp.W_out.shape[0]
    bad = [n for n in neurons if not 0 <= n < d_mlp]
    if not neurons or bad:
        raise ValueError(
            f"neurons must be a non-empty list of indices in [0, {d_mlp - 1}] (d_mlp={d_mlp}); got {neurons}"
        )
    if len(set(neurons)) != len(neurons):
        raise ValueError(f"neurons contains duplicates: {neurons}")
    return tuple(neurons)


@torch.no_grad()
def _mean_activations(model, tokens, layer, neurons, batch_size, progress) -> torch.Tensor:
    """Dataset mean of hook_post[..., neurons] over every token (runs only up to `layer`)."""
    total = torch.zeros(len(neurons), dtype=torch.float64)
    count = 0
    idx = list(neurons)

    def record(act, hook):
        nonlocal count
        total.add_(act[..., idx].detach().double().sum((0, 1)).cpu())
        count += act.shape[0] * act.shape[1]

    for batch in _batches(tokens, batch_size, progress, "mean activations"):
        model.run_with_hooks(
            batch.to(model.cfg.device), stop_at_layer=layer + 1,
            fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", record)],
        )
    return (total / count).float()


def _clean_run(model, batch, layer, neurons, freeze):
    """Clean forward pass caching the neurons' activations, the layer's resid_post and (when
    `freeze`) the final LN scale. Returns (cache, per-token entropy, per-token CE)."""
    cache = {}

    def save(name, cols=None):
        def hook(act, hook):
            cache[name] = (act if cols is None else act[..., cols]).clone()

        return hook

    hooks = [(f"blocks.{layer}.mlp.hook_post", save("post", list(neurons))),
             (f"blocks.{layer}.hook_resid_post", save("resid"))]
    if freeze:
        hooks.append((model.site_hook("ln_final"), save("scale")))
    logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    if freeze and "scale" not in cache:
        raise RuntimeError(f"ln_final's scale hook did not fire although ln_final is {model.ln_mode('ln_final')!r}")
    h0, ce0, _, _ = _next_token_stats(logits, batch)
    return cache, h0, ce0


def _ablated_run(model, batch, cache, layer, neurons, ablated, means) -> dict:
    """Per-token entropy and CE with `ablated` mean-ablated: {(metric, effect): [batch, pos-1]}.

    The rest of the model runs from the edited resid_post (`start_at_layer`); mlp_out is linear
    in hook_post, so adding shift @ W_out is exactly the hooked ablation. Direct: the final LN
    scale is replaced by the clean per-token value; without a final LN scale, direct = total.
    """
    W_out = model.blocks[layer].mlp.W_out.detach()
    cols = [neurons.index(n) for n in ablated]
    shift = (means.to(cache["post"].device)[cols] - cache["post"][..., cols]).to(W_out.dtype)
    resid = cache["resid"] + shift @ W_out[list(ablated)]
    out = {}
    for effect in _EFFECTS:
        if effect == "direct" and "scale" not in cache:
            out[("entropy", "direct")], out[("ce", "direct")] = out[("entropy", "total")], out[("ce", "total")]
            continue
        fwd = [] if effect == "total" else [(model.site_hook("ln_final"), lambda act, hook: cache["scale"])]
        logits = model.run_with_hooks(resid, start_at_layer=layer + 1, fwd_hooks=fwd)
        out[("entropy", effect)], out[("ce", effect)], _, _ = _next_token_stats(logits, batch)
        del logits
    return out


@torch.no_grad()
def ablate_neurons(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    neurons,
    *,
    layer: int = -1,
    cumulative: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> NeuronAblation:
    """Mean-ablate neurons of one MLP layer; change in entropy and CE, total vs direct.

    `neurons`: an int, a sequence of ints, or an `EntropyNeurons` (its `top()` neurons). With
    `cumulative=True` the sets are the first 1, 2, ..., n neurons together, else one per neuron.
    Two streaming passes: dataset mean activations, then per batch one clean forward pass
    (hooks: the layer's hook_post and hook_resid_post, the final LN scale) and, per set, the
    rest of the model from the ablated residual (`start_at_layer`) with the final LN scale
    recomputed (total) and frozen at the clean per-token value (direct).

    Example:
        >>> ents = find_entropy_neurons(model)
        >>> abl = ablate_neurons(model, tokens, ents.top(3), cumulative=True)
        >>> abl.relative_change(-1, "entropy", "total")    # doctest: +SKIP
        >>> abl.to_frame()                                 # doctest: +SKIP
    """
    model = _as_lnfree(model)
    layer = _mlp_layer(model, layer)
    neurons = _neuron_list(model, neurons, layer)
    tokens = _check_next_token_tokens(model, tokens)
    batch_size = _check_batch_size(batch_size)
    if not isinstance(cumulative, bool):
        raise TypeError(f"cumulative must be a bool, got {type(cumulative).__name__}")
    if model.cfg.positional_embedding_type == "shortformer":
        raise ValueError("ablate_neurons does not support shortformer positional embeddings")
    sets = tuple(neurons[: i + 1] for i in range(len(neurons))) if cumulative else tuple((n,) for n in neurons)

    means = _mean_activations(model, tokens, layer, neurons, batch_size, progress)
    freeze = hasattr(model, "ln_final") and model.ln_mode("ln_final") != "removed"
    clean_h, clean_ce, out = [], [], {(m, e): [] for m in _METRICS for e in _EFFECTS}
    for batch in _batches(tokens, batch_size, progress, "ablations"):
        batch = batch.to(model.cfg.device)
        cache, h0, ce0 = _clean_run(model, batch, layer, neurons, freeze)
        clean_h.append(h0.mean(1).cpu())
        clean_ce.append(ce0.mean(1).cpu())
        for s in sets:
            for (metric, effect), value in _ablated_run(model, batch, cache, layer, neurons, s, means).items():
                base = h0 if metric == "entropy" else ce0
                out[(metric, effect)].append((value - base).mean(1).cpu())

    def stack(metric, effect):  # [batch-chunks x sets] -> [set, prompt]
        per = out[(metric, effect)]
        return torch.stack([torch.cat(per[i :: len(sets)]) for i in range(len(sets))])

    return NeuronAblation(
        layer=layer, neurons=neurons, sets=sets,
        labels=[f"L{layer}N" + "+".join(str(n) for n in s) for s in sets],
        cumulative=cumulative, ln_final_frozen=freeze, mean_activation=means,
        clean_entropy=torch.cat(clean_h), clean_ce=torch.cat(clean_ce),
        entropy_total=stack("entropy", "total"), entropy_direct=stack("entropy", "direct"),
        ce_total=stack("ce", "total"), ce_direct=stack("ce", "direct"),
    )


# ---- calibration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Mean entropy and expected calibration error of next-token top-1 predictions.

    Bins are equal-width confidence intervals (lo, hi] of the top-1 probability.
    edges: [n_bins + 1]; count: [n_bins] tokens per bin; accuracy, confidence: [n_bins] mean
    top-1 correctness / probability per bin (nan for empty bins).
    per_prompt_entropy: [prompt] mean entropy per prompt (nats).
    per_prompt_bins: [prompt, 3, n_bins] per prompt and bin: count, sum of confidence, sum of
        correctness (what the ECE bootstrap resamples).
    mean_entropy, ece, accuracy_top1: estimates with bootstrap CIs over prompts.
    """

    n_bins: int
    edges: Float[torch.Tensor, "n_bins_plus_1"]
    count: Int[torch.Tensor, "n_bins"]
    accuracy: Float[torch.Tensor, "n_bins"]
    confidence: Float[torch.Tensor, "n_bins"]
    per_prompt_entropy: Float[torch.Tensor, "prompt"]
    per_prompt_bins: Float[torch.Tensor, "prompt 3 n_bins"] = field(repr=False)
    mean_entropy: Estimate
    ece: Estimate
    accuracy_top1: Estimate
    labels: list[str] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per bin: label, lo, hi, count, accuracy, confidence, gap (= accuracy - confidence)."""
        return pd.DataFrame(
            {
                "bin": self.labels, "lo": self.edges[:-1].numpy(), "hi": self.edges[1:].numpy(),
                "count": self.count.numpy(), "accuracy": self.accuracy.numpy(),
                "confidence": self.confidence.numpy(),
                "gap": (self.accuracy - self.confidence).numpy(),
            }
        )

    def summary(self) -> pd.DataFrame:
        """mean_entropy, ece, accuracy_top1 with CIs, long format."""
        ests = {"mean_entropy": self.mean_entropy, "ece": self.ece, "accuracy_top1": self.accuracy_top1}
        return pd.DataFrame([{"metric": k, **v.to_dict()} for k, v in ests.items()])

    def _traces(self, name: str, color: Optional[str] = None):
        import plotly.graph_objects as go

        centers = ((self.edges[:-1] + self.edges[1:]) / 2).numpy()
        return go.Bar(
            x=centers, y=self.accuracy.numpy(), width=1.0 / self.n_bins, name=name, opacity=0.6,
            marker_color=color, customdata=self.count.numpy(),
            hovertemplate="conf %{x:.2f}: acc %{y:.3f} (n=%{customdata})",
        )

    def plot(self):
        """Reliability diagram: accuracy per confidence bin against the diagonal."""
        import plotly.graph_objects as go

        fig = go.Figure([self._traces(f"ECE {self.ece.value:.4f}")])
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash")))
        fig.update_layout(
            title=f"Reliability diagram (mean entropy {self.mean_entropy.value:.3f} nats)",
            xaxis_title="top-1 confidence", yaxis_title="accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1],
        )
        return fig


def _ece(bins: np.ndarray) -> float:
    """ECE from [prompt, 3, n_bins] per-prompt bin sums: sum_b |sum correct - sum conf| / N."""
    totals = bins.sum(axis=0)
    return float(np.abs(totals[2] - totals[1]).sum() / totals[0].sum())


@torch.no_grad()
def calibration(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    n_bins: int = 15,
    batch_size: int = 16,
    progress: bool = False,
) -> Calibration:
    """Mean next-token entropy and expected calibration error (equal-width bins, Guo et al.).

    Labels are the tokens shifted by one; every position but the last is scored.

    Example:
        >>> cal = calibration(model, tokens)
        >>> cal.ece, cal.mean_entropy                   # doctest: +SKIP
        >>> cal.plot()                                  # doctest: +SKIP
    """
    model = _as_lnfree(model)
    tokens = _check_next_token_tokens(model, tokens)
    batch_size = _check_batch_size(batch_size)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    ent, bins = [], []
    for batch in _batches(tokens, batch_size, progress, "calibration"):
        logits = model(batch.to(model.cfg.device))
        h, _, conf, correct = _next_token_stats(logits, batch)
        del logits
        idx = ((conf * n_bins).ceil().long() - 1).clamp(0, n_bins - 1)  # bins (lo, hi]
        b = torch.zeros(conf.shape[0], 3, n_bins, dtype=torch.float64, device=conf.device)
        for row, values in enumerate((torch.ones_like(conf), conf, correct.to(conf.dtype))):
            b[:, row].scatter_add_(1, idx, values.double())
        ent.append(h.mean(1).cpu())
        bins.append(b.cpu())
    ent, bins = torch.cat(ent), torch.cat(bins)
    totals = bins.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (totals[2] / totals[0]).float()
        confidence = (totals[1] / totals[0]).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins_np = bins.numpy()
    return Calibration(
        n_bins=n_bins, edges=edges, count=totals[0].round().long(), accuracy=accuracy, confidence=confidence,
        per_prompt_entropy=ent, per_prompt_bins=bins.float(),
        mean_entropy=bootstrap(ent), ece=bootstrap(bins_np, _ece),
        accuracy_top1=bootstrap(bins_np, lambda a: float(a[:, 2].sum() / a[:, 0].sum())),
        labels=[f"({lo:.3f}, {hi:.3f}]" for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist())],
    )


# ---- comparison ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfidenceComparison:
    """LN vs LN-free confidence analysis: per model, entropy neurons, their ablation, calibration.

    Each of `neurons`, `ablations`, `calibrations` is a pair (model_a, model_b) in `names` order.
    """

    names: tuple[str, str]
    neurons: tuple[EntropyNeurons, EntropyNeurons]
    ablations: tuple[NeuronAblation, NeuronAblation]
    calibrations: tuple[Calibration, Calibration]

    def to_frame(self) -> pd.DataFrame:
        """One long table: model, section (ablation/calibration), item, metric, quantity, value, low, high."""
        frames = []
        for name, abl, cal in zip(self.names, self.ablations, self.calibrations):
            a = abl.to_frame().rename(columns={"set": "item"})
            a.insert(0, "section", "ablation")
            c = cal.summary().assign(item="calibration", quantity="value", section="calibration")
            frames += [a.assign(model=name), c.assign(model=name)]
        df = pd.concat(frames, ignore_index=True)
        cols = ["model", "section", "item", "metric", "quantity", "value", "low", "high", "n"]
        return df[cols + [c for c in df.columns if c not in cols]]

    def differences(self) -> pd.DataFrame:
        """model_b - model_a for calibration metrics and, per ablation set rank, the relative
        entropy change (total) and the LN-mediated fraction of the entropy change."""
        a, b = self.names
        rows = []
        for metric in ("mean_entropy", "ece", "accuracy_top1"):
            va, vb = (getattr(c, metric).value for c in self.calibrations)
            rows.append({"item": "calibration", "metric": metric, a: va, b: vb, "difference": vb - va})
        n_sets = min(len(x.sets) for x in self.ablations)
        for i in range(n_sets):
            for metric, fn in (
                ("entropy_change_total_%", lambda x: x.relative_change(i, "entropy", "total")),
                ("ln_mediated_fraction_entropy", lambda x: x.ln_mediated_fraction(i, "entropy")),
            ):
                va, vb = (fn(x).value for x in self.ablations)
                rows.append({"item": f"set {i}", "metric": metric, a: va, b: vb, "difference": vb - va})
        return pd.DataFrame(rows)

    def plot(self):
        """Left: entropy change (%) per ablation set, total and direct, per model.
        Right: both reliability diagrams."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy change on ablation (%)", "reliability"))
        colors = ("#EF553B", "#636EFA")
        for name, abl, cal, color in zip(self.names, self.ablations, self.calibrations, colors):
            df = abl.to_frame()
            for effect, pattern in (("total", ""), ("direct", "/")):
                sub = df[(df.metric == "entropy") & (df.quantity == f"relative_{effect}_%")]
                fig.add_trace(
                    go.Bar(
                        x=[f"{name}: {s}" for s in sub["set"]], y=sub["value"], name=f"{name} {effect}",
                        marker=dict(color=color, pattern_shape=pattern),
                        error_y=dict(type="data", symmetric=False, array=sub["high"] - sub["value"],
                                     arrayminus=sub["value"] - sub["low"]),
                    ),
                    row=1, col=1,
                )
            trace = cal._traces(f"{name} (ECE {cal.ece.value:.4f})", color)
            fig.add_trace(trace, row=1, col=2)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash")),
                      row=1, col=2)
        fig.update_layout(barmode="group", title=f"Confidence regulation: {self.names[0]} vs {self.names[1]}")
        return fig


def compare_confidence(
    model_a,
    model_b,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    names: tuple[str, str] = ("LN", "LN-free"),
    top: int = 3,
    neurons: Optional[Sequence[int]] = None,
    layer: int = -1,
    k: Optional[int] = None,
    n_bins: int = 15,
    batch_size: int = 16,
    progress: bool = False,
) -> ConfidenceComparison:
    """Entropy neurons, their cumulative ablation (total vs direct) and calibration of two models.

    Each model's own top-`top` entropy neurons are ablated cumulatively, unless `neurons` is
    given (then the same neurons are ablated in both, e.g. an LN model's neurons in its
    fine-tuned LN-free version).

    Example:
        >>> cmp = compare_confidence(ln_model, ln_free_model, tokens)   # doctest: +SKIP
        >>> cmp.to_frame(); cmp.differences(); cmp.plot()              # doctest: +SKIP
    """
    model_a, model_b = _as_lnfree(model_a, "model_a"), _as_lnfree(model_b, "model_b")
    if model_a.cfg.d_vocab != model_b.cfg.d_vocab:
        raise ValueError(
            f"model_a and model_b must share a vocabulary: d_vocab {model_a.cfg.d_vocab} vs {model_b.cfg.d_vocab}"
        )
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"names must be two strings, got {names!r}")
    if names[0] == names[1]:
        raise ValueError(f"names must differ, got {names!r}")
    for m, which in ((model_a, "model_a"), (model_b, "model_b")):
        _check_next_token_tokens(m, tokens, f"tokens (for {which})")
    results = []
    for m in (model_a, model_b):
        found = find_entropy_neurons(m, layer=layer, k=k, top=top)
        chosen = found.top() if neurons is None else neurons
        abl = ablate_neurons(m, tokens, chosen, layer=layer, cumulative=True, batch_size=batch_size,
                             progress=progress)
        cal = calibration(m, tokens, n_bins=n_bins, batch_size=batch_size, progress=progress)
        results.append((found, abl, cal))
    found, abls, cals = zip(*results)
    return ConfidenceComparison(names=tuple(names), neurons=tuple(found), ablations=tuple(abls),
                                calibrations=tuple(cals))
