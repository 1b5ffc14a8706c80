"""The capacity-review report of a sweep folder: report.md and a self-contained report.html.

It reads what `llmsim sweep` wrote (experiment.json, results.parquet and,
after a capacity search, capacity.json), draws the figures and writes one
document in two renderings. It never runs the simulator.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import quote

import pandas as pd

from sim.config.loader import ConfigError

from .figures import (
    LOAD_X,
    Figure,
    FigureSet,
    break_even,
    capacity_label,
    config_axes,
    config_label,
    format_value,
    load_axis,
    make_figures,
    prepare_points,
    x_column,
)

MAX_ROWS = 25  # caveat tables longer than this are cut, with a count of the rest
WIDE = 0.10  # an interval is "wide" when its half-width exceeds this share of the mean


@dataclass
class Sweep:
    """A sweep folder as read: the experiment, the raw results, capacity.json and the aggregated points."""

    directory: Path
    experiment: dict
    results: pd.DataFrame
    capacity: Optional[dict]
    points: pd.DataFrame


# --------------------------------------------------------------------------- reading


def read_json_object(path: Path) -> dict:
    """A JSON object written by llmsim; ConfigError in one line when the file is damaged or of another kind."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError([f"{path}:{err.lineno}: not valid JSON: {err.msg}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a text file (llmsim writes UTF-8 JSON here)"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror or err}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a JSON object, as llmsim writes, not {type(data).__name__}"])
    return data



def read_parquet(path: Path, needs: tuple[str, ...] = ()) -> pd.DataFrame:
    """A Parquet table written by llmsim, with the columns `needs`; ConfigError in one line when it is damaged.

    A truncated or overwritten file makes pyarrow raise its own error types
    (ArrowInvalid and kin, an OSError for some); all of them mean the file, not the code.
    """
    import pyarrow

    try:
        frame = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or "corrupt or not a Parquet file"
        raise ConfigError([f"{path}: cannot read: {why} (rerun the command that wrote it)"]) from None
    missing = [c for c in needs if c not in frame.columns]
    if missing:
        raise ConfigError([f"{path}: no column {missing[0]!r}: not a table llmsim wrote"])
    return frame


def require_folder(directory: Path) -> None:
    """ConfigError unless `directory` is a folder that can be looked into."""
    try:
        ok = directory.is_dir()
    except OSError as err:  # a name longer than the file system allows, say
        raise ConfigError([f"{directory}: cannot read: {err.strerror or err}"]) from None
    if not ok:
        raise ConfigError([f"{directory}: {'not a folder' if directory.exists() else 'no such folder'}"])


def load_sweep(directory: Union[str, Path]) -> Sweep:
    """Read a sweep folder; ConfigError when it has no results.parquet or experiment.json."""
    directory = Path(directory)
    require_folder(directory)
    if not (directory / "results.parquet").is_file():
        raise ConfigError([f"{directory}: no results.parquet (run llmsim sweep first)"])
    if not (directory / "experiment.json").is_file():
        raise ConfigError([f"{directory}: no experiment.json (is this a sweep folder?)"])
    experiment = read_json_object(directory / "experiment.json")
    results = read_parquet(directory / "results.parquet", needs=("point",))
    if "variant" not in results.columns:
        results["variant"] = "base"
    capacity = read_json_object(directory / "capacity.json") if (directory / "capacity.json").is_file() else None
    return Sweep(directory, experiment, results, capacity, prepare_points(results, experiment))


# --------------------------------------------------------------------------- numbers for people


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures, never in scientific notation (11.3, 0.0512, 1,234)."""
    if _missing(value):
        return "–"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def fmt_latency(seconds: Optional[float]) -> str:
    """A latency: milliseconds below one second ("45.3 ms"), seconds above ("1.23 s")."""
    if _missing(seconds):
        return "–"
    if abs(seconds) < 1:
        return f"{significant(seconds * 1000)} ms"
    return f"{significant(seconds)} s"


def fmt_usd(value: Optional[float]) -> str:
    """Dollars: whole above $100, cents above $1, three significant figures below ("$0.0302")."""
    if _missing(value):
        return "–"
    if abs(value) >= 100:
        return f"${value:,.0f}"
    if abs(value) >= 1 or value == 0:
        return f"${value:,.2f}"
    return f"${significant(value)}"


def fmt_rps(value: Optional[float]) -> str:
    """A rate in requests per second, three significant figures."""
    return "–" if _missing(value) else f"{significant(value)} req/s"


def fmt_metric(metric: str, value: Optional[float]) -> str:
    """A metric's value in its unit, read from its name's suffix."""
    if metric.endswith("_s"):
        return fmt_latency(value)
    if metric.endswith("_usd"):
        return fmt_usd(value)
    if metric.endswith("_rps"):
        return fmt_rps(value)
    if _missing(value):
        return "–"
    if metric.startswith(("utilisation_", "offered_utilisation_")):
        return f"{value:.2f}"
    return significant(value)


def slo_text(metric: str, bound: dict) -> str:
    """An SLO bound as people write it: `ttft_p95_s` ≤ 1 s."""
    unit = {"_s": " s", "_usd": " USD", "_rps": " req/s"}
    suffix = next((u for s, u in unit.items() if metric.endswith(s)), "")
    parts = [f"≤ {bound['max']:g}{suffix}" if bound.get("max") is not None else "",
             f"≥ {bound['min']:g}{suffix}" if bound.get("min") is not None else ""]
    return f"`{metric}` " + " and ".join(p for p in parts if p)


# --------------------------------------------------------------------------- the analysis


def meets_slo(row: pd.Series, slo: dict) -> bool:
    """Whether a point meets every SLO bound, judged on the 95% bound (the mean with one replication)."""
    for metric, bound in slo.items():
        if bound.get("max") is not None and not _side(row, metric, "high") <= bound["max"]:
            return False
        if bound.get("min") is not None and not _side(row, metric, "low") >= bound["min"]:
            return False
    return True


def _side(row: pd.Series, metric: str, side: str) -> float:
    edge = row.get(f"{metric}_ci95_{side}")
    value = edge if not _missing(edge) else row.get(metric)
    return math.nan if _missing(value) else float(value)


def _base_rps(experiment: dict) -> Optional[float]:
    base = experiment.get("base_load_rps")
    return float(base) if not _missing(base) and base > 0 else None


def _times_base(rps: Optional[float], experiment: dict) -> str:
    base = _base_rps(experiment)
    return "–" if _missing(rps) or base is None else f"{rps / base:.2f}x"


def _load_text(row: pd.Series, experiment: dict) -> str:
    """Where a point sits on the load axis: req/s and multiple of today's load, or the axis value."""
    rps = row.get(LOAD_X)
    if not _missing(rps):
        ratio = _times_base(rps, experiment)
        return fmt_rps(rps) + (f" ({ratio})" if ratio != "–" else "")
    axis = load_axis(experiment)
    if axis in row.index and not _missing(row[axis]):
        return f"{axis.split('.')[-1]}={format_value(row[axis])}"
    return "–"


def _target_text(experiment: dict, capacity: dict) -> str:
    target = float(capacity["target"])
    base = _base_rps(experiment)
    if capacity.get("load_axis", load_axis(experiment)) == "traffic.rate_scale":
        rps = f", {fmt_rps(target * base)}" if base is not None else ""
        return f"{target:g}x today's load{rps}"
    return f"{capacity.get('load_axis', load_axis(experiment))}={target:g}"


def _at_search_ceiling(config: dict) -> bool:
    """Whether the SLO held even at the search's highest load, so the true maximum is higher."""
    return bool(config.get("at_least"))  # the sweep writes it on every finished search


def _max_load_value(config: dict) -> str:
    """A config's max load for people: in req/s when known, else in load-axis units."""
    rps = config.get("max_load_rps")
    return fmt_rps(rps) if rps is not None else f"load {config['max_load']:g}"


def _max_load_text(config: dict, experiment: dict) -> str:
    if config.get("error"):
        return "the capacity search failed (see the caveats)"
    if config.get("max_load") is None:
        return "fails the SLO even at the lowest load tried"
    rps = config.get("max_load_rps")
    text = _max_load_value(config)
    ratio = _times_base(rps, experiment) if rps is not None else f"{config['max_load']:g}x"
    at_least = "at least " if _at_search_ceiling(config) else ""
    return f"{at_least}{text} ({ratio} today's load)" if ratio != "–" else at_least + text


def _capacity_answer(sweep: Sweep) -> str:
    exp, cap = sweep.experiment, sweep.capacity or {}
    configs = sorted(cap.get("configs", []), key=lambda c: -(c["max_load"] if c.get("max_load") is not None
                                                          else -math.inf))
    listed = [f"{capacity_label(c, exp)}: {_max_load_text(c, exp)}" for c in configs[:6]]
    if len(configs) > 6:
        listed.append(f"and {len(configs) - 6} more (see the table)")
    text = "Highest load meeting the SLO: " + "; ".join(listed) + "."
    cheapest = cap.get("cheapest_at_target")
    target = _target_text(exp, cap)
    if cheapest:
        match = next((c for c in configs if c.get("variant") == cheapest.get("variant")
                      and (c.get("values") or {}) == (cheapest.get("values") or {})), {})
        per_1k = cheapest.get("cost_per_1k_usd", (match.get("at_target") or {}).get("cost_per_1k_usd"))
        text += (f" Cheapest config meeting the SLO at the target load ({target}): "
                 f"{capacity_label(cheapest, exp)} at {fmt_usd(cheapest.get('cost_per_hour_usd'))}/h"
                 + (f" ({fmt_usd(per_1k)} per 1k requests)." if per_1k is not None else "."))
    else:
        text += f" No config meets the SLO at the target load ({target})."
    return text


def grid_capacity(sweep: Sweep) -> list[dict]:
    """Without a capacity search: each config's highest grid point meeting the SLO (None if none does)."""
    slo, points = sweep.experiment.get("slo") or {}, sweep.points
    x = x_column(points, sweep.experiment)
    out = []
    for config, df in points.groupby("config", sort=False):
        good = df[df.apply(meets_slo, axis=1, slo=slo)] if len(df) else df
        best = good.sort_values(x, kind="stable").iloc[-1] if x is not None and len(good) else None
        out.append({"config": config, "row": best, "points": len(df)})
    return out


def _grid_answer(sweep: Sweep) -> str:
    exp = sweep.experiment
    rows = sorted(grid_capacity(sweep), key=lambda r: -(r["row"][LOAD_X] if r["row"] is not None
                                                       and LOAD_X in r["row"] else -math.inf))
    listed = [f"{r['config']}: " + (_load_text(r["row"], exp) if r["row"] is not None else "no point meets it")
              for r in rows[:6]]
    text = ("Highest load on the sweep's grid meeting the SLO (no capacity search ran, so loads between "
            "grid points were not tried): " + "; ".join(listed) + ".")
    ok = sweep.points[sweep.points.apply(meets_slo, axis=1, slo=exp.get("slo") or {})]
    if len(ok) and "cost_per_hour_usd" in ok:
        best = ok.sort_values(["cost_per_hour_usd", "cost_per_1k_usd"], kind="stable").iloc[0]
        text += (f" Cheapest point meeting the SLO: {best['config']} at {_load_text(best, exp)}, "
                 f"{fmt_usd(best['cost_per_hour_usd'])}/h ({fmt_usd(best.get('cost_per_1k_usd'))} per 1k requests).")
    return text


def _no_slo_answer(sweep: Sweep) -> str:
    exp, points = sweep.experiment, sweep.points
    text = "The experiment sets no SLO, so the report shows curves rather than a single answer."
    if "throughput_rps" in points and points["throughput_rps"].notna().any():
        top = points.loc[points["throughput_rps"].idxmax()]
        text += f" Peak throughput: {fmt_rps(top['throughput_rps'])} ({top['config']} at {_load_text(top, exp)})."
    if "cost_per_1k_usd" in points and points["cost_per_1k_usd"].notna().any():
        low = points.loc[points["cost_per_1k_usd"].idxmin()]
        text += (f" Lowest cost per 1k requests: {fmt_usd(low['cost_per_1k_usd'])} "
                 f"({low['config']} at {_load_text(low, exp)}).")
    return text


def answer(sweep: Sweep) -> str:
    """The one-paragraph answer of the review: capacity per config and the cheapest config at the target."""
    slo = sweep.experiment.get("slo") or {}
    if sweep.points.empty:
        return "No point of the sweep ran successfully; the failed points and their errors are listed below."
    lead = ("SLO: " + "; ".join(slo_text(m, b) for m, b in slo.items())
            + " (on the upper end of the 95% interval). ") if slo else ""
    if sweep.capacity and sweep.capacity.get("configs"):
        text = lead + _capacity_answer(sweep)
    else:
        text = lead + (_grid_answer(sweep) if slo else _no_slo_answer(sweep))
    return text + _break_even_text(sweep)


def _break_even_text(sweep: Sweep) -> str:
    """' Break-even: A is cheaper per request below 5.1 req/s, B above.' for crossing cost curves."""
    found = break_even(sweep.points, sweep.experiment)
    parts = [f"{below} is cheaper per request below {fmt_rps(load)}, {above} above"
             for below, above, load in found]
    return (" Break-even: " + "; ".join(parts) + ".") if parts else ""


# --------------------------------------------------------------------------- the document


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    css: str = ""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class FigureBlock:
    figure: Figure


Block = Union[Heading, Para, Bullets, Table, FigureBlock]


def _describe_distribution(d: Any, unit: str = "") -> str:
    if not isinstance(d, dict):
        return f"{format_value(d)}{unit}"
    if d.get("kind") == "constant":
        return f"{format_value(d['value'])}{unit}"
    given = {k: v for k, v in d.items() if k != "kind" and v is not None}
    if d.get("kind") == "lognormal" and ("median" in given or "mean" in given):
        given = {k: v for k, v in given.items() if k not in ("mu", "sigma")}
    if d.get("kind") == "empirical" and isinstance(given.get("values"), list):
        given["values"] = f"[{len(given['values'])} values]"
    return f"{d.get('kind')} " + ", ".join(f"{k} {format_value(v)}" for k, v in given.items()) + unit


def _describe_class(name: str, c: dict, scale: float) -> str:
    arrival = c.get("arrival") or {}
    if arrival.get("kind") == "poisson":
        rate = float(arrival["rate_rps"])
        how = f"Poisson, {significant(rate * scale)} req/s"
        if scale != 1:
            how += f" ({rate:g} x rate_scale {scale:g})"
    else:
        how = (f"closed loop, {arrival.get('users')} users, think time "
               f"{_describe_distribution(arrival.get('think_time_s'), ' s')}")
    endpoint = f"; endpoint `{c['endpoint']}`" if c.get("endpoint") else ""
    return (f"class `{name}`: {how}; prompt {_describe_distribution(c.get('prompt_tokens'), ' tokens')}; "
            f"output {_describe_distribution(c.get('output_tokens'), ' tokens')}{endpoint}")


def _describe_model(name: str, m: dict, step_times: Optional[str] = None) -> str:
    if m.get("kind") == "api":
        return (f"model `{name}`: API, concurrency {m.get('concurrency')}, "
                f"{fmt_usd(m.get('price_per_mtok_in', 0))} / {fmt_usd(m.get('price_per_mtok_out', 0))} "
                "per million tokens in / out")
    engine = m.get("engine") or {}
    gpus = int(engine.get("tensor_parallel") or 1)
    how = (f"iteration-level engine, step times: {step_times or 'typed in'}" if engine
           else f"service time {_describe_distribution(m.get('service_time'), ' s')}")
    price = fmt_usd(m.get("gpu_hourly_usd", 0)) + "/h per GPU" + (f" x {gpus} GPUs per replica" if gpus > 1 else "")
    return (f"model `{name}`: self-hosted, {m.get('replicas')} replica(s) x max batch {m.get('max_batch')}, "
            f"{price}, {how}")


def _describe_axis(values: Any) -> str:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    shown = ", ".join(format_value(v) for v in values[:12])
    return shown + (f", … ({len(values)} values)" if len(values) > 12 else "")


def simulated(sweep: Sweep) -> list[str]:
    """Bullets describing what was simulated: workload, traffic, models, run settings, axes, variants."""
    exp, results = sweep.experiment, sweep.results
    workload = exp.get("workload") or {}
    traffic = workload.get("traffic") or {}
    scale = float(traffic.get("rate_scale", 1.0))
    items = [f"Experiment `{exp.get('experiment_file', '?')}` on workload "
             f"`{exp.get('workload_name') or workload.get('name') or '?'}` (`{exp.get('workload_file', '?')}`)"
             + (f": {workload['description']}" if workload.get("description") else "")]
    items += [_describe_class(n, c, scale) for n, c in (traffic.get("classes") or {}).items()]
    if _base_rps(exp) is not None:
        items.append(f"Today's load (load 1): {fmt_rps(_base_rps(exp))} offered")
    items += [_describe_model(n, m, (exp.get("step_times") or {}).get(n))
              for n, m in (workload.get("models") or {}).items()]
    warmup = exp.get("warmup_s")
    items.append(f"Seed {exp.get('seed')}, {exp.get('replications')} replication(s) per point, "
                 f"{format_value(exp.get('duration_s'))} s of arrivals each, warm-up "
                 + ("chosen by MSER-5 (auto)" if warmup == "auto" else f"{format_value(warmup)} s"))
    axes = exp.get("axes") or {}
    items += [f"Axis `{p}`: {_describe_axis(v)}" for p, v in axes.items()] or ["No axes: one point per variant"]
    if len(axes) > 1:
        items.append(f"Axes combined as a {exp.get('combine', 'grid')}")
    items += [f"Variant `{n}`: " + ", ".join(f"`{o}`" for o in ov) for n, ov in (exp.get("variants") or {}).items()]
    items += [f"SLO: {slo_text(m, b)}" for m, b in (exp.get("slo") or {}).items()]
    if exp.get("capacity"):
        c = exp["capacity"]
        items.append(f"Capacity search on `{load_axis(exp)}`: target {c['target']:g}, loads {c['low']:g} to "
                     f"{c['high']:g}, stopping at {c['tolerance']:.0%} relative width")
    failed = results.loc[results["status"] != "ok", "point"].nunique() if "status" in results else 0
    items.append(f"{results['point'].nunique()} points ({failed} failed), {len(results)} result rows; sweep "
                 f"started {exp.get('started', '?')}, " + (f"finished {exp['finished']}" if exp.get("finished")
                                                           else "not finished"))
    return items


def _max_load_cell(config: dict, experiment: dict) -> str:
    if config.get("error"):
        return "search failed"
    if config.get("max_load") is None:
        return "fails at the lowest load"
    return ("≥ " if _at_search_ceiling(config) else "") + _max_load_value(config)


def _unlimited(config: dict, experiment: dict) -> str:
    ok = config.get("max_load") is not None and not config.get("error")
    return "nothing up to the search's highest load" if ok and _at_search_ceiling(config) else "–"


def capacity_table(sweep: Sweep) -> Optional[Table]:
    """The capacity table from capacity.json, or from the grid when there was no search but an SLO."""
    exp = sweep.experiment
    if sweep.capacity and sweep.capacity.get("configs"):
        rows = []
        for c in sweep.capacity["configs"]:
            at = c.get("at_target") or {}
            util = ", ".join(f"{ep} {u:.0%}" for ep, u in (c.get("utilisation") or {}).items() if not _missing(u))
            met = at.get("slo_met")
            rows.append([
                capacity_label(c, exp), _max_load_cell(c, exp),
                _times_base(c.get("max_load_rps"), exp) if c.get("max_load_rps") is not None else "–",
                f"`{c['limited_by']}`" if c.get("limited_by") else _unlimited(c, exp),
                util or "–",
                fmt_usd(at.get("cost_per_hour_usd")), fmt_usd(at.get("cost_per_1k_usd")),
                "–" if met is None else ("yes" if met else "no"),
            ])
        return Table(["Config", "Max load meeting SLO", "x today", "Limited by", "Utilisation at max load",
                      "Cost per hour at target", "Cost per 1k at target", "SLO met at target"], rows)
    if exp.get("slo") and not sweep.points.empty:
        rows = []
        for r in grid_capacity(sweep):
            row = r["row"]
            rows.append([r["config"], _load_text(row, exp) if row is not None else "none on the grid",
                         fmt_usd(row.get("cost_per_hour_usd")) if row is not None else "–",
                         fmt_usd(row.get("cost_per_1k_usd")) if row is not None else "–"])
        return Table(["Config", "Highest grid load meeting SLO", "Cost per hour there", "Cost per 1k there"], rows)
    return None


# --------------------------------------------------------------------------- caveats


def _capped(rows: list[list[str]], width: int) -> list[list[str]]:
    if len(rows) <= MAX_ROWS:
        return rows
    return rows[:MAX_ROWS] + [[f"… and {len(rows) - MAX_ROWS} more"] + [""] * (width - 1)]


def unstable_rows(points: pd.DataFrame, experiment: dict) -> list[list[str]]:
    """Points where an endpoint's offered utilisation is 1 or more: no steady state exists."""
    rows = []
    cols = [c for c in points.columns if c.startswith("offered_utilisation_") and not c.endswith(("_low", "_high"))]
    for _, p in points.iterrows():
        over = [f"{c.removeprefix('offered_utilisation_')} {p[c]:.2f}" for c in cols
                if not _missing(p[c]) and p[c] >= 1]
        if over:
            rows.append([str(p["point"]), p["config"], _load_text(p, experiment), ", ".join(over)])
    return rows


def failed_rows(sweep: Sweep) -> list[list[str]]:
    """Failed points with their configs and errors (whitespace collapsed, long errors cut)."""
    results, exp = sweep.results, sweep.experiment
    if "status" not in results:
        return []
    # The contract gives a failed point one row; tolerate several (one per replication) all the same.
    failed = results[results["status"] != "ok"].drop_duplicates("point")
    axes = config_axes(results, exp)
    rows = []
    for _, r in failed.iterrows():
        error = re.sub(r"\s+", " ", str(r.get("error") or "")).strip() or "(no error recorded)"
        error = error if len(error) <= 300 else error[:297] + "..."
        rows.append([str(r["point"]), config_label(r["variant"], {a: r[a] for a in axes}, exp),
                     _load_text(r, exp), error])
    return rows


def failed_search_rows(sweep: Sweep) -> list[list[str]]:
    """Configs whose capacity search failed, with the error capacity.json recorded."""
    return [[capacity_label(c, sweep.experiment), re.sub(r"\s+", " ", str(c["error"])).strip()]
            for c in (sweep.capacity or {}).get("configs", []) if c.get("error")]


def wide_rows(points: pd.DataFrame, experiment: dict) -> list[list[str]]:
    """SLO metrics whose 95% interval half-width is above 10% of the mean."""
    rows = []
    for metric in experiment.get("slo") or {}:
        low, high = f"{metric}_ci95_low", f"{metric}_ci95_high"
        if low not in points:
            continue
        for _, p in points.iterrows():
            mean, half = p[metric], (p[high] - p[low]) / 2
            if not _missing(mean) and not _missing(half) and half > WIDE * abs(mean):
                rows.append([p["config"], _load_text(p, experiment), f"`{metric}`", fmt_metric(metric, mean),
                             f"±{fmt_metric(metric, half)} ({half / abs(mean):.0%})"])
    return rows


def few_replication_rows(points: pd.DataFrame, experiment: dict) -> list[list[str]]:
    """Points that ran fewer than 2 replications, so have no interval."""
    few = points[points["replications"] < 2] if "replications" in points else points.iloc[0:0]
    return [[str(p["point"]), p["config"], _load_text(p, experiment), str(int(p["replications"]))]
            for _, p in few.iterrows()]


def caveats(sweep: Sweep) -> list[Block]:
    """The caveats section: unstable, failed, wide-interval and single-replication points."""
    exp, points = sweep.experiment, sweep.points
    out: list[Block] = [Heading(2, "Caveats")]
    sections = [
        ("Unstable points", "Some endpoint's offered utilisation is 1 or more: queues grow for as long as the "
         "run lasts, so these latencies depend on the run length, not only on the config.",
         ["Point", "Config", "Offered load", "Offered utilisation"], unstable_rows(points, exp)),
        ("Failed points", "These points produced no metrics; they are missing from the figures.",
         ["Point", "Config", "Load", "Error"], failed_rows(sweep)),
        ("Wide intervals", f"SLO metrics whose 95% interval half-width is above {WIDE:.0%} of the mean; more "
         "replications or a longer duration would narrow them.",
         ["Config", "Offered load", "Metric", "Mean", "95% half-width"], wide_rows(points, exp)),
        ("Fewer than 2 replications", "No confidence interval: SLO checks on these points use the mean alone.",
         ["Point", "Config", "Offered load", "Replications"], few_replication_rows(points, exp)),
    ]
    if sweep.capacity is not None:
        sections.insert(2, ("Failed capacity searches", "These configs have no capacity figure.",
                            ["Config", "Error"], failed_search_rows(sweep)))
    for title, why, headers, rows in sections:
        out.append(Heading(3, f"{title} ({len(rows)})"))
        if rows:
            out += [Para(why), Table(headers, _capped(rows, len(headers)))]
        else:
            out.append(Para("None."))
    return out


def build_report(sweep: Sweep, figures: FigureSet) -> list[Block]:
    """The whole review as blocks, rendered to Markdown and HTML alike."""
    exp = sweep.experiment
    name = exp.get("name") or exp.get("workload_name") or sweep.directory.name
    # (An experiment called capacity-review would read "Capacity review: capacity-review".)
    said = str(name).replace("-", " ").replace("_", " ").strip().lower() == "capacity review"
    blocks: list[Block] = [Heading(1, "Capacity review" if said else f"Capacity review: {name}")]
    if exp.get("description"):
        blocks.append(Para(str(exp["description"])))
    blocks += [Para(answer(sweep), css="answer"), Heading(2, "What was simulated"), Bullets(simulated(sweep))]
    table = capacity_table(sweep)
    if table is not None:
        blocks += [Heading(2, "Capacity"), table]
    blocks.append(Heading(2, "Figures"))
    for fig in figures.made:
        blocks += [Heading(3, fig.title), FigureBlock(fig)]
    if figures.skipped:
        blocks.append(Bullets([f"Skipped: {title}: {why}." for title, why in figures.skipped.items()]))
    return blocks + caveats(sweep)


# --------------------------------------------------------------------------- rendering


_CODE_SPAN = re.compile(r"`[^`]+`")  # the only markup the report's text uses (as in _inline below)
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&#|~$])")
_MD_LINE_START = re.compile(r"^(?:([-+])|(\d+)([.)]))(?=\s|$)")  # would start a list item


def _md_text(text: str, table: bool = False) -> str:
    """Text for Markdown: `code` spans kept, every other Markdown or HTML special character backslash-escaped.

    Names and descriptions come from the user's files: `<script>` in one must stay
    text, and `$...$` must not become math (GitHub renders it). Inside a table a
    `|` splits the cell even in a code span, so there it is escaped everywhere.
    """
    text = re.sub(r"\s*[\r\n]+\s*", " ", text)  # one line: a name must not start a block of its own
    parts, last = [], 0
    # A span holding <, > or & is left as escaped text: report.md carries no raw HTML, even as code.
    for span in (m for m in _CODE_SPAN.finditer(text) if not re.search(r"[<>&]", m.group())):
        parts += [_MD_SPECIAL.sub(r"\\\1", text[last:span.start()]), span.group()]
        last = span.end()
    parts.append(_MD_SPECIAL.sub(r"\\\1", text[last:]))
    parts[0] = _MD_LINE_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", parts[0])
    out = "".join(parts)
    return re.sub(r"(?<!\\)\|", r"\\|", out) if table else out


def _md_cell(text: str) -> str:
    return _md_text(text, table=True)


def render_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown, with figures linked relative to `base` (the sweep folder); user text escaped."""
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {_md_text(b.text)}")
        elif isinstance(b, Para):
            out.append(_md_text(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_md_cell, b.headers)) + " |", "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, FigureBlock):
            png, svg = (quote(_relative(p, base)) for p in (b.figure.png, b.figure.svg))
            out.append(f"![{_md_text(b.figure.title)}]({png})\n\n{_md_text(b.figure.caption)} ([SVG]({svg}))")
    return "\n\n".join(out) + "\n"


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


CSS = """
body{font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#fff;
max-width:1180px;margin:2rem auto;padding:0 1.2rem}
h1{font-size:1.7rem;border-bottom:2px solid #ddd;padding-bottom:.3rem}
h2{font-size:1.3rem;margin-top:2.2rem;border-bottom:1px solid #eee;padding-bottom:.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}
p.answer{background:#eef5ff;border-left:4px solid #2f6fd6;padding:.7rem 1rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d5d7db;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f3f5}tr:nth-child(even) td{background:#fafafa}
figure{margin:1rem 0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9rem;margin-top:.3rem}
code{background:#f2f3f5;padding:0 .25rem;border-radius:3px;font-size:.9em}
"""


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only markup the report's text uses)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_inline(fig.caption)}</figcaption></figure>")


def render_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG data URIs, nothing fetched."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            css = f' class="{b.css}"' if b.css else ""
            body.append(f"<p{css}>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, FigureBlock):
            body.append(_figure_html(b.figure))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(directory: Union[str, Path]) -> tuple[Path, Path]:
    """Draw the figures into DIR/figures and write DIR/report.md and DIR/report.html; return both paths."""
    sweep = load_sweep(directory)
    figures = make_figures(sweep.points, sweep.experiment, sweep.directory / "figures", sweep.capacity)
    blocks = build_report(sweep, figures)
    md, page = sweep.directory / "report.md", sweep.directory / "report.html"
    md.write_text(render_markdown(blocks, sweep.directory), encoding="utf-8")
    title = blocks[0].text if isinstance(blocks[0], Heading) else "Capacity review"
    page.write_text(render_html(blocks, title), encoding="utf-8")
    return md, page
