"""The compiled engine replica (sim/_engine.c, engine.CompiledReplica) gives EngineReplica's results to the bit.

Both run on the event path; the Python one is the reference. Compared: every request and call record, every
monitor sample and gauge, every summary metric, on the shipped workloads with engines on the event path, on
variants that cancel running calls by the hundred, and on workloads Hypothesis makes around every branch of
the replica (chunked prefill, noise, context and attention terms, KV capacity, handshakes, cold starts, an
autoscaler draining replicas, scaling to zero, calibrated ranges, deadlines, closed loops, guardrails
cancelling calls)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fastpath import arrivals, engine_models, tokens

from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload
from sim.metrics.recorder import Recorder
from sim.metrics.summary import summarise
from sim.model.fastpath import has_engine
from sim.model.kernels import not_built
from sim.model.pipeline import simulate
from sim.model.serving import engine

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("cls", "endpoint", "arrival", "admit", "first_token", "end", "prompt", "output", "replica", "outcome",
           "user", "feature", "samples", "gauges", "generated")


def test_the_compiled_replica_is_built_here():
    # CI installs the package from scratch on a machine with a C compiler: the replica must be there, or the
    # event path silently runs its (correct, slower) Python engine.
    assert engine._engine is not None


def _same(python: Recorder, compiled: Recorder, what: str) -> None:
    for column in COLUMNS:
        a, b = getattr(python, column), getattr(compiled, column)
        assert len(a) == len(b), f"{what}.{column}"
        if isinstance(a, dict):
            assert a == b, f"{what}.{column}"
            continue
        for j, (x, y) in enumerate(zip(a, b)):
            # == on floats is bit equality here (NaN: both NaN, the records' "not yet")
            assert x == y or (x != x and y != y), f"{what}.{column}[{j}]: Python {x!r}, compiled {y!r}"


def same_results(workload: Workload, monkeypatch, replication: int = 0) -> Recorder:
    compiled = simulate(workload, replication)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "_engine", None)
        python = simulate(workload, replication)
    _same(python, compiled, "requests")
    if python.calls is not None:
        _same(python.calls, compiled.calls, "calls")
        assert python.calls.cached_tokens == compiled.calls.cached_tokens or (
            python.calls.cached_tokens.read == compiled.calls.cached_tokens.read
            and python.calls.cached_tokens.written == compiled.calls.cached_tokens.written)
    missing = [not_built(["engine replica (sim/_engine.c)"])] * has_engine(workload)
    assert sorted(python.warnings) == sorted(missing + compiled.warnings)
    warmup = workload.simulation.warmup_s if isinstance(workload.simulation.warmup_s, float) else 0.0
    ms, mc = summarise(python, workload, warmup), summarise(compiled, workload, warmup)
    assert ms.keys() == mc.keys()
    assert all(ms[k] == mc[k] or (math.isnan(ms[k]) and math.isnan(mc[k])) for k in ms)
    return compiled


def shipped(name: str, overrides: list[str] = ()) -> Workload:
    try:
        return load_workload(ROOT / "workloads" / name, list(overrides))
    except ConfigError as err:  # a trace replay without ../shared/data (a fresh clone)
        pytest.skip(str(err))


SHIPPED = [
    ("rag-support.yaml", ["simulation.duration_s=900"]),
    # calls cancelled by the hundred (first-token timeouts at 3x load), with prompt caches and a full KV cache
    ("rag-support.yaml", ["simulation.duration_s=600", "traffic.rate_scale=3",
                          "pipeline.guardrails.first_token_timeout_s=0.5",
                          "models.llama8b.engine.kv_cache_tokens=60000"]),
    ("launch-spike.yaml", ["simulation.duration_s=900"]),
    ("noisy-neighbor.yaml", ["simulation.duration_s=600"]),
    ("mooncake-replay.yaml", []),
]


@pytest.mark.parametrize("name, overrides", SHIPPED, ids=lambda v: v if isinstance(v, str) else "")
def test_shipped_workloads_give_the_python_engines_results(name, overrides, monkeypatch):
    workload = shipped(name, overrides)
    assert any(getattr(m, "engine", None) is not None for m in workload.models.values())
    rec = same_results(workload, monkeypatch)
    calls = rec.calls if rec.calls is not None else rec
    assert len(calls.arrival) > 1000


def test_the_cancelling_variant_cancels(monkeypatch):
    """The variant above is meant to cancel running calls: it does (else the comparison proves little)."""
    rec = simulate(shipped(*SHIPPED[1]))
    assert sum(1 for tokens in rec.calls.generated.values() if tokens > 0) > 100


@st.composite
def event_path_engines(draw) -> Workload:
    """An engine endpoint on the event path, with what only the event path has drawn in or out."""
    model = draw(engine_models())
    if draw(st.booleans()):
        model["engine"]["step_time"]["calibrated"] = {"decode_seqs_max": draw(st.integers(0, 8)), "kv_tokens_max": 2000}
    if draw(st.booleans()):
        model["connections"] = {"pool_size": draw(st.integers(1, 6)), "handshake_s": draw(st.floats(0.0, 0.3))}
    if draw(st.integers(0, 3)) == 0:  # idle endpoints stop every replica; the next request starts them again
        model["scale_to_zero"] = {"idle_s": draw(st.floats(0.5, 20.0)), "cold_start_s": draw(st.floats(0.0, 5.0))}
    if draw(st.booleans()):
        model["cold_start_s"] = draw(st.floats(0.0, 20.0))
        model["autoscale"] = {"min_replicas": 1, "max_replicas": draw(st.integers(model["replicas"], 4)),
                              "target": draw(st.floats(0.2, 0.9)), "interval_s": draw(st.floats(2.0, 20.0)),
                              "scale_down_cooldown_s": draw(st.floats(0.0, 30.0))}
    classes = {}
    for k in range(draw(st.integers(1, 2))):
        cls = {"prompt_tokens": draw(tokens), "output_tokens": draw(tokens), "endpoint": "engine"}
        if draw(st.integers(0, 3)) == 0:
            cls["arrival"] = {"kind": "closed", "users": draw(st.integers(1, 12)),
                              "think_time_s": draw(st.floats(0.1, 5.0))}
        else:
            cls["arrival"] = draw(arrivals)
            if draw(st.booleans()):
                cls["deadline_s"] = draw(st.floats(0.05, 5.0))
        classes[f"c{k}"] = cls
    pipeline = None
    if draw(st.booleans()):  # a pipeline whose guardrails cancel running calls
        pipeline = {"guardrails": {
            "first_token_timeout_s": draw(st.floats(0.01, 2.0)), "call_timeout_s": draw(st.floats(0.05, 10.0)),
            "max_time_s": draw(st.floats(0.1, 20.0)), "retry": {"max_attempts": 2, "backoff_s": 0.1}}}
        for cls in classes.values():
            cls.pop("deadline_s", None)
    duration = draw(st.floats(30.0, 240.0))
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": draw(st.floats(0.0, duration / 2)), "fast_path": False,
                       "seed": draw(st.integers(0, 2**31)), "timeseries_interval_s": draw(st.floats(1.0, 60.0))},
        "traffic": {"classes": classes, "rate_scale": draw(st.floats(0.5, 2.0))},
        "models": {"engine": model}, **({"pipeline": pipeline} if pipeline else {})})


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(event_path_engines())
def test_generated_engine_workloads_give_the_python_engines_results(workload):
    with pytest.MonkeyPatch.context() as monkeypatch:
        same_results(workload, monkeypatch)
