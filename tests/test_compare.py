"""`llmsim compare`: paired differences on common random numbers, their intervals, output and errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sim.cli import main
from sim.experiments.compare import compare, format_quantities, paired_difference
from sim.metrics.stats import t975

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "workloads/chat-selfhosted.yaml"
MMC = ROOT / "workloads/mmc.yaml"
SHORT = ["simulation.duration_s=600"]  # 10 minutes of traffic: ~3,000 requests per replication


@pytest.fixture(scope="module")
def three_replicas(tmp_path_factory) -> Path:
    """chat-selfhosted.yaml with 3 replicas instead of 2, and nothing else changed."""
    text = CHAT.read_text()
    assert text.count("replicas: 2") == 1
    path = tmp_path_factory.mktemp("compare") / "chat-3-replicas.yaml"
    path.write_text(text.replace("replicas: 2", "replicas: 3"))
    return path


@pytest.fixture(scope="module")
def more_replicas(three_replicas):
    return compare(CHAT, three_replicas, replications=5, overrides=SHORT)


def test_more_replicas_lower_p99_latency_and_cost_more(more_replicas):
    table = more_replicas.table
    assert more_replicas.seed == 1 and more_replicas.replications == 5
    p99 = table.loc["e2e_p99_s"]
    assert p99["significant"] and p99["diff_ci95_low"] <= p99["diff"] <= p99["diff_ci95_high"] < 0
    assert p99["verdict"] == "B lower (better)"
    # Replica-hours are not random: 3 x $2.99/h (the catalog's H100) against 2 x $2.99/h in every replication.
    hour = table.loc["cost_per_hour_usd"]
    assert (hour["a"], hour["b"], hour["diff"]) == pytest.approx((5.98, 8.97, 2.99), abs=1e-12)
    assert hour["diff_ci95_low"] == pytest.approx(2.99, abs=1e-12) == hour["diff_ci95_high"]
    assert hour["rel_ci95_low"] == pytest.approx(0.5) and hour["rel_ci95_high"] == pytest.approx(0.5)
    assert "p99 e2e -" in more_replicas.verdict and "cost/hour +50%" in more_replicas.verdict


def test_paired_interval_is_much_narrower_than_an_unpaired_one(more_replicas):
    # Common random numbers: replication r of A and of B see the same requests,
    # so the traffic's own variability cancels in B_r - A_r. Two independent
    # summaries (Welch) keep all of it. The bounds hold across seeds 1-8, not
    # just this one: throughput's paired half-width was 1-6% of the unpaired
    # one, the p95/p99 latencies' 14-69%.
    a, b, n = more_replicas.result_a.replications, more_replicas.result_b.replications, 5
    for metric, bound in (("throughput_rps", 0.1), ("e2e_p95_s", 0.75), ("e2e_p99_s", 0.75)):
        row = more_replicas.table.loc[metric]
        paired = (row["diff_ci95_high"] - row["diff_ci95_low"]) / 2
        va, vb = a[metric].var(ddof=1) / n, b[metric].var(ddof=1) / n
        welch_df = (va + vb) ** 2 / (va**2 / (n - 1) + vb**2 / (n - 1))
        unpaired = t975(max(1, math.floor(welch_df))) * math.sqrt(va + vb)
        assert paired < bound * unpaired, metric


def test_identical_workloads_differ_by_exactly_zero(capsys):
    args = ["compare", str(CHAT), str(CHAT), "--set", SHORT[0], "--replications", "3"]
    assert main([*args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    for name, m in metrics.items():
        assert (m["diff"], m["diff_ci95_low"], m["diff_ci95_high"], m["rel_diff"]) == (0, 0, 0, 0), name
        assert m["significant"] is False and m["a"] == m["b"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split(" ")[0] in metrics]
    assert len(rows) == len(metrics) and all(row.endswith("no difference") for row in rows)
    assert "nan" not in out.lower()
    assert out.rstrip().endswith("B vs A: no difference (identical results in every replication)")


def test_cli_table_and_summary(capsys, three_replicas):
    assert main(["compare", str(CHAT), str(three_replicas), "--set", SHORT[0], "--replications", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"A  {CHAT}" and lines[1] == f"B  {three_replicas}"
    row = next(line for line in lines if line.startswith("cost_per_hour_usd"))
    assert row.split() == ["cost_per_hour_usd", "$5.98", "$8.97", "+$2.99", "[+$2.99,", "+$2.99]", "+50%",
                           "B", "higher", "(worse)"]
    ttft = next(line for line in lines if line.startswith("ttft_p50_s"))
    assert ttft.count(" ms") == 3  # medians of ~50 ms and their difference in milliseconds
    assert lines[-1].startswith("B vs A: ") and "no significant change in throughput" in lines[-1]


def test_json_shape(capsys, three_replicas):
    assert main(["compare", str(CHAT), str(three_replicas), "--set", SHORT[0], "--replications", "2",
                 "--seed", "7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("a", "b", "seed", "replications")} == {
        "a": str(CHAT), "b": str(three_replicas), "seed": 7, "replications": 2}
    assert list(data["metrics"]) == [
        "throughput_rps", "goodput_rps", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s", "e2e_p95_s",
        "e2e_p99_s", "queue_wait_mean_s", "cost_per_request_usd", "cost_per_1k_usd", "cost_per_hour_usd",
        "utilisation_llama8b"]
    for m in data["metrics"].values():
        assert {"a", "b", "diff", "diff_ci95_low", "diff_ci95_high", "rel_diff", "significant"} <= set(m)
        assert m["diff"] == pytest.approx(m["b"] - m["a"], abs=1e-12)
        assert m["diff_ci95_low"] <= m["diff"] <= m["diff_ci95_high"]
        assert isinstance(m["significant"], bool)


def test_one_replication_has_no_intervals_and_says_so(capsys, three_replicas):
    args = ["compare", str(CHAT), str(three_replicas), "--set", SHORT[0], "--replications", "1"]
    assert main([*args, "--json"]) == 0
    p99 = json.loads(capsys.readouterr().out)["metrics"]["e2e_p99_s"]
    assert p99["diff"] < 0 and p99["diff_ci95_low"] is None and p99["significant"] is False  # NaN -> null
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "intervals need >= 2 replications" in out and "nan" not in out.lower()


def test_defaults_and_metrics_present_in_both(capsys):
    # mmc has no slo (no goodput) and its endpoint is 'server', not 'llama8b'.
    result = compare(MMC, CHAT, overrides=["simulation.duration_s=900", "simulation.warmup_s=60"])
    assert result.seed == 1 and result.replications == 5  # A's seed; the larger replication count (5 vs 3)
    assert "goodput_rps" not in result.table.index
    assert not [m for m in result.table.index if m.startswith("utilisation_")]


def test_bad_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(MMC.read_text().replace("replicas: 4", "replicas: -4"))
    assert main(["compare", str(MMC), str(bad)]) == 2
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "replicas: -4" in text)
    assert capsys.readouterr().err.strip().splitlines() == [f"{bad}:{line}: models.server.replicas: must be greater than 0"]
    assert main(["compare", str(MMC), "no/such.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["no/such.yaml: file not found"]


def test_set_applies_to_both_and_names_the_file_that_lacks_the_path(capsys, three_replicas):
    assert main(["compare", str(MMC), str(CHAT), "--set", "models.llama8b.replicas=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{MMC}: --set models.llama8b.replicas: no model 'llama8b' (known: server)"]
    # A --set both reject reads as it does for `llmsim run`: once, without a file.
    assert main(["compare", str(CHAT), str(three_replicas), "--set", "models.llama8b.replicas=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["--set models.llama8b.replicas: must be greater than 0"]


def test_zero_spread_gives_a_zero_width_interval_not_nan():
    same = paired_difference(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    assert (same["diff"], same["diff_ci95_low"], same["diff_ci95_high"]) == (0.0, 0.0, 0.0)
    assert (same["rel_diff"], same["rel_ci95_low"], same["rel_ci95_high"]) == (0.0, 0.0, 0.0)
    shifted = paired_difference(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.5]))
    assert shifted["diff_ci95_low"] == shifted["diff_ci95_high"] == 0.5 and shifted["significant"]
    single = paired_difference(np.array([1.0]), np.array([2.0]))
    assert single["diff"] == 1.0 and math.isnan(single["diff_ci95_low"]) and not single["significant"]


def test_relative_interval_is_fieller_and_agrees_with_the_paired_test():
    # With A known exactly, Fieller's interval for B/A - 1 is the difference's interval over A.
    a = np.full(4, 2.0)
    b = np.array([2.4, 2.6, 2.1, 2.9])
    row = paired_difference(a, b)
    assert row["rel_ci95_low"] == pytest.approx(row["diff_ci95_low"] / 2.0)
    assert row["rel_ci95_high"] == pytest.approx(row["diff_ci95_high"] / 2.0)
    # In general it is wider than that (A's mean is uncertain too), and excludes 0 exactly
    # when the paired interval of B - A does.
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.normal(10, 2, size=5)
        b = a * rng.normal(1.05, 0.05, size=5) + rng.normal(0, 0.2, size=5)
        row = paired_difference(a, b)
        assert row["rel_ci95_low"] <= row["rel_diff"] <= row["rel_ci95_high"]
        assert (row["rel_ci95_low"] > 0 or row["rel_ci95_high"] < 0) == row["significant"]


def test_units_ms_below_a_second_and_dollars():
    assert format_quantities("ttft_p99_s", [0.04, 0.01, 0.07], signed=True, significant=2) == ["+40 ms", "+10", "+70"]
    assert format_quantities("e2e_p99_s", [5.565], signed=False, significant=4) == ["5.565 s"]
    assert format_quantities("cost_per_request_usd", [0.0003026], signed=False, significant=4) == ["$0.0003026"]
    assert format_quantities("cost_per_hour_usd", [-3.0, -3.5, -2.5], signed=True, significant=3) == [
        "-$3.00", "-$3.50", "-$2.50"]
