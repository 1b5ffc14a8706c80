"""Token budget: draw each prompt section's size per request and trim the prompt to the context window.

The policy, on one request's section sizes (all integers, in section order):

1. Cap. A section longer than its `max_tokens` is cut to `max_tokens` (a
   chunked section to the most whole chunks that fit under it). This happens
   whether or not the prompt fits.
2. Fit check. The prompt fits when sum(sizes) <= context_window_tokens -
   output_reserve_tokens (the "prompt limit"). If it fits, nothing more is cut.
3. Trim order. Sections sorted by `priority`, highest number first; equal
   priorities in the order the sections are listed (a stable sort, so the
   result never depends on dict or set order).
4. Pass 1: down to the allocation. In trim order, each section is cut by just
   as many tokens as the prompt is still over the limit, but not below its
   allocation (nor below `min_tokens`); a section without an allocation, or
   with `min_tokens: all`, is not cut in this pass. Stop as soon as it fits.
5. Pass 2: down to the floor. If the prompt is still over, the same walk again,
   now down to each section's `min_tokens` (default 0; `all`: never cut).
6. Chunks. A section with `chunk_tokens` c holding s tokens is ceil(s / c)
   chunks, c tokens each but the last (s - (ceil(s/c) - 1) c). It is cut by
   dropping whole chunks from the end, so its trimmed size is s or a multiple
   of c: to remove e tokens it drops the fewest chunks that remove at least e
   (the prompt may then end a little under the limit). Its floors
   (allocation, min_tokens) are rounded up to a multiple of c, so it never
   goes below them; its cap is rounded down, so it never goes above it.
7. Overflow. If after both passes the prompt is still over the limit, the
   output reserve shrinks to what the window leaves, context_window_tokens -
   prompt, down to `min_output_tokens` (default: the full reserve, i.e. no
   shrinking). Below that the request *overflows*: its prompt stays as
   trimmed (over the limit, possibly over the window), `overflow` is set, and
   the pipeline decides (a provider answers such a request with a
   context-length error).

A request is `truncated` when any section ended shorter than drawn (by the cap
or by the window). Its output budget is min(output_reserve_tokens,
context_window_tokens - prompt), at least 0: the most output tokens the model
may produce for it.

Each section draws its size from its own stream, `budget.<class>.<section>`, so
changing one section's distribution never changes another section's draws
(common random numbers across configs): raising the system prompt by 100
tokens raises every untrimmed prompt by exactly 100.
"""
from __future__ import annotations

import math
from itertools import repeat
from typing import Mapping, NamedTuple, Optional, Sequence, Union, overload

import numpy as np

from sim.config.base import MAX_TOKENS
from sim.config.budget import Budget
from sim.config.distributions import Distribution
from sim.model.streams import BLOCK, Streams


class BudgetResult(NamedTuple):
    """One request's prompt after the budget. Section tuples follow `TokenBudget.section_names`."""

    drawn: tuple[int, ...]        # section sizes as drawn
    sizes: tuple[int, ...]        # section sizes after the cap and the trimming
    prompt_tokens: int            # sum(sizes): what the model prefills
    prefix_tokens: int            # tokens of the cacheable prefix sections, after trimming
    output_budget_tokens: int     # min(output reserve, window - prompt), at least 0
    truncated: bool               # some section is shorter than drawn
    overflow: bool                # even trimmed, the prompt leaves less than min_output_tokens of the window
    confidence: float = math.nan  # the evidence confidence its allocation followed (NaN: none did)


class _Plan:
    """The policy of a Budget in arrays and index lists, computed once."""

    __slots__ = ("names", "chunk", "caps", "order", "passes", "limit", "window", "reserve", "out_floor", "n_prefix",
                 "weighted")

    def __init__(self, spec: Budget) -> None:
        self.names = tuple(spec.sections)
        sections = list(spec.sections.values())
        self.chunk = [s.chunk_tokens or 1 for s in sections]
        self.caps = [(j, s.max_tokens) for j, s in enumerate(sections) if s.max_tokens is not None]
        self.order = sorted(range(len(sections)), key=lambda j: -sections[j].priority)  # stable: ties by listing
        first: list[Optional[int]] = []
        second: list[Optional[int]] = []
        for j, (name, s) in enumerate(spec.sections.items()):
            floor = None if s.min_tokens == "all" else int(s.min_tokens)
            alloc = spec.allocation_tokens(name)
            first.append(None if alloc is None or floor is None else self._up(max(alloc, floor), j))
            second.append(None if floor is None else self._up(floor, j))
        self.passes = (first, second)
        # The section whose allocation follows the evidence confidence: (index, allocation, floor), or None (also
        # when it is never trimmed, min_tokens: all: then its allocation plays no part).
        weighted = [j for j, s in enumerate(sections) if s.allocation_by_confidence and first[j] is not None]
        self.weighted = None
        if weighted:
            j = weighted[0]
            self.weighted = (j, spec.allocation_tokens(self.names[j]), second[j])
        self.limit = spec.prompt_limit_tokens
        self.window = spec.context_window_tokens
        self.reserve = spec.output_reserve_tokens
        self.out_floor = spec.output_floor_tokens
        self.n_prefix = len(spec.cacheable_prefix)

    def _up(self, tokens: int, j: int) -> int:
        c = self.chunk[j]
        return -(-tokens // c) * c

    def trim(self, drawn: np.ndarray, scale: Optional[np.ndarray] = None) -> np.ndarray:
        """Trimmed sizes of a (requests x sections) integer array; vectorised over requests. `scale`: per
        request, the factor on the weighted section's allocation (its evidence confidence over the mean)."""
        s = np.array(drawn, dtype=np.int64, copy=True)
        passes = self.passes
        if scale is not None and self.weighted is not None:
            j, alloc, floor = self.weighted
            first = list(passes[0])
            first[j] = self._up(np.maximum(np.rint(alloc * scale).astype(np.int64), floor), j)
            passes = (first, passes[1])
        for j, cap in self.caps:
            col = s[:, j]
            c = self.chunk[j]
            s[:, j] = np.where(col > cap, (cap // c) * c, col)
        excess = s.sum(axis=1) - self.limit
        for floors in passes:
            for j in self.order:
                floor = floors[j]
                if floor is None:
                    continue
                over = excess > 0
                if not over.any():
                    return s
                col = s[:, j]
                c = self.chunk[j]
                # The largest size this section can take (whole chunks) that removes the excess, kept at
                # or above its floor, and never longer than it is.
                cut = np.minimum(col, np.maximum(((col - excess) // c) * c, floor))
                new = np.where(over, cut, col)
                excess -= col - new
                s[:, j] = new
        return s


def _as_array(sizes: Union[Mapping[str, int], Sequence[int], np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    if isinstance(sizes, Mapping):
        unknown = [k for k in sizes if k not in names]
        missing = [n for n in names if n not in sizes]
        if unknown or missing:
            raise ValueError(f"sizes must name every section ({', '.join(names)}); "
                             f"unknown: {unknown}, missing: {missing}")
        sizes = [sizes[n] for n in names]
    arr = np.asarray(sizes)
    if arr.shape[-1:] != (len(names),):
        raise ValueError(f"sizes must have one entry per section ({', '.join(names)}), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError("section sizes must be integers >= 0")
    return arr.astype(np.int64)


def trim_block(sizes: np.ndarray, spec: Budget) -> np.ndarray:
    """The policy on a (requests x sections) integer array of drawn sizes; returns the trimmed array."""
    plan = _Plan(spec)
    return plan.trim(_as_array(sizes, plan.names).reshape(-1, len(plan.names)))


@overload
def trim(sizes: Mapping[str, int], spec: Budget) -> dict[str, int]: ...
@overload
def trim(sizes: Sequence[int], spec: Budget) -> tuple[int, ...]: ...
def trim(sizes, spec):
    """The policy on one request's drawn section sizes.

    `sizes` is a mapping of every section name to its size (returns a dict) or a
    sequence in section order (returns a tuple).
    """
    plan = _Plan(spec)
    out = plan.trim(_as_array(sizes, plan.names).reshape(1, -1))[0].tolist()
    if isinstance(sizes, Mapping):
        return dict(zip(plan.names, out))
    return tuple(out)


def _results(plan: _Plan, drawn: np.ndarray, confidence: Optional[np.ndarray] = None,
             mean_confidence: float = 1.0) -> list[BudgetResult]:
    sizes = plan.trim(drawn, None if confidence is None else confidence / mean_confidence)
    prompt = sizes.sum(axis=1)
    prefix = sizes[:, : plan.n_prefix].sum(axis=1)
    room = plan.window - prompt
    out_budget = np.clip(room, 0, plan.reserve)
    overflow = room < plan.out_floor
    truncated = (sizes < drawn).any(axis=1)
    # One result per request: built in C from the columns (zip(*columns) makes each request's section
    # tuple without a list per row; _make takes a row as it is, without parsing arguments).
    columns = [zip(*drawn.T.tolist()), zip(*sizes.T.tolist()), prompt.tolist(), prefix.tolist(),
               out_budget.tolist(), truncated.tolist(), overflow.tolist()]
    columns.append(confidence.tolist() if confidence is not None else repeat(math.nan))
    return list(map(BudgetResult._make, zip(*columns)))


def evaluate(sizes: Union[Mapping[str, int], Sequence[int]], spec: Budget) -> BudgetResult:
    """The full result of the policy on one request's drawn section sizes (no randomness)."""
    plan = _Plan(spec)
    return _results(plan, _as_array(sizes, plan.names).reshape(1, -1))[0]


def _section_draw(spec):
    """Integer section sizes: rounded, at least 0 (an empty memory or no retrieved context is real)."""

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.clip(np.rint(spec.sample(rng, n)), 0, MAX_TOKENS).astype(np.int64)  # no int64 overflow

    return draw


class TokenBudget:
    """Draws one class's prompt sections per request and applies the budget policy.

    Draws come in vectorised blocks, one stream per section
    (`budget.<class_name>.<section>`); `draw()` hands out one precomputed
    `BudgetResult` at a time.
    """

    __slots__ = ("spec", "section_names", "_plan", "_draws", "_rngs", "_block", "_it", "_confidence",
                 "_confidence_rng", "_confidence_mean")

    def __init__(self, spec: Budget, streams: Streams, class_name: str, block: int = BLOCK,
                 confidence: Optional[Distribution] = None) -> None:
        """`confidence`: the evidence confidence's distribution, when a section's allocation follows it
        (drawn per request from `budget.<class_name>.confidence`, clipped to 0..1)."""
        self.spec = spec
        self._plan = _Plan(spec)
        self.section_names: tuple[str, ...] = self._plan.names
        self._draws = [_section_draw(s.tokens) for s in spec.sections.values()]
        self._rngs = [streams.rng(f"budget.{class_name}.{name}") for name in self.section_names]
        self._block = block
        self._it = iter(())
        self._confidence = confidence if self._plan.weighted is not None else None
        if self._confidence is not None:
            self._confidence_rng = streams.rng(f"budget.{class_name}.confidence")
            # The clipped distribution's mean, from a fixed-seed sample: scaled allocations average the allocation.
            sample = np.clip(confidence.sample(np.random.default_rng(0), 200_000), 0.0, 1.0)
            self._confidence_mean = float(sample.mean()) or 1.0

    def draw(self) -> BudgetResult:
        """The next request's budget result."""
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.draw_block(self._block))
            return next(self._it)

    def draw_block(self, n: int) -> list[BudgetResult]:
        """n requests' results at once, drawn next from the section streams."""
        sizes = self.draw_sizes(n)
        if self._confidence is None:
            return _results(self._plan, sizes)
        confidence = np.clip(self._confidence.sample(self._confidence_rng, n), 0.0, 1.0)
        return _results(self._plan, sizes, confidence, self._confidence_mean)

    def draw_sizes(self, n: int) -> np.ndarray:
        """n requests' drawn (untrimmed) section sizes, an (n x sections) int64 array."""
        return np.column_stack([d(rng, n) for d, rng in zip(self._draws, self._rngs)])

    def evaluate(self, sizes: Union[Mapping[str, int], Sequence[int]]) -> BudgetResult:
        """The policy on given drawn sizes (no randomness)."""
        return _results(self._plan, _as_array(sizes, self.section_names).reshape(1, -1))[0]


def mean_prompt_tokens(spec: Budget, n: int = 100_000, seed: int = 0) -> float:
    """Mean prompt tokens after trimming, estimated from n draws with a fixed seed (deterministic).

    For offered-load checks, where no closed form exists once trimming cuts in.
    """
    tb = TokenBudget(spec, Streams(seed), "mean")
    return float(tb._plan.trim(tb.draw_sizes(n)).sum(axis=1).mean())
