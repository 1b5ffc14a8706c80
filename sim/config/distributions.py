"""Distribution specs: the `kind:` blocks a workload uses for every random quantity.

Each spec validates its parameters, knows its mean (for offered-load checks) and
draws vectorised blocks from a numpy Generator. A plain number where a
distribution is expected means a constant.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    model_validator,
)

from .base import MAX_VALUE, Block

Z95 = 1.6448536269514722  # standard normal 95th percentile


class DistributionSpec(Block):
    """Base of every distribution: unknown keys are errors, numbers are strict (see Block)."""

    @property
    def mean(self) -> float:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class Constant(DistributionSpec):
    """Always the same value."""

    kind: Literal["constant"]
    value: float = Field(ge=0, le=MAX_VALUE, description="The value every draw returns.")

    @property
    def mean(self) -> float:
        return self.value

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value)


class Exponential(DistributionSpec):
    """Exponential (memoryless) with the given mean."""

    kind: Literal["exponential"]
    mean_value: float = Field(gt=0, le=MAX_VALUE, alias="mean", description="Mean of the distribution.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @property
    def mean(self) -> float:
        return self.mean_value

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.mean_value * rng.standard_exponential(n)


class Uniform(DistributionSpec):
    """Uniform on [low, high]."""

    kind: Literal["uniform"]
    low: float = Field(ge=0, le=MAX_VALUE, description="Lower bound.")
    high: float = Field(ge=0, le=MAX_VALUE, description="Upper bound (must exceed low).")

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, n)


class Normal(DistributionSpec):
    """Normal truncated at 0 (negative draws are redrawn, so the shape is kept)."""

    kind: Literal["normal"]
    mean_value: float = Field(alias="mean", le=MAX_VALUE, description="Mean before truncation.")
    sd: float = Field(ge=0, le=MAX_VALUE, description="Standard deviation before truncation.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _mostly_positive(self) -> "Normal":
        if self.mean_value <= 0:
            raise ValueError("mean must be positive for a normal truncated at 0")
        return self

    @property
    def mean(self) -> float:
        if self.sd == 0:
            return self.mean_value
        a = self.mean_value / self.sd
        pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
        return self.mean_value + self.sd * pdf / cdf

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = rng.normal(self.mean_value, self.sd, n)
        bad = out < 0
        while bad.any():
            out[bad] = rng.normal(self.mean_value, self.sd, int(bad.sum()))
            bad = out < 0
        return out


class Lognormal(DistributionSpec):
    """Lognormal, given by mean and p95, by median and p95, or by mu and sigma of log(x)."""

    kind: Literal["lognormal"]
    mean_value: Optional[float] = Field(None, alias="mean", gt=0, le=MAX_VALUE, description="Mean (with p95).")
    median: Optional[float] = Field(None, gt=0, le=MAX_VALUE, description="Median (with p95).")
    p95: Optional[float] = Field(None, gt=0, le=MAX_VALUE, description="95th percentile (with mean or median).")
    mu: Optional[float] = Field(None, description="Mean of log(x) (with sigma).")
    sigma: Optional[float] = Field(None, ge=0, description="Standard deviation of log(x) (with mu).")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _solve(self) -> "Lognormal":
        given = {k for k in ("mean_value", "median", "p95", "mu", "sigma") if getattr(self, k) is not None}
        if given == {"mu", "sigma"}:
            return self
        if given == {"median", "p95"}:
            if self.p95 <= self.median:
                raise ValueError(f"p95 ({self.p95}) must be above the median ({self.median})")
            self.mu = math.log(self.median)
            self.sigma = math.log(self.p95 / self.median) / Z95
            return self
        if given == {"mean_value", "p95"}:
            # ln(p95/mean) = Z95*s - s^2/2; the smaller root keeps p95 above the median.
            gap = math.log(self.p95 / self.mean_value)
            if gap <= 0:
                raise ValueError(f"p95 ({self.p95}) must be above the mean ({self.mean_value})")
            if gap > Z95 * Z95 / 2:
                raise ValueError(
                    f"no lognormal has mean {self.mean_value} and p95 {self.p95}: "
                    f"p95/mean must be at most {math.exp(Z95 * Z95 / 2):.3f}; give median and p95 instead"
                )
            self.sigma = Z95 - math.sqrt(Z95 * Z95 - 2 * gap)
            self.mu = math.log(self.mean_value) - self.sigma**2 / 2
            return self
        raise ValueError("give either mean and p95, median and p95, or mu and sigma")

    @model_validator(mode="after")
    def _finite_mean(self) -> "Lognormal":
        # Checked on log(mean), as mean itself overflows a float past sigma ~ 38.
        if self.mu + self.sigma**2 / 2 > math.log(MAX_VALUE):
            raise ValueError(f"the mean exp(mu + sigma^2 / 2) must be at most {MAX_VALUE:g} "
                             f"(mu {self.mu:.4g}, sigma {self.sigma:.4g})")
        return self

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.lognormal(self.mu, self.sigma, n)


class Gamma(DistributionSpec):
    """Gamma given by its mean and coefficient of variation (cv = sd / mean)."""

    kind: Literal["gamma"]
    mean_value: float = Field(alias="mean", gt=0, le=MAX_VALUE, description="Mean.")
    cv: float = Field(gt=0, le=100, description="Coefficient of variation (sd / mean), at most 100.")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @property
    def mean(self) -> float:
        return self.mean_value

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / (self.cv * self.cv)
        return rng.gamma(shape, self.mean_value / shape, n)


class Empirical(DistributionSpec):
    """Resample (with replacement) from a list of values or a CSV column."""

    kind: Literal["empirical"]
    values: Optional[list[float]] = Field(None, description="The observed values.")
    csv: Optional[str] = Field(None, description="CSV file (relative to the workload file).")
    column: Optional[str] = Field(None, description="Column of the CSV file to read.")
    _data: np.ndarray = PrivateAttr(default_factory=lambda: np.empty(0))

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> "Empirical":
        if (self.values is None) == (self.csv is None):
            raise ValueError("give either values or csv (with column)")
        if self.values is not None:
            data = self.values
        else:
            if not self.column:
                raise ValueError("csv needs a column")
            base = Path((info.context or {}).get("base_dir", "."))
            data = _read_csv_column(base / self.csv, self.column)
        arr = np.asarray(data, dtype=float)
        if arr.size == 0:
            raise ValueError("empirical distribution has no values")
        if (arr < 0).any() or not np.isfinite(arr).all() or (arr > MAX_VALUE).any():
            raise ValueError(f"empirical values must be finite, non-negative and at most {MAX_VALUE:g}")
        self._data = arr
        return self

    @property
    def mean(self) -> float:
        return float(self._data.mean())

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._data[rng.integers(0, self._data.size, n)]


def _read_csv_column(path: Path, column: str) -> list[float]:
    """The numbers in one column of a CSV file; errors name the row but never echo the file (see traces.excerpt)."""
    from .traces import NOT_FOUND, describe_header, excerpt, file_problem

    problem = file_problem(path)
    if problem is not None:
        raise ValueError(f"CSV file not found: {path}" if problem == NOT_FOUND else f"CSV file {path}: {problem}")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if column not in header:
                raise ValueError(f"CSV file {path} has no column {column!r} ({describe_header(header)})")
            values = []
            for row in reader:
                try:
                    values.append(float(row[column]))
                except (TypeError, ValueError):  # TypeError: the row is short of this column
                    cell = excerpt(row[column]) if row[column] else "an empty cell"
                    raise ValueError(f"CSV file {path}: row {reader.line_num}: column {column!r}: "
                                     f"{cell} is not a number") from None
            return values
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"CSV file {path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def _number_is_constant(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"kind": "constant", "value": value}
    return value


Distribution = Annotated[
    Union[Constant, Exponential, Uniform, Normal, Lognormal, Gamma, Empirical],
    Field(discriminator="kind"),
    BeforeValidator(_number_is_constant),
]
