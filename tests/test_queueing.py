"""The endpoint queue: priorities, capacity, deadlines and hold-back, against theory and hand-computed paths.

Statistical checks follow test_theory.py: one value per independent replication,
a 99.9% Student t-interval that must cover the closed form, and a bound on the
interval's half-width so that a run too short to decide fails instead of passing.
Theoretical values are computed here from the formulas. Sample-path checks replay
a few requests from a CSV trace through the whole pipeline (`simulate`) with
constant service times, so every time they assert is exact.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pytest
from test_theory import check, queue_workload, wide_interval

from sim.config.schema import Workload
from sim.experiments.run import run
from sim.model.pipeline import simulate

EXPONENTIAL = {"kind": "exponential", "mean": 1.0}


def trace_arrival(tmp_path: Path, name: str, times: Sequence[float], end_s: Optional[float] = None) -> dict:
    """A `trace` arrival spec replaying requests at exactly `times` (the first must be 0: traces start there)."""
    assert times[0] == 0, "a trace's times count from its first row"
    path = tmp_path / f"{name}.csv"
    path.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{t!r},1,1\n" for t in times))
    spec = {"kind": "trace", "format": "csv", "path": str(path)}
    if end_s is not None:
        spec["end_s"] = end_s
    return spec


def one_server(service: float, queue: dict, classes: dict, duration: float, *, slots: int = 1) -> Workload:
    """One replica with `slots` plain servers of constant service time; the given classes and queue."""
    return Workload.model_validate({
        "simulation": {"duration_s": duration},
        "traffic": {"classes": {name: {"prompt_tokens": 1, "output_tokens": 1, **cls}
                                for name, cls in classes.items()}},
        "models": {"server": {"kind": "self_hosted", "replicas": 1, "max_batch": slots,
                              "service_time": {"kind": "constant", "value": service}, "queue": queue}},
    })


def by_class(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame[frame["class"] == name].sort_values("arrival_s", kind="stable")


# ------------------------------------------------- M/M/1 non-preemptive priority (Cobham)

# Declared out of priority order, so the order must come from `priority`, not from the YAML.
PRIORITY_CLASSES = {"batch": (2, 0.3), "interactive": (0, 0.2), "standard": (1, 0.2)}  # name: (priority, rate)


def cobham_waits(classes: dict[str, tuple[int, float]], mean_s: float, second_moment: float) -> dict[str, float]:
    """Mean wait in queue per class of a non-preemptive M/G/1 priority queue, equal service distributions.

    W_k = W0 / ((1 - sigma_{k-1}) (1 - sigma_k)), W0 = sum_i lambda_i E[S^2] / 2,
    sigma_k = sum of rho_i over the classes of priority k or better.
    """
    w0 = sum(rate for _, rate in classes.values()) * second_moment / 2
    waits = {}
    for name, (priority, _) in classes.items():
        better = sum(rate * mean_s for p, rate in classes.values() if p < priority)
        upto = better + sum(rate * mean_s for p, rate in classes.values() if p == priority)
        waits[name] = w0 / ((1 - better) * (1 - upto))
    return waits


def priority_workload(discipline: str, duration: float, warmup: float) -> Workload:
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": warmup},
        "traffic": {"classes": {name: {"arrival": {"kind": "poisson", "rate_rps": rate}, "priority": priority,
                                       "prompt_tokens": 1, "output_tokens": 1}
                                for name, (priority, rate) in PRIORITY_CLASSES.items()}},
        "models": {"server": {"kind": "self_hosted", "replicas": 1, "max_batch": 1, "service_time": EXPONENTIAL,
                              "queue": {"discipline": discipline}}},
    })


def per_class_waits(workload: Workload, warmup: float, replications: int, seed: int) -> dict[str, list[float]]:
    """Each replication's mean queue wait per class and overall, over requests arriving after the warm-up."""
    waits: dict[str, list[float]] = {name: [] for name in [*PRIORITY_CLASSES, "all"]}
    for r in range(replications):
        frame = simulate(workload, replication=r, seed=seed).frame()
        assert (frame["outcome"] == "completed").all()
        assert (frame["priority"] == frame["class"].map({n: p for n, (p, _) in PRIORITY_CLASSES.items()})
                .astype(int)).all()
        kept = frame[frame["arrival_s"] >= warmup]
        for name, group in kept.groupby("class", observed=True):
            waits[name].append(float(group["queue_wait_s"].mean()))
        waits["all"].append(float(kept["queue_wait_s"].mean()))
    return waits


def test_mm1_priority_waits_match_cobham_and_conserve_work():
    mean_s, second_moment = 1.0, 2.0  # exponential: E[S^2] = 2 E[S]^2
    rho = sum(rate for _, rate in PRIORITY_CLASSES.values()) * mean_s  # 0.7
    theory = cobham_waits(PRIORITY_CLASSES, mean_s, second_moment)  # interactive 0.875, standard 1.458, batch 3.889
    assert theory["interactive"] == pytest.approx(0.875) and theory["batch"] == pytest.approx(0.7 / 0.18)
    mm1 = rho * mean_s / (1 - rho)  # 2.333: M/M/1 W_q, what every class sees in FIFO order
    # Relaxation of the lowest class is the slowest (~ 1/(1 - sigma)^2 service times); 500 s is ample.
    warmup = 500.0
    waits = per_class_waits(priority_workload("priority", 20_000, warmup), warmup, 20, seed=11)
    for name, value in theory.items():
        check(waits[name], value, f"priority M/M/1 W_q[{name}] (Cobham)", max_half=0.10 * value)
    # Conservation (Kleinrock): a work-conserving non-preemptive order leaves the mean wait,
    # weighted by arrival rates, at the FIFO value when service distributions are equal.
    check(waits["all"], mm1, "priority M/M/1 overall W_q (conservation)", max_half=0.08 * mm1)


def test_mm1_fifo_gives_every_class_the_same_wait():
    rho = sum(rate for _, rate in PRIORITY_CLASSES.values())
    mm1 = rho / (1 - rho)
    warmup = 500.0
    waits = per_class_waits(priority_workload("fifo", 12_000, warmup), warmup, 20, seed=12)
    for name in [*PRIORITY_CLASSES, "all"]:
        check(waits[name], mm1, f"FIFO M/M/1 W_q[{name}]", max_half=0.10 * mm1)
    # Paired within each replication, the classes' waits differ by noise only: priority is ignored.
    gap = np.asarray(waits["batch"]) - np.asarray(waits["interactive"])
    check(gap, 0.0, "FIFO W_q[batch] - W_q[interactive]", max_half=0.05 * mm1)


# ------------------------------------------------------- loss systems: Erlang B, M/M/c/K

def erlang_b(c: int, a: float) -> float:
    """Erlang B: blocking probability of M/G/c/c with offered load a."""
    terms = [a**k / math.factorial(k) for k in range(c + 1)]
    return terms[-1] / sum(terms)


def mmck_blocking(c: int, k: int, a: float) -> float:
    """Blocking probability of M/M/c/K (K in the system at most) with offered load a = lambda/mu."""
    p = [a**n / math.factorial(n) if n <= c else a**c / math.factorial(c) * (a / c) ** (n - c)
         for n in range(k + 1)]
    return p[-1] / sum(p)


def blocking_per_replication(result, warmup: float) -> list[float]:
    """Share of each replication's arrivals turned away; the summary's count checked against the records."""
    reps = result.replications.sort_values("replication")
    requests = result.requests[result.requests["arrival_s"] >= warmup]
    shares = []
    for (_, row), (_, frame) in zip(reps.iterrows(), requests.groupby("replication", sort=True)):
        full = frame["outcome"] == "queue_full"
        assert row["requests_queue_full"] == full.sum() > 0
        assert row["requests_queue_full"] + row["requests_completed"] == row["requests_arrived"] == len(frame)
        # Turned away on arrival: never admitted, ended the instant it came.
        assert frame.loc[full, "admit_s"].isna().all()
        assert (frame.loc[full, "end_s"] == frame.loc[full, "arrival_s"]).all()
        shares.append(row["requests_queue_full"] / row["requests_arrived"])
    return shares


@pytest.mark.parametrize("service", [EXPONENTIAL, {"kind": "lognormal", "mean": 1.0, "p95": 2.5}],
                         ids=["M/M/5/5", "M/G/5/5"])
def test_no_waiting_room_blocks_as_erlang_b(service):
    c, lam = 5, 4.0
    blocking = erlang_b(c, lam)  # 0.19907, whatever the service distribution (insensitivity)
    assert blocking == pytest.approx(0.19907, abs=1e-5)
    endpoint = {"kind": "self_hosted", "replicas": 1, "max_batch": c, "queue": {"capacity": 0}}
    warmup = 50.0
    result = run(queue_workload(lam, service, duration=1_200, warmup=warmup, endpoint=endpoint),
                 seed=21, replications=20)
    check(blocking_per_replication(result, warmup), blocking, f"{c} servers, no queue: Erlang B",
          max_half=0.10 * blocking)


def test_finite_queue_blocks_as_mmck():
    c, k, lam = 2, 5, 1.5  # two servers, three waiting places
    blocking = mmck_blocking(c, k, lam)  # 0.0851
    endpoint = {"kind": "self_hosted", "replicas": 1, "max_batch": c, "queue": {"capacity": k - c}}
    warmup = 50.0
    result = run(queue_workload(lam, EXPONENTIAL, duration=6_000, warmup=warmup, endpoint=endpoint),
                 seed=22, replications=20)
    check(blocking_per_replication(result, warmup), blocking, f"M/M/{c}/{k} blocking", max_half=0.10 * blocking)


# ---------------------------------------------------------------------------- deadlines

@pytest.mark.parametrize("discipline", ["fifo", "priority"])
def test_deadline_drops_at_arrival_plus_deadline_and_never_admits(tmp_path, discipline):
    # One server, 10 s per request. `jobs` give up after 5 s of waiting; `patient` never do.
    classes = {
        "jobs": {"arrival": trace_arrival(tmp_path, "jobs", [0, 1, 2, 3, 16]), "deadline_s": 5.0},
        "patient": {"arrival": trace_arrival(tmp_path, "patient", [0, 22])},
    }
    workload = one_server(10.0, {"discipline": discipline}, classes, duration=50)
    rec = simulate(workload)
    frame = rec.frame()
    jobs, patient = by_class(frame, "jobs"), by_class(frame, "patient")
    # jobs@0 runs [0, 10); patient@0 waits behind it, runs [10, 20). jobs@1, @2, @3 would run
    # no sooner than 20: dropped at 6, 7, 8. jobs@16 waits 4 s < 5: runs [20, 30).
    # patient@22 waits 8 s (no deadline): runs [30, 40).
    assert jobs["outcome"].tolist() == ["completed", "expired", "expired", "expired", "completed"]
    np.testing.assert_array_equal(jobs["admit_s"], [0, np.nan, np.nan, np.nan, 20])
    np.testing.assert_array_equal(jobs["end_s"], [10, 6, 7, 8, 30])
    np.testing.assert_array_equal(jobs["replica"], [0, -1, -1, -1, 0])
    assert patient["outcome"].tolist() == ["completed", "completed"]
    np.testing.assert_array_equal(patient["admit_s"], [10, 30])
    expired = frame[frame["outcome"] == "expired"]
    np.testing.assert_array_equal(expired["end_s"] - expired["arrival_s"], 5.0)
    result = run(workload)
    assert result.summary["requests_expired"] == 3
    assert result.summary["requests_completed"] == 4


@pytest.mark.parametrize("discipline", ["fifo", "priority"])
def test_expired_requests_free_their_queue_place(tmp_path, discipline):
    # One server, 10 s per request, one waiting place, 6 s deadline.
    arrival = trace_arrival(tmp_path, "jobs", [0, 1, 2, 8, 9])
    workload = one_server(10.0, {"discipline": discipline, "capacity": 1},
                          {"jobs": {"arrival": arrival, "deadline_s": 6.0}}, duration=40)
    frame = simulate(workload).frame()
    # @0 runs [0, 10). @1 takes the waiting place; @2 finds it taken: turned away at 2.
    # @1 expires at 7 and leaves the place free, so @8 gets it (were @1 still counted, @8 would be
    # turned away) and runs [10, 20) after 2 s; @9 finds the place taken by @8: turned away.
    assert frame["outcome"].tolist() == ["completed", "expired", "queue_full", "completed", "queue_full"]
    np.testing.assert_array_equal(frame["admit_s"], [0, np.nan, np.nan, 10, np.nan])
    np.testing.assert_array_equal(frame["end_s"], [10, 7, 2, 20, 9])


def mm1_deadline_loss(lam: float, mu: float, patience: float) -> float:
    """Share of arrivals abandoning an M/M/1 FIFO queue when each waits at most `patience` (M/M/1+D).

    Only admitted work enters the workload V, so its density is f(x) = lambda p0 e^{-(mu-lambda)x}
    for x < tau and f(tau) e^{-mu(x - tau)} beyond; an arrival abandons iff V > tau, which has
    probability f(tau) / mu. Normalising gives p0. Stable even for lambda >= mu.
    """
    theta = mu - lam
    decay = math.exp(-theta * patience)
    p0 = 1.0 / (1.0 + lam / theta * (1.0 - decay) + lam / mu * decay)
    return lam * p0 * decay / mu


def test_mm1_with_deadlines_loses_as_mm1_plus_d():
    lam, mu, patience = 1.2, 1.0, 2.0  # overloaded without the deadline
    loss = mm1_deadline_loss(lam, mu, patience)  # 0.3118
    workload = Workload.model_validate({
        "simulation": {"duration_s": 3_000, "warmup_s": 100},
        "traffic": {"classes": {"jobs": {"arrival": {"kind": "poisson", "rate_rps": lam}, "deadline_s": patience,
                                         "prompt_tokens": 1, "output_tokens": 1}}},
        "models": {"server": {"kind": "self_hosted", "replicas": 1, "max_batch": 1, "service_time": EXPONENTIAL}},
    })
    reps = run(workload, seed=23, replications=20, keep_requests=False).replications
    check(reps["requests_expired"] / reps["requests_arrived"], loss, "M/M/1+D share expired", max_half=0.10 * loss)
    # Served requests waited less than the deadline.
    assert (reps["queue_wait_p999_s"] < patience).all()


# ---------------------------------------------------------------- priority order, sample path

def ordering_classes(tmp_path: Path) -> dict:
    # Every trace starts at 0; at equal times classes arrive in the order they are declared.
    return {
        "low": {"priority": 2, "arrival": trace_arrival(tmp_path, "low", [0, 1, 2])},
        "mid": {"priority": 1, "arrival": trace_arrival(tmp_path, "mid", [0, 3])},
        "high": {"priority": 0, "arrival": trace_arrival(tmp_path, "high", [0, 4])},
        "mid_b": {"priority": 1, "arrival": trace_arrival(tmp_path, "mid_b", [0, 2.5])},
    }


def service_order(frame: pd.DataFrame) -> list[tuple[str, float]]:
    ordered = frame.sort_values("admit_s", kind="stable")
    return list(zip(ordered["class"].astype(str), ordered["arrival_s"]))


def test_priority_is_non_preemptive_and_fifo_within_a_priority(tmp_path):
    frame = simulate(one_server(10.0, {"discipline": "priority"}, ordering_classes(tmp_path), 100)).frame()
    assert (frame["outcome"] == "completed").all()
    # low@0 found the server free and keeps it until 10 although high@0 came at once (no preemption).
    # Then the best priority first; within priority 1, arrival order across the two classes.
    assert service_order(frame) == [("low", 0), ("high", 0), ("high", 4), ("mid", 0), ("mid_b", 0),
                                    ("mid_b", 2.5), ("mid", 3), ("low", 1), ("low", 2)]
    np.testing.assert_array_equal(np.sort(frame["admit_s"]), np.arange(0, 90, 10))
    assert (frame["end_s"] - frame["admit_s"] == 10).all()


def test_fifo_discipline_ignores_priority(tmp_path):
    frame = simulate(one_server(10.0, {"discipline": "fifo"}, ordering_classes(tmp_path), 100)).frame()
    assert service_order(frame) == [("low", 0), ("mid", 0), ("high", 0), ("mid_b", 0), ("low", 1), ("low", 2),
                                    ("mid_b", 2.5), ("mid", 3), ("high", 4)]
    np.testing.assert_array_equal(np.sort(frame["admit_s"]), np.arange(0, 90, 10))


# ---------------------------------------------------------------------------- hold-back

HOLD_BACK = {"discipline": "priority", "hold_back": {"priority": 1, "max_load_share": 0.5}}


def test_hold_back_keeps_background_under_the_load_share_and_is_work_conserving(tmp_path):
    # 4 slots, 10 s each; background (priority 1) may start only while fewer than 0.5 x 4 = 2 run.
    classes = {
        "interactive": {"priority": 0, "arrival": trace_arrival(tmp_path, "interactive", [0, 0.5, 50])},
        "background": {"priority": 1, "arrival": trace_arrival(tmp_path, "background", [0, 1, 2, 3, 4, 45])},
    }
    frame = simulate(one_server(10.0, HOLD_BACK, classes, 100, slots=4)).frame()
    assert (frame["outcome"] == "completed").all()
    interactive, background = by_class(frame, "interactive"), by_class(frame, "background")
    # Interactive work is never held: it starts at once (a slot is always free here).
    np.testing.assert_array_equal(interactive["admit_s"], [0, 0.5, 50])
    # At 0 the first interactive and background requests both start (load 2, in either order).
    # With 3 running from 0.5, background @1..@4 waits although a slot is free. Each completion
    # that takes the load below 2 lets one start: at 10 (two end: 3 -> 1, one starts), 10.5,
    # 20 and 20.5. @45 finds the endpoint idle: starts at once.
    np.testing.assert_array_equal(background["admit_s"], [0, 10, 10.5, 20, 20.5, 45])
    # So background never runs beside 2 or more others, and runs whenever the load is below the share.
    running = [((frame["admit_s"] <= t) & (frame["end_s"] > t)).sum() for t in background["admit_s"]]
    assert running == [2, 2, 2, 2, 2, 1]


def test_hold_back_never_delays_the_work_it_protects(tmp_path):
    # As above: from 1 on, three run (load 3 of 4) and background @1 is held in the queue.
    # An interactive request arriving at 5 is not held back and a slot is free: it must start.
    classes = {
        "interactive": {"priority": 0, "arrival": trace_arrival(tmp_path, "interactive", [0, 0.5, 5])},
        "background": {"priority": 1, "arrival": trace_arrival(tmp_path, "background", [0, 1])},
    }
    frame = simulate(one_server(10.0, HOLD_BACK, classes, 100, slots=4)).frame()
    np.testing.assert_array_equal(by_class(frame, "interactive")["admit_s"], [0, 0.5, 5])


def hold_back_workload(hold_back: bool) -> Workload:
    queue = {"discipline": "priority"}
    if hold_back:
        queue["hold_back"] = {"priority": 1, "max_load_share": 0.75}
    return Workload.model_validate({
        "simulation": {"duration_s": 5_000, "warmup_s": 200},
        "traffic": {"classes": {
            "interactive": {"arrival": {"kind": "poisson", "rate_rps": 1.5}, "priority": 0,
                            "prompt_tokens": 1, "output_tokens": 1},
            "background": {"arrival": {"kind": "poisson", "rate_rps": 1.0}, "priority": 1,
                           "prompt_tokens": 1, "output_tokens": 1},
        }},
        "models": {"server": {"kind": "self_hosted", "replicas": 1, "max_batch": 4, "service_time": EXPONENTIAL,
                              "queue": queue}},
    })


def test_hold_back_improves_interactive_waits_under_load():
    # 4 slots, offered load 2.5 / 4 = 0.625; background starts only while under 3 run, keeping a
    # slot for interactive traffic. Same seed, same traffic (common random numbers): the
    # difference is paired within each replication.
    warmup, seed = 200.0, 31
    gaps, background = [], []
    for r in range(10):
        waits = {}
        for hold_back in (False, True):
            frame = simulate(hold_back_workload(hold_back), replication=r, seed=seed).frame()
            kept = frame[frame["arrival_s"] >= warmup]
            assert (kept["outcome"] == "completed").all()
            waits[hold_back] = kept.groupby("class", observed=True)["queue_wait_s"].mean()
        gaps.append(waits[True]["interactive"] - waits[False]["interactive"])
        background.append(waits[True]["background"])
    mean, half = wide_interval(gaps)
    print(f"interactive W_q with - without hold-back: {mean:.4g} +- {half:.3g} (99.9%)")
    assert mean + half < 0, f"hold-back did not improve interactive waits: {mean:.4g} +- {half:.3g} s"
    assert max(background) < 10  # background is slowed, not starved
