"""The event core: the compiled one (sim/_events.c) dispatches exactly as its Python twin does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.model import events
from sim.model.events import COMPILED_CORE, PYTHON_CORE

ROOT = Path(__file__).resolve().parents[1]
CORES = [pytest.param(PYTHON_CORE, id="python"), pytest.param(COMPILED_CORE, id="compiled")]
DELAYS = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 2.5, 3]  # repeated times (ties) and an int delay


def test_the_compiled_event_core_is_built_here():
    # CI installs the package from scratch on a machine with a C compiler: the core must be there, or every
    # run silently takes the (correct, slower) Python path.
    assert COMPILED_CORE is not None
    assert events.call_later is COMPILED_CORE.call_later and events.run_calls is COMPILED_CORE.run_calls


def _dispatch_log(core: events.Core, script: list[tuple[int, int, int]]) -> list[tuple[float, object]]:
    """Run a script of calls on `core`: each entry (delay index, kind, children) schedules a call (kind 0:
    call_later, 1: call_at, 2: a SimPy timeout, 3: an urgent SimPy event); a dispatched call schedules
    `children` more from the script. The log: (time, value) of every callback, in dispatch order."""
    env = simpy.Environment()
    log: list[tuple[float, object]] = []
    todo = iter(enumerate(script))

    def schedule_next(count: int) -> None:
        for _ in range(count):
            item = next(todo, None)
            if item is None:
                return
            k, (delay, kind, children) = item
            value = (k, children)
            d = DELAYS[delay]
            if kind == 0:
                core.call_later(env, d, fired, value)
            elif kind == 1:
                core.call_at(env, env.now + d, fired, value)
            elif kind == 2:
                env.timeout(d, value).callbacks.append(fired)
            else:
                event = env.event()
                event.callbacks.append(fired)
                event.succeed(value)

    def fired(event) -> None:
        log.append((env.now, event.value[0]))
        schedule_next(event.value[1])

    schedule_next(8)
    core.run_calls(env)
    return log


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(DELAYS) - 1), st.integers(0, 3), st.integers(0, 3)),
                min_size=1, max_size=120))
def test_both_cores_dispatch_in_the_same_order(script):
    """Ties at one instant go in scheduling order, SimPy's own events interleave as SimPy orders them."""
    python = _dispatch_log(PYTHON_CORE, script)
    assert python == _dispatch_log(COMPILED_CORE, script)
    assert [t for t, _ in python] == sorted(t for t, _ in python)


def _timeouts_log(core: events.Core, script: list[tuple[int, int, int]]) -> list[tuple[float, object]]:
    """Limits added by a script (entry k: at time DELAYS[a], a limit DELAYS[b] later; its owner ends early when
    c == 0, and when c == 3 firing it adds another limit): (time, owner) of every limit fired, in order."""
    env = simpy.Environment()
    ended, fired = set(), []

    def fire(k) -> None:
        fired.append((env.now, k))
        if k < len(script) and script[k][2] == 3:  # once: the limit added fires without adding another
            timeouts.add(DELAYS[script[k][1]], k + len(script))

    timeouts = core.Timeouts(env, lambda k: k not in ended, fire)
    for k, (start, delay, end) in enumerate(script):
        core.call_later(env, DELAYS[start], lambda event: timeouts.add(DELAYS[event.value[1]], event.value[0]),
                        (k, delay))
        if end == 0:
            core.call_later(env, DELAYS[start] + DELAYS[delay] / 2, lambda event: ended.add(event.value), k)
    core.run_calls(env)
    assert len(timeouts) == 0
    return fired


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(DELAYS) - 1), st.integers(0, len(DELAYS) - 1), st.integers(0, 3)),
                min_size=1, max_size=80))
def test_both_cores_fire_the_same_time_limits(script):
    """Limits added out of order, owners ending before their limit, a limit firing that adds another."""
    assert _timeouts_log(PYTHON_CORE, script) == _timeouts_log(COMPILED_CORE, script)


@pytest.mark.parametrize("core", CORES)
def test_a_call_is_what_simpy_reads_of_an_event(core):
    """SimPy's own loop (env.run, env.step) runs the core's calls as events too."""
    env = simpy.Environment()
    seen = []
    call = core.call_later(env, 1.5, lambda event: seen.append((env.now, event.value)), "x")
    assert call.value == "x" and call._ok and len(call.callbacks) == 1
    core.call_at(env, 0.5, lambda event: seen.append((env.now, event.value)))
    env.run(until=1.0)
    assert seen == [(0.5, None)]
    env.run()
    assert seen == [(0.5, None), (1.5, "x")]


@pytest.mark.parametrize("core", CORES)
def test_times_add_as_python_adds_them(core):
    """An int clock plus an int delay stays an int (what `env._now + delay` gives), a float one a float."""
    env = simpy.Environment()
    times = []
    core.call_later(env, 0, lambda event: times.append(env.now))
    core.call_later(env, 2, lambda event: times.append(env.now))
    core.call_later(env, 0.5, lambda event: times.append(env.now))
    core.run_calls(env)
    assert times == [0, 0.5, 2] and [type(t) for t in times] == [int, float, int]


@pytest.mark.parametrize("core", CORES)
def test_an_error_in_a_callback_stops_the_run_and_leaves_the_rest_scheduled(core):
    env = simpy.Environment()

    def fail(event) -> None:
        raise ZeroDivisionError("in a callback")

    core.call_later(env, 1.0, fail)
    core.call_later(env, 2.0, lambda event: None)
    with pytest.raises(ZeroDivisionError, match="in a callback"):
        core.run_calls(env)
    assert env.now == 1.0 and len(env._queue) == 1
    core.run_calls(env)
    assert env.now == 2.0 and not env._queue


@pytest.mark.parametrize("workload", ["rag-support", "agent-tools", "noisy-neighbor", "launch-spike"])
def test_pure_python_gives_the_same_results(workload, tmp_path):
    """LLMSIM_PURE_PYTHON=1 (every compiled part off: the event core, the fast path's kernels) gives the same
    summary to the bit, on a pipeline, flows, rate limits and an autoscaler."""
    out = {}
    for pure in ("0", "1"):
        env = dict(os.environ, LLMSIM_PURE_PYTHON=pure)
        done = subprocess.run([sys.executable, "-m", "sim.cli", "run", f"workloads/{workload}.yaml", "--replications",
                               "1", "--set", "simulation.duration_s=900", "--json"],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        out[pure] = json.loads(done.stdout)
    assert out["0"] == out["1"]
