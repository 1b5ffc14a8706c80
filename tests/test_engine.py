"""The iteration-level engine against timelines computed by hand, skip-ahead included."""
from __future__ import annotations

import pytest
import simpy

from sim.config.schema import Engine
from sim.metrics.recorder import COMPLETED, REJECTED, Recorder
from sim.model.events import call_later
from sim.model.serving.endpoint import Endpoint
from sim.model.serving.engine import EngineReplica

# Step time = 10 ms + 1 ms per decoding sequence + 0.1 ms per prefill token.
COEFFS = {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001}


def replay(requests, max_batch=4, max_batch_tokens=100, kv_cache_tokens=None, replicas=1):
    """Submit (time, prompt, output) requests to one endpoint of engine replicas; return records and endpoint."""
    env = simpy.Environment()
    rec = Recorder(["c"], ["m"])
    endpoint = Endpoint(env, "m", 0, rec)
    engine = Engine(max_batch_tokens=max_batch_tokens, kv_cache_tokens=kv_cache_tokens, step_time=COEFFS)
    endpoint.servers = [EngineReplica(env, endpoint, r, max_batch, engine, rec, None) for r in range(replicas)]
    for t, prompt, output in requests:
        call_later(env, t, lambda e, p=prompt, o=output: endpoint.submit(rec.new(0, 0, env.now, p, o)))
    env.run()
    return rec, endpoint


def test_hand_computed_timeline():
    rec, _ = replay([(0.0, 250, 3), (0.05, 30, 2), (0.2, 10, 1), (0.3, 20, 10), (0.35, 5, 2)])
    # R0: 250-token prompt, budget 100: two identical prefill steps of 10 + 0.1*100 = 20 ms, jumped over
    #     in one event (t = 0.04); then a 50-token chunk, 15 ms: first token at 0.055.
    # R1 arrives at 0.05 during that step and joins the next: 30 tokens beside R0 decoding,
    #     10 + 1 + 3 = 14 ms: first token at 0.069.
    # Both decode one step (10 + 2 = 12 ms): R0's 3rd and R1's 2nd token at 0.081.
    # R2 finds the engine idle: 10 + 1 = 11 ms, its only token at 0.211.
    # R3: first token at 0.312 (12 ms), then a 9-step decode-only stretch of 11 ms each...
    # R4 arrives at 0.35, within R3's 4th decode step (0.345..0.356): the stretch is cut there;
    #     R4's 5 tokens take 10 + 1 + 0.5 = 11.5 ms beside R3: first token 0.3675;
    #     one step with both decoding (12 ms): R4 done at 0.3795;
    #     R3 has 3 tokens left, 11 ms each: done at 0.4125.
    first = [0.055, 0.069, 0.211, 0.312, 0.3675]
    end = [0.081, 0.081, 0.211, 0.4125, 0.3795]
    assert rec.first_token == pytest.approx(first, abs=1e-12)
    assert rec.end == pytest.approx(end, abs=1e-12)
    assert rec.admit == pytest.approx([0.0, 0.05, 0.2, 0.3, 0.35], abs=1e-12)
    assert rec.outcome == [COMPLETED] * 5


def test_max_batch_holds_admission_back_fifo():
    # One running sequence at most: the second and third wait their turn, in order.
    rec, _ = replay([(0.0, 10, 2), (0.001, 10, 1), (0.002, 10, 1)], max_batch=1)
    # R0: prefill 10 + 1 = 11 ms (first token 0.011), one decode step 10 + 1 = 11 ms: done 0.022.
    # R1 admitted at 0.022: 11 ms, done 0.033. R2 admitted at 0.033: done 0.044.
    assert rec.admit == pytest.approx([0.0, 0.022, 0.033], abs=1e-12)
    assert rec.end == pytest.approx([0.022, 0.033, 0.044], abs=1e-12)


def test_kv_cache_capacity_holds_admission_and_rejects_what_never_fits():
    # KV of 100 tokens: R0 (60 + 2) and R1 (30 + 1) fit together? 62 + 31 = 93 <= 100: yes.
    # R2 (50 + 1 = 51) must wait until R0 frees its 62 tokens; R3 (200 + 1) can never fit.
    rec, _ = replay([(0.0, 60, 2), (0.0, 30, 1), (0.0, 50, 1), (0.0, 200, 1)], kv_cache_tokens=100)
    # Step 1: 90 prompt tokens: 10 + 9 = 19 ms; both first tokens at 0.019, R1 done.
    # R2 still does not fit (62 + 51 > 100). Step 2: R0 decodes, 11 ms: done at 0.030.
    # R2 then runs alone: 10 + 5 = 15 ms: done 0.045.
    assert rec.end[:3] == pytest.approx([0.030, 0.019, 0.045], abs=1e-12)
    assert rec.admit[2] == pytest.approx(0.030, abs=1e-12)
    assert rec.outcome == [COMPLETED, COMPLETED, COMPLETED, REJECTED]


def test_least_loaded_replica_takes_the_request():
    rec, _ = replay([(0.0, 10, 5), (0.001, 10, 5), (0.002, 10, 5)], replicas=2)
    assert rec.replica == [0, 1, 0]


def test_identical_steps_are_jumped_over_in_one_event():
    # A long answer (1000 tokens) alone: one prefill step, then a single jump over 999 decode steps.
    rec, endpoint = replay([(0.0, 10, 1000)])
    assert rec.end[0] == pytest.approx(0.011 + 999 * 0.011, rel=1e-12)
    replica = endpoint.servers[0]
    assert replica.generation == 2  # two phases scheduled, not a thousand steps
    assert replica.step == 1000
    # Work in full-batch seconds: the prompt's 10 tokens, then 999 decode steps of one sequence,
    # each costing its own 1 ms plus a quarter (max_batch 4) of the 10 ms base.
    busy, area, work, held = replica.counters(rec.end[0])
    assert busy == pytest.approx(rec.end[0]) and area == pytest.approx(rec.end[0]) and held == rec.end[0]
    assert work == pytest.approx(10 * 0.0001 + 999 * (0.001 + 0.01 / 4), rel=1e-12)


def cancel_at(env, endpoint, t, i):
    """Cancel request i at time t (as a time limit would)."""
    from sim.metrics.recorder import TIMED_OUT

    call_later(env, t, lambda e: endpoint.cancel(i, TIMED_OUT))


def replay_with_cancels(requests, cancels, max_batch=1, kv_cache_tokens=1000):
    env = simpy.Environment()
    rec = Recorder(["c"], ["m"])
    endpoint = Endpoint(env, "m", 0, rec)
    engine = Engine(max_batch_tokens=100, kv_cache_tokens=kv_cache_tokens, step_time=COEFFS)
    endpoint.servers = [EngineReplica(env, endpoint, 0, max_batch, engine, rec, None)]
    for t, prompt, output in requests:
        call_later(env, t, lambda e, p=prompt, o=output: endpoint.submit(rec.new(0, 0, env.now, p, o)))
    for t, i in cancels:
        cancel_at(env, endpoint, t, i)
    env.run()
    return rec, endpoint.servers[0]


def test_a_cancelled_sequence_leaves_the_batch_at_the_end_of_the_step_in_progress():
    from sim.metrics.recorder import TIMED_OUT

    # R0 (10 + 100 tokens) alone: first token at 0.011, then decode steps of 11 ms. Cancelled at 0.05,
    # within its 4th decode step (0.044..0.055): 1 + 3 tokens made; it leaves at 0.055, where R1
    # (waiting: max_batch 1) is admitted: 11 ms prefill, one 11 ms decode step, done at 0.077.
    rec, replica = replay_with_cancels([(0.0, 10, 100), (0.02, 10, 2)], [(0.05, 0)])
    assert rec.outcome == [TIMED_OUT, COMPLETED]
    assert rec.end == pytest.approx([0.05, 0.077], abs=1e-12)
    assert rec.admit[1] == pytest.approx(0.055, abs=1e-12)
    assert rec.generated == {0: 4}
    assert replica.load == 0 and replica.kv_used == 0 and not replica.decoding and not replica.prefilling


def test_a_cancel_during_a_long_prefill_cuts_it_after_the_step_in_progress():
    from sim.metrics.recorder import TIMED_OUT

    # R0's 250-token prompt takes two full-budget prefill steps of 20 ms (then a third); cancelled at
    # 0.01, it leaves at 0.02 with no token made. R1 (10 + 1) then runs alone: 11 ms, done at 0.031.
    rec, replica = replay_with_cancels([(0.0, 250, 5), (0.0, 10, 1)], [(0.01, 0)])
    assert rec.outcome == [TIMED_OUT, COMPLETED]
    assert rec.admit[1] == pytest.approx(0.02, abs=1e-12) and rec.end[1] == pytest.approx(0.031, abs=1e-12)
    assert rec.generated == {0: 0} and rec.first_token[0] != rec.first_token[0]  # NaN: no token shown
    assert replica.load == 0 and replica.kv_used == 0


def test_a_cancelled_request_leaves_the_queue_and_the_next_one_moves_up():
    from sim.metrics.recorder import TIMED_OUT

    # max_batch 1: R0 runs 0..0.022 (10 + 2 tokens); R1 waits and is cancelled at 0.01; R2 starts at 0.022.
    rec, replica = replay_with_cancels([(0.0, 10, 2), (0.001, 10, 1), (0.002, 10, 1)], [(0.01, 1)])
    assert rec.outcome == [COMPLETED, TIMED_OUT, COMPLETED]
    assert rec.admit[2] == pytest.approx(0.022, abs=1e-12) and rec.end[2] == pytest.approx(0.033, abs=1e-12)
    assert rec.generated == {1: 0} and replica.endpoint.waiting == 0


def test_a_cancelled_decode_that_would_have_ended_in_that_very_step_is_not_reported():
    from sim.metrics.recorder import TIMED_OUT

    # R0 (10 + 2): its last token is due at 0.022; cancelled at 0.015 it is not reported as completed.
    done = []
    env = simpy.Environment()
    rec = Recorder(["c"], ["m"])
    endpoint = Endpoint(env, "m", 0, rec)
    endpoint.on_done = done.append
    endpoint.servers = [EngineReplica(env, endpoint, 0, 4, Engine(max_batch_tokens=100, step_time=COEFFS), rec, None)]
    call_later(env, 0.0, lambda e: endpoint.submit(rec.new(0, 0, env.now, 10, 2)))
    cancel_at(env, endpoint, 0.015, 0)
    env.run()
    assert done == [] and rec.outcome == [TIMED_OUT] and rec.generated == {0: 1}
    assert endpoint.servers[0].load == 0
