"""Where requests come from: arrival processes, and the factory that opens each request's record.

`build_arrivals` turns a class's `arrival:` block into a running source; each
kind registers a builder in `BUILDERS`. A builder returns the class's done hook
(closed loops and sessions react to answers) or None (open loops do not).

Open-loop kinds other than poisson are a `TimesSource` fed by a sampler that
returns blocks of absolute arrival times (`*_times` below): one vectorised
numpy call per block, and the same sampler serves tests without SimPy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import simpy

from sim.config.arrivals import (
    ClosedLoopArrivals,
    DiurnalArrivals,
    GammaArrivals,
    MmppArrivals,
    PoissonArrivals,
    ScheduleArrivals,
    SessionArrivals,
    TraceArrivals,
)
from sim.config.schema import RequestClass
from sim.metrics.recorder import COMPLETED, Recorder
from sim.model.events import call_at, call_later
from sim.model.streams import BlockSampler, Streams, token_draw

Submit = Callable[[int], None]
DoneHook = Optional[Callable[[int], None]]


def _choice(weights: list[float]) -> Callable[[np.random.Generator, int], np.ndarray]:
    p = np.asarray(weights, dtype=float) / float(sum(weights))
    return lambda rng, n: rng.choice(p.size, size=n, p=p)


class RequestFactory:
    """Opens the record of a new request of one class: tokens, user, feature and endpoint drawn now.

    Each quantity has its own stream, so e.g. adding a feature mix never changes the tokens.
    """

    def __init__(self, recorder: Recorder, cls_index: int, name: str, cls: RequestClass, streams: Streams,
                 endpoint_index: dict[str, int], feature_index: dict[str, int], first_user: int) -> None:
        self.recorder = recorder
        self.cls = cls_index
        self.prompt = BlockSampler(token_draw(cls.prompt_tokens), streams.rng(f"class.{name}.prompt"))
        self.output = BlockSampler(token_draw(cls.output_tokens), streams.rng(f"class.{name}.output"))
        self.max_output = cls.max_output_tokens
        mix = cls.endpoint_mix()
        self.endpoints = [endpoint_index[e] for e in mix]
        self.endpoint = (BlockSampler(_choice(list(mix.values())), streams.rng(f"class.{name}.endpoints"))
                         if len(mix) > 1 else None)
        features = cls.features or {}
        self.features = [feature_index[f] for f in features]
        self.feature = (BlockSampler(_choice(list(features.values())), streams.rng(f"class.{name}.features"))
                        if len(features) > 1 else None)
        self.first_user = first_user
        users = cls.users
        self.user = None
        if users.count > 1:
            weights = (np.arange(1, users.count + 1, dtype=float) ** -users.zipf_s).tolist()
            self.user = BlockSampler(_choice(weights), streams.rng(f"class.{name}.users"))

    def __call__(self, now: float, prompt: Optional[int] = None, output: Optional[int] = None,
                 user: Optional[int] = None) -> int:
        """A new request arriving now; prompt, output and user may be given (traces, sessions)."""
        prompt = self.prompt() if prompt is None else prompt
        output = self.output() if output is None else output
        if self.max_output is not None and output > self.max_output:
            output = self.max_output
        if user is None:
            user = self.first_user + (self.user() if self.user is not None else 0)
        endpoint = self.endpoints[self.endpoint() if self.endpoint is not None else 0]
        feature = (self.features[self.feature() if self.feature is not None else 0]) if self.features else -1
        return self.recorder.new(self.cls, endpoint, now, prompt, output, user, feature)


@dataclass
class SourceContext:
    """What every arrival builder gets."""

    env: simpy.Environment
    name: str
    spec: RequestClass
    make: RequestFactory
    submit: Submit
    streams: Streams
    rate_scale: float
    until: float


class PoissonSource:
    """Open loop: exponential gaps at `rate_rps`, until `until`."""

    def __init__(self, env: simpy.Environment, make: RequestFactory, submit: Submit, gap: BlockSampler,
                 until: float) -> None:
        self.env = env
        self.make = make
        self.submit = submit
        self.gap = gap
        self.until = until

    def start(self) -> None:
        gap = self.gap()
        if gap < self.until:
            call_later(self.env, gap, self._arrive)

    def _arrive(self, event) -> None:
        now = self.env._now
        gap = self.gap()
        if now + gap < self.until:
            call_later(self.env, gap, self._arrive)
        self.submit(self.make(now))


class ClosedLoopUsers:
    """Closed loop: `users` users each think, ask, wait for the answer, and think again."""

    def __init__(self, env: simpy.Environment, make: RequestFactory, submit: Submit, think: BlockSampler,
                 users: int, until: float) -> None:
        self.env = env
        self.make = make
        self.submit = submit
        self.think = think
        self.users = users
        self.until = until

    def start(self) -> None:
        # Each user starts with one think time, so the first requests are spread out.
        for user in range(self.users):
            self._think(self.make.first_user + user)

    def done(self, i: int) -> None:
        """The answer to request i came back: its user thinks, then asks again."""
        self._think(self.make.recorder.user[i])

    def _think(self, user: int) -> None:
        think = self.think()
        if self.env._now + think < self.until:
            call_later(self.env, think, self._arrive, user)

    def _arrive(self, event) -> None:
        self.submit(self.make(self.env._now, user=event.value))


class TimesSource:
    """Open loop: requests at the absolute times `next_time()` hands out (increasing), until `until`."""

    def __init__(self, env: simpy.Environment, make: RequestFactory, submit: Submit, next_time: Callable[[], float],
                 until: float) -> None:
        self.env = env
        self.make = make
        self.submit = submit
        self.next_time = next_time
        self.until = until

    def start(self) -> None:
        self._schedule(self.next_time())

    def _schedule(self, t: float) -> None:
        if t < self.until:
            call_at(self.env, t, self._arrive)

    def _arrive(self, event) -> None:
        self._schedule(self.next_time())
        self.submit(self.make(self.env._now))


class PiecewiseTimes:
    """Arrival times of a Poisson process with a piecewise-constant rate, exactly.

    A unit-rate Poisson process mapped through the inverse of the integrated rate
    Lambda(t) is a Poisson process with that rate (time change), so each block is
    one cumulative sum of exponentials and one `searchsorted`: no thinning, no
    rejected draws. Beyond the last edge the times are inf (the source stops).
    """

    def __init__(self, edges: np.ndarray, rates: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=float)
        self.rates = np.asarray(rates, dtype=float)
        self.cum = np.concatenate([[0.0], np.cumsum(self.rates * np.diff(self.edges))])
        self.level = 0.0  # Lambda at the last time handed out

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        s = self.level + np.cumsum(rng.standard_exponential(n))
        self.level = float(s[-1])
        return self.invert(s)

    def invert(self, s: np.ndarray) -> np.ndarray:
        """Times t with Lambda(t) = s (inf where s is past the end)."""
        # side='right' lands on the last piece starting at or below s, which has a positive rate
        # whenever s is inside the horizon (zero-rate pieces add nothing to Lambda).
        k = np.minimum(np.searchsorted(self.cum, s, side="right") - 1, self.rates.size - 1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # a tiny rate: past the end
            t = self.edges[k] + (s - self.cum[k]) / self.rates[k]
        t[s >= self.cum[-1]] = np.inf
        return t


class ThinnedTimes:
    """Lewis-Shedler thinning: candidates from an envelope process, each kept with probability keep(t)."""

    def __init__(self, envelope: PiecewiseTimes, keep: Callable[[np.ndarray], np.ndarray],
                 uniforms: np.random.Generator) -> None:
        self.envelope = envelope
        self.keep = keep
        self.uniforms = uniforms

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        while True:
            candidates = self.envelope(rng, n)
            finite = candidates[np.isfinite(candidates)]
            kept = finite[self.uniforms.random(finite.size) < self.keep(finite)]
            if kept.size:
                return kept
            if finite.size < candidates.size:  # the envelope has ended
                return np.array([np.inf])


class MmppTimes:
    """Arrival times of a two-state Markov-modulated Poisson process, a block of sojourns at a time.

    Given a sojourn's length L and rate r, its arrivals are Poisson(r L) points
    placed uniformly: the exact conditional law, so no per-arrival events are needed.
    """

    def __init__(self, rng: np.random.Generator, rate_on: float, rate_off: float, mean_on: float,
                 mean_off: float) -> None:
        self.rates = (rate_on, rate_off)
        self.means = (mean_on, mean_off)
        self.on = bool(rng.random() < mean_on / (mean_on + mean_off))  # the stationary state
        self.t = 0.0
        per_cycle = rate_on * mean_on + rate_off * mean_off
        self.per_cycle = max(per_cycle, 1e-12)

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        while True:
            k = 2 * int(min(max(math.ceil(n / self.per_cycle), 1), n))  # sojourns: whole on/off pairs
            on = (np.arange(k) % 2 == 0) == self.on
            length = np.where(on, self.means[0], self.means[1]) * rng.standard_exponential(k)
            ends = self.t + np.cumsum(length)
            starts = ends - length
            counts = rng.poisson(np.where(on, self.rates[0], self.rates[1]) * length)
            self.t = float(ends[-1])
            total = int(counts.sum())
            if total:
                # Sojourns do not overlap, so one sort orders the points of all of them.
                return np.sort(np.repeat(starts, counts) + np.repeat(length, counts) * rng.random(total))


class GammaTimes:
    """Arrival times of a renewal process with gamma gaps, started in equilibrium."""

    def __init__(self, rate: float, cv: float) -> None:
        self.shape = 1.0 / (cv * cv)
        self.scale = 1.0 / (rate * self.shape)
        self.t: Optional[float] = None

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        gaps = rng.gamma(self.shape, self.scale, n)
        if self.t is None:
            # An observer arriving at a random time falls in a length-biased gap (gamma with shape + 1)
            # at a uniform point of it; starting there makes the rate hold from t = 0.
            gaps[0] = rng.random() * rng.gamma(self.shape + 1.0, self.scale)
            self.t = 0.0
        times = self.t + np.cumsum(gaps)
        self.t = float(times[-1])
        return times


class _Session:
    __slots__ = ("user", "turns_left")

    def __init__(self, user: int, turns_left: int) -> None:
        self.user = user
        self.turns_left = turns_left


class SessionSource:
    """Chat sessions: Poisson session starts; each turn waits for the previous answer and a think time.

    Turn k's prompt is a new message (the class's prompt_tokens draw) plus turn
    k-1's prompt and answer, capped at `max_context`. A turn that ends other than
    completed ends its session (the user gives up).
    """

    def __init__(self, env: simpy.Environment, make: RequestFactory, submit: Submit, gap: BlockSampler,
                 turns: BlockSampler, think: BlockSampler, max_context: Optional[int], users: int,
                 until: float) -> None:
        self.env = env
        self.make = make
        self.submit = submit
        self.gap = gap
        self.turns = turns
        self.think = think
        self.max_context = max_context
        self.users = users
        self.until = until
        self.sessions = 0
        self.session_of: dict[int, _Session] = {}  # request index -> its session, while in flight

    def start(self) -> None:
        self._next(0.0)

    def _next(self, now: float) -> None:
        gap = self.gap()
        if now + gap < self.until:
            call_later(self.env, gap, self._start_session)

    def _start_session(self, event) -> None:
        self._next(self.env._now)
        user = self.make.first_user + self.sessions % self.users
        self.sessions += 1
        self._send(_Session(user, int(self.turns())), 0)

    def _send(self, session: _Session, history: int) -> None:
        prompt = self.make.prompt() + history
        if self.max_context is not None and prompt > self.max_context:
            prompt = self.max_context
        session.turns_left -= 1
        i = self.make(self.env._now, prompt=prompt, user=session.user)
        self.session_of[i] = session  # before submit: a rejection calls done() at once
        self.submit(i)

    def done(self, i: int) -> None:
        """Request i ended: after a completed answer the session's next turn comes after a think time."""
        session = self.session_of.pop(i, None)
        rec = self.make.recorder
        if session is None or session.turns_left <= 0 or rec.outcome[i] != COMPLETED:
            return
        think = self.think()
        if self.env._now + think < self.until:
            call_later(self.env, think, self._turn, (session, rec.prompt[i] + rec.output[i]))

    def _turn(self, event) -> None:
        session, history = event.value
        self._send(session, history)


def _poisson(ctx: SourceContext) -> DoneHook:
    mean_gap = 1.0 / (ctx.spec.arrival.rate_rps * ctx.rate_scale)
    gap = BlockSampler(lambda r, n: mean_gap * r.standard_exponential(n), ctx.streams.rng(f"class.{ctx.name}.arrivals"))
    PoissonSource(ctx.env, ctx.make, ctx.submit, gap, ctx.until).start()
    return None


def _closed(ctx: SourceContext) -> DoneHook:
    arrival = ctx.spec.arrival
    think = BlockSampler(arrival.think_time_s.sample, ctx.streams.rng(f"class.{ctx.name}.arrivals"))
    users = ClosedLoopUsers(ctx.env, ctx.make, ctx.submit, think, arrival.users, ctx.until)
    users.start()
    return users.done


def _times(ctx: SourceContext, sampler: Callable[[np.random.Generator, int], np.ndarray],
           rng: np.random.Generator) -> DoneHook:
    TimesSource(ctx.env, ctx.make, ctx.submit, BlockSampler(sampler, rng), ctx.until).start()
    return None


def schedule_times(arrival: ScheduleArrivals, rate_scale: float, until: float) -> PiecewiseTimes:
    """Sampler of a schedule's arrival times on [0, until)."""
    edges, rates = arrival.pieces(until)
    return PiecewiseTimes(edges, rates * rate_scale)


def diurnal_times(arrival: DiurnalArrivals, rate_scale: float, until: float,
                  uniforms: np.random.Generator) -> ThinnedTimes:
    """Sampler of a diurnal process on [0, until): thinning of the peak rate (times the spikes)."""
    edges, rates = arrival.pieces(until)
    # rate / envelope = sinusoid / peak: the spike factor and rate_scale cancel.
    return ThinnedTimes(PiecewiseTimes(edges, rates * rate_scale),
                        lambda t: arrival.base_rate(t) / arrival.peak_rps, uniforms)


def mmpp_times(arrival: MmppArrivals, rate_scale: float, rng: np.random.Generator) -> MmppTimes:
    """Sampler of an MMPP's arrival times (draws its stationary start state from rng)."""
    return MmppTimes(rng, arrival.rate_on_rps * rate_scale, arrival.rate_off_rps * rate_scale,
                     arrival.mean_on_s, arrival.mean_off_s)


TIMED = (ScheduleArrivals, DiurnalArrivals, MmppArrivals, GammaArrivals)
"""Open-loop kinds whose arrival times come from a block sampler (a `TimesSource`)."""


def times_sampler(name: str, arrival, rate_scale: float, until: float,
                  streams: Streams) -> tuple[Callable[[np.random.Generator, int], np.ndarray], np.random.Generator]:
    """(sampler, its stream) of a TIMED class's arrival times: what its TimesSource draws blocks from (the
    fast path draws the same blocks)."""
    rng = streams.rng(f"class.{name}.arrivals")
    if isinstance(arrival, ScheduleArrivals):
        return schedule_times(arrival, rate_scale, until), rng
    if isinstance(arrival, DiurnalArrivals):
        return diurnal_times(arrival, rate_scale, until, streams.rng(f"class.{name}.thinning")), rng
    if isinstance(arrival, MmppArrivals):
        return mmpp_times(arrival, rate_scale, rng), rng
    return GammaTimes(arrival.rate_rps * rate_scale, arrival.cv), rng


def _timed(ctx: SourceContext) -> DoneHook:
    return _times(ctx, *times_sampler(ctx.name, ctx.spec.arrival, ctx.rate_scale, ctx.until, ctx.streams))


def _sessions(ctx: SourceContext) -> DoneHook:
    arrival: SessionArrivals = ctx.spec.arrival
    rng = ctx.streams.rng
    mean_gap = 1.0 / (arrival.session_rate_rps * ctx.rate_scale)
    source = SessionSource(
        ctx.env, ctx.make, ctx.submit,
        gap=BlockSampler(lambda r, n: mean_gap * r.standard_exponential(n), rng(f"class.{ctx.name}.arrivals")),
        turns=BlockSampler(token_draw(arrival.turns), rng(f"class.{ctx.name}.turns")),
        think=BlockSampler(arrival.think_time_s.sample, rng(f"class.{ctx.name}.think")),
        max_context=arrival.max_context_tokens, users=ctx.spec.users.count, until=ctx.until)
    source.start()
    return source.done


def _trace(ctx: SourceContext) -> DoneHook:
    from .traces import TraceSource  # traces.py builds on this module

    TraceSource(ctx.env, ctx.make, ctx.submit, ctx.spec.arrival.replay, ctx.rate_scale, ctx.until).start()
    return None


BUILDERS: dict[type, Callable[[SourceContext], DoneHook]] = {
    PoissonArrivals: _poisson,
    ClosedLoopArrivals: _closed,
    ScheduleArrivals: _timed,
    DiurnalArrivals: _timed,
    MmppArrivals: _timed,
    GammaArrivals: _timed,
    SessionArrivals: _sessions,
    TraceArrivals: _trace,
}


def build_arrivals(ctx: SourceContext) -> DoneHook:
    """Start the class's arrival process; returns its done hook (None for open loops)."""
    builder = BUILDERS.get(type(ctx.spec.arrival))
    if builder is None:  # pragma: no cover - every schema kind registers a builder
        raise TypeError(f"no arrival builder for kind {ctx.spec.arrival.kind!r}")
    return builder(ctx)


def user_count(spec: RequestClass) -> int:
    """How many user ids a class takes (a closed loop: one per user)."""
    arrival = spec.arrival
    return max(spec.users.count, arrival.users if isinstance(arrival, ClosedLoopArrivals) else 1)
