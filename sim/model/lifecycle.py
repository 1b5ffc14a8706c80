"""A request's life in an LLM application: budget, output cache, model call, post-processing.

Used when the workload has a `pipeline` block. The request (one row of the
request recorder, what the user sees) and its model calls (rows of the calls
recorder, what the endpoints serve) are then distinct: a request answered from
the cache makes no call. Stages are callbacks, like the rest of the model, so a
request costs a few events, not a process.
"""
from __future__ import annotations

from typing import Callable, Optional

import simpy

from sim.config.pipeline import Pipeline
from sim.config.schema import Workload
from sim.metrics.recorder import COMPLETED, REJECTED, Recorder

from .budget import TokenBudget
from .caches import HIT, STALE_HIT, Cache
from .events import call_later
from .prompt_cache import PrefixCache
from .retrieval import Retrieval
from .streams import BlockSampler, Streams

Submit = Callable[[int], None]


class Lifecycle:
    """Runs every request through the pipeline's stages and its model call."""

    def __init__(self, env: simpy.Environment, workload: Workload, recorder: Recorder, calls: Recorder,
                 streams: Streams, endpoints: list, done: Submit) -> None:
        spec: Pipeline = workload.pipeline
        self.env = env
        self.rec = recorder
        self.calls = calls
        self.endpoints = endpoints
        self.done = done
        self.parent: list[int] = []          # per call: its request
        calls.parent = self.parent
        self.cache_key: dict[int, int] = {}  # request -> output cache key, while its call runs
        names = list(workload.traffic.classes)
        self.budgets: Optional[list[TokenBudget]] = (
            [TokenBudget(spec.budget, streams, name) for name in names] if spec.budget is not None else None)
        self.cache: Optional[Cache] = None
        if spec.output_cache is not None:
            self.cache = Cache(spec.output_cache, streams.rng("cache.output.keys"), streams.rng("cache.output.share"),
                               streams.rng("cache.output.stale"))
            self.hit_latency = BlockSampler(spec.output_cache.hit_latency_s.sample, streams.rng("cache.output.latency"))
            self.miss_latency = BlockSampler(spec.output_cache.miss_latency_s.sample,
                                             streams.rng("cache.output.miss_latency"))
            if spec.output_cache.warm == "top" or workload.simulation.warm:
                self.cache.prefill_top()
        self.post = (BlockSampler(spec.post_processing_s.sample, streams.rng("pipeline.post_processing"))
                     if spec.post_processing_s is not None else None)
        self.prompt_caches = [PrefixCache(m.prompt_cache) if m.prompt_cache is not None else None
                              for m in workload.models.values()]
        self.prefix: dict[int, int] = {}  # request -> its cacheable prefix tokens (with prompt caches)
        if any(self.prompt_caches):
            calls.cached_tokens = {}
        self.router = Routing(spec, workload, streams) if spec.router is not None else None
        self.retrieval = (Retrieval(env, spec.retrieval, streams, warm=workload.simulation.warm)
                          if spec.retrieval is not None else None)
        out = spec.output
        self.streaming = out.streaming
        self.validation = (BlockSampler(lambda rng, n: rng.random(n), streams.rng("pipeline.validation"))
                           if out.structured_failure_rate > 0 else None)
        self.failure_rate, self.max_retries = out.structured_failure_rate, out.max_validation_retries
        self.retries: dict[int, int] = {}
        recorder.validation_retries = self.retries
        self.hops: dict[int, int] = {}      # request -> model calls made so far
        self.tier: dict[int, int] = {}      # request -> tier of its current call
        recorder.quality = [] if self.router is not None else None
        recorder.cache_code = [] if self.cache is not None else None
        recorder.budget = [] if self.budgets is not None else None
        # Stage times the calls table cannot tell: (request, gate, cache, evaluation, post-processing) seconds.
        recorder.stage_log = []
        self.started: dict[int, float] = {}
        self.spent: dict[int, list[float]] = {}   # request -> [cache, evaluation, post-processing, retrieval] s
        for endpoint in endpoints:
            endpoint.on_done = self.call_done

    # --- the request's way in -----------------------------------------------------
    def start(self, i: int) -> None:
        """Request i passed the rate limits: build its prompt, look in the cache, else call the model."""
        rec = self.rec
        self.started[i] = self.env.now
        self.spent[i] = [0.0, 0.0, 0.0, 0.0]
        if self.budgets is not None:
            result = self.budgets[rec.cls[i]].draw()
            rec.budget.append((i, result))
            if result.overflow:  # longer than the context window even trimmed: refused, as a provider would
                self._end(i, REJECTED)
                return
            rec.prompt[i] = result.prompt_tokens
            if self.calls.cached_tokens is not None:
                self.prefix[i] = result.prefix_tokens
            if rec.output[i] > result.output_budget_tokens:  # the answer cannot outgrow what the window leaves
                rec.output[i] = max(1, result.output_budget_tokens)
        if self.cache is not None:
            key = self.cache.draw_key()
            code = self.cache.lookup(key, self.env.now)
            rec.cache_code.append((i, code))
            if code in (HIT, STALE_HIT):
                wait = self.spent[i][0] = self.hit_latency()
                call_later(self.env, wait, self._answered_from_cache, i)
                return
            if key >= 0:  # a miss: the answer will be cached; the lookup itself took a moment
                self.cache_key[i] = key
                wait = self.spent[i][0] = self.miss_latency()
                call_later(self.env, wait, self._looked_up, i)
                return
        self._prepare_call(i)

    def _looked_up(self, event) -> None:
        self._prepare_call(event.value)

    def _prepare_call(self, i: int) -> None:
        """Retrieve the context (if the pipeline retrieves), then call the model."""
        if self.retrieval is not None:
            self.retrieval.run(i, self._retrieved)
        else:
            self._call(i)

    def _retrieved(self, i: int) -> None:
        record = self.retrieval.records[-1]  # request i's, as the retrieval promises inside done
        self.spent[i][3] += record[2] - record[1]
        self._call(i)

    def _escalated(self, event) -> None:
        """Escalation: retrieve more (if the pipeline retrieves), then call the next tier."""
        i = event.value
        if self.retrieval is not None:
            self.retrieval.retrieve_more(i, self._retrieved)
        else:
            self._call(i)

    def _call(self, i: int) -> None:
        rec = self.rec
        endpoint, prompt = rec.endpoint[i], rec.prompt[i]
        if self.router is not None:
            hop = self.hops.get(i, 0)
            tier = self.tier[i] if hop else self.router.first_tier(i, rec.cls[i])
            self.hops[i], self.tier[i] = hop + 1, tier
            endpoint = rec.endpoint[i] = self.router.endpoints[tier]
            prompt += tier * self.router.extra_context  # each escalation (a tier up) retrieves more context
        c = self.calls.new(rec.cls[i], endpoint, self.env.now, prompt, rec.output[i], rec.user[i], rec.feature[i])
        self.parent.append(i)
        cache = self.prompt_caches[endpoint]
        if cache is not None:
            key = rec.user[i] if cache.spec.scope == "user" else -1 - rec.cls[i]  # users are >= 0, classes < 0
            self.calls.cached_tokens[c] = cache.use(key, self.prefix.get(i, 0), self.env.now)
        self.endpoints[endpoint].submit(c)

    # --- the way out ----------------------------------------------------------------
    def call_done(self, c: int) -> None:
        """A model call ended: its request goes on (post-processing), or ends as the call did."""
        i = self.parent[c]
        calls, rec = self.calls, self.rec
        rec.admit[i] = calls.admit[c]
        rec.replica[i] = calls.replica[c]
        if calls.outcome[c] != COMPLETED:
            if self.router is not None:  # no answer to judge: forget the routing state
                self.hops.pop(i, None)
                self.tier.pop(i, None)
                self.router.difficulty.pop(i, None)
            self._end(i, calls.outcome[c])
            return
        rec.first_token[i] = calls.first_token[c]
        if self.validation is not None and self._invalid(i):
            self._call(i)  # the answer failed validation: ask again, without streaming
            return
        if self.router is not None:
            wait, again = self._judge(i)
            if again:
                call_later(self.env, wait, self._escalated, i)
                return
            if wait > 0:
                call_later(self.env, wait, self._judged, i)
                return
        self._answered(i)

    def _invalid(self, i: int) -> bool:
        """Whether the answer failed structured-output validation and is to be asked for again."""
        if self.validation() >= self.failure_rate or self.retries.get(i, 0) >= self.max_retries:
            return False
        self.retries[i] = self.retries.get(i, 0) + 1
        return True

    def _judged(self, event) -> None:
        self._answered(event.value)

    def _answered(self, i: int) -> None:
        """The final answer is in: cache it, post-process it, end."""
        key = self.cache_key.pop(i, None)
        if key is not None:
            self.cache.insert(key, self.env.now)
        if self.post is not None:
            wait = self.spent[i][2] = self.post()
            call_later(self.env, wait, self._post_processed, i)
        else:
            self._end(i, COMPLETED)

    def _judge(self, i: int) -> tuple[float, bool]:
        """Evaluate the answer (with escalation, every answer is judged, which takes time): (wait, escalate?).

        A flagged answer goes to the next tier with more context; the final one's quality is recorded.
        """
        router = self.router
        good = router.good(i, self.tier[i])
        if router.escalation is None:
            wait, again = 0.0, False
        else:
            wait = router.evaluation()
            self.spent[i][1] += wait
            again = (self.tier[i] + 1 < min(router.escalation.max_hops, len(router.endpoints))
                     and router.flagged(good))
        if again:
            self.tier[i] += 1
            return wait, True
        self.rec.quality.append((i, good, self.hops.pop(i)))
        del self.tier[i]
        del router.difficulty[i]
        return wait, False

    def _answered_from_cache(self, event) -> None:
        i = event.value
        now = self.env.now
        rec = self.rec
        rec.admit[i] = rec.first_token[i] = now
        self._end(i, COMPLETED)

    def _post_processed(self, event) -> None:
        self._end(event.value, COMPLETED)

    def _end(self, i: int, outcome: int) -> None:
        rec = self.rec
        self.prefix.pop(i, None)
        rec.outcome[i] = outcome
        rec.end[i] = self.env.now
        if not self.streaming or i in self.retries:  # nothing shows before the whole (validated) answer
            rec.first_token[i] = rec.end[i] if outcome == COMPLETED else rec.first_token[i]
        cache, evaluation, post, retrieval = self.spent.pop(i)
        rec.stage_log.append((i, self.started.pop(i) - rec.arrival[i], cache, evaluation, post, retrieval))
        self.done(i)


class Routing:
    """The router's decisions and the answers' quality (see sim.config.pipeline.Router)."""

    def __init__(self, spec: Pipeline, workload: Workload, streams: Streams) -> None:
        router = spec.router
        self.spec = router
        self.escalation = spec.escalation
        self.endpoints = [list(workload.models).index(t) for t in router.tiers]
        self.quality = router.quality
        self.extra_context = spec.escalation.extra_context_tokens if spec.escalation is not None else 0
        names = list(workload.traffic.classes)
        uniform = lambda rng, n: rng.uniform(0.0, 1.0, n)  # noqa: E731
        self.difficulty_draw = [
            BlockSampler(router.difficulty[n].sample if n in router.difficulty else uniform,
                         streams.rng(f"router.{n}.difficulty")) for n in names]
        self.risky = [n in router.risky_classes for n in names]
        self.noise = BlockSampler(lambda rng, n: rng.normal(0.0, router.estimate_noise_sd, n), streams.rng("router.estimate"))
        self.judge = BlockSampler(uniform, streams.rng("escalation.judge"))
        self.evaluation = (BlockSampler(spec.escalation.evaluation_s.sample, streams.rng("escalation.evaluation"))
                           if spec.escalation is not None and spec.escalation.evaluation_s is not None
                           else (lambda: 0.0))
        self.difficulty: dict[int, float] = {}

    def first_tier(self, i: int, cls: int) -> int:
        """The tier a request's first call goes to; draws its difficulty."""
        d = min(1.0, max(0.0, self.difficulty_draw[cls]()))
        self.difficulty[i] = d
        spec = self.spec
        if spec.policy == "risk" and self.risky[cls]:
            return len(self.endpoints) - 1
        if spec.policy == "complexity":
            return sum(d > t for t in spec.thresholds)
        if spec.policy == "threshold":
            return sum(d + self.noise() > t for t in spec.thresholds)
        return spec.fixed_tier

    def good(self, i: int, tier: int) -> bool:
        """A tier answers well exactly the questions easier than its quality share."""
        return self.difficulty[i] < self.quality[tier]

    def flagged(self, good: bool) -> bool:
        """The evaluator's verdict: flags a bad answer with detect_bad, a good one with false_alarm."""
        e = self.escalation
        return self.judge() < (e.false_alarm if good else e.detect_bad)
