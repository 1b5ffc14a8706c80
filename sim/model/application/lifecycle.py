"""A request's life in an LLM application: budget, output cache, retrieval, model calls, guardrails, post-processing.

With a flow (sim.model.application.flow) the steps before the answer run first (a classifier, tools),
then the answer as below, then the steps after it (a validation call); without one, just the answer.

Used when the workload has a `pipeline` block. The request (one row of the
request recorder, what the user sees) and its model calls (rows of the calls
recorder, what the endpoints serve) are then distinct: a request answered from
the cache makes no call, an escalated or retried one makes several. Stages are
callbacks, like the rest of the model, so a request costs a few events, not a
process; its state travels with the callbacks in one `_Request`.

With guardrails a request may be stopped at its time limit while a callback
of it is still scheduled (retrieval, evaluation, a retry's backoff): every
callback first checks that its request is still running.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import simpy

from sim.config.pipeline import Pipeline, Quality
from sim.config.schema import Workload
from sim.metrics.recorder import (
    CANCELLED,
    COMPLETED,
    PARTIAL,
    REJECTED,
    TIMED_OUT,
    TRY_LATER,
    CachedTokens,
    FlatLog,
    Recorder,
    ints,
)
from sim.model.events import call_later
from sim.model.kernels import compiled
from sim.model.serving.prompt_cache import PrefixCache
from sim.model.streams import BlockSampler, Streams, uniform01

from .budget import TokenBudget
from .caches import HIT, STALE_HIT, Audience, Cache, build_cache, warm_up
from .flow import Flows
from .guardrails import ANSWER_PATHS, Guardrails
from .quality import QualityInputs
from .retrieval import build_retrieval

Submit = Callable[[int], None]


class _Request:
    """One request's state while it runs (the recorder holds what stays).

    The defaults are class attributes: a request sets only what it changes, which makes
    the object cheap to create (one per request) and its state easy to read here.
    """

    cache_s = evaluation_s = post_s = retrieval_s = retry_s = 0.0  # seconds in each stage
    hops = 0            # model calls made (a flow's model steps included)
    asked = 0           # model calls made for the answer
    tier = 0            # router tier of the current (or next) call
    difficulty = -1.0   # drawn with the routing decision, at arrival
    cache_key = -1      # output-cache key to store the answer under (-1: none)
    prefix = 0          # cacheable prefix tokens of the prompt
    call = -1           # the call in flight, if any
    tokens = 0          # prompt + output tokens of the calls made
    validations = 0     # structured-output retries
    retries = 0         # guardrail retries of failed calls
    timeouts = 0        # calls stopped by a call time limit
    fallback = 0        # next fallback to try (index into guardrails.fallbacks)
    path = 0            # ANSWER_PATHS index of the call being made
    limit = 0           # LIMITS index of a call refused by a cap
    answered = False    # some answer is in hand (an escalation may still be improving it)
    cancel_tokens = 0   # > 0: the user stops reading after this many tokens
    endpoint = -1       # a fallback's endpoint (-1: as routed)
    reduced = False     # the reduced_context fallback is on
    tools = 0           # retrieval hops and tool calls made
    correct = None      # the router's verdict on the latest answer (None: not judged)
    evidence = (0.0, 0.0)  # (retrieved, kept) tokens of the prompt's evidence section
    confidence = math.nan  # the evidence confidence its budget followed (NaN: none did)
    hit = 0             # the output-cache code when the answer came from the cache (HIT, STALE_HIT)
    more = 0            # escalations made, same-tier retries included (each retrieved more context)
    same = 0            # same-tier retries made on the current tier
    fixed = False       # a same-tier retry with more context turned the answer right
    flow = None         # its flow's state (sim.model.application.flow), with flows

    def __init__(self, i: int, now: float) -> None:
        self.i = i
        self.started = now


class Lifecycle:
    """Runs every request through the pipeline's stages, its model calls and its guardrails."""

    def __init__(self, env: simpy.Environment, workload: Workload, recorder: Recorder, calls: Recorder,
                 streams: Streams, endpoints: list, done: Submit) -> None:
        spec: Pipeline = workload.pipeline
        self.env = env
        self.rec = recorder
        self.calls = calls
        self.endpoints = endpoints
        self.spilling = any(e.spill is not None for e in endpoints)  # some queue overflows elsewhere
        self.done = done
        self.parent = ints()                 # per call: its request
        calls.parent = self.parent
        self.live: dict[int, _Request] = {}  # requests running, by index
        names = list(workload.traffic.classes)
        confidence = (spec.quality or Quality()).evidence_confidence if spec.confidence_weighted_budget() else None
        self.budgets: Optional[list[TokenBudget]] = (
            [TokenBudget(spec.budget, streams, name, confidence=confidence) for name in names]
            if spec.budget is not None else None)
        self.cache: Optional[Cache] = None
        self.audience = Audience.of(workload, recorder.user, recorder.cls, streams)  # who asks, for the caches
        if spec.output_cache is not None:
            self.cache = build_cache(spec.output_cache, streams.rng("cache.output.keys"),
                                     streams.rng("cache.output.share"), streams.rng("cache.output.stale"),
                                     self.audience)
            self.hit_latency = BlockSampler(spec.output_cache.hit_latency_s.sample, streams.rng("cache.output.latency"))
            self.miss_latency = BlockSampler(spec.output_cache.miss_latency_s.sample,
                                             streams.rng("cache.output.miss_latency"))
            self.cache.start(workload.simulation.warm)
        self.post = (BlockSampler(spec.post_processing_s.sample, streams.rng("pipeline.post_processing"))
                     if spec.post_processing_s is not None else None)
        self.prompt_caches = [PrefixCache(m.prompt_cache) if m.prompt_cache is not None else None
                              for m in workload.models.values()]
        if any(self.prompt_caches):
            calls.cached_tokens = CachedTokens()
        self.router = Routing(spec, workload, streams) if spec.router is not None else None
        self.retrieval = (build_retrieval(env, spec.retrieval, streams, warm=workload.simulation.warm,
                                          audience=self.audience, keep_records=False)
                          if spec.retrieval is not None else None)
        chain = [("output", self.cache, False)] if self.cache is not None else []
        warm_up(chain + (self.retrieval.cache_chain() if self.retrieval is not None else []), workload, streams)
        out = spec.output
        self.streaming = out.streaming
        self.validation = (BlockSampler(uniform01, streams.rng("pipeline.validation"))
                           if out.structured_failure_rate > 0 else None)
        self.failure_rate, self.max_retries = out.structured_failure_rate, out.max_validation_retries
        recorder.validation_retries = {}
        self.cancel_share = out.cancel_share if out.streaming else 0.0
        if self.cancel_share > 0:
            self.cancel_draw = BlockSampler(uniform01, streams.rng("pipeline.cancel"))
            self.read_share = BlockSampler(out.cancel_read_share.sample, streams.rng("pipeline.cancel.read"))
        self.guard: Optional[Guardrails] = None
        if spec.guardrails is not None:
            self.guard = Guardrails(env, spec.guardrails, list(workload.models), recorder, calls, streams,
                                    self._deadline, self._call_timed_out)
            for endpoint in endpoints:
                endpoint.allow_cancel()
        recorder.quality = FlatLog() if self.router is not None else None
        self.quality: Optional[QualityInputs] = None
        if spec.quality is not None or spec.router is not None:  # answers have a quality (scored after the run)
            self.quality = QualityInputs(spec, self.budgets[0].section_names if self.budgets is not None else ())
            recorder.quality_inputs, recorder.quality_spec = FlatLog(), spec
            recorder.quality_rng = streams.rng("quality")
        recorder.cache_code = FlatLog() if self.cache is not None else None
        recorder.cache_leak = FlatLog() if self.cache is not None else None
        recorder.budget = FlatLog() if self.budgets is not None else None
        recorder.budget_sections = self.budgets[0].section_names if self.budgets is not None else ()
        # Stage times the calls table cannot tell: (request, gate, cache, evaluation, post-processing,
        # retrieval, retry) seconds.
        recorder.stage_log = FlatLog()
        for endpoint in endpoints:
            endpoint.on_done = self.call_done
        self.flows: Optional[Flows] = (Flows(env, workload, recorder, calls, streams, endpoints, self)
                                       if spec.has_flows() else None)

    # --- the request's way in -----------------------------------------------------
    def start(self, i: int) -> None:
        """Request i passed the rate limits: build its prompt, look in the cache, else call the model."""
        rec, now = self.rec, self.env._now
        r = self.live[i] = _Request(i, now)
        if self.router is not None:
            # Routed at arrival, in arrival order: two configs run with the same seed give the same request
            # the same difficulty (common random numbers), whatever happens to it later.
            r.tier, r.difficulty = self.router.first_tier(rec.cls[i])
        if self.guard is not None:
            self.guard.watch_request(r, rec.arrival[i])
        if self.cancel_share > 0 and self.cancel_draw() < self.cancel_share:
            read = min(1.0, max(0.0, self.read_share()))
            r.cancel_tokens = max(1, math.ceil(read * rec.output[i]))
        if self.budgets is not None:
            result = self.budgets[rec.cls[i]].draw()
            rec.budget.append(i)  # flat rows: no object per request for the collector to follow
            rec.budget.append(result.truncated)
            rec.budget += result.drawn
            rec.budget += result.sizes
            if result.overflow:  # longer than the context window even trimmed: refused, as a provider would
                self._end(r, REJECTED)
                return
            rec.prompt[i] = result.prompt_tokens
            r.prefix = result.prefix_tokens
            if self.quality is not None:
                r.evidence = self.quality.evidence_of(result.drawn, result.sizes)
                r.confidence = result.confidence
            if rec.output[i] > result.output_budget_tokens:  # the answer cannot outgrow what the window leaves
                rec.output[i] = max(1, result.output_budget_tokens)
        if self.flows is not None and self.flows.has_steps(rec.cls[i])[0]:
            self.flows.before(r, lambda: self._answer(r))
        else:
            self._answer(r)

    def _answer(self, r: _Request) -> None:
        """The answer: from the output cache, else retrieval and the model."""
        rec, i, now = self.rec, r.i, self.env._now
        if self.cache is not None:
            key = self.cache.draw_key(i)
            code = self.cache.lookup(key, now, i)
            rec.cache_code += (i, code)
            if code in (HIT, STALE_HIT):
                if self.cache.leaked:  # another user's personalised answer
                    rec.cache_leak.append(i)
                r.hit, r.cache_key = code, key  # the answer served, and its quality with it
                r.cache_s = self.hit_latency()
                call_later(self.env, r.cache_s, self._answered_from_cache, r)
                return
            if key >= 0:  # a miss: the answer will be cached; the lookup itself took a moment
                r.cache_key = key
                r.cache_s = self.miss_latency()
                call_later(self.env, r.cache_s, self._looked_up, r)
                return
        self._retrieve(r, False)

    def _looked_up(self, event) -> None:
        r = event.value
        if self.rec.outcome[r.i] < 0:
            self._retrieve(r, False)

    def _retrieve(self, r: _Request, more: bool) -> None:
        """Retrieve the context (more of it for an escalation) if the pipeline retrieves, then call the model."""
        retrieval = self.retrieval
        if retrieval is None:
            self._call(r)
            return
        plan = retrieval.escalation_plan if more else retrieval.plan
        if self.guard is not None:
            plan = self.guard.tool_plan(r, plan)
            if not plan:
                self._call(r)
                return
        if more:
            retrieval.retrieve_more(r.i, self._retrieved, plan)
        else:
            retrieval.run(r.i, self._retrieved, plan)

    def _retrieved(self, i: int) -> None:
        r = self.live.get(i)
        if r is None:  # stopped at its time limit meanwhile
            return
        record = self.retrieval.last  # request i's, as the retrieval promises inside done
        r.retrieval_s += record[2] - record[1]
        self._call(r)

    # --- model calls ------------------------------------------------------------------
    def _next_call(self, r: _Request) -> tuple[int, int, int]:
        """(endpoint, prompt tokens, output tokens) of the call the request would make now."""
        rec, i = self.rec, r.i
        endpoint, prompt, output = rec.endpoint[i], rec.prompt[i], rec.output[i]
        if r.reduced:  # keep the stable prefix; cut what follows (retrieved context, history) to the share
            prompt = self.guard.reduced_prompt(prompt, r.prefix)
        if self.router is not None:
            endpoint = self.router.endpoints[r.tier]
            prompt += r.more * self.router.extra_context  # each escalation retrieved more context
        if r.endpoint >= 0:
            endpoint = r.endpoint
        if r.cancel_tokens:
            output = min(output, r.cancel_tokens)
        return endpoint, prompt, output

    def _may_call(self, r: _Request, call: Optional[tuple[int, int, int]] = None) -> bool:
        """Whether the guardrails' caps allow one more call now (a refusal is recorded in r.limit);
        `call`: the call's (endpoint, prompt, output) when already known."""
        guard = self.guard
        if guard is None:
            return True
        tokens = 0
        if guard.max_tokens is not None:
            _, prompt, output = call or self._next_call(r)
            tokens = prompt + output
        return guard.allows(r, tokens)

    def _call(self, r: _Request) -> None:
        rec, i = self.rec, r.i
        call = self._next_call(r)
        if r.asked == 0 and not self._may_call(r, call):  # the first call is over the caps already
            self._fallback(r, REJECTED, deadline=False)
            return
        endpoint, prompt, output = call
        if self.spilling:  # a long queue may send the call to its overflow
            endpoint = self.endpoints[endpoint].destination().index
        rec.endpoint[i] = endpoint
        r.hops += 1
        r.asked += 1
        r.tokens += prompt + output
        now = self.env._now
        c = r.call = self.calls.new(rec.cls[i], endpoint, now, prompt, output, rec.user[i], rec.feature[i])
        self.parent.append(i)
        cache = self.prompt_caches[endpoint]
        if cache is not None:
            key = rec.user[i] if cache.spec.scope == "user" else -1 - rec.cls[i]  # users are >= 0, classes < 0
            self.calls.cached_tokens[c] = cache.use(key, r.prefix, now)
        if self.guard is not None:
            self.guard.watch_call(r, c)
        self.endpoints[endpoint].submit(c)

    # --- the way out ----------------------------------------------------------------
    def call_done(self, c: int) -> None:
        """A model call ended: its request goes on (evaluation, post-processing), or its failure is handled."""
        if self.flows is not None and c in self.flows.side:  # a flow's model step, not the answer
            self.flows.call_done(c)
            return
        i = self.parent[c]
        r = self.live[i]
        r.call = -1
        calls, rec = self.calls, self.rec
        rec.admit[i] = calls.admit[c]
        rec.replica[i] = calls.replica[c]
        if calls.outcome[c] != COMPLETED:
            self._failed(r, calls.outcome[c])
            return
        rec.first_token[i] = calls.first_token[c]
        if r.cancel_tokens:  # the user read what they wanted and stopped the stream there
            calls.outcome[c] = CANCELLED
            calls.generated[c] = rec.output[i] = calls.output[c]
            self._end(r, CANCELLED)
            return
        r.answered = True
        if self.validation is not None and self._invalid(r) and self._may_call(r):
            r.validations += 1
            self._call(r)  # the answer failed validation: ask again, without streaming
            return
        wait = 0.0
        if self.router is not None:
            wait, again = self._judge(r)
            if again:
                call_later(self.env, wait, self._escalated, r)
                return
        if self.post is not None:
            r.post_s = self.post()
            wait += r.post_s
        if wait > 0:  # evaluation and post-processing, one after the other: one wait
            call_later(self.env, wait, self._finished, r)
        else:
            self._finish(r)

    def _invalid(self, r: _Request) -> bool:
        """Whether the answer failed structured-output validation and may be asked for again."""
        return self.validation() < self.failure_rate and r.validations < self.max_retries

    def _judge(self, r: _Request) -> tuple[float, bool]:
        """Evaluate the answer (with escalation, every answer is judged, which takes time): (wait, escalate?).

        A flagged answer goes to the next tier with more context, if the guardrails allow the call; else
        (and for the final answer) its quality is recorded.
        """
        router = self.router
        good = r.correct = r.fixed or r.difficulty < router.quality[r.tier]
        if router.escalation is None:
            wait, again = 0.0, False
        else:
            wait = router.evaluation()
            r.evaluation_s += wait
            same = r.same < router.same_tier_retries  # retrieve more or rerank before a stronger tier
            again = r.path == 0 and (same or r.tier + 1 < router.tiers_tried) and router.flagged(good)
        if again:
            before = (r.tier, r.same)
            if same:
                r.same += 1
            else:
                r.tier, r.same = r.tier + 1, 0
            r.more += 1
            if self._may_call(r):
                if same and not good and router.fixes():
                    r.fixed = True
                return wait, True
            (r.tier, r.same), r.more = before, r.more - 1
        self.rec.quality += (r.i, good, r.hops)
        return wait, False

    def _escalated(self, event) -> None:
        """Escalation: retrieve more (if the pipeline retrieves), then call the next tier."""
        r = event.value
        if self.rec.outcome[r.i] < 0:
            self._retrieve(r, True)

    def _finished(self, event) -> None:
        r = event.value
        if self.rec.outcome[r.i] < 0:
            self._finish(r)

    def _finish(self, r: _Request) -> None:
        """The final answer is in and post-processed: cache it, end."""
        if r.cache_key >= 0:
            self.cache.insert(r.cache_key, self.env._now, r.i)
        self._complete(r)

    def _complete(self, r: _Request) -> None:
        """The answer is in: the flow's steps after it (a validation call, say), then the end."""
        if self.flows is not None and self.flows.has_steps(self.rec.cls[r.i])[1]:
            self.flows.after(r, lambda: self._end(r, COMPLETED))
        else:
            self._end(r, COMPLETED)

    def stop_flow(self, r: _Request) -> None:
        """A required flow step failed: the user is told to try again later."""
        self._end(r, TRY_LATER)

    def _answered_from_cache(self, event) -> None:
        r = event.value
        if self.rec.outcome[r.i] >= 0:
            return
        rec = self.rec
        rec.admit[r.i] = rec.first_token[r.i] = self.env._now
        self._complete(r)

    # --- guardrails --------------------------------------------------------------------
    def _failed(self, r: _Request, outcome: int) -> None:
        """A call failed (timed out, queue full, expired, too long, rate-limited): retry, else fall back."""
        if self.guard is None:
            self._end(r, outcome)
            return
        wait = self.guard.retry_wait(r) if self._may_call(r) else None
        if wait is not None:
            call_later(self.env, wait, self._retry, r)
            return
        self._fallback(r, outcome, deadline=False)

    def _retry(self, event) -> None:
        r = event.value
        if self.rec.outcome[r.i] < 0:
            self._call(r)

    def _fallback(self, r: _Request, outcome: int, deadline: bool) -> None:
        """Try the fallbacks in order from the next untried one; with none that applies, end with `outcome`.

        At the deadline there is no time for another call: only partial_answer and try_later apply.
        """
        fallbacks = self.guard.fallbacks if self.guard is not None else ()
        while r.fallback < len(fallbacks):
            step = fallbacks[r.fallback]
            r.fallback += 1
            if step == "partial_answer":
                if r.answered:
                    self._end(r, PARTIAL)
                    return
            elif step == "try_later":
                self._end(r, TRY_LATER)
                return
            elif not deadline and self._fall_back_call(r, step):
                return
        self._end(r, outcome)

    def _fall_back_call(self, r: _Request, step: str) -> bool:
        """Make the smaller_model or reduced_context call, if it applies and the caps allow it."""
        before = (r.tier, r.endpoint, r.reduced)
        if step == "smaller_model":
            if self.router is not None:
                if r.tier == 0:
                    return False  # nothing smaller than the cheapest tier
                r.tier -= 1
            elif self.guard.fallback_endpoint in (-1, self.rec.endpoint[r.i]):
                return False
            else:
                r.endpoint = self.guard.fallback_endpoint
        else:
            r.reduced = True
        if not self._may_call(r):
            r.tier, r.endpoint, r.reduced = before
            return False
        r.path = ANSWER_PATHS.index(step)
        self._call(r)
        return True

    def _call_timed_out(self, value: tuple[_Request, int]) -> None:
        r, c = value
        if self.flows is not None and c in self.flows.side:
            self.flows.timed_out(c)
            return
        self._stop_call(r, c)
        r.timeouts += 1
        self._failed(r, TIMED_OUT)

    def _deadline(self, r: _Request) -> None:
        """The request's time is up: stop what runs; a partial answer or "try later" if listed, else timed out."""
        if r.call >= 0:
            self._stop_call(r, r.call)
        self._fallback(r, TIMED_OUT, deadline=True)

    def _stop_call(self, r: _Request, c: int) -> None:
        """Cancel call c (its batch place or slot is freed); tokens it streamed count as a partial answer."""
        calls = self.calls
        self.endpoints[calls.endpoint[c]].cancel(c, TIMED_OUT)
        r.call = -1
        rec = self.rec
        rec.admit[r.i] = calls.admit[c]
        rec.replica[r.i] = calls.replica[c]
        if calls.generated[c] > 0:
            r.answered = True
            rec.first_token[r.i] = calls.first_token[c]

    def _end(self, r: _Request, outcome: int) -> None:
        rec, i = self.rec, r.i
        del self.live[i]
        if r.flow is not None and r.flow.calls:
            self.flows.stop(r)
        now = self.env._now
        rec.outcome[i] = outcome
        rec.end[i] = now
        if outcome == COMPLETED and (not self.streaming or r.validations):
            rec.first_token[i] = now  # nothing shows before the whole (validated) answer
        elif outcome == PARTIAL and rec.first_token[i] != rec.first_token[i]:
            rec.first_token[i] = now  # the answer an escalation was improving shows now
        rec.stage_log += (i, r.started - rec.arrival[i], r.cache_s, r.evaluation_s, r.post_s, r.retrieval_s,
                          r.retry_s)
        if r.validations:
            rec.validation_retries[i] = r.validations
        if self.guard is not None:
            Guardrails.log(rec, r)
        if self.quality is not None:
            self._score(r, outcome)
        self.done(i)

    def _score(self, r: _Request, outcome: int) -> None:
        """What the answer's quality depends on (scored after the run: sim/model/application/quality.py)."""
        extra = r.more * self.router.extra_context if self.router is not None else 0
        correct = -1 if r.correct is None else int(r.correct)
        self.rec.quality_inputs += (r.i, correct, r.evidence[0], r.evidence[1], extra,
                                    self.guard.reduced_share if r.reduced else -1, outcome, r.hit, r.cache_key,
                                    r.confidence)


_lifecycle = compiled("_lifecycle")  # None where built without a C compiler: the Python Lifecycle runs (same results)

if _lifecycle is not None:
    class CompiledLifecycle(_lifecycle.Core, Lifecycle):
        """Lifecycle with the way every request takes compiled (sim/_lifecycle.c, its requests C structs): start,
        the output cache, retrieval, calls, judging, post-processing, the end. Failures, retries, fallbacks,
        time limits and validation run the Python methods above, which call back into these. The same records
        to the bit."""

        def __init__(self, *args) -> None:
            Lifecycle.__init__(self, *args)
            self._bind(call_later)


def build_lifecycle(env: simpy.Environment, workload: Workload, recorder: Recorder, calls: Recorder, streams: Streams,
                    endpoints: list, done: Submit) -> Lifecycle:
    """A Lifecycle: the compiled one where built (and the workload has no flows, which run in Python), else the
    Python one; the same results."""
    kind = CompiledLifecycle if _lifecycle is not None and not workload.pipeline.has_flows() else Lifecycle
    return kind(env, workload, recorder, calls, streams, endpoints, done)


class Routing:
    """The router's decisions and the answers' quality (see sim.config.pipeline.Router)."""

    def __init__(self, spec: Pipeline, workload: Workload, streams: Streams) -> None:
        router = spec.router
        self.policy, self.fixed_tier, self.thresholds = router.policy, router.fixed_tier, tuple(router.thresholds)
        self.escalation = spec.escalation
        self.endpoints = [list(workload.models).index(t) for t in router.tiers]
        self.quality = router.quality
        self.extra_context = spec.escalation.extra_context_tokens if spec.escalation is not None else 0
        # Tiers a request may try at most: escalation stops at the strongest tier or at max_hops.
        self.tiers_tried = min(spec.escalation.max_hops, len(self.endpoints)) if spec.escalation is not None else 1
        names = list(workload.traffic.classes)
        uniform = lambda rng, n: rng.uniform(0.0, 1.0, n)  # noqa: E731
        self.difficulty_draw = [
            BlockSampler(router.difficulty[n].sample if n in router.difficulty else uniform,
                         streams.rng(f"router.{n}.difficulty")) for n in names]
        self.risky = [n in router.risky_classes for n in names]
        self.noise = BlockSampler(lambda rng, n: rng.normal(0.0, router.estimate_noise_sd, n),
                                  streams.rng("router.estimate"))
        self.judge = BlockSampler(uniform, streams.rng("escalation.judge"))
        escalation = spec.escalation
        self.same_tier_retries = escalation.same_tier_retries if escalation is not None else 0
        if self.same_tier_retries:
            self.fix_share = escalation.same_tier_fix_share
            self.fix_draw = BlockSampler(uniform, streams.rng("escalation.same_tier"))
        self.evaluation = (BlockSampler(spec.escalation.evaluation_s.sample, streams.rng("escalation.evaluation"))
                           if spec.escalation is not None and spec.escalation.evaluation_s is not None
                           else (lambda: 0.0))

    def first_tier(self, cls: int) -> tuple[int, float]:
        """(the tier a request's first call goes to, its difficulty). A tier answers well exactly the questions
        easier than its quality share."""
        d = self.difficulty_draw[cls]()
        d = 0.0 if d < 0.0 else 1.0 if d > 1.0 else d
        policy = self.policy
        if policy == "fixed" or (policy == "risk" and not self.risky[cls]):
            return self.fixed_tier, d
        if policy == "risk":
            return len(self.endpoints) - 1, d
        estimate = d + self.noise() if policy == "threshold" else d
        tier = 0
        for t in self.thresholds:
            tier += estimate > t
        return tier, d

    def fixes(self) -> bool:
        """Whether a same-tier retry with more context turns a wrong answer right."""
        return self.fix_draw() < self.fix_share

    def flagged(self, good: bool) -> bool:
        """The evaluator's verdict: flags a bad answer with detect_bad, a good one with false_alarm."""
        e = self.escalation
        return self.judge() < (e.false_alarm if good else e.detect_bad)
