"""Time series of a run: what happened in each interval (default 10 s), from the records and the monitor.

Counts come from the per-request records; time-averages (queue length, requests
in the system) integrate each request's interval exactly; utilisation and
replicas come from the monitor's samples at the interval edges.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from .recorder import ANSWERED, Recorder

if TYPE_CHECKING:  # pandas costs 0.2 s to import: only what builds tables imports it
    import pandas as pd


def area_before(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """For each edge t: the integral over [0, t] of the number of intervals [start, end) covering time.

    = sum over starts < t of (t - start) - sum over ends < t of (t - end), with sorted
    cumulative sums: O((n + k) log n) for n intervals and k edges.
    """
    def part(points: np.ndarray) -> np.ndarray:
        points = np.sort(points)
        cumulative = np.concatenate([[0.0], np.cumsum(points)])
        count = np.searchsorted(points, edges, side="left")
        return count * edges - cumulative[count]

    return part(starts) - part(ends)


def timeseries(rec: Recorder, interval: float, duration: float, hosted: Optional[set[str]] = None) -> pd.DataFrame:
    """One row per interval of [0, duration): arrivals, completions, rejections, queue, latency, replicas.

    `hosted` names the API endpoints: they have no replicas to count (the provider's are not ours).
    """
    import pandas as pd

    edges = np.arange(0.0, duration, interval)
    edges = np.append(edges, duration) if edges[-1] < duration else edges
    edges = np.append(edges, [edges[-1] + interval]) if len(edges) == 1 else edges
    width = np.diff(edges)
    arrival = np.asarray(rec.arrival, dtype=float)
    admit = np.asarray(rec.admit, dtype=float)
    end = np.asarray(rec.end, dtype=float)
    first = np.asarray(rec.first_token, dtype=float)
    outcome = np.asarray(rec.outcome)
    done = np.isin(outcome, ANSWERED)
    left_queue = np.where(np.isnan(admit), end, admit)  # dropped or turned away: it left the queue at its end
    out = pd.DataFrame({"start_s": edges[:-1], "end_s": edges[1:]})
    out["arrivals"] = np.histogram(arrival, edges)[0]
    out["completions"] = np.histogram(end[done], edges)[0]
    out["rejections"] = np.histogram(end[~done], edges)[0]
    # Clipped at 0: differences of large sums leave rounding noise around an empty queue.
    out["queue_length_mean"] = np.maximum(np.diff(area_before(arrival, left_queue, edges)) / width, 0.0)
    out["in_system_mean"] = np.maximum(np.diff(area_before(arrival, end, edges)) / width, 0.0)
    bucket = np.searchsorted(edges, arrival, side="right") - 1
    for name, values in (("ttft", first - arrival), ("e2e", end - arrival)):
        out[f"{name}_p95_s"] = _p95_by_bucket(values[done], bucket[done], len(out))
    if rec.cache_code is not None:  # output-cache hit rate of the lookups made in each interval
        out["cache_hit_rate_output"] = _cache_hit_rate(rec, arrival, edges)
    out = out.join(_endpoint_series(rec, edges, hosted or set()))
    return out


def _cache_hit_rate(rec: Recorder, arrival: np.ndarray, edges: np.ndarray) -> np.ndarray:
    from sim.model.application.caches import BYPASS, HIT, STALE_HIT

    log = Recorder.rows(rec.cache_code, 2, np.int64)
    looked = log[log[:, 1] != BYPASS]
    when = arrival[looked[:, 0]]
    lookups = np.histogram(when, edges)[0]
    hits = np.histogram(when[np.isin(looked[:, 1], (HIT, STALE_HIT))], edges)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lookups > 0, hits / np.maximum(lookups, 1), np.nan)


def _p95_by_bucket(values: np.ndarray, bucket: np.ndarray, n: int) -> np.ndarray:
    """95th percentile of the requests that arrived in each interval (NaN where none did, or one is NaN).

    np.percentile's linear method on every bucket at once, with its arithmetic step for step (virtual
    index (m - 1) x 0.95, its floor, numpy's two-sided interpolation), so the result is the same to the
    bit as a call per bucket, which cost 13% of a short run.
    """
    result = np.full(n, np.nan)
    keep = (bucket >= 0) & (bucket < n)
    values, bucket = values[keep], bucket[keep]
    if values.size == 0:
        return result
    order = np.lexsort((values, bucket))  # by bucket, then by value (NaN last)
    v = values[order]
    counts = np.bincount(bucket, minlength=n)
    starts = np.cumsum(counts) - counts
    has = counts > 0
    m, first = counts[has], starts[has]
    virtual = (m - 1) * np.true_divide(95, 100)
    below = np.floor(virtual)
    top = virtual >= m - 1  # numpy takes the last value for both neighbours there
    gamma = virtual - np.where(top, -1.0, below)
    lo = first + np.where(top, m - 1, below).astype(np.intp)
    hi = first + np.where(top, m - 1, below + 1).astype(np.intp)
    a, b = v[lo], v[hi]
    diff = b - a
    out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    out[np.isnan(v[first + m - 1])] = np.nan
    result[has] = out
    return result


def _endpoint_series(rec: Recorder, edges: np.ndarray, hosted: set[str]) -> pd.DataFrame:
    """Per endpoint: utilisation over each interval and replicas held at its start."""
    import pandas as pd

    times = np.asarray([t for t, _ in rec.samples])
    columns = {}
    for name in rec.endpoint_names:
        counters = np.asarray([c[name] for _, c in rec.samples])  # busy, area, work, held
        at = [np.searchsorted(times, t, side="left").clip(max=len(times) - 1) for t in edges]
        work, held = counters[at, 2], counters[at, 3]
        with np.errstate(invalid="ignore", divide="ignore"):
            columns[f"utilisation_{name}"] = np.diff(work) / np.diff(held)
        if name in hosted:
            continue
        gauges = np.asarray([g[name] for _, g in rec.gauges])
        columns[f"replicas_{name}"] = gauges[at[:-1], 1]
        columns[f"replicas_serving_{name}"] = gauges[at[:-1], 0]
    return pd.DataFrame(columns)
