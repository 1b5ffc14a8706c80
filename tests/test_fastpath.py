"""The fast path (sim/model/fastpath.py) gives the event path's results to the bit: every record, every
monitor sample and gauge, so every summary metric. Checked on every eligible shipped workload and on
workloads Hypothesis makes (arrival kinds, classes, mixes, features, users, distributions, servers and
slots; engine replicas with every step-time term, noise, KV capacity and chunked prefill); it found
that scheduling at now + (t - now) may miss a planned time t by an ulp (events.call_at schedules at t)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config.loader import ConfigError, load_workload
from sim.config.schema import Workload
from sim.metrics.summary import summarise
from sim.model import fastpath
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("cls", "endpoint", "arrival", "admit", "first_token", "end", "prompt", "output", "replica", "outcome",
           "user", "feature", "samples", "gauges")


def events(workload: Workload) -> Workload:
    return workload.model_copy(update={"simulation": workload.simulation.model_copy(update={"fast_path": False})})


def same_records(workload: Workload, replication: int = 0) -> None:
    assert fastpath.eligible(workload) and not fastpath.eligible(events(workload))
    reference, fast = simulate(events(workload), replication), simulate(workload, replication)
    for column in COLUMNS:
        a, b = getattr(reference, column), getattr(fast, column)
        assert len(a) == len(b), column
        for j, (x, y) in enumerate(zip(a, b)):
            # == on floats is bit equality here (NaN: both NaN, the records' "not yet")
            assert x == y or (x != x and y != y), f"{column}[{j}]: events {x!r}, fast path {y!r}"
    warmup = workload.simulation.warmup_s if isinstance(workload.simulation.warmup_s, float) else 0.0
    ms, mf = summarise(reference, workload, warmup), summarise(fast, workload, warmup)
    assert ms.keys() == mf.keys()
    assert all(ms[k] == mf[k] or (math.isnan(ms[k]) and math.isnan(mf[k])) for k in ms)


def eligible_file(path: Path) -> bool:
    try:
        return fastpath.eligible(load_workload(path))
    except ConfigError:  # a trace replay without ../shared/data (a fresh clone): a trace is not Poisson anyway
        return False


ELIGIBLE = [p for p in sorted((ROOT / "workloads").glob("*.yaml")) if eligible_file(p)]


def test_the_eligible_shipped_workloads_are_the_plain_ones():
    replay = {"azure-conv-replay.yaml"} if eligible_file(ROOT / "workloads" / "azure-conv-replay.yaml") else set()
    assert {p.name for p in ELIGIBLE} == {"mmc.yaml", "chat-api.yaml", "chat-selfhosted.yaml", "llama70b-h100.yaml",
                                          "noisy-neighbor-unprotected.yaml"} | replay


@pytest.mark.parametrize("path", ELIGIBLE, ids=lambda p: p.name)
def test_every_eligible_shipped_workload_gives_the_event_paths_records(path):
    same_records(load_workload(path), replication=1)


def test_what_needs_events_stays_on_the_event_path():
    base = load_workload(ROOT / "workloads" / "mmc.yaml").model_dump(mode="json", exclude_none=True)
    cls = base["traffic"]["classes"]["jobs"]
    changes = [
        {"rate_limits": [{"kind": "token_bucket", "rate_rps": 1, "burst": 1}]},
        {"traffic": {"classes": {"jobs": {**cls, "deadline_s": 5.0}}}},
        {"traffic": {"classes": {"jobs": {**cls, "arrival": {"kind": "closed", "users": 5,
                                                             "think_time_s": 1.0}}}}},
        {"models": {"server": {**base["models"]["server"], "queue": {"capacity": 10}}}},
        {"pipeline": {"post_processing_s": 0.01}},
        {"simulation": {**base["simulation"], "fast_path": False}},
    ]
    for change in changes:
        assert not fastpath.eligible(Workload.model_validate({**base, **change})), change


def test_engines_that_need_events_stay_on_the_event_path():
    path = ROOT / "workloads" / "chat-selfhosted.yaml"
    at = "models.llama8b"
    changes = [
        f"{at}.cold_start_s=30",
        f"{at}.autoscale={{min_replicas: 1, max_replicas: 3, target: 0.6}}",
        f"{at}.engine.prefix_cache={{blocks: 100}}",
        f"{at}.engine.step_time.slow_episodes={{mean_interval_s: 60, mean_duration_s: 5, multiplier: 2}}",
        f"{at}.engine.step_time.stalls=[{{at_s: 100, duration_s: 5}}]",
        f"{at}.engine.step_time.calibrated={{decode_seqs_max: 64}}",
    ]
    for change in changes:
        assert not fastpath.eligible(load_workload(path, [change])), change
    assert fastpath.eligible(load_workload(path, [f"{at}.cold_start_s=30", "simulation.warm=true"]))


distribution = st.one_of(
    st.floats(0.01, 2.0).map(lambda v: {"kind": "constant", "value": v}),
    st.floats(0.05, 2.0).map(lambda m: {"kind": "exponential", "mean": m}),
    st.tuples(st.floats(0.05, 1.0), st.floats(1.5, 5.0)).map(
        lambda mp: {"kind": "lognormal", "median": mp[0], "p95": mp[0] * mp[1]}),
)
tokens = st.one_of(st.integers(1, 500), st.tuples(st.integers(10, 300), st.floats(1.5, 6.0)).map(
    lambda mp: {"kind": "lognormal", "median": mp[0], "p95": mp[0] * mp[1]}))


arrivals = st.one_of(
    st.floats(0.2, 6.0).map(lambda r: {"kind": "poisson", "rate_rps": r}),
    st.tuples(st.floats(0.2, 6.0), st.floats(0.2, 3.0)).map(
        lambda rc: {"kind": "gamma", "rate_rps": rc[0], "cv": rc[1]}),
    st.tuples(st.floats(1.0, 8.0), st.floats(0.0, 1.0), st.floats(2.0, 30.0)).map(
        lambda a: {"kind": "mmpp", "rate_on_rps": a[0], "rate_off_rps": a[1], "mean_on_s": a[2], "mean_off_s": a[2]}),
    st.tuples(st.floats(0.5, 4.0), st.floats(0.0, 4.0), st.floats(10.0, 100.0)).map(
        lambda a: {"kind": "schedule", "repeat": True,
                   "steps": [{"until_s": a[2], "rate_rps": a[0]}, {"until_s": 2 * a[2], "rate_rps": a[1]}]}),
    st.tuples(st.floats(0.1, 1.0), st.floats(1.5, 6.0), st.floats(60.0, 400.0)).map(
        lambda a: {"kind": "diurnal", "trough_rps": a[0], "peak_rps": a[1], "period_s": a[2]}),
)


def generated(draw, classes: dict, models: dict, longest: float) -> Workload:
    """A generated workload around its classes and models: the simulation block and load drawn too."""
    duration = draw(st.floats(30.0, longest))
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": draw(st.floats(0.0, duration / 2)),
                       "seed": draw(st.integers(0, 2**31)), "timeseries_interval_s": draw(st.floats(1.0, 60.0))},
        "traffic": {"classes": classes, "rate_scale": draw(st.floats(0.5, 2.0))},
        "models": models,
    })


@st.composite
def workloads(draw) -> Workload:
    models = {}
    for k in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            models[f"m{k}"] = {"kind": "self_hosted", "replicas": draw(st.integers(1, 4)),
                               "max_batch": draw(st.integers(1, 3)), "service_time": draw(distribution)}
        else:
            models[f"m{k}"] = {"kind": "api", "concurrency": draw(st.integers(1, 6)), "ttft_s": draw(distribution),
                               "output_tokens_per_s": {"kind": "normal", "mean": draw(st.floats(20, 200)), "sd": 10.0}}
    names = list(models)
    classes = {}
    for k in range(draw(st.integers(1, 3))):
        cls = {"arrival": draw(arrivals),
               "prompt_tokens": draw(tokens), "output_tokens": draw(tokens)}
        if len(names) > 1 and draw(st.booleans()):
            cls["endpoint"] = {names[0]: 0.3, names[1]: 0.7}
        else:
            cls["endpoint"] = draw(st.sampled_from(names))
        if draw(st.booleans()):
            cls["users"] = {"count": draw(st.integers(2, 50)), "zipf_s": 1.0}
        if draw(st.booleans()):
            cls["features"] = {"a": 0.5, "b": 0.5} if draw(st.booleans()) else {"solo": 1.0}
        if draw(st.booleans()):
            cls["max_output_tokens"] = draw(st.integers(1, 200))
        classes[f"c{k}"] = cls
    return generated(draw, classes, models, longest=300.0)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_generated_workloads_give_the_event_paths_records(workload):
    same_records(workload)


@st.composite
def engine_models(draw) -> dict:
    """A self-hosted engine endpoint with every step-time term maybe, per-step noise and a KV cache maybe."""
    max_batch = draw(st.integers(1, 12))
    step_time = {"base_s": draw(st.floats(0.0005, 0.02)), "per_decode_seq_s": draw(st.floats(0.0, 0.002)),
                 "per_prefill_token_s": draw(st.floats(0.0, 5e-5))}
    if draw(st.booleans()):
        step_time["per_kv_token_s"] = draw(st.floats(1e-8, 2e-6))
    if draw(st.booleans()):
        step_time["per_prefill_attention_s"] = draw(st.floats(1e-9, 1e-7))
    if draw(st.booleans()):
        step_time["noise_cv"] = draw(st.floats(0.01, 0.6))
    engine = {"max_batch_tokens": draw(st.integers(max_batch, 600)), "step_time": step_time}
    if draw(st.booleans()):
        engine["kv_cache_tokens"] = draw(st.integers(200, 5000))
    return {"kind": "self_hosted", "replicas": draw(st.integers(1, 3)), "max_batch": max_batch, "engine": engine}


@st.composite
def engine_workloads(draw) -> Workload:
    """Engine replicas exercised in every branch of the kernel: chunked prompts longer than the step's budget
    (PREFILL stretches), several prompts in one step, queueing for batch places and KV, rejections, context
    and attention terms, noise over many noise blocks, and a slot endpoint beside them."""
    models = {"engine": draw(engine_models())}
    if draw(st.booleans()):
        models["slots"] = {"kind": "self_hosted", "replicas": 1, "max_batch": 2, "service_time": draw(distribution)}
    classes = {}
    for k in range(draw(st.integers(1, 2))):
        cls = {"arrival": draw(arrivals), "prompt_tokens": draw(tokens), "output_tokens": draw(tokens)}
        cls["endpoint"] = {"engine": 0.6, "slots": 0.4} if "slots" in models and draw(st.booleans()) else "engine"
        classes[f"c{k}"] = cls
    return generated(draw, classes, models, longest=240.0)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(engine_workloads())
def test_generated_engine_workloads_give_the_event_paths_records(workload):
    same_records(workload)


def test_without_the_compiled_kernel_the_python_loop_gives_the_same_bits_and_says_so(monkeypatch):
    workload = load_workload(ROOT / "workloads" / "mmc.yaml", ["simulation.duration_s=3000", "simulation.warmup_s=100"])
    compiled = simulate(workload)
    monkeypatch.setattr(fastpath, "_kernels", None)
    python = simulate(workload)
    for column in COLUMNS:
        assert getattr(compiled, column) == getattr(python, column), column
    assert python.warnings == [fastpath.KERNEL_MISSING] and compiled.warnings == []
    same_records(workload)


ENGINE = {"kind": "self_hosted", "replicas": 2, "max_batch": 4, "engine": {
    "max_batch_tokens": 64, "kv_cache_tokens": 3000,
    "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.001, "per_prefill_token_s": 1e-4, "noise_cv": 0.2}}}
SLOTS = {"kind": "self_hosted", "replicas": 1, "max_batch": 2, "service_time": {"kind": "exponential", "mean": 0.4}}


def trace_workload(tmp_path: Path, rows: list[tuple], model: dict, poisson: bool = False) -> Workload:
    """A CSV trace (time, id, prompt, output per row), with a Poisson class beside it if asked."""
    (tmp_path / "trace.csv").write_text("ts,req,in,out\n" + "".join(f"{t},{i},{p},{o}\n" for t, i, p, o in rows))
    columns = {"time": "ts", "id": "req", "prompt_tokens": "in", "output_tokens": "out"}
    classes = {"replay": {"arrival": {"kind": "trace", "format": "csv", "path": "trace.csv", "columns": columns}}}
    if poisson:
        classes["other"] = {"arrival": {"kind": "poisson", "rate_rps": 2.0}, "prompt_tokens": 50, "output_tokens": 20}
    return Workload.model_validate({"simulation": {"duration_s": 60.0, "warmup_s": 5.0, "seed": 3},
                                    "traffic": {"classes": classes}, "models": {"m": model}},
                                   context={"base_dir": str(tmp_path)})


def test_trace_replays_run_on_the_fast_path_with_the_event_paths_records(tmp_path):
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.exponential(0.25, 200))
    rows = [(t, f"r{k}", int(rng.integers(1, 300)), int(rng.integers(1, 60))) for k, t in enumerate(times.tolist())]
    for model in (ENGINE, SLOTS):
        workload = trace_workload(tmp_path, rows, model, poisson=True)
        same_records(workload)
        reference, fast = simulate(events(workload)), simulate(workload)
        assert fast.trace_id == reference.trace_id and fast.trace_id[:3] != [None] * 3
    # Repeated times: the event path's order among equal arrivals is the trace's, as on the fast path, unless
    # an engine's wake-up or another class's arrival falls between them; so alone on slots only.
    repeated = [(round(t), name, p, o) for t, name, p, o in rows]
    same_records(trace_workload(tmp_path, repeated, SLOTS))
    assert not fastpath.eligible(trace_workload(tmp_path, repeated, ENGINE))
    assert not fastpath.eligible(trace_workload(tmp_path, repeated, SLOTS, poisson=True))


def test_without_the_compiled_kernel_engines_run_on_the_event_path_and_say_so(monkeypatch):
    workload = load_workload(ROOT / "workloads" / "chat-selfhosted.yaml", ["simulation.duration_s=300"])
    compiled = simulate(workload)
    monkeypatch.setattr(fastpath, "_kernels", None)
    assert not fastpath.eligible(workload) and fastpath.engine_without_kernel(workload)
    python = simulate(workload)
    # The kernel counts the phases it planned: the event path's boundary events (it schedules arrivals too)
    assert python.events > compiled.events + len(python.arrival) > 2 * len(python.arrival)
    for column in COLUMNS:
        assert list(getattr(compiled, column)) == list(getattr(python, column)), column
    assert python.warnings == [fastpath.ENGINE_KERNEL_MISSING] and compiled.warnings == []


def test_the_compiled_kernel_is_built_here():
    # CI installs the package from scratch on a machine with a C compiler: the kernel must be there, or the
    # fast path silently runs its (correct, slower) Python loop.
    assert fastpath._kernels is not None
