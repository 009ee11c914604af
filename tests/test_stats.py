"""lnfree.stats: the clustered bootstrap against a brute-force one, NaN resamples, small-n reprs, settings."""

import numpy as np
import pytest

from lnfree.stats import Estimate, bootstrap, check_bootstrap_args


def _brute(x, ids, statistic, n_boot, seed, level=0.95, paired=None):
    """Cluster bootstrap written out: draw cluster labels, gather their rows one cluster at a time."""
    labels = sorted(set(ids))
    rows_of = {c: [i for i, j in enumerate(ids) if j == c] for c in labels}
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    boots = []
    for d in draws:
        rows = [r for c in d for r in rows_of[labels[c]]]
        boots.append(statistic(x[rows]) if paired is None else statistic(x[rows], paired[rows]))
    return np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])


def _sequences(n_seq=12, seed=1):
    """Unequal-length sequences whose tokens share a per-sequence offset (correlated within a sequence)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, 9, n_seq)
    ids = np.repeat(np.arange(n_seq) * 7 + 3, lens)  # non-contiguous ids
    x = np.repeat(rng.normal(0, 1, n_seq), lens) + rng.normal(0, 0.1, lens.sum())
    perm = rng.permutation(len(x))  # a cluster's rows need not be adjacent
    return x[perm], ids[perm]


def test_clustered_mean_matches_brute_force_and_counts_clusters():
    x, ids = _sequences()
    est = bootstrap(x, clusters=ids, n_boot=300, seed=4)
    low, high = _brute(x, list(ids), np.mean, 300, 4)
    assert est.n == 12 and est.value == pytest.approx(x.mean())
    assert est.low == pytest.approx(low, abs=1e-12) and est.high == pytest.approx(high, abs=1e-12)


def test_clustered_paired_statistic_matches_brute_force():
    x, ids = _sequences(seed=2)
    y = np.abs(x) + 1.0
    ratio = lambda a, b: a.mean() / b.mean()  # noqa: E731
    est = bootstrap(x, ratio, paired=y, clusters=ids, n_boot=200, seed=0)
    low, high = _brute(x, list(ids), ratio, 200, 0, paired=y)
    assert (est.low, est.high) == pytest.approx((low, high), abs=1e-12)


def test_clustered_ci_is_wider_than_a_token_level_one_on_correlated_tokens():
    x, ids = _sequences(n_seq=40)
    tokens = bootstrap(x, n_boot=500)
    seqs = bootstrap(x, clusters=ids, n_boot=500)
    assert (seqs.high - seqs.low) > 2 * (tokens.high - tokens.low)  # ~sqrt(tokens per sequence) wider


def test_one_cluster_per_row_is_the_plain_bootstrap():
    x = np.random.default_rng(0).normal(size=30)
    a, b = bootstrap(x, n_boot=200), bootstrap(x, clusters=np.arange(30), n_boot=200)
    assert (a.low, a.high, a.n) == (b.low, b.high, b.n)


def test_nan_resamples_are_counted_and_too_many_refused():
    x = np.array([1.0] * 19 + [2.0])  # a resample without the 2 has zero variance
    cv = lambda a: a.mean() / a.std() if a.std() > 0 else float("nan")  # noqa: E731
    with pytest.raises(ValueError, match=r"of 400 bootstrap resamples gave a non-finite statistic \(more than 5%\)"):
        bootstrap(x, cv, n_boot=400)
    y = np.array([1.0] * 60 + [2.0] * 5)  # P(no 2 in a resample) = (60/65)^65 ~ 0.6%
    est = bootstrap(y, cv, n_boot=1000)
    assert 0 < est.n_nan <= 50 and "NaN resamples dropped" in str(est) and est.to_dict()["n_nan"] == est.n_nan
    assert np.isfinite(est.low) and np.isfinite(est.high)


def test_an_undefined_statistic_gives_no_ci_rather_than_an_error():
    est = bootstrap(np.ones(10), lambda a: float("nan"), n_boot=50)
    assert np.isnan(est.value) and np.isnan(est.low) and est.n_nan == 50


def test_fewer_than_five_units_print_no_bracket():
    est = bootstrap(np.arange(8.0), clusters=[0, 0, 1, 1, 2, 2, 3, 3], n_boot=100)
    assert est.n == 4 and np.isfinite(est.low)
    assert str(est) == "3.5 [no reliable CI: n=4 < 5]" and f"{est:.1f}" == "3.5 [no reliable CI: n=4 < 5]"
    assert str(Estimate(0.5, 0.4, 0.6, 5)) == "0.5 [0.4, 0.6]"


def test_cluster_ids_must_match_the_samples():
    with pytest.raises(ValueError, match=r"clusters must give one id per sample \(shape \(4,\)\), got shape \(3,\)"):
        bootstrap(np.arange(4.0), clusters=[0, 1, 1])


@pytest.mark.parametrize("args, msg", [
    ((0, 0.95, 0), "n_boot must be a positive int"), ((True, 0.95, 0), "n_boot must be a positive int"),
    ((10, 1.0, 0), r"level must be a confidence level in \(0, 1\)"), ((10, 0.9, -1), "seed must be a non-negative int"),
    ((10, 0.9, 1.5), "seed must be a non-negative int"), ((10, 0.9, False), "seed must be a non-negative int"),
])
def test_check_bootstrap_args_one_set_of_rules(args, msg):
    with pytest.raises(ValueError, match=msg):
        check_bootstrap_args(*args)
    assert check_bootstrap_args(np.int64(5), 0.9, np.int64(2)) == (5, 0.9, 2)
