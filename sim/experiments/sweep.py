"""`llmsim sweep`: run every point of an experiment, save each as it finishes, then the capacity search.

Output folder (default reports/<experiment name>/):
  experiment.json   what was run (the resolved experiment and base workload, and its fingerprint)
  results.parquet   one row per point and replication: axis values, seed, status, error, every metric
  results.csv       the same table as CSV
  capacity.json     with a `capacity:` block: each config's highest load meeting the SLO
  .llmsim.lock      while a sweep writes there: its pid and host

Every point's values are checked before the first point runs, and before the folder is touched.
"""
from __future__ import annotations

import datetime
import math
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import pandas as pd

from sim.config.loader import ConfigError
from sim.metrics.summary import metric_names
from sim.model.offered import offered_load_rps

from .capacity import CapacityTask, cheapest, search_capacity
from .estimate import WorkEstimate, check_work, estimate_run
from .executors import run_tasks, stop_on_sigterm
from .progress import Progress
from .run import run, step_time_sources
from .spec import LoadedExperiment, Point, Problems, Source, axis_values, load_experiment, override, point_key
from .store import FolderLock, ResultStore, check_fingerprint, read_json, write_json


@dataclass(frozen=True)
class PointTask:
    """A point to simulate, with its workload already validated (so workers need no files)."""

    point: Point
    workload: Any
    keep: Optional[tuple[str, ...]]


@dataclass
class SweepResult:
    """What a sweep produced."""

    out: Path
    results: pd.DataFrame
    capacity: Optional[dict]
    failed: int


def run_point(task: PointTask) -> list[dict[str, Any]]:
    """Simulate one point; its rows for results.parquet (one failed row, with the error, if it raises)."""
    start = time.perf_counter()
    seed = task.workload.simulation.seed
    try:
        result = run(task.workload, keep_requests=False, force=True)  # the sweep's estimate was checked
    except Exception as exc:  # recorded with its error; the sweep goes on
        return [_row(task.point, seed, -1, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)]
    elapsed = (time.perf_counter() - start) / len(result.replications)
    rows = []
    for metrics in result.replications.to_dict("records"):
        r = int(metrics.pop("replication"))
        if task.keep is not None:
            metrics = {k: v for k, v in metrics.items() if k in task.keep or k == "offered_load_rps"}
        rows.append({**_row(task.point, seed, r, "ok", "", elapsed), **metrics})
    return rows


def _row(point: Point, seed: int, replication: int, status: str, error: str, runtime: float) -> dict[str, Any]:
    return {"point": point.index, "point_key": point.key, "variant": point.variant, **point.values,
            "replication": replication, "seed": seed, "status": status, "error": error, "runtime_s": runtime}


def _crashed_point(task: PointTask, error: BaseException) -> list[dict[str, Any]]:
    seed = task.workload.simulation.seed
    return [_row(task.point, seed, -1, "failed", f"worker crashed: {type(error).__name__}: {error}", 0.0)]


def sweep(experiment: Union[str, Path], *, out: Optional[Path] = None, workers: Optional[int] = None,
          executor: str = "local", scheduler: Optional[str] = None, resume: bool = False,
          progress: bool = True, force: bool = False) -> SweepResult:
    """Run an experiment file's sweep (and capacity search); results are saved as each point finishes.

    Bad input (the file, any point's values, a folder another sweep holds, --resume of another
    experiment's results) raises ConfigError before anything runs, and so does work estimated over the
    limits unless `force`. SIGTERM stops the sweep as Ctrl-C does (KeyboardInterrupt), with every
    finished point saved.
    """
    exp = load_experiment(experiment)
    out = Path(out) if out is not None else Path("reports") / exp.name
    base = exp.workload()
    check_metric_names(exp, base)
    check_points(exp, progress, force)
    with stop_on_sigterm(), FolderLock(out) as lock:
        if lock.note:
            _note(lock.note)
        return _sweep_in(exp, base, out, workers, executor, scheduler, resume, progress)


def dry_run(experiment: Union[str, Path], force: bool = False) -> str:
    """What a sweep of `experiment` would run, checked as `sweep` checks it, without running anything."""
    exp = load_experiment(experiment)
    check_metric_names(exp, exp.workload())
    work = check_points(exp, progress=False, force=force)
    searches = f", and a capacity search of {len(capacity_tasks(exp))} config(s)" if exp.spec.capacity else ""
    return (f"{exp.path}: {exp.count_points():,} points of {exp.replications} replication(s){searches}: "
            f"{work.describe()}; every value checked, nothing run")


def _sweep_in(exp: LoadedExperiment, base, out: Path, workers: Optional[int], executor: str,
              scheduler: Optional[str], resume: bool, progress: bool) -> SweepResult:
    """The sweep proper, in a folder this process holds the lock of."""
    store = ResultStore(out, list(exp.spec.axes))
    description = {**_describe(exp, base), "fingerprint": exp.fingerprint(base)}
    done = _resumed(store, description["fingerprint"], resume)
    write_json(out / "experiment.json", description)

    keep = tuple(exp.spec.metrics) if exp.spec.metrics else None
    total = sum(point.key not in done for point in exp.iter_points())
    failed = 0
    bar = Progress(total, "points", enabled=progress)
    try:
        results = run_tasks(run_point, _point_tasks(exp, done, keep), total=total, executor=executor,
                            workers=workers, scheduler=scheduler, on_crash=_crashed_point)
        with closing(results):  # stops the workers at once if this loop is left early (Ctrl-C, SIGTERM)
            for task, rows in results:
                store.add(rows)
                ok = rows[0]["status"] == "ok"
                failed += not ok
                label = _label(task.point.variant, task.point.values)
                bar.update(label if ok else f"{label}: {rows[0]['error']}", ok)
    finally:
        bar.close()

    capacity = None
    if exp.spec.capacity is not None:
        capacity = _capacity(exp, out, executor, workers, scheduler, progress)
        failed += sum("error" in c for c in capacity["configs"])
    write_json(out / "experiment.json", {**description, "finished": _now()})
    return SweepResult(out, store.frame, capacity, failed)


def _point_tasks(exp: LoadedExperiment, done: set[str], keep: Optional[tuple[str, ...]]) -> Iterator[PointTask]:
    """The points still to run, each made as a worker is ready for it (a sweep never holds them all)."""
    for point in exp.iter_points():
        if point.key not in done:
            yield PointTask(point, exp.workload(point.overrides), keep)


SAY_CHECKING_ABOVE = 10_000  # points: checking more takes seconds, so say what is going on


def check_points(exp: LoadedExperiment, progress: bool = False, force: bool = False) -> WorkEstimate:
    """Validate every point's workload (and each capacity config's) before the first point runs, and
    estimate the sweep's work: a bad axis value or variant is a ConfigError (exit 2) naming it, where it
    would otherwise fail only when its point ran; so is work over the limits (unless `force`).

    Half a millisecond a point (pydantic on the overridden workload): a few milliseconds for the
    shipped experiments. Points are made one at a time, so even a huge sweep needs no memory here.
    """
    count = exp.count_points()
    if progress and count > SAY_CHECKING_ABOVE:
        print(f"llmsim sweep: checking the values of {count:,} points before the first runs", file=sys.stderr,
              flush=True)
    problems = Problems(exp.path)
    checked, work, limit = 0, WorkEstimate(0, 0, 0, 0), None
    for point in exp.iter_points():
        checked += 1
        try:
            workload = exp.point_workload(point)
        except ConfigError as err:
            problems.add(err.lines)
            continue
        work = work + estimate_run(workload, keep_requests=False)
        limit = workload.simulation.max_requests if limit is None else limit
    problems.raise_if_any(checked)
    if exp.spec.capacity is not None:
        work = work + _check_capacity(exp)
    for line in check_work(work, force, "this sweep", limit):
        if progress:
            print(f"llmsim sweep: {line}", file=sys.stderr, flush=True)
    return work


def _check_capacity(exp: LoadedExperiment) -> WorkEstimate:
    """Validate each capacity config at the loads its search is sure to probe (low, high and target);
    its work, counting each search's probes (a bisection to the tolerance) at the high load."""
    spec, problems, checked, work = exp.spec.capacity, Problems(exp.path), 0, WorkEstimate(0, 0, 0, 0)
    probes = 2 + math.ceil(math.log2(max(math.log(spec.high / spec.low) / math.log1p(spec.tolerance), 2)))
    for task in capacity_tasks(exp):
        for which in ("low", "high", "target"):
            load = getattr(spec, which)
            sources = exp.sources(task.variant, task.values)
            sources.append(Source(override(exp.spec.load_axis, load), ("capacity", which),
                                  f"capacity.{which}: value {load} of {exp.spec.load_axis}"))
            checked += 1
            try:
                workload = exp.checked_workload(
                    sources, f"capacity config (variant {task.variant}, {which} load {load})")
            except ConfigError as err:
                problems.add(err.lines)
                continue
            if which == "high":
                one = estimate_run(workload, keep_requests=False)
                work = work + WorkEstimate(one.requests * probes, one.peak_requests, one.memory_bytes,
                                           one.seconds * probes)
    problems.raise_if_any(checked, "capacity probes")
    return work


def _resumed(store: ResultStore, fingerprint: dict[str, Any], resume: bool) -> set[str]:
    """The keys of the points already done; only with --resume, and only for the experiment that did them."""
    if store.exists() and not resume:
        raise ConfigError([f"{store.path}: results of an earlier sweep are here; "
                           "add --resume to finish them, or choose another --out"])
    if not resume or not store.exists():
        return set()
    note = check_fingerprint(store.folder, fingerprint)
    if note:
        _note(note)
    return store.resume()


def _note(text: str) -> None:
    """Something the user should know that is not an error (a lock taken over, an unchecked resume)."""
    print(f"llmsim sweep: note: {text}", file=sys.stderr, flush=True)


def _capacity(exp: LoadedExperiment, out: Path, executor: str, workers: Optional[int],
              scheduler: Optional[str], progress: bool) -> dict:
    """Search each config's capacity; configs already in capacity.json are kept (resume)."""
    path = out / "capacity.json"
    saved = read_json(path) or {}
    configs = [c for c in saved.get("configs", []) if "error" not in c]
    known = {c["key"] for c in configs}
    all_tasks = capacity_tasks(exp)
    order = {t.key: k for k, t in enumerate(all_tasks)}  # configs listed in experiment order
    tasks = [t for t in all_tasks if t.key not in known]
    target = exp.spec.capacity.target
    doc = {"target": target, "load_axis": exp.spec.load_axis, "configs": configs, "cheapest_at_target": None}
    bar = Progress(len(tasks), "capacity", enabled=progress)
    try:
        results = run_tasks(search_capacity, tasks, executor=executor, workers=workers, scheduler=scheduler,
                            on_crash=_crashed_search)
        with closing(results):
            for task, record in results:
                doc["configs"].append(record)
                doc["configs"].sort(key=lambda c: order.get(c["key"], len(order)))
                doc["cheapest_at_target"] = cheapest(doc["configs"])
                write_json(path, doc)
                bar.update(_label(task.variant, task.values), "error" not in record)
    finally:
        bar.close()
    doc["cheapest_at_target"] = cheapest(doc["configs"])
    write_json(path, doc)
    return doc


def capacity_tasks(exp: LoadedExperiment) -> list[CapacityTask]:
    """One task per config: a variant and a combination of the axes other than the load axis."""
    tasks, seen = [], set()
    load_axis = exp.spec.load_axis
    for point in exp.iter_points():
        values = {p: v for p, v in point.values.items() if p != load_axis}
        variant_overrides = exp.variant_overrides().get(point.variant, [])
        overrides = tuple(variant_overrides) + tuple(override(p, v) for p, v in values.items())
        key = point_key(point.variant, overrides, exp.seed, exp.replications)
        if key not in seen:
            seen.add(key)
            tasks.append(CapacityTask(exp, key, point.variant, values, overrides))
    return tasks


def _crashed_search(task: CapacityTask, error: BaseException) -> dict[str, Any]:
    return {"key": task.key, "variant": task.variant, "values": task.values,
            "error": f"worker crashed: {type(error).__name__}: {error}"}


def check_metric_names(exp: LoadedExperiment, base) -> None:
    """SLO and kept metrics must be names a run reports: a typo would otherwise pass silently."""
    known = set(metric_names(base))
    wanted = [("slo", m) for m in exp.spec.slo] + [("metrics", m) for m in exp.spec.metrics or []]
    bad = [f"{exp.path}: {where}.{m}: unknown metric (known: {', '.join(sorted(known))})"
           for where, m in wanted if m not in known]
    if bad:
        raise ConfigError(bad)


def _describe(exp: LoadedExperiment, base) -> dict[str, Any]:
    """experiment.json: everything a report needs to say what was simulated."""
    spec = exp.spec
    return {
        "name": exp.name,
        "description": spec.description,
        "experiment_file": str(exp.path),
        "workload_file": str(exp.base_path),
        "workload_name": base.name or exp.base_path.stem,
        "seed": exp.seed,
        "replications": exp.replications,
        "combine": spec.combine,
        "axes": {p: axis_values(a) for p, a in spec.axes.items()},
        "variants": exp.variant_overrides(),
        "load_axis": spec.load_axis,
        "base_load_rps": offered_load_rps(base),
        "slo": {m: b.model_dump() for m, b in spec.slo.items()},
        "capacity": spec.capacity.model_dump() if spec.capacity else None,
        "workload": base.model_dump(mode="json", by_alias=True),
        "step_times": step_time_sources(base),
        "warmup_s": base.simulation.warmup_s,
        "duration_s": base.simulation.duration_s,
        "started": _now(),
        "finished": None,
    }


def _label(variant: str, values: dict[str, Any]) -> str:
    """'base: rate_scale=1.5, replicas=2' for progress lines."""
    shown = ", ".join(f"{p.rsplit('.', 1)[-1]}={v}" for p, v in values.items())
    return f"{variant}: {shown}" if shown else variant


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
