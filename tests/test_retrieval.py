"""Retrieval: hand-computed latencies with constant times (batching, parallel and serial hops, first k),
backend queueing, caches skipping work, M/M/1 against theory, reproducibility and config errors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import simpy
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_theory import check

from sim.config.retrieval import BackendSpec, RetrievalSpec, StageSpec
from sim.model.application import retrieval as retrieval_module
from sim.model.application.caches import HIT, MISS
from sim.model.application.retrieval import NOT_LOOKED_UP, Backend, Retrieval
from sim.model.events import call_later
from sim.model.streams import Streams


def spec(text: str) -> RetrievalSpec:
    return RetrievalSpec.model_validate(yaml.safe_load(text))


def simulate(retrieval_spec: RetrievalSpec, arrivals: list[float], seed: int = 1, until: float | None = None):
    """Request i starts its retrieval at arrivals[i]; returns the Retrieval and the time each request was done."""
    env = simpy.Environment()
    r = Retrieval(env, retrieval_spec, Streams(seed))
    finished: dict[int, float] = {}

    def done(i: int) -> None:
        assert r.records[-1][0] == i  # the row of request i is the last one when done(i) runs
        finished[i] = env.now

    for i, t in enumerate(arrivals):
        call_later(env, t, lambda ev: r.run(ev.value, done), i)
    env.run(until=until)
    return r, finished


BACKENDS = """
backends:
  vector: {concurrency: 16, latency_s: 0.05}
  bm25:   {concurrency: 16, latency_s: 0.03}
  sql:    {concurrency: 16, latency_s: 0.1}
"""
TWO_HOP = """
embedding: {max_batch: 32, max_wait_s: 0.01, batch_time_s: 0.02, workers: 1}
""" + BACKENDS + """
stages:
  - {hops: [vector, bm25], wait_for: all}
  - [sql]
"""


def test_deterministic_two_hop_retrieval_latency():
    # Queries at 0, 1 and 2 ms share one batch, sent at 10 ms (max_wait after the first), served for 20 ms:
    # all embedded at 30 ms. Stage 1 (parallel) takes max(50, 30) ms, stage 2 (after it) 100 ms: end 180 ms.
    r, finished = simulate(spec(TWO_HOP), [0.0, 0.001, 0.002])
    assert finished == pytest.approx({0: 0.18, 1: 0.18, 2: 0.18})
    cols = r.columns()
    assert cols["request"].tolist() == [0, 1, 2]
    assert cols["retrieval_s"] == pytest.approx([0.18, 0.179, 0.178])
    assert cols["embedding_wait_s"] == pytest.approx([0.01, 0.009, 0.008])
    assert cols["embedding_s"] == pytest.approx([0.02] * 3)
    assert cols["stage0_s"] == pytest.approx([0.05] * 3)
    assert cols["stage1_s"] == pytest.approx([0.1] * 3)
    assert (cols["retrieval_cache_code"] == NOT_LOOKED_UP).all()
    stats = r.stats(r.env.now)
    assert stats["embedding_batches"] == 1 and stats["embedding_batch_size_mean"] == 3
    assert stats["backend_sql_hops"] == 3 and stats["backend_sql_wait_mean_s"] == 0


@pytest.mark.parametrize("stage, expected", [
    ("{hops: [vector, bm25, sql], wait_for: first_k, k: 1}", 0.03),   # the fastest
    ("{hops: [vector, bm25, sql], wait_for: first_k, k: 2}", 0.05),   # the 2nd smallest
    ("{hops: [vector, bm25, sql], wait_for: all}", 0.1),              # the largest
    ("{hops: [sql, sql], wait_for: first_k, k: 2}", 0.1),             # one backend twice
])
def test_parallel_stage_waits_for_the_kth_smallest(stage, expected):
    r, finished = simulate(spec(BACKENDS + f"stages:\n  - {stage}\n"), [0.5])
    assert finished[0] == pytest.approx(0.5 + expected)


def test_serial_stages_add_up():
    r, finished = simulate(spec(BACKENDS + "stages: [vector, bm25, sql, [vector, bm25]]\n"), [0.0])
    assert finished[0] == pytest.approx(0.05 + 0.03 + 0.1 + max(0.05, 0.03))
    assert r.columns()["stage3_s"] == pytest.approx([0.05])


def embedding_only(max_batch: int, workers: int, per_query: float = 0.0) -> RetrievalSpec:
    return spec(f"""
embedding:
  {{max_batch: {max_batch}, max_wait_s: 0.01, batch_time_s: 0.02, per_query_s: {per_query}, workers: {workers}}}
backends: {{noop: {{concurrency: 1000, latency_s: 0}}}}
stages: [noop]
""")


def test_a_full_batch_is_sent_at_once_and_the_next_query_opens_a_new_batch():
    # 33 queries at t=0: the first 32 fill a batch, sent at once, done at 0.02; the 33rd waits 0.01 alone.
    r, finished = simulate(embedding_only(32, workers=2), [0.0] * 33)
    assert [finished[i] for i in range(32)] == pytest.approx([0.02] * 32)
    assert finished[32] == pytest.approx(0.03)
    assert r.embedding.batches == 2 and r.embedding.queries == 33
    # With one worker the second batch, sent at 0.01, waits for the first to end at 0.02.
    r, finished = simulate(embedding_only(32, workers=1), [0.0] * 33)
    assert finished[32] == pytest.approx(0.04)
    assert r.columns()["embedding_wait_s"][-1] == pytest.approx(0.02)


def test_batch_time_grows_per_query_and_a_late_query_opens_a_new_batch():
    # Batch of 2 (t=0, 0.005) sent at 0.01 and served 0.02 + 2 * 0.001; a query at 0.011 opens the next one.
    r, finished = simulate(embedding_only(32, workers=4, per_query=0.001), [0.0, 0.005, 0.011])
    assert finished[0] == pytest.approx(0.032) and finished[1] == pytest.approx(0.032)
    assert finished[2] == pytest.approx(0.011 + 0.01 + 0.021)
    # max_batch 1: no batching delay at all.
    r, finished = simulate(embedding_only(1, workers=4), [0.0, 0.005])
    assert finished == pytest.approx({0: 0.02, 1: 0.025})


ONE_BACKEND = """
backends: {{db: {{concurrency: {c}, latency_s: {latency}}}}}
stages: [db]
"""


def test_backend_of_concurrency_one_serialises_exactly():
    r, finished = simulate(spec(ONE_BACKEND.format(c=1, latency=0.1)), [0.0] * 5)
    assert [finished[i] for i in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    db = r.backends["db"]
    assert db.hops == 5 and db.wait_sum == pytest.approx(0.1 + 0.2 + 0.3 + 0.4)
    assert db.utilisation(0.5) == pytest.approx(1.0)
    r, finished = simulate(spec(ONE_BACKEND.format(c=2, latency=0.1)), [0.0] * 5)
    assert [finished[i] for i in range(5)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3])
    assert r.backends["db"].utilisation(0.3) == pytest.approx(5 * 0.1 / (2 * 0.3))


def test_hops_left_over_by_first_k_still_hold_their_slot():
    # slow (concurrency 1, 0.1 s) and fast (0.01 s), first 1: each request is done by the fast hop, but the
    # slow hops queue behind each other; a third request's slow hop starts only at 0.2.
    text = """
backends:
  slow: {concurrency: 1, latency_s: 0.1}
  fast: {concurrency: 8, latency_s: 0.01}
stages: [{hops: [slow, fast], wait_for: first_k, k: 1}, [slow]]
"""
    r, finished = simulate(spec(text), [0.0, 0.0])
    # Request 0: fast at 0.01, then its stage-2 slow hop queues behind both stage-1 slow hops (0.1, 0.2): 0.3.
    # Request 1: fast at 0.01, its slow hop behind request 0's: 0.4.
    assert finished == pytest.approx({0: 0.3, 1: 0.4})
    assert r.backends["slow"].hops == 4


CACHED = """
cache: {{capacity: 10, keys: {{universe: 1}}, hit_latency_s: 0.002, miss_latency_s: 0.001{ttl}}}
embedding:
  max_batch: 8
  max_wait_s: 0.01
  batch_time_s: 0.02
  cache: {{capacity: 10, keys: {{universe: 1}}, hit_latency_s: 0.003, miss_latency_s: 0.004}}
backends: {{db: {{concurrency: 4, latency_s: 0.05}}}}
stages: [db]
"""


def test_retrieval_cache_hit_skips_embedding_and_hops():
    # One key: the first request misses (0.001 + 0.004 + 0.01 + 0.02 + 0.05), the second, later, hits.
    r, finished = simulate(spec(CACHED.format(ttl="")), [0.0, 1.0])
    assert finished[0] == pytest.approx(0.085)
    assert finished[1] == pytest.approx(1.002)
    cols = r.columns()
    assert cols["retrieval_cache_code"].tolist() == [MISS, HIT]
    assert cols["embedding_cache_code"].tolist() == [MISS, NOT_LOOKED_UP]
    assert math.isnan(cols["embedding_s"][1]) and math.isnan(cols["stage0_s"][1])
    assert r.backends["db"].hops == 1 and r.embedding.batches == 1
    assert r.stats(2.0)["retrieval_cache_hit_rate"] == 0.5


def test_embedding_cache_hit_skips_the_embedding_service():
    # The retrieval entry expires (ttl 0.5 s) but the embedding does not: the same query, embedded once.
    r, finished = simulate(spec(CACHED.format(ttl=", ttl_s: 0.5")), [0.0, 1.0])
    assert finished[1] == pytest.approx(1.0 + 0.001 + 0.003 + 0.05)
    cols = r.columns()
    assert cols["retrieval_cache_code"].tolist() == [MISS, MISS]
    assert cols["embedding_cache_code"].tolist() == [MISS, HIT]
    assert r.embedding.batches == 1 and r.backends["db"].hops == 2


def test_retrieve_more_runs_the_escalation_stages_only():
    text = CACHED.format(ttl="").replace("stages: [db]", "stages: [db]\nescalation_stages: [[db, db]]")
    env = simpy.Environment()
    r = Retrieval(env, spec(text), Streams(3))
    finished = {}
    call_later(env, 2.0, lambda ev: r.retrieve_more(7, lambda i: finished.setdefault(i, env.now)))
    env.run()
    assert finished == pytest.approx({7: 2.05})
    row = r.records[-1]
    assert row[0] == 7 and row[8] is True and row[5] == NOT_LOOKED_UP and r.embedding.batches == 0
    assert r.backends["db"].hops == 2 and r.in_flight == 0


def poisson_mm1(seed: int, rate: float, mean_service: float, n: int, warmup: int) -> float:
    """Mean sojourn time of the requests after the warm-up at one backend of concurrency 1."""
    text = f"""
backends: {{db: {{concurrency: 1, latency_s: {{kind: exponential, mean: {mean_service}}}}}}}
stages: [db]
"""
    gaps = np.random.default_rng([seed, 99]).exponential(1 / rate, n)
    r, _ = simulate(spec(text), np.cumsum(gaps).tolist(), seed=seed)
    cols = r.columns()
    keep = cols["request"] >= warmup
    return float(cols["retrieval_s"][keep].mean())


def test_one_backend_under_poisson_load_is_mm1():
    # lambda = 60/s, mu = 100/s: mean sojourn W = 1 / (mu - lambda) = 25 ms.
    rate, mean_service = 60.0, 0.01
    runs = [poisson_mm1(seed, rate, mean_service, 8000, 1000) for seed in range(16)]
    check(runs, 1 / (100 - rate), "M/M/1 mean sojourn (s)", max_half=0.003)


def test_same_seed_same_records_other_seed_other_records():
    text = """
cache: {capacity: 50, keys: {universe: 500, zipf_s: 0.9}, hit_latency_s: {kind: exponential, mean: 0.002}}
embedding: {max_batch: 8, max_wait_s: 0.005, batch_time_s: {kind: lognormal, median: 0.02, p95: 0.05}, workers: 2}
backends:
  vector: {concurrency: 4, latency_s: {kind: lognormal, median: 0.03, p95: 0.12}}
  bm25:   {concurrency: 8, latency_s: {kind: gamma, mean: 0.01, cv: 0.5}}
stages: [{hops: [vector, bm25], wait_for: first_k, k: 1}, [vector]]
"""
    arrivals = np.cumsum(np.random.default_rng(5).exponential(0.01, 400)).tolist()
    a, _ = simulate(spec(text), arrivals, seed=11)
    b, _ = simulate(spec(text), arrivals, seed=11)
    c, _ = simulate(spec(text), arrivals, seed=12)
    assert a.records == b.records
    assert len(a.records) == 400 and a.in_flight == 0
    assert a.records != c.records
    ca = a.columns()
    assert (ca["retrieval_cache_code"] == HIT).any() and (ca["retrieval_cache_code"] == MISS).any()


@pytest.mark.parametrize("text, message", [
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [db, [db, sq]]",
     "stages[1].hops[1]: unknown backend 'sq' (backends: db)"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [db]\nescalation_stages: [dbx]",
     "escalation_stages[0].hops[0]: unknown backend 'dbx'"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [{hops: [db, db], wait_for: first_k, k: 3}]",
     "k (3) exceeds the stage's 2 hop(s)"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [{hops: [db], wait_for: first_k}]",
     "needs k"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [{hops: [db], k: 1}]",
     "only meaningful with wait_for: first_k"),
    ("backends: {db: {concurrency: 0, latency_s: 0.1}}\nstages: [db]", "greater than or equal to 1"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: []", "at least 1 item"),
    ("embedding: {max_batch: 0}\nbackends: {db: {concurrency: 1, latency_s: 0.1}}\nstages: [db]",
     "greater than or equal to 1"),
    ("backends: {db: {concurrency: 1, latency_s: 0.1, timeout: 3}}\nstages: [db]", "Extra inputs"),
])
def test_config_errors(text, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        spec(text)


def test_stage_shorthands():
    s = spec("backends: {a: {concurrency: 1, latency_s: 0.1}, b: {concurrency: 1, latency_s: 0.1}}\n"
             "stages: [a, [a, b], {hops: [a, b], wait_for: first_k, k: 1}]")
    assert [(st.hops, st.need) for st in s.stages] == [(["a"], 1), (["a", "b"], 2), (["a", "b"], 1)]
    r = Retrieval(simpy.Environment(), s, Streams(0))
    with pytest.raises(ValueError, match="unknown backend 'c'"):
        r.compile([StageSpec(hops=["c"])])


# ------------------------------------------------------------------ fresh backends bypass the cache

def test_a_fresh_backend_runs_even_on_a_retrieval_cache_hit():
    # As test_retrieval_cache_hit_skips_embedding_and_hops, but db's data is live: the hit (2 ms) returns
    # the cached context, then db is asked anew (50 ms); the embedding is still skipped.
    text = CACHED.format(ttl="").replace("latency_s: 0.05}", "latency_s: 0.05, fresh: true}")
    r, finished = simulate(spec(text), [0.0, 1.0])
    assert finished == pytest.approx({0: 0.085, 1: 1.052})
    cols = r.columns()
    assert cols["retrieval_cache_code"].tolist() == [MISS, HIT]
    assert cols["embedding_cache_code"].tolist() == [MISS, NOT_LOOKED_UP] and r.embedding.batches == 1
    assert cols["stage0_s"] == pytest.approx([0.05, 0.05]) and r.backends["db"].hops == 2
    # Two stages, the first cached: on a hit it takes no time, the fresh one keeps its number.
    two = text.replace("stages: [db]", "stages: [slow, db]").replace(
        "backends: {", "backends: {slow: {concurrency: 4, latency_s: 0.5}, ")
    r, finished = simulate(spec(two), [0.0, 1.0])
    assert finished == pytest.approx({0: 0.585, 1: 1.052})
    cols = r.columns()
    assert cols["stage0_s"] == pytest.approx([0.5, 0.0]) and cols["stage1_s"] == pytest.approx([0.05, 0.05])
    assert r.backends["slow"].hops == 1 and r.backends["db"].hops == 2


def test_a_hit_keeps_the_fresh_hops_of_each_stage():
    s = spec("""
backends:
  vector: {concurrency: 1, latency_s: 0.1}
  sql:    {concurrency: 1, latency_s: 0.1, fresh: true}
  rest:   {concurrency: 1, latency_s: 0.1, fresh: true}
stages:
  - {hops: [vector, sql, rest], wait_for: first_k, k: 1}
  - [vector]
  - {hops: [sql, rest, vector], wait_for: all}
""")
    r = Retrieval(simpy.Environment(), s, Streams(0))
    b = r.backends
    # Stage 1 keeps sql and rest, waiting for one; stage 2 has nothing fresh (it stays, empty, so that stage 3
    # keeps its number); stage 3 waits for both. Nothing fresh at the end: nothing left to run.
    assert r.fresh_plan(r.plan) == (((b["sql"], b["rest"]), 1), ((), 0), ((b["sql"], b["rest"]), 2))
    assert r.fresh_plan(r.plan) is r.fresh_plan(r.plan)  # compiled once per plan
    assert r.fresh_plan(r.compile([StageSpec(hops=["vector"]), StageSpec(hops=["sql"]),
                                   StageSpec(hops=["vector"])])) == (((), 0), ((b["sql"],), 1))
    assert r.fresh_plan(r.compile([StageSpec(hops=["vector"])])) == ()


def test_a_fresh_backends_utilisation_is_the_same_with_and_without_a_retrieval_cache():
    # Every retrieval asks the fresh sql backend, hit or miss: the same hops, and since the n-th hop to a
    # backend takes its n-th latency draw, the same busy time, to the last bit. The cached vector search
    # is asked only on misses: its utilisation falls.
    body = """
backends:
  vector: {concurrency: 4, latency_s: {kind: exponential, mean: 0.05}}
  sql:    {concurrency: 2, latency_s: {kind: exponential, mean: 0.02}, fresh: true}
stages: [vector, sql]
"""
    cached = "cache: {capacity: 100, keys: {universe: 500, zipf_s: 0.9}, hit_latency_s: 0.001}\n" + body
    arrivals = np.cumsum(np.random.default_rng(8).exponential(1 / 40, 4_000)).tolist()
    plain, _ = simulate(spec(body), arrivals, seed=4)
    hit, _ = simulate(spec(cached), arrivals, seed=4)
    end = max(plain.env.now, hit.env.now) + 1.0  # both idle by then: one window for both
    assert (hit.columns()["retrieval_cache_code"] == HIT).mean() > 0.3
    assert hit.backends["sql"].hops == plain.backends["sql"].hops == 4_000
    assert hit.backends["sql"].utilisation(end) == plain.backends["sql"].utilisation(end)
    assert hit.backends["vector"].utilisation(end) < 0.7 * plain.backends["vector"].utilisation(end)


def test_in_the_pipeline_a_fresh_backends_utilisation_ignores_the_retrieval_cache():
    # rag-support with its orders lookup marked fresh, with and without a retrieval cache: every first
    # retrieval still asks orders_sql, so its hops and utilisation stay; the cached vector search's fall.
    # (Not to the bit: the stats span the whole run, which ends with its last event, seconds apart.)
    import sim
    from sim.model.pipeline import simulate

    base = ["simulation.duration_s=300", "pipeline.retrieval.backends.orders_sql.fresh=true"]
    cache = "pipeline.retrieval.cache={capacity: 50000, ttl_s: 600, keys: {universe: 200000, zipf_s: 0.9}}"
    path = Path(__file__).resolve().parent.parent / "workloads" / "rag-support.yaml"
    without = simulate(sim.load_workload(path, base)).retrieval_stats
    cached = simulate(sim.load_workload(path, base + [cache])).retrieval_stats
    assert cached["retrieval_cache_hit_rate"] > 0.2
    assert cached["backend_orders_sql_hops"] == pytest.approx(without["backend_orders_sql_hops"], rel=0.005)
    assert cached["utilisation_backend_orders_sql"] == pytest.approx(without["utilisation_backend_orders_sql"],
                                                                     rel=0.02)
    assert cached["backend_vector_hops"] < 0.85 * without["backend_vector_hops"]
    assert cached["utilisation_backend_vector"] < 0.85 * without["utilisation_backend_vector"]


COMPILED = pytest.mark.skipif(retrieval_module._retrieval is None,
                              reason="sim/_retrieval.c not built (or LLMSIM_PURE_PYTHON set)")


@COMPILED
@settings(max_examples=80, deadline=None)
@given(concurrency=st.integers(1, 6), gaps=st.lists(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3]), max_size=120),
       reset=st.integers(0, 120), seed=st.integers(0, 2**32 - 1))
def test_the_compiled_backend_returns_hops_when_the_python_one_does(concurrency, gaps, reset, seed):
    """FifoClock (sim/_kernels.c) against Backend: every hop's return time, the slots' heap in its order, the
    counters and the reports (waits, utilisation, a counter reset mid-run), to the bit; ties included."""
    env = simpy.Environment()
    backend_spec = BackendSpec(concurrency=concurrency, latency_s={"kind": "lognormal", "median": 0.02, "p95": 0.2})
    python = Backend(env, "db", backend_spec, np.random.default_rng(seed))
    compiled = retrieval_module.CompiledBackend(env, "db", backend_spec, np.random.default_rng(seed))
    now = 0.0
    for k, gap in enumerate(gaps):
        now += gap
        assert compiled.submit(now) == python.submit(now)
        assert compiled._free == python._free
        if k == reset:
            compiled.reset_counters(now)
            python.reset_counters(now)
    assert (compiled.hops, compiled.wait_sum, compiled._busy) == (python.hops, python.wait_sum, python._busy)
    later = now + 0.05
    a, b = compiled.stats(later, "db"), python.stats(later, "db")
    assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@st.composite
def retrieval_specs(draw) -> RetrievalSpec:
    """Retrieval specs over everything the stage loop meets: serial and parallel stages waiting for all or the
    first k, a backend twice in a stage, fresh backends behind a retrieval cache (empty stages on a hit),
    batched embedding with its cache, priced hops (metered usage), queueing at small concurrencies."""
    names = ["vector", "bm25", "sql"]
    backends = {name: {"concurrency": draw(st.integers(1, 4)),
                       "latency_s": draw(st.sampled_from([0.0, 0.02, {"kind": "exponential", "mean": 0.03},
                                                          {"kind": "lognormal", "median": 0.02, "p95": 0.1}])),
                       "fresh": draw(st.booleans()), "price_per_query_usd": draw(st.sampled_from([0.0, 1e-4]))}
                for name in names}
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        hops = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3))
        k = draw(st.integers(1, len(hops)))
        stages.append({"hops": hops, "wait_for": "all"} if k == len(hops) else
                      {"hops": hops, "wait_for": "first_k", "k": k})
    text = {"backends": backends, "stages": stages}
    cache = {"capacity": 50, "ttl_s": 5.0, "keys": {"universe": 80, "zipf_s": 1.0}, "hit_latency_s": 0.001,
             "miss_latency_s": draw(st.sampled_from([0.0, 0.002]))}
    if draw(st.booleans()):
        text["cache"] = cache
    if draw(st.booleans()):
        text["embedding"] = {"max_batch": draw(st.integers(1, 4)), "max_wait_s": 0.005, "batch_time_s": 0.01,
                             "per_query_s": 0.001, "workers": draw(st.integers(1, 2))}
        if draw(st.booleans()):
            text["embedding"]["cache"] = dict(cache, hit_latency_s=draw(st.sampled_from([0.0, 0.001])))
    return RetrievalSpec.model_validate(text)


@COMPILED
@settings(max_examples=80, deadline=None)
@given(retrieval_spec=retrieval_specs(), gaps=st.lists(st.sampled_from([0.0, 0.001, 0.004, 0.02]), max_size=60),
       escalations=st.sets(st.integers(0, 59)), seed=st.integers(0, 2**16))
def test_the_compiled_stages_give_the_python_records(retrieval_spec, gaps, escalations, seed):
    """CompiledRetrieval (sim/_retrieval.c: caches and embedding on the way in, the stage loop, the jobs)
    against Retrieval: every finished retrieval's row and when its done(i) ran, the events scheduled, the
    metered usage and every counter, to the bit; retrieve_more included."""
    def run(kind):
        env = simpy.Environment()
        r = kind(env, retrieval_spec, Streams(seed))
        finished = []
        now = 0.0
        for i, gap in enumerate(gaps):
            now += gap
            start = r.retrieve_more if i in escalations else r.run
            call_later(env, now, lambda ev, start=start: start(ev.value, lambda j: finished.append((j, env.now))), i)
        env.run()
        return r, finished + [("events scheduled", next(env._eid))]

    (python, done_python), (compiled, done_compiled) = run(Retrieval), run(retrieval_module.CompiledRetrieval)
    assert done_compiled == done_python and len(done_python) == len(gaps) + 1
    assert repr(compiled.records) == repr([(i, float(start), *rest) for i, start, *rest in python.records])
    assert compiled.usage.values().tolist() == python.usage.values().tolist()
    assert compiled.metered == python.metered and compiled.in_flight == python.in_flight == 0
    a, b = compiled.stats(compiled.env.now), python.stats(python.env.now)
    assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("kind", ["Retrieval", "CompiledRetrieval"])
def test_an_in_process_embedding_cache_costs_no_event(kind):
    """A hit in an embedding cache of latency 0 goes straight to the stages: 20 retrievals of 3 queries, 17 of
    them hits, schedule 20 arrivals + 3 batch timeouts + 3 batches + 20 stages = 46 events, not 17 more."""
    if not hasattr(retrieval_module, kind):
        pytest.skip("sim/_retrieval.c not built (or LLMSIM_PURE_PYTHON set)")
    env = simpy.Environment()
    r = getattr(retrieval_module, kind)(env, spec("""
embedding: {max_batch: 4, max_wait_s: 0.005, batch_time_s: 0.01, workers: 1,
            cache: {capacity: 50, keys: {universe: 3, zipf_s: 1.0}, hit_latency_s: 0.0, miss_latency_s: 0.0}}
backends: {vector: {concurrency: 2, latency_s: 0.02}}
stages: [vector]
"""), Streams(1))
    for i in range(20):
        call_later(env, i * 0.1, lambda ev: r.run(ev.value, lambda j: None), i)
    env.run()
    assert r.embedding_cache.hits == 17 and r.embedding.batches == 3
    assert next(env._eid) == 46
