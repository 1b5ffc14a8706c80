"""Sweeps under abuse (issue 10): bad point values caught up front, lazy expansion, locked output
folders, unique temporary files, experiment fingerprints, and workers that never outlive their sweep."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import main
from sim.config.loader import ConfigError
from sim.experiments.executors import run_tasks
from sim.experiments.spec import load_experiment
from sim.experiments.store import LOCK_NAME, FolderLock, ResultStore, write_json
from sim.experiments.sweep import sweep

from test_sweep import GRID, MM1, write

ON_LINUX = sys.platform.startswith("linux")
SLOW_MM1 = MM1.replace("duration_s: 3000", "duration_s: 400000")  # several seconds a point


def _sweep_cli(path: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sim.cli", "sweep", str(path), "--out", str(out), "--quiet", *extra]


def _wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def _cleanup(proc: subprocess.Popen):
    """Whatever the test found, leave none of the sweep's processes running (its session is its group)."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------- point values, before anything runs


def test_a_bad_axis_value_is_refused_before_any_point_runs(tmp_path, capsys):
    path = write(tmp_path, GRID.replace("[1, 2]", "[1, -2]"))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    # One line for the value, though three points (one per rate) carry it, and a count.
    assert err == [f"{path}:4: axes.models.server.replicas: value -2: must be greater than 0",
                   f"{path}: 3 of 6 points have values the workload refuses; nothing was run"]
    assert not out.exists()  # nothing written either


def test_a_bad_variant_value_names_the_variant(tmp_path):
    text = GRID + "variants:\n  ok: {models.server.max_batch: 1}\n  typo: {models.server.max_batch: lots}\n"
    with pytest.raises(ConfigError) as err:
        sweep(write(tmp_path, text), out=tmp_path / "out", workers=1, progress=False)
    assert err.value.lines[0] == (f"{tmp_path / 'exp.yaml'}:7: variants.typo: models.server.max_batch=\"lots\": "
                                  "must be an integer, got 'lots'")
    assert err.value.lines[-1].endswith("6 of 12 points have values the workload refuses; nothing was run")


def test_a_bad_combination_names_its_point(tmp_path):
    # Each value is fine alone; warmup 5000 s is not, in a 3000 s run: the point is named, with the base's line.
    text = GRID.replace("models.server.replicas: [1, 2]", "simulation.warmup_s: [10, 5000]")
    with pytest.raises(ConfigError) as err:
        load_experiment(path := write(tmp_path, text))  # loads: the paths are fine
        sweep(path, out=tmp_path / "out", workers=1, progress=False)
    assert err.value.lines[0] == (f"{path}: point 1 (variant base, traffic.rate_scale=0.5, "
                                  f"simulation.warmup_s=5000): {tmp_path / 'mm1.yaml'}:3: simulation: "
                                  "warmup_s (5000.0) must be in [0, duration_s=3000.0)")


def test_many_bad_points_show_the_first_few_and_a_count(tmp_path):
    values = ", ".join(str(-k) for k in range(1, 31))
    with pytest.raises(ConfigError) as err:
        sweep(write(tmp_path, GRID.replace("[1, 2]", f"[{values}]")), out=tmp_path / "out", progress=False)
    lines = err.value.lines
    assert len(lines) == 8 + 2
    assert lines[0].endswith("axes.models.server.replicas: value -1: must be greater than 0")
    assert lines[8].endswith(": ... and 22 more problems")
    assert lines[9].endswith(": 90 of 90 points have values the workload refuses; nothing was run")


def test_capacity_loads_are_checked_too(tmp_path):
    text = """\
workload: mm1.yaml
axes:
  models.server.replicas: [1, 2]
load_axis: models.server.replicas
slo: {queue_wait_mean_s: 1.0}
capacity: {target: 2.5, low: 1, high: 4}
"""
    with pytest.raises(ConfigError) as err:
        sweep(write(tmp_path, text), out=tmp_path / "out", workers=1, progress=False)
    assert err.value.lines[0] == (f"{tmp_path / 'exp.yaml'}:6: capacity.target: value 2.5 of "
                                  "models.server.replicas: must be a whole number, got 2.5")
    assert not (tmp_path / "out").exists()


def test_points_are_made_one_at_a_time(tmp_path):
    # A million points: counting them and taking the first few costs no memory to speak of
    # (a list of them all took gigabytes before the first point ran).
    thousand = ", ".join(str(k + 1) for k in range(1000))
    text = f"workload: mm1.yaml\naxes:\n  traffic.rate_scale: [{thousand}]\n  models.server.replicas: [{thousand}]\n"
    exp = load_experiment(write(tmp_path, text))
    assert exp.count_points() == 1_000_000
    tracemalloc.start()
    points = exp.iter_points()
    first = [next(points) for _ in range(5)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert [p.values["models.server.replicas"] for p in first] == [1, 2, 3, 4, 5]
    assert first[4].index == 4


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", "a\\b", "C:x", ""])
def test_the_name_must_be_a_plain_file_name(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, f"name: {json.dumps(name)}\n" + GRID))
    assert err.value.lines[0].startswith(f"{tmp_path / 'exp.yaml'}:1: name: must be a plain file name")


def test_a_plain_name_is_fine(tmp_path):
    assert load_experiment(write(tmp_path, "name: capacity-review.v2\n" + GRID)).name == "capacity-review.v2"


# ----------------------------------------------------------------- the output folder


def test_a_second_sweep_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    path = write(tmp_path, GRID, SLOW_MM1)
    out = tmp_path / "out"
    first = subprocess.Popen(_sweep_cli(path, out, "--workers", "1"), start_new_session=True)
    with _cleanup(first):
        assert _wait_for(lambda: (out / LOCK_NAME).is_file() and (out / LOCK_NAME).stat().st_size > 0)
        assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert f"another sweep is writing there (pid {first.pid} on {socket.gethostname()}" in line


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is no longer alive, and it holds no lock
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    assert main(["sweep", str(write(tmp_path, GRID)), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert f"note: took over the lock of pid {gone.pid} on {socket.gethostname()}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_of_another_host_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1234, "host": "elsewhere.example"}))
    assert main(["sweep", str(write(tmp_path, GRID)), "--out", str(out), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "(pid 1234 on elsewhere.example)" in line and f"delete {out / LOCK_NAME}" in line


def test_a_held_lock_keeps_a_sweep_out_in_the_same_process(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on"):
            sweep(write(tmp_path, GRID), out=out, workers=1, progress=False)
    with FolderLock(out) as again:  # released: free again, and not stale
        assert again.note is None


def test_out_at_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["sweep", str(write(tmp_path, GRID)), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"--out {tmp_path / 'taken'}: cannot create the folder:")


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    # Two writers of one file (the race two sweeps on one folder ran: a shared temporary name
    # made saves fail and mixed rows). Every save must succeed and leave a whole file.
    target = tmp_path / "doc.json"
    errors: list[BaseException] = []

    def hammer(k: int) -> None:
        store = ResultStore(tmp_path, [])  # a store of its own, as each sweep has
        try:
            for i in range(60):
                write_json(target, {"writer": k, "i": i, "pad": "x" * 20_000})
                store.add([{"point": k * 1000 + i, "replication": 0, "status": "ok"}])
        except BaseException as err:  # noqa: BLE001 - any failure fails the test below
            errors.append(err)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 59
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 60  # one store's whole table
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_with_another_experiment_is_refused_naming_what_differs(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, GRID)
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    saved = pd.read_parquet(out / "results.parquet")

    write(tmp_path, GRID.replace("[1, 2]", "[1, 3]") + "variants:\n  fast: {models.server.max_batch: 2}\n")
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{out}: --resume: the results here are of a different experiment (")
    assert "axes.models.server.replicas changed" in line and "variants.fast added" in line
    assert "traffic.rate_scale" not in line

    write(tmp_path, GRID, MM1.replace("seed: 3", "seed: 4"))
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "(workload.simulation changed)" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), saved)  # nothing lost

    # A new name or description changes no result: the same experiment resumes.
    write(tmp_path, "name: renamed\ndescription: same thing\n" + GRID)
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 0


def test_a_folder_without_a_fingerprint_resumes_with_a_note(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, GRID)
    sweep(path, out=out, workers=1, progress=False)
    described = json.loads((out / "experiment.json").read_text())
    del described["fingerprint"]  # as an older llmsim wrote it
    (out / "experiment.json").write_text(json.dumps(described))
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 0
    assert "note: " in capsys.readouterr().err and "fingerprint" in (out / "experiment.json").read_text()


def test_a_corrupt_results_file_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, GRID)
    sweep(path, out=out, workers=1, progress=False)
    (out / "results.parquet").write_bytes(b"PAR1 not really")
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{out / 'results.parquet'}: cannot read the earlier results (")


# ----------------------------------------------------------------- workers die with their sweep


def _session(sid: int) -> list[int]:
    """Live processes (zombies left out) of a session: the sweep, its forkserver and its workers."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if fields[0] != "Z" and int(fields[3]) == sid:
            alive.append(int(entry.name))
    return alive


def _start_two_worker_sweep(tmp_path: Path, workload: str = SLOW_MM1) -> tuple[subprocess.Popen, Path]:
    path = write(tmp_path, GRID, workload)
    out = tmp_path / "out"
    # A session of its own: the sweep, the forkserver and the workers all carry its id, even
    # after the sweep dies and the workers are handed to init.
    proc = subprocess.Popen(_sweep_cli(path, out, "--workers", "2"), start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: len(_session(proc.pid)) >= 4), _session(proc.pid)  # sweep, forkserver, 2 workers
    time.sleep(1.0)  # the workers are inside their first points
    return proc, out


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc")
def test_kill_9_of_a_two_worker_sweep_leaves_no_process_behind(tmp_path):
    proc, out = _start_two_worker_sweep(tmp_path)
    with _cleanup(proc):
        children = [pid for pid in _session(proc.pid) if pid != proc.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        left = _wait_for(lambda: not _session(proc.pid), timeout=5.0)
        assert left, f"still alive 5 s after kill -9: {_session(proc.pid)} (children were {children})"
        print(f"no process left {time.monotonic() - killed:.2f} s after kill -9")
        assert (out / LOCK_NAME).exists()  # left behind by the kill: the next sweep takes it over


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc")
def test_sigterm_stops_a_sweep_and_its_workers_at_once(tmp_path):
    # Points of ~40 s: a sweep that waited for its workers' current points would not be done in 20 s.
    proc, out = _start_two_worker_sweep(tmp_path, MM1.replace("duration_s: 3000", "duration_s: 2000000"))
    with _cleanup(proc):
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err and "Exception ignored" not in err
        assert _wait_for(lambda: not _session(proc.pid), timeout=5.0), _session(proc.pid)
        assert not (out / LOCK_NAME).exists()


def _square(x: int) -> int:
    return x * x


def test_the_pool_is_gone_when_the_last_result_is_in():
    # shutdown(wait=False) left the pool's manager thread running into interpreter exit, where the
    # exit hook raced it over a closed pipe: "Exception ignored ... OSError: handle is closed",
    # once in ~15 two-worker sweeps. Now nothing of the pool outlives the sweep.
    from concurrent.futures.process import _ExecutorManagerThread

    results = dict(run_tasks(_square, list(range(6)), workers=2, on_crash=lambda task, err: None))
    assert results == {k: k * k for k in range(6)}
    assert not [t for t in threading.enumerate() if isinstance(t, _ExecutorManagerThread)]


def test_without_flock_the_lock_file_is_created_exclusively(tmp_path, monkeypatch):
    import sim.experiments.store as store

    monkeypatch.setattr(store, "fcntl", None)  # as on a system without flock
    out = tmp_path / "out"
    with FolderLock(out):
        with pytest.raises(ConfigError) as err:
            FolderLock(out).acquire()
        assert f"(pid {os.getpid()} on" in str(err.value) and f"delete {out / LOCK_NAME}" in str(err.value)
    assert not (out / LOCK_NAME).exists()
    with FolderLock(out) as again:
        assert again.note is None
