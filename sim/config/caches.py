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

`warm_up_s` (optional) asks the pipeline to run that much traffic through the
cache before measuring; the cache itself only knows `warm: top`.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import MAX_POPULATION, Block
from .distributions import Distribution


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
        "cold", description="cold: start empty; top: start holding the `capacity` most popular keys (all if unbounded)."
    )
    warm_up_s: Optional[float] = Field(
        None, gt=0, description="Traffic the pipeline runs through the cache before measuring (a realistic warm start)."
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

    @property
    def eligible_share(self) -> float:
        """Share of requests that use the cache at all (1 except for the output cache)."""
        return 1.0


class OutputCacheSpec(CacheSpec):
    """The output cache: only deterministic (temperature 0) requests may be answered from it or fill it."""

    deterministic_share: float = Field(
        1.0, ge=0, le=1, description="Share of requests sent with temperature 0; the rest bypass the cache "
        "(neither look up nor insert)."
    )

    @property
    def eligible_share(self) -> float:
        return self.deterministic_share
