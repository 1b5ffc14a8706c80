"""Where requests come from: open-loop Poisson sources and closed-loop user populations."""
from __future__ import annotations

from typing import Callable

import simpy

from sim.metrics.recorder import Recorder

from .events import call_later
from .streams import BlockSampler

Submit = Callable[[int], None]


class RequestFactory:
    """Opens the record of a new request of one class, with its tokens drawn now."""

    def __init__(self, recorder: Recorder, cls: int, endpoint: int, prompt: BlockSampler,
                 output: BlockSampler) -> None:
        self.recorder = recorder
        self.cls = cls
        self.endpoint = endpoint
        self.prompt = prompt
        self.output = output

    def __call__(self, now: float) -> int:
        return self.recorder.new(self.cls, self.endpoint, now, self.prompt(), self.output())


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
        for _ in range(self.users):
            self.done(-1)

    def done(self, i: int) -> None:
        """The answer to request i came back (or the user is new): think, then ask again."""
        think = self.think()
        if self.env.now + think < self.until:
            call_later(self.env, think, self._arrive)

    def _arrive(self, event) -> None:
        self.submit(self.make(self.env.now))
