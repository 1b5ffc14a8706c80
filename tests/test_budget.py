"""Token budget: prompt sections trimmed to the context window (sim.config.budget, sim.model.application.budget).

Trimming examples are computed by hand in the comments; a property test checks
the vectorised policy against a slow reference that removes one token (or one
chunk) at a time.
"""
from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sim.config.budget import Budget
from sim.config.loader import ConfigError, load_yaml_with_lines, validate_model
from sim.model.application.budget import BudgetResult, TokenBudget, evaluate, mean_prompt_tokens, trim, trim_block
from sim.model.streams import Streams

# The sketch of the issue. Window 8192, reserve 1024: the prompt limit is 7168.
# Allocations: memory 10% of 8192 = 819.2 -> 819; retrieved 3000 (chunks of 500); history 2000.
# Trim order (highest priority number first, ties as listed): retrieved(3), memory(2), history(1),
# system(0), question(0); system and question have min_tokens: all, so the window never cuts them.
SKETCH = """\
context_window_tokens: 8192
output_reserve_tokens: 1024
sections:
  system:    {tokens: 600, priority: 0, min_tokens: all}
  memory:    {tokens: {kind: lognormal, median: 300, p95: 1200}, allocation: "10%", priority: 2}
  retrieved: {tokens: {kind: uniform, low: 500, high: 6000}, allocation: 3000, chunk_tokens: 500, priority: 3}
  history:   {tokens: {kind: lognormal, median: 800, p95: 4000}, allocation: 2000, priority: 1}
  question:  {tokens: {kind: lognormal, median: 60, p95: 300}, priority: 0, min_tokens: all}
cacheable_prefix: [system, memory]
"""


def budget(text: str = SKETCH, **changes: Any) -> Budget:
    data = yaml.safe_load(text)
    data.update(changes)
    return Budget.model_validate(data)


def simple(window: int, sections: dict[str, dict], reserve: int = 0, **extra: Any) -> Budget:
    return Budget.model_validate({"context_window_tokens": window, "output_reserve_tokens": reserve,
                                  "sections": sections, **extra})


def sizes(**kw: int) -> dict[str, int]:
    return kw


# ------------------------------------------------------------- hand-computed examples

def test_fits_nothing_trimmed():
    spec = budget()
    drawn = sizes(system=600, memory=1500, retrieved=4200, history=800, question=68)
    # 600 + 1500 + 4200 + 800 + 68 = 7168 = the limit exactly: fits, nothing cut (memory keeps 1500 > its 819).
    assert trim(drawn, spec) == drawn
    r = evaluate(drawn, spec)
    assert r == BudgetResult(drawn=(600, 1500, 4200, 800, 68), sizes=(600, 1500, 4200, 800, 68), prompt_tokens=7168,
                             prefix_tokens=2100, output_budget_tokens=1024, truncated=False, overflow=False)


def test_hand_example_first_pass_whole_chunks():
    spec = budget()
    drawn = sizes(system=600, memory=1500, retrieved=4200, history=1800, question=100)
    # Sum 600 + 1500 + 4200 + 1800 + 100 = 8200; over the limit 7168 by 1032.
    # retrieved (trimmed first): 4200 - 1032 = 3168 would fit; whole chunks of 500 -> 3000 (>= its allocation
    # 3000). It drops the 200-token last chunk and two full ones: 1200 tokens, 168 more than needed.
    # Now 7000 <= 7168: memory and history keep everything although memory is above its allocation.
    assert trim(drawn, spec) == sizes(system=600, memory=1500, retrieved=3000, history=1800, question=100)
    r = evaluate(drawn, spec)
    assert r.prompt_tokens == 7000
    assert r.prefix_tokens == 600 + 1500
    assert r.output_budget_tokens == 1024  # min(reserve 1024, 8192 - 7000 = 1192)
    assert r.truncated and not r.overflow


def test_hand_example_first_pass_down_to_allocations():
    spec = budget()
    drawn = sizes(system=600, memory=2000, retrieved=5800, history=3500, question=300)
    # Sum 12200; over by 12200 - 7168 = 5032.
    # Pass 1. retrieved 5800: 5800 - 5032 = 768 would fit, but its allocation stops it at 3000; -2800, over 2232.
    #   memory 2000: 2000 - 2232 < 0, stopped at its allocation 819; -1181, over 1051.
    #   history 3500: 3500 - 1051 = 2449 >= allocation 2000, so 2449; -1051, over 0. Done.
    # 600 + 819 + 3000 + 2449 + 300 = 7168.
    assert trim(drawn, spec) == sizes(system=600, memory=819, retrieved=3000, history=2449, question=300)
    assert evaluate(drawn, spec).prompt_tokens == 7168


def test_hand_example_second_pass_below_allocation():
    spec = budget()
    drawn = sizes(system=600, memory=1000, retrieved=6000, history=2600, question=1000)
    # Sum 11200; over by 4032.
    # Pass 1 (down to allocations): retrieved 6000 -> 3000 (-3000, over 1032); memory 1000 -> 819 (-181, over 851);
    #   history 2600 -> 2000 (-600, over 251); system and question: min_tokens all, never cut.
    # Pass 2 (down to min_tokens 0): retrieved 3000 - 251 = 2749 -> whole chunks: 2500 (-500, over -249). Done.
    # 600 + 819 + 2500 + 2000 + 1000 = 6919; the 249 tokens left free are the rest of the dropped chunk.
    assert trim(drawn, spec) == sizes(system=600, memory=819, retrieved=2500, history=2000, question=1000)
    r = evaluate(drawn, spec)
    assert (r.prompt_tokens, r.prefix_tokens, r.output_budget_tokens) == (6919, 1419, 1024)


def test_sequence_in_gives_tuple_out():
    spec = budget()
    assert trim([600, 1000, 6000, 2600, 1000], spec) == (600, 819, 2500, 2000, 1000)
    assert trim_block(np.array([[600, 1000, 6000, 2600, 1000], [600, 1, 1, 1, 1]]), spec).tolist() == [
        [600, 819, 2500, 2000, 1000], [600, 1, 1, 1, 1]]


# --------------------------------------------------------------------------- chunks

@pytest.mark.parametrize("drawn, window, kept", [
    # 2750 tokens in chunks of 500: 500 x 5 + 250. Sections other than `r`: a fixed 1000.
    (2750, 3750, 2750),   # fits exactly
    (2750, 3600, 2500),   # over by 150: dropping the 250-token last chunk is enough
    (2750, 3500, 2500),   # over by 250: the same chunk, exactly
    (2750, 3499, 2000),   # over by 251: the last chunk is not enough, drop a full one too
    (2750, 1100, 0),      # over by 2650: every chunk goes (min_tokens 0)
    (300, 1200, 0),       # one partial chunk, over by 100: it goes whole, never 200 of it
])
def test_retrieved_context_loses_whole_chunks(drawn, window, kept):
    spec = simple(window, {"fixed": {"tokens": 1000, "priority": 0, "min_tokens": "all"},
                           "r": {"tokens": 1, "priority": 1, "chunk_tokens": 500}})
    assert trim(sizes(fixed=1000, r=drawn), spec) == sizes(fixed=1000, r=kept)


def test_chunked_floors_round_up_and_caps_round_down():
    section = {"tokens": 1, "priority": 1, "chunk_tokens": 500, "min_tokens": 700, "max_tokens": 1200}
    spec = simple(100, {"r": section})
    # Cap 1200 -> 1000 (two whole chunks, never part of the third).
    # Then the window (100) wants everything gone, but min 700 rounds up to 1000: two chunks stay.
    assert trim(sizes(r=1700), spec) == sizes(r=1000)
    # 1100 <= cap: kept whole by the cap (500 + 500 + 100); the window then cuts to 1000 (>= 700).
    assert trim(sizes(r=1100), spec) == sizes(r=1000)
    # 800 = 500 + 300: dropping the 300 would leave 500 < 700, so the window cannot cut it at all.
    assert trim(sizes(r=800), spec) == sizes(r=800)
    # Allocation 1200 also rounds up, to 1500, in the first pass; the second pass goes on to min 700 -> 1000.
    spec2 = simple(1000, {"r": {"tokens": 1, "priority": 1, "chunk_tokens": 500, "allocation": 1200},
                          "q": {"tokens": 1, "priority": 0}})
    # 2600 + 100 = 2700, over 1700. Pass 1: r 2600 -> 1500 (not 1000: that is below 1200), over 600.
    # Pass 2, r first: 1500 - 600 = 900 -> whole chunks 500, over -400. q keeps its 100.
    assert trim(sizes(r=2600, q=100), spec2) == sizes(r=500, q=100)


# ------------------------------------------------------------------------ priorities

def test_priority_order_and_ties_in_listed_order():
    sec = {"tokens": 1, "min_tokens": 0}
    spec = simple(100, {"a": {**sec, "priority": 1}, "b": {**sec, "priority": 5}, "c": {**sec, "priority": 5}})
    # 150 drawn, over by 50: b (priority 5, listed before c) goes first and covers it.
    assert trim(sizes(a=50, b=50, c=50), spec) == sizes(a=50, b=0, c=50)
    # Over by 70: b -> 0 (-50), then c -> 30 (-20); a (priority 1) untouched.
    assert trim(sizes(a=50, b=50, c=50), spec.model_copy(update={"context_window_tokens": 80})) == \
        sizes(a=50, b=0, c=30)
    # Listing c before b flips the tie.
    flipped = simple(100, {"a": {**sec, "priority": 1}, "c": {**sec, "priority": 5}, "b": {**sec, "priority": 5}})
    assert trim(sizes(a=50, b=50, c=50), flipped) == sizes(a=50, b=50, c=0)


def test_every_section_reaches_its_allocation_before_any_goes_below():
    spec = simple(100, {"low": {"tokens": 1, "priority": 2, "allocation": 40},
                        "high": {"tokens": 1, "priority": 1, "allocation": 40}})
    # 160 drawn, over by 60. Pass 1: low 80 -> 40 (-40, over 20); high 80 -> 60 (-20). low is not cut below 40
    # while high is above its allocation.
    assert trim(sizes(low=80, high=80), spec) == sizes(low=40, high=60)
    # Window 70: over by 90. Pass 1: low -> 40 (over 50), high -> 40 (over 10). Pass 2: low 40 -> 30.
    assert trim(sizes(low=80, high=80), spec.model_copy(update={"context_window_tokens": 70})) == \
        sizes(low=30, high=40)


def test_allocation_as_share_of_the_window():
    spec = budget()
    assert spec.allocation_tokens("memory") == 819       # 10% of 8192 = 819.2, rounded down
    assert spec.allocation_tokens("retrieved") == 3000
    assert spec.allocation_tokens("system") is None
    quarter = simple(8192, {"r": {"tokens": 1, "priority": 1, "allocation": "25%"},
                            "q": {"tokens": 1, "priority": 0, "min_tokens": "all"}}, reserve=1024)
    assert quarter.allocation_tokens("r") == 2048
    # 5000 + 4000 = 9000, over 7168 by 1832. Pass 1: r 5000 - 1832 = 3168 >= 2048: 3168.
    assert trim(sizes(r=5000, q=4000), quarter) == sizes(r=3168, q=4000)
    # q 6000: over by 3832. Pass 1 stops r at 2048 (-2952, over 880); pass 2 takes r to 2048 - 880 = 1168.
    assert trim(sizes(r=5000, q=6000), quarter) == sizes(r=1168, q=6000)
    # Shares are exact: 29% of 100 is 29 (floats would give 28.999999999999996 -> 28).
    assert simple(100, {"r": {"tokens": 1, "priority": 0, "allocation": "29%"}}).allocation_tokens("r") == 29
    assert simple(1000, {"r": {"tokens": 1, "priority": 0, "allocation": "12.5%"}}).allocation_tokens("r") == 125


# --------------------------------------------------------------------- caps and floors

def test_max_tokens_caps_even_when_the_prompt_fits():
    spec = simple(100_000, {"s": {"tokens": 1, "priority": 0, "max_tokens": 100},
                            "q": {"tokens": 1, "priority": 0}})
    r = evaluate(sizes(s=150, q=10), spec)
    assert r.sizes == (100, 10) and r.drawn == (150, 10)
    assert r.truncated and not r.overflow
    assert evaluate(sizes(s=100, q=10), spec).truncated is False


def test_min_tokens_floor_and_all():
    spec = simple(100, {"h": {"tokens": 1, "priority": 2, "min_tokens": 30},
                        "m": {"tokens": 1, "priority": 1, "min_tokens": 20},
                        "q": {"tokens": 1, "priority": 0, "min_tokens": "all"}})
    # 80 + 60 + 50 = 190, over 90. No allocations: pass 1 cuts nothing. Pass 2: h 80 -> 30 (-50, over 40),
    # m 60 -> 20 (-40, over 0). q keeps 50.
    assert trim(sizes(h=80, m=60, q=50), spec) == sizes(h=30, m=20, q=50)
    # A draw below its floor is kept whole: 10 + 60 + 40 = 110, over 10; h 10 < its floor 30 stays, m 60 -> 50.
    assert trim(sizes(h=10, m=60, q=40), spec) == sizes(h=10, m=50, q=40)


# ------------------------------------------------------------------ beyond all trimming

def test_overflow_when_floors_exceed_the_window():
    spec = budget()
    drawn = sizes(system=600, memory=500, retrieved=1000, history=1000, question=7000)
    # Sum 10100, over by 2932. Pass 1: every trimmable section is within its allocation (500 <= 819,
    # 1000 <= 3000, 1000 <= 2000). Pass 2: retrieved -> 0 (over 1932), memory -> 0 (over 1432),
    # history -> 0 (over 432). system and question are never cut: prompt 7600 > 7168.
    # The window leaves 8192 - 7600 = 592 for output, under min_output_tokens (default: the reserve, 1024).
    r = evaluate(drawn, spec)
    assert r.sizes == (600, 0, 0, 0, 7000)
    assert (r.prompt_tokens, r.prefix_tokens, r.output_budget_tokens) == (7600, 600, 592)
    assert r.overflow and r.truncated
    # Letting the reserve shrink to 512: 592 >= 512, the request fits with 592 output tokens.
    shrink = budget(min_output_tokens=512)
    r = evaluate(drawn, shrink)
    assert (r.prompt_tokens, r.output_budget_tokens, r.overflow) == (7600, 592, False)
    assert evaluate(drawn, budget(min_output_tokens=600)).overflow
    # Over the window itself: the output budget is 0, never negative.
    r = evaluate(sizes(system=600, memory=0, retrieved=0, history=0, question=9000), shrink)
    assert (r.prompt_tokens, r.output_budget_tokens, r.overflow, r.truncated) == (9600, 0, True, False)


def test_reserve_does_not_shrink_while_sections_can_be_trimmed():
    spec = budget(min_output_tokens=0)
    drawn = sizes(system=600, memory=500, retrieved=1000, history=6000, question=100)
    # Sum 8200, over by 1032; history 6000 -> 4968 (>= 2000) in pass 1. The reserve stays 1024.
    r = evaluate(drawn, spec)
    assert r.sizes == (600, 500, 1000, 4968, 100)
    assert (r.prompt_tokens, r.output_budget_tokens, r.overflow) == (7168, 1024, False)


# -------------------------------------------------- the policy against a slow reference

def _drop(size: int, chunk: int) -> int:
    """Size after removing the last chunk (or token)."""
    return ((size - 1) // chunk) * chunk


def reference(drawn: list[int], spec: Budget) -> list[int]:
    """The policy told literally: remove one chunk (or token) at a time."""
    secs = list(spec.sections.values())
    names = list(spec.sections)
    s = list(drawn)
    for j, sec in enumerate(secs):
        c = sec.chunk_tokens or 1
        while sec.max_tokens is not None and s[j] > sec.max_tokens:
            s[j] = _drop(s[j], c)
    limit = spec.context_window_tokens - spec.output_reserve_tokens
    order = sorted(range(len(secs)), key=lambda j: (-secs[j].priority, j))
    for first in (True, False):
        for j in order:
            sec = secs[j]
            if sec.min_tokens == "all":
                continue
            floor = sec.min_tokens
            if first:
                alloc = spec.allocation_tokens(names[j])
                if alloc is None:
                    continue
                floor = max(floor, alloc)
            c = sec.chunk_tokens or 1
            while sum(s) > limit and s[j] > 0 and _drop(s[j], c) >= floor:
                s[j] = _drop(s[j], c)
    return s


@st.composite
def budgets_and_draws(draw):
    n = draw(st.integers(1, 4))
    window = draw(st.integers(50, 600))
    sections = {}
    for i in range(n):
        sec: dict[str, Any] = {"tokens": 1, "priority": draw(st.integers(0, 2))}
        max_tokens = draw(st.one_of(st.none(), st.integers(0, 400)))
        if max_tokens is not None:
            sec["max_tokens"] = max_tokens
        floor = draw(st.one_of(st.just("all"), st.integers(0, 100 if max_tokens is None else min(100, max_tokens))))
        sec["min_tokens"] = floor
        lo = 0 if floor == "all" else floor
        alloc = draw(st.one_of(st.none(), st.integers(lo, lo + 200),
                               st.integers(1, 100).map(lambda p: f"{p}%")))
        if isinstance(alloc, str) and floor != "all" and (int(alloc[:-1]) * window) // 100 < floor:
            alloc = None
        if alloc is not None:
            sec["allocation"] = alloc
        chunk = draw(st.one_of(st.none(), st.integers(1, 120)))
        if chunk is not None:
            sec["chunk_tokens"] = chunk
        sections[f"s{i}"] = sec
    spec = simple(window, sections, reserve=draw(st.integers(0, window - 1)))
    drawn = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    return spec, drawn


@settings(max_examples=300, deadline=None)
@given(budgets_and_draws())
def test_policy_matches_the_literal_reference(case):
    spec, drawn = case
    got = list(trim(drawn, spec))
    assert got == reference(drawn, spec)
    # Invariants that hold whatever the reference says.
    limit = spec.context_window_tokens - spec.output_reserve_tokens
    for g, d, sec in zip(got, drawn, spec.sections.values()):
        assert 0 <= g <= d
        if sec.max_tokens is not None:
            assert g <= sec.max_tokens
        if sec.chunk_tokens:
            assert g == d or g % sec.chunk_tokens == 0
    r = evaluate(drawn, spec)
    assert r.prompt_tokens == sum(got)
    event("overflow" if r.overflow else "trimmed to fit" if r.truncated else "untouched")
    assert r.overflow == (spec.context_window_tokens - r.prompt_tokens < spec.output_floor_tokens)
    if not r.overflow and sum(got) > limit:
        pytest.fail("a prompt over the limit must overflow with the default min_output_tokens")


# --------------------------------------------------------------------------- draws

def test_draws_come_from_the_named_section_streams():
    spec = budget()
    got = TokenBudget(spec, Streams(7), "chat").draw_block(1000)
    drawn = np.array([r.drawn for r in got])
    for j, name in enumerate(["memory", "retrieved", "history", "question"], start=1):
        dist = spec.sections[name].tokens
        want = np.maximum(np.rint(dist.sample(Streams(7).rng(f"budget.chat.{name}"), 1000)), 0)
        assert drawn[:, j].tolist() == want.astype(int).tolist()
    assert set(drawn[:, 0].tolist()) == {600}


def test_reproducible_per_seed_and_class_and_independent_of_block_size():
    spec = budget()

    def first(n: int, streams: Streams, cls: str = "chat", block: int = 2048) -> list[BudgetResult]:
        tb = TokenBudget(spec, streams, cls, block=block)
        return [tb.draw() for _ in range(n)]

    seq = first(50, Streams(3))
    assert seq == first(50, Streams(3))
    assert seq == first(50, Streams(3), block=7)     # refills of 7 draws continue the same streams
    assert seq != first(50, Streams(4))
    assert seq != first(50, Streams(3), "agent")
    assert seq != first(50, Streams(3, replication=1))


def test_changing_one_section_leaves_the_other_draws_alone():
    base = budget()
    data = yaml.safe_load(SKETCH)
    data["sections"]["memory"]["tokens"] = {"kind": "exponential", "mean": 5000}
    data["sections"]["extra"] = {"tokens": {"kind": "uniform", "low": 0, "high": 100}, "priority": 4}
    other = Budget.model_validate(data)
    a = np.array([r.drawn for r in TokenBudget(base, Streams(1), "chat").draw_block(500)])
    b = np.array([r.drawn for r in TokenBudget(other, Streams(1), "chat").draw_block(500)])
    assert not np.array_equal(a[:, 1], b[:, 1])           # memory redrawn
    for j in (0, 2, 3, 4):                                 # system, retrieved, history, question: the same
        assert a[:, j].tolist() == b[:, j].tolist()


def test_system_prompt_length_is_a_knob():
    # A window so large nothing is trimmed: +100 system tokens is +100 on every prompt, draw for draw.
    big = yaml.safe_load(SKETCH)
    big["context_window_tokens"] = 1_000_000
    longer = copy.deepcopy(big)
    longer["sections"]["system"]["tokens"] = 700
    a = TokenBudget(Budget.model_validate(big), Streams(11), "chat").draw_block(2000)
    b = TokenBudget(Budget.model_validate(longer), Streams(11), "chat").draw_block(2000)
    assert not any(r.truncated for r in a + b)
    assert [y.prompt_tokens - x.prompt_tokens for x, y in zip(a, b)] == [100] * 2000
    assert [y.prefix_tokens - x.prefix_tokens for x, y in zip(a, b)] == [100] * 2000
    # In the real 8192 window, the other sections make room: more trimming, the same sections drawn.
    c = TokenBudget(budget(), Streams(11), "chat").draw_block(2000)
    d = TokenBudget(budget(SKETCH.replace("tokens: 600", "tokens: 700")), Streams(11), "chat").draw_block(2000)
    assert [x.drawn[1:] for x in c] == [y.drawn[1:] for y in d]
    assert sum(y.truncated for y in d) > sum(x.truncated for x in c)


def test_section_sizes_are_rounded_and_may_be_zero():
    spec = simple(10_000, {"off": {"tokens": 0, "priority": 0},
                           "u": {"tokens": {"kind": "uniform", "low": 0, "high": 1}, "priority": 0}})
    got = np.array([r.drawn for r in TokenBudget(spec, Streams(1), "c").draw_block(4000)])
    assert set(got[:, 0].tolist()) == {0}
    assert set(got[:, 1].tolist()) == {0, 1}
    # Rounding keeps the mean: uniform(0, 1) rounds to 0 or 1 with probability 1/2; sd of the mean 0.5/sqrt(4000).
    assert abs(got[:, 1].mean() - 0.5) < 5 * 0.5 / np.sqrt(4000)


def test_mean_prompt_tokens_is_deterministic_and_exact_without_trimming():
    big = simple(10**7, {"a": {"tokens": {"kind": "uniform", "low": 100, "high": 300}, "priority": 0},
                         "b": {"tokens": 50, "priority": 0}})
    m = mean_prompt_tokens(big, n=40_000)
    assert m == mean_prompt_tokens(big, n=40_000)
    # Mean 200 + 50; sd of the mean (200 / sqrt(12)) / sqrt(40000) = 0.29.
    assert abs(m - 250) < 5 * 0.29
    assert mean_prompt_tokens(budget()) <= 7168


def test_section_names_in_order():
    tb = TokenBudget(budget(), Streams(1), "chat")
    assert tb.section_names == ("system", "memory", "retrieved", "history", "question")
    assert tb.evaluate([600, 1500, 4200, 1800, 100]).sizes == (600, 1500, 3000, 1800, 100)


def test_trim_needs_every_section():
    with pytest.raises(ValueError, match="missing"):
        trim(sizes(system=600), budget())
    with pytest.raises(ValueError, match="unknown"):
        trim(sizes(system=600, memory=1, retrieved=1, history=1, question=1, extra=1), budget())
    with pytest.raises(ValueError, match=">= 0"):
        trim([600, -1, 1, 1, 1], budget())


# ------------------------------------------------------------------------ validation

def errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "b.yaml"
    path.write_text(textwrap.dedent(text))
    data, lines = load_yaml_with_lines(path)
    with pytest.raises(ConfigError) as info:
        validate_model(Budget, data, lines, "b.yaml", tmp_path)
    return info.value.lines


def one(section: str, tail: str = "") -> str:
    return f"context_window_tokens: 1000\nsections:\n  a: {section}\n{tail}"


@pytest.mark.parametrize("text, message", [
    (one("{tokens: 1, priority: 0, chunk_token: 500}"),
     "b.yaml:3: sections.a.chunk_token: unknown key 'chunk_token' (did you mean 'chunk_tokens'?)"),
    (one("{tokens: 1, priority: 0, chunk: 5}"),
     "b.yaml:3: sections.a.chunk: unknown key 'chunk' (known: tokens, priority, allocation, min_tokens, "
     "max_tokens, chunk_tokens, allocation_by_confidence)"),
    (one("{tokens: 1, priority: 0, allocation: 25 percent}"),
     "b.yaml:3: sections.a.allocation: allocation must be tokens (3000) or a share of the context window ('25%'), "
     "got '25 percent'"),
    (one("{tokens: 1, priority: 0, allocation: 0.25}"),
     "b.yaml:3: sections.a.allocation: allocation must be tokens (3000) or a share of the context window ('25%'), "
     "got 0.25"),
    (one("{tokens: 1, priority: 0, allocation: 150%}"),
     "b.yaml:3: sections.a.allocation: allocation share must be at most 100%, got '150%'"),
    (one("{tokens: 1, priority: 0, allocation: -5}"),
     "b.yaml:3: sections.a.allocation: allocation must be at least 0 tokens, got -5"),
    (one("{tokens: -5, priority: 0}"), "b.yaml:3: sections.a.tokens: must be greater than or equal to 0"),
    (one("{tokens: 1, priority: -1}"), "b.yaml:3: sections.a.priority: must be greater than or equal to 0"),
    (one("{tokens: 1}"), "b.yaml:3: sections.a.priority: required key is missing"),
    (one("{tokens: 1, priority: 0, min_tokens: -1}"),
     "b.yaml:3: sections.a.min_tokens: must be greater than or equal to 0 or 'all'"),
    (one("{tokens: 1, priority: 0, max_tokens: -1}"),
     "b.yaml:3: sections.a.max_tokens: must be greater than or equal to 0"),
    (one("{tokens: 1, priority: 0, chunk_tokens: 0}"), "b.yaml:3: sections.a.chunk_tokens: must be greater than 0"),
    (one("{tokens: 1, priority: 0, min_tokens: 50, max_tokens: 40}"),
     "b.yaml:3: sections.a.min_tokens: must be at most max_tokens (40), got 50"),
    (one("{tokens: 1, priority: 0, min_tokens: 300, allocation: 25%}"),
     "b.yaml:3: sections.a.min_tokens: must be at most the allocation (250 tokens), got 300"),
    (one("{tokens: 1, priority: 0}", "output_reserve_tokens: 1000\n"),
     "b.yaml:4: output_reserve_tokens: must be less than context_window_tokens (1000), got 1000"),
    (one("{tokens: 1, priority: 0}", "output_reserve_tokens: 10\nmin_output_tokens: 20\n"),
     "b.yaml:5: min_output_tokens: must be at most output_reserve_tokens (10), got 20"),
    (one("{tokens: 1, priority: 0}", "  b: {tokens: 1, priority: 0}\ncacheable_prefix: [b]\n"),
     "b.yaml:5: cacheable_prefix: must be the first sections in prompt order (a), got b"),
    (one("{tokens: 1, priority: 0}", "cacheable_prefix: [system]\n"),
     "b.yaml:4: cacheable_prefix: unknown section 'system' (known: a)"),
    ("context_window_tokens: 1000\nsections: {}\n", "b.yaml:2: sections: must have at least 1 entry"),
    ("context_window_tokens: 1000\nsections:\n  a.b: {tokens: 1, priority: 0}\n",
     "b.yaml:2: sections: section name 'a.b' may hold only letters, digits, '_' and '-'"),
])
def test_validation_errors(tmp_path, text, message):
    assert errors(tmp_path, text) == [message]


def test_the_sketch_validates_and_keeps_its_order():
    spec = budget()
    assert list(spec.sections) == ["system", "memory", "retrieved", "history", "question"]
    assert spec.prompt_limit_tokens == 7168 and spec.output_floor_tokens == 1024
    assert spec.sections["memory"].allocation == "10%" and spec.sections["retrieved"].allocation == 3000
    assert Budget.model_json_schema()["properties"]["sections"]["description"]
    with pytest.raises(ValidationError):
        budget(bogus=1)


def test_confidence_scales_the_allocation_but_never_trims_a_section_the_window_may_not():
    from sim.config.distributions import Uniform

    confidence = Uniform(kind="uniform", low=0.5, high=1.0)
    sections = {"evidence": {"tokens": 4000, "priority": 2, "allocation": 2000, "chunk_tokens": 500},
                "history": {"tokens": 5000, "priority": 1, "allocation": 1500}}
    # Window 5,000 against 9,000 drawn: the evidence is cut to its (scaled) allocation, history gives the rest.
    scaled = simple(5000, {**sections, "evidence": {**sections["evidence"], "allocation_by_confidence": True}})
    kept = {r.sizes[0] for r in TokenBudget(scaled, Streams(1), "c", confidence=confidence).draw_block(500)}
    assert kept == {1500, 2000, 2500, 3000}  # 2,000 x c / 0.75, rounded up to chunks
    # min_tokens: all: the window never trims it, whatever the confidence (its allocation plays no part).
    kept_whole = simple(5000, {**sections, "evidence": {**sections["evidence"], "allocation_by_confidence": True,
                                                        "min_tokens": "all"}})
    results = TokenBudget(kept_whole, Streams(1), "c", confidence=confidence).draw_block(500)
    assert {r.sizes[0] for r in results} == {4000} and {r.sizes[1] for r in results} == {1000}
