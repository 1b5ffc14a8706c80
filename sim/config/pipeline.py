"""The LLM application pipeline between the rate limits and the model endpoints.

    pipeline:
      budget: {...}          # prompt sections trimmed to the context window (sim.config.budget)
      output_cache: {...}    # answers reused for repeated deterministic questions (sim.config.caches)
      post_processing_s: 0.02
      guardrails: {...}      # time limits, retries, caps and fallbacks (Guardrails below)

Every block is optional; without a `pipeline` a request is one model call, exactly as before.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import MAX_TOKENS, Block
from .budget import Budget
from .caches import OutputCacheSpec
from .distributions import Distribution
from .flow import Flow, ToolSpec
from .limits import Retry
from .retrieval import RetrievalSpec


class Router(Block):
    """Which model tier answers: tiers are endpoints, cheapest first.

    Every request has a difficulty d in [0, 1] (its percentile among questions,
    drawn from the class's distribution; uniform by default). A tier answers
    well exactly when d < its `quality` (the share of questions it gets right:
    e.g. 0.68 for a weak model, 0.81 for a strong one, RouteLLM's MMLU figures),
    so stronger tiers answer a superset of what weaker ones do.
    """

    tiers: list[str] = Field(min_length=1, description="Endpoint names, cheapest first.")
    quality: list[float] = Field(description="Per tier: the share of questions it answers well (0..1).")
    policy: Literal["fixed", "complexity", "risk", "threshold"] = Field(
        "fixed", description="fixed: tier `fixed_tier`; complexity: by the request's difficulty against "
        "`thresholds`; risk: `risky_classes` to the strongest, the rest as fixed; threshold: like complexity "
        "but on a noisy estimate of the difficulty (a learned router, `estimate_noise_sd`)."
    )
    fixed_tier: int = Field(0, ge=0, description="The tier index of the fixed policy (and of non-risky requests).")
    thresholds: list[float] = Field(default_factory=list, description="Difficulty cut-offs between tiers (len tiers - 1).")
    estimate_noise_sd: float = Field(0.1, ge=0, description="The threshold router's error on the difficulty.")
    risky_classes: list[str] = Field(default_factory=list, description="Classes always sent to the strongest tier.")
    difficulty: dict[str, Distribution] = Field(
        default_factory=dict, description="Per class: the difficulty distribution (clipped to [0, 1]; default uniform)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Router":
        if len(self.quality) != len(self.tiers):
            raise ValueError(f"quality: one value per tier ({len(self.tiers)}), got {len(self.quality)}")
        if any(not 0 <= q <= 1 for q in self.quality):
            raise ValueError("quality: shares between 0 and 1")
        if self.policy in ("complexity", "threshold") and len(self.thresholds) != len(self.tiers) - 1:
            raise ValueError(f"thresholds: {len(self.tiers) - 1} cut-off(s) for {len(self.tiers)} tiers")
        if self.fixed_tier >= len(self.tiers):
            raise ValueError(f"fixed_tier: {self.fixed_tier} is not a tier index (0..{len(self.tiers) - 1})")
        return self


class Escalation(Block):
    """After each answer an evaluator judges it; a doubtful answer is retried with more context on the next tier."""

    max_hops: int = Field(2, ge=1, le=100, description="Tiers a request may try at most (the first included).")
    detect_bad: float = Field(0.8, ge=0, le=1, description="Chance the evaluator flags a bad answer.")
    false_alarm: float = Field(0.05, ge=0, le=1, description="Chance it flags a good one.")
    extra_context_tokens: int = Field(
        1000, ge=0, le=MAX_TOKENS, description="Prompt tokens each escalation adds (retrieve more, rerank).")
    evaluation_s: Optional[Distribution] = Field(None, description="Time the evaluation takes after each answer.")
    same_tier_retries: int = Field(
        0, ge=0, le=100, description="Before going up a tier: this many retries on the same tier with more "
        "context (retrieve more, rerank); each counts as a hop.")
    same_tier_fix_share: float = Field(
        0.3, ge=0, le=1, description="Chance a same-tier retry with more context turns a wrong answer right "
        "(assumption: no public data pins it; sweep it).")


class Output(Block):
    """How answers reach the user."""

    streaming: bool = Field(True, description="Stream tokens (the user sees the first token); false: the whole answer at once.")
    structured_failure_rate: float = Field(
        0.0, ge=0, le=1, description="Share of answers failing structured-output (JSON) validation; each failure is "
        "retried as a non-streaming call, up to max_validation_retries."
    )
    max_validation_retries: int = Field(2, ge=0, le=100, description="Validation retries per request at most.")
    cancel_share: float = Field(
        0.0, ge=0, le=1, description="Share of streamed answers the user stops reading part-way (decode stops "
        "there; the tokens never generated are not billed). Only with streaming."
    )
    cancel_read_share: Distribution = Field(
        default_factory=lambda: {"kind": "uniform", "low": 0.0, "high": 1.0}, validate_default=True,
        description="For an answer the user cancels: the share of it read first (clipped to 0..1; at least a token).",
    )


FALLBACKS = ("smaller_model", "reduced_context", "partial_answer", "try_later")


class Guardrails(Block):
    """Limits on a request's time, tokens, model calls and tool calls; what happens when a call fails.

    A model call fails when it times out (`call_timeout_s`, `first_token_timeout_s`), finds its queue full, expires, is too long or
    is rate-limited for good. It is retried (`retry`: exponential backoff with jitter) while attempts, time
    and the caps allow; then the `fallbacks` are tried in the order listed: `smaller_model` (one call to
    `fallback_model`, default the router's tier below), `reduced_context` (one call with the prompt beyond
    its cacheable prefix cut to `reduced_context_share`), `partial_answer` (only if some answer exists:
    what streamed of the last call, or the answer an escalation was improving; the request ends `partial`),
    `try_later` (the user is told to try again later: outcome `try_later`). With none left the request ends
    as the call did. At `max_time_s` after arrival whatever runs is cancelled (a model call leaves its batch
    and frees its place) and only partial_answer and try_later remain.
    """

    max_time_s: Optional[float] = Field(None, gt=0, description="Per request, from arrival: the deadline.")
    call_timeout_s: Optional[float] = Field(None, gt=0, description="Per model call, from its send: the timeout.")
    first_token_timeout_s: Optional[float] = Field(
        None, gt=0, description="Per model call: no first token this long after its send and it times out (a "
        "stream that started is left to finish, as clients time out on a silent connection)."
    )
    max_hops: Optional[int] = Field(
        None, ge=1, description="Model calls per request at most: escalations, validation retries, retries and "
        "fallbacks included. A further call is not made (an answer in hand stands)."
    )
    max_tokens: Optional[int] = Field(
        None, ge=1, description="Prompt + output tokens over all of a request's model calls; a call that would "
        "pass it is not made."
    )
    max_tool_calls: Optional[int] = Field(
        None, ge=0, description="Retrieval hops and tool calls per request at most: stages that would pass it "
        "are skipped."
    )
    retry: Retry = Field(
        default_factory=lambda: Retry(max_attempts=1), description="Retries of a failed call (max_attempts 1: none)."
    )
    fallbacks: list[Literal["smaller_model", "reduced_context", "partial_answer", "try_later"]] = Field(
        default_factory=list, description="Tried in this order once retries are spent."
    )
    fallback_model: Optional[str] = Field(None, description="Endpoint of smaller_model (default: the tier below).")
    reduced_context_share: float = Field(
        0.5, ge=0, le=1, description="reduced_context keeps this share of the prompt beyond its cacheable prefix."
    )

    @model_validator(mode="after")
    def _no_repeats(self) -> "Guardrails":
        if len(set(self.fallbacks)) != len(self.fallbacks):
            raise ValueError("fallbacks: each at most once")
        return self


class Grounding(Block):
    """How the answer's grounding depends on its evidence (retrieved context kept in the prompt)."""

    coverage_exponent: float = Field(
        1.0, ge=0, le=10, description="Groundedness = coverage^this x (1 - w + w x confidence): how fast "
        "it falls as evidence is trimmed away (1: in proportion; an assumption, no public data pins it).")
    confidence_weight: float = Field(
        0.5, ge=0, le=1, description="w: how much the evidence's confidence counts (0: not at all; assumption).")


class Usefulness(Block):
    """How useful an answer is to the user, relative to a complete correct one (1)."""

    wrong: float = Field(0.3, ge=0, le=1, description="A complete but wrong answer (assumption).")
    partial: float = Field(0.4, ge=0, le=1, description="A partial answer (what streamed before a time limit), "
                           "times its correctness value (assumption).")
    reduced_context: float = Field(0.8, ge=0, le=1, description="An answer from the reduced-context fallback, "
                                   "times its correctness value (assumption).")


class Quality(Block):
    """Answer quality in dimensions the pipeline's levers move (see docs and sim/model/application/quality.py).

    Per answer: correctness (the router's tier quality on the request's difficulty), groundedness and
    citation accuracy (the share of retrieved evidence that survived trimming, its confidence),
    usefulness (wrong, partial, reduced-context and try-later answers are worth less). A cache hit
    replays the quality of the answer it serves; a stale one is wrong `stale_wrong_share` of the time.
    """

    evidence_section: Optional[str] = Field(
        None, description="The budget section holding retrieved evidence (default: the one with chunk_tokens, "
        "else one named 'retrieved')."
    )
    evidence_confidence: Distribution = Field(
        default_factory=lambda: {"kind": "uniform", "low": 0.5, "high": 1.0}, validate_default=True,
        description="Per request: the retriever's confidence in its evidence, clipped to 0..1 (assumption).")
    grounding: Grounding = Field(default_factory=Grounding, description="How groundedness and citation accuracy "
                                 "follow the evidence kept in the prompt (see Grounding).")
    citation_accuracy: float = Field(
        0.95, ge=0, le=1, description="Citation accuracy with all evidence kept; it falls in proportion to the "
        "evidence trimmed away (cited sources that are no longer in the prompt; assumption).")
    usefulness: Usefulness = Field(default_factory=Usefulness, description="What each kind of answer is worth to "
                                   "the user (see Usefulness).")
    correct_share: float = Field(
        0.75, ge=0, le=1, description="Without a router: the share of answers that are correct (between RouteLLM's "
        "MMLU weak model, 0.68, and strong model, 0.81).")
    stale_wrong_share: float = Field(
        0.5, ge=0, le=1, description="A stale cache hit (its data changed since) is a wrong answer this often "
        "(assumption).")


class Pipeline(Block):
    """Stages a request passes before and after its model call."""

    budget: Optional[Budget] = Field(None, description="Prompt sections and their trimming to the context window.")
    output_cache: Optional[OutputCacheSpec] = Field(None, description="Cache of final answers (deterministic requests only).")
    retrieval: Optional[RetrievalSpec] = Field(
        None, description="Embedding (batched) and retrieval hops before the model call; escalations retrieve more."
    )
    router: Optional[Router] = Field(None, description="Model routing across tiers, with answer quality.")
    escalation: Optional[Escalation] = Field(None, description="Adaptive escalation to stronger tiers (needs a router).")
    post_processing_s: Optional[Distribution] = Field(None, description="Time after the answer (formatting, filters).")
    output: Output = Field(default_factory=Output, description="Streaming, user cancels, structured-output validation.")
    guardrails: Optional[Guardrails] = Field(None, description="Time limits, retries, caps and fallbacks.")
    quality: Optional[Quality] = Field(
        None, description="Answer quality dimensions (correctness, groundedness, citation accuracy, usefulness).")
    tools: dict[str, ToolSpec] = Field(
        default_factory=dict, description="Tools the flows call, by name (sim.config.flow).")
    flow: Optional[Flow] = Field(
        None, description="Steps of every class's request around its `answer` (default: [answer]; sim.config.flow).")
    flows: dict[str, Flow] = Field(default_factory=dict, description="Per class: its own flow, instead of `flow`.")

    @model_validator(mode="after")
    def _evidence_section_known(self) -> "Pipeline":
        section = self.quality.evidence_section if self.quality is not None else None
        if section is not None and (self.budget is None or section not in self.budget.sections):
            known = ", ".join(self.budget.sections) if self.budget is not None else "none: no budget"
            raise ValueError(f"quality.evidence_section: no budget section {section!r} (sections: {known})")
        weighted = [n for n, s in self.budget.sections.items() if s.allocation_by_confidence] if self.budget else []
        if weighted and weighted[0] != self.evidence_section():
            raise ValueError(f"budget.sections.{weighted[0]}.allocation_by_confidence: only the evidence section "
                             f"({self.evidence_section() or 'none'}; see quality.evidence_section) is scaled by its "
                             "confidence")
        return self

    def evidence_section(self) -> Optional[str]:
        """The budget section holding retrieved evidence: quality.evidence_section, else the first chunked
        section, else one named 'retrieved' (None without a budget or such a section)."""
        if self.budget is None:
            return None
        if self.quality is not None and self.quality.evidence_section is not None:
            return self.quality.evidence_section
        names = list(self.budget.sections)
        chunked = [name for name in names if self.budget.sections[name].chunk_tokens]
        return chunked[0] if chunked else "retrieved" if "retrieved" in names else None

    def all_flows(self) -> list[tuple[str, list]]:
        """(where, steps) of every flow: `flow` (every class's) and each class's own in `flows`."""
        first = [("pipeline.flow", self.flow)] if self.flow is not None else []
        return first + [(f"pipeline.flows.{name}", flow) for name, flow in self.flows.items()]

    def has_flows(self) -> bool:
        return self.flow is not None or bool(self.flows)

    def confidence_weighted_budget(self) -> bool:
        """Whether the evidence section's allocation follows each request's evidence confidence."""
        return self.budget is not None and any(s.allocation_by_confidence for s in self.budget.sections.values())

    @model_validator(mode="after")
    def _escalation_needs_router(self) -> "Pipeline":
        if self.escalation is not None and self.router is None:
            raise ValueError("escalation: needs a router (its tiers are where escalation goes)")
        g = self.guardrails
        if g is not None and "smaller_model" in g.fallbacks and g.fallback_model is None and self.router is None:
            raise ValueError("guardrails.fallbacks: smaller_model needs fallback_model (or a router's tiers)")
        return self
