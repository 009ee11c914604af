"""Bootstrap confidence intervals: the one helper every analysis uses to report a mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def __str__(self) -> str:
        if self.n < 2:  # one sample has no spread: say so rather than print [x, x]
            return f"{self.value:.4g} [no CI: n={self.n}]"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"

    def __float__(self) -> float:
        return float(self.value)

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(self)
        if self.n < 2:
            return f"{format(self.value, spec)} [no CI: n={self.n}]"
        return f"{format(self.value, spec)} [{format(self.low, spec)}, {format(self.high, spec)}]"

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def bootstrap(
    samples,
    statistic: Optional[Callable[..., float]] = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired=None,
) -> Estimate:
    """Percentile bootstrap CI of `statistic` over the first axis of `samples`.

    `statistic(samples)` defaults to the mean. With `paired`, resampling draws the same rows
    of both arrays and calls `statistic(samples, paired)` (e.g. a ratio of means, as in NMAE).

    Example:
        >>> est = bootstrap(np.arange(100.0))
        >>> round(est.value, 1), est.low < 49.5 < est.high
        (49.5, True)
    """
    x = _as_numpy(samples)
    if x.shape[0] == 0:
        raise ValueError("bootstrap needs at least one sample, got an empty array")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int (bootstrap resamples), got {n_boot!r}")
    y = None if paired is None else _as_numpy(paired)
    for name, a in (("samples", x), ("paired", y)):
        if a is not None and not np.isfinite(a).all():  # a NaN would give a NaN value with a finite CI
            raise ValueError(f"{name} contain {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf); "
                             "a mean with a confidence interval is undefined")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"paired samples must have the same length: {x.shape[0]} vs {y.shape[0]}")
    plain_mean = statistic is None
    if plain_mean:
        if y is not None:
            raise ValueError("paired bootstrap needs a statistic(samples, paired)")
        statistic = lambda a: float(a.mean(axis=0)) if a.ndim == 1 else a.mean(axis=0)  # noqa: E731
    value = statistic(x) if y is None else statistic(x, y)
    if x.shape[0] < 2:  # a CI needs at least two samples; nan bounds say so (str shows "no CI")
        return Estimate(float(value), float("nan"), float("nan"), int(x.shape[0]), level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    if plain_mean and x.ndim == 1:
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([statistic(x[i]) if y is None else statistic(x[i], y[i]) for i in idx])
    alpha = (1 - level) / 2
    low, high = np.nanquantile(boots, [alpha, 1 - alpha])
    return Estimate(float(value), float(low), float(high), int(x.shape[0]), level)


def mean_ci(samples, **kwargs) -> Estimate:
    """Mean with a bootstrap confidence interval (shorthand for `bootstrap(samples)`)."""
    return bootstrap(samples, **kwargs)
