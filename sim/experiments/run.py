"""Run a workload: its replications, their summaries and the intervals across them."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from sim.config.loader import load_workload
from sim.config.schema import Api, TraceArrivals, Workload
from sim.metrics.ledger import ledger
from sim.metrics.summary import (
    aggregate,
    budget_sections,
    cache_warming,
    choose_warmup,
    quality_columns,
    stage_times,
    summarise,
)
from sim.metrics.timeseries import timeseries
from sim.model import fastpath
from sim.model.offered import offered_load_rps, offered_utilisation, provider_limit_warnings
from sim.model.pipeline import simulate
from sim.model.traffic.arrivals import user_count

from .estimate import check_work, estimate_run

if TYPE_CHECKING:  # pandas costs 0.2 s to import: only what builds tables imports it
    import pandas as pd


@dataclass
class RunResult:
    """What a run produced: the flat summary, one row per replication, and (`keep_requests`) one row per
    request, the time series and the cost ledger (None when not kept)."""

    workload: Workload
    summary: dict
    rows: list[dict]
    """Each replication's metrics (`replications` is the same as a table)."""
    requests: Optional[pd.DataFrame] = None
    timeseries: Optional[pd.DataFrame] = None
    ledger: Optional[pd.DataFrame] = None
    warnings: list[str] = field(default_factory=list)
    """What the user should know about the run (one line each): the workload's static checks, then
    what the replications found (each line once, in order)."""
    user_usd: dict[int, float] = field(default_factory=dict)
    """Dollars per user over all replications, when the workload has more than one user (the top users)."""

    @cached_property
    def replications(self) -> pd.DataFrame:
        """One row per replication: every metric of the summary, before the mean across them."""
        import pandas as pd

        return pd.DataFrame(self.rows)


class Ticker:
    """Progress lines for a run that takes a while: none in its first seconds, then at most one every few
    seconds, with the simulated time, the requests so far and the time left at the pace so far."""

    EVERY_S = 5.0

    def __init__(self, say: Callable[[str], None], replications: int, duration_s: float) -> None:
        self.say, self.replications, self.duration = say, replications, duration_s
        self.start = self.last = time.monotonic()
        self.spoke = False

    @staticmethod
    def ticks(requests: float) -> int:
        """Ticks per replication: one every ~20,000 simulated requests (a fraction of a second)."""
        return int(min(max(requests / 20_000, 20), 1_000_000))

    def replication(self, r: int) -> Callable[[float, int], None]:
        def tick(share: float, requests: int) -> None:
            now = time.monotonic()
            last = share == 1.0 and r + 1 == self.replications
            if now - self.last < self.EVERY_S and not (last and self.spoke):
                return
            self.last, self.spoke = now, True
            elapsed = now - self.start
            overall = (r + share) / self.replications
            left = f", about {_clock(elapsed / overall * (1 - overall))} left" if 0 < overall < 1 else ""
            self.say(f"replication {r + 1}/{self.replications}: {_clock(share * self.duration)} of "
                     f"{_clock(self.duration)} simulated, {requests:,} requests, {_clock(elapsed)} elapsed{left}")
        return tick


def _clock(seconds: float) -> str:
    """Seconds as 42 s, 3 min 20 s or 2 h 05 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def step_time_sources(workload: Workload) -> dict[str, str]:
    """Where each engine endpoint's step-time coefficients come from (they hold for one host and setup)."""
    return {name: model.engine.coefficients_source() for name, model in workload.models.items()
            if getattr(model, "engine", None) is not None}


def workload_warnings(workload: Workload) -> list[str]:
    """Problems a workload has that are not errors (one line each, the config path first).

    A trace replay whose requests run past duration_s: those are never sent, and the user
    may not know the run is shorter than the trace.
    """
    out = []
    duration, scale = workload.simulation.duration_s, workload.traffic.rate_scale
    classes = workload.traffic.classes
    for name, cls in classes.items():
        arrival = cls.arrival
        if isinstance(arrival, TraceArrivals):
            dropped = arrival.arrivals_after(duration, scale)
            if dropped:
                out.append(f"traffic.classes.{name}.arrival: {dropped:,} of {len(arrival.replay):,} trace arrivals "
                           f"fall after duration_s={duration:g} and are not replayed")
    for k, spec in enumerate(workload.rate_limits):
        # A class without a users block is one user: a per-user limit then throttles the whole class.
        single = [n for n in (spec.classes or classes) if "users" not in classes[n].model_fields_set
                  and user_count(classes[n]) == 1]
        if spec.scope == "user" and single:
            out.append(f"rate_limits[{k}]: a per-user limit on {', '.join(single)}, whose requests all come from one "
                       f"user (no users block): it throttles the whole class as one user; give "
                       f"traffic.classes.{single[0]}.users.count")
    return out + provider_limit_warnings(workload)


def run(workload: Union[Workload, str, Path], *, seed: Optional[int] = None,
        replications: Optional[int] = None, overrides: Sequence[str] = (),
        keep_requests: bool = True, force: bool = False,
        progress: Optional[Callable[[str], None]] = None, user_costs: bool = False) -> RunResult:
    """Simulate a workload (a file path or a validated Workload) and summarise it.

    `seed` and `replications` override the workload's `simulation` block;
    `overrides` are `--set` style `path=value` strings (file paths only).
    `keep_requests=False` skips the per-request table, the time series and the ledger (sweeps, and a
    `llmsim run` that writes no files, don't need them: no table is built, pandas is not even imported).
    Work estimated above the limits (see sim.experiments.estimate) raises ConfigError unless `force`;
    `progress(line)` hears about long work before and while it runs. `user_costs` tallies each user's
    dollars (`user_usd`) even without the tables (the terminal's top users); with them it always does.
    """
    if not isinstance(workload, Workload):
        workload = load_workload(workload, overrides)
    elif overrides:
        raise ValueError("overrides apply to workload files; pass a path")
    sim = workload.simulation
    seed = sim.seed if seed is None else seed
    replications = sim.replications if replications is None else replications
    if replications < 1:
        raise ValueError("replications must be at least 1")
    estimate = estimate_run(workload, replications, keep_requests)
    notes = check_work(estimate, force, "this run", workload.simulation.max_requests)
    ticker = Ticker(progress, replications, sim.duration_s) if progress is not None else None
    for line in notes if progress is not None else ():
        progress(line)
    offered = offered_utilisation(workload)
    load = offered_load_rps(workload)
    rows, frames, series_frames, ledgers = [], [], [], []
    warnings = workload_warnings(workload)
    fast = fastpath.eligible(workload)
    hosted = {name for name, model in workload.models.items() if isinstance(model, Api)}
    user_usd: dict[int, float] = {}
    users = sum(user_count(cls) for cls in workload.traffic.classes.values())
    for r in range(replications):
        rec = simulate(workload, replication=r, seed=seed, progress=ticker.replication(r) if ticker else None,
                       ticks=ticker.ticks(estimate.peak_requests) if ticker else 20)
        warnings += rec.warnings
        warmup = choose_warmup(rec, workload)
        if r == 0:  # (replications are alike: the first tells)
            warnings += cache_warming(rec, workload, warmup)
        rows.append({"replication": r, "offered_load_rps": load, **summarise(rec, workload, warmup, offered)})
        if keep_requests:
            frame = rec.frame()
            if rec.calls is not None:  # as in the summary: the model calls' time in endpoint queues
                frame["queue_wait_s"] = stage_times(rec)["queue"]
                frame = frame.join(budget_sections(rec)).join(quality_columns(rec))
            frame.insert(0, "replication", r)
            frames.append(frame)
            series = timeseries(rec, sim.timeseries_interval_s, sim.duration_s, hosted)
            series.insert(0, "replication", r)
            series_frames.append(series)
        if keep_requests or (user_costs and users > 1):
            book = ledger(rec, workload)
            if users > 1:
                for user, usd in book.groupby("user")["usd"].sum().items():
                    user_usd[user] = user_usd.get(user, 0.0) + usd
            if keep_requests:
                book.insert(0, "replication", r)
                ledgers.append(book)
        # The event path's world (environment, endpoints, callbacks) holds reference cycles, and ran with the
        # collector paused: without a collection here it would outlive the run, and a sweep worker would grow
        # by a world per point. (The fast path builds no world: nothing to collect.)
        del rec
        if not fast:
            gc.collect()
    summary = {
        "workload": workload.name or "",
        "seed": seed,
        "replications": replications,
        "duration_s": sim.duration_s,
        "window_end_s": workload.measure_end_s(),
        "unstable": any(u >= 1.0 for u in offered.values()),
        **aggregate(rows),
    }
    shares = {k[len("stage_"):-len("_share")]: v for k, v in summary.items() if k.startswith("stage_") and k.endswith("_share")}
    if shares:  # the stage to fix first: the largest share of mean latency
        summary["bottleneck_stage"] = max(shares, key=shares.get)
    summary.update({f"step_times_{name}": source for name, source in step_time_sources(workload).items()})
    result = RunResult(workload, summary, rows, warnings=list(dict.fromkeys(warnings)), user_usd=user_usd)
    if keep_requests:
        import pandas as pd

        result.requests = pd.concat(frames, ignore_index=True)
        result.timeseries = pd.concat(series_frames, ignore_index=True)
        result.ledger = pd.concat(ledgers, ignore_index=True)
    return result
