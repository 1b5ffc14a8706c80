"""The plan's outputs for people: the terminal summary, and report.md / report.html with its figures.

Everything here reads plan.json (what `llmsim plan` wrote); nothing runs the simulator.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sim.config.loader import ConfigError  # noqa: E402
from sim.experiments.plan.planner import deployment, gpus  # noqa: E402
from sim.experiments.spec import pessimistic  # noqa: E402
from sim.metrics.summary import HOURS_PER_MONTH  # noqa: E402

from .figures import (  # noqa: E402
    _RC,
    FAILED,
    Figure,
    FigureSet,
    SkipFigure,
    _auto_log,
    _legend_beside,
    _save,
    metric_words,
)
from .review import (  # noqa: E402
    Bullets,
    FigureBlock,
    Heading,
    Para,
    Table,
    fmt_latency,
    fmt_usd,
    read_json_object,
    render_html,
    render_markdown,
    require_folder,
    significant,
    slo_text,
)

LATENCIES = {"ttft_p95_s": "TTFT p95", "ttft_p99_s": "TTFT p99", "tpot_p95_s": "TPOT p95", "tpot_p99_s": "TPOT p99",
             "e2e_p95_s": "e2e p95", "e2e_p99_s": "e2e p99"}


def ranked(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates' records in ranking order (sized ones cheapest first, then the rest)."""
    by_index = {r["index"]: r for r in doc["candidates"]}
    return [by_index[i] for i in doc.get("ranking", sorted(by_index))]


def _with_interval(probe: dict[str, Any], metric: str) -> str:
    value = probe.get(metric)
    low, high = probe.get(f"{metric}_ci95_low"), probe.get(f"{metric}_ci95_high")
    if low is None or high is None:
        return fmt_latency(value)
    return f"{fmt_latency(value)} [{fmt_latency(low)}, {fmt_latency(high)}]"


def ranking_table(doc: dict[str, Any], intervals: bool = True) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the sized candidates, cheapest first."""
    headers = ["#", "deployment", "GPUs", "$/hour", "$/month", "$/1k requests"]
    headers += list(LATENCIES.values()) + ["headroom"]
    rows = []
    for rank, r in enumerate((r for r in ranked(doc) if r["status"] == "ok"), 1):
        peak = r["at_peak"]
        room, metric = r["headroom"], r["headroom_metric"]
        cells = [str(rank), deployment(r), str(gpus(r) or "–"), fmt_usd(r["cost_per_hour_usd"]),
                 fmt_usd(r["cost_per_hour_usd"] * HOURS_PER_MONTH), fmt_usd(peak.get("cost_per_1k_usd"))]
        cells += [_with_interval(peak, m) if intervals else fmt_latency(peak.get(m)) for m in LATENCIES]
        cells.append(f"{room:.0%} ({metric})" if math.isfinite(room) else "–")
        rows.append(cells)
    return headers, rows


def others_table(doc: dict[str, Any]) -> list[list[str]]:
    """Candidates not sized: pruned from the config, stopped early, failing the SLO, or in error."""
    return [[r["name"], r["status"], r.get("reason", "")] for r in ranked(doc) if r["status"] != "ok"]


def counts_text(doc: dict[str, Any]) -> str:
    """'Simulated 12 of the 146 points a brute-force search would (8%); candidates 4 stopped early.'"""
    statuses = [r["status"] for r in doc["candidates"]]
    simulated, space = doc.get("simulated_points", 0), doc.get("space_points", 0)
    share = f" ({simulated / space:.0%})" if space else ""
    parts = [f"{statuses.count(s)} {word}" for s, word in (("pruned", "pruned from the config alone"),
                                                           ("stopped", "stopped early"), ("fails", "failing the SLO"),
                                                           ("error", "in error")) if statuses.count(s)]
    return (f"Simulated {simulated:,} of the {space:,} points a brute-force search would{share}"
            + (f"; candidates {', '.join(parts)}" if parts else "") + ".")


def format_plan(doc: dict[str, Any]) -> str:
    """The terminal's summary: the answer, the ranking (no intervals) and the counts."""
    headers, rows = ranking_table(doc, intervals=False)
    lines = [doc["answer"], ""]
    if rows:
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
        for row in [headers] + rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        lines.append("")
    for name, status, reason in others_table(doc):
        lines.append(f"{name}: {status}: {reason}")
    lines.append(counts_text(doc))
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _finite(value: Any) -> bool:
    """A number to plot (plan.json keeps a missing or NaN metric as null)."""
    return value is not None and math.isfinite(value)


def plot_frontier(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Cost per hour against latency of every probe at the busiest load, the Pareto frontier and the answer."""
    metric, peak = doc["frontier_metric"], doc["periods"][0]["load"]
    points = [(r, p) for r in doc["candidates"] for p in r["probes"] if p["load"] == peak
              and p.get("cost_per_hour_usd") is not None and _finite(pessimistic(p, metric, "max"))]
    if not points:
        raise SkipFigure("no candidate was simulated at the busiest load")
    value = [pessimistic(p, metric, "max") for _, p in points]
    cost = [p["cost_per_hour_usd"] for _, p in points]
    best = doc.get("best")
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.5, 5.2), layout="constrained")
        names = list(dict.fromkeys(r["name"] for r, _ in points))
        colours = {n: plt.cm.tab10(k % 10) for k, n in enumerate(names)}
        for name in names:
            ok = [(v, c) for (r, p), v, c in zip(points, value, cost) if r["name"] == name and p["met"]]
            if ok:
                ax.plot(*zip(*ok), "o", color=colours[name], markersize=5, label=name)
        failing = [(v, c) for (_, p), v, c in zip(points, value, cost) if not p["met"]]
        if failing:
            ax.plot(*zip(*failing), "o", markersize=6, label="fails the SLO", **FAILED)
        front = doc["frontier"]
        ax.plot([f[metric] for f in front], [f["cost_per_hour_usd"] for f in front], color="black",
                drawstyle="steps-post", linewidth=1.2, marker="o", markersize=10, markerfacecolor="none",
                label="Pareto frontier")
        for f in front:
            label = f"{f['replicas']} x {f['candidate']}" if f.get("replicas") else f["candidate"]
            ax.annotate(label, (f[metric], f["cost_per_hour_usd"]), fontsize=7, xytext=(6, 4),
                        textcoords="offset points")
        chosen = [(v, c) for (r, p), v, c in zip(points, value, cost)
                  if r["index"] == best and p["replicas"] == r.get("peak_replicas")]
        if chosen:
            ax.plot(*chosen[0], "*", color="gold", markeredgecolor="black", markersize=16, label="the answer")
        bound = (doc["slo"].get(metric) or {}).get("max")
        if bound is not None:
            ax.axvline(bound, color="crimson", linestyle="-.", label=f"SLO: {metric} ≤ {bound:g} s")
        _auto_log(ax, value, axis="x")
        _auto_log(ax, cost, axis="y")
        ax.set(title=f"{doc['name']}: cost vs {metric_words(metric)} at the busiest load\n"
                     "(every simulated probe, pessimistic end of the 95% interval; lower left is better)",
               xlabel=f"{metric_words(metric)}, upper 95% bound (s)", ylabel="cost per hour (USD/h)")
        _legend_beside(ax)
        return _save(fig, out_dir, "plan_frontier")


def plot_day(doc: dict[str, Any], out_dir: Path, shown: int = 8) -> list[Path]:
    """A forecast's cost over the day: each sized candidate's dollars per period, stacked, cheapest first."""
    if not doc.get("forecast"):
        raise SkipFigure("the plan has one target load, not a forecast")
    sized = [r for r in ranked(doc) if r["status"] == "ok"][:shown]
    if not sized:
        raise SkipFigure("no candidate meets the SLO")
    periods = doc["periods"]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(sized) + 2.0), layout="constrained")
        left = np.zeros(len(sized))
        for k, period in enumerate(periods):
            key = str(float(period["load"]))
            dollars = np.array([r["hourly_usd_by_load"].get(key, math.nan) * period["hours"] for r in sized])
            ax.barh(range(len(sized)), dollars, left=left, color=plt.cm.Blues(0.35 + 0.5 * k / max(len(periods), 1)),
                    label=f"{period['hours']:g} h at load {period['load']:g}")
            left += dollars
        ax.set_yticks(range(len(sized)), [deployment(r) for r in sized])
        ax.invert_yaxis()
        ax.set(title=f"{doc['name']}: cost over the forecast day", xlabel="USD per day")
        _legend_beside(ax)
        return _save(fig, out_dir, "plan_day")


def make_plan_figures(doc: dict[str, Any], out_dir: Path) -> FigureSet:
    metric = metric_words(doc["frontier_metric"])
    made = FigureSet()
    specs = [
        ("plan_frontier", "Cost vs latency at the busiest load", plot_frontier,
         f"Every simulated probe at the busiest load: cost per hour against {metric} (upper 95% bound), the "
         "Pareto frontier in black, probes failing the SLO hollow and grey, the answer starred."),
        ("plan_day", "Cost over the forecast day", plot_day,
         "Each sized candidate's dollars per forecast period, stacked, cheapest first."),
    ]
    for name, title, draw, caption in specs:
        try:
            made.made.append(Figure(name, title, caption, draw(doc, out_dir)))
        except SkipFigure as why:
            made.skipped[title] = str(why)
    return made


# --------------------------------------------------------------------------- the report


def _simulated(doc: dict[str, Any]) -> list[str]:
    periods = doc["periods"]
    axis = doc["load_axis"].rsplit(".", 1)[-1]
    base = doc.get("base_load_rps")
    loads = ", ".join(f"{p['hours']:g} h at {axis} {p['load']:g}" + (f" ({p['load'] * base:.3g} req/s)" if base
                                                                        else "") for p in periods)
    slo = "; ".join(slo_text(m, b) for m, b in doc["slo"].items())
    return [
        f"Workload `{doc['workload_file']}`, endpoint `{doc['endpoint']}` provisioned; {loads}.",
        f"SLO, judged on the pessimistic end of each metric's 95% interval at every load: {slo}.",
        f"{doc['replications']} replications of {significant(doc['duration_s'])} s per probe (warm-up "
        f"{significant(doc['warmup_s'])} s), seed {doc['seed']}: every probe sees the same traffic.",
        f"{len(doc['candidate_list'])} candidates; the {doc['keep']} cheapest ranked in full, the rest stopped "
        "as soon as they cannot beat them. " + counts_text(doc),
    ]


def build_plan_report(doc: dict[str, Any], figures: FigureSet) -> list:
    blocks: list = [Heading(1, f"Deployment plan: {doc['name']}")]
    if doc.get("description"):
        blocks.append(Para(str(doc["description"])))
    blocks += [Para(doc["answer"], css="answer"), Heading(2, "What was planned"), Bullets(_simulated(doc))]
    headers, rows = ranking_table(doc)
    if rows:
        blocks += [Heading(2, "Ranking"), Para("Latencies at the busiest load: value [95% interval]. Headroom: "
                                               "the smallest margin to an SLO bound, and its metric."),
                   Table(headers, rows)]
    others = others_table(doc)
    if others:
        blocks += [Heading(2, "Not in the ranking"), Table(["candidate", "status", "why"], others)]
    blocks.append(Heading(2, "Figures"))
    for fig in figures.made:
        blocks += [Heading(3, fig.title), FigureBlock(fig)]
    if figures.skipped:
        blocks.append(Bullets([f"Skipped: {title}: {why}." for title, why in figures.skipped.items()]))
    return blocks


def write_plan_report(directory: Union[str, Path]) -> tuple[Path, Path]:
    """Draw the figures into DIR/figures and write DIR/report.md and DIR/report.html; return both paths."""
    directory = Path(directory)
    require_folder(directory)
    doc = read_json_object(directory / "plan.json")
    if doc.get("finished") is None:
        raise ConfigError([f"{directory / 'plan.json'}: the plan did not finish; run it again with --resume"])
    blocks = build_plan_report(doc, make_plan_figures(doc, directory / "figures"))
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(render_markdown(blocks, directory), encoding="utf-8")
    page.write_text(render_html(blocks, blocks[0].text), encoding="utf-8")
    return md, page
