"""Held-out next-token cross-entropy with a bootstrap confidence interval, and bits per byte.

Used before and after LN removal (`lnfree.removal`), and by anyone comparing models
(`compare_cross_entropy`: the paired gap, Table 1 of the paper). Padded batches: pass
``attention_mask=`` (or a `TokenBatch` from `lnfree.tokenize`); only predictions whose position
and target are both real tokens are scored, so each row scores as it would alone.
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree import _checks
from lnfree._results import Result, result
from lnfree.stats import Estimate, bootstrap, check_bootstrap_args


def _token_mean(nll_sums: np.ndarray, counts: np.ndarray) -> float:
    """Mean CE per token over a set of sequences: total nats / total tokens."""
    return float(nll_sums.sum() / counts.sum())


@result
class CEResult(Result):
    """Mean next-token cross-entropy (nats/token) over a token set.

    Attributes:
        mean: mean CE over every counted token, with a bootstrap CI over sequences.
        per_sequence: ``Float[Tensor, "n_seq"]`` (float64) mean CE of each sequence (its own counted tokens).
        tokens_per_sequence: ``Int[Tensor, "n_seq"]`` predictions counted in each sequence.
        labels: ``seq{i}`` for each sequence.
        n_tokens: number of predicted tokens counted.
        batch_size, exclude_position_0, seq_len, padded, n_boot, level, seed: the settings used.
        model_name, model_id: which model produced this.
    """

    mean: Estimate
    per_sequence: Float[torch.Tensor, "n_seq"]
    tokens_per_sequence: Int[torch.Tensor, "n_seq"]
    labels: tuple[str, ...]
    n_tokens: int
    batch_size: int = 16
    exclude_position_0: bool = False
    seq_len: int = 0
    padded: bool = False
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    model_name: str = "model"
    model_id: str = ""

    @property
    def value(self) -> float:
        return self.mean.value

    def bits_per_byte(self, n_bytes: int) -> Estimate:
        """Bits per byte, given the number of text bytes the counted tokens cover.

        ``total nats / ln 2 / n_bytes``, with the CI mapped the same way.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, np.integer)) or n_bytes <= 0:
            raise ValueError(f"n_bytes must be a positive int (bytes of text predicted), got {n_bytes!r}")
        k = self.n_tokens / (math.log(2) * int(n_bytes))
        m = self.mean
        return Estimate(m.value * k, m.low * k, m.high * k, m.n, m.level)

    def to_frame(self) -> pd.DataFrame:
        """One row per sequence: sequence label, metric ("cross_entropy") and its mean CE (nats/token)."""
        return pd.DataFrame({"sequence": list(self.labels), "metric": "cross_entropy",
                             "value": self.per_sequence.double().numpy()})

    def plot(self):
        """Per-sequence CE (points) and the mean with its CI, on an axis fitted to the data (not from 0)."""
        import plotly.graph_objects as go

        per = self.per_sequence.double().numpy()
        fig = go.Figure()
        fig.add_trace(go.Box(y=per, name="sequences", boxpoints="all", jitter=0.4, pointpos=0,
                             marker=dict(size=4, opacity=0.5), line=dict(width=1), fillcolor="rgba(0,0,0,0)"))
        fig.add_trace(_mean_trace(self.mean, "mean", x="mean"))
        fig.update_layout(title=f"{self.model_name}: cross-entropy {self.mean} nats/token "
                                f"({self.level:.0%} CI over {self.mean.n} sequences)",
                          xaxis_title="", yaxis_title="cross-entropy (nats/token)", showlegend=False)
        fig.update_yaxes(range=_tight([per.min(), per.max(), self.mean.low, self.mean.high]))
        return fig

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k sequences with the highest CE (frame rows)."""
        return self.to_frame().nlargest(_checks.positive_int(k, "k"), "value")

    def __str__(self) -> str:
        return f"CE {self.mean} nats/token over {self.n_tokens} tokens"


@result
class CEComparison(Result):
    """Cross-entropy of two models on the same tokens, and their paired difference.

    Attributes:
        names: display names of the two models; a, b: their `CEResult`s.
        n_boot, level, seed: bootstrap settings of `difference`.
    """

    names: tuple[str, str]
    a: CEResult
    b: CEResult
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0

    _headline: ClassVar[tuple[str, ...]] = ("difference",)

    def difference(self) -> Estimate:
        """CE of a minus CE of b (nats/token), with a paired bootstrap CI over sequences (the same
        sequences resampled for both models, so the shared difficulty of a text cancels)."""
        counts = self.a.tokens_per_sequence.double().numpy()
        x = np.stack([self.a.per_sequence.double().numpy() * counts, self.b.per_sequence.double().numpy() * counts,
                      counts], 1)
        return bootstrap(x, lambda s: _token_mean(s[:, 0], s[:, 2]) - _token_mean(s[:, 1], s[:, 2]),
                         n_boot=self.n_boot, level=self.level, seed=self.seed)

    def to_frame(self) -> pd.DataFrame:
        """Long format: model, sequence, metric, value (per-sequence CE of both models)."""
        return pd.concat([r.to_frame().assign(model=n) for n, r in zip(self.names, (self.a, self.b))],
                         ignore_index=True)[["model", "sequence", "metric", "value"]]

    def plot(self):
        """Both models' mean CE with CIs on a tight axis (a 0.04-nat gap stays visible), and the
        paired difference with its CI."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        diff = self.difference()
        fig = make_subplots(rows=1, cols=2, subplot_titles=["mean cross-entropy", f"{self.names[0]} minus {self.names[1]}"])
        for name, res in zip(self.names, (self.a, self.b)):
            fig.add_trace(_mean_trace(res.mean, name, x=name), row=1, col=1)
        fig.add_trace(_mean_trace(diff, "difference", x="difference"), row=1, col=2)
        fig.add_hline(y=0, line_dash="dash", line_color="gray", row=1, col=2)
        lo = [v for r in (self.a, self.b) for v in (r.mean.low, r.mean.high, r.mean.value)]
        fig.update_yaxes(title_text="cross-entropy (nats/token)", range=_tight(lo), row=1, col=1)
        fig.update_yaxes(title_text="difference (nats/token)", range=_tight([diff.low, diff.high, diff.value, 0.0]),
                         row=1, col=2)
        fig.update_xaxes(title_text="model", row=1, col=1)
        fig.update_xaxes(title_text="paired difference", row=1, col=2)
        fig.update_layout(title=f"Cross-entropy: {self.names[0]} vs {self.names[1]} ({self.level:.0%} bootstrap CIs)",
                          showlegend=False)
        return fig


def _mean_trace(est: Estimate, name: str, x: str):
    import plotly.graph_objects as go

    low, high = (est.low, est.high) if est.n >= 2 else (est.value, est.value)
    return go.Scatter(x=[x], y=[est.value], name=name, mode="markers", marker=dict(size=10, color="black"),
                      error_y=dict(type="data", symmetric=False, array=[high - est.value], arrayminus=[est.value - low]))


def _tight(values) -> list[float]:
    """An axis range around finite values with a 15% margin (never forced to start at 0)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    lo, hi = float(v.min()), float(v.max())
    pad = 0.15 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.01
    return [lo - pad, hi + pad]


@torch.no_grad()
def cross_entropy(
    model,
    tokens: Union[Int[torch.Tensor, "batch pos"], _checks.TokenBatch],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    batch_size: int = 16,
    exclude_position_0: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> CEResult:
    """Next-token cross-entropy of `model` (any HookedTransformer) on `tokens`.

    The prediction made at position p is scored against token p+1. `exclude_position_0` drops the
    prediction made at each row's first (real) token, the one that sees a single token. With
    ``attention_mask`` (1 = real token; left or right padding), the forward pass uses the mask and
    only predictions whose position and target are both real count. The mean is per token (total
    nats / counted tokens); the CI resamples whole sequences.

    Example:
        >>> res = cross_entropy(model, tokens)                # doctest: +SKIP
        >>> print(res.mean, res.bits_per_byte(n_bytes=4 * tokens[:, 1:].numel()))  # doctest: +SKIP
        >>> batch = lnfree.tokenize(model, ["It was a fine morning.", "A much longer sentence."])  # doctest: +SKIP
        >>> cross_entropy(model, batch).per_sequence          # each sentence's own CE  # doctest: +SKIP
    """
    model = _check_model(model)
    tokens, mask = _checks.resolve_batch(model, tokens, attention_mask)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    counted = _counted(tokens, mask, bool(exclude_position_0))
    device = _device(model)
    was_training = model.training
    model.eval()
    sums = []
    try:
        for sl in _checks.batches(tokens.shape[0], batch_size, enabled=progress, desc="cross-entropy"):
            batch = tokens[sl].to(device)
            kw = {k: v.to(device) for k, v in _checks.forward_kwargs(model, batch, None if mask is None else mask[sl]).items()}
            logits = model(batch, return_type="logits", **kw)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None])[..., 0].double()
            sums.append(torch.where(counted[sl].to(device), nll, 0.0).sum(-1).cpu())  # padded logits may be anything
            del logits, logp
    finally:
        model.train(was_training)
    sums = torch.cat(sums)
    counts = counted.sum(-1)
    per_seq = sums / counts
    boot = np.stack([sums.numpy(), counts.double().numpy()], 1)
    return CEResult(
        mean=bootstrap(boot, lambda x: _token_mean(x[:, 0], x[:, 1]), n_boot=n_boot, level=level, seed=seed),
        per_sequence=per_seq, tokens_per_sequence=counts, labels=tuple(f"seq{i}" for i in range(len(sums))),
        n_tokens=int(counts.sum()), batch_size=batch_size, exclude_position_0=bool(exclude_position_0),
        seq_len=int(tokens.shape[1]), padded=mask is not None, n_boot=n_boot, level=level, seed=seed,
        model_name=_checks.model_label(model), model_id=_checks.model_id(model),
    )


def compare_cross_entropy(
    model_a,
    model_b,
    tokens: Union[Int[torch.Tensor, "batch pos"], _checks.TokenBatch],
    *,
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    names: Optional[tuple[str, str]] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    **kwargs,
) -> CEComparison:
    """`cross_entropy` of two models on the same tokens, with the paired difference a - b.

    Names come from the models unless ``names=`` is given; ``kwargs`` go to `cross_entropy`.

    Example:
        >>> cmp = compare_cross_entropy(ln_free, ln_model, tokens)     # doctest: +SKIP
        >>> print(cmp.difference())                                   # doctest: +SKIP
        0.04 [0.03, 0.05]
    """
    names = _checks.compare_names(model_a, model_b, names)
    _checks.check_same_vocab(model_a, model_b, ("model_a", "model_b"))
    boot = {"n_boot": n_boot, "level": level, "seed": seed}
    a = cross_entropy(model_a, tokens, attention_mask=attention_mask, **boot, **kwargs)
    b = cross_entropy(model_b, tokens, attention_mask=attention_mask, **boot, **kwargs)
    return CEComparison(names=names, a=a, b=b, **boot)


def _counted(tokens: torch.Tensor, mask: Optional[torch.Tensor], exclude_position_0: bool) -> torch.Tensor:
    """[batch, pos - 1] bool: which predictions (position t -> token t + 1) are scored."""
    n, seq = tokens.shape
    if mask is None:
        mask = torch.ones(n, seq, dtype=torch.bool)
    mask = mask.cpu()
    counted = _checks.next_token_mask(mask)
    if exclude_position_0:  # the prediction made at each row's first real token
        first = mask.int().argmax(1)
        counted = counted & (torch.arange(seq - 1)[None] != first[:, None])
    per_row = counted.sum(-1)
    if bool((per_row == 0).any()):
        if not mask.all():
            rows = torch.nonzero(per_row == 0).flatten().tolist()
            raise ValueError(f"rows {rows} have too few real tokens to score a prediction "
                             f"(exclude_position_0={exclude_position_0}); each row needs "
                             f"{3 if exclude_position_0 else 2} real tokens")
        raise ValueError(f"sequences of {seq} tokens leave no prediction to score "
                         f"(exclude_position_0={exclude_position_0})")
    return counted


def _check_model(model):
    """Any HookedTransformer; an `LNFreeTransformer` also passes the shared-config guard."""
    from transformer_lens import HookedTransformer

    from lnfree.model import LNFreeTransformer, as_lnfree

    if isinstance(model, LNFreeTransformer):
        return as_lnfree(model)
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"model must be a HookedTransformer / LNFreeTransformer, got {type(model).__name__}")
    return model


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
