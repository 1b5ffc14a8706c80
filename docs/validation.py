"""Measured vs simulated on a real server: the figures and table of docs/serving.md, "Validation".

    python docs/validation.py ../shared/data/gpu-h100-b512 [--out docs/figures]

Calibrates an engine block on the server's step log (both runs pooled), replays each
request log through it (with its run's stalls), and draws the step-time distribution
and the TTFT and end-to-end distributions, measured against simulated. A second fit
uses the L1 request log alone (simulation-based). Prints the table the docs quote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from sim.experiments.calibration import calibrate  # noqa: E402
from sim.experiments.calibration.logs import read_logs  # noqa: E402
from sim.experiments.calibration.replay import measured, prepare  # noqa: E402
from sim.experiments.calibration.steps import STALL_RATIO  # noqa: E402

REPLICATIONS = 20
KV_CACHE_TOKENS = 262_144  # the server's KV cache (its README: 1,024 blocks of 256 tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the gpu-h100-b512 folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures")
    args = parser.parse_args(argv)
    files = [str(args.data / name) for name in ("load_steps.csv", "load_cb.csv", "load_cb_pilot.csv")]
    steps_fit = calibrate(files, kv_cache_tokens=KV_CACHE_TOKENS, max_batch=512, replications=REPLICATIONS)
    requests_fit = calibrate(files[1:2], max_batch_tokens=512, kv_cache_tokens=KV_CACHE_TOKENS, max_batch=512,
                             replications=REPLICATIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    _steps_figure(files[0], steps_fit, args.out / "validation_steps.png")
    _latency_figure(files, steps_fit, args.out / "validation_latency.png")
    print(_table(steps_fit, requests_fit))
    return 0


def _table(steps_fit, requests_fit) -> str:
    rows = ["| fitted on | replayed | measure | measured | simulated | error |", "|---|---|---|---|---|---|"]
    for fit, name in ((steps_fit, "step log (both runs)"), (requests_fit, "L1 request log alone")):
        for check in fit.checks:
            for key in ("ttft_p50", "ttft_p95", "tpot_p50", "e2e_p50", "e2e_p99"):
                want, got = check["measured"][key], check["simulated"][key]
                rows.append(f"| {name} | {check['log']} | {key} | {want:.3f} s | {got:.3f} s | {got / want - 1:+.1%} |")
    return "\n".join(rows)


def _steps_figure(path: str, fit, out: Path) -> None:
    """Measured step durations against the model's (noise and episodes drawn), per run."""
    [log], _ = read_logs([path])
    block = fit.engine["step_time"]
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, len(log.runs()), figsize=(11, 3.8))
    for ax, run in zip(np.atleast_1d(axes), log.runs()):
        mine = log.run == run
        nominal = (block["base_s"] + block["per_decode_seq_s"] * log.decode[mine]
                   + block["per_prefill_token_s"] * log.prefill[mine]
                   + block.get("per_kv_token_s", 0.0) * (log.kv[mine] if log.kv is not None else 0))
        kept = log.duration[mine] < STALL_RATIO * nominal
        shape = 1 / block["noise_cv"] ** 2
        drawn = nominal * rng.gamma(shape, 1 / shape, nominal.size) * _episode_levels(block, log, mine, rng)
        bins = np.linspace(0, np.percentile(log.duration[mine][kept], 99.5) * 1.1, 60)
        ax.hist(log.duration[mine][kept] * 1e3, bins * 1e3, alpha=0.55, density=True, label="measured")
        ax.hist(drawn * 1e3, bins * 1e3, alpha=0.55, density=True, label="model (noise, slow episodes)")
        ax.set_title(f"run {run}: {mine.sum():,} steps ({(~kept).sum()} stalls not shown)")
        ax.set_xlabel("step duration (ms)")
    np.atleast_1d(axes)[0].set_ylabel("density")
    np.atleast_1d(axes)[0].legend(frameon=False)
    fig.suptitle("Step durations: measured vs the calibrated model (its steps' own composition)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _episode_levels(block: dict, log, mine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A slow-episode multiplier per step, from the fitted two-state process along the steps' start times."""
    episodes = block.get("slow_episodes")
    if episodes is None or log.start is None:
        return np.ones(int(mine.sum()))
    start = log.start[mine]
    level, slow, t = np.ones(start.size), False, start[0] + rng.exponential(episodes["mean_interval_s"])
    for k, s in enumerate(start):
        while s >= t:
            slow = not slow
            t += rng.exponential(episodes["mean_duration_s"] if slow else episodes["mean_interval_s"])
        level[k] = episodes["multiplier"] if slow else 1.0
    return level


def _latency_figure(files: list[str], fit, out: Path) -> None:
    """TTFT and end-to-end CDFs of each request log, measured vs replayed through the block."""
    _, logs = read_logs(files[1:])
    fig, axes = plt.subplots(len(logs), 2, figsize=(11, 3.6 * len(logs)))
    for row, log in zip(np.atleast_2d(axes), logs):
        stalls = [(t, excess) for run, t, _, excess in fit.step_fit.stalls if run == log.run]
        simulated = prepare(log, fit.engine, 512, stalls).run(fit.engine["step_time"], REPLICATIONS, 1)
        for ax, key, label in zip(row, ("ttft", "e2e"), ("time to first token (s)", "end-to-end latency (s)")):
            for values, name in ((measured(log)[key], "measured"), (simulated[key], "simulated")):
                v = np.sort(values[np.isfinite(values)])
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=name)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_title(f"{log.label}: {int(log.finished.sum())} requests")
        row[0].set_ylabel("share of requests")
        row[0].legend(frameon=False)
    fig.suptitle(f"Replays through the step-log calibration ({REPLICATIONS} replications, measured stalls put back)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
