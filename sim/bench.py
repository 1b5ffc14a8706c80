"""`llmsim bench`: simulated requests per wall-second, engine vs a minimal SimPy model.

Timings on a shared machine are noisy, so each case runs `repeat` times and
the best is kept; what matters is the ratio within one run, not the absolute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simpy

from sim.config.loader import load_workload
from sim.config.schema import Workload
from sim.model.events import gc_paused
from sim.model.pipeline import simulate

CASES = ("mmc.yaml", "chat-selfhosted.yaml", "rag-support.yaml")


@dataclass
class BenchCase:
    name: str
    requests: int
    wall_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall_s


def _timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    requests = fn()
    return requests, time.perf_counter() - start


def minimal_simpy_mmc(rate: float, servers: int, mean_service: float, duration: float, seed: int = 1) -> int:
    """The textbook SimPy model: a process per customer queueing on a simpy.Resource."""
    rng = np.random.default_rng(seed)
    n = int(rate * duration * 1.1) + 100
    gaps = rng.exponential(1.0 / rate, n).tolist()
    services = rng.exponential(mean_service, n).tolist()
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


def run_bench(folder: Path, repeat: int = 3) -> list[BenchCase]:
    """Time one replication of each shipped workload, and the minimal SimPy M/M/c on mmc.yaml's traffic.

    The cases take turns, `repeat` rounds, and each keeps its best time: a stretch of
    noise from other work on the machine then hits every case alike, so ratios hold.
    """
    workloads: dict[str, Workload] = {name: load_workload(folder / name) for name in CASES}
    mmc = workloads["mmc.yaml"]
    model = next(iter(mmc.models.values()))
    rate = next(iter(mmc.traffic.classes.values())).arrival.rate_rps
    runs = {f"llmsim {name}": (lambda w=workload: len(simulate(w).arrival)) for name, workload in workloads.items()}
    runs["minimal SimPy M/M/c (process per customer + Resource)"] = lambda: minimal_simpy_mmc(
        rate, model.replicas * model.max_batch, model.service_time.mean, mmc.simulation.duration_s)
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            requests, wall = _timed(fn)
            if name not in best or wall < best[name][1]:
                best[name] = (requests, wall)
    return [BenchCase(name, requests, wall) for name, (requests, wall) in best.items()]


def format_bench(cases: list[BenchCase]) -> str:
    """A table of the cases, with each rate relative to the minimal SimPy model."""
    baseline = cases[-1].rate
    lines = [f"{'case':<58}{'requests':>10}{'wall s':>9}{'req/s':>11}{'vs SimPy':>10}"]
    for c in cases:
        lines.append(f"{c.name:<58}{c.requests:>10}{c.wall_s:>9.3f}{c.rate:>11.0f}{c.rate / baseline:>9.2f}x")
    return "\n".join(lines)
