"""`llmsim sweep`: run every point of an experiment, save each as it finishes, then the capacity search.

Output folder (default reports/<experiment name>/):
  experiment.json   what was run (the resolved experiment and base workload)
  results.parquet   one row per point and replication: axis values, seed, status, error, every metric
  capacity.json     with a `capacity:` block: each config's highest load meeting the SLO
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from sim.config.loader import ConfigError
from sim.model.offered import offered_load_rps
from sim.metrics.summary import metric_names

from .capacity import CapacityTask, cheapest, search_capacity
from .executors import run_tasks
from .progress import Progress
from .run import run, step_time_sources
from .spec import LoadedExperiment, Point, axis_values, load_experiment, override, point_key
from .store import ResultStore, read_json, write_json


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
        result = run(task.workload, keep_requests=False)
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
          progress: bool = True) -> SweepResult:
    """Run an experiment file's sweep (and capacity search); results are saved as each point finishes."""
    exp = load_experiment(experiment)
    out = Path(out) if out is not None else Path("reports") / exp.name
    base = exp.workload()
    _check_metric_names(exp, base)
    store = ResultStore(out, list(exp.spec.axes))
    if store.exists() and not resume:
        raise ConfigError([f"{store.path}: results of an earlier sweep are here; "
                           "add --resume to finish them, or choose another --out"])
    done = store.resume() if resume else set()
    description = _describe(exp, base)
    write_json(out / "experiment.json", description)

    tasks, failed = [], 0
    for point in exp.points():
        if point.key in done:
            continue
        try:
            workload = exp.workload(point.overrides)
        except ConfigError as err:  # an axis value the schema refuses: this point fails, the rest run
            store.add([_row(point, exp.seed, -1, "failed", "; ".join(err.lines), 0.0)])
            failed += 1
            continue
        keep = tuple(exp.spec.metrics) if exp.spec.metrics else None
        tasks.append(PointTask(point, workload, keep))

    bar = Progress(len(tasks), "points", enabled=progress)
    try:
        for task, rows in run_tasks(run_point, tasks, executor=executor, workers=workers, scheduler=scheduler,
                                    on_crash=_crashed_point):
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
        for task, record in run_tasks(search_capacity, tasks, executor=executor, workers=workers,
                                      scheduler=scheduler, on_crash=_crashed_search):
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
    for point in exp.points():
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


def _check_metric_names(exp: LoadedExperiment, base) -> None:
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
