"""Caches: the embedding cache, the retrieval cache and the output cache share one block.

    output_cache:
      capacity: 5000              # entries, LRU eviction; omit (or null) for unbounded
      ttl_s: 3600                 # entries expire this long after insertion; omit for never
      keys: {universe: 100000, zipf_s: 0.9}
      deterministic_share: 0.3    # output cache only: the temperature-0 share of requests
      warm: cold                  # cold: start empty; top: start with the most popular keys
      change_rate_per_s: 0.0      # per key: the data behind a key changes as a Poisson process
      hit_latency_s: 0.003
      miss_latency_s: 0.0
      scope: global               # or tenant, user: whose requests may share an entry
      warm_up_s: 3600             # start as if switched on an hour before the run, traffic flowing since

`scope` keeps entries apart: a request's key is its content key (the question)
within its scope, so with `scope: user` a user only ever hits their own entries.
A hit on an entry another user's personalised request inserted (classes'
`personalised_share`) serves that user's private answer: a leak.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import MAX_POPULATION, MAX_PRICE_USD, Block
from .distributions import Distribution

MAX_WARM_UP_S = 30 * 86400.0
"""warm_up_s at most: 30 days of traffic (a key's popularity hardly holds longer, and the warm-up replays
every request of it)."""


class KeyPopularity(Block):
    """Which key a request asks for: Zipf over a finite universe (key k, 1-based, has probability ~ 1/k^s)."""

    universe: int = Field(
        gt=0, le=MAX_POPULATION, description="Number of distinct keys (distinct questions, documents, queries); at "
        "most 100,000,000 (the model keeps a weight per key).")
    zipf_s: float = Field(
        0.0, ge=0, description="Zipf exponent: 0 makes every key equally likely; larger concentrates on the top keys."
    )


class CacheSpec(Block):
    """One cache: LRU with an optional TTL, keys drawn from a popularity law, stale hits from data changes."""

    capacity: Optional[int] = Field(
        None, gt=0, description="Entries held at most; the least recently used is evicted (null: unbounded)."
    )
    ttl_s: Optional[float] = Field(
        None, gt=0, description="An entry expires this long after its insertion (null: never); a hit does not renew it."
    )
    keys: KeyPopularity = Field(description="Popularity of the keys the requests ask for.")
    eviction: Literal["lru", "fifo"] = Field(
        "lru", description="lru: a hit refreshes an entry; fifo: entries leave in insertion order regardless of hits."
    )
    warm: Literal["cold", "top"] = Field(
        "cold", description="cold: start empty; top: start holding the `capacity` most popular keys (all if "
        "unbounded; global scope only)."
    )
    warm_up_s: Optional[float] = Field(
        None, gt=0, le=MAX_WARM_UP_S, description="Start as if the cache had been switched on this long before the "
        "run (empty, or as `warm` says) with the workload's traffic flowing through it since, at its mean rate: "
        "the run begins with the entries, ages and stale data that traffic leaves (at most 30 days)."
    )
    scope: Literal["global", "tenant", "user"] = Field(
        "global", description="Whose requests share entries: global: everybody's; tenant: those of one tenant "
        "(a class's `users.tenants`); user: one user's only (no leaks, fewer hits)."
    )
    change_rate_per_s: float = Field(
        0.0, ge=0, description="Rate at which one key's underlying data changes (Poisson); a hit on an entry "
        "whose data changed after it was cached is a stale hit."
    )
    hit_latency_s: Distribution = Field(
        default_factory=lambda: {"kind": "constant", "value": 0.0}, validate_default=True,
        description="Time a hit takes to return the cached answer.",
    )
    miss_latency_s: Distribution = Field(
        default_factory=lambda: {"kind": "constant", "value": 0.0}, validate_default=True,
        description="Time a lookup costs when it misses (before the request goes on).",
    )
    hourly_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per hour of the cache server (e.g. a Redis node), billed over "
        "the whole window and shared among requests by their lookups.")

    @property
    def eligible_share(self) -> float:
        """Share of requests that use the cache at all (1 except for the output cache)."""
        return 1.0

    @model_validator(mode="after")
    def _top_needs_global_scope(self) -> "CacheSpec":
        if self.warm == "top" and self.scope != "global":
            raise ValueError(f"warm: top needs scope: global (the most popular keys of a {self.scope}-scoped cache "
                             "depend on who asks); use warm_up_s to start it warm")
        return self


class OutputCacheSpec(CacheSpec):
    """The output cache: only deterministic (temperature 0) requests may be answered from it or fill it."""

    deterministic_share: float = Field(
        1.0, ge=0, le=1, description="Share of requests sent with temperature 0; the rest bypass the cache "
        "(neither look up nor insert)."
    )

    @property
    def eligible_share(self) -> float:
        return self.deterministic_share


MAX_WARM_UP_REQUESTS = 20_000_000
"""Requests a warm-up may replay at most (the mean request rate x the longest warm_up_s): a few seconds each
million."""


def class_rates(workload) -> list[float]:
    """Each class's mean request rate: an open loop's long-run mean (rate_scale applied), a closed loop's
    ceiling users / think time."""
    return [spec.request_rate_rps(workload.traffic.rate_scale) for spec in workload.traffic.classes.values()]


def check_warm_up(workload) -> None:
    """A ValueError naming the cache when its warm_up_s would replay more than MAX_WARM_UP_REQUESTS requests."""
    pipeline = workload.pipeline
    if pipeline is None:
        return
    retrieval = pipeline.retrieval
    embedding = retrieval.embedding if retrieval is not None else None
    caches = {"pipeline.output_cache": pipeline.output_cache,
              "pipeline.retrieval.cache": retrieval.cache if retrieval is not None else None,
              "pipeline.retrieval.embedding.cache": embedding.cache if embedding is not None else None}
    rate = sum(class_rates(workload))
    for path, spec in caches.items():
        if spec is not None and spec.warm_up_s is not None and rate * spec.warm_up_s > MAX_WARM_UP_REQUESTS:
            raise ValueError(f"{path}.warm_up_s: {spec.warm_up_s:g} s at the mean {rate:.4g} req/s replays about "
                             f"{rate * spec.warm_up_s:,.0f} requests before the run; at most "
                             f"{MAX_WARM_UP_REQUESTS:,} (shorten it, or use warm: top)")
