"""Offered utilisation of each endpoint, from the config alone (no simulation).

Offered utilisation = arrival rate x work per request / capacity. At or above 1
an open system has no steady state: its queue grows for as long as it runs.
Closed-loop classes are left out: a finite population cannot overload a server.
With a pipeline every request counts as a model call (output-cache hits are not
known before the run: the figure is the load before the cache); with a router,
its calls are spread over the tiers as the policy and escalation send them.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from sim.config.schema import Api, Workload
from sim.model.traffic.ratelimit import rates_past_limits

_DRAWS = 100_000


def _mean(draw) -> float:
    """Mean of a distribution as the simulator draws it (rounding, floors), from a fixed seed."""
    return float(np.mean(draw(np.random.default_rng(0), _DRAWS)))


_token_means: dict[tuple[str, bytes], float] = {}


def _tokens(spec) -> float:
    """Mean tokens of a token distribution as drawn, kept by what defines its draws (its fields, and an empirical
    one's values, which may come from a file): every run and replication of a sweep asks again (for the offered
    load and each engine's full batch), and 100k draws cost milliseconds."""
    data = getattr(spec, "_data", None)
    key = (repr(spec), hashlib.sha1(data.tobytes()).digest() if data is not None else b"")
    if key not in _token_means:
        _token_means[key] = _mean(lambda rng, n: np.maximum(np.rint(spec.sample(rng, n)), 1))
    return _token_means[key]


def offered_load_rps(workload: Workload) -> float:
    """Total open-loop arrival rate (rate_scale applied): the x axis of load curves."""
    return sum(cls.open_loop_rate_rps() for cls in workload.traffic.classes.values()) * workload.traffic.rate_scale


def offered_utilisation(workload: Workload) -> dict[str, float]:
    """Offered utilisation per endpoint (open-loop traffic only, as much as the rate limits let through)."""
    classes = workload.traffic.classes
    passed, provider = _past_our_limits(workload)
    prompt = _budget_prompt(workload)  # both sample 100k draws: once, not per class
    routed = routed_calls(workload)
    result = {}
    for name, model in workload.models.items():
        batch = full_batch(workload, name)
        load = 0.0
        for cname, cls in classes.items():
            if cls.batch and getattr(model, "batch", None) is not None:
                continue  # the provider's batch lane, not the interactive slots
            for per_request, extra in _calls_to(name, cname, cls, routed):
                rate = passed[cname] * per_request * provider[name]
                if rate > 0:
                    load += rate * _work_per_request(model, cls, batch, prompt, extra)
        result[name] = load / _servers(model)
    return result


def _past_our_limits(workload: Workload) -> tuple[dict[str, float], dict[str, float]]:
    """`rates_past_limits` of the classes' open-loop rates (rate_scale applied)."""
    rates = {n: c.open_loop_rate_rps() * workload.traffic.rate_scale for n, c in workload.traffic.classes.items()}
    return rates_past_limits(workload, rates, _tokens)


def _calls_to(endpoint: str, cname: str, cls, routed) -> list[tuple[float, float]]:
    """(model calls per request, extra prompt tokens) of class `cname` on `endpoint`: per router tier with a
    router (`routed_calls`), else its endpoint mix's share."""
    return routed[cname].get(endpoint, []) if routed else [(cls.endpoint_mix().get(endpoint, 0.0), 0.0)]


NEAR_LIMIT = 0.8
"""Offered traffic past this share of a provider's limit gets a warning: bursts will meet it."""


def provider_limit_shares(workload: Workload) -> dict[str, tuple[str, float, float, float]]:
    """Per API endpoint with provider limits: (its binding limit as 'rpm 500', the offered share of it, offered
    calls and tokens a minute). The traffic is what passes our own rate limits; with a router, the calls it
    sends there; a tpm counts prompt + max output tokens, as providers do."""
    if not any(getattr(model, "limits", None) is not None for model in workload.models.values()):
        return {}  # (the rates below cost 100k draws apiece: every run asks)
    classes = workload.traffic.classes
    passed, _ = _past_our_limits(workload)
    prompt, routed = _budget_prompt(workload), routed_calls(workload)
    out = {}
    for name, model in workload.models.items():
        limits = getattr(model, "limits", None)
        if limits is None:
            continue
        calls = tokens = 0.0  # per minute
        for cname, cls in classes.items():
            cost = ((_tokens(cls.prompt_tokens) if prompt is None else prompt)
                    + (cls.max_output_tokens or _tokens(cls.output_tokens)))
            for per_request, extra in _calls_to(name, cname, cls, routed):
                rate = passed[cname] * per_request * 60.0
                calls += rate
                tokens += rate * (cost + extra)
        shares = {f"{unit} {limit:,}": offered / limit
                  for unit, limit, offered in (("rpm", limits.rpm, calls), ("tpm", limits.tpm, tokens)) if limit}
        binding = max(shares, key=shares.get)
        out[name] = (binding, shares[binding], calls, tokens)
    return out


def provider_limit_warnings(workload: Workload) -> list[str]:
    """One line per API endpoint whose offered traffic comes near its provider's rpm or tpm (see
    provider_limit_shares), naming the binding one."""
    out = []
    for name, (binding, share, calls, tokens) in provider_limit_shares(workload).items():
        if share >= NEAR_LIMIT:
            what = "exceeds" if share > 1 else "comes near"
            out.append(f"models.{name}.limits: the offered traffic ({calls:,.0f} requests and {tokens:,.0f} tokens a "
                       f"minute) {what} the provider's {binding} ({share:.0%} of it): calls past it get "
                       "429s and wait (retry); raise the tier, or spread the traffic")
    return out


def routed_calls(workload: Workload) -> Optional[dict[str, dict[str, list[tuple[float, float]]]]]:
    """With a router: per class and endpoint, (model calls per request, extra prompt tokens) per tier.

    The router's policy and the escalation's evaluator are drawn as the simulator draws them (difficulty,
    the threshold router's noise, the evaluator's flags), from a fixed seed; None without a router.
    """
    pipeline = getattr(workload, "pipeline", None)
    router = pipeline.router if pipeline is not None else None
    if router is None:
        return None
    escalation = pipeline.escalation
    tiers = len(router.tiers)
    extra = escalation.extra_context_tokens if escalation is not None else 0
    quality = np.asarray(router.quality)
    out = {}
    for cname in workload.traffic.classes:
        rng = np.random.default_rng(0)
        spec = router.difficulty.get(cname)
        d = np.clip(spec.sample(rng, _DRAWS) if spec is not None else rng.uniform(0.0, 1.0, _DRAWS), 0.0, 1.0)
        if router.policy == "risk" and cname in router.risky_classes:
            tier = np.full(_DRAWS, tiers - 1)
        elif router.policy == "complexity":
            tier = (d[:, None] > np.asarray(router.thresholds)).sum(axis=1)
        elif router.policy == "threshold":
            estimate = d + rng.normal(0.0, router.estimate_noise_sd, _DRAWS)
            tier = (estimate[:, None] > np.asarray(router.thresholds)).sum(axis=1)
        else:
            tier = np.full(_DRAWS, router.fixed_tier)
        calls = np.bincount(tier, minlength=tiers).astype(float)
        if escalation is not None:
            last = min(escalation.max_hops, tiers)
            active = np.ones(_DRAWS, dtype=bool)
            for _ in range(tiers):
                flagged = rng.random(_DRAWS) < np.where(d < quality[tier], escalation.false_alarm, escalation.detect_bad)
                active &= (tier + 1 < last) & flagged
                tier = tier + active
                calls += np.bincount(tier[active], minlength=tiers)
        per_endpoint: dict[str, list[tuple[float, float]]] = {}
        for k, name in enumerate(router.tiers):
            per_endpoint.setdefault(name, []).append((calls[k] / _DRAWS, float(k * extra)))
        out[cname] = per_endpoint
    return out


def _budget_prompt(workload: Workload) -> Optional[float]:
    """Mean prompt tokens a pipeline budget builds (None without one)."""
    pipeline = getattr(workload, "pipeline", None)
    if pipeline is None or pipeline.budget is None:
        return None
    from sim.model.application.budget import mean_prompt_tokens

    return mean_prompt_tokens(pipeline.budget)


def full_batch(workload: Workload, name: str) -> int:
    """The batch an engine replica reaches under full load: max_batch, or fewer if the KV cache binds.

    The KV need of a request is its prompt + output tokens, averaged over the classes
    sent to this endpoint (weighted by their arrival rates; a closed loop by users / think time).
    """
    model = workload.models[name]
    engine = getattr(model, "engine", None)
    if engine is None or engine.kv_cache_tokens is None:
        return getattr(model, "max_batch", 1)
    weights, tokens = [], []
    for cls in workload.traffic.classes.values():
        weight = cls.endpoint_mix().get(name, 0.0) * cls.request_rate_rps()
        if weight > 0:
            weights.append(weight)
            tokens.append(_tokens(cls.prompt_tokens) + _tokens(cls.output_tokens))
    if not weights or sum(weights) == 0:
        return model.max_batch
    mean_tokens = float(np.average(tokens, weights=weights))
    return max(1, min(model.max_batch, int(engine.kv_cache_tokens // mean_tokens)))


def _servers(model) -> int:
    if isinstance(model, Api):
        return model.concurrency
    if model.engine is not None:  # an autoscaler may go up to max_replicas
        return model.autoscale.max_replicas if model.autoscale is not None else model.replicas
    return model.replicas * model.max_batch


def _work_per_request(model, cls, batch: int, prompt_tokens: Optional[float] = None, extra: float = 0.0) -> float:
    """Server-seconds one request needs; for the engine, at the full batch it can reach.

    `prompt_tokens`: the mean prompt when a pipeline budget builds it (else the class's draws);
    `extra`: prompt tokens an escalated call adds to it.
    """
    if model.service_time is not None:
        return model.service_time.mean
    out = _tokens(cls.output_tokens)
    if isinstance(model, Api):
        inverse_speed = _mean(lambda rng, n: 1.0 / np.maximum(model.output_tokens_per_s.sample(rng, n), 1e-3))
        return model.ttft_s.mean + (out - 1) * inverse_speed
    prompt = (_tokens(cls.prompt_tokens) if prompt_tokens is None else prompt_tokens) + extra
    return engine_work(model.engine.step_time, batch, prompt, out, _squares(cls.prompt_tokens, prompt),
                       _squares(cls.output_tokens, out))


def engine_work(st, batch: int, prompt: float, output: float, prompt_sq: float, output_sq: float) -> float:
    """Full-batch seconds of engine work for a request of mean `prompt` and `output` tokens.

    `prompt_sq`, `output_sq`: the means of their squares (prompt and output drawn independently, as the
    simulator draws them). A full batch shares each step's base cost; prefill and per-sequence costs are
    per token; decode step j (1 .. output - 1) reads prompt + j context tokens, and a prompt of P tokens
    has P (P + 1) / 2 attention pairs. Slow episodes leave less capacity: the work counts for more.
    """
    work = st.per_prefill_token_s * prompt + output * (st.per_decode_seq_s + st.base_s / batch)
    work += st.per_kv_token_s * ((output - 1) * prompt + (output_sq - output) / 2)
    work += st.per_prefill_attention_s * (prompt_sq + prompt) / 2
    return work / st.slow_episodes.capacity_factor() if st.slow_episodes is not None else work


def _squares(spec, mean: float) -> float:
    """Mean square of a token count as the simulator draws it, shifted to the given mean (a budget's prompt)."""
    draws = np.maximum(np.rint(spec.sample(np.random.default_rng(0), _DRAWS)), 1)
    return float(np.var(draws)) + mean * mean
