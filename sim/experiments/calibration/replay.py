"""Replaying a measured request log through the engine, and fitting the engine to request logs.

A replay sends the log's requests at their recorded times (or, for a vLLM result that
kept none, the way the benchmark sent them) with their token counts to one replica of
the engine block, and reads the simulated TTFT, TPOT and end-to-end latency of the
requests that finished in the measurement.

Fitting without a step log is simulation-based: the step-time coefficients and the
noise are searched (Nelder-Mead on their logarithms, the same random numbers for every
candidate) for the values whose replays best reproduce every log's TTFT, TPOT and
end-to-end quantiles.
"""
from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy.optimize import minimize

from sim.config.loader import validate_model
from sim.config.schema import Workload
from sim.config.serving import StepTime
from sim.model.pipeline import simulate

from .logs import RequestLog

QUANTILES = (50, 95, 99)
MEASURES = ("ttft", "tpot", "e2e")
FIT_QUANTILES = (50, 90, 99)
SERVER = "server"


@dataclass
class Replay:
    """A request log made ready to simulate again and again (one validated workload)."""

    log: RequestLog
    workload: Workload
    order: Optional[np.ndarray]   # replayed request k is the log's row order[k] (None: replayed in distribution)
    stalls: list[dict]            # the measured run's stalls, on the replay's clock
    folder: tempfile.TemporaryDirectory

    def run(self, step_time: dict, replications: int, seed: int) -> dict[str, np.ndarray]:
        """Simulated ttft, tpot and e2e of the measured requests, one array per replication, concatenated."""
        self.workload.models[SERVER].engine.step_time = StepTime(**{**step_time, "stalls": self.stalls})
        out = {m: [] for m in MEASURES}
        for r in range(replications):
            rec = simulate(self.workload, replication=r, seed=seed)
            arrival = np.asarray(rec.arrival)
            ttft, e2e = np.asarray(rec.first_token) - arrival, np.asarray(rec.end) - arrival
            output = np.asarray(rec.output, dtype=float)
            if self.order is not None:  # the same requests as were measured
                measured = self.log.finished[self.order]
                ttft, e2e, output = ttft[measured], e2e[measured], output[measured]
            out["ttft"].append(ttft)
            out["e2e"].append(e2e)
            out["tpot"].append(_tpot(ttft, e2e, output))
        return {m: np.concatenate(v) for m, v in out.items()}


def _tpot(ttft: np.ndarray, e2e: np.ndarray, output: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(output > 1, (e2e - ttft) / (output - 1), np.nan)


def measured(log: RequestLog) -> dict[str, np.ndarray]:
    """The log's own ttft, tpot and e2e of its finished requests."""
    f = log.finished
    return {"ttft": log.ttft[f], "e2e": log.e2e[f], "tpot": _tpot(log.ttft[f], log.e2e[f], log.output[f])}


def quantiles(values: dict[str, np.ndarray], qs=QUANTILES) -> dict[str, float]:
    """`{measure}_p{q}` over the finite values."""
    out = {}
    for m in MEASURES:
        v = values[m][np.isfinite(values[m])]
        for q in qs:
            out[f"{m}_p{q}"] = float(np.percentile(v, q)) if v.size else math.nan
    return out


def prepare(log: RequestLog, engine: dict, max_batch: int, stalls: list[tuple[float, float]] = ()) -> Replay:
    """A workload that replays `log` on one replica of `engine` (a workload's engine block).

    `stalls`: (start s on the log's clock, duration s) pauses measured on the server during this run.
    """
    folder = tempfile.TemporaryDirectory(prefix="llmsim-calibrate-")
    order, on_clock = None, []
    if log.arrival is not None:
        order = np.argsort(log.arrival, kind="stable")
        origin = float(log.arrival[order[0]])  # the replay starts at the first arrival
        on_clock = [{"at_s": max(t - origin, 0.0), "duration_s": d} for t, d in stalls]
        arrival, span = _trace_class(log, order, Path(folder.name) / "requests.csv")
        duration = span + 1.0
    else:
        arrival, duration = _benchmark_class(log)
    data = {
        "version": 1, "name": f"replay of {log.label}",
        "simulation": {"duration_s": duration, "warmup_s": 0.0, "seed": 1, "replications": 1},
        "traffic": {"classes": {"requests": arrival}},
        "models": {SERVER: {"kind": "self_hosted", "replicas": 1, "max_batch": max_batch, "engine": engine}},
    }
    if log.arrival is None and log.max_concurrency and math.isfinite(log.request_rate):
        data["models"][SERVER]["connections"] = {"pool_size": log.max_concurrency, "handshake_s": 0.0}
    workload = validate_model(Workload, data, {}, "llmsim calibrate (replay)", folder.name)
    return Replay(log, workload, order, on_clock, folder)


def _trace_class(log: RequestLog, order: np.ndarray, path: Path) -> tuple[dict, float]:
    """A trace-replay class of the log's requests, written to `path`; and its time span."""
    times = log.arrival[order] - log.arrival[order[0]]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["time", "prompt_tokens", "output_tokens"])
        for t, p, o in zip(times, log.prompt[order], log.output[order]):
            writer.writerow([repr(float(t)), int(p), int(o)])
    span = float(times[-1])
    arrival = {"kind": "trace", "format": "csv", "path": str(path)}
    if span <= 0:  # all sent at once
        arrival["end_s"] = 1.0
    return {"arrival": arrival}, max(span, 1.0)


def _benchmark_class(log: RequestLog) -> tuple[dict, float]:
    """A class sending requests as a vLLM benchmark did: all at once, at a rate, or N in flight."""
    tokens = {"prompt_tokens": {"kind": "empirical", "values": log.prompt.tolist()},
              "output_tokens": {"kind": "empirical", "values": log.output.tolist()}}
    n = int(log.prompt.size)
    if math.isfinite(log.request_rate):
        cv = 1.0 / math.sqrt(log.burstiness)
        kind = {"kind": "poisson", "rate_rps": log.request_rate} if cv == 1 else \
            {"kind": "gamma", "rate_rps": log.request_rate, "cv": cv}
        return {"arrival": kind, **tokens}, n / log.request_rate
    users = log.max_concurrency or n
    # N users with no think time keep N requests in flight: what max_concurrency does with rate inf.
    duration = float(np.nanmax(log.e2e)) * n / users
    return {"arrival": {"kind": "closed", "users": users, "think_time_s": 0.0}, **tokens}, max(duration, 1.0)


# ----------------------------------------------------------------- fitting on request logs

def fit_requests(replays: list[Replay], start: dict, replications: int = 3, seed: int = 1,
                 rounds: int = 3, evaluations_per_round: int = 120,
                 progress: Optional[Callable[[str], None]] = None) -> tuple[dict, float, int]:
    """Step-time coefficients and noise whose replays reproduce the logs' quantiles best.

    Returns (step_time, loss, evaluations); the loss is the mean squared log-ratio of simulated
    to measured TTFT, TPOT and e2e p50/p90/p99 over all logs.
    """
    names = ("base_s", "per_decode_seq_s", "per_prefill_token_s", "noise_cv")
    targets = [quantiles(measured(r.log), FIT_QUANTILES) for r in replays]
    evaluations = 0

    def loss(x: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        step_time = dict(zip(names, np.exp(x).tolist()))
        total, count = 0.0, 0
        for replay, target in zip(replays, targets):
            got = quantiles(replay.run(step_time, replications, seed), FIT_QUANTILES)
            for key, value in target.items():
                if value > 0 and got[key] > 0:
                    total += math.log(got[key] / value) ** 2
                    count += 1
        return total / max(count, 1)

    x = np.log([max(start[n], 1e-9) for n in names])
    best = math.inf
    for _ in range(rounds):  # a fresh simplex around the best point so far: Nelder-Mead stalls otherwise
        result = minimize(loss, x, method="Nelder-Mead",
                          options={"maxfev": evaluations_per_round, "xatol": 0.01, "fatol": 1e-7,
                                   "initial_simplex": _simplex(x)})
        if result.fun >= best * (1 - 1e-3):
            break
        x, best = result.x, float(result.fun)
        if progress is not None:
            progress(f"{evaluations} candidate blocks tried, RMS log-error {math.sqrt(best):.1%}")
    return dict(zip(names, np.exp(x).tolist())), best, evaluations


def _simplex(x0: np.ndarray) -> np.ndarray:
    """A starting simplex spanning a factor of e around the first guess in each coefficient."""
    return np.vstack([x0] + [x0 + np.eye(x0.size)[k] for k in range(x0.size)])


def first_guess(logs: list[RequestLog]) -> dict:
    """Rough coefficients from the logs alone, to start the search.

    A decode step is the median TPOT; some of it is per sequence (the running batch from
    Little's law); a prompt costs the median TTFT less a step, over its tokens.
    """
    tpot = np.nanmedian(np.concatenate([measured(log)["tpot"] for log in logs]))
    ttft = np.nanmedian(np.concatenate([measured(log)["ttft"] for log in logs]))
    prompt = np.median(np.concatenate([log.prompt for log in logs]))
    batch = []
    for log in logs:
        if log.arrival is not None and log.finished.sum() > 1:
            span = np.ptp(log.arrival) + np.nanmax(log.e2e)
            batch.append(np.nansum(log.e2e) / max(span, 1e-9))
        elif log.max_concurrency:
            batch.append(log.max_concurrency)
    batch_mean = max(float(np.mean(batch)) if batch else 1.0, 1.0)
    return {"base_s": 0.7 * tpot, "per_decode_seq_s": 0.3 * tpot / batch_mean,
            "per_prefill_token_s": max(ttft - tpot, 0.1 * tpot) / max(prompt, 1.0), "noise_cv": 0.1}
