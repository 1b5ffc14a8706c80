"""Wall-clock time of an engine's stretches of steps: per-step noise and slow episodes.

The engine plans a *stretch*: `n` steps whose batch does not change, with nominal
durations that grow linearly, s0 + d x k for the k-th (d > 0 when decode reads a
context that grows by one token per sequence per step). It asks this clock how long
the stretch takes, and, when something interrupts it, how many of its steps were
done by a given time and when the step in progress ends.

Noise is exact and per step. Step k of the replica's life takes its nominal time
times g_k, independent gamma draws of mean 1 and coefficient of variation `noise_cv`.
The draws come in blocks with their running sums, sum(g) and sum(j x g_j), so the
sum of any stretch is two differences: O(1), however many steps it jumps over,
and the very same numbers a step-by-step loop over the same stream would add up.

Slow episodes and stalls are a time change: slow episodes are a two-state Markov
process in wall time (normal, then slow for an exponential time, ...) in which the
engine's progress runs `multiplier` times slower; during a stall it makes none. A
stretch's noisy nominal time maps to wall time through that schedule, and back.
"""
from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from typing import Optional, Sequence

import numpy as np

from sim.config.serving import SlowEpisodes, Stall, StepTime

BLOCK = 8192
MAX_STRETCH = BLOCK // 2
"""Most steps one stretch may jump over (a longer one is split, at the cost of an event): the noise block's reach."""


class StepNoise:
    """Independent gamma factors g_0, g_1, ... (mean 1), with running sums for O(1) stretch totals."""

    def __init__(self, cv: float, rng: np.random.Generator, weighted: bool = True) -> None:
        self.shape = 1.0 / (cv * cv)
        self.rng = rng
        self.weighted = weighted  # keep wcum (only steps that grow within a stretch need it)
        self.first = 0            # absolute index of g[0] in the replica's stream of steps
        self.g = np.empty(0)
        self.cum = array("d", [0.0])    # cum[j] = g[0] + ... + g[j-1]
        self.wcum = array("d", [0.0])   # wcum[j] = sum over i < j of i x g[i] (i within the block)

    def window(self, start: int, n: int) -> int:
        """Make steps start..start+n-1 (absolute) available; returns start's index within the block."""
        at = start - self.first
        if at + n > self.g.size:
            fresh = self.rng.gamma(self.shape, 1.0 / self.shape, BLOCK - (self.g.size - at))
            self.g = np.concatenate([self.g[at:], fresh])
            self.first, at = start, 0
            cum = np.zeros(self.g.size + 1)
            np.cumsum(self.g, out=cum[1:])
            # array('d'): a copy of the bytes (tolist() would build a float object per step), and
            # indexing it gives plain floats as fast as a list does.
            self.cum = array("d", cum.tobytes())
            if self.weighted:
                wcum = np.zeros(self.g.size + 1)
                np.cumsum(np.arange(self.g.size) * self.g, out=wcum[1:])
                self.wcum = array("d", wcum.tobytes())
        return at


class NoiseSource:
    """A replica's per-step gamma factors from any step on, for the compiled engines: the very values StepNoise
    draws from the same stream (a draw of n values then m is the draw of n + m), handed out a few blocks at a time."""

    def __init__(self, cv: float, rng: np.random.Generator) -> None:
        self.shape = 1.0 / (cv * cv)
        self.rng = rng
        self.first = 0            # the stream's index of g[0]
        self.g = np.empty(0)

    def __call__(self, start: int) -> np.ndarray:
        kept = self.g[start - self.first:]
        fresh = self.rng.gamma(self.shape, 1.0 / self.shape, 4 * BLOCK - kept.size)
        self.g, self.first = np.concatenate([kept, fresh]), start
        return self.g


class SlowTime:
    """How fast one replica progresses in wall time: slow episodes (random) and stalls (fixed), merged.

    Progress runs at rate 1, 1 / multiplier while slow, and 0 during a stall. The schedule is a
    list of segments of constant rate, drawn as far ahead as it is asked about.
    """

    def __init__(self, episodes: Optional[SlowEpisodes], rng: Optional[np.random.Generator],
                 stalls: Sequence[Stall] = ()) -> None:
        self.slowdown = episodes.multiplier if episodes is not None else 1.0
        self.means = (episodes.mean_interval_s, episodes.mean_duration_s) if episodes is not None else None
        self.rng = rng
        self.slow = False
        self.switch = math.inf  # the next episode change
        if self.means is not None:
            slow_share = self.means[1] / (self.means[0] + self.means[1])
            self.slow = bool(rng.random() < slow_share)  # stationary start: a run begins in steady state
            self.switch = rng.exponential(self.means[self.slow])
        self.stalls = _merged(stalls)  # disjoint [start, end) windows, in order
        self.stall = 0                 # the first stall window not yet over
        self.starts = [0.0]            # segment k runs from starts[k] at rates[k]
        self.rates = [self._rate(0.0)]

    def _rate(self, t: float) -> float:
        stalls, k = self.stalls, self.stall
        if k < len(stalls) and stalls[k][0] <= t:
            return 0.0
        return 1.0 / self.slowdown if self.slow else 1.0

    def _grow(self) -> None:
        """Append the segment after the last one: it starts at the next episode change or stall edge."""
        t = self.starts[-1]
        stalls, k = self.stalls, self.stall
        edge = math.inf
        if k < len(stalls):
            edge = stalls[k][1] if stalls[k][0] <= t else stalls[k][0]
        nxt = min(edge, self.switch)
        if nxt == math.inf:  # nothing changes any more: the last segment runs for ever
            self.starts.append(nxt)
            self.rates.append(self.rates[-1])
            return
        if nxt == self.switch:
            self.slow = not self.slow
            self.switch = nxt + self.rng.exponential(self.means[self.slow])
        if nxt == edge and stalls[k][1] == nxt:
            self.stall += 1
        self.starts.append(nxt)
        self.rates.append(self._rate(nxt))

    def _segment(self, t: float) -> int:
        while self.starts[-1] <= t:
            self._grow()
        return bisect_right(self.starts, t) - 1

    def forget_before(self, t: float) -> None:
        """Drop segments that ended before t (the engine never looks back past a stretch's start)."""
        k = self._segment(t)
        if k > 64:
            del self.starts[:k], self.rates[:k]

    def wall(self, t0: float, work: float) -> float:
        """Wall time from t0 until `work` seconds of normal-speed progress are done."""
        k, t = self._segment(t0), t0
        while True:
            if k + 1 >= len(self.starts):
                self._grow()
            rate = self.rates[k]
            room = (self.starts[k + 1] - t) * rate
            if work <= room and rate > 0:
                return t + work / rate - t0
            work -= room
            k, t = k + 1, self.starts[k + 1]

    def work(self, t0: float, elapsed: float) -> float:
        """Normal-speed progress made in the wall interval [t0, t0 + elapsed)."""
        k, t, end, done = self._segment(t0), t0, t0 + elapsed, 0.0
        while True:
            if k + 1 >= len(self.starts):
                self._grow()
            stop = min(self.starts[k + 1], end)
            done += (stop - t) * self.rates[k]
            if stop >= end:
                return done
            k, t = k + 1, stop


def _merged(stalls: Sequence[Stall]) -> list[tuple[float, float]]:
    """Stall windows as disjoint [start, end) intervals in time order (overlapping ones merged)."""
    out: list[list[float]] = []
    for stall in sorted(stalls, key=lambda s: s.at_s):
        start, end = stall.at_s, stall.at_s + stall.duration_s
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


class StepClock:
    """Durations of one replica's stretches of steps, with its noise and slow episodes.

    A stretch is n steps, the k-th of nominal time s0 + d x k, from `position` (the steps
    of the replica's life before it, which index the noise). The engine keeps n, s0 and d
    and passes them in; it calls `start` when a stretch begins, and adds the steps that
    happened (all, or fewer when it was cut) to `position` before the next one.
    """

    def __init__(self, st: StepTime, noise_rng: Optional[np.random.Generator],
                 episode_rng: Optional[np.random.Generator]) -> None:
        grows = st.per_kv_token_s > 0 or st.per_prefill_attention_s > 0
        self.noise = StepNoise(st.noise_cv, noise_rng, grows) if st.noise_cv > 0 and noise_rng is not None else None
        self.episodes = (SlowTime(st.slow_episodes, episode_rng, st.stalls)
                         if (st.slow_episodes is not None and episode_rng is not None) or st.stalls else None)
        self.position = 0
        self.at = 0         # the stretch's first step within the noise block

    def start(self, t0: float, n: int, s0: float, d: float) -> float:
        """Begin a stretch at t0; returns its wall duration."""
        noise = self.noise
        if noise is not None:
            at = self.position - noise.first
            self.at = at if at + n < len(noise.cum) else noise.window(self.position, n)
        work = self.work(n, s0, d)
        if self.episodes is None:
            return work
        self.episodes.forget_before(t0)
        return self.episodes.wall(t0, work)

    def work(self, m: int, s0: float, d: float) -> float:
        """Noisy nominal time of the stretch's first m steps (before any slow episode or stall)."""
        noise = self.noise
        if noise is None:
            return s0 * m if d == 0 else s0 * m + d * (m * (m - 1) / 2)
        a, b = self.at, self.at + m
        g = noise.cum[b] - noise.cum[a]
        if d == 0:
            return s0 * g
        # sum over k < m of (s0 + d k) g[a + k], with k = i - a
        return s0 * g + d * (noise.wcum[b] - noise.wcum[a] - a * g)

    def end_of(self, t0: float, m: int, s0: float, d: float) -> float:
        """Wall time from the stretch's start to the end of its m-th step."""
        work = self.work(m, s0, d)
        return self.episodes.wall(t0, work) if self.episodes is not None else work

    def done_by(self, t0: float, elapsed: float, n: int, s0: float, d: float) -> int:
        """Steps of the stretch completed `elapsed` seconds after its start t0 (at most n)."""
        work = self.episodes.work(t0, elapsed) if self.episodes is not None else elapsed
        if s0 <= 0:
            return n
        noise = self.noise
        if noise is None:
            m = min(int(work / s0), n)
        else:  # ignoring the growth gives an upper bound: the steps are at least s0 x g long
            a, cum = self.at, noise.cum
            m = min(bisect_right(cum, cum[a] + work / s0, a, a + n + 1) - 1 - a, n)
            if d == 0 and self.episodes is None:
                return m  # exact already (up to rounding, which the boundary's max(0, ...) absorbs)
        # m is an upper bound (steps only grow); the growth term may take it a step or two back. (Rounding
        # may leave it one short when `elapsed` falls exactly on a step's end: the cut then lands there.)
        while m > 0 and self.work(m, s0, d) > work:
            m -= 1
        return m

    def cut(self, t0: float, elapsed: float, n: int, s0: float, d: float) -> tuple[int, float]:
        """(steps done by `elapsed`, time from t0 to the end of the step then in progress), in one call.

        What a cut needs (`done_by`, then `end_of` one step further), with the common case (noise,
        no slow time) worked out inline: a cut comes with most arrivals.
        """
        noise = self.noise
        if self.episodes is not None or s0 <= 0:
            m = min(self.done_by(t0, elapsed, n, s0, d), n - 1)
            return m, self.end_of(t0, m + 1, s0, d)
        if noise is None:  # the largest m with s0 m + d m (m - 1) / 2 <= elapsed: the quadratic's root
            if d == 0:
                m = min(int(elapsed / s0), n - 1)
                return m, (m + 1) * s0
            b = s0 - d / 2
            m = min(int((math.sqrt(b * b + 2 * d * elapsed) - b) / d), n - 1)
            if m > 0 and s0 * m + d * (m * (m - 1) / 2) > elapsed:
                m -= 1
            return m, s0 * (m + 1) + d * ((m + 1) * m / 2)
        a, cum = self.at, noise.cum
        m = min(bisect_right(cum, cum[a] + elapsed / s0, a, a + n + 1) - 1 - a, n - 1)
        if d == 0:
            return m, s0 * (cum[a + m + 1] - cum[a])
        wcum = noise.wcum
        while m > 0 and s0 * (cum[a + m] - cum[a]) + d * (wcum[a + m] - wcum[a] - a * (cum[a + m] - cum[a])) > elapsed:
            m -= 1
        g = cum[a + m + 1] - cum[a]
        return m, s0 * g + d * (wcum[a + m + 1] - wcum[a] - a * g)

    def done_noisy(self, elapsed: float, n: int, s0: float) -> int:
        """`done_by` for n steps of nominal s0 each, noise on, no slow episodes (the engine plans those itself)."""
        a = self.at
        cum = self.noise.cum
        return min(bisect_right(cum, cum[a] + elapsed / s0, a, a + n + 1) - 1 - a, n) if s0 > 0 else n
