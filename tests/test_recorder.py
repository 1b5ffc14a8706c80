"""The recorder's memory-saving storage reads back exactly what was written: flat logs (compiled: unboxed as
written; the Python twin: lists that spill into arrays between events), and prompt-cache tokens kept as two
columns."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config.loader import load_workload
from sim.metrics.recorder import (
    FLAT_LOGS,
    PYTHON_FLAT_LOG,
    CachedTokens,
    FlatLog,
    Recorder,
    _records,
)
from sim.metrics.summary import summarise
from sim.model.application import flow, lifecycle, retrieval
from sim.model.pipeline import simulate

ROOT = Path(__file__).resolve().parent.parent


def test_a_flat_log_reads_back_every_value_across_its_spills(monkeypatch):
    monkeypatch.setattr(PYTHON_FLAT_LOG, "SPILL", 6)
    log, written = PYTHON_FLAT_LOG(), []
    for k in range(50):
        row = (k, k * 0.5, -1)
        log += row
        written += row
        if k % 3 == 0:
            log.spill()
    assert log.spilled and len(log) < 6  # most of it moved out of the list
    assert Recorder.rows(log, 3).tolist() == np.asarray(written, dtype=float).reshape(-1, 3).tolist()
    assert Recorder.rows(log, 3, np.int64)[:, 0].tolist() == list(range(50))


ROWS = st.lists(st.tuples(st.integers(-2**53, 2**53), st.booleans(),
                          st.floats(allow_nan=True, allow_infinity=True, width=64)), max_size=300)


@pytest.mark.skipif(_records is None, reason="sim/_records.c not built (or LLMSIM_PURE_PYTHON set)")
@settings(max_examples=60, deadline=None)
@given(rows=ROWS, spill=st.integers(1, 64))
def test_the_compiled_flat_log_reads_back_what_the_python_one_does(rows, spill):
    """The compiled log stores each value as a double as it is written: what the list-based twin reads back
    after its spills (ints exact to 2**53, bools as 0 and 1, NaN and infinities), as floats and as rows."""
    compiled, python = FlatLog(), PYTHON_FLAT_LOG()
    for k, row in enumerate(rows):
        if k % 2:
            compiled += row
            python += row
        else:
            for value in row:
                compiled.append(value)
                python.append(value)
        if k % spill == 0:
            compiled.spill()
            python.spill()
    assert len(compiled) == 3 * len(rows)
    assert np.array_equal(compiled.values(), python.values(), equal_nan=True)
    assert np.array_equal(Recorder.rows(compiled, 3), Recorder.rows(python, 3), equal_nan=True)
    restored = pickle.loads(pickle.dumps(compiled))  # a result crossing to another process
    assert type(restored) is FlatLog and np.array_equal(restored.values(), compiled.values(), equal_nan=True)


@pytest.mark.skipif(_records is None, reason="sim/_records.c not built (or LLMSIM_PURE_PYTHON set)")
def test_the_compiled_flat_log_refuses_what_is_not_a_number_and_spans_its_blocks():
    log = FlatLog()
    log += (1, 2)
    with pytest.raises(TypeError):
        log += (3, "four")
    assert log.values().tolist() == [1.0, 2.0]  # a row is written whole or not at all
    rows = np.arange(3 * 40_000, dtype=float).reshape(-1, 3)  # 120,000 values: four blocks of 32k
    for row in rows.tolist():
        log += row
    assert len(log) == 2 + rows.size and np.array_equal(log.values()[2:], rows.ravel())


def test_spilling_the_logs_changes_no_result(monkeypatch):
    """The list-based logs (the compiled ones never spill) read back the same whether they spill or not."""
    for module in (lifecycle, retrieval, flow):
        monkeypatch.setattr(module, "FlatLog", PYTHON_FLAT_LOG)
    workload = load_workload(ROOT / "workloads" / "rag-support.yaml", ["simulation.duration_s=300"])
    kept = simulate(workload)
    monkeypatch.setattr(PYTHON_FLAT_LOG, "SPILL", 64)  # a spill at nearly every monitor sample
    spilled = simulate(workload)
    logs = [name for name in FLAT_LOGS if getattr(kept, name) is not None]
    assert {"budget", "stage_log", "quality_inputs", "cache_code"} <= set(logs)
    assert any(getattr(spilled, name).spilled for name in logs)
    for name in logs:
        assert np.array_equal(getattr(kept, name).values(), getattr(spilled, name).values(), equal_nan=True), name
    a, b = summarise(kept, workload, 30.0), summarise(spilled, workload, 30.0)
    assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    monkeypatch.undo()
    compiled = simulate(workload)  # with the compiled logs, where built: the same values again
    for name in logs:
        assert np.array_equal(getattr(kept, name).values(), getattr(compiled, name).values(), equal_nan=True), name


def test_cached_tokens_are_zero_where_nothing_was_looked_up():
    tokens = CachedTokens()
    tokens[3] = (100, 20)
    tokens[5] = (0, 7)
    assert [tokens[c] for c in range(7)] == [(0, 0)] * 3 + [(100, 20), (0, 0), (0, 7), (0, 0)]
    read, written = tokens.columns(8)
    assert read.tolist() == [0, 0, 0, 100, 0, 0, 0, 0] and written.tolist() == [0, 0, 0, 20, 0, 7, 0, 0]
