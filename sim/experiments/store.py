"""The sweep's result store: results.parquet, rewritten atomically as each point finishes.

Parquet files cannot be appended to, so the store keeps the table in memory and
replaces the file (write aside, then rename) after every point: a crash or a
Ctrl-C at any moment leaves the last complete version behind, never half a file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd

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
        old = pd.read_parquet(self.path)
        self.frame = old[old["status"] == "ok"].reset_index(drop=True)
        return set(self.frame["point_key"])

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
        tmp = self.path.with_suffix(".parquet.tmp")
        _parquet_safe(self.frame).to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


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
