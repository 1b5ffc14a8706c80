"""The one scheduling primitive the model uses: a callback at a later time.

SimPy processes (generators) cost a resume per event; components here are
callback-driven instead, which is several times cheaper and keeps each
component a plain object with its state in attributes.

`call_later`, `call_at`, `Call`, the dispatch loop of `run` and `Timeouts` are compiled
where the package was built with a C compiler (sim/_events.c, the same heap on SimPy's
own queue: the same results to the bit, an event at a third of the cost); the Python
versions below are their reference and their fallback (`LLMSIM_PURE_PYTHON=1` chooses them).
"""
from __future__ import annotations

import gc
import math
from collections import deque
from contextlib import contextmanager
from heapq import heappop, heappush
from typing import Any, Callable, Iterator, NamedTuple

import simpy
from simpy.core import NORMAL

from sim.model.kernels import compiled

Callback = Callable[["Call"], None]


class Call:
    """A scheduled callback: exactly what `simpy.Environment.step` reads of an event.

    `simpy.events.Event.__init__` does work we overwrite at once; this slotted
    stand-in halves the cost of scheduling, the hottest operation of a run.
    """

    __slots__ = ("callbacks", "value")  # a plain slot: read by every callback, a property would cost a frame
    _ok = True  # a Call never fails


def call_later(env: simpy.Environment, delay: float, callback: Callback, value: Any = None) -> Call:
    """Run `callback(call)` after `delay` seconds; `call.value` is `value`.

    SimPy breaks ties by (time, priority, insertion order), so callbacks due at
    the same instant run in the order they were scheduled: deterministic.
    """
    call = Call()
    call.callbacks = [callback]
    call.value = value
    # What Environment.schedule does, without its call: this is the hottest line of a run.
    heappush(env._queue, (env._now + delay, NORMAL, next(env._eid), call))
    return call


def call_at(env: simpy.Environment, t: float, callback: Callback, value: Any = None) -> Call:
    """Run `callback(call)` at time t (not before now): exactly t, which now + (t - now) may miss by an ulp."""
    call = Call()
    call.callbacks = [callback]
    call.value = value
    heappush(env._queue, (t, NORMAL, next(env._eid), call))
    return call


def run_calls(env: simpy.Environment, call_type: type = Call) -> None:
    """Dispatch until nothing is left scheduled, as `env.run()` does.

    A `Call` is dispatched here directly (its one callback, with the clock set to its time):
    `Environment.step` would do the same with more bookkeeping, at a third of the cost of a
    model event. Anything else scheduled (a SimPy event or process) goes through `step`.
    """
    queue, step = env._queue, env.step
    while queue:
        event = queue[0][3]
        if type(event) is call_type:
            env._now = heappop(queue)[0]
            event.callbacks[0](event)
        else:
            step()


def run(env: simpy.Environment) -> None:
    """Run until nothing is left scheduled, as `env.run()` does, with the garbage collector paused."""
    with gc_paused():
        run_calls(env)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused, then resumed (if it ran before).

    A run allocates millions of short-lived objects while its recorder's lists grow to
    hundreds of thousands of live ones; the collector's passes over those cost 5-15% of
    a run and find nothing (the model's objects form no cycles). What survives the run
    goes straight to the oldest generation (freeze, then unfreeze: no pass over it now);
    a later full collection still looks at whatever is still alive then.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


class Timeouts:
    """Many time limits that rarely fire, on one scheduled event.

    A callback per request for its time limit would cost an event even when the
    request ended long before, as most do. Here each limit is an entry in a queue
    of our own, in time order; the environment holds one wake-up, for the earliest
    limit whose owner is still running (`alive(value)`): entries of owners that
    ended are dropped as they reach the head. `fire(value)` runs exactly at the limit.
    Limits mostly come in time order (a constant delay from now): an append.
    """

    def __init__(self, env: simpy.Environment, alive: Callable[[Any], bool], fire: Callable[[Any], None]) -> None:
        self.env = env
        self.alive = alive
        self.fire = fire
        self._queue: deque[tuple[float, Any]] = deque()
        self._armed = math.inf  # when the wake-up in the environment's queue is due

    def add(self, delay: float, value: Any) -> None:
        """`fire(value)` after `delay` seconds, if `alive(value)` still holds then."""
        t = self.env._now + delay
        queue = self._queue
        if not queue or queue[-1][0] <= t:
            queue.append((t, value))
        else:  # earlier than the last one: its place, searched from the back (ties keep their order)
            k = len(queue) - 1
            while k > 0 and queue[k - 1][0] > t:
                k -= 1
            queue.insert(k, (t, value))
        if t < self._armed:
            self._arm(t)

    def __len__(self) -> int:
        """Limits held (those of owners that ended included, until they reach the head)."""
        return len(self._queue)

    def _arm(self, t: float) -> None:
        self._armed = t
        call_later(self.env, t - self.env._now, self._wake, t)

    def _wake(self, event) -> None:
        t = event.value
        if t != self._armed:  # superseded by an earlier wake-up, which re-armed
            return
        self._armed = math.inf
        queue, alive = self._queue, self.alive
        while queue and (queue[0][0] <= t or not alive(queue[0][1])):
            due, value = queue.popleft()
            if due <= t and alive(value):
                self.fire(value)
        if queue and queue[0][0] < self._armed:
            self._arm(queue[0][0])


class Core(NamedTuple):
    """The event core: its Call type, the two ways to schedule one, the dispatch loop and Timeouts."""

    Call: type
    call_later: Callable[..., Any]
    call_at: Callable[..., Any]
    run_calls: Callable[[simpy.Environment], None]
    Timeouts: type


PYTHON_CORE = Core(Call, call_later, call_at, run_calls, Timeouts)
_compiled = compiled("_events")
# The compiled core writes SimPy's normal priority as 1 (what SimPy has always had).
COMPILED_CORE = (Core(_compiled.Call, _compiled.call_later, _compiled.call_at, _compiled.run_calls,
                      _compiled.Timeouts) if _compiled is not None and NORMAL == 1 else None)
if COMPILED_CORE is not None:
    Call, call_later, call_at, run_calls, Timeouts = COMPILED_CORE  # type: ignore[misc]  # noqa: F811
