"""A self-hosted replica as an iteration-level engine (continuous batching, chunked prefill).

Each step decodes one token for every decoding sequence and spends the rest of
the step's token budget on prompt chunks of admitted requests, first come first
served. Step time = base + per_decode_seq * decoding + per_kv_token * their context
+ per_prefill_token * prefill + per_prefill_attention * prefill attention pairs
(see `StepTime`), times per-step noise and slow episodes (`step_clock`).

While the batch does not change, consecutive steps differ only by a context that
grows one token per decoding sequence per step (and a prompt chunk that moves along
its prompt), so their nominal times grow linearly and a whole stretch of them sums
in closed form: the replica jumps over it in one event ("phase") and only wakes when
something changes: a prompt finishes (its first token), a sequence finishes (its
last token), or a request joins an engine that was only decoding or idle. The
result is exact, and costs a few events per request rather than one per token.

A running request can be cancelled (its caller gave up: a time limit). As in
vLLM, where an aborted request leaves at the next scheduler iteration, it stays
in the step in progress and leaves the batch at that step's end, freeing its
place and KV; the tokens it made until the cancel are what is billed.

Time is kept in steps: `step` counts the steps completed so far, and a decoding
sequence is stored in a heap by the step at whose end its last token appears. Its
context before the step after step t is prompt + output - finish + t, so the sum
over the batch is `context_base` + decoding x t, kept as sequences come and go.

`CompiledReplica` (below) is this replica compiled (sim/_engine.c, on the engine core
sim/_engine_core.h that the fast path's kernel shares): the same results to the bit,
several times faster. `engine_replica` makes one wherever it was built and the replica
has no slow episodes or stalls; EngineReplica is its reference (tests compare them).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from typing import NamedTuple, Optional

import numpy as np
import simpy

from sim.config.schema import Engine
from sim.config.serving import StepTime
from sim.metrics.recorder import COMPLETED, Recorder
from sim.model.events import call_later
from sim.model.kernels import compiled
from sim.model.traffic.traces import prefix_blocks

from .block_cache import BlockCache
from .endpoint import Endpoint
from .step_clock import BLOCK, MAX_STRETCH, NoiseSource, StepClock

# Phases: what the stretch of steps in flight is doing.
IDLE = 0
DECODE = 1      # decoding only: a new request changes the very next step
PREFILL = 2     # the head prompt absorbs the whole prefill budget of every step
MIXED = 3       # one step that finishes at least one prompt
BOUNDARY = 4    # processing a step boundary: admissions wait for the next phase


class Coefficients(NamedTuple):
    """A replica's step-time coefficients, and how its work is counted."""

    base_s: float
    decode_s: float
    prefill_s: float
    kv_s: float
    attention_s: float
    # Work is counted in seconds of a full-batch engine at normal speed (see `utilisation` in
    # docs/getting-started.md): a decoding sequence costs its own time plus its share of a full step's base;
    # slow episodes shrink what the replica can do, so its work counts for more.
    base_share_s: float
    decode_work_s: float
    work_scale: float

    @classmethod
    def of(cls, st: StepTime, max_batch: int, full_batch: Optional[int]) -> "Coefficients":
        base_share_s = st.base_s / (full_batch or max_batch)
        return cls(st.base_s, st.per_decode_seq_s, st.per_prefill_token_s, st.per_kv_token_s,
                   st.per_prefill_attention_s, base_share_s, st.per_decode_seq_s + base_share_s,
                   1.0 / st.slow_episodes.capacity_factor() if st.slow_episodes is not None else 1.0)


def tracks_peak(st: StepTime) -> bool:
    """Whether a replica keeps its peak batch, prefill and context (its coefficients have a calibrated range)."""
    calibrated = st.calibrated
    return calibrated is not None and any(
        v is not None for v in (calibrated.decode_seqs_max, calibrated.prefill_tokens_max, calibrated.kv_tokens_max))


class ReplicaLifecycle:
    """What both replicas (EngineReplica, CompiledReplica) do in Python: load, drain, read the prefix-block cache."""

    def cached_blocks(self, i: int) -> int:
        """Leading blocks of request i's prompt in this replica's prefix cache (0 without block ids)."""
        ids = prefix_blocks(self.rec, i)
        return self.block_cache.leading_hits(ids.tolist()) if ids is not None else 0

    def _prefix_read(self, i: int) -> None:
        """Request i's prompt joins: the prefix-block cache admits its blocks; what it held is read, not computed."""
        rec = self.rec
        ids = prefix_blocks(rec, i)
        if ids is not None:
            prompt = rec.prompt[i]
            read = min(self.block_cache.admit(ids.tolist()) * self.block_cache.block_tokens, prompt - 1)
            rec.cached_tokens[i] = (read, prompt - read)

    def _loaded(self, event) -> None:
        if not self.draining:
            self.serving = True
            self.endpoint.refill(self)

    def drain(self) -> None:
        """Stop taking requests; retire (stop paying) once the running ones are done."""
        self.serving = False
        self.draining = True
        if self.load == 0:
            self.retired = self.env._now


class EngineReplica(ReplicaLifecycle):
    """One model replica running steps over its running batch."""

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, index: int, max_batch: int,
                 engine: Engine, recorder: Recorder, noise_rng: Optional[np.random.Generator],
                 full_batch: Optional[int] = None, cold_start_s: float = 0.0,
                 episode_rng: Optional[np.random.Generator] = None) -> None:
        self.env = env
        self.endpoint = endpoint
        self.index = index
        self.max_batch = max_batch
        self.capacity = max_batch
        # Lifecycle: loading the model (cold start), serving, draining (scaled down), retired.
        self.created = env.now
        self.retired: Optional[float] = None
        self.draining = False
        self.serving = cold_start_s <= 0
        if not self.serving:
            call_later(env, cold_start_s, self._loaded)
        self.budget_tokens = engine.max_batch_tokens
        self.kv_capacity = engine.kv_cache_tokens
        self.fits = self._fits_kv if self.kv_capacity is not None else None  # see Server.fits
        self.block_cache = BlockCache(engine.prefix_cache) if engine.prefix_cache is not None else None
        st = engine.step_time
        (self.base_s, self.decode_s, self.prefill_s, self.kv_s, self.attention_s, self.base_share_s,
         self.decode_work_s, self.work_scale) = Coefficients.of(st, max_batch, full_batch)
        self.clock = StepClock(st, noise_rng, episode_rng)
        self.track_peak = tracks_peak(st)
        self.noise = self.clock.noise   # per-step noise (None: off)
        self.slow = self.clock.episodes  # slow episodes and stalls (None: none)
        # Identical steps of fixed length between batch changes (no context terms, noise, slow time or
        # range check): the lean path, with the arithmetic kept to the bare minimum.
        self.simple = (not self.kv_s and not self.attention_s and not self.track_peak and self.noise is None
                       and self.slow is None)
        self.track_context = bool(self.kv_s) or self.track_peak  # keep context_base (else it stays 0)
        self.peak = [0, 0, 0]   # most decoding sequences, prefill tokens and context tokens in one step
        self.rec = recorder
        self.decoding: list[tuple[int, int]] = []   # heap of (finish step, request)
        self.context_base = 0                        # sum of prompt + output - finish over `decoding`
        self.prefilling: deque[list[int]] = deque()  # [request, prompt tokens left], FIFO
        self.load = 0                                # running sequences
        self.kv_used = 0
        self.step = 0
        # The phase in flight: `steps` steps from `t0`, the k-th of nominal time s0 + growth x k.
        self.phase = IDLE
        self.t0 = 0.0
        self.steps = 0
        self.s0 = 0.0           # nominal time of its first step
        self.growth = 0.0       # how much longer each next step is (context terms)
        self.chunk = 0          # prefill tokens per step in this phase
        self.generation = 0     # bumped when a scheduled boundary is superseded
        self.cancelled = 0      # cancelled sequences still in the batch (they leave at the next boundary)
        # Time-weighted counters.
        self._last = 0.0
        self._busy_time = 0.0
        self._area = 0.0
        self._work = 0.0
        self._work_rate = 0.0   # full-batch seconds of work per second in the phase in flight

    # --- what the endpoint asks -------------------------------------------
    def _kv_need(self, i: int) -> int:
        return self.rec.prompt[i] + self.rec.output[i]

    def _fits_kv(self, i: int) -> bool:
        return self._kv_need(i) <= self.kv_capacity

    def can_admit(self, i: int) -> bool:
        if self.load >= self.max_batch or not self.serving:
            return False
        rec = self.rec  # _kv_need, inlined: asked for every admission
        return self.kv_capacity is None or self.kv_used + rec.prompt[i] + rec.output[i] <= self.kv_capacity

    def admit(self, i: int, delay: float = 0.0) -> None:
        """Take request i: its batch place and KV are held now; its prompt joins after `delay` (a handshake)."""
        now = self.env._now
        self._account(now)
        rec = self.rec
        rec.admit[i] = now + delay
        rec.replica[i] = self.index
        if self.kv_capacity is not None:
            self.kv_used += self._kv_need(i)
        self.load += 1
        if delay > 0:
            call_later(self.env, delay, self._join, i)
        else:
            self._join_now(i, now)

    def _join(self, event) -> None:
        i = event.value
        if self.rec.outcome[i] >= 0:  # cancelled during its handshake: its place was freed then
            return
        self._join_now(i, self.env._now)

    def _join_now(self, i: int, now: float) -> None:
        """Request i's prompt enters the batch (less what its prefix cache holds): the engine plans its next step."""
        rec = self.rec
        if self.block_cache is not None:
            self._prefix_read(i)
        cached = rec.cached_tokens
        prompt = rec.prompt[i]
        if cached is not None and i < len(cached.read):  # (CachedTokens[i], inlined: asked for every join)
            prompt = max(1, prompt - cached.read[i])  # the last token is always computed: it yields the first output
        self.prefilling.append([i, prompt])
        phase = self.phase
        if phase == IDLE:
            # Start at the end of this instant, so requests arriving together share the first step.
            self.phase = BOUNDARY
            call_later(self.env, 0.0, self._wake)
        elif phase == DECODE:
            self._cut_after_current_step(now)
        # PREFILL: the new prompt queues behind the head, which takes the whole budget;
        # MIXED and BOUNDARY: the next phase is computed with it anyway.

    def counters(self, now: float) -> tuple[float, float, float, float]:
        self._account(now)
        held = (self.retired if self.retired is not None else now) - self.created
        return self._busy_time, self._area, self._work, held

    def cancel(self, i: int, now: float) -> int:
        """Stop running request i (its outcome is already set by the caller); returns the tokens it made.

        Its place and KV are freed at the end of the step in progress (at once while its handshake
        runs); the stretch of identical steps in flight is cut there so that happens on time.
        """
        self._account(now)
        if self.rec.admit[i] > now:  # still connecting: nothing computed yet
            self._release(i)
            self.endpoint.refill(self)
            return 0
        made = self._tokens_made(i, now)
        self.cancelled += 1
        if self.phase == DECODE or self.phase == PREFILL:
            self._cut_after_current_step(now)
        return made

    def _tokens_made(self, i: int, now: float) -> int:
        """Output tokens request i has produced by now (0 while its prompt is still being read)."""
        if self.rec.first_token[i] != self.rec.first_token[i]:  # NaN: no first token yet
            return 0
        steps = self.step
        if self.phase in (DECODE, PREFILL, MIXED):
            steps += self._done_by(now)
        finish = next(f for f, j in self.decoding if j == i)
        return self.rec.output[i] - (finish - steps)

    def _purge(self) -> None:
        """Cancelled sequences leave the batch (at a step boundary): their places and KV are free."""
        outcome = self.rec.outcome
        kept = deque()
        for entry in self.prefilling:
            if outcome[entry[0]] >= 0:
                self._release(entry[0])
            else:
                kept.append(entry)
        self.prefilling = kept
        decoding = []
        for entry in self.decoding:
            if outcome[entry[1]] >= 0:
                self._release(entry[1])
                if self.track_context:
                    self.context_base -= self._context_offset(entry)
            else:
                decoding.append(entry)
        heapq.heapify(decoding)
        self.decoding = decoding
        self.cancelled = 0

    def _context_offset(self, entry: tuple[int, int]) -> int:
        """A decoding sequence's context before the step after step t is this + t."""
        i = entry[1]
        return self.rec.prompt[i] + self.rec.output[i] - entry[0]

    # --- the engine ---------------------------------------------------------
    def _account(self, now: float) -> None:
        if self.load:
            elapsed = now - self._last
            self._busy_time += elapsed
            self._area += self.load * elapsed
            self._work += self._work_rate * elapsed
        self._last = now

    def _done_by(self, now: float) -> int:
        """Steps of the phase in flight completed by `now`."""
        elapsed = now - self.t0
        if self.slow is None and self.noise is None:
            s0, d = self.s0, self.growth
            if d == 0:
                return min(int(elapsed / s0), self.steps) if s0 > 0 else self.steps
            # The largest m with s0 m + d m (m - 1) / 2 <= elapsed: the quadratic's root, then rounding.
            b = s0 - d / 2
            m = min(int((math.sqrt(b * b + 2 * d * elapsed) - b) / d), self.steps)
            if m > 0 and s0 * m + d * (m * (m - 1) / 2) > elapsed:
                m -= 1
            return m
        if self.slow is None and self.growth == 0:
            return self.clock.done_noisy(elapsed, self.steps, self.s0)
        return self.clock.done_by(self.t0, elapsed, self.steps, self.s0, self.growth)

    def _cut_after_current_step(self, now: float) -> None:
        """End the decode-only phase at the end of the step in progress, so the new prompt joins the next one."""
        if self.simple:  # the lean path: identical steps of s0
            done = int((now - self.t0) / self.s0) if self.s0 > 0 else self.steps - 1
            end = (done + 1) * self.s0
        elif self.steps > 1:
            done, end = self.clock.cut(self.t0, now - self.t0, self.steps, self.s0, self.growth)
        else:
            return
        if done + 1 < self.steps:
            self.steps = done + 1
            self.generation += 1
            call_later(self.env, max(0.0, self.t0 + end - now), self._boundary, self.generation)

    def _wake(self, event) -> None:
        now = self.env._now
        if self.cancelled:  # a prompt cancelled the instant it joined
            self._account(now)
            self._purge()
            self.endpoint.refill(self)
        self._start_phase(now)

    def _start_phase(self, now: float) -> None:
        decoding = self.decoding
        n_decode = len(decoding)
        if self.prefilling:
            budget = self.budget_tokens - n_decode
            head_left = self.prefilling[0][1]
            if head_left > budget:
                # Steps in which the head prompt takes the whole budget and is still not done.
                steps = (head_left - 1) // budget
                if decoding:
                    steps = min(steps, decoding[0][0] - self.step)
                self.phase, self.steps, self.chunk = PREFILL, steps, budget
                prefill = budget
            else:
                prefill = 0
                for entry in self.prefilling:
                    prefill += entry[1]
                    if prefill >= budget:
                        prefill = budget
                        break
                self.phase, self.steps, self.chunk = MIXED, 1, prefill
        elif decoding:
            self.phase, self.steps, self.chunk = DECODE, decoding[0][0] - self.step, 0
            prefill = 0
        else:
            self.phase = IDLE
            self._work_rate = 0.0
            return
        s0 = self.base_s + self.decode_s * n_decode + self.prefill_s * prefill
        steps = self.steps
        if self.simple:
            self.s0 = s0
            self._work_rate = (self.prefill_s * prefill + self.decode_work_s * n_decode) / s0 if s0 > 0 else 0.0
            duration = steps * s0
        else:
            # Context terms, noise, slow time: the phase's steps grow by `growth` each; without slow time,
            # StepClock.start's arithmetic is done here (this runs for every phase: a call costs).
            growth = 0.0
            kv_s = self.kv_s
            if kv_s:  # every decoding sequence's context grows by a token a step
                s0 += kv_s * (self.context_base + n_decode * self.step)
                growth = kv_s * n_decode
            if prefill and self.attention_s:
                s0, growth = self._with_attention(s0, growth, prefill)
            if steps > MAX_STRETCH:
                steps = self.steps = MAX_STRETCH  # the noise block's reach; the boundary plans the rest
            self.s0 = s0
            self.growth = growth
            if self.track_peak:
                self._track_peak(n_decode, prefill, steps)
            grown = growth * (steps * (steps - 1) / 2) if growth else 0.0
            noise = self.noise
            if self.slow is not None:
                duration = self.clock.start(now, steps, s0, growth)
            elif noise is None:
                duration = s0 * steps + grown
            else:
                clock = self.clock
                at = clock.position - noise.first
                if at + steps >= len(noise.cum):
                    at = noise.window(clock.position, steps)
                clock.at = at
                cum = noise.cum
                g = cum[at + steps] - cum[at]
                duration = s0 * g + growth * (noise.wcum[at + steps] - noise.wcum[at] - at * g) if growth else s0 * g
            # Work in full-batch seconds: a step's nominal time less its base, plus the decoding
            # sequences' shares of a full batch's base.
            work = (s0 - self.base_s + self.base_share_s * n_decode) * steps + grown
            self._work_rate = work * self.work_scale / duration if duration > 0 else 0.0
        self.t0 = now
        self.generation += 1
        call_later(self.env, duration, self._boundary, self.generation)

    def _with_attention(self, s0: float, growth: float, prefill: int) -> tuple[float, float]:
        """The phase's first step and growth with prefill attention: a chunk of c tokens after p already in
        the cache attends to c x (p + (c + 1) / 2) pairs; a PREFILL phase's chunk moves along its prompt,
        c^2 more pairs each step."""
        head = self.prefilling[0]
        if self.phase == PREFILL or head[1] >= prefill:  # one chunk, of the head prompt
            s0 += self.attention_s * prefill * (self.rec.prompt[head[0]] - head[1] + (prefill + 1) / 2)
            if self.phase == PREFILL:
                growth += self.attention_s * prefill * prefill
            return s0, growth
        return s0 + self.attention_s * self._attention_pairs(prefill), growth

    def _attention_pairs(self, prefill: int) -> float:
        """Prefill attention pairs of a step whose `prefill` tokens span several prompts (FIFO).

        A chunk of c tokens after p already in the cache attends to c x (p + (c + 1) / 2) pairs.
        """
        prompt, pairs, room = self.rec.prompt, 0.0, prefill
        for i, left in self.prefilling:
            chunk = min(left, room)
            pairs += chunk * (prompt[i] - left + (chunk + 1) / 2)
            room -= chunk
            if room <= 0:
                break
        return pairs

    def _track_peak(self, n_decode: int, prefill: int, steps: int) -> None:
        """The most decoding sequences, prefill tokens and context tokens of any step (calibrated-range check)."""
        peak = self.peak
        peak[0] = max(peak[0], n_decode)
        peak[1] = max(peak[1], prefill)
        if n_decode:
            peak[2] = max(peak[2], self.context_base + n_decode * (self.step + steps - 1))

    def _boundary(self, event) -> None:
        if event.value != self.generation:
            return  # superseded by a cut
        now = self.env._now
        if self.load:  # _account(now), inlined: once per phase
            elapsed = now - self._last
            self._busy_time += elapsed
            self._area += self.load * elapsed
            self._work += self._work_rate * elapsed
        self._last = now
        phase, self.phase = self.phase, BOUNDARY
        step = self.step + self.steps
        self.step = step
        if self.noise is not None:
            self.clock.position += self.steps  # the noise of the steps done is spent
        if phase == PREFILL:
            self.prefilling[0][1] -= self.steps * self.chunk
        elif phase == MIXED:
            self._finish_prompts(now, step)
        decoding = self.decoding
        if self.track_context:
            rec = self.rec
            while decoding and decoding[0][0] <= step:
                finish, i = heapq.heappop(decoding)
                self.context_base -= rec.prompt[i] + rec.output[i] - finish
                self._complete(i, now)
        else:
            while decoding and decoding[0][0] <= step:
                self._complete(heapq.heappop(decoding)[1], now)
        if self.cancelled:
            self._purge()
        if self.endpoint.waiting:
            self.endpoint.refill(self)
        self._start_phase(now)

    def _finish_prompts(self, now: float, step: int) -> None:
        """Spend the step's prefill chunk FIFO; a finished prompt yields its first token now."""
        rec = self.rec
        left = self.chunk
        prefilling = self.prefilling
        while left > 0:
            entry = prefilling[0]
            if entry[1] > left:
                entry[1] -= left
                break
            left -= entry[1]
            prefilling.popleft()
            i = entry[0]
            if rec.outcome[i] >= 0:  # cancelled: it leaves now, with no token shown
                self.cancelled -= 1
                self._release(i)
                continue
            rec.first_token[i] = now
            remaining = rec.output[i] - 1
            if remaining > 0:
                heapq.heappush(self.decoding, (step + remaining, i))
                if self.track_context:
                    self.context_base += rec.prompt[i] + 1 - step
            else:
                self._complete(i, now)

    def _complete(self, i: int, now: float) -> None:
        rec = self.rec
        if rec.outcome[i] >= 0:  # cancelled in its last step: its caller has moved on
            self.cancelled -= 1
            self._release(i)
            return
        rec.end[i] = now
        rec.outcome[i] = COMPLETED
        self._release(i)
        if self.endpoint.on_done is not None:
            self.endpoint.on_done(i)

    def _release(self, i: int) -> None:
        """Request i leaves the batch: its place and its KV are free."""
        self.load -= 1
        if self.kv_capacity is not None:
            self.kv_used -= self.rec.prompt[i] + self.rec.output[i]
        if self.load == 0 and not self.serving:  # drained: only a draining replica completes while not serving
            self.retired = self.env._now


_engine = compiled("_engine")


if _engine is not None:
    class CompiledReplica(ReplicaLifecycle, _engine.Replica):
        """EngineReplica compiled (sim/_engine.c): the same replica, the same results to the bit, without slow
        episodes or stalls (those replicas stay EngineReplicas)."""

        def __init__(self, env: simpy.Environment, endpoint: Endpoint, index: int, max_batch: int, engine: Engine,
                     recorder: Recorder, noise_rng: Optional[np.random.Generator], full_batch: Optional[int] = None,
                     cold_start_s: float = 0.0) -> None:
            st = engine.step_time
            noise = NoiseSource(st.noise_cv, noise_rng) if st.noise_cv > 0 and noise_rng is not None else None
            kv = engine.kv_cache_tokens
            blocks = BlockCache(engine.prefix_cache) if engine.prefix_cache is not None else None
            super().__init__(env, endpoint, recorder, call_later, index, max_batch, engine.max_batch_tokens,
                             -1 if kv is None else kv, MAX_STRETCH, BLOCK, *Coefficients.of(st, max_batch, full_batch),
                             noise, tracks_peak(st), blocks, cold_start_s <= 0, COMPLETED)
            self.fits = self._fits_kv if kv is not None else None  # see Server.fits
            if not self.serving:
                call_later(env, cold_start_s, self._loaded)


def engine_replica(env: simpy.Environment, endpoint: Endpoint, index: int, max_batch: int, engine: Engine,
                   recorder: Recorder, noise_rng: Optional[np.random.Generator], full_batch: Optional[int],
                   cold_start_s: float, episode_rng: Optional[np.random.Generator]) -> ReplicaLifecycle:
    """A replica: compiled where it was built and the replica has no slow episodes or stalls, else EngineReplica."""
    st = engine.step_time
    if _engine is not None and st.slow_episodes is None and not st.stalls:
        return CompiledReplica(env, endpoint, index, max_batch, engine, recorder, noise_rng, full_batch, cold_start_s)
    return EngineReplica(env, endpoint, index, max_batch, engine, recorder, noise_rng, full_batch, cold_start_s,
                         episode_rng)
