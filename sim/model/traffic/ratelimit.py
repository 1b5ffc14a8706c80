"""Rate limiting: our limiters in front of the endpoints, the client's retries, provider limits.

Arrivals call the gate's `submit(i)`. The workload's `rate_limits` are stages
passed in order, one after the other, as a chain of middlewares: a request
takes its token or window slot at a stage, then goes on to the next; a later
stage that rejects it does not give back what an earlier one took.

- `reject` stages answer 429 at once when over the limit. The client waits as
  its class's `retry` policy says (exponential backoff, jitter from the stream
  `class.<name>.retry`) and submits again from the first stage, or, after
  `max_attempts`, gives up: outcome RATE_LIMITED.
- `delay` stages shape: each key (user, class or everybody) has a FIFO line,
  and a request is released at the earliest time the limiter admits it given
  everything released or promised before it. That time is computed at once and
  reserved (a token bucket may go negative; a window books a later slot), so a
  held request costs one scheduled event, whatever the length of its line.

Windows count requests and tokens, tokens being prompt + max output (the
class's `max_output_tokens`, else the request's output), as providers reserve
max_tokens. `fixed_window` windows are aligned on multiples of `window_s` from
time 0. `sliding_window` keeps the exact log of the last `window_s` seconds
(not the two-window approximation): at no time are more than `max_requests`
requests (or `max_tokens` tokens) in any window of `window_s` seconds. A
request costing more than `max_tokens` can never pass; it ends RATE_LIMITED
at once (retrying could not help).

Provider limits (`models.X.limits`, API endpoints) are a sliding 60-second
window checked when a request is sent to the provider, i.e. when it would take
an API slot. Over the limit, the provider answers 429 with a retry-after (the
time until the window has room); the slot is not held. Our service retries the
call by the class's policy (waiting at least the retry-after if
`honour_retry_after`), back into the endpoint's queue (the user's request
already passed our own limiters), and gives up after `max_attempts`.

All decisions depend on the simulation clock and the seeded jitter stream
only, so the same seed gives the same numbers.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional, Sequence, Union

import numpy as np
import simpy

from sim.config.limits import ProviderLimits, Retry, TokenBucket, WindowLimit
from sim.config.schema import Api, Workload
from sim.metrics.recorder import RATE_LIMITED, Recorder
from sim.model.events import call_later
from sim.model.streams import BlockSampler, Streams

Submit = Callable[[int], None]
INF = math.inf
PROVIDER_WINDOW_S = 60.0   # rpm and tpm are per minute
RETRY_AFTER_PAD_S = 1e-9   # a retry-after lands just past the instant the window frees, never an ulp before


# ------------------------------------------------------------------ limiter state, per key


class _Bucket:
    """One key's token bucket; `tokens` goes negative while a delay line holds reservations."""

    __slots__ = ("tokens", "last")

    def __init__(self, burst: float) -> None:
        self.tokens = burst  # a bucket starts full
        self.last = 0.0


class BucketLimiter:
    """A token bucket: `burst` tokens, refilled at `rate_rps`; a request takes one."""

    def __init__(self, rate_rps: float, burst: float) -> None:
        self.rate = rate_rps
        self.burst = burst
        self.states: dict[int, _Bucket] = {}

    def _state(self, key: int, now: float) -> _Bucket:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _Bucket(self.burst)
        state.tokens = min(self.burst, state.tokens + (now - state.last) * self.rate)
        state.last = now
        return state

    def too_big(self, cost: int) -> bool:
        """Whether a request could never pass (a bucket always refills)."""
        return False

    def take(self, key: int, now: float, cost: int) -> bool:
        """Admit now (and take a token) or refuse, leaving the bucket as it was."""
        state = self._state(key, now)
        if state.tokens >= 1.0:
            state.tokens -= 1.0
            return True
        return False

    def reserve(self, key: int, now: float, cost: int) -> float:
        """Take the next token in line; returns when it is there (now, or the exact refill time)."""
        state = self._state(key, now)
        state.tokens -= 1.0
        return now if state.tokens >= 0.0 else now - state.tokens / self.rate


class _Counts:
    """One key's fixed window: its index and what it holds."""

    __slots__ = ("index", "requests", "tokens")

    def __init__(self) -> None:
        self.index = 0
        self.requests = 0
        self.tokens = 0


class FixedWindowLimiter:
    """At most `max_requests` requests and `max_tokens` tokens per window [k w, (k + 1) w)."""

    def __init__(self, window_s: float, max_requests: Optional[int], max_tokens: Optional[int]) -> None:
        self.window = window_s
        self.max_requests = INF if max_requests is None else max_requests
        self.max_tokens = INF if max_tokens is None else max_tokens
        self.states: dict[int, _Counts] = {}

    def _state(self, key: int, now: float) -> tuple[_Counts, int]:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _Counts()
        index = int(now // self.window)
        if state.index < index:  # a new window (a booked later one is kept)
            state.index, state.requests, state.tokens = index, 0, 0
        return state, index

    def too_big(self, cost: int) -> bool:
        """Whether a request costs more tokens than a whole window holds."""
        return cost > self.max_tokens

    def _fits(self, state: _Counts, cost: int) -> bool:
        return state.requests + 1 <= self.max_requests and state.tokens + cost <= self.max_tokens

    def take(self, key: int, now: float, cost: int) -> bool:
        """Admit now (and count it) or refuse."""
        state, _ = self._state(key, now)
        if not self._fits(state, cost):
            return False
        state.requests += 1
        state.tokens += cost
        return True

    def reserve(self, key: int, now: float, cost: int) -> float:
        """Book the first window with room at or after the last booking; returns when it opens."""
        if cost > self.max_tokens:
            return INF
        state, index = self._state(key, now)
        if not self._fits(state, cost):
            state.index, state.requests, state.tokens = state.index + 1, 0, 0
        state.requests += 1
        state.tokens += cost
        return now if state.index == index else state.index * self.window


class _Log:
    """One key's sliding log: admission (or release) times and costs, oldest first."""

    __slots__ = ("times", "costs", "tokens")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.costs: deque[int] = deque()
        self.tokens = 0

    def drop_oldest(self) -> float:
        self.tokens -= self.costs.popleft()
        return self.times.popleft()


class SlidingWindowLimiter:
    """At most `max_requests` requests and `max_tokens` tokens in any `window_s` seconds (an exact log).

    An entry at time e counts in the windows (t - w, t] with e > t - w, i.e. until e + w.
    """

    def __init__(self, window_s: float, max_requests: Optional[int], max_tokens: Optional[int]) -> None:
        self.window = window_s
        self.max_requests = INF if max_requests is None else max_requests
        self.max_tokens = INF if max_tokens is None else max_tokens
        self.states: dict[int, _Log] = {}

    def _log(self, key: int, now: float) -> _Log:
        log = self.states.get(key)
        if log is None:
            log = self.states[key] = _Log()
        self._expire(log, now)
        return log

    def _expire(self, log: _Log, t: float) -> None:
        times, window = log.times, self.window
        while times and times[0] + window <= t:
            log.drop_oldest()

    def too_big(self, cost: int) -> bool:
        """Whether a request costs more tokens than a whole window holds."""
        return cost > self.max_tokens

    def _fits(self, log: _Log, cost: int) -> bool:
        return len(log.times) + 1 <= self.max_requests and log.tokens + cost <= self.max_tokens

    def take(self, key: int, now: float, cost: int) -> bool:
        """Admit now (and log it) or refuse."""
        log = self._log(key, now)
        if not self._fits(log, cost):
            return False
        log.times.append(now)
        log.costs.append(cost)
        log.tokens += cost
        return True

    def retry_after(self, key: int, now: float, cost: int) -> float:
        """Seconds until a refused request would fit (INF if it never can); the log is not changed."""
        if cost > self.max_tokens:
            return INF
        log = self._log(key, now)
        count, tokens, t = len(log.times), log.tokens, now
        for e, c in zip(log.times, log.costs):  # drop the oldest until it fits
            if count + 1 <= self.max_requests and tokens + cost <= self.max_tokens:
                break
            count, tokens, t = count - 1, tokens - c, e + self.window
        return max(t - now, 0.0) + RETRY_AFTER_PAD_S

    def reserve(self, key: int, now: float, cost: int) -> float:
        """Release in FIFO order at the earliest time the window has room; returns that time."""
        if cost > self.max_tokens:
            return INF
        log = self._log(key, now)
        t = max(now, log.times[-1]) if log.times else now  # behind the last one in line
        self._expire(log, t)
        while not self._fits(log, cost):
            t = max(t, log.drop_oldest() + self.window)
            self._expire(log, t)
        # Entries dropped above still count before t, but every later request of this key is
        # released at t or after, so no decision needs them again.
        log.times.append(t)
        log.costs.append(cost)
        log.tokens += cost
        return t


Limiter = Union[BucketLimiter, FixedWindowLimiter, SlidingWindowLimiter]


def make_limiter(spec: Union[TokenBucket, WindowLimit]) -> Limiter:
    """The limiter a `rate_limits` entry describes."""
    if isinstance(spec, TokenBucket):
        return BucketLimiter(spec.rate_rps, spec.burst)
    if spec.kind == "fixed_window":
        return FixedWindowLimiter(spec.window_s, spec.max_requests, spec.max_tokens)
    return SlidingWindowLimiter(spec.window_s, spec.max_requests, spec.max_tokens)


class Stage:
    """A limiter in the gate: its state, the column its key comes from, and its action."""

    __slots__ = ("limiter", "keys", "delay")

    def __init__(self, limiter: Limiter, keys: Optional[list[int]], delay: bool) -> None:
        self.limiter = limiter
        self.keys = keys    # rec.user, rec.cls, or None for one global key
        self.delay = delay


# ------------------------------------------------------------------ the client's retries


class RetryPolicy:
    """One class's `retry` block, with its waits precomputed and its jitter stream."""

    def __init__(self, spec: Retry, jitter: Optional[BlockSampler]) -> None:
        self.max_attempts = spec.max_attempts
        self.jitter = spec.jitter
        self.cap = spec.max_backoff_s
        self.honour_retry_after = spec.honour_retry_after
        self.draw = jitter
        # Waits before retries 1, 2, ...: multiplied step by step (no overflow) until the cap.
        self.waits: list[float] = []
        wait = spec.backoff_s
        while len(self.waits) < spec.max_attempts - 1:
            self.waits.append(min(wait, self.cap))
            if wait >= self.cap or wait * spec.multiplier == wait:  # constant from here on
                break
            wait *= spec.multiplier

    def wait(self, attempts: int, retry_after: Optional[float]) -> float:
        """Seconds to wait after the `attempts`-th attempt failed: backoff within +-jitter, capped."""
        base = self.waits[min(attempts, len(self.waits)) - 1]
        if self.draw is not None:
            base = min(base * (1.0 + self.jitter * self.draw()), self.cap)
        if retry_after is not None and self.honour_retry_after:
            base = max(base, retry_after)
        return base


def uniform_pm1(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, n)


class Client:
    """What the client does after a 429: wait and try again, or give up (outcome RATE_LIMITED)."""

    def __init__(self, env: simpy.Environment, workload: Workload, recorder: Recorder, streams: Streams,
                 done: Submit) -> None:
        self.env = env
        self.rec = recorder
        self.done = done
        self.policies: list[RetryPolicy] = []
        for name, cls in workload.traffic.classes.items():
            jitter = (BlockSampler(uniform_pm1, streams.rng(f"class.{name}.retry"))
                      if cls.retry.jitter > 0 and cls.retry.max_attempts > 1 else None)
            self.policies.append(RetryPolicy(cls.retry, jitter))
        self.max_out = [cls.max_output_tokens for cls in workload.traffic.classes.values()]

    def cost(self, i: int) -> int:
        """Tokens a limit counts for request i: prompt + max output, as providers reserve max_tokens."""
        rec = self.rec
        cap = self.max_out[rec.cls[i]]
        return rec.prompt[i] + (rec.output[i] if cap is None else cap)

    def retry(self, i: int, resend: Callable, retry_after: Optional[float] = None) -> bool:
        """Request i got a 429: schedule `resend` after the policy's wait; False if it has no attempt left."""
        rec = self.rec
        policy = self.policies[rec.cls[i]]
        attempts = rec.attempts[i]
        if attempts >= policy.max_attempts:
            return False
        rec.attempts[i] = attempts + 1
        call_later(self.env, policy.wait(attempts, retry_after), resend, i)
        return True

    def give_up(self, i: int) -> None:
        """Request i ends rate-limited now."""
        rec = self.rec
        rec.outcome[i] = RATE_LIMITED
        rec.end[i] = self.env._now
        self.done(i)


# ------------------------------------------------------------------ our gate


class Gate:
    """The workload's `rate_limits`, in order, in front of the endpoint queues."""

    def __init__(self, env: simpy.Environment, workload: Workload, recorder: Recorder, client: Client,
                 forward: Submit) -> None:
        self.env = env
        self.client = client
        self.forward = forward
        self.cls = recorder.cls
        names = list(workload.traffic.classes)
        columns = {"user": recorder.user, "class": recorder.cls, "global": None}
        stages = [Stage(make_limiter(spec), columns[spec.scope], spec.action == "delay")
                  for spec in workload.rate_limits]
        # The stages each class passes, so a request never looks at limiters of other classes.
        self.by_class: list[tuple[Stage, ...]] = [
            tuple(s for s, spec in zip(stages, workload.rate_limits) if spec.classes is None or name in spec.classes)
            for name in names
        ]

    def submit(self, i: int) -> None:
        """A request (or a retry) arrives at the gate."""
        self._pass(i, 0)

    def _resubmit(self, event) -> None:
        self._pass(event.value, 0)

    def _release(self, event) -> None:
        i, stage = event.value
        self._pass(i, stage)

    def _pass(self, i: int, first: int) -> None:
        stages = self.by_class[self.cls[i]]
        if first < len(stages):
            now = self.env._now
            cost = self.client.cost(i)
            for k in range(first, len(stages)):
                stage = stages[k]
                key = 0 if stage.keys is None else stage.keys[i]
                if stage.delay:
                    t = stage.limiter.reserve(key, now, cost)
                    if t > now:
                        if t == INF:
                            self.client.give_up(i)
                        else:
                            call_later(self.env, t - now, self._release, (i, k + 1))
                        return
                elif not stage.limiter.take(key, now, cost):
                    if stage.limiter.too_big(cost) or not self.client.retry(i, self._resubmit):
                        self.client.give_up(i)
                    return
        self.forward(i)


# ------------------------------------------------------------------ provider limits


class ProviderGate:
    """An API provider's rpm/tpm, checked when a request would take an API slot.

    Called by the slot server before it admits request i: True lets it through
    (and counts it); False means the provider answered 429 and the client has
    arranged the retry (or the give-up); the slot stays free.

    While a request waits to retry, `rec.admit` holds the time of the refused
    send: the endpoint reads a NaN admit as "still in the queue" (deadlines),
    and this request is not. The retry clears it before re-entering the queue.
    """

    def __init__(self, env: simpy.Environment, limits: ProviderLimits, client: Client, pending: dict,
                 resend: Submit) -> None:
        self.env = env
        self.log = SlidingWindowLimiter(PROVIDER_WINDOW_S, limits.rpm, limits.tpm)
        self.client = client
        self.pending = pending
        self.resend = resend

    def __call__(self, i: int) -> bool:
        now = self.env._now
        cost = self.client.cost(i)
        if self.log.take(0, now, cost):
            return True
        client = self.client
        if self.log.too_big(cost) or not client.retry(i, self._retry, self.log.retry_after(0, now, cost)):
            self.pending.pop(i, None)  # the draws kept for a retry are not needed
            client.give_up(i)
            return False
        client.rec.admit[i] = now
        return False

    def _retry(self, event) -> None:
        i = event.value
        if self.client.rec.outcome[i] >= 0:  # cancelled while it waited (a time limit)
            return
        self.client.rec.admit[i] = math.nan
        self.resend(i)


def _keep_draws(prepare: Callable[[int], None], pending: dict) -> Callable[[int], None]:
    """A retried request keeps the service draws of its first try (common random numbers)."""

    def prepare_once(i: int) -> None:
        if i not in pending:
            prepare(i)

    return prepare_once


def attach_provider_limits(env: simpy.Environment, workload: Workload, client: Client, endpoints: Sequence,
                           route: Submit) -> None:
    """Give every API endpoint with `limits` a provider gate on its slot servers."""
    for endpoint, model in zip(endpoints, workload.models.values()):
        if not isinstance(model, Api) or model.limits is None:
            continue
        gate = ProviderGate(env, model.limits, client, endpoint.pending, route)
        if endpoint.prepare is not None:
            endpoint.prepare = _keep_draws(endpoint.prepare, endpoint.pending)
        for server in endpoint.servers:
            server.provider_gate = gate


# ------------------------------------------------------------------ building


def build_gate(env: simpy.Environment, workload: Workload, recorder: Recorder, streams: Streams,
               forward: Submit, done: Submit, endpoints: Sequence = ()) -> Submit:
    """The submit function arrivals call: the workload's limiters in order, then `forward`.

    `endpoints` (in `workload.models` order) get their provider limits attached.
    Without `rate_limits` this is `forward` itself: the no-limits path costs nothing.
    """
    providers = any(isinstance(m, Api) and m.limits is not None for m in workload.models.values())
    if not workload.rate_limits and not providers:
        return forward
    client = Client(env, workload, recorder, streams, done)
    if providers:
        attach_provider_limits(env, workload, client, endpoints, forward)
    if not workload.rate_limits:
        return forward
    return Gate(env, workload, recorder, client, forward).submit


# ------------------------------------------------------------------ theory, for the offered load


def rates_past_limits(workload: Workload, open_rates: dict[str, float],
                      mean_tokens: Callable) -> tuple[dict[str, float], dict[str, float]]:
    """Long-run rates the limits let through: {class: req/s past our `rate_limits`}, {endpoint: share
    of its arrivals its provider's rpm/tpm let through}.

    `open_rates` are the classes' open-loop rates (req/s); `mean_tokens(spec)` is
    the mean of a token distribution as drawn. A fluid bound: a limiter passes at
    most its rate per key (a bucket's `rate_rps`; a window's `max_requests` /
    `window_s`, or `max_tokens` / `window_s` / the mean cost) and never more than
    it is offered. A per-user limit applies to each user's share of its class
    (Zipf or equal), a global one to the classes it covers together, in
    proportion to their rates. Retries add attempts, never admissions.
    """
    classes = workload.traffic.classes
    counts_tokens = (any(getattr(spec, "max_tokens", None) is not None for spec in workload.rate_limits)
                     or any(getattr(getattr(m, "limits", None), "tpm", None) is not None
                            for m in workload.models.values()))
    # Only token limits need the mean cost (prompt + max output); 0 turns token caps off.
    cost = {n: (mean_tokens(c.prompt_tokens) + (c.max_output_tokens or mean_tokens(c.output_tokens))
                if counts_tokens else 0.0) for n, c in classes.items()}
    per_user = {n: open_rates.get(n, 0.0) * _user_shares(c) for n, c in classes.items()}
    for spec in workload.rate_limits:
        covered = [n for n in per_user if spec.classes is None or n in spec.classes]
        if spec.scope == "user":
            for n in covered:
                per_user[n] = np.minimum(per_user[n], _cap(spec, cost[n]))
            continue
        for group in ([[n] for n in covered] if spec.scope == "class" else [covered]):
            _scale_to_cap(per_user, group, spec, cost)
    rates = {n: float(r.sum()) for n, r in per_user.items()}
    shares = {}
    for name, model in workload.models.items():
        flows = {n: rates[n] * c.endpoint_mix().get(name, 0.0) for n, c in classes.items()}
        total = sum(flows.values())
        limits = getattr(model, "limits", None)
        if limits is None or total <= 0:
            shares[name] = 1.0
            continue
        mean_cost = sum(f * cost[n] for n, f in flows.items()) / total
        cap = _window_cap(PROVIDER_WINDOW_S, limits.rpm, limits.tpm, mean_cost)
        shares[name] = min(1.0, cap / total)
    return rates, shares


def _scale_to_cap(per_user: dict[str, np.ndarray], group: list[str], spec: Union[TokenBucket, WindowLimit],
                  cost: dict[str, float]) -> None:
    """A limiter shared by `group`: scale their rates down together to its cap."""
    total = sum(float(per_user[n].sum()) for n in group)
    if total <= 0:
        return
    mean_cost = sum(float(per_user[n].sum()) * cost[n] for n in group) / total
    factor = min(1.0, _cap(spec, mean_cost) / total)
    for n in group:
        per_user[n] = per_user[n] * factor


def _cap(spec: Union[TokenBucket, WindowLimit], cost: float) -> float:
    """Requests per second a limiter passes per key at most, for requests of mean `cost` tokens."""
    if isinstance(spec, TokenBucket):
        return spec.rate_rps
    return _window_cap(spec.window_s, spec.max_requests, spec.max_tokens, cost)


def _window_cap(window_s: float, max_requests: Optional[int], max_tokens: Optional[int], cost: float) -> float:
    cap = INF
    if max_requests is not None:
        cap = max_requests / window_s
    if max_tokens is not None and cost > 0:  # cost 0: token limits are not being counted
        cap = min(cap, max_tokens / window_s / cost)
    return cap


def _user_shares(cls) -> np.ndarray:
    """Each user's share of its class's open-loop requests, as arrivals draws them."""
    weights = np.arange(1, cls.users.count + 1, dtype=float) ** -cls.users.zipf_s
    return weights / weights.sum()
