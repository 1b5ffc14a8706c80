"""Arrival processes against their theory: rates, per-step and per-phase counts, dispersion, sessions.

Counts of a Poisson process (schedule, diurnal: thinned Poisson is Poisson) are
Poisson, with a known variance: their checks use 4-sigma bounds and chi-square
tests at 99.9%. For the MMPP and gamma renewal processes the variance is what is
being tested, so each replication yields one number and a 99.9% Student t
interval across replications must cover the theory (the recipe of
test_theory.py); each check also bounds the interval's width, so a run too short
to tell right from wrong fails. Seeds are fixed: a result is the same every run.

Heavy statistics call the samplers the sources use (numpy only); separate tests
check that the SimPy sources hand out exactly the samplers' times.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import simpy
import yaml

from sim.config.arrivals import MmppArrivals, SessionArrivals
from sim.config.loader import ConfigError, load_workload
from sim.config.schema import RequestClass, Workload
from sim.metrics.recorder import COMPLETED, REJECTED, Recorder
from sim.model.events import call_later
from sim.model.offered import offered_load_rps
from sim.model.pipeline import simulate
from sim.model.streams import BlockSampler, Streams, token_draw
from sim.model.traffic.arrivals import (
    GammaTimes,
    RequestFactory,
    SourceContext,
    build_arrivals,
    diurnal_times,
    mmpp_times,
    schedule_times,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "traces"

# Two-sided 99.9% Student t quantiles t(0.9995, df) for df = 1..30 (standard tables).
_T9995 = (
    636.619, 31.599, 12.924, 8.610, 6.869, 5.959, 5.408, 5.041, 4.781, 4.587,
    4.437, 4.318, 4.221, 4.140, 4.073, 4.015, 3.965, 3.922, 3.883, 3.850,
    3.819, 3.792, 3.768, 3.745, 3.725, 3.707, 3.690, 3.674, 3.659, 3.646,
)
CHI2_999 = {2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 12: 32.909}  # chi-square 99.9% quantiles


def t_check(values: Sequence[float], theory: float, what: str, *, max_rel_half: float) -> None:
    """The 99.9% t-interval of independent per-replication values covers theory and is narrow."""
    x = np.asarray(values, dtype=float)
    df = x.size - 1
    t = _T9995[df - 1] if df <= len(_T9995) else 3.2905
    mean, half = float(x.mean()), t * float(x.std(ddof=1)) / math.sqrt(x.size)
    print(f"{what}: theory {theory:.5g}, simulated {mean:.5g} +- {half:.3g} (99.9%, {x.size} replications)")
    assert abs(mean - theory) <= half, f"{what}: {mean:.5g} +- {half:.3g} misses {theory:.5g}"
    assert half <= max_rel_half * abs(theory), f"{what}: half-width {half:.3g} too wide to decide"


def poisson_check(observed: float, expected: float, what: str) -> None:
    """A Poisson count within 4 standard deviations of its mean (two-sided p < 1e-4)."""
    print(f"{what}: expected {expected:.1f}, observed {observed:.0f}")
    assert abs(observed - expected) <= 4 * math.sqrt(expected), f"{what}: {observed} vs {expected:.1f}"


def chi2_check(observed: np.ndarray, expected: np.ndarray, what: str, *, constraints: int = 0) -> None:
    """Pearson chi-square of counts in disjoint bins below its 99.9% quantile.

    df = bins - constraints: 0 when the expected counts are fully known, 1 when they share the observed total.
    """
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = observed.size - constraints
    print(f"{what}: chi-square {stat:.2f} on {df} df (99.9% critical {CHI2_999[df]})")
    assert stat < CHI2_999[df], f"{what}: chi-square {stat:.2f} >= {CHI2_999[df]}"


# ------------------------------------------------------------------ harness


def request_class(arrival: dict, **extra) -> RequestClass:
    return RequestClass.model_validate({"arrival": arrival, "prompt_tokens": 100, "output_tokens": 50,
                                        "endpoint": "m", **extra}, context={"base_dir": str(FIXTURES)})


def run_source(arrival: dict, until: float, *, seed: int = 1, replication: int = 0, rate_scale: float = 1.0,
               service_s: Optional[float] = None, outcome: Optional[Callable[[Recorder, int], int]] = None,
               **extra) -> Recorder:
    """Run one class's arrival process alone through its SimPy source.

    With service_s, each request ends that long after it arrives (an infinite
    server) with `outcome(rec, i)` (default completed), and the class's done hook
    is called, as the pipeline does.
    """
    cls = request_class(arrival, **extra)
    env = simpy.Environment()
    rec = Recorder(["c"], ["m"])
    streams = Streams(seed, replication)
    make = RequestFactory(rec, 0, "c", cls, streams, {"m": 0}, {}, 0)
    hook: list = [None]

    def finish(event) -> None:
        i = event.value
        rec.outcome[i] = outcome(rec, i) if outcome else COMPLETED
        rec.end[i] = env.now
        if hook[0] is not None:
            hook[0](i)

    def submit(i: int) -> None:
        if service_s is not None:
            call_later(env, service_s, finish, i)

    hook[0] = build_arrivals(SourceContext(env, "c", cls, make, submit, streams, rate_scale, until))
    env.run()
    return rec


def sampled_times(sampler, rng: np.random.Generator, until: float, block: int = 2048) -> np.ndarray:
    """All times a sampler hands out below `until` (its blocks are increasing)."""
    out = []
    while True:
        times = sampler(rng, block)
        out.append(times[times < until])
        if times[-1] >= until:
            return np.concatenate(out)


# ----------------------------------------------------------------- schedule

STEPS = [{"until_s": 600, "rate_rps": 2}, {"until_s": 1200, "rate_rps": 6}, {"until_s": 1500, "rate_rps": 0},
         {"until_s": 1800, "rate_rps": 3}]


def test_schedule_counts_per_step_follow_the_steps_and_the_last_step_holds():
    reps, until = 8, 2400.0
    edges = np.array([0, 600, 1200, 1500, 1800, 2400])
    rates = np.array([2, 6, 0, 3, 3])  # after 1800 the last step's rate holds
    counts = sum(np.histogram(run_source({"kind": "schedule", "steps": STEPS}, until, replication=r).arrival,
                              edges)[0] for r in range(reps))
    expected = reps * rates * np.diff(edges)
    assert counts[2] == 0, "a zero-rate step has no arrivals"
    for k in (0, 1, 3, 4):
        poisson_check(counts[k], expected[k], f"schedule step {k}")
    keep = expected > 0
    chi2_check(counts[keep], expected[keep], "schedule steps")


def test_schedule_repeats_and_spikes_multiply():
    arrival = {"kind": "schedule", "steps": [{"until_s": 100, "rate_rps": 1}, {"until_s": 300, "rate_rps": 4}],
               "repeat": True, "spikes": [{"start_s": 650, "end_s": 750, "multiplier": 3}]}
    spec = request_class(arrival).arrival
    times = np.concatenate([sampled_times(schedule_times(spec, 1.0, 1200.0), Streams(3, r).rng("x"), 1200.0)
                            for r in range(20)])
    # Cycles of 300 s: [0,100) at 1, [100,300) at 4; the spike triples [650,700) (at 1) and [700,750) (at 4).
    edges = np.array([0, 100, 300, 400, 600, 650, 700, 750, 900, 1000, 1200])
    rates = np.array([1, 4, 1, 4, 1, 3, 12, 4, 1, 4])
    counts = np.histogram(times, edges)[0]
    expected = 20 * rates * np.diff(edges)
    for k in range(edges.size - 1):
        poisson_check(counts[k], expected[k], f"repeat/spike piece [{edges[k]}, {edges[k + 1]})")
    assert spec.mean_rate_rps() == pytest.approx((100 * 1 + 200 * 4) / 300)
    assert spec.mean_rate_rps(1200) == pytest.approx(float(np.dot(rates, np.diff(edges))) / 1200)


def test_schedule_mean_rate_is_the_steps_average():
    spec = request_class({"kind": "schedule", "steps": STEPS}).arrival
    assert spec.mean_rate_rps() == pytest.approx((600 * 2 + 600 * 6 + 0 + 300 * 3) / 1800)
    assert spec.mean_rate_rps(2400) == pytest.approx((600 * 2 + 600 * 6 + 900 * 3) / 2400)


# ------------------------------------------------------------------ diurnal


def test_diurnal_counts_per_phase_follow_the_sinusoid():
    trough, peak, period, peak_at = 1.0, 9.0, 600.0, 175.0
    spec = request_class({"kind": "diurnal", "trough_rps": trough, "peak_rps": peak, "period_s": period,
                          "peak_at_s": peak_at}).arrival
    reps, periods = 10, 10
    until = periods * period
    phase_counts = np.zeros(12)
    for r in range(reps):
        streams = Streams(5, r)
        times = sampled_times(diurnal_times(spec, 1.0, until, streams.rng("u")), streams.rng("a"), until)
        phase_counts += np.histogram(times % period, np.linspace(0, period, 13))[0]
    # E[count in phase bin [a, b)] per period = integral of trough + A (1 + cos(w (t - peak_at))) / 2, by hand.
    amp, w = (peak - trough) / 2, 2 * math.pi / period
    edges = np.linspace(0, period, 13)
    per_period = np.array([(trough + amp) * (b - a) + amp / w * (math.sin(w * (b - peak_at)) - math.sin(w * (a - peak_at)))
                           for a, b in zip(edges[:-1], edges[1:])])
    expected = reps * periods * per_period
    chi2_check(phase_counts, expected, "diurnal phase bins")
    assert phase_counts.argmax() == 3 and phase_counts.argmin() == 9  # bins centred on the peak (175 s) and trough
    assert spec.mean_rate_rps() == (peak + trough) / 2


def test_diurnal_spike_triples_the_rate_inside_it():
    spec = request_class({"kind": "diurnal", "trough_rps": 2, "peak_rps": 6, "period_s": 1000, "peak_at_s": 0,
                          "spikes": [{"start_s": 400, "end_s": 600, "multiplier": 3}]}).arrival
    counts = np.zeros(3)
    for r in range(10):
        streams = Streams(6, r)
        times = sampled_times(diurnal_times(spec, 1.0, 1000.0, streams.rng("u")), streams.rng("a"), 1000.0)
        counts += np.histogram(times, [0, 400, 600, 1000])[0]
    base = [spec.base_integral(0, 400), spec.base_integral(400, 600), spec.base_integral(600, 1000)]
    expected = 10 * np.array([base[0], 3 * base[1], base[2]])
    for k, what in enumerate(("before", "inside", "after")):
        poisson_check(counts[k], expected[k], f"diurnal spike, {what}")
    assert spec.mean_rate_rps(1000) == pytest.approx((base[0] + 3 * base[1] + base[2]) / 1000)


# --------------------------------------------------------------------- mmpp


def mmpp_idc(r_on: float, r_off: float, m_on: float, m_off: float, window: float) -> float:
    """Index of dispersion of counts var N(T) / E N(T) of a stationary two-state MMPP.

    With switching rates a = 1/m_on (on -> off) and b = 1/m_off, the rate process
    has variance C = pi_on pi_off (r_on - r_off)^2, pi_on pi_off = a b / (a + b)^2,
    and autocovariance C exp(-(a + b) t). Then
    Var N(T) = mean T + 2 int_0^T (T - t) C exp(-(a + b) t) dt, so with k = a + b
    IDC(T) = 1 + 2 C / (k mean) [1 - (1 - exp(-k T)) / (k T)], and
    IDC(inf) = 1 + 2 (r_on - r_off)^2 a b / ((a + b)^3 mean)
             = 1 + 2 (r_on - r_off)^2 m_on^2 m_off^2 / ((m_on + m_off)^3 mean)
             = 1 + 2 (r_on - r_off)^2 a b / ((a + b)^2 (r_on b + r_off a)),
    the last because mean = (r_on b + r_off a) / (a + b): the two forms in the issue agree.
    """
    a, b = 1 / m_on, 1 / m_off
    mean = (r_on * m_on + r_off * m_off) / (m_on + m_off)
    k = a + b
    c = a * b / k**2 * (r_on - r_off) ** 2
    return 1 + 2 * c / (k * mean) * (1 - (1 - math.exp(-k * window)) / (k * window))


def test_mmpp_idc_forms_agree():
    r_on, r_off, m_on, m_off = 20.0, 2.0, 5.0, 15.0
    a, b = 1 / m_on, 1 / m_off
    mean = (r_on * m_on + r_off * m_off) / (m_on + m_off)
    by_means = 1 + 2 * (r_on - r_off) ** 2 * m_on**2 * m_off**2 / ((m_on + m_off) ** 3 * mean)
    by_rates = 1 + 2 * (r_on - r_off) ** 2 * a * b / ((a + b) ** 2 * (r_on * b + r_off * a))
    assert by_means == pytest.approx(by_rates, rel=1e-12)
    assert mmpp_idc(r_on, r_off, m_on, m_off, 1e9) == pytest.approx(by_means, rel=1e-6)


def test_mmpp_mean_rate_and_dispersion_of_counts():
    r_on, r_off, m_on, m_off = 20.0, 2.0, 5.0, 15.0
    spec = MmppArrivals(kind="mmpp", rate_on_rps=r_on, rate_off_rps=r_off, mean_on_s=m_on, mean_off_s=m_off)
    mean = (r_on * m_on + r_off * m_off) / (m_on + m_off)
    assert spec.mean_rate_rps() == pytest.approx(mean)
    window, windows = 600.0, 100
    rates, idcs = [], []
    for r in range(20):
        rng = Streams(7, r).rng("class.c.arrivals")
        times = sampled_times(mmpp_times(spec, 1.0, rng), rng, window * windows)
        counts = np.histogram(times, np.arange(windows + 1) * window)[0]
        rates.append(times.size / (window * windows))
        idcs.append(counts.var(ddof=1) / counts.mean())
    t_check(rates, mean, "MMPP mean rate", max_rel_half=0.03)
    t_check(idcs, mmpp_idc(r_on, r_off, m_on, m_off, window), f"MMPP IDC({window:.0f} s)", max_rel_half=0.2)


def test_mmpp_off_rate_zero_means_silent_stretches():
    spec = MmppArrivals(kind="mmpp", rate_on_rps=50, mean_on_s=1, mean_off_s=9)
    rng = Streams(8, 0).rng("x")
    times = sampled_times(mmpp_times(spec, 1.0, rng), rng, 20000.0)
    poisson_like = np.histogram(times, np.arange(0, 20001, 1.0))[0]
    assert (poisson_like == 0).mean() > 0.8  # off 90% of the time, and no arrival while off
    assert times.size / 20000 == pytest.approx(5.0, rel=0.1)


# -------------------------------------------------------------------- gamma


@pytest.mark.parametrize("cv", [0.5, 2.5])
def test_gamma_renewal_mean_rate_and_cv(cv):
    rate, until = 4.0, 5000.0
    rates, cvs = [], []
    for r in range(20):
        times = sampled_times(GammaTimes(rate, cv), Streams(9, r).rng("x"), until)
        gaps = np.diff(times)
        rates.append(times.size / until)
        cvs.append(gaps.std() / gaps.mean())
    t_check(rates, rate, f"gamma(cv={cv}) rate", max_rel_half=0.03)
    t_check(cvs, cv, f"gamma(cv={cv}) inter-arrival CV", max_rel_half=0.03)


def test_gamma_renewal_starts_in_equilibrium():
    # E N(0.5) = rate x 0.5 only for the stationary (equilibrium) renewal process; one whose first
    # gap were an ordinary gamma gap would show ~ 0.5 rate + (cv^2 - 1) / 2 = 4.6 here.
    rate, cv, horizon = 4.0, 2.5, 0.5
    counts = []
    for r in range(4000):
        times = GammaTimes(rate, cv)(Streams(10, r).rng("x"), 256)
        assert times[-1] > horizon
        counts.append(int((times < horizon).sum()))
    groups = np.asarray(counts, dtype=float).reshape(20, 200).mean(axis=1)  # 20 independent batch means
    t_check(groups, rate * horizon, "gamma E N(0.5)", max_rel_half=0.2)


# ---------------------------------------------------------- sources = samplers


def test_simpy_sources_hand_out_exactly_the_samplers_times():
    until = 500.0
    cases = [
        ({"kind": "schedule", "steps": STEPS[:2]},
         lambda spec, s: sampled_times(schedule_times(spec, 1.5, until), s.rng("class.c.arrivals"), until)),
        ({"kind": "diurnal", "trough_rps": 1, "peak_rps": 5, "period_s": 200},
         lambda spec, s: sampled_times(diurnal_times(spec, 1.5, until, s.rng("class.c.thinning")),
                                       s.rng("class.c.arrivals"), until)),
        ({"kind": "mmpp", "rate_on_rps": 9, "rate_off_rps": 1, "mean_on_s": 3, "mean_off_s": 6},
         lambda spec, s: (lambda rng: sampled_times(mmpp_times(spec, 1.5, rng), rng, until))(s.rng("class.c.arrivals"))),
        ({"kind": "gamma", "rate_rps": 3, "cv": 2},
         lambda spec, s: sampled_times(GammaTimes(3 * 1.5, 2), s.rng("class.c.arrivals"), until)),
    ]
    for arrival, reference in cases:
        got = np.asarray(run_source(arrival, until, seed=4, rate_scale=1.5).arrival)
        want = reference(request_class(arrival).arrival, Streams(4, 0))
        assert got.size > 100
        np.testing.assert_array_equal(got, want, err_msg=arrival["kind"])


OPEN_LOOP = [
    {"kind": "poisson", "rate_rps": 4},
    {"kind": "schedule", "steps": [{"until_s": 500, "rate_rps": 2}, {"until_s": 1000, "rate_rps": 6}]},
    {"kind": "diurnal", "trough_rps": 1, "peak_rps": 7, "period_s": 250},
    {"kind": "mmpp", "rate_on_rps": 6, "rate_off_rps": 2, "mean_on_s": 2, "mean_off_s": 2},
    {"kind": "gamma", "rate_rps": 4, "cv": 0.5},
]


@pytest.mark.parametrize("arrival", OPEN_LOOP, ids=lambda a: a["kind"])
def test_rate_scale_multiplies_every_open_loop_rate(arrival):
    until = 1000.0
    spec = request_class(arrival).arrival
    for scale in (1.0, 2.0):
        counts = [len(run_source(arrival, until, seed=11, replication=r, rate_scale=scale).arrival) for r in range(4)]
        expected = spec.mean_rate_rps() * scale * until * 4
        # Loose: 6 Poisson sigmas x sqrt(3) covers the mmpp's dispersion (IDC(inf) = 3 here).
        assert abs(sum(counts) - expected) <= 6 * math.sqrt(3 * expected), (arrival["kind"], scale, sum(counts))


def test_offered_load_uses_each_kinds_mean_rate():
    classes = {f"c{k}": {"arrival": a, "prompt_tokens": 10, "output_tokens": 5} for k, a in enumerate(OPEN_LOOP)}
    classes["s"] = {"arrival": {"kind": "sessions", "session_rate_rps": 0.5, "turns": {"kind": "empirical",
                    "values": [1, 2, 6]}, "think_time_s": 5}, "prompt_tokens": 10, "output_tokens": 5}
    workload = Workload.model_validate({"traffic": {"rate_scale": 3, "classes": classes},
                                        "models": {"m": {"kind": "self_hosted", "service_time": 0.01}}})
    expected = 4 + 4 + 4 + 4 + 4 + 0.5 * 3
    assert offered_load_rps(workload) == pytest.approx(3 * expected)


# ----------------------------------------------------------------- sessions


SESSIONS = {"kind": "sessions", "session_rate_rps": 0.2, "turns": {"kind": "empirical", "values": [1, 2, 5]},
            "think_time_s": 3}


def sessions_of(rec: Recorder) -> dict[int, list[int]]:
    """Request indices per session (each session has its own user id in these runs)."""
    by_user: dict[int, list[int]] = {}
    for i, user in enumerate(rec.user):
        by_user.setdefault(user, []).append(i)
    return by_user


def test_sessions_turns_timing_and_growing_prompts():
    until = 20000.0
    classes = dict(prompt_tokens={"kind": "uniform", "low": 50, "high": 150},
                   output_tokens={"kind": "uniform", "low": 10, "high": 30}, users={"count": 10**6})
    rec = run_source(SESSIONS, until, seed=12, service_s=2.0, **classes)
    sessions = sessions_of(rec)
    # Session starts are Poisson at 0.2/s.
    poisson_check(len(sessions), 0.2 * until, "sessions started")
    turns = np.array([len(v) for v in sessions.values() if rec.arrival[v[0]] < until - 30])
    observed = np.array([(turns == k).sum() for k in (1, 2, 5)])
    assert observed.sum() == turns.size, "a session has 1, 2 or 5 turns"
    chi2_check(observed, np.full(3, turns.size / 3), "turns per session", constraints=1)
    for requests in sessions.values():
        arrivals = np.array([rec.arrival[i] for i in requests])
        np.testing.assert_allclose(np.diff(arrivals), 5.0)  # answer after 2 s, then 3 s of thought
        for prev, cur in zip(requests, requests[1:]):
            assert rec.prompt[cur] > rec.prompt[prev] + rec.output[prev]
    # Exactly: prompt = the next draw of the class's prompt stream + the previous turn's prompt and answer.
    history = np.zeros(len(rec.prompt), dtype=np.int64)
    for requests in sessions.values():
        for prev, cur in zip(requests, requests[1:]):
            history[cur] = rec.prompt[prev] + rec.output[prev]
    draws = BlockSampler(token_draw(request_class(SESSIONS, **classes).prompt_tokens), Streams(12, 0).rng("class.c.prompt"))
    np.testing.assert_array_equal(np.asarray(rec.prompt) - history, [draws() for _ in rec.prompt])
    spec = request_class(SESSIONS).arrival
    assert isinstance(spec, SessionArrivals) and spec.mean_rate_rps() == pytest.approx(0.2 * 8 / 3)
    poisson_check(len(rec.arrival), spec.mean_rate_rps() * until, "session requests")


def test_sessions_context_cap_user_ids_and_failed_turns():
    arrival = {**SESSIONS, "turns": 6, "max_context_tokens": 500}
    rec = run_source(arrival, 3000.0, seed=13, service_s=1.0, users={"count": 3})
    assert max(rec.prompt) == 500 and rec.prompt.count(500) > 10
    firsts = [i for i in range(len(rec.prompt)) if rec.prompt[i] == 100]
    assert [rec.user[i] for i in firsts] == [k % 3 for k in range(len(firsts))]  # users in turn
    # A turn that ends other than completed ends its session: reject every third turn.
    rec = run_source(arrival, 3000.0, seed=13, service_s=1.0, users={"count": 10**6},
                     outcome=lambda r, i: REJECTED if r.prompt[i] == 400 else COMPLETED)  # turn 3: 100 + (100 + 50) + 50 + 100
    assert set(len(v) for v in sessions_of(rec).values()) <= {1, 2, 3}
    assert max(len(v) for v in sessions_of(rec).values()) == 3


def test_sessions_run_end_to_end_through_the_pipeline():
    workload = Workload.model_validate({
        "simulation": {"duration_s": 600},
        "traffic": {"classes": {"chat": {"arrival": {**SESSIONS, "session_rate_rps": 0.5, "turns": 4},
                                         "prompt_tokens": 100, "output_tokens": 20, "users": {"count": 10**6}}}},
        "models": {"m": {"kind": "self_hosted", "replicas": 1, "max_batch": 64, "service_time": 0.5}},
    })
    rec = simulate(workload)
    turns = [len(v) for v in sessions_of(rec).values()]
    assert max(turns) == 4 and sum(t == 4 for t in turns) > 0.8 * len(turns)
    assert sorted(set(rec.prompt)) == [100, 220, 340, 460]


# --------------------------------------------------------------- validation


@pytest.mark.parametrize("arrival, message", [
    ("{kind: schedule, steps: [{until_s: 600, rate_rps: 2}, {until_s: 300, rate_rps: 1}]}",
     r"arrival\.steps\.1\.until_s: 300\.0 must be greater than the previous step's \(600\.0\)"),
    ("{kind: schedule, steps: [{until_s: 600, rate_rps: 0}]}", r"arrival\.steps: every step has rate 0"),
    ("{kind: diurnal, trough_rps: 5, peak_rps: 2}", r"arrival: trough_rps \(5\.0\) must be at most peak_rps"),
    ("{kind: diurnal, trough_rps: 1, peak_rps: 2, spikes: [{start_s: 10, end_s: 5, multiplier: 3}]}",
     r"arrival\.spikes\.0: end_s \(5\.0\) must be greater than start_s"),
    ("{kind: mmpp, rate_on_rps: 5, mean_on_s: 0, mean_off_s: 3}", r"arrival\.mean_on_s: "),
    ("{kind: sessions, session_rate_rps: 1, think_time_s: 3}", r"arrival\.turns: required key is missing"),
    ("{kind: gama, rate_rps: 1, cv: 2}", r"arrival\.kind: unknown kind 'gama' \(did you mean 'gamma'\?"),
])
def test_bad_arrivals_are_one_line_errors(tmp_path, arrival, message):
    path = tmp_path / "w.yaml"
    path.write_text("traffic:\n  classes:\n    c:\n"
                    f"      arrival: {arrival}\n"
                    "      prompt_tokens: 10\n      output_tokens: 5\n"
                    "models:\n  m: {kind: self_hosted, service_time: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_workload(path)
    assert len(err.value.lines) == 1, err.value.lines
    assert re.search(rf"^{re.escape(str(path))}:4: traffic\.classes\.c\.{message}", err.value.lines[0]), err.value.lines


def test_readme_arrival_examples_validate():
    from documents import PAGES, blocks

    examples = blocks("yaml", PAGES["guides/arrivals.md"])
    kinds = set()
    for text in examples:
        arrival = yaml.safe_load(text)["arrival"]
        if arrival["kind"] == "trace":  # point it at a fixture with the example's columns
            arrival["path"] = "readme_example.csv"
        spec = request_class(arrival).arrival
        kinds.add(spec.kind)
        assert spec.mean_rate_rps() > 0
    assert kinds == {"schedule", "diurnal", "mmpp", "gamma", "sessions", "trace"}
