"""One cache mechanism for the embedding, retrieval and output caches.

A request's key is drawn from a Zipf law over a finite universe. The pipeline
looks the key up when the request reaches the cache and inserts it once the
answer exists, so two requests for one key that miss close together both go to
the model (as in a real stack without request coalescing):

    key = cache.draw_key(i)           # request i's key in its scope; -1: it bypasses the cache
    code = cache.lookup(key, now, i)  # MISS, HIT, STALE_HIT or BYPASS
    ...                               # on a MISS, later, with the answer:
    cache.insert(key, now, i)

Scope and leaks. With `scope: tenant` or `user` a request's key is its content
key (the question, drawn from the Zipf law) offset by its tenant's or user's id
times the universe, so scopes never share an entry. An entry remembers who
inserted it and whether that request was personalised (its answer depends on
who asks, `personalised_share` of its class); a hit on another user's entry is
a cross-user hit, and on another user's personalised entry a leak. Who asks is
an `Audience`: per request index its user, tenant and personalised draw.

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

`warm_up` starts caches as if traffic had flowed through them before the run
(their `warm_up_s`): see its docstring.
"""
from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from functools import lru_cache
from itertools import repeat
from typing import Callable, Optional, Sequence

import numpy as np

from sim.config.caches import MAX_WARM_UP_REQUESTS, CacheSpec, class_rates
from sim.model.kernels import compiled
from sim.model.streams import BlockSampler, Streams

MISS, HIT, STALE_HIT, BYPASS = 0, 1, 2, 3
CODE_NAMES = ("miss", "hit", "stale_hit", "bypass")  # indexed by code
SCOPES = ("global", "tenant", "user")  # a cache's `scope` code is its index here


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
    times (needed when `change_rate_per_s` > 0), `audience` who asks (needed for
    a scope other than global, and to tell cross-user hits and leaks; without it
    request indices are ignored). Times passed to `insert` must not decrease
    (they are the simulation clock). Compiled as CompiledCache where built: `build_cache` makes whichever runs.
    """

    # No __slots__: CompiledCache derives from this class and a C base, which holds the hot attributes.

    def __init__(self, spec: CacheSpec, key_rng: np.random.Generator,
                 share_rng: Optional[np.random.Generator] = None,
                 stale_rng: Optional[np.random.Generator] = None,
                 audience: Optional["Audience"] = None) -> None:
        self.spec = spec
        self.capacity: Optional[int] = spec.capacity
        self.ttl: float = math.inf if spec.ttl_s is None else spec.ttl_s
        self.scope = SCOPES.index(spec.scope)
        if self.scope and audience is None:
            raise ValueError(f"a cache with scope {spec.scope} needs an audience (who asks)")
        self.audience = audience
        self.leaked = False  # whether the last hit served another user's personalised entry
        self._universe = spec.keys.universe
        self._lru = spec.eviction == "lru"
        # key -> (inserted at, first data change after insertion, inserting user or -1, personalised),
        # oldest (next to evict) first.
        self._entries: OrderedDict[int, tuple[float, float, int, bool]] = OrderedDict()
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

    def draw_key(self, i: int = -1) -> int:
        """The key of new request i within its scope (content key 0 is the most popular), or -1 if the
        request bypasses the cache. Without a request index (-1) the content key itself."""
        # The key is drawn even for a bypassing request, and eligibility from its own stream:
        # request i then asks for the same key whatever the share, and raising the share only
        # adds eligible requests (common random numbers across a sweep of the share).
        key = self._key()
        if self._eligible is not None and not self._eligible():
            self.bypasses += 1
            return -1
        if self.scope and i >= 0:
            return key + self._universe * self.audience.scope_id(self.scope, i)
        return key

    def scoped(self, key: int, i: int) -> int:
        """Content key `key` (e.g. drawn by another cache for the same query) within request i's scope here."""
        if key < 0 or not self.scope or i < 0:
            return key
        return key % self._universe + self._universe * self.audience.scope_id(self.scope, i)

    def lookup(self, key: int, now: float, i: int = -1) -> int:
        """Request i looks `key` up at time `now`: MISS, HIT or STALE_HIT (BYPASS for key -1). Does not insert.

        A hit on an entry another user inserted counts as a cross-user hit, and if that entry is
        personalised as a leak (then `leaked` is True until the next hit)."""
        if key < 0:
            return BYPASS
        self.lookups += 1
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            self.misses += 1
            return MISS
        born, change_at, owner, personal = entry
        if now - born >= self.ttl:
            self._remove(key)
            self.expirations += 1
            self.misses += 1
            return MISS
        if self._lru:
            entries.move_to_end(key)
        self.hits += 1
        self.leaked = False
        if owner >= 0 and i >= 0 and owner != self.audience.users[i]:
            self.cross_user_hits += 1
            if personal:
                self.leaks += 1
                self.leaked = True
        if now >= change_at:
            self.stale_hits += 1
            return STALE_HIT
        return HIT

    def insert(self, key: int, now: float, i: int = -1) -> None:
        """Cache request i's answer for `key`, computed from the data as of `now` (a no-op for key -1)."""
        if key < 0:
            return
        self.inserts += 1
        audience = self.audience
        if i >= 0 and audience is not None:
            self._put(key, now, audience.users[i], audience.personal(i))
        else:
            self._put(key, now)

    def access(self, now: float, i: int = -1) -> int:
        """A new request i that inserts at once on a miss: draw_key, lookup, insert. Returns the code."""
        key = self.draw_key(i)
        code = self.lookup(key, now, i)
        if code == MISS:
            self.insert(key, now, i)
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
        if change is None:  # every entry is (now, inf, nobody's): one tuple serves them all
            self._entries.update(zip(keys, repeat((now, math.inf, -1, False))))
        else:
            self._entries.update((key, (now, now + change(), -1, False)) for key in keys)
        if self._born is not None:
            self._born.update(zip(keys, repeat(now)))

    def start(self, warm: bool = False) -> None:
        """Fill the cache as its `warm` asks (`warm`: the --warm flag, top for a global cache), at the time
        its `warm_up_s` begins (before 0; `warm_up` then brings the traffic since)."""
        if self.spec.warm == "top" or (warm and not self.scope):
            self.prefill_top(-self.spec.warm_up_s if self.spec.warm_up_s is not None else 0.0)

    def reset_counters(self) -> None:
        """Zero the counters (after a warm-up); the cache contents stay."""
        self.lookups = self.hits = self.stale_hits = self.misses = 0
        self.bypasses = self.inserts = self.evictions = self.expirations = 0
        self.cross_user_hits = self.leaks = 0

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

    def rate(self, count: int) -> float:
        """`count` (a counter such as stale_hits or leaks) per lookup so far; nan before the first lookup."""
        return count / self.lookups if self.lookups else math.nan

    def stats(self) -> dict[str, float]:
        """The counters and the rates per lookup, as flat numbers."""
        return {
            "lookups": self.lookups, "hits": self.hits, "stale_hits": self.stale_hits, "misses": self.misses,
            "bypasses": self.bypasses, "inserts": self.inserts, "evictions": self.evictions,
            "expirations": self.expirations, "cross_user_hits": self.cross_user_hits, "leaks": self.leaks,
            "hit_rate": self.hit_rate, "stale_hit_rate": self.rate(self.stale_hits),
            "cross_user_hit_rate": self.rate(self.cross_user_hits), "leak_rate": self.rate(self.leaks),
        }

    # ------------------------------------------------------------------ internals

    def _put(self, key: int, now: float, owner: int = -1, personal: bool = False) -> None:
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
        entries[key] = (now, change_at, owner, personal)
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


_caches = compiled("_caches")  # None where built without a C compiler: the Python Cache runs (same results)

if _caches is not None:
    class CompiledCache(_caches.CacheCore, Cache):
        """Cache with draw_key, lookup, insert and their eviction and expiry compiled (sim/_caches.c), on the
        same OrderedDicts: the same codes, entries and counters to the bit."""


def build_cache(spec: CacheSpec, key_rng: np.random.Generator, share_rng: Optional[np.random.Generator] = None,
                stale_rng: Optional[np.random.Generator] = None, audience: Optional["Audience"] = None) -> Cache:
    """A Cache (see its docstring): the compiled one where built, else the Python one (the same results)."""
    return (CompiledCache if _caches is not None else Cache)(spec, key_rng, share_rng, stale_rng, audience)


# ---------------------------------------------------------------------- who asks

_PERSONAL_BLOCK = 4096  # personalised draws per block (request indices i // 4096 share one)


class Audience:
    """Who asks, per request index i: its user, its tenant, and whether its answer is personalised.

    `users` and `classes` are per-request sequences (a recorder's `user` and `cls` columns, which
    grow as requests arrive); a class's user k (0-based, from `first_user[class]`) belongs to tenant
    k mod `tenants[class]`. Request i is personalised when the i-th draw of `rng` falls below its
    class's share: a pure function of i, so every cache that asks agrees, whatever the order.
    """

    __slots__ = ("users", "classes", "_first", "_tenants", "_shares", "_rng", "_draws")

    def __init__(self, users: Sequence[int], classes: Sequence[int], first_user: Sequence[int],
                 tenants: Sequence[int], shares: Sequence[float], rng: Optional[np.random.Generator] = None) -> None:
        self.users = users
        self.classes = classes
        self._first = list(first_user)
        self._tenants = list(tenants)
        self._shares: Optional[list[float]] = list(shares) if any(s > 0 for s in shares) else None
        if self._shares is not None and rng is None:
            raise ValueError("an audience with personalised requests needs rng")
        self._rng = rng
        self._draws: list[array] = []  # uniforms, a block per 4096 request indices (8 bytes each)

    @classmethod
    def of(cls, workload, users: Sequence[int], classes: Sequence[int], streams: Streams) -> "Audience":
        """The audience of a workload's requests (user ids numbered as the arrivals number them)."""
        from sim.model.traffic.arrivals import user_count

        specs = list(workload.traffic.classes.values())
        first = np.cumsum([0] + [user_count(c) for c in specs[:-1]]).tolist()
        return cls(users, classes, first, [c.users.tenants for c in specs],
                   [c.personalised_share for c in specs], streams.rng("requests.personalised"))

    def tenant(self, i: int) -> int:
        """Request i's tenant (tenant ids are shared by the classes)."""
        c = self.classes[i]
        return (self.users[i] - self._first[c]) % self._tenants[c]

    def scope_id(self, scope: int, i: int) -> int:
        """Request i's id in a scope (an index of SCOPES): 0 (global), its tenant or its user."""
        if scope == 2:
            return self.users[i]
        return self.tenant(i) if scope == 1 else 0

    def personal(self, i: int) -> bool:
        """Whether request i's answer depends on who asks."""
        shares = self._shares
        if shares is None:
            return False
        block = i // _PERSONAL_BLOCK
        draws = self._draws
        while len(draws) <= block:
            draws.append(array("d", self._rng.random(_PERSONAL_BLOCK).tobytes()))
        return draws[block][i % _PERSONAL_BLOCK] < shares[self.classes[i]]


# ---------------------------------------------------------------------- warm-up

_WARM_UP_PIECE = 65_536  # warm-up requests drawn at a time, on average: memory stays flat however long


def warm_up(chain: Sequence[tuple[str, Cache, bool]], workload, streams: Streams) -> int:
    """Bring the traffic of the caches' `warm_up_s` through them before the run; returns the requests replayed.

    `chain` lists the caches in the order a request meets them (output, retrieval, embedding), each
    with its stream name and whether it asks for the content key of the cache before it (the same
    query). A cache is switched on `warm_up_s` before 0 (empty, or as `warm` says: see `start`);
    requests arrive as a Poisson process at the workload's mean rate, with class, user and
    personalised draws as the arrivals make them and keys from each cache's law, from streams of
    their own (`cache.warm_up...`): the run's own draws, stale ones included, are the same whatever
    the warm-up, so sweeping `warm_up_s` compares like with like. Each request looks the caches up
    in order and stops at the first hit (a hit answers it); a miss inserts at once (the answer's
    latency, seconds against a warm-up of hours, is left out), and a cache not yet switched on is
    passed by. The counters are zeroed at the end: the run reports its own lookups only.
    """
    span = max((cache.spec.warm_up_s or 0.0 for _, cache, _ in chain), default=0.0)
    rates = np.asarray(class_rates(workload), dtype=float)
    rate = float(rates.sum())
    if span <= 0 or rate <= 0:
        return 0
    if rate * span > MAX_WARM_UP_REQUESTS:  # the workload's validation says so first, naming the cache
        raise ValueError(f"warm_up_s: {span:g} s at {rate:.4g} req/s replays about {rate * span:,.0f} requests "
                         f"before the run; at most {MAX_WARM_UP_REQUESTS:,} (shorten warm_up_s, or use warm: top)")
    rng, personal = streams.rng("cache.warm_up"), streams.rng("cache.warm_up.personalised")
    plan, saved = _warm_up_plan(chain, streams)
    # The Poisson process piece by piece: independent counts on disjoint intervals, uniform times in each.
    pieces = max(1, math.ceil(rate * span / _WARM_UP_PIECE))
    width = span / pieces
    total = 0
    for piece in range(pieces):
        n = int(rng.poisson(rate * width))
        times = (-span + piece * width + np.sort(rng.random(n)) * width).tolist()
        audience = _warm_up_audience(workload, rates, rng, n, personal)
        caches, keys = [], None
        for cache, start, key_rng, law, same_query, share_rng in plan:
            if not (same_query and keys is not None):
                keys = law(key_rng, n).tolist()
            eligible = (share_rng.random(n) < cache.spec.eligible_share).tolist() if share_rng is not None else None
            if start < 0:
                cache.audience = audience
                caches.append((cache, start, keys, eligible))
        for j, t in enumerate(times):
            for cache, start, keys, eligible in caches:
                if t < start or (eligible is not None and not eligible[j]):
                    continue  # not switched on yet, or the request bypasses it: it goes on to the next cache
                key = cache.scoped(keys[j], j)
                if cache.lookup(key, t, j) != MISS:
                    break  # answered here: the caches behind it never see the request
                cache.insert(key, t, j)
        total += n
    for cache, (audience, change) in saved.items():
        cache.audience, cache._change = audience, change
        cache.reset_counters()
    return total


def _warm_up_audience(workload, rates: np.ndarray, rng: np.random.Generator, n: int,
                      personal: np.random.Generator) -> Audience:
    """Who sends n warm-up requests: classes in proportion to their rates, users as the arrivals draw them
    (Zipf over `users.count`; a closed loop's or sessions' users in turn, so equally often)."""
    from sim.config.arrivals import ClosedLoopArrivals
    from sim.model.traffic.arrivals import user_count

    specs = list(workload.traffic.classes.values())
    classes = rng.choice(len(specs), size=n, p=rates / rates.sum())
    first = np.cumsum([0] + [user_count(c) for c in specs[:-1]])
    users = first[classes]
    for c, spec in enumerate(specs):
        mine = classes == c
        count = user_count(spec)
        if count > 1 and mine.any():
            s = 0.0 if isinstance(spec.arrival, ClosedLoopArrivals) else spec.users.zipf_s
            users[mine] += zipf_draw(count, s)(rng, int(mine.sum()))
    return Audience(users.tolist(), classes.tolist(), first.tolist(), [c.users.tenants for c in specs],
                    [c.personalised_share for c in specs], personal)


def _warm_up_plan(chain: Sequence[tuple[str, Cache, bool]], streams: Streams) -> tuple[list[tuple], dict]:
    """Per cache of the chain: (cache, switch-on time or 0 when it has no warm_up_s, its key stream and law,
    whether it shares the query before's key, its eligibility stream or None). A cache switched on before 0
    gets the warm-up's data-change stream; the second value keeps, per such cache, what to restore."""
    plan, saved = [], {}
    for name, cache, same_query in chain:
        spec = cache.spec
        start = -spec.warm_up_s if spec.warm_up_s else 0.0
        share = streams.rng(f"cache.{name}.warm_up.share") if spec.eligible_share < 1 else None
        plan.append((cache, start, streams.rng(f"cache.{name}.warm_up.keys"),
                     zipf_draw(spec.keys.universe, spec.keys.zipf_s), same_query, share))
        if start < 0:
            saved[cache] = (cache.audience, cache._change)
            rate = spec.change_rate_per_s
            if rate > 0:
                cache._change = BlockSampler(lambda g, k, rate=rate: g.standard_exponential(k) / rate,
                                             streams.rng(f"cache.{name}.warm_up.stale"))
    return plan, saved
