"""Answer quality in four dimensions, each a documented function of what the pipeline did.

- correctness (0 or 1): with a router, the final tier answers well exactly when the
  request's difficulty is below the tier's quality (RouteLLM's MMLU shares: 0.68 for a
  weak model, 0.81 for a strong one); without one, `correct_share` of answers are right.
- groundedness (0..1) = coverage^a x (1 - w + w x confidence): coverage is the share of
  the retrieved evidence still in the prompt (kept / retrieved tokens of the evidence
  section; an escalation retrieves `extra_context_tokens` more, which it keeps; the
  reduced-context fallback cuts it), confidence the retriever's (a per-request draw).
- citation accuracy (0..1) = citation_accuracy x coverage: a cited source trimmed away
  cannot be cited right.
- usefulness (0..1): 1 for a complete correct answer, `wrong` for a wrong one, times
  `partial` for a partial answer and `reduced_context` for the reduced-context fallback;
  0 when the user got no answer (try later, timed out, refused).

Groundedness and citation accuracy exist only for requests that retrieve; usefulness is
over every request, the others over the answered ones. A cache hit replays the quality of
the answer it serves; a stale hit is wrong `stale_wrong_share` of the time.
"""
from __future__ import annotations

import math
from typing import Optional

from sim.config.pipeline import Pipeline, Quality
from sim.metrics.recorder import CANCELLED, COMPLETED, PARTIAL
from sim.model.streams import BlockSampler, Streams

NAN = math.nan
DIMENSIONS = ("correct", "grounded", "citation", "useful")
"""Recorder row after the request index, in this order (Recorder.quality_dims)."""


def coverage(retrieved: float, kept: float, extra: float = 0.0) -> float:
    """Share of the evidence in the prompt: (kept + extra) / (retrieved + extra); 1 when there was none."""
    whole = retrieved + extra
    return (kept + extra) / whole if whole > 0 else 1.0


def groundedness(cover: float, confidence: float, exponent: float, weight: float) -> float:
    """coverage^exponent x (1 - weight + weight x confidence): falls as evidence is trimmed, rises with confidence."""
    return cover ** exponent * (1.0 - weight + weight * confidence)


def usefulness(correct: float, outcome: int, reduced: bool, spec: Quality) -> float:
    """1 for a complete correct answer, less for a wrong, partial or reduced-context one, 0 for none."""
    if outcome not in (COMPLETED, CANCELLED, PARTIAL):
        return 0.0
    value = 1.0 if correct != 0.0 else spec.usefulness.wrong
    if outcome == PARTIAL:
        value *= spec.usefulness.partial
    if reduced:
        value *= spec.usefulness.reduced_context
    return value


class QualityModel:
    """Scores each request's answer (see the module docstring); one per lifecycle."""

    def __init__(self, spec: Pipeline, class_names: list[str], streams: Streams,
                 section_names: tuple[str, ...] = ()) -> None:
        self.spec = spec.quality or Quality()
        self.retrieves = spec.retrieval is not None
        self.evidence = _evidence_index(spec, section_names)
        uniform = lambda rng, n: rng.uniform(0.0, 1.0, n)  # noqa: E731
        draw = self.spec.evidence_confidence.sample
        self.confidence = [BlockSampler(draw, streams.rng(f"quality.{name}.confidence")) for name in class_names]
        self.chance = BlockSampler(uniform, streams.rng("quality.chance"))
        self.replays: dict[int, tuple[float, float, float]] = {}  # output-cache key -> (correct, grounded, citation)

    def evidence_of(self, drawn: list, kept: list) -> tuple[float, float]:
        """(retrieved, kept) tokens of the evidence section in a budget draw; (0, 0) without one."""
        k = self.evidence
        return (float(drawn[k]), float(kept[k])) if k is not None else (0.0, 0.0)

    def score(self, cls: int, correct: Optional[bool], evidence: tuple[float, float], extra: float,
              reduced_share: Optional[float], outcome: int) -> tuple[float, float, float, float]:
        """(correct, grounded, citation, useful) of an answer made now.

        `correct`: the router's verdict (None: no router, drawn at correct_share); `extra`: evidence
        tokens escalations added; `reduced_share`: the reduced-context fallback's share (None: not used).
        """
        spec = self.spec
        answered = outcome in (COMPLETED, CANCELLED, PARTIAL)
        if correct is None:
            correct = self.chance() < spec.correct_share
        right = 1.0 if correct else 0.0
        grounded = citation = NAN
        if self.retrieves or self.evidence is not None:
            retrieved, kept = evidence
            if reduced_share is not None:
                kept *= reduced_share
            cover = coverage(retrieved, kept, extra)
            confidence = min(1.0, max(0.0, self.confidence[cls]()))
            grounded = groundedness(cover, confidence, spec.grounding.coverage_exponent,
                                    spec.grounding.confidence_weight)
            citation = spec.citation_accuracy * cover
        useful = usefulness(right, outcome, reduced_share is not None, spec)
        if not answered:
            return NAN, NAN, NAN, useful
        return right, grounded, citation, useful

    def replay(self, key: int, stale: bool) -> tuple[float, float, float, float]:
        """The quality of a cached answer served again; a stale one may be wrong now."""
        correct, grounded, citation = self.replays.get(key, (1.0 if self.chance() < self.spec.correct_share else 0.0,
                                                             NAN, NAN))
        if stale and correct and self.chance() < self.spec.stale_wrong_share:
            correct = 0.0
        return correct, grounded, citation, usefulness(correct, COMPLETED, False, self.spec)

    def remember(self, key: int, scores: tuple[float, float, float, float]) -> None:
        """An answer goes into the output cache under `key`: its quality goes with it."""
        self.replays[key] = scores[:3]


def _evidence_index(spec: Pipeline, names: tuple[str, ...]) -> Optional[int]:
    """Index of the evidence section among the budget's sections (None without one)."""
    if spec.budget is None:
        return None
    quality = spec.quality
    if quality is not None and quality.evidence_section is not None:
        return names.index(quality.evidence_section)
    chunked = [k for k, name in enumerate(names) if spec.budget.sections[name].chunk_tokens]
    if chunked:
        return chunked[0]
    return names.index("retrieved") if "retrieved" in names else None
