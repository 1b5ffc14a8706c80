"""The plan's search: prune from the config alone, then size each surviving candidate with as few runs as it can.

Pruning (no simulation): a GPU the model does not fit; an endpoint whose offered
utilisation (its work at the full batch over its capacity) is 1 or more, which an
open system cannot sustain however long it runs; a hosted API whose provider
rpm or tpm the offered traffic exceeds; a GPU group on which a request served
alone already misses a latency bound (see `latency_floor`). What remains is searched:

- the SLO holds at a replica count when every bound holds on the pessimistic end
  of its 95% interval at every period's load (`slo_verdict`, as the capacity search)
  and the deployment completes `min_served_share` of the requests (a deployment that
  drops requests would otherwise look fast and cheap);
- the fewest replicas that meet it are found by galloping up from the fewest that
  pass the utilisation test (1, 2, 4, ... above it) and bisecting the last gap,
  which relies on the SLO verdict being monotone in the replicas, as it is on
  common random numbers;
- a candidate's GPUs cost the same whatever the traffic, so the cheapest day it
  could reach is known before it runs; a candidate that cannot beat the `keep`-th
  cheapest found so far is stopped, and a search never tries replica counts that
  would cost more than that.

Candidates are ranked by cost per day; at equal cost the one with more headroom to
the SLO ranks first (then the one listed first), so a candidate is stopped only when
its GPUs alone cost more than the bar, never when they cost the same.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from sim.config.loader import ConfigError
from sim.config.schema import Workload
from sim.model.offered import offered_utilisation, provider_limit_shares

from ..run import run
from ..spec import pessimistic, slo_verdict
from .spec import Candidate, LoadedPlan

Key = tuple[float, float, int]  # (cost per day, -headroom, candidate index): the order of the ranking
NO_KEY: Key = (math.inf, math.inf, 1 << 62)
_UNFIT = ("does not fit", "does not divide")  # the catalog's words for a model a GPU group cannot hold

KEPT = ("offered_load_rps", "throughput_rps", "requests_arrived", "requests_completed", "requests_cancelled",
        "cost_per_hour_usd",
        "cost_per_1k_usd", "ttft_p95_s", "ttft_p99_s", "tpot_p95_s", "tpot_p99_s", "e2e_p95_s", "e2e_p99_s",
        "queue_wait_p95_s")
"""Summary metrics each probe keeps (with their intervals), besides the SLO's and the endpoint's utilisation."""


@dataclass(frozen=True)
class Bounds:
    """What the config alone says of a candidate: why it is pruned, or its fewest replicas and GPU bill."""

    pruned: Optional[str] = None
    fewest: dict[float, int] = field(default_factory=dict)  # per load: fewest replicas below utilisation 1
    gpu_fixed_usd_h: float = 0.0      # GPUs of other endpoints, per hour
    gpu_replica_usd_h: float = 0.0    # one replica of the searched endpoint, per hour

    def gpu_usd_h(self, replicas: Optional[int]) -> float:
        return self.gpu_fixed_usd_h + (replicas or 0) * self.gpu_replica_usd_h


def gpu_usd_h(workload: Workload) -> float:
    """The workload's GPU bill per hour: its self-hosted replicas at their GPUs' price (the cost floor)."""
    return sum(m.replicas * m.replica_hourly_usd for m in workload.models.values() if hasattr(m, "replica_hourly_usd"))


def bounds(plan: LoadedPlan, candidate: Candidate) -> Bounds:
    """Prune `candidate` from its config, or say the fewest replicas each load needs and what its GPUs cost."""
    base_r = candidate.replicas[0] if candidate.replicas_path else None
    fewest: dict[float, int] = {}
    bill: tuple[float, float] = (0.0, 0.0)
    for period in plan.spec.periods():
        try:
            workload = plan.workload(candidate, base_r, period.load)
        except ConfigError as err:
            unfit = [line for line in err.lines if any(word in line for word in _UNFIT)]
            if unfit:
                return Bounds(pruned=_from_catalog(unfit[0]))
            raise
        utilisation = offered_utilisation(workload)
        overflow = workload.models[plan.endpoint].queue.overflow
        # The searched endpoint's load falls with its replicas; an overflow moves load between it and its target
        # in a way the config alone does not tell: none of these can be judged here.
        unknown = {plan.endpoint if base_r else None} | ({plan.endpoint, overflow.to} if overflow else set())
        busy = {name: u for name, u in utilisation.items() if u >= 1 and name not in unknown}
        if busy:
            name, u = max(busy.items(), key=lambda item: item[1])
            return Bounds(pruned=f"models.{name}: offered utilisation {u:.2f} at load {period.load:g} (1 or more: "
                          "its queue grows for as long as it runs)")
        over = {name: s for name, s in provider_limit_shares(workload).items() if s[1] > 1}
        if over:
            name, (limit, share, _, _) = next(iter(over.items()))
            return Bounds(pruned=f"models.{name}: the offered traffic is {share:.0%} of the provider's {limit} at "
                          f"load {period.load:g}")
        if base_r is not None:
            floor = latency_floor(workload, plan.endpoint, plan.spec.slo)
            if floor is not None:
                return Bounds(pruned=floor)
            one = utilisation[plan.endpoint] * base_r  # what a single replica would carry
            fewest[period.load] = candidate.replicas[0] if overflow else max(candidate.replicas[0],
                                                                             math.floor(one) + 1)
            replica = workload.models[plan.endpoint].replica_hourly_usd
            bill = (gpu_usd_h(workload) - base_r * replica, replica)
    peak = plan.spec.periods()[0].load
    if base_r is not None and fewest[peak] > candidate.replicas[1]:
        return Bounds(pruned=f"needs at least {fewest[peak]} replicas for an offered utilisation below 1 at load "
                      f"{peak:g} (the plan allows {candidate.replicas[1]})")
    return Bounds(None, fewest, *bill)


_LATENCY = re.compile(r"(ttft|tpot|e2e)_p(\d+)_s")
_FLOOR_DRAWS = 100_000


def latency_floor(workload: Workload, endpoint: str, slo: dict) -> Optional[str]:
    """Why no replica count can meet a latency bound, when a request served alone, with no queue, already misses it.

    Alone, a request's TTFT is at least its prefill (c x prompt tokens plus one step's base a) and each later
    token at least a one-sequence decode step (a + b): so every request's TTFT, TPOT and end-to-end latency are
    at least these floors, and so is each percentile. The floors' percentile (from the token distributions as
    drawn) must pass the bound by a margin covering per-step noise (4 standard deviations) and sampling (10%).
    Only where the floors hold for every request: one model, no pipeline, no prefix or prompt cache (cached
    tokens skip prefill), no deadlines (expired requests leave the percentiles) and no batch lane.
    """
    model = workload.models[endpoint]
    engine = getattr(model, "engine", None)
    classes = list(workload.traffic.classes.values())
    if (engine is None or workload.pipeline is not None or len(workload.models) != 1 or model.prompt_cache is not None
            or engine.prefix_cache is not None or any(c.deadline_s is not None or c.batch for c in classes)
            or any(c.prompt_tokens is None or c.output_tokens is None for c in classes)):
        return None
    st = engine.step_time
    margin = 0.9 * max(0.5, 1.0 - 4.0 * st.noise_cv)
    rng = np.random.default_rng(0)
    weights = np.array([c.open_loop_rate_rps() for c in classes], dtype=float)
    weights = weights if weights.sum() > 0 else np.ones(len(classes))  # closed loops only: classes alike
    counts = np.maximum(1, np.round(_FLOOR_DRAWS * weights / weights.sum())).astype(int)
    prompt = np.concatenate([np.maximum(np.rint(c.prompt_tokens.sample(rng, n)), 1) for c, n in zip(classes, counts)])
    output = np.concatenate([np.clip(np.rint(c.output_tokens.sample(rng, n)), 1, c.max_output_tokens or np.inf)
                             for c, n in zip(classes, counts)])
    step = st.base_s + st.per_decode_seq_s
    ttft = st.base_s + st.per_prefill_token_s * prompt
    floors = {"ttft": ttft, "tpot": np.full(1, step), "e2e": ttft + (output - 1) * step}
    for metric, bound in slo.items():
        found = _LATENCY.fullmatch(metric)
        if found is None or bound.max is None:
            continue
        floor = margin * float(np.percentile(floors[found[1]], min(float(found[2]), 99.9)))
        if floor > bound.max:
            return (f"served alone, with no queue, a request's {metric} is already about {floor / margin:.3g} s "
                    f"(prefill and one-sequence decode steps), over the SLO's {bound.max:g} s: no replica count helps")
    return None


def _from_catalog(line: str) -> str:
    """The catalog's own words from a '--set PATH: message' line."""
    return line.split(": ", 1)[1] if line.startswith("--set ") and ": " in line else line


class Prober:
    """Runs a candidate at (replicas, load), each at most once, remembering every probe in order."""

    def __init__(self, plan: LoadedPlan, candidate: Candidate) -> None:
        self.plan, self.candidate = plan, candidate
        self.probes: list[dict[str, Any]] = []
        self._seen: dict[tuple[Optional[int], float], dict[str, Any]] = {}

    def __call__(self, replicas: Optional[int], load: float) -> dict[str, Any]:
        """The probe (met, the failing metric, the kept metrics) of the candidate at `replicas` and `load`."""
        if (replicas, load) not in self._seen:
            workload = self.plan.workload(self.candidate, replicas, load)
            summary = run(workload, keep_requests=False, force=True).summary  # the plan's estimate was checked
            met, limit = plan_verdict(summary, self.plan.spec)
            probe = {"replicas": replicas, "load": load, "met": met, "limited_by": limit,
                     **_kept(summary, self.plan)}
            self._seen[(replicas, load)] = probe
            self.probes.append(probe)
        return self._seen[(replicas, load)]

    def meets(self, replicas: Optional[int], loads: list[float]) -> bool:
        """The SLO holds at every load (busiest first: a failure there stops the check)."""
        return all(self(replicas, load)["met"] for load in loads)


def served_share(summary: dict[str, Any]) -> float:
    """Of the requests that arrived and that their users did not cancel, the share answered in full (1 when
    there are none): rejected, rate-limited, expired, timed-out, partial, try-later and unfinished ones are not."""
    wanted = summary.get("requests_arrived", 0.0) - summary.get("requests_cancelled", 0.0)
    return summary.get("requests_completed", 0.0) / wanted if wanted > 0 else 1.0


def plan_verdict(summary: dict[str, Any], spec) -> tuple[bool, Optional[str]]:
    """The SLO on its pessimistic ends (`slo_verdict`), and the deployment completes `min_served_share` of the
    requests: else the first thing that fails ('served_share' for the latter)."""
    met, limit = slo_verdict(summary, spec.slo)
    if met and served_share(summary) < spec.min_served_share:
        return False, "served_share"
    return met, limit


def _kept(summary: dict[str, Any], plan: LoadedPlan) -> dict[str, Any]:
    names = list(KEPT) + [m for m in plan.spec.slo if m not in KEPT] + [f"utilisation_{plan.endpoint}"]
    out = {}
    for name in names:
        for key in (name, f"{name}_ci95_low", f"{name}_ci95_high"):
            if key in summary:
                out[key] = summary[key]
    return out


def fewest_meeting(low: int, high: int, meets: Callable[[int], bool]) -> Optional[int]:
    """The fewest replicas in [low, high] that meet the SLO (None if even `high` does not), for a verdict
    monotone in the replicas: `low`, then 1, 2, 4, ... above it, then bisection of the last gap."""
    if low > high:
        return None
    if meets(low):
        return low
    failed, step = low, 1
    while True:
        r = min(low + step, high)
        if r <= failed:
            return None
        if meets(r):
            break
        failed, step = r, step * 2
    while r - failed > 1:
        mid = (failed + r) // 2
        if meets(mid):
            r = mid
        else:
            failed = mid
    return r


@dataclass(frozen=True)
class SearchTask:
    """One candidate to size, with what the config says of it and the bar it must beat."""

    plan: LoadedPlan
    candidate: Candidate
    bounds: Bounds
    bar: float = math.inf  # the keep-th cheapest cost per day found before this task started


def search(task: SearchTask) -> dict[str, Any]:
    """The record of one candidate (in plan.json: docs/how-to/plan.md); errors are returned as data."""
    c = task.candidate
    record: dict[str, Any] = {"index": c.index, "name": c.name, "kind": c.kind, "gpu": c.gpu,
                              "tensor_parallel": c.tensor_parallel or None, "scaling": c.scaling}
    prober = Prober(task.plan, c)
    try:
        record.update(_size(task, prober))
    except Exception as exc:  # a failed candidate is recorded and the plan goes on
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    record["probes"] = prober.probes
    return record


def _size(task: SearchTask, prober: Prober) -> dict[str, Any]:
    c, b, plan = task.candidate, task.bounds, task.plan
    periods = plan.spec.periods()
    loads = [p.load for p in periods]
    hours = {p.load: p.hours for p in periods}
    if c.replicas_path is None:
        if not prober.meets(None, loads):
            return _fails(prober, None, loads)
        return _sized(prober, {load: None for load in loads}, hours, b)
    if c.scaling == "fixed":
        low = max(b.fewest.values())
        high = _affordable(c, task.bar, lambda r: 24.0 * b.gpu_usd_h(r), low)
        found = fewest_meeting(low, high, lambda r: prober.meets(r, loads))
        if found is None:
            return (_stopped(task, low, high, 24.0 * b.gpu_usd_h(high + 1)) if high < c.replicas[1]
                    else _fails(prober, high, loads))
        return _sized(prober, {load: found for load in loads}, hours, b)
    chosen: dict[float, int] = {}
    for k, load in enumerate(loads):  # scheduled: each period its own replicas, busiest first

        def day(r: int, load: float = load, k: int = k) -> float:
            rest = sum(hours[x] * b.gpu_usd_h(b.fewest[x]) for x in loads[k + 1:])
            return sum(hours[x] * b.gpu_usd_h(n) for x, n in chosen.items()) + hours[load] * b.gpu_usd_h(r) + rest

        high = _affordable(c, task.bar, day, b.fewest[load])
        found = fewest_meeting(b.fewest[load], high, lambda r, load=load: prober.meets(r, [load]))
        if found is None:
            return (_stopped(task, b.fewest[load], high, day(high + 1)) if high < c.replicas[1]
                    else _fails(prober, high, [load]))
        chosen[load] = found
    return _sized(prober, chosen, hours, b)


def _affordable(c: Candidate, bar: float, day_usd: Callable[[int], float], low: int) -> int:
    """The most replicas whose GPU bill alone costs no more than `bar` a day (the plan's range if no bar)."""
    high = c.replicas[1]
    while high >= low and day_usd(high) > bar:
        high -= 1
    return high


def _stopped(task: SearchTask, low: int, high: int, floor_usd_day: float) -> dict[str, Any]:
    """A candidate whose affordable replica counts (low..high) all miss the SLO, or that has none."""
    tried = f"misses the SLO with up to {high} replicas, and {high + 1} or more" if high >= low else "its GPUs alone"
    return {"status": "stopped", "cost_per_day_usd_floor": floor_usd_day,
            "reason": f"{tried} cost at least ${floor_usd_day:,.2f} a day, more than {_nth(task.plan.spec.keep)} "
                      "found before it"}


def _nth(k: int) -> str:
    """'the cheapest', 'the 2nd cheapest', 'the 3rd cheapest', 'the 11th cheapest'."""
    if k == 1:
        return "the cheapest"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"the {k}{suffix} cheapest"


def _fails(prober: Prober, replicas: Optional[int], loads: list[float]) -> dict[str, Any]:
    probe = next((p for load in loads if not (p := prober(replicas, load))["met"]), None)
    where = f" with {replicas} replicas" if replicas is not None else ""
    at = f" at load {probe['load']:g}" if probe else ""
    if probe is not None and probe["limited_by"] == "served_share":
        what = (f"answers {served_share(probe):.0%} of the requests in full (min_served_share "
                f"{prober.plan.spec.min_served_share:g})")
    else:
        what = f"misses {probe['limited_by'] if probe else 'the SLO'}"
    return {"status": "fails", "reason": f"{what}{where}{at}"}


def _sized(prober: Prober, replicas: dict[float, Optional[int]], hours: dict[float, float], b: Bounds
           ) -> dict[str, Any]:
    """A candidate that meets the SLO: its replicas per period, what it costs a day, its headroom."""
    probes = {load: prober(r, load) for load, r in replicas.items()}
    day = sum(hours[load] * probes[load]["cost_per_hour_usd"] for load in replicas)
    peak = next(iter(replicas))  # busiest first
    slo = {metric: bound.model_dump() for metric, bound in prober.plan.spec.slo.items()}
    room, metric = headroom({"at_peak": probes[peak]}, slo)
    return {"status": "ok", "headroom": room, "headroom_metric": metric,
            "replicas": {str(load): r for load, r in replicas.items()},
            "hourly_usd_by_load": {str(load): probes[load]["cost_per_hour_usd"] for load in replicas},
            "peak_replicas": replicas[peak], "cost_per_day_usd": day, "cost_per_hour_usd": day / 24.0,
            "gpu_usd_per_hour_at_peak": b.gpu_usd_h(replicas[peak]), "at_peak": probes[peak]}


def headroom(record: dict[str, Any], slo: dict[str, dict]) -> tuple[float, str]:
    """The smallest relative margin to an SLO bound at the busiest load (pessimistic ends), and its metric.

    `slo`: metric -> {max, min}, as plan.json keeps it."""
    probe = record["at_peak"]
    margins = []
    for metric, bound in slo.items():
        if bound.get("max") is not None:
            margins.append(((bound["max"] - pessimistic(probe, metric, "max")) / bound["max"], metric))
        if bound.get("min") is not None:
            value = pessimistic(probe, metric, "min")
            margins.append(((value - bound["min"]) / bound["min"] if bound["min"] else math.inf, metric))
    return min(margins) if margins else (math.nan, "")


def rank_key(record: dict[str, Any]) -> Key:
    """Where a finished record ranks: by cost per day, then more headroom, then the candidate listed first."""
    if record.get("status") != "ok":
        return NO_KEY
    return (record["cost_per_day_usd"], -record["headroom"], record["index"])


def bar(records: list[dict[str, Any]], keep: int) -> float:
    """The keep-th cheapest cost per day among the records (infinite while fewer have met the SLO)."""
    costs = sorted(r["cost_per_day_usd"] for r in records if r.get("status") == "ok")
    return costs[keep - 1] if len(costs) >= keep else math.inf


def order(plan: LoadedPlan, all_bounds: dict[int, Bounds]) -> list[Candidate]:
    """The candidates to search, cheapest possible first (so the bar drops early and stops the rest)."""
    periods = plan.spec.periods()

    def floor(c: Candidate) -> Key:
        b = all_bounds[c.index]
        return (sum(p.hours * b.gpu_usd_h(b.fewest.get(p.load)) for p in periods), c.index)

    return sorted((c for c in plan.candidates if all_bounds[c.index].pruned is None), key=floor)


def space_points(plan: LoadedPlan) -> int:
    """Runs a brute-force plan would make: every candidate at every replica count and load."""
    loads = len(plan.spec.periods())
    return sum(loads * (c.replicas[1] - c.replicas[0] + 1 if c.replicas_path else 1) for c in plan.candidates)
