"""experiments/context-ab.yaml and the cost-quality figure with one Pareto panel per quality dimension.

The experiment is checked as shipped (it validates, its variants set what its header says), then run
shortened (600 s, 2 replications) to see the trade-off it is there to show: expanded context buys
groundedness and citation accuracy at a price, escalation buys correct answers at a higher one.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.experiments.spec import load_experiment
from sim.report.figures import (
    OPTIONAL,
    QUALITY_DIMENSIONS,
    make_figures,
    plot_cost_quality,
    quality_dimensions,
    quality_frontier,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "context-ab.yaml"
DIMENSIONS = ["quality_good_share", "quality_correct_share", "quality_grounded_mean", "quality_citation_mean",
              "quality_useful_mean"]


def test_context_ab_validates_and_its_variants_set_the_three_policies(capsys):
    assert main(["sweep", str(EXPERIMENT), "--dry-run"]) == 0
    assert "3 points of 5 replication(s)" in capsys.readouterr().out
    exp = load_experiment(EXPERIMENT)
    points = {p.variant: exp.point_workload(p) for p in exp.points()}
    assert list(points) == ["minimal", "expanded", "escalation"]
    minimal, expanded, escalation = (points[v].pipeline for v in ("minimal", "expanded", "escalation"))
    assert minimal.escalation is None and expanded.escalation is None
    assert minimal.budget.sections["retrieved"].max_tokens == 1500
    assert expanded.budget.sections["retrieved"].max_tokens is None
    # Expanded: the prompt limit holds every section at its largest drawn retrieved context (6,000 tokens).
    assert expanded.budget.prompt_limit_tokens > minimal.budget.prompt_limit_tokens + 6000
    assert escalation.escalation is not None and escalation.router is not None
    assert escalation.budget.sections["retrieved"].max_tokens == 1500
    # The same router in all three, so the variants differ only in their context policy.
    assert minimal.router == expanded.router == escalation.router
    assert set(exp.spec.metrics) >= {"cost_per_1k_usd", "ttft_p95_s", "e2e_p95_s", "escalation_rate",
                                     "model_calls_per_request", *DIMENSIONS[1:]}


def test_every_quality_dimension_of_the_summary_has_a_panel():
    from sim.metrics.summary import QUALITY_METRICS

    assert set(QUALITY_METRICS) <= set(QUALITY_DIMENSIONS)
    assert list(QUALITY_DIMENSIONS) == DIMENSIONS  # panel order: good answers first, as the run summary prints
    for metric, (title, label) in QUALITY_DIMENSIONS.items():
        assert metric not in label and "_" not in title + label  # words, not metric ids


def test_quality_frontier_keeps_exactly_the_cheaper_and_better_points():
    costs = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0, 1.5, math.nan, 0.5]
    quality = [0.70, 0.80, 0.75, 0.80, 0.90, 0.85, 0.60, 0.99, math.nan]
    # 2 (0.75 at 2) loses to 1 (0.80 at 2); 3 loses to 1 (same quality, costlier); 6 loses to 0 (cheaper,
    # better); 7 and 8 have a NaN. Ordered by rising quality, so by rising cost.
    assert quality_frontier(costs, quality) == [0, 1, 5, 4]
    assert quality_frontier([1.0, 1.0], [0.5, 0.5]) == [0]  # identical points: the first
    assert quality_frontier([2.0, 1.0], [0.9, 0.9]) == [1]  # same quality: the cheaper
    assert quality_frontier([1.0, 2.0], [0.9, 0.8]) == [0]  # cheaper and better beats all
    assert quality_frontier([], []) == []


def synthetic_points(dims: list[str], with_ci: bool = True) -> pd.DataFrame:
    """Three configs, one point each: cheap and plain, grounded at a price, correct at a higher one."""
    values = {"quality_good_share": [0.74, 0.74, 0.80], "quality_correct_share": [0.74, 0.74, 0.80],
              "quality_grounded_mean": [0.45, 0.87, 0.48], "quality_citation_mean": [0.49, 0.95, 0.53],
              "quality_useful_mean": [0.82, 0.82, 0.86]}
    frame = pd.DataFrame({"point": [0, 1, 2], "variant": ["minimal", "expanded", "escalation"],
                          "config": ["minimal", "expanded", "escalation"], "offered_load_rps": [6.0] * 3,
                          "cost_per_1k_usd": [2.65, 3.78, 4.46], **{d: values[d] for d in dims}})
    if with_ci:
        for metric in ["cost_per_1k_usd", *dims]:
            frame[f"{metric}_ci95_low"] = frame[metric] * 0.99
            frame[f"{metric}_ci95_high"] = frame[metric] * 1.01
    return frame


EXPERIMENT_DICT = {"name": "context-ab", "axes": {}, "variants": {"minimal": [], "expanded": [], "escalation": []},
                   "load_axis": "traffic.rate_scale", "slo": {}}


def test_cost_quality_figure_draws_one_panel_per_dimension_in_words(tmp_path):
    points = synthetic_points(DIMENSIONS)
    _, svg = plot_cost_quality(points, EXPERIMENT_DICT, tmp_path)
    text = svg.read_text()
    for title, label in QUALITY_DIMENSIONS.values():
        assert f">{title}</text>" in text and f">{label}</text>" in text
    assert ">cost per 1k requests (USD)</text>" in text
    assert ">Pareto frontier (cheaper and better)</text>" in text
    assert "quality_grounded_mean" not in text  # no metric id on the page
    assert ">80%</text>" in text or ">80.0%</text>" in text  # shares read in %

    # Only the dimensions the sweep has: a workload without a router has no good-answers share.
    no_router = points.drop(columns=[c for c in points if c.startswith("quality_good_share")])
    assert quality_dimensions(no_router) == DIMENSIONS[1:]
    _, svg = plot_cost_quality(no_router, EXPERIMENT_DICT, tmp_path)
    assert ">good answers</text>" not in svg.read_text() and ">groundedness</text>" in svg.read_text()


def test_cost_quality_figure_is_drawn_for_any_quality_dimension_and_skipped_without(tmp_path):
    assert set(OPTIONAL["cost_vs_quality"]) == set(DIMENSIONS)
    only_grounded = synthetic_points(["quality_grounded_mean"], with_ci=False)
    made = make_figures(only_grounded, EXPERIMENT_DICT, tmp_path)
    assert "cost_vs_quality" in [f.name for f in made.made]
    none = only_grounded.drop(columns="quality_grounded_mean")
    assert "cost_vs_quality" not in [f.name for f in make_figures(none, EXPERIMENT_DICT, tmp_path).made]
    all_nan = only_grounded.assign(quality_grounded_mean=np.nan)  # the column, but no value: said why
    skipped = make_figures(all_nan, EXPERIMENT_DICT, tmp_path).skipped
    assert "answer-quality metric" in skipped["Cost vs answer quality"]


def test_cost_quality_figure_on_a_grid_notes_each_frontier_point(tmp_path):
    """Configs with several points (along an axis) get notes naming the axis value on the frontier."""
    experiment = {"name": "q", "axes": {"pipeline.output_cache.deterministic_share": [0.0, 0.4],  # the x axis
                                        "pipeline.router.policy": ["fixed", "threshold"]},
                  "variants": {}, "load_axis": "traffic.rate_scale", "slo": {}}
    points = pd.DataFrame({
        "point": [0, 1, 2, 3], "variant": ["base"] * 4,
        "config": ["policy=fixed", "policy=fixed", "policy=threshold", "policy=threshold"],
        "pipeline.output_cache.deterministic_share": [0.0, 0.4, 0.0, 0.4],
        "pipeline.router.policy": ["fixed", "fixed", "threshold", "threshold"],
        "cost_per_1k_usd": [5.1, 4.4, 6.5, 5.7], "quality_correct_share": [0.787, 0.785, 0.798, 0.797]})
    _, svg = plot_cost_quality(points, experiment, tmp_path)
    text = svg.read_text()
    # The frontier: (4.4, 0.785), (5.1, 0.787), (5.7, 0.797), (6.5, 0.798): every point, each noted.
    assert quality_frontier(points["cost_per_1k_usd"], points["quality_correct_share"]) == [1, 0, 3, 2]
    assert text.count(">deterministic_share=0.4</text>") == 2 and text.count(">deterministic_share=0</text>") == 2


@pytest.fixture(scope="module")
def short_sweep(tmp_path_factory) -> Path:
    """context-ab as shipped but 600 s of arrivals and 2 replications a point (a few seconds)."""
    folder = tmp_path_factory.mktemp("context-ab")
    spec = yaml.safe_load(EXPERIMENT.read_text())
    spec["workload"] = str(ROOT / "workloads" / "rag-support.yaml")
    spec["replications"] = 2
    for overrides in spec["variants"].values():
        overrides["simulation.duration_s"] = 600
    path = folder / "context-ab.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    from sim.experiments.sweep import sweep
    from sim.report.review import write_report

    result = sweep(path, out=folder / "out", workers=2, progress=False)
    assert result.failed == 0
    write_report(folder / "out")
    return folder / "out"


def test_short_context_ab_sweep_shows_the_trade_off(short_sweep):
    from sim.metrics.summary import aggregate_points

    points = aggregate_points(pd.read_parquet(short_sweep / "results.parquet"), ["point", "variant"])
    p = points.set_index("variant")
    minimal, expanded, escalation = p.loc["minimal"], p.loc["expanded"], p.loc["escalation"]
    # Expanded context: more of the evidence kept, so better grounded and cited, and dearer (gpt-4o reads it).
    assert expanded["quality_grounded_mean"] > minimal["quality_grounded_mean"] + 0.3
    assert expanded["quality_citation_mean"] > minimal["quality_citation_mean"] + 0.3
    assert expanded["cost_per_1k_usd"] > minimal["cost_per_1k_usd"] * 1.2
    assert expanded["budget_truncated_share"] < 0.01 and minimal["budget_truncated_share"] > 0.8
    # Correctness is the tier's verdict, so context alone does not move it; escalation does, at a price.
    assert abs(expanded["quality_correct_share"] - minimal["quality_correct_share"]) < 0.01
    assert escalation["quality_correct_share"] > minimal["quality_correct_share"] + 0.03
    assert escalation["quality_useful_mean"] > minimal["quality_useful_mean"]
    assert escalation["cost_per_1k_usd"] > minimal["cost_per_1k_usd"] * 1.2
    assert escalation["escalation_rate"] > 0.05 and minimal["escalation_rate"] == expanded["escalation_rate"] == 0
    assert escalation["model_calls_per_request"] > minimal["model_calls_per_request"]
    assert escalation["ttft_p95_s"] > minimal["ttft_p95_s"]  # an escalated answer starts after the first one
    # Each dimension has its own frontier: groundedness is bought with context, correctness with escalation.
    def on(metric: str) -> set[str]:
        return set(points["variant"].iloc[quality_frontier(points["cost_per_1k_usd"], points[metric])])

    assert {"minimal", "expanded"} <= on("quality_grounded_mean") and {"minimal", "expanded"} <= on(
        "quality_citation_mean")
    assert {"minimal", "escalation"} <= on("quality_correct_share")
    # Escalation and expanded context cost about the same (which is cheaper depends on the traffic drawn),
    # so whether escalation sits on the groundedness frontier is left open.


def test_short_context_ab_report_has_the_multi_dimension_figure(short_sweep):
    svg = (short_sweep / "figures" / "cost_vs_quality.svg").read_text()
    for title, label in QUALITY_DIMENSIONS.values():
        assert f">{title}</text>" in svg and f">{label}</text>" in svg
    assert (short_sweep / "figures" / "cost_vs_quality.png").stat().st_size > 20_000
    md = (short_sweep / "report.md").read_text()
    assert "figures/cost_vs_quality.png" in md and "figures/cost_vs_latency.png" in md
    assert "Pareto frontier" in md
