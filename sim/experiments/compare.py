"""Compare two workloads on common random numbers: paired differences with 95% intervals.

A and B run with the same root seed and the same number of replications. The
random streams are keyed by seed, replication and stream name, so replication
r of A and replication r of B see exactly the same requests: the differences
B_r - A_r are paired, and a paired Student-t interval over them is far
narrower than comparing two independent summaries would be (the traffic's
own variability cancels out).
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload
from sim.experiments.run import RunResult, run
from sim.metrics.stats import t975, t_interval
from sim.metrics.summary import metric_names
from sim.report.text import json_safe

WorkloadLike = Union[Workload, str, Path]

HEADLINE = (
    "throughput_rps", "goodput_rps",
    "ttft_p50_s", "ttft_p95_s", "ttft_p99_s",
    "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "queue_wait_mean_s",
    "cost_per_request_usd", "cost_per_1k_usd", "cost_per_hour_usd",
)
"""Metrics compared, in table order; the pipeline's headlines (PIPELINE) and `utilisation_<endpoint>` of
shared endpoints follow."""

PIPELINE = (r"^quality_", r"^cache_|^(?!stage_|cost_).+_cache_.*(rate|share)$", r"^hops_mean$|^escalation_rate$",
            r"^fallback_")
"""The application's headlines compared by default when both runs have them, in table order: answer
quality, cache hit and stale-hit rates, escalation, fallbacks (new `quality_*`, `cache_*`, `fallback_*`
metrics included)."""

DIRECTIONS: tuple[tuple[int, str], ...] = (
    # Neither: load, capacity in use and how work is split. Higher utilisation is cheaper and slower;
    # one class's throughput or rate-limited share is a trade-off between classes, not a grade.
    (0, r"^(offered_|utilisation_|batch_mean_|warmup_s$|requests_arrived$|cold_window_s$|(cold|warm)_requests$)"),
    (0, r"^throughput_.+_rps$|^rate_limited_share_.+$"),
    (0, r"^stage_.+_share(_p95)?$|_utilisation$|_batch_size_mean$|^cache_bypass_share_|^tokens_in_per_s$"),
    (-1, r"stale|leak"),  # a stale or leaked cache hit is a wrong answer, however fast
    (1, r"^quality_|hit_rate|^prompt_cached_share$"),
    (1, r"^(throughput|goodput)_rps$|^tokens_out_per_s|^requests_completed$"),
)
"""Which way is better, for the per-metric verdict: +1 higher, -1 lower, 0 neither. The first pattern
that matches decides; a metric none matches is better lower: latencies, costs, escalation and hops,
retries, fallbacks, rate-limited and lost requests."""

# Per-class metrics of the summary: e2e_p99_chat_s; throughput_chat_rps, rate_limited_share_chat.
_CLASS_LATENCY = re.compile(r"^(queue_wait|ttft|e2e|tpot)_(mean|p\d+)_(.+)_s$")
_CLASS_SHARE = re.compile(r"^throughput_(.+)_rps$|^rate_limited_share_(.+)$")
_LATENCY = re.compile(r"^(.+)_(mean|p\d+)_s$")

COLUMNS = ("a", "b", "diff", "diff_ci95_low", "diff_ci95_high",
           "rel_diff", "rel_ci95_low", "rel_ci95_high", "significant", "verdict", "pairs")


@dataclass
class Comparison:
    """The outcome of `compare`: one table row per metric and a one-line summary.

    `table` is indexed by metric name with the columns in COLUMNS: the means of
    A and B, the mean paired difference B - A with its 95% interval, the
    relative difference (B / A - 1) with its 95% interval, whether the
    difference is significant (its interval excludes zero), a verdict and the
    number of replication pairs used.
    """

    a: str
    b: str
    seed: int
    replications: int
    table: pd.DataFrame
    verdict: str
    result_a: RunResult = field(repr=False)
    result_b: RunResult = field(repr=False)

    def __str__(self) -> str:
        return format_comparison(self)


# ------------------------------------------------------------------ running


def compare(a: WorkloadLike, b: WorkloadLike, *, seed: Optional[int] = None,
            replications: Optional[int] = None, overrides: Sequence[str] = (), force: bool = False,
            metrics: Optional[Sequence[str]] = None) -> Comparison:
    """Run workloads A and B on common random numbers and compare their headline metrics.

    `a` and `b` are workload files (or validated Workloads when there are no
    overrides). Both run with the same `seed` (default: A's `simulation.seed`)
    and the same number of `replications` (default: the larger of the two
    workloads' `simulation.replications`, so neither gets fewer than it asks
    for). `overrides` (`--set` strings) apply to both. `metrics` names the
    table's rows, in order (default: metrics_to_compare); a name both workloads
    do not report is a ConfigError, raised before anything runs. Raises
    ConfigError with one line per problem in either file, or for work over the
    limits unless `force`.
    """
    wa, wb = _load_both(a, b, overrides)
    chosen = None if metrics is None else chosen_metrics(metrics, wa, wb)
    seed = wa.simulation.seed if seed is None else seed
    n = max(wa.simulation.replications, wb.simulation.replications) if replications is None else replications
    ra = run(wa, seed=seed, replications=n, force=force)
    rb = run(wb, seed=seed, replications=n, force=force)
    table = compare_replications(ra.replications, rb.replications, chosen or metrics_to_compare(ra, rb))
    return Comparison(_name(a), _name(b), seed, n, table, summary_line(table), ra, rb)


def _name(workload: WorkloadLike) -> str:
    return (workload.name or "workload") if isinstance(workload, Workload) else str(workload)


def _load_both(a: WorkloadLike, b: WorkloadLike, overrides: Sequence[str]) -> tuple[Workload, Workload]:
    """Validate both workloads before running either, reporting the problems of both at once."""
    loaded: list[Workload] = []
    problems: list[list[str]] = []
    for w in (a, b):
        if isinstance(w, Workload):
            if overrides:
                raise ValueError("overrides apply to workload files; pass paths")
            loaded.append(w)
            problems.append([])
            continue
        try:
            loaded.append(load_workload(w, overrides))
            problems.append([])
        except ConfigError as err:
            problems.append(err.lines)
    if any(problems):
        raise ConfigError(_merge_problems(str(a), str(b), problems[0], problems[1]))
    return loaded[0], loaded[1]


def _merge_problems(a: str, b: str, pa: list[str], pb: list[str]) -> list[str]:
    """One list of error lines for both files.

    File errors already name their file. A `--set` error names only the path,
    so when it concerns one workload alone (the path exists in the other) the
    line is prefixed with that file; when both reject it, it is shown once, as
    `llmsim run` would show it.
    """
    out: list[str] = []
    for source, mine, other in ((a, pa, pb), (b, pb, pa)):
        for line in mine:
            if line.startswith("--set ") and line not in other:
                line = f"{source}: {line}"
            if line not in out:  # the same file given twice, or a --set both reject
                out.append(line)
    return out


def metrics_to_compare(ra: RunResult, rb: RunResult) -> list[str]:
    """The headline metrics both runs have, the pipeline's headlines, the utilisation of every endpoint in
    both, then per class."""
    shared = set(ra.replications.columns) & set(rb.replications.columns)
    pipeline = [c for pattern in PIPELINE for c in ra.replications.columns if re.search(pattern, c) and c in shared]
    utilisation = [c for c in ra.replications.columns if c.startswith("utilisation_") and c in shared]
    return ([m for m in HEADLINE if m in shared] + pipeline + utilisation
            + [m for m in _per_class(ra) if m in shared])


def known_metrics(wa: Workload, wb: Workload) -> list[str]:
    """The metrics both workloads report, in A's summary order: what `metrics=` may name."""
    theirs = set(metric_names(wb))
    return [m for m in metric_names(wa) if m in theirs]


def chosen_metrics(wanted: Sequence[str], wa: Workload, wb: Workload) -> list[str]:
    """`wanted` without repeats, checked against known_metrics before anything runs: one ConfigError line
    naming the unknown ones and listing the known."""
    names = wanted.split(",") if isinstance(wanted, str) else wanted
    wanted = list(dict.fromkeys(m.strip() for m in names if m.strip()))
    known = known_metrics(wa, wb)
    unknown = [m for m in wanted if m not in set(known)]
    if unknown or not wanted:
        said = f"unknown metric(s) {', '.join(unknown)}" if unknown else "no metric named"
        raise ConfigError([f"--metrics: {said} (known for both workloads: {', '.join(known)})"])
    return wanted


def _per_class(result: RunResult) -> list[str]:
    """Each class's throughput, p95 TTFT, p99 e2e and rate-limited share (present with several classes):
    a policy that moves capacity from one class to another shows here, not in the totals."""
    return [m for c in result.workload.traffic.classes
            for m in (f"throughput_{c}_rps", f"ttft_p95_{c}_s", f"e2e_p99_{c}_s", f"rate_limited_share_{c}")]


# ------------------------------------------------------------------ statistics


def compare_replications(a: pd.DataFrame, b: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The comparison table from per-replication metrics of A and B (one row per replication)."""
    a = a.sort_values("replication").set_index("replication")
    b = b.sort_values("replication").set_index("replication")
    common = a.index.intersection(b.index)  # pair replication r of A with replication r of B
    # A metric one side lacks reads as all-NaN there: its row says "no data" instead of failing.
    a, b = a.reindex(columns=list(metrics)), b.reindex(columns=list(metrics))
    rows = {m: paired_difference(a.loc[common, m].to_numpy(float), b.loc[common, m].to_numpy(float))
            for m in metrics}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    table.index.name = "metric"
    table["verdict"] = [_metric_verdict(m, row) for m, row in table.iterrows()]
    return table


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of A and B, and the paired difference B - A with its 95% t-interval.

    Replications where either value is missing (NaN, e.g. no request completed)
    are dropped as a pair. With fewer than two pairs the intervals are NaN.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    nan = math.nan
    row = {"a": nan, "b": nan, "diff": nan, "diff_ci95_low": nan, "diff_ci95_high": nan,
           "rel_diff": nan, "rel_ci95_low": nan, "rel_ci95_high": nan, "significant": False,
           "verdict": "", "pairs": n}
    if n == 0:
        return row
    d = b - a
    # An all-zero d has zero standard deviation: t_interval then gives exactly
    # [0, 0] (0 * t / sqrt(n)), never 0/0, so identical runs read "no difference".
    diff, low, high = t_interval(d)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    rel, rel_low, rel_high = _relative(a, b, d)
    row.update(a=mean_a, b=mean_b, diff=diff, diff_ci95_low=low, diff_ci95_high=high,
               rel_diff=rel, rel_ci95_low=rel_low, rel_ci95_high=rel_high,
               significant=bool(n >= 2 and (low > 0 or high < 0)))
    return row


def _relative(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """B / A - 1 and its 95% interval, by Fieller's theorem for paired data.

    Dividing the difference's interval by A's mean would treat A's mean as
    known exactly. Fieller's interval for the ratio R = mean(B) / mean(A) is
    the set of r for which the paired t-interval of B - r A contains zero: it
    carries A's uncertainty and the A-B correlation, and because r = 1 is in it
    exactly when the interval of B - A contains zero, the relative and the
    absolute difference always agree on significance.
    """
    n = d.size
    mean_a, mean_b = float(a.mean()), float(b.mean())
    if not np.any(d):
        return 0.0, (0.0 if n >= 2 else math.nan), (0.0 if n >= 2 else math.nan)
    if mean_a == 0:
        return math.nan, math.nan, math.nan
    rel = mean_b / mean_a - 1.0
    if n < 2:
        return rel, math.nan, math.nan
    q = t975(n - 1) ** 2 / n
    cov = np.cov(a, b, ddof=1)
    # (mean_b - r mean_a)^2 <= q var(B - r A): a quadratic c2 r^2 - 2 c1 r + c0 <= 0.
    c2 = mean_a * mean_a - q * cov[0, 0]
    c1 = mean_a * mean_b - q * cov[0, 1]
    c0 = mean_b * mean_b - q * cov[1, 1]
    if c2 <= 0:  # A's mean is not distinguishable from zero: the ratio is unbounded
        return rel, math.nan, math.nan
    root = math.sqrt(max(c1 * c1 - c2 * c0, 0.0))  # >= 0 in exact arithmetic: R itself is inside
    return rel, (c1 - root) / c2 - 1.0, (c1 + root) / c2 - 1.0


def _metric_verdict(metric: str, row: pd.Series) -> str:
    if row["pairs"] == 0:
        return "no data"
    if row["diff"] == 0 and (row["pairs"] < 2 or row["diff_ci95_low"] == row["diff_ci95_high"] == 0):
        return "no difference"
    if row["pairs"] < 2:
        return "no interval (1 replication)"
    if not row["significant"]:
        return "no significant change"
    moved = 1 if row["diff"] > 0 else -1
    better = direction(metric)
    judged = "" if better == 0 else (" (better)" if moved == better else " (worse)")
    return ("B higher" if moved > 0 else "B lower") + judged


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is, 0 when neither (DIRECTIONS)."""
    return next((sign for sign, pattern in DIRECTIONS if re.search(pattern, metric)), -1)


# ------------------------------------------------------------------ formatting


def _label(metric: str) -> str:
    """A metric's name in plain words, for the summary line."""
    fixed = {"throughput_rps": "throughput", "goodput_rps": "goodput", "queue_wait_mean_s": "mean queue wait",
             "cost_per_request_usd": "cost/request", "cost_per_1k_usd": "cost/1k requests",
             "cost_per_hour_usd": "cost/hour", "quality_good_share": "good answers",
             "hops_mean": "model calls per answer", "rate_limited_share": "rate-limited share"}
    if metric in fixed:
        return fixed[metric]
    if metric.startswith("utilisation_"):
        return f"utilisation {metric.removeprefix('utilisation_')}"
    latency, share = _CLASS_LATENCY.match(metric), _CLASS_SHARE.match(metric)
    if latency:  # e2e_p99_chat_s -> "chat p99 e2e"
        measure, stat, cls = latency.groups()
        return f"{cls} {_label(f'{measure}_{stat}_s')}"
    if share:
        throughput, limited = share.groups()
        return f"{throughput} throughput" if throughput else f"{limited} rate-limited share"
    latency = _LATENCY.match(metric)
    if latency:  # ttft_p99_s -> "p99 TTFT"
        measure, stat = latency.groups()
        return f"{stat} {measure.upper() if measure in ('ttft', 'tpot') else measure.replace('_', ' ')}"
    return metric.replace("_", " ")  # escalation_rate -> "escalation rate"


def _decimals(magnitude: float, significant: int, least: int = 0) -> int:
    """Decimals that show `magnitude` with about `significant` significant digits."""
    if magnitude == 0 or not math.isfinite(magnitude):
        return least
    return int(min(max(significant - 1 - math.floor(math.log10(magnitude)), least), 8))


def _number(x: float, decimals: int, signed: bool) -> str:
    if math.isnan(x):
        return "-"
    text = f"{abs(x):.{decimals}f}"
    # An exact zero gets no sign: "+0" would suggest a difference that is not there.
    sign = "-" if x < 0 else ("+" if signed and x > 0 else "")
    return sign + text


def _kind(metric: str) -> str:
    if metric.startswith("cost_"):
        return "usd"
    if metric.endswith("_rps"):
        return "rps"
    if metric.endswith("_s"):
        return "s"
    if re.search(r"_(share|rate)(_|$)", metric) and not metric.startswith("requests_"):  # requests_* are counts
        # quality_good_share, cache_hit_rate_output, escalation_rate, rate_limited_share_chat
        return "share"
    return "plain"


def format_quantities(metric: str, values: Sequence[float], *, signed: bool, significant: int) -> list[str]:
    """Format numbers that are read together (a difference and its interval) in one unit and precision.

    Latencies below one second are shown in ms, costs in $ with at least
    cents, rates in req/s, shares in % (differences of shares, `signed`, in
    percentage points, pp); the first value carries the unit.
    """
    finite = [abs(v) for v in values if not math.isnan(v)]
    top = max(finite, default=0.0)
    kind = _kind(metric)
    scale, unit = 1.0, ""
    if kind == "s":
        scale, unit = (1000.0, " ms") if top < 1 else (1.0, " s")
    elif kind == "rps":
        unit = " req/s"
    elif kind == "share":
        scale, unit = 100.0, (" pp" if signed else "%")
    decimals = _decimals(top * scale, significant, 2 if kind == "usd" else 0)
    if kind == "usd" and top >= 1:
        decimals = 2  # whole dollars and cents, as on an invoice
    texts = [_number(v * scale, decimals, signed) for v in values]
    if kind == "usd":
        texts = [t if t == "-" else _dollar(t) for t in texts]
    if texts and texts[0] != "-":
        texts[0] += unit
    return texts


def _dollar(text: str) -> str:
    """'+0.15' -> '+$0.15'."""
    sign = text[0] if text[0] in "+-" else ""
    return f"{sign}${text[len(sign):]}"


def _percent(values: Sequence[float]) -> list[str]:
    """Fractions as signed percentages; an interval (values[1:]) gets enough decimals to show its width."""
    finite = [v * 100 for v in values if not math.isnan(v)]
    decimals = 0 if max(map(abs, finite), default=0.0) >= 10 else 1
    if len(finite) == 3:
        decimals = max(decimals, min(_decimals(finite[2] - finite[1], 1), 2))
    return [t if t == "-" else t + "%" for t in (_number(v * 100, decimals, True) for v in values)]


def _interval(texts: Sequence[str]) -> str:
    return "-" if "-" in texts else f"[{texts[0]}, {texts[1]}]"


def _table_rows(table: pd.DataFrame) -> list[tuple[str, ...]]:
    rows = []
    for metric, r in table.iterrows():
        value_a, = format_quantities(metric, [r["a"]], signed=False, significant=4)
        value_b, = format_quantities(metric, [r["b"]], signed=False, significant=4)
        diff, low, high = format_quantities(metric, [r["diff"], r["diff_ci95_low"], r["diff_ci95_high"]],
                                            signed=True, significant=3)
        rel, = _percent([r["rel_diff"]])
        ci = _interval([low, high])
        if ci == "-" and r["pairs"] == 1:
            ci = "n/a"
        rows.append((str(metric), value_a, value_b, diff, ci, rel, r["verdict"]))
    return rows


def format_comparison(comparison: Comparison) -> str:
    """The comparison as a person reads it in a terminal: a header, the table, the summary line."""
    c = comparison
    header = ("metric", "A", "B", "diff (B - A)", "95% CI of diff", "rel", "verdict")
    rows = _table_rows(c.table)
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    aligned = lambda row: "  ".join(  # noqa: E731 - names first and verdicts left, numbers right
        cell.ljust(w) if i in (0, len(row) - 1) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    ).rstrip()
    lines = [
        f"A  {c.a}",
        f"B  {c.b}",
        f"{c.replications} paired replication(s) x {c.result_a.workload.simulation.duration_s:g} s, seed {c.seed}: "
        "replication r of A and of B sees the same traffic (common random numbers)",
    ]
    for name, result in (("A", c.result_a), ("B", c.result_b)):
        if result.summary["unstable"]:
            lines.append(f"WARNING {name} is unstable (offered utilisation >= 1): its numbers grow with the run length")
    lines += _class_note(c)
    lines += ["", aligned(header)] + [aligned(row) for row in rows] + ["", c.verdict]
    return "\n".join(lines)


def classes(comparison: Comparison) -> dict[str, list[str]]:
    """The traffic classes of A and of B, in their files' order."""
    return {"a": list(comparison.result_a.workload.traffic.classes),
            "b": list(comparison.result_b.workload.traffic.classes)}


def _class_note(comparison: Comparison) -> list[str]:
    """With several classes, which ones the aggregate rows mix: a total can hide one class paying for another."""
    mix = classes(comparison)
    if max(len(mix["a"]), len(mix["b"])) < 2:
        return []
    said = (", ".join(mix["a"]) if mix["a"] == mix["b"]
            else f"{', '.join(mix['a'])} in A and {', '.join(mix['b'])} in B")
    return [f"aggregate rows mix classes {said}; rows named with a class are that class alone"]


def _change(metric: str, r: pd.Series) -> str:
    """'cost/request +50% [+45%, +55%]' or 'p99 TTFT -40 ms [-70, -10]'."""
    relative = _kind(metric) in ("usd", "rps") and not math.isnan(r["rel_ci95_low"])
    if relative:
        diff, low, high = _percent([r["rel_diff"], r["rel_ci95_low"], r["rel_ci95_high"]])
        return f"{_label(metric)} {diff} [{low}, {high}]"
    diff, low, high = format_quantities(metric, [r["diff"], r["diff_ci95_low"], r["diff_ci95_high"]],
                                        signed=True, significant=2)
    return f"{_label(metric)} {diff} [{low}, {high}]"


def summary_line(table: pd.DataFrame) -> str:
    """One line in plain words: the significant changes, then what did not change significantly."""
    # cost/1k requests moves exactly as cost/request does: saying it twice adds nothing.
    rows = table.drop(index="cost_per_1k_usd", errors="ignore")
    too_few = (rows["pairs"] < 2).any()
    if (rows["verdict"] == "no difference").all():
        return "B vs A: no difference (identical results in every replication)" + (
            "; intervals need >= 2 replications" if too_few else "")
    if too_few:
        return "B vs A: no intervals: intervals need >= 2 replications (rerun with --replications 2 or more)"
    changed = [_change(m, r) for m, r in rows.iterrows() if r["significant"]]
    unchanged = [_label(m) for m, r in rows.iterrows() if not r["significant"] and r["verdict"] != "no difference"]
    parts = []
    if changed:
        parts.append(", ".join(changed))
    if unchanged:
        parts.append("no significant change in " + ", ".join(unchanged))
    return "B vs A: " + "; ".join(parts)


CSV_FIELDS = ("a", "b", "diff", "diff_ci95_low", "diff_ci95_high", "rel_diff", "rel_ci95_low", "rel_ci95_high",
              "significant", "verdict", "better")


def comparison_csv(comparison: Comparison) -> str:
    """The comparison as CSV: a row per metric, the fields of `comparison_json` (no value: empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("metric",) + CSV_FIELDS)
    for metric, entry in comparison_json(comparison)["metrics"].items():
        writer.writerow([metric] + ["" if entry[k] is None else entry[k] for k in CSV_FIELDS])
    return out.getvalue()


def comparison_json(comparison: Comparison) -> dict:
    """The comparison as one JSON-ready object (NaN becomes null)."""
    c = comparison
    metrics = {}
    for metric, r in c.table.iterrows():
        entry = {key: float(r[key]) for key in ("a", "b", "diff", "diff_ci95_low", "diff_ci95_high",
                                                 "rel_diff", "rel_ci95_low", "rel_ci95_high")}
        entry["significant"] = bool(r["significant"])
        entry["verdict"] = str(r["verdict"])
        entry["better"] = {1: "higher", -1: "lower"}.get(direction(str(metric)))  # None: neither way is better
        metrics[str(metric)] = json_safe(entry)
    return {"a": c.a, "b": c.b, "seed": int(c.seed), "replications": int(c.replications),
            "classes": classes(c), "metrics": metrics, "summary": c.verdict}
