"""Request traces on disk: the Azure LLM inference CSVs, Mooncake JSONL, and any CSV with named columns.

A trace is read once (at validation, so a sweep ships the arrays to its workers
with the workload) into numpy arrays: arrival times in seconds since the first
row, prompt and output token counts, and for Mooncake the prompt's 512-token
prefix block ids. Readers use the csv and json modules and numpy only.

These readers live in `sim.config` rather than `sim.model` because the workload
schema loads traces while it validates, and config imports nothing else of `sim`;
`sim.model.traffic.traces` replays what they return.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .base import MAX_TOKENS

FORMATS = ("azure", "mooncake", "csv")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
TIME_UNITS = {"s": 1.0, "ms": 1000.0}  # divisors to seconds


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file and, where known, the row."""


@dataclass(frozen=True)
class Trace:
    """A trace as arrays, sorted by time; times in seconds since the first row.

    `block_offsets` / `block_ids` hold Mooncake's `hash_ids` in CSR form: row k's
    ids are `block_ids[block_offsets[k]:block_offsets[k + 1]]` (None when the
    trace has none). Equal ids are equal 512-token prompt prefix blocks.
    `request_ids` are the rows' own ids as strings (a csv trace's `id` column; None without).
    """

    times: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    block_offsets: Optional[np.ndarray] = None
    block_ids: Optional[np.ndarray] = None
    request_ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.times.size)

    def blocks(self, k: int) -> Optional[np.ndarray]:
        """Prefix block ids of row k (None when the trace has none)."""
        if self.block_offsets is None:
            return None
        return self.block_ids[self.block_offsets[k]:self.block_offsets[k + 1]]

    def replayed_times(self, until: float, rate_scale: float = 1.0) -> np.ndarray:
        """The arrival times a replay makes: the rows' times divided by rate_scale, those before `until`."""
        times = self.times if rate_scale == 1 else self.times / rate_scale
        return times[:int(np.searchsorted(times, until, side="left"))]

    def count_before(self, until: float, rate_scale: float = 1.0) -> int:
        """Rows arriving before `until` when replayed with times divided by rate_scale (as the replay cuts)."""
        return len(self.replayed_times(until, rate_scale))

    def window(self, start_s: float = 0.0, end_s: Optional[float] = None, speed: float = 1.0) -> "Trace":
        """Rows with start_s <= time < end_s, shifted so that start_s is 0, then compressed `speed` times."""
        keep = self.times >= start_s
        if end_s is not None:
            keep &= self.times < end_s
        rows = np.flatnonzero(keep)
        times = self.times[rows]
        if start_s != 0:
            times = times - start_s
        if speed != 1:
            times = times / speed
        offsets = ids = None
        if self.block_offsets is not None:
            offsets, ids = _take_blocks(self.block_offsets, self.block_ids, rows)
        request_ids = None if self.request_ids is None else _frozen(self.request_ids[rows])
        return Trace(_frozen(times), _frozen(self.prompt[rows]), _frozen(self.output[rows]), offsets, ids,
                     request_ids)


def read_trace(path: str | Path, fmt: str, columns: Optional[dict[str, str]] = None) -> Trace:
    """Read a trace file of format `fmt` (azure, mooncake or csv).

    For csv, `columns` maps time, prompt_tokens and output_tokens to column names
    and may give time_unit (s or ms) and id (a column of request ids, kept as text).
    Token counts are rounded and at least 1 (as drawn ones are). Raises TraceError
    with a one-line message.
    """
    path = Path(path).expanduser()
    problem = file_problem(path)
    if problem == NOT_FOUND:
        raise TraceError(f"trace file not found: {path.resolve()}")
    if problem is not None:
        raise TraceError(f"trace file {path.absolute()}: {problem}")
    stat = path.stat()
    key = tuple(sorted((columns or {}).items()))
    return _read_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, fmt, key)


@lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int, fmt: str, columns: tuple[tuple[str, str], ...]) -> Trace:
    # Keyed by modification time and size, so an edited file is read again; sweeps
    # validate every point and would otherwise parse the same file each time.
    if fmt == "azure":
        return _read_azure(Path(path))
    if fmt == "mooncake":
        return _read_mooncake(Path(path))
    if fmt == "csv":
        return _read_csv(Path(path), dict(columns))
    raise TraceError(f"unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")


def _read_azure(path: Path) -> Trace:
    header, rows = _csv_rows(path)
    idx = _column_indexes(path, header, AZURE_COLUMNS)
    stamps = [r[idx[0]] for r in rows]
    try:
        ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    except ValueError:
        bad = _first_bad(stamps, lambda s: np.datetime64(s, "ns"))
        raise TraceError(f"{path}: row {bad + 2}: TIMESTAMP {excerpt(stamps[bad])} is not a date and time") from None
    # Integer nanoseconds first, so the difference is exact before it becomes seconds.
    seconds = (ns - ns.min()) / 1e9
    return _build(path, seconds, _numbers(path, rows, idx[1], header), _numbers(path, rows, idx[2], header))


def _read_csv(path: Path, columns: dict[str, str]) -> Trace:
    names = (columns.get("time", "time"), columns.get("prompt_tokens", "prompt_tokens"),
             columns.get("output_tokens", "output_tokens"))
    unit = columns.get("time_unit", "s")
    if unit not in TIME_UNITS:
        raise TraceError(f"unknown time_unit {unit!r} (known: {', '.join(TIME_UNITS)})")
    id_column = columns.get("id")
    header, rows = _csv_rows(path)
    idx = _column_indexes(path, header, names + ((id_column,) if id_column else ()))
    times = _numbers(path, rows, idx[0], header)
    # Shift first, then convert: epoch milliseconds are exact integers, their differences too,
    # and dividing (not multiplying by 1e-3) rounds 400 ms to the double nearest 0.4 s.
    times = _since_first(times, TIME_UNITS[unit])
    ids = None
    if id_column:
        ids = np.array([r[idx[3]].strip() if idx[3] < len(r) else "" for r in rows], dtype=object)
    return _build(path, times, _numbers(path, rows, idx[1], header),
                  _numbers(path, rows, idx[2], header), request_ids=ids)


def _read_mooncake(path: Path) -> Trace:
    times: list[float] = []
    prompt: list[float] = []
    output: list[float] = []
    blocks: list[list[int]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                times.append(float(row[MOONCAKE_KEYS[0]]))
                prompt.append(float(row[MOONCAKE_KEYS[1]]))
                output.append(float(row[MOONCAKE_KEYS[2]]))
                blocks.append([int(b) for b in row.get("hash_ids", ())])
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{line_no}: not JSON: {exc.msg}") from None
            except KeyError as exc:
                raise TraceError(f"{path}:{line_no}: no key {exc.args[0]!r} (a Mooncake row has "
                                 f"{', '.join(MOONCAKE_KEYS)} and hash_ids)") from None
            except (TypeError, ValueError, AttributeError):
                raise TraceError(f"{path}:{line_no}: expected an object with numbers for "
                                 f"{', '.join(MOONCAKE_KEYS)} and a list of ids for hash_ids") from None
    t = np.asarray(times, dtype=float)
    t = _since_first(t, 1000.0)  # Mooncake timestamps are milliseconds
    offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    ids = np.fromiter((b for row in blocks for b in row), dtype=np.int64, count=int(offsets[-1]))
    return _build(path, t, np.asarray(prompt, dtype=float), np.asarray(output, dtype=float),
                  offsets if offsets[-1] > 0 else None, ids if offsets[-1] > 0 else None)


def _build(path: Path, times: np.ndarray, prompt: np.ndarray, output: np.ndarray,
           offsets: Optional[np.ndarray] = None, ids: Optional[np.ndarray] = None,
           request_ids: Optional[np.ndarray] = None) -> Trace:
    """Check values, sort by time (stable, so equal times keep file order), round tokens."""
    if times.size == 0:
        raise TraceError(f"{path}: the trace has no rows")
    for label, values in (("time", times), ("prompt tokens", prompt), ("output tokens", output)):
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            raise TraceError(f"{path}: row {bad[0] + 1}: {label} must be a finite number >= 0, got {values[bad[0]]}")
        if label != "time" and np.any(values > MAX_TOKENS):  # beyond any model's context, and int64's range
            bad = np.flatnonzero(values > MAX_TOKENS)
            raise TraceError(f"{path}: row {bad[0] + 1}: {label} must be at most {MAX_TOKENS:,}, "
                             f"got {values[bad[0]]:g}")
    order = np.argsort(times, kind="stable")
    sorted_already = bool(np.all(order == np.arange(order.size)))
    tokens = [np.maximum(np.rint(v), 1).astype(np.int64) for v in (prompt, output)]
    if not sorted_already:
        times, tokens = times[order], [v[order] for v in tokens]
        if offsets is not None:
            offsets, ids = _take_blocks(offsets, ids, order)
        if request_ids is not None:
            request_ids = request_ids[order]
    return Trace(_frozen(times), _frozen(tokens[0]), _frozen(tokens[1]),
                 None if offsets is None else _frozen(offsets), None if ids is None else _frozen(ids),
                 None if request_ids is None else _frozen(request_ids))


def _since_first(times: np.ndarray, divisor: float) -> np.ndarray:
    """Times since the earliest row, divided into seconds.

    A row with no finite time, or times too far apart for a float, comes out
    non-finite, and _build names its row; numpy is kept from warning about it on the way.
    """
    finite = times[np.isfinite(times)]
    if not finite.size:
        return times
    with np.errstate(over="ignore", invalid="ignore"):
        return (times - finite.min()) / divisor


def _take_blocks(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR block lists of the given rows, in that order."""
    lengths = offsets[rows + 1] - offsets[rows]
    new = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    if rows.size == 0:
        return _frozen(new), _frozen(ids[:0])
    # Index of every kept id: each row's start, plus 0..length-1.
    starts = np.repeat(offsets[rows] - new[:-1], lengths)
    return _frozen(new), _frozen(ids[starts + np.arange(int(new[-1]))])


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only: trace arrays are cached and shared by every workload that reads the file."""
    a.flags.writeable = False
    return a


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    if header is None:
        raise TraceError(f"{path}: the file is empty")
    return [h.strip() for h in header], rows


def _column_indexes(path: Path, header: list[str], names: Sequence[str]) -> list[int]:
    missing = [n for n in names if n not in header]
    if missing:
        raise TraceError(f"{path}: no column {missing[0]!r} ({describe_header(header)})")
    return [header.index(n) for n in names]


def _numbers(path: Path, rows: list[list[str]], index: int, header: list[str]) -> np.ndarray:
    cells = [r[index] if index < len(r) else "" for r in rows]
    try:
        return np.array(cells, dtype=float)
    except ValueError:
        bad = _first_bad(cells, float)
        raise TraceError(f"{path}: row {bad + 2}: column {header[index]!r}: "
                         f"{excerpt(cells[bad])} is not a number") from None


NOT_FOUND = "file not found"


def file_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be read as a data file (missing, a folder or device, a name the system refuses), or None.

    A device such as /dev/zero never ends, so only regular files are read.
    """
    try:
        if path.is_file():
            return None
        return "not a regular file (a folder or a device)" if path.exists() else NOT_FOUND
    except OSError as exc:  # e.g. a name longer than the file system allows
        return f"cannot read: {exc.strerror or exc}"


EXCERPT_CHARS = 20


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable, quoted excerpt of file content for an error message.

    Error lines name the row and column; they never echo more than `limit`
    characters of a file, and nothing unprintable (a binary file, terminal escapes).
    """
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(clean + ("..." if len(text) > limit else ""))


_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,39}")
MAX_LISTED_COLUMNS = 20


def describe_header(header: Sequence[str]) -> str:
    """The columns a file has, for an error message: listed when they look like column names, else not at all.

    A file of another kind (prose, a binary, a secret) has a first line that is not
    a header; it is not echoed.
    """
    if not header or not all(_COLUMN_NAME.fullmatch(h) for h in header):
        return "the first line is not a header of column names"
    more = len(header) - MAX_LISTED_COLUMNS
    return f"columns: {', '.join(header[:MAX_LISTED_COLUMNS])}" + (f" and {more} more" if more > 0 else "")


def _first_bad(cells: Iterable[str], parse) -> int:
    """Index of the first cell `parse` refuses (only called once parsing the whole column failed)."""
    for k, cell in enumerate(cells):
        try:
            parse(cell)
        except ValueError:
            return k
    return 0
