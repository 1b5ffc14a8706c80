"""Every distribution: its parameters, its mean, and the moments of its samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from sim.config.distributions import Z95, Distribution

parse = TypeAdapter(Distribution).validate_python
N = 200_000


def draws(spec, n=N, seed=0):
    return spec.sample(np.random.default_rng(seed), n)


@pytest.mark.parametrize("raw, mean, sd", [
    (3.5, 3.5, 0.0),
    ({"kind": "constant", "value": 2}, 2.0, 0.0),
    ({"kind": "exponential", "mean": 2}, 2.0, 2.0),
    ({"kind": "uniform", "low": 1, "high": 3}, 2.0, 2 / math.sqrt(12)),
    ({"kind": "gamma", "mean": 4, "cv": 0.5}, 4.0, 2.0),
    ({"kind": "lognormal", "mu": 0.0, "sigma": 0.5}, math.exp(0.125), math.sqrt((math.exp(0.25) - 1) * math.exp(0.25))),
    ({"kind": "normal", "mean": 10, "sd": 2}, 10.0, 2.0),
    ({"kind": "empirical", "values": [1, 2, 3, 4]}, 2.5, math.sqrt(1.25)),
])
def test_sample_moments_match(raw, mean, sd):
    spec = parse(raw)
    x = draws(spec)
    assert spec.mean == pytest.approx(mean, rel=1e-6)  # the normal is truncated 5 sd below its mean
    # Four standard errors: a correct sampler fails this about once in 16,000 seeds.
    assert x.mean() == pytest.approx(mean, abs=4 * sd / math.sqrt(N) + 1e-12)
    assert x.std() == pytest.approx(sd, rel=0.02, abs=1e-12)


def test_normal_is_truncated_at_zero_and_its_mean_follows():
    spec = parse({"kind": "normal", "mean": 1, "sd": 2})
    x = draws(spec)
    assert x.min() >= 0
    # Mean of N(1, 2^2) conditioned on > 0: 1 + 2 phi(0.5) / Phi(0.5) = 1 + 2 * 0.352065 / 0.691462.
    assert spec.mean == pytest.approx(2.018321, abs=1e-6)
    assert x.mean() == pytest.approx(spec.mean, abs=0.01)


def test_lognormal_by_mean_and_p95():
    spec = parse({"kind": "lognormal", "mean": 100, "p95": 250})
    assert spec.mean == pytest.approx(100)
    assert math.exp(spec.mu + Z95 * spec.sigma) == pytest.approx(250)
    x = draws(spec)
    assert np.percentile(x, 95) == pytest.approx(250, rel=0.01)


def test_lognormal_by_median_and_p95():
    spec = parse({"kind": "lognormal", "median": 1020, "p95": 4083})
    x = draws(spec)
    assert np.median(x) == pytest.approx(1020, rel=0.01)
    assert np.percentile(x, 95) == pytest.approx(4083, rel=0.02)


@pytest.mark.parametrize("raw, message", [
    ({"kind": "lognormal", "mean": 100, "p95": 50}, "must be above the mean"),
    ({"kind": "lognormal", "mean": 100, "p95": 1000}, "p95/mean must be at most"),
    ({"kind": "lognormal", "mean": 100}, "give either"),
    ({"kind": "uniform", "low": 3, "high": 1}, "must be greater than low"),
    ({"kind": "exponential", "mean": -1}, "greater than 0"),
    ({"kind": "empirical"}, "give either values or csv"),
    ({"kind": "empirical", "values": [1, -1]}, "non-negative"),
])
def test_bad_parameters_are_refused(raw, message):
    with pytest.raises(ValidationError, match=message):
        parse(raw)


def test_empirical_from_csv(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,10\n2,20\n3,30\n")
    spec = TypeAdapter(Distribution).validate_python(
        {"kind": "empirical", "csv": "t.csv", "column": "b"}, context={"base_dir": str(tmp_path)})
    assert set(draws(spec, 1000).tolist()) == {10.0, 20.0, 30.0}
    assert spec.mean == pytest.approx(20.0)


def test_same_seed_same_draws():
    spec = parse({"kind": "gamma", "mean": 1, "cv": 2})
    assert np.array_equal(draws(spec, 100, seed=5), draws(spec, 100, seed=5))
