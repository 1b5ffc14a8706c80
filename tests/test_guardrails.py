"""Guardrails and fallbacks, and users cancelling streams: timelines computed by hand, and invariants under load."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sim
from sim.config.schema import Workload
from sim.metrics.ledger import ledger
from sim.metrics.recorder import CANCELLED, COMPLETED, OUTCOMES, PARTIAL, TIMED_OUT, TRY_LATER
from sim.metrics.summary import stage_times
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent

# Streams its first token after 0.2 s, then 10 tokens/s: an 11-token answer takes 1.2 s, a 31-token one 3.2 s.
STREAMING = {"kind": "api", "concurrency": 1, "ttft_s": 0.2, "output_tokens_per_s": 10.0,
             "price_per_mtok_in": 1.0, "price_per_mtok_out": 2.0}
PLAIN = {"kind": "api", "concurrency": 4, "service_time": 1.0}
ENGINE = {"kind": "self_hosted", "max_batch": 4, "engine": {"max_batch_tokens": 2000, "kv_cache_tokens": 500,
          "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001}}}


def workload(tmp_path: Path, requests, pipeline: dict, models: dict, endpoint: str | None = None) -> Workload:
    """Requests (time, prompt tokens, output tokens) replayed exactly through `pipeline`."""
    path = tmp_path / "t.csv"
    path.write_text("time,prompt_tokens,output_tokens\n" + "".join(f"{t!r},{p},{o}\n" for t, p, o in requests))
    return Workload.model_validate({
        "simulation": {"duration_s": 100},
        "traffic": {"classes": {"c": {"arrival": {"kind": "trace", "format": "csv", "path": str(path), "end_s": 50},
                                      "prompt_tokens": 10, "output_tokens": 10,
                                      "endpoint": endpoint or next(iter(models))}}},
        "models": models,
        "pipeline": pipeline,
    })


def test_the_time_limit_stops_the_call_and_frees_its_slot(tmp_path):
    # One API slot. R0 (31 tokens: 0..3.2 s) is stopped at its 2 s limit, with 1 + 30 x 1.8 / 3.0 = 19 tokens
    # made; R1, waiting since 1.5, takes the slot at 2.0 (not 3.2) and ends at 3.2, inside its limit (3.5).
    spec = workload(tmp_path, [(0.0, 10, 31), (1.5, 10, 11)], {"guardrails": {"max_time_s": 2.0}},
                    {"m": STREAMING})
    rec = simulate(spec)
    assert [OUTCOMES[o] for o in rec.outcome] == ["timed_out", "completed"]
    assert rec.end == pytest.approx([2.0, 3.2])
    assert rec.calls.admit == pytest.approx([0.0, 2.0])
    # Billed: R0's prompt and the 19 tokens it made; R1 in full.
    book = ledger(rec, spec)
    assert book["tokens_out"].tolist() == [19, 11] and book["tokens_in"].tolist() == [10, 10]
    assert book["usd"].sum() == pytest.approx((20 * 1.0 + 30 * 2.0) / 1e6)


def test_at_the_time_limit_what_streamed_is_a_partial_answer(tmp_path):
    guard = {"max_time_s": 2.0, "fallbacks": ["partial_answer", "try_later"]}
    rec = simulate(workload(tmp_path, [(0.0, 10, 31)], {"guardrails": guard}, {"m": STREAMING}))
    assert rec.outcome == [PARTIAL] and rec.end == pytest.approx([2.0]) and rec.first_token == pytest.approx([0.2])
    # Nothing streams from a plain service-time call: no partial answer, the user is told to try later.
    rec = simulate(workload(tmp_path, [(0.0, 10, 31)], {"guardrails": {**guard, "max_time_s": 0.5}}, {"m": PLAIN}))
    assert rec.outcome == [TRY_LATER] and rec.end == pytest.approx([0.5])


def test_timeouts_are_retried_with_backoff_then_the_smaller_model_answers(tmp_path):
    # Calls of 1 s time out at 0.5 s: [0, 0.5], backoff 0.1, [0.6, 1.1], backoff 0.2, [1.3, 1.8]; then the
    # smaller model (0.2 s) answers at 2.0.
    guard = {"call_timeout_s": 0.5, "retry": {"max_attempts": 3, "backoff_s": 0.1, "multiplier": 2, "jitter": 0},
             "fallbacks": ["smaller_model"], "fallback_model": "small"}
    spec = workload(tmp_path, [(0.0, 10, 10)], {"guardrails": guard},
                    {"big": PLAIN, "small": {**PLAIN, "service_time": 0.2}})
    rec = simulate(spec)
    assert rec.outcome == [COMPLETED] and rec.end == pytest.approx([2.0])
    assert rec.calls.arrival == pytest.approx([0.0, 0.6, 1.3, 1.8])
    assert [OUTCOMES[o] for o in rec.calls.outcome] == ["timed_out"] * 3 + ["completed"]
    assert rec.calls.endpoint == [0, 0, 0, 1]
    assert rec.guard_log == [(0, 2, 3, 1, 0)]  # 2 retries, 3 timeouts, answered by smaller_model, no cap met
    times = stage_times(rec)
    assert times["retry"] == pytest.approx([0.3])
    assert sum(times.values()) == pytest.approx([2.0])
    summary = sim.run(spec, replications=1).summary
    assert summary["fallback_smaller_model_share"] == 1 and summary["guard_call_timeouts_per_request"] == 3


def test_a_prompt_too_long_for_the_kv_cache_is_retried_with_reduced_context(tmp_path):
    # 1000 prompt tokens never fit a 500-token KV cache: refused at once; with the context cut to 30%
    # (no cacheable prefix: of the whole prompt) the 300-token prompt runs.
    guard = {"fallbacks": ["reduced_context"], "reduced_context_share": 0.3}
    rec = simulate(workload(tmp_path, [(0.0, 1000, 5)], {"guardrails": guard}, {"m": ENGINE}))
    assert rec.calls.prompt == [1000, 300]
    assert [OUTCOMES[o] for o in rec.calls.outcome] == ["rejected", "completed"]
    assert rec.outcome == [COMPLETED] and rec.guard_log == [(0, 0, 0, 2, 0)]
    without = simulate(workload(tmp_path, [(0.0, 1000, 5)], {}, {"m": ENGINE}))
    assert [OUTCOMES[o] for o in without.outcome] == ["rejected"]


@pytest.mark.parametrize("cap, calls", [({"max_hops": 2}, 2), ({"max_tokens": 50}, 2), ({"max_tokens": 60}, 3)])
def test_caps_stop_further_calls_and_the_answer_in_hand_stands(tmp_path, cap, calls):
    # Every answer fails validation and five retries are allowed; each call costs 10 + 10 tokens.
    pipeline = {"output": {"structured_failure_rate": 1.0, "max_validation_retries": 5}, "guardrails": cap}
    rec = simulate(workload(tmp_path, [(0.0, 10, 10)], pipeline, {"m": PLAIN}))
    assert len(rec.calls.arrival) == calls and rec.outcome == [COMPLETED] and rec.end == pytest.approx([calls])
    limit = "hops" if "max_hops" in cap else "tokens"
    from sim.model.application.guardrails import LIMITS

    assert rec.guard_log == [(0, 0, 0, 0, LIMITS.index(limit))]


@pytest.mark.parametrize("cap, seconds", [(1, 0.0), (2, 0.3), (3, 0.6), (None, 0.6)])
def test_the_tool_cap_skips_the_stages_beyond_it(tmp_path, cap, seconds):
    retrieval = {"backends": {"db": {"concurrency": 4, "latency_s": 0.3}}, "stages": [["db", "db"], ["db"]]}
    rec = simulate(workload(tmp_path, [(0.0, 10, 10)], {"retrieval": retrieval, "guardrails": {"max_tool_calls": cap}},
                            {"m": PLAIN}))
    assert rec.end == pytest.approx([seconds + 1.0])
    assert rec.guard_log == ([] if cap is None or cap >= 3 else [(0, 0, 0, 0, 3)])


def test_a_user_who_stops_reading_stops_the_model_and_the_bill(tmp_path):
    # Half of an 11-token answer read (6 tokens): the stream stops at 0.2 + 5 / 10 = 0.7 s.
    output = {"cancel_share": 1.0, "cancel_read_share": 0.5}
    spec = workload(tmp_path, [(0.0, 10, 11)], {"output": output}, {"m": STREAMING})
    rec = simulate(spec)
    assert rec.outcome == [CANCELLED] and rec.end == pytest.approx([0.7]) and rec.first_token == pytest.approx([0.2])
    assert ledger(rec, spec)["tokens_out"].tolist() == [6]
    # On an engine the sequence stops decoding: 10 of 100 tokens, first at 11 ms, then 9 steps of 11 ms.
    engine = simulate(workload(tmp_path, [(0.0, 10, 100)], {"output": {**output, "cancel_read_share": 0.1}},
                               {"m": ENGINE}))
    assert engine.outcome == [CANCELLED] and engine.end == pytest.approx([0.011 + 9 * 0.011])
    # Without streaming there is nothing to stop reading.
    whole = simulate(workload(tmp_path, [(0.0, 10, 11)], {"output": {**output, "streaming": False}}, {"m": STREAMING}))
    assert whole.outcome == [COMPLETED]


def test_the_cancel_share_is_the_share_of_requests_cancelled():
    spec = sim.load_workload(ROOT / "workloads/rag-support.yaml", [
        "simulation.duration_s=600", "pipeline.output.cancel_share=0.3"])
    summary = sim.run(spec, replications=1, keep_requests=False).summary
    answered = summary["requests_arrived"] - summary["requests_rejected"]
    # Every streamed answer (cache hits are not streamed from a model) may be cancelled:
    # the share among requests that made a call, within 4 binomial standard errors.
    calls = answered * (1 - summary["cache_hit_rate_output"] * (1 - summary["cache_bypass_share_output"]))
    share = summary["requests_cancelled"] / calls
    assert abs(share - 0.3) <= 4 * (0.3 * 0.7 / calls) ** 0.5


def test_at_the_time_limit_an_escalation_in_progress_leaves_the_first_answer_as_partial(tmp_path):
    # The weak tier answers in 1 s; the evaluator flags everything, so the strong tier (5 s) is asked;
    # at the 3 s limit it is stopped, and the weak answer is given, flagged uncertain.
    pipeline = {"router": {"tiers": ["weak", "strong"], "quality": [0.68, 0.81]},
                "escalation": {"max_hops": 2, "detect_bad": 1.0, "false_alarm": 1.0},
                "guardrails": {"max_time_s": 3.0, "fallbacks": ["partial_answer"]}}
    rec = simulate(workload(tmp_path, [(0.0, 10, 10)], pipeline,
                            {"weak": PLAIN, "strong": {**PLAIN, "service_time": 5.0}}))
    assert rec.outcome == [PARTIAL] and rec.end == pytest.approx([3.0]) and rec.first_token == pytest.approx([1.0])


def test_under_overload_every_request_ends_within_its_limit_and_every_call_ends():
    # rag-support at 3x its traffic with guardrails: queues would grow without bound; with them every
    # request ends by its time limit, every call ends (none is left holding a batch place or KV), and
    # each arrival has exactly one outcome.
    spec = sim.load_workload(ROOT / "workloads/rag-support.yaml", [
        "simulation.duration_s=300", "traffic.rate_scale=3",
        "pipeline.guardrails={max_time_s: 6, call_timeout_s: 4, retry: {max_attempts: 2, backoff_s: 0.2},"
        " fallbacks: [smaller_model, reduced_context, partial_answer, try_later]}"])
    rec = simulate(spec)
    outcome, e2e = np.asarray(rec.outcome), np.asarray(rec.end) - np.asarray(rec.arrival)
    assert (outcome >= 0).all() and (np.asarray(rec.calls.outcome) >= 0).all()
    assert e2e.max() <= 6.0 + 1e-9
    ended = {OUTCOMES[o] for o in outcome}
    assert {"completed", "try_later"} <= ended
    answered = np.isin(outcome, (COMPLETED, CANCELLED))
    np.testing.assert_allclose(sum(stage_times(rec).values())[answered], e2e[answered], rtol=0, atol=1e-9)
    summary = sim.run(spec, replications=1, keep_requests=False).summary
    counted = sum(summary[f"requests_{name}"] for name in OUTCOMES)
    assert counted == summary["requests_arrived"]


def test_guardrail_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="smaller_model needs fallback_model"):
        workload(tmp_path, [(0.0, 10, 10)], {"guardrails": {"fallbacks": ["smaller_model"]}}, {"m": PLAIN})
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        workload(tmp_path, [(0.0, 10, 10)], {"guardrails": {"fallback_model": "nope"}}, {"m": PLAIN})
    with pytest.raises(ValueError, match="each at most once"):
        workload(tmp_path, [(0.0, 10, 10)], {"guardrails": {"fallbacks": ["try_later", "try_later"]}}, {"m": PLAIN})


@pytest.mark.parametrize("core", ["python", "compiled"])
def test_timeouts_fire_on_time_for_live_owners_with_few_events(core):
    import simpy

    from sim.model.events import COMPILED_CORE, PYTHON_CORE

    core = PYTHON_CORE if core == "python" else COMPILED_CORE
    env = simpy.Environment()
    ended: set[int] = set()
    fired: list[tuple[float, int]] = []
    timeouts = core.Timeouts(env, lambda k: k not in ended, lambda k: fired.append((env.now, k)))
    # 1,000 owners, one starting every 10 ms, each with a 5 s limit; all but every 100th end after 1 s.
    for k in range(1000):
        core.call_later(env, k * 0.01, lambda e, k=k: timeouts.add(5.0, k))
        if k % 100:
            core.call_later(env, k * 0.01 + 1.0, lambda e, k=k: ended.add(k))
    scheduled = next(env._eid)
    env.run()
    assert fired == [(pytest.approx(k * 0.01 + 5.0), k) for k in range(0, 1000, 100)]
    wakes = next(env._eid) - scheduled - 1  # events scheduled while running: the wake-ups only
    assert len(fired) <= wakes <= 2 * len(fired) + 2  # not one per owner


def test_a_first_token_timeout_spares_streams_that_started(tmp_path):
    # One API slot: R0 streams from 0.2 s to 3.2 s and is left to finish; R1, queued behind it with no
    # token at 1.1 s (1 s after its send), times out there and leaves the queue.
    spec = workload(tmp_path, [(0.0, 10, 31), (0.1, 10, 11)], {"guardrails": {"first_token_timeout_s": 1.0}},
                    {"m": STREAMING})
    rec = simulate(spec)
    assert [OUTCOMES[o] for o in rec.outcome] == ["completed", "timed_out"]
    assert rec.end == pytest.approx([3.2, 1.1])


def test_a_stream_that_started_still_meets_the_whole_call_limit(tmp_path):
    # R0 streams from 0.2 s (past its 1 s first-token limit) but its 2 s whole-call limit stops it at 2.0.
    guard = {"first_token_timeout_s": 1.0, "call_timeout_s": 2.0}
    rec = simulate(workload(tmp_path, [(0.0, 10, 31)], {"guardrails": guard}, {"m": STREAMING}))
    assert rec.outcome == [TIMED_OUT] and rec.end == pytest.approx([2.0])
    # With a 5 s whole limit it finishes at 3.2.
    rec = simulate(workload(tmp_path, [(0.0, 10, 31)], {"guardrails": {**guard, "call_timeout_s": 5.0}},
                            {"m": STREAMING}))
    assert rec.outcome == [COMPLETED] and rec.end == pytest.approx([3.2])


def test_a_limit_earlier_than_those_queued_fires_first():
    import simpy

    from sim.model.events import Timeouts, call_later

    env = simpy.Environment()
    fired = []
    timeouts = Timeouts(env, lambda k: True, lambda k: fired.append((env.now, k)))
    call_later(env, 0.0, lambda e: timeouts.add(5.0, "a"))
    call_later(env, 1.0, lambda e: timeouts.add(1.0, "b"))   # due at 2: before "a"
    call_later(env, 1.5, lambda e: timeouts.add(3.5, "c"))   # due at 5: after "a" (ties keep their order)
    env.run()
    assert fired == [(2.0, "b"), (5.0, "a"), (5.0, "c")]
