"""Trace replay (Azure, Mooncake, generic CSV) and `llmsim fit-traffic`.

A replay must reproduce every timestamp and token count exactly, so the checks
here are equalities, not tolerances. The expected times are computed from the
fixture files independently of the readers (the Azure datetimes with integer
arithmetic on the text). Tests on the real traces in ../shared/data are marked
needs_shared_data and skip when that folder is absent (a fresh clone).
"""
from __future__ import annotations

import csv
import json
import math
import pickle
import re
from pathlib import Path

from typing import Optional

import numpy as np
import pandas as pd
import pytest
import yaml
from test_arrivals import request_class, run_source

import sim
from sim.cli import main
from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload
from sim.experiments.fit import fit_traffic
from sim.experiments.run import workload_warnings
from sim.model.offered import offered_utilisation
from sim.model.pipeline import simulate
from sim.model.traffic.traces import prefix_blocks

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "traces"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AZURE_CONV = SHARED / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = SHARED / "mooncake_conversation_trace.jsonl"



def needs_shared_data(test):
    """Mark a test that reads ../shared/data; it skips, saying why, where that folder is absent."""
    test = pytest.mark.skipif(not SHARED.is_dir(), reason=f"public reference data not found at {SHARED}")(test)
    return pytest.mark.needs_shared_data(test)

GENERIC_COLUMNS = {"time": "t_ms", "prompt_tokens": "user_msg_tokens", "output_tokens": "answer_tokens",
                   "time_unit": "ms"}


def azure_expected(path: Path) -> tuple[list[float], list[int], list[int]]:
    """Seconds since the first row, by integer arithmetic on 'YYYY-MM-DD HH:MM:SS.fffffff' (100 ns units)."""
    ticks, prompt, output = [], [], []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            date, clock = row["TIMESTAMP"].split(" ")
            hms, frac = clock.split(".")
            h, m, s = map(int, hms.split(":"))
            day = int(date.split("-")[2])
            ticks.append((((day * 24 + h) * 60 + m) * 60 + s) * 10**7 + int(frac.ljust(7, "0")))
            prompt.append(int(row["ContextTokens"]))
            output.append(int(row["GeneratedTokens"]))
    return [(t - ticks[0]) / 1e7 for t in ticks], prompt, output


def mooncake_expected(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ replay


def test_azure_replay_reproduces_every_time_and_token_count():
    times, prompt, output = azure_expected(FIXTURES / "azure_small.csv")
    rec = run_source({"kind": "trace", "format": "azure", "path": "azure_small.csv"}, 1000.0)
    assert rec.arrival == times and rec.prompt == prompt and rec.output == output
    assert times[1] == 0.0 and times[5] == 6.4428667  # equal stamps kept; 100 ns digits kept
    spec = request_class({"kind": "trace", "format": "azure", "path": "azure_small.csv"}).arrival
    assert spec.mean_rate_rps() == len(times) / times[-1]


def test_window_speed_and_rate_scale_are_exact():
    times, prompt, output = azure_expected(FIXTURES / "azure_small.csv")
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv", "start_s": 1.0, "end_s": 30.0,
               "speed": 2.5}
    keep = [k for k, t in enumerate(times) if 1.0 <= t < 30.0]
    want = [(times[k] - 1.0) / 2.5 for k in keep]
    rec = run_source(arrival, 1000.0)
    assert rec.arrival == want and rec.prompt == [prompt[k] for k in keep]
    assert rec.output == [output[k] for k in keep]
    # rate_scale multiplies the speed; the window's end, not its last request, sets the span.
    assert run_source(arrival, 1000.0, rate_scale=2.0).arrival == [t / 2.0 for t in want]
    assert request_class(arrival).arrival.mean_rate_rps() == len(keep) / ((30.0 - 1.0) / 2.5)
    # Arrivals stop at duration_s; max_output_tokens still caps answers.
    rec = run_source(arrival, 5.0, max_output_tokens=100)
    assert rec.arrival == [t for t in want if t < 5.0]
    assert rec.output == [min(output[k], 100) for k in keep][:len(rec.output)]


def test_mooncake_replay_keeps_prefix_blocks():
    rows = mooncake_expected(FIXTURES / "mooncake_small.jsonl")
    rec = run_source({"kind": "trace", "format": "mooncake", "path": "mooncake_small.jsonl", "speed": 2.0}, 100.0)
    assert rec.arrival == [r["timestamp"] / 1000.0 / 2.0 for r in rows]
    assert rec.prompt == [r["input_length"] for r in rows] and rec.output == [r["output_length"] for r in rows]
    for i, row in enumerate(rows):
        assert prefix_blocks(rec, i).tolist() == row["hash_ids"]
    assert prefix_blocks(rec, len(rows)) is None
    # The window keeps each request's own blocks.
    rec = run_source({"kind": "trace", "format": "mooncake", "path": "mooncake_small.jsonl", "start_s": 1.0}, 100.0)
    kept = [r for r in rows if r["timestamp"] >= 1000]
    assert rec.arrival == [(r["timestamp"] / 1000.0 - 1.0) for r in kept]
    assert [prefix_blocks(rec, i).tolist() for i in range(len(kept))] == [r["hash_ids"] for r in kept]


def test_generic_csv_with_columns_in_ms():
    with (FIXTURES / "generic_ms.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    first = int(rows[0]["t_ms"])
    rec = run_source({"kind": "trace", "format": "csv", "path": "generic_ms.csv", "columns": GENERIC_COLUMNS}, 100.0)
    assert rec.arrival == [(int(r["t_ms"]) - first) / 1000 for r in rows]
    assert rec.arrival[1] == 0.4 and rec.arrival[-1] == 10.125
    assert rec.prompt == [int(r["user_msg_tokens"]) for r in rows]
    assert rec.output == [int(r["answer_tokens"]) for r in rows]


def test_unsorted_csv_is_replayed_in_time_order_and_tokens_are_at_least_one(tmp_path):
    (tmp_path / "t.csv").write_text("time,prompt_tokens,output_tokens\n5,10,1\n1,20,0\n3,30.4,2\n1,40,3\n")
    rec = run_source({"kind": "trace", "format": "csv", "path": str(tmp_path / "t.csv")}, 100.0)
    assert rec.arrival == [0.0, 0.0, 2.0, 4.0]
    assert rec.prompt == [20, 40, 30, 10] and rec.output == [1, 3, 2, 1]


def test_replay_end_to_end_and_pickles_with_its_trace():
    workload = Workload.model_validate({
        "simulation": {"duration_s": 40},
        "traffic": {"classes": {"chat": {"arrival": {"kind": "trace", "format": "azure", "path": "azure_small.csv"},
                                         "prompt_tokens": 100, "output_tokens": 10}}},
        "models": {"m": {"kind": "self_hosted", "replicas": 1, "max_batch": 8, "service_time": 0.5}},
    }, context={"base_dir": str(FIXTURES)})
    # Sweeps send validated workloads to worker processes: the trace must travel with it.
    copy = pickle.loads(pickle.dumps(workload))
    times, prompt, _ = azure_expected(FIXTURES / "azure_small.csv")
    for w in (workload, copy):
        rec = simulate(w)
        assert rec.arrival == times and rec.prompt == prompt
        np.testing.assert_allclose(np.asarray(rec.end) - np.asarray(rec.arrival), 0.5)  # served, on time


# -------------------------------------------------------------- validation


def write_workload(tmp_path: Path, arrival: str) -> Path:
    path = tmp_path / "w.yaml"
    path.write_text("traffic:\n  classes:\n    c:\n      arrival:\n"
                    + "".join(f"        {line}\n" for line in arrival.strip().splitlines())
                    + "      prompt_tokens: 10\n      output_tokens: 5\n"
                    "models:\n  m: {kind: self_hosted, service_time: 1}\n")
    return path


@pytest.mark.parametrize("arrival, line, message", [
    ("kind: trace\nformat: azure\npath: missing.csv", 7,
     r"traffic\.classes\.c\.arrival\.path: trace file not found: .*missing\.csv$"),
    ("kind: trace\nformat: csv\npath: {fixtures}/generic_ms.csv\ncolumns: {{time: t_ms, time_unit: ms}}", 8,
     r"traffic\.classes\.c\.arrival\.columns: .*generic_ms\.csv: no column 'prompt_tokens' "
     r"\(columns: t_ms, user_msg_tokens, answer_tokens\)$"),
    ("kind: trace\nformat: csv\npath: {fixtures}/azure_small.csv", 7,
     r"traffic\.classes\.c\.arrival\.path: .*azure_small\.csv: no column 'time' \(columns: TIMESTAMP, "),
    ("kind: trace\nformat: azure\npath: {fixtures}/azure_small.csv\ncolumns: {{time: t}}", 8,
     r"traffic\.classes\.c\.arrival\.columns: only for format csv"),
    ("kind: trace\nformat: azure\npath: {fixtures}/azure_small.csv\nstart_s: 500", 4,
     r"traffic\.classes\.c\.arrival: no request of the trace lies in \[start_s, end_s\)"),
    ("kind: trace\nformat: mooncake\npath: {fixtures}/azure_small.csv", 7,
     r"traffic\.classes\.c\.arrival\.path: .*azure_small\.csv:1: not JSON"),
])
def test_bad_traces_are_one_line_errors(tmp_path, arrival, line, message):
    path = write_workload(tmp_path, arrival.format(fixtures=FIXTURES))
    with pytest.raises(ConfigError) as err:
        load_workload(path)
    assert len(err.value.lines) == 1, err.value.lines
    assert re.match(rf"{re.escape(str(path))}:{line}: {message}", err.value.lines[0]), err.value.lines[0]


def test_bad_cells_name_their_row(tmp_path):
    (tmp_path / "t.csv").write_text("time,prompt_tokens,output_tokens\n0,10,1\n1,ten,2\n")
    with pytest.raises(ConfigError, match=r"row 3: column 'prompt_tokens': 'ten' is not a number"):
        load_workload(write_workload(tmp_path, "kind: trace\nformat: csv\npath: t.csv"))


def test_set_path_is_reported_as_an_override():
    with pytest.raises(ConfigError) as err:
        load_workload(ROOT / "workloads" / "azure-conv-replay.yaml",
                      ["traffic.classes.chat.arrival.path=/nonexistent/conv.csv"])
    assert err.value.lines == ["--set traffic.classes.chat.arrival.path: trace file not found: /nonexistent/conv.csv"]


# ------------------------------------------------------------- fit-traffic


def write_trace(path: Path, times: np.ndarray, rng: np.random.Generator) -> Path:
    prompt = np.maximum(np.rint(rng.lognormal(math.log(1000), 0.8, times.size)), 1).astype(int)
    output = np.maximum(np.rint(rng.lognormal(math.log(120), 0.7, times.size)), 1).astype(int)
    rows = "\n".join(f"{t:.6f},{p},{o}" for t, p, o in zip(times, prompt, output))
    path.write_text("time,prompt_tokens,output_tokens\n" + rows + "\n")
    return path


def fitted_workload(yaml_text: str) -> Workload:
    """The printed block, pasted into a workload, validates."""
    data = yaml.safe_load(yaml_text)
    return Workload.model_validate({**data, "models": {"m": {"kind": "self_hosted", "service_time": 0.1}}})


def test_fit_finds_a_steady_poisson_rate(tmp_path):
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.exponential(1 / 4.0, 8000))
    fit = fit_traffic(write_trace(tmp_path / "p.csv", times, rng))
    s = fit.summary
    assert s["choice"] == "poisson" and not s["drift"] and not s["bursty"]
    assert abs(s["mean_rate_rps"] - 4.0) <= 4 * math.sqrt(8000) / times[-1]
    assert 0.95 < s["interarrival_cv"] < 1.05
    workload = fitted_workload(fit.yaml)
    assert workload.traffic.classes["fitted"].arrival.rate_rps == pytest.approx(s["mean_rate_rps"], rel=1e-3)
    assert workload.traffic.classes["fitted"].prompt_tokens.median == pytest.approx(1000, rel=0.05)


def test_fit_turns_a_drifting_rate_into_a_schedule(tmp_path):
    rng = np.random.default_rng(2)
    rates = [2.0, 8.0, 4.0]  # 10 minutes each
    times = np.sort(np.concatenate([600 * k + rng.uniform(0, 600, rng.poisson(600 * r)) for k, r in enumerate(rates)]))
    fit = fit_traffic(write_trace(tmp_path / "s.csv", times, rng), "csv")
    s = fit.summary
    assert s["choice"] == "schedule" and s["drift"] and s["step_s"] == 60
    assert 0.9 < s["within_step_cv"] < 1.1  # Poisson within the steps
    steps = fitted_workload(fit.yaml).traffic.classes["fitted"].arrival.steps
    assert len(steps) == 30
    for k, step in enumerate(steps):
        rate = rates[k // 10]
        assert abs(step.rate_rps - rate) <= 4.5 * math.sqrt(rate * 60) / 60, (k, step)
    assert "# the rate drifts" in fit.yaml and "peak" in fit.yaml


def test_fit_calls_bursty_traffic_bursty(tmp_path):
    rng = np.random.default_rng(3)
    shape = 1 / 9  # gamma gaps with cv 3
    times = np.cumsum(rng.gamma(shape, 1 / (5.0 * shape), 20000))
    fit = fit_traffic(write_trace(tmp_path / "b.csv", times, rng))
    s = fit.summary
    assert s["bursty"] and s["choice"] in ("gamma", "mmpp") and 2.7 < s["interarrival_cv"] < 3.3
    assert "bursty" in fit.yaml
    arrival = fitted_workload(fit.yaml).traffic.classes["fitted"].arrival
    assert arrival.mean_rate_rps() == pytest.approx(s["mean_rate_rps"], rel=0.01)


def test_fit_traffic_command(capsys, tmp_path):
    columns = ",".join(f"{k}={v}" for k, v in GENERIC_COLUMNS.items())
    assert main(["fit-traffic", str(FIXTURES / "generic_ms.csv"), "--columns", columns]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# llmsim fit-traffic generic_ms.csv (format csv)\n# 7 requests over 10.1 s")
    fitted_workload(text)
    assert main(["fit-traffic", str(FIXTURES / "mooncake_small.jsonl"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "mooncake" and summary["requests"] == 8
    assert summary["prompt_tokens"]["median"] == float(np.median([6758, 2290, 700, 1100, 512, 9000, 30, 2000]))
    assert main(["fit-traffic", str(tmp_path / "none.csv")]) == 2
    assert "trace file not found" in capsys.readouterr().err
    assert main(["fit-traffic", str(FIXTURES / "generic_ms.csv"), "--columns", "tim=t_ms"]) == 2
    assert "--columns: expected KEY=NAME" in capsys.readouterr().err


# ---------------------------------------------------------- the real traces


@needs_shared_data
def test_fit_traffic_on_the_azure_conversation_trace():
    fit = fit_traffic(AZURE_CONV)
    s = fit.summary
    assert s["format"] == "azure" and s["requests"] == 19366
    assert s["mean_rate_rps"] == pytest.approx(5.53, abs=0.01)
    assert s["prompt_tokens"]["median"] == 1020 and s["prompt_tokens"]["p95"] == 4083
    assert s["output_tokens"]["median"] == 129 and s["output_tokens"]["p95"] == 451
    assert 1.05 < s["interarrival_cv"] < 1.15 and s["within_step_cv"] < 1.1
    assert s["choice"] == "schedule" and s["dispersion"]["60s"] > 10
    assert 3.0 < s["quietest_minute_rps"] < s["peak_minute_rps"] < 9.0
    workload = fitted_workload(fit.yaml)
    assert workload.traffic.classes["fitted"].arrival.mean_rate_rps() == pytest.approx(5.53, rel=0.01)



@needs_shared_data
def test_shipped_replay_workload_replays_the_azure_trace_exactly():
    workload = load_workload(ROOT / "workloads" / "azure-conv-replay.yaml", ["simulation.duration_s=300",
                                                                            "simulation.warmup_s=0"])
    times, prompt, output = azure_expected(AZURE_CONV)
    rec = simulate(workload)
    n = sum(t < 300 for t in times)
    assert n > 1000 and rec.arrival == times[:n] and rec.prompt == prompt[:n] and rec.output == output[:n]
    assert workload.traffic.classes["chat"].arrival.mean_rate_rps() == pytest.approx(19366 / times[-1])


@needs_shared_data
def test_mooncake_prefix_blocks_repeat_as_documented():
    rec = run_source({"kind": "trace", "format": "mooncake", "path": str(MOONCAKE)}, 10**6)
    rows = mooncake_expected(MOONCAKE)
    assert rec.prompt == [r["input_length"] for r in rows]
    seen: set[int] = set()
    repeats = total = 0
    for i in range(len(rows)):
        blocks = prefix_blocks(rec, i).tolist()
        assert blocks == rows[i]["hash_ids"]
        repeats += sum(b in seen for b in blocks)
        total += len(blocks)
        seen.update(blocks)
    assert repeats / total == pytest.approx(0.366, abs=0.001)  # shared/data/README.md: 36.6%


# ----------------------------------------------- ids, tokens, long traces, the window


def trace_workload(tmp_path: Path, arrival: dict, *, duration: float = 100.0, warmup: float = 0.0,
                   extra_classes: Optional[dict] = None, tokens: bool = False, rate_scale: float = 1.0,
                   **model) -> Workload:
    """One trace class (tokens from the trace unless `tokens`) on a plain service-time endpoint."""
    cls = {"arrival": arrival, **({"prompt_tokens": 100, "output_tokens": 10} if tokens else {})}
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": warmup},
        "traffic": {"rate_scale": rate_scale, "classes": {"chat": cls, **(extra_classes or {})}},
        "models": {"m": {"kind": "self_hosted", "replicas": 1, "max_batch": 8, "service_time": 0.5, **model}},
    }, context={"base_dir": str(FIXTURES if "/" not in arrival["path"] else tmp_path)})


ID_TRACE = "ts,req,in,out\n3,c-3,30,3\n1,a-1,10,1\n2,b-2,20,2\n2,b-2b,25,2\n"
ID_COLUMNS = {"time": "ts", "id": "req", "prompt_tokens": "in", "output_tokens": "out"}


def test_id_column_passes_through_to_requests_parquet(tmp_path, capsys):
    (tmp_path / "ids.csv").write_text(ID_TRACE)
    arrival = {"kind": "trace", "format": "csv", "path": str(tmp_path / "ids.csv"), "columns": ID_COLUMNS}
    poisson = {"arrival": {"kind": "poisson", "rate_rps": 0.5}, "prompt_tokens": 5, "output_tokens": 5}
    result = sim.run(trace_workload(tmp_path, arrival, extra_classes={"other": poisson}))
    requests = result.requests
    replayed = requests[requests["class"] == "chat"]
    # In time order (equal times keep file order), as text; other classes' requests have none.
    assert replayed["trace_id"].tolist() == ["a-1", "b-2", "b-2b", "c-3"]
    assert replayed["prompt_tokens"].tolist() == [10, 20, 25, 30]
    others = requests[requests["class"] == "other"]
    assert len(others) > 10 and others["trace_id"].isna().all()
    assert str(requests["trace_id"].dtype) == "string"
    # End to end: the column survives requests.parquet.
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"simulation": {"duration_s": 10}, "traffic": {"classes": {"chat": {
        "arrival": {**arrival, "path": "ids.csv"}}}}, "models": {"m": {"kind": "self_hosted", "service_time": 0.1}}}))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    written = pd.read_parquet(tmp_path / "out" / "requests.parquet")
    assert written["trace_id"].tolist() == ["a-1", "b-2", "b-2b", "c-3"]
    # Without an id column there is no trace_id column.
    plain = {"kind": "trace", "format": "azure", "path": "azure_small.csv"}
    assert "trace_id" not in sim.run(trace_workload(tmp_path, plain)).requests


def test_a_missing_id_column_is_a_one_line_error(tmp_path):
    (tmp_path / "ids.csv").write_text(ID_TRACE)
    path = write_workload(tmp_path, "kind: trace\nformat: csv\npath: ids.csv\n"
                          "columns: {time: ts, id: request, prompt_tokens: in, output_tokens: out}")
    with pytest.raises(ConfigError) as err:
        load_workload(path)
    assert err.value.lines == [f"{path}:8: traffic.classes.c.arrival.columns: {tmp_path / 'ids.csv'}: "
                               "no column 'request' (columns: ts, req, in, out)"]


def test_token_distributions_of_a_trace_class_come_from_the_trace(tmp_path):
    _, prompt, output = azure_expected(FIXTURES / "azure_small.csv")
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv", "end_s": 7.0}  # the first 6 rows
    cls = trace_workload(tmp_path, arrival).traffic.classes["chat"]
    assert cls.prompt_tokens.mean == np.mean(prompt[:6]) and cls.output_tokens.mean == np.mean(output[:6])
    # The offered load is what the same counts written out as an empirical distribution give.
    explicit = Workload.model_validate({
        "simulation": {"duration_s": 100},
        "traffic": {"classes": {"chat": {"arrival": arrival,
                                         "prompt_tokens": {"kind": "empirical", "values": prompt[:6]},
                                         "output_tokens": {"kind": "empirical", "values": output[:6]}}}},
        "models": {"m": {"kind": "self_hosted", "max_batch": 8, "engine": {
            "max_batch_tokens": 2048, "kv_cache_tokens": 20000,
            "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001}}}},
    }, context={"base_dir": str(FIXTURES)})
    implicit = explicit.model_copy(deep=True)
    for name in ("prompt_tokens", "output_tokens"):
        setattr(implicit.traffic.classes["chat"], name, getattr(cls, name))
    assert offered_utilisation(implicit) == offered_utilisation(explicit)
    assert offered_utilisation(implicit)["m"] > 0
    # Replayed as recorded, and the workload still pickles with its trace (sweeps ship it to workers).
    workload = pickle.loads(pickle.dumps(trace_workload(tmp_path, arrival)))
    assert workload.traffic.classes["chat"].prompt_tokens.mean == np.mean(prompt[:6])
    assert simulate(workload).prompt == prompt[:6]


def test_a_class_that_is_not_a_trace_still_needs_its_tokens(tmp_path, capsys):
    path = tmp_path / "w.yaml"
    path.write_text("traffic:\n  classes:\n    c:\n      arrival: {kind: poisson, rate_rps: 1}\n"
                    "      prompt_tokens: 10\nmodels:\n  m: {kind: self_hosted, service_time: 1}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (f"{path}:3: traffic.classes.c.output_tokens: required key is missing "
                                       "(only a trace replay may leave it out)\n")


def test_a_trace_longer_than_the_run_warns_with_the_count_it_drops(tmp_path, capsys):
    times, _, _ = azure_expected(FIXTURES / "azure_small.csv")
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv"}
    dropped = sum(t >= 10.0 for t in times)
    line = (f"traffic.classes.chat.arrival: {dropped:,} of {len(times):,} trace arrivals fall after "
            "duration_s=10 and are not replayed")
    assert workload_warnings(trace_workload(tmp_path, arrival, duration=10.0)) == [line]
    # rate_scale (and speed) bring more of the trace inside the run: at 2x, those after 20 trace seconds.
    scaled = workload_warnings(trace_workload(tmp_path, arrival, duration=10.0, rate_scale=2.0))
    assert scaled == [line.replace(f"{dropped:,} of", f"{sum(t >= 20.0 for t in times):,} of")]
    assert workload_warnings(trace_workload(tmp_path, arrival, duration=40.0)) == []
    # The CLI prints it on standard error, for run and validate; --json output stays clean.
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"simulation": {"duration_s": 10}, "traffic": {"classes": {"chat": {
        "arrival": {**arrival, "path": str(FIXTURES / "azure_small.csv")}}}},
        "models": {"m": {"kind": "self_hosted", "service_time": 0.1}}}))
    assert main(["run", str(path), "--json", "--replications", "3"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["requests_arrived"] == len(times) - dropped
    assert err == f"llmsim: warning: {line}\n"
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().err == f"llmsim: warning: {line}\n"


def test_run_time_warnings_are_collected_once_in_order(tmp_path, monkeypatch):
    import sim.experiments.run as run_module

    real = run_module.simulate

    def simulate_and_warn(workload, replication=0, seed=None, **progress):
        rec = real(workload, replication=replication, seed=seed, **progress)
        rec.warnings += ["replica 0 ran beyond its calibrated range", f"only in replication {replication}"]
        return rec

    monkeypatch.setattr(run_module, "simulate", simulate_and_warn)
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv"}
    result = sim.run(trace_workload(tmp_path, arrival, duration=10.0), replications=2)
    assert result.warnings[1:] == ["replica 0 ran beyond its calibrated range", "only in replication 0",
                                   "only in replication 1"]
    assert result.warnings[0].startswith("traffic.classes.chat.arrival: ")


@pytest.mark.parametrize("scaling", [{"speed": 2.0}, {"rate_scale": 2.0}])
def test_a_faster_replay_is_measured_up_to_its_last_arrival(tmp_path, scaling):
    times, _, _ = azure_expected(FIXTURES / "azure_small.csv")
    speed = scaling.get("speed", 1.0)
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv", "speed": speed}
    warmup, end = 2.0, times[-1] / 2  # the trace spans T = 33.3 s; replayed twice as fast: T / 2
    workload = trace_workload(tmp_path, arrival, duration=60.0, warmup=warmup,
                              rate_scale=scaling.get("rate_scale", 1.0), gpu_hourly_usd=3.6)
    assert workload.measure_end_s() == end
    result = sim.run(workload)
    s = result.summary
    # Every request is served alone in 0.5 s; completions in [warm-up, T / 2) over T / 2 - warm-up.
    done = sum(warmup <= t / 2 + 0.5 < end for t in times)
    assert done == 5 and s["window_end_s"] == end
    assert s["throughput_rps"] == done / (end - warmup)
    # The replica is paid for the window only: $3.6/h over T / 2 - warm-up seconds.
    assert s["cost_total_usd"] == pytest.approx(3.6 * (end - warmup) / 3600, rel=1e-12)
    assert s["cost_per_hour_usd"] == pytest.approx(3.6, rel=1e-12)
    # Busy slot-seconds over the window: the 0.5 s services inside it, over 8 slots held.
    busy = sum(min(t / 2 + 0.5, end) - max(t / 2, warmup) for t in times if t / 2 + 0.5 > warmup and t / 2 < end)
    assert s["utilisation_m"] == pytest.approx(busy / (8 * (end - warmup)), rel=1e-9)
    # The time series still shows the whole run, up to duration_s (the replay's end, then nothing).
    assert result.timeseries["end_s"].iloc[-1] == 60.0
    assert result.timeseries.loc[result.timeseries["start_s"] >= end, "arrivals"].sum() == 0


def test_the_window_stays_at_duration_with_a_class_that_is_not_a_trace(tmp_path):
    arrival = {"kind": "trace", "format": "azure", "path": "azure_small.csv", "speed": 2.0}
    poisson = {"arrival": {"kind": "poisson", "rate_rps": 0.1}, "prompt_tokens": 5, "output_tokens": 5}
    assert trace_workload(tmp_path, arrival, duration=60.0, extra_classes={"p": poisson}).measure_end_s() == 60.0
    # A window's end_s, not its last request, ends a replay; never past duration_s.
    windowed = {**arrival, "end_s": 50.0}
    assert trace_workload(tmp_path, windowed, duration=60.0).measure_end_s() == 25.0
    assert trace_workload(tmp_path, windowed, duration=20.0).measure_end_s() == 20.0


def test_a_warmup_past_the_replay_is_an_error(tmp_path):
    (tmp_path / "t.csv").write_text("time,prompt_tokens,output_tokens\n0,10,2\n30,10,2\n")
    path = tmp_path / "w.yaml"
    path.write_text("simulation:\n  duration_s: 100\n  warmup_s: 20\ntraffic:\n  rate_scale: 2\n  classes:\n"
                    "    c:\n      arrival: {kind: trace, format: csv, path: t.csv}\n"
                    "models:\n  m: {kind: self_hosted, service_time: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_workload(path)
    assert err.value.lines == [f"{path}:3: simulation.warmup_s: 20 must be less than 15, where the trace replays "
                               "end (after speed and rate_scale): nothing would be measured"]
