"""Figures of a sweep: latency, throughput, cost, cost against latency and answer quality, utilisation.

Every figure reads a DataFrame of sweep points (one row per point, from
`prepare_points`) and the experiment dict written by the sweep; none runs the
simulator. Each is saved as PNG and SVG and its paths are returned. A figure
whose data is absent raises `SkipFigure` with the reason, which `make_figures`
collects so the report can say what is missing and why.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, same pixels on every machine

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter  # noqa: E402

from sim.experiments.spec import Bound, slo_verdict  # noqa: E402
from sim.metrics.stats import pareto_frontier  # noqa: E402
from sim.metrics.summary import aggregate_points  # noqa: E402

LOAD_X = "offered_load_rps"
DEFAULT_LOAD_AXIS = "traffic.rate_scale"
# Line style per latency statistic; colour is reserved for the config.
STAT_STYLES: dict[str, Any] = {
    "p50": ":", "p95": "-", "p99": "--",
    "mean": (0, (1, 1)), "p90": (0, (5, 1)), "p999": (0, (3, 1, 1, 1)),
}
ENDPOINT_STYLES = ("-", "--", ":", "-.")
# A plot spanning more than this ratio gets a log axis: saturated points would
# otherwise flatten everything else against zero.
LOG_RATIO = 30.0
# A latency panel with an SLO is linear from 0 to this many times its bound: the region where SLOs live.
SLO_HEADROOM = 3.0
# Points that fail the SLO, in cost figures: hollow and grey (a cheap point that fails is no option).
FAILED = {"color": "silver", "markerfacecolor": "white", "markeredgecolor": "grey"}
# The target load: a solid grey line, in every figure that marks it (and its legend entry).
TARGET_LINE = {"color": "dimgrey", "linewidth": 1.6, "alpha": 0.7}

# text.parse_math off: names come from the user's files, and `$...$` in one must print as typed,
# not as TeX math (which fails outright on an unknown command such as `$\x$`).
_RC = {"svg.hashsalt": "llmsim", "svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
       "text.parse_math": False, "text.usetex": False}


class SkipFigure(Exception):
    """A figure cannot be drawn from this sweep; the message says why (shown in the report)."""


@dataclass
class Figure:
    """One saved figure: its title, a one-sentence caption and the PNG and SVG paths."""

    name: str
    title: str
    caption: str
    paths: list[Path]

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")

    @property
    def svg(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".svg")


@dataclass
class FigureSet:
    """What `make_figures` produced: the figures drawn, and the reason for each one skipped."""

    made: list[Figure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- points and labels


def load_axis(experiment: dict) -> str:
    """The config path that is the offered load (`traffic.rate_scale` unless the experiment says)."""
    return experiment.get("load_axis") or DEFAULT_LOAD_AXIS


def axis_columns(columns: Iterable[str], experiment: dict) -> list[str]:
    """The experiment's axes present as columns, then the load axis if the sweep recorded it."""
    columns = list(columns)
    axes = [a for a in experiment.get("axes", {}) if a in columns]
    if load_axis(experiment) in columns and load_axis(experiment) not in axes:
        axes.append(load_axis(experiment))
    return axes


def x_column(points: pd.DataFrame, experiment: dict) -> Optional[str]:
    """The x axis of load plots: offered load in req/s, else the load axis, else the first axis."""
    if load_axis(experiment) in points.columns:
        if LOAD_X in points.columns and points[LOAD_X].notna().any():
            return LOAD_X
        return load_axis(experiment)
    axes = axis_columns(points.columns, experiment)
    return axes[0] if axes else None


def x_label(column: str) -> str:
    """Axis label with its unit for an x column."""
    if column == LOAD_X:
        return "offered load (req/s)"
    return "load (x the base rate)" if column == DEFAULT_LOAD_AXIS else column


def config_axes(points: pd.DataFrame, experiment: dict) -> list[str]:
    """The axes that tell configs apart: every axis but the load and the x axis."""
    x = x_column(points, experiment)
    return [a for a in axis_columns(points.columns, experiment) if a not in (x, load_axis(experiment))]


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each path that still tells the paths apart ("replicas")."""
    split = {p: p.split(".") for p in paths}
    for depth in range(1, max((len(s) for s in split.values()), default=1) + 1):
        names = {p: ".".join(s[-depth:]) for p, s in split.items()}
        if len(set(names.values())) == len(names):
            return names
    return {p: p for p in paths}


def format_value(value: Any) -> str:
    """An axis value as people write it: 2 not 2.0, strings bare, anything else as JSON."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value).lower()
    if isinstance(value, (int, float, np.integer, np.floating)):
        return format(float(value), "g")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def config_label(variant: str, values: dict[str, Any], experiment: dict) -> str:
    """A config's name: the variant (when the experiment has variants) and its non-load axis values."""
    names = short_names(list(values))
    parts = [f"{names[p]}={format_value(v)}" for p, v in values.items()]
    if experiment.get("variants"):
        parts.insert(0, str(variant))
    return ", ".join(parts) if parts else str(variant)


def _hashable(results: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Axis values that are lists or dicts become JSON text so rows can be grouped by them."""
    out = results.copy()
    for c in columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
            out[c] = out[c].map(lambda v: format_value(v.tolist() if isinstance(v, np.ndarray) else v))
    return out


def prepare_points(results: pd.DataFrame, experiment: dict) -> pd.DataFrame:
    """One row per point that ran: each metric's mean and 95% interval, plus a `config` label.

    Failed rows are left out (they have no metrics); the report lists them.
    """
    axes = axis_columns(results.columns, experiment)
    if "variant" not in results.columns:
        results = results.assign(variant="base")
    by = ["point", "variant", *axes]
    results = _hashable(results, axes)
    points = aggregate_points(results, by)
    if points.empty:
        return pd.DataFrame(columns=[*by, "replications", "config"])
    points = points.sort_values("point", kind="stable").reset_index(drop=True)
    label_axes = config_axes(points, experiment)
    points["config"] = [
        config_label(row["variant"], {a: row[a] for a in label_axes}, experiment) for _, row in points.iterrows()
    ]
    return points


def capacity_label(config: dict, experiment: dict) -> str:
    """The label of a capacity.json config, the same as its points' label."""
    return config_label(config.get("variant", "base"), dict(config.get("values") or {}), experiment)


def endpoints(points: pd.DataFrame) -> list[str]:
    """Endpoint names, from the `utilisation_<endpoint>` columns."""
    return [c.removeprefix("utilisation_") for c in points.columns
            if c.startswith("utilisation_") and not c.endswith(("_ci95_low", "_ci95_high"))]


def _has(points: pd.DataFrame, column: str) -> bool:
    return column in points.columns and points[column].notna().any()


# --------------------------------------------------------------------------- drawing helpers


def _colours(points: pd.DataFrame, extra: Iterable[str] = ()) -> dict[str, str]:
    """One colour per config, in order of first appearance, shared by every figure."""
    names = list(dict.fromkeys([*points["config"], *extra]))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _title(experiment: dict, text: str) -> str:
    name = experiment.get("name") or experiment.get("workload_name")
    return f"{name}: {text}" if name else text


def _line(ax, df: pd.DataFrame, x: str, metric: str, colour: str, style: Any = "-",
          label: Optional[str] = None) -> None:
    """A metric against x, with its 95% interval as a band where the sweep has one."""
    ax.plot(df[x], df[metric], color=colour, linestyle=style, marker="o", markersize=3, label=label)
    low, high = f"{metric}_ci95_low", f"{metric}_ci95_high"
    if _has(df, low):
        ax.fill_between(df[x].to_numpy(float), df[low].to_numpy(float), df[high].to_numpy(float),
                        color=colour, alpha=0.3, linewidth=0)


def _by_config(points: pd.DataFrame, x: str) -> Iterable[tuple[str, pd.DataFrame]]:
    for config, df in points.groupby("config", sort=False):
        yield config, df.sort_values(x, kind="stable")


def _auto_log(ax, values: Iterable[float], axis: str = "y") -> None:
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0], dtype=float)
    if v.size and v.max() / v.min() > LOG_RATIO:
        log_axis(ax, axis)


def log_axis(ax, axis: str = "y") -> None:
    """A log scale whose ticks read as plain numbers (0.1, 1, 10): matplotlib's own labels are TeX math
    ($10^{3}$), which the figures' text.parse_math off would print as typed."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def _legend_beside(ax) -> None:
    """The legend to the right of the axes, its top at theirs: off the data, and below the title."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png, dpi=110)
    # Constrained layout is in inches, so the PNG's layout holds for the SVG: skip solving it twice.
    fig.set_layout_engine("none")
    fig.savefig(svg, metadata={"Date": None})  # no timestamp: the same sweep gives the same file
    plt.close(fig)
    return [png, svg]


def _versus(x: str) -> str:
    """What a load plot's x axis is, for its title: offered load, or the swept config path's last part."""
    return "offered load" if x == "offered_load_rps" else ".".join(x.split(".")[-2:])


def _load_plot_x(points: pd.DataFrame, experiment: dict) -> str:
    if points.empty:
        raise SkipFigure("no point of the sweep ran successfully")
    x = x_column(points, experiment)
    if x is None:
        raise SkipFigure("the experiment varies no axis, so there is no x axis to plot against")
    return x


# --------------------------------------------------------------------------- the figures


def slo_lines(experiment: dict, measure: str) -> list[tuple[str, str, float]]:
    """(metric, "max" or "min", bound) of every SLO on a latency measure ("ttft", "e2e", "tpot")."""
    out = []
    for metric, bound in (experiment.get("slo") or {}).items():
        if metric.startswith(f"{measure}_") and metric.endswith("_s"):
            out += [(metric, side, float(bound[side])) for side in ("max", "min") if bound.get(side) is not None]
    return out


MEASURE_WORDS = {"ttft": "time to first token", "e2e": "end-to-end latency", "tpot": "time per output token",
                 "queue_wait": "queue wait"}


def metric_words(metric: str) -> str:
    """A latency metric as a reader says it: ttft_p95_s -> 'p95 time to first token' (else the id itself)."""
    for measure, words in MEASURE_WORDS.items():
        if metric.startswith(f"{measure}_") and metric.endswith("_s"):
            return f"{metric[len(measure) + 1:-2]} {words}"
    return metric


def _slo_label(metric: str, side: str, bound: float) -> str:
    return f"SLO: {metric_words(metric)} {'≤' if side == 'max' else '≥'} {bound:g} s"


def meets_slo(row: pd.Series, experiment: dict) -> bool:
    """Whether a point meets every SLO bound on its pessimistic 95% end, as the capacity search judges."""
    slo = {metric: Bound.model_construct(**bound) for metric, bound in (experiment.get("slo") or {}).items()}
    return slo_verdict(row, slo)[0]


def target_load_rps(experiment: dict, capacity: Optional[dict]) -> Optional[float]:
    """The load the capacity review is for, in req/s: the capacity block's target x the base rate."""
    for config in (capacity or {}).get("configs", []):
        at = config.get("at_target") or {}
        if at.get("offered_load_rps") is not None:
            return float(at["offered_load_rps"])
    target, base = (experiment.get("capacity") or {}).get("target"), experiment.get("base_load_rps")
    return float(target) * float(base) if target is not None and base else None


def _target_marker(ax, target: Optional[float], x: str) -> bool:
    """A solid grey vertical line at the target load, labelled at the top."""
    if target is None or x != LOAD_X:
        return False
    ax.axvline(target, zorder=0, **TARGET_LINE)
    ax.annotate(f"target {target:.3g} req/s", (target, 0.99), xycoords=("data", "axes fraction"), rotation=90,
                ha="right", va="top", fontsize=7, color=TARGET_LINE["color"])
    return True


def _latency_stats(experiment: dict, measure: str, points: pd.DataFrame) -> list[str]:
    """p50, p95, p99, plus the statistic of any SLO on this measure, so the SLO line has its curve."""
    stats = ["p50", "p95", "p99"]
    for metric, _, _ in slo_lines(experiment, measure):
        stat = metric[len(measure) + 1:-2]
        if stat not in stats and stat in STAT_STYLES:
            stats.append(stat)
    return [s for s in stats if _has(points, f"{measure}_{s}_s")]


def _capacity_markers(ax, capacity: Optional[dict], experiment: dict, colours: dict[str, str]) -> bool:
    """A dotted vertical line and a triangle at each config's max load meeting the SLO."""
    drawn = False
    for config in (capacity or {}).get("configs", []):
        x = config.get("max_load_rps")
        if x is None:
            continue
        colour = colours.get(capacity_label(config, experiment), "black")
        ax.axvline(x, color=colour, linestyle=":", linewidth=1.2, alpha=0.8)
        ax.plot([x], [1.0], marker="v", color=colour, markersize=8, transform=ax.get_xaxis_transform(),
                clip_on=False)
        drawn = True
    return drawn


def plot_latency(points: pd.DataFrame, experiment: dict, out_dir: Path,
                 capacity: Optional[dict] = None) -> list[Path]:
    """TTFT and end-to-end latency percentiles against load (and TPOT when an SLO bounds it), SLO lines
    and capacity markers."""
    x = _load_plot_x(points, experiment)
    measures = [("ttft", "time to first token"), ("e2e", "end-to-end latency")]
    if slo_lines(experiment, "tpot"):  # the token pace gets a panel when the SLO cares about it
        measures.append(("tpot", "time per output token"))
    panels = [(m, label) for m, label in measures if _latency_stats(experiment, m, points)]
    if not panels:
        raise SkipFigure("the results have no TTFT or end-to-end percentiles")
    colours = _colours(points, [capacity_label(c, experiment) for c in (capacity or {}).get("configs", [])])
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 4.8), layout="constrained",
                                 squeeze=False)
        used_stats, marked, targeted, slo_handles = [], False, False, []
        target = target_load_rps(experiment, capacity)
        for ax, (measure, label) in zip(axes[0], panels):
            stats = _latency_stats(experiment, measure, points)
            used_stats += [s for s in stats if s not in used_stats]
            for config, df in _by_config(points, x):
                for stat in stats:
                    _line(ax, df, x, f"{measure}_{stat}_s", colours[config], STAT_STYLES[stat])
            for metric, side, bound in slo_lines(experiment, measure):
                ax.axhline(bound, color="crimson", linewidth=1.5, linestyle="-.")
                slo_handles.append(Line2D([], [], color="crimson", linestyle="-.",
                                          label=_slo_label(metric, side, bound)))
            if x == LOAD_X:
                marked |= _capacity_markers(ax, capacity, experiment, colours)
            targeted |= _target_marker(ax, target, x)
            bounds = [bound for _, side, bound in slo_lines(experiment, measure) if side == "max"]
            ylabel = f"{label} (s)"
            if bounds:  # linear around the SLO, where decisions are made: saturated points run off the top
                ax.set_ylim(0, SLO_HEADROOM * max(bounds))
                ylabel += f", axis cut at {SLO_HEADROOM:g}x the SLO"
            else:
                _auto_log(ax, np.concatenate([points[f"{measure}_{s}_s"].to_numpy(float) for s in stats]))
            ax.set(title=label, xlabel=x_label(x), ylabel=ylabel)
        handles = [Line2D([], [], color=c, linewidth=2, label=name) for name, c in colours.items()
                   if name in set(points["config"])]
        handles += [Line2D([], [], color="grey", linestyle=STAT_STYLES[s], label=s) for s in used_stats]
        handles += slo_handles
        if marked:
            handles.append(Line2D([], [], color="grey", linestyle=":", marker="v",
                                  label="max load meeting the SLO"))
        if targeted:
            handles.append(Line2D([], [], label="target load", **TARGET_LINE))
        fig.legend(handles=_unique(handles), loc="outside right upper", fontsize=8)
        fig.suptitle(_title(experiment, f"latency vs {_versus(x)} (bands: 95% intervals)"))
        return _save(fig, out_dir, "latency_vs_load")


def _unique(handles: list[Line2D]) -> list[Line2D]:
    seen: dict[str, Line2D] = {}
    for h in handles:
        seen.setdefault(h.get_label(), h)
    return list(seen.values())


def plot_throughput(points: pd.DataFrame, experiment: dict, out_dir: Path,
                    capacity: Optional[dict] = None) -> list[Path]:
    """Throughput (and goodput, when the workload has an slo) against load: saturation shows as a knee."""
    x = _load_plot_x(points, experiment)
    if not _has(points, "throughput_rps"):
        raise SkipFigure("the results have no throughput_rps")
    goodput = _has(points, "goodput_rps")
    colours = _colours(points)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
        for config, df in _by_config(points, x):
            _line(ax, df, x, "throughput_rps", colours[config], "-", label=f"{config} throughput")
            if goodput:
                _line(ax, df, x, "goodput_rps", colours[config], "--", label=f"{config} goodput")
        if x == LOAD_X:
            top = float(np.nanmax(points[LOAD_X]))
            ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="served = offered")
        if _target_marker(ax, target_load_rps(experiment, capacity), x):
            ax.plot([], [], label="target load", **TARGET_LINE)
        ax.set(title=_title(experiment, "throughput" + (" and goodput" if goodput else "") + f" vs {_versus(x)}"),
               xlabel=x_label(x), ylabel="completed requests (req/s)")
        _legend_beside(ax)
        return _save(fig, out_dir, "throughput_vs_load")


def crossings(x: Sequence[float], a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Where two curves sampled at the same x cross, by linear interpolation between samples."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    xs = np.asarray(x, dtype=float)
    out = []
    for i in range(len(d) - 1):
        if not (np.isfinite(d[i]) and np.isfinite(d[i + 1])):
            continue
        if d[i] == 0:
            out.append(float(xs[i]))
        elif d[i] * d[i + 1] < 0:
            out.append(float(xs[i] + (xs[i + 1] - xs[i]) * d[i] / (d[i] - d[i + 1])))
    return out


def break_even(points: pd.DataFrame, experiment: dict) -> list[tuple[str, str, float]]:
    """Loads (req/s) at which two configs cost the same per 1k requests: (cheaper below, cheaper above, load)."""
    if points.empty or not _has(points, "cost_per_1k_usd") or "offered_load_rps" not in points:
        return []
    curves = {config: df.groupby("offered_load_rps")["cost_per_1k_usd"].mean()
              for config, df in points.groupby("config", sort=False)}
    found = []
    names = list(curves)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            both = pd.concat([curves[first], curves[second]], axis=1, join="inner").sort_index()
            for load in crossings(both.index, both.iloc[:, 0], both.iloc[:, 1]):
                below = both[both.index < load]
                cheaper_first = len(below) and below.iloc[0, 0] < below.iloc[0, 1]
                found.append((first, second, load) if cheaper_first else (second, first, load))
    return found


def plot_cost_per_1k(points: pd.DataFrame, experiment: dict, out_dir: Path,
                     capacity: Optional[dict] = None) -> list[Path]:
    """Cost per 1,000 completed requests against load, with break-even loads marked; points that fail the SLO
    hollow and grey (their cost buys no acceptable service)."""
    x = _load_plot_x(points, experiment)
    if not _has(points, "cost_per_1k_usd"):
        raise SkipFigure("the results have no cost_per_1k_usd (no completed request to divide by)")
    colours = _colours(points)
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
        failed_any = False
        for config, df in _by_config(points, x):
            _line(ax, df, x, "cost_per_1k_usd", colours[config], label=config)
            failed = df[[not meets_slo(row, experiment) for _, row in df.iterrows()]]
            if len(failed):
                ax.plot(failed[x], failed["cost_per_1k_usd"], "o", markersize=6, zorder=3, **FAILED)
                failed_any = True
        if failed_any:
            ax.plot([], [], "o", markersize=6, label="fails the SLO", **FAILED)
        if _target_marker(ax, target_load_rps(experiment, capacity), x):
            ax.plot([], [], label="target load", **TARGET_LINE)
        _auto_log(ax, points["cost_per_1k_usd"])
        if x == "offered_load_rps":
            for _, _, load in break_even(points, experiment):
                ax.axvline(load, color="black", linestyle=":", linewidth=1)
                ax.annotate(f"break-even {load:.3g} req/s", (load, 0.97), xycoords=("data", "axes fraction"),
                            rotation=90, ha="right", va="top", fontsize=8)
        ax.set(title=_title(experiment, f"cost per 1,000 requests vs {_versus(x)}"), xlabel=x_label(x),
               ylabel="cost per 1k requests (USD)")
        _legend_beside(ax)
        return _save(fig, out_dir, "cost_per_1k_vs_load")


def cost_latency_metric(experiment: dict, points: pd.DataFrame) -> str:
    """ttft_p95_s, or e2e_p95_s when no SLO bounds TTFT (or the results lack TTFT)."""
    ttft_bound = any(m.startswith("ttft_") for m in (experiment.get("slo") or {}))
    workload_slo = (experiment.get("workload") or {}).get("slo") or {}
    ttft_bound |= workload_slo.get("ttft_s") is not None
    if (ttft_bound or not _has(points, "e2e_p95_s")) and _has(points, "ttft_p95_s"):
        return "ttft_p95_s"
    return "e2e_p95_s"


def plot_cost_latency(points: pd.DataFrame, experiment: dict, out_dir: Path,
                      capacity: Optional[dict] = None) -> list[Path]:
    """Cost per hour against p95 latency with the Pareto frontier: at the target load when there is one (the
    sweep's load nearest it: comparing configs at different loads would mix two questions), else over every
    point; points that fail the SLO hollow and grey."""
    metric = cost_latency_metric(experiment, points)
    if points.empty or not _has(points, metric) or not _has(points, "cost_per_hour_usd"):
        raise SkipFigure(f"the results have no {metric} or cost_per_hour_usd")
    colours = _colours(points)
    x_col = x_column(points, experiment)
    target, at = target_load_rps(experiment, capacity), ""
    if target is not None and x_col == LOAD_X and _has(points, LOAD_X):
        loads = points[LOAD_X].to_numpy(float)
        nearest = float(loads[np.nanargmin(np.abs(loads - target))])
        points = points[np.isclose(loads, nearest)]
        at = f" at {nearest:.3g} req/s" + ("" if math.isclose(nearest, target, rel_tol=1e-3) else
                                           f" (the sweep's load nearest the {target:.3g} req/s target)")
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.5, 5.2), layout="constrained")
        failed_any = False
        for config, df in points.groupby("config", sort=False):
            ok = np.asarray([meets_slo(row, experiment) for _, row in df.iterrows()], dtype=bool)
            ax.errorbar(df[metric][ok], df["cost_per_hour_usd"][ok], xerr=_xerr(df[ok], metric), fmt="o",
                        color=colours[config], markersize=5, alpha=0.8, elinewidth=0.8, capsize=2, label=config)
            if not ok.all():
                ax.errorbar(df[metric][~ok], df["cost_per_hour_usd"][~ok], xerr=_xerr(df[~ok], metric), fmt="o",
                            markersize=6, elinewidth=0.8, capsize=2, ecolor="silver", **FAILED)
                failed_any = True
        if failed_any:
            ax.plot([], [], "o", markersize=6, label="fails the SLO", **FAILED)
        front = points.iloc[pareto_frontier(points["cost_per_hour_usd"].to_numpy(float),
                                            points[metric].to_numpy(float))]
        ax.plot(front[metric], front["cost_per_hour_usd"], color="black", drawstyle="steps-post", linewidth=1.2,
                marker="o", markersize=10, markerfacecolor="none", label="Pareto frontier")
        if x_col is not None:
            for _, row in front.iterrows():
                note = row["config"] if at else _point_note(row, x_col)
                ax.annotate(note, (row[metric], row["cost_per_hour_usd"]), fontsize=7, xytext=(6, 4),
                            textcoords="offset points")
        for m, side, bound in slo_lines(experiment, metric.split("_")[0]):
            if m == metric:
                ax.axvline(bound, color="crimson", linestyle="-.", label=_slo_label(m, side, bound))
        _auto_log(ax, points[metric], axis="x")
        ax.set(title=_title(experiment, f"cost vs {metric_words(metric)}{at}\n(lower left is better)"),
               xlabel=f"{metric_words(metric)} (s)", ylabel="cost per hour (USD/h)")
        _legend_beside(ax)
        return _save(fig, out_dir, "cost_vs_latency")


# The answer-quality dimensions the cost-quality figure draws, in panel order: (panel title, axis label).
# Shares (`_share`) read in %, a dimension's mean score as it is.
QUALITY_DIMENSIONS: dict[str, tuple[str, str]] = {
    "quality_good_share": ("good answers", "good answers (% of routed requests)"),
    "quality_correct_share": ("correctness", "correct answers (% of answered requests)"),
    "quality_grounded_mean": ("groundedness", "groundedness (mean score, 0-1)"),
    "quality_citation_mean": ("citation accuracy", "citation accuracy (mean score, 0-1)"),
    "quality_useful_mean": ("usefulness", "usefulness (mean score over all requests, 0-1)"),
}


def quality_frontier(costs: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on cost (lower is better) and quality (higher is better).

    A point is dominated when another is no costlier and no worse and better in
    one of the two; of identical points the first index is kept; points with a
    NaN are ignored. The result is ordered by rising quality (so by rising cost).
    """
    # Negating keeps the order exact, where 1 - q could round two different shares together.
    return pareto_frontier(costs, [-float(q) for q in quality])[::-1]


def quality_dimensions(points: pd.DataFrame) -> list[str]:
    """The quality metrics of QUALITY_DIMENSIONS the points have a value of, in panel order."""
    return [m for m in QUALITY_DIMENSIONS if _has(points, m)]


def plot_cost_quality(points: pd.DataFrame, experiment: dict, out_dir: Path) -> list[Path]:
    """Cost per 1k requests against every answer-quality dimension the sweep has, one panel each, with each
    dimension's Pareto frontier (cheaper and better) and 95% intervals on both axes where there are any."""
    dims = quality_dimensions(points)
    if points.empty or not dims or not _has(points, "cost_per_1k_usd"):
        raise SkipFigure("the results have no answer-quality metric (quality_*: with a router or a pipeline "
                         "quality block) or no cost_per_1k_usd")
    colours = _colours(points)
    x_col = x_column(points, experiment)
    # Colour names the config; only when a config has several points (along an axis) do notes tell them apart.
    noted = x_col is not None and bool(points.groupby("config", sort=False).size().max() > 1)
    cost = points["cost_per_1k_usd"].to_numpy(float)
    ncols = min(len(dims), 3)
    nrows = math.ceil(len(dims) / ncols)
    spare = nrows * ncols > len(dims)  # an empty cell of the grid holds the legend
    with plt.rc_context(_RC):
        legend_rows = 0 if spare else math.ceil((len(colours) + 1) / 3)  # a legend below the panels
        fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.8 * ncols, 8.0), 4.2 * nrows + 0.22 * legend_rows),
                                 layout="constrained", squeeze=False, sharey=True)
        for k, (ax, metric) in enumerate(zip(axes.flat, dims)):
            for config, df in points.groupby("config", sort=False):
                ax.errorbar(df[metric], df["cost_per_1k_usd"], xerr=_xerr(df, metric),
                            yerr=_xerr(df, "cost_per_1k_usd"), fmt="o", color=colours[config], markersize=5,
                            alpha=0.8, elinewidth=0.8, capsize=2)
            front = points.iloc[quality_frontier(cost, points[metric].to_numpy(float))]
            ax.plot(front[metric], front["cost_per_1k_usd"], color="black", linewidth=1.2, marker="o",
                    markersize=10, markerfacecolor="none")
            if noted:
                for _, row in front.iterrows():
                    ax.annotate(_axis_note(row, x_col), (row[metric], row["cost_per_1k_usd"]), fontsize=7,
                                xytext=(6, 4), textcoords="offset points")
            title, label = QUALITY_DIMENSIONS[metric]
            ax.set(title=title, xlabel=label)
            if k % ncols == 0:
                ax.set_ylabel("cost per 1k requests (USD)")
            if metric.endswith("_share"):
                ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
        _auto_log(axes.flat[0], cost)
        handles = [Line2D([], [], color=c, marker="o", linestyle="none", label=name) for name, c in colours.items()]
        handles.append(Line2D([], [], color="black", marker="o", markersize=10, markerfacecolor="none",
                              label="Pareto frontier (cheaper and better)"))
        for ax in axes.flat[len(dims):]:
            ax.axis("off")
        if spare:
            axes.flat[-1].legend(handles=handles, loc="center", fontsize=8)
        else:
            fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
        fig.suptitle(_title(experiment, "cost vs answer quality (lower right is better; bars: 95% intervals)"))
        return _save(fig, out_dir, "cost_vs_quality")


def _xerr(df: pd.DataFrame, metric: str) -> Optional[np.ndarray]:
    low, high = f"{metric}_ci95_low", f"{metric}_ci95_high"
    if not _has(df, low):
        return None
    mean = df[metric].to_numpy(float)
    err = np.vstack([mean - df[low].to_numpy(float), df[high].to_numpy(float) - mean])
    return np.nan_to_num(err, nan=0.0)


def _axis_note(row: pd.Series, x_col: str) -> str:
    """Where a point sits on the x axis of load plots: '6 req/s' or 'deterministic_share=0.4'."""
    return f"{row[x_col]:.3g} req/s" if x_col == LOAD_X else f"{x_col.split('.')[-1]}={format_value(row[x_col])}"


def _point_note(row: pd.Series, x_col: str) -> str:
    return f"{row['config']} @ {_axis_note(row, x_col)}"


def plot_utilisation(points: pd.DataFrame, experiment: dict, out_dir: Path) -> list[Path]:
    """Utilisation and mean running batch of every endpoint against load."""
    x = _load_plot_x(points, experiment)
    eps = [e for e in endpoints(points) if _has(points, f"utilisation_{e}")]
    if not eps:
        raise SkipFigure("the results have no utilisation_<endpoint> columns")
    colours = _colours(points)
    with plt.rc_context(_RC):
        fig, (util, batch) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
        for config, df in _by_config(points, x):
            for k, ep in enumerate(eps):
                label = config if len(eps) == 1 else f"{config} · {ep}"
                style = ENDPOINT_STYLES[k % len(ENDPOINT_STYLES)]
                _line(util, df, x, f"utilisation_{ep}", colours[config], style, label)
                if f"batch_mean_{ep}" in df.columns:
                    _line(batch, df, x, f"batch_mean_{ep}", colours[config], style, label)
        util.axhline(1.0, color="grey", linewidth=0.8)
        util.set_ylim(bottom=0)
        util.set(title="utilisation", xlabel=x_label(x), ylabel="utilisation (share of capacity, 0-1)")
        batch.set(title="mean batch while busy", xlabel=x_label(x), ylabel="mean batch (requests per replica)")
        util.legend(fontsize=8)
        fig.suptitle(_title(experiment, f"utilisation and batch size vs {_versus(x)}"))
        return _save(fig, out_dir, "utilisation_vs_load")


def plot_max_load(points: pd.DataFrame, experiment: dict, out_dir: Path, capacity: Optional[dict]) -> list[Path]:
    """Each config's highest load meeting the SLO, as bars with the capacity search's final bracket (the true
    limit lies inside it; the SLO itself was judged on the pessimistic end of each point's 95% interval), and the
    target load."""
    configs = [c for c in (capacity or {}).get("configs", []) if c.get("max_load") is not None]
    if not configs:
        raise SkipFigure("no capacity search (a capacity block), or no config met the SLO at any load")
    in_rps = all(c.get("max_load_rps") and c["max_load"] > 0 for c in configs)
    colours = _colours(points, [capacity_label(c, experiment) for c in configs])
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8, 1.4 + 0.5 * len(configs)), layout="constrained")
        for k, config in enumerate(configs):
            scale = config["max_load_rps"] / config["max_load"] if in_rps else 1.0
            value = config["max_load"] * scale
            low, high = (b * scale for b in config.get("bracket") or (config["max_load"], config["max_load"]))
            ax.barh(k, value, color=colours.get(capacity_label(config, experiment), "grey"), alpha=0.85)
            ax.errorbar(value, k, xerr=[[value - low], [max(high - value, 0.0)]], color="black", capsize=4)
            ceiling = "≥ " if config.get("at_least") else ""
            ax.annotate(f"{ceiling}{value:.3g}", (high, k), xytext=(6, 0), textcoords="offset points", va="center",
                        fontsize=8)
        ax.set_yticks(range(len(configs)), [capacity_label(c, experiment) for c in configs])
        ax.invert_yaxis()
        target = target_load_rps(experiment, capacity) if in_rps else (experiment.get("capacity") or {}).get("target")
        if target is not None:
            ax.axvline(target, label=f"target load {target:.3g}", **TARGET_LINE)
            _legend_beside(ax)
        ax.set(title=_title(experiment, "highest load meeting the SLO (bars: the search's bracket)"),
               xlabel="offered load (req/s)" if in_rps else x_label(load_axis(experiment)))
        ax.set_xlim(left=0)
        return _save(fig, out_dir, "max_load")


# --------------------------------------------------------------------------- all of them

FIGURES = (
    ("latency_vs_load", "Latency vs offered load",
     "TTFT and end-to-end latency percentiles per config, bands their 95% intervals; dash-dotted red lines are "
     "the SLO (a panel with one is linear up to 3x it), dotted verticals (after a capacity search) each config's "
     "highest load meeting it, the solid grey vertical the target load."),
    ("throughput_vs_load", "Throughput and goodput vs offered load",
     "Completed requests per second; where the curve leaves the dotted diagonal the stack is saturated."),
    ("cost_per_1k_vs_load", "Cost per 1,000 requests vs offered load",
     "Self-hosted replicas are paid by the hour, so their cost per request falls as load rises; "
     "API tokens cost the same per request at any load. Hollow grey points fail the SLO: no option at any price."),
    ("cost_vs_latency", "Cost vs p95 latency",
     "At the target load (after a capacity search; else every point of the sweep): the black line joins the "
     "Pareto frontier (no point is both cheaper and faster); hollow grey points fail the SLO."),
    ("max_load", "Highest load meeting the SLO",
     "Each config's highest load meeting the SLO, found by the capacity search; the bar's whisker is the search's "
     "final bracket (the limit lies inside it; '≥' where even the search's highest load met it), the grey line "
     "the target load."),
    ("utilisation_vs_load", "Utilisation and batch size vs offered load",
     "Share of capacity in use and the mean number of requests running on a busy replica."),
    ("cost_vs_quality", "Cost vs answer quality",
     ("Cost per 1,000 requests against each answer-quality dimension the sweep reports (good answers, "
      "correctness, groundedness, citation accuracy, usefulness), one panel each; in each panel the black line "
      "joins that dimension's Pareto frontier (no point is both cheaper and better on it). A config can be on "
      "one dimension's frontier and off another's; bars are 95% intervals.")),
)
OPTIONAL = {"cost_vs_quality": tuple(QUALITY_DIMENSIONS)}  # drawn only when the sweep has one of these metrics


def make_figures(points: pd.DataFrame, experiment: dict, out_dir: Path,
                 capacity: Optional[dict] = None) -> FigureSet:
    """Draw every figure into `out_dir`; figures without data are skipped with their reason."""
    draw = {
        "latency_vs_load": lambda: plot_latency(points, experiment, out_dir, capacity),
        "throughput_vs_load": lambda: plot_throughput(points, experiment, out_dir, capacity),
        "cost_per_1k_vs_load": lambda: plot_cost_per_1k(points, experiment, out_dir, capacity),
        "cost_vs_latency": lambda: plot_cost_latency(points, experiment, out_dir, capacity),
        "utilisation_vs_load": lambda: plot_utilisation(points, experiment, out_dir),
        "max_load": lambda: plot_max_load(points, experiment, out_dir, capacity),
        "cost_vs_quality": lambda: plot_cost_quality(points, experiment, out_dir),
    }
    out = FigureSet()
    for name, title, caption in FIGURES:
        if name in OPTIONAL and not any(m in points.columns for m in OPTIONAL[name]):
            continue
        try:
            out.made.append(Figure(name, title, caption, draw[name]()))
        except SkipFigure as why:
            out.skipped[title] = str(why)
    return out
