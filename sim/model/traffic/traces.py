"""Trace replay: every request of a recorded trace, at its time, with its token counts.

The trace itself is read and windowed when the workload validates
(`sim.config.traces`, re-exported here); this module turns it into arrivals.
Mooncake traces carry each prompt's 512-token prefix block ids; the replay keeps
them per request (`prefix_blocks`) for a prefix cache to look up. A trace with
request ids keeps each request's id (`Recorder.trace_id`, requests.parquet's trace_id).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import simpy

from sim.config.traces import FORMATS, Trace, TraceError, read_trace  # noqa: F401 - re-exported
from sim.metrics.recorder import Recorder
from sim.model.events import call_at

if TYPE_CHECKING:
    from .arrivals import RequestFactory, Submit

PREFIX_BLOCKS = "prefix_blocks"
"""Recorder attribute: per request index, its prefix block ids (a read-only int64 array) or None."""


def prefix_blocks(recorder: Recorder, i: int) -> Optional[np.ndarray]:
    """The 512-token prompt prefix block ids of request i (equal ids: a shared prefix), or None.

    Only replayed traces that carry block ids (Mooncake's hash_ids) have them.
    """
    table = getattr(recorder, PREFIX_BLOCKS, None)
    if table is None or i >= len(table):
        return None
    return table[i]


class TraceSource:
    """Replays a trace: arrivals at its times (divided by rate_scale) until `until`; tokens from the trace."""

    def __init__(self, env: simpy.Environment, make: "RequestFactory", submit: "Submit", replay: Trace,
                 rate_scale: float, until: float) -> None:
        self.env = env
        self.make = make
        self.submit = submit
        times = replay.replayed_times(until, rate_scale)  # arrivals in [0, until)
        n = len(times)
        # Python lists: indexing them per arrival is cheaper than numpy scalars.
        self.times: list[float] = times.tolist()
        self.prompt: list[int] = replay.prompt[:n].tolist()
        self.output: list[int] = replay.output[:n].tolist()
        self.replay = replay if replay.block_offsets is not None else None
        self.blocks: Optional[list] = None
        recorder = make.recorder
        if self.replay is not None:
            if getattr(recorder, PREFIX_BLOCKS, None) is None:
                setattr(recorder, PREFIX_BLOCKS, [])
            self.blocks = getattr(recorder, PREFIX_BLOCKS)
        # Ids only when the trace has them: other replays pay nothing per request.
        self.ids: Optional[list] = replay.request_ids[:n].tolist() if replay.request_ids is not None else None
        self.id_table: Optional[list] = None
        if self.ids is not None:
            if recorder.trace_id is None:
                recorder.trace_id = []
            self.id_table = recorder.trace_id

    def start(self) -> None:
        if self.times:
            call_at(self.env, self.times[0], self._arrive, 0)

    def _arrive(self, event) -> None:
        k = event.value
        if k + 1 < len(self.times):
            call_at(self.env, self.times[k + 1], self._arrive, k + 1)
        i = self.make(self.env._now, prompt=self.prompt[k], output=self.output[k])
        if self.blocks is not None:
            blocks = self.blocks
            if len(blocks) <= i:
                blocks.extend([None] * (i + 1 - len(blocks)))
            blocks[i] = self.replay.blocks(k)
        if self.id_table is not None:
            table = self.id_table
            if len(table) <= i:
                table.extend([None] * (i + 1 - len(table)))
            table[i] = self.ids[k]
        self.submit(i)
