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
from sim.metrics.recorder import COMPLETED, PARTIAL, TIMED_OUT, TRY_LATER
from sim.model.application.quality import QualityModel, coverage, groundedness, usefulness
from sim.model.streams import Streams

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
    if full > 0:
        assert usefulness(correct, PARTIAL, False, spec) < full
    assert usefulness(correct, TRY_LATER, False, spec) == usefulness(correct, TIMED_OUT, False, spec) == 0.0


@given(scores=st.tuples(st.sampled_from([0.0, 1.0]), shares, shares), key=st.integers(0, 10 ** 6))
def test_a_cache_hit_replays_the_quality_of_the_answer_it_serves(scores, key):
    model = QualityModel(Pipeline(quality={}), ["c"], Streams(1))
    model.remember(key, (*scores, 0.5))
    correct, grounded, citation, useful = model.replay(key, stale=False)
    assert (correct, grounded, citation) == scores
    assert useful == (1.0 if correct else model.spec.usefulness.wrong)


def test_a_stale_hit_is_wrong_as_often_as_configured():
    model = QualityModel(Pipeline(quality={"stale_wrong_share": 0.3}), ["c"], Streams(1))
    model.remember(7, (1.0, 0.9, 0.9, 1.0))
    wrong = np.mean([model.replay(7, stale=True)[0] == 0.0 for _ in range(20_000)])
    assert wrong == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 20_000))


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
