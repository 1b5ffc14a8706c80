"""Retrieval: an optional retrieval cache, a batching embedding service, then stages of backend hops.

    retrieval:
      cache: {capacity: 50000, ttl_s: 600, keys: {universe: 1000000, zipf_s: 0.8}}   # whole retrieval
      embedding:
        max_batch: 32              # a batch is sent when it holds this many queries...
        max_wait_s: 0.01           # ...or this long after its first query, whichever comes first
        batch_time_s: {kind: lognormal, median: 0.02, p95: 0.05}   # per batch, drawn once per batch
        per_query_s: 0.0005        # added per query in the batch: time = batch_time_s + per_query_s * size
        workers: 2                 # batches in flight at most; sent batches wait FIFO for a worker
        cache: {capacity: 100000, keys: {universe: 1000000, zipf_s: 0.8}}
      backends:                    # each a FIFO resource: `concurrency` hops at once, the rest wait
        vector:  {concurrency: 16, latency_s: {kind: lognormal, median: 0.03, p95: 0.12}}
        bm25:    {concurrency: 32, latency_s: {kind: lognormal, median: 0.01, p95: 0.03}}
        sql:     {concurrency: 4,  latency_s: 0.05, fresh: true}   # live data: never from a cache
        tool_weather: {concurrency: 8, latency_s: {kind: lognormal, median: 0.3, p95: 1.2}}
      stages:                      # one after another: a stage starts when the previous one is done
        - {hops: [vector, bm25], wait_for: all}       # hops of a stage run in parallel
        - {hops: [vector, bm25, sql], wait_for: first_k, k: 2}
        - [tool_weather]           # shorthand: a list of hops, wait_for all
        - sql                      # shorthand: one hop
      escalation_stages: [[vector]]   # what an escalation ("retrieve more") runs; default: `stages`

A request first looks in the retrieval cache (keyed by the query: a hit skips the
embedding and every hop but the `fresh` ones), then in the embedding cache (a hit
skips the embedding service), then runs the stages. When both caches have the same
`keys`, a request asks both for the same query (its key is drawn once), so a query
whose retrieval entry expired can still find its embedding. With `wait_for: first_k` a stage is done when
its k-th hop returns; the other hops still run to the end and hold their backend
slot, as requests already sent do. Tool calls are hops to a backend like any other.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, model_validator

from .base import MAX_COUNT, MAX_PRICE_USD, Block
from .caches import CacheSpec
from .distributions import Distribution


class EmbeddingSpec(Block):
    """An embedding service that batches queries: time per batch = batch_time_s + per_query_s * batch size."""

    max_batch: int = Field(
        32, ge=1, le=MAX_COUNT, description="Queries per batch at most; a full batch is sent at once.")
    max_wait_s: float = Field(
        0.01, ge=0, description="A batch is sent this long after its first query joined, if not full before."
    )
    batch_time_s: Distribution = Field(
        default_factory=lambda: {"kind": "constant", "value": 0.0}, validate_default=True,
        description="Service time of one batch (drawn once per batch), whatever its size.",
    )
    per_query_s: float = Field(0.0, ge=0, description="Service time added per query in the batch.")
    workers: int = Field(
        1, ge=1, le=MAX_COUNT, description="Batches served at once; sent batches wait FIFO for a worker.")
    price_per_mtok: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per million tokens embedded (an embedding API; e.g. OpenAI "
        "text-embedding-3-small $0.02, -large $0.13 in LiteLLM's price list); needs query_tokens.")
    query_tokens: Optional[Distribution] = Field(
        None, description="Tokens of one embedded query (rounded, at least 1), drawn per query sent to the service.")
    hourly_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per hour of a self-hosted embedding server, billed over the "
        "whole window and shared among requests by the queries they had embedded.")
    cache: Optional[CacheSpec] = Field(None, description="Embedding cache: a hit skips the embedding service.")

    @model_validator(mode="after")
    def _tokens_priced(self) -> "EmbeddingSpec":
        if self.price_per_mtok > 0 and self.query_tokens is None:
            raise ValueError("price_per_mtok needs query_tokens (the tokens of one embedded query)")
        return self


class BackendSpec(Block):
    """A retrieval backend (vector DB, BM25 index, REST or SQL tool): a FIFO resource with a latency."""

    concurrency: int = Field(ge=1, le=MAX_COUNT, description="Hops served at once (at most 1,000,000); more wait FIFO.")
    latency_s: Distribution = Field(description="Service time of one hop.")
    fresh: bool = Field(
        False, description="Its output must never come from a cache (a SQL or REST hop over live data): it runs "
        "even when the retrieval cache hits.")
    price_per_query_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per hop (a metered search or tool API), billed to the request "
        "that made it.")
    hourly_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per hour of the backend (a vector database's instances), billed "
        "over the whole window and shared among requests by their hops to it.")


def _stage_shorthand(value: Any) -> Any:
    if isinstance(value, str):
        return {"hops": [value]}
    if isinstance(value, list):
        return {"hops": value}
    return value


class StageSpec(Block):
    """Hops run in parallel; the stage is done when all of them (or the first k) have returned."""

    hops: list[str] = Field(min_length=1, description="Backend names, one per hop (a name may repeat).")
    wait_for: Literal["all", "first_k"] = Field(
        "all", description="all: wait for every hop; first_k: go on when `k` hops have returned."
    )
    k: Optional[int] = Field(None, ge=1, description="With wait_for first_k: hops to wait for (1..len(hops)).")

    @model_validator(mode="after")
    def _k_fits(self) -> "StageSpec":
        if self.wait_for == "first_k":
            if self.k is None:
                raise ValueError("wait_for first_k needs k (the number of hops to wait for)")
            if self.k > len(self.hops):
                raise ValueError(f"k ({self.k}) exceeds the stage's {len(self.hops)} hop(s)")
        elif self.k is not None:
            raise ValueError("k is only meaningful with wait_for: first_k")
        return self

    @property
    def need(self) -> int:
        """Hops the stage waits for."""
        return self.k if self.wait_for == "first_k" else len(self.hops)


Stage = Annotated[StageSpec, BeforeValidator(_stage_shorthand)]
"""A stage: a mapping, a list of hops (wait for all), or a single backend name."""


class RetrievalSpec(Block):
    """Retrieval before the model call: caches, a batching embedding service, stages of backend hops."""

    cache: Optional[CacheSpec] = Field(
        None, description="Retrieval cache keyed by the query: a hit skips the embedding and every hop but the "
        "fresh backends' (they run after the hit, stage by stage)."
    )
    embedding: Optional[EmbeddingSpec] = Field(None, description="Embedding service (omit: queries need none).")
    backends: dict[str, BackendSpec] = Field(min_length=1, description="Backends by name.")
    stages: list[Stage] = Field(min_length=1, description="Stages run one after another; hops within one in parallel.")
    escalation_stages: Optional[list[Stage]] = Field(
        None, min_length=1, description="Stages an escalation runs to retrieve more (default: `stages`)."
    )

    @model_validator(mode="after")
    def _known_backends(self) -> "RetrievalSpec":
        known = ", ".join(sorted(self.backends))
        for field in ("stages", "escalation_stages"):
            for s, stage in enumerate(getattr(self, field) or ()):
                for h, name in enumerate(stage.hops):
                    if name not in self.backends:
                        raise ValueError(f"{field}[{s}].hops[{h}]: unknown backend {name!r} (backends: {known})")
        return self
