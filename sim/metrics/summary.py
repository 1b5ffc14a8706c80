"""Summaries: the flat metrics of one replication, and their intervals across replications.

Metric names are flat and carry their unit; they are the same in the run
summary, sweep results and reports (see docs/reference/metrics.md).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from sim.config.schema import Api, SelfHosted, Workload

from .flows import (
    FLOW_STAGES,
    flow_metric_names,
    flow_stage_times,
    flow_stats,
    step_times,
)
from .ledger import (
    STAGES,
    api_usd,
    batch_calls,
    batch_classes,
    billed,
    cache_columns,
    ledger,
    priced_stages,
    stage_costs,
)
from .recorder import (
    ANSWERED,
    CANCELLED,
    COMPLETED,
    EXPIRED,
    OUTCOMES,
    PARTIAL,
    QUEUE_FULL,
    RATE_LIMITED,
    REJECTED,
    TIMED_OUT,
    TRY_LATER,
    Recorder,
    time_per_output_token,
)
from .stats import mser5, t_interval

if TYPE_CHECKING:  # pandas costs 0.2 s to import: only what builds tables imports it
    import pandas as pd

MEASURES = ("queue_wait", "ttft", "e2e", "tpot")
SLO_TARGETS = (("ttft_s", "ttft"), ("e2e_s", "e2e"), ("tpot_s", "tpot"))
"""The workload's `slo` fields and the measures they bound, in the order the verdict names them."""
HOURS_PER_MONTH = 730.0
"""A month of cost per hour, as budgets read it: 8,760 hours a year / 12."""
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))


def metric_names(workload: Workload) -> list[str]:
    """The names `summarise` produces for this workload (to check names in experiments early)."""
    names = ["offered_load_rps", "warmup_s", "requests_arrived", "requests_completed", "requests_rejected",
             "requests_queue_full", "requests_expired", "throughput_rps"]
    if workload.slo is not None:
        names.append("goodput_rps")
        names += [f"slo_{name}_met_share" for field, name in SLO_TARGETS if getattr(workload.slo, field) is not None]
    for measure in MEASURES:
        names += [f"{measure}_{stat}_s" for stat in ("mean",) + tuple(p for p, _ in PERCENTILES)]
    names += ["tokens_in_per_s", "tokens_out_per_s", "itl_mean_s", "tokens_out_per_s_per_user"]
    if engine_endpoints(workload):
        names.append("tokens_out_per_s_per_gpu")
    for name in workload.models:
        names += [f"utilisation_{name}", f"batch_mean_{name}"]
    names += ["cost_total_usd", "cost_per_hour_usd", "cost_per_request_usd", "cost_per_1k_usd"]
    if priced_stages(workload) or batch_classes(workload).any():
        names += [f"cost_{stage}_usd" for stage in STAGES] + ["cost_batch_usd"]
    if batch_classes(workload).any():
        names += BATCH_METRICS
    names += [f"offered_utilisation_{name}" for name in workload.models]
    names += ["requests_rate_limited", "rate_limited_share", "retries_mean"]
    names += class_metric_names(workload)
    pipeline = getattr(workload, "pipeline", None)
    stages = PLAIN_STAGES if pipeline is None else PIPELINE_STAGES + (FLOW_STAGES if pipeline.has_flows() else ())
    names += [f"stage_{s}_{stat}" for s in stages for stat in ("mean_s", "share", "share_p95")]
    if any(getattr(m, "prompt_cache", None) is not None
           or getattr(getattr(m, "engine", None), "prefix_cache", None) is not None for m in workload.models.values()):
        names.append("prompt_cached_share")
    if pipeline is not None:
        names += [f"requests_{OUTCOMES[code]}" for code in PIPELINE_OUTCOMES]
        names += ["model_calls_per_request", "validation_retries_per_request"]
        if pipeline.guardrails is not None:
            names += GUARD_METRICS
        if pipeline.output_cache is not None:
            names += ["cache_bypass_share_output", "cache_hit_rate_output", "cache_stale_hit_rate_output",
                      "cache_leak_rate_output"]
        if pipeline.router is not None:
            names += ["quality_good_share", "hops_mean", "escalation_rate"]
        if pipeline.router is not None or pipeline.quality is not None:
            names += QUALITY_METRICS
        retrieval = pipeline.retrieval
        if retrieval is not None:
            if retrieval.cache is not None:
                names += ["retrieval_cache_hit_rate", "cache_stale_hit_rate_retrieval", "cache_leak_rate_retrieval"]
            if retrieval.embedding is not None:
                names += ["embedding_batch_size_mean", "embedding_utilisation"]
                if retrieval.embedding.cache is not None:
                    names += ["embedding_cache_hit_rate", "cache_stale_hit_rate_embedding", "cache_leak_rate_embedding"]
            names += [f"backend_{b}_{m}" for b in retrieval.backends for m in ("utilisation", "wait_mean_s")]
        if pipeline.budget is not None:
            names.append("budget_truncated_share")
        if pipeline.has_flows():
            names += flow_metric_names(pipeline)
    features = workload.feature_names()
    names += [f"cost_per_request_{f}_usd" for f in features]
    if cold_window(workload) is not None:
        names.append("cold_window_s")
        for label in ("cold", "warm"):
            names.append(f"{label}_requests")
            names += [f"{label}_{m}_{stat}_s" for m in ("ttft", "e2e") for stat in COLD_WARM_STATS]
    return names


def choose_warmup(rec: Recorder, workload: Workload) -> float:
    """The warm-up cut in seconds: the configured one, or MSER-5 rounded up to a monitor sample."""
    warmup = workload.simulation.warmup_s
    if warmup != "auto":
        return float(warmup)
    arrival = np.asarray(rec.arrival)
    e2e = np.asarray(rec.end) - arrival
    done = np.isin(np.asarray(rec.outcome), ANSWERED)
    cut = mser5(e2e[done])
    if cut == 0:
        return 0.0
    t = float(arrival[done][cut])
    # Round up to a monitor sample so latency and utilisation share one window.
    grid = [s for s, _ in rec.samples if s >= t]
    return grid[0] if grid else t


def summarise(rec: Recorder, workload: Workload, warmup_s: float,
              offered: Optional[dict[str, float]] = None) -> dict[str, float]:
    """The flat metrics of one replication over the window [warmup_s, end of arrivals) (see measure_end_s)."""
    duration = workload.measure_end_s()
    window = duration - warmup_s
    arrival = np.asarray(rec.arrival, dtype=float)
    first = np.asarray(rec.first_token, dtype=float)
    end = np.asarray(rec.end, dtype=float)
    outcome = np.asarray(rec.outcome)
    prompt = np.asarray(rec.prompt, dtype=float)
    output = np.asarray(rec.output, dtype=float)

    arrived = arrival >= warmup_s
    answered = np.isin(outcome, ANSWERED)  # latency and throughput count answers, cut short by the user or not
    # A batch class's answers come within hours: they count in throughput and cost, and their latency is
    # reported apart (batch_*, and per class), never in the interactive latency figures.
    interactive = ~batch_classes(workload)[np.asarray(rec.cls, dtype=np.int64)]
    answered_in = arrived & answered
    done = answered_in & interactive
    finished_in_window = answered & (end >= warmup_s) & (end < duration)
    tpot = time_per_output_token(first, end, output, outcome)  # NaN where a request has none
    m: dict[str, float] = {
        "warmup_s": warmup_s,
        "requests_arrived": float(arrived.sum()),
        "requests_completed": float((arrived & (outcome == COMPLETED)).sum()),
        "requests_rejected": float((arrived & (outcome == REJECTED)).sum()),
        "requests_queue_full": float((arrived & (outcome == QUEUE_FULL)).sum()),
        "requests_expired": float((arrived & (outcome == EXPIRED)).sum()),
        "throughput_rps": finished_in_window.sum() / window,
    }
    if workload.slo is not None:
        ok = finished_in_window.copy()
        if workload.slo.ttft_s is not None:
            ok &= (first - arrival) <= workload.slo.ttft_s
        if workload.slo.e2e_s is not None:
            ok &= (end - arrival) <= workload.slo.e2e_s
        if workload.slo.tpot_s is not None:  # a one-token answer has no TPOT, so nothing to miss
            ok &= ~(tpot > workload.slo.tpot_s)
        m["goodput_rps"] = ok.sum() / window
    stages = stage_times(rec)
    # With a pipeline a request's queue wait is its model calls' time in endpoint queues, not the time
    # to its last call's admission (which holds retrieval, earlier calls, evaluation).
    latencies = {"queue_wait": stages["queue"], "ttft": first - arrival, "e2e": end - arrival, "tpot": tpot}
    for measure, values in latencies.items():
        m.update(_latency_stats(measure, values[done]))
    for field, name in SLO_TARGETS if workload.slo is not None else ():
        limit = getattr(workload.slo, field)
        if limit is not None:  # the requests the latency table measures; NaN (no TPOT) passes
            m[f"slo_{name}_met_share"] = float(np.mean(~(latencies[name][done] > limit))) if done.any() else math.nan
    m["tokens_in_per_s"] = prompt[finished_in_window].sum() / window
    m["tokens_out_per_s"] = output[finished_in_window].sum() / window
    m.update(_streaming(tpot[done], (end - first)[done], output[done]))
    counters = _window_counters(rec, warmup_s, duration)
    m.update(_tokens_per_gpu(rec, workload, counters, warmup_s, duration))
    m.update(_endpoint_stats(counters))
    m.update(_costs(rec, workload, window, arrived, answered_in, prompt, m["throughput_rps"], counters))
    for name, value in (offered or {}).items():
        m[f"offered_utilisation_{name}"] = value
    m.update(_cold_and_warm(workload, arrival, first, end, answered & interactive))
    m.update(_rate_limited(rec, arrived, outcome))
    m.update(_per_class(rec, workload, arrived, answered_in, finished_in_window, outcome, window, latencies))
    m.update(_batch_stats(rec, workload, arrived, answered_in, end - arrival))
    m.update(stage_profile(rec, done, stages))
    m.update(_pipeline_stats(rec, arrived, outcome))
    m.update(_prompt_cached_share(rec, arrived))
    m.update(_feature_costs(rec, workload, arrived, m["cost_total_usd"]))
    return m


# ------------------------------------------------------------------ pipeline and ledger

PLAIN_STAGES = ("queue", "prefill", "decode")
PIPELINE_OUTCOMES = (TIMED_OUT, CANCELLED, PARTIAL, TRY_LATER)  # outcomes only a pipeline's requests can have
PIPELINE_STAGES = ("gate", "cache", "retrieval", "queue", "prefill", "decode", "evaluation", "post_processing",
                   "retry")


def stage_times(rec: Recorder) -> dict[str, np.ndarray]:
    """Seconds each request spent in each stage; per request they add up to its end-to-end latency.

    queue: arrival (or, with a pipeline, the call's start) to admission; prefill: admission to the first
    token; decode: first to last token. With a pipeline a request's calls are summed (escalations, retries;
    a call stopped early counts up to its stop), and gate (rate limits and their retries), cache lookup,
    retrieval, evaluation, post-processing and retry (guardrail backoff) come from its stage log.
    """
    arrival, admit = np.asarray(rec.arrival, dtype=float), np.asarray(rec.admit, dtype=float)
    first, end = np.asarray(rec.first_token, dtype=float), np.asarray(rec.end, dtype=float)
    if rec.calls is None:
        return {"queue": admit - arrival, "prefill": first - admit, "decode": end - first}
    calls, n = rec.calls, arrival.size
    parent = np.asarray(calls.parent, dtype=np.int64)
    c_arrival, c_end = np.asarray(calls.arrival, dtype=float), np.asarray(calls.end, dtype=float)
    # A call stopped before its admission or its first token spent the rest of its time where it was.
    c_admit = np.fmin(np.asarray(calls.admit, dtype=float), c_end)
    c_first = np.fmin(np.fmax(np.asarray(calls.first_token, dtype=float), c_admit), c_end)
    c_admit, c_first = np.where(np.isnan(c_admit), c_end, c_admit), np.where(np.isnan(c_first), c_end, c_first)
    answers = np.ones(parent.size, dtype=bool)  # a flow's model steps are its own stage, not the answer's
    if rec.flow_calls:
        answers[np.asarray(rec.flow_calls, dtype=np.int64)] = False
    sums = lambda values: np.bincount(parent, weights=np.where(answers, values, 0.0), minlength=n)  # noqa: E731
    times = {"queue": sums(c_admit - c_arrival), "prefill": sums(c_first - c_admit), "decode": sums(c_end - c_first)}
    log = Recorder.rows(rec.stage_log, 7)
    index = log[:, 0].astype(np.int64)
    for k, name in enumerate(("gate", "cache", "evaluation", "post_processing", "retrieval", "retry"), start=1):
        times[name] = np.zeros(n)
        times[name][index] = log[:, k]
    if rec.flow_log is not None:
        times.update(flow_stage_times(rec, n))
        return {name: times[name] for name in PIPELINE_STAGES + FLOW_STAGES}
    return {name: times[name] for name in PIPELINE_STAGES}


def stage_profile(rec: Recorder, done: np.ndarray, stages: dict[str, np.ndarray]) -> dict[str, float]:
    """Each stage's mean time and its share of the mean and of the slowest 5% (answered requests)."""
    if not done.any():
        return {}
    e2e = (np.asarray(rec.end, dtype=float) - np.asarray(rec.arrival, dtype=float))
    tail = done & (e2e >= np.percentile(e2e[done], 95))
    out = {}
    for name, seconds in stages.items():
        out[f"stage_{name}_mean_s"] = float(seconds[done].mean())
        out[f"stage_{name}_share"] = float(seconds[done].mean() / e2e[done].mean())
        out[f"stage_{name}_share_p95"] = float(seconds[tail].mean() / e2e[tail].mean())
    for name, seconds in step_times(rec, done.size).items():  # a flow's steps, nested ones too (they overlap)
        out[f"flow_step_{name}_mean_s"] = float(seconds[done].mean())
        out[f"flow_step_{name}_share"] = float(seconds[done].mean() / e2e[done].mean())
    return out


GUARD_METRICS = ["guard_retries_per_request", "guard_call_timeouts_per_request", "fallback_smaller_model_share",
                 "fallback_reduced_context_share", "guard_hop_limited_share", "guard_token_limited_share",
                 "guard_tool_limited_share"]


def cache_warming(rec: Recorder, workload: Workload, warmup_s: float) -> list[str]:
    """A warning when the output cache's hit rate still climbs at the end of the run: over the second half of
    the measuring window it beats the first half by more than 2 points and 3 standard errors, so the run's
    figures (hit rate, latency, cost) are not yet the cache's steady state."""
    from sim.model.application.caches import BYPASS, HIT, STALE_HIT

    if rec.cache_code is None:
        return []
    log = Recorder.rows(rec.cache_code, 2, np.int64)
    arrival = np.asarray(rec.arrival, dtype=float)[log[:, 0]]
    end = workload.measure_end_s()
    looked = (log[:, 1] != BYPASS) & (arrival >= warmup_s) & (arrival < end)
    second = arrival >= (warmup_s + end) / 2
    hit = np.isin(log[:, 1], (HIT, STALE_HIT))
    n1, n2 = int((looked & ~second).sum()), int((looked & second).sum())
    if min(n1, n2) < 100:
        return []
    h1, h2 = hit[looked & ~second].mean(), hit[looked & second].mean()
    pooled = hit[looked].mean()
    error = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if h2 - h1 <= max(0.02, 3 * error):
        return []
    return [f"pipeline.output_cache: still warming at the end of the run (hit rate {h1:.1%} in the first half of "
            f"the measuring window, {h2:.1%} in the second): its figures are not its steady state; run longer, "
            "or start it warm (pipeline.output_cache.warm_up_s)"]


def _pipeline_stats(rec: Recorder, arrived: np.ndarray, outcome: np.ndarray) -> dict[str, float]:
    """Outcomes, model calls per request, cache hit rates, quality, guardrails, budget truncation (after warm-up)."""
    if rec.calls is None:
        return {}
    from sim.model.application.caches import BYPASS, HIT, STALE_HIT

    parent = np.asarray(rec.calls.parent, dtype=np.int64)
    out = {f"requests_{OUTCOMES[code]}": float((arrived & (outcome == code)).sum()) for code in PIPELINE_OUTCOMES}
    out["model_calls_per_request"] = float(arrived[parent].sum() / max(arrived.sum(), 1))
    out.update(_guard_stats(rec, arrived))
    if rec.cache_code is not None:
        log = Recorder.rows(rec.cache_code, 2, np.int64)
        codes = log[arrived[log[:, 0]], 1]
        looked = codes[codes != BYPASS]
        out["cache_bypass_share_output"] = float((codes == BYPASS).mean()) if codes.size else math.nan
        out["cache_hit_rate_output"] = float(np.isin(looked, (HIT, STALE_HIT)).mean()) if looked.size else math.nan
        out["cache_stale_hit_rate_output"] = float((looked == STALE_HIT).mean()) if looked.size else math.nan
        leaks = arrived[Recorder.rows(rec.cache_leak, 1, np.int64)[:, 0]].sum()
        out["cache_leak_rate_output"] = float(leaks / looked.size) if looked.size else math.nan
    out.update(_quality_dims(rec, arrived))
    if rec.quality is not None:
        rows = Recorder.rows(rec.quality, 3)
        rows = rows[arrived[rows[:, 0].astype(np.int64)], 1:]
        out["quality_good_share"] = float(rows[:, 0].mean()) if len(rows) else math.nan
        out["hops_mean"] = float(rows[:, 1].mean()) if len(rows) else math.nan
        out["escalation_rate"] = float((rows[:, 1] > 1).mean()) if len(rows) else math.nan
    if rec.validation_retries is not None:
        retried = sum(n for i, n in rec.validation_retries.items() if arrived[i])
        out["validation_retries_per_request"] = retried / max(float(arrived.sum()), 1.0)
    out.update(_retrieval_stats(rec.retrieval_stats))
    out.update(flow_stats(rec, arrived))
    if rec.budget is not None:
        log = Recorder.rows(rec.budget, 2 + 2 * len(rec.budget_sections), np.int64)
        truncated = log[arrived[log[:, 0]], 1].astype(bool)
        out["budget_truncated_share"] = float(truncated.mean()) if truncated.size else math.nan
    return out


QUALITY_METRICS = ["quality_correct_share", "quality_grounded_mean", "quality_citation_mean", "quality_useful_mean"]


def _quality_dims(rec: Recorder, arrived: np.ndarray) -> dict[str, float]:
    """Means of the answer quality dimensions (sim/model/application/quality.py) over requests after warm-up.

    Correctness, groundedness and citation accuracy are over the answered requests that have them;
    usefulness over every request (no answer is worth 0).
    """
    if rec.quality_inputs is None:
        return {}
    from sim.model.application.quality import scores

    rows = scores(rec)
    rows = rows[arrived[rows[:, 0].astype(np.int64)], 1:]
    out = {}
    for name, column in zip(QUALITY_METRICS, rows.T if len(rows) else [np.empty(0)] * 4):
        values = column[~np.isnan(column)]
        out[name] = float(values.mean()) if values.size else math.nan
    return out


def quality_columns(rec: Recorder) -> pd.DataFrame:
    """Per request: its answer's quality dimensions, `quality_correct` ... `quality_useful` (NaN where none)."""
    import pandas as pd

    out = pd.DataFrame(index=pd.RangeIndex(len(rec.arrival)))
    if rec.quality_inputs is None:
        return out
    from sim.model.application.quality import scores

    rows = scores(rec)
    index = rows[:, 0].astype(np.int64)
    for k, name in enumerate(("correct", "grounded", "citation", "useful"), start=1):
        values = np.full(len(out), np.nan)
        values[index] = rows[:, k]
        out[f"quality_{name}"] = values
    return out


def budget_sections(rec: Recorder) -> pd.DataFrame:
    """Per request: each prompt section's tokens after trimming and as drawn (NaN where no budget was drawn)."""
    import pandas as pd

    names = rec.budget_sections
    out = pd.DataFrame(index=pd.RangeIndex(len(rec.arrival)))
    if rec.budget is None or not names:
        return out
    log = Recorder.rows(rec.budget, 2 + 2 * len(names), np.int64)
    n = len(names)
    for k, name in enumerate(names):
        for column, offset in ((f"tokens_{name}", 2 + n + k), (f"tokens_{name}_drawn", 2 + k)):
            values = np.full(len(out), np.nan)
            values[log[:, 0]] = log[:, offset]
            out[column] = values
    return out


def _prompt_cached_share(rec: Recorder, arrived: np.ndarray) -> dict[str, float]:
    """Share of the model calls' prompt tokens read from prompt or prefix caches (requests after warm-up)."""
    calls = rec.calls if rec.calls is not None else rec
    if calls.cached_tokens is None:
        return {}
    mine = arrived[np.asarray(calls.parent, dtype=np.int64)] if rec.calls is not None else arrived
    read = cache_columns(calls)[0][mine].sum()
    return {"prompt_cached_share": float(read / max(np.asarray(calls.prompt)[mine].sum(), 1))}


def _guard_stats(rec: Recorder, arrived: np.ndarray) -> dict[str, float]:
    """Per request after warm-up: guardrail retries and call timeouts, shares answered by each fallback call,
    shares that met each cap."""
    if rec.guard_log is None:
        return {}
    from sim.model.application.guardrails import ANSWER_PATHS, LIMITS

    log = np.asarray([row for row in rec.guard_log if arrived[row[0]]], dtype=np.int64).reshape(-1, 5)
    n = max(float(arrived.sum()), 1.0)
    out = {"guard_retries_per_request": log[:, 1].sum() / n, "guard_call_timeouts_per_request": log[:, 2].sum() / n}
    for path in ("smaller_model", "reduced_context"):
        out[f"fallback_{path}_share"] = float((log[:, 3] == ANSWER_PATHS.index(path)).sum() / n)
    for limit, name in (("hops", "hop"), ("tokens", "token"), ("tool_calls", "tool")):
        out[f"guard_{name}_limited_share"] = float((log[:, 4] == LIMITS.index(limit)).sum() / n)
    return out


def _retrieval_stats(stats: Optional[dict]) -> dict[str, float]:
    """The retrieval stage's caches, embedding batches and backends, over the whole run."""
    if stats is None:
        return {}
    out = {}
    for key in ("retrieval_cache_hit_rate", "embedding_cache_hit_rate", "embedding_batch_size_mean",
                "cache_stale_hit_rate_retrieval", "cache_leak_rate_retrieval", "cache_stale_hit_rate_embedding",
                "cache_leak_rate_embedding"):
        if key in stats:
            out[key] = float(stats[key])
    if "utilisation_embedding" in stats:
        out["embedding_utilisation"] = float(stats["utilisation_embedding"])
    for key, value in stats.items():
        if key.startswith("utilisation_backend_"):
            out[f"backend_{key.removeprefix('utilisation_backend_')}_utilisation"] = float(value)
        elif key.startswith("backend_") and key.endswith("_wait_mean_s"):
            out[key] = float(value)
    return out


def _feature_costs(rec: Recorder, workload: Workload, arrived: np.ndarray, total: float) -> dict[str, float]:
    """Each feature's cost per request: the window's cost shared among features as the ledger shares the run's."""
    features = rec.feature_names
    if not features:
        return {}
    book = ledger(rec, workload)
    book = book[arrived[book["request"].to_numpy()]]
    spent = book.groupby("feature", observed=False)["usd"].sum()
    share = spent / spent.sum() if spent.sum() > 0 else spent * 0
    feature_of = np.asarray(rec.feature, dtype=np.int64)
    out = {}
    for k, name in enumerate(features):
        requests = float((arrived & (feature_of == k)).sum())
        out[f"cost_per_request_{name}_usd"] = total * float(share.get(name, 0.0)) / requests if requests else math.nan
    return out


# ------------------------------------------------------------------ rate limits and classes

def class_metric_names(workload: Workload) -> list[str]:
    """Per-class metrics, only with several classes (with one they repeat the totals).

    The class name goes before the unit (`e2e_p99_chat_s`, `throughput_chat_rps`),
    since compare, the report and the figures read a metric's unit from its end.
    """
    classes = workload.traffic.classes
    if len(classes) < 2:
        return []
    stats = ("mean",) + tuple(p for p, _ in PERCENTILES)
    return [name for c in classes
            for name in [f"{m}_{stat}_{c}_s" for m in MEASURES for stat in stats]
            + [f"throughput_{c}_rps", f"rate_limited_share_{c}"]]


def _rate_limited(rec: Recorder, arrived: np.ndarray, outcome: np.ndarray) -> dict[str, float]:
    """Requests that got a 429 and gave up, their share of arrivals, and retries per request."""
    limited = float((arrived & (outcome == RATE_LIMITED)).sum())
    n = float(arrived.sum())
    retries = rec.attempts.column(arrived.size)[arrived] - 1.0
    return {"requests_rate_limited": limited,
            "rate_limited_share": limited / n if n else math.nan,
            "retries_mean": float(retries.mean()) if n else math.nan}


def _per_class(rec: Recorder, workload: Workload, arrived: np.ndarray, done: np.ndarray, finished: np.ndarray,
               outcome: np.ndarray, window: float, latencies: dict[str, np.ndarray]) -> dict[str, float]:
    """Latency, throughput and rate-limited share of each class (with several classes)."""
    if len(workload.traffic.classes) < 2:
        return {}
    cls = np.asarray(rec.cls)
    out: dict[str, float] = {}
    for k, name in enumerate(workload.traffic.classes):
        mine = cls == k
        for measure, values in latencies.items():
            stats = _latency_stats(measure, values[done & mine])
            out.update({f"{key[:-2]}_{name}_s": v for key, v in stats.items()})  # ttft_p95_s -> ttft_p95_chat_s
        out[f"throughput_{name}_rps"] = (finished & mine).sum() / window
        n = (arrived & mine).sum()
        out[f"rate_limited_share_{name}"] = (arrived & mine & (outcome == RATE_LIMITED)).sum() / n if n else math.nan
    return out


def cold_window(workload: Workload) -> Optional[float]:
    """End of the cold window: as configured, else the longest cold start (None: nothing starts cold)."""
    sim = workload.simulation
    if sim.cold_window_s is not None:
        return sim.cold_window_s
    if sim.warm:
        return None
    longest = max((getattr(m, "cold_start_s", 0.0) for m in workload.models.values()), default=0.0)
    return longest or None


COLD_WARM_STATS = ("mean", "p50", "p95", "p99")


def _cold_and_warm(workload: Workload, arrival: np.ndarray, first: np.ndarray, end: np.ndarray,
                   completed: np.ndarray) -> dict[str, float]:
    """Latency of requests arriving in the cold window [0, cold) and after it, warm-up ignored."""
    cold = cold_window(workload)
    if cold is None:
        return {}
    out: dict[str, float] = {"cold_window_s": cold}
    for label, mask in (("cold", arrival < cold), ("warm", arrival >= cold)):
        out[f"{label}_requests"] = float(mask.sum())
        for measure, values in (("ttft", first - arrival), ("e2e", end - arrival)):
            stats = _latency_stats(measure, values[mask & completed])
            out.update({f"{label}_{measure}_{stat}_s": stats[f"{measure}_{stat}_s"] for stat in COLD_WARM_STATS})
    return out


def _latency_stats(measure: str, values: np.ndarray) -> dict[str, float]:
    """Mean and percentiles; NaN values are requests the measure does not apply to (TPOT of one token)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {f"{measure}_{stat}_s": math.nan for stat in ("mean",) + tuple(p for p, _ in PERCENTILES)}
    out = {f"{measure}_mean_s": float(values.mean())}
    qs = np.percentile(values, [q for _, q in PERCENTILES])
    for (stat, _), q in zip(PERCENTILES, qs):
        out[f"{measure}_{stat}_s"] = float(q)
    return out


def _streaming(tpot: np.ndarray, decode: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """ITL and the streaming speed a user sees, over the answered requests that streamed (a TPOT).

    itl_mean_s weighs every token gap alike (all gaps over all gaps' time); its percentiles would need
    each token's time, which the engine's skip-ahead never materialises. tokens_out_per_s_per_user is the
    mean over requests of 1 / TPOT, the speed each reader sees.
    """
    streamed = ~np.isnan(tpot)
    if not streamed.any():
        return {"itl_mean_s": math.nan, "tokens_out_per_s_per_user": math.nan}
    return {"itl_mean_s": float(decode[streamed].sum() / (output[streamed] - 1.0).sum()),
            "tokens_out_per_s_per_user": float((1.0 / tpot[streamed]).mean())}


def engine_endpoints(workload: Workload) -> list[str]:
    """Names of the self-hosted endpoints served by an iteration-level engine (those that hold GPUs)."""
    return [name for name, model in workload.models.items()
            if isinstance(model, SelfHosted) and getattr(model, "engine", None) is not None]


def _tokens_per_gpu(rec: Recorder, workload: Workload, counters: dict, start: float,
                    stop: float) -> dict[str, float]:
    """Output tokens the engines made in the window per GPU-second they held (tokens/s per mean GPU held).

    The tokens are those of engine calls ending in the window (a call stopped half-way counts what it
    made); the GPU-seconds are the replica-seconds held over the window times GPUs per replica.
    """
    engines = engine_endpoints(workload)
    if not engines:
        return {}
    gpu_seconds = sum(counters[name][3] * workload.models[name].gpus_per_replica for name in engines)
    calls = rec.calls if rec.calls is not None else rec
    paid, made = billed(calls)
    index = [k for k, name in enumerate(workload.models) if name in engines]
    end = np.asarray(calls.end, dtype=float)
    mine = paid & np.isin(np.asarray(calls.endpoint), index) & (end >= start) & (end < stop)
    return {"tokens_out_per_s_per_gpu": float(made[mine].sum() / gpu_seconds) if gpu_seconds > 0 else math.nan}


def _counters_at(rec: Recorder, t: float) -> dict[str, tuple[float, float, float, float]]:
    for s, counters in rec.samples:
        if s >= t:
            return counters
    return rec.samples[-1][1]


def _window_counters(rec: Recorder, start: float, stop: float) -> dict[str, tuple[float, float, float, float]]:
    """Each endpoint's (busy, area, work, held) accumulated over the window."""
    before, after = _counters_at(rec, start), _counters_at(rec, stop)
    return {name: tuple(a - b for a, b in zip(after[name], before[name])) for name in after}


def _endpoint_stats(counters: dict[str, tuple[float, float, float, float]]) -> dict[str, float]:
    """Utilisation (work over replica-seconds held) and mean batch of each endpoint over the window."""
    out = {}
    for name, (busy, area, work, held) in counters.items():
        out[f"utilisation_{name}"] = work / held if held > 0 else 0.0
        out[f"batch_mean_{name}"] = area / busy if busy > 0 else 0.0
    return out


def _costs(rec: Recorder, workload: Workload, window: float, arrived: np.ndarray, done: np.ndarray,
           prompt: np.ndarray, throughput: float, counters: dict) -> dict[str, float]:
    """Dollars over the window: replica-seconds held x hourly price for self-hosted, tokens for APIs (batch
    calls at their batch price), and the application's priced stages (see ledger.stage_costs).

    With priced stages or batch classes, also the breakdown: `cost_<stage>_usd` for the ledger's stages
    (model, embedding, backend, cache) and `cost_batch_usd`, the part of cost_model_usd billed at batch prices.
    """
    calls = rec.calls if rec.calls is not None else rec  # with a pipeline, a request may make no call, or several
    paid, output = billed(calls)
    if rec.calls is not None:  # every call of a request arrived in the window, answered or not
        done = arrived[np.asarray(calls.parent, dtype=np.int64)] & paid
        prompt = np.asarray(calls.prompt, dtype=float)
    endpoint = np.asarray(calls.endpoint)
    read, written = cache_columns(calls)
    batch = batch_calls(calls, workload)
    total = batched = 0.0
    for k, (name, model) in enumerate(workload.models.items()):
        if isinstance(model, Api):
            mine = done & (endpoint == k)
            usd = api_usd(model, prompt[mine], output[mine], read[mine], written[mine], batch[mine])
            total += float(usd.sum())
            batched += float(usd[batch[mine]].sum())
        else:
            total += model.replica_hourly_usd * counters[name][3] / 3600.0  # per GPU x GPUs per replica
    breakdown = priced_stages(workload) or bool(batch_classes(workload).any())
    stages = {"model": total}
    if breakdown:
        for stage, usd in stage_costs(rec, workload, arrived, window).items():
            stages[stage] = stages.get(stage, 0.0) + usd
            total += usd
    completed = throughput * window
    per_request = total / completed if completed else math.nan
    out = {
        "cost_total_usd": total,
        "cost_per_hour_usd": total * 3600.0 / window,
        "cost_per_request_usd": per_request,
        "cost_per_1k_usd": per_request * 1000.0,
    }
    if breakdown:
        out.update({f"cost_{stage}_usd": stages.get(stage, 0.0) for stage in STAGES})
        out["cost_batch_usd"] = batched
    return out


BATCH_METRICS = ["batch_requests", "batch_e2e_mean_s", "batch_e2e_p50_s", "batch_e2e_p95_s", "batch_e2e_p99_s",
                 "batch_e2e_max_s", "batch_within_window_share"]


def _batch_stats(rec: Recorder, workload: Workload, arrived: np.ndarray, answered: np.ndarray,
                 e2e: np.ndarray) -> dict[str, float]:
    """Batch classes' requests arriving in the window: how many, their end-to-end latency (answered ones), and
    the share answered within the completion window of the batch mode that served them."""
    batch = batch_classes(workload)
    if not batch.any():
        return {}
    mine = arrived & batch[np.asarray(rec.cls, dtype=np.int64)]
    windows = np.asarray([m.batch.completion_window_s if getattr(m, "batch", None) is not None else math.inf
                          for m in workload.models.values()])
    late = ~(e2e <= windows[np.asarray(rec.endpoint, dtype=np.int64)])  # NaN e2e (no answer): not in time
    values = e2e[mine & answered]
    stats = _latency_stats("e2e", values)
    out = {"batch_requests": float(mine.sum())}
    out.update({f"batch_e2e_{stat}_s": stats[f"e2e_{stat}_s"] for stat in ("mean", "p50", "p95", "p99")})
    out["batch_e2e_max_s"] = float(values.max()) if values.size else math.nan
    out["batch_within_window_share"] = float((~late[mine]).mean()) if mine.any() else math.nan
    return out


def aggregate(per_replication: list[dict]) -> dict[str, float]:
    """Mean of every metric across replications (one dict each; a metric one lacks is NaN there, as in a
    table of them); with two or more, its 95% t-interval too."""
    out: dict[str, float] = {}
    n = len(per_replication)
    for column in dict.fromkeys(k for row in per_replication for k in row):
        if column == "replication":
            continue
        mean, low, high = t_interval(np.asarray([row.get(column, math.nan) for row in per_replication], dtype=float))
        out[column] = mean
        if n >= 2:
            out[f"{column}_ci95_low"] = low
            out[f"{column}_ci95_high"] = high
    return out


def aggregate_points(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """One row per group of `by` columns (a sweep point): each metric's mean and 95% interval.

    `results` has one row per point and replication (as results.parquet); rows
    whose `status` is not "ok" are left out. Non-numeric columns are dropped.
    """
    import pandas as pd

    ok = results[results["status"] == "ok"] if "status" in results else results
    skip = set(by) | {"replication", "seed", "runtime_s", "point_key", "status", "error"}
    metrics = [c for c in ok.columns if c not in skip and pd.api.types.is_numeric_dtype(ok[c])]
    rows = []
    for keys, group in ok.groupby(by, sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys))
        row["replications"] = len(group)
        row.update(aggregate(group[metrics].to_dict("records")))
        rows.append(row)
    return pd.DataFrame(rows)
