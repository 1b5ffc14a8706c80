"""One cache mechanism for the embedding, retrieval and output caches.

A request's key is drawn from a Zipf law over a finite universe. The pipeline
looks the key up when the request reaches the cache and inserts it once the
answer exists, so two requests for one key that miss close together both go to
the model (as in a real stack without request coalescing):

    key = cache.draw_key()            # -1: this request bypasses the cache
    code = cache.lookup(key, now)     # MISS, HIT, STALE_HIT or BYPASS
    ...                               # on a MISS, later, with the answer:
    cache.insert(key, now)

Every operation is O(1): an OrderedDict keeps the eviction order, a TTL is
checked when a key is looked up, and expired entries are also swept from the
oldest end at each insertion, so an expired entry never pushes out a live one.

Stale hits are exact. The data behind a key changes as a Poisson process of
rate nu; an entry inserted at time b is stale at time t iff a change fell in
(b, t]. The first change after b lies at b + Exp(nu) (memorylessness), so the
cache draws that instant once, at insertion, and a hit is stale iff it comes
later. Drawing instead an independent "changed?" with probability
1 - exp(-nu * age) at every hit gets each hit's marginal right but not their
joint law: a later hit could come out fresh after an earlier one was stale.
Successive entries of one key live in disjoint intervals, and a Poisson process
has independent increments, so a fresh draw per insertion is exact across them
too, and it costs one draw per insertion rather than one per hit.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from itertools import repeat
from typing import Callable, Optional

import numpy as np

from sim.config.caches import CacheSpec
from sim.model.streams import BlockSampler

MISS, HIT, STALE_HIT, BYPASS = 0, 1, 2, 3
CODE_NAMES = ("miss", "hit", "stale_hit", "bypass")  # indexed by code


def zipf_probabilities(universe: int, s: float) -> np.ndarray:
    """Probability of each key: key k (0-based) has probability proportional to 1/(k+1)^s."""
    weights = np.arange(1, universe + 1, dtype=float) ** -s
    return weights / weights.sum()


@lru_cache(maxsize=8)
def _zipf_cdf(universe: int, s: float) -> np.ndarray:
    # Cached: every replication (and the output and embedding caches, which often share a law)
    # would otherwise recompute the same array of `universe` powers. Read-only, as it is shared.
    cdf = np.cumsum(zipf_probabilities(universe, s))
    cdf[-1] = 1.0  # random() < 1, so the last key is the highest index searchsorted can return
    cdf.flags.writeable = False
    return cdf


def zipf_draw(universe: int, s: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Vectorised key draws (0-based ranks) by inverse transform on the cumulative probabilities."""
    cdf = _zipf_cdf(universe, s)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(cdf, rng.random(n), side="right")

    return draw


class Cache:
    """A capacity-bounded (LRU or FIFO), optionally TTL-bounded cache with Zipf keys and stale hits.

    `key_rng` draws the keys, `share_rng` whether a request is eligible (needed
    when the spec's eligible share is below 1), `stale_rng` the data-change
    times (needed when `change_rate_per_s` > 0). Times passed to `insert` must
    not decrease (they are the simulation clock).
    """

    __slots__ = (
        "spec", "capacity", "ttl", "_lru", "_entries", "_born", "_key", "_eligible", "_change",
        "lookups", "hits", "stale_hits", "misses", "bypasses", "inserts", "evictions", "expirations",
    )

    def __init__(self, spec: CacheSpec, key_rng: np.random.Generator,
                 share_rng: Optional[np.random.Generator] = None,
                 stale_rng: Optional[np.random.Generator] = None) -> None:
        self.spec = spec
        self.capacity: Optional[int] = spec.capacity
        self.ttl: float = math.inf if spec.ttl_s is None else spec.ttl_s
        self._lru = spec.eviction == "lru"
        # key -> (inserted at, first data change after insertion), oldest (next to evict) first.
        self._entries: OrderedDict[int, tuple[float, float]] = OrderedDict()
        # Under LRU with a TTL, hits reorder _entries, so the insertion order that expiry
        # follows needs its own dict; under FIFO _entries already is in insertion order.
        self._born: Optional[OrderedDict[int, float]] = (
            OrderedDict() if self._lru and spec.ttl_s is not None else None
        )
        self._key = BlockSampler(zipf_draw(spec.keys.universe, spec.keys.zipf_s), key_rng)
        share = spec.eligible_share
        self._eligible: Optional[BlockSampler] = None
        if share < 1:
            if share_rng is None:
                raise ValueError("a cache with an eligible share below 1 needs share_rng")
            self._eligible = BlockSampler(lambda rng, n: rng.random(n) < share, share_rng)
        rate = spec.change_rate_per_s
        self._change: Optional[BlockSampler] = None
        if rate > 0:
            if stale_rng is None:
                raise ValueError("a cache with change_rate_per_s > 0 needs stale_rng")
            self._change = BlockSampler(lambda rng, n: rng.standard_exponential(n) / rate, stale_rng)
        self.reset_counters()

    # ------------------------------------------------------------------ operations

    def draw_key(self) -> int:
        """The key of a new request (0 is the most popular), or -1 if the request bypasses the cache."""
        # The key is drawn even for a bypassing request, and eligibility from its own stream:
        # request i then asks for the same key whatever the share, and raising the share only
        # adds eligible requests (common random numbers across a sweep of the share).
        key = self._key()
        if self._eligible is not None and not self._eligible():
            self.bypasses += 1
            return -1
        return key

    def lookup(self, key: int, now: float) -> int:
        """Look `key` up at time `now`: MISS, HIT or STALE_HIT (BYPASS for key -1). Does not insert."""
        if key < 0:
            return BYPASS
        self.lookups += 1
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            self.misses += 1
            return MISS
        born, change_at = entry
        if now - born >= self.ttl:
            self._remove(key)
            self.expirations += 1
            self.misses += 1
            return MISS
        if self._lru:
            entries.move_to_end(key)
        self.hits += 1
        if now >= change_at:
            self.stale_hits += 1
            return STALE_HIT
        return HIT

    def insert(self, key: int, now: float) -> None:
        """Cache the answer for `key`, computed from the data as of `now` (a no-op for key -1)."""
        if key < 0:
            return
        self.inserts += 1
        self._put(key, now)

    def access(self, now: float) -> int:
        """A new request that inserts at once on a miss: draw_key, lookup, insert. Returns the code."""
        key = self.draw_key()
        code = self.lookup(key, now)
        if code == MISS:
            self._put(key, now)
            self.inserts += 1
        return code

    def prefill_top(self, now: float = 0.0) -> None:
        """Fill the cache with its `capacity` most popular keys (the whole universe if unbounded), as of `now`.

        The most popular key ends up most recently used, so the least popular goes first.
        Not counted as insertions.
        """
        n = self.spec.keys.universe if self.capacity is None else min(self.capacity, self.spec.keys.universe)
        keys = range(n - 1, -1, -1)
        if self._entries:  # keys already held move or push others out: insert one by one
            for key in keys:
                self._put(key, now)
            return
        # An empty cache takes them all (n <= capacity) and nothing is expired at `now`: the entries
        # _put would build, in the same order and with the same change draws, in one pass.
        change = self._change
        if change is None:  # every entry is (now, inf): one tuple serves them all
            self._entries.update(zip(keys, repeat((now, math.inf))))
        else:
            self._entries.update((key, (now, now + change())) for key in keys)
        if self._born is not None:
            self._born.update(zip(keys, repeat(now)))

    def reset_counters(self) -> None:
        """Zero the counters (after a warm-up); the cache contents stay."""
        self.lookups = self.hits = self.stale_hits = self.misses = 0
        self.bypasses = self.inserts = self.evictions = self.expirations = 0

    # ------------------------------------------------------------------ reporting

    def __len__(self) -> int:
        """Entries held, expired ones not yet swept included."""
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        """Whether `key` has an entry (expired or not); has no side effects."""
        return key in self._entries

    @property
    def hit_rate(self) -> float:
        """Hits (stale ones included) per lookup so far; nan before the first lookup."""
        return self.hits / self.lookups if self.lookups else math.nan

    def stats(self) -> dict[str, float]:
        """The counters and the hit rates, as flat numbers."""
        stale = self.stale_hits / self.lookups if self.lookups else math.nan
        return {
            "lookups": self.lookups, "hits": self.hits, "stale_hits": self.stale_hits, "misses": self.misses,
            "bypasses": self.bypasses, "inserts": self.inserts, "evictions": self.evictions,
            "expirations": self.expirations, "hit_rate": self.hit_rate, "stale_hit_rate": stale,
        }

    # ------------------------------------------------------------------ internals

    def _put(self, key: int, now: float) -> None:
        entries, born = self._entries, self._born
        if self.ttl != math.inf:
            self._sweep(now)
        if key in entries:  # a second miss answered later: the newer answer replaces the entry
            del entries[key]  # _remove(key), inlined: inserts are on every miss's path
            if born is not None:
                del born[key]
        elif self.capacity is not None and len(entries) >= self.capacity:
            old, _ = entries.popitem(last=False)
            if born is not None:
                del born[old]
            self.evictions += 1
        change_at = now + self._change() if self._change is not None else math.inf
        entries[key] = (now, change_at)
        if born is not None:
            born[key] = now

    def _sweep(self, now: float) -> None:
        """Drop expired entries from the oldest end of the insertion order (amortised O(1))."""
        by_born = self._born is not None
        order = self._born if by_born else self._entries
        ttl = self.ttl
        while order:
            key = next(iter(order))
            born = order[key] if by_born else order[key][0]
            if now - born < ttl:  # the very test lookup() applies
                return
            self._remove(key)
            self.expirations += 1

    def _remove(self, key: int) -> None:
        del self._entries[key]
        if self._born is not None:
            del self._born[key]
