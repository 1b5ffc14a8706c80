"""Where requests come from: arrival processes, and the factory that opens each request's record.

`build_arrivals` turns a class's `arrival:` block into a running source; each
kind registers a builder in `BUILDERS`. A builder returns the class's done hook
(closed loops react to answers) or None (open loops do not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import simpy

from sim.config.arrivals import ClosedLoopArrivals, PoissonArrivals
from sim.config.schema import RequestClass
from sim.metrics.recorder import Recorder

from .events import call_later
from .streams import BlockSampler, Streams, token_draw

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
        self._next(0.0)

    def _next(self, now: float) -> None:
        gap = self.gap()
        if now + gap < self.until:
            call_later(self.env, gap, self._arrive)

    def _arrive(self, event) -> None:
        now = self.env.now
        self._next(now)
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
        if self.env.now + think < self.until:
            call_later(self.env, think, self._arrive, user)

    def _arrive(self, event) -> None:
        self.submit(self.make(self.env.now, user=event.value))


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


BUILDERS: dict[type, Callable[[SourceContext], DoneHook]] = {
    PoissonArrivals: _poisson,
    ClosedLoopArrivals: _closed,
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
