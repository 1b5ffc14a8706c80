"""What a run's flows did (sim.model.application.flow): stage times, per-step times, per-tool attempts and failures.

Stages: a request's top-level flow steps made of tool calls only are its `tool` stage; its other
top-level steps (model steps, groups with a model step) its `flow_calls` stage. With the pipeline's
own stages they add up to the request's end-to-end latency. Per step (nested ones too, so they may
overlap): `flow_step_<name>_mean_s` and its share of the mean latency; `flow_step_<name>_run_share`,
the share of requests that ran it (not skipped). Per tool: calls per request (steps run),
attempts per call, the share of calls that failed after their retries, the mean wait for a slot
and the utilisation (the last two over the whole run, as for retrieval backends).
"""
from __future__ import annotations

import math

import numpy as np

from sim.config.pipeline import Pipeline
from sim.model.application.flow import CALLS_STAGE, FAILED, SKIPPED, TOOL_STAGE, flow_rows

from .recorder import Recorder

FLOW_STAGES = ("tool", "flow_calls")
TOOL_METRICS = ("calls_per_request", "attempts_mean", "failed_share", "wait_mean_s")


def _step_names(pipeline: Pipeline) -> list[str]:
    names = (s.name for _, flow in pipeline.all_flows() for top in flow for s in top.walk() if not s.answer)
    return list(dict.fromkeys(names))


def flow_metric_names(pipeline: Pipeline) -> list[str]:
    """The flow metrics `summarise` produces for this pipeline (the stages are named with the others)."""
    names = [f"tool_{t}_{m}" for t in pipeline.tools for m in TOOL_METRICS]
    names += [f"utilisation_tool_{t}" for t in pipeline.tools]
    for step in _step_names(pipeline):
        names += [f"flow_step_{step}_{m}" for m in ("run_share", "mean_s", "share")]
    return names


def _per_request(rows: np.ndarray, mine: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Each of the n requests' sum of `values` over the flow_log rows `mine` picks."""
    return np.bincount(rows[mine, 0].astype(np.int64), weights=values[mine], minlength=n)


def _of_step(rows: np.ndarray, per_step: list[int]) -> np.ndarray:
    """Per flow_log row: its step's entry of `per_step` (a FlowSteps column)."""
    return np.asarray(per_step, dtype=np.int64)[rows[:, 1].astype(np.int64)]


def flow_stage_times(rec: Recorder, n: int) -> dict[str, np.ndarray]:
    """Per request: seconds in top-level tool steps (`tool`) and in its other top-level flow steps (`flow_calls`)."""
    rows = flow_rows(rec)
    stage, seconds = _of_step(rows, rec.flow_steps.stage), rows[:, 3] - rows[:, 2]
    return {name: _per_request(rows, stage == code, seconds, n)
            for name, code in (("tool", TOOL_STAGE), ("flow_calls", CALLS_STAGE))}


def step_times(rec: Recorder, n: int) -> dict[str, np.ndarray]:
    """Per step name: each request's seconds in it (0 where it did not run)."""
    if rec.flow_log is None:
        return {}
    rows = flow_rows(rec)
    step, seconds = rows[:, 1].astype(np.int64), rows[:, 3] - rows[:, 2]
    return {name: _per_request(rows, step == k, seconds, n) for k, name in enumerate(rec.flow_steps.names)}


def flow_stats(rec: Recorder, arrived: np.ndarray) -> dict[str, float]:
    """Per step, the share of requests (after warm-up) that ran it; per tool, calls, attempts, failures, waits."""
    if rec.flow_log is None:
        return {}
    rows = flow_rows(rec)
    rows = rows[arrived[rows[:, 0].astype(np.int64)]]
    step, label = rows[:, 1].astype(np.int64), rows[:, 4].astype(np.int64)
    ran = label != SKIPPED
    requests = max(float(arrived.sum()), 1.0)
    steps = rec.flow_steps
    out: dict[str, float] = {}
    for k, name in enumerate(steps.names):
        out[f"flow_step_{name}_run_share"] = float((ran & (step == k)).sum() / requests)
    stats = rec.flow_stats or {}
    tool = _of_step(rows, steps.tool)
    for t, name in enumerate(rec.flow_tools):
        mine = ran & (tool == t)
        calls = int(mine.sum())
        out[f"tool_{name}_calls_per_request"] = calls / requests
        out[f"tool_{name}_attempts_mean"] = float(rows[mine, 5].mean()) if calls else math.nan
        out[f"tool_{name}_failed_share"] = float((label[mine] == FAILED).mean()) if calls else math.nan
        for key in (f"tool_{name}_wait_mean_s", f"utilisation_tool_{name}"):
            out[key] = stats.get(key, math.nan)
    return out


def tool_attempts(rec: Recorder, n: int) -> dict[str, np.ndarray]:
    """Per tool: each request's attempts (what per-call prices and hourly bills are shared by)."""
    rows = flow_rows(rec)
    tool = _of_step(rows, rec.flow_steps.tool)
    return {name: _per_request(rows, tool == t, rows[:, 5], n) for t, name in enumerate(rec.flow_tools)}
