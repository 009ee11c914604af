"""Residual-stream geometry tied to LayerNorm: first-token norms and attention sinks.

In LN models the first position often carries a residual norm far above the others, which the
LayerNorm scale then divides away, and many heads park their attention on position 0 (an
"attention sink"). Both are natural things to compare between an LN model and its LN-free
version: without LN a huge first-token norm is no longer normalised before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer

from lnfree.model import LNFreeTransformer
from lnfree.stats import Estimate, bootstrap

__all__ = ["ResidNorms", "SinkRate", "first_token_norm", "attention_sink_rate"]


def _check(model, tokens, batch_size) -> torch.Tensor:
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"model must be a HookedTransformer / LNFreeTransformer, got {type(model).__name__}")
    tokens = LNFreeTransformer._check_tokens(model, tokens)  # only reads model.cfg
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens need at least 2 positions (position 0 vs the rest), got shape {tuple(tokens.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return tokens


def _batches(tokens, batch_size, progress, desc):
    from tqdm.auto import tqdm

    for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc=desc):
        yield tokens[start : start + batch_size]


# ---- first-token norm ----------------------------------------------------------------------
@dataclass(frozen=True)
class ResidNorms:
    """L2 norm of the residual stream at position 0 vs the other positions, per layer.

    labels: "{l}_resid_pre" for every layer, then "{n_layers-1}_resid_post".
    first: [prompt, site] norm at position 0; rest: [prompt, site] mean norm over positions >= 1.
    """

    labels: list[str]
    first: Float[torch.Tensor, "prompt site"]
    rest: Float[torch.Tensor, "prompt site"]

    def estimates(self) -> dict[str, list[Estimate]]:
        """Bootstrap CIs over prompts: "first", "rest" and "ratio" (mean first / mean rest)."""
        ratio = lambda a, b: float(a.mean() / b.mean())  # noqa: E731
        return {
            "first": [bootstrap(self.first[:, i]) for i in range(len(self.labels))],
            "rest": [bootstrap(self.rest[:, i]) for i in range(len(self.labels))],
            "ratio": [bootstrap(self.first[:, i], ratio, paired=self.rest[:, i]) for i in range(len(self.labels))],
        }

    @property
    def ratio(self) -> Float[torch.Tensor, "site"]:
        """Mean norm at position 0 / mean norm over the other positions, per site."""
        return self.first.mean(0) / self.rest.mean(0)

    def to_frame(self) -> pd.DataFrame:
        """Long format: site, index, position (first/rest/ratio), value, low, high, n."""
        rows = []
        for position, ests in self.estimates().items():
            for i, (label, est) in enumerate(zip(self.labels, ests)):
                rows.append({"site": label, "index": i, "position": position, **est.to_dict()})
        return pd.DataFrame(rows)

    def plot(self):
        """Mean norm per layer (log y): position 0 vs the other positions, with 95% CIs."""
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
        fig.update_layout(title="Residual-stream norm: first token vs the rest", yaxis_title="L2 norm")
        fig.update_yaxes(type="log")
        return fig


@torch.no_grad()
def first_token_norm(
    model, tokens: Int[torch.Tensor, "batch pos"], batch_size: int = 16, progress: bool = False
) -> ResidNorms:
    """Residual-stream L2 norm at position 0 vs the mean over other positions, per layer.

    Sites: resid_pre of every layer and the final resid_post (hooks only on those).

    Example:
        >>> res = first_token_norm(model, tokens)
        >>> res.ratio            # doctest: +SKIP
        >>> res.plot()           # doctest: +SKIP
    """
    tokens = _check(model, tokens, batch_size)
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    labels = [f"{i}_resid_pre" for i in range(n)] + [f"{n - 1}_resid_post"]
    first, rest = [], []
    for batch in _batches(tokens, batch_size, progress, "resid norms"):
        found = {}

        def record(act, hook):
            norms = act.detach().float().norm(dim=-1)  # [batch, pos]
            found[hook.name] = (norms[:, 0].cpu(), norms[:, 1:].mean(1).cpu())

        model.run_with_hooks(batch.to(model.cfg.device), return_type=None,
                             fwd_hooks=[(name, record) for name in names])
        first.append(torch.stack([found[nm][0] for nm in names], 1))
        rest.append(torch.stack([found[nm][1] for nm in names], 1))
    return ResidNorms(labels=labels, first=torch.cat(first), rest=torch.cat(rest))


# ---- attention sinks -----------------------------------------------------------------------
@dataclass(frozen=True)
class SinkRate:
    """Attention to position 0, per head, and the share of heads that are sinks.

    attention_to_first: [layer, head] mean over prompts and query positions >= 1 of the
    attention paid to position 0. rate: share of heads with attention_to_first >= threshold.
    labels: "L{l}H{h}" in row-major [layer, head] order.
    """

    threshold: float
    attention_to_first: Float[torch.Tensor, "layer head"]
    rate: float
    n_prompts: int
    labels: list[str] = field(repr=False)

    @property
    def is_sink(self) -> torch.Tensor:
        """[layer, head] bool: attention_to_first >= threshold."""
        return self.attention_to_first >= self.threshold

    def top(self, k: int = 10) -> list[str]:
        """Labels of the `k` heads with the most attention to position 0."""
        order = torch.argsort(self.attention_to_first.flatten(), descending=True)[:k]
        return [self.labels[int(i)] for i in order]

    def to_frame(self) -> pd.DataFrame:
        """One row per head: label, layer, head, attention_to_first, is_sink."""
        L, H = self.attention_to_first.shape
        return pd.DataFrame(
            {
                "label": self.labels,
                "layer": np.repeat(np.arange(L), H),
                "head": np.tile(np.arange(H), L),
                "attention_to_first": self.attention_to_first.flatten().numpy(),
                "is_sink": self.is_sink.flatten().numpy(),
            }
        )

    def plot(self):
        """Heatmap [layer, head] of the mean attention to position 0."""
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Heatmap(z=self.attention_to_first.numpy(), zmin=0, zmax=1, colorscale="Blues",
                       colorbar=dict(title="attn to pos 0"))
        )
        fig.update_layout(
            title=f"Attention to position 0 (sink rate {self.rate:.1%} at threshold {self.threshold})",
            xaxis_title="head", yaxis_title="layer",
        )
        return fig


@torch.no_grad()
def attention_sink_rate(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    threshold: float = 0.3,
    batch_size: int = 16,
    progress: bool = False,
) -> SinkRate:
    """Per-head mean attention to position 0 (query positions >= 1) and the share of sink heads.

    Example:
        >>> sinks = attention_sink_rate(model, tokens, threshold=0.3)
        >>> sinks.rate, sinks.top(3)       # doctest: +SKIP
    """
    tokens = _check(model, tokens, batch_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    n = model.cfg.n_layers
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]
    total = torch.zeros(n, model.cfg.n_heads, dtype=torch.float64)

    def record(act, hook):  # act: [batch, head, query, key]
        layer = int(hook.name.split(".")[1])
        total[layer] += act[:, :, 1:, 0].double().mean(-1).sum(0).cpu()

    for batch in _batches(tokens, batch_size, progress, "attention sinks"):
        model.run_with_hooks(batch.to(model.cfg.device), return_type=None,
                             fwd_hooks=[(name, record) for name in names])
    attn = (total / tokens.shape[0]).float()
    return SinkRate(
        threshold=float(threshold), attention_to_first=attn, rate=float((attn >= threshold).float().mean()),
        n_prompts=tokens.shape[0],
        labels=[f"L{l}H{h}" for l in range(n) for h in range(model.cfg.n_heads)],
    )
