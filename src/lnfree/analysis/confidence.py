"""Confidence (entropy) neurons: detection and ablation (total vs direct effect).

Entropy neurons (Gurnee et al. 2024; Stolfo et al. 2024, "Confidence regulation neurons in
language models") are final-layer MLP neurons with a large output weight ``w_out`` that lies
mostly in the effective null space of the unembedding. They barely move any logit directly;
instead they change the norm of the residual stream, hence the final norm's scale, hence the
temperature of every logit. Removing the norm removes that pathway, which is what the LN-free
paper (Baroni et al. 2025) checks: ablating GPT-2's entropy neurons changes entropy by several
percent with LN and not measurably without. Calibration (ECE) lives in
`lnfree.analysis.calibration`: it is a property of the output distribution.

Conventions used here:

- Effective unembedding. Softmax ignores a uniform shift of the logits, so the vocabulary
  centering ``C_V`` applies to every model. What else a residual direction goes through depends
  on the final norm: a LayerNorm centers its input and multiplies by ``w``, giving
  ``C_d diag(w) W_U C_V`` (``C_d`` centering over d_model): exactly TransformerLens's processed
  ``W_U`` (fold_ln, center_unembed), as used by Stolfo et al.; ``w_out`` is then centered too
  (center_writing_weights: a centering norm cannot see the all-ones direction). An RMSNorm
  divides by the RMS of the *uncentered* input and multiplies by ``w``: the effective unembedding
  is ``diag(w) W_U C_V`` over all of d_model, and ``w_out`` is not centered: the all-ones direction
  is an ordinary direction that both moves logits and counts in the RMS. After ``remove_ln`` the
  folded ``W_U`` is the same matrix divided by sigma, so detection gives the same ranking before
  and after removal (cosines and singular vectors ignore ``1/sigma``).
- LogitVar: variance over the vocabulary of the cosine between ``w_out`` and each column of the
  effective unembedding (Stolfo et al.). Score for ranking: ``||w_out|| / LogitVar``.
- Null-space fraction rho = ||N^T w_out|| / ||w_out||, N the bottom-``null_dim`` left singular
  vectors of the effective unembedding (inside the centered subspace when the norm centers).
  Default ``null_dim = max(1, d_model // 64)``: 12 for GPT-2 Small, where its ``W_U`` singular
  values drop; Stolfo et al. use about 0.01 d_model for larger models.
- Neuron references carry their layer: labels ``"L{layer}N{neuron}"``, ``(layer, neuron)``
  pairs, an `EntropyNeurons` result or its ``top()`` frame. Bare indices need ``layer=``.
- Ablation: mean ablation of ``hook_post`` (mean over every real token of the same data, or
  ``means=``). Total effect: ordinary forward pass. Direct effect: final norm scale frozen at the
  clean run's per-token value (hooking ``model.site_hook("ln_final")``). Effects are kept per
  token (every prediction whose position and label are real tokens) and per prompt (the mean
  over its tokens); CIs resample prompts.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree._checks import (
    batches,
    check_finite,
    check_same_vocab,
    compare_names,
    forward_kwargs,
    model_id,
    model_label,
    next_token_mask,
    positive_int,
    resolve_batch,
)
from lnfree._results import Result, result
from lnfree.analysis.calibration import Calibration, calibration, next_token_stats
from lnfree.model import LNFreeTransformer, as_lnfree
from lnfree.norm_algebra import norm_site
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args

__all__ = [
    "EntropyNeurons",
    "NeuronAblation",
    "ConfidenceAnalysis",
    "ConfidenceComparison",
    "find_entropy_neurons",
    "ablate_neurons",
    "compare_confidence",
    # calibration moved to lnfree.analysis.calibration; re-exported here for existing imports
    "Calibration",
    "calibration",
]

_LABEL = re.compile(r"L(-?\d+)N(\d+)")


# ---- shared helpers ------------------------------------------------------------------------
def _mlp_layer(model: LNFreeTransformer, layer, name: str = "layer") -> int:
    """Validate `layer` (negative indexing allowed) for a layer that has an MLP."""
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(layer).__name__}")
    if not -n <= layer < n:
        raise ValueError(f"{name} must be in [{-n}, {n - 1}] for a model with n_layers={n}, got {layer}")
    if model.cfg.attn_only or not hasattr(model.blocks[int(layer) % n], "mlp"):
        raise ValueError(f"layer {layer} has no MLP (attn_only model): entropy neurons are MLP neurons")
    return int(layer) % n


def _readout(model: LNFreeTransformer) -> tuple[torch.Tensor, bool]:
    """Effective unembedding [d_model, d_vocab] and whether the readout centers its input.

    LayerNorm: C_d diag(w) W_U C_V; RMSNorm: diag(w) W_U C_V (no C_d). A removed final norm has
    been folded into W_U (remove_ln: C_d diag(w) / sigma for LayerNorm, diag(w) / sigma for
    RMSNorm), which is read as is; whether the readout centers comes from the norm's kind, never
    from the weights (an RMS model's folded W_U may have centered columns by chance). No final
    norm at all (a natively norm-free model): W_U C_V, uncentered. The norm facts come from
    `lnfree.norm_algebra` (one place for every analysis).
    """
    W_U = check_finite(model.W_U.detach(), "W_U").double()
    final = norm_site(model, "ln_final")
    if final.weight is not None:
        check_finite(final.weight.detach(), "ln_final.w")
    W_U = final.input_direction(W_U, dim=0)
    return W_U - W_U.mean(1, keepdim=True), final.centers


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


def _deprecated_alias(new_value, old_value, new: str, old: str, default=None):
    """`old=` as a deprecated spelling of `new=` (one release)."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise ValueError(f"pass {new}= only; {old}= is its deprecated old name")
    warnings.warn(f"{old}= is deprecated, use {new}= (same meaning)", DeprecationWarning, stacklevel=3)
    return old_value


# ---- detection -----------------------------------------------------------------------------
@result
class EntropyNeurons(Result):
    """Neurons of one MLP layer ranked as entropy-neuron candidates (all `d_mlp`, best first).

    Tensors (all [d_mlp], sorted by `score`, descending):
        neuron: neuron index; norm: ||w_out|| (centered when the final norm centers);
        logit_var: variance over the vocabulary of cos(w_out, effective W_U columns);
        rho: fraction of ||w_out|| in the bottom-`null_dim` singular directions of the effective W_U;
        score: norm / logit_var.
    singular_values: [r] singular values of the effective unembedding, descending
        (r = d_model - 1 when the final norm centers, else d_model).
    labels: "L{layer}N{neuron}" in ranking order. n_top: how many `neurons()`, `pairs()`,
    `plot()` and `ablate_neurons(model, tokens, this)` take by default.
    """

    model_name: str
    model_id: str
    layer: int
    null_dim: int
    n_top: int
    centered: bool
    neuron: Int[torch.Tensor, "d_mlp"]
    norm: Float[torch.Tensor, "d_mlp"]
    logit_var: Float[torch.Tensor, "d_mlp"]
    rho: Float[torch.Tensor, "d_mlp"]
    score: Float[torch.Tensor, "d_mlp"]
    singular_values: Float[torch.Tensor, "r"]
    labels: tuple[str, ...]

    @property
    def k(self) -> int:
        """Deprecated name of `null_dim`."""
        warnings.warn("EntropyNeurons.k is deprecated, use .null_dim", DeprecationWarning, stacklevel=2)
        return self.null_dim

    def _count(self, k) -> int:
        return min(self.n_top if k is None else positive_int(k, "k"), len(self.labels))

    def neurons(self, k: Optional[int] = None) -> list[str]:
        """Labels ("L{layer}N{neuron}") of the `k` (default `n_top`) best candidates: pass them to
        `ablate_neurons`, which then ablates them in their own layer."""
        return list(self.labels[: self._count(k)])

    def pairs(self, k: Optional[int] = None) -> list[tuple[int, int]]:
        """(layer, neuron) pairs of the `k` (default `n_top`) best candidates."""
        return [(self.layer, int(i)) for i in self.neuron[: self._count(k)]]

    def to_frame(self) -> pd.DataFrame:
        """One row per neuron, best first: rank, label, layer, neuron, norm, logit_var, rho, score."""
        return pd.DataFrame(
            {
                "rank": np.arange(len(self.neuron)),
                "label": list(self.labels),
                "layer": self.layer,
                "neuron": self.neuron.numpy(),
                "norm": self.norm.numpy(),
                "logit_var": self.logit_var.numpy(),
                "rho": self.rho.numpy(),
                "score": self.score.numpy(),
            }
        )

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` highest-scoring neurons (rows of `to_frame`); `ablate_neurons` accepts this frame."""
        return self.to_frame().head(positive_int(k, "k"))

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
                x=top["norm"], y=top["logit_var"], mode="markers+text", text=top["label"],
                textposition="top center", name=f"top {self.n_top}",
                marker=dict(color="red", size=9, symbol="circle-open"),
            )
        )
        fig.update_layout(
            title=f"Entropy-neuron candidates, layer {self.layer}, {self.model_name}",
            xaxis_title="||w_out||", yaxis_title="LogitVar(w_out)",
        )
        fig.update_yaxes(type="log")
        return fig


@torch.no_grad()
def find_entropy_neurons(
    model,
    *,
    layer: int = -1,
    null_dim: Optional[int] = None,
    n_top: Optional[int] = None,
    k: Optional[int] = None,
    top: Optional[int] = None,
) -> EntropyNeurons:
    """Rank a layer's MLP neurons by ||w_out|| / LogitVar, with the null-space fraction rho.

    null_dim: dimension of the unembedding's null space used for rho (default max(1, d_model // 64));
    n_top: how many candidates `neurons()` / `pairs()` / `plot()` take by default (10). See the
    module docstring for the effective unembedding (LayerNorm vs RMSNorm). `k=` and `top=` are
    deprecated names of `null_dim=` and `n_top=`.

    Example:
        >>> res = find_entropy_neurons(model, layer=-1)
        >>> res.neurons(3)                                 # doctest: +SKIP
        ['L11N584', 'L11N2378', 'L11N2123']                # GPT-2 Small
        >>> abl = ablate_neurons(model, tokens, res.neurons(3))  # doctest: +SKIP
    """
    model = as_lnfree(model)
    layer = _mlp_layer(model, layer)
    null_dim = _deprecated_alias(null_dim, k, "null_dim", "k")
    n_top = positive_int(_deprecated_alias(n_top, top, "n_top", "top", default=10), "n_top")
    W_eff, centered = _readout(model)
    d = model.cfg.d_model
    r = d - 1 if centered else d  # dimension of the space the readout sees
    if null_dim is None:
        null_dim = max(1, d // 64)
    if isinstance(null_dim, bool) or not isinstance(null_dim, (int, np.integer)) or not 1 <= null_dim < r:
        raise ValueError(f"null_dim (null-space dimension) must be an int in [1, {r - 1}], got {null_dim!r}")
    null_dim = int(null_dim)
    basis = _centered_basis(d, centered, W_eff.device)  # [d, r]
    # left singular vectors of basis^T W_eff (the unembedding in the readout's coordinates)
    evals, evecs = torch.linalg.eigh(basis.T @ (W_eff @ W_eff.T) @ basis)  # ascending
    null = basis @ evecs[:, :null_dim]  # [d, null_dim]

    W_out = check_finite(model.blocks[layer].mlp.W_out.detach(), f"blocks.{layer}.mlp.W_out").double()
    if centered:
        W_out = W_out - W_out.mean(1, keepdim=True)
    norm = W_out.norm(dim=1)
    rho = (W_out @ null).norm(dim=1) / norm.clamp(min=1e-30)
    logit_var = _logit_var(W_out, W_eff)
    score = torch.where(norm > 0, norm / logit_var.clamp(min=1e-30), torch.zeros_like(norm))
    order = torch.argsort(score, descending=True, stable=True)
    norm, logit_var, rho, score, order, evals = (t.cpu() for t in (norm, logit_var, rho, score, order, evals))
    return EntropyNeurons(
        model_name=model_label(model), model_id=model_id(model),
        layer=layer, null_dim=null_dim, n_top=min(n_top, len(order)), centered=centered,
        neuron=order,
        norm=norm[order].float(), logit_var=logit_var[order].float(), rho=rho[order].float(),
        score=score[order].float(),
        singular_values=evals.clamp(min=0).sqrt().flip(0).float(),
        labels=tuple(f"L{layer}N{int(i)}" for i in order),
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


# ---- neuron references -----------------------------------------------------------------------
_REFERENCE_HELP = ("labels like 'L{l}N{n}', (layer, neuron) pairs, an EntropyNeurons result or its top() frame, "
                   "or bare indices together with layer=")


def _is_index(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _parse_references(neurons) -> tuple[list, list, Optional[str]]:
    """(layers, indices, source model name) from any accepted form; layer None = bare index."""
    if isinstance(neurons, EntropyNeurons):
        pairs = neurons.pairs()
        return [p[0] for p in pairs], [p[1] for p in pairs], neurons.model_name
    if isinstance(neurons, pd.DataFrame):
        if {"layer", "neuron"} <= set(neurons.columns):
            return neurons["layer"].tolist(), neurons["neuron"].tolist(), None
        if "label" in neurons.columns:
            neurons = neurons["label"].tolist()
        else:
            raise ValueError(f"a neurons frame needs 'layer' and 'neuron' (or 'label') columns, got {list(neurons.columns)}")
    if isinstance(neurons, (torch.Tensor, np.ndarray)):
        neurons = neurons.tolist()
    if isinstance(neurons, str) or _is_index(neurons):
        neurons = [neurons]
    if not isinstance(neurons, (list, tuple)):
        raise TypeError(f"neurons must be {_REFERENCE_HELP}; got {type(neurons).__name__}")
    layers, idx = [], []
    for item in neurons:
        if isinstance(item, str):
            m = _LABEL.fullmatch(item.strip())
            if m is None:
                raise ValueError(f"neuron label {item!r} is not of the form 'L{{layer}}N{{neuron}}', e.g. 'L2N646'")
            layers.append(int(m.group(1)))
            idx.append(int(m.group(2)))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(_is_index(v) for v in item):
            layers.append(int(item[0]))
            idx.append(int(item[1]))
        elif _is_index(item):
            layers.append(None)
            idx.append(int(item))
        else:
            raise TypeError(f"neurons: {item!r} is not a neuron reference; pass {_REFERENCE_HELP}")
    return layers, idx, None


def resolve_neurons(model: LNFreeTransformer, neurons, layer=None) -> tuple[int, tuple[int, ...], Optional[str]]:
    """(layer, neuron indices, source model name) for `neurons` of one MLP layer.

    Every reference must say its layer (label, pair, result) unless `layer=` is given; a
    reference whose layer differs from `layer=`, references to several layers, bare indices
    mixed with layered ones, out-of-range or duplicate indices are refused.
    """
    layers, idx, source = _parse_references(neurons)
    if not idx:
        raise ValueError("neurons must be a non-empty list of neuron references")
    bare = [i for i, l in zip(idx, layers) if l is None]
    if bare and len(bare) != len(idx):
        raise ValueError(f"neurons mixes bare indices {bare} with layered references; pass labels or "
                         "(layer, neuron) pairs for all of them")
    if bare and layer is None:
        last = model.cfg.n_layers - 1
        raise ValueError(
            f"neurons {bare} are bare indices, which do not say their layer; pass labels like "
            f"'L{last}N{bare[0]}', (layer, neuron) pairs such as [({last}, {bare[0]})], an EntropyNeurons result, "
            f"or layer= explicitly"
        )
    given = None if layer is None else _mlp_layer(model, layer)
    found = sorted({_mlp_layer(model, l, "neuron layer") for l in layers if l is not None})
    if len(found) > 1:
        raise ValueError(f"neurons lie in layers {found}; ablate_neurons ablates the neurons of one layer at a time")
    if found and given is not None and found[0] != given:
        raise ValueError(f"neurons are in layer {found[0]}, but layer={layer} was given")
    layer = found[0] if found else given
    d_mlp = model.blocks[layer].mlp.W_out.shape[0]
    bad = [n for n in idx if not 0 <= n < d_mlp]
    if bad:
        raise ValueError(f"neurons must be a non-empty list of indices in [0, {d_mlp - 1}] (d_mlp={d_mlp}); got {idx}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"neurons contains duplicates: {idx}")
    return layer, tuple(idx), source


# ---- ablation ------------------------------------------------------------------------------
_METRICS = ("entropy", "ce")
_EFFECTS = ("total", "direct")


def _check_metric(metric: str, effect: str) -> tuple[int, int]:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if effect not in _EFFECTS:
        raise ValueError(f"effect must be one of {_EFFECTS}, got {effect!r}")
    return _METRICS.index(metric), _EFFECTS.index(effect)


def _frac(d: np.ndarray, t: np.ndarray) -> float:
    """1 - |mean direct| / |mean total|; nan where the total is exactly 0."""
    t_mean = abs(t.mean())
    return 1.0 - abs(d.mean()) / t_mean if t_mean > 0 else float("nan")


@result
class NeuronAblation(Result):
    """Mean-ablation effects of single neurons or cumulative sets of one MLP layer, total vs direct.

    sets: the ablated neuron sets (one per row of the tensors below); labels: "L{l}N{a}+{b}...".
    mean_activation: [n_neurons] the activation each of `neurons` was set to (hook_post mean over
        the real tokens, or the `means=` given).
    Per prompt (mean over its real predictions), nats:
        clean_entropy, clean_ce: [prompt]; entropy_total, entropy_direct, ce_total, ce_direct:
        [set, prompt] change (ablated - clean) with the final norm scale recomputed (total) or
        frozen at the clean per-token value (direct).
    Per token (every prediction whose position and label are real, row-major):
        token_delta: [set, metric (entropy, ce), effect (total, direct), token];
        token_clean: [metric, token]; token_prompt, token_position: [token] its prompt and its
        position counted from the row's first real token. See `per_token`.
    ln_final_frozen: False when the model has no live/frozen final norm (direct == total).
    neurons_from: the model an `EntropyNeurons` passed as `neurons` came from (None otherwise).
    """

    _headline = ("relative_change", "ln_mediated_fraction")

    model_name: str
    model_id: str
    layer: int
    neurons: tuple[int, ...]
    sets: tuple[tuple[int, ...], ...]
    labels: tuple[str, ...]
    cumulative: bool
    ln_final_frozen: bool
    neurons_from: Optional[str]
    n_boot: int
    level: float
    seed: int
    n_prompts: int
    n_tokens: int
    padded: bool
    mean_activation: Float[torch.Tensor, "n_neurons"]
    clean_entropy: Float[torch.Tensor, "prompt"]
    clean_ce: Float[torch.Tensor, "prompt"]
    entropy_total: Float[torch.Tensor, "set prompt"]
    entropy_direct: Float[torch.Tensor, "set prompt"]
    ce_total: Float[torch.Tensor, "set prompt"]
    ce_direct: Float[torch.Tensor, "set prompt"]
    token_delta: Float[torch.Tensor, "set 2 2 token"]
    token_clean: Float[torch.Tensor, "2 token"]
    token_prompt: Int[torch.Tensor, "token"]
    token_position: Int[torch.Tensor, "token"]

    def _boot(self) -> dict:
        return dict(n_boot=self.n_boot, level=self.level, seed=self.seed)

    def _delta(self, metric: str, effect: str) -> torch.Tensor:
        _check_metric(metric, effect)
        return getattr(self, f"{metric}_{effect}")

    def _index(self, i) -> int:
        if isinstance(i, str):
            if i not in self.labels:
                raise ValueError(f"unknown set {i!r}; labels are {list(self.labels)}")
            return self.labels.index(i)
        n = len(self.sets)
        if not _is_index(i) or not -n <= i < n:
            raise ValueError(f"set index must be an int in [{-n}, {n - 1}] or a label, got {i!r}")
        return int(i) % n

    def references(self, i: Union[int, str] = -1) -> list[str]:
        """Labels ("L{layer}N{neuron}") of the neurons of set `i` (default: the last)."""
        return [f"L{self.layer}N{n}" for n in self.sets[self._index(i)]]

    def per_token(self, i: Union[int, str] = -1, metric: str = "entropy", effect: str = "total"
                  ) -> Float[torch.Tensor, "token"]:
        """Per-token change of `metric` (nats) when ablating set `i`: one value per real prediction,
        aligned with `token_prompt` / `token_position` (e.g. for medians and IQRs of |dH|)."""
        m, e = _check_metric(metric, effect)
        return self.token_delta[self._index(i), m, e]

    def change(self, i: Union[int, str] = -1, metric: str = "entropy", effect: str = "total") -> Estimate:
        """Mean per-prompt change of `metric` when ablating set `i`, bootstrap CI over prompts."""
        return bootstrap(self._delta(metric, effect)[self._index(i)], **self._boot())

    def relative_change(self, i: Union[int, str] = -1, metric: str = "entropy", effect: str = "total") -> Estimate:
        """100 * mean change / mean clean value (%), paired bootstrap over prompts."""
        clean = self.clean_entropy if metric == "entropy" else self.clean_ce
        delta = self._delta(metric, effect)[self._index(i)]
        return bootstrap(delta, lambda a, b: 100.0 * a.mean() / b.mean(), paired=clean, **self._boot())

    def ln_mediated_fraction(self, i: Union[int, str] = -1, metric: str = "entropy") -> Estimate:
        """1 - |mean direct| / |mean total| (paired bootstrap CI); nan where the total is exactly 0.

        Near 1: the effect goes through the final norm's scale (entropy neurons). Negative when
        the norm pathway counteracts the direct effect; unstable (wide CI) when the total is near 0.
        """
        i = self._index(i)
        direct, total = self._delta(metric, "direct")[i], self._delta(metric, "total")[i]
        return bootstrap(direct, _frac, paired=total, **self._boot())

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` sets with the largest |mean total entropy change| (point values; CIs in `to_frame`).

        Columns: rank, set, n_ablated, entropy_change_total, entropy_change_direct,
        relative_entropy_change_total_%, ln_mediated_fraction_entropy, ce_change_total.
        """
        k = positive_int(k, "k")
        h0 = float(self.clean_entropy.double().mean())
        rows = []
        for i, label in enumerate(self.labels):
            t, d = self.entropy_total[i].double().numpy(), self.entropy_direct[i].double().numpy()
            rows.append({"set": label, "n_ablated": len(self.sets[i]), "entropy_change_total": t.mean(),
                         "entropy_change_direct": d.mean(), "relative_entropy_change_total_%": 100 * t.mean() / h0,
                         "ln_mediated_fraction_entropy": _frac(d, t),
                         "ce_change_total": float(self.ce_total[i].double().mean())})
        df = pd.DataFrame(rows)
        order = np.argsort(-df["entropy_change_total"].abs().to_numpy(), kind="stable")
        df = df.iloc[order[:k]].reset_index(drop=True)
        df.insert(0, "rank", np.arange(len(df)))
        return df

    def to_frame(self) -> pd.DataFrame:
        """Long format: set, n_ablated, metric (entropy/ce), quantity, value, low, high, n, level.

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
                    "clean": bootstrap(clean, **self._boot()),
                }
                for quantity, est in ests.items():
                    rows.append({"set": label, "n_ablated": len(self.sets[i]), "metric": metric,
                                 "quantity": quantity, **est.to_dict()})
        return pd.DataFrame(rows)

    def plot(self):
        """Bars of the relative entropy and CE change (%), total vs direct, with CIs."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        df = self.to_frame()
        fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy", "cross-entropy"))
        for col, metric in enumerate(_METRICS, start=1):
            for effect, color in (("total", "#EF553B"), ("direct", "#636EFA")):
                sub = df[(df.metric == metric) & (df.quantity == f"relative_{effect}_%")]
                fig.add_trace(
                    go.Bar(
                        x=sub["set"], y=sub["value"], name=effect, marker_color=color, showlegend=col == 1,
                        error_y=_error_bars(sub),
                    ),
                    row=1, col=col,
                )
            fig.update_xaxes(title_text="ablated neurons", row=1, col=col)
        fig.update_yaxes(title_text="entropy change (%)", row=1, col=1)
        fig.update_yaxes(title_text="CE change (%)", row=1, col=2)
        fig.update_layout(barmode="group", legend_title_text="effect",
                          title=f"Mean ablation of layer-{self.layer} neurons, {self.model_name}")
        return fig


def _error_bars(sub: pd.DataFrame) -> dict:
    """Asymmetric error bars from low/high columns (none where the CI is undefined, n < 2)."""
    return dict(type="data", symmetric=False, array=(sub["high"] - sub["value"]).fillna(0),
                arrayminus=(sub["value"] - sub["low"]).fillna(0))


def _check_means(means, n: int) -> torch.Tensor:
    if isinstance(means, (list, tuple, np.ndarray)):
        means = torch.as_tensor(np.asarray(means, dtype=np.float64))
    if not isinstance(means, torch.Tensor) or means.is_complex() or not means.is_floating_point():
        raise TypeError(f"means must be a float tensor [n_neurons] of activations, got {type(means).__name__}")
    if tuple(means.shape) != (n,):
        raise ValueError(f"means must have shape ({n},), one value per neuron, got {tuple(means.shape)}")
    return check_finite(means.detach().float().cpu(), "means")


@torch.no_grad()
def _mean_activations(model, tokens, mask, layer, neurons, batch_size, progress) -> torch.Tensor:
    """Mean of hook_post[..., neurons] over every real token (runs only up to `layer`)."""
    total = torch.zeros(len(neurons), dtype=torch.float64)
    count = 0
    idx = list(neurons)
    for sl in batches(tokens.shape[0], batch_size, enabled=progress, desc="mean activations"):
        batch = tokens[sl].to(model.cfg.device)
        sub = None if mask is None else mask[sl].to(batch.device)
        seen = {}

        def record(act, hook):
            seen["act"] = act[..., idx].detach().double()

        model.run_with_hooks(batch, stop_at_layer=layer + 1, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", record)],
                             **forward_kwargs(model, batch, sub))
        act = seen["act"]
        w = torch.ones(act.shape[:2], dtype=torch.float64, device=act.device) if sub is None else sub.double()
        check_finite(act[w.bool()], f"blocks.{layer}.mlp.hook_post activations of the ablated neurons")
        total.add_((act * w[..., None]).sum((0, 1)).cpu())
        count += int(w.sum())
    return (total / count).float()


def _clean_run(model, batch, fwd, layer, neurons, freeze, valid):
    """Clean forward pass caching the neurons' activations, the layer's resid_post and (when
    `freeze`) the final norm scale. Returns (cache, per-token entropy, per-token CE)."""
    cache = {}

    def save(name, cols=None):
        def hook(act, hook):
            cache[name] = (act if cols is None else act[..., cols]).clone()

        return hook

    hooks = [(f"blocks.{layer}.mlp.hook_post", save("post", list(neurons))),
             (f"blocks.{layer}.hook_resid_post", save("resid"))]
    if freeze:
        hooks.append((model.site_hook("ln_final"), save("scale")))
    logits = model.run_with_hooks(batch, fwd_hooks=hooks, **fwd)
    if freeze and "scale" not in cache:
        raise RuntimeError(f"ln_final's scale hook did not fire although ln_final is {model.ln_mode('ln_final')!r}")
    h0, ce0, _, _ = next_token_stats(logits, batch, valid)
    return cache, h0, ce0


def _ablated_run(model, batch, fwd, cache, layer, neurons, ablated, means, valid) -> dict:
    """Per-token entropy and CE with `ablated` mean-ablated: {(metric, effect): [batch, pos-1]}.

    The rest of the model runs from the edited resid_post (`start_at_layer`); mlp_out is linear
    in hook_post, so adding shift @ W_out is exactly the hooked ablation. Direct: the final norm
    scale is replaced by the clean per-token value; without a final norm scale, direct = total.
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
        hooks = [] if effect == "total" else [(model.site_hook("ln_final"), lambda act, hook: cache["scale"])]
        logits = model.run_with_hooks(resid, start_at_layer=layer + 1, fwd_hooks=hooks, **fwd)
        out[("entropy", effect)], out[("ce", effect)], _, _ = next_token_stats(logits, batch, valid)
        del logits
    return out


@torch.no_grad()
def ablate_neurons(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    neurons,
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    layer: Optional[int] = None,
    cumulative: bool = False,
    means: Optional[Float[torch.Tensor, "n_neurons"]] = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> NeuronAblation:
    """Mean-ablate neurons of one MLP layer; change in entropy and CE, total vs direct.

    neurons: labels ("L11N584"), (layer, neuron) pairs, an `EntropyNeurons` result (its `n_top`
    best) or its `top()` frame; bare indices only with `layer=`. With `cumulative=True` the sets
    are the first 1, 2, ..., n neurons together, else one per neuron. means: the activations to
    ablate to (default: the mean over every real token of `tokens`). `tokens` may be a
    `TokenBatch` or come with `attention_mask=`: padded positions are excluded everywhere.

    Two streaming passes: mean activations, then per batch one clean forward pass (hooks: the
    layer's hook_post and hook_resid_post, the final norm scale) and, per set, the rest of the
    model from the ablated residual (`start_at_layer`) with the final norm scale recomputed
    (total) and frozen at the clean per-token value (direct).

    Example:
        >>> ents = find_entropy_neurons(model)
        >>> abl = ablate_neurons(model, tokens, ents.neurons(3), cumulative=True)
        >>> abl.relative_change(-1, "entropy", "total")    # doctest: +SKIP
        >>> abl.per_token(-1, "entropy", "total").abs().median()   # doctest: +SKIP
        >>> ablate_neurons(model, tokens, [(11, 584), (11, 2123)])  # doctest: +SKIP
    """
    model = as_lnfree(model)
    layer, neurons, source = resolve_neurons(model, neurons, layer)
    tokens, mask = resolve_batch(model, tokens, attention_mask, min_pos=2)
    batch_size = positive_int(batch_size, "batch_size")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    if not isinstance(cumulative, bool):
        raise TypeError(f"cumulative must be a bool, got {type(cumulative).__name__}")
    if model.cfg.positional_embedding_type == "shortformer":
        raise ValueError("ablate_neurons does not support shortformer positional embeddings")
    sets = tuple(neurons[: i + 1] for i in range(len(neurons))) if cumulative else tuple((n,) for n in neurons)

    if means is None:
        means = _mean_activations(model, tokens, mask, layer, neurons, batch_size, progress)
    else:
        means = _check_means(means, len(neurons))
    freeze = norm_site(model, "ln_final").applied  # a final norm scale to hold at its clean value
    valid_all = next_token_mask(mask)
    first = torch.zeros(tokens.shape[0], dtype=torch.long) if mask is None else mask.int().argmax(1).cpu()
    n_set = len(sets)
    prompt_clean, prompt_delta = [], []  # [2, b] and [set, 2, 2, b] per batch
    tok_clean, tok_delta, tok_prompt, tok_pos = [], [], [], []
    for sl in batches(tokens.shape[0], batch_size, enabled=progress, desc="ablations"):
        batch = tokens[sl].to(model.cfg.device)
        sub = None if mask is None else mask[sl].to(batch.device)
        fwd = forward_kwargs(model, batch, sub)
        valid = torch.ones(batch.shape[0], batch.shape[1] - 1, dtype=torch.bool, device=batch.device) \
            if valid_all is None else valid_all[sl].to(batch.device)
        w = valid.double()
        cache, h0, ce0 = _clean_run(model, batch, fwd, layer, neurons, freeze, valid)
        base = torch.stack([h0, ce0]).double()  # [2, b, pos-1]
        deltas = torch.zeros(n_set, 2, 2, *base.shape[1:], dtype=torch.float64, device=base.device)
        for s_i, s in enumerate(sets):
            for (metric, effect), value in _ablated_run(model, batch, fwd, cache, layer, neurons, s, means,
                                                        valid).items():
                m = _METRICS.index(metric)
                deltas[s_i, m, _EFFECTS.index(effect)] = value.double() - base[m]
        del cache
        prompt_clean.append(((base * w).sum(-1) / w.sum(-1)).cpu())
        prompt_delta.append(((deltas * w).sum(-1) / w.sum(-1)).cpu())
        vc = valid.cpu()
        tok_clean.append(base.cpu()[:, vc].float())
        tok_delta.append(deltas.cpu()[..., vc].float())
        rows = torch.arange(sl.start, sl.stop)[:, None].expand_as(vc)
        pos = torch.arange(vc.shape[1])[None] - first[sl][:, None]
        tok_prompt.append(rows[vc])
        tok_pos.append(pos.expand_as(vc)[vc])
    clean = torch.cat(prompt_clean, -1).float()  # [2, prompt]
    delta = torch.cat(prompt_delta, -1).float()  # [set, 2, 2, prompt]
    token_prompt = torch.cat(tok_prompt)
    return NeuronAblation(
        model_name=model_label(model), model_id=model_id(model),
        layer=layer, neurons=neurons, sets=sets,
        labels=tuple(f"L{layer}N" + "+".join(str(n) for n in s) for s in sets),
        cumulative=cumulative, ln_final_frozen=freeze, neurons_from=source,
        n_boot=n_boot, level=level, seed=seed,
        n_prompts=int(tokens.shape[0]), n_tokens=int(token_prompt.numel()), padded=mask is not None,
        mean_activation=means,
        clean_entropy=clean[0], clean_ce=clean[1],
        entropy_total=delta[:, 0, 0], entropy_direct=delta[:, 0, 1],
        ce_total=delta[:, 1, 0], ce_direct=delta[:, 1, 1],
        token_delta=torch.cat(tok_delta, -1), token_clean=torch.cat(tok_clean, -1),
        token_prompt=token_prompt, token_position=torch.cat(tok_pos),
    )


# ---- one model, all of it; two models compared ------------------------------------------------
@result
class ConfidenceAnalysis(Result):
    """One model's entropy-neuron candidates, their (cumulative) ablation and its calibration."""

    _headline = ("entropy_change", "ece")

    model_name: str
    model_id: str
    neurons: EntropyNeurons
    ablation: NeuronAblation
    calibration: Calibration
    labels: tuple[str, ...]

    def entropy_change(self) -> Estimate:
        """Relative total entropy change (%) when ablating the last set (all neurons, if cumulative)."""
        return self.ablation.relative_change(-1, "entropy", "total")

    def ece(self) -> Estimate:
        return self.calibration.ece

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` best entropy-neuron candidates (`EntropyNeurons.top`)."""
        return self.neurons.top(k)

    def to_frame(self) -> pd.DataFrame:
        """Long format: section (ablation/calibration), item, metric, quantity, value, low, high, n."""
        a = self.ablation.to_frame().rename(columns={"set": "item"})
        a.insert(0, "section", "ablation")
        c = self.calibration.summary().assign(item="calibration", quantity="value", section="calibration")
        df = pd.concat([a, c], ignore_index=True).assign(model=self.model_name)
        cols = ["model", "section", "item", "metric", "quantity", "value", "low", "high", "n"]
        return df[cols + [c for c in df.columns if c not in cols]]

    def plot(self):
        """Entropy change per ablation set (total vs direct) and the reliability diagram."""
        return _confidence_figure([(self.model_name, self)], f"Confidence regulation, {self.model_name}")


def _confidence_figure(items, title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy change on mean ablation", "reliability diagram"))
    colors = ("#EF553B", "#636EFA")
    for (name, res), color in zip(items, colors):
        df = res.ablation.to_frame()
        for effect, pattern in (("total", ""), ("direct", "/")):
            sub = df[(df.metric == "entropy") & (df.quantity == f"relative_{effect}_%")]
            fig.add_trace(
                go.Bar(x=[f"{name}: {s}" for s in sub["set"]], y=sub["value"], name=f"{name} {effect}",
                       marker=dict(color=color, pattern_shape=pattern), error_y=_error_bars(sub)),
                row=1, col=1,
            )
        fig.add_trace(res.calibration._trace(f"{name} (ECE {res.calibration.ece.value:.4f})", color), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash")), row=1, col=2)
    fig.update_xaxes(title_text="ablated neurons", row=1, col=1)
    fig.update_yaxes(title_text="entropy change (%)", row=1, col=1)
    fig.update_xaxes(title_text="top-1 confidence", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="top-1 accuracy", range=[0, 1], row=1, col=2)
    fig.update_layout(barmode="group", title=title)
    return fig


def _relative(x: np.ndarray) -> float:  # x: [prompt, 2] = (delta, clean)
    return 100.0 * x[:, 0].mean() / x[:, 1].mean()


@result
class ConfidenceComparison(Result):
    """Two models' `ConfidenceAnalysis` on the same tokens (`a`, `b` in `names` order), with
    paired differences b - a (`difference`): bootstrap CIs resample the same prompts in both."""

    _headline = ("ece_difference",)

    names: tuple[str, str]
    a: ConfidenceAnalysis
    b: ConfidenceAnalysis
    n_boot: int
    level: float
    seed: int
    labels: tuple[str, ...]

    @property
    def neurons(self) -> tuple[EntropyNeurons, EntropyNeurons]:
        return self.a.neurons, self.b.neurons

    @property
    def ablations(self) -> tuple[NeuronAblation, NeuronAblation]:
        return self.a.ablation, self.b.ablation

    @property
    def calibrations(self) -> tuple[Calibration, Calibration]:
        return self.a.calibration, self.b.calibration

    def _boot(self) -> dict:
        return dict(n_boot=self.n_boot, level=self.level, seed=self.seed)

    def ece_difference(self) -> Estimate:
        """ECE of b minus ECE of a, paired bootstrap over prompts."""
        from lnfree.analysis.calibration import _ece

        xa, xb = (c.per_prompt_bins.double().numpy() for c in self.calibrations)
        return bootstrap(xa, lambda a, b: _ece(b) - _ece(a), paired=xb, **self._boot())

    def _pairs(self):
        """(item, metric, a value, b value, samples a, samples b, statistic) per compared number."""
        from lnfree.analysis.calibration import _accuracy, _ece

        ca, cb = self.calibrations
        yield ("calibration", "mean_entropy", ca.mean_entropy.value, cb.mean_entropy.value,
               ca.per_prompt_entropy.double().numpy(), cb.per_prompt_entropy.double().numpy(),
               lambda x: float(x.mean()))
        for metric, fn in (("ece", _ece), ("accuracy_top1", _accuracy)):
            yield ("calibration", metric, getattr(ca, metric).value, getattr(cb, metric).value,
                   ca.per_prompt_bins.double().numpy(), cb.per_prompt_bins.double().numpy(), fn)
        aa, ab = self.ablations
        for i in range(min(len(aa.sets), len(ab.sets))):
            item = _set_item(i, aa, ab)
            xs = [np.stack([x.entropy_total[i].double().numpy(), x.clean_entropy.double().numpy()], 1) for x in (aa, ab)]
            yield (item, "entropy_change_total_%", _relative(xs[0]), _relative(xs[1]), xs[0], xs[1], _relative)
            xs = [np.stack([x.entropy_direct[i].double().numpy(), x.entropy_total[i].double().numpy()], 1)
                  for x in (aa, ab)]
            frac = lambda x: _frac(x[:, 0], x[:, 1])  # noqa: E731
            yield (item, "ln_mediated_fraction_entropy", frac(xs[0]), frac(xs[1]), xs[0], xs[1], frac)

    def difference(self) -> pd.DataFrame:
        """b - a per number: item, metric, a, b, value (= b - a), low, high, n (paired bootstrap over prompts).

        Calibration: mean_entropy, ece, accuracy_top1; per ablation set index: the relative total
        entropy change (%) and the LN-mediated fraction of the entropy change.
        """
        rows = []
        for item, metric, va, vb, xa, xb, fn in self._pairs():
            est = bootstrap(xa, lambda a, b, fn=fn: fn(b) - fn(a), paired=xb, **self._boot())
            rows.append({"item": item, "metric": metric, "a": va, "b": vb, **est.to_dict()})
        return pd.DataFrame(rows)

    def differences(self) -> pd.DataFrame:
        """Deprecated name of `difference`."""
        warnings.warn("ConfidenceComparison.differences() is deprecated, use .difference()", DeprecationWarning,
                      stacklevel=2)
        return self.difference()

    def to_frame(self) -> pd.DataFrame:
        """Both models' `ConfidenceAnalysis.to_frame()`, stacked (column `model` = the names)."""
        return pd.concat([r.to_frame().assign(model=n) for n, r in zip(self.names, (self.a, self.b))],
                         ignore_index=True)

    def plot(self):
        """Left: entropy change (%) per ablation set, total and direct, per model. Right: reliability."""
        return _confidence_figure(list(zip(self.names, (self.a, self.b))),
                                  f"Confidence regulation: {self.names[0]} vs {self.names[1]}")


def confidence_analysis(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    neurons=None,
    layer: Optional[int] = None,
    n_top: int = 3,
    null_dim: Optional[int] = None,
    n_bins: int = 15,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> ConfidenceAnalysis:
    """Entropy neurons (layer `layer`, default the last), the cumulative ablation of the `n_top`
    best (or of `neurons`) and calibration, for one model.

    Example:
        >>> res = confidence_analysis(model, tokens)          # doctest: +SKIP
        >>> res.entropy_change(), res.ece()                    # doctest: +SKIP
    """
    model = as_lnfree(model)
    if neurons is not None:  # detect in the layer the given neurons live in
        layer, _, _ = resolve_neurons(model, neurons, layer)
    found = find_entropy_neurons(model, layer=-1 if layer is None else layer, null_dim=null_dim, n_top=n_top)
    if neurons is None:
        neurons = found.neurons()
    boot = dict(n_boot=n_boot, level=level, seed=seed)
    abl = ablate_neurons(model, tokens, neurons, attention_mask=attention_mask, layer=layer, cumulative=True,
                         batch_size=batch_size, progress=progress, **boot)
    cal = calibration(model, tokens, attention_mask=attention_mask, n_bins=n_bins, batch_size=batch_size,
                      progress=progress, **boot)
    return ConfidenceAnalysis(model_name=model_label(model), model_id=model_id(model), neurons=found,
                              ablation=abl, calibration=cal, labels=abl.labels)


def compare_confidence(
    model_a,
    model_b,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    names: Optional[tuple[str, str]] = None,
    neurons=None,
    layer: Optional[int] = None,
    n_top: Optional[int] = None,
    null_dim: Optional[int] = None,
    n_bins: int = 15,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    top: Optional[int] = None,
    k: Optional[int] = None,
) -> ConfidenceComparison:
    """Entropy neurons, their cumulative ablation (total vs direct) and calibration of two models.

    Each model's own `n_top` (default 3) best entropy neurons of `layer` (default the last) are
    ablated cumulatively, unless `neurons` is given (labels, pairs, an `EntropyNeurons`, ...):
    then the same neurons are ablated in both, e.g. an LN model's neurons in its fine-tuned
    LN-free twin. Names come from the models (name and norm state) unless `names=` is given.
    `top=` and `k=` are deprecated names of `n_top=` and `null_dim=`.

    Example:
        >>> cmp = compare_confidence(ln_model, ln_free_model, tokens)   # doctest: +SKIP
        >>> cmp.difference(); cmp.plot()                               # doctest: +SKIP
    """
    model_a, model_b = as_lnfree(model_a, "model_a"), as_lnfree(model_b, "model_b")
    check_same_vocab(model_a, model_b)
    names = compare_names(model_a, model_b, names)
    n_top = positive_int(_deprecated_alias(n_top, top, "n_top", "top", default=3), "n_top")
    null_dim = _deprecated_alias(null_dim, k, "null_dim", "k")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    for m, which in ((model_a, "model_a"), (model_b, "model_b")):
        resolve_batch(m, tokens, attention_mask, name=f"tokens (for {which})", min_pos=2)
    if neurons is not None:  # validate once for both, before any forward pass
        for m in (model_a, model_b):
            resolve_neurons(m, neurons, layer)
    kw = dict(attention_mask=attention_mask, neurons=neurons, layer=layer, n_top=n_top, null_dim=null_dim,
              n_bins=n_bins, batch_size=batch_size, n_boot=n_boot, level=level, seed=seed, progress=progress)
    a, b = confidence_analysis(model_a, tokens, **kw), confidence_analysis(model_b, tokens, **kw)
    return ConfidenceComparison(names=names, a=a, b=b, n_boot=n_boot, level=level, seed=seed,
                                labels=_difference_labels(a.ablation, b.ablation))


def _set_item(i: int, aa: NeuronAblation, ab: NeuronAblation) -> str:
    return f"set {i}: {aa.labels[i]} | {ab.labels[i]}"


def _difference_labels(aa: NeuronAblation, ab: NeuronAblation) -> tuple[str, ...]:
    """The rows of `ConfidenceComparison.difference`, as "item / metric"."""
    out = [f"calibration / {m}" for m in ("mean_entropy", "ece", "accuracy_top1")]
    for i in range(min(len(aa.sets), len(ab.sets))):
        out += [f"{_set_item(i, aa, ab)} / {m}" for m in ("entropy_change_total_%", "ln_mediated_fraction_entropy")]
    return tuple(out)
