"""Replication statistics: t quantiles, t-intervals, MSER-5."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sim.metrics.stats import mser5, t975, t_interval


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                          (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)])
def test_t975_matches_tables(df, expected):
    assert t975(df) == pytest.approx(expected, abs=1e-4)


def test_t_interval_by_hand():
    mean, low, high = t_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 3.1824 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))


def test_t_interval_with_one_value_has_no_width():
    mean, low, high = t_interval(np.array([7.0]))
    assert mean == 7.0 and math.isnan(low) and math.isnan(high)


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    samples = rng.exponential(1.0, size=(4000, 5))
    covered = sum(low <= 1.0 <= high for _, low, high in map(t_interval, samples))
    # Exponential data are skewed, so coverage of a t-interval is a little under 95%.
    assert 0.88 < covered / 4000 < 0.96


def test_mser5_finds_an_initial_transient():
    rng = np.random.default_rng(3)
    transient = np.linspace(50, 10, 500) + rng.normal(0, 1, 500)
    steady = 10 + rng.normal(0, 1, 5000)
    cut = mser5(np.concatenate([transient, steady]))
    assert 400 <= cut <= 700
    assert cut % 5 == 0


def test_mser5_keeps_a_stationary_series():
    rng = np.random.default_rng(4)
    assert mser5(10 + rng.normal(0, 1, 5000)) < 500
    assert mser5(np.ones(3)) == 0


def test_p95_by_bucket_is_np_percentile_to_the_bit():
    # The time series' per-interval p95, computed for all intervals at once, must equal np.percentile per
    # interval exactly: ties, NaN (the interval's p95 is NaN), one value, empty intervals, wide magnitudes.
    from sim.metrics.timeseries import _p95_by_bucket

    rng = np.random.default_rng(0)
    for _ in range(2000):
        size, n = int(rng.integers(0, 60)), int(rng.integers(1, 12))
        values = rng.lognormal(0, 2, size) * 10.0 ** int(rng.integers(-5, 5))
        if size and rng.random() < 0.2:
            values[rng.integers(0, size)] = np.nan
        if rng.random() < 0.2:
            values = np.round(values, 1)
        bucket = rng.integers(0, n, size)
        expected = np.array([np.percentile(values[bucket == k], 95) if (bucket == k).any() else np.nan
                             for k in range(n)])
        assert np.array_equal(_p95_by_bucket(values, bucket, n), expected, equal_nan=True)
