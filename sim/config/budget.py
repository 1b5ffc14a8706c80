"""Token budget: a prompt built from sections, trimmed to fit the model's context window.

    budget:
      context_window_tokens: 8192
      output_reserve_tokens: 1024
      sections:                       # in prompt order
        system:    {tokens: 600, priority: 0, min_tokens: all}
        memory:    {tokens: {kind: lognormal, median: 300, p95: 1200}, allocation: "10%", priority: 2}
        retrieved: {tokens: {kind: uniform, low: 500, high: 6000}, allocation: 3000, chunk_tokens: 500, priority: 3}
        history:   {tokens: {kind: lognormal, median: 800, p95: 4000}, allocation: 2000, priority: 1}
        question:  {tokens: {kind: lognormal, median: 60, p95: 300}, priority: 0, min_tokens: all}
      cacheable_prefix: [system, memory]

The trimming policy (implemented by `sim.model.application.budget.trim`), per request:

1. Draw every section's size (rounded, at least 0).
2. Cap: a section longer than its `max_tokens` is cut to it.
3. If the sections plus `output_reserve_tokens` fit `context_window_tokens`, stop.
4. Otherwise trim, in trim order (highest `priority` number first; equal
   priorities in the order the sections are listed), each section only as far
   as needed, in two passes: first down to its allocation (a section without
   one is not cut in this pass), then, if the prompt still does not fit, down
   to its `min_tokens` (`all`: never cut by the window).
5. A section with `chunk_tokens` (retrieved context) is a run of chunks of
   that size, the last one possibly shorter; it loses whole chunks from the
   end only, never part of one. Its cap keeps at most `max_tokens`; its
   floors keep at least the allocation and `min_tokens`, rounded up to whole
   chunks.
6. If the prompt still does not fit, the output reserve shrinks to what the
   window leaves, down to `min_output_tokens`; below that the request
   overflows: it is marked so (its prompt is over the window), and the
   pipeline decides what to do with it, as a provider rejects a request over
   its context length.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field, model_validator

from .base import MAX_TOKENS, Block
from .distributions import Distribution

_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FORMS = "allocation must be tokens (3000) or a share of the context window ('25%')"


def _allocation(value: Any) -> Any:
    """Tokens (a whole number >= 0) or a share of the context window written as 'NN%'."""
    if isinstance(value, bool):
        raise ValueError(f"{_FORMS}, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"allocation must be at least 0 tokens, got {value}")
        return value
    if isinstance(value, str):
        m = _SHARE.match(value.strip())
        if m is None:
            raise ValueError(f"{_FORMS}, got {value!r}")
        share = float(m.group(1))
        if share > 100:
            raise ValueError(f"allocation share must be at most 100%, got {value!r}")
        return f"{m.group(1)}%"
    # A bare fraction (0.25) is ambiguous between tokens and a share: ask for the explicit form.
    raise ValueError(f"{_FORMS}, got {value!r}")


Allocation = Annotated[Union[int, str], BeforeValidator(_allocation)]


class Section(Block):
    """One section of the prompt: how long it is drawn, and how far it may be trimmed."""

    tokens: Distribution = Field(
        description="Size of the section per request (rounded, at least 0); a plain number is a constant."
    )
    priority: int = Field(
        ge=0,
        description="Trim order: the highest number is trimmed first, 0 last; equal priorities are trimmed "
        "in the order the sections are listed.",
    )
    allocation: Optional[Allocation] = Field(
        None,
        description="What the section keeps while other sections can still give tokens: tokens (3000) or a share "
        "of the context window ('25%', rounded down). The first trimming pass cuts a section down to its "
        "allocation; only the second pass goes below it, to min_tokens. Default: the whole section (not cut in "
        "the first pass). Not a cap: see max_tokens.",
    )
    min_tokens: Union[Annotated[int, Field(ge=0)], Literal["all"]] = Field(
        0,
        description="The window never trims the section below this ('all': never trims it at all). "
        "A draw shorter than this is kept whole.",
    )
    max_tokens: Optional[int] = Field(
        None,
        ge=0,
        description="Hard cap, applied before the window check: the section is never longer than this.",
    )
    chunk_tokens: Optional[int] = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="The section is a run of chunks of this size (the last possibly shorter) and is trimmed by "
        "whole chunks from the end, never mid-chunk (retrieved context).",
    )
    allocation_by_confidence: bool = Field(
        False,
        description="Scale the allocation per request by the retriever's confidence in its evidence over the "
        "mean confidence (pipeline.quality.evidence_confidence): the same allocation on average, more where the "
        "evidence is likely relevant, less where it is likely noise. Only the evidence section.",
    )


class Budget(Block):
    """Prompt sections and their trimming to the context window.

    Trimming policy: cap each section at max_tokens; if sections + output reserve exceed the
    context window, cut sections in trim order (highest priority number first, ties in listed
    order), only as far as needed: first down to their allocation, then down to min_tokens;
    chunked sections lose whole chunks only. If that is not enough the output reserve shrinks
    down to min_output_tokens; beyond that the request is marked as overflowing.
    """

    context_window_tokens: int = Field(
        gt=0, le=MAX_TOKENS, description="The model's context window: prompt + output (at most 1e9 tokens).")
    output_reserve_tokens: int = Field(
        0, ge=0, description="Tokens kept free for the answer: the prompt may use the window minus this."
    )
    min_output_tokens: Optional[int] = Field(
        None,
        ge=0,
        description="When no trimming makes the prompt fit, the output reserve shrinks down to this before the "
        "request overflows. Default: output_reserve_tokens (the reserve never shrinks).",
    )
    sections: dict[str, Section] = Field(
        min_length=1, description="The prompt's sections, by name, in prompt order."
    )
    cacheable_prefix: list[str] = Field(
        default_factory=list,
        description="Sections forming the stable prompt prefix (provider prompt caching): the first sections, "
        "in order.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Budget":
        if self.output_reserve_tokens >= self.context_window_tokens:
            raise ValueError(
                f"output_reserve_tokens: must be less than context_window_tokens ({self.context_window_tokens}), "
                f"got {self.output_reserve_tokens}"
            )
        if self.min_output_tokens is not None and self.min_output_tokens > self.output_reserve_tokens:
            raise ValueError(
                f"min_output_tokens: must be at most output_reserve_tokens ({self.output_reserve_tokens}), "
                f"got {self.min_output_tokens}"
            )
        for name, section in self.sections.items():
            if not _NAME.match(name):
                raise ValueError(f"sections: section name {name!r} may hold only letters, digits, '_' and '-'")
            where = f"sections.{name}"
            alloc = self.allocation_tokens(name)
            floor = section.min_tokens
            if section.allocation_by_confidence and alloc is None:
                raise ValueError(f"{where}.allocation_by_confidence: needs an allocation to scale")
            if isinstance(floor, int):
                if section.max_tokens is not None and floor > section.max_tokens:
                    raise ValueError(
                        f"{where}.min_tokens: must be at most max_tokens ({section.max_tokens}), got {floor}")
                if alloc is not None and floor > alloc:
                    raise ValueError(
                        f"{where}.min_tokens: must be at most the allocation ({alloc} tokens), got {floor}")
        names = list(self.sections)
        weighted = [name for name, section in self.sections.items() if section.allocation_by_confidence]
        if len(weighted) > 1:
            raise ValueError(f"sections.{weighted[1]}.allocation_by_confidence: only one section (the evidence)")
        prefix = self.cacheable_prefix
        for name in prefix:
            if name not in self.sections:
                raise ValueError(f"cacheable_prefix: unknown section {name!r} (known: {', '.join(names)})")
        if prefix != names[: len(prefix)]:
            # A provider caches an exact prefix: a section after an uncached one can never hit.
            raise ValueError(
                f"cacheable_prefix: must be the first sections in prompt order ({', '.join(names[: len(prefix)])}), "
                f"got {', '.join(prefix)}"
            )
        return self

    def allocation_tokens(self, name: str) -> Optional[int]:
        """Section `name`'s allocation in tokens (a share of the window rounded down); None without one."""
        alloc = self.sections[name].allocation
        if alloc is None or isinstance(alloc, int):
            return alloc
        # Fraction: '29%' of 100 is exactly 29, where floats give 28.999999999999996.
        return math.floor(Fraction(alloc[:-1]) / 100 * self.context_window_tokens)

    @property
    def prompt_limit_tokens(self) -> int:
        """The most prompt tokens that leave the full output reserve free."""
        return self.context_window_tokens - self.output_reserve_tokens

    @property
    def output_floor_tokens(self) -> int:
        """The smallest output reserve a request may keep before it overflows."""
        return self.output_reserve_tokens if self.min_output_tokens is None else self.min_output_tokens
