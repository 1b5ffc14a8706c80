"""Capacity answers: each config's highest load at which the SLO holds, found by bisection.

The SLO is judged on the pessimistic end of each metric's 95% interval (the
upper bound of a latency, the lower bound of a throughput), so "holds" means
"holds with confidence". Every probe uses the same seeds (common random
numbers), which keeps the verdict close to monotone in the load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from sim.experiments.run import run
from sim.experiments.spec import LoadedExperiment, override, slo_verdict


@dataclass(frozen=True)
class CapacityTask:
    """One config (a variant and values of the non-load axes) to search."""

    experiment: LoadedExperiment
    key: str
    variant: str
    values: dict[str, Any]
    overrides: tuple[str, ...] = field(default=())


class _Prober:
    """Runs the config at a given load, remembering every probe."""

    def __init__(self, task: CapacityTask) -> None:
        self.task = task
        self.exp = task.experiment
        self.probes: list[dict[str, Any]] = []
        self.summaries: dict[float, dict[str, Any]] = {}

    def __call__(self, load: float) -> tuple[bool, Optional[str]]:
        if load not in self.summaries:
            overrides = self.task.overrides + (override(self.exp.spec.load_axis, load),)
            workload = self.exp.workload(overrides)
            result = run(workload, keep_requests=False, force=True)  # the sweep's estimate was checked
            self.summaries[load] = result.summary
        met, limit = slo_verdict(self.summaries[load], self.exp.spec.slo)
        self.probes.append({"load": load, "met": met})
        return met, limit


def search_capacity(task: CapacityTask) -> dict[str, Any]:
    """The capacity record of one config (see docs/guides/sweeps.md, "capacity.json"); errors are returned as data."""
    record: dict[str, Any] = {"key": task.key, "variant": task.variant, "values": task.values}
    try:
        record.update(_search(task))
    except Exception as exc:  # a failed search is recorded and the sweep goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def _search(task: CapacityTask) -> dict[str, Any]:
    spec = task.experiment.spec.capacity
    probe = _Prober(task)
    low, high = spec.low, spec.high
    ok_low, limit = probe(low)
    best: Optional[float] = None
    if ok_low:
        ok_high, high_limit = probe(high)
        if ok_high:
            best = high
        else:
            limit = high_limit
            best = low
            # Bisect in log space: the bracket can span two orders of magnitude.
            while (high - low) / high > spec.tolerance:
                mid = math.sqrt(low * high)
                ok, mid_limit = probe(mid)
                if ok:
                    low = best = mid
                else:
                    high, limit = mid, mid_limit
    at_best = probe.summaries[best] if best is not None else {}
    target_met, _ = probe(spec.target)
    at_target = probe.summaries[spec.target]
    endpoints = [k.removeprefix("utilisation_") for k in at_target
                 if k.startswith("utilisation_") and not k.endswith(("_low", "_high"))]
    return {
        "max_load": best,
        "max_load_rps": at_best.get("offered_load_rps"),
        "at_least": best is not None and best == spec.high,
        "bracket": [low, high],
        "limited_by": None if best == spec.high else limit,
        "utilisation": {e: at_best.get(f"utilisation_{e}") for e in endpoints},
        "cost_per_1k_usd": at_best.get("cost_per_1k_usd"),
        "cost_per_hour_usd": at_best.get("cost_per_hour_usd"),
        "at_target": {"slo_met": target_met, **{k: at_target.get(k) for k in _TARGET_KEYS + list(task.experiment.spec.slo)}},
        "probes": probe.probes,
    }


_TARGET_KEYS = ["offered_load_rps", "throughput_rps", "cost_per_hour_usd", "cost_per_1k_usd", "ttft_p95_s", "e2e_p95_s"]


def cheapest(configs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The config with the lowest cost per hour among those that meet the SLO at the target load."""
    meeting = [c for c in configs if c.get("at_target", {}).get("slo_met")]
    if not meeting:
        return None
    best = min(meeting, key=lambda c: (c["at_target"]["cost_per_hour_usd"], c["at_target"]["cost_per_1k_usd"]))
    return {"variant": best["variant"], "values": best["values"],
            "cost_per_hour_usd": best["at_target"]["cost_per_hour_usd"],
            "cost_per_1k_usd": best["at_target"]["cost_per_1k_usd"]}
