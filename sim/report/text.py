"""The run summary as a person reads it in a terminal, and the files `--out` writes."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from sim.config.schema import Api
from sim.metrics.summary import HOURS_PER_MONTH, MEASURES, PERCENTILES, SLO_TARGETS

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


def _scaled(summary: dict, key: str, factor: float) -> dict:
    """The metric `key` and its interval times `factor` (a rate per hour as per day, say)."""
    return {k: summary[k] * factor for k in (key, f"{key}_ci95_low", f"{key}_ci95_high") if k in summary}


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
        *_slo_lines(result),
        *_blank_before(_pipeline_lines(s)),
        "",
        *_latency_table(s),
        "",
        *_endpoint_table(s, w),
    ]
    # Step-time coefficients hold for one host and engine setup: say which.
    lines += [f"step times {key.removeprefix('step_times_')}: {s[key]}" for key in s if key.startswith("step_times_")]
    lines += [
        "",
        f"cost       total ${_value(s, 'cost_total_usd', '.2f')}   per hour ${_value(s, 'cost_per_hour_usd', '.2f')}   "
        f"per 1k requests ${_value(s, 'cost_per_1k_usd', '.4f')}",
        # A budget reads per day and month: the hourly rate of this traffic, held (a month of 730 hours).
        f"           per day ${_value(_scaled(s, 'cost_per_hour_usd', 24), 'cost_per_hour_usd', ',.0f')}   "
        f"per month ${_value(_scaled(s, 'cost_per_hour_usd', HOURS_PER_MONTH), 'cost_per_hour_usd', ',.0f')} "
        "at this traffic",
    ]
    stages = [(k[len("stage_"):-len("_share")], v) for k, v in s.items() if k.startswith("stage_") and k.endswith("_share")]
    # Plain service-time endpoints have no prefill: admission to the end is their service.
    said = {"prefill": "service"} if all(getattr(m, "service_time", None) is not None for m in w.models.values()) else {}
    if stages:
        bottleneck = s.get("bottleneck_stage")
        lines.append("stages     " + "  ".join(f"{said.get(name, name)} {share:.0%}" for name, share in stages
                                               if share >= 0.005)
                     + f"   of mean latency; bottleneck: {said.get(bottleneck, bottleneck)}")
    steps = [k[len("flow_step_"):-len("_mean_s")] for k in s if k.startswith("flow_step_") and k.endswith("_mean_s")
             and "_ci95_" not in k]
    if steps:
        lines.append("flow steps " + "  ".join(f"{name} {s[f'flow_step_{name}_mean_s']:.3g} s "
                                               f"({s[f'flow_step_{name}_run_share']:.0%} run)" for name in steps))
    tools = [k[len("utilisation_tool_"):] for k in s if k.startswith("utilisation_tool_") and "_ci95_" not in k]
    for name in tools:
        lines.append(f"tool {name:<9} calls/request {_value(s, f'tool_{name}_calls_per_request', '.3f')}   "
                     f"attempts {_value(s, f'tool_{name}_attempts_mean', '.3f')}   "
                     f"failed {_value(s, f'tool_{name}_failed_share', '.2%')}   "
                     f"utilisation {_value(s, f'utilisation_tool_{name}', '.3f')}")
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


def _grid(rows: list[list[str]], floors: Sequence[int], left: int) -> list[str]:
    """Rows of cells (the first a header) in columns as wide as their widest value plus two spaces,
    their header plus one, and at least `floors`.

    Widths come from the values, so a long value and its interval never run into the next
    column; the first `left` columns are names (left-aligned), the rest numbers (right-aligned).
    """
    widths = [max([floor, len(rows[0][i]) + 1] + [len(row[i]) + 2 for row in rows[1:]])
              for i, floor in enumerate(floors)]
    return ["".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


def _latency_table(s: dict) -> list[str]:
    """Mean and percentiles of each latency measure, with their intervals."""
    stats = ("mean",) + tuple(p for p, _ in PERCENTILES)
    rows = [["latency (s)", *stats]]
    for measure in MEASURES:
        digits = ".4f" if measure == "tpot" else ".3f"  # token gaps are milliseconds
        rows.append([measure, *(_value(s, f"{measure}_{stat}_s", digits) for stat in stats)])
    return _grid(rows, (13,) + (16,) * len(stats), left=1)


def _endpoint_table(s: dict, w) -> list[str]:
    """Each endpoint's servers, measured and offered utilisation, and mean batch."""
    rows = [["endpoint", "kind", "servers", "utilisation", "offered", "batch mean"]]
    for ep, model in w.models.items():
        servers = model.concurrency if isinstance(model, Api) else model.replicas
        rows.append([ep, model.kind, f"{servers}", _value(s, f"utilisation_{ep}", ".3f"),
                     f"{s[f'offered_utilisation_{ep}']:.3f}", _value(s, f"batch_mean_{ep}", ".2f")])
    return _grid(rows, (20, 13, 8, 18, 10, 16), left=2)


def _blank_before(lines: list[str]) -> list[str]:
    return [""] + lines if lines else []


def _keys(s: dict, wanted: Callable[[str], bool]) -> list[str]:
    """The summary's numeric metrics that `wanted` picks, in the summary's order, intervals left out."""
    return [k for k, v in s.items() if wanted(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith(("_ci95_low", "_ci95_high"))]


def _usd(value: float) -> str:
    """Dollars to the cent, or to two significant digits below a dime (a top user's $0.0031, not $0.00)."""
    return f"${value:,.2f}" if abs(value) >= 0.1 or value == 0 else f"${value:.2g}"


def _share(s: dict, key: str) -> str:
    """A share as a percentage, with two decimals where one would round a small rate to nothing."""
    v = s.get(key, math.nan)
    return _value(s, key, ".2%" if isinstance(v, float) and 0 < abs(v) < 0.01 else ".1%")


def _slo_lines(result) -> list[str]:
    """The SLO verdict: the goodput's share of the throughput, and how many answers met each target."""
    slo = result.workload.slo
    targets = {name: getattr(slo, field) for field, name in SLO_TARGETS
               if slo is not None and getattr(slo, field) is not None}
    if not targets:
        return []
    s = result.summary
    good, done = s.get("goodput_rps", math.nan), s["throughput_rps"]
    share = f" ({good / done:.1%})" if done > 0 and not math.isnan(good) else ""
    said = ", ".join(f"{name} <= {limit:g} s" for name, limit in targets.items())
    lines = [f"slo        {said}: goodput {good:.3f} of throughput {done:.3f} req/s{share} meet every target"]
    cells = [f"{name} {_share(s, f'slo_{name}_met_share')}" for name in targets if f"slo_{name}_met_share" in s]
    if cells:
        lines.append("           answered requests within each target: " + "   ".join(cells))
    return lines


def _pipeline_lines(s: dict) -> list[str]:
    """The application's headlines: answer quality, cache hit rates, escalation and fallbacks.

    Keys are picked by their prefix, so a quality dimension, cache or fallback the summary
    gains shows up here without a change.
    """
    lines = []
    quality = _keys(s, lambda k: k.startswith("quality_"))
    if quality:
        lines.append("quality    " + "   ".join(f"{_quality_label(k)} {_quality_value(s, k)}" for k in quality))
    # One line per cache: a stack has several, each with hit, stale-hit and leak rates.
    lines += [("caches     " if n == 0 else " " * 11) + part for n, part in enumerate(_cache_parts(s))]
    if "escalation_rate" in s:
        lines.append(f"escalation {_share(s, 'escalation_rate')} of answers escalated   "
                     f"model calls {_value(s, 'hops_mean', '.3f')}/answer, "
                     f"{_value(s, 'model_calls_per_request', '.3f')}/request (cache hits make none)")
    fallbacks = _keys(s, lambda k: k.startswith("fallback_"))
    if fallbacks:
        lines.append("fallbacks  " + "   ".join(
            f"{k.removeprefix('fallback_').removesuffix('_share').replace('_', ' ')} {_share(s, k)}" for k in fallbacks)
            + "   (requests answered by a fallback call)")
    return lines


def _quality_label(key: str) -> str:
    """quality_good_share -> 'good answers', quality_groundedness_mean -> 'groundedness'."""
    if key == "quality_good_share":
        return "good answers"
    name = key.removeprefix("quality_")
    for suffix in ("_share", "_mean", "_rate"):
        name = name.removesuffix(suffix)
    return name.replace("_", " ")


def _quality_value(s: dict, key: str) -> str:
    """Shares of answers as percentages; scores (a dimension's mean) as they are."""
    return _share(s, key) if key.endswith(("_share", "_rate")) else _value(s, key, ".3f")


def cache_metric(key: str) -> Optional[tuple[str, str]]:
    """(cache, what) for a cache rate or share of the summary, else None.

    Both spellings the summary uses: `cache_<what>_<rate|share>_<cache>`
    (cache_stale_hit_rate_output -> ('output', 'stale hit')) and
    `<cache>_cache_<what>_<rate|share>` (embedding_cache_hit_rate -> ('embedding', 'hit')).
    Costs and stage times that name a cache are not rates: None.
    """
    words = key.split("_")
    unit = next((j for j, word in enumerate(words) if word in ("rate", "share")), None)
    if "cache" not in words or unit is None or words[0] in ("stage", "cost"):
        return None
    at = words.index("cache")
    if at == 0:
        cache, what = words[unit + 1:], words[1:unit]
    else:
        cache, what = words[:at], words[at + 1:unit]
    return "_".join(cache) or "cache", " ".join(what) or "hit"


def _cache_parts(s: dict) -> list[str]:
    """Per cache, its hit rate first, then its other rates: 'output hit 22.5%, stale hit 0.12%, bypass 60.9%'."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for key in _keys(s, lambda k: cache_metric(k) is not None):
        cache, what = cache_metric(key)
        grouped.setdefault(cache, []).append((what, f"{what} {_share(s, key)}"))
    parts = [f"{cache} " + ", ".join(text for what, text in sorted(rates, key=lambda r: r[0] != "hit"))
             for cache, rates in grouped.items()]
    if "prompt_cached_share" in s:  # prompt and prefix caches: the share of prompt tokens not computed again
        parts.append(f"prompt tokens cached {_share(s, 'prompt_cached_share')}")
    return parts


def _guard_lines(s: dict) -> list[str]:
    """What the guardrails did: retries, timeouts, answers from fallbacks, calls denied by a cap."""
    if "guard_retries_per_request" not in s:
        return []
    parts = [f"retries {s['guard_retries_per_request']:.3f}/request",
             f"call timeouts {s['guard_call_timeouts_per_request']:.3f}/request"]
    # Fallback shares have their own line (_pipeline_lines); caps show only when met.
    parts += [f"{label} {s[key]:.1%}" for key, label in (
        ("guard_hop_limited_share", "hop cap met"), ("guard_token_limited_share", "token cap met"),
        ("guard_tool_limited_share", "tool cap met")) if s.get(key)]
    return ["guardrails " + "   ".join(parts)]


def _ledger_lines(result) -> list[str]:
    """Cost per request by feature, and the users who cost most (the ledger over the whole run)."""
    s = result.summary
    lines = []
    features = [(k.removeprefix("cost_per_request_").removesuffix("_usd"), v) for k, v in s.items()
                if k.startswith("cost_per_request_") and k != "cost_per_request_usd" and not k.endswith(("_low", "_high"))]
    if features:
        lines.append("by feature " + "   ".join(f"{name} ${value:.5f}/request" for name, value in features))
    spent = result.user_usd
    if len(spent) > 1 and sum(spent.values()) > 0:
        top = sorted(spent.items(), key=lambda item: -item[1])[:3]
        share = sum(usd for _, usd in top) / sum(spent.values())
        runs = max(s["replications"], 1)
        lines.append("top users  " + "   ".join(f"#{user} {_usd(usd / runs)}" for user, usd in top)
                     + f"   ({share:.0%} of the run's cost, per replication)")
    return lines


def write_outputs(result, out: Path) -> None:
    """Write requests.parquet, replications.parquet, timeseries.parquet, ledger.parquet and summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    result.ledger.to_parquet(out / "ledger.parquet", index=False)
    result.requests.to_parquet(out / "requests.parquet", index=False)
    result.timeseries.to_parquet(out / "timeseries.parquet", index=False)
    result.replications.to_parquet(out / "replications.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary_json(result), indent=2) + "\n")


def summary_json(result) -> dict:
    """The summary as JSON (NaN as null), with the run's warnings (one line each) as `warnings`."""
    return {**json_safe(result.summary), "warnings": list(result.warnings)}


def summary_csv(summary: dict) -> str:
    """The summary as CSV: a header row of metric names, then one row of values (a metric with no value, empty):
    runs stack into one table by keeping the first header."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(summary)
    writer.writerow("" if v is None else v for v in json_safe(summary).values())
    return out.getvalue()


def json_safe(summary: dict) -> dict:
    """JSON has no NaN or Infinity: a metric with no value (no request to measure) or no finite one becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
