"""A model endpoint: one queue in front of its servers (replicas or API slots).

The queue is FIFO, or by priority (lowest number first, FIFO within; never
preemptive). It may have a capacity (arrivals finding it full are turned away),
class deadlines (a request still waiting then is dropped), and a hold-back rule
that keeps low-priority work from filling a busy endpoint.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from operator import attrgetter
from typing import Callable, Optional, Protocol

import simpy

from sim.config.schema import Connections, Queue
from sim.metrics.recorder import EXPIRED, QUEUE_FULL, REJECTED, Recorder
from sim.model.events import call_later

LOAD = attrgetter("load")  # a server's requests running


class Server(Protocol):
    """What the endpoint needs of a replica (see slots.SlotServer, engine.EngineReplica)."""

    index: int
    load: int       # requests running
    capacity: int   # requests it can run at once
    serving: bool   # taking requests (not loading, not draining)
    retired: Optional[float]  # when it stopped being paid for

    # fits(i): whether request i could ever run here (fits the KV cache when empty); None: all fit.
    fits: Optional[Callable[[int], bool]]

    def can_admit(self, i: int) -> bool:
        """Whether request i can start now."""

    def admit(self, i: int, delay: float = 0.0) -> None:
        """Take request i now; it starts after `delay` (a connection handshake), its place held meanwhile."""

    def counters(self, now: float) -> tuple[float, float, float, float]:
        """Cumulative (busy time, running-requests area, work, time held) up to now."""


class Endpoint:
    """Queue plus dispatch: a request starts on the least-loaded server that can take it.

    A server that frees capacity pulls from the queue itself (`refill`), so the
    queue order is kept exactly.
    """

    def __init__(self, env: simpy.Environment, name: str, index: int, recorder: Recorder,
                 queue: Optional[Queue] = None, deadlines: Optional[list[Optional[float]]] = None,
                 connections: Optional[Connections] = None, warm: bool = False) -> None:
        self.env = env
        self.name = name
        self.index = index
        self.recorder = recorder
        self.prepare: Optional[Callable[[int], None]] = None  # draws per-request service quantities at arrival
        self.servers: list[Server] = []
        self.retired: list[Server] = []  # scaled-down replicas: out of dispatch, still in the counters
        self.on_done: Optional[Callable[[int], None]] = None  # called when a request leaves
        self.pending: dict[int, tuple[float, float]] = {}  # per-request draws of slot servers
        # Wrappers of submit (and on_done), set at build time: its autoscaler.ScaleToZero if it scales to
        # zero, its api.BatchLane if batch classes use its batch mode.
        self.idle = None
        self.batch_lane = None
        queue = queue or Queue()
        self.by_priority = queue.discipline == "priority"
        self.capacity = queue.capacity
        self.hold_back = queue.hold_back
        self.deadlines = deadlines if deadlines and any(d is not None for d in deadlines) else None
        self.fifo: deque[int] = deque()
        self.heap: list[tuple[int, int, int]] = []  # (priority, order, request)
        self._order = 0
        self.waiting = 0  # requests in the queue (dropped ones excluded)
        self.connections = connections
        # (endpoint, above): where a request goes instead while `above` requests wait here (queue.overflow).
        self.spill: Optional[tuple["Endpoint", int]] = None
        # preference(server, i): a score for sending i to server (higher first, then the least loaded).
        self.preference: Optional[Callable[[Server, int], int]] = None
        # The common case (FIFO, no deadlines, hold-back or pool) takes a lean path per request.
        self.plain = not self.by_priority and self.deadlines is None and queue.hold_back is None and connections is None
        self.open = connections.pool_size if connections is not None and warm else 0  # connections opened

    # --- arrivals -------------------------------------------------------------
    def destination(self) -> "Endpoint":
        """The endpoint a request sent here now goes to: this one, or its overflow's when it would wait behind
        `above` others or more (with `above` 0: when every server is full).

        Asked before the request is recorded at an endpoint (and before its prompt cache is looked up), so that
        what the request is billed and served by is where it goes."""
        spill = self.spill
        if spill is None or self.waiting < spill[1]:
            return self
        if not self.waiting and any(s.serving and s.load < s.capacity for s in self.servers):
            return self  # (above 0) a server has room: it would not wait
        return spill[0]

    def submit(self, i: int) -> None:
        """A request arrives at this endpoint."""
        if self.prepare is not None:
            self.prepare(i)
        fits = self.servers[0].fits
        if fits is not None and not fits(i):
            self._finish(i, REJECTED)
            return
        if self.plain:
            if not self.waiting:
                best = None
                for server in self.servers:
                    if (best is None or server.load < best.load) and server.can_admit(i):
                        best = server
                if best is not None:
                    best.admit(i)
                    return
        elif self._first_in_line(i) and self._start_now(i):
            return
        if self.capacity is not None and self.waiting >= self.capacity:
            self._finish(i, QUEUE_FULL)
            return
        self._enqueue(i)

    def _first_in_line(self, i: int) -> bool:
        """Whether i would be at the head of the queue: nothing waits, or (by priority) all that wait rank lower.

        Held-back background work may wait while slots are free; an interactive arrival
        must not queue behind it.
        """
        if not self.waiting:
            return True
        if not self.by_priority:
            return False
        head = self._head()
        return self.recorder.class_priority[self.recorder.cls[i]] < self.heap[0][0] if head is not None else True

    def prefer(self, preference: Callable[[Server, int], int]) -> None:
        """Dispatch by `preference(server, i)` (highest first), then least loaded."""
        self.preference = preference
        self.plain = False

    def _start_now(self, i: int) -> bool:
        if self._held_back(i) or self._pool_exhausted():
            return False
        if self.preference is not None:
            best = self._preferred(i)
        else:
            best = None
            for server in self.servers:
                if (best is None or server.load < best.load) and server.can_admit(i):
                    best = server
        if best is None:
            return False
        self._dispatch(best, i)
        return True

    def _preferred(self, i: int) -> Optional[Server]:
        """The server that can take i now with the highest preference, then the least loaded, then the first."""
        ranked = [(-self.preference(s, i), s.load, k) for k, s in enumerate(self.servers) if s.can_admit(i)]
        return self.servers[min(ranked)[2]] if ranked else None

    # --- connections -------------------------------------------------------------
    def _pool_exhausted(self) -> bool:
        """Every connection the pool may have is carrying a request: nothing more can be sent."""
        if self.connections is None:
            return False
        return self.in_service() >= self.connections.pool_size

    def in_service(self) -> int:
        """Requests running on the servers (each holds a connection while it runs)."""
        return sum(map(LOAD, self.servers))  # asked twice a request with a connection pool: no generator frame

    def _dispatch(self, server: Server, i: int) -> None:
        """Send i to `server`, over a new connection first when every open one is busy."""
        handshake = 0.0
        if self.connections is not None and self.in_service() >= self.open:
            handshake = self.connections.handshake_s
            self.open += 1  # counted at once, so concurrent requests open their own
        server.admit(i, handshake)

    def _enqueue(self, i: int) -> None:
        self.waiting += 1
        if self.by_priority:
            self._order += 1
            heapq.heappush(self.heap, (self.recorder.class_priority[self.recorder.cls[i]], self._order, i))
        else:
            self.fifo.append(i)
        if self.deadlines is not None:
            deadline = self.deadlines[self.recorder.cls[i]]
            if deadline is not None:
                wait = self.recorder.arrival[i] + deadline - self.env._now
                call_later(self.env, max(0.0, wait), self._expire, i)

    # --- the queue --------------------------------------------------------------
    def _head(self) -> Optional[int]:
        """The next request to serve; requests dropped while waiting are discarded on the way."""
        outcome = self.recorder.outcome
        if self.by_priority:
            while self.heap and outcome[self.heap[0][2]] >= 0:
                heapq.heappop(self.heap)
            return self.heap[0][2] if self.heap else None
        while self.fifo and outcome[self.fifo[0]] >= 0:
            self.fifo.popleft()
        return self.fifo[0] if self.fifo else None

    def _pop(self) -> int:
        self.waiting -= 1
        return heapq.heappop(self.heap)[2] if self.by_priority else self.fifo.popleft()

    def refill(self, server: Server) -> None:
        """`server` freed capacity: start queued requests on it, head first."""
        if self.plain:
            fifo = self.fifo
            while fifo and server.can_admit(fifo[0]):
                self.waiting -= 1
                server.admit(fifo.popleft())
            return
        while self.waiting:
            head = self._head()
            if self._held_back(head) or self._pool_exhausted() or not server.can_admit(head):
                return
            self._dispatch(server, self._pop())

    def refill_all(self) -> None:
        """Capacity appeared without a completion (a replica came up): let every server pull."""
        for server in self.servers:
            if self.waiting:
                self.refill(server)

    def _held_back(self, i: int) -> bool:
        rule = self.hold_back
        if rule is None or self.recorder.class_priority[self.recorder.cls[i]] < rule.priority:
            return False
        load = capacity = 0
        for server in self.servers:
            load += server.load
            capacity += server.capacity if server.serving else 0  # loading or draining slots are not there to use
        return load >= rule.max_load_share * capacity

    def _expire(self, event) -> None:
        i = event.value
        rec = self.recorder
        if rec.outcome[i] < 0 and rec.admit[i] != rec.admit[i]:  # still waiting (admit is NaN)
            self.waiting -= 1
            self._finish(i, EXPIRED)

    # --- cancellation -------------------------------------------------------------
    def allow_cancel(self) -> None:
        """Calls here may be cancelled: slot servers keep each running call's planned end (to count its tokens)."""
        for server in self.servers:
            if hasattr(server, "ends"):
                server.ends = {}

    def cancel(self, i: int, outcome: int) -> None:
        """End request i now with `outcome`, wherever it is: a waiting request leaves the queue, a running one
        its server (which frees its place). `on_done` is not called: the caller ends the request itself.

        The tokens it made go to `recorder.generated` (what is billed of a call stopped half-way).
        """
        rec = self.recorder
        if rec.outcome[i] >= 0:
            return
        now = self.env._now
        rec.outcome[i] = outcome
        rec.end[i] = now
        self.pending.pop(i, None)
        r = rec.replica[i]
        if r < 0:
            if rec.admit[i] != rec.admit[i]:  # waiting in the queue (else waiting to retry a provider's 429)
                self.waiting -= 1
                if not self.by_priority:
                    self.fifo.remove(i)   # a priority heap drops it lazily (see _head)
            rec.generated[i] = 0
            return
        server = next(s for s in self.servers + self.retired if s.index == r)
        rec.generated[i] = server.cancel(i, now)
        if rec.first_token[i] > now:  # an API's first token was due later: it never showed
            rec.first_token[i] = math.nan

    # --- endings ----------------------------------------------------------------
    def _finish(self, i: int, outcome: int) -> None:
        rec = self.recorder
        rec.outcome[i] = outcome
        rec.end[i] = self.env._now
        self.pending.pop(i, None)
        if self.on_done is not None:
            self.on_done(i)

    def gauges(self) -> tuple[int, int, int]:
        """(replicas serving, replicas held: serving, loading or draining, requests waiting) now."""
        serving = held = 0
        for server in self.servers:
            if server.retired is None:
                held += 1
                serving += server.serving
        return serving, held, self.waiting

    def counters(self, now: float) -> tuple[float, float, float, float]:
        """Cumulative counters summed over servers (retired replicas included)."""
        totals = [0.0, 0.0, 0.0, 0.0]
        for server in self.servers + self.retired:
            for k, value in enumerate(server.counters(now)):
                totals[k] += value
        return totals[0], totals[1], totals[2], totals[3]
