"""Servers with plain per-request service times: `service_time` endpoints and API slots.

Each server has `slots` places; a request holds one for its service time, drawn
at arrival and carried with it (so policies compared on one seed see the same
service times). The first token shows after a per-request offset (for
`service_time` endpoints, at the end: no streaming).
"""
from __future__ import annotations

from typing import Callable, Optional

import simpy

from sim.metrics.recorder import COMPLETED, Recorder
from sim.model.events import call_later
from sim.model.streams import BlockSampler

from .endpoint import Endpoint


class SlotServer:
    """`slots` identical parallel servers that each hold one request at a time."""

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, index: int, slots: int,
                 recorder: Recorder) -> None:
        self.env = env
        self.endpoint = endpoint
        self.index = index
        self.size = slots     # slots it has when up
        self.slots = slots    # slots it has now: 0 while scaled to zero or starting cold (see sleep, wake)
        self.capacity = slots
        self.rec = recorder
        self.load = 0
        self.created = env.now
        self.serving = True   # slots neither load nor drain
        self.retired = None
        self.provider_gate: Optional[Callable[[int], bool]] = None  # API rpm/tpm (ratelimit.ProviderGate)
        self.ends: Optional[dict[int, float]] = None  # request -> planned end, kept where calls may be cancelled
        self._last = 0.0
        self._busy_time = 0.0
        self._area = 0.0

    def _account(self, now: float) -> None:
        if self.load:
            elapsed = now - self._last
            self._busy_time += elapsed
            self._area += self.load * elapsed
        self._last = now

    fits = None  # any request can run in a slot

    def can_admit(self, i: int) -> bool:
        return self.load < self.slots

    def admit(self, i: int, delay: float = 0.0) -> None:
        """Take request i; after `delay` (a handshake, the slot held meanwhile) it is served."""
        if self.provider_gate is not None and not self.provider_gate(i):
            return  # the provider answered 429: the slot stays free, the client retries
        now = self.env._now
        self._account(now)
        self.load += 1
        rec = self.rec
        rec.admit[i] = now + delay
        rec.replica[i] = self.index
        service, ttft = self.endpoint.pending.pop(i)
        rec.first_token[i] = now + delay + ttft
        if self.ends is not None:
            self.ends[i] = now + delay + service
        call_later(self.env, delay + service, self._done, i)

    def cancel(self, i: int, now: float) -> int:
        """Stop running request i (its outcome is already set): its slot is free now; returns the tokens made.

        Tokens stream evenly from the first token to the planned end (the output rate was drawn so).
        """
        self._account(now)
        self.load -= 1
        end, first, output = self.ends.pop(i), self.rec.first_token[i], self.rec.output[i]
        made = 0 if now < first else output if end <= first else 1 + int((output - 1) * (now - first) / (end - first))
        if self.endpoint.waiting:
            self.endpoint.refill(self)
        return made

    def _done(self, event) -> None:
        i = event.value
        rec = self.rec
        if rec.outcome[i] >= 0:  # cancelled: its slot was freed then
            return
        if self.ends is not None:
            del self.ends[i]
        now = self.env._now
        self._account(now)
        self.load -= 1
        rec.end[i] = now
        rec.outcome[i] = COMPLETED
        endpoint = self.endpoint
        if endpoint.waiting:
            endpoint.refill(self)
        if endpoint.on_done is not None:
            endpoint.on_done(i)

    def counters(self, now: float) -> tuple[float, float, float, float]:
        self._account(now)
        return self._busy_time, self._area, self._area / self.size, now - self.created

    # --- scale to zero (serverless inference): no slot while asleep or starting ------------------
    def sleep(self) -> None:
        """Scaled to zero: no request starts until `wake` (nothing runs: the endpoint was empty)."""
        self.slots = self.capacity = 0
        self.serving = False

    def wake(self, cold_start_s: float) -> None:
        """Start again: the slots open after `cold_start_s`, and the requests waiting meanwhile start then."""
        call_later(self.env, cold_start_s, self._up)

    def _up(self, event) -> None:
        self.slots = self.capacity = self.size
        self.serving = True
        self.endpoint.refill(self)


def plain_draws(pending: dict, service: BlockSampler) -> Callable[[int], None]:
    """Draws a plain service time at arrival; the answer shows at the end (no streaming)."""

    def prepare(i: int) -> None:
        s = service()
        pending[i] = (s, s)

    return prepare
