"""Statistics across replications: Student-t intervals, MSER-5 warm-up detection, Pareto frontiers."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Student t 0.975 quantiles for 1..30 degrees of freedom (standard tables).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError("t975 needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    # Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5): error below 1e-5 for df > 30.
    z, v = _Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of independent replication values (NaNs dropped)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def mser5(series: np.ndarray) -> int:
    """MSER-5 truncation point: how many leading observations to delete as warm-up.

    Batch means of 5; the cut d (in batches, at most half of them) minimises
    the squared standard error of the mean of what is left (White, 1997).
    """
    x = np.asarray(series, dtype=float)
    m = x.size // 5
    if m < 4:
        return 0
    batches = x[: m * 5].reshape(m, 5).mean(axis=1)
    # Suffix sums give the mean and variance of batches[d:] for every d at once.
    rev = batches[::-1]
    count = np.arange(1, m + 1, dtype=float)
    suffix_sum = np.cumsum(rev)[::-1]
    suffix_sq = np.cumsum(rev * rev)[::-1]
    n = count[::-1]
    sse = suffix_sq - suffix_sum * suffix_sum / n
    stat = sse / (n * n)
    half = m // 2
    return int(np.argmin(stat[: half + 1])) * 5


def pareto_frontier(costs: Sequence[float], latencies: Sequence[float]) -> list[int]:
    """Indices of the points that no other point beats on cost and latency (lower is better).

    A point is dominated when another is no costlier and no slower and better
    in one of the two. Of identical points the first index is kept; points
    with a NaN are ignored. The result is ordered by rising latency (so by
    falling cost).
    """
    candidates = sorted(
        (float(lat), float(cost), i) for i, (cost, lat) in enumerate(zip(costs, latencies))
        if math.isfinite(float(cost)) and math.isfinite(float(lat))
    )
    frontier, cheapest = [], math.inf
    # Sorted by latency then cost, a point is on the frontier iff it is cheaper
    # than every point before it (each of those is at least as fast).
    for _, cost, i in candidates:
        if cost < cheapest:
            frontier.append(i)
            cheapest = cost
    return frontier
