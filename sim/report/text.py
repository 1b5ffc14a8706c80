"""The run summary as a person reads it in a terminal, and the files `--out` writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from sim.config.schema import Api
from sim.metrics.summary import MEASURES, PERCENTILES

# Requests that did not complete, by why; each shown when any did.
LOST = (("requests_cancelled", "cancelled by the user"), ("requests_partial", "partial answer"),
        ("requests_try_later", "try later"), ("requests_timed_out", "timed out"), ("requests_rejected", "too long"),
        ("requests_rate_limited", "rate-limited"), ("requests_queue_full", "queue full"),
        ("requests_expired", "expired"))


def _value(summary: dict, key: str, fmt: str) -> str:
    v = summary.get(key, math.nan)
    if isinstance(v, float) and math.isnan(v):
        return "-"
    text = format(v, fmt)
    low, high = summary.get(f"{key}_ci95_low"), summary.get(f"{key}_ci95_high")
    if low is not None and not math.isnan(low):
        text += f" ±{format((high - low) / 2, fmt)}"
    return text


def format_summary(result) -> str:
    """A readable multi-line summary of a RunResult."""
    s = result.summary
    w = result.workload
    name = s["workload"] or "workload"
    window_end = s.get("window_end_s", s["duration_s"])
    lines = [
        f"{name}: {s['replications']} replication(s) x {s['duration_s']:g} s, seed {s['seed']}, "
        f"warm-up {s['warmup_s']:.0f} s"
        + (f", measured to {window_end:g} s (the replays' end)" if window_end < s["duration_s"] else "")
        + (" (95% intervals as ±)" if s["replications"] > 1 else ""),
    ]
    if s["unstable"]:
        offered = ", ".join(f"{k.removeprefix('offered_utilisation_')} {v:.2f}" for k, v in s.items()
                            if k.startswith("offered_utilisation_") and not k.endswith(("_low", "_high")) and v >= 1)
        lines.append(f"WARNING unstable: offered utilisation >= 1 ({offered}); queues grow for as long as it runs")
    lines += [
        "",
        f"requests   arrived {s['requests_arrived']:.0f}  completed {s['requests_completed']:.0f}"
        + "".join(f"  {label} {s[key]:.0f}" for key, label in LOST if s.get(key))
        + "   (per replication, after warm-up)",
        f"throughput {_value(s, 'throughput_rps', '.3f')} req/s"
        + (f"   goodput {_value(s, 'goodput_rps', '.3f')} req/s" if "goodput_rps" in s else "")
        + f"   tokens in {_value(s, 'tokens_in_per_s', '.0f')}/s  out {_value(s, 'tokens_out_per_s', '.0f')}/s",
        *_streaming_line(s),
        "",
        "latency (s)  " + "".join(f"{stat:>16}" for stat in ("mean",) + tuple(p for p, _ in PERCENTILES)),
    ]
    for measure in MEASURES:
        digits = ".4f" if measure == "tpot" else ".3f"  # token gaps are milliseconds
        cells = "".join(f"{_value(s, f'{measure}_{stat}_s', digits):>16}"
                        for stat in ("mean",) + tuple(p for p, _ in PERCENTILES))
        lines.append(f"{measure:<13}{cells}")
    lines += ["", f"{'endpoint':<20}{'kind':<13}{'servers':>8}{'utilisation':>18}{'offered':>10}{'batch mean':>16}"]
    for ep, model in w.models.items():
        servers = f"{model.concurrency}" if isinstance(model, Api) else f"{model.replicas}"
        lines.append(
            f"{ep:<20}{model.kind:<13}{servers:>8}{_value(s, f'utilisation_{ep}', '.3f'):>18}"
            f"{s[f'offered_utilisation_{ep}']:>10.3f}{_value(s, f'batch_mean_{ep}', '.2f'):>16}"
        )
    # Step-time coefficients hold for one host and engine setup: say which.
    lines += [f"step times {key.removeprefix('step_times_')}: {s[key]}" for key in s if key.startswith("step_times_")]
    lines += [
        "",
        f"cost       total ${_value(s, 'cost_total_usd', '.2f')}   per hour ${_value(s, 'cost_per_hour_usd', '.2f')}   "
        f"per 1k requests ${_value(s, 'cost_per_1k_usd', '.4f')}",
    ]
    stages = [(k[len("stage_"):-len("_share")], v) for k, v in s.items() if k.startswith("stage_") and k.endswith("_share")]
    if stages:
        lines.append("stages     " + "  ".join(f"{name} {share:.0%}" for name, share in stages if share >= 0.005)
                     + f"   of mean latency; bottleneck: {s.get('bottleneck_stage')}")
    lines += _guard_lines(s)
    lines += _ledger_lines(result)
    return "\n".join(lines)


def _streaming_line(s: dict) -> list[str]:
    """Output tokens/s as one reader sees them and per GPU held, and the mean inter-token latency."""
    per_user = s.get("tokens_out_per_s_per_user", math.nan)
    if math.isnan(per_user):
        return []  # nothing streamed (plain service-time endpoints)
    per_gpu = (f"   per GPU {_value(s, 'tokens_out_per_s_per_gpu', '.0f')}/s"
               if "tokens_out_per_s_per_gpu" in s else "")
    return [f"streaming  tokens out per user {_value(s, 'tokens_out_per_s_per_user', '.1f')}/s{per_gpu}"
            f"   inter-token latency {_value(s, 'itl_mean_s', '.4f')} s (mean)"]


def _guard_lines(s: dict) -> list[str]:
    """What the guardrails did: retries, timeouts, answers from fallbacks, calls denied by a cap."""
    if "guard_retries_per_request" not in s:
        return []
    parts = [f"retries {s['guard_retries_per_request']:.3f}/request",
             f"call timeouts {s['guard_call_timeouts_per_request']:.3f}/request"]
    parts += [f"{label} {s[key]:.1%}" for key, label in (
        ("fallback_smaller_model_share", "answered by the smaller model"),
        ("fallback_reduced_context_share", "with reduced context"), ("guard_hop_limited_share", "hop cap met"),
        ("guard_token_limited_share", "token cap met"), ("guard_tool_limited_share", "tool cap met")) if s[key]]
    return ["guardrails " + "   ".join(parts)]


def _ledger_lines(result) -> list[str]:
    """Cost per request by feature, and the users who cost most (the ledger over the whole run)."""
    s = result.summary
    lines = []
    features = [(k.removeprefix("cost_per_request_").removesuffix("_usd"), v) for k, v in s.items()
                if k.startswith("cost_per_request_") and k != "cost_per_request_usd" and not k.endswith(("_low", "_high"))]
    if features:
        lines.append("by feature " + "   ".join(f"{name} ${value:.5f}/request" for name, value in features))
    book = getattr(result, "ledger", None)
    if book is not None and book["user"].nunique() > 1 and book["usd"].sum() > 0:
        per_run = book.groupby("user")["usd"].sum() / max(s["replications"], 1)
        top = per_run.sort_values(ascending=False).head(3)
        share = top.sum() / per_run.sum()
        lines.append("top users  " + "   ".join(f"#{user} ${usd:.2f}" for user, usd in top.items())
                     + f"   ({share:.0%} of the run's cost, per replication)")
    return lines


def write_outputs(result, out: Path) -> None:
    """Write requests.parquet, replications.parquet, timeseries.parquet, ledger.parquet and summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    result.ledger.to_parquet(out / "ledger.parquet", index=False)
    result.requests.to_parquet(out / "requests.parquet", index=False)
    result.timeseries.to_parquet(out / "timeseries.parquet", index=False)
    result.replications.to_parquet(out / "replications.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(json_safe(result.summary), indent=2) + "\n")


def json_safe(summary: dict) -> dict:
    """JSON has no NaN or Infinity: a metric with no value (no request to measure) or no finite one becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
