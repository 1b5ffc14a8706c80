"""The cost ledger: one row per model call, then one per request and priced application stage.

API calls cost their tokens at the endpoint's prices (a batch class's calls at its batch mode's
price multiplier). Self-hosted replicas cost their hours, whoever used them; the ledger shares an
endpoint's bill for the window among its calls in proportion to the work each did: full-batch
seconds, the same measure as utilisation (prompt tokens x per_prefill_token_s + output tokens x
(per_decode_seq_s + base_s / full batch)), or the service time for a plain `service_time` endpoint.

The application's stages (`stage` embedding, backend, cache, tool; `resource` names which) are billed
the same two ways. Per-unit prices go to the request that used the unit: tokens embedded at the
embedding's `price_per_mtok`, hops at a backend's `price_per_query_usd`, a flow's tool attempts at
the tool's `price_per_call_usd` (a flow's model steps are calls like any other). Hourly prices
(`hourly_usd` of the embedding server, a backend, a tool, a cache) make a bill over the window, shared by
use as the GPU bill is: queries embedded, hops, lookups. A resource is sized for its load, so
whoever loads it more pays more; sharing evenly per request would charge an answer from the output
cache for a vector database it never touched. A bill nothing used in the window (an idle replica,
a cache no request reached) is overhead of serving everyone: shared evenly among the window's
requests (with none, one row with request -1). So every dollar of the window lands on a row, and
the ledger's total is the summary's `cost_total_usd` over the same window.

A call stopped half-way (a time limit, or the user cancelling the stream) is billed its prompt if it
reached a server and the output tokens it made; a call that never ran (queue full, expired, refused)
costs nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from sim.config.schema import Api, Workload
from sim.model.application.caches import BYPASS
from sim.model.application.retrieval import USAGE_FIELDS
from sim.model.offered import full_batch

from .flows import tool_attempts
from .recorder import CANCELLED, COMPLETED, TIMED_OUT, Recorder

if TYPE_CHECKING:  # pandas costs 0.2 s to import: only what builds tables imports it
    import pandas as pd

STAGES = ("model", "embedding", "backend", "cache", "tool")
"""The ledger's `stage` values; the summary's cost breakdown is `cost_<stage>_usd`."""


def billed(calls: Recorder) -> tuple[np.ndarray, np.ndarray]:
    """Per call: whether it is billed, and its output tokens billed (the tokens it made)."""
    outcome = np.asarray(calls.outcome)
    output = np.asarray(calls.output, dtype=float)
    completed = outcome == COMPLETED
    if not calls.generated:
        return completed, np.where(completed, output, 0.0)
    admit, end = np.asarray(calls.admit, dtype=float), np.asarray(calls.end, dtype=float)
    stopped = np.isin(outcome, (TIMED_OUT, CANCELLED)) & (admit <= end)  # NaN admit: it never reached a server
    made = np.zeros(len(output))
    for c, tokens in calls.generated.items():
        made[c] = tokens
    return completed | stopped, np.where(completed, output, made)


def cache_columns(calls: Recorder) -> tuple[np.ndarray, np.ndarray]:
    """Per call: prompt tokens read from a prompt cache, and written to it (zeros without caches)."""
    n = len(calls.arrival)
    if calls.cached_tokens is None:
        return np.zeros(n), np.zeros(n)
    return calls.cached_tokens.columns(n)


def api_usd(model: Api, prompt: np.ndarray, output: np.ndarray, read: np.ndarray, written: np.ndarray,
            batch: Optional[np.ndarray] = None) -> np.ndarray:
    """Dollars of API calls: input at its price, cached reads and cache writes at their multipliers, output;
    calls sent through the batch mode (`batch`, per call) at its price multiplier."""
    cache = model.prompt_cache
    plain = prompt - read - written
    tokens_in = (plain + read * cache.read_price_multiplier + written * cache.write_price_multiplier
                 if cache is not None else prompt)
    usd = (tokens_in * model.price_per_mtok_in + output * model.price_per_mtok_out) / 1e6
    if model.batch is not None and batch is not None and batch.any():
        usd = usd * np.where(batch, model.batch.price_multiplier, 1.0)
    return usd


def batch_classes(workload: Workload) -> np.ndarray:
    """Per class: whether it is a batch class."""
    return np.asarray([cls.batch for cls in workload.traffic.classes.values()], dtype=bool)


def batch_calls(calls: Recorder, workload: Workload) -> np.ndarray:
    """Per call (a request without a pipeline): whether it went through its endpoint's batch mode."""
    has_mode = np.asarray([getattr(m, "batch", None) is not None for m in workload.models.values()], dtype=bool)
    cls = np.asarray(calls.cls, dtype=np.int64)
    return batch_classes(workload)[cls] & has_mode[np.asarray(calls.endpoint, dtype=np.int64)]


def held_seconds(rec: Recorder, start: float, stop: float) -> dict[str, float]:
    """Replica-seconds each endpoint held over [start, stop], from the monitor's samples at those times."""
    def at(t: float) -> dict:
        return next((counters for s, counters in rec.samples if s >= t), rec.samples[-1][1])

    if not rec.samples:
        return {}
    before, after = at(start), at(stop)
    return {name: after[name][3] - before[name][3] for name in after}


def ledger(rec: Recorder, workload: Workload, window: Optional[tuple[float, float]] = None) -> pd.DataFrame:
    """One row per model call, then one per request and priced stage (see the module's docstring).

    `window` (start, stop): the requests arriving from `start` on and the hourly bills of [start, stop],
    as the summary counts them (`ledger(rec, w, (warmup_s, w.measure_end_s()))` adds up to its
    `cost_total_usd`); default the whole run, [0, duration_s].
    """
    import pandas as pd

    start, stop = window if window is not None else (0.0, workload.simulation.duration_s)
    arrived = np.asarray(rec.arrival, dtype=float) >= start
    frames = [_model_rows(rec, workload, arrived, held_seconds(rec, start, stop))]
    frames += [_stage_frame(rec, stage, resource, usd, tokens)
               for stage, resource, usd, tokens in _stage_rows(rec, workload, arrived, stop - start)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _model_rows(rec: Recorder, workload: Workload, arrived: np.ndarray, held: dict[str, float]) -> pd.DataFrame:
    """One row per model call of a request in the window (a request answered without a call has none)."""
    import pandas as pd

    calls = rec.calls if rec.calls is not None else rec
    n = len(calls.arrival)
    parent = np.asarray(calls.parent if calls.parent is not None else range(n), dtype=np.int64)
    endpoint = np.asarray(calls.endpoint, dtype=np.int64)
    prompt = np.asarray(calls.prompt, dtype=float)
    paid, output = billed(calls)
    usd = np.zeros(n)
    read, written = cache_columns(calls)
    batch = batch_calls(calls, workload)
    inside = arrived[parent]
    idle: list[tuple[str, float]] = []  # (endpoint, bill) of self-hosted endpoints no call used
    for k, (name, model) in enumerate(workload.models.items()):
        mine = (endpoint == k) & paid & inside
        if isinstance(model, Api):
            usd[mine] = api_usd(model, prompt[mine], output[mine], read[mine], written[mine], batch[mine])
            continue
        work = _work(calls, model, workload, name, mine, prompt, output)
        bill = model.replica_hourly_usd * held.get(name, 0.0) / 3600.0  # per GPU x GPUs per replica
        if work.sum() > 0:
            usd[mine] = bill * work / work.sum()
        elif bill > 0:
            idle.append((name, bill))
    features = np.asarray(calls.feature, dtype=np.int64)
    frame = pd.DataFrame({
        "request": parent,
        "class": pd.Categorical.from_codes(np.asarray(calls.cls, dtype=np.int64), calls.class_names),
        "user": np.asarray(calls.user, dtype=np.int64),
        "feature": pd.Categorical.from_codes(features, calls.feature_names),
        "endpoint": pd.Categorical.from_codes(endpoint, calls.endpoint_names),
        "arrival_s": np.asarray(calls.arrival, dtype=float),
        "tokens_in": np.where(paid, prompt, 0).astype(np.int64),
        "tokens_in_cached": np.where(paid, read, 0).astype(np.int64),
        "tokens_in_cache_written": np.where(paid, written, 0).astype(np.int64),
        "tokens_out": output.astype(np.int64),
        "usd": usd,
        "stage": pd.Categorical.from_codes(np.zeros(n, dtype=np.int64), STAGES),
        "resource": np.asarray(calls.endpoint_names, dtype=object)[endpoint] if n else np.empty(0, dtype=object),
        "batch": batch,
    })
    if not inside.all():
        frame = frame[inside].reset_index(drop=True)
    for name, bill in idle:
        idle_rows = _stage_frame(rec, "model", name, _share(bill, np.zeros(len(arrived)), arrived), None, name)
        frame = pd.concat([frame, idle_rows], ignore_index=True)
    return frame


def _work(calls: Recorder, model, workload: Workload, name: str, mine: np.ndarray, prompt: np.ndarray,
          output: np.ndarray) -> np.ndarray:
    if model.engine is None:  # plain service time: the time it held its slot
        return (np.asarray(calls.end, dtype=float) - np.asarray(calls.admit, dtype=float))[mine]
    st = model.engine.step_time
    prefilled = np.maximum(prompt - cache_columns(calls)[0], 1)  # cached prefix tokens are not computed
    prompt, prefilled, output = prompt[mine], prefilled[mine], output[mine]
    work = st.per_prefill_token_s * prefilled + output * (st.per_decode_seq_s + st.base_s / full_batch(workload, name))
    # Decode step j reads prompt + j context tokens; the prefilled tokens attend to the cached ones and each other.
    work += st.per_kv_token_s * np.maximum(output - 1, 0) * (prompt + output / 2)
    work += st.per_prefill_attention_s * prefilled * (prompt - prefilled + (prefilled + 1) / 2)
    return work


# ------------------------------------------------------------------ the application's stages

def _stage_items(rec: Recorder, workload: Workload) -> Iterator[tuple[str, str, np.ndarray, float, np.ndarray, float]]:
    """Each priced stage resource: (stage, resource, units per request, USD per unit, use per request (what its
    hourly bill is shared by), USD per hour). Units are tokens embedded or hops; use is queries embedded, hops
    or lookups. Arrays are per request of `rec`."""
    pipeline = workload.pipeline
    if pipeline is None:
        return
    n = len(rec.arrival)
    none = np.zeros(n)
    output_cache = pipeline.output_cache
    if output_cache is not None and output_cache.hourly_usd and rec.cache_code is not None:
        log = Recorder.rows(rec.cache_code, 2, np.int64)
        yield ("cache", "output", none, 0.0,
               np.bincount(log[:, 0], weights=log[:, 1] != BYPASS, minlength=n), output_cache.hourly_usd)
    if rec.flow_log is not None and any(t.price_per_call_usd or t.hourly_usd for t in pipeline.tools.values()):
        attempts = tool_attempts(rec, n)
        for name, tool in pipeline.tools.items():
            if tool.price_per_call_usd or tool.hourly_usd:
                yield "tool", name, attempts[name], tool.price_per_call_usd, attempts[name], tool.hourly_usd
    retrieval = pipeline.retrieval
    if retrieval is None or rec.retrieval_usage is None:
        return
    usage = Recorder.rows(rec.retrieval_usage, len(USAGE_FIELDS) + len(retrieval.backends))

    def per_request(column: int) -> np.ndarray:
        return np.bincount(usage[:, 0].astype(np.int64), weights=usage[:, column], minlength=n)

    embedding = retrieval.embedding
    for name, cache, column in (("retrieval", retrieval.cache, 1),
                                ("embedding", embedding.cache if embedding is not None else None, 2)):
        if cache is not None and cache.hourly_usd:
            yield "cache", name, none, 0.0, per_request(column), cache.hourly_usd
    if embedding is not None and (embedding.price_per_mtok or embedding.hourly_usd):
        yield ("embedding", "embedding", per_request(4), embedding.price_per_mtok / 1e6, per_request(3),
               embedding.hourly_usd)
    for k, (name, backend) in enumerate(retrieval.backends.items()):
        if backend.price_per_query_usd or backend.hourly_usd:
            hops = per_request(len(USAGE_FIELDS) + k)
            yield "backend", name, hops, backend.price_per_query_usd, hops, backend.hourly_usd


def stage_costs(rec: Recorder, workload: Workload, arrived: np.ndarray, window_s: float) -> dict[str, float]:
    """Dollars of each priced application stage (embedding, backend, cache) over a window of `window_s`
    seconds: the per-unit prices of the requests `arrived` in it, plus every hourly bill over it."""
    out: dict[str, float] = {}
    for stage, _, units, price, _, hourly in _stage_items(rec, workload):
        usd = float((units[arrived] * price).sum()) + hourly * window_s / 3600.0
        out[stage] = out.get(stage, 0.0) + usd
    return out


def priced_stages(workload: Workload) -> bool:
    """Whether any application stage has a price (then the summary breaks its cost down by stage)."""
    pipeline = workload.pipeline
    if pipeline is None:
        return False
    if any(t.price_per_call_usd or t.hourly_usd for t in pipeline.tools.values()):
        return True
    caches = [pipeline.output_cache]
    retrieval = pipeline.retrieval
    if retrieval is not None:
        embedding = retrieval.embedding
        caches += [retrieval.cache, embedding.cache if embedding is not None else None]
        if embedding is not None and (embedding.price_per_mtok or embedding.hourly_usd):
            return True
        if any(b.price_per_query_usd or b.hourly_usd for b in retrieval.backends.values()):
            return True
    return any(c is not None and c.hourly_usd for c in caches)


def _stage_rows(rec: Recorder, workload: Workload, arrived: np.ndarray,
                window_s: float) -> Iterator[tuple[str, str, np.ndarray, Optional[np.ndarray]]]:
    """(stage, resource, USD per request, tokens embedded per request or None) of each priced resource."""
    for stage, resource, units, price, use, hourly in _stage_items(rec, workload):
        usd = np.append(np.where(arrived, units * price, 0.0), 0.0)  # the last element: nobody's (see _share)
        if hourly:
            usd += _share(hourly * window_s / 3600.0, use, arrived)
        yield stage, resource, usd, (np.where(arrived, units, 0.0) if stage == "embedding" else None)


def _share(bill: float, use: np.ndarray, arrived: np.ndarray) -> np.ndarray:
    """A bill shared among the requests `arrived` by their `use`; evenly if none used it; with no request,
    the whole bill at index -1 (an array one longer: the last element is the unattributed rest)."""
    weights = np.where(arrived, use, 0.0)
    if weights.sum() <= 0:
        weights = arrived.astype(float)
    out = np.zeros(len(arrived) + 1)
    total = weights.sum()
    if total > 0:
        out[:-1] = bill * weights / total
    else:
        out[-1] = bill
    return out


def _stage_frame(rec: Recorder, stage: str, resource: str, usd: np.ndarray, tokens: Optional[np.ndarray],
                 endpoint: Optional[str] = None) -> pd.DataFrame:
    """Ledger rows of one stage resource: the requests it cost something (request -1: nobody's); `tokens`
    (embedded) go to tokens_in."""
    import pandas as pd

    n = len(rec.arrival)
    extra = usd[n] if len(usd) > n else 0.0
    usd = usd[:n]
    index = np.flatnonzero(usd > 0)
    values = usd[index]
    embedded = tokens[index] if tokens is not None else np.zeros(len(index))
    if extra > 0:
        index, values, embedded = np.append(index, -1), np.append(values, extra), np.append(embedded, 0)
    known, at = index >= 0, np.maximum(index, 0)

    def column(values: list, fill) -> np.ndarray:
        return np.where(known, np.asarray(values)[at], fill) if n else np.full(len(index), fill)

    calls = rec.calls if rec.calls is not None else rec
    zeros = np.zeros(len(index), dtype=np.int64)
    code = calls.endpoint_names.index(endpoint) if endpoint is not None else -1
    return pd.DataFrame({
        "request": index.astype(np.int64),
        "class": pd.Categorical.from_codes(column(rec.cls, -1).astype(np.int64), rec.class_names),
        "user": column(rec.user, -1).astype(np.int64),
        "feature": pd.Categorical.from_codes(column(rec.feature, -1).astype(np.int64), rec.feature_names),
        "endpoint": pd.Categorical.from_codes(np.full(len(index), code), calls.endpoint_names),
        "arrival_s": column(rec.arrival, np.nan).astype(float),
        "tokens_in": np.asarray(embedded).astype(np.int64),
        "tokens_in_cached": zeros,
        "tokens_in_cache_written": zeros,
        "tokens_out": zeros,
        "usd": values,
        "stage": pd.Categorical([stage] * len(index), categories=STAGES),
        "resource": np.full(len(index), resource, dtype=object),
        "batch": np.zeros(len(index), dtype=bool),
    })
