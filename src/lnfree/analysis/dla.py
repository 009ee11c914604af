"""Direct logit attribution (DLA) and the exact direct effect (DE) of model components.

For a component c (a head, a layer output, a neuron, ...) writing into the final residual
stream r (the input of ``ln_final``), with u the unembedding direction of the target
(``W_U[:, target]``, minus ``W_U[:, other]`` for a logit difference):

- ``DLA(c) = (c - mean(c)) / scale * w_lnf . u`` with ``scale`` the cached ``ln_final.hook_scale``
  of this prompt and position. For an LN-free model (``ln_final`` removed) the scale is 1 and
  ``ln_final`` is the identity: ``DLA(c) = c . u`` with the folded ``W_U``. ``ln_final.b`` and
  ``b_U`` belong to the separate ``"bias"`` component.
- ``DE(c) = logit(r) - logit(r - c)``, with ``ln_final`` recomputed on ``r - c``.
- ``NMAE = mean|DLA - DE| / mean|DE| x 100``.

DLA is a linearisation of ``ln_final`` around r, so DLA == DE exactly when ``ln_final`` is linear
on the path (frozen or removed) and not otherwise. DE is computed for every component at once:
the model runs once per batch, up to ``ln_final``, with hooks that keep only the activations the
components need at the chosen positions; ``ln_final`` is then re-applied to ``r - C`` for blocks of
components, and only the needed columns of ``W_U`` are read (never the full vocabulary).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer

from lnfree.model import LNFreeTransformer
from lnfree.stats import Estimate, bootstrap

COMPONENT_KINDS = ("heads", "layers", "neurons", "all")
# Elements of one [components x tokens x d_model] block when re-applying ln_final (bounds memory).
_BLOCK_ELEMENTS = 1 << 22
# Arithmetic after the forward pass: DE is a difference of two logits, and float32 cancellation
# would otherwise hide small effects (an LN-free model's DLA - DE would be ~1e-7, not ~1e-15).
_DTYPE = torch.float64

TargetsArg = Union[None, int, torch.Tensor, Sequence]
PosArg = Union[None, int, str, torch.Tensor]


# ---- results ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DLAResult:
    """Direct logit attribution and exact direct effect per component.

    Attributes:
        dla: [component, prompt] (or [component, prompt, position] when ``pos="all"``).
        direct_effect: same shape as ``dla``: logit(r) - logit(r - c), ln_final recomputed.
        logit: [prompt] (or [prompt, position]): the model's target logit (or logit difference).
        labels: one label per component (TransformerLens style, plus ``"bias"``).
        positions: [prompt] positions used (non-negative), or None when ``pos="all"``.
        components, layer: the settings used.
        targets: "next-token", "token" or "logit-diff".
        ln_final_mode: "live", "frozen" or "removed" (the model's ln_final when this was run).
    """

    dla: Float[torch.Tensor, "component prompt *pos"]
    direct_effect: Float[torch.Tensor, "component prompt *pos"]
    logit: Float[torch.Tensor, "prompt *pos"]
    labels: tuple[str, ...]
    positions: Optional[Int[torch.Tensor, "prompt"]]
    components: str
    layer: Optional[int]
    targets: str
    ln_final_mode: str

    # -- NMAE ---------------------------------------------------------------------------------
    def _per_prompt(self, x: torch.Tensor) -> np.ndarray:
        """[prompt, component, positions] float64 array: prompts are the bootstrap unit."""
        a = x.detach().double().cpu().numpy()
        a = a if a.ndim == 3 else a[:, :, None]
        return np.ascontiguousarray(a.transpose(1, 0, 2))

    def nmae(
        self, *, aggregate: str = "pooled", n_boot: int = 1000, level: float = 0.95, seed: int = 0
    ) -> tuple[Estimate, pd.Series]:
        """NMAE (%) overall, with a bootstrap CI over prompts, and per component.

        Per component: ``100 * mean|DLA - DE| / mean|DE|`` over prompts (and positions).
        Overall, ``aggregate="pooled"`` pools every component and prompt into one ratio;
        ``aggregate="mean"`` averages the per-component values. The CI resamples prompts
        (paired: errors and effects of the same prompts). Components whose mean |DE| is 0
        give NaN.

        Example:
            >>> overall, per_component = res.nmae()          # doctest: +SKIP
            >>> print(overall)                              # doctest: +SKIP
            49.07 [29.92, 66.1]
        """
        return self._nmae(list(range(len(self.labels))), aggregate, n_boot, level, seed), self._per_component()

    def _per_component(self) -> pd.Series:
        err = (self.dla - self.direct_effect).abs().double()
        de = self.direct_effect.abs().double()
        dims = tuple(range(1, err.ndim))
        with np.errstate(invalid="ignore", divide="ignore"):
            vals = 100 * err.mean(dims).numpy() / de.mean(dims).numpy()
        return pd.Series(vals, index=list(self.labels), name="nmae")

    def _nmae(self, rows: list[int], aggregate: str, n_boot: int, level: float, seed: int) -> Estimate:
        if aggregate not in ("pooled", "mean"):
            raise ValueError(f"aggregate must be 'pooled' or 'mean', got {aggregate!r}")
        err = self._per_prompt((self.dla - self.direct_effect).abs())[:, rows]
        de = self._per_prompt(self.direct_effect.abs())[:, rows]

        def pooled(e, d):
            return 100 * e.mean() / d.mean()

        def mean_of_components(e, d):
            return float(np.nanmean(100 * e.mean(axis=(0, 2)) / d.mean(axis=(0, 2))))

        stat = pooled if aggregate == "pooled" else mean_of_components
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return bootstrap(err, stat, paired=de, n_boot=n_boot, level=level, seed=seed)

    def nmae_frame(
        self, by: str = "layer", *, aggregate: str = "pooled", n_boot: int = 1000, level: float = 0.95, seed: int = 0
    ) -> pd.DataFrame:
        """NMAE (%) with bootstrap CIs per group: ``by="layer"`` (components grouped by layer;
        embed, pos_embed and bias are their own groups), ``"component"``, or ``"overall"``.

        Example:
            >>> res.nmae_frame("layer")     # doctest: +SKIP
              group   nmae    low   high  n
        """
        groups = self._groups(by)
        rows = []
        for name, idx in groups.items():
            est = self._nmae(idx, aggregate, n_boot, level, seed)
            rows.append({"group": name, "nmae": est.value, "low": est.low, "high": est.high, "n": est.n})
        return pd.DataFrame(rows)

    def _groups(self, by: str) -> dict[str, list[int]]:
        if by == "overall":
            return {"overall": list(range(len(self.labels)))}
        if by == "component":
            return {lab: [i] for i, lab in enumerate(self.labels)}
        if by == "layer":
            groups: dict[str, list[int]] = {}
            for i, lab in enumerate(self.labels):
                groups.setdefault(_group_of(lab), []).append(i)
            return groups
        raise ValueError(f"by must be 'layer', 'component' or 'overall', got {by!r}")

    # -- views --------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per component x prompt (x position).

        Columns: component, layer (group), prompt, [position], dla, direct_effect, logit.
        """
        k, n = self.dla.shape[:2]
        extra = self.dla.shape[2:]
        idx = np.indices(self.dla.shape).reshape(self.dla.ndim, -1)
        frame = {
            "component": np.asarray(self.labels, dtype=object)[idx[0]],
            "layer": np.asarray([_group_of(lab) for lab in self.labels], dtype=object)[idx[0]],
            "prompt": idx[1],
        }
        if extra:
            frame["position"] = idx[2]
        frame["dla"] = self.dla.reshape(-1).numpy()
        frame["direct_effect"] = self.direct_effect.reshape(-1).numpy()
        frame["logit"] = self.logit.expand(k, n, *extra).reshape(-1).numpy()
        return pd.DataFrame(frame)

    def top(self, k: int = 10, by: str = "direct_effect") -> pd.DataFrame:
        """The k components with the largest mean |``by``| ("direct_effect", "dla" or "error").

        Example:
            >>> res.top(5)                  # doctest: +SKIP
        """
        if by not in ("direct_effect", "dla", "error"):
            raise ValueError(f"by must be 'direct_effect', 'dla' or 'error', got {by!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        dims = tuple(range(1, self.dla.ndim))
        table = pd.DataFrame(
            {
                "component": list(self.labels),
                "mean_dla": self.dla.mean(dims).numpy(),
                "mean_direct_effect": self.direct_effect.mean(dims).numpy(),
                "mean_abs_error": (self.dla - self.direct_effect).abs().mean(dims).numpy(),
                "nmae": self._per_component().to_numpy(),
            }
        )
        key = {"direct_effect": self.direct_effect, "dla": self.dla, "error": self.dla - self.direct_effect}[by]
        order = np.argsort(-key.abs().mean(dims).numpy(), kind="stable")[:k]
        return table.iloc[order].reset_index(drop=True)

    def plot(self, kind: str = "scatter", max_points: int = 20000, title: Optional[str] = None):
        """Plotly figure: ``"scatter"`` of DLA against DE (one point per component x prompt x
        position, coloured by layer, with the y = x line), or ``"bar"`` of mean DLA and mean DE
        per component. Never shown implicitly.
        """
        import plotly.graph_objects as go

        if kind == "scatter":
            fig = go.Figure(_scatter_traces(self, max_points))
            fig.update_layout(xaxis_title="direct effect", yaxis_title="DLA", legend_title="layer")
        elif kind == "bar":
            dims = tuple(range(1, self.dla.ndim))
            fig = go.Figure(
                [
                    go.Bar(name="DLA", x=list(self.labels), y=self.dla.mean(dims).numpy()),
                    go.Bar(name="direct effect", x=list(self.labels), y=self.direct_effect.mean(dims).numpy()),
                ]
            )
            fig.update_layout(barmode="group", xaxis_title="component", yaxis_title="mean over prompts")
        else:
            raise ValueError(f"kind must be 'scatter' or 'bar', got {kind!r}")
        overall, _ = self.nmae(n_boot=200)
        fig.update_layout(title=title or f"DLA vs direct effect ({self.components}), NMAE {overall}%")
        return fig


@dataclass(frozen=True, eq=False)
class DLAComparison:
    """`direct_logit_attribution` of two models on the same prompts and targets.

    Attributes:
        a, b: the two `DLAResult`s.
        names: display names of the two models.
        table: NMAE (%) with CIs, overall and per layer, for each model (long format).
    """

    a: DLAResult
    b: DLAResult
    names: tuple[str, str]
    table: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """Columns: model, group ("overall" or a layer), nmae, low, high, n."""
        return self.table.copy()

    @property
    def nmae_difference(self) -> pd.Series:
        """NMAE of model a minus model b, per group (overall first)."""
        wide = self.table.pivot(index="group", columns="model", values="nmae")
        order = list(dict.fromkeys(self.table["group"]))
        return (wide[self.names[0]] - wide[self.names[1]]).reindex(order).rename("nmae_difference")

    def plot(self, max_points: int = 20000):
        """NMAE per layer for both models, then DLA vs DE scatter for each."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1, cols=3, subplot_titles=["NMAE per layer (%)", *(f"{n}: DLA vs DE" for n in self.names)]
        )
        for name in self.names:
            t = self.table[(self.table["model"] == name) & (self.table["group"] != "overall")]
            fig.add_trace(
                go.Scatter(
                    x=t["group"].astype(str), y=t["nmae"], mode="lines+markers", name=f"{name} NMAE",
                    error_y=dict(type="data", symmetric=False,
                                 array=(t["high"] - t["nmae"]).to_numpy(), arrayminus=(t["nmae"] - t["low"]).to_numpy()),
                ),
                row=1, col=1,
            )
        for col, res in ((2, self.a), (3, self.b)):
            for trace in _scatter_traces(res, max_points, showlegend=False):
                fig.add_trace(trace, row=1, col=col)
            fig.update_xaxes(title_text="direct effect", row=1, col=col)
            fig.update_yaxes(title_text="DLA", row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=1)
        return fig


# ---- public functions ------------------------------------------------------------------------
@torch.no_grad()
def direct_logit_attribution(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "prompt pos"],
    targets: TargetsArg = None,
    *,
    components: str = "heads",
    layer: Optional[int] = None,
    pos: PosArg = None,
    batch_size: int = 16,
    progress: bool = False,
) -> DLAResult:
    """DLA and exact direct effect of every component on a target logit (or logit difference).

    Args:
        model: an `LNFreeTransformer` (a plain HookedTransformer is wrapped, sharing weights).
        tokens: [prompt, pos] token ids.
        targets: a [prompt] tensor (or one int) of target token ids; a pair
            ``(target_ids, other_ids)`` for the logit difference target - other; or None for the
            next-token labels (``tokens[:, p + 1]`` at position p). With ``pos="all"`` targets may
            also be [prompt, pos].
        components: "heads" (``L{l}H{h}``), "layers" (``embed``, ``pos_embed``, ``{l}_attn_out``,
            ``{l}_mlp_out`` and ``bias``: everything else, so that DLAs sum to the logit for an
            LN-free model), "neurons" (``L{layer}N{n}``, needs ``layer``) or "all" (embed,
            pos_embed, every head, every MLP output, and ``bias``, which then holds the b_O's).
        layer: the MLP layer for ``components="neurons"``.
        pos: an int (negative counts from the end), "all", or a [prompt] tensor of positions.
            Default: -1 when targets are given, "all" (every position with a label) when not.
        batch_size: prompts per forward pass.
        progress: show a tqdm bar over batches.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=16,
        ...                               act_fn="gelu_new", normalization_type="LN")
        >>> model, tokens = LNFreeTransformer(cfg), torch.randint(0, 50, (4, 16))
        >>> res = direct_logit_attribution(model, tokens, targets=tokens[:, 0], components="heads")
        >>> res.dla.shape, res.labels[:2]   # [n_layers * n_heads, n_prompts], pos=-1
        (torch.Size([8, 4]), ('L0H0', 'L0H1'))
        >>> _ = model.estimate_ln_scales(tokens)
        >>> free = direct_logit_attribution(model.remove_ln(), tokens, tokens[:, 0], components="layers")
        >>> bool(torch.allclose(free.dla, free.direct_effect)), free.nmae()[0].value < 1e-6  # exact
        (True, True)
        >>> bool(torch.allclose(free.dla.sum(0), free.logit, atol=1e-4))  # components sum to the logit
        True
    """
    model = _as_lnfree(model)
    tokens = model._check_tokens(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layer = _check_components(model, components, layer)
    n_prompts, seq = tokens.shape
    next_token = targets is None
    positions, n_pos = _positions(pos, n_prompts, seq, next_token, targets)
    tgt, other, target_kind = _targets(model, tokens, targets, positions, n_pos)
    hooks = _hook_names(model, components, layer)
    ln = _FinalLN(model)

    from tqdm.auto import tqdm

    # Results go straight into buffers allocated once: small per-batch tensors kept alive across
    # batches would pin heap memory between the forward passes' temporaries and grow the RSS.
    per = 1 if n_pos is None else n_pos  # selected tokens per prompt
    labels = dla = de = logit = None
    scratch: dict[str, torch.Tensor] = {}
    for start in tqdm(range(0, n_prompts, batch_size), disable=not progress, desc="DLA"):
        stop = min(start + batch_size, n_prompts)
        b_idx, p_idx = _selection(start, stop, positions, n_pos, model.cfg.device)
        sel_t = tgt[start:stop].reshape(-1)
        sel_o = None if other is None else other[start:stop].reshape(-1)
        batch_labels, b_dla, b_de, b_logit = _run_batch(
            model, ln, tokens[start:stop], b_idx, p_idx, sel_t, sel_o, hooks, components, layer, scratch
        )
        if labels is None:
            labels = batch_labels
            dla, de = torch.empty(len(labels), n_prompts * per), torch.empty(len(labels), n_prompts * per)
            logit = torch.empty(n_prompts * per)
        cols = slice(start * per, stop * per)
        dla[:, cols], de[:, cols], logit[cols] = b_dla, b_de, b_logit
        del b_dla, b_de, b_logit

    shape = (n_prompts,) if n_pos is None else (n_prompts, n_pos)
    dla, de, logit = dla.reshape(len(labels), *shape), de.reshape(len(labels), *shape), logit.reshape(shape)
    return DLAResult(
        dla=dla, direct_effect=de, logit=logit, labels=tuple(labels),
        positions=None if positions is None else positions.cpu(), components=components, layer=layer,
        targets=target_kind, ln_final_mode=ln.mode,
    )


def compare_dla(
    model_a: HookedTransformer,
    model_b: HookedTransformer,
    tokens: Int[torch.Tensor, "prompt pos"],
    targets: TargetsArg = None,
    *,
    names: tuple[str, str] = ("LN", "LN-free"),
    aggregate: str = "pooled",
    n_boot: int = 1000,
    **kwargs,
) -> DLAComparison:
    """Run `direct_logit_attribution` on two models (e.g. original vs LN-free) and compare NMAE.

    The two models must share the vocabulary (d_vocab and, when both have one, the tokenizer).
    ``kwargs`` go to `direct_logit_attribution` (components, layer, pos, batch_size, progress).

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=16,
        ...                               act_fn="gelu_new", normalization_type="LN")
        >>> ln_model, tokens = LNFreeTransformer(cfg), torch.randint(0, 50, (8, 16))
        >>> _ = ln_model.estimate_ln_scales(tokens)
        >>> ln_free = LNFreeTransformer(cfg)
        >>> _ = ln_free.load_state_dict(ln_model.state_dict())
        >>> ln_free = ln_free.remove_ln(scales={s: ln_model.ln_scale(s) for s in ln_model.ln_sites})
        >>> cmp = compare_dla(ln_model, ln_free, tokens, n_boot=100)     # next-token targets, every position
        >>> list(cmp.to_frame().query("group == 'overall'").model)
        ['LN', 'LN-free']
        >>> fig = cmp.plot()
    """
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"names must be two strings, got {names!r}")
    if names[0] == names[1]:
        raise ValueError(f"names must differ, got {names!r}")
    _check_same_vocab(model_a, model_b)
    a = direct_logit_attribution(model_a, tokens, targets, **kwargs)
    b = direct_logit_attribution(model_b, tokens, targets, **kwargs)
    frames = []
    for name, res in zip(names, (a, b)):
        for by in ("overall", "layer"):
            f = res.nmae_frame(by, aggregate=aggregate, n_boot=n_boot)
            frames.append(f.assign(model=name))
    table = pd.concat(frames, ignore_index=True)[["model", "group", "nmae", "low", "high", "n"]]
    return DLAComparison(a=a, b=b, names=tuple(names), table=table)


# ---- model / LN helpers ----------------------------------------------------------------------
def _as_lnfree(model) -> LNFreeTransformer:
    if isinstance(model, LNFreeTransformer):
        out = model
    elif isinstance(model, HookedTransformer):
        out = LNFreeTransformer.from_hooked(model)
    else:
        raise TypeError(f"model must be an LNFreeTransformer or HookedTransformer, got {type(model).__name__}")
    cap = out.cfg.output_logits_soft_cap
    if cap is not None and cap > 0:
        raise ValueError(f"models with output_logits_soft_cap={cap} are not supported: logits are not affine in ln_final's output")
    return out


class _FinalLN:
    """ln_final as the model runs it: apply it, read its scale, linearise it at that scale."""

    def __init__(self, model: LNFreeTransformer):
        used = model.cfg.normalization_type is not None and hasattr(model, "ln_final")
        self.module = model.ln_final if used else None
        self.model = model
        self.mode = model.ln_mode("ln_final") if used else "removed"
        linear = self.module is not None and self.mode != "removed"
        self.w = model.ln_final.w if linear and model.ln_final.has_params else None
        self.b = model.ln_final.b if linear and model.ln_final.has_params else None
        self.linear = linear

    def __call__(self, x: torch.Tensor, want_scale: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ln_final(x) and, if asked, the scale it used ([..., 1] from hook_scale; None for the identity)."""
        if self.module is None:
            return x, None
        if not want_scale:
            return self.module(x).to(x.dtype), None
        seen = {}

        def grab(scale, hook):
            seen["scale"] = scale

        with self.model.hooks(fwd_hooks=[("ln_final.hook_scale", grab)]):
            out = self.module(x)
        return out.to(x.dtype), seen["scale"].to(x.dtype)

    def direction(self, u: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """v with DLA(c) = c . v: centering, w and 1/scale moved onto u (same number, cheaper)."""
        if not self.linear:
            return u
        a = u * self.w if self.w is not None else u
        return (a - a.mean(-1, keepdim=True)) / scale

    def bias_logit(self, u: torch.Tensor) -> torch.Tensor:
        """ln_final.b . u (0 when ln_final has no bias or is removed: then b lives in b_U)."""
        return (self.b * u).sum(-1) if self.b is not None else torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)


def _check_components(model: LNFreeTransformer, components, layer) -> Optional[int]:
    if not isinstance(components, str) or components not in COMPONENT_KINDS:
        raise ValueError(f"components must be one of {COMPONENT_KINDS}, got {components!r}")
    if components != "neurons":
        if layer is not None:
            raise ValueError(f"layer is only used with components='neurons'; got layer={layer!r} with components={components!r}")
        return None
    if model.cfg.attn_only:
        raise ValueError("components='neurons' needs MLP layers; this model is attention-only")
    if layer is None:
        raise ValueError(f"components='neurons' needs layer= (an MLP layer in 0..{model.cfg.n_layers - 1})")
    if isinstance(layer, bool) or not isinstance(layer, int) or not -model.cfg.n_layers <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be an int in [-{model.cfg.n_layers}, {model.cfg.n_layers}), got {layer!r}")
    return layer % model.cfg.n_layers


def _has_pos_embed(model) -> bool:
    return model.cfg.positional_embedding_type == "standard"


def _hook_names(model, components: str, layer: Optional[int]) -> list[str]:
    n = model.cfg.n_layers
    if components == "neurons":
        return [f"blocks.{layer}.mlp.hook_post"]
    names = []
    if components in ("layers", "all"):
        names += ["hook_embed"] + (["hook_pos_embed"] if _has_pos_embed(model) else [])
    for i in range(n):
        if components in ("heads", "all"):
            names.append(f"blocks.{i}.attn.hook_z")
        if components == "layers":
            names.append(f"blocks.{i}.hook_attn_out")
        if components in ("layers", "all") and not model.cfg.attn_only:
            names.append(f"blocks.{i}.hook_mlp_out")
    return names


def _check_same_vocab(model_a, model_b) -> None:
    va, vb = model_a.cfg.d_vocab, model_b.cfg.d_vocab
    if va != vb:
        raise ValueError(f"the two models must share the vocabulary: d_vocab {va} vs {vb}")
    ta, tb = getattr(model_a, "tokenizer", None), getattr(model_b, "tokenizer", None)
    if ta is not None and tb is not None and ta is not tb and ta.get_vocab() != tb.get_vocab():
        raise ValueError("the two models have different tokenizers (vocabularies differ); DLA needs the same token ids")


# ---- argument parsing ------------------------------------------------------------------------
def _positions(pos: PosArg, n_prompts: int, seq: int, next_token: bool, targets) -> tuple[Optional[torch.Tensor], Optional[int]]:
    """(per-prompt positions [prompt] or None, number of positions per prompt for "all" or None)."""
    if pos is None:
        pos = "all" if next_token else -1
    last = seq - 1 if next_token else seq  # positions with a label
    if isinstance(pos, str):
        if pos != "all":
            raise ValueError(f"pos must be an int, 'all' or a [prompt] tensor of positions, got {pos!r}")
        if last < 1:
            raise ValueError("next-token targets need sequences of at least 2 tokens (the last position has no label)")
        return None, last
    if isinstance(pos, bool):
        raise TypeError("pos must be an int, 'all' or a [prompt] tensor of positions, got a bool")
    if isinstance(pos, int):
        pos = torch.full((n_prompts,), pos, dtype=torch.long)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be an int, 'all' or a [prompt] tensor of positions, got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.shape != (n_prompts,):
        raise ValueError(f"a pos tensor must hold one integer position per prompt, shape ({n_prompts},); got {tuple(pos.shape)} {pos.dtype}")
    pos = pos.long().cpu()
    if pos.min() < -seq or pos.max() >= seq:
        raise ValueError(f"positions must lie in [-{seq}, {seq}) for sequences of {seq} tokens; got min {int(pos.min())}, max {int(pos.max())}")
    pos = pos % seq
    if next_token and pos.max() >= last:
        raise ValueError(
            f"with targets=None (next-token labels) the last position {seq - 1} has no label; got position "
            f"{int(pos.max())}. Pass targets= or a smaller pos"
        )
    return pos, None


def _targets(model, tokens, targets, positions, n_pos) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """Target (and other) ids as [prompt] or [prompt, n_pos] long tensors, and the target kind."""
    n_prompts = tokens.shape[0]
    if targets is None:
        if positions is None:
            return tokens[:, 1 : n_pos + 1].cpu().long(), None, "next-token"
        return tokens[torch.arange(n_prompts), positions + 1].cpu().long(), None, "next-token"
    if isinstance(targets, (tuple, list)):
        if isinstance(targets, list) and all(isinstance(t, int) for t in targets):
            # [5, 7] could mean per-prompt ids or the pair (5, 7): never guess
            raise TypeError(
                f"targets as a list of ints ({targets[:4]}{'...' if len(targets) > 4 else ''}) is ambiguous: pass "
                "per-prompt ids as a tensor (torch.tensor([...])), a logit difference as a tuple (target_ids, other_ids)"
            )
        if len(targets) != 2:
            raise ValueError(
                f"targets as a tuple/list must be (target_ids, other_ids) for a logit difference; got length {len(targets)}. "
                "Pass a 1-D tensor for plain target ids"
            )
        t = _target_ids(model, targets[0], n_prompts, n_pos, "targets[0]")
        o = _target_ids(model, targets[1], n_prompts, n_pos, "targets[1]")
        return t, o, "logit-diff"
    return _target_ids(model, targets, n_prompts, n_pos, "targets"), None, "token"


def _target_ids(model, ids, n_prompts: int, n_pos: Optional[int], name: str) -> torch.Tensor:
    if isinstance(ids, bool):
        raise TypeError(f"{name} must be token ids, got a bool")
    if isinstance(ids, int):
        ids = torch.tensor(ids)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids (or an int), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    allowed = [(), (n_prompts,)] + ([(n_prompts, n_pos)] if n_pos is not None else [])
    if tuple(ids.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in allowed)}; got {tuple(ids.shape)}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= model.cfg.d_vocab):
        raise ValueError(f"{name} must lie in [0, {model.cfg.d_vocab}); got min {int(ids.min())}, max {int(ids.max())}")
    ids = ids.long().cpu()
    if ids.ndim == 0:
        ids = ids.expand(n_prompts)
    if n_pos is not None and ids.ndim == 1:
        ids = ids[:, None].expand(n_prompts, n_pos)
    return ids


def _selection(start: int, stop: int, positions, n_pos, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position index) of every selected token of a batch, prompt-major."""
    b = stop - start
    if positions is None:
        b_idx = torch.arange(b).repeat_interleave(n_pos)
        p_idx = torch.arange(n_pos).repeat(b)
    else:
        b_idx, p_idx = torch.arange(b), positions[start:stop]
    return b_idx.to(device), p_idx.to(device)


# ---- the computation -------------------------------------------------------------------------
def _run_batch(model, ln: _FinalLN, tokens, b_idx, p_idx, tgt, other, hooks, components, layer, scratch=None):
    """One forward pass up to ln_final; DLA, DE and the logit for every component and selected token.

    `scratch` (a dict kept across batches) holds the buffers the hooks copy into, so that no new
    long-lived tensor is allocated among the forward pass's temporaries (heap fragmentation).
    """
    acts: dict[str, torch.Tensor] = {}
    scratch = {} if scratch is None else scratch

    def keep(act, hook):
        sel = act[b_idx, p_idx]  # only the selected tokens leave the forward pass
        buf = scratch.get(hook.name)
        if buf is None or buf.shape[0] < sel.shape[0] or buf.shape[1:] != sel.shape[1:] or buf.device != sel.device:
            buf = scratch[hook.name] = torch.empty(sel.shape, dtype=_DTYPE, device=sel.device)
        acts[hook.name] = buf[: sel.shape[0]].copy_(sel)

    with model.hooks(fwd_hooks=[(name, keep) for name in hooks]):
        resid = model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
    r = resid[b_idx, p_idx].to(_DTYPE)  # [n, d]: the input of ln_final
    dev = r.device
    W_U, b_U = model.W_U, model.b_U
    u = W_U[:, tgt.to(dev)].T.to(_DTYPE)  # [n, d]: only the needed columns of W_U
    b_const = b_U[tgt.to(dev)].to(_DTYPE)
    if other is not None:
        u = u - W_U[:, other.to(dev)].T.to(_DTYPE)
        b_const = b_const - b_U[other.to(dev)].to(_DTYPE)
    out, scale = ln(r, want_scale=True)
    base = (out * u).sum(-1)  # ln_final(r) . u, without b_U
    logit = base + b_const
    v = ln.direction(u, scale)
    n, d = r.shape
    rows = max(1, _BLOCK_ELEMENTS // (n * d))

    labels, dla, de, total = [], [], [], torch.zeros_like(r)
    for block_labels, C in _component_blocks(model, components, layer, acts, rows):
        labels += block_labels
        dla.append(torch.einsum("knd,nd->kn", C, v))
        shifted, _ = ln(r - C)  # ln_final recomputed on r - c, every component of the block at once
        de.append(base - torch.einsum("knd,nd->kn", shifted, u))
        total += C.sum(0)
    if components in ("layers", "all"):
        # "bias": the rest of r (b_O's for "all"; ~0 for "layers"), ln_final.b and b_U.
        rem = r - total
        const = ln.bias_logit(u) + b_const
        shifted, _ = ln(r - rem)
        labels.append("bias")
        dla.append(((rem * v).sum(-1) + const)[None])
        de.append((logit - ((shifted * u).sum(-1) - ln.bias_logit(u)))[None])
    to_cpu = lambda x: x.detach().float().cpu()  # noqa: E731
    return labels, to_cpu(torch.cat(dla)), to_cpu(torch.cat(de)), to_cpu(logit)


def _component_blocks(model, components, layer, acts, rows) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(labels, C [k, n, d]) blocks of component vectors, in label order, k <= rows where possible."""
    if components == "neurons":
        post = acts[f"blocks.{layer}.mlp.hook_post"]  # [n, d_mlp]
        W_out = model.blocks[layer].mlp.W_out  # [d_mlp, d]
        for s in range(0, W_out.shape[0], rows):
            e = min(s + rows, W_out.shape[0])
            yield [f"L{layer}N{i}" for i in range(s, e)], torch.einsum("nk,kd->knd", post[:, s:e], W_out[s:e].to(_DTYPE))
        return
    if components in ("layers", "all"):
        names = ["embed"] + (["pos_embed"] if _has_pos_embed(model) else [])
        yield names, torch.stack([acts[f"hook_{x}"] for x in names])
    for i in range(model.cfg.n_layers):
        if components in ("heads", "all"):
            z, W_O = acts[f"blocks.{i}.attn.hook_z"], model.blocks[i].attn.W_O  # [n, h, e], [h, e, d]
            for s in range(0, model.cfg.n_heads, rows):
                e = min(s + rows, model.cfg.n_heads)
                yield [f"L{i}H{h}" for h in range(s, e)], torch.einsum("nhe,hed->hnd", z[:, s:e], W_O[s:e].to(_DTYPE))
        if components == "layers":
            yield [f"{i}_attn_out"], acts[f"blocks.{i}.hook_attn_out"][None]
        if components in ("layers", "all") and not model.cfg.attn_only:
            yield [f"{i}_mlp_out"], acts[f"blocks.{i}.hook_mlp_out"][None]


# ---- plotting helpers ------------------------------------------------------------------------
_LABEL_LAYER = re.compile(r"^(?:L(\d+)[HN]\d+|(\d+)_(?:attn|mlp)_out)$")


def _group_of(label: str) -> str:
    """The layer of a component label as a string ("3"), or the label itself (embed, bias)."""
    m = _LABEL_LAYER.match(label)
    return (m.group(1) or m.group(2)) if m else label


def _scatter_traces(res: DLAResult, max_points: int, showlegend: bool = True) -> list:
    import plotly.graph_objects as go

    frame = res.to_frame()
    if len(frame) > max_points:
        frame = frame.sample(max_points, random_state=0)
    traces = []
    for group, sub in frame.groupby("layer", sort=False):
        traces.append(
            go.Scattergl(
                x=sub["direct_effect"], y=sub["dla"], mode="markers", name=str(group), text=sub["component"],
                marker=dict(size=4, opacity=0.6), showlegend=showlegend,
            )
        )
    lo = float(min(frame["direct_effect"].min(), frame["dla"].min())) if len(frame) else 0.0
    hi = float(max(frame["direct_effect"].max(), frame["dla"].max())) if len(frame) else 1.0
    traces.append(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(color="gray", dash="dash"), showlegend=showlegend))
    return traces
