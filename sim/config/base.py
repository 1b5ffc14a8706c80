"""The base of every config block, and the limits the schema puts on numbers."""
from __future__ import annotations

import sys
import types
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator

INT64_MAX = 2**63 - 1
"""Integers must fit in 64 bits: the simulator's arrays and results (Parquet, numpy) hold int64."""

# Upper bounds no real workload reaches; each keeps a run's memory or a float's precision in range.
MAX_DURATION_S = 1e10
"""Longest simulated time (317 years): up to here float64 time still resolves microseconds."""
MAX_GRID_POINTS = 10_000_000
"""Most points on a time grid a run walks (time-series buckets, autoscaler looks): ten days at 0.1 s.
Below that the work estimate, not the schema, guards memory and time."""
MAX_REPLICATIONS = 10_000
"""Confidence intervals narrow as 1/sqrt(replications): beyond 10,000, run longer instead."""
MAX_COUNT = 1_000_000
"""Most replicas, slots, sequences or closed-loop users of one component (each is an object in memory)."""
MAX_POPULATION = 100_000_000
"""Most users of a class or keys of a cache: the model keeps one weight per user or key (800 MB here)."""
MAX_TOKENS = 1_000_000_000
"""Most tokens of one prompt, answer, window or cache: 100x the longest context windows offered."""
MAX_RATE_RPS = 1e9
"""Highest arrival or refill rate: a billion requests a second is beyond any service."""
MAX_PRICE_USD = 1e6
"""Highest price per million tokens or per GPU-hour: prices are dollars, not millions of them."""
MAX_VALUE = 1e12
"""Largest value a distribution takes (seconds, tokens or a count): a million draws sum within int64."""
MAX_MULTIPLIER = 1e6
"""Largest factor on a rate, a price or a step time: a million times is beyond any scenario."""


class Block(BaseModel):
    """A config block: unknown keys are errors (a typo must never silently turn a setting off).

    Numbers are strict: no booleans where a number goes (YAML 1.1 reads yes, no, on and
    off as booleans, and pydantic would take them as 1 and 0), no infinity or NaN, no
    integer beyond 64 bits, and no integer too large to be a float.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data: Any) -> Any:
        # On the raw mapping, before pydantic turns true into 1; a field validator cannot do
        # it, pydantic allows none on the discriminator (`kind`).
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias if field.alias in data else name
                found = number_problem(field.annotation, data[key]) if key in data else None
                if found is not None:
                    raise ValueError(".".join(map(str, (key, *found[0]))) + ": " + found[1])
        return data


def number_problem(annotation: Any, value: Any) -> Optional[tuple[tuple[Any, ...], str]]:
    """(where below `value`, why) it cannot be what `annotation` declares, for what pydantic lets through.

    Looks into lists and mappings (`list[float]`, `dict[str, float]`); blocks check their own fields.
    None when there is no such problem.
    """
    members = _members(annotation)
    scalars = {m for m in members if m in (bool, int, float) or m is Any or get_origin(m) is Literal}
    if isinstance(value, bool):
        return _bool_problem(scalars, value)
    if float in scalars:  # an int beyond float range would fail as 'not a number' (or overflow later)
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            return (), f"must be a finite number, got an integer of {len(str(abs(value)))} digits"
    elif int in scalars and isinstance(value, (int, float)) and abs(value) > INT64_MAX:
        got = f"{value:g}" if isinstance(value, float) else f"one of {len(str(abs(value)))} digits"
        return (), f"must be an integer below 2^63 (64 bits), got {got}"
    return _item_problem(members, value)


def _bool_problem(scalars: set[Any], value: bool) -> Optional[tuple[tuple[Any, ...], str]]:
    """A boolean where only numbers go (pydantic takes true as 1, and Literal[1] too)."""
    if bool in scalars or Any in scalars or any(value is a for m in scalars for a in get_args(m)):
        return None
    numbers = [a for m in scalars for a in get_args(m) if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if float in scalars or int in scalars:
        expected = "a number" if float in scalars else "an integer"
    elif numbers:
        expected = " or ".join(map(str, numbers))
    else:
        return None
    return (), f"must be {expected}, got {str(value).lower()} (YAML reads yes, no, on and off as booleans)"


def _item_problem(members: list[Any], value: Any) -> Optional[tuple[tuple[Any, ...], str]]:
    """The first problem among the items of a list or the values of a mapping."""
    for member in members:
        origin, args = get_origin(member), get_args(member)
        if origin is list and len(args) == 1 and isinstance(value, list):
            items: Any = enumerate(value)
        elif origin is dict and len(args) == 2 and isinstance(value, dict):
            items, args = value.items(), args[1:]
        else:
            continue
        for key, item in items:
            found = number_problem(args[0], item)
            if found is not None:
                return (key, *found[0]), found[1]
    return None


def _members(annotation: Any) -> list[Any]:
    """The types a value may take: Optional, unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]
