"""The workload schema (format v1): stack + traffic + simulation settings.

Every block forbids unknown keys, so a typo is an error rather than a silently
ignored setting. Help text lives on the fields and ends up in `llmsim schema`.
"""
from __future__ import annotations

import math
from typing import Iterator, Literal, Optional, Union

from pydantic import Field, model_validator

from .arrivals import (  # noqa: F401 - re-exported
    Arrivals,
    ClosedLoopArrivals,
    MmppArrivals,
    PoissonArrivals,
    ScheduleArrivals,
    TraceArrivals,
)
from .base import (
    MAX_DURATION_S,
    MAX_GRID_POINTS,
    MAX_MULTIPLIER,
    MAX_POPULATION,
    MAX_RATE_RPS,
    MAX_REPLICATIONS,
    MAX_TOKENS,
    Block,
)
from .caches import check_warm_up
from .distributions import Distribution, Empirical
from .flow import check_flow
from .limits import RateLimit, Retry
from .pipeline import Pipeline
from .serving import (  # noqa: F401 - re-exported
    Api,
    Autoscale,
    BlockPrefixCache,
    Connections,
    Endpoint,
    Engine,
    HoldBack,
    PromptCache,
    Queue,
    SelfHosted,
    StepTime,
)


class Simulation(Block):
    """How long to simulate and how often."""

    duration_s: float = Field(
        3600.0, gt=0, le=MAX_DURATION_S, description="Arrivals are generated in [0, duration_s); the system then "
        "drains. At most 1e10 s: up to there float64 time still resolves microseconds."
    )
    warmup_s: Union[float, Literal["auto"]] = Field(
        0.0, description="Requests arriving before this are left out of the statistics; 'auto' picks it by MSER-5."
    )
    seed: int = Field(1, ge=0, description="Root seed; every random stream is spawned from it.")
    replications: int = Field(
        1, ge=1, le=MAX_REPLICATIONS, description="Independent replications; >= 2 gives 95% confidence intervals. "
        "At most 10,000: intervals narrow as 1/sqrt(replications), so beyond that run longer instead."
    )
    timeseries_interval_s: float = Field(
        10.0, gt=0, description="Width of the time-series buckets in the output; at most 10,000,000 buckets in "
        "duration_s (the default widens to duration_s / 10,000,000 for runs over 3 years)."
    )
    warm: bool = Field(False, description="Start warm: replicas loaded, connections open (the --warm flag).")
    fast_path: bool = Field(
        True, description="Run open-loop traffic (Poisson, schedule, diurnal, MMPP, gamma, trace replays) on plain "
        "FIFO endpoints (slots, and engine replicas without prefix caches, slow time or cold starts) without events, "
        "compiled (the same results to the bit, several times faster: sim/model/fastpath.py); false: always the "
        "event path.")
    max_requests: Optional[float] = Field(
        None, gt=0, description="Refuse to start a run (or a sweep) estimated above this many simulated requests "
        "(default 1e8; the --force flag ignores it)."
    )
    cold_window_s: Optional[float] = Field(
        None, gt=0, description="Report requests arriving before this as the cold window, the rest as warm "
        "(default: the longest cold start, when there is one)."
    )

    @model_validator(mode="after")
    def _bounded_buckets(self) -> "Simulation":
        if self.duration_s / self.timeseries_interval_s <= MAX_GRID_POINTS:
            return self
        if "timeseries_interval_s" in self.model_fields_set:
            raise ValueError(f"timeseries_interval_s: {self.timeseries_interval_s:g} s makes "
                             f"{self.duration_s / self.timeseries_interval_s:.3g} buckets in duration_s; at most "
                             f"{MAX_GRID_POINTS:,} (use at least {self.duration_s / MAX_GRID_POINTS:.3g} s)")
        self.timeseries_interval_s = self.duration_s / MAX_GRID_POINTS  # the default, widened as documented
        return self

    @model_validator(mode="after")
    def _warmup_inside(self) -> "Simulation":
        if isinstance(self.warmup_s, float) and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s ({self.warmup_s}) must be in [0, duration_s={self.duration_s})")
        return self


class Users(Block):
    """Distinct users of a class: each request is sent by one of them."""

    count: int = Field(
        1, gt=0, le=MAX_POPULATION, description="Number of users (ids are unique across classes); at most "
        "100,000,000 (the model keeps a weight per user)."
    )
    zipf_s: float = Field(0.0, ge=0, description="0: users equally active; s > 0: user k sends in proportion to 1/k^s.")
    tenants: int = Field(
        1, ge=1, le=MAX_POPULATION, description="Tenants (customer organisations) the users belong to, for caches "
        "with `scope: tenant`: user k (0-based, 0 the most active) is in tenant k mod tenants; tenant t is the same "
        "tenant in every class.")


class RequestClass(Block):
    """One kind of request: how it arrives, how long its prompt and answer are, where it goes."""

    arrival: Arrivals = Field(description="Arrival process (its `kind` picks one; see docs/guides/arrivals.md).")
    prompt_tokens: Optional[Distribution] = Field(
        None, description="Prompt length in tokens (rounded, at least 1). Required but for a trace replay, "
        "which takes them from its trace."
    )
    output_tokens: Optional[Distribution] = Field(
        None, description="Answer length in tokens (rounded, at least 1). Required but for a trace replay, "
        "which takes them from its trace."
    )
    max_output_tokens: Optional[int] = Field(
        None, gt=0, le=MAX_TOKENS, description="The request's max_tokens: answers are cut there; token rate limits "
        "count it."
    )
    endpoint: Optional[Union[str, dict[str, float]]] = Field(
        None, description="Model endpoint that serves it, or a mix {name: weight}; may be omitted when there is one."
    )
    priority: int = Field(0, ge=0, description="Queue priority: 0 is served first (interactive), then 1, 2, ...")
    deadline_s: Optional[float] = Field(
        None, gt=0, description="A request still waiting in the queue this long after arriving is dropped."
    )
    users: Users = Field(default_factory=Users, description="The class's user population (for per-user limits).")
    features: Optional[dict[str, float]] = Field(
        None, description="Product features the requests belong to, {name: weight} (for the cost ledger)."
    )
    retry: Retry = Field(default_factory=Retry, description="What the client does after a 429.")
    personalised_share: float = Field(
        0.0, ge=0, le=1, description="Share of requests whose answer depends on who asks (their account data): "
        "served to another user from a cache, it is a leak (see the caches' `scope`).")
    batch: bool = Field(
        False, description="Background work sent through the API's batch mode (`models.X.batch`): batch prices, "
        "answered within the completion window; its latency is reported apart (batch_* metrics).")

    @model_validator(mode="after")
    def _positive_weights(self) -> "RequestClass":
        for label, mix in (("endpoint", self.endpoint), ("features", self.features)):
            if isinstance(mix, dict) and (not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0):
                raise ValueError(f"{label}: weights must be non-negative with a positive sum")
        return self

    @model_validator(mode="after")
    def _tokens_or_trace(self) -> "RequestClass":
        for name in ("prompt_tokens", "output_tokens"):
            if getattr(self, name) is not None:
                continue
            if not isinstance(self.arrival, TraceArrivals):
                raise ValueError(f"{name}: required key is missing (only a trace replay may leave it out)")
            replay = self.arrival.replay
            setattr(self, name, trace_tokens(replay.prompt if name == "prompt_tokens" else replay.output))
        return self

    def open_loop_rate_rps(self) -> float:
        """The class's mean open-loop arrival rate at rate_scale 1 (0 for a closed loop)."""
        return getattr(self.arrival, "mean_rate_rps", lambda: 0.0)()

    def request_rate_rps(self, rate_scale: float = 1.0) -> float:
        """The class's mean request rate: an open loop's long-run mean times `rate_scale`, a closed loop's
        ceiling users / think time (which rate_scale leaves alone)."""
        if isinstance(self.arrival, ClosedLoopArrivals):
            return self.arrival.users / max(self.arrival.think_time_s.mean, 1e-9)
        return self.open_loop_rate_rps() * rate_scale

    def endpoint_mix(self) -> dict[str, float]:
        """{endpoint: share} with shares summing to 1 (after endpoint resolution)."""
        if isinstance(self.endpoint, dict):
            total = sum(self.endpoint.values())
            return {name: w / total for name, w in self.endpoint.items()}
        return {self.endpoint: 1.0}


def trace_tokens(counts) -> Empirical:
    """The empirical distribution of a replayed trace's token counts (what its replay sends).

    Built without validation and without `values`, so the arrays are not copied into a list
    (nor into a dump of the workload) for a trace of millions of rows.
    """
    spec = Empirical.model_construct(kind="empirical", values=None, csv=None, column=None)
    spec._data = counts.astype(float)
    return spec


class Traffic(Block):
    """The request classes and a global load knob."""

    rate_scale: float = Field(
        1.0, gt=0, le=MAX_MULTIPLIER, description="Multiplies every open-loop arrival rate ('what if 3x traffic'); "
        "at most 1e6."
    )
    rate_rps: Optional[float] = Field(
        None, gt=0, le=MAX_RATE_RPS, description="The total open-loop arrival rate in req/s, as an alternative to "
        "rate_scale (a sweep axis in absolute load): rate_scale becomes rate_rps / the classes' own total rate."
    )
    classes: dict[str, RequestClass] = Field(min_length=1, description="Request classes by name.")

    @model_validator(mode="after")
    def _absolute_rate(self) -> "Traffic":
        if self.rate_rps is None:
            return self
        base = sum(cls.open_loop_rate_rps() for cls in self.classes.values())
        if base <= 0:
            raise ValueError("rate_rps needs an open-loop class: closed loops have no arrival rate to scale")
        scale = self.rate_rps / base
        # (rate_scale given too is a contradiction, unless it is 1 or already this: a workload written back out)
        if self.rate_scale != 1.0 and not math.isclose(self.rate_scale, scale, rel_tol=1e-12):
            raise ValueError(f"give rate_rps or rate_scale, not both (rate_rps {self.rate_rps:g} is rate_scale "
                             f"{scale:g} here)")
        if scale > MAX_MULTIPLIER:
            raise ValueError(f"rate_rps {self.rate_rps:g} is {scale:g}x the classes' rate: at most {MAX_MULTIPLIER:g}x")
        self.__dict__["rate_scale"] = scale  # set, not assigned: no field validation runs twice
        return self


class Slo(Block):
    """Per-request targets; a completed request that meets all of them counts towards goodput."""

    ttft_s: Optional[float] = Field(None, gt=0, description="Time to first token at most.")
    e2e_s: Optional[float] = Field(None, gt=0, description="End-to-end latency at most.")
    tpot_s: Optional[float] = Field(
        None, gt=0, description="Time per output token after the first, (e2e - ttft) / (output - 1), at most "
        "(a one-token answer has none and passes)."
    )


class Workload(Block):
    """A workload: the stack, the traffic, and how to simulate it."""

    version: Literal[1] = Field(1, description="Workload format version.")
    name: Optional[str] = Field(None, description="Short name shown in summaries.")
    description: Optional[str] = Field(None, description="Free text.")
    simulation: Simulation = Field(default_factory=Simulation, description="How long to simulate, seeds, "
                                   "replications, warm-up (all have defaults).")
    traffic: Traffic = Field(description="Who sends requests: the request classes and the load knob.")
    models: dict[str, Endpoint] = Field(min_length=1, description="Model endpoints by name.")
    slo: Optional[Slo] = Field(None, description="Per-request targets for goodput.")
    rate_limits: list[RateLimit] = Field(default_factory=list, description="Our limiters, checked in order before the queue.")
    pipeline: Optional[Pipeline] = Field(
        None, description="The application's stages around the model call: prompt budget, output cache, post-processing."
    )

    def feature_names(self) -> list[str]:
        """Every class's features, each once, in the order the classes list them (the records' feature codes)."""
        return list(dict.fromkeys(f for cls in self.traffic.classes.values() for f in (cls.features or {})))

    def measure_end_s(self) -> float:
        """End of the measuring window: where arrivals end.

        That is duration_s, unless every class replays a trace that ends earlier (a window's end_s, or
        its last request, after speed and rate_scale): then the last replay's end. Measuring up to
        duration_s there would spread the same requests over idle time.
        """
        duration = self.simulation.duration_s
        arrivals = [cls.arrival for cls in self.traffic.classes.values()]
        if not all(isinstance(a, TraceArrivals) for a in arrivals):
            return duration
        return min(duration, max(a.replayed_end_s(self.traffic.rate_scale) for a in arrivals))

    @model_validator(mode="after")
    def _bounded_grids(self) -> "Workload":
        # A tiny interval would make the run walk billions of points before its first request.
        for field, points, what in _grids(self):
            if points > MAX_GRID_POINTS:
                raise ValueError(f"{field}: {what} {points:.3g} times in duration_s "
                                 f"({self.simulation.duration_s:g} s); at most {MAX_GRID_POINTS:,}")
        return self

    @model_validator(mode="after")
    def _bounded_warm_up(self) -> "Workload":
        check_warm_up(self)  # a cache's warm_up_s replays its traffic before the run: bounded like the run
        return self

    @model_validator(mode="after")
    def _window_after_warmup(self) -> "Workload":
        warmup, end = self.simulation.warmup_s, self.measure_end_s()
        if isinstance(warmup, float) and warmup >= end:
            raise ValueError(f"simulation.warmup_s: {warmup:g} must be less than {end:g}, where the trace "
                             "replays end (after speed and rate_scale): nothing would be measured")
        return self

    @model_validator(mode="after")
    def _resolve_endpoints(self) -> "Workload":
        names = list(self.models)
        for cls_name, cls in self.traffic.classes.items():
            if cls.endpoint is None:
                if len(names) > 1:
                    raise ValueError(
                        f"traffic.classes.{cls_name}.endpoint: several models ({', '.join(names)}); say which serves this class"
                    )
                cls.endpoint = names[0]
            for endpoint in ([cls.endpoint] if isinstance(cls.endpoint, str) else list(cls.endpoint)):
                if endpoint not in self.models:
                    raise ValueError(
                        f"traffic.classes.{cls_name}.endpoint: unknown model {endpoint!r} (known: {', '.join(names)})"
                    )
        budget = self.pipeline.budget if self.pipeline is not None else None
        for name, model in self.models.items():
            if model.prompt_cache is not None and (budget is None or not budget.cacheable_prefix):
                raise ValueError(f"models.{name}.prompt_cache: needs pipeline.budget with a cacheable_prefix "
                                 "(the prompt sections that repeat)")
        router = self.pipeline.router if self.pipeline is not None else None
        if router is not None:
            for tier in router.tiers:
                if tier not in self.models:
                    raise ValueError(f"pipeline.router.tiers: unknown model {tier!r} (known: {', '.join(names)})")
            for cls_name in list(router.risky_classes) + list(router.difficulty):
                if cls_name not in self.traffic.classes:
                    raise ValueError(f"pipeline.router: unknown class {cls_name!r} "
                                     f"(known: {', '.join(self.traffic.classes)})")
        guard = self.pipeline.guardrails if self.pipeline is not None else None
        if guard is not None and guard.fallback_model is not None and guard.fallback_model not in self.models:
            raise ValueError(f"pipeline.guardrails.fallback_model: unknown model {guard.fallback_model!r} "
                             f"(known: {', '.join(names)})")
        if self.pipeline is not None:
            self._check_flows()
        for k, limit in enumerate(self.rate_limits):
            for cls_name in limit.classes or []:
                if cls_name not in self.traffic.classes:
                    raise ValueError(f"rate_limits.{k}.classes: unknown class {cls_name!r} "
                                     f"(known: {', '.join(self.traffic.classes)})")
        self._check_batch_classes()
        self._check_overflow()
        return self

    def _check_overflow(self) -> None:
        """An overflow goes to another known endpoint, which itself overflows nowhere (no chains, no loops)."""
        names = list(self.models)
        for name, model in self.models.items():
            overflow = model.queue.overflow
            if overflow is None:
                continue
            where = f"models.{name}.queue.overflow.to"
            if overflow.to not in self.models or overflow.to == name:
                raise ValueError(f"{where}: {'itself' if overflow.to == name else repr(overflow.to)} is not another "
                                 f"model (known: {', '.join(names)})")
            if self.models[overflow.to].queue.overflow is not None:
                raise ValueError(f"{where}: {overflow.to!r} overflows itself: one step of overflow at most")

    def _check_flows(self) -> None:
        pipeline = self.pipeline
        for cls_name in pipeline.flows:
            if cls_name not in self.traffic.classes:
                raise ValueError(f"pipeline.flows: unknown class {cls_name!r} (known: {', '.join(self.traffic.classes)})")
        for where, flow in pipeline.all_flows():
            check_flow(where, flow, list(self.models), list(pipeline.tools))

    def _check_batch_classes(self) -> None:
        """A batch class reaches a batch mode: every endpoint of its mix has one (with a router, some tier)."""
        router = self.pipeline.router if self.pipeline is not None else None
        guard = self.pipeline.guardrails if self.pipeline is not None else None
        for cls_name, cls in self.traffic.classes.items():
            if not cls.batch:
                continue
            reach = list(router.tiers) if router is not None else list(cls.endpoint_mix())
            lacking = [name for name in reach if getattr(self.models[name], "batch", None) is None]
            if len(lacking) == len(reach) or (router is None and lacking):
                raise ValueError(f"traffic.classes.{cls_name}.batch: models.{lacking[0]} has no batch mode "
                                 "(give the API endpoint a `batch:` block)")
            timed = [k for k in ("max_time_s", "call_timeout_s", "first_token_timeout_s")
                     if guard is not None and getattr(guard, k) is not None]
            if timed:
                raise ValueError(f"traffic.classes.{cls_name}.batch: pipeline.guardrails.{timed[0]} would stop "
                                 "batch requests, which are answered within hours (remove the time limits)")


def _grids(workload: Workload) -> Iterator[tuple[str, float, str]]:
    """(field, points in duration_s, what happens at each) of every process on a fixed or mean interval."""
    duration = workload.simulation.duration_s
    for name, model in workload.models.items():
        if not isinstance(model, SelfHosted):
            continue
        if model.autoscale is not None:
            yield f"models.{name}.autoscale.interval_s", duration / model.autoscale.interval_s, "the autoscaler looks"
        episodes = model.engine.step_time.slow_episodes if model.engine is not None else None
        if episodes is not None:
            yield (f"models.{name}.engine.step_time.slow_episodes",
                   duration / (episodes.mean_interval_s + episodes.mean_duration_s), "a slow episode starts")
    for name, cls in workload.traffic.classes.items():
        arrival = cls.arrival
        if isinstance(arrival, ScheduleArrivals) and arrival.repeat:
            yield (f"traffic.classes.{name}.arrival.steps",
                   duration / arrival.steps[-1].until_s * len(arrival.steps), "the schedule's rate changes")
        if isinstance(arrival, MmppArrivals):
            yield (f"traffic.classes.{name}.arrival.mean_on_s",
                   2 * duration / (arrival.mean_on_s + arrival.mean_off_s), "the rate switches")
