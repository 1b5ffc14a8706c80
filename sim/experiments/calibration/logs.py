"""Reading a server's measurements: per-step logs, per-request logs, and vLLM benchmark results.

Columns are found by their usual names (`COLUMNS`), or named with `columns`
({"duration": "my_col", ...}). Times are seconds; a column whose name ends in
`_ms` is read as milliseconds. Errors are one line naming the file (and row).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from sim.config.traces import NOT_FOUND, describe_header, excerpt, file_problem

# Usual names of each quantity, first match wins.
COLUMNS = {
    # step logs
    "duration": ("duration_s", "step_s", "dur_s", "step_time_s", "duration_ms", "step_ms"),
    "start": ("t_s", "start_s", "time_s", "timestamp_s"),
    "decode": ("n_decode", "decode_seqs", "num_decode", "decoding"),
    "prefill": ("prefill_tokens", "n_prefill_tokens", "num_prefill_tokens"),
    "kv": ("kv_tokens", "context_tokens", "num_kv_tokens"),
    # request logs
    "arrival": ("arrival_s", "arrival_time", "arrival", "submit_s", "start_time", "send_s"),
    "prompt": ("prompt_tokens", "input_tokens", "prompt_len", "input_len"),
    "output": ("output_tokens", "output_len", "generated_tokens", "completion_tokens"),
    "requested": ("max_new_tokens", "max_tokens"),
    "ttft": ("ttft_s", "ttft", "ttft_ms"),
    "e2e": ("e2e_s", "latency_s", "e2e_latency_s", "e2e", "e2e_ms", "latency_ms"),
    "first_token": ("first_token_s",),
    "finish": ("finish_s", "end_s"),
    "status": ("status",),
    "error": ("error",),
    # either
    "run": ("level", "run", "load", "label"),
}
STEP_PARTS = ("prep_s", "fwd_s", "upd_s")  # transformers' step phases: their sum is the step
FINISHED = {"", "finished", "ok", "success", "completed", "done", "200"}


class LogError(ValueError):
    """A measurement file that cannot be read: the message names the file and, where known, the row."""


@dataclass
class StepLog:
    """One engine's steps, in order, from one file (several runs when it has a run column)."""

    path: str
    duration: np.ndarray
    decode: np.ndarray
    prefill: np.ndarray
    kv: Optional[np.ndarray]
    start: Optional[np.ndarray]
    run: np.ndarray  # run label per step ("" when the file has none)

    def runs(self) -> list[str]:
        return list(dict.fromkeys(self.run.tolist()))


@dataclass
class RequestLog:
    """One run's requests: what was sent (replayed) and what was measured (where it finished)."""

    path: str
    run: str
    arrival: Optional[np.ndarray]  # seconds; None: unknown (a vLLM result without start times)
    prompt: np.ndarray
    output: np.ndarray
    ttft: np.ndarray               # NaN where the request did not finish
    e2e: np.ndarray
    finished: np.ndarray           # bool: measured (its latencies count)
    request_rate: float = math.inf  # for a log without arrival times: how they were sent
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None

    @property
    def label(self) -> str:
        name = Path(self.path).name
        return f"{name} [{self.run}]" if self.run else name


def read_logs(paths: list[str], columns: Optional[dict[str, str]] = None) -> tuple[list[StepLog], list[RequestLog]]:
    """Read every file; each is a step log or a request log, told apart by its columns."""
    steps, requests = [], []
    for path in paths:
        p = Path(path).expanduser()
        problem = file_problem(p)
        if problem is not None:
            raise LogError(f"{path}: {'no such file' if problem == NOT_FOUND else problem}")
        if p.suffix == ".json":
            requests.append(read_vllm_result(p))
            continue
        header, rows = _table(p)
        names = _resolve(header, columns or {})
        if "duration" in names or all(part in header for part in STEP_PARTS) or (
                "start" in names and "decode" in names):
            steps.append(_step_log(p, header, rows, names))
        elif "prompt" in names:
            requests.extend(_request_logs(p, header, rows, names))
        else:
            raise LogError(f"{path}: neither a step log (step duration, decoding sequences, prefill tokens) nor a "
                           f"request log (arrival, prompt and output tokens, TTFT, end-to-end); "
                           f"{describe_header(header)}")
    return steps, requests


def _table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV (or JSON-lines) file as its header and rows of strings."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".jsonl":
        rows = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LogError(f"{path}:{k}: not JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise LogError(f"{path}:{k}: expected an object per line")
                rows.append({key: "" if v is None else str(v) for key, v in row.items()})
        header = list(dict.fromkeys(key for row in rows for key in row))
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise LogError(f"{path}: no rows")
    return header, rows


def _resolve(header: list[str], columns: dict[str, str]) -> dict[str, str]:
    """Quantity -> column name, from `columns` first, then the usual names."""
    names = {}
    for key, name in columns.items():
        if key in COLUMNS and name in header:
            names[key] = name
    for key, options in COLUMNS.items():
        if key not in names:
            found = next((name for name in options if name in header), None)
            if found is not None:
                names[key] = found
    missing = [f"{k}={v}" for k, v in columns.items() if k not in COLUMNS or v not in header]
    if missing:
        raise LogError(f"--columns {missing[0]}: no such column ({describe_header(header)})")
    return names


def _numbers(path: Path, rows: list[dict[str, str]], name: str, allow_empty: bool = False) -> np.ndarray:
    scale = 1000.0 if name.endswith("_ms") else 1.0
    out = np.empty(len(rows))
    for k, row in enumerate(rows):
        cell = row.get(name, "")
        if cell == "" and allow_empty:
            out[k] = math.nan
            continue
        try:
            out[k] = float(cell)
        except ValueError:
            raise LogError(f"{path}: row {k + 2}: column {name!r}: {excerpt(cell)} is not a number") from None
    if not allow_empty and not np.all(np.isfinite(out)):
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise LogError(f"{path}: row {bad + 2}: column {name!r} must be a finite number")
    return out / scale


def _step_log(path: Path, header: list[str], rows: list[dict[str, str]], names: dict[str, str]) -> StepLog:
    for key in ("decode", "prefill"):
        if key not in names:
            raise LogError(f"{path}: a step log needs the {key} column ({' or '.join(COLUMNS[key])})")
    start = _numbers(path, rows, names["start"]) if "start" in names else None
    if "duration" in names:
        duration = _numbers(path, rows, names["duration"])
    elif all(part in header for part in STEP_PARTS):
        duration = sum(_numbers(path, rows, part) for part in STEP_PARTS)
    else:  # start times only: a step lasts until the next one starts (the last one is dropped)
        duration = np.diff(start)
        rows, start = rows[:-1], start[:-1]
    run = np.array([row.get(names["run"], "") for row in rows]) if "run" in names else np.full(len(rows), "")
    log = StepLog(str(path), duration, _numbers(path, rows, names["decode"]), _numbers(path, rows, names["prefill"]),
                  _numbers(path, rows, names["kv"]) if "kv" in names else None, start, run)
    if np.any(log.duration <= 0) or np.any(log.decode < 0) or np.any(log.prefill < 0):
        raise LogError(f"{path}: step durations must be positive and token counts non-negative")
    return log


def _request_logs(path: Path, header: list[str], rows: list[dict[str, str]],
                  names: dict[str, str]) -> list[RequestLog]:
    """One RequestLog per run label (one when the file has no run column)."""
    for key in ("arrival", "output"):
        if key not in names and not (key == "output" and "requested" in names):
            raise LogError(f"{path}: a request log needs the {key} column ({' or '.join(COLUMNS[key])})")
    labels = [row.get(names["run"], "") for row in rows] if "run" in names else [""] * len(rows)
    out = []
    for label in dict.fromkeys(labels):
        mine = [row for row, lab in zip(rows, labels) if lab == label]
        out.append(_request_log(path, mine, names, label))
    return out


def _request_log(path: Path, rows: list[dict[str, str]], names: dict[str, str], run: str) -> RequestLog:
    arrival = _numbers(path, rows, names["arrival"])
    prompt = _numbers(path, rows, names["prompt"])
    output = _numbers(path, rows, names["output"], allow_empty=True) if "output" in names \
        else np.full(len(rows), math.nan)
    if "requested" in names:  # unfinished requests would have produced what they asked for
        requested = _numbers(path, rows, names["requested"], allow_empty=True)
        output = np.where(np.isnan(output), requested, output)
    if np.any(np.isnan(output)):
        bad = int(np.flatnonzero(np.isnan(output))[0])
        raise LogError(f"{path}: row {bad + 2}: no output token count (nor max_new_tokens)")
    ttft, e2e = _latencies(path, rows, names, arrival)
    finished = np.isfinite(ttft) & np.isfinite(e2e)
    if "status" in names:
        finished &= np.array([row.get(names["status"], "").lower() in FINISHED for row in rows])
    if "error" in names:
        finished &= np.array([not row.get(names["error"], "") for row in rows])
    if not finished.any():
        raise LogError(f"{path}: no finished request with TTFT and end-to-end latency to compare with")
    return RequestLog(str(path), run, arrival, np.maximum(np.rint(prompt), 1), np.maximum(np.rint(output), 1),
                      np.where(finished, ttft, math.nan), np.where(finished, e2e, math.nan), finished)


def _latencies(path: Path, rows, names: dict[str, str], arrival: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if "ttft" in names:
        ttft = _numbers(path, rows, names["ttft"], allow_empty=True)
    elif "first_token" in names:
        ttft = _numbers(path, rows, names["first_token"], allow_empty=True) - arrival
    else:
        raise LogError(f"{path}: a request log needs TTFT ({' or '.join(COLUMNS['ttft'])} or first_token_s)")
    if "e2e" in names:
        e2e = _numbers(path, rows, names["e2e"], allow_empty=True)
    elif "finish" in names:
        e2e = _numbers(path, rows, names["finish"], allow_empty=True) - arrival
    else:
        raise LogError(f"{path}: a request log needs the end-to-end latency ({' or '.join(COLUMNS['e2e'])} "
                       "or finish_s)")
    return ttft, e2e


def read_vllm_result(path: Path) -> RequestLog:
    """The JSON of `vllm bench serve --save-result --save-detailed`: per-request lengths, TTFTs and ITLs.

    vLLM keeps no send times (newer versions may: `start_times`); the requests were sent at
    `request_rate` (inf: all at once), Poisson or gamma by `burstiness`, at most `max_concurrency`
    in flight, and a replay sends them the same way.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogError(f"{path}: cannot read as JSON: {exc}") from None
    needed = ("input_lens", "output_lens", "ttfts", "itls")
    if not isinstance(data, dict) or any(key not in data for key in needed):
        raise LogError(f"{path}: not a vLLM benchmark result with per-request detail (needs {', '.join(needed)}: "
                       "run vllm bench serve with --save-result --save-detailed)")
    try:
        prompt = np.asarray(data["input_lens"], dtype=float)
        output = np.asarray(data["output_lens"], dtype=float)
        ttft = np.asarray([math.nan if t is None else t for t in data["ttfts"]], dtype=float)
        e2e = ttft + np.asarray([sum(itl) if itl else 0.0 for itl in data["itls"]], dtype=float)
    except (TypeError, ValueError):
        raise LogError(f"{path}: input_lens, output_lens, ttfts and itls must hold numbers") from None
    errors = data.get("errors") or [""] * len(prompt)
    finished = np.isfinite(ttft) & np.array([not e for e in errors]) & (output > 0)
    if not finished.any():
        raise LogError(f"{path}: no successful request to compare with")
    start = data.get("start_times")
    arrival = np.asarray(start, dtype=float) - min(start) if start else None
    rate = data.get("request_rate", "inf")
    concurrency = data.get("max_concurrency")
    keep = finished  # failed requests are neither measured nor replayed: their cost is unknown
    return RequestLog(str(path), "", None if arrival is None else arrival[keep], np.maximum(prompt[keep], 1),
                      np.maximum(output[keep], 1), ttft[keep], e2e[keep], np.ones(int(keep.sum()), dtype=bool),
                      request_rate=math.inf if rate in ("inf", None) else float(rate),
                      burstiness=float(data.get("burstiness") or 1.0),
                      max_concurrency=int(concurrency) if concurrency else None)
