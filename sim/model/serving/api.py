"""An API endpoint: a black box with a concurrency limit, a TTFT and a streaming speed."""
from __future__ import annotations

from typing import Callable

from sim.metrics.recorder import Recorder
from sim.model.streams import BlockSampler

MIN_TOKENS_PER_S = 1e-3  # a draw of 0 tokens/s would never finish


def streaming_draws(recorder: Recorder, pending: dict, ttft: BlockSampler,
                    speed: BlockSampler) -> Callable[[int], None]:
    """Draws a request's TTFT and speed at arrival; it holds a slot until its last token."""

    def prepare(i: int) -> None:
        first = ttft()
        rest = (recorder.output[i] - 1) / max(speed(), MIN_TOKENS_PER_S)
        pending[i] = (first + rest, first)

    return prepare

