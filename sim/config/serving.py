"""The serving side of a workload: self-hosted replicas (engine or slots) and API endpoints.

Each block forbids unknown keys; help text lives on the fields (`llmsim schema`).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .base import Block
from .distributions import Distribution
from .limits import ProviderLimits


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
