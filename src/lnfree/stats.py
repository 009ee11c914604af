"""Bootstrap confidence intervals: the one helper every analysis uses to report a mean.

Resampling unit: rows of `samples` are resampled independently unless ``clusters=`` gives each
row a cluster id (its sequence or prompt); then whole clusters are drawn, so tokens of one
sequence, which are correlated, move together. A statistic that pools tokens must be
bootstrapped over its sequences (or prompts), never over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

#: a percentile CI from fewer independent units than this is not reported as a bracket.
MIN_UNITS = 5
#: resamples whose statistic is NaN are dropped and counted; above this share the CI is refused.
MAX_NAN_SHARE = 0.05


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap confidence interval.

    n: the independent units resampled (samples, or clusters: sequences / prompts); n_nan:
    resamples whose statistic was NaN, dropped from the percentiles (at most 5% of them).
    """

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95
    n_nan: int = 0

    def _bracket(self, fmt: Callable[[float], str]) -> str:
        if self.n < 2:  # one sample has no spread: say so rather than print [x, x]
            return f"[no CI: n={self.n}]"
        if self.n < MIN_UNITS:  # a percentile bootstrap of 2-4 units is not a CI worth printing
            return f"[no reliable CI: n={self.n} < {MIN_UNITS}]"
        text = f"[{fmt(self.low)}, {fmt(self.high)}]"
        return text + (f" ({self.n_nan} NaN resamples dropped)" if self.n_nan else "")

    def __str__(self) -> str:
        fmt = lambda v: f"{v:.4g}"  # noqa: E731
        return f"{fmt(self.value)} {self._bracket(fmt)}"

    def __float__(self) -> float:
        return float(self.value)

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(self)
        fmt = lambda v: format(v, spec)  # noqa: E731
        return f"{fmt(self.value)} {self._bracket(fmt)}"

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "n_nan": self.n_nan}


def check_bootstrap_args(n_boot, level, seed) -> tuple[int, float, int]:
    """Validated bootstrap settings (n_boot >= 1, level in (0, 1), seed >= 0), as (int, float, int).

    The one check of these settings: `bootstrap` and every analysis that stores them call it.

    Example:
        >>> check_bootstrap_args(1000, 0.95, 0)
        (1000, 0.95, 0)
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int (bootstrap resamples), got {n_boot!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
        raise ValueError(f"level must be a confidence level in (0, 1), e.g. 0.95; got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (numpy's generator seed), got {seed!r}")
    return int(n_boot), float(level), int(seed)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class _Clusters:
    """Rows grouped by cluster id: draw whole clusters, get the rows' indices."""

    def __init__(self, ids, n_rows: int):
        ids = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if ids.shape != (n_rows,):
            raise ValueError(f"clusters must give one id per sample (shape ({n_rows},)), got shape {ids.shape}")
        _, inverse = np.unique(ids, return_inverse=True)
        self.order = np.argsort(inverse, kind="stable")  # rows sorted by cluster
        self.sizes = np.bincount(inverse)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.inverse = inverse

    @property
    def n(self) -> int:
        return len(self.sizes)

    def rows(self, draw: np.ndarray) -> np.ndarray:
        """Indices of every row of the drawn clusters (a cluster drawn twice counts twice)."""
        sizes = self.sizes[draw]
        ends = np.cumsum(sizes)
        offsets = np.repeat(self.starts[draw] - (ends - sizes), sizes) + np.arange(ends[-1] if len(ends) else 0)
        return self.order[offsets]


def _percentiles(boots: np.ndarray, value, level: float, n: int) -> Estimate:
    """The CI from the resamples' statistics, counting (and bounding) the NaN ones."""
    bad = ~np.isfinite(boots.reshape(len(boots), -1)).all(1)
    n_nan = int(bad.sum())
    if not np.all(np.isfinite(value)):  # the statistic itself is undefined: no CI either
        return Estimate(float(value), float("nan"), float("nan"), n, level, n_nan)
    if n_nan > MAX_NAN_SHARE * len(boots):
        raise ValueError(f"{n_nan} of {len(boots)} bootstrap resamples gave a non-finite statistic (more than "
                         f"{MAX_NAN_SHARE:.0%}): the statistic is undefined on part of the resampled data (e.g. a "
                         f"ratio whose denominator can be 0, a correlation of constant values); use more "
                         f"samples/clusters or a statistic defined on every resample")
    alpha = (1 - level) / 2
    low, high = np.quantile(boots[~bad], [alpha, 1 - alpha])
    return Estimate(float(value), float(low), float(high), n, level, n_nan)


def bootstrap(
    samples,
    statistic: Optional[Callable[..., float]] = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired=None,
    clusters=None,
) -> Estimate:
    """Percentile bootstrap CI of `statistic` over the first axis of `samples`.

    `statistic(samples)` defaults to the mean. With `paired`, resampling draws the same rows
    of both arrays and calls `statistic(samples, paired)` (e.g. a ratio of means, as in NMAE).
    With `clusters` (one id per row: the row's sequence or prompt) whole clusters are drawn
    with replacement and the statistic sees every row of the drawn clusters; ``n`` is then
    the number of clusters. Resamples whose statistic is NaN are dropped and counted
    (``Estimate.n_nan``); more than 5% of them is an error.

    Example:
        >>> est = bootstrap(np.arange(100.0))
        >>> round(est.value, 1), est.low < 49.5 < est.high
        (49.5, True)
        >>> tokens = np.array([1.0, 1.1, 0.9, 5.0, 5.2, 3.0, 3.1, 2.0, 2.2, 4.0])
        >>> bootstrap(tokens, clusters=[0, 0, 0, 1, 1, 2, 2, 3, 3, 4]).n   # 5 sequences
        5
    """
    x = _as_numpy(samples)
    if x.shape[0] == 0:
        raise ValueError("bootstrap needs at least one sample, got an empty array")
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    y = None if paired is None else _as_numpy(paired)
    for name, a in (("samples", x), ("paired", y)):
        if a is not None and not np.isfinite(a).all():  # a NaN would give a NaN value with a finite CI
            raise ValueError(f"{name} contain {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf); "
                             "a mean with a confidence interval is undefined")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"paired samples must have the same length: {x.shape[0]} vs {y.shape[0]}")
    groups = None if clusters is None else _Clusters(clusters, x.shape[0])
    plain_mean = statistic is None
    if plain_mean:
        if y is not None:
            raise ValueError("paired bootstrap needs a statistic(samples, paired)")
        statistic = lambda a: float(a.mean(axis=0)) if a.ndim == 1 else a.mean(axis=0)  # noqa: E731
    value = statistic(x) if y is None else statistic(x, y)
    n = x.shape[0] if groups is None else groups.n
    if n < 2:  # a CI needs at least two units; nan bounds say so (str shows "no CI")
        return Estimate(float(value), float("nan"), float("nan"), int(n), level)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if plain_mean and x.ndim == 1:
        if groups is None:
            boots = x[draws].mean(axis=1)
        else:  # pooled mean of the drawn clusters' rows, from per-cluster sums
            sums = np.bincount(groups.inverse, weights=x)
            boots = sums[draws].sum(1) / groups.sizes[draws].sum(1)
    else:
        rows = draws if groups is None else [groups.rows(d) for d in draws]
        boots = np.array([statistic(x[i]) if y is None else statistic(x[i], y[i]) for i in rows])
    return _percentiles(boots, value, level, int(n))


def mean_ci(samples, **kwargs) -> Estimate:
    """Mean with a bootstrap confidence interval (shorthand for `bootstrap(samples)`)."""
    return bootstrap(samples, **kwargs)
