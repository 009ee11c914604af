"""The paper's summary statistics: its crossed bootstrap for NMAE, percentile ranges, median [IQR]."""

from __future__ import annotations

import numpy as np

from lnfree._checks import check_level
from lnfree.stats import Estimate, check_bootstrap_args

#: run_analysis.py:217 adds this to NMAE's denominator.
NMAE_EPS = 1e-10


def nmae_pooled(dla: np.ndarray, de: np.ndarray) -> float:
    """100 * mean|DLA - DE| / (mean|DE| + 1e-10), pooled over every entry (run_analysis.py:227-230)."""
    return float(100.0 * np.abs(dla - de).mean() / (np.abs(de).mean() + NMAE_EPS))


def crossed_bootstrap_nmae(dla, de, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """NMAE with the paper's CI (run_analysis.py:358-408): each resample draws heads and samples
    with replacement, independently, and keeps their cross product; percentile interval.

    `dla`, `de`: [head, sample]. The paper draws from numpy's unseeded global state; here a
    seeded ``default_rng(seed)``, so the interval is reproducible (its endpoints differ from any
    one run of the paper's code by resampling noise only).
    """
    n_boot, level, seed = check_bootstrap_args(n_boot, level, seed)
    dla, de = np.asarray(dla, dtype=np.float64), np.asarray(de, dtype=np.float64)
    if dla.ndim != 2 or dla.shape != de.shape:
        raise ValueError(f"dla and de must both be [head, sample]; got {dla.shape} and {de.shape}")
    value = nmae_pooled(dla, de)
    H, N = dla.shape
    if H * N < 2:
        return Estimate(value, float("nan"), float("nan"), int(N), level)
    rng = np.random.default_rng(seed)
    err, mag = np.abs(dla - de), np.abs(de)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        h, s = rng.integers(0, H, H), rng.integers(0, N, N)
        boots[i] = 100.0 * err[h][:, s].mean() / (mag[h][:, s].mean() + NMAE_EPS)
    alpha = 100 * (1 - level) / 2
    low, high = np.percentile(boots, [alpha, 100 - alpha])
    return Estimate(value, float(low), float(high), int(N), level)


def percentile_range(values, *, level: float = 0.95) -> Estimate:
    """Mean of `values` with the central `level` percentile range of the values themselves (not a
    CI of the mean): what sink_rate.py:209-211 prints as "95% CI"."""
    level = check_level(level)
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("percentile_range needs at least one value")
    alpha = 100 * (1 - level) / 2
    low, high = np.percentile(v, [alpha, 100 - alpha])
    return Estimate(float(v.mean()), float(low), float(high), int(v.size), level)


def median_iqr(values) -> Estimate:
    """Median with the interquartile range as (low, high), level 0.5 (ablate_all_models.py:486-495)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("median_iqr needs at least one value")
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return Estimate(float(med), float(q1), float(q3), int(v.size), 0.5)
