"""The sweep's result store: results.parquet, rewritten atomically as each point finishes.

Parquet files cannot be appended to, so the store keeps the table in memory and
replaces the file (write aside, then rename) after every point: a crash or a
Ctrl-C at any moment leaves the last complete version behind, never half a file.
Each rewrite goes through a temporary file of its own name, and a lock on the
folder keeps a second sweep out; a fingerprint of the experiment in
experiment.json keeps --resume from mixing two experiments' results.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from sim.config.loader import ConfigError

try:
    import fcntl
except ImportError:  # not on POSIX: the lock falls back to exclusive creation of its file
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".llmsim.lock"

FIRST_COLUMNS = ["point", "point_key", "variant"]
AFTER_AXES = ["replication", "seed", "status", "error", "runtime_s", "offered_load_rps"]


class ResultStore:
    """Rows of finished points (one per point and replication) in DIR/results.parquet."""

    def __init__(self, folder: Path, axes: list[str]) -> None:
        self.folder = folder
        self.path = folder / "results.parquet"
        self.columns = FIRST_COLUMNS + axes + AFTER_AXES
        self.frame = pd.DataFrame(columns=self.columns)

    def exists(self) -> bool:
        return self.path.is_file()

    def resume(self) -> set[str]:
        """Keep the finished points of an earlier run; return their keys. Failed points will run again."""
        if not self.exists():
            return set()
        try:
            old = pd.read_parquet(self.path)
            self.frame = old[old["status"] == "ok"].reset_index(drop=True)
            return set(self.frame["point_key"])
        except Exception as err:  # pyarrow raises several kinds for a damaged or foreign file
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError([f"{self.path}: cannot read the earlier results ({why}); move the file away to "
                               "start over, or choose another --out"]) from None

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Add a finished point's rows and save at once."""
        new = pd.DataFrame(rows)
        frames = [f for f in (self.frame, new) if len(f)]
        frame = pd.concat(frames, ignore_index=True) if frames else new
        ordered = self.columns + [c for c in frame.columns if c not in self.columns]
        self.frame = frame.reindex(columns=ordered).sort_values(["point", "replication"], kind="stable",
                                                                 ignore_index=True)
        self._save()

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        frame = _parquet_safe(self.frame)
        _replace(self.path, lambda tmp: frame.to_parquet(tmp, index=False))
        # The same table for tools that read no Parquet (spreadsheets, plain scripts); Parquet stays the reference.
        _replace(self.path.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file atomically: `write` fills a temporary file of a unique name, then it takes `path`'s place.

    The name is unique (pid and a random part, created exclusively), so writers never share a temporary
    file; one that fails leaves none behind. Not mkstemp: its files are private (0600), results are not.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or SIGTERM mid-write included
        tmp.unlink(missing_ok=True)
        raise


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet wants one type per column: a column mixing numbers and text becomes text."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            values = out[column].dropna()
            kinds = {type(v) for v in values}
            if kinds <= {int, float, bool} and kinds:
                out[column] = pd.to_numeric(out[column])
            elif len(kinds) > 1 or kinds - {str}:
                out[column] = out[column].map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    return out


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Write a table as Parquet atomically (mixed-type columns as JSON text)."""
    _replace(path, lambda tmp: _parquet_safe(frame).to_parquet(tmp, index=False))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(data), indent=2, default=str) + "\n"
    _replace(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.is_file() else None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def check_fingerprint(folder: Path, fingerprint: dict[str, Any], name: str = "experiment.json") -> Optional[str]:
    """Before --resume: the results in `folder` must be of the experiment `fingerprint` describes.

    A different experiment is a ConfigError naming the parts that differ (an axis, a variant, a
    block of the workload). Returns a note when the folder predates fingerprints and cannot be checked.
    `name`: the file in `folder` that holds the saved fingerprint (a plan's is plan.json).
    """
    path = folder / name
    try:
        saved = read_json(path)
    except (OSError, ValueError) as err:
        raise ConfigError([f"{path}: cannot read it ({err}), so cannot tell whether the results here are of "
                           "this experiment; choose another --out"]) from None
    if not isinstance(saved, dict):
        raise ConfigError([f"{path}: missing or not an experiment description, so cannot tell whether the "
                           "results here are of this experiment; choose another --out"])
    old = saved.get("fingerprint")
    if not isinstance(old, dict):
        return f"{path} has no fingerprint (an older llmsim wrote it): resuming without checking the experiment"
    if old.get("sha256") == fingerprint["sha256"]:
        return None
    raise ConfigError([f"{folder}: --resume: the results here are of a different experiment "
                       f"({difference(old.get('parts') or {}, fingerprint['parts'])}); "
                       "resume with the experiment that wrote them, or choose another --out"])


def difference(old: dict[str, str], new: dict[str, str], shown: int = 8) -> str:
    """'axes.models.x.replicas changed, variants.fp8 added' from two fingerprints' part hashes."""
    changes = [f"{k} changed" for k in new if k in old and old[k] != new[k]]
    changes += [f"{k} added" for k in new if k not in old]
    changes += [f"{k} removed" for k in old if k not in new]
    more = f", and {len(changes) - shown} more" if len(changes) > shown else ""
    return ", ".join(changes[:shown]) + more if changes else "the same parts, put together differently"


class FolderLock:
    """An exclusive lock on a sweep's output folder, held while the sweep writes there.

    The lock file, DIR/.llmsim.lock, holds its owner's pid, host and start time, for the
    message a second sweep gets. Where there is flock (POSIX), the kernel holds the lock and
    drops it when its owner dies, even by SIGKILL, so a lock file left behind is recognised as
    stale and taken over (with a note); a reused pid cannot fool it. A lock file of another host is
    never taken over (whether its sweep still runs cannot be told from here). Without flock the
    file is created exclusively and a leftover one must be removed by hand (the message says so).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None
        self.note: Optional[str] = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the sweep that holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError([f"--out {self.folder}: cannot create the folder: {err.strerror or err}"]) from None
        fd = self._lock_posix() if fcntl is not None else self._lock_exclusive()
        previous = _read_owner(fd)
        if previous.get("host", _me()["host"]) != _me()["host"]:
            os.close(fd)  # a lock of another host's sweep: whether it still runs cannot be told from here
            raise self._busy(previous, stale_hint=True)
        if previous:
            self.note = (f"took over the lock of {_owner(previous)} in {self.folder}: that sweep is no longer "
                         "running; its finished points are kept")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_me()).encode())
        self.fd = fd

    def release(self) -> None:
        """Drop the lock; the file goes first, so nobody locks a file that is about to vanish unseen."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def _lock_posix(self) -> int:
        while True:
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live sweep
                owner = _read_owner(fd)
                os.close(fd)
                raise self._busy(owner) from None
            # The last owner may have unlinked the file between our open and our flock: then we
            # hold a lock on a file nobody else sees, so start again with the path's current file.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _lock_exclusive(self) -> int:
        try:
            return self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            fd = self._open(os.O_RDONLY)
            owner = _read_owner(fd)
            os.close(fd)
            raise self._busy(owner, stale_hint=True) from None

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o644)
        except FileExistsError:  # O_EXCL: the caller's to handle
            raise
        except OSError as err:
            raise ConfigError([f"--out {self.folder}: cannot write there: {err.strerror or err}"]) from None

    def _busy(self, owner: dict[str, Any], stale_hint: bool = False) -> ConfigError:
        hint = f"; if it is not running any more, delete {self.path}" if stale_hint else ""
        return ConfigError([f"--out {self.folder}: another sweep is writing there ({_owner(owner)}); wait for it "
                            f"to finish or choose another --out{hint}"])


def _me() -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": now}


def _read_owner(fd: int) -> dict[str, Any]:
    """The owner a lock file names; {} when it is empty or unreadable (its owner is between open and write)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner(owner: dict[str, Any]) -> str:
    """'pid 4242 on host-a, since 2025-01-01T10:00:00+00:00'."""
    if "pid" not in owner:
        return "pid unknown"
    since = f", since {owner['started']}" if owner.get("started") else ""
    return f"pid {owner['pid']} on {owner.get('host', '?')}{since}"
