"""Answer quality dimensions: each moves with the lever it is tied to (sim/model/application/quality.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sim
from sim.config.pipeline import Pipeline, Quality
from sim.metrics.recorder import COMPLETED, PARTIAL, TIMED_OUT, TRY_LATER, Recorder
from sim.model.application.caches import HIT, STALE_HIT
from sim.model.application.quality import coverage, groundedness, scores, usefulness

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RAG = ROOT / "workloads" / "rag-support.yaml"
shares = st.floats(0.0, 1.0)


@given(retrieved=st.floats(1.0, 1e5), kept=shares, less=shares, confidence=shares,
       exponent=st.floats(0.0, 5.0), weight=shares)
def test_groundedness_and_citation_fall_as_evidence_is_trimmed(retrieved, kept, less, confidence, exponent, weight):
    more_kept, fewer_kept = kept * retrieved, kept * less * retrieved
    c_more, c_fewer = coverage(retrieved, more_kept), coverage(retrieved, fewer_kept)
    assert 0.0 <= c_fewer <= c_more <= 1.0
    assert groundedness(c_fewer, confidence, exponent, weight) <= groundedness(c_more, confidence, exponent, weight)
    assert 0.95 * c_fewer <= 0.95 * c_more  # citation accuracy is proportional to coverage


@given(confidence_low=shares, confidence_high=shares, cover=shares)
def test_groundedness_rises_with_evidence_confidence(confidence_low, confidence_high, cover):
    low, high = sorted((confidence_low, confidence_high))
    assert groundedness(cover, low, 1.0, 0.5) <= groundedness(cover, high, 1.0, 0.5)


@given(partial=st.floats(0.0, 0.99), wrong=shares, reduced=shares, correct=st.sampled_from([0.0, 1.0]))
def test_a_partial_answer_is_less_useful_than_a_full_one(partial, wrong, reduced, correct):
    spec = Quality(usefulness={"partial": partial, "wrong": wrong, "reduced_context": reduced})
    full = usefulness(correct, COMPLETED, False, spec)
    assert usefulness(correct, PARTIAL, False, spec) <= full
    if full >= 1e-300:  # (a subnormal times 0.99 may round back to itself)
        assert usefulness(correct, PARTIAL, False, spec) < full
    assert usefulness(correct, TRY_LATER, False, spec) == usefulness(correct, TIMED_OUT, False, spec) == 0.0


def recorded(rows: list[tuple], ends: list[float], stale_wrong_share: float = 0.5):
    """A recorder holding these quality-input rows (see quality.INPUTS), with the requests' end times."""
    rec = Recorder(["c"], ["m"])
    for end in ends:
        rec.new(0, 0, 0.0, 100, 10)
        rec.end[-1] = end
    rec.quality_inputs = [x for row in rows for x in (*row, math.nan)]  # confidence: drawn when scored
    rec.quality_spec = Pipeline(quality={"stale_wrong_share": stale_wrong_share}, retrieval=None,
                                budget={"context_window_tokens": 8192, "sections": {"retrieved": {"tokens": 100, "priority": 1}}})
    rec.budget_sections = ("retrieved",)
    rec.quality_rng = np.random.default_rng(1)
    return rec


@given(correct=st.sampled_from([0, 1]), retrieved=st.floats(1.0, 1e4), kept=shares, stale=st.booleans())
def test_a_cache_hit_replays_the_quality_of_the_answer_it_serves(correct, retrieved, kept, stale):
    # Request 0 answers and stores its answer under key 7; request 1 is served that answer from the cache.
    answer = (0, correct, retrieved, kept * retrieved, 0.0, -1, COMPLETED, 0, 7)
    hit = (1, -1, 50.0, 10.0, 0.0, -1, COMPLETED, STALE_HIT if stale else HIT, 7)
    rows = scores(recorded([answer, hit], [1.0, 2.0], stale_wrong_share=0.0))
    assert np.array_equal(rows[1, 1:4], rows[0, 1:4], equal_nan=True)
    assert rows[0, 2] == pytest.approx(kept * (1 - 0.5 + 0.5 * 0.75), abs=0.5 * 0.25 + 1e-12)  # confidence in 0.5..1


def test_a_stale_hit_is_wrong_as_often_as_configured():
    n = 20_000
    rows = [(0, 1, 100.0, 100.0, 0.0, -1, COMPLETED, 0, 7)]
    rows += [(k, -1, 100.0, 100.0, 0.0, -1, COMPLETED, STALE_HIT, 7) for k in range(1, n + 1)]
    out = scores(recorded(rows, [1.0] + [2.0] * n, stale_wrong_share=0.3))
    wrong = np.mean(out[1:, 1] == 0.0)
    assert wrong == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / n))
    assert out[0, 1] == 1.0  # the answer itself was right


def test_a_hit_before_any_answer_under_its_key_keeps_its_own_draw():
    rows = [(0, -1, 100.0, 100.0, 0.0, -1, COMPLETED, HIT, 3), (1, 1, 100.0, 50.0, 0.0, -1, COMPLETED, 0, 3)]
    out = scores(recorded(rows, [1.0, 2.0]))
    assert out[1, 1] == 1.0 and out[0, 3] == pytest.approx(0.95)  # nothing stored yet: its own coverage (1)


def run_rag(*overrides: str) -> dict:
    return sim.run(RAG, replications=2, overrides=["simulation.duration_s=900", *overrides]).summary


def test_a_tighter_context_window_lowers_groundedness_and_citations_not_correctness():
    wide, tight = run_rag(), run_rag("pipeline.budget.context_window_tokens=5000")
    assert tight["budget_truncated_share"] > wide["budget_truncated_share"] + 0.2
    assert tight["quality_grounded_mean"] < wide["quality_grounded_mean"] - 0.05
    assert tight["quality_citation_mean"] < wide["quality_citation_mean"] - 0.05
    # Correctness is the router's (the tier, the difficulty): common random numbers keep it close.
    assert tight["quality_correct_share"] == pytest.approx(wide["quality_correct_share"], abs=0.02)


def test_always_strong_is_more_correct_than_the_threshold_router():
    strong = run_rag("pipeline.router.policy=fixed", "pipeline.router.fixed_tier=1")
    routed = run_rag()
    assert strong["quality_correct_share"] == pytest.approx(0.81, abs=0.02)
    assert strong["quality_correct_share"] > routed["quality_correct_share"]


@pytest.mark.needs_shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"public reference data not found at {SHARED}")
def test_the_tier_quality_comes_from_routellm_mmlu():
    """rag-support's tiers answer as RouteLLM's weak and strong models did on MMLU."""
    data = pd.read_csv(SHARED / "routellm_mmlu_correctness_by_subject.csv")
    weak, strong = data["weak_correct"].mean(), data["strong_correct"].mean()
    quality = sim.load_workload(RAG).pipeline.router.quality
    assert quality == [pytest.approx(weak, abs=0.005), pytest.approx(strong, abs=0.005)]
    # The difficulty model: a strong-model answer is right whenever the weak one is, nearly always on MMLU.
    assert ((data.weak_correct == 1) & (data.strong_correct == 0)).mean() < 0.1


def test_budget_by_evidence_confidence_keeps_more_of_confident_evidence_and_grounds_better():
    # Window 6,224 (prompt limit 5,200): system 800, memory 200, evidence 4,000 (chunks of 500, allocation
    # 2,000), history 3,000 (allocation 1,500), a 60-token question. The excess, 2,860, takes the
    # evidence to its allocation and the rest from history: 2,000 kept, always. Scaled by confidence over its
    # mean (uniform 0.5..1: 0.75) the allocation runs from 1,333 to 2,667, rounded up to whole chunks, and
    # the window then holds 2,500 at most: 1,500, 2,000 or 2,500 kept (12.5%, 37.5%, 50%; mean 2,187.5).
    # Groundedness weights coverage by confidence, so it rises; correctness does not move.
    base = ["simulation.duration_s=600", "pipeline.budget.context_window_tokens=6224",
            "pipeline.budget.sections.retrieved.tokens=4000", "pipeline.budget.sections.memory.tokens=200",
            "pipeline.budget.sections.history.tokens=3000", "pipeline.budget.sections.question.tokens=60",
            "pipeline.budget.sections.retrieved.allocation=2000", "pipeline.output_cache.deterministic_share=0.0"]
    plain = sim.run(RAG, replications=1, overrides=base)
    weighted = sim.run(RAG, replications=1,
                       overrides=base + ["pipeline.budget.sections.retrieved.allocation_by_confidence=true"])
    kept_plain = plain.requests["tokens_retrieved"].dropna()
    kept_weighted = weighted.requests["tokens_retrieved"].dropna()
    assert set(kept_plain) == {2000}
    shares = kept_weighted.value_counts(normalize=True)
    n = len(kept_weighted)
    for tokens, share in ((1500, 0.125), (2000, 0.375), (2500, 0.5)):
        assert abs(shares.get(tokens, 0.0) - share) < 5 * math.sqrt(share * (1 - share) / n), tokens
    s_plain, s_weighted = plain.summary, weighted.summary
    assert s_weighted["quality_grounded_mean"] > s_plain["quality_grounded_mean"] + 0.01
    assert s_weighted["quality_correct_share"] == pytest.approx(s_plain["quality_correct_share"], abs=0.02)
