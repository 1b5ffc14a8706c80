"""The work estimate: a run that would take days or terabytes is refused at once, unless forced."""
from __future__ import annotations

import re

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import sim
from sim.cli import main
from sim.config.loader import ConfigError, load_workload
from sim.experiments.estimate import WorkEstimate, check_work, estimate_run, requests_per_replication
from sim.experiments.run import Ticker
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["mmc.yaml", "chat-selfhosted.yaml", "rag-support.yaml", "noisy-neighbor.yaml",
                                  "launch-spike.yaml"])
def test_expected_requests_match_what_a_run_simulates(name):
    workload = load_workload(ROOT / "workloads" / name, ["simulation.duration_s=600", "simulation.warmup_s=0"])
    expected = requests_per_replication(workload)
    simulated = len(simulate(workload).arrival)
    # Closed loops are counted at one request per think time (+50 ms): an upper bound.
    assert simulated <= expected * 1.1
    assert simulated >= expected * (0.5 if name == "noisy-neighbor.yaml" else 0.9)


def test_a_huge_run_is_refused_at_once_with_the_estimate(capsys):
    start = time.monotonic()
    assert main(["run", str(ROOT / "workloads/mmc.yaml"), "--set", "simulation.duration_s=1e9"]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "this run would be about 18 billion simulated requests" in err and "--force" in err


def test_forced_it_starts_and_says_how_long(tmp_path):
    command = [sys.executable, "-m", "sim.cli", "run", str(ROOT / "workloads/mmc.yaml"),
               "--set", "simulation.duration_s=1e9", "--replications", "1", "--force"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = child.stderr.readline()
        assert line.startswith("llmsim run: this run is about 3.6 billion simulated requests")
        assert child.poll() is None  # running
    finally:
        child.kill()
        child.wait()


def test_a_long_run_reports_its_progress(monkeypatch):
    monkeypatch.setattr(Ticker, "EVERY_S", 0.0)
    monkeypatch.setattr("sim.experiments.estimate.WARN_SECONDS", 0.0)
    lines: list[str] = []
    workload = load_workload(ROOT / "workloads/mmc.yaml", ["simulation.duration_s=3000"])
    sim.run(workload, replications=2, progress=lines.append)
    expected = f"{2 * requests_per_replication(workload):,.0f}"
    assert lines[0].startswith(f"this run is about {expected} simulated requests")
    ticks = [line for line in lines[1:] if line.startswith("replication ")]
    # Ticks every 5% of the 3,000 s (150 s): simulated time, requests so far (540 expected at 3.6 req/s: within
    # 5 Poisson sigmas), time left.
    first = re.match(r"replication 1/2: 2 min 30 s of 50 min 00 s simulated, (\d+) requests, \d+ s elapsed, "
                     r"about \d+ s left$", ticks[0])
    assert first is not None and abs(int(first.group(1)) - 540) < 5 * 540 ** 0.5, ticks[0]
    assert ticks[-1].startswith("replication 2/2: 50 min 00 s of 50 min 00 s simulated, ")
    assert "left" not in ticks[-1]
    # A quick run says nothing: the first line waits for EVERY_S.
    monkeypatch.setattr(Ticker, "EVERY_S", 3600.0)
    quiet: list[str] = []
    sim.run(load_workload(ROOT / "workloads/mmc.yaml"), replications=1, progress=quiet.append)
    assert not [line for line in quiet if line.startswith("replication ")]


def test_a_workload_may_set_its_own_limit(tmp_path):
    data = yaml.safe_load((ROOT / "workloads/mmc.yaml").read_text())
    data["simulation"]["max_requests"] = 1000
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="over the limit of 1,000 requests"):
        sim.run(path)
    assert sim.run(path, force=True, replications=1).summary["requests_arrived"] > 1000


def test_memory_counts_the_kept_table_and_the_time_series():
    workload = load_workload(ROOT / "workloads/chat-selfhosted.yaml")
    kept, sweep = estimate_run(workload), estimate_run(workload, keep_requests=False)
    assert kept.memory_bytes > sweep.memory_bytes
    assert kept.requests == pytest.approx(5.5 * 1800 * 3)
    fine = load_workload(ROOT / "workloads/chat-selfhosted.yaml", ["simulation.timeseries_interval_s=0.001"])
    assert estimate_run(fine).memory_bytes > 1e9


def test_check_work_warns_over_a_minute_and_refuses_over_the_limits():
    assert check_work(WorkEstimate(1e5, 1e5, 1e8, 2.0), force=False) == []
    assert check_work(WorkEstimate(1e7, 1e7, 1e9, 200.0), force=False)[0].startswith("this run is about 10 million")
    with pytest.raises(ConfigError, match=r"over the limit of 17.2 GB of memory"):
        check_work(WorkEstimate(1e6, 1e6, 1e12, 20.0), force=False)
    assert check_work(WorkEstimate(1e9, 1e9, 1e12, 1e5), force=True)  # forced: a warning, not a refusal
