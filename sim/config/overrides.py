"""`--set a.b.c=value` overrides applied to loaded YAML data before validation.

Values are YAML (`8`, `auto`, `'{kind: poisson, rate_rps: 2}'`), parsed safely,
never evaluated. A path must name something the schema knows, so a typo fails
loudly instead of adding a key nobody reads.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Optional, get_args, get_origin

import yaml
from pydantic import BaseModel

from .loader import (
    ConfigError,
    Path_,
    Slot,
    _bare,
    _candidate_keys,
    _describe,
    _did_you_mean,
    _dotted,
    _field_for_key,
    _is_model,
    _known_keys,
    _longest_key,
    _pick_member,
    _tag_map,
    _union_members,
    parse_yaml_value,
    yaml_problem,
)


class _Bad(Exception):
    """One override is wrong; carries the message without the '--set PATH: ' prefix."""


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], model_cls: type[BaseModel]) -> dict[str, Any]:
    """Return a copy of `data` with every `PATH=VALUE` override applied.

    The path is checked against `model_cls` (mapping entries such as a model name
    must already exist in `data`); optional blocks absent from `data` are created.
    Raises ConfigError with one `--set PATH: message` line per bad override.
    """
    return apply_overrides_tracked(data, overrides, model_cls)[0]


def apply_overrides_tracked(
    data: Mapping[str, Any], overrides: Sequence[str], model_cls: type[BaseModel]
) -> tuple[dict[str, Any], list[Path_]]:
    """As apply_overrides, and also the paths the overrides set or created (for error messages)."""
    result = copy.deepcopy(dict(data))  # the caller's data stays as loaded
    paths: list[Path_] = []
    errors: list[str] = []
    for text in overrides:
        raw_path, sep, value_text = text.partition("=")
        raw_path = raw_path.strip()
        if not sep or not raw_path:
            errors.append(f"--set {text}: expected PATH=VALUE")
            continue
        try:
            paths += _apply_one(result, raw_path, value_text, model_cls)
        except _Bad as exc:
            errors.append(f"--set {raw_path}: {exc}")
    if errors:
        raise ConfigError(errors)
    return result, paths


def _apply_one(data: dict[str, Any], raw_path: str, value_text: str, model_cls: type[BaseModel]) -> list[Path_]:
    """Set one value; return its path and those of the blocks created on the way."""
    try:
        value = parse_yaml_value(value_text)
    except yaml.YAMLError as exc:
        raise _Bad(f"cannot parse value {value_text!r}: {yaml_problem(exc)}") from None
    parts = raw_path.split(".")
    if "" in parts:
        raise _Bad("empty key in path")

    node: Any = data
    slot: Optional[Slot] = (model_cls, None)
    path: list[Any] = []
    created: list[Path_] = []
    i = 0
    while True:
        key, used, slot = _step(node, slot, parts, i, tuple(path))
        path.append(key)
        i += used
        if i == len(parts):
            node[key] = value
            return [tuple(path), *created]
        if _get_or_none(node, key) is None:
            created.append(tuple(path))
        node = _child_mapping(node, key, slot, tuple(path))


def _step(
    node: Any, slot: Optional[Slot], parts: Sequence[str], i: int, where: Path_
) -> tuple[Any, int, Optional[Slot]]:
    """Resolve the key that parts[i:] starts with: (key in the data, parts used, schema under it)."""
    if slot is None:
        raise _Bad(f"{_dotted(where)} has no keys")
    tp, disc = _bare(slot)
    if _union_members(tp) is not None:
        tp = _member(tp, disc, node, where)
    origin = get_origin(tp)
    if (_is_model(tp) or origin in (dict, Mapping)) and not isinstance(node, Mapping):
        raise _Bad(f"{_dotted(where)} is {_describe(node)} in the workload, not a mapping; set it whole")
    if _is_model(tp):
        return _model_key(tp, node, parts[i])
    if origin in (dict, Mapping):
        key = _longest_key(node, parts, i)
        if key is None:
            keys = [str(k) for k in node]
            raise _Bad(f"no {_singular(where)} {parts[i]!r} {_did_you_mean(parts[i], keys)}")
        return key, len(str(key).split(".")), (get_args(tp)[1], None)
    if origin in (list, Sequence):
        size = len(node) if isinstance(node, list) else 0
        if not parts[i].isdigit() or int(parts[i]) >= size:
            raise _Bad(f"{_dotted(where)} has no item {parts[i]!r} (it has {size})")
        return int(parts[i]), 1, (get_args(tp)[0], None)
    raise _Bad(f"{_dotted(where)} is a single value and has no keys")


def _member(tp: Any, disc: Optional[str], node: Any, where: Path_) -> Any:
    """The union member the data's 'kind' selects; it must be present to go inside."""
    tags = _tag_map(tp, disc)
    if not tags:
        raise _Bad(f"{_dotted(where)} is a single value and has no keys")
    member = _pick_member((tp, disc), node)
    if member is None:
        name = disc or "kind"
        if node is None:
            what = "is not given"
        elif not isinstance(node, Mapping):
            what = f"is {_describe(node)} in the workload, not a mapping"
        elif node.get(name) is None:
            what = f"has no {name!r}"
        else:
            what = f"has unknown {name} {node[name]!r}"
        raise _Bad(
            f"{_dotted(where)} {what}; set it whole, e.g. --set {_dotted(where)}='{{{name}: ..., ...}}' "
            f"({name}: one of {', '.join(map(str, tags))})"
        )
    return member[0]


def _model_key(model: type[BaseModel], node: Mapping[Any, Any], typed: str) -> tuple[Any, int, Optional[Slot]]:
    found = _field_for_key(model, typed)
    if found is None:
        hint = _did_you_mean(typed, _candidate_keys(model), _known_keys(model))
        raise _Bad(f"unknown key {typed!r} {hint}")
    name, field = found
    # Write under the spelling already in the data, so the field is not given twice;
    # else under the alias, which pydantic always accepts.
    spellings = [s for s in (field.alias, name) if isinstance(s, str)]
    key = next((s for s in spellings if s in node), spellings[0])
    disc = field.discriminator if isinstance(field.discriminator, str) else None
    return key, 1, (field.annotation, disc)


def _child_mapping(node: Any, key: Any, slot: Optional[Slot], where: Path_) -> Any:
    """The value under `key` to descend into, creating an empty block where none is given."""
    child = _get_or_none(node, key)
    if child is None:
        if slot is not None:
            tp, disc = _bare(slot)
            if _union_members(tp) is not None and _tag_map(tp, disc):
                _member(tp, disc, None, where)  # raises: a new block needs its kind first
        child = node[key] = {}
    return child


def _get_or_none(node: Any, key: Any) -> Any:
    return node[key] if isinstance(node, list) else node.get(key)


def _singular(where: Path_) -> str:
    """'model' for an entry of `models`, 'class' for one of `classes`."""
    name = str(where[-1]) if where else "key"
    if name.endswith("sses"):
        return name[:-2]
    return name[:-1] if name.endswith("s") else "key"
