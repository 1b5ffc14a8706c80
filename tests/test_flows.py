"""Flows: model steps, tools and parallel groups around the answer (sim/model/application/flow.py).

Timelines computed by hand with constant latencies; tool retries against the geometric law and
conditions against their shares, with tolerances from the binomial's standard error (5 sigma: a
false alarm once in millions of runs); guardrail caps across the flow; the ledger billing tools.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload
from sim.experiments.run import run as run_workload
from sim.metrics.flows import flow_stage_times
from sim.metrics.ledger import ledger
from sim.metrics.recorder import COMPLETED, OUTCOMES, TIMED_OUT, TRY_LATER
from sim.metrics.summary import stage_times, summarise
from sim.model.application.flow import FAILED, OK, SKIPPED, flow_rows
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent

# First token 0.1 s (0.5 s) after the send, then 100 tokens/s: n output tokens end 0.1 + (n - 1) / 100 s in.
SMALL = {"kind": "api", "concurrency": 1000, "ttft_s": 0.1, "output_tokens_per_s": 100.0,
         "price_per_mtok_in": 0.1, "price_per_mtok_out": 0.2}
BIG = {**SMALL, "ttft_s": 0.5, "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}


def workload(pipeline: dict, rate: float = 0.5, duration: float = 200.0, seed: int = 1) -> Workload:
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": 0, "seed": seed},
        "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": rate}, "prompt_tokens": 100,
                                         "output_tokens": 100, "endpoint": "big"}}},
        "models": {"big": BIG, "small": SMALL},
        "pipeline": pipeline,
    })


def tool(latency: float, **extra) -> dict:
    return {"concurrency": 1000, "latency_s": latency, **extra}


CRITICAL = {
    "tools": {"a": tool(0.3), "b": tool(0.1), "c": tool(0.4, price_per_call_usd=0.01)},
    "flow": [
        {"name": "classify", "model": "small", "prompt_tokens": 50, "output_tokens": 10},
        {"name": "group", "parallel": [{"name": "ta", "tool": "a"},
                                       [{"name": "tb", "tool": "b"}, {"name": "tc", "tool": "c"}]]},
        "answer",
        {"name": "validate", "model": "small", "prompt_tokens": 50, "output_tokens": 20},
    ],
}


def test_the_critical_path_through_a_parallel_group_by_hand():
    # classify 0.1 + 9/100 = 0.19; the group: max(a 0.3, b 0.1 then c 0.4) = 0.5; the answer's first token
    # 0.5 later (TTFT 1.19), its 100 tokens 0.99 after that; validate 0.1 + 19/100 = 0.29: e2e 2.47.
    spec = workload(CRITICAL)
    rec = simulate(spec)
    arrival, end = np.asarray(rec.arrival), np.asarray(rec.end)
    assert len(arrival) > 50 and set(rec.outcome) == {COMPLETED}
    assert end - arrival == pytest.approx(np.full(len(arrival), 2.47), abs=1e-9)
    assert np.asarray(rec.first_token) - arrival == pytest.approx(np.full(len(arrival), 1.19), abs=1e-9)
    # Stages add up to the latency: the answer's call alone in queue/prefill/decode, the tools' group, the
    # two model steps.
    stages = stage_times(rec)
    assert stages["tool"] == pytest.approx(np.full(len(arrival), 0.5))
    assert stages["flow_calls"] == pytest.approx(np.full(len(arrival), 0.19 + 0.29))
    assert stages["prefill"] + stages["decode"] == pytest.approx(np.full(len(arrival), 1.49))
    assert sum(stages.values()) == pytest.approx(end - arrival)
    m = summarise(rec, spec, 0.0)
    assert m["flow_step_tc_mean_s"] == pytest.approx(0.4) and m["flow_step_group_mean_s"] == pytest.approx(0.5)
    assert m["model_calls_per_request"] == pytest.approx(3.0)
    # Billed: three calls and one attempt of tool c per request; the ledger adds up to the summary.
    n = len(arrival)
    per_request = (100 * 1.0 + 100 * 2.0 + 100 * 0.1 + 30 * 0.2) / 1e6 + 0.01
    assert m["cost_total_usd"] == pytest.approx(n * per_request)
    assert m["cost_tool_usd"] == pytest.approx(n * 0.01)
    book = ledger(rec, spec)
    assert book["usd"].sum() == pytest.approx(m["cost_total_usd"])
    assert set(book.loc[book["stage"] == "tool", "resource"]) == {"c"}


@pytest.mark.parametrize("p, attempts", [(0.3, 3), (0.5, 2)])
def test_tool_failures_and_retries_follow_the_geometric_law(p, attempts):
    # Each attempt fails independently with p; with k attempts a call fails for good with p^k, and it takes
    # j attempts with p^(j-1) (1 - p) for j < k (the rest: k).
    retry = {"max_attempts": attempts, "backoff_s": 0.01, "multiplier": 1.0, "jitter": 0}
    spec = workload({"tools": {"t": tool(0.05, failure_rate=p, retry=retry)},
                     "flow": [{"name": "look", "tool": "t"}, "answer"]}, rate=50.0, duration=200.0)
    rec = simulate(spec)
    rows = flow_rows(rec)
    n = len(rows)
    law = [p ** (j - 1) * (1 - p) for j in range(1, attempts)] + [p ** (attempts - 1)]
    for j, share in enumerate(law, start=1):
        observed = float((rows[:, 5] == j).mean())
        assert abs(observed - share) < 5 * math.sqrt(share * (1 - share) / n), (j, observed, share)
    failed = float((rows[:, 4] == FAILED).mean())
    assert abs(failed - p ** attempts) < 5 * math.sqrt(p ** attempts * (1 - p ** attempts) / n)
    m = summarise(rec, spec, 0.0)
    mean_attempts = sum(j * s for j, s in enumerate(law, start=1))
    assert m["tool_t_attempts_mean"] == pytest.approx(mean_attempts, abs=5 * math.sqrt(attempts ** 2 / 4 / n))
    # A failed attempt's backoff is part of the step: a call that took j attempts lasted j x 0.05 + (j-1) x 0.01.
    duration = rows[:, 3] - rows[:, 2]
    assert duration == pytest.approx(rows[:, 5] * 0.05 + (rows[:, 5] - 1) * 0.01)


def test_a_timeout_fails_every_attempt_and_a_required_step_ends_the_request():
    # Latency 1 s, timeout 0.2 s: three attempts fail at 0.2 s each, 0.1 s apart: the step takes 0.8 s, and
    # as it is required the request ends "try later" then, its answer never asked for.
    spec = workload({"tools": {"slow": tool(1.0, timeout_s=0.2, retry={"max_attempts": 3, "backoff_s": 0.1,
                                                                      "multiplier": 1.0, "jitter": 0})},
                     "flow": [{"name": "look", "tool": "slow", "required": True}, "answer"]})
    rec = simulate(spec)
    arrival, end = np.asarray(rec.arrival), np.asarray(rec.end)
    assert set(rec.outcome) == {TRY_LATER}
    assert end - arrival == pytest.approx(np.full(len(arrival), 0.8))
    assert len(rec.calls.arrival) == 0  # no model call made
    rows = flow_rows(rec)
    assert set(rows[:, 4]) == {FAILED} and set(rows[:, 5]) == {3}
    # The abandoned attempts still held the tool: 3 attempts x 1 s of work per request.
    m = summarise(rec, spec, 0.0)
    assert m["utilisation_tool_slow"] == pytest.approx(3 * len(arrival) / (1000 * 200.0), rel=0.02)


def test_conditions_run_a_step_for_the_labelled_share():
    pipeline = {"tools": {"db": tool(0.1)},
                "flow": [{"name": "classify", "model": "small", "prompt_tokens": 20, "output_tokens": 2,
                          "labels": {"lookup": 0.4, "chat": 0.6}},
                         {"name": "orders", "tool": "db", "when": {"classify": "lookup"}},
                         {"name": "after_lookup", "tool": "db", "when": {"orders": ["ok"], "classify": "lookup"}},
                         "answer"]}
    spec = workload(pipeline, rate=20.0)
    rec = simulate(spec)
    m = summarise(rec, spec, 0.0)
    n = m["requests_arrived"]
    assert abs(m["flow_step_orders_run_share"] - 0.4) < 5 * math.sqrt(0.24 / n)
    assert m["flow_step_after_lookup_run_share"] == pytest.approx(m["flow_step_orders_run_share"])
    assert m["flow_step_classify_run_share"] == 1.0
    rows = flow_rows(rec)
    skipped = rows[(rows[:, 4] == SKIPPED)]
    assert (skipped[:, 3] == skipped[:, 2]).all()  # a skipped step takes no time
    # The classifier's verdicts: the labelled requests are exactly those that ran the tool.
    labels = rec.flow_steps.labels
    by_request = {int(r[0]): labels[int(r[4])] for r in rows if rec.flow_steps.names[int(r[1])] == "classify"}
    ran = {int(r[0]) for r in rows if rec.flow_steps.names[int(r[1])] == "orders" and r[4] == OK}
    assert ran == {i for i, label in by_request.items() if label == "lookup"}


def test_guardrails_count_the_flows_calls_and_tools():
    # max_tool_calls 2: the first tool's three failing attempts stop at two; the second tool is skipped.
    failing = tool(1.0, timeout_s=0.1, retry={"max_attempts": 3, "backoff_s": 0.0})
    spec = workload({"tools": {"x": failing, "y": tool(0.1)},
                     "flow": [{"name": "tx", "tool": "x"}, {"name": "ty", "tool": "y"}, "answer"],
                     "guardrails": {"max_tool_calls": 2}})
    rec = simulate(spec)
    rows = flow_rows(rec)
    names = rec.flow_steps.names
    tx = rows[[names[int(k)] == "tx" for k in rows[:, 1]]]
    ty = rows[[names[int(k)] == "ty" for k in rows[:, 1]]]
    assert set(tx[:, 5]) == {2} and set(tx[:, 4]) == {FAILED} and set(ty[:, 4]) == {SKIPPED}
    m = summarise(rec, spec, 0.0)
    assert m["guard_tool_limited_share"] == 1.0 and m["requests_completed"] == m["requests_arrived"]
    # max_hops 1: the classifier takes the one call; the answer may not be asked for.
    spec = workload({"flow": [{"name": "classify", "model": "small", "prompt_tokens": 20, "output_tokens": 2},
                              "answer"], "guardrails": {"max_hops": 1}})
    rec = simulate(spec)
    assert {OUTCOMES[o] for o in rec.outcome} == {"rejected"} and len(rec.calls.arrival) == len(rec.arrival)


def test_the_deadline_cancels_a_model_step_in_flight():
    # The classifier takes 0.1 + 99/100 = 1.09 s; the request's limit is 0.5 s: the step's call is stopped
    # (its slot freed), the request times out, and the answer is never asked for.
    spec = workload({"flow": [{"name": "classify", "model": "small", "prompt_tokens": 20, "output_tokens": 100},
                              "answer"], "guardrails": {"max_time_s": 0.5}})
    rec = simulate(spec)
    arrival, end = np.asarray(rec.arrival), np.asarray(rec.end)
    assert set(rec.outcome) == {TIMED_OUT} and end - arrival == pytest.approx(np.full(len(arrival), 0.5))
    assert set(rec.calls.outcome) == {TIMED_OUT} and len(rec.calls.arrival) == len(arrival)
    assert flow_stage_times(rec, len(arrival))["flow_calls"].sum() == 0  # the step never finished


def test_same_tier_retries_before_a_stronger_tier():
    # One tier (quality 0.5 on uniform difficulty), a perfect evaluator, one same-tier retry that fixes a
    # wrong answer 40% of the time: 0.5 + 0.5 x 0.4 = 70% right, 1.5 calls per request.
    pipeline = {"router": {"tiers": ["big"], "quality": [0.5]},
                "escalation": {"max_hops": 1, "detect_bad": 1.0, "false_alarm": 0.0, "same_tier_retries": 1,
                               "same_tier_fix_share": 0.4, "extra_context_tokens": 500}}
    spec = workload(pipeline, rate=20.0)
    rec = simulate(spec)
    m = summarise(rec, spec, 0.0)
    n = m["requests_arrived"]
    assert abs(m["quality_correct_share"] - 0.7) < 5 * math.sqrt(0.21 / n)
    assert abs(m["model_calls_per_request"] - 1.5) < 5 * math.sqrt(0.25 / n)
    # The retry carries the extra context; the first call does not.
    prompts = np.asarray(rec.calls.prompt)
    assert set(prompts) == {100, 600}
    # Without same-tier retries a single tier has nowhere to go: one call each, as before.
    pipeline["escalation"]["same_tier_retries"] = 0
    m = summarise(simulate(workload(pipeline, rate=20.0)), workload(pipeline, rate=20.0), 0.0)
    assert m["model_calls_per_request"] == 1.0


def test_a_fresh_backend_keeps_its_utilisation_whatever_the_retrieval_cache():
    # The SQL hop reads live data: a retrieval-cache hit skips the vector search but never the SQL hop.
    retrieval = {"backends": {"vector": {"concurrency": 1000, "latency_s": 0.05},
                              "sql": {"concurrency": 4, "latency_s": 0.02, "fresh": True}},
                 "stages": [["vector", "sql"]]}
    cached = {**retrieval, "cache": {"capacity": 1000, "keys": {"universe": 50, "zipf_s": 1.0}}}
    off = summarise(simulate(w := workload({"retrieval": retrieval}, rate=20.0)), w, 0.0)
    on = summarise(simulate(w := workload({"retrieval": cached}, rate=20.0)), w, 0.0)
    assert on["retrieval_cache_hit_rate"] > 0.8
    assert on["backend_vector_utilisation"] < 0.3 * off["backend_vector_utilisation"]
    assert on["backend_sql_utilisation"] == pytest.approx(off["backend_sql_utilisation"], rel=1e-3)


@pytest.mark.parametrize("flow, message", [
    ([{"name": "x", "tool": "nope"}, "answer"], "unknown tool 'nope'"),
    ([{"name": "x", "model": "nope", "prompt_tokens": 1, "output_tokens": 1}, "answer"], "unknown model 'nope'"),
    ([{"name": "x", "tool": "t", "when": {"y": "ok"}}, {"name": "y", "tool": "t"}, "answer"],
     "'y' is not a step that finishes before this one"),
    ([{"name": "g", "parallel": [{"name": "a", "tool": "t"}, {"name": "b", "tool": "t", "when": {"a": "ok"}}]},
      "answer"], "'a' is not a step that finishes before this one"),
    ([{"name": "x", "tool": "t"}], "`answer` exactly once"),
    (["answer", "answer"], "`answer` exactly once"),
    ([{"name": "x", "tool": "t"}, {"name": "x", "tool": "t"}, "answer"], "used twice"),
    ([{"name": "c", "model": "small", "prompt_tokens": 1, "output_tokens": 1, "labels": {"a": 0.5, "b": 0.4}},
      "answer"], "sum to 0.9"),
    ([{"name": "x", "tool": "t", "when": {"c": "maybe"}}, "answer"], "is not a step"),
    ([{"name": "x", "tool": "t", "model": "small"}, "answer"], "exactly one of"),
    (["anser"], "a step is `answer` or a mapping"),
])
def test_flow_errors_name_the_field(tmp_path, flow, message):
    import yaml

    doc = {"version": 1, "simulation": {"duration_s": 10},
           "traffic": {"classes": {"chat": {"arrival": {"kind": "poisson", "rate_rps": 1}, "prompt_tokens": 10,
                                            "output_tokens": 10, "endpoint": "big"}}},
           "models": {"big": BIG, "small": SMALL},
           "pipeline": {"tools": {"t": tool(0.1)}, "flow": flow}}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_workload(path)
    text = str(err.value)
    assert message in text and "w.yaml" in text and "pipeline" in text


def test_per_class_flows_and_common_random_numbers():
    # A class with its own flow; the other keeps the plain answer. Adding a flow to one class leaves the
    # other's requests exactly as they were (own streams).
    base = workload({})
    doc = base.model_dump(mode="json", exclude_none=True)
    doc["traffic"]["classes"]["other"] = {**doc["traffic"]["classes"]["chat"]}
    plain = Workload.model_validate({**doc, "pipeline": {"post_processing_s": 0.0}})
    flowed = Workload.model_validate({**doc, "pipeline": {"post_processing_s": 0.0, "tools": {"t": tool(0.25)},
                                                          "flows": {"chat": [{"name": "x", "tool": "t"}, "answer"]}}})
    a, b = simulate(plain), simulate(flowed)
    cls = np.asarray(a.cls)
    e2e_a = np.asarray(a.end) - np.asarray(a.arrival)
    e2e_b = np.asarray(b.end) - np.asarray(b.arrival)
    other = cls == 1
    assert other.any() and (~other).any()
    assert e2e_b[other] == pytest.approx(e2e_a[other], abs=1e-12)
    assert e2e_b[~other] == pytest.approx(e2e_a[~other] + 0.25, abs=1e-9)


def test_agent_tools_workload_runs_end_to_end():
    spec = load_workload(ROOT / "workloads" / "agent-tools.yaml")
    result = run_workload(spec.model_copy(update={"simulation": spec.simulation.model_copy(
        update={"duration_s": 300.0, "replications": 1, "warmup_s": 30.0})}))
    s = result.summary
    for key in ("stage_tool_share", "stage_flow_calls_share", "tool_orders_sql_failed_share",
                "tool_crm_rest_attempts_mean", "flow_step_classify_run_share", "quality_useful_mean"):
        assert key in s and not math.isnan(s[key]), key
    assert 0 < s["flow_step_lookups_run_share"] < 1
    assert s["cost_tool_usd"] > 0
    assert s["model_calls_per_request"] > 2


def test_the_readme_flow_example_validates():

    import yaml
    from documents import PAGES, blocks

    block = next(b for b in blocks("yaml", PAGES["guides/flows.md"]) if "\n  flow:\n" in b)
    chat = {"arrival": {"kind": "poisson", "rate_rps": 1}, "prompt_tokens": 10, "output_tokens": 10,
            "endpoint": "gpt4o"}
    spec = Workload.model_validate({
        "simulation": {"duration_s": 60}, "models": {"gpt4o-mini": SMALL, "gpt4o": BIG},
        "traffic": {"classes": {"chat": chat, "background": chat}}, **yaml.safe_load(block)})
    rec = simulate(spec)
    assert {"classify", "lookups", "orders", "customer", "summarise", "validate", "repair"} <= set(rec.flow_steps.names)
    assert (flow_rows(rec)[:, 0] >= 0).all() and len(rec.arrival) > 0


def test_the_agent_tools_header_commands_run(capsys, monkeypatch):
    # The workload's header commands, shortened: a flakier CRM fails more calls for good (5% -> 20% an attempt,
    # two attempts: 0.25% -> 4% of calls) and retries more.
    import json

    from sim.cli import main

    monkeypatch.chdir(ROOT)
    short = ["--set", "simulation.duration_s=600", "--replications", "1", "--json"]
    summaries = []
    for extra in ([], ["--set", "pipeline.tools.crm_rest.failure_rate=0.2"]):
        assert main(["run", "workloads/agent-tools.yaml", *extra, *short]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    before, after = summaries
    calls = after["tool_crm_rest_calls_per_request"] * after["requests_arrived"]
    assert abs(after["tool_crm_rest_failed_share"] - 0.04) < 5 * math.sqrt(0.04 * 0.96 / calls)
    assert after["tool_crm_rest_attempts_mean"] == pytest.approx(1.2, abs=0.03)
    assert before["tool_crm_rest_attempts_mean"] == pytest.approx(1.05, abs=0.02)
