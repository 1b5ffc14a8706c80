"""The recorder's memory-saving storage reads back exactly what was written: flat logs that spill into arrays
between events, and prompt-cache tokens kept as two columns."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sim.config.loader import load_workload
from sim.metrics.recorder import FLAT_LOGS, CachedTokens, FlatLog, Recorder
from sim.metrics.summary import summarise
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent


def test_a_flat_log_reads_back_every_value_across_its_spills(monkeypatch):
    monkeypatch.setattr(FlatLog, "SPILL", 6)
    log, written = FlatLog(), []
    for k in range(50):
        row = (k, k * 0.5, -1)
        log += row
        written += row
        if k % 3 == 0:
            log.spill()
    assert log.spilled and len(log) < 6  # most of it moved out of the list
    assert Recorder.rows(log, 3).tolist() == np.asarray(written, dtype=float).reshape(-1, 3).tolist()
    assert Recorder.rows(log, 3, np.int64)[:, 0].tolist() == list(range(50))


def test_spilling_the_logs_changes_no_result(monkeypatch):
    workload = load_workload(ROOT / "workloads" / "rag-support.yaml", ["simulation.duration_s=300"])
    kept = simulate(workload)
    monkeypatch.setattr(FlatLog, "SPILL", 64)  # a spill at nearly every monitor sample
    spilled = simulate(workload)
    logs = [name for name in FLAT_LOGS if getattr(kept, name) is not None]
    assert {"budget", "stage_log", "quality_inputs", "cache_code"} <= set(logs)
    assert any(getattr(spilled, name).spilled for name in logs)
    for name in logs:
        assert np.array_equal(getattr(kept, name).values(), getattr(spilled, name).values(), equal_nan=True), name
    a, b = summarise(kept, workload, 30.0), summarise(spilled, workload, 30.0)
    assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_cached_tokens_are_zero_where_nothing_was_looked_up():
    tokens = CachedTokens()
    tokens[3] = (100, 20)
    tokens[5] = (0, 7)
    assert [tokens[c] for c in range(7)] == [(0, 0)] * 3 + [(100, 20), (0, 0), (0, 7), (0, 0)]
    read, written = tokens.columns(8)
    assert read.tolist() == [0, 0, 0, 100, 0, 0, 0, 0] and written.tolist() == [0, 0, 0, 20, 0, 7, 0, 0]
