"""The request pipeline: prompt budget, output cache, post-processing, model calls apart from requests, ledger."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sim
from sim.cli import main
from sim.config.schema import Workload
from sim.model.kernels import not_built
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent


def workload(tmp_path: Path, times, pipeline: dict, model: dict, prompt=10, output=10) -> Workload:
    """Requests at exactly `times` (a replayed trace) through `pipeline` to one endpoint."""
    path = tmp_path / "t.csv"
    path.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{t!r},{prompt},{output}\n" for t in times))
    return Workload.model_validate({
        "simulation": {"duration_s": 100},
        "traffic": {"classes": {"c": {"arrival": {"kind": "trace", "format": "csv", "path": str(path), "end_s": 50},
                                      "prompt_tokens": prompt, "output_tokens": output}}},
        "models": {"m": model},
        "pipeline": pipeline,
    })


API = {"kind": "api", "concurrency": 4, "service_time": 1.0, "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}
ONE_KEY_CACHE = {"capacity": 1, "keys": {"universe": 1}, "hit_latency_s": 0.01}


def test_a_cache_hit_makes_no_model_call(tmp_path):
    # One possible question, always deterministic: the first request misses and calls the model (1 s);
    # it is cached when the answer arrives, so the requests at 5 and 10 are hits: 10 ms, no call.
    rec = simulate(workload(tmp_path, [0.0, 5.0, 10.0], {"output_cache": ONE_KEY_CACHE}, API))
    assert rec.end == pytest.approx([1.0, 5.01, 10.01])
    assert len(rec.calls.arrival) == 1 and rec.calls.parent == [0]
    assert rec.cache_code.values().tolist() == [0, 0, 1, 1, 2, 1]  # rows (request, code): miss, hit, hit


def test_a_miss_while_the_answer_is_computed_calls_again(tmp_path):
    # The second request comes before the first answer is cached: both call the model.
    rec = simulate(workload(tmp_path, [0.0, 0.5], {"output_cache": ONE_KEY_CACHE}, API))
    assert len(rec.calls.arrival) == 2
    assert rec.end == pytest.approx([1.0, 1.5])


def test_post_processing_adds_to_the_end_not_to_the_first_token(tmp_path):
    rec = simulate(workload(tmp_path, [0.0], {"post_processing_s": 0.25}, API))
    assert rec.first_token == pytest.approx([1.0]) and rec.end == pytest.approx([1.25])


def test_the_budget_builds_the_prompt_and_refuses_what_cannot_fit(tmp_path):
    budget = {"context_window_tokens": 1000, "output_reserve_tokens": 200,
              "sections": {"system": {"tokens": 300, "priority": 0, "min_tokens": "all"},
                           "question": {"tokens": 600, "priority": 0, "min_tokens": "all"}}}
    # 300 + 600 = 900 > 1000 - 200 and nothing may be trimmed: every request overflows, none is sent.
    rec = simulate(workload(tmp_path, [0.0, 1.0], {"budget": budget}, API))
    assert rec.frame()["outcome"].tolist() == ["rejected", "rejected"]
    assert len(rec.calls.arrival) == 0
    budget["sections"]["question"]["tokens"] = 400  # 700 fits: the call's prompt is the sections' sum
    rec = simulate(workload(tmp_path, [0.0], {"budget": budget}, API))
    assert rec.calls.prompt == [700] and rec.prompt == [700]


def test_every_system_prompt_token_is_paid_on_every_call():
    # The same requests (common random numbers) with 100 more system tokens, on a priced API:
    # every call's prompt grows by exactly 100 (nothing is trimmed: the window is large).
    base = ["pipeline.budget.context_window_tokens=200000", "models.llama8b={kind: api, concurrency: 512, "
            "service_time: 1, price_per_mtok_in: 1.0, price_per_mtok_out: 0}", "simulation.duration_s=300",
            "pipeline.router=null", "pipeline.escalation=null", "pipeline.guardrails=null"]
    a = sim.run(ROOT / "workloads/rag-support.yaml", replications=1, overrides=base)
    b = sim.run(ROOT / "workloads/rag-support.yaml", replications=1,
                overrides=base + ["pipeline.budget.sections.system.tokens=900"])
    assert len(a.ledger) == len(b.ledger) > 100
    assert ((b.ledger["tokens_in"] - a.ledger["tokens_in"]) == 100).all()
    assert b.ledger["usd"].sum() - a.ledger["usd"].sum() == pytest.approx(100 * len(a.ledger) / 1e6)


def test_the_ledger_shares_every_dollar_of_the_run():
    # Self-hosted: the ledger shares the bill of the replicas held over the run (2 replicas x 300 s at $3/h)
    # among the calls, by the work each did.
    book = sim.run(ROOT / "workloads/rag-support.yaml", replications=1, overrides=["simulation.duration_s=300"]).ledger
    api = book["endpoint"] == "gpt4o"  # API calls cost their tokens: $2.50 / $10 per million in / out,
    cached = book["tokens_in_cached"][api].sum()  # prompt-cache reads at half price (writes at full price)
    assert cached > 0
    assert book["usd"][api].sum() == pytest.approx(
        ((book["tokens_in"][api].sum() - cached * 0.5) * 2.5 + book["tokens_out"][api].sum() * 10) / 1e6)
    book = book[~api]
    assert book["usd"].sum() == pytest.approx(2 * 3.00 * 300 / 3600, rel=1e-12)
    assert (book["usd"] > 0).all()
    assert set(book.columns) >= {"request", "user", "feature", "endpoint", "tokens_in", "tokens_out", "usd"}
    # A longer answer costs more: work grows with the tokens.
    by_out = book.sort_values("tokens_out")
    assert by_out["usd"].iloc[-100:].mean() > by_out["usd"].iloc[:100].mean()


def test_rag_support_reports_every_pipeline_figure(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "workloads/rag-support.yaml"), "--set", "simulation.duration_s=600",
                 "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    # 40% of requests may use the cache and about a third of those hit (no call); escalations add calls.
    assert 0.85 < summary["model_calls_per_request"] < 1.15
    assert 0.68 < summary["quality_good_share"] < 0.81 and 0 < summary["escalation_rate"] < 0.32
    assert 0.2 < summary["cache_hit_rate_output"] < 0.5
    assert summary["cache_bypass_share_output"] == pytest.approx(0.6, abs=0.03)
    assert 0 < summary["budget_truncated_share"] < 1
    assert {"cost_per_request_faq_usd", "cost_per_request_billing_usd"} <= set(summary)
    ledger = __import__("pandas").read_parquet(out / "ledger.parquet")
    per_replication = ledger.groupby("replication")["usd"].sum()
    assert list(per_replication.index) == [0, 1, 2] and (per_replication > 0).all()  # tests/test_costs.py reconciles
    # Outcomes: 5% of streamed answers are cancelled by their users; the report tells how requests ended.
    assert 0.02 < summary["requests_cancelled"] / summary["requests_arrived"] < 0.06
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## How requests ended" in md and "| cancelled |" in md and "| completed |" in md
    for name in ("stage_breakdown", "cost_by_feature", "timeseries_cache"):
        assert f"figures/{name}.png" in md


def test_without_a_pipeline_a_request_is_its_own_call():
    rec = simulate(sim.load_workload(ROOT / "workloads/mmc.yaml",
                                     ["simulation.duration_s=100", "simulation.warmup_s=0"]))
    assert rec.calls is None and rec.cache_code is None


def routed(router: dict, escalation: dict | None = None, classes: dict | None = None) -> Workload:
    """Two API tiers of plain service time; Poisson requests at 50/s for 100 s (about 5,000)."""
    tier = {"kind": "api", "concurrency": 1000, "service_time": 0.01}
    pipeline = {"router": {"tiers": ["weak", "strong"], "quality": [0.68, 0.81], **router}}
    if escalation is not None:
        pipeline["escalation"] = escalation
    return Workload.model_validate({
        "simulation": {"duration_s": 100, "seed": 7},
        "traffic": {"classes": classes or {"q": {"arrival": {"kind": "poisson", "rate_rps": 50},
                                                 "prompt_tokens": 10, "output_tokens": 10, "endpoint": "weak"}}},
        "models": {"weak": tier, "strong": tier},
        "pipeline": pipeline,
    })


def within(value: float, p: float, n: int) -> bool:
    """Within 4 binomial standard errors: a correct simulator fails about once in 16,000 seeds."""
    return abs(value - p) <= 4 * (p * (1 - p) / n) ** 0.5


def routing_summary(workload: Workload) -> tuple[dict, int]:
    result = sim.run(workload, replications=1, keep_requests=False)
    return result.summary, int(result.summary["requests_completed"])


def test_a_fixed_route_answers_as_well_as_its_tier():
    summary, n = routing_summary(routed({"policy": "fixed", "fixed_tier": 0}))
    assert within(summary["quality_good_share"], 0.68, n)
    assert summary["hops_mean"] == 1 and summary["escalation_rate"] == 0


def test_routing_by_complexity_sends_the_hard_half_to_the_strong_tier():
    # Difficulty uniform; d < 0.5 goes weak (all right: 0.5 < 0.68), the rest strong (right when d < 0.81):
    # quality = 0.5 + 0.31 = 0.81, and half of the calls go to the strong tier.
    summary, n = routing_summary(routed({"policy": "complexity", "thresholds": [0.5]}))
    assert within(summary["quality_good_share"], 0.81, n)
    assert within(summary["utilisation_strong"] / (summary["utilisation_weak"] + summary["utilisation_strong"]), 0.5, n)


def test_escalation_retries_flagged_answers_on_the_next_tier():
    # A perfect evaluator (flags every bad answer, no false alarms): the 32% the weak tier gets wrong
    # go to the strong tier, which gets d < 0.81 right: final quality 0.81, escalation rate 0.32.
    summary, n = routing_summary(routed({"policy": "fixed"}, {"max_hops": 2, "detect_bad": 1.0, "false_alarm": 0.0}))
    assert within(summary["quality_good_share"], 0.81, n)
    assert within(summary["escalation_rate"], 0.32, n)
    assert summary["hops_mean"] == pytest.approx(1 + summary["escalation_rate"])
    assert summary["model_calls_per_request"] == pytest.approx(summary["hops_mean"], rel=0.01)


def test_risky_classes_always_go_to_the_strongest_tier():
    classes = {"general": {"arrival": {"kind": "poisson", "rate_rps": 25}, "prompt_tokens": 10, "output_tokens": 10,
                           "endpoint": "weak"},
               "legal": {"arrival": {"kind": "poisson", "rate_rps": 25}, "prompt_tokens": 10, "output_tokens": 10,
                         "endpoint": "weak"}}
    result = sim.run(routed({"policy": "risk", "risky_classes": ["legal"]}, classes=classes), replications=1)
    calls = result.ledger.groupby(["class", "endpoint"], observed=True).size()
    assert set(calls.loc["legal"].index) == {"strong"} and set(calls.loc["general"].index) == {"weak"}


def test_router_tiers_must_be_models():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        routed({"tiers": ["weak", "nope"]})


@pytest.mark.parametrize("name", ["rag-support.yaml", "chat-selfhosted.yaml", "noisy-neighbor.yaml"])
def test_stage_times_add_up_to_each_requests_latency(name):
    from sim.metrics.recorder import COMPLETED
    from sim.metrics.summary import stage_times

    rec = simulate(sim.load_workload(ROOT / "workloads" / name, ["simulation.duration_s=300"]))
    done = np.asarray(rec.outcome) == COMPLETED
    e2e = np.asarray(rec.end) - np.asarray(rec.arrival)
    total = sum(stage_times(rec).values())
    np.testing.assert_allclose(total[done], e2e[done], rtol=0, atol=1e-9)


def test_the_summary_names_the_bottleneck(capsys):
    assert main(["run", str(ROOT / "workloads/rag-support.yaml"), "--set", "simulation.duration_s=300",
                 "--replications", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    shares = {k: v for k, v in summary.items() if k.startswith("stage_") and k.endswith("_share")}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert summary["bottleneck_stage"] == max(shares, key=shares.get)[len("stage_"):-len("_share")]


def test_without_streaming_the_user_sees_the_whole_answer_at_once(tmp_path):
    api = {**API, "service_time": None, "ttft_s": 0.2, "output_tokens_per_s": 10.0}
    api = {k: v for k, v in api.items() if v is not None}
    streamed = simulate(workload(tmp_path, [0.0], {}, api, output=11))
    assert streamed.first_token == pytest.approx([0.2]) and streamed.end == pytest.approx([1.2])
    whole = simulate(workload(tmp_path, [0.0], {"output": {"streaming": False}}, api, output=11))
    assert whole.first_token == pytest.approx([1.2]) and whole.end == pytest.approx([1.2])


def test_failed_validation_asks_again_without_streaming(tmp_path):
    # Every answer fails validation, two retries allowed: three calls of 1 s each, and the user sees
    # nothing before the last one ends.
    rec = simulate(workload(tmp_path, [0.0], {"output": {"structured_failure_rate": 1.0,
                                                         "max_validation_retries": 2}}, API))
    assert len(rec.calls.arrival) == 3
    assert rec.end == pytest.approx([3.0]) and rec.first_token == pytest.approx([3.0])
    assert rec.validation_retries == {0: 2}


def test_retrieval_runs_before_the_call_and_shows_as_a_stage(tmp_path):
    retrieval = {"backends": {"db": {"concurrency": 4, "latency_s": 0.3}}, "stages": [["db"], ["db"]]}
    rec = simulate(workload(tmp_path, [0.0], {"retrieval": retrieval}, API))
    # Two dependent hops of 0.3 s, then the 1 s call.
    assert rec.calls.arrival == pytest.approx([0.6]) and rec.end == pytest.approx([1.6])
    from sim.metrics.summary import stage_times

    assert stage_times(rec)["retrieval"] == pytest.approx([0.6])
    # Nothing queued for the model: the request's queue wait is 0, not the 0.6 s before its call.
    result = sim.run(workload(tmp_path, [0.0], {"retrieval": retrieval}, API), replications=1)
    assert result.requests["queue_wait_s"].tolist() == [0.0] and result.summary["queue_wait_mean_s"] == 0.0


def test_the_time_series_shows_the_cache_warming_up():
    series = sim.run(ROOT / "workloads/rag-support.yaml", replications=1,
                     overrides=["simulation.duration_s=1200", "simulation.timeseries_interval_s=60"]).timeseries
    rate = series["cache_hit_rate_output"].to_numpy()
    assert rate[0] < 0.5 * np.nanmean(rate[10:])  # cold at the start, warm later


PREFIX_BUDGET = {"context_window_tokens": 100000, "output_reserve_tokens": 100,
                 "sections": {"system": {"tokens": 2000, "priority": 0, "min_tokens": "all"},
                              "question": {"tokens": 100, "priority": 0, "min_tokens": "all"}},
                 "cacheable_prefix": ["system"]}
PROMPT_CACHE = {"min_tokens": 1024, "ttl_s": 10, "read_price_multiplier": 0.1, "write_price_multiplier": 1.25}


def test_prompt_caching_bills_reads_and_writes_at_their_prices(tmp_path):
    # One user; calls at 0 and 5 (within the 10 s TTL) and at 30 (expired): write, read, write.
    api = {**API, "prompt_cache": PROMPT_CACHE}
    spec = workload(tmp_path, [0.0, 5.0, 30.0], {"budget": PREFIX_BUDGET}, api)
    from sim.metrics.ledger import ledger

    book = ledger(simulate(spec), spec)
    assert book["tokens_in_cached"].tolist() == [0, 2000, 0]
    assert book["tokens_in_cache_written"].tolist() == [2000, 0, 2000]
    # $1/M in, $2/M out: write 2000 x 1.25 + 100 plain; read 2000 x 0.1 + 100; 10 output tokens each.
    expected = [(2000 * 1.25 + 100) / 1e6 + 20 / 1e6, (2000 * 0.1 + 100) / 1e6 + 20 / 1e6,
                (2000 * 1.25 + 100) / 1e6 + 20 / 1e6]
    assert book["usd"].tolist() == pytest.approx(expected, rel=1e-12)


def test_a_short_prefix_is_never_cached(tmp_path):
    api = {**API, "prompt_cache": {**PROMPT_CACHE, "min_tokens": 4096}}
    rec = simulate(workload(tmp_path, [0.0, 5.0], {"budget": PREFIX_BUDGET}, api))
    assert [rec.calls.cached_tokens[c] for c in range(2)] == [(0, 0), (0, 0)]


def test_a_self_hosted_prefix_cache_skips_prefill(tmp_path):
    # Step time 10 ms + 0.1 ms per prefill token; 2100-token prompts, budget 8192 tokens a step, 1 output token.
    engine = {"kind": "self_hosted", "max_batch": 4, "engine": {"max_batch_tokens": 8192, "step_time": {
        "base_s": 0.01, "per_decode_seq_s": 0.0, "per_prefill_token_s": 0.0001}}, "prompt_cache": PROMPT_CACHE}
    rec = simulate(workload(tmp_path, [0.0, 5.0], {"budget": PREFIX_BUDGET}, engine, output=1))
    # The first prefills all 2100 tokens: 10 + 210 ms; the second only the 100 after the cached 2000: 10 + 10 ms.
    ttft = np.asarray(rec.first_token) - np.asarray(rec.arrival)
    assert ttft == pytest.approx([0.22, 0.02])


def test_prompt_cache_needs_a_cacheable_prefix(tmp_path):
    with pytest.raises(ValueError, match="prompt_cache: needs pipeline.budget with a cacheable_prefix"):
        workload(tmp_path, [0.0], {}, {**API, "prompt_cache": PROMPT_CACHE})


def test_offered_utilisation_follows_the_router_and_escalation():
    # The threshold router with escalation spreads calls over both tiers; the offered utilisation
    # (computed from the config) must predict the calls each tier gets in the run.
    from sim.model.offered import offered_utilisation, routed_calls

    spec = routed({"policy": "threshold", "thresholds": [0.6], "estimate_noise_sd": 0.2},
                  {"max_hops": 2, "detect_bad": 0.8, "false_alarm": 0.1})
    predicted = routed_calls(spec)["q"]
    result = sim.run(spec, replications=1)
    arrived = len(result.requests)
    per_tier = result.ledger.groupby("endpoint", observed=False).size() / arrived
    for tier in ("weak", "strong"):
        p = predicted[tier][0][0]
        assert abs(per_tier[tier] - p) <= 4 * (p * (1 - p) / arrived) ** 0.5, tier
    offered = offered_utilisation(spec)
    assert offered["strong"] == pytest.approx(50 * predicted["strong"][0][0] * 0.01 / 1000)


def test_the_requests_table_has_every_prompt_section_before_and_after_trimming():
    result = sim.run(ROOT / "workloads/rag-support.yaml", replications=1, overrides=["simulation.duration_s=300"])
    requests = result.requests
    sections = ["system", "memory", "retrieved", "history", "question"]
    trimmed = requests[[f"tokens_{s}" for s in sections]]
    drawn = requests[[f"tokens_{s}_drawn" for s in sections]]
    # The prompt is its sections after trimming; trimming never adds; the system prompt is never cut.
    np.testing.assert_array_equal(trimmed.sum(axis=1), requests["prompt_tokens"])
    assert (trimmed.to_numpy() <= drawn.to_numpy()).all() and (trimmed.to_numpy() < drawn.to_numpy()).any()
    assert (requests["tokens_system"] == 800).all()


@pytest.mark.parametrize("name, parts", [
    ("rag-support.yaml", ["event core (sim/_events.c)", "engine replica (sim/_engine.c)", "flat logs (sim/_records.c)",
                          "retrieval (sim/_retrieval.c)", "caches (sim/_caches.c)",
                          "request lifecycle (sim/_lifecycle.c)"]),
    ("agent-tools.yaml", ["event core (sim/_events.c)", "flat logs (sim/_records.c)", "retrieval (sim/_retrieval.c)"]),
    ("noisy-neighbor.yaml", ["event core (sim/_events.c)", "engine replica (sim/_engine.c)"]),  # no pipeline
    ("chat-api.yaml", []),  # the fast path: no event (its own kernel's warning is fastpath's)
])
def test_a_run_names_the_compiled_parts_it_used_that_are_not_built(monkeypatch, name, parts):
    """Built without a C compiler, a run warns once, naming exactly the compiled parts it would have used."""
    from sim.metrics import recorder
    from sim.model import events
    from sim.model.application import caches, lifecycle, retrieval
    from sim.model.serving import engine

    for module, attribute in ((events, "COMPILED_CORE"), (engine, "_engine"), (recorder, "_records"),
                              (retrieval, "_retrieval"), (caches, "_caches"), (lifecycle, "_lifecycle")):
        monkeypatch.setattr(module, attribute, None)
    run = simulate(sim.load_workload(ROOT / "workloads" / name, ["simulation.duration_s=200",
                                                                 "simulation.warmup_s=10"]))
    assert [w for w in run.warnings if w.startswith("not built")] == ([not_built(parts)] if parts else [])


def test_the_pipelines_compiled_parts_are_built_here():
    # CI installs the package from scratch on a machine with a C compiler: these must be there, or pipelines
    # silently run their (correct, slower) Python twins and the compiled-against-Python tests skip.
    from sim.metrics import recorder
    from sim.model.application import caches, lifecycle, retrieval

    assert recorder._records is not None and retrieval._retrieval is not None
    assert caches._caches is not None and lifecycle._lifecycle is not None
