"""The compiled request lifecycle (sim/_lifecycle.c, lifecycle.CompiledLifecycle) gives Lifecycle's results to the bit.

The Python Lifecycle is the reference. Compared: every request and call record, every per-request log (budget,
cache codes and leaks, stage times, quality inputs, guardrail actions, validation retries), the tokens cancelled
calls made and read from prompt caches, and every summary metric; on rag-support and on variants of it that
Hypothesis makes around every branch of the way a request takes: with and without the output cache,
retrieval, the budget, post-processing and streaming; routing policies, escalation with same-tier retries;
cancellations, structured-output retries, call and request time limits, retries, each order of fallbacks, caps
on calls, tokens and tool calls, overflow to another endpoint, queues that fill."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config.loader import load_workload
from sim.config.schema import Workload
from sim.metrics.recorder import CANCELLED, COMPLETED, FLAT_LOGS, PARTIAL, TRY_LATER, Recorder
from sim.metrics.summary import summarise
from sim.model.application import lifecycle
from sim.model.kernels import not_built
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent
RAG = ROOT / "workloads" / "rag-support.yaml"
COLUMNS = ("cls", "endpoint", "arrival", "admit", "first_token", "end", "prompt", "output", "replica", "outcome",
           "user", "feature", "generated", "guard_log", "validation_retries")

pytestmark = pytest.mark.skipif(lifecycle._lifecycle is None,
                                reason="sim/_lifecycle.c not built (or LLMSIM_PURE_PYTHON set)")


def _same(python: Recorder, compiled: Recorder, what: str) -> None:
    for column in COLUMNS:
        a, b = getattr(python, column), getattr(compiled, column)
        if a is None or isinstance(a, dict):
            assert a == b, f"{what}.{column}"
            continue
        assert len(a) == len(b), f"{what}.{column}"
        for j, (x, y) in enumerate(zip(a, b)):  # == on floats is bit equality here (NaN: both NaN)
            assert x == y or (x != x and y != y), f"{what}.{column}[{j}]: Python {x!r}, compiled {y!r}"
    for log in FLAT_LOGS:
        a, b = getattr(python, log), getattr(compiled, log)
        assert (a is None) == (b is None), f"{what}.{log}"
        if a is not None:
            assert np.array_equal(a.values(), b.values(), equal_nan=True), f"{what}.{log}"


def same_results(workload: Workload) -> Recorder:
    compiled = simulate(workload)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle, "_lifecycle", None)
        python = simulate(workload)
    _same(python, compiled, "requests")
    _same(python.calls, compiled.calls, "calls")
    tokens = python.calls.cached_tokens, compiled.calls.cached_tokens
    assert (tokens[0] is None) == (tokens[1] is None)
    if tokens[0] is not None:
        assert tokens[0].read == tokens[1].read and tokens[0].written == tokens[1].written
    assert python.warnings == compiled.warnings + [not_built(["request lifecycle (sim/_lifecycle.c)"])]
    warmup = workload.simulation.warmup_s if isinstance(workload.simulation.warmup_s, float) else 0.0
    ms, mc = summarise(python, workload, warmup), summarise(compiled, workload, warmup)
    assert ms.keys() == mc.keys()
    assert all(ms[k] == mc[k] or (math.isnan(ms[k]) and math.isnan(mc[k])) for k in ms), \
        [k for k in ms if not (ms[k] == mc[k] or (math.isnan(ms[k]) and math.isnan(mc[k])))]
    return compiled


def test_the_compiled_lifecycle_runs_rag_support():
    rec = same_results(load_workload(RAG))
    assert len(rec.arrival) > 10_000


def test_a_stressed_variant_takes_every_rare_path_and_gives_the_same_results():
    """Three times the load, tight time limits, cancellations, invalid answers, caps: the Python half's paths
    (failures, retries, every fallback, validation) interleave with the compiled one's, and all of them occur."""
    workload = load_workload(RAG, [
        "simulation.duration_s=600", "traffic.rate_scale=3", "pipeline.output.cancel_share=0.2",
        "pipeline.output.structured_failure_rate=0.2", "pipeline.guardrails.first_token_timeout_s=0.4",
        "pipeline.guardrails.max_time_s=4", "pipeline.guardrails.max_tokens=9000",
        "pipeline.guardrails.fallbacks=[smaller_model, reduced_context, partial_answer, try_later]",
        "pipeline.escalation.same_tier_retries=1", "models.gpt4o.concurrency=8", "models.llama8b.max_batch=16"])
    rec = same_results(workload)
    outcomes = set(rec.outcome)
    assert {COMPLETED, CANCELLED, PARTIAL, TRY_LATER} <= outcomes, outcomes  # (try_later catches the rest)
    paths = {row[3] for row in rec.guard_log}
    assert rec.validation_retries and {1, 2} <= paths and any(row[1] for row in rec.guard_log), paths


FALLBACKS = ["smaller_model", "reduced_context", "partial_answer", "try_later"]


@st.composite
def rag_variants(draw) -> list[str]:
    """Overrides of rag-support that reach every branch of the lifecycle (and leave the rest as shipped)."""
    o = [f"simulation.duration_s={draw(st.sampled_from([150, 300]))}", "simulation.warmup_s=20",
         f"simulation.seed={draw(st.integers(0, 2**31))}",
         f"traffic.rate_scale={draw(st.sampled_from([0.5, 1.0, 3.0]))}"]
    p = "pipeline"
    for block in ("output_cache", "retrieval", "budget", "post_processing_s", "escalation", "guardrails"):
        if draw(st.integers(0, 3)) == 0:
            o.append(f"{p}.{block}=null")
    budget = f"{p}.budget=null" not in o
    if not budget:  # prompt caches cache the budget's prefix: none without one
        o += ["models.llama8b.prompt_cache=null", "models.gpt4o.prompt_cache=null"]
    if draw(st.booleans()):
        o.append(f"{p}.output.streaming={draw(st.booleans())}".lower())
    if draw(st.booleans()):
        o.append(f"{p}.output.cancel_share={draw(st.sampled_from([0.0, 0.3, 1.0]))}")
        if draw(st.booleans()):  # the user stops at once: the stream still shows one token
            o.append(f"{p}.output.cancel_read_share=0.0")
    if draw(st.booleans()):
        o += [f"{p}.output.structured_failure_rate={draw(st.sampled_from([0.2, 0.6]))}",
              f"{p}.output.max_validation_retries={draw(st.integers(0, 3))}"]
    if draw(st.booleans()):
        o.append(f"{p}.router.policy={draw(st.sampled_from(['fixed', 'risk', 'threshold']))}")
        o.append(f"{p}.router.risky_classes=[support]" if draw(st.booleans()) else f"{p}.router.risky_classes=[]")
    if draw(st.booleans()):
        o += [f"{p}.escalation.same_tier_retries={draw(st.integers(0, 2))}",
              f"{p}.escalation.same_tier_fix_share={draw(st.sampled_from([0.0, 0.5]))}",
              f"{p}.escalation.max_hops={draw(st.integers(1, 3))}"]
    g = f"{p}.guardrails"
    if draw(st.booleans()):
        o.append(f"{g}.max_time_s={draw(st.sampled_from([1.0, 3.0, 60.0]))}")
    if draw(st.booleans()):
        o.append(f"{g}.first_token_timeout_s={draw(st.sampled_from([0.2, 0.6, 8.0]))}")
    if draw(st.booleans()):
        o.append(f"{g}.retry.max_attempts={draw(st.integers(1, 3))}")
    if draw(st.booleans()):
        fallbacks = draw(st.permutations(FALLBACKS))[:draw(st.integers(0, 4))]
        o.append(f"{g}.fallbacks=[{', '.join(fallbacks)}]")
    if draw(st.booleans()):
        o += [f"{g}.max_hops={draw(st.integers(1, 4))}", f"{g}.max_tokens={draw(st.sampled_from([2500, 6000, 40000]))}",
              f"{g}.max_tool_calls={draw(st.integers(0, 6))}"]
    if draw(st.booleans()):
        o.append(f"models.gpt4o.concurrency={draw(st.sampled_from([1, 4]))}")
    if draw(st.booleans()):
        o += [f"models.llama8b.max_batch={draw(st.sampled_from([2, 8]))}",
              f"models.llama8b.queue.capacity={draw(st.sampled_from([0, 5]))}"]
    if draw(st.booleans()):
        o.append(f"models.llama8b.queue.overflow={{to: gpt4o, above: {draw(st.integers(0, 3))}}}")
    if budget and draw(st.booleans()):  # a small window: some prompts overflow it and are refused
        o.append(f"{p}.budget.context_window_tokens={draw(st.sampled_from([3000, 8192]))}")
    return o


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(rag_variants())
def test_generated_rag_variants_give_the_python_lifecycles_results(overrides):
    try:
        workload = load_workload(RAG, overrides)
    except Exception:  # a combination the schema refuses (e.g. a router without its escalation's needs)
        from hypothesis import reject
        reject()
    same_results(workload)
