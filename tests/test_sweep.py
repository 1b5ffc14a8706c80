"""Sweeps: experiment files, expansion, the result store, resume, executors, capacity search."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.cli import main
from sim.config.loader import ConfigError, load_workload
from sim.experiments.spec import load_experiment
from sim.experiments.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent

MM1 = """\
version: 1
name: mm1
simulation: {duration_s: 3000, warmup_s: 200, seed: 3, replications: 2}
traffic:
  classes:
    jobs:
      arrival: {kind: poisson, rate_rps: 0.5}
      prompt_tokens: 1
      output_tokens: 1
models:
  server:
    kind: self_hosted
    replicas: 1
    max_batch: 1
    service_time: {kind: exponential, mean: 1.0}
"""


def write(tmp_path: Path, experiment: str, workload: str = MM1) -> Path:
    (tmp_path / "mm1.yaml").write_text(workload)
    path = tmp_path / "exp.yaml"
    path.write_text(experiment)
    return path


GRID = """\
workload: mm1.yaml
axes:
  traffic.rate_scale: {from: 0.5, to: 1.5, steps: 3}
  models.server.replicas: [1, 2]
"""


def test_grid_zip_and_variants_expand(tmp_path):
    exp = load_experiment(write(tmp_path, GRID))
    points = exp.points()
    assert len(points) == 6
    assert points[0].values == {"traffic.rate_scale": 0.5, "models.server.replicas": 1}
    assert points[-1].overrides == ('traffic.rate_scale=1.5', 'models.server.replicas=2')
    zipped = load_experiment(write(tmp_path, GRID.replace("[1, 2]", "[1, 2, 3]") + "combine: zip\n")).points()
    assert [p.values["models.server.replicas"] for p in zipped] == [1, 2, 3]
    variants = load_experiment(write(tmp_path, GRID + "variants:\n  slow: {models.server.service_time: 1.5}\n"
                                                     "  fast: ['models.server.service_time=0.5']\n")).points()
    assert len(variants) == 12
    assert {p.variant for p in variants} == {"slow", "fast"}
    assert variants[0].overrides[0] == "models.server.service_time=1.5"
    assert len({p.key for p in variants}) == 12


@pytest.mark.parametrize("text, message", [
    (GRID.replace("models.server.replicas", "models.server.replics"),
     "exp.yaml:4: axes.models.server.replics: unknown key 'replics' (did you mean 'replicas'?)"),
    (GRID + "combine: zip\n", "exp.yaml:2: axes: zip needs axes of one length"),
    (GRID.replace("steps: 3", "steps: 1"), "exp.yaml:3: axes.traffic.rate_scale.steps: must be greater than or equal to 2"),
    (GRID.replace("mm1.yaml", "nope.yaml"), "exp.yaml:1: workload: file not found"),
])
def test_bad_experiments_get_file_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, text))
    assert any(line.startswith(f"{tmp_path / message.split(':', 1)[0]}:{message.split(':', 1)[1]}")
               for line in err.value.lines), err.value.lines


def test_unknown_slo_metric_is_refused(tmp_path, capsys):
    path = write(tmp_path, GRID + "slo: {ttft_p95: 1.0}\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "slo.ttft_p95: unknown metric" in capsys.readouterr().err


def test_sweep_writes_one_row_per_point_and_replication(tmp_path):
    result = sweep(write(tmp_path, GRID), out=tmp_path / "out", workers=1, progress=False)
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert len(frame) == 6 * 2 and result.failed == 0
    as_csv = pd.read_csv(tmp_path / "out" / "results.csv")  # the same table for tools that read no Parquet
    assert list(as_csv.columns) == list(frame.columns)
    assert np.allclose(as_csv["queue_wait_mean_s"], frame["queue_wait_mean_s"], rtol=1e-12, atol=0)
    assert list(frame.columns[:6]) == ["point", "point_key", "variant", "traffic.rate_scale",
                                       "models.server.replicas", "replication"]
    assert set(frame["status"]) == {"ok"}
    # More load, more waiting; more replicas, less.
    waits = frame.groupby(["models.server.replicas", "traffic.rate_scale"])["queue_wait_mean_s"].mean()
    assert waits[1].is_monotonic_increasing and (waits[2] < waits[1]).all()
    assert frame["offered_load_rps"].tolist()[:2] == [0.25, 0.25]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    import sim.experiments.sweep as sweep_module

    def run_or_fail(workload, **kwargs):  # an error inside the run (bad values never get this far)
        if workload.models["server"].replicas == 1:
            raise RuntimeError("the engine gave up")
        return real_run(workload, **kwargs)

    real_run = sweep_module.run
    monkeypatch.setattr(sweep_module, "run", run_or_fail)
    path = write(tmp_path, GRID)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 3
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet")
    failed = frame[frame["status"] == "failed"]
    assert len(failed) == 3 and (failed["replication"] == -1).all()
    assert (failed["models.server.replicas"] == 1).all()
    assert failed["error"].eq("RuntimeError: the engine gave up").all()
    assert (frame["status"] == "ok").sum() == 3 * 2
    assert "3 point(s) failed" in capsys.readouterr().err


def test_existing_results_need_resume(tmp_path, capsys):
    path = write(tmp_path, GRID)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 0


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["runtime_s"]).sort_values(["point", "replication"]).reset_index(drop=True)


def test_killed_sweep_resumes_to_the_same_results(tmp_path):
    slow = GRID.replace("steps: 3", "steps: 5")
    path = write(tmp_path, slow, MM1.replace("duration_s: 3000", "duration_s: 40000"))
    whole = sweep(path, out=tmp_path / "whole", workers=1, progress=False).results
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sim.cli", "sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while not (out / "results.parquet").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash, not a polite Ctrl-C
    proc.wait()
    partial = pd.read_parquet(out / "results.parquet")
    assert 0 < partial["point"].nunique() < 10
    resumed = sweep(path, out=out, workers=1, resume=True, progress=False).results
    pd.testing.assert_frame_equal(_comparable(resumed), _comparable(whole))


def test_parallel_workers_give_the_serial_results(tmp_path):
    path = write(tmp_path, GRID)
    serial = sweep(path, out=tmp_path / "serial", workers=1, progress=False).results
    parallel = sweep(path, out=tmp_path / "parallel", workers=2, progress=False).results
    pd.testing.assert_frame_equal(_comparable(parallel), _comparable(serial))


def test_dask_executor_gives_the_local_results(tmp_path):
    pytest.importorskip("dask.distributed")
    path = write(tmp_path, GRID)
    local = sweep(path, out=tmp_path / "local", workers=1, progress=False).results
    dask = sweep(path, out=tmp_path / "dask", executor="dask", workers=2, progress=False).results
    pd.testing.assert_frame_equal(_comparable(dask), _comparable(local))


def test_capacity_search_finds_the_mm1_limit(tmp_path):
    # M/M/1 with mean service 1 s: W_q = rho / (1 - rho) <= 1 s  <=>  rho <= 0.5, i.e. rate_scale <= 1
    # (the base rate is 0.5/s). The search judges the upper 95% bound, so it stops a little short.
    experiment = """\
workload: mm1.yaml
replications: 6
axes:
  traffic.rate_scale: [0.5, 1.0]
slo: {queue_wait_mean_s: 1.0}
capacity: {target: 0.8, low: 0.2, high: 1.9, tolerance: 0.01}
"""
    path = write(tmp_path, experiment, MM1.replace("duration_s: 3000", "duration_s: 20000"))
    result = sweep(path, out=tmp_path / "out", workers=1, progress=False)
    (config,) = result.capacity["configs"]
    assert 0.85 <= config["max_load"] <= 1.0
    assert config["limited_by"] == "queue_wait_mean_s"
    assert config["max_load_rps"] == pytest.approx(0.5 * config["max_load"])
    assert config["at_target"]["slo_met"] is True
    assert config["utilisation"]["server"] == pytest.approx(0.5 * config["max_load"], rel=0.05)
    loads = [p["load"] for p in config["probes"]]
    assert loads[:2] == [0.2, 1.9] and len(loads) < 20
    assert result.capacity["cheapest_at_target"]["values"] == {}


def test_absolute_load_axis_and_capacity_search_in_req_per_s(tmp_path):
    # The same M/M/1 limit, with the load given as traffic.rate_rps: rho <= 0.5 at rate_rps <= 0.5 req/s.
    experiment = """\
workload: mm1.yaml
replications: 6
load_axis: traffic.rate_rps
axes:
  traffic.rate_rps: [0.25, 0.5]
slo: {queue_wait_mean_s: 1.0}
capacity: {target: 0.4, low: 0.1, high: 0.95, tolerance: 0.01}
"""
    path = write(tmp_path, experiment, MM1.replace("duration_s: 3000", "duration_s: 20000"))
    result = sweep(path, out=tmp_path / "out", workers=1, progress=False)
    assert sorted(set(result.results["offered_load_rps"])) == [0.25, 0.5]
    (config,) = result.capacity["configs"]
    assert 0.42 <= config["max_load"] <= 0.5 and config["max_load_rps"] == pytest.approx(config["max_load"])
    assert config["at_target"]["offered_load_rps"] == pytest.approx(0.4)


def test_rate_rps_sets_the_scale_and_refuses_a_contradiction(tmp_path):
    path = write(tmp_path, GRID)
    workload = load_workload(tmp_path / "mm1.yaml", ["traffic.rate_rps=2"])
    assert workload.traffic.rate_scale == 4.0  # the class's own rate is 0.5 req/s
    with pytest.raises(ConfigError, match="give rate_rps or rate_scale, not both"):
        load_workload(path.parent / "mm1.yaml", ["traffic.rate_rps=2", "traffic.rate_scale=3"])


class _Terminal:
    """A stream that says it is a terminal, recording what is written."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from sim.experiments.progress import Progress

    terminal = _Terminal(True)
    bar = Progress(4, "points", stream=terminal)
    bar.update("a", True)
    bar.update("b", False)
    bar.close()
    assert "\r" in terminal.text and "2/4, 1 failed" in terminal.text and "ETA" in terminal.text
    assert terminal.text.endswith("\n")
    log = _Terminal(False)
    lines = Progress(2, "points", stream=log)
    lines.update("base: replicas=2", True)
    lines.update("base: replicas=4", False)
    assert log.text.splitlines()[0].startswith("points 1/2 ok: base: replicas=2 [elapsed")
    assert "points 2/2 FAILED: base: replicas=4" in log.text


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "experiments").glob("*.yaml")
                                         if not p.name.startswith("plan-")), ids=lambda p: p.name)
def test_every_shipped_experiment_loads_and_expands(path):
    from sim.experiments.sweep import check_points

    exp = load_experiment(path)
    points = exp.points()
    assert points and len({p.key for p in points}) == len(points)
    assert exp.count_points() == len(points)
    check_points(exp)  # every point's values (and every capacity config's) validate
