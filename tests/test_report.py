"""Figures and the capacity-review report, on a small synthetic sweep folder built here.

The folder follows the sweep output contract (experiment.json, results.parquet,
capacity.json) without running the simulator: reporting only reads files.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.cli import main
from sim.metrics.stats import pareto_frontier
from sim.report.figures import (
    FIGURES,
    OPTIONAL,
    FigureSet,
    config_label,
    make_figures,
    plot_latency,
    prepare_points,
    short_names,
)
from sim.report.review import answer, build_report, fmt_latency, fmt_usd, load_sweep, render_markdown

BASE_RPS = 5.5
REPLICAS, LOADS = (1, 2), (0.5, 1.0, 1.5, 2.0)
SERVER_RPS = 6.0  # one replica's throughput ceiling in the synthetic model
FAILED = (1, 2.0)  # (replicas, load) of the point that fails
SINGLE = (2, 0.5)  # the point with one replication only
NOISY = (2, 1.5)  # the point whose TTFT interval is wide
ERROR = "RuntimeError: engine stalled at step 42"

WORKLOAD = {
    "version": 1, "name": "chat-selfhosted", "description": None,
    "simulation": {"duration_s": 600.0, "warmup_s": 60.0, "seed": 1, "replications": 3},
    "traffic": {"rate_scale": 1.0, "classes": {"chat": {
        "arrival": {"kind": "poisson", "rate_rps": BASE_RPS},
        "prompt_tokens": {"kind": "lognormal", "mean": None, "median": 1020.0, "p95": 4083.0, "mu": 6.9, "sigma": 0.84},
        "output_tokens": {"kind": "constant", "value": 129.0},
        "endpoint": "llama8b"}}},
    "models": {"llama8b": {"kind": "self_hosted", "replicas": 2, "max_batch": 256, "gpu_hourly_usd": 3.0,
                           "engine": {"max_batch_tokens": 8192}, "service_time": None}},
    "slo": {"ttft_s": 1.0, "e2e_s": 10.0},
}

ALWAYS = [f for f in FIGURES if f[0] not in OPTIONAL]  # drawn for every sweep; the rest need their metric


def experiment(**changes) -> dict:
    exp = {
        "name": "replicas-vs-load", "description": "How many replicas for 1.5x traffic?",
        "experiment_file": "experiments/replicas.yaml", "workload_file": "workloads/chat-selfhosted.yaml",
        "workload_name": "chat-selfhosted", "seed": 1, "replications": 3, "combine": "grid",
        "axes": {"models.llama8b.replicas": list(REPLICAS), "traffic.rate_scale": list(LOADS)},
        "variants": {}, "load_axis": "traffic.rate_scale", "base_load_rps": BASE_RPS,
        "slo": {"ttft_p95_s": {"max": 1.0, "min": None}},
        "capacity": {"target": 1.5, "low": 0.25, "high": 4.0, "tolerance": 0.02},
        "workload": WORKLOAD, "warmup_s": 60.0, "duration_s": 600.0,
        "started": "2025-01-01T10:00:00", "finished": "2025-01-01T10:05:00",
    }
    exp.update(changes)
    return exp


def metrics(replicas: int, load: float, rng: np.random.Generator, noise: float) -> dict:
    """Queue-like numbers: latency grows as rho / (1 - rho), and explodes past rho = 1."""
    offered = load * BASE_RPS
    rho = offered / (SERVER_RPS * replicas)
    wait = 0.1 * rho / (1 - rho) if rho < 1 else 20.0 * rho
    jitter = lambda: 1 + noise * rng.standard_normal()  # noqa: E731
    row = {"throughput_rps": min(offered, SERVER_RPS * replicas) * jitter(),
           "goodput_rps": min(offered, SERVER_RPS * replicas) * (0.98 if rho < 1 else 0.1)}
    for measure, base in (("queue_wait", 0.0), ("ttft", 0.05), ("e2e", 1.2)):
        for stat, factor in (("mean", 1.0), ("p50", 0.7), ("p90", 2.0), ("p95", 2.6), ("p99", 4.0), ("p999", 6.0)):
            row[f"{measure}_{stat}_s"] = (base + wait) * factor * jitter()
    hourly = 3.0 * replicas
    row.update({
        "tokens_in_per_s": 1400 * row["throughput_rps"], "tokens_out_per_s": 170 * row["throughput_rps"],
        "utilisation_llama8b": min(0.99, 0.3 + rho), "batch_mean_llama8b": 1 + 8 * min(rho, 1.2),
        "offered_utilisation_llama8b": rho, "cost_total_usd": hourly * 540 / 3600,
        "cost_per_hour_usd": hourly, "cost_per_request_usd": hourly / 3600 / row["throughput_rps"],
        "requests_arrived": offered * 540, "requests_completed": row["throughput_rps"] * 540,
        "requests_rejected": 0.0, "warmup_s": 60.0,
    })
    row["cost_per_1k_usd"] = row["cost_per_request_usd"] * 1000
    return row


def results_frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows, point = [], 0
    metric_names = list(metrics(1, 1.0, rng, 0.0))
    for replicas in REPLICAS:
        for load in LOADS:
            key = {"point": point, "point_key": f"k{point:04d}", "variant": "base",
                   "models.llama8b.replicas": replicas, "traffic.rate_scale": load}
            if (replicas, load) == FAILED:
                rows.append({**key, "replication": -1, "seed": 1, "status": "failed", "error": ERROR + "\n  at engine",
                             "runtime_s": 0.1, "offered_load_rps": load * BASE_RPS,
                             **{m: math.nan for m in metric_names}})
            else:
                reps = 1 if (replicas, load) == SINGLE else 3
                noise = 0.5 if (replicas, load) == NOISY else 0.02
                rows += [{**key, "replication": r, "seed": 1, "status": "ok", "error": "", "runtime_s": 1.5,
                          "offered_load_rps": load * BASE_RPS, **metrics(replicas, load, rng, noise)}
                         for r in range(reps)]
            point += 1
    return pd.DataFrame(rows)


CAPACITY = {
    "target": 1.5, "load_axis": "traffic.rate_scale",
    "configs": [
        {"variant": "base", "values": {"models.llama8b.replicas": 1}, "max_load": 0.95, "max_load_rps": 5.225,
         "bracket": [0.93, 0.95], "limited_by": "ttft_p95_s", "utilisation": {"llama8b": 0.87},
         "cost_per_1k_usd": 0.16, "cost_per_hour_usd": 3.0,
         "at_target": {"slo_met": False, "cost_per_hour_usd": 3.0, "cost_per_1k_usd": 0.139, "ttft_p95_s": 52.0},
         "probes": [{"load": 0.5, "met": True}, {"load": 1.5, "met": False}]},
        {"variant": "base", "values": {"models.llama8b.replicas": 2}, "max_load": 2.05, "max_load_rps": 11.275,
         "bracket": [2.0, 2.05], "limited_by": "ttft_p95_s", "utilisation": {"llama8b": 0.93},
         "cost_per_1k_usd": 0.148, "cost_per_hour_usd": 6.0,
         "at_target": {"slo_met": True, "cost_per_hour_usd": 6.0, "cost_per_1k_usd": 0.202, "ttft_p95_s": 0.71},
         "probes": [{"load": 1.5, "met": True}, {"load": 2.5, "met": False}]},
    ],
    "cheapest_at_target": {"variant": "base", "values": {"models.llama8b.replicas": 2}, "cost_per_hour_usd": 6.0},
}


def write_sweep(folder: Path, exp: dict, results: pd.DataFrame, capacity: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.json").write_text(json.dumps(exp))
    results.to_parquet(folder / "results.parquet", index=False)
    if capacity is not None:
        (folder / "capacity.json").write_text(json.dumps(capacity))
    return folder


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep"), experiment(), results_frame(), CAPACITY)


@pytest.fixture(scope="module")
def cli_output(sweep_dir) -> list[str]:
    """`llmsim report DIR` run once for the module: drawing the figures is the slow part."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(sweep_dir)]) == 0
    return out.getvalue().split()


@pytest.fixture(scope="module")
def report(sweep_dir, cli_output) -> tuple[str, str]:
    return (sweep_dir / "report.md").read_text(), (sweep_dir / "report.html").read_text()


# --------------------------------------------------------------------------- Pareto frontier


def test_pareto_frontier_keeps_exactly_the_undominated_points():
    #            0    1    2    3    4    5    6
    costs = [10.0, 8.0, 8.0, 5.0, 12.0, 5.0, 3.0]
    lats = [1.0, 2.0, 3.0, 4.0, 0.5, 4.0, 9.0]
    # 2 is beaten by 1 (same cost, faster); 5 duplicates 3 (the first is kept).
    assert pareto_frontier(costs, lats) == [4, 0, 1, 3, 6]


def test_pareto_frontier_edge_cases():
    assert pareto_frontier([], []) == []
    assert pareto_frontier([1.0], [1.0]) == [0]
    assert pareto_frontier([1.0, 2.0], [1.0, 2.0]) == [0]  # cheaper and faster beats all
    assert pareto_frontier([2.0, 1.0], [1.0, 1.0]) == [1]  # same latency: the cheaper one
    assert pareto_frontier([math.nan, 2.0, 1.0], [0.1, math.nan, 3.0]) == [2]  # NaN points are ignored


# --------------------------------------------------------------------------- labels and points


def test_short_names_and_config_labels():
    assert short_names(["models.a.replicas", "traffic.rate_scale"]) == {
        "models.a.replicas": "replicas", "traffic.rate_scale": "rate_scale"}
    assert short_names(["models.a.replicas", "models.b.replicas"]) == {
        "models.a.replicas": "a.replicas", "models.b.replicas": "b.replicas"}
    assert config_label("base", {"models.m.replicas": 2.0}, {"variants": {}}) == "replicas=2"
    assert config_label("cache", {"models.m.replicas": 2}, {"variants": {"cache": []}}) == "cache, replicas=2"
    assert config_label("base", {}, {"variants": {}}) == "base"


def test_points_are_aggregated_per_point_with_labels(sweep_dir):
    sweep = load_sweep(sweep_dir)
    points = sweep.points
    assert len(points) == len(REPLICAS) * len(LOADS) - 1  # the failed point has no metrics
    assert set(points["config"]) == {"replicas=1", "replicas=2"}
    single = points[(points["models.llama8b.replicas"] == SINGLE[0]) & (points["traffic.rate_scale"] == SINGLE[1])]
    assert single["replications"].tolist() == [1] and single["ttft_p95_s_ci95_low"].isna().all()
    raw = sweep.results
    rows = raw[(raw["point"] == 0)]
    assert points.loc[points["point"] == 0, "ttft_p95_s"].item() == pytest.approx(rows["ttft_p95_s"].mean())


def test_number_formats():
    assert fmt_latency(0.0453) == "45.3 ms"
    assert fmt_latency(1.234) == "1.23 s"
    assert fmt_latency(math.nan) == "–"
    assert fmt_usd(6.0) == "$6.00"
    assert fmt_usd(0.0302) == "$0.0302"
    assert fmt_usd(1234.5) == "$1,234"


# --------------------------------------------------------------------------- figures


def test_every_figure_is_written_as_png_and_svg(sweep_dir, report):
    for name, _, _ in ALWAYS:
        png, svg = sweep_dir / "figures" / f"{name}.png", sweep_dir / "figures" / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert "<svg" in svg.read_text()[:2000] and svg.stat().st_size > 10_000, name


def test_latency_figure_shows_slo_line_and_capacity_markers(sweep_dir, report):
    svg = (sweep_dir / "figures" / "latency_vs_load.svg").read_text()
    assert ">SLO: p95 time to first token ≤ 1 s</text>" in svg  # the SLO in words
    assert ">max load meeting the SLO</text>" in svg
    assert ">replicas=1</text>" in svg and ">replicas=2</text>" in svg and ">p99</text>" in svg
    assert ">offered load (req/s)</text>" in svg
    assert ">target load</text>" in svg and "axis cut at 3x the SLO" in svg  # linear around the SLO


def test_max_load_figure_shows_each_configs_limit_with_its_bracket(sweep_dir, report):
    svg = (sweep_dir / "figures" / "max_load.svg").read_text()
    assert "highest load meeting the SLO (bars: the search&#39;s bracket)" in svg or "search's bracket" in svg
    assert ">replicas=1</text>" in svg and ">target load" in svg


def test_cost_figures_grey_out_what_fails_the_slo_and_compare_at_the_target_load(sweep_dir, report):
    per_1k = (sweep_dir / "figures" / "cost_per_1k_vs_load.svg").read_text()
    assert ">fails the SLO</text>" in per_1k and ">target load</text>" in per_1k
    pareto = (sweep_dir / "figures" / "cost_vs_latency.svg").read_text()
    assert re.search(r"cost vs p95 time to first token at [0-9.]+ req/s", pareto)


def test_figures_without_a_load_axis_use_the_first_axis(tmp_path):
    exp = experiment(axes={"models.llama8b.replicas": [1, 2]}, capacity=None,
                     variants={"cache": ["x=1"], "base": []})
    results = results_frame()
    results = results[results["traffic.rate_scale"] == 1.0].drop(columns="traffic.rate_scale")
    results = pd.concat([results, results.assign(variant="cache", point=results["point"] + 100)])
    points = prepare_points(results, exp)
    assert set(points["config"]) == {"base", "cache"}
    png, svg = plot_latency(points, exp, tmp_path)
    assert png.stat().st_size > 10_000
    assert ">models.llama8b.replicas</text>" in svg.read_text()  # the x label (SVG text is kept as text)


def test_figures_are_skipped_with_a_reason_when_nothing_ran(tmp_path):
    results = results_frame().assign(status="failed")
    made = make_figures(prepare_points(results, experiment()), experiment(), tmp_path)
    assert not made.made and len(made.skipped) == len(ALWAYS)
    assert all("no point" in why or "no " in why for why in made.skipped.values())


# --------------------------------------------------------------------------- the report


def test_report_answers_the_capacity_question(report):
    md, _ = report
    answer = md.split("## What was simulated")[0]
    assert "replicas=2: 11.3 req/s (2.05x today's load)" in answer
    assert "replicas=1: 5.22 req/s (0.95x today's load)" in answer
    assert "1.5x today's load, 8.25 req/s" in answer
    # `$` is escaped in Markdown: two amounts on a line would otherwise render as math on GitHub.
    assert r"replicas=2 at \$6.00/h (\$0.202 per 1k requests)" in answer


def test_report_describes_what_was_simulated(report):
    md, _ = report
    section = md.split("## What was simulated")[1].split("## Capacity")[0]
    for text in ("chat-selfhosted", "Poisson, 5.50 req/s", "lognormal median 1020, p95 4083 tokens",
                 "2 replica(s) x max batch 256", "$3.00/h per GPU", "step times: typed in",
                 "Seed 1, 3 replication(s) per point",
                 "600 s of arrivals", "warm-up 60 s", "`models.llama8b.replicas`: 1, 2",
                 "`traffic.rate_scale`: 0.5, 1, 1.5, 2", "`ttft_p95_s` ≤ 1 s", "8 points"):
        assert text in section, text


def test_report_has_the_capacity_table(report):
    md, _ = report
    assert r"| replicas=1 | 5.22 req/s | 0.95x | `ttft_p95_s` | llama8b 87% | \$3.00 | \$0.139 | no |" in md
    assert r"| replicas=2 | 11.3 req/s | 2.05x | `ttft_p95_s` | llama8b 93% | \$6.00 | \$0.202 | yes |" in md


def test_report_lists_the_caveats(report):
    md, _ = report
    caveats = md.split("## Caveats")[1]
    unstable = caveats.split("### Unstable points")[1].split("###")[0]
    assert "| 2 | replicas=1 | 8.25 req/s (1.50x) | llama8b 1.38 |" in unstable  # rho = 8.25 / 6
    failed = caveats.split("### Failed points (1)")[1].split("###")[0]
    assert f"| 3 | replicas=1 | 11.0 req/s (2.00x) | {ERROR} at engine |" in failed
    wide = caveats.split("### Wide intervals")[1].split("###")[0]
    assert "replicas=2 | 8.25 req/s (1.50x) | `ttft_p95_s`" in wide
    few = caveats.split("### Fewer than 2 replications (1)")[1]
    assert "| 4 | replicas=2 | 2.75 req/s (0.50x) | 1 |" in few


def test_html_is_self_contained_and_embeds_every_figure(sweep_dir, report):
    md, page = report
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "<link" not in page and "<script" not in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    for name, title, _ in ALWAYS:
        data = base64.b64encode((sweep_dir / "figures" / f"{name}.png").read_bytes()).decode()
        assert data in page, name
        assert f"](figures/{name}.png)" in md and f"### {title}" in md
    assert "<table>" in page and "replicas=2" in page


def test_report_without_capacity_or_slo_still_answers(tmp_path):
    folder = write_sweep(tmp_path / "s", experiment(capacity=None), results_frame(), None)
    md = render_markdown(build_report(load_sweep(folder), FigureSet()), folder)
    assert "Highest load on the sweep's grid meeting the SLO" in md
    # replicas=2 at 2x (rho 0.92) misses the SLO; 1.5x meets it on its upper bound.
    assert "replicas=2: 8.25 req/s (1.50x)" in md
    assert r"| replicas=2 | 8.25 req/s (1.50x) | \$6.00 |" in md
    folder = write_sweep(tmp_path / "t", experiment(capacity=None, slo={}), results_frame(), None)
    assert "sets no SLO" in answer(load_sweep(folder))


def test_capacity_at_the_search_ceiling_and_failed_searches(tmp_path):
    capacity = json.loads(json.dumps(CAPACITY))
    capacity["configs"][1].update(max_load=4.0, max_load_rps=22.0, at_least=True, limited_by=None)
    capacity["configs"].append({"variant": "base", "values": {"models.llama8b.replicas": 3},
                                "error": "worker crashed: MemoryError: \n out of memory"})
    folder = write_sweep(tmp_path / "s", experiment(), results_frame(), capacity)
    md = render_markdown(build_report(load_sweep(folder), FigureSet()), folder)
    assert "replicas=2: at least 22.0 req/s (4.00x today's load)" in md
    assert "replicas=3: the capacity search failed (see the caveats)" in md
    assert "| replicas=2 | ≥ 22.0 req/s | 4.00x | nothing up to the search's highest load |" in md
    assert "| replicas=3 | search failed | – | – |" in md
    assert "| replicas=3 | worker crashed: MemoryError: out of memory |" in md.split("### Failed capacity searches (1)")[1]


def test_report_of_a_sweep_where_nothing_ran(tmp_path):
    folder = write_sweep(tmp_path / "s", experiment(), results_frame().assign(status="failed"), None)
    sweep = load_sweep(folder)
    assert "No point of the sweep ran successfully" in answer(sweep)
    md = render_markdown(build_report(sweep, FigureSet(skipped={"Latency vs offered load": "no point ran"})), folder)
    assert "Skipped: Latency vs offered load: no point ran." in md
    assert "### Failed points (8)" in md


# --------------------------------------------------------------------------- the command


def test_cli_report_prints_both_paths(sweep_dir, cli_output):
    assert cli_output == [str(sweep_dir / "report.md"), str(sweep_dir / "report.html")]


def test_cli_report_without_results_is_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"{tmp_path}: no results.parquet (run llmsim sweep first) and no "
                           "summary.json + timeseries.parquet (run llmsim run ... --out DIR first)")


def test_cli_report_of_a_run_folder_draws_the_time_series(tmp_path, capsys):
    out = tmp_path / "run"
    workload = Path(__file__).resolve().parent.parent / "workloads" / "chat-selfhosted.yaml"
    assert main(["run", str(workload), "--set", "simulation.duration_s=300", "--set", "models.llama8b.cold_start_s=30",
                 "--replications", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.md"), str(out / "report.html")]
    md = (out / "report.md").read_text()
    assert "Cold window (first 30 s)" in md
    for name in ("timeseries_traffic", "timeseries_queue", "timeseries_latency", "timeseries_replicas",
                 "stage_breakdown"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
        assert f"figures/{name}.png" in md
    assert "the bottleneck is decode" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_crossings_by_hand():
    from sim.report.figures import crossings

    # a - b = [2, 1, -1, -3]: one sign change between x=2 and x=3, halfway.
    assert crossings([1, 2, 3, 4], [3, 3, 3, 3], [1, 2, 4, 6]) == [2.5]
    assert crossings([1, 2], [1, 1], [2, 2]) == []


def test_cost_vs_quality_is_drawn_only_for_sweeps_with_answer_quality(tmp_path):
    from sim.report.figures import make_figures, plot_cost_quality

    experiment = {"name": "q", "axes": {"pipeline.router.policy": ["fixed", "threshold"]}, "variants": {},
                  "load_axis": "traffic.rate_scale", "slo": {}}
    points = pd.DataFrame({"point": [0, 1], "variant": ["base", "base"], "config": ["base", "base"],
                           "pipeline.router.policy": ["fixed", "threshold"], "offered_load_rps": [5.0, 5.0],
                           "cost_per_1k_usd": [4.6, 5.8], "quality_good_share": [0.78, 0.80],
                           "cost_per_hour_usd": [10.0, 12.0], "e2e_p95_s": [8.0, 8.5]})
    paths = plot_cost_quality(points, experiment, tmp_path)
    assert all(p.stat().st_size > 5_000 for p in paths)
    names = [f.name for f in make_figures(points.drop(columns="quality_good_share"), experiment, tmp_path).made]
    assert "cost_vs_quality" not in names
    assert "cost_vs_quality" in [f.name for f in make_figures(points, experiment, tmp_path).made]


def test_latency_figure_adds_tpot_when_the_slo_bounds_it(tmp_path):
    from sim.report.review import slo_text

    slo = {"ttft_p95_s": {"max": 1.0, "min": None}, "tpot_p95_s": {"max": 0.05, "min": None}}
    results = results_frame()
    for stat, factor in (("p50", 1.0), ("p95", 1.5), ("p99", 2.0)):
        results[f"tpot_{stat}_s"] = 0.01 * factor * (1 + results["traffic.rate_scale"])
    points = prepare_points(results, experiment(slo=slo))
    _, svg = plot_latency(points, experiment(slo=slo), tmp_path)
    text = svg.read_text()
    assert ">time per output token</text>" in text and ">SLO: p95 time per output token ≤ 0.05 s</text>" in text
    _, svg = plot_latency(points, experiment(), tmp_path)  # no TPOT SLO: TTFT and e2e only
    assert ">time per output token</text>" not in svg.read_text()
    assert slo_text("tpot_p95_s", slo["tpot_p95_s"]) == "`tpot_p95_s` ≤ 0.05 s"


def test_log_axes_read_as_plain_numbers():
    # The figures print text as typed (text.parse_math off: names come from users' files), so matplotlib's
    # TeX labels of a log axis ($\mathdefault{10^{3}}$) must not be used: every report had them once.
    import matplotlib.pyplot as plt

    from sim.report.figures import _RC, log_axis

    with plt.rc_context(_RC):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [0.05, 3.0, 2000.0])
        log_axis(ax)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        plt.close(fig)
    assert {"0.1", "1", "10", "100", "1000"} <= set(labels) and not any("$" in label for label in labels)


def test_run_report_headline_has_intervals_and_the_slo_verdict_and_groups_its_metrics(tmp_path, capsys):
    out = tmp_path / "rag"
    rag = Path(__file__).resolve().parent.parent / "workloads" / "rag-support.yaml"
    assert main(["run", str(rag), "--replications", "2", "--quiet", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    headline = md.splitlines()[2]
    assert re.match(r"Throughput [0-9.]+ ±[0-9.]+ req/s; p95 TTFT [0-9.]+ ±[0-9.]+ m?s;", headline)
    assert re.search(r"SLO: [0-9.]+% of completions met every target .*; answers within each target: ttft [0-9.]+% ±",
                     headline)
    assert "## Warnings" in md and "still warming" in md  # what the run found, as on the terminal
    for area in ("Run", "Requests", "Latency", "SLO", "Cost", "Application"):
        assert f"\n### {area}\n" in md, area
    assert "| `ttft_p95_s` |" in md and "| metric | value | unit | 95% interval |" in md
    assert "`requests_queue_full`" not in md.split("were zero throughout")[0]  # zero rows left out, and named
    assert "Bands: the range over the replications." in md
    stages = (out / "figures" / "stage_breakdown.svg").read_text()
    assert ">post processing</text>" in stages  # one label a row: none overlap
