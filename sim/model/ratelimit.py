"""Rate limiting in front of the endpoints (being built: see issue 5)."""
from __future__ import annotations

from typing import Callable

import simpy

from sim.config.schema import Workload
from sim.metrics.recorder import Recorder

from .streams import Streams

Submit = Callable[[int], None]


def build_gate(env: simpy.Environment, workload: Workload, recorder: Recorder, streams: Streams,
               forward: Submit, done: Submit) -> Submit:
    """The submit function arrivals call: the workload's limiters in order, then `forward`."""
    if workload.rate_limits:
        raise NotImplementedError("rate_limits are not simulated yet")
    return forward
