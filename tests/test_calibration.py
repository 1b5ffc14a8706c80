"""`llmsim calibrate`: recovering known coefficients, and replaying a real server's measurements.

Synthetic step logs made from known coefficients (with noise, slow episodes and stalls)
check that the fit recovers them; request logs made by the simulator itself check the
simulation-based fit. Tests marked needs_shared_data use ../shared/data/gpu-h100-b512
(a real continuous-batching server on an H100) and skip where it is absent.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import sim
from sim.cli import main
from sim.config.loader import load_workload
from sim.experiments.calibration import calibrate
from sim.experiments.calibration.logs import read_logs
from sim.experiments.calibration.steps import fit_steps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpu-h100-b512"
TRUE = {"base_s": 0.010, "per_decode_seq_s": 2e-4, "per_prefill_token_s": 3e-5, "per_kv_token_s": 5e-8}


def needs_shared_data(test):
    """Skip (with the reason) where ../shared/data is absent, as on a fresh clone."""
    test = pytest.mark.skipif(not SHARED.is_dir(), reason=f"public reference data not found at {SHARED}")(test)
    return pytest.mark.needs_shared_data(test)


def synthetic_steps(path: Path, steps: int = 6000, seed: int = 3, cv: float = 0.05, episodes: bool = True,
                    stalls=((20.0, 1.0), (55.0, 0.8), (90.0, 1.5))) -> Path:
    """A step log from TRUE: per-step gamma noise, slow episodes (x1.5, 2 s every ~10 s), stalls."""
    rng = np.random.default_rng(seed)
    wave = np.sin(2 * np.pi * np.arange(steps) / 700)  # the batch swings between 1 and 64 and back
    decode = np.clip(np.rint(32.5 + 31.5 * wave + rng.integers(-2, 3, steps)), 1, 64).astype(int)
    prefill = np.where(rng.random(steps) < 0.25, rng.integers(16, 512, steps), 0)
    kv = decode * rng.uniform(300, 1500, steps)
    nominal = (TRUE["base_s"] + TRUE["per_decode_seq_s"] * decode + TRUE["per_prefill_token_s"] * prefill
               + TRUE["per_kv_token_s"] * kv)
    duration = nominal * rng.gamma(1 / cv ** 2, cv ** 2, steps)
    t, slow, switch, start = 0.0, False, rng.exponential(8.0), np.empty(steps)
    pending = sorted(stalls)
    for k in range(steps):
        while episodes and t >= switch:
            slow = not slow
            switch += rng.exponential(2.0 if slow else 8.0)
        if slow:
            duration[k] *= 1.5
        if pending and t >= pending[0][0]:
            duration[k] += pending.pop(0)[1]
        start[k] = t
        t += duration[k]
    pd.DataFrame({"t_s": start, "duration_s": duration, "n_decode": decode, "prefill_tokens": prefill,
                  "kv_tokens": kv.round()}).to_csv(path, index=False)
    return path


def test_the_step_fit_recovers_known_coefficients_noise_episodes_and_stalls(tmp_path):
    steps, _ = read_logs([str(synthetic_steps(tmp_path / "steps.csv"))])
    fit = fit_steps(steps)
    for name, value in TRUE.items():
        low, high = fit.intervals[name]
        assert low <= value <= high, (name, value, fit.intervals[name])
        assert fit.coefficients[name] == pytest.approx(value, rel=0.15)
    assert high - low < 0.5 * value  # and the intervals say something
    assert fit.noise_cv == pytest.approx(0.05, rel=0.35)
    assert fit.episodes["multiplier"] == pytest.approx(1.5, rel=0.1)
    assert fit.episodes["mean_duration_s"] == pytest.approx(2.0, rel=0.4)
    assert fit.episodes["mean_interval_s"] == pytest.approx(8.0, rel=0.4)
    assert [round(t) for _, t, _, _ in fit.stalls] == [20, 55, 90]
    assert [round(excess, 1) for _, _, _, excess in fit.stalls] == [1.0, 0.8, 1.5]
    assert fit.decode_max == 64 and fit.prefill_max <= 511


def test_a_step_log_without_episodes_finds_none_and_keeps_the_noise(tmp_path):
    steps, _ = read_logs([str(synthetic_steps(tmp_path / "steps.csv", cv=0.2, episodes=False, stalls=()))])
    fit = fit_steps(steps)
    assert fit.episodes is None and fit.stalls == []
    assert fit.noise_cv == pytest.approx(0.2, rel=0.1)
    assert fit.coefficients["base_s"] == pytest.approx(TRUE["base_s"], rel=0.15)


def test_calibrate_writes_a_block_a_workload_takes(tmp_path, capsys):
    steps = synthetic_steps(tmp_path / "steps.csv")
    out = tmp_path / "engine.yaml"
    assert main(["calibrate", str(steps), "--out", str(out), "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    block = yaml.safe_load(out.read_text())["engine"]
    assert block["max_batch_tokens"] == int(pd.read_csv(steps).eval("n_decode + prefill_tokens").max())
    assert block["step_time"]["calibrated"]["decode_seqs_max"] == 64
    assert block["step_time"]["slow_episodes"]["multiplier"] == pytest.approx(1.5, rel=0.1)
    text = out.read_text()
    assert "95% intervals" in text and "stall(s)" in text and "belong to the measured host" in text
    workload = {"version": 1, "simulation": {"duration_s": 60, "seed": 1},
                "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 2},
                                                 "prompt_tokens": 300, "output_tokens": 50}}},
                "models": {"m": {"kind": "self_hosted", "max_batch": 64, "engine": block}}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(workload))
    assert load_workload(path).models["m"].engine.step_time.per_kv_token_s > 0


def test_a_run_beyond_the_calibrated_range_warns(tmp_path, capsys):
    workload = {"version": 1, "simulation": {"duration_s": 120, "seed": 1},
                "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 30},
                                                 "prompt_tokens": 100, "output_tokens": 200}}},
                "models": {"m": {"kind": "self_hosted", "max_batch": 256, "engine": {"max_batch_tokens": 1024,
                           "step_time": {"base_s": 0.01, "per_decode_seq_s": 1e-4, "per_prefill_token_s": 1e-5,
                                         "calibrated": {"source": "steps of a.csv", "decode_seqs_max": 32,
                                                        "prefill_tokens_max": 2048}}}}}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(workload))
    result = sim.run(path)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("models.m: a replica reached ") and "beyond the 32" in result.warnings[0]
    assert main(["run", str(path)]) == 0
    assert "llmsim: warning: models.m: a replica reached" in capsys.readouterr().err
    workload["traffic"]["classes"]["chat"]["arrival"]["rate_rps"] = 1  # well within: no warning
    path.write_text(yaml.safe_dump(workload))
    assert sim.run(path).warnings == []


def simulated_request_log(tmp_path: Path, step_time: dict, rate: float = 8.0, n: int = 400) -> Path:
    """A request log made by the simulator: Poisson arrivals replayed on one known engine."""
    rng = np.random.default_rng(7)
    trace = pd.DataFrame({"time": np.cumsum(rng.exponential(1 / rate, n)),
                          "prompt_tokens": rng.integers(50, 1500, n), "output_tokens": rng.integers(5, 300, n)})
    trace.to_csv(tmp_path / "trace.csv", index=False)
    workload = {"version": 1, "simulation": {"duration_s": float(trace.time.max()) + 1, "seed": 5},
                "traffic": {"classes": {"c": {"arrival": {"kind": "trace", "format": "csv", "path": "trace.csv"}}}},
                "models": {"m": {"kind": "self_hosted", "max_batch": 256,
                                 "engine": {"max_batch_tokens": 2048, "step_time": step_time}}}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workload))
    requests = sim.run(tmp_path / "w.yaml").requests
    log = pd.DataFrame({"arrival_s": requests.arrival_s + 100.0, "prompt_tokens": requests.prompt_tokens,
                        "output_tokens": requests.output_tokens, "ttft_s": requests.ttft_s, "e2e_s": requests.e2e_s})
    log.to_csv(tmp_path / "requests.csv", index=False)
    return tmp_path / "requests.csv"


def test_fitting_on_a_request_log_alone_reproduces_its_latencies(tmp_path):
    truth = {"base_s": 0.012, "per_decode_seq_s": 3e-4, "per_prefill_token_s": 4e-5, "noise_cv": 0.1}
    log = simulated_request_log(tmp_path, truth)
    result = calibrate([str(log)], max_batch_tokens=2048, replications=8)
    check = result.checks[0]
    for key in ("e2e_p50", "e2e_p99", "ttft_p50", "tpot_p50"):
        assert check["simulated"][key] == pytest.approx(check["measured"][key], rel=0.05), key
    assert "simulation-based fit" in result.engine["step_time"]["calibrated"]["source"]
    assert result.step_fit is None and "No intervals" in " ".join(result.notes)


def test_a_vllm_benchmark_result_is_replayed_as_it_was_sent(tmp_path):
    """vllm bench serve --save-detailed keeps no send times: N in flight (max_concurrency) is replayed as N."""
    truth = {"base_s": 0.012, "per_decode_seq_s": 3e-4, "per_prefill_token_s": 2e-5, "noise_cv": 0.05}
    workload = {"version": 1, "simulation": {"duration_s": 120, "seed": 3},
                "traffic": {"classes": {"bench": {
                    "arrival": {"kind": "closed", "users": 8, "think_time_s": 0},
                    "prompt_tokens": {"kind": "uniform", "low": 50, "high": 800},
                    "output_tokens": {"kind": "uniform", "low": 20, "high": 300}}}},
                "models": {"m": {"kind": "self_hosted", "engine": {"max_batch_tokens": 2048, "step_time": truth}}}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(workload))
    sent = sim.run(tmp_path / "w.yaml").requests
    tpot = ((sent.e2e_s - sent.ttft_s) / (sent.output_tokens - 1)).to_numpy()
    result = {"request_rate": "inf", "burstiness": 1.0, "max_concurrency": 8,
              "input_lens": sent.prompt_tokens.tolist(), "output_lens": sent.output_tokens.tolist(),
              "ttfts": sent.ttft_s.tolist(), "itls": [[g] * (o - 1) for g, o in zip(tpot, sent.output_tokens)],
              "errors": [""] * len(sent)}
    path = tmp_path / "vllm.json"
    path.write_text(json.dumps(result))
    [log] = read_logs([str(path)])[1]
    assert log.arrival is None and log.max_concurrency == 8
    assert log.e2e == pytest.approx(sent.e2e_s.to_numpy())
    check = calibrate([str(path)], max_batch_tokens=2048, replications=8).checks[0]
    # Replayed in distribution (tokens resampled, 8 users in a closed loop): the truth itself comes
    # within ~3% of these quantiles, so 8% leaves room for the fit, not for a wrong replay.
    for key in ("e2e_p50", "e2e_p99", "tpot_p50", "ttft_p50"):
        assert check["simulated"][key] == pytest.approx(check["measured"][key], rel=0.08), key


@pytest.mark.parametrize("args, message", [
    (["calibrate", "/no/such.csv"], "llmsim calibrate: /no/such.csv: no such file"),
    (["calibrate", "README.md"], "neither a step log"),
    (["calibrate", "STEPS", "--columns", "decode=nope"], "--columns decode=nope: no such column"),
    (["calibrate", "STEPS", "--columns", "decode"], "--columns: expected KEY=NAME, got 'decode'"),
    (["calibrate", "TINY"], "steps are too few to fit"),
    (["calibrate", "BAD"], "row 3: column 'n_decode': 'x' is not a number"),
])
def test_bad_calibration_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    steps = synthetic_steps(tmp_path / "steps.csv", steps=200, stalls=())
    pd.read_csv(steps).head(12).to_csv(tmp_path / "tiny.csv", index=False)
    (tmp_path / "bad.csv").write_text("duration_s,n_decode,prefill_tokens\n0.1,1,0\n0.1,x,0\n")
    names = {"STEPS": str(steps), "TINY": str(tmp_path / "tiny.csv"), "BAD": str(tmp_path / "bad.csv")}
    root = Path(__file__).resolve().parents[1]
    args = [names.get(a, str(root / a) if a == "README.md" else a) for a in args] + ["--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ the real server (shared data)

def same_requests_percentiles(requests: pd.DataFrame, measured: pd.DataFrame, column: str, q: float) -> float:
    """The q-th percentile of `column` over the measured requests, per replication, averaged."""
    keep = requests[requests.trace_id.isin(measured.request_id)]
    return float(keep.groupby("replication")[column].quantile(q / 100).mean())


@needs_shared_data
def test_a_step_log_calibration_replays_the_real_servers_requests(tmp_path):
    """Done-when of issue 9: calibrate on the step log, replay the L1 request log through the block."""
    out = tmp_path / "engine.yaml"
    assert main(["calibrate", str(SHARED / "load_steps.csv"), "--kv-cache-tokens", "262144", "--out", str(out),
                 "--quiet"]) == 0
    engine = yaml.safe_load(out.read_text())["engine"]
    assert engine["max_batch_tokens"] == 512  # the server's budget, read off its fullest steps
    workload = {"version": 1, "simulation": {"duration_s": 400, "seed": 1, "replications": 20},
                "traffic": {"classes": {"L1": {"arrival": {
                    "kind": "trace", "format": "csv", "path": str(SHARED / "load_cb.csv"),
                    "columns": {"time": "arrival_s", "prompt_tokens": "prompt_tokens",
                                "output_tokens": "output_tokens", "id": "request_id"}}}}},
                "models": {"h100": {"kind": "self_hosted", "max_batch": 512, "engine": engine}}}
    path = tmp_path / "replay.yaml"
    path.write_text(yaml.safe_dump(workload))
    requests = sim.run(path).requests
    measured = pd.read_csv(SHARED / "load_cb.csv")
    for column, q, tolerance in (("e2e_s", 50, 0.03), ("e2e_s", 99, 0.03), ("ttft_s", 95, 0.08)):
        got = same_requests_percentiles(requests, measured, column, q)
        assert got == pytest.approx(np.percentile(measured[column], q), rel=tolerance), (column, q)


@needs_shared_data
def test_a_request_log_alone_calibrates_within_five_percent():
    result = calibrate([str(SHARED / "load_cb.csv")], max_batch_tokens=512, kv_cache_tokens=262144, max_batch=512,
                       replications=16)
    check = result.checks[0]
    for key in ("e2e_p50", "e2e_p99"):
        assert check["simulated"][key] == pytest.approx(check["measured"][key], rel=0.05), key


@needs_shared_data
def test_the_pilot_and_l1_fitted_together_each_replay_within_five_percent():
    result = calibrate([str(SHARED / name) for name in ("load_steps.csv", "load_cb.csv", "load_cb_pilot.csv")],
                       kv_cache_tokens=262144, max_batch=512, replications=16)
    assert [c["log"] for c in result.checks] == ["load_cb.csv [L1]", "load_cb_pilot.csv [pilot]"]
    for check in result.checks:
        assert check["simulated"]["e2e_p50"] == pytest.approx(check["measured"]["e2e_p50"], rel=0.05), check["log"]
    # The pilot's warm-up stalls (its first step took 1.17 s) are put back in its replay.
    assert result.checks[1]["stalls_replayed"] == 2
    assert result.step_fit.runs == {"pilot": 263, "L1": 2792}
    assert not math.isnan(result.step_fit.intervals["base_s"][0])
