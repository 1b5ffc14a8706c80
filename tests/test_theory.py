"""The simulator against queueing theory, with tolerances from confidence intervals.

Every statistical check follows one recipe. Each replication yields one number
(a mean over its post-warm-up requests); replications are independent, so their
values are iid and a Student t-interval over them is honest, whereas requests
within one run are autocorrelated and an iid interval over them would be far
too narrow. The interval is 99.9% two-sided, so a correct simulator essentially
never fails, and the seeds are fixed, so a result is the same on every run. Each
check then also asserts that the interval is narrow (a few percent of the
theoretical value): a test must not pass merely because its run was too short
to tell right from wrong.

The theoretical values are computed here from the formulas, not copied from the
simulator or its docs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from sim.config.loader import load_workload
from sim.config.schema import Workload
from sim.experiments.run import run
from sim.metrics.recorder import COMPLETED
from sim.model.pipeline import simulate
from sim.model.streams import Streams

ROOT = Path(__file__).resolve().parents[1]

# Two-sided 99.9% Student t quantiles t(0.9995, df), from standard tables
# (checked against numerical integration of the t density).
_T9995 = (
    636.619, 31.599, 12.924, 8.610, 6.869, 5.959, 5.408, 5.041, 4.781, 4.587,
    4.437, 4.318, 4.221, 4.140, 4.073, 4.015, 3.965, 3.922, 3.883, 3.850,
    3.819, 3.792, 3.768, 3.745, 3.725, 3.707, 3.690, 3.674, 3.659, 3.646,
)


def wide_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean of independent per-replication values and the half-width of its 99.9% t-interval."""
    x = np.asarray(values, dtype=float)
    assert x.size >= 2 and np.isfinite(x).all(), f"need finite values from 2+ replications, got {x}"
    df = x.size - 1
    t = _T9995[df - 1] if df <= len(_T9995) else 3.2905  # normal quantile beyond the table
    return float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(x.size)


def check(values: Sequence[float], theory: float, what: str, *, max_half: float) -> None:
    """The 99.9% interval of `values` covers `theory`, and its half-width is at most `max_half`."""
    mean, half = wide_interval(values)
    print(f"{what}: theory {theory:.5g}, simulated {mean:.5g} +- {half:.3g} (99.9%, {len(values)} replications)")
    assert abs(mean - theory) <= half, (
        f"{what}: simulated {mean:.5g} +- {half:.3g} (99.9%) does not cover the theoretical {theory:.5g}"
    )
    assert half <= max_half, f"{what}: half-width {half:.3g} exceeds {max_half:.3g}: the run is too short to decide"


def queue_workload(rate: float, service, *, servers: int = 1, duration: float, warmup: float,
                   endpoint: dict | None = None) -> Workload:
    """A textbook queue: Poisson arrivals at `rate`, `servers` FIFO servers, the given service time."""
    model = endpoint or {"kind": "self_hosted", "replicas": servers, "max_batch": 1}
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": warmup},
        "traffic": {"classes": {"jobs": {
            "arrival": {"kind": "poisson", "rate_rps": rate},
            "prompt_tokens": 1,  # tokens play no part in a plain service time
            "output_tokens": 1,
        }}},
        "models": {"server": {**model, "service_time": service}},
    })


def per_replication(requests, warmup: float, statistic) -> list[float]:
    """`statistic(frame)` of each replication's requests that arrived after the warm-up."""
    kept = requests[requests["arrival_s"] >= warmup]
    return [float(statistic(group)) for _, group in kept.groupby("replication", sort=True)]


# ----------------------------------------------------------------------- M/M/1

def test_mm1_mean_wait_and_utilisation():
    lam, mu = 0.8, 1.0
    rho = lam / mu
    # M/M/1: W_q = rho / (mu - lambda); the server is busy a fraction rho of the time.
    wq = rho / (mu - lam)  # 4.0 s
    # Relaxation time ~ 1 / (mu (1 - sqrt(rho))^2) ~ 90 s; 1000 s of warm-up is ample.
    result = run(queue_workload(lam, {"kind": "exponential", "mean": 1 / mu}, duration=25_000, warmup=1_000),
                 seed=101, replications=20)
    reps = result.replications
    check(reps["queue_wait_mean_s"], wq, "M/M/1 W_q", max_half=0.10 * wq)
    check(reps["utilisation_server"], rho, "M/M/1 utilisation", max_half=0.02 * rho)


# ------------------------------------------------------------------ M/M/c (Erlang C)

def erlang_c(c: int, a: float) -> float:
    """Erlang C: probability that an arrival waits in M/M/c with offered load a = lambda/mu < c."""
    top = a**c / math.factorial(c) / (1 - a / c)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


def test_mmc_erlang_c_mean_wait_and_wait_distribution():
    c, lam, mu = 4, 3.6, 1.0
    a, rho = lam / mu, lam / (c * mu)
    p_wait = erlang_c(c, a)  # 0.7877
    # M/M/c: W_q = C(c, a) / (c mu - lambda); P(W_q > t) = C(c, a) exp(-(c mu - lambda) t).
    wq = p_wait / (c * mu - lam)  # 1.969 s
    assert wq == pytest.approx(1.969, abs=5e-4)  # the value quoted in workloads/mmc.yaml
    warmup = 1_000.0
    result = run(queue_workload(lam, {"kind": "exponential", "mean": 1 / mu}, servers=c,
                                duration=20_000, warmup=warmup), seed=202, replications=20)
    reps = result.replications
    check(reps["queue_wait_mean_s"], wq, "M/M/4 W_q (Erlang C)", max_half=0.10 * wq)
    check(reps["utilisation_server"], rho, "M/M/4 utilisation", max_half=0.02 * rho)
    # The fraction of post-warm-up requests of a replication waiting longer than t is one iid
    # value per replication, like the mean.
    for t in (0.0, 1.0, 2.0):
        tail = p_wait * math.exp(-(c * mu - lam) * t)
        fractions = per_replication(result.requests, warmup, lambda f, t=t: (f["queue_wait_s"] > t).mean())
        check(fractions, tail, f"M/M/4 P(W_q > {t:g})", max_half=0.10 * tail)


# ------------------------------------------------------- M/G/1 (Pollaczek-Khinchine)

LOGNORMAL_SIGMA = 0.7


@pytest.mark.parametrize(
    "service, second_moment",
    [
        # M/D/1: E[S^2] = E[S]^2.
        pytest.param({"kind": "constant", "value": 1.0}, 1.0, id="M/D/1"),
        # Lognormal with mu = -sigma^2/2 has mean 1 and E[S^2] = exp(2 mu + 2 sigma^2) = exp(sigma^2).
        pytest.param({"kind": "lognormal", "mu": -LOGNORMAL_SIGMA**2 / 2, "sigma": LOGNORMAL_SIGMA},
                     math.exp(LOGNORMAL_SIGMA**2), id="M/G/1-lognormal"),
        # Gamma with mean 1 and cv 0.5: E[S^2] = E[S]^2 (1 + cv^2).
        pytest.param({"kind": "gamma", "mean": 1.0, "cv": 0.5}, 1.25, id="M/G/1-gamma"),
    ],
)
def test_mg1_pollaczek_khinchine_mean_wait(service, second_moment):
    lam, mean_service = 0.8, 1.0
    rho = lam * mean_service
    # Pollaczek-Khinchine: W_q = lambda E[S^2] / (2 (1 - rho)).
    wq = lam * second_moment / (2 * (1 - rho))
    result = run(queue_workload(lam, service, duration=25_000, warmup=1_000), seed=303, replications=20)
    reps = result.replications
    check(reps["queue_wait_mean_s"], wq, f"P-K W_q ({service['kind']})", max_half=0.10 * wq)
    check(reps["utilisation_server"], rho, f"P-K utilisation ({service['kind']})", max_half=0.02 * rho)


# --------------------------------------------------------------------- Little's law

def test_littles_law_on_the_chat_workload():
    # The realistic engine workload (continuous batching, chunked prefill, step noise), shortened.
    workload = load_workload(ROOT / "workloads" / "chat-selfhosted.yaml", ["simulation.duration_s=600"])
    start, stop = float(workload.simulation.warmup_s), workload.simulation.duration_s
    window = stop - start
    (model_name,) = workload.models
    gaps, sizes = [], []
    for r in range(10):
        rec = simulate(workload, replication=r, seed=404)
        arrival, admit, end = (np.asarray(x, dtype=float) for x in (rec.arrival, rec.admit, rec.end))
        assert (np.asarray(rec.outcome) == COMPLETED).all() and (end >= admit).all() and (admit >= arrival).all()
        # L: time-average number in system over the window, exactly: each request's
        # [arrival, end] clipped to the window, summed, divided by the window.
        in_system = np.clip(np.minimum(end, stop) - np.maximum(arrival, start), 0.0, None)
        size = in_system.sum() / window
        # lambda: arrivals in the window per second; W: their mean sojourn (every one finishes:
        # the run drains).
        arrived = (arrival >= start) & (arrival < stop)
        lam = arrived.sum() / window
        sojourn = (end - arrival)[arrived].mean()
        # L and lambda W differ only at the edges: requests in the system at `start` add to L
        # but not to lambda W, those still there at `stop` add their whole sojourn to W but only
        # part of it to L. In steady state the two edge terms have the same mean (about L x W
        # request-seconds, ~10 of the ~3400 in the window) and cancel; no arrivals after `stop`
        # lets the drain run a bit faster (smaller batches), a bias far below the interval.
        # So the paired difference L - lambda W has mean ~0 and a small spread, set by the edges.
        gaps.append(size - lam * sojourn)
        sizes.append(size)
        # The engine's own time-weighted counter of running sequences (sampled by the monitor
        # at the warm-up and at the end) must equal the records' in-service time over the
        # window: an exact identity, since no request queues in this workload.
        in_service = np.clip(np.minimum(end, stop) - np.maximum(admit, start), 0.0, None).sum() / window
        area = {t: counters[model_name][1] for t, counters in rec.samples}
        assert area[stop] - area[start] == pytest.approx(in_service * window, rel=1e-9)
    mean_size = float(np.mean(sizes))
    assert mean_size > 3  # a loaded system, so the law has something to say
    check(gaps, 0.0, "Little's law L - lambda W", max_half=0.01 * mean_size)


# ------------------------------------------------------ interactive response time law

def machine_repair_throughput(users: int, think: float, servers: int, mu: float) -> float:
    """Exact throughput of the closed M/M/c//N (machine repair) model: a birth-death chain on n in system.

    p_n is proportional to prod_{k<n} ((N - k) / Z) / (min(k + 1, c) mu); X = sum_n p_n min(n, c) mu.
    """
    p = [1.0]
    for n in range(1, users + 1):
        p.append(p[-1] * ((users - n + 1) / think) / (min(n, servers) * mu))
    total = sum(p)
    return sum(pn * min(n, servers) * mu for n, pn in enumerate(p)) / total


@pytest.mark.parametrize("users", [10, 20])  # below the knee N* = c (Z + S) / S = 12, and saturated
def test_interactive_response_time_law(users):
    think, servers, mu = 5.0, 2, 1.0
    workload = Workload.model_validate({
        "simulation": {"duration_s": 8_000, "warmup_s": 500},
        "traffic": {"classes": {"users": {
            "arrival": {"kind": "closed", "users": users, "think_time_s": {"kind": "exponential", "mean": think}},
            "prompt_tokens": 1, "output_tokens": 1,
        }}},
        "models": {"server": {"kind": "self_hosted", "replicas": servers, "max_batch": 1,
                              "service_time": {"kind": "exponential", "mean": 1 / mu}}},
    })
    reps = run(workload, seed=505, replications=20).replications
    response, throughput = reps["e2e_mean_s"].to_numpy(), reps["throughput_rps"].to_numpy()
    # Interactive response time law R = N / X - Z, paired within each replication (R: mean
    # response of the window's arrivals; X: completions in the window per second).
    check(response - (users / throughput - think), 0.0, f"N={users}: R - (N/X - Z)",
          max_half=0.05 * response.mean())
    # And the values themselves against the exact machine-repair model.
    x = machine_repair_throughput(users, think, servers, mu)
    check(throughput, x, f"N={users}: throughput X", max_half=0.02 * x)
    check(response, users / x - think, f"N={users}: response time R", max_half=0.05 * (users / x - think))


# --------------------------------------------------------------- sample-path check

def kiefer_wolfowitz_waits(arrival: np.ndarray, service: np.ndarray, servers: int) -> np.ndarray:
    """Waits in a FIFO multi-server queue by the Kiefer-Wolfowitz workload-vector recursion.

    w holds the work each server still has, sorted ascending, as seen by an arrival:
    the arrival waits w[0] and joins that server; the next sees
    w' = sort(max(w + S e_1 - gap, 0)).
    """
    w = [0.0] * servers
    waits = np.empty(arrival.size)
    for n in range(arrival.size):
        waits[n] = w[0]
        w[0] += service[n]
        if n + 1 < arrival.size:
            gap = arrival[n + 1] - arrival[n]
            w = sorted(max(x - gap, 0.0) for x in w)
    return waits


@pytest.mark.parametrize(
    "endpoint, servers, service",
    [
        pytest.param({"kind": "self_hosted", "replicas": 3, "max_batch": 1}, 3,
                     {"kind": "gamma", "mean": 1.0, "cv": 1.5}, id="3-replicas-gamma"),
        pytest.param({"kind": "self_hosted", "replicas": 1, "max_batch": 3}, 3,
                     {"kind": "lognormal", "mean": 1.0, "p95": 2.5}, id="3-slots-lognormal"),
        pytest.param({"kind": "self_hosted", "replicas": 2, "max_batch": 2}, 4,
                     {"kind": "exponential", "mean": 1.0}, id="2x2-exponential"),
        pytest.param({"kind": "api", "concurrency": 3}, 3,
                     {"kind": "gamma", "mean": 1.0, "cv": 0.5}, id="api-concurrency-3-gamma"),
    ],
)
def test_fifo_multiserver_matches_kiefer_wolfowitz(endpoint, servers, service):
    lam = 0.9 * servers  # rho = 0.9 (mean service 1 s): most requests queue
    workload = queue_workload(lam, service, duration=5_000, warmup=0.0, endpoint=endpoint)
    seed, replication = 606, 1
    rec = simulate(workload, replication=replication, seed=seed)
    arrival, admit, end = (np.asarray(x, dtype=float) for x in (rec.arrival, rec.admit, rec.end))
    assert (np.asarray(rec.outcome) == COMPLETED).all()
    held = end - admit
    # Each request holds its server for exactly its own service time, drawn at arrival, in
    # arrival order, from the endpoint's named stream (catches e.g. a server that holds a
    # request for the wrong time, which the recursion alone could not, fed with `held`).
    spec = workload.models["server"].service_time
    drawn = spec.sample(Streams(seed, replication).rng("endpoint.server.service"), arrival.size)
    np.testing.assert_allclose(held, drawn, rtol=0, atol=1e-9)
    expected = kiefer_wolfowitz_waits(arrival, held, servers)
    assert (expected > 0).mean() > 0.5  # the queue really is exercised
    np.testing.assert_allclose(admit - arrival, expected, rtol=0, atol=1e-9)
