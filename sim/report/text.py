"""The run summary as a person reads it in a terminal, and the files `--out` writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

from sim.config.schema import Api

from sim.metrics.summary import MEASURES, PERCENTILES


# Requests that did not complete, by why; each shown when any did.
LOST = (("requests_rejected", "too long"), ("requests_rate_limited", "rate-limited"),
        ("requests_queue_full", "queue full"), ("requests_expired", "expired"))


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
    lines = [
        f"{name}: {s['replications']} replication(s) x {s['duration_s']:g} s, seed {s['seed']}, "
        f"warm-up {s['warmup_s']:.0f} s" + (" (95% intervals as ±)" if s["replications"] > 1 else ""),
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
        "",
        "latency (s)  " + "".join(f"{stat:>16}" for stat in ("mean",) + tuple(p for p, _ in PERCENTILES)),
    ]
    for measure in MEASURES:
        cells = "".join(f"{_value(s, f'{measure}_{stat}_s', '.3f'):>16}"
                        for stat in ("mean",) + tuple(p for p, _ in PERCENTILES))
        lines.append(f"{measure:<13}{cells}")
    lines += ["", f"{'endpoint':<20}{'kind':<13}{'servers':>8}{'utilisation':>18}{'offered':>10}{'batch mean':>16}"]
    for ep, model in w.models.items():
        servers = f"{model.concurrency}" if isinstance(model, Api) else f"{model.replicas}"
        lines.append(
            f"{ep:<20}{model.kind:<13}{servers:>8}{_value(s, f'utilisation_{ep}', '.3f'):>18}"
            f"{s[f'offered_utilisation_{ep}']:>10.3f}{_value(s, f'batch_mean_{ep}', '.2f'):>16}"
        )
    lines += [
        "",
        f"cost       total ${_value(s, 'cost_total_usd', '.2f')}   per hour ${_value(s, 'cost_per_hour_usd', '.2f')}   "
        f"per 1k requests ${_value(s, 'cost_per_1k_usd', '.4f')}",
    ]
    return "\n".join(lines)


def write_outputs(result, out: Path) -> None:
    """Write requests.parquet, replications.parquet, timeseries.parquet and summary.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    result.requests.to_parquet(out / "requests.parquet", index=False)
    result.timeseries.to_parquet(out / "timeseries.parquet", index=False)
    result.replications.to_parquet(out / "replications.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(json_safe(result.summary), indent=2) + "\n")


def json_safe(summary: dict) -> dict:
    """JSON has no NaN: a metric with no value (no request to measure) becomes null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
