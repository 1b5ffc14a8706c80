"""Arrival processes of a request class: `arrival: {kind: ...}`."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .base import Block
from .distributions import Distribution


class PoissonArrivals(Block):
    """Open loop: requests arrive as a Poisson process, whatever the system does."""

    kind: Literal["poisson"]
    rate_rps: float = Field(gt=0, description="Mean arrival rate in requests per second.")

    def mean_rate_rps(self) -> float:
        """Long-run mean arrival rate (every open-loop kind has one; offered load uses it)."""
        return self.rate_rps


class ClosedLoopArrivals(Block):
    """Closed loop: a fixed population, each user waits for its answer, thinks, asks again."""

    kind: Literal["closed"]
    users: int = Field(gt=0, description="Number of users.")
    think_time_s: Distribution = Field(description="Time between an answer and the user's next request.")


Arrivals = Annotated[Union[PoissonArrivals, ClosedLoopArrivals], Field(discriminator="kind")]
