"""The report of one run (`llmsim run ... --out DIR`, then `llmsim report DIR`): time-series figures.

Reads DIR/summary.json and DIR/timeseries.parquet (one row per replication and
interval); each figure shows the mean over replications per interval.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from sim.config.loader import ConfigError  # noqa: E402
from sim.config.traces import excerpt  # noqa: E402
from sim.metrics.glossary import unit_of  # noqa: E402

from .figures import _RC, Figure, _save, log_axis  # noqa: E402
from .review import (
    Bullets,
    FigureBlock,
    Heading,
    Para,
    Table,
    fmt_latency,
    fmt_rps,
    fmt_usd,
    read_json_object,
    read_parquet,  # noqa: E402
    render_html,
    render_markdown,
    significant,
)

# The time-series columns every run writes and the figures read.
SERIES_COLUMNS = ("start_s", "end_s", "arrivals", "completions", "rejections", "queue_length_mean", "in_system_mean",
                  "ttft_p95_s", "e2e_p95_s")
TEXT_KEYS = ("workload", "bottleneck_stage")  # the summary's only text values, with step_times_<endpoint>


RANGE = ("__low", "__high")
"""Suffixes of a series' band columns: its lowest and highest value over the replications, per interval."""


def _series(timeseries: pd.DataFrame) -> pd.DataFrame:
    """Mean over replications of every column, per interval, with the interval's midpoint in minutes; with two
    or more replications, each column's range over them too (`<column>__low`, `<column>__high`)."""
    columns = [c for c in timeseries.columns if c != "replication"]
    groups = timeseries[columns].groupby(["start_s", "end_s"], sort=True)
    mean = groups.mean().reset_index()
    if "replication" in timeseries and timeseries["replication"].nunique() > 1:
        low, high = groups.min().reset_index(drop=True), groups.max().reset_index(drop=True)
        values = [c for c in columns if c not in ("start_s", "end_s")]
        mean = pd.concat([mean, low[values].add_suffix(RANGE[0]), high[values].add_suffix(RANGE[1])], axis=1)
    mean["t_min"] = (mean["start_s"] + mean["end_s"]) / 2 / 60
    return mean


def _plot(series: pd.DataFrame, out: Path, stem: str, title: str, panels: list[tuple[str, list[tuple[str, str]]]],
          log: bool = False) -> list[Path]:
    """Panels stacked over a shared time axis; each panel is (y label, [(column, legend), ...])."""
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, layout="constrained",
                                 squeeze=False)
        for ax, (ylabel, lines) in zip(axes[:, 0], panels):
            for column, label in lines:
                line, = ax.plot(series["t_min"], series[column], label=label, linewidth=1.2)
                if column + RANGE[0] in series:  # the band: what the replications spanned
                    ax.fill_between(series["t_min"], series[column + RANGE[0]], series[column + RANGE[1]],
                                    color=line.get_color(), alpha=0.25, linewidth=0)
            ax.set_ylabel(ylabel)
            if log and (series[[c for c, _ in lines]] > 0).any().any():
                log_axis(ax)
            ax.legend(fontsize=8, loc="upper left")
        axes[-1, 0].set_xlabel("time since start (min)")
        fig.suptitle(title)
        return _save(fig, out, stem)


def make_run_figures(series: pd.DataFrame, endpoints: list[str], out: Path, name: str) -> list[Figure]:
    """The time-series figures of a run."""
    width = (series["end_s"] - series["start_s"]).where(lambda w: w > 0)
    per_s = series.assign(**{f"{c}_rps{suffix}": series[c + suffix] / width
                             for c in ("arrivals", "completions", "rejections") for suffix in ("", *RANGE)
                             if c + suffix in series})
    band = " Bands: the range over the replications." if any(c.endswith(RANGE[0]) for c in series) else ""
    figures = [
        Figure("timeseries_traffic", "Traffic over time",
               "Arrivals, completions and rejections (any request that did not complete) per second, per "
               "interval." + band,
               _plot(per_s, out, "timeseries_traffic", f"{name}: traffic over time", [
                   ("requests/s", [("arrivals_rps", "arrivals"), ("completions_rps", "completions"),
                                   ("rejections_rps", "rejections")])])),
        Figure("timeseries_queue", "Queue and requests in the system over time",
               "Time-averaged number of requests waiting, and in the system (waiting or running)." + band,
               _plot(series, out, "timeseries_queue", f"{name}: queue over time", [
                   ("requests", [("queue_length_mean", "waiting"), ("in_system_mean", "in the system")])])),
        Figure("timeseries_latency", "Latency over time",
               "95th percentile TTFT and end-to-end latency of the requests arriving in each interval." + band,
               _plot(series, out, "timeseries_latency", f"{name}: p95 latency by arrival time", [
                   ("seconds", [("ttft_p95_s", "TTFT p95"), ("e2e_p95_s", "end-to-end p95")])], log=True)),
        Figure("timeseries_replicas", "Replicas and utilisation over time",
               "Replicas held (loading, serving or draining) and serving, and the share of paid capacity in "
               "use." + band,
               _plot(series, out, "timeseries_replicas", f"{name}: replicas and utilisation", [
                   # (API endpoints have no replicas of ours: the time series counts none for them)
                   ("replicas", [(f"replicas_{e}", f"{e} held") for e in endpoints if f"replicas_{e}" in series]
                    + [(f"replicas_serving_{e}", f"{e} serving") for e in endpoints
                       if f"replicas_serving_{e}" in series]),
                   ("utilisation", [(f"utilisation_{e}", e) for e in endpoints])])),
    ]
    if "cache_hit_rate_output" in series:
        figures.append(Figure("timeseries_cache", "Output-cache hit rate over time",
                              "Hits per lookup of the requests arriving in each interval: cold to warm." + band,
                              _plot(series, out, "timeseries_cache", f"{name}: output-cache hit rate", [
                                  ("hit rate", [("cache_hit_rate_output", "output cache")])])))
    return figures


def _bars(out: Path, stem: str, title: str, labels: list[str], series: list[tuple[str, list[float]]],
          xlabel: str, share: bool = False) -> list[Path]:
    """Grouped horizontal bars, one group per label (read top down, never overlapping), one bar per series."""
    import numpy as np

    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * len(labels) * max(len(series), 1) ** 0.5),
                               layout="constrained")
        y = np.arange(len(labels))
        height = 0.8 / len(series)
        for k, (name, values) in enumerate(series):
            ax.barh(y + (k - (len(series) - 1) / 2) * height, values, height, label=name)
        ax.set_yticks(y, [label.replace("_", " ") for label in labels])
        ax.invert_yaxis()
        ax.set(title=title, xlabel=xlabel)
        if share:
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        if len(series) > 1:
            ax.legend(fontsize=8, loc="lower right")
        return _save(fig, out, stem)


def summary_figures(summary: dict, out: Path, name: str) -> list[Figure]:
    """Where the time goes (stage shares of the mean and of the slowest 5%) and cost per request by feature."""
    figures = []
    stages = [k[len("stage_"):-len("_share")] for k in summary if k.startswith("stage_") and k.endswith("_share")]
    if stages:
        figures.append(Figure("stage_breakdown", "Where the time goes",
                              f"Each stage's share of the mean latency and of the slowest 5% of requests; "
                              f"the bottleneck is {summary.get('bottleneck_stage')}.",
                              _bars(out, "stage_breakdown", f"{name}: latency by stage", stages,
                                    [("mean", [summary[f"stage_{s}_share"] for s in stages]),
                                     ("slowest 5%", [summary[f"stage_{s}_share_p95"] for s in stages])],
                                    "share of latency", share=True)))
    features = [k[len("cost_per_request_"):-len("_usd")] for k in summary
                if k.startswith("cost_per_request_") and k.endswith("_usd") and k != "cost_per_request_usd"]
    if features:
        figures.append(Figure("cost_by_feature", "Cost by feature",
                              "Cost per request of each product feature, as the ledger shares the bill.",
                              _bars(out, "cost_by_feature", f"{name}: cost per request by feature", features,
                                    [("cost", [summary[f"cost_per_request_{f}_usd"] for f in features])],
                                    "USD per request")))
    return figures


def _pm(summary: dict, key: str, fmt) -> str:
    """A value in its unit with its 95% interval as ± half-width (none with one replication)."""
    value, low, high = summary.get(key), summary.get(f"{key}_ci95_low"), summary.get(f"{key}_ci95_high")
    text = fmt(value)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high) and high > low):
        return text
    if fmt is fmt_latency:  # both in the value's unit: "2.80 ±0.634 s", not "2.80 s ±634 ms"
        scale, unit = (1000.0, "ms") if abs(value) < 1 else (1.0, "s")
        return f"{significant(value * scale)} ±{significant((high - low) / 2 * scale)} {unit}"
    half = fmt((high - low) / 2)
    return f"{text.removesuffix(' req/s')} ±{half}" if text.endswith(" req/s") else f"{text} ±{half}"


def _headline(summary: dict) -> str:
    parts = [f"Throughput {_pm(summary, 'throughput_rps', fmt_rps)}",
             f"p95 TTFT {_pm(summary, 'ttft_p95_s', fmt_latency)}",
             f"p95 end-to-end {_pm(summary, 'e2e_p95_s', fmt_latency)}",
             f"cost {_pm(summary, 'cost_per_hour_usd', fmt_usd)}/h ({_pm(summary, 'cost_per_1k_usd', fmt_usd)} "
             "per 1k requests)"]
    text = "; ".join(parts) + " (95% intervals as ±)."
    good, done = summary.get("goodput_rps"), summary.get("throughput_rps")
    if good is not None and done:  # the SLO verdict
        met = [f"{key[len('slo_'):-len('_met_share')]} {_pm(summary, key, _percent)}" for key in summary
               if key.startswith("slo_") and key.endswith("_met_share") and summary[key] is not None]
        text += (f" SLO: {good / done:.1%} of completions met every target (goodput "
                 f"{_pm(summary, 'goodput_rps', fmt_rps)})" + (f"; answers within each target: {', '.join(met)}."
                                                              if met else "."))
    if summary.get("cold_window_s") is not None:
        cold, warm = summary.get("cold_e2e_p95_s"), summary.get("warm_e2e_p95_s")
        ratio = f" ({cold / warm:.1f}x)" if cold and warm else ""
        text += (f" Cold window (first {summary['cold_window_s']:g} s): p95 end-to-end {fmt_latency(cold)} "
                 f"against {fmt_latency(warm)} warm{ratio}.")
    if summary.get("unstable"):
        text += " Unstable: some endpoint's offered utilisation is 1 or more."
    return text


def _percent(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _outcomes_table(summary: dict) -> Table:
    """How requests ended (per replication, after warm-up), with each outcome's share of arrivals."""
    from sim.metrics.recorder import OUTCOMES

    arrived = summary.get("requests_arrived") or 0
    rows = []
    for outcome in OUTCOMES:
        count = summary.get(f"requests_{outcome}")
        if count:
            rows.append([outcome.replace("_", " "), f"{count:.0f}", f"{count / arrived:.2%}" if arrived else "-"])
    for key in ("fallback_smaller_model_share", "fallback_reduced_context_share"):
        if summary.get(key):
            rows.append([f"answered by {key[len('fallback_'):-len('_share')].replace('_', ' ')} fallback",
                         f"{summary[key] * arrived:.0f}", f"{summary[key]:.2%}"])
    return Table(["outcome", "requests", "share of arrivals"], rows)


# The metric table's areas, in order: the first whose test a metric passes holds it.
AREAS = (
    ("Run", lambda k: k in ("seed", "replications", "duration_s", "window_end_s", "warmup_s", "offered_load_rps")),
    ("Requests", lambda k: k.startswith(("requests_", "rate_limited", "retries_", "cold_", "warm_"))),
    ("Latency", lambda k: k.startswith(("queue_wait_", "ttft_", "e2e_", "tpot_", "itl_", "stage_", "batch_"))),
    ("SLO", lambda k: k.startswith(("slo_", "goodput_"))),
    ("Throughput", lambda k: k.startswith(("throughput_", "tokens_"))),
    ("Endpoints", lambda k: k.startswith(("utilisation_", "offered_utilisation_", "batch_mean_", "prompt_cached"))),
    ("Cost", lambda k: k.startswith("cost_")),
    ("Application", lambda k: True),
)


def _metrics_tables(summary: dict) -> list:
    """Every numeric metric, grouped by area, with its unit and interval; metrics zero throughout (value and
    interval) are left out, and counted."""
    keys = [k for k in summary if not k.endswith(("_ci95_low", "_ci95_high")) and isinstance(summary[k], (int, float))
            and not isinstance(summary[k], bool)]
    zero = [k for k in keys if summary[k] == 0 and summary.get(f"{k}_ci95_high") in (None, 0)
            and summary.get(f"{k}_ci95_low") in (None, 0)]
    areas: dict[str, list] = {}
    for key in keys:
        if key in zero:
            continue
        area = next(name for name, holds in AREAS if holds(key))
        value = summary[key]
        low, high = summary.get(f"{key}_ci95_low"), summary.get(f"{key}_ci95_high")
        interval = f"[{low:.4g}, {high:.4g}]" if low is not None and high is not None and not math.isnan(low) else ""
        areas.setdefault(area, []).append([f"`{key}`", f"{value:.4g}" if isinstance(value, float) else str(value),
                                           unit_of(key), interval])
    blocks: list = []
    for name, _ in AREAS:
        if name in areas:
            blocks += [Heading(3, name), Table(["metric", "value", "unit", "95% interval"], areas[name])]
    if zero:
        blocks.append(Para(f"{len(zero)} metrics were zero throughout and are left out: "
                           + ", ".join(f"`{k}`" for k in zero) + "."))
    return blocks


def _checked_summary(summary: dict, path: Path) -> dict:
    """The summary as `run --out` writes it: numbers (null where none), a flag, a few names; else ConfigError.

    The report does arithmetic on every other value, so a hand-edited or foreign
    file is refused here in one line rather than failing deep in a figure.
    """
    for key, value in summary.items():
        if key in TEXT_KEYS or key.startswith("step_times_"):
            ok = value is None or isinstance(value, str)
        elif key == "warnings":
            ok = isinstance(value, list) and all(isinstance(line, str) for line in value)
        else:
            ok = value is None or isinstance(value, (int, float))  # bool is an int: the `unstable` flag
        if not ok:
            raise ConfigError([f"{path}: {excerpt(str(key))}: unexpected {type(value).__name__} "
                               "(not a summary written by llmsim run --out)"])
    return summary


def write_run_report(directory: Path) -> tuple[Path, Path]:
    """report.md and report.html of a run folder, with the time-series figures."""
    summary_path, series_path = directory / "summary.json", directory / "timeseries.parquet"
    if not summary_path.is_file() or not series_path.is_file():
        raise ConfigError([f"{directory}: no results.parquet (run llmsim sweep first) and no "
                           "summary.json + timeseries.parquet (run llmsim run ... --out DIR first)"])
    summary = _checked_summary(read_json_object(summary_path), summary_path)
    series = _series(read_parquet(series_path, needs=SERIES_COLUMNS))
    endpoints = [c.removeprefix("utilisation_") for c in series.columns
                 if c.startswith("utilisation_") and not c.endswith(RANGE)]
    name = summary.get("workload") or directory.name
    figures = make_run_figures(series, endpoints, directory / "figures", name)
    figures += summary_figures(summary, directory / "figures", name)
    blocks = [Heading(1, f"Run report: {name}"), Para(_headline(summary), css="answer"),
              Bullets([f"{summary.get('replications')} replication(s) x {summary.get('duration_s')} s, "
                       f"seed {summary.get('seed')}, warm-up {summary.get('warmup_s')} s"]
                      + [f"Step times of `{key.removeprefix('step_times_')}`: {value}" for key, value in summary.items()
                         if key.startswith("step_times_")]),
              Heading(2, "How requests ended"), _outcomes_table(summary)]
    if summary.get("warnings"):
        blocks += [Heading(2, "Warnings"), Bullets([str(line) for line in summary["warnings"]])]
    blocks.append(Heading(2, "Figures"))
    for fig in figures:
        blocks += [Heading(3, fig.title), FigureBlock(fig)]
    blocks += [Heading(2, "Every metric"), *_metrics_tables(summary)]
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(render_markdown(blocks, directory), encoding="utf-8")
    page.write_text(render_html(blocks, f"Run report: {name}"), encoding="utf-8")
    return md, page
