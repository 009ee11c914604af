"""Residual-stream geometry tied to normalization: first-token norms and attention sinks.

In LN models the first position often carries a residual norm far above the others, which the
LayerNorm scale then divides away, and many heads park their attention on position 0 (an
"attention sink"). Both are natural things to compare between an LN model and its LN-free
version: without LN a huge first-token norm is no longer normalised before it is read.

Padding: with ``attention_mask=`` (or a `TokenBatch`), "position 0" is each row's first real token
and only real positions are averaged, so a padded batch gives each row's numbers as if it were alone.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from lnfree import _checks
from lnfree._results import Result, result
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args

__all__ = ["ResidNorms", "SinkRate", "first_token_norm", "attention_sink_rate"]


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.mean() / b.mean())


def _prepare(model, tokens, attention_mask, batch_size, n_boot, level, seed):
    """(model, tokens, mask, batch_size, n_boot, level, seed) checked; every row needs 2 real tokens."""
    from lnfree.model import as_lnfree  # here: importing the model module loads TransformerLens

    model = as_lnfree(model)
    tokens, mask = _checks.resolve_batch(model, tokens, attention_mask)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens need at least 2 positions (position 0 vs the rest), got shape {tuple(tokens.shape)}")
    if mask is not None and int(mask.sum(1).min()) < 2:
        rows = torch.nonzero(mask.sum(1) < 2).flatten().tolist()
        raise ValueError(f"attention_mask: rows {rows} have fewer than 2 real tokens (position 0 vs the rest)")
    return (model, tokens, mask, _checks.positive_int(batch_size, "batch_size"),
            *check_bootstrap_args(n_boot, level, seed))


def _real(mask: Optional[torch.Tensor], sl: slice, n: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real index [batch], real positions after the first [batch, pos] bool) of a batch."""
    if mask is None:
        rest = torch.ones(n, seq, dtype=torch.bool, device=device)
        rest[:, 0] = False
        return torch.zeros(n, dtype=torch.long, device=device), rest
    m = mask[sl].to(device)
    first = m.int().argmax(1)
    rest = m.clone()
    rest[torch.arange(n, device=device), first] = False
    return first, rest


def _run(model, tokens, mask, sl, hooks):
    batch = tokens[sl].to(model.cfg.device)
    kw = {k: v.to(batch.device) for k, v in _checks.forward_kwargs(model, batch, None if mask is None else mask[sl]).items()}
    model.run_with_hooks(batch, return_type=None, fwd_hooks=hooks, **kw)


# ---- first-token norm ----------------------------------------------------------------------
@result
class ResidNorms(Result):
    """L2 norm of the residual stream at position 0 vs the other positions, per layer.

    Attributes:
        labels: "{l}_resid_pre" for every layer, then "{n_layers-1}_resid_post".
        first: [prompt, site] norm at position 0 (each row's first real token).
        rest: [prompt, site] mean norm over the row's other real positions.
        n_boot, level, seed: bootstrap settings of the CIs; model_name, model_id: provenance.
    """

    labels: tuple[str, ...]
    first: Float[torch.Tensor, "prompt site"]
    rest: Float[torch.Tensor, "prompt site"]
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    model_name: str = "model"
    model_id: str = ""

    _headline: ClassVar[tuple[str, ...]] = ("max_ratio",)

    @property
    def ratio(self) -> Float[torch.Tensor, "site"]:
        """Mean norm at position 0 / mean norm over the other positions, per site."""
        return self.first.mean(0) / self.rest.mean(0)

    def _boot(self) -> dict:
        return {"n_boot": self.n_boot, "level": self.level, "seed": self.seed}

    def estimates(self) -> dict[str, list[Estimate]]:
        """Bootstrap CIs over prompts: "first", "rest" and "ratio" (mean first / mean rest), per site."""
        idx = range(len(self.labels))
        return {
            "first": [bootstrap(self.first[:, i], **self._boot()) for i in idx],
            "rest": [bootstrap(self.rest[:, i], **self._boot()) for i in idx],
            "ratio": [bootstrap(self.first[:, i], _ratio, paired=self.rest[:, i], **self._boot()) for i in idx],
        }

    def max_ratio(self) -> Estimate:
        """The ratio at the site where it is largest (site chosen on all prompts), with its CI."""
        i = int(torch.argmax(self.ratio))
        return bootstrap(self.first[:, i], _ratio, paired=self.rest[:, i], **self._boot())

    def to_frame(self) -> pd.DataFrame:
        """Long format: site, index, position (first/rest/ratio), value, low, high, n, level."""
        rows = []
        for position, ests in self.estimates().items():
            for i, (label, est) in enumerate(zip(self.labels, ests)):
                rows.append({"site": label, "index": i, "position": position, **est.to_dict()})
        return pd.DataFrame(rows)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k sites with the largest first-token norm ratio: site, index, ratio, low, high, n."""
        k = _checks.positive_int(k, "k")
        ratio = self.to_frame().query("position == 'ratio'")
        return (ratio.sort_values("value", ascending=False, kind="stable").head(k)
                .rename(columns={"value": "ratio"})[["site", "index", "ratio", "low", "high", "n"]]
                .reset_index(drop=True))

    def plot(self):
        """Mean norm per site (log y): position 0 vs the other positions, with CIs."""
        import plotly.graph_objects as go

        df = self.to_frame()
        fig = go.Figure()
        for position, name in (("first", "position 0"), ("rest", "positions >= 1")):
            sub = df[df.position == position]
            fig.add_trace(
                go.Scatter(
                    x=sub["site"], y=sub["value"], mode="lines+markers", name=name,
                    error_y=dict(type="data", symmetric=False, array=sub["high"] - sub["value"],
                                 arrayminus=sub["value"] - sub["low"]),
                )
            )
        fig.update_layout(title=f"{self.model_name}: residual-stream norm, first token vs the rest "
                                f"({self.level:.0%} CIs)", xaxis_title="site (residual stream before each layer)",
                          yaxis_title="L2 norm")
        fig.update_yaxes(type="log")
        return fig


@torch.no_grad()
def first_token_norm(
    model,
    tokens: Union[Int[torch.Tensor, "batch pos"], _checks.TokenBatch],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> ResidNorms:
    """Residual-stream L2 norm at position 0 vs the mean over other positions, per layer.

    Sites: resid_pre of every layer and the final resid_post (hooks only on those). With
    ``attention_mask``, position 0 is each row's first real token and padding is never averaged.

    Example:
        >>> res = first_token_norm(model, tokens)          # doctest: +SKIP
        >>> res.max_ratio(), res.top(3)                    # doctest: +SKIP
        >>> res.plot()                                     # doctest: +SKIP
    """
    model, tokens, mask, batch_size, n_boot, level, seed = _prepare(model, tokens, attention_mask, batch_size, n_boot,
                                                                     level, seed)
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    labels = tuple(f"{i}_resid_pre" for i in range(n)) + (f"{n - 1}_resid_post",)
    first, rest = [], []
    for sl in _checks.batches(tokens.shape[0], batch_size, enabled=progress, desc="resid norms"):
        found = {}
        b = sl.stop - sl.start
        first_idx, others = _real(mask, sl, b, tokens.shape[1], model.cfg.device)

        def record(act, hook):
            norms = act.detach().float().norm(dim=-1)  # [batch, pos]
            at_first = norms[torch.arange(b, device=norms.device), first_idx]
            mean_rest = torch.where(others, norms, 0.0).sum(1) / others.sum(1)
            found[hook.name] = (at_first.cpu(), mean_rest.cpu())

        _run(model, tokens, mask, sl, [(name, record) for name in names])
        first.append(torch.stack([found[nm][0] for nm in names], 1))
        rest.append(torch.stack([found[nm][1] for nm in names], 1))
    return ResidNorms(labels=labels, first=torch.cat(first), rest=torch.cat(rest), n_boot=n_boot, level=level,
                      seed=seed, model_name=_checks.model_label(model), model_id=_checks.model_id(model))


# ---- attention sinks -----------------------------------------------------------------------
@result
class SinkRate(Result):
    """Attention to position 0, per head, and the share of heads that are sinks.

    Attributes:
        per_prompt: [prompt, layer, head] mean over the prompt's real query positions >= 1 of the
            attention paid to position 0 (its first real token).
        attention_to_first: [layer, head] mean of ``per_prompt`` over prompts.
        rate: share of heads with attention_to_first >= threshold, with a bootstrap CI over prompts.
        labels: "L{l}H{h}" in row-major [layer, head] order.
        threshold, n_prompts, n_boot, level, seed: the settings used; model_name, model_id: provenance.
    """

    per_prompt: Float[torch.Tensor, "prompt layer head"]
    attention_to_first: Float[torch.Tensor, "layer head"]
    rate: Estimate
    labels: tuple[str, ...]
    threshold: float = 0.3
    n_prompts: int = 0
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    model_name: str = "model"
    model_id: str = ""

    @property
    def is_sink(self) -> Bool[torch.Tensor, "layer head"]:
        """[layer, head] bool: attention_to_first >= threshold."""
        return self.attention_to_first >= self.threshold

    def to_frame(self) -> pd.DataFrame:
        """One row per head: label, layer, head, attention_to_first, is_sink."""
        L, H = self.attention_to_first.shape
        return pd.DataFrame(
            {
                "label": list(self.labels),
                "layer": np.repeat(np.arange(L), H),
                "head": np.tile(np.arange(H), L),
                "attention_to_first": self.attention_to_first.flatten().numpy(),
                "is_sink": self.is_sink.flatten().numpy(),
            }
        )

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` heads with the most attention to position 0 (rows of `to_frame`)."""
        k = _checks.positive_int(k, "k")
        return (self.to_frame().sort_values("attention_to_first", ascending=False, kind="stable")
                .head(k).reset_index(drop=True))

    def plot(self):
        """Heatmap [layer, head] of the mean attention to position 0 (integer layer and head ticks)."""
        import plotly.graph_objects as go

        L, H = self.attention_to_first.shape
        fig = go.Figure(
            go.Heatmap(z=self.attention_to_first.numpy(), x=list(range(H)), y=list(range(L)), zmin=0, zmax=1,
                       colorscale="Blues", colorbar=dict(title="attn to pos 0"))
        )
        fig.update_layout(
            title=f"{self.model_name}: attention to position 0 (sink rate {self.rate.value:.1%} at threshold "
                  f"{self.threshold})",
            xaxis_title="head", yaxis_title="layer",
        )
        fig.update_xaxes(tickmode="linear", tick0=0, dtick=1 if H <= 32 else max(1, H // 16))
        fig.update_yaxes(tickmode="linear", tick0=0, dtick=1 if L <= 32 else max(1, L // 16))
        return fig


@torch.no_grad()
def attention_sink_rate(
    model,
    tokens: Union[Int[torch.Tensor, "batch pos"], _checks.TokenBatch],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    threshold: float = 0.3,
    batch_size: int = 16,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> SinkRate:
    """Per-head mean attention to position 0 (query positions >= 1) and the share of sink heads.

    With ``attention_mask``, position 0 is each row's first real token and only real query
    positions are averaged. The CI of the rate resamples prompts.

    Example:
        >>> sinks = attention_sink_rate(model, tokens, threshold=0.3)     # doctest: +SKIP
        >>> print(sinks.rate); sinks.top(3)                              # doctest: +SKIP
    """
    model, tokens, mask, batch_size, n_boot, level, seed = _prepare(model, tokens, attention_mask, batch_size, n_boot,
                                                                     level, seed)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    n, H = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    out = []
    for sl in _checks.batches(tokens.shape[0], batch_size, enabled=progress, desc="attention sinks"):
        b = sl.stop - sl.start
        first_idx, queries = _real(mask, sl, b, tokens.shape[1], model.cfg.device)
        found = torch.zeros(b, n, H, dtype=torch.float64)

        def record(act, hook):  # act: [batch, head, query, key]
            to_first = act[torch.arange(b, device=act.device), :, :, first_idx].double()  # [batch, head, query]
            q = queries[:, None, :]
            found[:, int(hook.name.split(".")[1])] = (torch.where(q, to_first, 0.0).sum(-1) / q.sum(-1)).cpu()

        _run(model, tokens, mask, sl, [(name, record) for name in names])
        out.append(found)
    per_prompt = torch.cat(out)
    attn = per_prompt.mean(0).float()
    share = lambda x: float((x.mean(0) >= threshold).mean())  # noqa: E731
    rate = bootstrap(per_prompt.reshape(len(per_prompt), -1).numpy(), share, n_boot=n_boot, level=level, seed=seed)
    rate = Estimate(float((attn >= threshold).float().mean()), rate.low, rate.high, rate.n, rate.level)
    return SinkRate(
        per_prompt=per_prompt.float(), attention_to_first=attn, rate=rate,
        labels=tuple(f"L{l}H{h}" for l in range(n) for h in range(H)), threshold=float(threshold),
        n_prompts=tokens.shape[0], n_boot=n_boot, level=level, seed=seed,
        model_name=_checks.model_label(model), model_id=_checks.model_id(model),
    )
