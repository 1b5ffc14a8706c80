"""TPOT, ITL and the per-user and per-GPU token rates, against an engine timeline computed by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import sim
from sim.cli import main
from sim.config.schema import Workload

ROOT = Path(__file__).resolve().parent.parent

# Step time = 10 ms + 1 ms per decoding sequence + 0.1 ms per prefill token (no noise).
# A (t=0, prompt 100, 11 tokens): prefill step 10 + 10 = 20 ms, first token at 0.020.
# B (t=0.005, prompt 100, 3 tokens) joins the next step beside A decoding: 10 + 1 + 10 = 21 ms, B's first
#   token at 0.041. Both decode (12 ms a step): B's 2 more tokens by 0.065; A then has 4 tokens, and its
#   7 more come alone at 11 ms: A ends at 0.142. TPOT A = 0.122 / 10 = 0.0122; B = 0.024 / 2 = 0.012.
# C (t=10, prompt 50, 1 token): one step, no token gap: no TPOT.
# D (t=20, prompt 10, 2 tokens): prefill 11 ms, one decode step 11 ms: TPOT 0.011.
TRACE = "time,prompt_tokens,output_tokens\n0,100,11\n0.005,100,3\n10,50,1\n20,10,2\n"
TPOT = [0.0122, 0.012, math.nan, 0.011]
GAPS, TOKENS = [0.122, 0.024, 0.011], [10, 2, 1]


def tiny(tmp_path: Path, slo: dict | None = None) -> Workload:
    (tmp_path / "t.csv").write_text(TRACE)
    data = {
        "simulation": {"duration_s": 100, "warmup_s": 0},
        # end_s: the window (and the measuring window) is [0, 40); tokens come from the trace.
        "traffic": {"classes": {"c": {"arrival": {"kind": "trace", "format": "csv", "path": "t.csv", "end_s": 40}}}},
        "models": {"m": {"kind": "self_hosted", "replicas": 1, "max_batch": 8, "engine": {
            "max_batch_tokens": 1000,
            "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001}}}},
    }
    if slo is not None:
        data["slo"] = slo
    return Workload.model_validate(data, context={"base_dir": str(tmp_path)})


def test_tpot_per_request_matches_the_hand_computed_timeline(tmp_path):
    result = sim.run(tiny(tmp_path))
    frame = result.requests
    np.testing.assert_allclose(frame["first_token_s"], [0.020, 0.041, 10.015, 20.011], atol=1e-12)
    np.testing.assert_allclose(frame["end_s"], [0.142, 0.065, 10.015, 20.022], atol=1e-12)
    np.testing.assert_allclose(frame["tpot_s"], TPOT, atol=1e-12)  # NaN where no gap: equal_nan


def test_tpot_itl_and_token_rates_in_the_summary(tmp_path):
    s = sim.run(tiny(tmp_path)).summary
    tpot = np.array([t for t in TPOT if not math.isnan(t)])
    assert s["tpot_mean_s"] == pytest.approx(tpot.mean(), abs=1e-12)
    assert s["tpot_p50_s"] == pytest.approx(0.012, abs=1e-12)
    assert s["tpot_p99_s"] == pytest.approx(np.percentile(tpot, 99), abs=1e-12)
    assert s["tpot_p999_s"] <= 0.0122 + 1e-12
    # ITL weighs every token gap alike: 0.157 s over 13 gaps, not the mean of the three TPOTs.
    assert s["itl_mean_s"] == pytest.approx(sum(GAPS) / sum(TOKENS), abs=1e-12)
    assert s["itl_mean_s"] != pytest.approx(s["tpot_mean_s"], abs=1e-6)
    assert s["tokens_out_per_s_per_user"] == pytest.approx(np.mean(1 / tpot), rel=1e-9)
    # The window ends at end_s = 40, not duration_s = 100: 17 output tokens over 40 s, one GPU.
    assert s["window_end_s"] == 40.0
    assert s["throughput_rps"] == pytest.approx(4 / 40)
    assert s["tokens_out_per_s"] == pytest.approx(17 / 40)
    assert s["tokens_out_per_s_per_gpu"] == pytest.approx(17 / 40, rel=1e-12)


def test_slo_tpot_counts_in_goodput(tmp_path):
    # 12.1 ms: A (12.2 ms) misses; B, D meet it; C has no TPOT and passes.
    assert sim.run(tiny(tmp_path, {"tpot_s": 0.0121})).summary["goodput_rps"] == pytest.approx(3 / 40)
    assert sim.run(tiny(tmp_path, {"tpot_s": 0.0105})).summary["goodput_rps"] == pytest.approx(1 / 40)
    assert sim.run(tiny(tmp_path, {"ttft_s": 5})).summary["goodput_rps"] == pytest.approx(4 / 40)


def test_tokens_per_gpu_divides_by_the_gpus_held(capsys):
    path = ROOT / "workloads" / "chat-selfhosted.yaml"
    for replicas in (2, 3):
        assert main(["run", str(path), "--json", "--replications", "1", "--set", "simulation.duration_s=300",
                     "--set", f"models.llama8b.replicas={replicas}"]) == 0
        s = json.loads(capsys.readouterr().out)
        # No cold start, no autoscaler: every replica is held for the whole window.
        assert s["tokens_out_per_s_per_gpu"] == pytest.approx(s["tokens_out_per_s"] / replicas, rel=1e-9)
        assert 0 < s["tpot_p50_s"] <= s["tpot_p95_s"] <= s["tpot_p99_s"]
        assert s["itl_mean_s"] == pytest.approx(s["tpot_mean_s"], rel=0.2)  # close, but not the same mean
        assert 1 / s["tpot_p99_s"] < s["tokens_out_per_s_per_user"] < 1 / s["tpot_p50_s"] * 1.5


def test_terminal_summary_shows_tpot_and_token_rates(capsys):
    assert main(["run", str(ROOT / "workloads" / "chat-selfhosted.yaml"), "--replications", "1",
                 "--set", "simulation.duration_s=300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tpot = next(line for line in lines if line.startswith("tpot "))
    assert len(tpot.split()) == 7 and all(cell.startswith("0.0") for cell in tpot.split()[1:])
    streaming = next(line for line in lines if line.startswith("streaming "))
    assert "per user" in streaming and "per GPU" in streaming and "inter-token latency" in streaming


def test_no_streaming_no_tpot():
    # A plain service_time endpoint answers all at once: no token gaps to time.
    s = sim.run(ROOT / "workloads" / "mmc.yaml", overrides=["simulation.duration_s=200", "simulation.warmup_s=0"],
                replications=1).summary
    assert math.isnan(s["tpot_p50_s"]) and math.isnan(s["itl_mean_s"])
    assert math.isnan(s["tokens_out_per_s_per_user"]) and "tokens_out_per_s_per_gpu" not in s
