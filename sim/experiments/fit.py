"""`llmsim fit-traffic`: a traffic block fitted to a request trace, ready to paste into a workload.

The arrival process is chosen by two questions. Does the rate drift? The counts
per step (a minute, or longer for long or sparse traces) are compared with
Poisson noise: a homogeneous Poisson process has var/mean 1 for them. Is the
traffic bursty within steps? The trace's time is stretched by the fitted step
rates (a time change that makes an inhomogeneous Poisson process a unit-rate
one) and the inter-arrival CV is measured there: near 1 is Poisson.

- no drift, not bursty: poisson (or gamma when the gaps are regular, cv < 0.7);
- drift, not bursty: a schedule of the step rates, Poisson within each step;
- bursty: mmpp when whole stretches are empty (on/off traffic), else gamma with the CV.

Token counts become lognormals by median and p95 (the trace's mean and p99 in comments).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sim.config.traces import AZURE_COLUMNS, Trace, file_problem, read_trace

STEPS_S = (60, 300, 900, 3600)  # schedule step lengths tried, shortest first
MAX_STEPS = 120                  # a schedule longer than this is no longer readable
MIN_PER_STEP = 20                # fewer arrivals per step and step rates are mostly noise
DISPERSION_WINDOWS_S = (1, 10, 60)
BURSTY_CV = 1.5                  # inter-arrival CV above this: not Poisson-like
REGULAR_CV = 0.7                 # below this: markedly more regular than Poisson
CLASS_NAME = "fitted"
HEADER_CHARS = 64 * 1024         # format detection reads at most this much of the first line


@dataclass
class FitResult:
    """What fit_traffic found: `summary` (numbers and the fitted traffic block as data) and `yaml` (to paste)."""

    summary: dict[str, Any]
    yaml: str


def detect_format(path: str | Path) -> str:
    """azure for a CSV with the Azure trace's columns, mooncake for JSON lines, else csv."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return "mooncake"
    if file_problem(path) is not None:
        return "csv"  # read_trace reports the problem; a device such as /dev/zero is never opened
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            # One line, and not an endless one: a file without newlines is read no further than this.
            header = [h.strip() for h in next(csv.reader([fh.readline(HEADER_CHARS)]), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return "csv"  # read_trace reports the problem
    return "azure" if all(c in header for c in AZURE_COLUMNS) else "csv"


def fit_traffic(path: str | Path, fmt: Optional[str] = None, columns: Optional[dict[str, str]] = None) -> FitResult:
    """Fit an arrival process and token distributions to the trace at `path`.

    `fmt` is azure, mooncake or csv (default: detected); `columns` names the csv
    columns (time, prompt_tokens, output_tokens, time_unit). Raises
    sim.config.traces.TraceError for an unreadable trace.
    """
    fmt = fmt or detect_format(path)
    trace = read_trace(path, fmt, columns)
    summary = _arrival_summary(trace)
    summary.update(path=str(path), format=fmt)
    arrival = _choose_arrival(summary, trace.times)
    tokens = {label: _token_stats(values) for label, values in (("prompt_tokens", trace.prompt),
                                                                 ("output_tokens", trace.output))}
    summary.update(tokens)
    summary["traffic"] = {"classes": {CLASS_NAME: {
        "arrival": arrival,
        **{label: _token_distribution(stats) for label, stats in tokens.items()},
    }}}
    return FitResult(summary, _yaml(summary))


# ---------------------------------------------------------------- arrivals


def _arrival_summary(trace: Trace) -> dict[str, Any]:
    t = trace.times
    duration = float(t[-1])
    if t.size < 2 or duration <= 0:
        raise ValueError("the trace needs at least two distinct arrival times to fit a rate")
    gaps = np.diff(t)
    minute = _counts(t, 60.0, duration)
    step = _step(t.size, duration)
    counts, lengths = _step_counts(t, step, duration)
    full = counts[lengths == step]
    step_dispersion = float(full.var(ddof=1) / full.mean()) if full.size >= 2 and full.mean() > 0 else 1.0
    return {
        "requests": int(t.size),
        "duration_s": duration,
        "mean_rate_rps": t.size / duration,
        "peak_minute_rps": float(minute.max() / 60) if minute.size else None,
        "peak_minute": int(minute.argmax()) if minute.size else None,
        "quietest_minute_rps": float(minute.min() / 60) if minute.size else None,
        "empty_minutes": int((minute == 0).sum()),
        "full_minutes": int(minute.size),
        "interarrival_cv": _cv(gaps),
        "dispersion": {f"{w}s": _dispersion(t, w, duration) for w in DISPERSION_WINDOWS_S},
        "step_s": step,
        "step_dispersion": step_dispersion,
        # Poisson counts give var/mean 1 with sd ~ sqrt(2 / (k - 1)); 4 sd above is drift.
        "drift": bool(full.size >= 3 and step_dispersion > 1 + 4 * math.sqrt(2 / (full.size - 1))),
        "within_step_cv": _cv(np.diff(_time_change(t, counts, lengths))),
        "_steps": (counts, lengths),
    }


def _counts(t: np.ndarray, width: float, duration: float) -> np.ndarray:
    """Arrivals in each whole window of `width` seconds in [0, duration)."""
    k = int(duration // width)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(np.minimum((t // width).astype(np.int64), k), minlength=k + 1)[:k]


def _dispersion(t: np.ndarray, width: float, duration: float) -> Optional[float]:
    """var/mean of the counts in whole windows of `width` (1 for Poisson); None with fewer than 2 windows."""
    counts = _counts(t, width, duration)
    if counts.size < 2 or counts.mean() == 0:
        return None
    return float(counts.var(ddof=1) / counts.mean())


def _cv(x: np.ndarray) -> float:
    mean = float(x.mean())
    return float(x.std() / mean) if mean > 0 else 0.0


def _step(n: int, duration: float) -> Optional[float]:
    """The shortest step giving at most MAX_STEPS steps of MIN_PER_STEP arrivals on average (None: one rate)."""
    for step in STEPS_S:
        steps = math.ceil(duration / step)
        if steps <= MAX_STEPS and n / steps >= MIN_PER_STEP:
            return float(step) if steps >= 2 else None
    return None


def _step_counts(t: np.ndarray, step: Optional[float], duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts and lengths of the schedule's steps; a last stub shorter than half a step joins the one before."""
    if step is None:
        return np.array([t.size]), np.array([duration])
    k = max(1, math.ceil(duration / step))
    edges = np.minimum(np.arange(k + 1) * step, duration)
    if k >= 2 and edges[-1] - edges[-2] < step / 2:
        edges = np.delete(edges, -2)
    counts = np.bincount(np.minimum(np.searchsorted(edges, t, side="right") - 1, edges.size - 2),
                         minlength=edges.size - 1)
    return counts, np.diff(edges)


def _time_change(t: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Lambda(t) of the fitted step rates: turns a Poisson process with those rates into a unit-rate one."""
    edges = np.concatenate([[0.0], np.cumsum(lengths)])
    cum = np.concatenate([[0.0], np.cumsum(counts)]).astype(float)
    return np.interp(t, edges, cum)


def _choose_arrival(s: dict[str, Any], t: np.ndarray) -> dict[str, Any]:
    counts, lengths = s.pop("_steps")
    cv = s["within_step_cv"] if s["drift"] else s["interarrival_cv"]
    s["bursty"] = bool(cv > BURSTY_CV)
    rate = _round(s["mean_rate_rps"])
    if s["bursty"]:
        s["gamma"] = {"kind": "gamma", "rate_rps": rate, "cv": _round(s["interarrival_cv"])}
        # On/off traffic clusters over long stretches: its dispersion grows with the window.
        # Short clusters (a batch sent at once) do not, and a renewal process fits them better.
        d = s["dispersion"]
        growing = d["1s"] is not None and d["60s"] is not None and d["60s"] > d["1s"]
        onoff = _on_off(t, s["mean_rate_rps"], s["duration_s"]) if growing else None
        s["choice"] = "mmpp" if onoff is not None else "gamma"
        return onoff if onoff is not None else s["gamma"]
    if s["drift"]:
        s["choice"] = "schedule"
        ends = np.cumsum(lengths)
        steps = [{"until_s": _tenth(end), "rate_rps": _round(c / length)}
                 for end, c, length in zip(ends, counts, lengths)]
        return {"kind": "schedule", "steps": steps}
    if s["interarrival_cv"] < REGULAR_CV:
        s["choice"] = "gamma"
        return {"kind": "gamma", "rate_rps": rate, "cv": _round(s["interarrival_cv"])}
    s["choice"] = "poisson"
    return {"kind": "poisson", "rate_rps": rate}


def _on_off(t: np.ndarray, mean_rate: float, duration: float) -> Optional[dict[str, Any]]:
    """A rough on/off MMPP: windows with arrivals are on, empty ones off; None if no window is empty.

    The window is long enough that traffic at the mean rate would rarely leave
    one empty (5 / mean rate, 1 to 60 s). The fitted mean rate equals the trace's.
    """
    width = min(max(5.0 / mean_rate, 1.0), 60.0)
    counts = _counts(t, width, duration)
    on = counts > 0
    if counts.size < 10 or on.all() or not on.any():
        return None
    change = np.flatnonzero(np.diff(on.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], change, [on.size]]))
    run_on = on[np.concatenate([[0], change])]
    return {"kind": "mmpp", "rate_on_rps": _round(counts[on].sum() / (on.sum() * width)), "rate_off_rps": 0,
            "mean_on_s": _round(runs[run_on].mean() * width), "mean_off_s": _round(runs[~run_on].mean() * width)}


# ------------------------------------------------------------------ tokens


def _token_stats(values: np.ndarray) -> dict[str, float]:
    q50, q95, q99 = np.percentile(values, [50, 95, 99])
    return {"median": float(q50), "p95": float(q95), "mean": float(values.mean()), "p99": float(q99)}


def _token_distribution(stats: dict[str, float]) -> Any:
    if stats["p95"] <= stats["median"]:
        return _round(stats["median"])  # (nearly) constant: a plain number
    return {"kind": "lognormal", "median": _round(stats["median"]), "p95": _round(stats["p95"])}


# -------------------------------------------------------------------- YAML


def _round(x: float) -> float | int:
    """Four significant digits, as a plain int when whole (readable YAML, no exponents)."""
    if x == 0 or not math.isfinite(x):
        return 0
    value = float(np.format_float_positional(x, precision=4, unique=True, fractional=False, trim="-"))
    return int(value) if value.is_integer() else value


def _tenth(x: float) -> float | int:
    """A time to 0.1 s (significant digits would merge the steps of a long trace)."""
    value = round(float(x), 1)
    return int(value) if value.is_integer() else value


def _flow(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def _yaml(s: dict[str, Any]) -> str:
    """The traffic block with a commented summary on top."""
    cls = s["traffic"]["classes"][CLASS_NAME]
    lines = [f"# llmsim fit-traffic {Path(s['path']).name} (format {s['format']})"] + _comments(s)
    lines += ["traffic:", "  classes:", f"    {CLASS_NAME}:", "      arrival:"]
    arrival = cls["arrival"]
    if arrival["kind"] == "schedule":
        lines += ["        kind: schedule", "        steps:"]
        lines += [f"          - {_flow(step)}" for step in arrival["steps"]]
    else:
        lines += [f"        {k}: {v}" for k, v in arrival.items()]
    for label in ("prompt_tokens", "output_tokens"):
        dist, st = cls[label], s[label]
        text = _flow(dist) if isinstance(dist, dict) else str(dist)
        lines.append(f"      {label}: {text}   # trace: mean {st['mean']:.0f}, p99 {st['p99']:.0f}")
    return "\n".join(lines) + "\n"


def _comments(s: dict[str, Any]) -> list[str]:
    out = [f"# {s['requests']} requests over {s['duration_s']:.1f} s ({s['duration_s'] / 60:.1f} min): "
           f"mean {s['mean_rate_rps']:.3f} req/s"]
    if s["peak_minute_rps"] is not None:
        out.append(f"# per minute: peak {s['peak_minute_rps']:.2f} req/s (minute {s['peak_minute']}), quietest "
                   f"{s['quietest_minute_rps']:.2f} req/s, {s['empty_minutes']} of {s['full_minutes']} empty")
    within = f"; {s['within_step_cv']:.2f} within {s['step_s']:.0f} s steps" if s["step_s"] else ""
    out.append(f"# inter-arrival CV {s['interarrival_cv']:.2f} (1 = Poisson){within}")
    shown = [f"{w} {v:.1f}" for w, v in s["dispersion"].items() if v is not None]
    if shown:
        out.append(f"# count dispersion var/mean (1 = Poisson): {', '.join(shown)}")
    out += [f"# {line}" for line in _verdict(s)]
    return out


def _verdict(s: dict[str, Any]) -> list[str]:
    spread = f"counts per {s['step_s'] or 0:.0f} s vary {s['step_dispersion']:.1f}x as much as Poisson counts"
    if not s["drift"]:
        drift = "the rate holds steady (no drift beyond Poisson noise)"
    elif s["bursty"]:
        drift = f"{spread} (bursts, drift or both)"
    else:
        drift = f"the rate drifts: {spread}"
    choice = s["choice"]
    if choice == "schedule":
        return [drift, f"-> a schedule of {s['step_s']:.0f} s steps, Poisson within each step"]
    if choice == "poisson":
        return [drift, "-> poisson"]
    if not s["bursty"]:
        return [drift, f"-> gamma: the gaps are more regular than Poisson (CV {s['interarrival_cv']:.2f})"]
    lines = [drift, f"bursty: inter-arrival CV {s['interarrival_cv']:.2f} >> 1, so Poisson would understate queueing"]
    if choice == "mmpp":
        lines += ["-> mmpp: on/off bursts (rough fit: windows with arrivals are on)",
                  f"   or a renewal process: arrival: {_flow(s['gamma'])}"]
    else:
        lines += ["-> gamma with the trace's CV; an mmpp fits on/off bursts better if you know their lengths"]
    return lines
