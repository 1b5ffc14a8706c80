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
the answer it serves (the latest one stored under its key); a stale hit is wrong
`stale_wrong_share` of the time.

Nothing here feeds back into the run, so the run only records each request's inputs
(`Recorder.quality_inputs`, one flat row a request) and `scores` works them out after
it, vectorised; the random draws are per request index, paired across configs run
with the same seed.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from sim.config.pipeline import Pipeline, Quality
from sim.metrics.recorder import CANCELLED, COMPLETED, PARTIAL, Recorder

NAN = math.nan
DIMENSIONS = ("correct", "grounded", "citation", "useful")
INPUTS = ("request", "correct", "retrieved", "kept", "extra", "reduced_share", "outcome", "hit", "key", "confidence")
"""A request's row in Recorder.quality_inputs: correct is 1, 0 or -1 (not judged); reduced_share -1 when the
reduced-context fallback was not used; hit is 0, or the output-cache code of the answer it served; key -1;
confidence the evidence confidence its budget was allocated by (NaN: drawn when scored)."""
ANSWERED = (COMPLETED, CANCELLED, PARTIAL)


def coverage(retrieved, kept, extra=0.0):
    """Share of the evidence in the prompt: (kept + extra) / (retrieved + extra); 1 where there was none."""
    whole = np.add(retrieved, extra)
    return np.where(whole > 0, np.add(kept, extra) / np.where(whole > 0, whole, 1.0), 1.0)


def groundedness(cover, confidence, exponent: float, weight: float):
    """coverage^exponent x (1 - weight + weight x confidence): falls as evidence is trimmed, rises with confidence."""
    return np.power(cover, exponent) * (1.0 - weight + weight * np.asarray(confidence))


def usefulness(correct, outcome, reduced, spec: Quality):
    """1 for a complete correct answer, less for a wrong, partial or reduced-context one, 0 for none."""
    correct, outcome = np.asarray(correct, dtype=float), np.asarray(outcome)
    value = np.where(correct != 0.0, 1.0, spec.usefulness.wrong)
    value = value * np.where(outcome == PARTIAL, spec.usefulness.partial, 1.0)
    value = value * np.where(np.asarray(reduced, dtype=bool), spec.usefulness.reduced_context, 1.0)
    return np.where(np.isin(outcome, ANSWERED), value, 0.0)


class QualityInputs:
    """What the lifecycle needs to record each request's quality inputs (see INPUTS)."""

    def __init__(self, spec: Pipeline, section_names: tuple[str, ...] = ()) -> None:
        self.evidence = _evidence_index(spec, section_names)

    def evidence_of(self, drawn: list, kept: list) -> tuple[float, float]:
        """(retrieved, kept) tokens of the evidence section in a budget draw; (0, 0) without one."""
        k = self.evidence
        return (float(drawn[k]), float(kept[k])) if k is not None else (0.0, 0.0)


def scores(rec: Recorder) -> np.ndarray:
    """Rows (request, correct, grounded, citation, useful), one per recorded request; computed once per run."""
    cached = getattr(rec, "_quality_scores", None)
    if cached is not None:
        return cached
    spec: Pipeline = rec.quality_spec
    q = spec.quality or Quality()
    rows = Recorder.rows(rec.quality_inputs, len(INPUTS))
    request = rows[:, 0].astype(np.int64)
    rng = rec.quality_rng  # spawned for the run: draws by request index, paired across configs
    n = len(rec.arrival)
    chance, stale_draw = rng.random(n)[request], rng.random(n)[request]
    confidence = np.clip(_confidence_by_class(rng, q, rec, n)[request], 0.0, 1.0)
    confidence = np.where(np.isnan(rows[:, 9]), confidence, rows[:, 9])  # the budget's, where it allocated by it
    correct = np.where(rows[:, 1] >= 0, rows[:, 1], (chance < q.correct_share).astype(float))
    reduced = rows[:, 5] >= 0
    cover = coverage(rows[:, 2], rows[:, 3] * np.where(reduced, rows[:, 5], 1.0), rows[:, 4])
    grounded = groundedness(cover, confidence, q.grounding.coverage_exponent, q.grounding.confidence_weight)
    citation = q.citation_accuracy * cover
    if spec.retrieval is None and _evidence_index(spec, rec.budget_sections) is None:
        grounded = citation = np.full(len(rows), NAN)
    outcome = rows[:, 6].astype(np.int64)
    correct, grounded, citation = _replays(rows, correct, grounded, citation, rec, stale_draw < q.stale_wrong_share)
    useful = usefulness(correct, outcome, reduced, q)
    answered = np.isin(outcome, ANSWERED)
    out = np.column_stack([request, np.where(answered, correct, NAN), np.where(answered, grounded, NAN),
                           np.where(answered, citation, NAN), useful]) if len(rows) else np.empty((0, 5))
    rec._quality_scores = out
    return out


def _confidence_by_class(rng: np.random.Generator, q: Quality, rec: Recorder, n: int) -> np.ndarray:
    """Every request's evidence confidence, drawn from its class's distribution (one block per class)."""
    cls = np.asarray(rec.cls, dtype=np.int64)
    out = np.empty(n)
    for k in range(len(rec.class_names)):
        mine = cls == k
        out[mine] = q.evidence_confidence.sample(rng, int(mine.sum()))
    return out


def _replays(rows: np.ndarray, correct, grounded, citation, rec: Recorder, stale_wrong: np.ndarray):
    """A cache hit takes the scores of the latest answer stored under its key before it (stale hits may be wrong)."""
    hit = rows[:, 7] > 0
    if not hit.any():
        return correct, grounded, citation
    from .caches import STALE_HIT  # noqa: WPS433 - the codes live with the cache

    end = np.asarray(rec.end, dtype=float)[rows[:, 0].astype(np.int64)]
    key = rows[:, 8]
    stored = ~hit & (rows[:, 6] == COMPLETED) & (key >= 0)
    order = np.lexsort((end, key))  # by key, then time
    correct, grounded, citation = correct.copy(), grounded.copy(), citation.copy()
    latest: dict[float, int] = {}
    for j in order:  # per key in time order: answers store, hits replay the latest stored before them
        if stored[j]:
            latest[key[j]] = j
        elif hit[j]:
            source = latest.get(key[j])
            if source is not None:
                correct[j], grounded[j], citation[j] = correct[source], grounded[source], citation[source]
            if rows[j, 7] == STALE_HIT and correct[j] and stale_wrong[j]:
                correct[j] = 0.0
    return correct, grounded, citation


def _evidence_index(spec: Pipeline, names: tuple[str, ...]) -> Optional[int]:
    """Index of the evidence section among the budget's sections (None without one)."""
    section = spec.evidence_section()
    return list(names).index(section) if section is not None else None
