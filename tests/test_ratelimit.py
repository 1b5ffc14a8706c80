"""Rate limits against theory: token buckets, fixed and sliding windows, retries, provider 429s.

Every check reads the per-request records: `admit_s` is when a request
reached a free API slot (the endpoints here never queue, so that is when the
gate let it through), `end_s` of a rate-limited request is when its client
gave up. Bounds are checked on every window at once from the sorted times.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pytest
import simpy
import yaml

import sim
from sim.config.schema import Workload
from sim.experiments.compare import compare
from sim.metrics.recorder import Recorder
from sim.model.offered import offered_utilisation
from sim.model.streams import Streams
from sim.model.traffic.ratelimit import RetryPolicy, build_gate

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-9
NO_RETRY = {"max_attempts": 1}


def workload(classes: dict[str, dict], rate_limits: list[dict] = (), duration: float = 200.0,
             replications: int = 1, seed: int = 1, model: Optional[dict] = None) -> Workload:
    """A workload whose endpoint never queues: admit_s is when the gate let a request through."""
    model = model or {"kind": "api", "concurrency": 100_000, "service_time": 0.01}
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "seed": seed, "replications": replications},
        "traffic": {"classes": classes},
        "models": {"m": model},
        "rate_limits": list(rate_limits),
    })


def poisson(rate: float, **extra: Any) -> dict:
    return {"arrival": {"kind": "poisson", "rate_rps": rate}, "prompt_tokens": 100, "output_tokens": 10, **extra}


def requests(w: Workload) -> pd.DataFrame:
    return sim.run(w).requests


def passed(df: pd.DataFrame) -> np.ndarray:
    """Sorted times at which requests got through the limits."""
    return np.sort(df.loc[df["outcome"] == "completed", "admit_s"].to_numpy())


def bucket_excess(times: np.ndarray, rate: float) -> float:
    """max over every pair i <= j of (j - i + 1) - rate (t_j - t_i): the most any window holds beyond rate x length."""
    k = np.arange(times.size, dtype=float)
    return float(np.max(k + 1 - rate * times - np.minimum.accumulate(k - rate * times)))


def most_in_window(times: np.ndarray, window: float) -> int:
    """The most times in any half-open window [s, s + window)."""
    ends = np.searchsorted(times, times + window - EPS, side="left")  # tolerance for float release times
    return int(np.max(ends - np.arange(times.size)))


# ------------------------------------------------------------------ token bucket


def test_token_bucket_admits_its_rate_in_the_long_run_and_never_more_than_rate_t_plus_burst():
    rate, burst, reps, duration, warm = 5.0, 5.0, 10, 1000.0, 20.0
    w = workload({"c": poisson(3 * rate, retry=NO_RETRY)},
                 [{"kind": "token_bucket", "rate_rps": rate, "burst": burst}], duration, reps)
    df = requests(w)
    rates, excess = [], []
    for _, one in df.groupby("replication"):
        times = passed(one)
        admitted = np.sum(times >= warm)
        # Admissions in [t1, t2) = rate (t2 - t1) + tokens(t1) - tokens(t2) - tokens lost to a full bucket.
        assert abs(admitted - rate * (duration - warm)) <= burst
        rates.append(admitted / (duration - warm))
        excess.append(bucket_excess(times, rate))
    # At 3x its rate the bucket is all but never full, so the long-run admitted rate is `rate`:
    # within 3 standard errors of the mean of the replications (~99% with 9 degrees of freedom).
    rates = np.asarray(rates)
    stderr = rates.std(ddof=1) / math.sqrt(reps)
    assert 0 < stderr < 0.001 * rate
    assert abs(rates.mean() - rate) <= 3 * stderr, (rates.mean(), stderr)
    # No window holds more than rate x length + burst; a full bucket at the start comes close.
    assert max(excess) <= burst + EPS
    assert max(excess) > burst - 0.5
    limited = df[df["outcome"] == "rate_limited"]
    assert len(limited) > 0.6 * len(df)
    assert (limited["attempts"] == 1).all() and np.allclose(limited["end_s"], limited["arrival_s"])


def gcra_release(arrivals: np.ndarray, rate: float, burst: float) -> np.ndarray:
    """A FIFO token-bucket shaper by virtual scheduling (GCRA), written independently of the simulator."""
    period, tolerance, tat = 1.0 / rate, (burst - 1.0) / rate, 0.0
    out = np.empty_like(arrivals)
    for n, a in enumerate(arrivals):
        out[n] = max(a, tat - tolerance)
        tat = max(out[n], tat) + period
    return out


def test_token_bucket_delay_releases_every_request_at_the_earliest_conforming_time():
    rate, burst = 2.0, 4.0
    w = workload({"c": poisson(2.5)}, [{"kind": "token_bucket", "rate_rps": rate, "burst": burst, "action": "delay"}],
                 duration=300.0)
    df = requests(w).sort_values("arrival_s")
    assert (df["outcome"] == "completed").all() and (df["attempts"] == 1).all()
    release = df["admit_s"].to_numpy()
    assert release[-1] > 300.0  # arrivals outran the rate: the line was still draining at the end
    np.testing.assert_allclose(release, gcra_release(df["arrival_s"].to_numpy(), rate, burst), rtol=0, atol=1e-6)
    assert bucket_excess(np.sort(release), rate) <= burst + EPS


# ------------------------------------------------------------------ windows


@pytest.mark.parametrize("kind", ["fixed_window", "sliding_window"])
def test_window_reject_never_exceeds_its_limit_and_rejects_only_when_full(kind):
    window, limit = 10.0, 7
    w = workload({"c": poisson(2.0, retry=NO_RETRY)},
                 [{"kind": kind, "window_s": window, "max_requests": limit}], duration=600.0)
    df = requests(w)
    times = passed(df)
    refused = df.loc[df["outcome"] == "rate_limited", "end_s"].to_numpy()
    assert len(refused) > 100
    if kind == "fixed_window":
        index = np.floor(times / window + EPS).astype(int)
        assert np.bincount(index).max() == limit
        # A request is refused only when its window already holds `limit`.
        held = np.bincount(index, minlength=int(refused.max() // window) + 1)[(refused // window).astype(int)]
        assert (held == limit).all()
    else:
        assert most_in_window(times, window) == limit
        # At a refusal, exactly `limit` admissions lie in (t - window, t].
        inside = np.searchsorted(times, refused, side="right") - np.searchsorted(times, refused - window, side="right")
        assert (inside == limit).all()


def test_sliding_window_delay_releases_at_the_earliest_time_with_room():
    window, limit = 5.0, 3
    w = workload({"c": poisson(0.7)}, [{"kind": "sliding_window", "window_s": window, "max_requests": limit,
                                        "action": "delay"}], duration=400.0)
    df = requests(w).sort_values("arrival_s")
    assert (df["outcome"] == "completed").all()
    # FIFO: release n waits for release n - limit to leave the window.
    expected: list[float] = []
    for n, a in enumerate(df["arrival_s"]):
        expected.append(max(a, expected[-1] if expected else 0.0, expected[n - limit] + window if n >= limit else 0.0))
    np.testing.assert_allclose(df["admit_s"], expected, rtol=0, atol=1e-6)
    assert most_in_window(np.sort(df["admit_s"].to_numpy()), window) == limit


def test_fixed_window_delay_books_the_next_window_with_room():
    window, limit = 4.0, 3
    w = workload({"c": poisson(1.0)}, [{"kind": "fixed_window", "window_s": window, "max_requests": limit,
                                        "action": "delay"}], duration=400.0)
    df = requests(w).sort_values("arrival_s")
    assert (df["outcome"] == "completed").all()
    release = df["admit_s"].to_numpy()
    index = np.floor(release / window + EPS).astype(int)
    assert np.bincount(index).max() == limit and (np.diff(release) >= 0).all()
    # Held requests are released exactly when a window opens.
    held = release > df["arrival_s"].to_numpy()
    assert held.sum() > 20
    np.testing.assert_allclose(release[held], index[held] * window, rtol=0, atol=1e-9)


@pytest.mark.parametrize("max_output, per_window", [(400, 2), (None, 9)])
def test_token_limits_count_prompt_plus_max_output(max_output, per_window):
    # 1000 tokens a minute; prompt 100 + output 10, or + max_output_tokens 400 when the class sets it.
    cls = poisson(1.0, retry=NO_RETRY, **({"max_output_tokens": max_output} if max_output else {}))
    w = workload({"c": cls}, [{"kind": "fixed_window", "window_s": 60, "max_tokens": 1000}], duration=600.0)
    times = passed(requests(w))
    assert np.bincount(np.floor(times / 60 + EPS).astype(int)).tolist() == [per_window] * 10


def test_a_request_larger_than_the_token_limit_ends_at_once():
    w = workload({"c": poisson(1.0, max_output_tokens=5000)},
                 [{"kind": "sliding_window", "window_s": 60, "max_tokens": 1000, "action": "delay"}], duration=20.0)
    df = requests(w)
    assert (df["outcome"] == "rate_limited").all() and (df["attempts"] == 1).all()
    assert np.allclose(df["end_s"], df["arrival_s"])


# ------------------------------------------------------------------ scopes


def test_per_user_buckets_throttle_the_bot_and_leave_normal_users_alone():
    duration = 600.0
    w = workload({"normal": poisson(5.0, users={"count": 200}, retry=NO_RETRY),
                  "bot": poisson(20.0, retry=NO_RETRY)},
                 [{"kind": "token_bucket", "scope": "user", "rate_rps": 1.0, "burst": 5}], duration)
    df = requests(w)
    normal, bot = df[df["class"] == "normal"], df[df["class"] == "bot"]
    assert (normal["outcome"] == "completed").all() and normal["user"].nunique() == 200
    bot_times = passed(bot)
    assert len(bot_times) <= duration * 1.0 + 5
    assert len(bot_times) >= duration * 1.0 * 0.99
    assert bucket_excess(bot_times, 1.0) <= 5 + EPS
    # The same bucket shared by everybody (scope global) throttles the normal users too.
    shared = requests(workload(w.model_dump()["traffic"]["classes"],
                               [{"kind": "token_bucket", "scope": "global", "rate_rps": 1.0, "burst": 5}], duration))
    assert (shared.loc[shared["class"] == "normal", "outcome"] == "rate_limited").mean() > 0.5


def test_class_scope_and_classes_filter():
    w = workload({"a": poisson(3.0, retry=NO_RETRY), "b": poisson(3.0, retry=NO_RETRY)},
                 [{"kind": "token_bucket", "scope": "class", "classes": ["a"], "rate_rps": 1.0, "burst": 1}],
                 duration=300.0)
    df = requests(w)
    assert (df.loc[df["class"] == "b", "outcome"] == "completed").all()
    assert bucket_excess(passed(df[df["class"] == "a"]), 1.0) <= 1 + EPS


# ------------------------------------------------------------------ retries


def test_retries_follow_the_backoff_policy_exactly_without_jitter():
    # One token, never refilled in the run: every request but the first is refused at every attempt.
    retry = {"max_attempts": 5, "backoff_s": 1.0, "multiplier": 2.0, "max_backoff_s": 5.0, "jitter": 0.0}
    w = workload({"c": poisson(0.2, retry=retry)}, [{"kind": "token_bucket", "rate_rps": 1e-9, "burst": 1}])
    df = requests(w).sort_values("arrival_s")
    gave_up = df.iloc[1:]
    assert (gave_up["outcome"] == "rate_limited").all() and (gave_up["attempts"] == 5).all()
    np.testing.assert_allclose(gave_up["end_s"] - gave_up["arrival_s"], 1 + 2 + 4 + 5, rtol=0, atol=1e-9)


def test_a_retry_goes_through_the_gate_again_and_passes_when_there_is_room():
    # Two per 10 s window; refused requests come back after 3 s, then 6 s, then 12 s.
    retry = {"max_attempts": 4, "backoff_s": 3.0, "multiplier": 2.0, "jitter": 0.0}
    w = workload({"c": poisson(0.3, retry=retry)},
                 [{"kind": "fixed_window", "window_s": 10, "max_requests": 2}], duration=2000.0)
    df = requests(w)
    done = df[df["outcome"] == "completed"]
    assert set(done["attempts"]) >= {1, 2, 3}
    waits = np.cumsum([0.0, 3.0, 6.0, 12.0])
    np.testing.assert_allclose(done["admit_s"] - done["arrival_s"], waits[done["attempts"] - 1], rtol=0, atol=1e-9)
    assert np.bincount(np.floor(passed(df) / 10 + EPS).astype(int)).max() == 2


def test_jittered_backoff_stays_within_its_band_and_is_reproducible():
    retry = {"max_attempts": 3, "backoff_s": 2.0, "multiplier": 2.0, "max_backoff_s": 5.0, "jitter": 0.5}
    w = workload({"c": poisson(0.2, retry=retry)}, [{"kind": "token_bucket", "rate_rps": 1e-9, "burst": 1}])
    df = requests(w).iloc[1:]
    total = (df["end_s"] - df["arrival_s"]).to_numpy()
    # 2 s +-50%, then 4 s +-50% capped at 5 s.
    assert total.min() >= 1.0 + 2.0 - EPS and total.max() <= 3.0 + 5.0 + EPS
    assert total.std() > 0.3
    again = requests(w).iloc[1:]
    np.testing.assert_array_equal(total, (again["end_s"] - again["arrival_s"]).to_numpy())
    other = requests(workload({"c": poisson(0.2, retry=retry)}, [{"kind": "token_bucket", "rate_rps": 1e-9,
                                                                   "burst": 1}], seed=2)).iloc[1:]
    assert not np.array_equal(total[:10], (other["end_s"] - other["arrival_s"]).to_numpy()[:10])


def test_retry_policy_waits():
    from sim.config.limits import Retry

    policy = RetryPolicy(Retry(max_attempts=6, backoff_s=0.5, multiplier=3.0, max_backoff_s=10.0, jitter=0), None)
    assert [policy.wait(k, None) for k in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert policy.wait(1, 7.0) == 7.0  # a provider's retry-after is a floor
    huge = RetryPolicy(Retry(max_attempts=10**9, backoff_s=1.0, multiplier=1.0, jitter=0), None)
    assert len(huge.waits) == 1 and huge.wait(10**8, None) == 1.0  # no list of a billion waits


# ------------------------------------------------------------------ provider limits


def provider_workload(users: int, limits: dict, retry: dict, concurrency: int = 100) -> Workload:
    """`users` users who each send one request at t = 1 (a constant think time; the next would be after the run)."""
    return workload({"c": {"arrival": {"kind": "closed", "users": users, "think_time_s": 1.0},
                           "prompt_tokens": 100, "output_tokens": 10, "retry": retry}},
                    duration=1.5, model={"kind": "api", "concurrency": concurrency, "service_time": 0.5,
                                         "limits": limits})


def test_provider_429_retries_after_the_window_frees():
    df = requests(provider_workload(5, {"rpm": 2}, {"max_attempts": 5, "backoff_s": 1.0, "jitter": 0.0}))
    df = df.sort_values("user")
    assert (df["outcome"] == "completed").all()
    # Two a minute: two at t=1; the other three get retry-after 60 s; two pass at 61, the last at 121.
    np.testing.assert_allclose(df["admit_s"], [1, 1, 61, 61, 121], atol=1e-6)
    assert df["attempts"].tolist() == [1, 1, 2, 2, 3]
    np.testing.assert_allclose(df["end_s"] - df["admit_s"], 0.5, atol=1e-9)  # the service time, once


def test_provider_429_without_honouring_retry_after_gives_up_after_the_last_attempt():
    retry = {"max_attempts": 3, "backoff_s": 1.0, "multiplier": 2.0, "jitter": 0.0, "honour_retry_after": False}
    df = requests(provider_workload(4, {"rpm": 2}, retry, concurrency=3)).sort_values("user")
    assert df["outcome"].tolist() == ["completed", "completed", "rate_limited", "rate_limited"]
    limited = df[df["outcome"] == "rate_limited"]
    assert (limited["attempts"] == 3).all()
    np.testing.assert_allclose(limited["end_s"], 1 + 1 + 2, atol=1e-9)  # tried at 1, 2 and 4
    # A refused request held no slot: with 3 slots, users 2 and 3 were both sent (and refused) at t=1.


@pytest.mark.parametrize("max_output, per_minute", [(400, 2), (None, 9)])
def test_provider_tpm_counts_prompt_plus_max_output(max_output, per_minute):
    cls = poisson(1.0, retry=NO_RETRY, **({"max_output_tokens": max_output} if max_output else {}))
    w = workload({"c": cls}, duration=600.0,
                 model={"kind": "api", "concurrency": 100, "service_time": 0.01, "limits": {"tpm": 1000}})
    times = passed(requests(w))
    assert most_in_window(times, 60.0) == per_minute
    assert len(times) >= 9 * per_minute


# ------------------------------------------------------------------ wiring, theory, reproducibility


def test_no_limits_means_no_gate():
    w = workload({"c": poisson(1.0)})
    forward = lambda i: None  # noqa: E731
    gate = build_gate(simpy.Environment(), w, Recorder(["c"], ["m"]), Streams(1), forward, forward, [])
    assert gate is forward


def test_offered_utilisation_counts_what_the_limits_let_through():
    classes = {"normal": poisson(5.0, users={"count": 100}), "bot": poisson(50.0)}
    model = {"kind": "api", "concurrency": 10, "service_time": 1.0}
    bucket = {"kind": "token_bucket", "scope": "user", "rate_rps": 1.0, "burst": 5}
    assert offered_utilisation(workload(classes, model=model))["m"] == pytest.approx(5.5)
    assert offered_utilisation(workload(classes, [bucket], model=model))["m"] == pytest.approx((5 + 1) / 10)
    per_minute = dict(model, limits={"rpm": 120})
    assert offered_utilisation(workload(classes, model=per_minute))["m"] == pytest.approx(2.0 / 10)


def test_same_seed_same_numbers():
    w = workload({"c": poisson(3.0, users={"count": 5})},
                 [{"kind": "token_bucket", "scope": "user", "rate_rps": 0.4, "burst": 2},
                  {"kind": "sliding_window", "window_s": 10, "max_requests": 20, "action": "delay"}], duration=300)
    a, b = requests(w), requests(w)
    pd.testing.assert_frame_equal(a, b)
    assert (a["attempts"] > 1).any() and (a["outcome"] == "rate_limited").any()


# ------------------------------------------------------------------ the shipped noisy-neighbor workload


def test_noisy_neighbor_pair_differs_only_in_its_rate_limits():
    protected = yaml.safe_load((ROOT / "workloads/noisy-neighbor.yaml").read_text())
    unprotected = yaml.safe_load((ROOT / "workloads/noisy-neighbor-unprotected.yaml").read_text())
    for data in (protected, unprotected):
        for key in ("name", "description", "rate_limits"):
            data.pop(key, None)
    assert protected == unprotected


def test_per_user_buckets_protect_normal_users_p99_in_noisy_neighbor():
    short = ["simulation.duration_s=600", "simulation.warmup_s=60"]
    result = compare(ROOT / "workloads/noisy-neighbor-unprotected.yaml", ROOT / "workloads/noisy-neighbor.yaml",
                     overrides=short)
    table = result.table
    p99 = table.loc["e2e_p99_chat_s"]
    assert p99["significant"] and p99["diff_ci95_high"] < 0
    assert p99["a"] > 15.0 and p99["b"] < 8.0  # the SLO (10 s) broken without, kept with the buckets
    assert table.loc["rate_limited_share_chat", "b"] == 0
    assert table.loc["throughput_bot_rps", "b"] == pytest.approx(1.0, rel=0.03)  # the bucket's rate
    assert table.loc["rate_limited_share_bot", "b"] > 0.97
    # The same, switching the limiter off with --set instead of the second file.
    off = sim.run(ROOT / "workloads/noisy-neighbor.yaml", overrides=short + ["rate_limits=[]"], replications=1)
    assert off.summary["e2e_p99_chat_s"] == pytest.approx(result.result_a.replications["e2e_p99_chat_s"][0])
    # Offered load counts what the buckets let through: the bot's 1 req/s, not its 50.
    assert result.result_a.summary["offered_utilisation_llama8b"] == pytest.approx(0.89, abs=0.01)
    assert result.result_b.summary["offered_utilisation_llama8b"] < 0.25
