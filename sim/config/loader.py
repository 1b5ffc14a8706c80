"""YAML loading with file:line errors, and validation into the pydantic schema.

Every problem in a config file becomes one line `FILE:LINE: field.path: message`
(or `--set field.path: message` when the value came from the command line), so
the user can jump straight to it. `ConfigError` carries all of them at once:
fixing one typo per run is tedious.
"""
from __future__ import annotations

import difflib
import re
import types
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Workload

Path_ = tuple[Any, ...]
"""A location in the data: mapping keys and list indexes, e.g. ('models', 'm', 'replicas')."""

M = TypeVar("M", bound=BaseModel)

# Limits on what a config file may make the loader do. Without them a 1 KB file of nested
# aliases (an "alias bomb") expands to 10^8 values, and /dev/zero as a workload never ends.
MAX_FILE_BYTES = 10 * 1024 * 1024
"""Largest config file read: a hand-written workload is a few KB; long data belongs in a CSV or trace file."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists, aliases expanded. Workloads nest about 8 levels; this keeps
every recursive step (YAML composer, validation, copies) far below Python's recursion limit."""
MAX_NODES = 100_000
"""Most values (keys, scalars, lists and mappings) in a file with its aliases expanded. A workload has a
few hundred; a day's schedule by the minute has 7,200. An 8-level alias bomb has 10^8 and is refused
before anything is expanded; parsing and validating 100,000 takes a few seconds."""


class ConfigError(Exception):
    """Bad configuration: one human-readable line per problem, no traceback needed."""

    MAX_SHOWN = 20
    """Problems printed at most; the rest are counted."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines: list[str] = list(lines)
        # The list itself is the only argument, so the error survives pickling
        # (sweep points run in other processes).
        super().__init__(self.lines)

    def __str__(self) -> str:
        """The lines, at most MAX_SHOWN of them: a file of garbage must not flood the terminal."""
        if len(self.lines) <= self.MAX_SHOWN:
            return "\n".join(self.lines)
        more = len(self.lines) - self.MAX_SHOWN
        return "\n".join(self.lines[: self.MAX_SHOWN] + [f"... and {more} more problem{'s' * (more > 1)}"])


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a number.

    PyYAML follows YAML 1.1, where a float needs a dot, so `rate_rps: 1e-3`
    would be the string '1e-3'. Pydantic would coerce that for a float field,
    but not where a distribution is expected (a plain number there means a
    constant). YAML 1.2 and every human read it as a number.

    It also refuses nesting deeper than MAX_DEPTH and more than MAX_NODES nodes
    while composing, before the composer's recursion or memory can run away.
    """

    _depth = 0
    _composed = 0

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> yaml.Node:
        self._depth += 1
        self._composed += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooBig(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            if self._composed > MAX_NODES:
                raise _TooBig(_TOO_MANY, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooBig(yaml.MarkedYAMLError):
    """A file beyond MAX_DEPTH or MAX_NODES; a MarkedYAMLError, so every YAML caller reports it."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


_TOO_MANY = (f"more than {MAX_NODES:,} values, aliases counted as expanded (put long data in a CSV file "
             "or a trace)")


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml_value(text: str) -> Any:
    """Parse one YAML value (as given to --set) with the same rules and limits as the files."""
    loader = _Loader(text)
    try:
        node = _checked_node(loader)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_with_lines(path: str | Path) -> tuple[dict[Any, Any], Lines]:
    """Read a YAML mapping and the 1-based line of every key and list item in it.

    Returns `(data, lines)` where `lines[('models', 'm', 'replicas')]` is the line
    of that key and `lines[()]` the line where the top-level mapping starts.
    Raises ConfigError for a missing, unreadable or oversized file, text that is
    not UTF-8 or holds control characters, a YAML syntax error, a file beyond
    MAX_DEPTH or MAX_NODES, a top level that is not a mapping, or a key given
    twice in one mapping.
    """
    source = str(path)
    text = _read_text(path, source)
    loader: Optional[_Loader] = None
    try:
        loader = _Loader(text)  # checks for control characters, so inside the try
        node = _checked_node(loader)
        if node is None:
            raise ConfigError([f"{source}:1: the file is empty; expected a mapping of keys to values"])
        duplicates: list[tuple[int, str]] = []
        _find_duplicates(loader, node, (), duplicates, source, set())
        if duplicates:
            raise ConfigError([msg for _, msg in sorted(duplicates)])
        lines = Lines(node, _index_lines(loader, node, {}))
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError([f"{source}:{line}: {yaml_problem(exc)}"]) from None
    except _TooBig as exc:
        raise ConfigError([f"{source}:{exc.problem_mark.line + 1}: {exc.problem}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: YAML syntax error: {yaml_problem(exc)}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML syntax error: {yaml_problem(exc)}"]) from None
    finally:
        if loader is not None:
            loader.dispose()

    if not isinstance(data, dict):
        what = _describe(data)
        raise ConfigError([f"{source}:{lines[()]}: the top level must be a mapping of keys to values, got {what}"])
    return data, lines


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, in one line and without the position (callers say where)."""
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        return (f"control character U+{exc.character:04X} is not allowed "
                "(YAML takes printable text, tabs and line breaks)")
    if isinstance(exc, yaml.MarkedYAMLError):
        return exc.problem or exc.context or "invalid YAML"
    return str(exc).splitlines()[0] if str(exc) else "invalid YAML"


def _read_text(path: str | Path, source: str) -> str:
    """The file's text; at most MAX_FILE_BYTES are read, so a device or a runaway file cannot hang us."""
    try:
        with open(path, "rb") as fh:
            # In pieces: read(n) would set aside n bytes up front, for every file.
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_FILE_BYTES and (chunk := fh.read(1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
        raw = b"".join(chunks)
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_FILE_BYTES // 2**20} MiB, the most a config file may be "
                           "(put long data in a CSV file or a trace)"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{source}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                           "save the file as UTF-8"]) from None


def _checked_node(loader: _Loader) -> Optional[yaml.Node]:
    """The document's node, refused (_TooBig) if its aliases expand beyond MAX_DEPTH or MAX_NODES."""
    node = loader.get_single_node()
    if node is not None:
        _measure(node, 1, {})
    return node


def _measure(node: yaml.Node, depth: int, seen: dict[int, Optional[tuple[int, int]]]) -> tuple[int, int]:
    """(nodes, levels) of `node` with aliases and merge keys expanded, each node measured once.

    An alias is the very node its anchor composed, so `seen` (by identity) makes a repeated
    alias cost one lookup: an alias bomb is measured in time linear in the file, never expanded.
    Limits are checked on the node that uses an alias, so the error names the line it is used on.
    """
    if id(node) in seen:
        known = seen[id(node)]
        if known is None:  # still being measured: the alias sits inside its own anchor
            raise _TooBig("an alias refers to a block that contains it (endless nesting)", node.start_mark)
        return known
    seen[id(node)] = None
    count, height = 1, 0
    for child, is_merge in _children(node):
        c, h = _measure(child, depth + 1, seen)
        # Merged pairs join this mapping: the merged mapping itself is not a value of the data.
        count, height = count + c - is_merge, max(height, h - is_merge)
        if count > MAX_NODES:
            raise _TooBig(_TOO_MANY, node.start_mark)
        if depth + height > MAX_DEPTH:
            raise _TooBig(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", node.start_mark)
    seen[id(node)] = (count, height + 1)
    return count, height + 1


def _children(node: yaml.Node) -> Iterator[tuple[yaml.Node, bool]]:
    """(child, is_merged_mapping) of a node, as composed (merge keys not yet expanded)."""
    if isinstance(node, yaml.SequenceNode):
        yield from ((item, False) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                yield key_node, False
                yield value_node, False
            elif isinstance(value_node, yaml.SequenceNode):
                yield from ((item, True) for item in value_node.value)
            else:
                yield value_node, True


Entries = dict[Any, tuple[int, yaml.Node]]
"""Key or list index -> (1-based line, value node), for one mapping or list node."""


class Lines(Mapping[Path_, int]):
    """1-based line of every mapping key and list item, by path; () is where the top level starts.

    Looked up through the composed nodes, each indexed once: a path through an alias reads
    the lines where its anchor wrote them, however often the alias is used.
    """

    def __init__(self, root: yaml.Node, entries: dict[int, Entries]) -> None:
        self._root = root
        self._entries = entries

    def __getitem__(self, path: Path_) -> int:
        line, node = self._root.start_mark.line + 1, self._root
        for key in path:
            try:
                line, node = self._entries[id(node)][key]
            except (KeyError, TypeError):  # no such key, a scalar, or an unhashable key
                raise KeyError(path) from None
        return line

    def __iter__(self) -> Iterator[Path_]:
        return self._paths(self._root, ())

    def _paths(self, node: yaml.Node, path: Path_) -> Iterator[Path_]:
        yield path
        for key, (_, child) in self._entries.get(id(node), {}).items():
            yield from self._paths(child, path + (key,))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _index_lines(loader: _Loader, node: yaml.Node, entries: dict[int, Entries]) -> dict[int, Entries]:
    """Index every mapping and list node once: its keys (or indexes) with their lines and value nodes."""
    if id(node) in entries or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return entries
    own: Entries = {}
    entries[id(node)] = own
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            own[index] = (item.start_mark.line + 1, item)
            _index_lines(loader, item, entries)
        return entries
    # Expand `<<: *anchor` the way the constructor will (merged pairs first, own pairs
    # last), then keep the last occurrence of each key, as a dict does.
    loader.flatten_mapping(node)
    for key_node, value_node in reversed(node.value):
        key = _key_value(loader, key_node)
        if key is not _UNHASHABLE and key not in own:
            own[key] = (key_node.start_mark.line + 1, value_node)
        _index_lines(loader, value_node, entries)
    return entries


_UNHASHABLE = object()


def _key_value(loader: _Loader, key_node: yaml.Node) -> Any:
    """The constructed value of a mapping key (so 1 and '1' differ as they do in the data)."""
    if not isinstance(key_node, yaml.ScalarNode):
        return _UNHASHABLE  # the constructor rejects it with a proper message
    return loader.construct_object(key_node)


def _find_duplicates(
    loader: _Loader, node: yaml.Node, path: Path_, out: list[tuple[int, str]], source: str, seen: set[int]
) -> None:
    """Report keys given twice in one mapping, anywhere (before merge keys are expanded)."""
    if id(node) in seen:  # an alias: that node was checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicates(loader, item, path + (index,), out, source, seen)
    elif isinstance(node, yaml.MappingNode):
        _check_duplicates(loader, node, path, out, source)
        for key_node, value_node in node.value:
            key = key_node.value if key_node.tag == _MERGE_TAG else _key_value(loader, key_node)
            _find_duplicates(loader, value_node, path + (key,), out, source, seen)


def _check_duplicates(
    loader: _Loader, node: yaml.MappingNode, path: Path_, out: list[tuple[int, str]], source: str
) -> None:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = _key_value(loader, key_node)
        if key is _UNHASHABLE:
            continue
        line = key_node.start_mark.line + 1
        if key in first_line:
            where = f"{source}:{line}: {_dotted(path + (key,))}"
            out.append((line, f"{where}: duplicate key (first given on line {first_line[key]})"))
        else:
            first_line[key] = line


# ------------------------------------------------------------- schema walking
# Shared with overrides.py: both need to know what the schema expects at a path.

Slot = tuple[Any, Optional[str]]
"""A type annotation as the schema declares it, with its discriminator if any."""


def _bare(slot: Slot) -> Slot:
    """Strip Annotated and Optional, keeping the discriminator found on the way."""
    tp, disc = slot
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            for meta in tp.__metadata__:
                found = getattr(meta, "discriminator", None)
                if isinstance(found, str):
                    disc = found
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp, disc
            tp = members[0]
        else:
            return tp, disc


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_members(tp: Any) -> Optional[list[Any]]:
    """Members of a union (None excluded), or None when `tp` is not a union."""
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not type(None)]
    return None


def _tag_map(tp: Any, disc: Optional[str]) -> dict[Any, type[BaseModel]]:
    """Tag value -> member model of a union of models told apart by `disc`."""
    members = _union_members(tp) or []
    disc = disc or "kind"
    tags: dict[Any, type[BaseModel]] = {}
    for member in members:
        field = member.model_fields.get(disc) if _is_model(member) else None
        if field is not None and get_origin(field.annotation) is Literal:
            for value in get_args(field.annotation):
                tags[value] = member
    return tags


def _pick_member(slot: Slot, node: Any, label: Any = None) -> Optional[Slot]:
    """The union member that applies: by the tag in the data, else by pydantic's label."""
    tp, disc = _bare(slot)
    tags = _tag_map(tp, disc)
    if isinstance(node, Mapping):
        try:
            member = tags.get(node.get(disc or "kind"))
        except TypeError:  # an unhashable tag such as a list
            member = None
        if member is not None:
            return member, None
    if label is not None:
        for tag, member in tags.items():
            # Pydantic labels a member by its tag, or as 'function-after[..., ClassName]'.
            if label == tag or label == member.__name__ or str(label).endswith(f", {member.__name__}]"):
                return member, None
    return None


def _field_for_key(model: type[BaseModel], key: Any) -> Optional[tuple[str, Any]]:
    """(field name, FieldInfo) for a key the user may write: the name or its alias."""
    for name, field in model.model_fields.items():
        if key == name or key == field.alias or key == field.validation_alias:
            return name, field
    return None


def _known_keys(model: type[BaseModel]) -> list[str]:
    """The keys a user writes for a model: the alias where there is one."""
    return [field.alias or name for name, field in model.model_fields.items()]


def _candidate_keys(model: type[BaseModel]) -> list[str]:
    """Every spelling pydantic accepts (names and aliases), for did-you-mean."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys += [k for k in (field.alias, name) if isinstance(k, str) and k not in keys]
    return keys


def _child_slot(slot: Optional[Slot], key: Any, node: Any) -> Optional[Slot]:
    """What the schema expects under `key` of the value `node` described by `slot`."""
    if slot is None:
        return None
    tp, disc = _bare(slot)
    if _union_members(tp) is not None:
        member = _pick_member((tp, disc), node)
        if member is None:
            return None
        tp = member[0]
    if _is_model(tp):
        found = _field_for_key(tp, key)
        if found is None:
            return None
        field = found[1]
        return field.annotation, field.discriminator if isinstance(field.discriminator, str) else None
    origin = get_origin(tp)
    if origin in (dict, Mapping) and len(get_args(tp)) == 2:
        return get_args(tp)[1], None
    if origin in (list, Sequence, tuple) and get_args(tp):
        return get_args(tp)[0], None
    return None


def _did_you_mean(word: Any, candidates: Sequence[str], listed: Optional[Sequence[str]] = None) -> str:
    """'(did you mean 'x'?)' when a candidate is close, else '(known: a, b)' listing `listed`."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    if close:
        return f"(did you mean {close[0]!r}?)"
    shown = candidates if listed is None else listed
    return f"(known: {', '.join(map(str, shown)) or 'none'})"


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _describe(value: Any) -> str:
    """A short, YAML-flavoured description of a value for 'got ...'."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _resolve_dotted(text: str, data: Any, start: Path_ = ()) -> Path_:
    """Turn 'a.b.c' into a path, matching the keys that exist (a key may contain dots)."""
    parts = text.split(".")
    path = list(start)
    node = _get(data, start)
    i = 0
    while i < len(parts):
        if isinstance(node, Mapping):
            key = _longest_key(node, parts, i)
            if key is None:
                break
            path.append(key)
            node = node[key]
            i += len(str(key).split("."))
        elif isinstance(node, list) and parts[i].isdigit() and int(parts[i]) < len(node):
            path.append(int(parts[i]))
            node = node[int(parts[i])]
            i += 1
        else:
            break
    return tuple(path) + tuple(parts[i:])


def _longest_key(node: Mapping[Any, Any], parts: Sequence[str], i: int) -> Any:
    """The key of `node` spelled by the most of parts[i:], joined with dots."""
    by_text = {str(k): k for k in node}
    for j in range(len(parts), i, -1):
        key = by_text.get(".".join(parts[i:j]))
        if key is not None:
            return key
    return None


_MISSING = object()


def _get(data: Any, path: Path_) -> Any:
    node = data
    for key in path:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return _MISSING
    return node


# ----------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Issue:
    """One validation problem, placed at the path the user wrote."""

    path: Path_
    message: str
    expect: Optional[str] = None  # 'must be a number' part, so union branches can merge
    got: Optional[str] = None
    branch: bool = False  # came from one member of a plain union


@dataclass
class _Located:
    path: Path_
    slot: Optional[Slot]  # schema at `path`
    parent: Optional[type[BaseModel]]  # model holding the last key of `path`
    branch: bool
    key_error: bool


def validate_model(
    model_cls: type[M],
    data: Any,
    lines: Mapping[Path_, int],
    source: str,
    base_dir: str | Path,
    *,
    overridden: Collection[Path_] = (),
) -> M:
    """Validate `data` into `model_cls`, turning every pydantic error into a file:line message.

    `lines` comes from load_yaml_with_lines; `source` names the file in messages;
    `base_dir` is passed to validators as context (CSV paths are relative to it).
    Errors at or below a path in `overridden` came from --set and are reported as
    `--set PATH: message`. Raises ConfigError with one line per problem, in file order.
    """
    try:
        return model_cls.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        issues = _merge_branches([_issue(err, data, model_cls) for err in exc.errors()])
        raise ConfigError(_format(issues, lines, source, overridden)) from None


def _issue(err: Mapping[str, Any], data: Any, model_cls: type[BaseModel]) -> _Issue:
    where = _locate(err["loc"], data, model_cls)
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    path = where.path
    if kind == "missing":
        return _Issue(path, "required key is missing")
    if kind == "extra_forbidden":
        if where.parent is None:
            return _Issue(path, f"unknown key {path[-1]!r}")
        hint = _did_you_mean(path[-1], _candidate_keys(where.parent), _known_keys(where.parent))
        return _Issue(path, f"unknown key {path[-1]!r} {hint}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _tag_issue(kind, ctx, where, data)
    if kind in ("value_error", "assertion_error"):
        return _value_issue(str(ctx.get("error", err["msg"])), where, data)
    expect = _expectation(kind, ctx, err["msg"])
    if where.key_error:
        return _Issue(path, f"key {expect}, got {_describe(path[-1])}" if expect else f"key: {err['msg']}")
    if expect is None:
        return _Issue(path, _humanise(err["msg"]), branch=where.branch)
    if kind in _TYPE_ERRORS:
        got = _describe(value)
        return _Issue(path, f"{expect}, got {got}", expect, got, where.branch)
    return _Issue(path, expect, expect, None, where.branch)


def _locate(loc: Sequence[Any], data: Any, model_cls: type[BaseModel]) -> _Located:
    """Map pydantic's location onto the path the user wrote.

    Pydantic puts the name of the union member it tried into the location
    ('poisson', "literal['auto']", 'function-after[...]'); those are dropped. When
    the user's value is a scalar that a validator expanded (a number where a
    distribution goes), the location stops at that value.
    """
    path: list[Any] = []
    node: Any = data
    slot: Optional[Slot] = (model_cls, None)
    parent: Optional[type[BaseModel]] = None
    branch = False
    for i, el in enumerate(loc):
        if el == "[key]":
            return _Located(tuple(path), slot, parent, branch, True)
        bare = _bare(slot) if slot is not None else None
        if bare is not None and _union_members(bare[0]) is not None:
            by_tag = _pick_member(bare, node)
            # Chosen by the tag in the data: pydantic tried only that member, so its
            # errors stand alone. Otherwise each member reported its own failure.
            branch = branch or by_tag is None
            slot = by_tag or _pick_member(bare, node, el)
            continue
        last = i == len(loc) - 1
        if isinstance(node, Mapping) and (el in node or last):
            parent = _model_at(slot, node)
            slot = _child_slot(slot, el, node)
            path.append(el)
            node = node.get(el, _MISSING)
        elif isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            parent = None
            slot = _child_slot(slot, el, node)
            path.append(el)
            node = node[el]
        elif isinstance(node, Mapping) and slot is None:
            continue  # an unknown label inside a mapping: skip it, keep looking for keys
        else:
            break
    return _Located(tuple(path), slot, parent, branch, False)


def _model_at(slot: Optional[Slot], node: Any) -> Optional[type[BaseModel]]:
    if slot is None:
        return None
    tp, disc = _bare(slot)
    if _union_members(tp) is not None:
        member = _pick_member((tp, disc), node)
        tp = member[0] if member else None
    return tp if _is_model(tp) else None


def _tag_issue(kind: str, ctx: Mapping[str, Any], where: _Located, data: Any) -> _Issue:
    disc = str(ctx.get("discriminator", "kind")).strip("'\"")
    tags: list[str] = []
    if where.slot is not None:
        tp, slot_disc = _bare(where.slot)
        tags = [str(t) for t in _tag_map(tp, slot_disc or disc)]
    if not tags:
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
    if kind == "union_tag_not_found":
        one_of = f" (one of: {', '.join(tags)})" if tags else ""
        return _Issue(where.path, f"missing {disc!r}{one_of}")
    tag = ctx.get("tag", "")
    node = _get(data, where.path)
    path = where.path + (disc,) if isinstance(node, Mapping) and disc in node else where.path
    close = difflib.get_close_matches(str(tag), tags, n=1, cutoff=0.6)
    mean = f"did you mean {close[0]!r}?; " if close else ""
    return _Issue(path, f"unknown {disc} {tag!r} ({mean}known: {', '.join(tags)})")


def _value_issue(message: str, where: _Located, data: Any) -> _Issue:
    """A validator's message; 'a.b.c: text' (a path below the validated value) moves the error there."""
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    head, sep, rest = message.partition(": ")
    node = _get(data, where.path)
    if sep and head and not re.search(r"\s", head) and isinstance(node, Mapping):
        first = _longest_key(node, head.split("."), 0)
        model = _model_at(where.slot, node)
        # A field the data leaves out (a key required only in some cases) is named where it belongs too.
        if first is not None or (model is not None and _field_for_key(model, head) is not None):
            return _Issue(_resolve_dotted(head, data, where.path), rest)
    return _Issue(where.path, message)


_TYPE_ERRORS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "finite_number": "must be a finite number",
}


def _expectation(kind: str, ctx: Mapping[str, Any], msg: str) -> Optional[str]:
    """'must be ...' for the common pydantic error types; None for the rest."""
    if kind in _TYPE_ERRORS:
        return _TYPE_ERRORS[kind]
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        bound = "at least" if kind == "too_short" else "at most"
        return f"must have {bound} {n} {'entry' if n == 1 else 'entries'}"
    if msg.startswith("Input should be "):
        return _humanise(msg)
    return None


def _humanise(msg: str) -> str:
    if msg.startswith("Input should be "):
        return "must be " + msg[len("Input should be ") :]
    return msg


def _merge_branches(issues: list[_Issue]) -> list[_Issue]:
    """One line per path for a value no member of a plain union accepts ('a number or 'auto'')."""
    out: list[_Issue] = []
    groups: dict[Path_, list[_Issue]] = {}
    for issue in issues:
        if not issue.branch:
            out.append(issue)
            continue
        if issue.path not in groups:
            groups[issue.path] = []
            out.append(issue)  # placeholder keeps the original order
        groups[issue.path].append(issue)
    return [_merged(groups[i.path]) if i.branch else i for i in out]


def _merged(group: list[_Issue]) -> _Issue:
    if len(group) == 1:
        return group[0]
    if all(i.expect and i.expect.startswith("must be ") for i in group):
        alternatives = list(dict.fromkeys(i.expect[len("must be ") :] for i in group))  # type: ignore[index]
        got = f", got {group[0].got}" if group[0].got else ""
        return _Issue(group[0].path, f"must be {' or '.join(alternatives)}{got}")
    return _Issue(group[0].path, "; or ".join(dict.fromkeys(i.message for i in group)))


def _format(issues: list[_Issue], lines: Mapping[Path_, int], source: str, overridden: Collection[Path_]) -> list[str]:
    """Lines in file order (then --set ones), without repeats."""
    placed: list[tuple[int, int, str]] = []
    for order, issue in enumerate(issues):
        field = f"{_dotted(issue.path)}: " if issue.path else ""
        if any(issue.path[: len(o)] == tuple(o) for o in overridden):
            placed.append((1, order, f"--set {_dotted(issue.path)}: {issue.message}"))
        else:
            line = _line_of(issue.path, lines)
            placed.append((0, line, f"{source}:{line}: {field}{issue.message}"))
    placed.sort(key=lambda p: (p[0], p[1]))
    return list(dict.fromkeys(text for _, _, text in placed))


def _line_of(path: Path_, lines: Mapping[Path_, int]) -> int:
    """Line of the path, or of its nearest parent that is in the file."""
    for k in range(len(path), -1, -1):
        if path[:k] in lines:
            return lines[path[:k]]
    return 1


# ----------------------------------------------------------------- workloads


def load_workload(path: str | Path, overrides: Sequence[str] = ()) -> Workload:
    """Load a workload YAML file, apply `--set PATH=VALUE` overrides, validate.

    Raises ConfigError with one line per problem.
    """
    # Imported here: overrides.py builds on this module (ConfigError, schema walking).
    from .overrides import apply_overrides_tracked

    data, lines = load_yaml_with_lines(path)
    data, overridden = apply_overrides_tracked(data, overrides, Workload)
    return validate_model(Workload, data, lines, str(path), Path(path).parent, overridden=overridden)
