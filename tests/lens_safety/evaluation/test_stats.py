"""Bootstrap intervals: coverage on synthetic data, scipy as a reference, pairing, errors."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lens_safety.evaluation.stats import (
    Interval,
    bootstrap_interval,
    format_interval,
    paired_difference,
    relative_change,
)
from pruning_bridge.common import UsageError

N_ITEMS = 80
N_RUNS = 2000  # Monte Carlo error of the coverage: about 0.005


def _coverage(make_interval, truth: float) -> float:
    """Fraction of runs (fresh data each) whose interval contains ``truth``."""
    hits = 0
    for run in range(N_RUNS):
        interval = make_interval(np.random.default_rng(10_000 + run), run)
        hits += interval.low <= truth <= interval.high
    return hits / N_RUNS


def test_mean_interval_covers_the_true_mean_at_the_stated_rate():
    def make(rng, run):
        return bootstrap_interval(rng.normal(3.0, 2.0, N_ITEMS), n_boot=500, seed=run)

    assert 0.92 <= _coverage(make, 3.0) <= 0.98

    def make_half(rng, run):
        return bootstrap_interval(rng.normal(3.0, 2.0, N_ITEMS), n_boot=500, level=0.5, seed=run)

    assert 0.45 <= _coverage(make_half, 3.0) <= 0.55  # the level is honoured, not just "wide"


def test_paired_interval_covers_a_known_shift():
    def make(rng, run):
        before = rng.normal(0.4, 0.2, N_ITEMS)
        after = before - 0.05 + rng.normal(0.0, 0.1, N_ITEMS)
        return paired_difference(before, after, n_boot=500, seed=run)

    assert 0.92 <= _coverage(make, -0.05) <= 0.98


def test_relative_change_covers_a_known_ratio():
    def make(rng, run):
        before = rng.normal(10.0, 2.0, N_ITEMS)
        after = 0.8 * before + rng.normal(0.0, 1.0, N_ITEMS)  # population ratio: 0.8
        return relative_change(before, after, n_boot=500, seed=run)

    assert 0.92 <= _coverage(make, -0.2) <= 0.98


def test_percentile_interval_matches_scipy():
    values = np.random.default_rng(1).exponential(1.0, 150)
    ours = bootstrap_interval(values, n_boot=20_000, seed=0)
    ref = scipy_stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                                random_state=np.random.default_rng(7)).confidence_interval
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert ours.estimate == pytest.approx(values.mean())
    assert abs(ours.low - ref.low) < 0.15 * se  # Monte Carlo error of a 2.5% quantile: ~0.03 se
    assert abs(ours.high - ref.high) < 0.15 * se  # Monte Carlo error of a 2.5% quantile: ~0.03 se
    assert ours.n == 150 and ours.level == 0.95


def test_median_statistic_and_level():
    values = np.random.default_rng(2).normal(0, 1, 101)
    wide = bootstrap_interval(values, np.median, n_boot=2000, level=0.99)
    narrow = bootstrap_interval(values, np.median, n_boot=2000, level=0.5)
    assert wide.estimate == pytest.approx(np.median(values))
    assert wide.low < narrow.low <= narrow.estimate <= narrow.high < wide.high


def test_paired_is_much_narrower_than_independent_intervals():
    rng = np.random.default_rng(3)
    before = rng.normal(0.5, 0.3, 200)
    after = before - 0.03 + rng.normal(0, 0.01, 200)  # highly correlated with before
    paired = paired_difference(before, after)
    b, a = bootstrap_interval(before), bootstrap_interval(after, seed=1)
    assert paired.excludes_zero and paired.high < 0
    assert a.high > b.low and b.high > a.low  # unpaired: the intervals overlap
    assert paired.width < 0.1 * min(a.width, b.width)
    assert paired.estimate == pytest.approx(after.mean() - before.mean())


def test_deterministic_for_a_seed():
    values = np.arange(30.0)
    assert bootstrap_interval(values, seed=4) == bootstrap_interval(values, seed=4)
    assert bootstrap_interval(values, seed=4) != bootstrap_interval(values, seed=5)


def test_interval_str_json_and_excludes_zero():
    interval = Interval(np.float64(0.1234), 0.101, 0.1449, n=np.int64(12))
    assert str(interval) == "0.123 [0.101, 0.145]"
    assert interval.excludes_zero
    assert not Interval(0.1, -0.01, 0.2).excludes_zero
    assert Interval(-0.1, -0.2, -0.01).excludes_zero
    assert json.loads(json.dumps(interval.to_dict())) == {
        "estimate": 0.1234, "low": 0.101, "high": 0.1449, "level": 0.95, "n": 12}


@pytest.mark.parametrize("values, match", [
    ([], "0 item"),
    ([1.0], "at least 2"),
    ([1.0, float("nan"), 2.0], "NaN"),
    (["a", "b"], "numbers"),
    (3.0, "single number"),
])
def test_bad_values_are_clear_errors(values, match):
    with pytest.raises(UsageError, match=match):
        bootstrap_interval(values)


def test_bad_settings_and_statistic():
    with pytest.raises(UsageError, match="level"):
        bootstrap_interval([1.0, 2.0], level=95)
    with pytest.raises(UsageError, match="n_boot"):
        bootstrap_interval([1.0, 2.0], n_boot=0)
    with pytest.raises(UsageError, match="one number"):
        bootstrap_interval(np.ones((5, 2)))  # np.mean over items leaves one value per column


def test_paired_errors():
    with pytest.raises(UsageError, match="3 and 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(UsageError, match="3 and 2"):
        relative_change([1, 2, 3], [1, 2])
    with pytest.raises(UsageError, match="0 item"):
        paired_difference([], [])
    with pytest.raises(UsageError, match="1-D"):
        paired_difference(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(UsageError, match="mean before is 0"):
        relative_change([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    with pytest.raises(UsageError, match="resamples"):
        relative_change([0.0] * 19 + [1.0], [1.0] * 20, n_boot=500)


def test_chunked_resampling_gives_the_same_interval(monkeypatch):
    import lens_safety.evaluation.stats as stats_module

    values = np.random.default_rng(5).normal(1.0, 1.0, 50)
    whole = bootstrap_interval(values), relative_change(values + 5, values + 6)
    monkeypatch.setattr(stats_module, "_MAX_ELEMENTS", 50 * 7)  # 7 resamples per chunk
    assert (bootstrap_interval(values), relative_change(values + 5, values + 6)) == whole


def test_format_interval_reads_intervals_and_their_json():
    interval = Interval(0.25, 0.19, 0.31, n=100)
    assert format_interval(interval) == "0.250 [0.190, 0.310]" == str(interval)
    assert format_interval(interval.to_dict()) == "0.250 [0.190, 0.310]"
    assert format_interval({"estimate": -0.588, "low": -0.733, "high": -0.418},
                           percent=True) == "-58.8% [-73.3%, -41.8%]"
    assert format_interval(None) == "-"
