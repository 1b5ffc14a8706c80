"""`llmsim compare`: paired differences on common random numbers, their intervals, output and errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.experiments.compare import (
    compare,
    compare_replications,
    direction,
    format_quantities,
    paired_difference,
)
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
    assert "aggregate rows" not in out  # one class: nothing is mixed
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


RAG = ROOT / "workloads/rag-support.yaml"


@pytest.fixture(scope="module")
def router_pair(tmp_path_factory) -> tuple[Path, Path]:
    """rag-support.yaml with its router fixed to the strongest tier (A), and as shipped: the threshold router (B)."""
    folder = tmp_path_factory.mktemp("router")
    data = yaml.safe_load(RAG.read_text())
    assert data["pipeline"]["router"]["policy"] == "threshold"
    (folder / "threshold.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    data["pipeline"]["router"].update(policy="fixed", fixed_tier=len(data["pipeline"]["router"]["tiers"]) - 1)
    (folder / "strong.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / "strong.yaml", folder / "threshold.yaml"


def test_always_strong_vs_threshold_router_shows_the_quality_price_of_the_saving(capsys, router_pair):
    # The threshold router sends the questions it judges easy to the 8B model (68% right on MMLU against
    # gpt-4o's 81%); the evaluator catches 80% of its bad answers, so about 1.5% of answers stay worse.
    # Common random numbers make that decisive in 5 x 10 minutes (the interval's far end was at least
    # 0.8 pp below zero for seeds 1-6).
    strong, threshold = router_pair
    args = ["compare", str(strong), str(threshold), "--set", "simulation.duration_s=600",
            "--set", "simulation.warmup_s=30", "--replications", "5"]
    assert main([*args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    quality = metrics["quality_good_share"]
    assert quality["a"] == pytest.approx(0.81, abs=0.02)  # gpt-4o's share, what "always strong" buys
    assert quality["diff_ci95_low"] <= quality["diff"] <= quality["diff_ci95_high"] < 0
    assert quality["verdict"] == "B lower (worse)" and quality["better"] == "higher"
    assert metrics["cost_per_request_usd"]["verdict"] == "B lower (better)"
    escalation = metrics["escalation_rate"]
    # The top tier has nowhere to escalate to (the rare timed-out call retried counts as a hop too).
    assert escalation["a"] < 0.001 and escalation["verdict"] == "B higher (worse)"
    assert {"cache_hit_rate_output", "cache_stale_hit_rate_output", "embedding_cache_hit_rate", "hops_mean",
            "fallback_smaller_model_share"} <= set(metrics)
    assert main([*args, "--metrics", "quality_good_share,cost_per_request_usd"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("quality_good_share"))
    assert row.split()[-3:] == ["B", "lower", "(worse)"] and " pp " in row and "%" in row
    assert "good answers -1" in out.splitlines()[-1] and "cost/request -" in out.splitlines()[-1]


def test_metrics_chooses_the_rows_in_order_and_unknown_names_exit_2_before_running(capsys, router_pair):
    strong, threshold = router_pair
    result = compare(strong, threshold, replications=2, overrides=SHORT,
                     metrics=["escalation_rate", "e2e_p99_s", "escalation_rate"])
    assert list(result.table.index) == ["escalation_rate", "e2e_p99_s"]
    assert main(["compare", str(strong), str(threshold), "--metrics", "quality_good_share,nope,e2e_p99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("--metrics: unknown metric(s) nope, e2e_p99 (known for both workloads: ")
    assert "quality_good_share" in err[0] and "utilisation_gpt4o" in err[0]
    # A metric only one side reports is unknown too: mmc has no pipeline.
    assert main(["compare", str(MMC), str(threshold), "--metrics", "quality_good_share"]) == 2
    assert "unknown metric(s) quality_good_share" in capsys.readouterr().err


def test_aggregate_rows_name_the_classes_they_mix(capsys):
    args = ["compare", str(ROOT / "workloads/noisy-neighbor-unprotected.yaml"), str(ROOT / "workloads/noisy-neighbor.yaml"),
            "--set", "simulation.duration_s=120", "--set", "simulation.warmup_s=10", "--replications", "2",
            "--metrics", "e2e_p99_s,e2e_p99_chat_s"]
    assert main(args) == 0
    assert "aggregate rows mix classes chat, bot; rows named with a class are that class alone" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == {"a": ["chat", "bot"], "b": ["chat", "bot"]}


@pytest.mark.parametrize("metric, better", [
    ("quality_good_share", 1), ("quality_grounded_mean", 1), ("cache_hit_rate_output", 1),
    ("embedding_cache_hit_rate", 1), ("prompt_cached_share", 1), ("throughput_rps", 1), ("goodput_rps", 1),
    ("tokens_out_per_s_per_user", 1), ("cache_stale_hit_rate_output", -1), ("cache_leak_rate_output", -1),
    ("escalation_rate", -1), ("hops_mean", -1), ("fallback_smaller_model_share", -1), ("rate_limited_share", -1),
    ("e2e_p99_s", -1), ("cost_per_request_usd", -1), ("guard_retries_per_request", -1),
    ("rate_limited_share_chat", 0), ("throughput_chat_rps", 0), ("utilisation_llama8b", 0),
    ("cache_bypass_share_output", 0), ("stage_decode_share", 0), ("backend_vector_utilisation", 0),
])
def test_direction_of_every_kind_of_metric(metric, better):
    assert direction(metric) == better


def test_verdicts_follow_the_direction():
    reps = pd.DataFrame({"replication": [0, 1, 2]})
    a = reps.assign(quality_good_share=[0.80, 0.81, 0.79], escalation_rate=[0.10, 0.11, 0.12],
                    cache_stale_hit_rate_output=[0.01, 0.02, 0.01], utilisation_x=[0.5, 0.6, 0.5])
    b = reps.assign(quality_good_share=[0.85, 0.87, 0.84], escalation_rate=[0.20, 0.22, 0.21],
                    cache_stale_hit_rate_output=[0.001, 0.002, 0.0], utilisation_x=[0.7, 0.8, 0.75])
    table = compare_replications(a, b, ["quality_good_share", "escalation_rate", "cache_stale_hit_rate_output",
                                        "utilisation_x", "missing_metric"])
    assert table["verdict"].to_dict() == {
        "quality_good_share": "B higher (better)", "escalation_rate": "B higher (worse)",
        "cache_stale_hit_rate_output": "B lower (better)", "utilisation_x": "B higher", "missing_metric": "no data"}


def test_shares_in_percent_and_their_differences_in_points():
    assert format_quantities("quality_good_share", [0.8134], signed=False, significant=4) == ["81.34%"]
    assert format_quantities("cache_hit_rate_output", [-0.0134, -0.0183, -0.0085], signed=True, significant=3) == [
        "-1.34 pp", "-1.83", "-0.85"]
    assert format_quantities("requests_rate_limited", [12.0], signed=False, significant=4) == ["12.00"]  # a count
