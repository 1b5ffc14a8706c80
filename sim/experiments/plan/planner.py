"""`llmsim plan`: prune, search the survivors in waves (each candidate a task), save each as it finishes.

Output folder (default reports/<plan name>/):
  plan.json       the plan, its fingerprint, every candidate's record (pruned, stopped, failed or sized, with its
                  probes) and, when done, the ranking and the answer; written after every candidate (resume)
  plan.parquet    the ranking: one row per candidate, cheapest first
  probes.parquet  every simulated probe: candidate, replicas, load, SLO verdict, metrics with intervals
  .llmsim.lock    while a plan writes there

Candidates are searched cheapest-possible first, `--workers` at a time: each wave starts with the bar the
waves before it set, so the answer and the ranked candidates do not depend on the number of workers, and
only which candidates were stopped early does.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from sim.config.loader import ConfigError
from sim.metrics.stats import pareto_frontier
from sim.metrics.summary import HOURS_PER_MONTH
from sim.model.offered import offered_load_rps

from ..estimate import WorkEstimate, check_work, estimate_run
from ..executors import default_workers, run_tasks, stop_on_sigterm
from ..progress import Progress
from ..run import step_time_sources
from ..spec import fingerprint_of, pessimistic
from ..store import FolderLock, check_fingerprint, read_json, write_json, write_parquet
from ..sweep import check_metric_names
from .search import Bounds, SearchTask, bar, bounds, order, rank_key, search, space_points
from .spec import LoadedPlan, load_plan


@dataclass
class PlanResult:
    """What a plan produced: its folder and plan.json's content."""

    out: Path
    document: dict[str, Any]

    @property
    def answer(self) -> str:
        return self.document["answer"]


def make_plan(path: Union[str, Path], *, out: Optional[Path] = None, workers: Optional[int] = None,
              executor: str = "local", scheduler: Optional[str] = None, resume: bool = False,
              progress: bool = True, force: bool = False) -> PlanResult:
    """Run a plan file: the cheapest deployment meeting its SLO. Bad input raises ConfigError before anything
    runs (so does work over the limits unless `force`); SIGTERM stops it as Ctrl-C does, finished candidates
    saved."""
    plan = load_plan(path)
    out = Path(out) if out is not None else Path("reports") / plan.name
    base = plan.experiment.workload()
    check_metric_names(plan.experiment, base)
    all_bounds = {c.index: bounds(plan, c) for c in plan.candidates}
    for line in check_work(_work(plan, all_bounds), force, "this plan", base.simulation.max_requests):
        if progress:
            print(f"llmsim plan: {line}", file=sys.stderr, flush=True)
    with stop_on_sigterm(), FolderLock(out) as lock:
        if lock.note:
            print(f"llmsim plan: note: {lock.note}", file=sys.stderr, flush=True)
        return _plan_in(plan, base, all_bounds, out, workers, executor, scheduler, resume, progress)


def dry_run(path: Union[str, Path], force: bool = False) -> str:
    """What `make_plan` would search, checked and pruned as it would be, without running anything."""
    plan = load_plan(path)
    check_metric_names(plan.experiment, plan.experiment.workload())
    all_bounds = {c.index: bounds(plan, c) for c in plan.candidates}
    work = _work(plan, all_bounds)
    check_work(work, force, "this plan", plan.experiment.workload().simulation.max_requests)
    pruned = [f"{plan.candidates[i].name}: {b.pruned}" for i, b in all_bounds.items() if b.pruned is not None]
    lines = [f"{plan.path}: {len(plan.candidates)} candidates, {space_points(plan):,} points for a brute-force "
             f"search; {len(pruned)} pruned from the config alone; to search: {work.describe()} at most; nothing run"]
    return "\n".join(lines + [f"  pruned: {line}" for line in pruned])


def _work(plan: LoadedPlan, all_bounds: dict[int, Bounds]) -> WorkEstimate:
    """A plan's work, roughly: each surviving candidate's probes at every load (a gallop and a bisection)."""
    work = WorkEstimate(0, 0, 0, 0)
    for c in plan.candidates:
        b = all_bounds[c.index]
        if b.pruned is not None:
            continue
        probes = 1 + (math.ceil(math.log2(c.replicas[1] - c.replicas[0] + 1)) if c.replicas_path else 0)
        for period in plan.spec.periods():
            one = estimate_run(plan.workload(c, b.fewest.get(period.load), period.load), keep_requests=False)
            work = work + WorkEstimate(one.requests * probes, one.peak_requests, one.memory_bytes,
                                       one.seconds * probes)
    return work


def fingerprint(plan: LoadedPlan, base) -> dict[str, Any]:
    """What identifies a plan's results (its name, description and the files' places left out)."""
    spec = plan.spec.model_dump(mode="json", exclude={"name", "description", "workload"})
    parts = {f"plan.{k}": v for k, v in spec.items()}
    parts.update(seed=plan.seed, replications=plan.replications)
    parts.update({f"workload.{k}": v for k, v in base.model_dump(mode="json", by_alias=True).items()})
    return fingerprint_of(parts)


def _plan_in(plan: LoadedPlan, base, all_bounds: dict[int, Bounds], out: Path, workers: Optional[int],
             executor: str, scheduler: Optional[str], resume: bool, progress: bool) -> PlanResult:
    path = out / "plan.json"
    doc = {**describe(plan, base), "fingerprint": fingerprint(plan, base)}
    records = _resumed(out, doc["fingerprint"], resume)
    kept = {r["index"] for r in records}
    doc["candidates"] = records + [_pruned(plan, i, b) for i, b in all_bounds.items()
                                   if b.pruned is not None and i not in kept]
    write_json(path, doc)
    done = {r["index"] for r in doc["candidates"]}
    todo = [c for c in order(plan, all_bounds) if c.index not in done]
    size = workers or (default_workers() if executor == "local" else 4)
    shown = Progress(len(todo), "candidates", enabled=progress)
    try:
        for start in range(0, len(todo), size):  # a wave: every task starts with the bar the waves before set
            the_bar = bar(doc["candidates"], plan.spec.keep)
            tasks = [SearchTask(plan, c, all_bounds[c.index], the_bar) for c in todo[start:start + size]]
            results = run_tasks(search, tasks, executor=executor, workers=size, scheduler=scheduler,
                                on_crash=_crashed)
            with closing(results):  # stops the workers at once if this loop is left early (Ctrl-C, SIGTERM)
                for _, record in results:
                    doc["candidates"].append(record)
                    write_json(path, doc)
                    shown.update(f"{record['name']}: {record['status']}", record["status"] != "error")
    finally:
        shown.close()
    doc["candidates"].sort(key=lambda r: r["index"])  # in the plan's order, not the order the workers finished in
    doc.update(finish(plan, doc["candidates"]), finished=_now())
    write_json(path, doc)
    _write_tables(out, doc)
    return PlanResult(out, doc)


def _resumed(out: Path, print_: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The records of an earlier run of this plan in `out` (only with --resume; failed ones run again)."""
    path = out / "plan.json"
    if path.exists() and not resume:
        raise ConfigError([f"{path}: results of an earlier plan are here; add --resume to finish them, "
                           "or choose another --out"])
    if not resume or not path.exists():
        return []
    check_fingerprint(out, print_, "plan.json")
    saved = read_json(path) or {}
    return [r for r in saved.get("candidates", []) if r.get("status") not in ("error", "pruned")]


def _pruned(plan: LoadedPlan, index: int, b: Bounds) -> dict[str, Any]:
    c = plan.candidates[index]
    return {"index": index, "name": c.name, "kind": c.kind, "gpu": c.gpu, "tensor_parallel": c.tensor_parallel or None,
            "scaling": c.scaling, "status": "pruned", "reason": b.pruned, "probes": []}


def _crashed(task: SearchTask, error: BaseException) -> dict[str, Any]:
    c = task.candidate
    return {"index": c.index, "name": c.name, "kind": c.kind, "status": "error", "probes": [],
            "reason": f"worker crashed: {type(error).__name__}: {error}"}


def finish(plan: LoadedPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranking (sized candidates cheapest first, then the rest in the plan's order), counts, the frontier and
    the answer."""
    ranked = sorted(records, key=lambda r: (rank_key(r), r["index"]))
    ok = [r for r in ranked if r["status"] == "ok"]
    metric = frontier_metric(plan, ok[0] if ok else None)
    return {"ranking": [r["index"] for r in ranked], "best": ok[0]["index"] if ok else None,
            "simulated_points": sum(len(r["probes"]) for r in records), "space_points": space_points(plan),
            "frontier_metric": metric, "frontier": frontier(plan, records, metric), "answer": answer(plan, ok)}


def frontier_metric(plan: LoadedPlan, best: Optional[dict[str, Any]]) -> str:
    """The latency the cost-latency frontier is drawn on: the answer's binding one, else the SLO's first latency."""
    if best is not None and best["headroom_metric"].endswith("_s"):
        return best["headroom_metric"]
    return next((m for m in plan.spec.slo if m.endswith("_s")), "ttft_p95_s")


def frontier(plan: LoadedPlan, records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The probes at the busiest load that no other beats on both cost per hour and `metric` (its pessimistic
    end), fastest first: the cost-latency Pareto frontier at the target."""
    peak = plan.spec.periods()[0].load
    points = [(r, p) for r in records for p in r["probes"] if p["load"] == peak]
    latency = [pessimistic(p, metric, "max") for _, p in points]
    cost = [p.get("cost_per_hour_usd", math.nan) for _, p in points]
    return [{"index": points[k][0]["index"], "candidate": points[k][0]["name"], "replicas": points[k][1]["replicas"],
             "cost_per_hour_usd": cost[k], metric: latency[k], "met": points[k][1]["met"]}
            for k in pareto_frontier([math.nan if c is None else c for c in cost],
                                     [math.nan if v is None else v for v in latency])]


def answer(plan: LoadedPlan, ok: list[dict[str, Any]]) -> str:
    """The plan's answer in one sentence (and the runner-up's margin in a second)."""
    where = _where_text(plan)
    if not ok:
        return f"No candidate meets the SLO {where}: widen the replica range, add GPU types or APIs, or relax the SLO."
    best = ok[0]
    hourly = best["cost_per_hour_usd"]
    text = (f"The cheapest deployment meeting the SLO {where} is {deployment(best)}: ${hourly:,.2f} an hour "
            f"(${hourly * HOURS_PER_MONTH:,.0f} a month, ${best['at_peak'].get('cost_per_1k_usd', math.nan):,.3f} per "
            f"1k requests), with {best['headroom']:.0%} headroom to the SLO ({best['headroom_metric']}).")
    if len(ok) > 1:
        second = ok[1]
        extra = second["cost_per_day_usd"] / best["cost_per_day_usd"] - 1 if best["cost_per_day_usd"] else math.inf
        costs = "costs the same" if abs(extra) < 0.005 else f"costs {extra:+.0%}"
        text += (f" The runner-up, {deployment(second)}, {costs} and has {second['headroom']:.0%} headroom "
                 f"({second['headroom_metric']}).")
    return text


def _where_text(plan: LoadedPlan) -> str:
    """'at 3x the workload's traffic (16.5 req/s)', or the forecast's periods."""
    base = offered_load_rps(plan.experiment.workload())

    def load_text(load: float) -> str:
        if plan.spec.load_axis == "traffic.rate_scale":
            return f"{load:g}x the workload's traffic ({load * base:.3g} req/s)"
        if plan.spec.load_axis == "traffic.rate_rps":
            return f"{load:g} req/s"
        return f"{plan.spec.load_axis} = {load:g}"

    periods = plan.spec.periods()
    if plan.spec.forecast is None:
        return f"at {load_text(periods[0].load)}"
    return "over the forecast day (" + ", ".join(f"{p.hours:g} h at {load_text(p.load)}" for p in periods) + ")"


def deployment(record: dict[str, Any]) -> str:
    """'2 x h100-sxm (TP 1)', 'h200 (TP 1, scheduled) with 1-3 replicas' or the candidate's name."""
    if record.get("kind") not in ("self_hosted", "mix") or record.get("status") != "ok":
        return record["name"]
    counts = list(record["replicas"].values())
    if None in counts:  # the autoscaler sized it
        return record["name"]
    if min(counts) != max(counts):
        return f"{record['name']} with {min(counts)}-{max(counts)} replicas"
    if record["kind"] == "mix":  # 'half: 2 x h100-sxm (TP 1) + API gpt-4o-mini'
        return record["name"].replace(": ", f": {counts[0]} x ", 1)
    return f"{counts[0]} x {record['name']}"


def gpus(record: dict[str, Any]) -> Optional[int]:
    """GPUs of a sized self-hosted candidate at its busiest period."""
    if record.get("kind") not in ("self_hosted", "mix") or record.get("peak_replicas") is None:
        return None  # not sized, or sized by the autoscaler as it went
    return record["peak_replicas"] * (record.get("tensor_parallel") or 1)


def describe(plan: LoadedPlan, base) -> dict[str, Any]:
    """What a report needs to say what was planned."""
    spec = plan.spec
    return {
        "name": plan.name, "description": spec.description, "plan_file": str(plan.path),
        "workload_file": os.path.normpath(plan.experiment.base_path),
        "workload_name": base.name or plan.experiment.base_path.stem,
        "endpoint": plan.endpoint, "seed": plan.seed, "replications": plan.replications, "keep": spec.keep,
        "load_axis": spec.load_axis, "base_load_rps": offered_load_rps(base),
        "periods": [p.model_dump() for p in spec.periods()], "forecast": spec.forecast is not None,
        "slo": {m: b.model_dump() for m, b in spec.slo.items()},
        "candidate_list": [{"index": c.index, "name": c.name, "kind": c.kind, "overrides": list(c.overrides),
                            "replicas": list(c.replicas) if c.replicas_path else None} for c in plan.candidates],
        "step_times": step_time_sources(base), "warmup_s": base.simulation.warmup_s,
        "duration_s": base.simulation.duration_s, "started": _now(), "finished": None,
    }


def _write_tables(out: Path, doc: dict[str, Any]) -> None:
    """plan.parquet (the ranking) and probes.parquet (every simulated probe)."""
    import pandas as pd

    by_index = {r["index"]: r for r in doc["candidates"]}
    rows = []
    for rank, index in enumerate(doc["ranking"], 1):
        r = by_index[index]
        ok = r["status"] == "ok"
        peak = {f"peak_{k}": v for k, v in (r.get("at_peak") or {}).items()}
        rows.append({"rank": rank if ok else None, "candidate": r["name"], "kind": r["kind"], "status": r["status"],
                     "reason": r.get("reason", ""), "deployment": deployment(r) if ok else "",
                     "peak_replicas": r.get("peak_replicas"), "gpus": gpus(r),
                     "cost_per_hour_usd": r.get("cost_per_hour_usd"), "cost_per_day_usd": r.get("cost_per_day_usd"),
                     **peak})
    probes = [{"candidate": r["name"], "index": r["index"], **p} for r in doc["candidates"] for p in r["probes"]]
    write_parquet(out / "plan.parquet", pd.DataFrame(rows))
    write_parquet(out / "probes.parquet", pd.DataFrame(probes))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

