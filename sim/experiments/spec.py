"""Experiment files: a base workload, axes over any config path, variants, an SLO.

An experiment is data: it expands into points, each a list of `--set` style
overrides of the base workload, recorded with what varied (desmod's
factorial_config idea). Points of every variant share seeds, so variant
differences are paired (common random numbers).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.config.loader import ConfigError, load_yaml_with_lines, validate_model
from sim.config.overrides import apply_overrides
from sim.config.schema import Workload

LOAD_AXIS = "traffic.rate_scale"


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class Span(Block):
    """Evenly spaced values: `{from: 0.25, to: 3.0, steps: 12}` (or `scale: log`)."""

    start: float = Field(alias="from", description="First value.")
    stop: float = Field(alias="to", description="Last value.")
    steps: int = Field(ge=2, description="Number of values, ends included.")
    scale: Literal["linear", "log"] = Field("linear", description="Spacing of the values.")

    @model_validator(mode="after")
    def _positive_for_log(self) -> "Span":
        if self.scale == "log" and min(self.start, self.stop) <= 0:
            raise ValueError("a log scale needs positive from and to")
        return self

    def values(self) -> list[float]:
        if self.scale == "log":
            a, b = math.log(self.start), math.log(self.stop)
            return [round(math.exp(a + (b - a) * k / (self.steps - 1)), 12) for k in range(self.steps)]
        return [round(self.start + (self.stop - self.start) * k / (self.steps - 1), 12) for k in range(self.steps)]


Axis = Union[list[Any], Span]


class Bound(Block):
    """An SLO bound on a summary metric: at most `max` and/or at least `min`."""

    max: Optional[float] = Field(None, description="The metric's upper 95% bound must be at most this.")
    min: Optional[float] = Field(None, description="The metric's lower 95% bound must be at least this.")

    @model_validator(mode="after")
    def _some_bound(self) -> "Bound":
        if self.max is None and self.min is None:
            raise ValueError("give max, min or both")
        return self


def _number_is_max(value: Any) -> Any:
    return {"max": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Capacity(Block):
    """Capacity search: for each config, the highest load at which the SLO holds."""

    target: float = Field(gt=0, description="Target load, in units of the load axis (rate_scale by default).")
    low: float = Field(0.05, gt=0, description="Lowest load the search considers.")
    high: float = Field(8.0, gt=0, description="Highest load the search considers.")
    tolerance: float = Field(0.02, gt=0, lt=1, description="Stop when the bracket is this narrow (relative).")


class Experiment(Block):
    """A sweep over a base workload."""

    version: Literal[1] = 1
    name: Optional[str] = Field(None, description="Name of the experiment (default: the file name).")
    description: Optional[str] = None
    workload: str = Field(description="Base workload file, relative to this file.")
    axes: dict[str, Axis] = Field(default_factory=dict, description="Config path -> list of values or {from, to, steps}.")
    combine: Literal["grid", "zip"] = Field("grid", description="grid: every combination; zip: the i-th of each.")
    variants: dict[str, Union[dict[str, Any], list[str]]] = Field(
        default_factory=dict, description="Named policies: {path: value} or a list of 'path=value' overrides each."
    )
    replications: Optional[int] = Field(None, ge=1, description="Replications per point (default: the workload's).")
    seed: Optional[int] = Field(None, ge=0, description="Root seed of every point (default: the workload's).")
    slo: dict[str, Bound] = Field(default_factory=dict, description="metric -> bound; a number means max.")
    load_axis: str = Field(LOAD_AXIS, description="The axis that is the offered load (x axis of load plots).")
    capacity: Optional[Capacity] = Field(None, description="Find each config's highest load meeting the SLO.")
    metrics: Optional[list[str]] = Field(None, description="Metrics to keep in results (default: all).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand_bounds(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("slo"), dict):
            data = {**data, "slo": {k: _number_is_max(v) for k, v in data["slo"].items()}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        if self.combine == "zip":
            lengths = {path: len(axis_values(axis)) for path, axis in self.axes.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"axes: zip needs axes of one length, got {lengths}")
        if self.capacity is not None and not self.slo:
            raise ValueError("capacity: a capacity search needs an slo")
        return self


def axis_values(axis: Axis) -> list[Any]:
    """The values an axis takes, in order."""
    return axis.values() if isinstance(axis, Span) else list(axis)


def override(path: str, value: Any) -> str:
    """A `path=value` override; JSON is valid YAML, so any value survives the round trip."""
    return f"{path}={json.dumps(value)}"


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep: a variant and one value per axis."""

    index: int
    variant: str
    values: dict[str, Any]
    overrides: tuple[str, ...]
    key: str = field(default="")


@dataclass
class LoadedExperiment:
    """A validated experiment with its base workload data, ready to expand."""

    spec: Experiment
    path: Path
    name: str
    base_path: Path
    base_data: dict
    base_lines: dict
    seed: int
    replications: int

    def points(self) -> list[Point]:
        """Every point: variants x (grid or zip of the axes), in a stable order."""
        paths = list(self.spec.axes)
        columns = [axis_values(self.spec.axes[p]) for p in paths]
        combos = list(zip(*columns)) if self.spec.combine == "zip" else list(itertools.product(*columns))
        variants = self.variant_overrides() or {"base": []}
        points = []
        for variant, extra in variants.items():
            for combo in combos:
                values = dict(zip(paths, combo))
                overrides = tuple(extra) + tuple(override(p, v) for p, v in values.items())
                points.append(Point(len(points), variant, values, overrides,
                                    point_key(variant, overrides, self.seed, self.replications)))
        return points

    def variant_overrides(self) -> dict[str, list[str]]:
        out = {}
        for name, spec in self.spec.variants.items():
            out[name] = list(spec) if isinstance(spec, list) else [override(p, v) for p, v in spec.items()]
        return out

    def workload(self, overrides: tuple[str, ...] = ()) -> Workload:
        """The base workload with the experiment's seed and replications, then `overrides`, applied.

        An axis or variant may itself set simulation.replications (to see intervals narrow).
        Raises ConfigError if the result is not valid.
        """
        settings = [override("simulation.seed", self.seed), override("simulation.replications", self.replications)]
        data = apply_overrides(self.base_data, settings + list(overrides), Workload)
        return validate_model(Workload, data, self.base_lines, str(self.base_path), self.base_path.parent,
                              overridden=[tuple(o.partition("=")[0].split(".")) for o in overrides])


def point_key(variant: str, overrides: tuple[str, ...], seed: int, replications: int) -> str:
    """A stable id of what a point computes, so a resumed sweep knows what is done."""
    text = json.dumps([variant, list(overrides), seed, replications])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_experiment(path: Union[str, Path]) -> LoadedExperiment:
    """Load and check an experiment file and its base workload; ConfigError on any problem."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    spec = validate_model(Experiment, data, lines, str(path), path.parent)
    base_path = path.parent / spec.workload
    if not base_path.is_file():
        raise ConfigError([f"{path}:{lines.get(('workload',), 1)}: workload: file not found: {base_path}"])
    base_data, base_lines = load_yaml_with_lines(base_path)
    base = validate_model(Workload, base_data, base_lines, str(base_path), base_path.parent)
    loaded = LoadedExperiment(
        spec, path, spec.name or path.stem, base_path, base_data, base_lines,
        spec.seed if spec.seed is not None else base.simulation.seed,
        spec.replications or base.simulation.replications,
    )
    _check_paths(loaded, lines)
    return loaded


def _check_paths(loaded: LoadedExperiment, lines: dict) -> None:
    """Every axis and variant path must exist in the workload schema: a typo is a file:line error."""
    errors = []
    spec = loaded.spec
    where = [(("axes", p), [override(p, axis_values(a)[0])]) for p, a in spec.axes.items()]
    where += [(("variants", name), ov) for name, ov in loaded.variant_overrides().items()]
    if spec.capacity is not None:
        where.append((("load_axis",), [override(spec.load_axis, spec.capacity.target)]))
    for loc, overrides in where:
        try:
            apply_overrides(loaded.base_data, overrides, Workload)
        except ConfigError as err:
            line = lines.get(loc, lines.get(loc[:1], 1))
            # '--set PATH: message': an axis's location already names the path; a variant's does not.
            messages = [m.split(": ", 1)[1] if loc[0] == "axes" else m.removeprefix("--set ") for m in err.lines]
            errors += [f"{loaded.path}:{line}: {'.'.join(loc)}: {m}" for m in messages]
    if errors:
        raise ConfigError(errors)
