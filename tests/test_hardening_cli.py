"""User mistakes found by the fuzz campaign (issue 10): each is exit 2 and one line, never an internal error.

Also: a closed pipe is a quiet exit, exit 1 stays for real bugs and says how to
report them, trace readers never echo a file they cannot parse, and names from
the user's files reach the report's figures and Markdown escaped.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import EXIT_BROKEN_PIPE, main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "traces"
LONG = "x" * 300  # longer than any file system's name limit (255 bytes): ENAMETOOLONG
NASTY = r"$\x$ <script>alert(1)</script>"  # TeX math matplotlib cannot parse, and HTML
SECRET = "password=hunter2 and the rest of a line nobody should see in an error message"

TINY_WORKLOAD = f"""\
version: 1
name: {json.dumps(NASTY)}
simulation: {{duration_s: 60, warmup_s: 0, seed: 1, replications: 2}}
traffic:
  classes:
    jobs:
      arrival: {{kind: poisson, rate_rps: 2}}
      prompt_tokens: 1
      output_tokens: 1
models:
  server:
    kind: self_hosted
    replicas: 2
    max_batch: 1
    service_time: {{kind: exponential, mean: 0.5}}
"""

TINY_EXPERIMENT = f"""\
version: 1
name: tiny
workload: workload.yaml
axes:
  traffic.rate_scale: [0.5, 1]
variants:
  {json.dumps(NASTY)}: {{models.server.replicas: 2}}
  plain: {{models.server.replicas: 3}}
slo: {{e2e_p95_s: 5}}
"""


def fails(capsys, *argv: str) -> str:
    """Run llmsim in this process; assert exit 2 with exactly one line on standard error, and return it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """llmsim in a process of its own: for what must not hang (a timeout fails the test instead)."""
    return subprocess.run([sys.executable, "-m", "sim.cli", *map(str, argv)], check=False, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture()
def workload(tmp_path) -> Path:
    path = tmp_path / "workload.yaml"
    path.write_text(TINY_WORKLOAD)
    return path


@pytest.fixture()
def experiment(tmp_path, workload) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(TINY_EXPERIMENT)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """`llmsim run --out` of the tiny workload, once for the module."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "workload.yaml").write_text(TINY_WORKLOAD)
    assert main(["run", str(folder / "workload.yaml"), "--out", str(folder / "out")]) == 0
    return folder / "out"


# --------------------------------------------------------------------------- --out


def test_run_out_at_a_file_or_under_one_is_refused_before_the_run(capsys, tmp_path, workload):
    (tmp_path / "taken").write_text("")
    assert fails(capsys, "run", workload, "--out", tmp_path / "taken") == (
        f"--out {tmp_path / 'taken'}: a file is there; --out takes a folder")
    line = fails(capsys, "run", workload, "--out", tmp_path / "taken" / "sub")
    assert line == f"--out {tmp_path / 'taken' / 'sub'}: {tmp_path / 'taken'} is a file, not a folder; " \
                   "--out takes a folder"
    assert not list(tmp_path.glob("**/*.parquet"))  # refused before anything ran


def test_run_out_with_a_name_too_long(capsys, tmp_path, workload):
    line = fails(capsys, "run", workload, "--out", tmp_path / LONG)
    assert line.startswith("--out ") and line.endswith(": File name too long")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_run_out_in_a_read_only_folder(capsys, tmp_path, workload):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert fails(capsys, "run", workload, "--out", locked / "x").endswith(
        f"cannot write in {locked}: permission denied")


def test_sweep_out_at_a_file_or_under_one(capsys, tmp_path, experiment):
    (tmp_path / "taken").write_text("")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub", tmp_path / LONG):
        line = fails(capsys, "sweep", experiment, "--out", out, "--quiet", "--workers", "1")
        assert line.startswith(f"--out {out}: ")


def test_calibrate_out_at_a_folder_or_in_no_folder_is_refused_before_the_fit(capsys, tmp_path):
    log = tmp_path / "never-read.csv"  # the --out check comes first: the fit can take minutes
    assert fails(capsys, "calibrate", log, "--out", tmp_path) == (
        f"--out {tmp_path}: a folder is there; --out takes a file name")
    assert fails(capsys, "calibrate", log, "--out", tmp_path / "no" / "engine.yaml") == (
        f"--out {tmp_path / 'no' / 'engine.yaml'}: no folder {tmp_path / 'no'}")
    assert fails(capsys, "calibrate", log, "--out", tmp_path / LONG).endswith(": File name too long")


# --------------------------------------------------------------------------- damaged files


def test_sweep_resume_with_a_corrupt_results_file(capsys, tmp_path, experiment):
    out = tmp_path / "sweep"
    assert main(["sweep", str(experiment), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    capsys.readouterr()
    (out / "results.parquet").write_bytes(b"PAR1 but cut short")
    line = fails(capsys, "sweep", experiment, "--out", out, "--resume", "--quiet", "--workers", "1")
    assert line.startswith(f"{out / 'results.parquet'}: ")


def test_report_of_a_sweep_with_a_corrupt_results_file(capsys, tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "experiment.json").write_text("{}")
    (folder / "results.parquet").write_bytes(b"\x00" * 64)
    assert fails(capsys, "report", folder) == (
        f"{folder / 'results.parquet'}: cannot read: corrupt or not a Parquet file (rerun the command that wrote it)")
    pd.DataFrame({"other": [1]}).to_parquet(folder / "results.parquet")
    assert fails(capsys, "report", folder) == (
        f"{folder / 'results.parquet'}: no column 'point': not a table llmsim wrote")
    (folder / "experiment.json").write_text("[1, 2]")
    assert fails(capsys, "report", folder) == (
        f"{folder / 'experiment.json'}: expected a JSON object, as llmsim writes, not list")


def test_report_of_a_run_folder_with_a_corrupt_summary_or_time_series(capsys, tmp_path, run_folder):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "timeseries.parquet").write_bytes((run_folder / "timeseries.parquet").read_bytes())
    summary = (run_folder / "summary.json").read_text()
    (folder / "summary.json").write_text(summary[: len(summary) // 2])  # cut off mid-way
    assert fails(capsys, "report", folder).startswith(f"{folder / 'summary.json'}:")
    (folder / "summary.json").write_bytes(b"\xff\xfe binary")
    assert fails(capsys, "report", folder) == (
        f"{folder / 'summary.json'}: not a text file (llmsim writes UTF-8 JSON here)")
    (folder / "summary.json").write_text(json.dumps({**json.loads(summary), "throughput_rps": "fast"}))
    assert fails(capsys, "report", folder) == (
        f"{folder / 'summary.json'}: 'throughput_rps': unexpected str (not a summary written by llmsim run --out)")
    (folder / "summary.json").write_text(summary)
    (folder / "timeseries.parquet").write_text("start_s,end_s\n0,1\n")
    assert fails(capsys, "report", folder).startswith(f"{folder / 'timeseries.parquet'}: cannot read: ")


def test_report_of_no_folder_a_file_or_a_name_too_long(capsys, tmp_path):
    assert fails(capsys, "report", tmp_path / "none") == f"{tmp_path / 'none'}: no such folder"
    (tmp_path / "file").write_text("")
    assert fails(capsys, "report", tmp_path / "file") == f"{tmp_path / 'file'}: not a folder"
    assert fails(capsys, "report", tmp_path / LONG).endswith(": File name too long")


def test_names_too_long_for_every_command_that_reads_a_file(capsys, tmp_path):
    long_path = tmp_path / LONG
    for argv in (["run", long_path], ["validate", long_path], ["sweep", long_path], ["fit-traffic", long_path],
                 ["calibrate", long_path], ["catalog", "--explain", "h100-sxm", f"{long_path}.json"]):
        assert "File name too long" in fails(capsys, *argv), argv


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("argv, message", [
    (["fit-traffic", "/dev/zero"], "trace file /dev/zero: not a regular file (a folder or a device)"),
    (["fit-traffic", "/dev/zero", "--format", "azure"], "trace file /dev/zero: not a regular file"),
    (["calibrate", "/dev/zero"], "llmsim calibrate: /dev/zero: not a regular file (a folder or a device)"),
    (["catalog", "--explain", "h100-sxm", "/dev/zero"], "llmsim catalog: /dev/zero: not a regular file"),
    (["report", "/dev/zero"], "/dev/zero: not a folder"),
    (["validate", "/dev/zero"], "/dev/zero"),
    (["sweep", "/dev/zero"], "/dev/zero"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_dev_zero_is_refused_at_once(argv, message):
    done = cli(*argv, timeout=60)  # a reader that follows the file would never come back
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(message), done.stderr


# --------------------------------------------------------------------------- Dask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dask_scheduler_nobody_listens_at(capsys, monkeypatch, tmp_path, experiment):
    pytest.importorskip("distributed")
    from sim.experiments import executors

    monkeypatch.setattr(executors, "DASK_CONNECT_TIMEOUT_S", 1)  # the real one is 10 s
    address = f"tcp://127.0.0.1:{_free_port()}"
    line = fails(capsys, "sweep", experiment, "--out", tmp_path / "out", "--quiet", "--executor", "dask",
                 "--scheduler", address)
    assert line.startswith(f"--scheduler {address}: cannot connect to a Dask scheduler: ")
    assert fails(capsys, "sweep", experiment, "--out", tmp_path / "out2", "--quiet", "--executor", "dask",
                 "--scheduler", "nonsense").startswith("--scheduler nonsense: cannot connect to a Dask scheduler: ")


def test_dask_scheduler_address_where_something_else_answers(capsys, tmp_path, experiment):
    # The README's example address met an HTTP proxy in the fuzz campaign: Dask read "HTTP/1.1"
    # as a message length and asked for 3.07 EiB (MemoryError). A local HTTP-ish server does the same.
    pytest.importorskip("distributed")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        line = fails(capsys, "sweep", experiment, "--out", tmp_path / "out", "--quiet", "--executor", "dask",
                     "--scheduler", address)
    finally:
        server.close()
    assert line == (f"--scheduler {address}: something answers there, but not a Dask scheduler "
                    "(its reply made no sense as Dask's protocol)")


# --------------------------------------------------------------------------- pipes and real bugs


def test_a_closed_pipe_is_a_quiet_exit():
    # The reader is gone before llmsim writes (what `llmsim schema | head -1` comes to once head exits).
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == EXIT_BROKEN_PIPE
    assert err == ""


def test_a_path_the_system_refuses_anywhere_is_bad_input(capsys, monkeypatch):
    from sim import cli

    def refuse(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/reports/x.parquet")

    monkeypatch.setitem(cli.COMMANDS, "schema", refuse)
    assert fails(capsys, "schema") == "/srv/reports/x.parquet: Permission denied"


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), OSError("socket went odd")])
def test_a_real_bug_is_exit_1_and_says_how_to_report_it(capsys, monkeypatch, error):
    from sim import cli

    def broken(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "schema", broken)
    assert main(["schema"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"llmsim: internal error: {type(error).__name__}: {error} ")
    assert "a bug in llmsim: please report it with the command line and the input files" in err


# --------------------------------------------------------------------------- trace readers


def test_a_trace_path_at_a_file_of_another_kind_does_not_echo_it(capsys, tmp_path):
    prose = tmp_path / "notes.csv"
    prose.write_text(f"{SECRET}\n{SECRET}\n")
    line = fails(capsys, "fit-traffic", prose)
    assert line == f"{prose}: no column 'time' (the first line is not a header of column names)"
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    line = fails(capsys, "fit-traffic", binary)
    assert line.startswith(f"{binary}: cannot read: 'utf-8' codec can't decode byte")
    for path in (prose, binary):
        assert "hunter2" not in fails(capsys, "calibrate", path)


def test_a_bad_cell_is_named_with_a_short_printable_excerpt(capsys, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text(f"time,prompt_tokens,output_tokens\n0,10,5\n1,\x1b[31m{SECRET},5\n")
    line = fails(capsys, "fit-traffic", trace)
    assert line == f"{trace}: row 3: column 'prompt_tokens': '?[31mpassword=hunter...' is not a number"


def test_a_workload_trace_at_a_file_of_another_kind(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text(f"{SECRET}\n")
    workload = tmp_path / "w.yaml"
    workload.write_text(TINY_WORKLOAD.replace(
        "arrival: {kind: poisson, rate_rps: 2}", f"arrival: {{kind: trace, format: azure, path: {notes}}}"))
    line = fails(capsys, "validate", workload)
    assert line.startswith(f"{workload}:") and "not a header of column names" in line
    assert "hunter2" not in line


def test_an_empirical_csv_of_another_kind_does_not_echo_it(capsys, tmp_path):
    (tmp_path / "notes.csv").write_text(f"{SECRET}\n{SECRET}\n")
    (tmp_path / "bad.csv").write_text(f"tokens\n12\n{SECRET}\n")
    workload = tmp_path / "w.yaml"
    for csv_file, message in (("notes.csv", "has no column 'tokens' (the first line is not a header of column names)"),
                              ("bad.csv", "row 3: column 'tokens': 'password=hunter2 and...' is not a number")):
        workload.write_text(TINY_WORKLOAD.replace("prompt_tokens: 1", "prompt_tokens: "
                                                  f"{{kind: empirical, csv: {csv_file}, column: tokens}}"))
        line = fails(capsys, "validate", workload)
        assert line.startswith(f"{workload}:") and line.endswith(message), line


def test_real_column_names_are_still_listed(capsys):
    line = fails(capsys, "fit-traffic", FIXTURES / "generic_ms.csv")
    assert line.endswith("no column 'time' (columns: t_ms, user_msg_tokens, answer_tokens)")


# --------------------------------------------------------------------------- names in reports


def test_sweep_report_escapes_names_in_figures_and_markdown(capsys, tmp_path, experiment):
    out = tmp_path / "sweep"
    assert main(["sweep", str(experiment), "--out", str(out), "--quiet", "--workers", "1", "--report"]) == 0
    capsys.readouterr()
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "<script>" not in md and "<script>" not in page
    assert r"\$\\x\$ \<script\>alert(1)\</script\>" in md  # shown as typed, once rendered
    assert "$\\x$ &lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Drawn as typed, not as TeX: with svg.fonttype none the label is the SVG's text.
    svg = (out / "figures" / "latency_vs_load.svg").read_text()
    assert "$\\x$ &lt;script&gt;alert(1)&lt;/script&gt;" in svg


def test_run_report_escapes_the_workload_name(capsys, run_folder):
    assert main(["report", str(run_folder)]) == 0
    capsys.readouterr()
    md = (run_folder / "report.md").read_text()
    assert md.startswith(r"# Run report: \$\\x\$ \<script\>alert(1)\</script\>")
    assert "<script>" not in md and "<script>" not in (run_folder / "report.html").read_text()
    assert "$\\x$ &lt;script&gt;" in (run_folder / "figures" / "timeseries_traffic.svg").read_text()


def test_markdown_keeps_code_spans_and_escapes_the_rest():
    from sim.report.review import _md_text

    assert _md_text("class `chat_1`: a_b *c* [d](e) # f") == r"class `chat_1`: a\_b \*c\* \[d\](e) \# f"
    assert _md_text("- 1. not a list\n\n# nor a heading") == r"\- 1. not a list \# nor a heading"
    assert _md_text("`<b>` stays text") == r"\`\<b\>\` stays text"  # no raw HTML, even as code
    assert _md_text("a|b `c|d`", table=True) == r"a\|b `c\|d`"
