"""Retrieval: retrieval cache, embedding cache, a batching embedding service, stages of backend hops.

    retrieval = Retrieval(env, spec, streams)
    retrieval.run(i, done)             # later, done(i) once request i's retrieval is complete
    retrieval.retrieve_more(i, done)   # an escalation: the escalation stages only (query already embedded)
    retrieval.last                     # inside done(i): request i's row (see RECORD_FIELDS)
    retrieval.columns()                # at the end: every row as flat numpy columns (keep_records)

A request's way: retrieval cache lookup (hit: done after the hit latency, but
for the hops to `fresh` backends, whose output is never cached: they run then) ->
embedding cache lookup (hit: straight to the stages) -> the embedding service
(joins the open batch; waits for the batch to be sent and for a worker) ->
stages, one after another; a stage submits all its hops at once and is done when
`need` of them have returned (hop return times are known at submission, see
`Backend`: a stage is one event). Hops left over by `first_k` run on, holding
their backend slot, but no longer concern the request. Every step is a
`call_later` callback; `done(i)` is never called from inside `run` itself.

Random numbers, each from its own named stream: `retrieval.embedding.batch`
(batch service times, one per batch, in the order batches start),
`retrieval.backend.<name>` (hop latencies, drawn as hops are submitted, so a
backend's n-th hop takes the same time whatever its concurrency),
`cache.retrieval.*` and `cache.embedding.*` (keys, data changes, latencies).
"""
from __future__ import annotations

import math
from collections import deque
from heapq import heapreplace
from typing import Callable, Optional, Sequence

import numpy as np
import simpy

from sim.config.retrieval import BackendSpec, EmbeddingSpec, RetrievalSpec, StageSpec
from sim.metrics.recorder import FlatLog
from sim.model.events import call_later
from sim.model.kernels import compiled
from sim.model.streams import BlockSampler, Streams, token_draw

from .caches import HIT, STALE_HIT, Audience, Cache, build_cache

Done = Callable[[int], None]

_retrieval = compiled("_retrieval")  # None where built without a C compiler: the Python twins run (same results)

NOT_LOOKED_UP = -1
"""Cache code of a request that never reached the cache (no such cache, or answered before it)."""

RECORD_FIELDS = ("request", "start", "end", "embedding_wait", "embedding", "retrieval_cache_code",
                 "embedding_cache_code", "stages", "escalation")
"""One row of `Retrieval.records` per finished retrieval, in completion order: the request index, start
and end times, the embedding wait (joining a batch to its start: batching delay plus waiting for a
worker) and the batch's service time (both nan when the embedding was skipped), the two cache codes
(MISS, HIT, STALE_HIT or NOT_LOOKED_UP), the duration of each stage run (a tuple; on a retrieval
cache hit up to the last stage with a fresh hop, the cached ones 0: often empty) and whether it was
an escalation (`retrieve_more`)."""

USAGE_FIELDS = ("request", "retrieval_cache_lookups", "embedding_cache_lookups", "queries_embedded",
                "tokens_embedded")
"""The leading columns of a `Retrieval.usage` row (one per finished retrieval, kept only when something
is priced); the hops to each backend follow, in `spec.backends` order. What the ledger bills."""


class _BackendReports:
    """What a backend reports (shared by the Python Backend and the compiled one): its name, its concurrency
    and its counters since the last reset (hops, wait_sum, _busy: the latencies of the hops submitted, and
    _since), read with its slots' free times `_free`."""

    __slots__ = ()

    def _pending(self, now: float) -> float:
        """Slot-seconds of hops submitted by now that lie after now (a slot's later hops follow back to back)."""
        return sum(t - now for t in self._free if t > now)

    def utilisation(self, now: float) -> float:
        """Mean share of the slots busy since the last counter reset."""
        span = now - self._since
        return (self._busy - self._pending(now)) / (self.concurrency * span) if span > 0 else math.nan

    def stats(self, now: float, key: str) -> dict[str, float]:
        """`<key>_wait_mean_s` (the mean wait for a slot) and `utilisation_<key>` since the last reset."""
        return {f"{key}_wait_mean_s": float(self.wait_sum / self.hops) if self.hops else math.nan,
                f"utilisation_{key}": float(self.utilisation(now))}

    def reset_counters(self, now: float) -> None:
        """Zero the hop counts, the waiting time and the utilisation (after a warm-up)."""
        self.hops = 0
        self.wait_sum = 0.0
        self._busy = self._pending(now)  # hops already running count from now on
        self._since = now


class Backend(_BackendReports):
    """A FIFO resource with `concurrency` slots; each hop holds one slot for its latency.

    A hop's latency is drawn when it is submitted, and slots serve FIFO, so the hop starts
    when the earliest slot frees, not before its submission (the Kiefer-Wolfowitz recursion
    for a multi-server FIFO queue): its return time is known at once. So a hop costs no event
    of its own, and a slot's release none either; the stage waiting for its hops schedules
    one event, for when it is done. Compiled as `FifoClock` (sim/_retrieval.c) where built:
    `build_backend` makes whichever runs.
    """

    __slots__ = ("name", "concurrency", "_latency", "_free", "hops", "wait_sum", "_busy", "_since")

    def __init__(self, env: simpy.Environment, name: str, spec: BackendSpec, rng: np.random.Generator) -> None:
        self.name = name
        self.concurrency = spec.concurrency
        self._latency = BlockSampler(spec.latency_s.sample, rng)
        self._free = [env.now] * spec.concurrency  # heap: when each slot is free
        self.reset_counters(env.now)

    def submit(self, now: float) -> float:
        """A hop submitted now: when it returns."""
        latency = self._latency()
        free = self._free
        start = free[0] if free[0] > now else now
        end = start + latency
        heapreplace(free, end)
        self.hops += 1
        self.wait_sum += start - now
        self._busy += latency
        return end


if _retrieval is not None:
    class CompiledBackend(_retrieval.FifoClock, _BackendReports):
        """Backend with its slots and `submit` compiled (sim/_retrieval.c's FifoClock): the same return times."""

        __slots__ = ("name", "concurrency", "_since")

        def __init__(self, env: simpy.Environment, name: str, spec: BackendSpec, rng: np.random.Generator) -> None:
            super().__init__(env.now, spec.concurrency, BlockSampler(spec.latency_s.sample, rng))
            self.name = name
            self.concurrency = spec.concurrency
            self.reset_counters(env.now)


def build_backend(env: simpy.Environment, name: str, spec: BackendSpec, rng: np.random.Generator) -> Backend:
    """A retrieval backend: the compiled one where built, else the Python one (the same return times)."""
    return (CompiledBackend if _retrieval is not None else Backend)(env, name, spec, rng)


class EmbeddingService:
    """Batches queries: a batch is sent when full or `max_wait_s` after its first query; `workers` serve FIFO.
    (Compiled as CompiledEmbedding, which CompiledRetrieval uses.)"""

    # No __slots__: CompiledEmbedding derives from this class and a C base, which holds the hot attributes.

    def __init__(self, env: simpy.Environment, spec: EmbeddingSpec, rng: np.random.Generator,
                 on_done: Callable[[object], None]) -> None:
        self.env = env
        self.max_batch = spec.max_batch
        self.max_wait = spec.max_wait_s
        self.per_query = spec.per_query_s
        self.workers = spec.workers
        self._time = BlockSampler(spec.batch_time_s.sample, rng)
        self._on_done = on_done
        self.busy = 0
        self._open: Optional[list] = None   # the batch taking queries, if any
        self._waiting: deque[list] = deque()  # sent batches waiting for a worker
        self.reset_counters(env.now)

    def submit(self, job: "_Job") -> None:
        """Add a query to the open batch (opening one if none); `on_done(job)` once its batch is served."""
        job.emb_join = self.env._now
        batch = self._open
        if batch is None:
            batch = [job]
            if self.max_batch == 1:
                self._send(batch)
                return
            self._open = batch
            call_later(self.env, self.max_wait, self._timeout, batch)
            return
        batch.append(job)
        if len(batch) >= self.max_batch:
            self._open = None  # its timer finds it no longer open and does nothing
            self._send(batch)

    def _timeout(self, event) -> None:
        batch = event.value
        if batch is self._open:
            self._open = None
            self._send(batch)

    def _send(self, batch: list) -> None:
        if self.busy < self.workers:
            self._start(batch)
        else:
            self._waiting.append(batch)

    def _start(self, batch: list) -> None:
        now = self.env._now
        self._area += self.busy * (now - self._last)  # _account(now), inlined
        self._last = now
        self.busy += 1
        self.batches += 1
        self.queries += len(batch)
        service = self._time() + self.per_query * len(batch)
        for job in batch:
            job.emb_wait = now - job.emb_join
            job.emb_s = service
        call_later(self.env, service, self._finish, batch)

    def _finish(self, event) -> None:
        now = self.env._now
        self._area += self.busy * (now - self._last)  # _account(now), inlined
        self._last = now
        self.busy -= 1
        if self._waiting:
            self._start(self._waiting.popleft())
        on_done = self._on_done
        for job in event.value:
            on_done(job)

    def _account(self, now: float) -> None:
        self._area += self.busy * (now - self._last)
        self._last = now

    @property
    def queued(self) -> int:
        """Queries in the open batch and in sent batches waiting for a worker."""
        return (len(self._open) if self._open is not None else 0) + sum(len(b) for b in self._waiting)

    def utilisation(self, now: float) -> float:
        """Mean share of the workers busy since the last counter reset."""
        self._account(now)
        span = now - self._since
        return self._area / (self.workers * span) if span > 0 else math.nan

    def reset_counters(self, now: float) -> None:
        """Zero the batch counts and the utilisation (after a warm-up)."""
        self.batches = self.queries = 0
        self._area = 0.0
        self._last = self._since = now


Plan = tuple[tuple[tuple[Backend, ...], int], ...]
"""Compiled stages: per stage, the backend of each hop and the number of hops to wait for."""


class _Job:
    """One retrieval in flight; carried by the callbacks, so no lookup by request index is needed.
    (sim/_retrieval.c's Job where built: `Retrieval.Job` is whichever runs.)"""

    __slots__ = ("i", "done", "plan", "start", "stage", "stage_start", "stage_s", "emb_join",
                 "emb_wait", "emb_s", "rcode", "ecode", "rkey", "ekey", "escalation")

    def __init__(self, i: int, done: Done, plan: Plan, now: float, escalation: bool) -> None:
        self.i = i
        self.done = done
        self.plan = plan
        self.start = now
        self.stage = 0
        self.stage_s: tuple[float, ...] = ()  # grows by one per stage run; few stages, so no list and copy
        self.emb_wait = self.emb_s = math.nan
        self.rcode = self.ecode = NOT_LOOKED_UP
        self.rkey = self.ekey = -1
        self.escalation = escalation


class Retrieval:
    """Runs requests' retrievals: caches, batched embedding, stages of parallel hops to FIFO backends.

    The way in (`run`, `retrieve_more`, the caches and the embedding), the stage loop and the jobs are compiled
    in CompiledRetrieval where built: `build_retrieval` makes whichever runs (the same results to the bit).
    """

    Job = _Job
    Embedding = EmbeddingService

    def __init__(self, env: simpy.Environment, spec: RetrievalSpec, streams: Streams, warm: bool = False,
                 audience: Optional[Audience] = None, keep_records: bool = True) -> None:
        """`warm` fills both (global) caches with their most popular keys, as `warm: top` does (the --warm
        flag); `audience` tells the caches who asks (needed for scoped caches, and to count leaks);
        `keep_records` keeps every retrieval's row for `columns` (a run needs only the `last`)."""
        self.env = env
        self.spec = spec
        self.backends: dict[str, Backend] = {
            name: build_backend(env, name, b, streams.rng(f"retrieval.backend.{name}"))
            for name, b in spec.backends.items()
        }
        self.plan: Plan = self.compile(spec.stages)
        self.escalation_plan: Plan = (self.compile(spec.escalation_stages)
                                      if spec.escalation_stages is not None else self.plan)
        # Backends whose output is never cached: a retrieval-cache hit still runs their hops.
        self._fresh = frozenset(name for name, b in spec.backends.items() if b.fresh)
        self._fresh_plans: dict[Plan, Plan] = {}
        self.cache: Optional[Cache] = None
        if spec.cache is not None:
            self.cache = build_cache(spec.cache, streams.rng("cache.retrieval.keys"), None,
                                     streams.rng("cache.retrieval.stale"), audience)
            self._hit_s = BlockSampler(spec.cache.hit_latency_s.sample, streams.rng("cache.retrieval.latency"))
            self._miss_s = BlockSampler(spec.cache.miss_latency_s.sample,
                                        streams.rng("cache.retrieval.miss_latency"))
            self.cache.start(warm)
        self.embedding: Optional[EmbeddingService] = None
        self.embedding_cache: Optional[Cache] = None
        self._shared_key = False
        if spec.embedding is not None:
            self.embedding = self.Embedding(env, spec.embedding, streams.rng("retrieval.embedding.batch"),
                                            self._embedded)
            ec = spec.embedding.cache
            if ec is not None:
                self.embedding_cache = build_cache(ec, streams.rng("cache.embedding.keys"), None,
                                                   streams.rng("cache.embedding.stale"), audience)
                self._ehit_s = BlockSampler(ec.hit_latency_s.sample, streams.rng("cache.embedding.latency"))
                self._emiss_s = BlockSampler(ec.miss_latency_s.sample, streams.rng("cache.embedding.miss_latency"))
                self.embedding_cache.start(warm)
                # One query, one key: both caches are asked for it when they describe the same queries.
                self._shared_key = spec.cache is not None and spec.cache.keys == ec.keys
        self.records: Optional[list[tuple]] = [] if keep_records else None
        self.last: Optional[tuple] = None
        self.started = 0
        self.completed = 0
        self._init_metering(spec, streams)

    def _init_metering(self, spec: RetrievalSpec, streams: Streams) -> None:
        """What the ledger bills per request (see `usage`): only when something here has a price."""
        embedding = spec.embedding
        caches = [c for c in (spec.cache, embedding.cache if embedding is not None else None) if c is not None]
        self.metered = bool(any(b.price_per_query_usd or b.hourly_usd for b in spec.backends.values())
                            or any(c.hourly_usd for c in caches)
                            or (embedding is not None and (embedding.price_per_mtok or embedding.hourly_usd)))
        # Rows of USAGE_FIELDS followed by the hops to each backend (in `spec.backends` order).
        self.usage = FlatLog()
        self._backend_index = {name: k for k, name in enumerate(spec.backends)}
        self._query_tokens: Optional[Callable[[], float]] = None
        if embedding is not None and embedding.query_tokens is not None and self.metered:
            self._query_tokens = BlockSampler(token_draw(embedding.query_tokens),
                                              streams.rng("retrieval.embedding.tokens"))

    def compile(self, stages: Sequence[StageSpec]) -> Plan:
        """Stages (validated specs) as a plan for `retrieve_more`; unknown backends are a ValueError."""
        plan = []
        for s, stage in enumerate(stages):
            for name in stage.hops:
                if name not in self.backends:
                    known = ", ".join(sorted(self.backends))
                    raise ValueError(f"stage {s}: unknown backend {name!r} (backends: {known})")
            plan.append((tuple(self.backends[name] for name in stage.hops), stage.need))
        if not plan:
            raise ValueError("a retrieval plan needs at least one stage")
        return tuple(plan)

    def cache_chain(self) -> list[tuple[str, Cache, bool]]:
        """The caches in the order a request meets them, for `caches.warm_up`: (stream name, cache, whether it
        asks for the same query's key as the cache before it)."""
        chain = [("retrieval", self.cache, False)] if self.cache is not None else []
        if self.embedding_cache is not None:
            chain.append(("embedding", self.embedding_cache, self._shared_key))
        return chain

    def fresh_plan(self, plan: Plan) -> Plan:
        """What of `plan` a retrieval-cache hit still runs: each stage's hops to fresh backends, in order,
        waiting for as many of them as the stage waits for hops (at most all). A stage without one stays,
        empty (it takes no time, and keeps the later stages' numbers), unless no fresh hop follows it."""
        fresh = self._fresh_plans.get(plan)
        if fresh is None:
            stages = []
            for backends, need in plan:
                kept = tuple(b for b in backends if b.name in self._fresh)
                stages.append((kept, min(need, len(kept))))
            while stages and not stages[-1][0]:
                stages.pop()
            fresh = self._fresh_plans[plan] = tuple(stages)
        return fresh

    # --- the way in -------------------------------------------------------------------
    def run(self, i: int, done: Done, plan: Optional[Plan] = None) -> None:
        """Start request i's retrieval now (caches, embedding, then `plan`, default every stage); `done(i)` when
        it is complete."""
        job = self.Job(i, done, self.plan if plan is None else plan, self.env._now, False)
        self.started += 1
        cache = self.cache
        if cache is not None:
            key = cache.draw_key(i)
            code = job.rcode = cache.lookup(key, job.start, i)
            if code == HIT or code == STALE_HIT:
                if self._fresh:  # the cached context comes back, the live data is fetched anew
                    job.plan = self.fresh_plan(job.plan)
                call_later(self.env, self._hit_s(), self._answered_from_cache, job)
                return
            job.rkey = key
            call_later(self.env, self._miss_s(), self._after_cache_miss, job)
            return
        self._embed(job)

    def retrieve_more(self, i: int, done: Done, plan: Optional[Plan] = None) -> None:
        """An escalation: run `plan` (default: the escalation stages) for request i, without caches or
        embedding (its query is embedded already); `done(i)` when it is complete."""
        job = self.Job(i, done, self.escalation_plan if plan is None else plan, self.env._now, True)
        self.started += 1
        self._start_stage(job)

    # --- caches and embedding ----------------------------------------------------------
    def _answered_from_cache(self, event) -> None:
        job = event.value
        if job.plan and self._fresh:
            self._start_stage(job)
        else:
            self._finish(job)

    def _after_cache_miss(self, event) -> None:
        self._embed(event.value)

    def _embed(self, job: _Job) -> None:
        if self.embedding is None:
            self._start_stage(job)
            return
        cache = self.embedding_cache
        if cache is not None:
            key = cache.scoped(job.rkey, job.i) if self._shared_key else cache.draw_key(job.i)
            code = job.ecode = cache.lookup(key, self.env._now, job.i)
            # An in-process cache answers at once (latency 0): the request goes on without an event.
            if code == HIT or code == STALE_HIT:
                wait = self._ehit_s()
                if wait > 0:
                    call_later(self.env, wait, self._after_embedding_hit, job)
                else:
                    self._start_stage(job)
                return
            job.ekey = key
            wait = self._emiss_s()
            if wait > 0:
                call_later(self.env, wait, self._after_embedding_miss, job)
                return
        self.embedding.submit(job)

    def _after_embedding_hit(self, event) -> None:
        self._start_stage(event.value)

    def _after_embedding_miss(self, event) -> None:
        self.embedding.submit(event.value)

    def _embedded(self, job: _Job) -> None:
        if job.ekey >= 0:
            self.embedding_cache.insert(job.ekey, self.env._now, job.i)
        self._start_stage(job)

    # --- stages -------------------------------------------------------------------------
    def _start_stage(self, job: _Job) -> None:
        """Submit the stage's hops at once; it is done when `need` of them have returned (one event)."""
        now = self.env._now
        job.stage_start = now
        backends, need = job.plan[job.stage]
        while not backends:  # a fresh plan's stage with nothing fresh: it came from the cache, in no time
            job.stage_s += (0.0,)
            job.stage += 1
            backends, need = job.plan[job.stage]
        if need == len(backends):  # wait for all: the last return
            done = now
            for backend in backends:
                back = backend.submit(now)
                if back > done:
                    done = back
        else:  # first_k: the k-th return; the hops left over run on, holding their slots
            done = sorted([backend.submit(now) for backend in backends])[need - 1]
        call_later(self.env, done - now, self._stage_done, job)

    def _stage_done(self, event) -> None:
        job = event.value
        job.stage_s += (self.env._now - job.stage_start,)
        job.stage += 1
        if job.stage < len(job.plan):
            self._start_stage(job)
        else:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        now = self.env._now
        if job.rkey >= 0:
            self.cache.insert(job.rkey, now, job.i)
        self.completed += 1
        self.last = (job.i, job.start, now, job.emb_wait, job.emb_s, job.rcode, job.ecode, job.stage_s, job.escalation)
        if self.records is not None:
            self.records.append(self.last)
        if self.metered:
            self._meter(job)
        job.done(job.i)

    def _meter(self, job: _Job) -> None:
        """Append job's row of `usage`: cache lookups, the query embedded (its tokens drawn now), hops per backend.

        Every stage it ran submitted all its hops (first_k leftovers run on and are billed too).
        """
        embedded = job.emb_s == job.emb_s  # not NaN: the embedding service served it
        tokens = self._query_tokens() if embedded and self._query_tokens is not None else 0
        row = [job.i, job.rcode != NOT_LOOKED_UP, job.ecode != NOT_LOOKED_UP, embedded, tokens]
        row += [0] * len(self._backend_index)
        for backends, _ in job.plan[:job.stage]:
            for backend in backends:
                row[len(USAGE_FIELDS) + self._backend_index[backend.name]] += 1
        self.usage += row

    # --- reporting ------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Retrievals started and not yet complete."""
        return self.started - self.completed

    def columns(self) -> dict[str, np.ndarray]:
        """The records as flat numpy columns (one row per finished retrieval, in completion order):
        request, start_s, end_s, retrieval_s, embedding_wait_s, embedding_s, retrieval_cache_code,
        embedding_cache_code, escalation and stage<k>_s for every stage index seen (nan where not run)."""
        rows = self.records
        n = len(rows)
        width = max((len(r[7]) for r in rows), default=0)
        stage = np.full((n, width), math.nan)
        for row, r in enumerate(rows):
            stage[row, :len(r[7])] = r[7]
        start = np.fromiter((r[1] for r in rows), float, n)
        end = np.fromiter((r[2] for r in rows), float, n)
        out = {
            "request": np.fromiter((r[0] for r in rows), np.int64, n),
            "start_s": start,
            "end_s": end,
            "retrieval_s": end - start,
            "embedding_wait_s": np.fromiter((r[3] for r in rows), float, n),
            "embedding_s": np.fromiter((r[4] for r in rows), float, n),
            "retrieval_cache_code": np.fromiter((r[5] for r in rows), np.int8, n),
            "embedding_cache_code": np.fromiter((r[6] for r in rows), np.int8, n),
            "escalation": np.fromiter((r[8] for r in rows), bool, n),
        }
        for k in range(width):
            out[f"stage{k}_s"] = stage[:, k]
        return out

    def stats(self, now: float) -> dict[str, float]:
        """Flat counters since the last reset: caches, embedding batches, and per backend hops, mean wait
        for a slot and utilisation."""
        out: dict[str, float] = {"retrieval_started": self.started, "retrieval_completed": self.completed}
        if self.cache is not None:
            out["retrieval_cache_hit_rate"] = self.cache.hit_rate
            out["cache_stale_hit_rate_retrieval"] = self.cache.rate(self.cache.stale_hits)
            out["cache_leak_rate_retrieval"] = self.cache.rate(self.cache.leaks)
        if self.embedding is not None:
            e = self.embedding
            out["embedding_batches"] = e.batches
            out["embedding_batch_size_mean"] = e.queries / e.batches if e.batches else math.nan
            out["utilisation_embedding"] = float(e.utilisation(now))
        if self.embedding_cache is not None:
            out["embedding_cache_hit_rate"] = self.embedding_cache.hit_rate
            out["cache_stale_hit_rate_embedding"] = self.embedding_cache.rate(self.embedding_cache.stale_hits)
            out["cache_leak_rate_embedding"] = self.embedding_cache.rate(self.embedding_cache.leaks)
        for name, b in self.backends.items():
            out[f"backend_{name}_hops"] = b.hops
            out.update(b.stats(now, f"backend_{name}"))
        return out

    def reset_counters(self, now: float) -> None:
        """Zero every counter after a warm-up (records are kept: filter them by start time).

        Retrievals in flight stay counted as started, so `in_flight` remains right."""
        self.started -= self.completed
        self.completed = 0
        for cache in (self.cache, self.embedding_cache):
            if cache is not None:
                cache.reset_counters()
        if self.embedding is not None:
            self.embedding.reset_counters(now)
        for b in self.backends.values():
            b.reset_counters(now)


if _retrieval is not None:
    class CompiledEmbedding(_retrieval.Batcher, EmbeddingService):
        """EmbeddingService with its batching and workers compiled (sim/_retrieval.c's Batcher)."""

        def __init__(self, *args) -> None:
            EmbeddingService.__init__(self, *args)
            self._bind(call_later)

    class CompiledRetrieval(_retrieval.Stages, Retrieval):
        """Retrieval with its caches' and embedding's way in, its stage loop and its jobs compiled
        (sim/_retrieval.c): the same records to the bit."""

        Job = _retrieval.Job
        Embedding = CompiledEmbedding

        def __init__(self, env: simpy.Environment, spec: RetrievalSpec, streams: Streams, **options) -> None:
            Retrieval.__init__(self, env, spec, streams, **options)
            self._bind(call_later)


def build_retrieval(env: simpy.Environment, spec: RetrievalSpec, streams: Streams, warm: bool = False,
                    audience: Optional[Audience] = None, keep_records: bool = True) -> Retrieval:
    """A Retrieval (see its __init__): the compiled one where built, else the Python one (the same results)."""
    kind = CompiledRetrieval if _retrieval is not None else Retrieval
    return kind(env, spec, streams, warm=warm, audience=audience, keep_records=keep_records)
