"""The per-request recorder: flat columns, one slot per request, cheap to fill.

Components write by request index into columns of unboxed numbers (`Column`: 8 bytes a value where
a list of floats takes 32); the DataFrame is built once, at the end.
"""
from __future__ import annotations

import math
from array import array
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from sim.model.kernels import compiled

if TYPE_CHECKING:  # pandas costs 0.2 s to import: only what builds tables imports it
    import pandas as pd

NAN = math.nan

COMPLETED, REJECTED, RATE_LIMITED, QUEUE_FULL, EXPIRED, TIMED_OUT, CANCELLED, PARTIAL, TRY_LATER = range(9)
OUTCOMES = ("completed", "rejected", "rate_limited", "queue_full", "expired", "timed_out", "cancelled", "partial",
            "try_later")
# rejected: never fits (longer than the KV cache); rate_limited: a 429 and the client gave up;
# queue_full: no room to wait; expired: its deadline passed while it waited; with a pipeline's guardrails:
# timed_out: stopped at a time limit (a call, or the request with no fallback left); cancelled: the user
# stopped reading the stream (an answer, cut short by choice); partial: the time limit hit and the user got
# what had streamed so far, flagged as uncertain; try_later: the user was told to try again later.
ANSWERED = (COMPLETED, CANCELLED)
"""Outcomes whose latency counts: the user got the answer (or read as much of it as they wanted)."""


def time_per_output_token(first: np.ndarray, end: np.ndarray, output: np.ndarray,
                          outcome: np.ndarray) -> np.ndarray:
    """Per request: TPOT = (e2e - ttft) / (output tokens - 1), the mean gap between its streamed tokens.

    NaN where there is none: not answered, one output token (no gap), or nothing streamed (the whole
    answer at once: a plain `service_time` endpoint, a pipeline without streaming), so that TPOT
    statistics describe streams and never average in zeros.
    """
    output = np.asarray(output, dtype=float)
    streamed = np.isin(outcome, ANSWERED) & (output > 1) & (end > first)
    tpot = np.full(output.shape, np.nan)
    tpot[streamed] = (end[streamed] - first[streamed]) / (output[streamed] - 1.0)
    return tpot


class Column(array):
    """A growing column of 64-bit floats ('d') or integers ('q'), unboxed: what a list of numbers does for the
    model (append, index, assign, len, iterate), in a quarter of the memory, and numpy reads it without a
    copy. Equal to a list of the same numbers, as the list it replaces was."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        if isinstance(other, list):
            return self.tolist() == other
        return super().__eq__(other)

    def __ne__(self, other):
        return not self == other

    @classmethod
    def of(cls, values: np.ndarray, typecode: str) -> "Column":
        """A column holding an array's values (copied once, at memory speed)."""
        column = cls(typecode)
        values = np.ascontiguousarray(values, dtype=np.float64 if typecode == "d" else np.int64)
        column.frombytes(memoryview(values).cast("B"))
        return column


class FlatLog(list):
    """A per-request log of numbers, rows one after another (`Recorder.rows` reads them back as a table).

    A list while the model writes it (an append is the cheapest write Python has), whose contents move
    to an array of unboxed floats every SPILL values (`spill`, called by the monitor between events): a
    number in a list costs 8 bytes and, unless it is a small integer, a 24-byte object; in the array 8
    bytes. So a long run's logs cost 8 bytes a value at little more than a list's speed. Only the rows
    not yet spilled are in the list: the model never reads a log back during the run.
    """

    __slots__ = ("spilled",)
    SPILL = 1 << 15

    def __init__(self) -> None:
        super().__init__()
        self.spilled: list[np.ndarray] = []

    def spill(self) -> None:
        """Move the values written so far into an array (when there are enough to be worth one)."""
        if len(self) >= self.SPILL:
            self.spilled.append(np.asarray(self, dtype=float))
            del self[:]

    def values(self, dtype=float) -> np.ndarray:
        """Every value written, in order."""
        if not self.spilled:
            return np.asarray(self, dtype=dtype)
        return np.concatenate(self.spilled + [np.asarray(self, dtype=float)]).astype(dtype, copy=False)


PYTHON_FLAT_LOG = FlatLog
_records = compiled("_records")
if _records is not None:
    class FlatLog(_records.FlatLog):  # type: ignore[no-redef]  # noqa: F811
        """A per-request log of numbers, rows one after another (`Recorder.rows` reads them back as a table),
        each value stored as a float64 as it is written (sim/_records.c): 8 bytes a value, nothing to spill.
        The same values as the list-based twin above (PYTHON_FLAT_LOG, which LLMSIM_PURE_PYTHON=1 runs)."""

        __slots__ = ()

        def spill(self) -> None:
            """Nothing to move: the values are unboxed already."""

        def values(self, dtype=float) -> np.ndarray:
            """Every value written, in order (a copy)."""
            return np.frombuffer(self.tobytes(), dtype=float).astype(dtype)

        def __reduce__(self):
            return _flat_log, (self.tobytes(),)


def _flat_log(data: bytes) -> FlatLog:
    """A flat log holding these float64 bytes (what a pickled compiled FlatLog is rebuilt from)."""
    log = FlatLog()
    log += np.frombuffer(data, dtype=float).tolist()
    return log


class CachedTokens:
    """Per call (or request): prompt tokens read from a prompt or prefix cache, and written to it ((0, 0)
    where none was looked up: the same for everything that reads it). Two unboxed columns grown as calls
    are looked up, 16 bytes a call where a dict of tuples took 120."""

    __slots__ = ("read", "written")

    def __init__(self) -> None:
        self.read, self.written = ints(), ints()

    def __setitem__(self, c: int, value: tuple[int, int]) -> None:
        if c >= len(self.read):  # grown by doubling: a growth per call would cost two calls a call
            more = bytes(8 * max(c + 1 - len(self.read), len(self.read), 1024))
            self.read.frombytes(more)
            self.written.frombytes(more)
        self.read[c], self.written[c] = value

    def __getitem__(self, c: int) -> tuple[int, int]:
        return (self.read[c], self.written[c]) if c < len(self.read) else (0, 0)

    def columns(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(read, written) of calls 0..n-1, as float arrays."""
        read, written = np.zeros(n), np.zeros(n)
        k = min(n, len(self.read))
        read[:k], written[:k] = np.asarray(self.read)[:k], np.asarray(self.written)[:k]
        return read, written


FLAT_LOGS = ("cache_code", "cache_leak", "budget", "quality", "quality_inputs", "stage_log", "retrieval_usage",
             "flow_log")
"""The Recorder's FlatLogs (None where the workload has no such stage)."""


def floats() -> Column:
    return Column("d")


def ints() -> Column:
    return Column("q")


class Attempts(dict):
    """Attempts per request, stored only for requests that were retried: every other made one.

    Sparse because retries are rare and the recorder's per-request cost is the run's cost.
    """

    def __missing__(self, i: int) -> int:
        return 1

    def column(self, n: int) -> np.ndarray:
        """The attempts of requests 0..n-1 as an array."""
        out = np.ones(n, dtype=np.int64)
        for i, attempts in self.items():
            out[i] = attempts
        return out


class Recorder:
    """Columns of one replication's requests; a request is its row index."""

    def __init__(self, class_names: list[str], endpoint_names: list[str], feature_names: Sequence[str] = (),
                 class_priority: Sequence[int] = ()) -> None:
        self.class_names = class_names
        self.endpoint_names = endpoint_names
        self.feature_names = list(feature_names)
        self.class_priority = list(class_priority) or [0] * len(class_names)
        # Columns the model reads back on its hot path stay lists (a list hands out the object it holds; a
        # Column makes a new one per read: token counts as Columns cost a pipeline 3% of its instructions);
        # small integers cost a list no more than a Column (8 bytes: they are shared objects). The rest are
        # Columns (the fast path makes every column one: it reads nothing back).
        self.cls: list[int] = []
        self.endpoint: list[int] = []
        self.arrival = floats()
        self.admit = floats()
        self.first_token = floats()
        self.end = floats()
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.replica = ints()
        self.outcome: list[int] = []
        self.user = ints()
        self.feature: list[int] = []
        self.attempts = Attempts()       # 1 + retries after a 429
        self.prefix_blocks: Optional[list] = None  # per request: prompt prefix block ids (Mooncake replays)
        self.trace_id: Optional[list] = None       # per request: its row id in a replayed trace (traces with ids)
        # Things a run found that the user should know (e.g. a replica driven beyond its calibrated
        # range); one line each, shown by `llmsim run` as warnings. Append each once per replication.
        self.warnings: list[str] = []
        self.events = 0  # events the run scheduled (the fast path: the engine phases it planned, else 0)
        # With a pipeline: the model calls (a Recorder of their own), and per-request stage records.
        self.calls: Optional["Recorder"] = None
        self.parent: Optional[list] = None       # on a calls recorder: each call's request
        # Per-request logs are flat lists of numbers, a row after another (see `rows`): a tuple per
        # request would be one more object for the garbage collector to follow, a million a run.
        self.cache_code: Optional[list] = None   # rows (request, cache code), one per output-cache lookup
        self.cache_leak: Optional[list] = None   # requests an output-cache hit served another user's personal answer
        self.budget: Optional[list] = None       # rows (request, truncated, drawn sizes..., sizes...)
        self.budget_sections: tuple = ()        # the budget's section names, in row order
        self.quality: Optional[list] = None      # rows (request, good answer, model calls), routed requests
        self.quality_inputs: Optional[list] = None  # rows of what each answer's quality depends on (quality.py)
        self.quality_spec = None                 # ... the pipeline they are scored with, and its random stream
        self.quality_rng = None
        self.stage_log: Optional[list] = None    # rows (request, gate, cache, evaluation, post, retrieval, retry) s
        self.validation_retries: Optional[dict] = None  # request -> structured-output retries (those retried)
        self.retrieval_stats: Optional[dict] = None     # the retrieval stage's counters over the whole run
        self.retrieval_usage: Optional[list] = None     # with priced retrieval: Retrieval.usage rows (the ledger's)
        self.cached_tokens: Optional[CachedTokens] = None  # on calls with prompt caches: call -> (read, written)
        self.generated: dict[int, int] = {}             # stopped before the end (cancelled, timed out): tokens made
        self.flow_log: Optional[list] = None            # with flows: rows of flow.FLOW_FIELDS, a step each
        self.flow_steps = None                          # ... the steps' names, tools and stages (flow.FlowSteps)
        self.flow_calls: Optional[list] = None          # ... the calls that are flow steps (not answers)
        self.flow_tools: list = []                      # ... the tools' names (flow_steps.tool indexes them)
        self.flow_stats: Optional[dict] = None          # ... the tools' counters over the whole run
        self.guard_log: Optional[list] = None           # (request, retries, call timeouts, fallback, limit) s
        # Sampled by the monitor: each endpoint's cumulative (busy, area, work, held) counters,
        # and its (replicas serving, replicas held, requests waiting) gauges.
        self.samples: list[tuple[float, dict[str, tuple[float, float, float, float]]]] = []
        self.gauges: list[tuple[float, dict[str, tuple[int, int, int]]]] = []

    @classmethod
    def for_workload(cls, workload) -> "Recorder":
        """An empty recorder for a workload's classes, endpoints and features."""
        classes = workload.traffic.classes
        return cls(list(classes), list(workload.models), workload.feature_names(),
                   [c.priority for c in classes.values()])

    def new(self, cls: int, endpoint: int, now: float, prompt: int, output: int, user: int = -1,
            feature: int = -1) -> int:
        """Open a record for a request arriving now; returns its index."""
        self.cls.append(cls)
        self.endpoint.append(endpoint)
        self.arrival.append(now)
        self.admit.append(NAN)
        self.first_token.append(NAN)
        self.end.append(NAN)
        self.prompt.append(prompt)
        self.output.append(output)
        self.replica.append(-1)
        self.outcome.append(-1)
        self.user.append(user)
        self.feature.append(feature)
        return len(self.arrival) - 1

    @staticmethod
    def rows(log: list, width: int, dtype=float) -> np.ndarray:
        """A flat per-request log as an array of rows."""
        values = log.values(dtype) if isinstance(log, (FlatLog, PYTHON_FLAT_LOG)) else np.asarray(log, dtype=dtype)
        return values.reshape(-1, width)

    def spill_logs(self) -> None:
        """Move the flat logs' values into arrays (see FlatLog): between events, now and then."""
        for name in FLAT_LOGS:
            log = getattr(self, name)
            if log is not None:
                log.spill()

    def frame(self) -> pd.DataFrame:
        """All requests as a DataFrame (times in seconds)."""
        import pandas as pd

        arrival = np.asarray(self.arrival, dtype=float)
        admit = np.asarray(self.admit, dtype=float)
        first = np.asarray(self.first_token, dtype=float)
        end = np.asarray(self.end, dtype=float)
        outcome = np.asarray(self.outcome, dtype=np.int64)
        cls = np.asarray(self.cls, dtype=np.int64)
        output = np.asarray(self.output, dtype=np.int64)
        frame = pd.DataFrame(
            {
                "request": np.arange(arrival.size),
                "class": pd.Categorical.from_codes(cls, self.class_names),
                "priority": np.asarray(self.class_priority, dtype=np.int64)[cls] if cls.size else cls,
                "user": np.asarray(self.user, dtype=np.int64),
                "feature": pd.Categorical.from_codes(np.asarray(self.feature, dtype=np.int64), self.feature_names),
                "endpoint": pd.Categorical.from_codes(np.asarray(self.endpoint, dtype=np.int64), self.endpoint_names),
                "replica": np.asarray(self.replica, dtype=np.int64),
                "arrival_s": arrival,
                "admit_s": admit,
                "first_token_s": first,
                "end_s": end,
                "queue_wait_s": admit - arrival,
                "ttft_s": first - arrival,
                "e2e_s": end - arrival,
                "tpot_s": time_per_output_token(first, end, output, outcome),
                "prompt_tokens": np.asarray(self.prompt, dtype=np.int64),
                "output_tokens": output,
                "attempts": self.attempts.column(arrival.size),
                "outcome": pd.Categorical.from_codes(outcome, OUTCOMES),
            }
        )
        if self.trace_id is not None:  # requests not replayed from a trace with ids have none
            ids = self.trace_id + [None] * (arrival.size - len(self.trace_id))
            frame["trace_id"] = pd.array(ids, dtype="string")
        return frame
