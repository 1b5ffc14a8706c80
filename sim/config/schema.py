"""The workload schema (format v1): stack + traffic + simulation settings.

Every block forbids unknown keys, so a typo is an error rather than a silently
ignored setting. Help text lives on the fields and ends up in `llmsim schema`.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .arrivals import Arrivals, ClosedLoopArrivals, PoissonArrivals  # noqa: F401 - re-exported
from .base import Block
from .distributions import Distribution
from .limits import ProviderLimits, RateLimit, Retry
from .pipeline import Pipeline


class Simulation(Block):
    """How long to simulate and how often."""

    duration_s: float = Field(3600.0, gt=0, description="Arrivals are generated in [0, duration_s); the system then drains.")
    warmup_s: Union[float, Literal["auto"]] = Field(
        0.0, description="Requests arriving before this are left out of the statistics; 'auto' picks it by MSER-5."
    )
    seed: int = Field(1, ge=0, description="Root seed; every random stream is spawned from it.")
    replications: int = Field(1, ge=1, description="Independent replications; >= 2 gives 95% confidence intervals.")
    timeseries_interval_s: float = Field(10.0, gt=0, description="Width of the time-series buckets in the output.")
    warm: bool = Field(False, description="Start warm: replicas loaded, connections open (the --warm flag).")
    cold_window_s: Optional[float] = Field(
        None, gt=0, description="Report requests arriving before this as the cold window, the rest as warm "
        "(default: the longest cold start, when there is one)."
    )

    @model_validator(mode="after")
    def _warmup_inside(self) -> "Simulation":
        if isinstance(self.warmup_s, float) and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s ({self.warmup_s}) must be in [0, duration_s={self.duration_s})")
        return self


class Users(Block):
    """Distinct users of a class: each request is sent by one of them."""

    count: int = Field(1, gt=0, description="Number of users (ids are unique across classes).")
    zipf_s: float = Field(0.0, ge=0, description="0: users equally active; s > 0: user k sends in proportion to 1/k^s.")


class RequestClass(Block):
    """One kind of request: how it arrives, how long its prompt and answer are, where it goes."""

    arrival: Arrivals = Field(description="Arrival process (its `kind` picks one; see the README).")
    prompt_tokens: Distribution = Field(description="Prompt length in tokens (rounded, at least 1).")
    output_tokens: Distribution = Field(description="Answer length in tokens (rounded, at least 1).")
    max_output_tokens: Optional[int] = Field(
        None, gt=0, description="The request's max_tokens: answers are cut there; token rate limits count it."
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

    @model_validator(mode="after")
    def _positive_weights(self) -> "RequestClass":
        for label, mix in (("endpoint", self.endpoint), ("features", self.features)):
            if isinstance(mix, dict) and (not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0):
                raise ValueError(f"{label}: weights must be non-negative with a positive sum")
        return self

    def endpoint_mix(self) -> dict[str, float]:
        """{endpoint: share} with shares summing to 1 (after endpoint resolution)."""
        if isinstance(self.endpoint, dict):
            total = sum(self.endpoint.values())
            return {name: w / total for name, w in self.endpoint.items()}
        return {self.endpoint: 1.0}


class Traffic(Block):
    """The request classes and a global load knob."""

    rate_scale: float = Field(1.0, gt=0, description="Multiplies every open-loop arrival rate ('what if 3x traffic').")
    classes: dict[str, RequestClass] = Field(min_length=1, description="Request classes by name.")


class StepTime(Block):
    """Time of one engine step = base_s + per_decode_seq_s * decoding + per_prefill_token_s * prefill tokens."""

    base_s: float = Field(ge=0, description="Fixed cost of a step (weights read, scheduling, launch).")
    per_decode_seq_s: float = Field(ge=0, description="Extra time per sequence decoding in the step.")
    per_prefill_token_s: float = Field(ge=0, description="Extra time per prompt token prefilled in the step.")
    noise_cv: float = Field(
        0.0, ge=0, description="Multiplicative gamma noise (mean 1, this cv) drawn once per stretch of identical steps."
    )


class BlockPrefixCache(Block):
    """Automatic prefix caching, as vLLM's: a replica keeps the KV of prompt blocks it has computed.

    For traces that carry prompt block ids (Mooncake's hash_ids; equal ids are a shared prefix):
    the leading blocks of a prompt found in the replica's cache are not prefilled again. The cache
    holds `blocks` blocks, least recently used first out; a request's blocks enter it at admission.
    """

    blocks: int = Field(gt=0, description="Blocks the replica keeps (the KV it can spare for cached prefixes).")
    block_tokens: int = Field(512, gt=0, description="Tokens per block (Mooncake: 512).")


class Engine(Block):
    """An iteration-level engine with continuous batching and chunked prefill (as vLLM or SGLang)."""

    max_batch_tokens: int = Field(8192, gt=0, description="Token budget of one step: one per decoding sequence, the rest for prompt chunks.")
    kv_cache_tokens: Optional[int] = Field(
        None, gt=0, description="KV-cache capacity; a request is admitted only when prompt + output tokens fit."
    )
    step_time: StepTime
    prefix_cache: Optional[BlockPrefixCache] = Field(
        None, description="Automatic prefix caching of replayed prompts' block ids (Mooncake hash_ids), per replica."
    )


class HoldBack(Block):
    """Keep low-priority work from filling the endpoint while it is busy (work-conserving otherwise)."""

    priority: int = Field(ge=1, description="Requests of this priority number or higher are held back...")
    max_load_share: float = Field(
        gt=0, le=1, description="...from starting while this share of the endpoint's slots is in use."
    )


class Queue(Block):
    """The endpoint's waiting line."""

    @model_validator(mode="after")
    def _hold_back_needs_priority(self) -> "Queue":
        if self.hold_back is not None and self.discipline != "priority":
            raise ValueError("hold_back needs discipline: priority (in FIFO order a held request would block everyone)")
        return self

    discipline: Literal["fifo", "priority"] = Field(
        "fifo", description="fifo: arrival order; priority: lowest priority number first, FIFO within (non-preemptive)."
    )
    capacity: Optional[int] = Field(
        None, ge=0, description="Requests waiting at most; more are rejected (0: no waiting room, M/M/c/c)."
    )
    hold_back: Optional[HoldBack] = Field(None, description="Hold low-priority work back while busy.")


class PromptCache(Block):
    """Prompt (prefix) caching: a prompt's cacheable prefix (the budget's `cacheable_prefix` sections) seen
    within `ttl_s` is not computed again. An API bills cached tokens at `read_price_multiplier` of the input
    price and newly written ones at `write_price_multiplier`; a self-hosted engine skips their prefill.
    """

    min_tokens: int = Field(1024, ge=0, description="Prefixes shorter than this are never cached (providers' minimum).")
    scope: Literal["user", "class"] = Field(
        "user", description="Who shares a prefix: each user (it holds their memory) or the whole class (system only)."
    )
    ttl_s: float = Field(300.0, gt=0, description="An entry lives this long after its last use.")
    read_price_multiplier: float = Field(0.5, ge=0, description="API: price of a cached input token, times the input price.")
    write_price_multiplier: float = Field(1.0, ge=0, description="API: price of a newly cached input token, times it.")


class Connections(Block):
    """A client connection pool: the first request on each new connection pays a handshake."""

    pool_size: int = Field(gt=0, description="Connections kept open at most.")
    handshake_s: float = Field(ge=0, description="Time to open one (TCP + TLS + auth).")


class Autoscale(Block):
    """Replica autoscaling, as a Kubernetes HPA does: replicas = ceil(metric summed over replicas / target)."""

    min_replicas: int = Field(1, ge=1, description="Never fewer replicas.")
    max_replicas: int = Field(ge=1, description="Never more replicas.")
    metric: Literal["utilisation", "queue_length", "in_flight"] = Field(
        "utilisation", description="utilisation (share of full-batch capacity), queue length or requests in flight, per replica."
    )
    target: float = Field(gt=0, description="The metric's target value per replica.")
    interval_s: float = Field(15.0, gt=0, description="How often the autoscaler looks.")
    scale_down_cooldown_s: float = Field(300.0, ge=0, description="No scale-down sooner than this after any change.")

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscale":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class SelfHosted(Block):
    """GPU replicas you run and pay for by the hour."""

    kind: Literal["self_hosted"]
    replicas: int = Field(1, gt=0, description="Number of replicas at the start (one model copy each).")
    max_batch: int = Field(256, gt=0, description="Maximum running sequences per replica.")
    gpu_hourly_usd: float = Field(0.0, ge=0, description="Price of one replica per hour (billed per second held).")
    engine: Optional[Engine] = Field(None, description="Iteration-level engine (give this or service_time).")
    service_time: Optional[Distribution] = Field(
        None, description="Plain service time per request instead of the engine: each of max_batch slots serves one request."
    )
    queue: Queue = Field(default_factory=Queue, description="Queue discipline, capacity, hold-back.")
    prompt_cache: Optional[PromptCache] = Field(None, description="Prefix cache: cached prompt tokens skip prefill.")
    cold_start_s: float = Field(0.0, ge=0, description="Model load time before a new replica serves (at start too, unless --warm).")
    autoscale: Optional[Autoscale] = Field(None, description="Add and remove replicas with the load.")
    connections: Optional[Connections] = Field(None, description="Client connection pool to the replicas.")
    dispatch: Literal["least_loaded", "prefix_affinity"] = Field(
        "least_loaded", description="Which replica takes an arriving request: the least loaded, or (with "
        "engine.prefix_cache) the one holding most of its prompt's leading blocks, then the least loaded."
    )

    @model_validator(mode="after")
    def _one_service_model(self) -> "SelfHosted":
        if (self.engine is None) == (self.service_time is None):
            raise ValueError("give exactly one of engine or service_time")
        if self.engine is None and (self.autoscale is not None or self.cold_start_s > 0):
            raise ValueError("autoscale and cold_start_s need an engine (replicas of a plain service_time do not load)")
        if self.autoscale is not None and not (
                self.autoscale.min_replicas <= self.replicas <= self.autoscale.max_replicas):
            raise ValueError(f"replicas ({self.replicas}) must lie within autoscale's "
                             f"[{self.autoscale.min_replicas}, {self.autoscale.max_replicas}]")
        if self.dispatch == "prefix_affinity" and (self.engine is None or self.engine.prefix_cache is None):
            raise ValueError("dispatch: prefix_affinity needs engine.prefix_cache (the replicas' cached blocks)")
        if self.engine is not None and self.engine.max_batch_tokens < self.max_batch:
            raise ValueError(
                f"engine.max_batch_tokens ({self.engine.max_batch_tokens}) must be at least max_batch ({self.max_batch}): "
                "every running sequence decodes one token per step"
            )
        return self


class Api(Block):
    """A hosted model behind an API: a black box with a concurrency limit and token prices."""

    kind: Literal["api"]
    concurrency: int = Field(gt=0, description="Requests in flight at most; the rest wait in FIFO order.")
    ttft_s: Optional[Distribution] = Field(None, description="Time to first token once a request is sent.")
    output_tokens_per_s: Optional[Distribution] = Field(None, description="Streaming speed after the first token.")
    service_time: Optional[Distribution] = Field(None, description="Plain service time instead of ttft_s + tokens / speed.")
    price_per_mtok_in: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    price_per_mtok_out: float = Field(0.0, ge=0, description="USD per million output tokens.")
    queue: Queue = Field(default_factory=Queue, description="Queue discipline, capacity, hold-back (on our side).")
    limits: Optional[ProviderLimits] = Field(None, description="The provider's RPM/TPM limits (429 with retry-after).")
    prompt_cache: Optional[PromptCache] = Field(None, description="The provider's prompt caching and its prices.")
    connections: Optional[Connections] = Field(None, description="Client connection pool to the provider.")

    @model_validator(mode="after")
    def _one_service_model(self) -> "Api":
        streaming = self.ttft_s is not None or self.output_tokens_per_s is not None
        if streaming == (self.service_time is not None):
            raise ValueError("give either ttft_s and output_tokens_per_s, or service_time")
        if streaming and (self.ttft_s is None or self.output_tokens_per_s is None):
            raise ValueError("ttft_s and output_tokens_per_s go together")
        return self


Endpoint = Annotated[Union[SelfHosted, Api], Field(discriminator="kind")]


class Slo(Block):
    """Per-request targets; a completed request that meets all of them counts towards goodput."""

    ttft_s: Optional[float] = Field(None, gt=0, description="Time to first token at most.")
    e2e_s: Optional[float] = Field(None, gt=0, description="End-to-end latency at most.")


class Workload(Block):
    """A workload: the stack, the traffic, and how to simulate it."""

    version: Literal[1] = Field(1, description="Workload format version.")
    name: Optional[str] = Field(None, description="Short name shown in summaries.")
    description: Optional[str] = Field(None, description="Free text.")
    simulation: Simulation = Field(default_factory=Simulation)
    traffic: Traffic
    models: dict[str, Endpoint] = Field(min_length=1, description="Model endpoints by name.")
    slo: Optional[Slo] = Field(None, description="Per-request targets for goodput.")
    rate_limits: list[RateLimit] = Field(default_factory=list, description="Our limiters, checked in order before the queue.")
    pipeline: Optional[Pipeline] = Field(
        None, description="The application's stages around the model call: prompt budget, output cache, post-processing."
    )

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
        for k, limit in enumerate(self.rate_limits):
            for cls_name in limit.classes or []:
                if cls_name not in self.traffic.classes:
                    raise ValueError(f"rate_limits.{k}.classes: unknown class {cls_name!r} "
                                     f"(known: {', '.join(self.traffic.classes)})")
        return self
