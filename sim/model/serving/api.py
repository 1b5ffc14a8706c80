"""An API endpoint: a black box with a concurrency limit, a TTFT and a streaming speed; its batch mode."""
from __future__ import annotations

from typing import Callable

import numpy as np
import simpy

from sim.config.base import MAX_COUNT
from sim.config.serving import BatchMode
from sim.metrics.recorder import Recorder
from sim.model.streams import BlockSampler

from .endpoint import Endpoint
from .slots import SlotServer, plain_draws

MIN_TOKENS_PER_S = 1e-3  # a draw of 0 tokens/s would never finish


def streaming_draws(recorder: Recorder, pending: dict, ttft: BlockSampler,
                    speed: BlockSampler) -> Callable[[int], None]:
    """Draws a request's TTFT and speed at arrival; it holds a slot until its last token."""

    def prepare(i: int) -> None:
        first = ttft()
        rest = (recorder.output[i] - 1) / max(speed(), MIN_TOKENS_PER_S)
        pending[i] = (first + rest, first)

    return prepare


class BatchLane:
    """The provider's batch API behind an endpoint: batch classes' requests go here, the rest as before.

    The lane is an endpoint of its own (FIFO, `max_in_flight` requests accepted at once), so batch
    work holds no interactive slot, passes none of the provider's interactive limits (`limits` gate the
    interactive slots only) and leaves the interactive endpoint's utilisation alone. A request is answered (all at once: no streaming) `turnaround_s`
    after it is accepted, cut at the completion window; draws come from `endpoint.<name>.batch`.
    """

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, spec: BatchMode, batch_classes: list[bool],
                 recorder: Recorder, rng: np.random.Generator) -> None:
        self.endpoint = endpoint
        self.lane = Endpoint(env, f"{endpoint.name}.batch", endpoint.index, recorder)
        window = spec.completion_window_s
        turnaround = spec.turnaround_s
        if turnaround is None:  # nothing known of the provider's backlog: anywhere in the window
            draw = lambda rng, n: rng.uniform(0.0, window, n)  # noqa: E731
        else:
            draw = lambda rng, n: np.clip(turnaround.sample(rng, n), 0.0, window)  # noqa: E731
        self.lane.prepare = plain_draws(self.lane.pending, BlockSampler(draw, rng))
        self.lane.servers = [SlotServer(env, self.lane, 0, spec.max_in_flight or MAX_COUNT, recorder)]
        self.batch_classes = batch_classes
        self.cls = recorder.cls
        self._interactive = endpoint.submit
        endpoint.submit = self.submit
        endpoint.batch_lane = self

    def submit(self, i: int) -> None:
        """Request i arrives at the endpoint: to the lane if its class is a batch class."""
        if self.batch_classes[self.cls[i]]:
            self.lane.submit(i)
        else:
            self._interactive(i)

    def connect(self) -> None:
        """Answers leave as the endpoint's do: call once its `on_done` is set (by the request lifecycle)."""
        self.lane.on_done = self.endpoint.on_done
