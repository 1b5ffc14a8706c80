"""`llmsim calibrate`: an engine block fitted to a server's own measurements.

From step logs, the coefficients come from least squares on the steps (with
bootstrap intervals, the noise, slow episodes and stalls; `steps.py`); from request
logs alone, from simulation-based fitting (`replay.py`). Either way every request log
given is replayed through the fitted block and its measured and simulated TTFT,
TPOT and end-to-end quantiles are compared (the in-sample check).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from .logs import LogError, RequestLog, StepLog, read_logs
from .replay import MEASURES, QUANTILES, first_guess, fit_requests, measured, prepare, quantiles
from .steps import STALL_RATIO, StepFit, fit_steps

__all__ = ["Calibration", "LogError", "calibrate"]

DEFAULT_BATCH_TOKENS = 8192  # vLLM's chunked-prefill budget when a log does not show it


@dataclass
class Calibration:
    """What `llmsim calibrate` found: the engine block, what it rests on, and how well it replays."""

    engine: dict
    files: list[str]
    step_fit: Optional[StepFit] = None
    request_fit: Optional[dict] = None
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"engine": self.engine, "files": self.files, "checks": self.checks, "notes": self.notes}
        if self.step_fit is not None:
            fit = self.step_fit
            out["step_fit"] = {"intervals": {k: list(v) for k, v in fit.intervals.items()}, "steps": fit.steps,
                               "runs": fit.runs, "rms_s": fit.rms_s, "stalls": [
                                   {"run": r, "start_s": t, "duration_s": d, "excess_s": e}
                                   for r, t, d, e in fit.stalls], "check": fit.check}
        if self.request_fit is not None:
            out["request_fit"] = self.request_fit
        return out

    def to_yaml(self) -> str:
        """The engine block as YAML, with what it rests on as comments above it."""
        lines = [f"# llmsim calibrate {' '.join(Path(f).name for f in self.files)}"]
        for line in self.report():  # paragraphs wrapped; the check's table lines kept as they are
            wrapped = textwrap.wrap(line, 100, subsequent_indent="  ") if not line.startswith(" ") else [line]
            lines += [f"# {part}" for part in wrapped] or ["#"]
        body = yaml.safe_dump({"engine": _rounded(self.engine)}, sort_keys=False, width=110)
        return "\n".join(lines) + "\n" + body

    def report(self) -> list[str]:
        """What the fit rests on and the in-sample check, as lines of text."""
        lines = list(self.notes)
        fit = self.step_fit
        if fit is not None:
            lines.append("95% intervals (moving-block bootstrap over steps):")
            lines += [f"  {k} [{_num(lo)}, {_num(hi)}]" for k, (lo, hi) in fit.intervals.items()]
            for row in fit.check:
                lines.append(f"steps of {row['run']}: {row['steps']} measured mean {row['measured_mean_s'] * 1e3:.2f} ms, "
                             f"model {row['model_mean_s'] * 1e3:.2f} ms (noise and episodes included)")
        if self.checks:
            lines += ["", "In-sample check: each request log replayed through this block "
                      f"({self.checks[0]['replications']} replications; seconds)"]
            lines += check_table(self.checks)
        return lines


def check_table(checks: list[dict]) -> list[str]:
    """Measured vs simulated quantiles, a row per measure and quantile, a block per log."""
    lines = []
    for check in checks:
        lines.append(f"  {check['log']}: {check['requests']} measured requests")
        lines.append(f"    {'':<10}{'measured':>11}{'simulated':>11}{'error':>9}")
        for m in MEASURES:
            for q in QUANTILES:
                key = f"{m}_p{q}"
                got, want = check["simulated"][key], check["measured"][key]
                error = f"{got / want - 1:+.1%}" if want > 0 and math.isfinite(got) else "-"
                lines.append(f"    {key:<10}{_num(want):>11}{_num(got):>11}{error:>9}")
    return lines


def calibrate(paths: list[str], *, columns: Optional[dict[str, str]] = None,
              max_batch_tokens: Optional[int] = None, kv_cache_tokens: Optional[int] = None,
              max_batch: int = 256, replications: int = 10, seed: int = 1, bootstrap: int = 200,
              check: bool = True, progress: Optional[Callable[[str], None]] = None) -> Calibration:
    """Fit an engine block to the measurement files `paths` (step logs, request logs, vLLM results).

    Raises LogError (bad files) or ValueError (too little to fit) with a one-line message.
    """
    step_logs, request_logs = read_logs(paths, columns)
    say = progress or (lambda text: None)
    engine: dict = {}
    result = Calibration(engine, [str(p) for p in paths])
    if step_logs:
        say(f"fitting {sum(log.duration.size for log in step_logs)} steps")
        fit = fit_steps(step_logs, bootstrap=bootstrap, seed=seed)
        result.step_fit = fit
        engine["max_batch_tokens"] = max_batch_tokens or fit.batch_tokens_max
        step_time = fit.step_time(_source(step_logs, "steps"))
        result.notes += _step_notes(fit, step_logs)
    elif request_logs:
        engine["max_batch_tokens"] = max_batch_tokens or DEFAULT_BATCH_TOKENS
        step_time = None
    else:
        raise LogError("no step log or request log among the files")
    if kv_cache_tokens is not None:
        engine["kv_cache_tokens"] = kv_cache_tokens
    if step_time is None:
        step_time = _fit_on_requests(result, request_logs, max_batch, seed, say)
    engine["step_time"] = step_time
    if max_batch_tokens is None and not step_logs:
        result.notes.append(f"max_batch_tokens {DEFAULT_BATCH_TOKENS} assumed (vLLM's default chunked-prefill "
                            "budget): give --max-batch-tokens with your server's")
    if check and request_logs:
        say(f"replaying {len(request_logs)} request log(s)")
        result.checks = [_check(log, engine, max_batch, replications, seed, result.step_fit) for log in request_logs]
    return result


def _fit_on_requests(result: Calibration, logs: list[RequestLog], max_batch: int, seed: int, say) -> dict:
    """Simulation-based fit: the step_time block whose replays match the logs best."""
    replays = [prepare(log, {**result.engine, "step_time": {"base_s": 0.01, "per_decode_seq_s": 0.0,
                                                              "per_prefill_token_s": 0.0}}, max_batch)
               for log in logs]
    start = first_guess(logs)
    say(f"fitting on {len(logs)} request log(s) by simulation (a few hundred replays)")
    step_time, loss, evaluations = fit_requests(replays, start, seed=seed, progress=say)
    step_time["calibrated"] = {"source": _source(logs, "request logs") + " (simulation-based fit)"}
    result.request_fit = {"loss": loss, "evaluations": evaluations, "start": start}
    result.notes += [f"Fitted on {sum(int(log.finished.sum()) for log in logs)} requests of "
                     f"{len(logs)} log(s) by simulation: RMS log-error of TTFT, TPOT and e2e p50/p90/p99 "
                     f"{math.sqrt(loss):.1%} ({evaluations} candidate blocks tried).",
                     "No intervals: give a step log for coefficients with 95% intervals.",
                     _host_note()]
    return step_time


def _check(log: RequestLog, engine: dict, max_batch: int, replications: int, seed: int,
           fit: Optional[StepFit]) -> dict:
    """Replay `log` through `engine` (with its run's stalls, when a step log of the same run shows them)."""
    stalls = [(t, excess) for run, t, _, excess in (fit.stalls if fit is not None else [])
              if log.run and run == log.run and math.isfinite(t) and log.arrival is not None]
    replay = prepare(log, engine, max_batch, stalls)
    simulated = replay.run(engine["step_time"], replications, seed)
    return {"log": log.label, "requests": int(log.finished.sum()), "replications": replications,
            "stalls_replayed": len(stalls), "measured": quantiles(measured(log)), "simulated": quantiles(simulated)}


def _step_notes(fit: StepFit, logs: list[StepLog]) -> list[str]:
    runs = ", ".join(f"{label} {n:,}" for label, n in fit.runs.items())
    notes = [f"Fitted on {fit.steps:,} steps ({runs}) by non-negative least squares.", _host_note()]
    if fit.episodes is not None:
        e = fit.episodes
        notes.append(f"Slow episodes: x{e['multiplier']:.2f} for {e['mean_duration_s']:.2f} s about every "
                     f"{e['mean_interval_s'] + e['mean_duration_s']:.1f} s; per-step noise cv {fit.noise_cv:.3f}.")
    else:
        notes.append(f"Per-step noise cv {fit.noise_cv:.3f}; no slow episodes found"
                     + ("" if all(log.start is not None for log in logs) else " (the log has no step start times)")
                     + ".")
    if fit.stalls:
        total = sum(d for _, _, d, _ in fit.stalls)
        shown = ", ".join(f"{run + ' ' if run else ''}{f'at {t:.1f} s ' if math.isfinite(t) else ''}({d:.2f} s)"
                          for run, t, d, _ in fit.stalls[:6])
        notes.append(f"{len(fit.stalls)} stall(s) over {STALL_RATIO:g}x the model left out of the fit "
                     f"({total:.2f} s in all): {shown}{' ...' if len(fit.stalls) > 6 else ''}; a replay of the same "
                     "run puts them back.")
    return notes


def _host_note() -> str:
    return ("These coefficients belong to the measured host and engine configuration (GPU, model, engine and its "
            "version, batch budget): they do not carry over to another one.")


def _source(logs, what: str) -> str:
    names = list(dict.fromkeys(Path(log.path).name for log in logs))
    return f"{what} of {', '.join(names)}"


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.4g}"


def _rounded(value):
    """Floats to 4 significant digits, so the block reads well (the fit is not more precise than that)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
