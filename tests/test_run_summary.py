"""`llmsim run`'s terminal summary: the pipeline's headlines, the SLO verdict, columns that stay apart."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import sim
from sim.cli import main
from sim.config.schema import Slo
from sim.report.text import cache_metric, format_summary

ROOT = Path(__file__).resolve().parent.parent
RAG = ROOT / "workloads/rag-support.yaml"
MMC = ROOT / "workloads/mmc.yaml"


@pytest.fixture(scope="module")
def rag():
    return sim.run(RAG, overrides=["simulation.duration_s=300"], replications=2)


def line(text: str, head: str) -> str:
    return next(row for row in text.splitlines() if row.startswith(head))


def test_rag_support_prints_quality_caches_escalation_fallbacks_and_slo(rag):
    s, text = rag.summary, format_summary(rag)
    quality = line(text, "quality    ")
    assert f"good answers {s['quality_good_share']:.1%} ±" in quality
    for key in (k for k in s if k.startswith("quality_") and not k.endswith(("_low", "_high"))):
        assert key.removeprefix("quality_").split("_")[0] in quality, key  # every dimension, whatever its name
    caches = line(text, "caches     ")  # one line per cache, its hit rate first
    assert caches.startswith(f"caches     output hit {s['cache_hit_rate_output']:.1%} ±")
    assert f"bypass {s['cache_bypass_share_output']:.1%}" in caches and "stale hit" in caches
    assert f"\n           embedding hit {s['embedding_cache_hit_rate']:.1%}" in text
    escalation = line(text, "escalation ")
    assert escalation.startswith(f"escalation {s['escalation_rate']:.1%} ±") and f"{s['hops_mean']:.3f}" in escalation
    assert line(text, "fallbacks  ").startswith("fallbacks  smaller model 0.0% ±0.0%   reduced context 0.0%")
    slo = line(text, "slo        ")
    share = s["goodput_rps"] / s["throughput_rps"]
    assert slo == (f"slo        ttft <= 1 s, e2e <= 10 s: goodput {s['goodput_rps']:.3f} of throughput "
                   f"{s['throughput_rps']:.3f} req/s ({share:.1%}) meet every target")
    within = text.splitlines()[text.splitlines().index(slo) + 1]
    assert re.fullmatch(r" {11}answered requests within each target: ttft \d+\.\d% ±\d+\.\d%   e2e \d+\.\d% ±\d+\.\d%",
                        within)


def test_the_cli_prints_the_headlines_on_the_shipped_workload(capsys):
    assert main(["run", str(RAG), "--set", "simulation.duration_s=200", "--replications", "1"]) == 0
    out = capsys.readouterr().out
    for head in ("slo        ", "quality    ", "caches     output", "escalation ", "fallbacks  "):
        assert f"\n{head}" in out, head
    assert "good answers" in out


def test_without_a_pipeline_or_slo_there_are_no_headlines(capsys):
    assert main(["run", str(MMC), "--set", "simulation.duration_s=1500", "--replications", "1"]) == 0
    out = capsys.readouterr().out
    for head in ("slo ", "quality ", "caches ", "escalation ", "fallbacks "):
        assert f"\n{head}" not in out, head


def test_new_quality_dimensions_caches_and_fallbacks_show_up_unasked(rag):
    s = dict(rag.summary)
    s.update(quality_groundedness_mean=0.712, quality_citation_accuracy_share=0.5, cache_leak_rate_output=0.003,
             retrieval_cache_hit_rate=0.4, cache_stale_hit_rate_retrieval=0.02, fallback_partial_answer_share=0.25,
             cost_cache_output_usd=1.0, stage_cache_share_p95=0.1)
    text = format_summary(dataclasses.replace(rag, summary=s))
    assert "groundedness 0.712" in line(text, "quality ") and "citation accuracy 50.0%" in line(text, "quality ")
    assert "leak 0.30%" in line(text, "caches ")
    assert "\n           retrieval hit 40.0%, stale hit 2.0%\n" in text
    assert "partial answer 25.0%" in line(text, "fallbacks ")
    # Costs and stage times that name a cache are not hit rates.
    assert cache_metric("cost_cache_output_usd") is None and cache_metric("stage_cache_share_p95") is None
    assert cache_metric("embedding_cache_hit_rate") == ("embedding", "hit")
    assert cache_metric("cache_stale_hit_rate_output") == ("output", "stale hit")


def test_latency_columns_widen_for_wide_values_and_never_run_together(rag):
    s = dict(rag.summary)
    s.update(e2e_p99_s=161.531, e2e_p99_s_ci95_low=161.531 - 54.444, e2e_p99_s_ci95_high=161.531 + 54.444,
             e2e_p999_s=251.376, e2e_p999_s_ci95_low=0.0, e2e_p999_s_ci95_high=2 * 251.376)
    rows = format_summary(dataclasses.replace(rag, summary=s)).splitlines()
    table = rows[rows.index(line("\n".join(rows), "latency (s)")):][:5]
    e2e = table[3]
    assert "161.531 ±54.444  " in e2e and e2e.endswith("251.376 ±251.376")
    # Every row has its cells right-aligned on the same edges as the header's names.
    edges = [[m.end() for m in re.finditer(r"\S+(?: ±\S+)?", row)][-6:] for row in table]
    assert all(row == edges[0] for row in edges), table


def test_per_target_shares_match_the_latency_percentiles():
    # One replication, so a target at the measured p90 TTFT is met by 90% of the answers the
    # latency table measures (within one request), and one at the p50 e2e by half of them.
    base = sim.load_workload(MMC, ["simulation.duration_s=3000"])
    first = sim.run(base, replications=1).summary
    slo = Slo(ttft_s=first["ttft_p90_s"], e2e_s=first["e2e_p50_s"])
    result = sim.run(base.model_copy(update={"slo": slo}), replications=1)
    n = result.summary["requests_completed"]
    met = {name: result.summary[f"slo_{name}_met_share"] for name in ("ttft", "e2e")}
    assert met["ttft"] == pytest.approx(0.90, abs=1.5 / n) and met["e2e"] == pytest.approx(0.50, abs=1.5 / n)
    assert "slo_ttft_met_share_ci95_low" not in result.summary  # one replication: no interval
    text = format_summary(result)
    assert f"ttft {met['ttft']:.1%}   e2e {met['e2e']:.1%}" in text
    # A request meets both at most as often as it meets either: goodput's share is below both (up to
    # goodput counting the answers that end in the window, the shares those that arrive in it).
    share = result.summary["goodput_rps"] / result.summary["throughput_rps"]
    assert share <= min(met["ttft"], met["e2e"]) + 0.005
