"""Guardrails: a request's time limit, its calls' timeouts, caps on calls, tokens and tool calls, retries.

The lifecycle (sim.model.application.lifecycle) runs the request and asks this component:
may it make one more call (`allows`), how much of a retrieval plan it may run
(`tool_plan`), how long to back off before a retry (`retry_wait`). Time limits
fire the lifecycle's handlers; they are kept on `Timeouts`, so a limit costs
no event unless its request or call is still running when it comes.

What a request's guardrails did is one row of `recorder.guard_log` (only for
requests where they did something): (request, retries, call timeouts,
answer path, limit), with the codes below.
"""
from __future__ import annotations

from typing import Callable, Optional

import simpy

from sim.config.pipeline import Guardrails as GuardrailsSpec
from sim.metrics.recorder import Recorder
from sim.model.events import Timeouts
from sim.model.streams import BlockSampler, Streams
from sim.model.traffic.ratelimit import RetryPolicy, uniform_pm1

ANSWER_PATHS = ("direct", "smaller_model", "reduced_context")
"""How the call in flight came about: the normal way, or as a fallback (the guard_log `path` field)."""
LIMITS = ("none", "hops", "tokens", "tool_calls")
"""Which cap last denied a call or a retrieval hop (the guard_log `limit` field)."""


class Guardrails:
    """The limits of one run's requests; `request` objects carry hops, tokens, tools, retries and limit."""

    def __init__(self, env: simpy.Environment, spec: GuardrailsSpec, model_names: list[str], recorder: Recorder,
                 calls: Recorder, streams: Streams, on_deadline: Callable, on_call_timeout: Callable) -> None:
        self.env = env
        self.spec = spec
        self.fallbacks = tuple(spec.fallbacks)
        self.fallback_endpoint = model_names.index(spec.fallback_model) if spec.fallback_model else -1
        self.reduced_share = spec.reduced_context_share
        self.max_time, self.tool_cap = spec.max_time_s, spec.max_tool_calls
        self.max_hops, self.max_tokens = spec.max_hops, spec.max_tokens
        jitter = (BlockSampler(uniform_pm1, streams.rng("guardrails.retry"))
                  if spec.retry.jitter > 0 and spec.retry.max_attempts > 1 else None)
        self.retry = RetryPolicy(spec.retry, jitter)
        recorder.guard_log = []
        outcome, call_outcome = recorder.outcome, calls.outcome
        self.first_token = calls.first_token
        self.on_call_timeout = on_call_timeout
        self.deadlines = Timeouts(env, lambda r: outcome[r.i] < 0, on_deadline)
        # One entry per call: at its first-token limit, then (if it streams by then) at its whole limit.
        self.call_timeouts = Timeouts(env, lambda rc: call_outcome[rc[1]] < 0, self._check_call)

    def watch_request(self, r, arrival: float) -> None:
        """Request r's time limit, counted from its arrival (a wait at the rate limits included)."""
        if self.max_time is not None:
            self.deadlines.add(max(0.0, arrival + self.max_time - self.env._now), r)

    def watch_call(self, r, c: int) -> None:
        """Call c's timeouts, from its send now."""
        first, whole = self.spec.first_token_timeout_s, self.spec.call_timeout_s
        if first is not None and (whole is None or first < whole):
            self.call_timeouts.add(first, (r, c, True))
        elif whole is not None:
            self.call_timeouts.add(whole, (r, c, False))

    def _check_call(self, value: tuple) -> None:
        """A running call at its first-token limit (times out if silent) or at its whole limit (times out)."""
        r, c, first_token_limit = value
        if not first_token_limit or not self.first_token[c] <= self.env._now:  # silent: no token yet
            self.on_call_timeout((r, c))  # (an API's first token is known ahead: it may be due later)
            return
        whole = self.spec.call_timeout_s
        if whole is not None:  # streaming: its whole limit still holds
            self.call_timeouts.add(whole - self.spec.first_token_timeout_s, (r, c, False))

    def allows(self, r, tokens: int) -> bool:
        """Whether the caps allow r one more call of `tokens` (prompt + output); a refusal is noted in r.limit."""
        if self.max_hops is not None and r.hops >= self.max_hops:
            r.limit = LIMITS.index("hops")
            return False
        if self.max_tokens is not None and r.tokens + tokens > self.max_tokens:
            r.limit = LIMITS.index("tokens")
            return False
        return True

    def tool_plan(self, r, plan: tuple) -> tuple:
        """The first stages of a retrieval plan that keep r within the tool cap; their hops are counted."""
        if self.tool_cap is None:
            return plan
        kept, used = [], r.tools
        for stage in plan:
            used += len(stage[0])
            if used > self.tool_cap:
                r.limit = LIMITS.index("tool_calls")
                break
            kept.append(stage)
            r.tools = used
        return tuple(kept)

    def retry_wait(self, r) -> Optional[float]:
        """The backoff before r retries its failed call, or None when its attempts are spent."""
        if r.retries + 1 >= self.retry.max_attempts:
            return None
        r.retries += 1
        wait = self.retry.wait(r.retries, None)
        r.retry_s += wait
        return wait

    def reduced_prompt(self, prompt: int, prefix: int) -> int:
        """The reduced_context fallback's prompt: the stable prefix, and a share of what follows."""
        return prefix + max(1, round((prompt - prefix) * self.reduced_share))

    @staticmethod
    def log(recorder: Recorder, r) -> None:
        """Note what the guardrails did for request r, if anything."""
        if r.retries or r.timeouts or r.path or r.limit:
            recorder.guard_log.append((r.i, r.retries, r.timeouts, r.path, r.limit))
