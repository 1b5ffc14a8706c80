"""The cost ledger: one row per model call, with its request, user, feature, endpoint, tokens and dollars.

API calls cost their tokens at the endpoint's prices. Self-hosted replicas cost
their hours, whoever used them; the ledger shares an endpoint's bill for the
run among its calls in proportion to the work each did: full-batch seconds,
the same measure as utilisation (prompt tokens x per_prefill_token_s + output
tokens x (per_decode_seq_s + base_s / full batch)), or the service time for a
plain `service_time` endpoint. So every dollar of the run lands on some call.

A call stopped half-way (a time limit, or the user cancelling the stream) is
billed its prompt if it reached a server and the output tokens it made; a call
that never ran (queue full, expired, refused) costs nothing.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from sim.config.schema import Api, Workload
from sim.model.offered import full_batch

from .recorder import CANCELLED, COMPLETED, TIMED_OUT, Recorder


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
    read, written = np.zeros(n), np.zeros(n)
    for c, (r, w) in (calls.cached_tokens or {}).items():
        read[c], written[c] = r, w
    return read, written


def api_usd(model: Api, prompt: np.ndarray, output: np.ndarray, read: np.ndarray, written: np.ndarray) -> np.ndarray:
    """Dollars of API calls: input at its price, cached reads and cache writes at their multipliers, output."""
    cache = model.prompt_cache
    plain = prompt - read - written
    tokens_in = (plain + read * cache.read_price_multiplier + written * cache.write_price_multiplier
                 if cache is not None else prompt)
    return (tokens_in * model.price_per_mtok_in + output * model.price_per_mtok_out) / 1e6


def ledger(rec: Recorder, workload: Workload) -> pd.DataFrame:
    """One row per model call of the run (a request answered without a call has none)."""
    calls = rec.calls if rec.calls is not None else rec
    n = len(calls.arrival)
    parent = np.asarray(calls.parent if calls.parent is not None else range(n), dtype=np.int64)
    endpoint = np.asarray(calls.endpoint, dtype=np.int64)
    prompt = np.asarray(calls.prompt, dtype=float)
    paid, output = billed(calls)
    usd = np.zeros(n)
    read, written = cache_columns(calls)
    held = rec.samples[-1][1] if rec.samples else {}
    for k, (name, model) in enumerate(workload.models.items()):
        mine = (endpoint == k) & paid
        if isinstance(model, Api):
            usd[mine] = api_usd(model, prompt[mine], output[mine], read[mine], written[mine])
            continue
        work = _work(calls, model, workload, name, mine, prompt, output)
        bill = model.replica_hourly_usd * held.get(name, (0, 0, 0, 0))[3] / 3600.0  # per GPU x GPUs per replica
        if work.sum() > 0:
            usd[mine] = bill * work / work.sum()
    features = np.asarray(calls.feature, dtype=np.int64)
    return pd.DataFrame({
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
    })


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
