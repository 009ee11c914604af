"""Direct logit attribution (DLA) and the exact direct effect (DE) of model components.

For a component c (a head, a layer output, a neuron, ...) writing into the final residual
stream r (the input of ``ln_final``), with u the unembedding direction of the target
(``W_U[:, target]``, minus ``W_U[:, other]`` for a logit difference):

- ``DLA(c) = center(c) / scale * w_lnf . u`` with ``scale`` the cached ``ln_final.hook_scale``
  of this prompt and position; ``center`` subtracts the mean for LayerNorm and is the identity for
  RMSNorm (which never centres). For an LN-free model (``ln_final`` removed) the scale is 1 and
  ``ln_final`` is the identity: ``DLA(c) = c . u`` with the folded ``W_U``. ``ln_final.b`` and
  ``b_U`` belong to the separate ``"bias"`` component.
- ``DE(c) = logit(r) - logit(r - c)``, with ``ln_final`` recomputed on ``r - c``.
- ``NMAE = mean|DLA - DE| / mean|DE| x 100``.

DLA is a linearisation of ``ln_final`` around r, so DLA == DE exactly when ``ln_final`` is linear
on the path (frozen or removed) and not otherwise. DE is computed for every component at once:
the model runs once per batch, up to ``ln_final``, with hooks that keep only the activations the
components need at the chosen positions; ``ln_final`` is then re-applied to ``r - C`` for blocks of
components, and only the needed columns of ``W_U`` are read (never the full vocabulary).

Padding: with ``attention_mask=`` (or a `TokenBatch`) positions count each row's real tokens
(position 0 = the row's first real token, -1 = its last), whichever side was padded; padded
entries of a ``pos="all"`` result are NaN and excluded from every statistic (``valid``).
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import ClassVar, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from lnfree import _checks
from lnfree._results import Result, result
from lnfree.model import LNFreeTransformer, as_lnfree
from lnfree.norm_algebra import NormSite, norm_site
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args

COMPONENT_KINDS = ("heads", "layers", "neurons", "all")
# Elements of one [components x tokens x d_model] block when re-applying ln_final (bounds memory).
_BLOCK_ELEMENTS = 1 << 22
# Arithmetic after the forward pass: DE is a difference of two logits, and float32 cancellation
# would otherwise hide small effects (an LN-free model's DLA - DE would be ~1e-7, not ~1e-15).
_DTYPE = torch.float64

TargetsArg = Union[None, int, torch.Tensor, Sequence]
PosArg = Union[None, int, str, torch.Tensor]


# ---- NMAE from per-prompt sums ---------------------------------------------------------------
# mean|DLA - DE| / mean|DE| over any set of entries is sum / sum (the counts cancel), so every NMAE,
# its bootstrap over prompts and any padding reduce to per-prompt sums [prompt, component].
def _pooled(e: np.ndarray, d: np.ndarray) -> float:
    return float(100 * e.sum() / d.sum())


def _mean_of_components(e: np.ndarray, d: np.ndarray) -> float:
    return float(np.nanmean(100 * e.sum(0) / d.sum(0)))


_AGGREGATES = {"pooled": _pooled, "mean": _mean_of_components}


def _quiet(fn, *args, **kwargs):
    """Run fn with 0/0 (components whose |DE| sums to 0) giving NaN silently."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


# ---- results ---------------------------------------------------------------------------------
@result
class DLAResult(Result):
    """Direct logit attribution and exact direct effect per component.

    Attributes:
        dla: [component, prompt] (or [component, prompt, position] when ``pos="all"``; NaN where
            ``valid`` is False).
        direct_effect: same shape as ``dla``: logit(r) - logit(r - c), ln_final recomputed.
        logit: [prompt] (or [prompt, position]): the model's target logit (or logit difference).
        labels: one label per component (TransformerLens style, plus ``"bias"``).
        positions: [prompt] positions used, counted within each row's real tokens, or None when ``pos="all"``.
        valid: [prompt, position] which entries of a ``pos="all"`` result are real tokens with a
            target (None when every entry is).
        components, layer: the settings used.
        targets: "next-token", "token" or "logit-diff".
        ln_final_mode: "live", "frozen" or "removed" (the model's ln_final when this was run).
        n_boot, level, seed: bootstrap settings of `nmae` and `nmae_frame`.
        model_name, model_id: which model produced this (`lnfree._checks.model_label` / ``model_id``).
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
    valid: Optional[Bool[torch.Tensor, "prompt pos"]] = None
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    model_name: str = "model"
    model_id: str = ""

    _headline: ClassVar[tuple[str, ...]] = ("nmae",)

    # -- per-prompt sums ----------------------------------------------------------------------
    def _sums(self, x: torch.Tensor) -> np.ndarray:
        """[prompt, component] float64 sums over positions of x [component, prompt, *pos] (padding excluded)."""
        x = x.detach().double().cpu()
        if x.ndim == 3:
            x = (torch.where(self.valid, x, 0.0) if self.valid is not None else x).sum(-1)
        return np.ascontiguousarray(x.numpy().T)

    def _counts(self) -> np.ndarray:
        """[prompt] entries per prompt (1, the number of positions, or the number of valid positions)."""
        n = self.dla.shape[1]
        if self.dla.ndim == 2:
            return np.ones(n)
        if self.valid is None:
            return np.full(n, float(self.dla.shape[2]))
        return self.valid.sum(-1).double().numpy()

    def _error_and_effect(self) -> tuple[np.ndarray, np.ndarray]:
        return self._sums((self.dla - self.direct_effect).abs()), self._sums(self.direct_effect.abs())

    def _means(self, x: torch.Tensor) -> np.ndarray:
        """[component] mean of x over prompts (and valid positions)."""
        return self._sums(x).sum(0) / self._counts().sum()

    # -- NMAE ---------------------------------------------------------------------------------
    def nmae(self, *, aggregate: str = "pooled", n_boot: Optional[int] = None, level: Optional[float] = None,
             seed: Optional[int] = None) -> Estimate:
        """NMAE (%) of every component together, with a bootstrap CI over prompts.

        ``aggregate="pooled"`` pools every component and prompt into one ratio
        ``100 * mean|DLA - DE| / mean|DE|``; ``aggregate="mean"`` averages the per-component values
        (`nmae_by_component`). The CI resamples prompts (paired: errors and effects of the same
        prompts). Bootstrap settings default to the ones stored on the result.

        Example:
            >>> print(res.nmae())                    # doctest: +SKIP
            49.07 [29.92, 66.1]
        """
        return self._nmae(list(range(len(self.labels))), aggregate, n_boot, level, seed)

    def nmae_by_component(self) -> pd.Series:
        """NMAE (%) per component, ``100 * mean|DLA - DE| / mean|DE|`` over prompts (and positions);
        NaN for a component whose |DE| is 0 everywhere. CIs: ``nmae_frame("component")``."""
        err, de = self._error_and_effect()
        return pd.Series(_quiet(lambda: 100 * err.sum(0) / de.sum(0)), index=list(self.labels), name="nmae")

    def _nmae(self, rows: list[int], aggregate: str, n_boot, level, seed) -> Estimate:
        stat = _AGGREGATES[_checks.check_choice(aggregate, tuple(_AGGREGATES), "aggregate")]
        err, de = self._error_and_effect()
        return _quiet(bootstrap, err[:, rows], stat, paired=de[:, rows], **self._boot(n_boot, level, seed))

    def _boot(self, n_boot, level, seed) -> dict:
        return {"n_boot": self.n_boot if n_boot is None else n_boot, "level": self.level if level is None else level,
                "seed": self.seed if seed is None else seed}

    def nmae_frame(self, by: str = "layer", *, aggregate: str = "pooled", n_boot: Optional[int] = None,
                   level: Optional[float] = None, seed: Optional[int] = None) -> pd.DataFrame:
        """NMAE (%) with bootstrap CIs per group: ``by="layer"`` (components grouped by layer;
        embed, pos_embed and bias are their own groups), ``"component"``, or ``"overall"``.

        Example:
            >>> res.nmae_frame("layer")     # doctest: +SKIP
              group   nmae    low   high  n
        """
        rows = []
        for name, idx in self._groups(by).items():
            est = self._nmae(idx, aggregate, n_boot, level, seed)
            rows.append({"group": name, "nmae": est.value, "low": est.low, "high": est.high, "n": est.n})
        return pd.DataFrame(rows)

    def _groups(self, by: str) -> dict[str, list[int]]:
        _checks.check_choice(by, ("layer", "component", "overall"), "by")
        if by == "overall":
            return {"overall": list(range(len(self.labels)))}
        if by == "component":
            return {lab: [i] for i, lab in enumerate(self.labels)}
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(self.labels):
            groups.setdefault(_group_of(lab), []).append(i)
        return groups

    # -- views --------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per component x prompt (x position), padded entries left out.

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
        out = pd.DataFrame(frame)
        if self.valid is not None:
            out = out[self.valid.expand(k, n, *extra).reshape(-1).numpy()].reset_index(drop=True)
        return out

    def top(self, k: int = 10, *, by: str = "direct_effect") -> pd.DataFrame:
        """The k components with the largest mean |``by``| ("direct_effect", "dla" or "error").

        Example:
            >>> res.top(5)                  # doctest: +SKIP
        """
        _checks.check_choice(by, ("direct_effect", "dla", "error"), "by")
        k = _checks.positive_int(k, "k")
        error = self.dla - self.direct_effect
        table = pd.DataFrame(
            {
                "component": list(self.labels),
                "mean_dla": self._means(self.dla),
                "mean_direct_effect": self._means(self.direct_effect),
                "mean_abs_error": self._means(error.abs()),
                "nmae": self.nmae_by_component().to_numpy(),
            }
        )
        key = {"direct_effect": self.direct_effect, "dla": self.dla, "error": error}[by]
        order = np.argsort(-self._means(key.abs()), kind="stable")[:k]
        return table.iloc[order].reset_index(drop=True)

    def plot(self, kind: str = "scatter", *, max_points: int = 20000, title: Optional[str] = None):
        """Plotly figure: ``"scatter"`` of DLA against DE (one point per component x prompt x
        position, coloured by layer, with the y = x line), or ``"bar"`` of mean DLA and mean DE
        per component. Never shown implicitly.
        """
        import plotly.graph_objects as go

        _checks.check_choice(kind, ("scatter", "bar"), "kind")
        if kind == "scatter":
            fig = go.Figure(_scatter_traces(self, max_points))
            fig.update_layout(xaxis_title="direct effect (logit)", yaxis_title="DLA (logit)", legend_title="layer")
        else:
            fig = go.Figure(
                [
                    go.Bar(name="DLA", x=list(self.labels), y=self._means(self.dla)),
                    go.Bar(name="direct effect", x=list(self.labels), y=self._means(self.direct_effect)),
                ]
            )
            fig.update_layout(barmode="group", xaxis_title="component", yaxis_title="mean over prompts (logit)")
        fig.update_layout(title=title or f"{self.model_name}: DLA vs direct effect ({self.components}), "
                                         f"NMAE {self.nmae()}%")  # the repr's CI: the result's bootstrap settings
        return fig


@result
class DLAComparison(Result):
    """`direct_logit_attribution` of two models on the same prompts and targets.

    Attributes:
        names: display names of the two models (from the models, or ``names=``).
        a, b: the two `DLAResult`s.
        table: NMAE (%) with CIs, overall and per layer, for each model (long format; computed from
            ``a`` and ``b`` on first use, so the result holds tensors and settings only and saves exactly).
        aggregate, n_boot, level, seed: the NMAE settings.
    """

    names: tuple[str, str]
    a: DLAResult
    b: DLAResult
    aggregate: str = "pooled"
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    _headline: ClassVar[tuple[str, ...]] = ("overall_difference",)

    @functools.cached_property
    def table(self) -> pd.DataFrame:
        """NMAE (%) with CIs, overall and per layer, for each model (long format; see `to_frame`)."""
        frames = [res.nmae_frame(by, aggregate=self.aggregate).assign(model=name)
                  for name, res in zip(self.names, (self.a, self.b)) for by in ("overall", "layer")]
        return pd.concat(frames, ignore_index=True)[["model", "group", "nmae", "low", "high", "n"]]

    def to_frame(self) -> pd.DataFrame:
        """Columns: model, group ("overall" or a layer), nmae, low, high, n."""
        return self.table.copy()

    def difference(self, by: str = "layer") -> pd.DataFrame:
        """NMAE of a minus NMAE of b per group ("overall" first), with a paired bootstrap CI
        over prompts (both models saw the same prompts). Columns: group, difference, low, high, n."""
        rows = []
        groups = {"overall": list(range(len(self.a.labels)))}
        if by != "overall":
            groups.update(self.a._groups(by))
        for name, idx in groups.items():
            est = self._difference(idx)
            rows.append({"group": name, "difference": est.value, "low": est.low, "high": est.high, "n": est.n})
        return pd.DataFrame(rows)

    def overall_difference(self) -> Estimate:
        """NMAE (%) of a minus b over every component, paired bootstrap CI over prompts."""
        return self._difference(list(range(len(self.a.labels))))

    def _difference(self, rows: list[int]) -> Estimate:
        stat = _AGGREGATES[self.aggregate]
        k = len(rows)
        parts = [x[:, rows] for res in (self.a, self.b) for x in res._error_and_effect()]

        def diff(x):
            ea, da, eb, db = (x[:, i * k:(i + 1) * k] for i in range(4))
            return stat(ea, da) - stat(eb, db)

        return _quiet(bootstrap, np.concatenate(parts, 1), diff, n_boot=self.n_boot, level=self.level, seed=self.seed)

    @property
    def nmae_difference(self) -> pd.Series:
        """NMAE of model a minus model b, per group (overall first); CIs: `difference`."""
        wide = self.table.pivot(index="group", columns="model", values="nmae")
        order = list(dict.fromkeys(self.table["group"]))
        return (wide[self.names[0]] - wide[self.names[1]]).reindex(order).rename("nmae_difference")

    def plot(self, *, max_points: int = 20000):
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
            fig.update_xaxes(title_text="direct effect (logit)", row=1, col=col)
            fig.update_yaxes(title_text="DLA (logit)", row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=1)
        fig.update_yaxes(title_text="NMAE (%)", row=1, col=1)
        fig.update_layout(title=f"DLA vs exact direct effect: {self.names[0]} vs {self.names[1]}")
        return fig


# ---- public functions ------------------------------------------------------------------------
@torch.no_grad()
def direct_logit_attribution(
    model,
    tokens: Union[Int[torch.Tensor, "prompt pos"], _checks.TokenBatch],
    *,
    targets: TargetsArg = None,
    attention_mask: Optional[Int[torch.Tensor, "prompt pos"]] = None,
    components: str = "heads",
    layer: Optional[int] = None,
    pos: PosArg = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> DLAResult:
    """DLA and exact direct effect of every component on a target logit (or logit difference).

    Args:
        model: an `LNFreeTransformer` (a plain HookedTransformer is wrapped, sharing weights).
        tokens: [prompt, pos] token ids, or a `TokenBatch` (ids + attention mask).
        targets: a [prompt] tensor (or one int) of target token ids; a pair
            ``(target_ids, other_ids)`` for the logit difference target - other; or None for the
            next-token labels (the next real token after position p). With ``pos="all"`` targets may
            also be [prompt, pos] (pos counted within each row's real tokens).
        attention_mask: [prompt, pos], 1 = real token, 0 = padding (left or right). The forward pass
            uses it; positions count real tokens only; padded entries are NaN and never counted.
        components: "heads" (``L{l}H{h}``), "layers" (``embed``, ``pos_embed``, ``{l}_attn_out``,
            ``{l}_mlp_out`` and ``bias``: everything else, so that DLAs sum to the logit for an
            LN-free model), "neurons" (``L{layer}N{n}``, needs ``layer``) or "all" (embed,
            pos_embed, every head, every MLP output, and ``bias``, which then holds the b_O's).
        layer: the MLP layer for ``components="neurons"``.
        pos: an int (negative counts back from each row's last real token), "all", or a [prompt]
            tensor of positions. Default: -1 when targets are given, "all" (every position with a
            label) when not.
        batch_size: prompts per forward pass.
        n_boot, level, seed: bootstrap settings for the NMAE CIs (stored on the result).
        progress: show a progress bar over batches.

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=16,
        ...                               act_fn="gelu_new", normalization_type="LN")
        >>> model, tokens = LNFreeTransformer(cfg), torch.randint(0, 50, (4, 16))
        >>> res = direct_logit_attribution(model, tokens, targets=tokens[:, 0], components="heads")
        >>> res.dla.shape, res.labels[:2]   # [n_layers * n_heads, n_prompts], pos=-1
        (torch.Size([8, 4]), ('L0H0', 'L0H1'))
        >>> _ = model.estimate_ln_scales(tokens)
        >>> free = direct_logit_attribution(model.remove_ln(), tokens, targets=tokens[:, 0], components="layers")
        >>> bool(torch.allclose(free.dla, free.direct_effect)), free.nmae().value < 1e-6  # exact
        (True, True)
        >>> bool(torch.allclose(free.dla.sum(0), free.logit, atol=1e-4))  # components sum to the logit
        True
    """
    model = _check_model(model)
    tokens, mask = _checks.resolve_batch(model, tokens, attention_mask)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    layer = _check_components(model, components, layer)
    n_prompts, seq = tokens.shape
    starts, lengths = _row_spans(mask, n_prompts, seq)
    next_token = targets is None
    positions, n_pos, valid = _positions(pos, lengths, seq, next_token, mask is not None)
    tgt, other, target_kind = _targets(model, tokens, targets, positions, n_pos, starts)
    ent = _Entries(positions, n_pos, valid, starts)
    hooks = _hook_names(model, components, layer)
    ln = norm_site(model, "ln_final")  # as the forward pass runs it: kind, mode, w, b, its scale

    # Results go straight into buffers allocated once: small per-batch tensors kept alive across
    # batches would pin heap memory between the forward passes' temporaries and grow the RSS.
    per = 1 if n_pos is None else n_pos  # entries per prompt
    labels = dla = de = logit = None
    scratch: dict[str, torch.Tensor] = {}
    for sl in _checks.batches(n_prompts, batch_size, enabled=progress, desc="DLA"):
        rows, b_idx, p_idx, cols = ent.batch(sl.start, sl.stop)
        dev = model.cfg.device
        batch_labels, b_dla, b_de, b_logit = _run_batch(
            model, ln, tokens[sl], None if mask is None else mask[sl], b_idx.to(dev), p_idx.to(dev),
            _pick(tgt, rows, ent), None if other is None else _pick(other, rows, ent), hooks, components, layer, scratch,
        )
        if labels is None:
            labels = batch_labels
            fill = float("nan") if valid is not None else 0.0
            dla, de = torch.full((len(labels), n_prompts * per), fill), torch.full((len(labels), n_prompts * per), fill)
            logit = torch.full((n_prompts * per,), fill)
        dla[:, cols], de[:, cols], logit[cols] = b_dla, b_de, b_logit
        del b_dla, b_de, b_logit

    shape = (n_prompts,) if n_pos is None else (n_prompts, n_pos)
    dla, de, logit = dla.reshape(len(labels), *shape), de.reshape(len(labels), *shape), logit.reshape(shape)
    return DLAResult(
        dla=dla, direct_effect=de, logit=logit, labels=tuple(labels),
        positions=None if positions is None else positions.cpu(), components=components, layer=layer,
        targets=target_kind, ln_final_mode=ln.mode, valid=valid, n_boot=n_boot, level=level, seed=seed,
        model_name=_checks.model_label(model), model_id=_checks.model_id(model),
    )


def compare_dla(
    model_a,
    model_b,
    tokens: Union[Int[torch.Tensor, "prompt pos"], _checks.TokenBatch],
    *,
    targets: TargetsArg = None,
    attention_mask: Optional[Int[torch.Tensor, "prompt pos"]] = None,
    names: Optional[tuple[str, str]] = None,
    aggregate: str = "pooled",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    **kwargs,
) -> DLAComparison:
    """Run `direct_logit_attribution` on two models (e.g. original vs LN-free) and compare NMAE.

    The two models must share the vocabulary (d_vocab and, when both have one, the tokenizer).
    Names come from the models (name and norm state, e.g. ``"tiny-ln (LN)"``) unless ``names=``
    is given. ``kwargs`` go to `direct_logit_attribution` (components, layer, pos, batch_size, progress).

    Example:
        >>> from transformer_lens import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=16,
        ...                               act_fn="gelu_new", normalization_type="LN", model_name="toy")
        >>> ln_model, tokens = LNFreeTransformer(cfg), torch.randint(0, 50, (8, 16))
        >>> _ = ln_model.estimate_ln_scales(tokens)
        >>> ln_free = LNFreeTransformer(cfg.__class__(**cfg.to_dict()))
        >>> _ = ln_free.load_state_dict(ln_model.state_dict())
        >>> ln_free = ln_free.remove_ln(scales={s: ln_model.ln_scale(s) for s in ln_model.ln_sites})
        >>> cmp = compare_dla(ln_model, ln_free, tokens, n_boot=100)     # next-token targets, every position
        >>> cmp.names
        ('toy (LN)', 'toy (LN-free)')
        >>> fig = cmp.plot()
    """
    names = _checks.compare_names(model_a, model_b, names)
    _checks.check_same_vocab(model_a, model_b, ("model_a", "model_b"))
    _checks.check_choice(aggregate, tuple(_AGGREGATES), "aggregate")
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    a = direct_logit_attribution(model_a, tokens, targets=targets, attention_mask=attention_mask, **boot, **kwargs)
    b = direct_logit_attribution(model_b, tokens, targets=targets, attention_mask=attention_mask, **boot, **kwargs)
    return DLAComparison(names=names, a=a, b=b, aggregate=aggregate, **boot)


# ---- model / LN helpers ----------------------------------------------------------------------
def _check_model(model) -> LNFreeTransformer:
    out = as_lnfree(model)
    cap = out.cfg.output_logits_soft_cap
    if cap is not None and cap > 0:
        raise ValueError(f"models with output_logits_soft_cap={cap} are not supported: logits are not affine in ln_final's output")
    return out


def _direction(ln: NormSite, u: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """v with DLA(c) = c . v: centering, w and 1/scale moved onto u (same number, cheaper)."""
    return ln.input_direction(u) / scale if ln.applied else u


def _bias_logit(ln: NormSite, u: torch.Tensor) -> torch.Tensor:
    """ln_final.b . u (0 when ln_final has no bias or is removed: then b lives in b_U)."""
    if ln.bias is None:
        return torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
    return (ln.bias * u).sum(-1)


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


# ---- argument parsing ------------------------------------------------------------------------
def _row_spans(mask: Optional[torch.Tensor], n_prompts: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each row's first real token, number of real tokens) as [prompt] long tensors on the CPU."""
    if mask is None:
        return torch.zeros(n_prompts, dtype=torch.long), torch.full((n_prompts,), seq, dtype=torch.long)
    mask = mask.cpu()
    return mask.int().argmax(1).long(), mask.sum(1).long()


def _positions(pos: PosArg, lengths: torch.Tensor, seq: int, next_token: bool, padded: bool
               ) -> tuple[Optional[torch.Tensor], Optional[int], Optional[torch.Tensor]]:
    """(per-prompt positions [prompt] or None, positions per prompt for "all" or None, valid [prompt, pos] or None).

    Positions count each row's real tokens (0 = its first real token).
    """
    if pos is None:
        pos = "all" if next_token else -1
    n_lab = lengths - 1 if next_token else lengths  # positions with a label, per row
    if isinstance(pos, str):
        if pos != "all":
            raise ValueError(f"pos must be an int, 'all' or a [prompt] tensor of positions, got {pos!r}")
        if int(n_lab.min()) < 1:
            raise ValueError("next-token targets need sequences of at least 2 tokens (the last position has no label)"
                             + ("; some rows have only one real token" if padded else ""))
        n_pos = int(n_lab.max())
        valid = torch.arange(n_pos)[None] < n_lab[:, None]
        return None, n_pos, None if bool(valid.all()) else valid
    if isinstance(pos, bool):
        raise TypeError("pos must be an int, 'all' or a [prompt] tensor of positions, got a bool")
    n_prompts = lengths.shape[0]
    if isinstance(pos, (int, np.integer)):
        pos = torch.full((n_prompts,), int(pos), dtype=torch.long)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be an int, 'all' or a [prompt] tensor of positions, got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.shape != (n_prompts,):
        raise ValueError(f"a pos tensor must hold one integer position per prompt, shape ({n_prompts},); got {tuple(pos.shape)} {pos.dtype}")
    pos = pos.long().cpu()
    bad = (pos < -lengths) | (pos >= lengths)
    if bool(bad.any()):
        if not padded:
            raise ValueError(f"positions must lie in [-{seq}, {seq}) for sequences of {seq} tokens; got min {int(pos.min())}, max {int(pos.max())}")
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"positions must lie in [-n, n) for a row of n real tokens; row {i} has n={int(lengths[i])}, "
                         f"got position {int(pos[i])} (positions count real tokens only)")
    pos = torch.where(pos < 0, pos + lengths, pos)
    if next_token and bool((pos >= n_lab).any()):
        i = int(torch.nonzero(pos >= n_lab)[0])
        raise ValueError(
            f"with targets=None (next-token labels) the last {'real ' if padded else ''}position "
            f"{int(lengths[i]) - 1} has no label; got position {int(pos[i])} (row {i}). Pass targets= or a smaller pos"
        )
    return pos, None, None


def _targets(model, tokens, targets, positions, n_pos, starts) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """Target (and other) ids as [prompt] or [prompt, n_pos] long tensors, and the target kind."""
    n_prompts, seq = tokens.shape
    if targets is None:
        tokens = tokens.cpu()
        if positions is None:  # the next real token of every position (clamped where there is none: unused)
            idx = (starts[:, None] + torch.arange(n_pos)[None] + 1).clamp(max=seq - 1)
            return tokens.gather(1, idx).long(), None, "next-token"
        return tokens[torch.arange(n_prompts), starts + positions + 1].long(), None, "next-token"
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
    if isinstance(ids, (int, np.integer)):
        ids = torch.tensor(int(ids))
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


class _Entries:
    """Every (prompt, position) entry that is computed, prompt-major: its prompt, its position within
    the row's real tokens, its absolute index in the padded row and its column in the flat output."""

    def __init__(self, positions, n_pos, valid, starts):
        n_prompts = starts.shape[0]
        if positions is None:
            b = torch.arange(n_prompts).repeat_interleave(n_pos)
            j = torch.arange(n_pos).repeat(n_prompts)
            cols = torch.arange(n_prompts * n_pos)
            if valid is not None:
                keep = valid.reshape(-1)
                b, j, cols = b[keep], j[keep], cols[keep]
        else:
            b, j, cols = torch.arange(n_prompts), positions, torch.arange(n_prompts)
        self.b, self.j, self.cols = b, j, cols
        self.abs = starts[b] + j

    def batch(self, start: int, stop: int):
        """(entry slice, prompt index within the batch, absolute position, output column) of prompts [start, stop)."""
        lo, hi = int(torch.searchsorted(self.b, start)), int(torch.searchsorted(self.b, stop))
        rows = slice(lo, hi)
        return rows, self.b[rows] - start, self.abs[rows], self.cols[rows]


def _pick(ids: torch.Tensor, rows: slice, ent: _Entries) -> torch.Tensor:
    """The target ids of the entries ``rows``, from [prompt] or [prompt, pos] ids."""
    return ids[ent.b[rows]] if ids.ndim == 1 else ids[ent.b[rows], ent.j[rows]]

# ---- the computation -------------------------------------------------------------------------
def _run_batch(model, ln: NormSite, tokens, mask, b_idx, p_idx, tgt, other, hooks, components, layer, scratch=None):
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
        tokens = tokens.to(model.cfg.device)
        kw = {k: v.to(tokens.device) for k, v in _checks.forward_kwargs(model, tokens, mask).items()}
        resid = model(tokens, stop_at_layer=model.cfg.n_layers, **kw)
    r = resid[b_idx, p_idx].to(_DTYPE)  # [n, d]: the input of ln_final
    # each entry's position within its row's real tokens (a positional ln_final scale depends on it)
    start = 0 if mask is None else mask.to(b_idx.device).int().argmax(1)[b_idx]
    pos = (p_idx - start).to(r.device)
    dev = r.device
    W_U, b_U = model.W_U, model.b_U
    u = W_U[:, tgt.to(dev)].T.to(_DTYPE)  # [n, d]: only the needed columns of W_U
    b_const = b_U[tgt.to(dev)].to(_DTYPE)
    if other is not None:
        u = u - W_U[:, other.to(dev)].T.to(_DTYPE)
        b_const = b_const - b_U[other.to(dev)].to(_DTYPE)
    out, scale = ln.apply(r, want_scale=True, positions=pos)
    base = (out * u).sum(-1)  # ln_final(r) . u, without b_U
    logit = base + b_const
    v = _direction(ln, u, scale)
    n, d = r.shape
    rows = max(1, _BLOCK_ELEMENTS // (n * d))

    labels, dla, de, total = [], [], [], torch.zeros_like(r)
    for block_labels, C in _component_blocks(model, components, layer, acts, rows):
        labels += block_labels
        dla.append(torch.einsum("knd,nd->kn", C, v))
        shifted, _ = ln.apply(r - C, positions=pos)  # ln_final recomputed on r - c, every component of the block at once
        de.append(base - torch.einsum("knd,nd->kn", shifted, u))
        total += C.sum(0)
    if components in ("layers", "all"):
        # "bias": the rest of r (b_O's for "all"; ~0 for "layers"), ln_final.b and b_U.
        rem = r - total
        const = _bias_logit(ln, u) + b_const
        shifted, _ = ln.apply(r - rem, positions=pos)
        labels.append("bias")
        dla.append(((rem * v).sum(-1) + const)[None])
        de.append((logit - ((shifted * u).sum(-1) - _bias_logit(ln, u)))[None])
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
