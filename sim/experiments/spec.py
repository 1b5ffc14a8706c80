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
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from sim.config.base import MAX_REPLICATIONS
from sim.config.base import Block as ConfigBlock
from sim.config.loader import ConfigError, load_yaml_with_lines, validate_model
from sim.config.overrides import apply_overrides
from sim.config.schema import Workload

LOAD_AXIS = "traffic.rate_scale"
MAX_NAME_BYTES = 255  # the longest file name most file systems take


class Block(ConfigBlock):
    """A block of an experiment file: a workload's rules (strict numbers, no unknown keys), and aliases
    (`from`, `to`) by name too."""

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
        return [self.value(k) for k in range(self.steps)]

    def value(self, k: int) -> float:
        """The k-th value (k in [0, steps))."""
        if self.scale == "log":
            a, b = math.log(self.start), math.log(self.stop)
            return round(math.exp(a + (b - a) * k / (self.steps - 1)), 12)
        return round(self.start + (self.stop - self.start) * k / (self.steps - 1), 12)


Axis = Union[list[Any], Span]


class Bound(Block):
    """An SLO bound on a summary metric: at most `max` and/or at least `min`."""

    max: Optional[float] = Field(None, gt=0, description="The metric's upper 95% bound must be at most this.")
    min: Optional[float] = Field(None, ge=0, description="The metric's lower 95% bound must be at least this.")

    @model_validator(mode="after")
    def _some_bound(self) -> "Bound":
        if self.max is None and self.min is None:
            raise ValueError("give max, min or both")
        return self


def slo_verdict(summary: dict[str, Any], slo: dict[str, Bound]) -> tuple[bool, Optional[str]]:
    """Whether every bound holds on its pessimistic 95% end (the capacity search's test, and the figures'); else
    the first metric that fails. `summary`: a run's summary, or a sweep point's row."""
    for metric, bound in slo.items():
        if bound.max is not None and not pessimistic(summary, metric, "max") <= bound.max:  # NaN fails too
            return False, metric
        if bound.min is not None and not pessimistic(summary, metric, "min") >= bound.min:
            return False, metric
    return True, None


def pessimistic(summary: dict[str, Any], metric: str, side: Literal["max", "min"]) -> float:
    """The end of a metric's 95% interval that a `side` bound is judged on (the upper end against a max), or the
    metric itself without an interval (one replication); NaN when it is missing."""
    end = "_ci95_high" if side == "max" else "_ci95_low"
    return summary.get(f"{metric}{end}", summary.get(metric, math.nan))


def _number_is_max(value: Any) -> Any:
    return {"max": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Capacity(Block):
    """Capacity search: for each config, the highest load at which the SLO holds."""

    target: float = Field(gt=0, description="Target load, in units of the load axis (rate_scale by default).")
    low: float = Field(0.05, gt=0, description="Lowest load the search considers.")
    high: float = Field(8.0, gt=0, description="Highest load the search considers.")
    tolerance: float = Field(0.02, gt=0, lt=1, description="Stop when the bracket is this narrow (relative).")


def plain_file_name(name: Optional[str]) -> Optional[str]:
    """The name becomes the folder reports/<name>/: it must not lead anywhere else."""
    if name is None:
        return name
    plain = all(kind(name).name == name for kind in (PurePosixPath, PureWindowsPath))
    if not name or not plain or name == ".." or "\0" in name:
        raise ValueError(f"must be a plain file name (no '/', '\\', '..', drive or absolute path), got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"must be at most {MAX_NAME_BYTES} bytes long (it names a folder)")
    return name


class NamedWithSlo(Block):
    """What an experiment file and a plan file share: a name that becomes a folder, an SLO whose bare numbers
    are maxima."""

    @field_validator("name", check_fields=False)
    @classmethod
    def _plain_file_name(cls, name: Optional[str]) -> Optional[str]:
        return plain_file_name(name)

    @model_validator(mode="before")
    @classmethod
    def _shorthand_bounds(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("slo"), dict):
            data = {**data, "slo": {k: _number_is_max(v) for k, v in data["slo"].items()}}
        return data


class Experiment(NamedWithSlo):
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
    replications: Optional[int] = Field(None, ge=1, le=MAX_REPLICATIONS,
                                        description="Replications per point (default: the workload's).")
    seed: Optional[int] = Field(None, ge=0, description="Root seed of every point (default: the workload's).")
    slo: dict[str, Bound] = Field(default_factory=dict, description="metric -> bound; a number means max.")
    load_axis: str = Field(LOAD_AXIS, description="The axis that is the offered load (x axis of load plots).")
    capacity: Optional[Capacity] = Field(None, description="Find each config's highest load meeting the SLO.")
    metrics: Optional[list[str]] = Field(None, description="Metrics to keep in results (default: all).")


    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        empty = [path for path, axis in self.axes.items() if axis_length(axis) == 0]
        if empty:
            raise ValueError(f"axes: {empty[0]} has no values; give at least one")
        if self.combine == "zip":
            lengths = {path: axis_length(axis) for path, axis in self.axes.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"axes: zip needs axes of one length, got {lengths}")
        if self.capacity is not None and not self.slo:
            raise ValueError("capacity: a capacity search needs an slo")
        return self


def axis_values(axis: Axis) -> list[Any]:
    """The values an axis takes, in order."""
    return axis.values() if isinstance(axis, Span) else list(axis)


def axis_length(axis: Axis) -> int:
    """How many values an axis takes, without listing them."""
    return axis.steps if isinstance(axis, Span) else len(axis)


def first_value(axis: Axis) -> Any:
    return axis.value(0) if isinstance(axis, Span) else axis[0]


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

    def describe(self) -> str:
        """'point 4 (variant fast, traffic.rate_scale=1.5)' for messages."""
        values = "".join(f", {p}={json.dumps(v)}" for p, v in self.values.items())
        return f"point {self.index} (variant {self.variant}{values})"


@dataclass(frozen=True)
class Source:
    """Where one override of a point comes from: for messages that blame the experiment file, not the workload."""

    override: str
    location: tuple[str, ...]  # key path in the experiment file (for its line number)
    label: str                 # 'axes.models.x.replicas: value -2' or 'variants.fp8: models.x.replicas=-2'
    path: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", self.override.partition("=")[0].strip())


class Problems:
    """Distinct error lines of bad points, shown up to a limit, then a count (a bad value repeats across a grid)."""

    SHOWN = 8

    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: dict[str, None] = {}  # an ordered set
        self.bad = 0

    def add(self, lines: list[str]) -> None:
        self.bad += 1
        self.lines.update(dict.fromkeys(lines))

    def raise_if_any(self, checked: int, what: str = "points") -> None:
        """ConfigError with the first lines and, past the limit, how many more there are."""
        if not self.bad:
            return
        lines = list(self.lines)
        shown = lines[:self.SHOWN]
        if len(lines) > self.SHOWN:
            shown.append(f"{self.source}: ... and {len(lines) - self.SHOWN} more problems")
        shown.append(f"{self.source}: {self.bad} of {checked} {what} have values the workload refuses; "
                     "nothing was run")
        raise ConfigError(shown)


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
    lines: dict = field(default_factory=dict)  # the experiment file's line numbers, for messages

    def points(self) -> list[Point]:
        """Every point as a list (see iter_points; a sweep never holds them all)."""
        return list(self.iter_points())

    def iter_points(self) -> Iterator[Point]:
        """Every point: variants x (grid or zip of the axes), in a stable order, one at a time.

        A generator, so a million-point axis costs nothing until its points are used.
        """
        paths = list(self.spec.axes)
        columns = [axis_values(self.spec.axes[p]) for p in paths]
        index = 0
        for variant, extra in (self.variant_overrides() or {"base": []}).items():
            combos = zip(*columns) if self.spec.combine == "zip" else itertools.product(*columns)
            for combo in combos:
                values = dict(zip(paths, combo))
                overrides = tuple(extra) + tuple(override(p, v) for p, v in values.items())
                yield Point(index, variant, values, overrides,
                            point_key(variant, overrides, self.seed, self.replications))
                index += 1

    def count_points(self) -> int:
        """How many points iter_points yields, without making them."""
        lengths = [axis_length(axis) for axis in self.spec.axes.values()]
        combos = (min(lengths) if lengths else 1) if self.spec.combine == "zip" else math.prod(lengths)
        return max(len(self.spec.variants), 1) * combos

    def variant_overrides(self) -> dict[str, list[str]]:
        out = {}
        for name, spec in self.spec.variants.items():
            out[name] = list(spec) if isinstance(spec, list) else [override(p, v) for p, v in spec.items()]
        return out

    def sources(self, variant: str, values: dict[str, Any]) -> list[Source]:
        """A point's overrides (variant's, then one per axis, as in Point.overrides), each with its origin."""
        variant_overrides = self.variant_overrides().get(variant, [])
        out = [Source(o, ("variants", variant), f"variants.{variant}: {_shorten(o)}") for o in variant_overrides]
        out += [Source(override(p, v), ("axes", p), f"axes.{p}: value {json.dumps(v)}") for p, v in values.items()]
        return out

    def point_workload(self, point: Point) -> Workload:
        """A point's validated workload; its ConfigError names the axis value or variant at fault."""
        return self.checked_workload(self.sources(point.variant, point.values), point.describe())

    def checked_workload(self, sources: list[Source], what: str) -> Workload:
        """The workload with `sources` applied; a bad value is blamed on the line of the experiment that set it."""
        try:
            return self.workload(tuple(s.override for s in sources))
        except ConfigError as err:
            raise ConfigError([self._blame(sources, what, line) for line in err.lines]) from None

    def _blame(self, sources: list[Source], what: str, line: str) -> str:
        """'--set PATH: message' -> 'EXP:LINE: axes.PATH: value V: message'; other errors name the point."""
        if line.startswith("--set "):
            target, _, message = line.removeprefix("--set ").partition(": ")
            for source in reversed(sources):  # a later override wins, so it is the one to blame
                if target == source.path or target.startswith(source.path + "."):
                    below = f"{target}: " if target != source.path else ""
                    number = self.lines.get(source.location, self.lines.get(source.location[:1], 1))
                    return f"{self.path}:{number}: {source.label}: {below}{message}"
        return f"{self.path}: {what}: {line}"

    def fingerprint(self, base: Workload) -> dict[str, Any]:
        """What identifies the experiment's results: a hash of the whole, and one per part to say what differs.

        `base` is self.workload() (the base with the experiment's seed and replications). Name,
        description and the file's location are left out: renaming or moving changes no result.
        """
        spec = self.spec
        parts: dict[str, Any] = {"axes": list(spec.axes), "variants": list(spec.variants)}
        parts.update({f"axes.{p}": axis_values(a) for p, a in spec.axes.items()})
        parts.update({f"variants.{n}": o for n, o in self.variant_overrides().items()})
        parts.update(combine=spec.combine, load_axis=spec.load_axis, metrics=spec.metrics,
                     slo={m: b.model_dump() for m, b in spec.slo.items()},
                     capacity=spec.capacity.model_dump() if spec.capacity else None)
        parts.update({f"workload.{k}": v for k, v in base.model_dump(mode="json", by_alias=True).items()})
        return fingerprint_of(parts)

    def workload(self, overrides: tuple[str, ...] = ()) -> Workload:
        """The base workload with the experiment's seed and replications, then `overrides`, applied.

        An axis or variant may itself set simulation.replications (to see intervals narrow).
        Raises ConfigError if the result is not valid.
        """
        settings = [override("simulation.seed", self.seed), override("simulation.replications", self.replications)]
        data = apply_overrides(self.base_data, settings + list(overrides), Workload)
        return validate_model(Workload, data, self.base_lines, str(self.base_path), self.base_path.parent,
                              overridden=[tuple(o.partition("=")[0].split(".")) for o in overrides])


def _shorten(text: str, limit: int = 80) -> str:
    """A long override (a whole block set at once) cut short for a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fingerprint_of(parts: dict[str, Any]) -> dict[str, Any]:
    """A hash of the whole and one per part (to say what differs on a mismatched --resume)."""
    hashes = {k: _digest(v)[:16] for k, v in parts.items()}
    return {"sha256": _digest(hashes), "parts": hashes}


def _digest(value: Any) -> str:
    """sha256 of canonical JSON: equal data, equal digest, whatever the key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def point_key(variant: str, overrides: tuple[str, ...], seed: int, replications: int) -> str:
    """A stable id of what a point computes, so a resumed sweep knows what is done."""
    text = json.dumps([variant, list(overrides), seed, replications])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_experiment(path: Union[str, Path]) -> LoadedExperiment:
    """Load and check an experiment file and its base workload; ConfigError on any problem."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if data.get("kind") == "plan":
        raise ConfigError([f"{path}:{lines.get(('kind',), 1)}: kind: this is a plan: run it with `llmsim plan {path}`"])
    spec = validate_model(Experiment, data, lines, str(path), path.parent)
    loaded = with_base_workload(spec, path, lines)
    _check_paths(loaded, lines)
    return loaded


def with_base_workload(spec: Experiment, path: Path, lines: dict) -> LoadedExperiment:
    """`spec` (read from `path`, or made in code for it) with its base workload read and checked."""
    base_path = path.parent / spec.workload
    if not base_path.is_file():
        raise ConfigError([f"{path}:{lines.get(('workload',), 1)}: workload: file not found: {base_path}"])
    base_data, base_lines = load_yaml_with_lines(base_path)
    base = validate_model(Workload, base_data, base_lines, str(base_path), base_path.parent)
    return LoadedExperiment(
        spec, path, spec.name or path.stem, base_path, base_data, base_lines,
        spec.seed if spec.seed is not None else base.simulation.seed,
        spec.replications or base.simulation.replications,
        lines,
    )


def _check_paths(loaded: LoadedExperiment, lines: dict) -> None:
    """Every axis and variant path must exist in the workload schema: a typo is a file:line error."""
    errors = []
    spec = loaded.spec
    where = [(("axes", p), [override(p, first_value(a))]) for p, a in spec.axes.items()]
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
