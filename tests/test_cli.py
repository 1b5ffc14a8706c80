"""The `llmsim` command end to end: every shipped workload, outputs, errors, reproducibility."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import sim
from sim.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# Workloads that replay the shared traces need ../shared/data; a fresh clone has none.
NEEDS_DATA = {"azure-conv-replay.yaml", "mooncake-replay.yaml"}
WORKLOADS = [
    pytest.param(path, id=path.name, marks=pytest.mark.skipif(
        path.name in NEEDS_DATA and not SHARED_DATA.is_dir(), reason="needs ../shared/data (the trace it replays)"))
    for path in sorted((ROOT / "workloads").glob("*.yaml"))
]
RUNNABLE = [p.values[0] for p in WORKLOADS if p.values[0].name not in NEEDS_DATA or SHARED_DATA.is_dir()]


def run_json(capsys, *args) -> dict:
    assert main(["run", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("path", WORKLOADS)
def test_every_shipped_workload_runs(capsys, path):
    summary = run_json(capsys, path, "--set", "simulation.duration_s=600", "--set", "simulation.warmup_s=60")
    assert summary["requests_completed"] > 0
    assert summary["throughput_rps"] > 0
    assert summary["unstable"] is False
    for measure in ("queue_wait", "ttft", "e2e"):
        assert 0 <= summary[f"{measure}_p50_s"] <= summary[f"{measure}_p99_s"] <= summary[f"{measure}_p999_s"]


def test_every_summary_key_is_in_the_metrics_glossary(capsys):
    # The glossary (sim/metrics/glossary.py) is where a metric's unit and meaning are written; the docs' table is
    # generated from it. A key a run reports and the glossary lacks fails here.
    from sim.metrics.glossary import METRICS, generic_key

    documented = {name for name, _, _ in METRICS}
    for path in RUNNABLE:
        summary = run_json(capsys, path, "--set", "simulation.duration_s=300", "--set", "simulation.warmup_s=0")
        for key in summary:
            assert generic_key(key) in documented, f"{key} ({path.name}) is not in sim/metrics/glossary.py"


def test_run_and_compare_print_csv_for_other_tools(capsys):
    mmc = ROOT / "workloads/mmc.yaml"
    short = ("--set", "simulation.duration_s=3000", "--set", "simulation.warmup_s=100", "--replications", "2")
    summary = run_json(capsys, mmc, *short)
    assert main(["run", str(mmc), *short, "--format", "csv"]) == 0
    header, values = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert header == [key for key in summary if key != "warnings"]  # (warnings: JSON only)
    row = dict(zip(header, values))
    assert float(row["e2e_p95_s"]) == summary["e2e_p95_s"] and row["workload"] == "mmc"
    assert main(["run", str(mmc), *short, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == summary  # --json is its synonym
    assert main(["run", str(mmc), "--json", "--format", "csv"]) == 2
    assert capsys.readouterr().err.strip() == "--json and --format csv: give one of them"
    pair = (str(ROOT / "workloads/chat-selfhosted.yaml"), str(ROOT / "workloads/chat-api.yaml"),
            "--set", "simulation.duration_s=300", "--replications", "2", "--metrics", "ttft_p95_s,cost_per_1k_usd")
    assert main(["compare", *pair, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)["metrics"]
    assert main(["compare", *pair, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["metric"] for r in rows] == ["ttft_p95_s", "cost_per_1k_usd"]
    for r in rows:
        assert float(r["diff"]) == as_json[r["metric"]]["diff"] and r["verdict"] == as_json[r["metric"]]["verdict"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"llmsim {sim.__version__}"


def test_same_seed_same_numbers_bit_for_bit(capsys):
    args = (ROOT / "workloads/chat-selfhosted.yaml", "--set", "simulation.duration_s=300", "--replications", "2")
    first = run_json(capsys, *args)
    assert run_json(capsys, *args) == first
    other = run_json(capsys, *args, "--seed", "2")
    assert other["e2e_mean_s"] != first["e2e_mean_s"]


def test_configs_with_the_same_seed_see_the_same_traffic():
    # Common random numbers: more replicas changes latencies, never the requests themselves.
    base = ROOT / "workloads/chat-selfhosted.yaml"
    a = sim.run(base, overrides=["simulation.duration_s=300"], replications=1).requests
    b = sim.run(base, overrides=["simulation.duration_s=300", "models.llama8b.replicas=1"], replications=1).requests
    for column in ("arrival_s", "prompt_tokens", "output_tokens"):
        assert a[column].equals(b[column])
    assert not a["e2e_s"].equals(b["e2e_s"])


def test_out_writes_parquet_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "workloads/mmc.yaml"), "--set", "simulation.duration_s=2000",
                 "--replications", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "queue_wait" in printed.out
    assert printed.err.strip().endswith(f"to {out}")  # where it wrote
    requests = pd.read_parquet(out / "requests.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert set(requests["replication"]) == {0, 1}
    assert {"arrival_s", "queue_wait_s", "ttft_s", "e2e_s", "prompt_tokens", "outcome"} <= set(requests.columns)
    assert summary["replications"] == 2
    assert summary["queue_wait_mean_s_ci95_low"] <= summary["queue_wait_mean_s"] <= summary["queue_wait_mean_s_ci95_high"]
    assert len(pd.read_parquet(out / "replications.parquet")) == 2


def test_auto_warmup_picks_a_cut_on_the_monitor_grid(capsys):
    summary = run_json(capsys, ROOT / "workloads/mmc.yaml", "--set", "simulation.warmup_s=auto",
                       "--set", "simulation.duration_s=2000", "--replications", "1")
    # MSER-5 cuts at most half the requests; the cut is rounded up to a monitor sample
    # (one per timeseries interval, 10 s by default).
    assert 0 <= summary["warmup_s"] <= 1100
    assert summary["warmup_s"] % 10 == pytest.approx(0, abs=1e-9)


def test_unstable_system_runs_and_says_so(capsys):
    summary = run_json(capsys, ROOT / "workloads/mmc.yaml", "--set", "traffic.rate_scale=1.25",
                       "--set", "simulation.duration_s=500", "--set", "simulation.warmup_s=0", "--replications", "1")
    assert summary["unstable"] is True
    assert summary["offered_utilisation_server"] == pytest.approx(1.125)
    assert summary["throughput_rps"] == pytest.approx(4.0, rel=0.05)  # four busy servers at 1/s each


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "workloads/mmc.yaml").read_text().replace("replicas: 4", "replicas: -4"))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "replicas: -4" in text)
    assert err == [f"{bad}:{line}: models.server.replicas: must be greater than 0"]


def test_console_script_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation: {duration_s: 10\n")
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{bad}:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_file_and_bad_set_path(capsys):
    assert main(["run", "no/such/workload.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "no/such/workload.yaml: file not found"
    assert main(["run", str(ROOT / "workloads/mmc.yaml"), "--set", "models.nope.replicas=2"]) == 2
    assert capsys.readouterr().err.startswith("--set models.nope.replicas: ")


def test_validate_and_schema(capsys):
    assert main(["validate", str(ROOT / "workloads/chat-api.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "simulation" in schema["properties"]
    assert "Unknown" not in json.dumps(schema)


def test_bench_reports_every_case(capsys):
    from sim.bench import format_bench, run_bench

    cases = run_bench(ROOT / "workloads", repeat=1)
    assert [c.name.split()[1] for c in cases[:4]] == ["mmc.yaml", "chat-api.yaml", "chat-selfhosted.yaml",
                                                      "rag-support.yaml"]
    assert all(c.requests > 1000 and c.rate > 0 for c in cases)
    # Both SimPy models serve the same M/M/4 traffic (the same draws): the same requests.
    assert cases[-1].requests == cases[-2].requests
    by_name = {c.name.split()[1]: c for c in cases[:4]}
    assert by_name["mmc.yaml"].events == 0  # the fast path schedules no event
    assert by_name["rag-support.yaml"].events > 3 and by_name["rag-support.yaml"].calls > 50
    assert all(100 < c.bytes < 10_000 for c in cases[:4])
    # The event path on the same workload: same requests, and it schedules arrivals too.
    events = next(c for c in cases if c.name.endswith("event path"))
    fast = by_name["chat-selfhosted.yaml"]
    assert events.requests == fast.requests and events.events > fast.events + 1 and events.calls > 10 * fast.calls
    # chat-selfhosted and rag-support with every compiled part off (each in a process of its own): the same requests.
    pure = {c.name.split()[1]: c for c in cases if c.name.endswith("pure Python")}
    assert pure.keys() == {"chat-selfhosted.yaml,", "rag-support.yaml,"}
    assert pure["rag-support.yaml,"].requests == by_name["rag-support.yaml"].requests
    assert pure["chat-selfhosted.yaml,"].requests == fast.requests and pure["rag-support.yaml,"].events is None
    table = format_bench(cases)
    assert "vs naive" in table and "events/req" in table and "the fast path runs" in table
    assert "rag-support.yaml: the compiled parts run" in table


def test_metric_names_lists_exactly_what_a_run_reports():
    from sim.metrics.summary import metric_names

    for path in RUNNABLE:
        result = sim.run(path, overrides=["simulation.duration_s=200", "simulation.warmup_s=0"], replications=1)
        reported = [c for c in result.replications.columns if c != "replication"]
        assert sorted(reported) == sorted(metric_names(result.workload)), path.name


def test_engine_utilisation_matches_offered_load_when_stable():
    # All offered work gets done in a stable system, so the measured share of full-batch capacity
    # equals the offered utilisation computed from the config, up to sampling noise.
    summary = sim.run(ROOT / "workloads/chat-selfhosted.yaml", replications=5,
                      overrides=["traffic.rate_scale=3"]).summary
    low, high = summary["utilisation_llama8b_ci95_low"], summary["utilisation_llama8b_ci95_high"]
    assert low <= summary["offered_utilisation_llama8b"] <= high
    assert high - low < 0.05


def test_launch_spike_scales_up_after_the_spike_and_starts_cold():
    result = sim.run(ROOT / "workloads/launch-spike.yaml", replications=1,
                     overrides=["simulation.duration_s=7200"])
    series = result.timeseries
    replicas = series["replicas_llama8b"]
    before = replicas[(series["start_s"] >= 1800) & (series["start_s"] < 5400)].max()
    after = replicas[series["start_s"] >= 5400 + 300].max()  # the spike starts at 5400 s
    assert after >= before + 1
    summary = result.summary
    assert summary["cold_window_s"] == 90
    assert summary["cold_e2e_p95_s"] > 5 * summary["warm_e2e_p95_s"]
    warm = sim.run(ROOT / "workloads/launch-spike.yaml", replications=1,
                   overrides=["simulation.duration_s=600", "simulation.warm=true"]).summary
    assert "cold_window_s" not in warm
