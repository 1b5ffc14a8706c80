"""Step-time model v2: context-aware decode, prefill attention, per-step noise and slow episodes.

The engine jumps over stretches of steps in one event; here a plain loop runs the same
scheduling one step at a time (written from the policy, not from the engine's code) and
the two must agree request by request: to 1e-9 with noise off, and with noise on too,
since both read the same per-step noise stream. A KS test checks the noise's
distribution against independent gamma draws.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import simpy

from sim.config.schema import Engine
from sim.config.serving import SlowEpisodes
from sim.metrics.recorder import Recorder
from sim.model.events import call_later
from sim.model.serving.endpoint import Endpoint
from sim.model.serving.engine import EngineReplica
from sim.model.serving.step_clock import SlowTime, StepNoise

V2 = {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001,
      "per_kv_token_s": 2e-6, "per_prefill_attention_s": 1e-7}


def requests(seed: int, n: int = 120, rate: float = 40.0) -> list[tuple[float, int, int]]:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, n))
    prompts = rng.integers(1, 300, n)
    outputs = rng.integers(1, 60, n)
    return [(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]


def engine_run(reqs, step_time, max_batch=6, budget=64, kv=2000, seed=7):
    """The engine (skip-ahead) on one replica; returns first-token and end times, and the replica."""
    env = simpy.Environment()
    rec = Recorder(["c"], ["m"])
    endpoint = Endpoint(env, "m", 0, rec)
    engine = Engine(max_batch_tokens=budget, kv_cache_tokens=kv, step_time=step_time)
    streams = np.random.SeedSequence(seed).spawn(2)
    replica = EngineReplica(env, endpoint, 0, max_batch, engine, rec, np.random.default_rng(streams[0]),
                            episode_rng=np.random.default_rng(streams[1]))
    endpoint.servers = [replica]
    for t, prompt, output in reqs:
        call_later(env, t, lambda e, p=prompt, o=output: endpoint.submit(rec.new(0, 0, env.now, p, o)))
    env.run()
    return np.array(rec.first_token), np.array(rec.end), replica


def reference_run(reqs, step_time, max_batch=6, budget=64, kv=2000, seed=7):
    """The same policy one step at a time: FIFO admission (batch places and KV), chunked prefill
    within the step's token budget after one token per decoding sequence, then the step time
    formula of StepTime, times the k-th noise draw, through the slow-episode time change."""
    st = Engine(max_batch_tokens=budget, step_time=step_time).step_time
    streams = np.random.SeedSequence(seed).spawn(2)
    noise = None
    if st.noise_cv > 0:  # the same stream of per-step factors, drawn in one go
        shape = 1 / st.noise_cv ** 2
        noise = np.random.default_rng(streams[0]).gamma(shape, 1 / shape, 200_000)
    episodes = SlowTime(st.slow_episodes, np.random.default_rng(streams[1]), st.stalls) \
        if st.slow_episodes or st.stalls else None
    n = len(reqs)
    first, end = np.full(n, math.nan), np.full(n, math.nan)
    queue, prefilling, decoding = deque(), deque(), []  # prefilling: [i, done]; decoding: [i, made]
    kv_used, t, k, nxt = 0, 0.0, 0, 0
    while nxt < n or queue or prefilling or decoding:
        if not (queue or prefilling or decoding):
            t = max(t, reqs[nxt][0])  # idle: the engine starts when the next request arrives
        while nxt < n and reqs[nxt][0] <= t:  # arrivals during the last step join this one
            queue.append(nxt)
            nxt += 1
        while queue and len(prefilling) + len(decoding) < max_batch and \
                kv_used + reqs[queue[0]][1] + reqs[queue[0]][2] <= kv:
            i = queue.popleft()
            kv_used += reqs[i][1] + reqs[i][2]
            prefilling.append([i, 0])
        if not (prefilling or decoding):
            continue
        room, chunks = budget - len(decoding), []
        for entry in prefilling:
            if room <= 0:
                break
            chunk = min(reqs[entry[0]][1] - entry[1], room)
            chunks.append((entry, chunk))
            room -= chunk
        context = sum(reqs[i][1] + made for i, made in decoding)
        pairs = sum(c * (entry[1] + (c + 1) / 2) for entry, c in chunks)
        nominal = (st.base_s + st.per_decode_seq_s * len(decoding) + st.per_kv_token_s * context
                   + st.per_prefill_token_s * sum(c for _, c in chunks) + st.per_prefill_attention_s * pairs)
        work = nominal * (noise[k] if noise is not None else 1.0)
        t += episodes.wall(t, work) if episodes is not None else work
        k += 1
        for entry in decoding:
            entry[1] += 1
        for entry, c in chunks:
            entry[1] += c
            if entry[1] == reqs[entry[0]][1]:
                prefilling.remove(entry)
                first[entry[0]] = t
                decoding.append([entry[0], 1])
        for entry in [e for e in decoding if e[1] == reqs[e[0]][2]]:
            decoding.remove(entry)
            end[entry[0]] = t
            kv_used -= reqs[entry[0]][1] + reqs[entry[0]][2]
    return first, end


CASES = {
    "v1 terms": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001},
    "context terms": V2,
    "v1 terms, noise": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001, "noise_cv": 0.2},
    "context terms, noise": {**V2, "noise_cv": 0.3},
    "context terms, noise, slow episodes": {
        **V2, "noise_cv": 0.1, "slow_episodes": {"multiplier": 2.5, "mean_duration_s": 0.2, "mean_interval_s": 0.5}},
    "stalls, slow episodes": {
        **V2, "slow_episodes": {"multiplier": 1.5, "mean_duration_s": 0.3, "mean_interval_s": 1.0},
        "stalls": [{"at_s": 0.5, "duration_s": 0.3}, {"at_s": 1.2, "duration_s": 0.05}, {"at_s": 1.21, "duration_s": 0.1}]},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [1, 2])
def test_skip_ahead_agrees_with_a_step_by_step_loop(case, seed):
    reqs = requests(seed)
    first, end, replica = engine_run(reqs, CASES[case], seed=seed)
    ref_first, ref_end = reference_run(reqs, CASES[case], seed=seed)
    assert np.all(np.isfinite(end))
    np.testing.assert_allclose(first, ref_first, rtol=0, atol=1e-9)
    np.testing.assert_allclose(end, ref_end, rtol=0, atol=1e-9)
    # The skip-ahead really skips: far fewer phases than steps.
    assert replica.generation < replica.step / 2


def test_context_terms_slow_long_answers_down():
    """With per_kv_token_s a long answer's later tokens come slower: the decode time is the closed form."""
    reqs = [(0.0, 1000, 201)]
    first, end, _ = engine_run(reqs, V2, budget=2000, kv=10_000)
    # One 1000-token prefill step: 10 ms + 0.1 ms x 1000 + 1e-7 x 1000 x 1001 / 2 pairs.
    assert first[0] == pytest.approx(0.01 + 0.1 + 1e-7 * 1000 * 1001 / 2, abs=1e-12)
    # Then 200 decode steps, the j-th reading 1000 + j context tokens (j = 1..200).
    decode = sum(0.01 + 0.001 + 2e-6 * (1000 + j) for j in range(1, 201))
    assert end[0] - first[0] == pytest.approx(decode, abs=1e-12)


def test_a_stall_delays_the_step_in_progress_by_its_length():
    # One request alone: prefill 11 ms (first token 0.011), then 9 decode steps of 11 ms (end 0.110).
    # A 0.5 s stall from 0.05 stretches the step in progress: everything after it moves by 0.5 s.
    spec = {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0001}
    first, end, _ = engine_run([(0.0, 10, 10)], {**spec, "stalls": [{"at_s": 0.05, "duration_s": 0.5}]})
    assert first[0] == pytest.approx(0.011, abs=1e-12)
    assert end[0] == pytest.approx(0.110 + 0.5, abs=1e-12)
    # A stall before the request arrives changes nothing; one at its first step delays the first token.
    first, end, _ = engine_run([(1.0, 10, 10)], {**spec, "stalls": [{"at_s": 0.2, "duration_s": 0.5}]})
    assert end[0] == pytest.approx(1.110, abs=1e-12)
    first, end, _ = engine_run([(1.0, 10, 10)], {**spec, "stalls": [{"at_s": 1.0, "duration_s": 0.25}]})
    assert first[0] == pytest.approx(1.261, abs=1e-12) and end[0] == pytest.approx(1.360, abs=1e-12)


def test_per_step_noise_has_the_gamma_distribution_of_step_sums():
    """The decode time of a lone request over 40 steps, across seeds, against independent gamma draws."""
    from scipy import stats

    cv, steps, s = 0.3, 40, 0.011
    spec = {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 0.0, "noise_cv": cv}
    sums = []
    for seed in range(400):
        first, end, _ = engine_run([(0.0, 10, steps + 1)], spec, seed=seed)
        sums.append(end[0] - first[0])
    shape = 1 / cv ** 2
    ref = np.random.default_rng(123).gamma(shape, s / shape, (4000, steps)).sum(axis=1)
    assert stats.ks_2samp(sums, ref).pvalue > 1e-3
    # The step noise averages over the stretch: its cv is cv / sqrt(steps), not cv (as one draw per stretch was).
    assert np.std(sums) / np.mean(sums) == pytest.approx(cv / math.sqrt(steps), rel=0.15)


def test_noise_blocks_are_one_stream_whatever_the_stretch_lengths():
    """Refilling the block keeps the unread tail: step k always gets the k-th draw of the stream."""
    rng = np.random.default_rng(5)
    noise = StepNoise(0.2, np.random.default_rng(5))
    expected = rng.gamma(25.0, 1 / 25.0, 40_000)
    position = 0
    for n in [3, 5000, 4096, 1, 4000, 4095, 4096, 2, 4096, 4096]:
        at = noise.window(position, n)
        got = np.diff(np.asarray(noise.cum)[at:at + n + 1])
        np.testing.assert_allclose(got, expected[position:position + n], rtol=1e-9)
        position += n


def test_slow_episodes_take_their_share_of_time_and_map_back_and_forth():
    spec = SlowEpisodes(multiplier=3.0, mean_duration_s=2.0, mean_interval_s=6.0)
    episodes = SlowTime(spec, np.random.default_rng(3))
    horizon = 200_000.0
    work = episodes.work(0.0, horizon)
    # Slow a quarter of the time at a third of the speed: 0.75 + 0.25 / 3 of normal progress.
    assert work / horizon == pytest.approx(spec.capacity_factor(), rel=0.02)
    for t0, w in [(0.0, 1.0), (17.3, 40.0), (1000.0, 0.001)]:
        assert episodes.work(t0, episodes.wall(t0, w)) == pytest.approx(w, rel=1e-12)


def test_offered_utilisation_counts_the_context_terms_and_slow_episodes():
    """Offered (from the config) and measured (work done) utilisation agree with every v2 term on."""
    import sim

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    st = "models.llama8b.engine.step_time"
    summary = sim.run(root / "workloads/chat-selfhosted.yaml", replications=4, overrides=[
        "traffic.rate_scale=3", "simulation.duration_s=1200",
        f"{st}.per_decode_seq_s=0.00002", f"{st}.per_kv_token_s=4e-8", f"{st}.per_prefill_attention_s=1e-9",
        f"{st}.noise_cv=0.2",
        f"{st}.slow_episodes={{multiplier: 1.5, mean_duration_s: 3, mean_interval_s: 20}}"]).summary
    low, high = summary["utilisation_llama8b_ci95_low"], summary["utilisation_llama8b_ci95_high"]
    offered = summary["offered_utilisation_llama8b"]
    assert low <= offered <= high
    # Each term moves it: without them the same traffic offers clearly less.
    plain = sim.run(root / "workloads/chat-selfhosted.yaml", replications=1, overrides=[
        "traffic.rate_scale=3", "simulation.duration_s=200", f"{st}.per_decode_seq_s=0.00002",
        f"{st}.per_kv_token_s=0", f"{st}.per_prefill_attention_s=0"]).summary
    assert offered > 1.2 * plain["offered_utilisation_llama8b"]
