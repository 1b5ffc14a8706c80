"""Fitting the step-time model to a server's step log.

1. Least squares with non-negative coefficients (a negative cost per token is never
   physical; with correlated regressors plain least squares produces them) of the step
   duration on decoding sequences, prefill tokens and, where the log has them, context
   tokens. Steps over STALL_RATIO times the fit are stalls (a first-time compilation,
   a garbage-collection pause): left out and reported, then the fit is redone.
2. Noise: the ratio of each step to the fit, in time order. A two-state hidden Markov
   model on its running median (so that lone spikes do not count as episodes) separates
   normal stretches from slow episodes, and their mean lengths in seconds. The fit is
   redone on the normal steps; the episodes' multiplier keeps the slow steps' total time;
   what is left around each state's level is the per-step noise (its cv).
3. 95% intervals on the coefficients from a moving-block bootstrap of the steps (blocks
   keep the noise's correlation in time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import nnls

from .logs import StepLog

STALL_RATIO = 3.0      # a step this many times the fit is a stall, not noise
SMOOTHING_STEPS = 9    # running-median window for finding episodes
MIN_EPISODE_MULTIPLIER = 1.1
BOOTSTRAP_BLOCK = 50   # steps per bootstrap block
TERMS = ("base_s", "per_decode_seq_s", "per_prefill_token_s", "per_kv_token_s")


@dataclass
class StepFit:
    """The fitted step-time block, with what it rests on."""

    coefficients: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    noise_cv: float
    episodes: Optional[dict[str, float]]   # multiplier, mean_duration_s, mean_interval_s (None: none found)
    stalls: list[tuple[str, float, float, float]]  # (run, start s or NaN, duration s, excess over the fit s)
    steps: int
    runs: dict[str, int]                   # steps per run label
    decode_max: int
    prefill_max: int
    kv_max: Optional[int]
    batch_tokens_max: int                  # decoding sequences + prefill tokens of the fullest step
    rms_s: float
    check: list[dict] = field(default_factory=list)  # per run: measured vs model mean and quantiles of steps

    def step_time(self, source: str) -> dict:
        """The `step_time` block of a workload."""
        block = {k: v for k, v in self.coefficients.items() if k == "base_s" or v > 0 or k in TERMS[:3]}
        block["noise_cv"] = self.noise_cv
        if self.episodes is not None:
            block["slow_episodes"] = dict(self.episodes)
        calibrated = {"source": source, "decode_seqs_max": self.decode_max, "prefill_tokens_max": self.prefill_max}
        if self.kv_max is not None:
            calibrated["kv_tokens_max"] = self.kv_max
        block["calibrated"] = calibrated
        return block


@dataclass
class _Steps:
    """All step logs pooled: regressors, durations, and each step's run (segments in time order)."""

    X: np.ndarray
    y: np.ndarray
    run: np.ndarray
    start: Optional[np.ndarray]
    names: tuple[str, ...]

    def segments(self, keep: np.ndarray) -> list[np.ndarray]:
        """Indexes of the kept steps of each run, in time order."""
        out = []
        for label in dict.fromkeys(self.run.tolist()):
            idx = np.flatnonzero((self.run == label) & keep)
            if self.start is not None:
                idx = idx[np.argsort(self.start[idx], kind="stable")]
            out.append(idx)
        return out


def _pool(logs: list[StepLog]) -> _Steps:
    with_kv = all(log.kv is not None for log in logs)
    columns = [np.ones(sum(log.duration.size for log in logs)),
               np.concatenate([log.decode for log in logs]), np.concatenate([log.prefill for log in logs])]
    names = TERMS[:3]
    if with_kv:
        kv = np.concatenate([log.kv for log in logs])
        if np.ptp(kv) > 0:
            columns.append(kv)
            names = TERMS
    run = np.concatenate([np.char.add(f"{k}:", log.run.astype(str)) for k, log in enumerate(logs)])
    start = np.concatenate([log.start for log in logs]) if all(log.start is not None for log in logs) else None
    return _Steps(np.column_stack(columns), np.concatenate([log.duration for log in logs]), run, start, names)


def fit_steps(logs: list[StepLog], bootstrap: int = 200, seed: int = 0) -> StepFit:
    """Fit the step-time model (and its noise) to the steps of all `logs` pooled."""
    data = _pool(logs)
    if data.y.size < 10 * data.X.shape[1]:
        raise ValueError(f"{data.y.size} steps are too few to fit {data.X.shape[1]} coefficients "
                         f"(give at least {10 * data.X.shape[1]})")
    keep = _without_stalls(data)
    weights, found = keep.astype(float), None
    for _ in range(4):  # the fit on normal steps and the episodes found around it settle in a few rounds
        ratio = data.y / np.maximum(data.X @ _wnnls(data.X, data.y, weights), 1e-12)
        found = _episodes(data, keep, ratio)
        weights = found[0] * keep if found is not None else keep.astype(float)
        if found is None:
            break
    coef = _wnnls(data.X, data.y, weights)
    predicted = data.X @ coef
    level, episodes = np.ones(data.y.size), None
    if found is not None:
        normal, slow, episodes = found
        # The slow level that keeps the slow steps' total time (least squares keeps the normal ones').
        episodes["multiplier"] = float((slow * data.y)[keep].sum() / (slow * predicted)[keep].sum())
        level = normal + slow * episodes["multiplier"]
        if episodes["multiplier"] < MIN_EPISODE_MULTIPLIER:
            weights, episodes, level = keep.astype(float), None, np.ones(data.y.size)
            coef = _wnnls(data.X, data.y, weights)
            predicted = data.X @ coef
    residual = data.y[keep] / (predicted * level)[keep]
    noise_cv = float(residual.std() / residual.mean())
    lows, highs = _bootstrap(data, keep, weights, bootstrap, seed)
    coefficients = {name: float(c) for name, c in zip(data.names, coef)}
    intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip(data.names, lows, highs)}
    return _result(data, keep, coef, level, coefficients, intervals, noise_cv, episodes)


def _wnnls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    root = np.sqrt(w)
    return nnls(X * root[:, None], y * root)[0]


def _without_stalls(data: _Steps) -> np.ndarray:
    """Steps that are not stalls (over STALL_RATIO x the fit), the fit redone until the set is stable."""
    keep = np.ones(data.y.size, dtype=bool)
    for _ in range(10):
        coef = _wnnls(data.X, data.y, keep.astype(float))
        new = data.y < STALL_RATIO * (data.X @ coef)
        if np.array_equal(new, keep):
            break
        keep = new
    return keep


def _episodes(data: _Steps, keep: np.ndarray, ratio: np.ndarray):
    """(normal and slow state probabilities per step, the episodes' mean lengths), or None when there are none.

    Needs step start times: episodes are stretches of time.
    """
    if data.start is None:
        return None
    segments = [idx for idx in data.segments(keep) if idx.size >= 4 * SMOOTHING_STEPS]
    if not segments:
        return None
    smooth = [np.log(_running_median(ratio[idx], SMOOTHING_STEPS)) for idx in segments]
    mu, _, transition, posteriors = hmm2(smooth)
    slow = int(np.argmax(mu))
    normal = 1 - slow
    index = np.concatenate(segments)
    post = np.concatenate(posteriors)
    if math.exp(mu[slow] - mu[normal]) < MIN_EPISODE_MULTIPLIER or not 0.01 <= post[:, slow].mean() <= 0.6:
        return None
    p_normal, p_slow = np.zeros(data.y.size), np.zeros(data.y.size)
    p_normal[index], p_slow[index] = post[:, normal], post[:, slow]
    # Mean lengths in steps are 1 / P(leaving the state) per step; in seconds, times the state's mean step.
    step_normal = float(np.average(data.y[index], weights=post[:, normal]))
    step_slow = float(np.average(data.y[index], weights=post[:, slow]))
    timing = {"multiplier": math.exp(mu[slow] - mu[normal]),
              "mean_duration_s": step_slow / max(transition[slow, normal], 1e-9),
              "mean_interval_s": step_normal / max(transition[normal, slow], 1e-9)}
    return p_normal, p_slow, timing


def _running_median(x: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    padded = np.pad(x, half, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def hmm2(sequences: list[np.ndarray], iterations: int = 60) -> tuple:
    """A two-state hidden Markov model with Gaussian emissions, fitted by Baum-Welch.

    Returns (means, sds, transition matrix, per-sequence state posteriors).
    """
    pooled = np.concatenate(sequences)
    mu = np.quantile(pooled, [0.3, 0.9])
    sd = np.full(2, max(pooled.std() / 2, 1e-6))
    transition = np.array([[0.95, 0.05], [0.2, 0.8]])
    start = np.array([0.5, 0.5])
    previous = -math.inf
    for _ in range(iterations):
        posteriors, pairs, loglik, firsts = [], np.zeros((2, 2)), 0.0, []
        for x in sequences:
            gamma, xi, ll = _forward_backward(x, mu, sd, transition, start)
            posteriors.append(gamma)
            pairs += xi
            loglik += ll
            firsts.append(gamma[0])
        weights = np.concatenate(posteriors)
        total = weights.sum(axis=0) + 1e-12
        mu = (weights * pooled[:, None]).sum(axis=0) / total
        sd = np.sqrt((weights * (pooled[:, None] - mu) ** 2).sum(axis=0) / total) + 1e-6
        transition = pairs / pairs.sum(axis=1, keepdims=True)
        start = np.mean(firsts, axis=0)
        if loglik - previous < 1e-6 * abs(loglik):
            break
        previous = loglik
    return mu, sd, transition, posteriors


def _forward_backward(x, mu, sd, transition, start):
    """Scaled forward-backward pass: state posteriors, expected transitions, log-likelihood."""
    n = x.size
    emission = np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / sd + 1e-300
    alpha, scale = np.empty((n, 2)), np.empty(n)
    a = start * emission[0]
    scale[0] = a.sum()
    alpha[0] = a / scale[0]
    for t in range(1, n):
        a = (alpha[t - 1] @ transition) * emission[t]
        scale[t] = a.sum()
        alpha[t] = a / scale[t]
    beta = np.ones((n, 2))
    for t in range(n - 2, -1, -1):
        beta[t] = (transition @ (emission[t + 1] * beta[t + 1])) / scale[t + 1]
    gamma = alpha * beta
    gamma /= gamma.sum(axis=1, keepdims=True)
    xi = (alpha[:-1, :, None] * transition[None] * (emission[1:] * beta[1:])[:, None, :]
          / scale[1:, None, None]).sum(axis=0)
    return gamma, xi, float(np.log(scale).sum())


def _bootstrap(data: _Steps, keep: np.ndarray, weights: np.ndarray, rounds: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile intervals of each coefficient over moving-block bootstrap refits."""
    coef = _wnnls(data.X, data.y, weights)
    if rounds <= 0:
        return coef, coef
    rng = np.random.default_rng(seed)
    blocks = [idx[k:k + BOOTSTRAP_BLOCK] for idx in data.segments(keep) for k in range(0, idx.size, BOOTSTRAP_BLOCK)]
    fits = []
    for _ in range(rounds):
        pick = np.concatenate([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))])
        fits.append(_wnnls(data.X[pick], data.y[pick], weights[pick]))
    fits = np.asarray(fits)
    return np.percentile(fits, 2.5, axis=0), np.percentile(fits, 97.5, axis=0)


def _result(data: _Steps, keep: np.ndarray, coef: np.ndarray, level: np.ndarray, coefficients: dict,
            intervals: dict, noise_cv: float, episodes: Optional[dict]) -> StepFit:
    predicted = data.X @ coef
    stalls = [(data.run[k].split(":", 1)[1], float(data.start[k]) if data.start is not None else math.nan,
               float(data.y[k]), float(data.y[k] - predicted[k])) for k in np.flatnonzero(~keep)]
    decode = data.X[:, 1]
    prefill = data.X[:, 2]
    kv = data.X[:, 3] if data.X.shape[1] > 3 else None
    runs = {label.split(":", 1)[1] or "steps": int((data.run == label).sum()) for label in dict.fromkeys(data.run)}
    check = []
    for label in dict.fromkeys(data.run.tolist()):
        mine = (data.run == label) & keep
        check.append({"run": label.split(":", 1)[1] or "steps", "steps": int(mine.sum()),
                      "measured_mean_s": float(data.y[mine].mean()),
                      "model_mean_s": float((predicted * level)[mine].mean()),
                      "measured_p50_s": float(np.median(data.y[mine])),
                      "measured_p99_s": float(np.percentile(data.y[mine], 99))})
    return StepFit(coefficients, intervals, noise_cv, episodes, stalls, int(keep.sum()), runs,
                   int(decode.max()), int(prefill.max()), int(kv.max()) if kv is not None else None,
                   int((decode + prefill).max()), float(np.sqrt(np.mean((data.y - predicted)[keep] ** 2))), check)
