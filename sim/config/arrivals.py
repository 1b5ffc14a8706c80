"""Arrival processes of a request class: `arrival: {kind: ...}`.

Open-loop kinds (poisson, schedule, diurnal, mmpp, gamma, sessions, trace) have a
`mean_rate_rps()`: their long-run mean request rate at rate_scale 1, which the
offered load uses. Time-varying kinds (schedule, diurnal) also take a horizon and
then give the exact mean over [0, horizon), spikes included.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from .base import MAX_COUNT, MAX_MULTIPLIER, MAX_RATE_RPS, MAX_TOKENS, Block
from .distributions import Distribution
from .traces import Trace, TraceError, read_trace


class PoissonArrivals(Block):
    """Open loop: requests arrive as a Poisson process, whatever the system does."""

    kind: Literal["poisson"]
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Mean arrival rate in requests per second (at most 1e9).")

    def mean_rate_rps(self) -> float:
        """Long-run mean arrival rate (every open-loop kind has one; offered load uses it)."""
        return self.rate_rps


class ClosedLoopArrivals(Block):
    """Closed loop: a fixed population, each user waits for its answer, thinks, asks again."""

    kind: Literal["closed"]
    users: int = Field(gt=0, le=MAX_COUNT, description="Number of users (at most 1,000,000: each is a process).")
    think_time_s: Distribution = Field(description="Time between an answer and the user's next request.")


# ----------------------------------------------------------- time-varying rates


class Spike(Block):
    """A stretch of time in which the rate is multiplied (a launch, an outage, a retry storm)."""

    start_s: float = Field(ge=0, description="Start of the spike (simulated seconds).")
    end_s: float = Field(gt=0, description="End of the spike (exclusive; must exceed start_s).")
    multiplier: float = Field(
        ge=0, le=MAX_MULTIPLIER, description="Factor on the rate inside [start_s, end_s): 3 = a 3x spike, 0 = silence.")

    @model_validator(mode="after")
    def _ordered(self) -> "Spike":
        if self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be greater than start_s ({self.start_s})")
        return self


def spike_pieces(spikes: list[Spike], until: float) -> tuple[np.ndarray, np.ndarray]:
    """(edges, multipliers) of the piecewise-constant spike factor on [0, until); overlapping spikes multiply."""
    cuts = {0.0, until}
    cuts.update(t for s in spikes for t in (s.start_s, s.end_s) if 0 < t < until)
    edges = np.array(sorted(cuts))
    mid = (edges[:-1] + edges[1:]) / 2
    factor = np.ones(mid.size)
    for s in spikes:
        factor[(mid >= s.start_s) & (mid < s.end_s)] *= s.multiplier
    return edges, factor


class _TimeVarying(Block):
    spikes: list[Spike] = Field(
        default_factory=list,
        description="Stretches where the rate is multiplied, e.g. [{start_s: 3600, end_s: 5400, multiplier: 3}]; "
        "absolute times, never repeated.",
    )

    def pieces(self, until: float) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - subclasses
        raise NotImplementedError


class ScheduleStep(Block):
    """One step of a schedule: `rate_rps` from the previous step's until_s (or 0) to this one's."""

    until_s: float = Field(gt=0, description="End of the step (seconds from the start; increasing).")
    rate_rps: float = Field(ge=0, le=MAX_RATE_RPS, description="Arrival rate during the step (0: no arrivals).")


class ScheduleArrivals(_TimeVarying):
    """Open loop: a Poisson process whose rate is piecewise constant (a day's profile, a ramp, a launch).

    Sampled exactly by inverting the integrated rate (no thinning, no rejected draws).
    """

    kind: Literal["schedule"]
    steps: list[ScheduleStep] = Field(min_length=1, description="Steps in time order: [{until_s, rate_rps}, ...].")
    repeat: bool = Field(False, description="Start over after the last step (a daily cycle); otherwise its rate holds.")

    @model_validator(mode="after")
    def _increasing(self) -> "ScheduleArrivals":
        ends = [s.until_s for s in self.steps]
        for k in range(1, len(ends)):
            if ends[k] <= ends[k - 1]:
                raise ValueError(f"steps.{k}.until_s: {ends[k]} must be greater than the previous step's ({ends[k - 1]})")
        if all(s.rate_rps == 0 for s in self.steps):
            raise ValueError("steps: every step has rate 0: nothing would ever arrive")
        return self

    def pieces(self, until: float) -> tuple[np.ndarray, np.ndarray]:
        """(edges, rates) of the rate on [0, until) at rate_scale 1, spikes applied."""
        span = self.steps[-1].until_s
        ends = np.array([s.until_s for s in self.steps])
        rates = np.array([s.rate_rps for s in self.steps])
        if self.repeat:
            cycles = max(1, math.ceil(until / span))
            ends = (ends[None, :] + span * np.arange(cycles)[:, None]).ravel()
            rates = np.tile(rates, cycles)
        step_edges = np.concatenate([[0.0], ends[ends < until], [until]])
        spike_edges, factor = spike_pieces(self.spikes, until)
        edges = np.union1d(step_edges, spike_edges)
        mid = (edges[:-1] + edges[1:]) / 2
        # The last step's rate holds after it (ends[-1] may lie before until).
        step = np.minimum(np.searchsorted(ends, mid, side="right"), rates.size - 1)
        return edges, rates[step] * factor[np.searchsorted(spike_edges, mid, side="right") - 1]

    def mean_rate_rps(self, horizon_s: Optional[float] = None) -> float:
        """Mean rate of the steps as written (weighted by length; spikes left out), or over [0, horizon_s).

        With repeat that is the long-run mean. Without, it is the schedule's own
        average, the load a run as long as the schedule sees; a longer run sees
        more of the last step's rate, which `horizon_s` accounts for.
        """
        horizon = self.steps[-1].until_s if horizon_s is None else horizon_s
        if horizon_s is None:
            edges = np.array([0.0] + [s.until_s for s in self.steps])
            return float(np.dot(np.diff(edges), [s.rate_rps for s in self.steps]) / horizon)
        edges, rates = self.pieces(horizon)
        return float(np.dot(np.diff(edges), rates) / horizon)


class DiurnalArrivals(_TimeVarying):
    """Open loop: a Poisson process whose rate follows a sinusoid between trough and peak (a day).

    rate(t) = trough + (peak - trough) * (1 + cos(2 pi (t - peak_at_s) / period_s)) / 2,
    times the spike factor. Sampled by thinning a Poisson process at the peak rate.
    """

    kind: Literal["diurnal"]
    trough_rps: float = Field(ge=0, le=MAX_RATE_RPS, description="Lowest rate (at peak_at_s + period_s / 2).")
    peak_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Highest rate (at peak_at_s).")
    period_s: float = Field(86400.0, gt=0, description="Length of one cycle (a day by default).")
    peak_at_s: float = Field(0.0, description="When the rate peaks (seconds from the start, modulo period_s).")

    @model_validator(mode="after")
    def _ordered(self) -> "DiurnalArrivals":
        if self.trough_rps > self.peak_rps:
            raise ValueError(f"trough_rps ({self.trough_rps}) must be at most peak_rps ({self.peak_rps})")
        return self

    def base_rate(self, t: np.ndarray) -> np.ndarray:
        """The sinusoid at times t (spikes not applied), rate_scale 1."""
        phase = 2 * np.pi * (np.asarray(t) - self.peak_at_s) / self.period_s
        return self.trough_rps + (self.peak_rps - self.trough_rps) * (1 + np.cos(phase)) / 2

    def base_integral(self, a: float, b: float) -> float:
        """Integral of the sinusoid over [a, b]."""
        amp = (self.peak_rps - self.trough_rps) / 2
        w = 2 * math.pi / self.period_s
        sin = math.sin(w * (b - self.peak_at_s)) - math.sin(w * (a - self.peak_at_s))
        return (self.trough_rps + amp) * (b - a) + amp * sin / w

    def pieces(self, until: float) -> tuple[np.ndarray, np.ndarray]:
        """(edges, rates) of the thinning envelope on [0, until): the peak rate times the spike factor."""
        edges, factor = spike_pieces(self.spikes, until)
        return edges, self.peak_rps * factor

    def mean_rate_rps(self, horizon_s: Optional[float] = None) -> float:
        """(peak + trough) / 2, the long-run mean (spikes left out), or the exact mean over [0, horizon_s)."""
        if horizon_s is None:
            return (self.peak_rps + self.trough_rps) / 2
        edges, factor = spike_pieces(self.spikes, horizon_s)
        total = sum(f * self.base_integral(a, b) for a, b, f in zip(edges[:-1], edges[1:], factor))
        return total / horizon_s


# ------------------------------------------------------------ bursty processes


class MmppArrivals(Block):
    """Open loop: a Markov-modulated Poisson process that switches between an on and an off rate.

    Sojourns in each state are exponential; the process starts in its stationary
    state distribution, so its mean rate holds from t = 0. rate_scale multiplies
    both rates (not the sojourns): the same bursts, more traffic in them.
    """

    kind: Literal["mmpp"]
    rate_on_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Arrival rate while on (in a burst).")
    rate_off_rps: float = Field(
        0.0, ge=0, le=MAX_RATE_RPS, description="Arrival rate while off (0: silence between bursts).")
    mean_on_s: float = Field(gt=0, description="Mean length of an on period.")
    mean_off_s: float = Field(gt=0, description="Mean length of an off period.")

    def mean_rate_rps(self) -> float:
        """(rate_on mean_on + rate_off mean_off) / (mean_on + mean_off)."""
        return ((self.rate_on_rps * self.mean_on_s + self.rate_off_rps * self.mean_off_s)
                / (self.mean_on_s + self.mean_off_s))


class GammaArrivals(Block):
    """Open loop: a renewal process with gamma gaps: cv > 1 bursty, cv = 1 Poisson, cv < 1 regular.

    The first gap is drawn from the stationary residual distribution, so the
    mean rate holds from t = 0 (no start-up bias).
    """

    kind: Literal["gamma"]
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Mean arrival rate (1 / mean gap).")
    cv: float = Field(gt=0, le=100, description="Coefficient of variation of the gaps (sd / mean), at most 100.")

    def mean_rate_rps(self) -> float:
        """rate_rps."""
        return self.rate_rps


# ------------------------------------------------------------------- sessions


class SessionArrivals(Block):
    """Multi-turn chat sessions: sessions start as a Poisson process; each turn waits for the last answer.

    Turn k's prompt is a new message (a draw of the class's prompt_tokens) plus
    the whole conversation so far: turn k-1's prompt and its answer. Sessions are
    open loop, their turns closed loop: a failed turn ends its session.
    """

    kind: Literal["sessions"]
    session_rate_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Rate at which new sessions start (Poisson).")
    turns: Distribution = Field(description="Turns per session (rounded, at least 1).")
    think_time_s: Distribution = Field(description="Time between an answer and the user's next turn.")
    max_context_tokens: Optional[int] = Field(
        None, gt=0, le=MAX_TOKENS, description="Prompts are cut to this many tokens (oldest history dropped); "
        "default: no cap."
    )
    _mean_turns: Optional[float] = PrivateAttr(None)

    def mean_turns(self) -> float:
        """Mean turns per session as drawn (rounded, at least 1), from a fixed seed."""
        if self._mean_turns is None:
            values = getattr(self.turns, "_data", None)  # empirical: exact over its values
            if values is None:
                values = self.turns.sample(np.random.default_rng(0), 100_000 if self.turns.kind != "constant" else 1)
            self._mean_turns = float(np.maximum(np.rint(values), 1).mean())
        return self._mean_turns

    def mean_rate_rps(self) -> float:
        """session_rate_rps x mean turns (the long-run request rate, every turn answered)."""
        return self.session_rate_rps * self.mean_turns()


# ---------------------------------------------------------------------- traces


class TraceColumns(Block):
    """Column names of a generic CSV trace."""

    time: str = Field("time", description="Arrival time column (numbers; see time_unit).")
    prompt_tokens: str = Field("prompt_tokens", description="Prompt tokens column.")
    output_tokens: str = Field("output_tokens", description="Output tokens column.")
    time_unit: Literal["s", "ms"] = Field("s", description="Unit of the time column.")
    id: Optional[str] = Field(
        None, description="Request id column (optional): passed through to requests.parquet as trace_id."
    )


class TraceArrivals(Block):
    """Replay a request trace: every arrival time and token count as recorded.

    Times are seconds since the trace's first row; [start_s, end_s) picks a
    window in that time, shifted to start at 0, then compressed `speed` times.
    rate_scale multiplies the speed (2 = the same requests in half the time).
    The class's prompt_tokens / output_tokens are not drawn (they still feed the
    offered-load estimate); max_output_tokens still caps the answers.
    """

    kind: Literal["trace"]
    format: Literal["azure", "mooncake", "csv"] = Field(
        description="azure: TIMESTAMP, ContextTokens, GeneratedTokens (Azure LLM inference CSV); "
        "mooncake: JSONL with timestamp (ms), input_length, output_length, hash_ids; csv: see columns."
    )
    path: str = Field(description="Trace file, relative to the workload file (or absolute).")
    speed: float = Field(1.0, gt=0, description="Replay this many times faster than recorded.")
    start_s: float = Field(0.0, ge=0, description="Start of the replayed window, in trace seconds.")
    end_s: Optional[float] = Field(None, gt=0, description="End of the window (exclusive), in trace seconds; default: the end.")
    columns: Optional[TraceColumns] = Field(None, description="Column names (format csv only).")
    _replay: Optional[Trace] = PrivateAttr(None)

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> "TraceArrivals":
        if self.columns is not None and self.format != "csv":
            raise ValueError(f"columns: only for format csv (the {self.format} format has fixed columns)")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s: {self.end_s} must be greater than start_s ({self.start_s})")
        base = Path((info.context or {}).get("base_dir", "."))
        columns = (self.columns or TraceColumns()).model_dump() if self.format == "csv" else None
        try:
            trace = read_trace(base / Path(self.path).expanduser(), self.format, columns)
        except TraceError as exc:
            field = "columns" if self.columns is not None and "no column" in str(exc) else "path"
            raise ValueError(f"{field}: {exc}") from None
        replay = trace.window(self.start_s, self.end_s, self.speed)
        if len(replay) == 0:
            raise ValueError(f"no request of the trace lies in [start_s, end_s) = [{self.start_s}, {self.end_s})")
        if self._span(replay) <= 0:
            raise ValueError("the replayed requests all arrive at one instant: give end_s to say how long the window is")
        self._replay = replay
        return self

    def _span(self, replay: Trace) -> float:
        """Replayed length (at rate_scale 1): the window's end if given, else the last arrival."""
        if self.end_s is not None:
            return (self.end_s - self.start_s) / self.speed
        return float(replay.times[-1])

    @property
    def replay(self) -> Trace:
        """The requests to replay: times from 0 at rate_scale 1, token counts, prefix blocks."""
        assert self._replay is not None, "validated specs always hold their trace"
        return self._replay

    def mean_rate_rps(self) -> float:
        """Requests replayed / replayed duration (at speed, rate_scale 1)."""
        return len(self.replay) / self._span(self.replay)

    def replayed_end_s(self, rate_scale: float = 1.0) -> float:
        """When the replay ends in simulated time: the window's end if given, else its last request."""
        return self._span(self.replay) / rate_scale

    def arrivals_after(self, until_s: float, rate_scale: float = 1.0) -> int:
        """Requests of the window that would arrive at or after `until_s` (duration_s): never replayed."""
        return len(self.replay) - self.replay.count_before(until_s, rate_scale)


Arrivals = Annotated[
    Union[PoissonArrivals, ClosedLoopArrivals, ScheduleArrivals, DiurnalArrivals, MmppArrivals, GammaArrivals,
          SessionArrivals, TraceArrivals],
    Field(discriminator="kind"),
]
