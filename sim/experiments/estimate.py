"""How much work a run or a sweep is, before it starts: requests, memory and time.

A mistyped duration (`1e9` for `1e4`), replication count or rate must not start a
run that takes days or exhausts memory before printing anything. The estimate is
rough but safe: the expected number of simulated requests (open-loop rate x
duration, a closed loop's users at most one request per think time, a trace's own
length), the memory its records take (one replication's simulation state, plus the
per-request table `run` keeps across replications), and a time at a typical speed.
Above the limits a run is refused with the estimate (exit 2), unless forced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sim.config.loader import ConfigError
from sim.config.schema import ClosedLoopArrivals, TraceArrivals, Workload
from sim.model import fastpath

# Measured (llmsim bench, tracemalloc): a request's records while a replication runs (its
# columns, the engine's and the pipeline's per-request state), and its row in the table a
# run keeps; simulated requests per second of one core for plain and pipeline workloads on the event
# path, and (the slowest shipped case, chat-selfhosted's compiled engine, 768k/s, rounded down) on the fast path.
BYTES_PER_REQUEST = 1_000
BYTES_PER_PIPELINE_REQUEST = 3_000
BYTES_PER_TABLE_ROW = 250
BYTES_PER_SAMPLE = 600   # one endpoint's counters and gauges at one time-series sample
REQUESTS_PER_S = 60_000
PIPELINE_REQUESTS_PER_S = 20_000
FAST_PATH_REQUESTS_PER_S = 500_000
MIN_RESPONSE_S = 0.05  # a closed loop's user waits at least this for an answer (bounds think time 0)

MAX_REQUESTS = 100_000_000       # refuse above: ~half an hour of one core, tens of GB of tables
MAX_MEMORY_BYTES = 16 * 2 ** 30  # refuse above
WARN_SECONDS = 15.0              # say how long above, and show progress


@dataclass(frozen=True)
class WorkEstimate:
    """Expected work of a run (or of every point of a sweep)."""

    requests: float          # simulated requests in all
    peak_requests: float     # in the largest single replication
    memory_bytes: float      # peak memory of the records
    seconds: float           # wall time on one core, roughly

    def describe(self) -> str:
        return (f"about {_count(self.requests)} simulated requests, {_bytes(self.memory_bytes)} of records, "
                f"{_duration(self.seconds)} on one core")

    def __add__(self, other: "WorkEstimate") -> "WorkEstimate":
        return WorkEstimate(self.requests + other.requests, max(self.peak_requests, other.peak_requests),
                            max(self.memory_bytes, other.memory_bytes), self.seconds + other.seconds)


def requests_per_replication(workload: Workload) -> float:
    """Expected requests one replication simulates (arrivals in [0, duration_s))."""
    duration = workload.simulation.duration_s
    total = 0.0
    for cls in workload.traffic.classes.values():
        arrival = cls.arrival
        if isinstance(arrival, ClosedLoopArrivals):
            total += arrival.users * duration / (arrival.think_time_s.mean + MIN_RESPONSE_S)
        elif isinstance(arrival, TraceArrivals):
            total += len(arrival.replay) - arrival.arrivals_after(duration, workload.traffic.rate_scale)
        else:
            total += cls.open_loop_rate_rps() * workload.traffic.rate_scale * duration
    return total


def estimate_run(workload: Workload, replications: Optional[int] = None, keep_requests: bool = True) -> WorkEstimate:
    """The work of `replications` replications of `workload` (default: its own count)."""
    replications = workload.simulation.replications if replications is None else replications
    per_rep = requests_per_replication(workload)
    pipeline = workload.pipeline is not None
    sim = workload.simulation
    samples = sim.duration_s / sim.timeseries_interval_s * len(workload.models)  # the monitor's, per replication
    state = per_rep * (BYTES_PER_PIPELINE_REQUEST if pipeline else BYTES_PER_REQUEST) + samples * BYTES_PER_SAMPLE
    table = per_rep * replications * BYTES_PER_TABLE_ROW if keep_requests else 0.0
    speed = PIPELINE_REQUESTS_PER_S if pipeline else FAST_PATH_REQUESTS_PER_S if fastpath.eligible(workload) \
        else REQUESTS_PER_S
    return WorkEstimate(per_rep * replications, per_rep, state + table, per_rep * replications / speed)


def check_work(estimate: WorkEstimate, force: bool, what: str = "this run",
               max_requests: Optional[float] = None) -> list[str]:
    """Refuse (ConfigError, exit 2) work above the limits unless forced; return warnings for long work.

    `max_requests`: the workload's own limit (simulation.max_requests), which replaces MAX_REQUESTS.
    """
    limit = MAX_REQUESTS if max_requests is None else max_requests
    too_much = estimate.requests > limit or estimate.memory_bytes > MAX_MEMORY_BYTES
    if too_much and not force:
        over = (f"over the limit of {_count(limit)} requests" if estimate.requests > limit
                else f"over the limit of {_bytes(MAX_MEMORY_BYTES)} of memory")
        raise ConfigError([f"{what} would be {estimate.describe()}: {over}. Check duration_s, rates, replications "
                           "and axes; --force runs it anyway (simulation.max_requests raises the limit)"])
    if too_much or estimate.seconds > WARN_SECONDS:
        return [f"{what} is {estimate.describe()}"]
    return []


def _count(n: float) -> str:
    for unit, size in (("billion", 1e9), ("million", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:,.0f}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
