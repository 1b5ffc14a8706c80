"""Rate limits: our own limiters in front of the endpoints, a client's retry policy, provider limits.

    rate_limits:
      - {kind: token_bucket, scope: user, classes: [free], rate_rps: 0.5, burst: 5, action: reject}
      - {kind: sliding_window, scope: global, window_s: 60, max_requests: 600, max_tokens: 2000000, action: delay}
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from .base import MAX_RATE_RPS, Block

Scope = Literal["user", "class", "global"]
Action = Literal["reject", "delay"]


class _Limit(Block):
    scope: Scope = Field("global", description="One limiter per user, per class, or one for all.")
    classes: Optional[list[str]] = Field(None, description="Classes it applies to (default: all).")
    action: Action = Field("reject", description="reject: a 429 (the client may retry); delay: hold until allowed.")
    name: Optional[str] = Field(None, description="Label in outputs (default: kind and scope).")


class TokenBucket(_Limit):
    """Token bucket: `burst` tokens, refilled at `rate_rps`; a request takes one."""

    kind: Literal["token_bucket"]
    rate_rps: float = Field(gt=0, le=MAX_RATE_RPS, description="Refill rate: the long-run admitted rate.")
    burst: float = Field(ge=1, description="Bucket size: the most requests admitted at once.")


class WindowLimit(_Limit):
    """Request and token counters over a window, as providers count RPM and TPM.

    Tokens count the prompt plus the maximum output (the class's max_output_tokens,
    else the request's output), as providers reserve max_tokens.
    """

    kind: Literal["fixed_window", "sliding_window"] = Field(
        description="fixed_window: counts reset at each window's start; sliding_window: over the last window_s.")
    window_s: float = Field(60.0, gt=0, description="Window length (60 for per-minute limits).")
    max_requests: Optional[int] = Field(None, gt=0, description="Requests per window at most.")
    max_tokens: Optional[int] = Field(None, gt=0, description="Prompt + max output tokens per window at most.")

    @model_validator(mode="after")
    def _some_limit(self) -> "WindowLimit":
        if self.max_requests is None and self.max_tokens is None:
            raise ValueError("give max_requests, max_tokens or both")
        return self


RateLimit = Annotated[Union[TokenBucket, WindowLimit], Field(discriminator="kind")]


class Retry(Block):
    """What a client does after a 429: retry with exponential backoff and jitter, or give up."""

    max_attempts: int = Field(3, ge=1, description="Attempts in all, the first included (1: never retry).")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry.")
    multiplier: float = Field(2.0, ge=1, description="Each further wait is this many times longer.")
    max_backoff_s: float = Field(60.0, ge=0, description="Longest wait between attempts.")
    jitter: float = Field(0.5, ge=0, le=1, description="Each wait is drawn uniformly within +-this share of itself.")
    honour_retry_after: bool = Field(True, description="Wait at least the retry-after a provider's 429 gives.")


class ProviderLimits(Block):
    """An API provider's own limits: beyond them it answers 429 with a retry-after."""

    rpm: Optional[int] = Field(None, gt=0, description="Requests per minute at most.")
    tpm: Optional[int] = Field(None, gt=0, description="Prompt + max output tokens per minute at most.")

    @model_validator(mode="after")
    def _some_limit(self) -> "ProviderLimits":
        if self.rpm is None and self.tpm is None:
            raise ValueError("give rpm, tpm or both")
        return self
