"""A model endpoint: one FIFO queue in front of its servers (replicas or API slots)."""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional, Protocol

import simpy

from sim.metrics.recorder import REJECTED, Recorder


class Server(Protocol):
    """What the endpoint needs of a replica (see slots.SlotServer, engine.EngineReplica)."""

    index: int
    load: int

    def fits(self, i: int) -> bool:
        """Whether request i could ever run here (e.g. fits the KV cache when empty)."""

    def can_admit(self, i: int) -> bool:
        """Whether request i can start now."""

    def admit(self, i: int) -> None:
        """Start request i now."""

    def counters(self, now: float) -> tuple[float, float, float]:
        """Cumulative (busy time, running-requests area, utilisation area) up to now."""


class Endpoint:
    """FIFO queue plus dispatch: a request starts on the least-loaded server that can take it.

    A server that frees capacity pulls from the queue itself (`refill`), so the
    queue is served strictly first come, first served.
    """

    def __init__(self, env: simpy.Environment, name: str, index: int, recorder: Recorder,
                 prepare: Optional[Callable[[int], None]] = None) -> None:
        self.env = env
        self.name = name
        self.index = index
        self.recorder = recorder
        self.prepare = prepare  # draws per-request service quantities at arrival
        self.servers: list[Server] = []
        self.queue: deque[int] = deque()
        self.on_done: Optional[Callable[[int], None]] = None  # called when a request leaves
        self.pending: dict[int, tuple[float, float]] = {}  # per-request draws of slot servers

    def submit(self, i: int) -> None:
        """A request arrives at this endpoint."""
        if self.prepare is not None:
            self.prepare(i)
        if not self.servers[0].fits(i):
            self._reject(i)
            return
        if not self.queue:
            best = None
            for server in self.servers:
                if (best is None or server.load < best.load) and server.can_admit(i):
                    best = server
            if best is not None:
                best.admit(i)
                return
        self.queue.append(i)

    def refill(self, server: Server) -> None:
        """`server` freed capacity: start queued requests on it, head first."""
        queue = self.queue
        while queue and server.can_admit(queue[0]):
            server.admit(queue.popleft())

    def _reject(self, i: int) -> None:
        rec = self.recorder
        rec.outcome[i] = REJECTED
        rec.end[i] = self.env.now
        self.pending.pop(i, None)
        if self.on_done is not None:
            self.on_done(i)

    def counters(self, now: float) -> tuple[float, float, float]:
        """Cumulative counters summed over servers."""
        busy = area = util = 0.0
        for server in self.servers:
            b, a, u = server.counters(now)
            busy += b
            area += a
            util += u
        return busy, area, util
