"""Fuzzing the front door: broken versions of every shipped workload and experiment.

A Hypothesis-driven mutator deletes, renames and retypes keys, puts in extreme
numbers, booleans, unicode and control characters, aliases and deep nesting, and
the CLI must answer each with exit 0 or 2, one or a few lines and no traceback, in
bounded time. Most cases validate; some also run (with a small request limit, so
that a mutation to a huge rate is refused by the work estimate rather than run).
Derandomized, so CI sees the same cases every time.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import main

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = sorted(p for p in (ROOT / "workloads").glob("*.yaml") if "replay" not in p.name)
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if not p.name.startswith("plan-"))
PLANS = sorted((ROOT / "experiments").glob("plan-*.yaml"))
CASE_SECONDS = 20.0

EXTREMES = [0, -1, -0.0, 1e-300, 1e308, -1e308, 2 ** 70, 10 ** 30, 0.5, 3, "nan", "inf", ".inf", "-.inf",
            True, False, None, "", "yes", "x" * 300, "ünïcødé ✓", "\u0000\u0007", "$\\alpha$ <script>", [], {},
            [1, [2, [3]]], {"kind": "poisson"}, {"kind": "nope"}]


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested mapping/list."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            out.append(prefix + (k,))
            out += paths(value, prefix + (k,))
    return out


def parent_of(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated(draw, files: list[Path]) -> tuple[Path, str]:
    """A shipped file and a broken version of its text."""
    path = draw(st.sampled_from(files))
    data = yaml.safe_load(path.read_text())
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        keys = paths(data)
        where = draw(st.sampled_from(keys))
        parent, last = parent_of(data, where), where[-1]
        action = draw(st.sampled_from(["delete", "rename", "retype", "extreme", "nest", "scale", "scale", "scale"]))
        if action == "scale" and isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
            parent[last] = parent[last] * draw(st.sampled_from([0, -1, 1e-6, 0.5, 3, 1e3, 1e6]))
        elif action == "scale":  # not a number here: leave it, so that a case often stays valid and runs
            pass
        elif action == "delete":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[f"{last}{draw(st.sampled_from(['_', 'x', 's', ' ']))}"] = parent.pop(last)
        elif action == "nest":
            value = parent[last]
            for _ in range(draw(st.integers(1, 40))):
                value = [value]
            parent[last] = value
        else:
            parent[last] = draw(st.sampled_from(EXTREMES))
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    tail = draw(st.sampled_from(["", "", "", "\nbomb: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb2: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                 "b3: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "\n" + "[" * 300 + "]" * 300 + "\n",
                                 "\nx: \u0001\n", "\n\tbad: indent\n"]))
    return path, text + tail


def cli(args: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    return code, err.getvalue()


def check(code: int, err: str, elapsed: float) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert elapsed < CASE_SECONDS
    if code == 2:
        assert 1 <= len(err.strip().splitlines()) <= 21  # one line per problem, capped


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated(WORKLOADS), also_run=st.booleans())
def test_broken_workloads_get_exit_0_or_2_and_no_traceback(case, also_run, tmp_path):
    source, text = case
    path = tmp_path / source.name
    path.write_text(text, encoding="utf-8")
    start = time.monotonic()
    code, err = cli(["validate", str(path)])
    check(code, err, time.monotonic() - start)
    if code == 0 and also_run:
        start = time.monotonic()
        code, err = cli(["run", str(path), "--replications", "1", "--json", "--set", "simulation.max_requests=20000"])
        check(code, err, time.monotonic() - start)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated(EXPERIMENTS))
def test_broken_experiments_are_refused_before_any_point_runs(case, tmp_path):
    """`sweep --dry-run` checks every point's values and the work estimate, as a sweep does first."""
    source, text = case
    path = tmp_path / source.name
    # Relative paths in experiments point at ../workloads: keep them working from the temporary folder.
    path.write_text(text.replace("../workloads/", f"{ROOT / 'workloads'}/"), encoding="utf-8")
    start = time.monotonic()
    code, err = cli(["sweep", str(path), "--dry-run"])
    check(code, err, time.monotonic() - start)


def test_the_mutator_breaks_files_in_the_ways_it_says():
    data = {"a": {"b": 1, "c": [1, 2]}}
    assert paths(data) == [("a",), ("a", "b"), ("a", "c"), ("a", "c", 0), ("a", "c", 1)]
    assert parent_of(data, ("a", "c", 1)) == [1, 2]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated(PLANS))
def test_broken_plans_are_refused_before_any_candidate_runs(case, tmp_path):
    """`plan --dry-run` checks the plan, its candidates and the work estimate, as a plan does first."""
    source, text = case
    path = tmp_path / source.name
    path.write_text(text.replace("../workloads/", f"{ROOT / 'workloads'}/"), encoding="utf-8")
    start = time.monotonic()
    code, err = cli(["plan", str(path), "--dry-run"])
    check(code, err, time.monotonic() - start)
