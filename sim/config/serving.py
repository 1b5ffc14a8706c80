"""The serving side of a workload: self-hosted replicas (engine or slots) and API endpoints.

Each block forbids unknown keys; help text lives on the fields (`llmsim schema`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, PrivateAttr, ValidationInfo, ValidatorFunctionWrapHandler, model_validator

from sim.catalog import Roofline

from .base import MAX_COUNT, MAX_DURATION_S, MAX_MULTIPLIER, MAX_PRICE_USD, MAX_TOKENS, Block
from .distributions import Distribution
from .limits import ProviderLimits
from .roofline import Dtype, KvDtype, RooflineEfficiency, with_roofline


class SlowEpisodes(Block):
    """Stretches of time in which a replica runs slower (host contention, clocks, a noisy neighbour).

    A two-state Markov process in wall-clock time: normal for an exponential time of mean
    `mean_interval_s`, then slow for an exponential time of mean `mean_duration_s`, and so on.
    While slow, every step takes `multiplier` times as long.
    """

    multiplier: float = Field(
        gt=0, le=MAX_MULTIPLIER, description="Step time while slow, times the normal step time (> 1: slower)."
    )
    mean_duration_s: float = Field(gt=0, description="Mean length of a slow episode, in seconds.")
    mean_interval_s: float = Field(gt=0, description="Mean time between episodes (normal stretches), in seconds.")

    def capacity_factor(self) -> float:
        """Long-run work done per second of wall time, relative to always normal."""
        slow = self.mean_duration_s / (self.mean_duration_s + self.mean_interval_s)
        return (1.0 - slow) + slow / self.multiplier


class Stall(Block):
    """A pause at a fixed time: the replica makes no progress for `duration_s` from `at_s`.

    The step in progress then takes that much longer. Servers stall now and then (a first-time
    compilation, garbage collection, a deploy); `llmsim calibrate` replays a measured run with
    the stalls its step log showed.
    """

    at_s: float = Field(ge=0, le=MAX_DURATION_S, description="When the stall starts (seconds of simulated time).")
    duration_s: float = Field(gt=0, le=MAX_DURATION_S, description="How long the replica makes no progress.")


class CalibratedRange(Block):
    """Where calibrated coefficients were measured; a run beyond it gets a warning (`llmsim calibrate` writes it)."""

    source: str = Field("", description="What the coefficients were fitted on (files, host, engine).")
    decode_seqs_max: Optional[int] = Field(None, ge=0, description="Most sequences decoding in one measured step.")
    prefill_tokens_max: Optional[int] = Field(None, ge=0, description="Most prompt tokens prefilled in one measured step.")
    kv_tokens_max: Optional[int] = Field(None, ge=0, description="Most context tokens read by one measured step.")


_STEP_S = 3600.0
"""Largest step-time coefficient, seconds: keeps a step's time finite for any batch."""


class StepTime(Block):
    """Time of one engine step (seconds).

    step = base_s + per_decode_seq_s x decoding sequences + per_kv_token_s x their context tokens
         + per_prefill_token_s x prompt tokens prefilled + per_prefill_attention_s x prefill attention pairs,
    where a decoding sequence's context is its prompt plus the tokens it has produced, and a prompt chunk of
    c tokens after p tokens already in the cache has c x (p + (c + 1) / 2) attention pairs (a whole prompt of
    P tokens: P (P + 1) / 2, however it is chunked). Then every step is multiplied by its own noise.
    """

    # Each coefficient is at most an hour (_STEP_S): real ones are micro- to milliseconds.
    base_s: float = Field(ge=0, le=_STEP_S, description="Fixed cost of a step (weights read, scheduling, launch).")
    per_decode_seq_s: float = Field(ge=0, le=_STEP_S, description="Extra time per sequence decoding in the step.")
    per_prefill_token_s: float = Field(
        ge=0, le=_STEP_S, description="Extra time per prompt token prefilled in the step.")
    per_kv_token_s: float = Field(
        0.0, ge=0, le=_STEP_S, description="Extra time per context token (KV cache entry) read by the decoding "
        "sequences.")
    per_prefill_attention_s: float = Field(
        0.0, ge=0, le=_STEP_S, description="Extra time per (prompt token, context token) pair of prefill attention.")
    noise_cv: float = Field(
        0.0, ge=0, le=100, description="Step noise: every step is multiplied by its own gamma draw (mean 1, this cv). "
        "(Before llmsim 0.2 one draw covered a whole stretch of identical steps.)"
    )
    slow_episodes: Optional[SlowEpisodes] = Field(None, description="Slow stretches of wall time (see SlowEpisodes).")
    stalls: list[Stall] = Field(default_factory=list, description="Pauses at fixed times, on every replica (see Stall).")
    calibrated: Optional[CalibratedRange] = Field(
        None, description="Where the coefficients were measured (a run beyond it warns); written by llmsim calibrate."
    )


class BlockPrefixCache(Block):
    """Automatic prefix caching, as vLLM's: a replica keeps the KV of prompt blocks it has computed.

    For traces that carry prompt block ids (Mooncake's hash_ids; equal ids are a shared prefix):
    the leading blocks of a prompt found in the replica's cache are not prefilled again. The cache
    holds `blocks` blocks, least recently used first out; a request's blocks enter it at admission.
    """

    blocks: int = Field(gt=0, description="Blocks the replica keeps (the KV it can spare for cached prefixes).")
    block_tokens: int = Field(512, gt=0, le=MAX_TOKENS, description="Tokens per block (Mooncake: 512).")


class Engine(Block):
    """An iteration-level engine with continuous batching and chunked prefill (as vLLM or SGLang).

    Its step-time coefficients are typed in (`step_time`), or derived from a catalog GPU and
    model (`gpu`, `model`: the roofline of sim/catalog/roofline.py), which also gives
    `kv_cache_tokens` and the GPU's price; any step_time field or kv_cache_tokens given
    overrides the derived one.
    """

    max_batch_tokens: int = Field(
        8192, gt=0, le=MAX_TOKENS, description="Token budget of one step: one per decoding sequence, the rest for "
        "prompt chunks.")
    kv_cache_tokens: Optional[int] = Field(
        None, gt=0, le=MAX_TOKENS, description="KV-cache capacity; a request is admitted only when prompt + output "
        "tokens fit. "
        "Derived from the GPU's memory with gpu and model."
    )
    step_time: Optional[StepTime] = Field(
        None, description="Step time coefficients (required unless gpu and model are given: then any field given "
        "overrides the derived one)."
    )
    gpu: Optional[str] = Field(None, description="Catalog GPU of the replica, e.g. h100-sxm (llmsim catalog lists them).")
    model: Optional[str] = Field(
        None, description="Catalog model, e.g. llama-3.1-8b, or a path to a Hugging Face config.json (relative to the workload)."
    )
    tensor_parallel: int = Field(
        1, ge=1, le=MAX_COUNT, description="GPUs per replica (tensor parallelism): the replica's cost is gpu_hourly_usd "
        "times this."
    )
    dtype: Optional[Dtype] = Field(None, description="Weight format with gpu and model: bf16, fp16, fp8 (default: the model's own).")
    kv_dtype: KvDtype = Field("auto", description="KV cache format with gpu and model: auto (BF16), bf16, fp16, fp8.")
    efficiency: Optional[RooflineEfficiency] = Field(
        None, description="The roofline's efficiency factors (each defaults to the catalog's; see llmsim catalog --explain)."
    )
    prefix_cache: Optional[BlockPrefixCache] = Field(
        None, description="Automatic prefix caching of replayed prompts' block ids (Mooncake hash_ids), per replica."
    )
    _roofline: Optional[Roofline] = PrivateAttr(None)
    _typed: tuple[str, ...] = PrivateAttr(())  # step_time coefficients typed over the derived ones

    @model_validator(mode="after")
    def _coefficients_given(self) -> "Engine":
        if (self.gpu is None) != (self.model is None):
            missing = "model" if self.model is None else "gpu"
            raise ValueError(f"{missing}: required with {'gpu' if missing == 'model' else 'model'} "
                             "(the roofline needs both a catalog GPU and a model)")
        if self.gpu is None:
            unused = [k for k in ("dtype", "efficiency") if getattr(self, k) is not None]
            unused += ["kv_dtype"] if self.kv_dtype != "auto" else []
            if unused:
                raise ValueError(f"{unused[0]}: only used with gpu and model (the roofline)")
        if self.step_time is None:
            raise ValueError("step_time: required key is missing")  # as pydantic says it (gpu + model derive it)
        return self

    @property
    def roofline(self) -> Optional[Roofline]:
        """The roofline the coefficients came from (None when they were typed in)."""
        return self._roofline

    def coefficients_source(self) -> str:
        """Where the step-time coefficients came from, for reports (they belong to one host and setup)."""
        if self._roofline is not None:
            return self._roofline.describe() + (f" ({', '.join(self._typed)} typed in)" if self._typed else "")
        if self.step_time.calibrated is not None:
            return f"calibrated: {self.step_time.calibrated.source or 'llmsim calibrate'}"
        return "typed in (step_time)"


class HoldBack(Block):
    """Keep low-priority work from filling the endpoint while it is busy (work-conserving otherwise)."""

    priority: int = Field(ge=1, description="Requests of this priority number or higher are held back...")
    max_load_share: float = Field(
        gt=0, le=1, description="...from starting while this share of the endpoint's slots is in use."
    )


class Overflow(Block):
    """Burst to another endpoint: a request that would wait behind `above` others goes there instead."""

    to: str = Field(description="The model endpoint that takes the overflow (a hosted API, typically).")
    above: int = Field(ge=0, le=MAX_COUNT, description="Requests already waiting here at which a new one goes to "
                       "`to` instead (0: whenever it would have to wait).")


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
    overflow: Optional[Overflow] = Field(None, description="Send requests to another endpoint while this queue is "
                                         "long (self-hosted replicas bursting to an API).")


class PromptCache(Block):
    """Prompt (prefix) caching: a prompt's cacheable prefix (the budget's `cacheable_prefix` sections) seen
    within `ttl_s` is not computed again. An API bills cached tokens at `read_price_multiplier` of the input
    price and newly written ones at `write_price_multiplier`; a self-hosted engine skips their prefill.
    """

    min_tokens: int = Field(
        1024, ge=0, le=MAX_TOKENS, description="Prefixes shorter than this are never cached (providers' minimum).")
    scope: Literal["user", "class"] = Field(
        "user", description="Who shares a prefix: each user (it holds their memory) or the whole class (system only)."
    )
    ttl_s: float = Field(300.0, gt=0, description="An entry lives this long after its last use.")
    read_price_multiplier: float = Field(
        0.5, ge=0, le=MAX_MULTIPLIER, description="API: price of a cached input token, times the input price.")
    write_price_multiplier: float = Field(
        1.0, ge=0, le=MAX_MULTIPLIER, description="API: price of a newly cached input token, times it.")


class Connections(Block):
    """A client connection pool: the first request on each new connection pays a handshake."""

    pool_size: int = Field(gt=0, le=MAX_COUNT, description="Connections kept open at most (at most 1,000,000).")
    handshake_s: float = Field(ge=0, description="Time to open one (TCP + TLS + auth).")


class Autoscale(Block):
    """Replica autoscaling, as a Kubernetes HPA does: replicas = ceil(metric summed over replicas / target)."""

    min_replicas: int = Field(1, ge=1, le=MAX_COUNT, description="Never fewer replicas.")
    max_replicas: int = Field(ge=1, le=MAX_COUNT, description="Never more replicas (at most 1,000,000).")
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


class ScaleToZero(Block):
    """Release the endpoint's capacity after it has been empty (nothing waiting or running) for `idle_s`.

    Self-hosted: every replica stops (and stops billing); the next request starts the endpoint's
    `replicas` (autoscale: min_replicas) again, each loading for `cold_start_s`. API (serverless
    inference): the next request waits `cold_start_s` before it is sent; tokens are billed as usual.
    """

    idle_s: float = Field(gt=0, le=MAX_DURATION_S, description="Empty this long, the endpoint scales to zero.")
    cold_start_s: float = Field(
        ge=0, le=MAX_DURATION_S, description="What the first request after scaling to zero waits before it is served.")


BATCH_PRICE_MULTIPLIER = 0.5
"""Batch price over the interactive price. LiteLLM's price list (model_prices_and_context_window.json, its
`input_cost_per_token_batches` / `output_cost_per_token_batches`): the median over its 509 chat models with
batch prices, 475 of which charge exactly half for input and output (OpenAI, Azure, Anthropic, Bedrock,
Vertex), e.g. gpt-4o $1.25 / $5 per million tokens against $2.50 / $10."""


class BatchMode(Block):
    """The provider's batch API: requests are accepted at once, answered within a completion window, cheaper.

    A class with `batch: true` sends its calls to this endpoint's batch lane: it holds no interactive
    slot and passes none of the provider's interactive `limits` (providers limit batch work apart, here
    `max_in_flight`; our own `rate_limits` still apply); each request is
    answered `turnaround_s` after it is accepted, at most `completion_window_s`, without streaming.
    """

    price_multiplier: float = Field(
        BATCH_PRICE_MULTIPLIER, ge=0, le=MAX_MULTIPLIER,
        description="Batch token prices (input, cached input and output) over the interactive ones; default 0.5, "
        "LiteLLM's batch prices for gpt-4o, Claude and most other models that have them.")
    completion_window_s: float = Field(
        86400.0, gt=0, le=MAX_DURATION_S, description="The provider's promise: every request is answered within "
        "this long of its acceptance (OpenAI and Anthropic: 24 h).")
    turnaround_s: Optional[Distribution] = Field(
        None, description="Acceptance to answer, cut at completion_window_s (default: uniform over the window, the "
        "assumption when nothing is known of the provider's backlog).")
    max_in_flight: Optional[int] = Field(
        None, gt=0, le=MAX_COUNT, description="Requests accepted and not yet answered at most (the provider's batch "
        "queue limit); more wait, FIFO, on our side (default: no limit).")


class SelfHosted(Block):
    """GPU replicas you run and pay for by the hour."""

    kind: Literal["self_hosted"]
    replicas: int = Field(
        1, gt=0, le=MAX_COUNT, description="Number of replicas at the start (one model copy each; at most 1,000,000).")
    max_batch: int = Field(
        256, gt=0, le=MAX_COUNT, description="Maximum running sequences per replica (at most 1,000,000).")
    gpu_hourly_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="Price of one GPU per hour, at most 1e6 (billed per second "
        "held); a replica costs this times its "
        "GPUs (engine.tensor_parallel). Default with engine.gpu: the catalog's price of that GPU, else 0."
    )
    engine: Optional[Engine] = Field(None, description="Iteration-level engine (give this or service_time).")
    service_time: Optional[Distribution] = Field(
        None, description="Plain service time per request instead of the engine: each of max_batch slots serves one request."
    )
    queue: Queue = Field(default_factory=Queue, description="Queue discipline, capacity, hold-back.")
    prompt_cache: Optional[PromptCache] = Field(None, description="Prefix cache: cached prompt tokens skip prefill.")
    cold_start_s: float = Field(0.0, ge=0, description="Model load time before a new replica serves (at start too, unless --warm).")
    autoscale: Optional[Autoscale] = Field(None, description="Add and remove replicas with the load.")
    scale_to_zero: Optional[ScaleToZero] = Field(
        None, description="Stop every replica (and its bill) after idling; the next request waits for a cold start.")
    connections: Optional[Connections] = Field(None, description="Client connection pool to the replicas.")
    dispatch: Literal["least_loaded", "prefix_affinity"] = Field(
        "least_loaded", description="Which replica takes an arriving request: the least loaded, or (with "
        "engine.prefix_cache) the one holding most of its prompt's leading blocks, then the least loaded."
    )

    @model_validator(mode="wrap")
    @classmethod
    def _roofline_defaults(cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> "SelfHosted":
        """Derive the engine's coefficients from the catalog before validating (see sim/config/roofline.py)."""
        derived = with_roofline(data, cls.model_fields["max_batch"].default, info.context)
        replica = handler(derived.data)
        if derived.roofline is not None and replica.engine is not None:
            replica.engine._roofline = derived.roofline
            replica.engine._typed = derived.typed
        return replica

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica holds: its engine's tensor parallelism (1 for a plain service time)."""
        return self.engine.tensor_parallel if self.engine is not None else 1

    @property
    def replica_hourly_usd(self) -> float:
        """Price of one replica per hour: gpu_hourly_usd for each of its GPUs."""
        return self.gpu_hourly_usd * self.gpus_per_replica

    @model_validator(mode="after")
    def _one_service_model(self) -> "SelfHosted":
        if (self.engine is None) == (self.service_time is None):
            raise ValueError("give exactly one of engine or service_time")
        if self.engine is None and (self.autoscale is not None or self.cold_start_s > 0
                                    or self.scale_to_zero is not None):
            raise ValueError("autoscale, cold_start_s and scale_to_zero need an engine (replicas of a plain "
                             "service_time do not load)")
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
    concurrency: int = Field(
        gt=0, le=MAX_COUNT, description="Requests in flight at most (at most 1,000,000); the rest wait in FIFO order.")
    ttft_s: Optional[Distribution] = Field(None, description="Time to first token once a request is sent.")
    output_tokens_per_s: Optional[Distribution] = Field(None, description="Streaming speed after the first token.")
    service_time: Optional[Distribution] = Field(None, description="Plain service time instead of ttft_s + tokens / speed.")
    price_per_mtok_in: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per million prompt tokens (at most 1e6).")
    price_per_mtok_out: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per million output tokens (at most 1e6).")
    queue: Queue = Field(default_factory=Queue, description="Queue discipline, capacity, hold-back (on our side).")
    limits: Optional[ProviderLimits] = Field(None, description="The provider's RPM/TPM limits (429 with retry-after).")
    prompt_cache: Optional[PromptCache] = Field(None, description="The provider's prompt caching and its prices.")
    connections: Optional[Connections] = Field(None, description="Client connection pool to the provider.")
    batch: Optional[BatchMode] = Field(
        None, description="The provider's batch API, for classes with `batch: true` (cheaper, answered within a "
        "completion window).")
    scale_to_zero: Optional[ScaleToZero] = Field(
        None, description="Serverless inference: after idling, the next request waits a cold start.")

    @model_validator(mode="after")
    def _one_service_model(self) -> "Api":
        streaming = self.ttft_s is not None or self.output_tokens_per_s is not None
        if streaming == (self.service_time is not None):
            raise ValueError("give either ttft_s and output_tokens_per_s, or service_time")
        if streaming and (self.ttft_s is None or self.output_tokens_per_s is None):
            raise ValueError("ttft_s and output_tokens_per_s go together")
        return self


Endpoint = Annotated[Union[SelfHosted, Api], Field(discriminator="kind")]
