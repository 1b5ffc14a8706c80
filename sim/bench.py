"""`llmsim bench`: simulated requests per wall-second on the shipped workloads, against two SimPy M/M/c models.

Timings on a shared machine are noisy, so the cases take turns, `repeat` rounds, and each keeps its
best time: a stretch of noise from other work hits every case alike, so the ratios of one run hold.
Besides the rate, each llmsim case is run once more, untimed, to count what a request costs: events
scheduled, Python function calls (a profile hook counts them) and bytes allocated at the peak
(tracemalloc), each per simulated request. Reference cases measure the compiled parts against their
Python twins in the same run: chat-selfhosted on the event path (the compiled replica instead of the
fast path), and chat-selfhosted and rag-support each in a process of its own with every compiled part
off (LLMSIM_PURE_PYTHON=1: the Python engine on the event path; the run alone is timed, inside that
process).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import simpy

from sim.config.loader import load_workload
from sim.config.schema import Workload
from sim.model.events import gc_paused
from sim.model.pipeline import simulate

CASES = ("mmc.yaml", "chat-api.yaml", "chat-selfhosted.yaml", "rag-support.yaml")
# The compiled engine (the fast path, then the compiled replica on the event path) against the Python engine it
# ports, on the same workload in the same run.
REFERENCE = "chat-selfhosted.yaml"
EVENT_PATH = f"{REFERENCE}, event path"  # a workload key like the files', so its case reads the same way
EVENT_CASE = f"llmsim {EVENT_PATH}"
PURE = (REFERENCE, "rag-support.yaml")  # run once more with every compiled part off (its own process)
PURE_SUFFIX = ", pure Python"
NAIVE = "SimPy M/M/c, a process per customer + Resource"
CALLBACKS = "SimPy M/M/c, callbacks on timeouts"


@dataclass
class BenchCase:
    name: str
    requests: int
    wall_s: float
    events: Optional[float] = None        # per request
    calls: Optional[float] = None         # Python calls per request
    bytes: Optional[float] = None         # peak bytes allocated per request

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s


def _timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    requests = fn()
    return requests, time.perf_counter() - start


def _pure_python(path: Path) -> tuple[int, float]:
    """(requests, wall seconds) of one replication of `path` with every compiled part off, timed inside a
    process of its own (the compiled parts are chosen at import)."""
    code = ("import sys, time\n"
            "from sim.config.loader import load_workload\n"
            "from sim.model.pipeline import simulate\n"
            "workload = load_workload(sys.argv[1])\n"
            "start = time.perf_counter()\n"
            "requests = len(simulate(workload).arrival)\n"
            "print(requests, time.perf_counter() - start)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=dict(os.environ, LLMSIM_PURE_PYTHON="1"),
                          capture_output=True, text=True, check=True)
    requests, wall = done.stdout.split()
    return int(requests), float(wall)


def _mmc_draws(rate: float, mean_service: float, duration: float, seed: int) -> tuple[int, list, list]:
    rng = np.random.default_rng(seed)
    n = int(rate * duration * 1.1) + 100
    return n, rng.exponential(1.0 / rate, n).tolist(), rng.exponential(mean_service, n).tolist()


def minimal_simpy_mmc(rate: float, servers: int, mean_service: float, duration: float, seed: int = 1) -> int:
    """The textbook SimPy model: a process per customer queueing on a simpy.Resource."""
    n, gaps, services = _mmc_draws(rate, mean_service, duration, seed)
    env = simpy.Environment()
    server = simpy.Resource(env, servers)
    done = []

    def customer(i: int):
        arrived = env.now
        with server.request() as req:
            yield req
            yield env.timeout(services[i])
        done.append(env.now - arrived)

    def source():
        for i in range(n):
            yield env.timeout(gaps[i])
            if env.now >= duration:
                return
            env.process(customer(i))

    env.process(source())
    with gc_paused():  # as llmsim runs: the ratio compares the models, not the collector's settings
        env.run()
    return len(done)


def callback_simpy_mmc(rate: float, servers: int, mean_service: float, duration: float, seed: int = 1) -> int:
    """A lean hand-written SimPy model: no processes, a callback on each arrival's and service's timeout."""
    n, gaps, services = _mmc_draws(rate, mean_service, duration, seed)
    env = simpy.Environment()
    free, waiting, done = [servers], deque(), []
    state = {"next": 0}

    def start(i: int) -> None:
        env.timeout(services[i], i).callbacks.append(depart)

    def depart(event) -> None:
        done.append(event.value)
        if waiting:
            start(waiting.popleft())
        else:
            free[0] += 1

    def arrive(event) -> None:
        i = state["next"]
        state["next"] = i + 1
        if i + 1 < n and env.now + gaps[i + 1] < duration:
            env.timeout(gaps[i + 1]).callbacks.append(arrive)
        if free[0]:
            free[0] -= 1
            start(i)
        else:
            waiting.append(i)

    env.timeout(gaps[0]).callbacks.append(arrive)
    with gc_paused():
        env.run()
    return len(done)


def _costs(workload: Workload) -> tuple[float, float, float]:
    """(events, Python calls, peak bytes) per simulated request of one replication."""
    calls = [0]

    def count(frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            calls[0] += 1

    sys.setprofile(count)
    try:
        rec = simulate(workload)
    finally:
        sys.setprofile(None)
    requests = max(len(rec.arrival), 1)
    tracemalloc.start()
    try:
        simulate(workload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return rec.events / requests, calls[0] / requests, peak / requests


def run_bench(folder: Path, repeat: int = 3) -> list[BenchCase]:
    """Time one replication of each shipped workload and both SimPy M/M/c models on mmc.yaml's traffic."""
    workloads: dict[str, Workload] = {name: load_workload(folder / name) for name in CASES}
    mmc = workloads["mmc.yaml"]
    model = next(iter(mmc.models.values()))
    args = (next(iter(mmc.traffic.classes.values())).arrival.rate_rps, model.replicas * model.max_batch,
            model.service_time.mean, mmc.simulation.duration_s)
    # Each case: a callable giving (requests, wall seconds) of one timed run.
    runs: dict[str, Callable[[], tuple[int, float]]] = {
        f"llmsim {name}": partial(_timed, lambda w=workload: len(simulate(w).arrival))
        for name, workload in workloads.items()}
    reference = workloads[REFERENCE].model_copy(update={"simulation": workloads[REFERENCE].simulation.model_copy(
        update={"fast_path": False})})
    workloads[EVENT_PATH] = reference
    runs[EVENT_CASE] = partial(_timed, lambda: len(simulate(reference).arrival))
    for name in PURE:
        runs[f"llmsim {name}{PURE_SUFFIX}"] = partial(_pure_python, folder / name)
    runs[NAIVE] = partial(_timed, lambda: minimal_simpy_mmc(*args))
    runs[CALLBACKS] = partial(_timed, lambda: callback_simpy_mmc(*args))
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            requests, wall = fn()
            if name not in best or wall < best[name][1]:
                best[name] = (requests, wall)
    cases = [BenchCase(name, requests, wall) for name, (requests, wall) in best.items()]
    for case in cases:
        workload = workloads.get(case.name.removeprefix("llmsim "))
        if workload is not None:
            case.events, case.calls, case.bytes = _costs(workload)
    return cases


def format_bench(cases: list[BenchCase]) -> str:
    """A table of the cases: rates, ratios to both SimPy models, and what a request costs."""
    rates = {c.name: c.rate for c in cases}
    naive, lean = rates.get(NAIVE, np.nan), rates.get(CALLBACKS, np.nan)
    lines = [f"{'case':<48}{'requests':>9}{'wall s':>8}{'req/s':>10}{'vs naive':>9}{'vs calls':>9}"
             f"{'events/req':>11}{'calls/req':>10}{'B/req':>7}"]
    for c in cases:
        costs = (f"{c.events:>11.2f}{c.calls:>10.0f}{c.bytes:>7.0f}" if c.events is not None else "")
        lines.append(f"{c.name:<48}{c.requests:>9}{c.wall_s:>8.3f}{c.rate:>10.0f}{c.rate / naive:>8.2f}x"
                     f"{c.rate / lean:>8.2f}x{costs}")
    fast, events, python = (rates.get(f"llmsim {REFERENCE}"), rates.get(EVENT_CASE),
                            rates.get(f"llmsim {REFERENCE}{PURE_SUFFIX}"))
    if fast and events and python:
        lines.append(f"{REFERENCE}: the fast path runs {fast / python:.1f}x the Python engine's rate, the compiled "
                     f"replica on the event path {events / python:.1f}x")
    compiled, pure = rates.get(f"llmsim {PURE[1]}"), rates.get(f"llmsim {PURE[1]}{PURE_SUFFIX}")
    if compiled and pure:
        lines.append(f"{PURE[1]}: the compiled parts run {compiled / pure:.2f}x the pure-Python rate")
    return "\n".join(lines)
