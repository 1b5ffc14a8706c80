"""Replica lifecycle and run-level bookkeeping: cold starts, the autoscaler and its bill, connection pools, time series.

Every scenario is small and deterministic where the check is exact (a replayed
CSV trace, constant service times), or uses Poisson traffic only where the
asserted facts hold whatever the draws (a saturated replica, an idle one). The
expected numbers are worked out by hand in the comments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import yaml

from sim.cli import main
from sim.config.schema import Workload
from sim.experiments.run import run
from sim.model.pipeline import simulate


def trace_arrival(tmp_path: Path, name: str, times: Sequence[float], output_tokens: int = 1,
                  end_s: Optional[float] = None) -> dict:
    """A `trace` arrival spec replaying requests at exactly `times` (the first must be 0: traces start there)."""
    assert times[0] == 0, "a trace's times count from its first row"
    path = tmp_path / f"{name}.csv"
    path.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{t!r},1,{output_tokens}\n" for t in times))
    spec = {"kind": "trace", "format": "csv", "path": str(path)}
    if end_s is not None:
        spec["end_s"] = end_s
    return spec


# ------------------------------------------------------------------------------ cold start

COLD_START_S = 60.0
# 20 ms a step, whatever the batch: a request (1 prompt token, 5 output tokens) takes 5 steps = 0.1 s,
# plus at most one step in progress when it joins.
FAST_ENGINE = {"max_batch_tokens": 8192,
               "step_time": {"base_s": 0.02, "per_decode_seq_s": 0.0, "per_prefill_token_s": 0.0}}


def cold_workload(cold_start_s: float = COLD_START_S, warm: bool = False, **simulation) -> dict:
    return {
        "simulation": {"duration_s": 300, "timeseries_interval_s": 10, "warm": warm, **simulation},
        "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 2.0},
                                         "prompt_tokens": 1, "output_tokens": 5}}},
        "models": {"llm": {"kind": "self_hosted", "replicas": 1, "cold_start_s": cold_start_s,
                           "engine": FAST_ENGINE}},
    }


def test_cold_start_admits_nothing_before_the_model_loads_then_drains_the_queue():
    result = run(Workload.model_validate(cold_workload()), seed=41)
    requests = result.requests
    assert (requests["outcome"] == "completed").all()
    early = requests["arrival_s"] < COLD_START_S
    assert 60 < early.sum() < 180  # ~120 arrive while the model loads
    # Nothing starts before the replica has loaded; everything that waited starts the instant it has
    # (256 running sequences fit them all), and later arrivals do not wait at all.
    assert (requests["admit_s"] >= COLD_START_S).all()
    assert (requests.loc[early, "admit_s"] == COLD_START_S).all()
    np.testing.assert_array_equal(requests.loc[~early, "queue_wait_s"], 0.0)
    assert (requests["e2e_s"] - requests["queue_wait_s"]).max() <= 0.1 + 0.02 + 1e-9
    series = result.timeseries.set_index("start_s")
    loading = series.index < COLD_START_S
    assert (series.loc[loading, "replicas_serving_llm"] == 0).all()
    assert (series.loc[~loading, "replicas_serving_llm"] == 1).all()
    assert (series["replicas_llm"] == 1).all()  # held (and paid for) while loading too
    assert (series.loc[loading, "queue_length_mean"] > 0).all()
    # (Differences of running sums: zero up to rounding.)
    np.testing.assert_allclose(series.loc[~loading, "queue_length_mean"], 0.0, rtol=0, atol=1e-9)
    # The cold window defaults to the longest cold start and splits the latencies there.
    summary = result.summary
    assert summary["cold_window_s"] == COLD_START_S
    assert summary["cold_requests"] == early.sum()
    assert summary["cold_requests"] + summary["warm_requests"] == summary["requests_arrived"] == len(requests)
    e2e = requests["e2e_s"].to_numpy()
    assert summary["cold_e2e_p95_s"] == pytest.approx(np.percentile(e2e[early], 95), rel=1e-12)
    assert summary["warm_e2e_p95_s"] == pytest.approx(np.percentile(e2e[~early], 95), rel=1e-12)
    # Arrivals spread over [0, 60) wait 60 - arrival: the 95th percentile is some 57 s; warm ones ~0.1 s.
    assert summary["cold_e2e_p95_s"] > 50
    assert summary["warm_e2e_p95_s"] < 0.2


@pytest.mark.parametrize("variant", ["warm", "no_cold_start"])
def test_nothing_starting_cold_admits_at_once_and_has_no_cold_window(variant):
    spec = cold_workload(warm=True) if variant == "warm" else cold_workload(cold_start_s=0.0)
    result = run(Workload.model_validate(spec), seed=41)
    requests = result.requests
    np.testing.assert_array_equal(requests["queue_wait_s"], 0.0)
    assert (result.timeseries["replicas_serving_llm"] == 1).all()
    assert not any(key.startswith(("cold_", "warm_")) for key in result.summary)


def test_cold_window_can_be_set():
    result = run(Workload.model_validate(cold_workload(cold_window_s=120.0)), seed=41)
    assert result.summary["cold_window_s"] == 120.0
    assert result.summary["cold_requests"] == (result.requests["arrival_s"] < 120).sum()


def test_run_command_warm_flag(tmp_path, capsys):
    path = tmp_path / "cold.yaml"
    path.write_text(yaml.safe_dump(cold_workload()))

    def summary(*flags: str) -> dict:
        assert main(["run", str(path), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    cold, warm = summary(), summary("--warm")
    assert cold["cold_window_s"] == COLD_START_S and cold["queue_wait_p99_s"] > 30
    assert "cold_window_s" not in warm and warm["queue_wait_p999_s"] == 0


# ------------------------------------------------------------------------------ autoscaler

AUTOSCALE = {"min_replicas": 1, "max_replicas": 4, "metric": "utilisation", "target": 0.5,
             "interval_s": 15, "scale_down_cooldown_s": 480}
HOURLY_USD = 3.6


def autoscaled_workload() -> Workload:
    # A replica runs 10 sequences; a step takes 0.1 s whatever the batch. A request (1 prompt token,
    # 10 output tokens) takes 10 steps: one prefill, nine decoding; so a replica serves ~10 requests
    # a second and, saturated, has 9 of its 10 sequences decoding: utilisation 0.9 (prefill counts
    # no work here). Traffic: 3/s (utilisation ~0.27) until 200 s, then 25/s until 600 s, then none.
    return Workload.model_validate({
        "simulation": {"duration_s": 1200, "timeseries_interval_s": 5, "warm": True},
        "traffic": {"classes": {"chat": {
            "arrival": {"kind": "schedule", "steps": [{"until_s": 200, "rate_rps": 3}, {"until_s": 600, "rate_rps": 25},
                                                      {"until_s": 1200, "rate_rps": 0}]},
            "prompt_tokens": 1, "output_tokens": 10}}},
        "models": {"llm": {"kind": "self_hosted", "replicas": 1, "max_batch": 10, "cold_start_s": COLD_START_S,
                           "gpu_hourly_usd": HOURLY_USD, "autoscale": AUTOSCALE,
                           "engine": {"max_batch_tokens": 64, "step_time": {"base_s": 0.1, "per_decode_seq_s": 0.0,
                                                                            "per_prefill_token_s": 0.0}}}},
    })


def test_autoscaler_scales_with_the_load_pays_cold_starts_and_bills_replica_seconds():
    workload = autoscaled_workload()
    rec = simulate(workload, seed=51)
    interval, duration = AUTOSCALE["interval_s"], workload.simulation.duration_s
    # The monitor samples every 5 s. Replicas change only at the autoscaler's ticks (multiples of 15 s;
    # drains below find idle replicas, so they retire at the tick too), so the replicas held over
    # [15k, 15k + 15) are those of the sample at 15k + 5, which no tick coincides with.
    gauges = {t: g["llm"] for t, g in rec.gauges}  # (serving, held, waiting)
    ticks = np.arange(0.0, duration, interval)
    held = np.array([gauges[t + 5][1] for t in ticks])
    serving = np.array([gauges[t + 5][0] for t in ticks])
    changes = {float(t): int(d) for t, d in zip(ticks[1:], np.diff(held)) if d}
    # At 210 the queue has grown for 10 s: ceil(~0.7 / 0.5) = 2. While replica 1 loads, the one
    # serving replica cannot exceed 0.9, so 2 is still enough (a loading replica must not look idle).
    # At 270 replica 1 serves; at 285 two saturated replicas ask for ceil(1.8 / 0.5) = 4 = max.
    # The last change was at 285, so the surplus (idle from ~601 s) goes at the first tick 480 s
    # later, 765, down to min_replicas.
    assert changes == {210.0: 1, 285.0: 2, 765.0: -3}
    assert held.min() == AUTOSCALE["min_replicas"] and held.max() == AUTOSCALE["max_replicas"]
    assert held[-1] == AUTOSCALE["min_replicas"]
    end = np.asarray(rec.end)
    assert end.max() < 765  # so the drained replicas were idle and retired at the tick
    # A new replica serves exactly from its creation + cold start: (0, warm), 1: 270, 2 and 3: 345.
    # (The queue is long then, so each starts work the instant it can.)
    ready = {0: 0.0, 1: 210.0 + COLD_START_S, 2: 285.0 + COLD_START_S, 3: 285.0 + COLD_START_S}
    replica, admit = np.asarray(rec.replica), np.asarray(rec.admit)
    assert set(replica) == set(ready)
    for r in (1, 2, 3):
        assert admit[replica == r].min() == ready[r], f"replica {r}"
    expected_serving = [sum(t <= tick + 5 for t in ready.values()) if tick < 765 else 1 for tick in ticks]
    np.testing.assert_array_equal(serving, expected_serving)
    # The bill: replica-seconds held x hourly price. 1200 (replica 0) + (765 - 210) + 2 x (765 - 285)
    # = 2715 replica-seconds, by hand and by summing the sampled replica counts.
    held_seconds = float((held * interval).sum())
    assert held_seconds == 2715.0
    result = run(workload, seed=51)
    assert result.summary["cost_total_usd"] == pytest.approx(HOURLY_USD * held_seconds / 3600, rel=1e-12)
    series = result.timeseries
    np.testing.assert_array_equal(series.loc[series["start_s"] % interval == 5, "replicas_llm"], held)


def test_a_replica_added_without_a_cold_start_takes_the_queue_at_once():
    # The same surge with no cold start: each replica the autoscaler adds is serving when added, and the queue
    # is long then, so it must start work at that very tick (it once waited for a request to find an empty
    # queue, which never came: the new replicas idled while requests queued).
    data = autoscaled_workload().model_dump(mode="json", by_alias=True, exclude_unset=True)
    data["models"]["llm"]["cold_start_s"] = 0.0
    rec = simulate(Workload.model_validate(data), seed=51)
    interval, duration = AUTOSCALE["interval_s"], data["simulation"]["duration_s"]
    gauges = {t: g["llm"] for t, g in rec.gauges}
    ticks = np.arange(0.0, duration, interval)
    held = np.array([gauges[t + 5][1] for t in ticks])
    added = [float(t) for t, d in zip(ticks[1:], np.diff(held)) for _ in range(max(int(d), 0))]
    assert len(added) == AUTOSCALE["max_replicas"] - 1
    replica, admit = np.asarray(rec.replica), np.asarray(rec.admit)
    for r, tick in enumerate(added, start=1):
        assert admit[replica == r].min() == tick, f"replica {r} added at {tick}"


# ---------------------------------------------------------------------- connection pool

POOL = {"pool_size": 2, "handshake_s": 0.5}
# Both kinds take 1.3 s a request: the API's first token after 0.3 s, then 10 more tokens at 10/s;
# the plain service time shows its answer at the end.
POOL_ENDPOINTS = {
    "api": {"kind": "api", "concurrency": 4, "ttft_s": 0.3, "output_tokens_per_s": 10.0, "connections": POOL},
    "self_hosted": {"kind": "self_hosted", "replicas": 1, "max_batch": 4, "connections": POOL,
                    "service_time": {"kind": "constant", "value": 1.3}},
}


def pool_workload(tmp_path: Path, kind: str, times: Sequence[float], warm: bool = False) -> Workload:
    return Workload.model_validate({
        "simulation": {"duration_s": 40, "warm": warm},
        "traffic": {"classes": {"chat": {"arrival": trace_arrival(tmp_path, "chat", times, output_tokens=11),
                                         "prompt_tokens": 1, "output_tokens": 11}}},
        "models": {"llm": POOL_ENDPOINTS[kind]},
    })


@pytest.mark.parametrize("kind", list(POOL_ENDPOINTS))
def test_connection_pool_handshake_is_paid_once_per_connection(tmp_path, kind):
    ttft = 0.3 if kind == "api" else 1.3
    times = [0, 0.1, 10, 10.1, 20]
    frame = simulate(pool_workload(tmp_path, kind, times)).frame()
    # The first two overlap: each opens one of the 2 connections and waits 0.5 s for it. Later
    # requests, at most two at a time, find an open idle connection.
    handshake = np.array([0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(frame["admit_s"], np.add(times, handshake), rtol=0, atol=1e-12)
    np.testing.assert_allclose(frame["ttft_s"], ttft + handshake, rtol=0, atol=1e-12)
    np.testing.assert_allclose(frame["e2e_s"], 1.3 + handshake, rtol=0, atol=1e-12)
    # Started warm, the pool is open: nobody pays.
    warm = simulate(pool_workload(tmp_path, kind, times, warm=True)).frame()
    np.testing.assert_allclose(warm["ttft_s"], ttft, rtol=0, atol=1e-12)
    np.testing.assert_allclose(warm["e2e_s"], 1.3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", list(POOL_ENDPOINTS))
def test_cold_pool_requests_wait_for_a_connection_in_order(tmp_path, kind):
    # Four overlapping requests, two connections, none open yet. Whatever the third and fourth do
    # (wait for a free connection, or for one being opened), none can be sent before a
    # connection exists (0.5 s), and the endpoint's FIFO order must hold.
    frame = simulate(pool_workload(tmp_path, kind, [0, 0.1, 0.2, 0.3])).frame()
    admit = frame.sort_values("arrival_s")["admit_s"].to_numpy()
    assert (admit >= 0.5).all(), f"admitted at {admit}"
    assert (np.diff(admit) >= 0).all()


# ------------------------------------------------------------------------------ time series

def test_timeseries_counts_and_time_averages_by_hand(tmp_path):
    # One server, 4 s a request, 2 waiting places; buckets of 10 s over a 35 s run (the last is 5 s).
    times = [0, 1, 2, 3, 9, 15, 25, 27]
    workload = Workload.model_validate({
        "simulation": {"duration_s": 35, "timeseries_interval_s": 10},
        # end_s: the replay (and the measuring window) lasts the whole run, not up to the last arrival.
        "traffic": {"classes": {"jobs": {"arrival": trace_arrival(tmp_path, "jobs", times, end_s=35),
                                         "prompt_tokens": 1, "output_tokens": 1}}},
        "models": {"server": {"kind": "self_hosted", "replicas": 1, "max_batch": 1, "queue": {"capacity": 2},
                              "service_time": {"kind": "constant", "value": 4.0}}},
    })
    result = run(workload)
    # @0 runs [0,4); @1 waits [1,4), runs [4,8); @2 waits [2,8), runs [8,12); @3 finds 2 waiting:
    # turned away at 3. @9 waits [9,12), runs [12,16); @15 waits [15,16), runs [16,20);
    # @25 runs [25,29); @27 waits [27,29), runs [29,33).
    frame = result.requests
    np.testing.assert_array_equal(frame["admit_s"], [0, 4, 8, np.nan, 12, 16, 25, 29])
    np.testing.assert_array_equal(frame["end_s"], [4, 8, 12, 3, 16, 20, 29, 33])
    series = result.timeseries
    np.testing.assert_array_equal(series["start_s"], [0, 10, 20, 30])
    np.testing.assert_array_equal(series["end_s"], [10, 20, 30, 35])
    np.testing.assert_array_equal(series["arrivals"], [5, 1, 2, 0])
    np.testing.assert_array_equal(series["completions"], [2, 2, 2, 1])  # ends 4, 8 | 12, 16 | 20, 29 | 33
    np.testing.assert_array_equal(series["rejections"], [1, 0, 0, 0])
    # Waiting request-seconds per bucket: 3 + 6 + 1 | 2 + 1 | 2 | 0.
    np.testing.assert_allclose(series["queue_length_mean"], [1.0, 0.3, 0.2, 0.0], rtol=0, atol=1e-12)
    # In the system: 4 + 7 + 8 + 1 | 2 + 6 + 5 | 4 + 3 | 3 (over 5 s).
    np.testing.assert_allclose(series["in_system_mean"], [2.0, 1.3, 0.7, 0.6], rtol=0, atol=1e-12)
    # Busy: all of [0, 20); 4 + 1 of [20, 30); 3 of [30, 35).
    np.testing.assert_allclose(series["utilisation_server"], [1.0, 1.0, 0.5, 0.6], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(series["replicas_server"], 1)
    np.testing.assert_array_equal(series["replicas_serving_server"], 1)
    # p95 of the latencies of each bucket's arrivals (linear interpolation): 4, 7, 10, 7 -> 9.55;
    # 5; 4, 6 -> 5.9; none.
    np.testing.assert_allclose(series["e2e_p95_s"], [9.55, 5.0, 5.9, np.nan], rtol=0, atol=1e-12)
    np.testing.assert_allclose(series["ttft_p95_s"], series["e2e_p95_s"], rtol=0, atol=0)
    assert result.summary["requests_queue_full"] == 1
    assert result.summary["utilisation_server"] == pytest.approx((20 + 5 + 3) / 35, rel=1e-12)
