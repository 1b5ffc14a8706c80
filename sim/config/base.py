"""The base of every config block."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Block(BaseModel):
    """A config block: unknown keys are errors (a typo must never silently turn a setting off)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
