"""The one scheduling primitive the model uses: a callback at a later time.

SimPy processes (generators) cost a resume per event; components here are
callback-driven instead, which is several times cheaper and keeps each
component a plain object with its state in attributes.
"""
from __future__ import annotations

from typing import Any, Callable

from heapq import heappush

import simpy
from simpy.core import NORMAL

Callback = Callable[["Call"], None]


class Call:
    """A scheduled callback: exactly what `simpy.Environment.step` reads of an event.

    `simpy.events.Event.__init__` does work we overwrite at once; this slotted
    stand-in halves the cost of scheduling, the hottest operation of a run.
    """

    __slots__ = ("callbacks", "_ok", "_value")

    @property
    def value(self) -> Any:
        return self._value


def call_later(env: simpy.Environment, delay: float, callback: Callback, value: Any = None) -> Call:
    """Run `callback(call)` after `delay` seconds; `call.value` is `value`.

    SimPy breaks ties by (time, priority, insertion order), so callbacks due at
    the same instant run in the order they were scheduled: deterministic.
    """
    call = Call()
    call.callbacks = [callback]
    call._ok = True
    call._value = value
    # What Environment.schedule does, without its call: this is the hottest line of a run.
    heappush(env._queue, (env._now + delay, NORMAL, next(env._eid), call))
    return call
