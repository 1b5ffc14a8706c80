"""The workload schema (format v1): stack + traffic + simulation settings.

Every block forbids unknown keys, so a typo is an error rather than a silently
ignored setting. Help text lives on the fields and ends up in `llmsim schema`.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .distributions import Distribution


class Block(BaseModel):
    """A config block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Simulation(Block):
    """How long to simulate and how often."""

    duration_s: float = Field(3600.0, gt=0, description="Arrivals are generated in [0, duration_s); the system then drains.")
    warmup_s: Union[float, Literal["auto"]] = Field(
        0.0, description="Requests arriving before this are left out of the statistics; 'auto' picks it by MSER-5."
    )
    seed: int = Field(1, ge=0, description="Root seed; every random stream is spawned from it.")
    replications: int = Field(1, ge=1, description="Independent replications; >= 2 gives 95% confidence intervals.")

    @model_validator(mode="after")
    def _warmup_inside(self) -> "Simulation":
        if isinstance(self.warmup_s, float) and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s ({self.warmup_s}) must be in [0, duration_s={self.duration_s})")
        return self


class PoissonArrivals(Block):
    """Open loop: requests arrive as a Poisson process, whatever the system does."""

    kind: Literal["poisson"]
    rate_rps: float = Field(gt=0, description="Mean arrival rate in requests per second.")


class ClosedLoopArrivals(Block):
    """Closed loop: a fixed population, each user waits for its answer, thinks, asks again."""

    kind: Literal["closed"]
    users: int = Field(gt=0, description="Number of users.")
    think_time_s: Distribution = Field(description="Time between an answer and the user's next request.")


Arrivals = Annotated[Union[PoissonArrivals, ClosedLoopArrivals], Field(discriminator="kind")]


class RequestClass(Block):
    """One kind of request: how it arrives, how long its prompt and answer are, where it goes."""

    arrival: Arrivals = Field(description="Arrival process (kind: poisson or closed).")
    prompt_tokens: Distribution = Field(description="Prompt length in tokens (rounded, at least 1).")
    output_tokens: Distribution = Field(description="Answer length in tokens (rounded, at least 1).")
    endpoint: Optional[str] = Field(None, description="Model endpoint that serves it; may be omitted when there is one.")


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


class Engine(Block):
    """An iteration-level engine with continuous batching and chunked prefill (as vLLM or SGLang)."""

    max_batch_tokens: int = Field(8192, gt=0, description="Token budget of one step: one per decoding sequence, the rest for prompt chunks.")
    kv_cache_tokens: Optional[int] = Field(
        None, gt=0, description="KV-cache capacity; a request is admitted only when prompt + output tokens fit."
    )
    step_time: StepTime


class SelfHosted(Block):
    """GPU replicas you run and pay for by the hour."""

    kind: Literal["self_hosted"]
    replicas: int = Field(1, gt=0, description="Number of replicas (one model copy each).")
    max_batch: int = Field(256, gt=0, description="Maximum running sequences per replica.")
    gpu_hourly_usd: float = Field(0.0, ge=0, description="Price of one replica per hour.")
    engine: Optional[Engine] = Field(None, description="Iteration-level engine (give this or service_time).")
    service_time: Optional[Distribution] = Field(
        None, description="Plain service time per request instead of the engine: each of max_batch slots serves one request."
    )

    @model_validator(mode="after")
    def _one_service_model(self) -> "SelfHosted":
        if (self.engine is None) == (self.service_time is None):
            raise ValueError("give exactly one of engine or service_time")
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
            elif cls.endpoint not in self.models:
                raise ValueError(
                    f"traffic.classes.{cls_name}.endpoint: unknown model {cls.endpoint!r} (known: {', '.join(names)})"
                )
        return self
