"""The LLM application pipeline between the rate limits and the model endpoints.

    pipeline:
      budget: {...}          # prompt sections trimmed to the context window (sim.config.budget)
      output_cache: {...}    # answers reused for repeated deterministic questions (sim.config.caches)
      post_processing_s: 0.02

Every block is optional; without a `pipeline` a request is one model call, exactly as before.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from .base import Block
from .budget import Budget
from .caches import OutputCacheSpec
from .distributions import Distribution


class Pipeline(Block):
    """Stages a request passes before and after its model call."""

    budget: Optional[Budget] = Field(None, description="Prompt sections and their trimming to the context window.")
    output_cache: Optional[OutputCacheSpec] = Field(None, description="Cache of final answers (deterministic requests only).")
    post_processing_s: Optional[Distribution] = Field(None, description="Time after the answer (formatting, filters).")
