"""Flows: the model calls and tool calls a request makes around its answer (sim.config.flow).

The lifecycle runs a request's steps before its answer (`before`), then the answer (output
cache, retrieval, the model call, escalation), then the steps after it (`after`). Steps are
callbacks like the rest of the model: a tool attempt's return time is known when it is sent
(tools are FIFO resources, as retrieval backends are), so an attempt is one event; a model step
is a call on an endpoint (a row of the calls recorder, billed like any call), routed back here
by the lifecycle's `call_done`.

Every step that ran, or was skipped, is a row of `recorder.flow_log` (FLOW_FIELDS): the summary
derives the `tool` and `flow_calls` stages, per-step times and per-tool attempts and failures
from it, and the ledger bills tool attempts from it.

Random numbers, each from its own named stream: `flow.<flow>.<step>.prompt`, `.output`, `.label`
(a model step's tokens and verdict, drawn as the step starts), `tool.<name>` (latencies, in send
order), `tool.<name>.failure` (one draw per attempt) and `tool.<name>.retry` (backoff jitter).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import simpy

from sim.config.flow import STEP_LABELS, FlowStep, ToolSpec
from sim.config.pipeline import Pipeline
from sim.config.schema import Workload
from sim.metrics.recorder import COMPLETED, TIMED_OUT, FlatLog, Recorder
from sim.model.events import call_later
from sim.model.streams import BlockSampler, Streams, token_draw, uniform01
from sim.model.traffic.ratelimit import RetryPolicy, uniform_pm1

from .guardrails import LIMITS
from .retrieval import build_backend

FLOW_FIELDS = ("request", "step", "start", "end", "label", "attempts")
"""A `recorder.flow_log` row: the request, the step (index into `recorder.flow_steps`), when it started
and ended (equal for a skipped step), its label (index into `recorder.flow_labels`) and its attempts
(a tool step's; 1 for a model step that made its call, 0 for a skipped step or a group)."""

# How a top-level step counts in the stage profile (`FlowSteps.stage`): inside a group (not counted
# apart), a tool step or a group of tool steps only (`tool`), anything else (`flow_calls`).
NESTED, TOOL_STAGE, CALLS_STAGE = 0, 1, 2
OK, FAILED, SKIPPED = (STEP_LABELS.index(label) for label in STEP_LABELS)

Then = Callable[[], None]


class FlowSteps:
    """The static facts of every step of every flow, by step index (what the recorder keeps for the summary)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.tool: list[int] = []    # the tool's index (-1: not a tool step)
        self.stage: list[int] = []   # NESTED, TOOL_STAGE or CALLS_STAGE
        self.labels: list[str] = list(STEP_LABELS)

    def label(self, name: str) -> int:
        if name not in self.labels:
            self.labels.append(name)
        return self.labels.index(name)

    def add(self, name: str, tool: int, stage: int) -> int:
        """The step's index; a step of the same name in another class's flow shares it (the same role)."""
        if name in self.names:
            return self.names.index(name)
        self.names += [name]
        self.tool += [tool]
        self.stage += [stage]
        return len(self.names) - 1


class Tool:
    """A tool: a FIFO resource (a retrieval `Backend`, made by `build_backend`) whose attempts may fail or time out,
    and are retried."""

    def __init__(self, env: simpy.Environment, name: str, spec: ToolSpec, streams: Streams) -> None:
        self.slots = build_backend(env, name, spec, streams.rng(f"tool.{name}"))
        self.failure_rate, self.timeout = spec.failure_rate, spec.timeout_s
        self.fails = BlockSampler(uniform01, streams.rng(f"tool.{name}.failure"))
        jitter = (BlockSampler(uniform_pm1, streams.rng(f"tool.{name}.retry"))
                  if spec.retry.jitter > 0 and spec.retry.max_attempts > 1 else None)
        self.retry = RetryPolicy(spec.retry, jitter)

    def attempt(self, now: float) -> tuple[bool, float]:
        """An attempt sent now: (whether it succeeds, when the caller hears back)."""
        end = self.slots.submit(now)
        failed = self.fails() < self.failure_rate  # drawn for every attempt: the stream stays aligned
        if self.timeout is not None and end - now > self.timeout:
            return False, now + self.timeout
        return not failed, end


class _Node:
    """A compiled step."""

    __slots__ = ("step", "kind", "endpoint", "tool", "prompt", "output", "verdict", "verdicts", "when",
                 "required", "branches")

    def __init__(self, step: int, kind: str) -> None:
        self.step, self.kind = step, kind
        self.endpoint = self.tool = -1
        self.prompt = self.output = self.verdict = None
        self.verdicts: tuple = ()    # (cumulative share, label index) of a model step's labels
        self.when: tuple = ()        # (step index, allowed label indices) pairs
        self.required = False
        self.branches: tuple = ()


class _State:
    """A request's flow: its steps' labels, its model steps in flight, whether a required step failed."""

    __slots__ = ("labels", "calls", "failed")

    def __init__(self) -> None:
        self.labels: dict[int, int] = {}
        self.calls: set[int] = set()
        self.failed = False


class Flows:
    """Runs the steps of each class's flow before and after its answer."""

    def __init__(self, env: simpy.Environment, workload: Workload, rec: Recorder, calls: Recorder, streams: Streams,
                 endpoints: list, lifecycle) -> None:
        spec: Pipeline = workload.pipeline
        self.env, self.rec, self.calls, self.endpoints, self.life = env, rec, calls, endpoints, lifecycle
        self.models = list(workload.models)
        self.tool_names = list(spec.tools)
        self.tools = [Tool(env, name, t, streams) for name, t in spec.tools.items()]
        self.steps = FlowSteps()
        self.streams = streams
        # Per class: (steps before the answer, steps after it); a class without a flow has none.
        self.plans: list[tuple[tuple, tuple]] = []
        for name in workload.traffic.classes:
            flow = spec.flows.get(name, spec.flow)
            where = name if name in spec.flows else "all"
            if flow is None:
                self.plans.append(((), ()))
                continue
            k = next(j for j, s in enumerate(flow) if s.answer)
            self.plans.append((self._compile(where, flow[:k], True), self._compile(where, flow[k + 1:], True)))
        self.side: dict[int, tuple] = {}   # model step call -> (request state, node, then, start)
        rec.flow_log, rec.flow_steps, rec.flow_calls, rec.flow_tools = FlatLog(), self.steps, [], self.tool_names

    # --- compiling ------------------------------------------------------------------
    def _compile(self, where: str, steps: list[FlowStep], top: bool) -> tuple:
        return tuple(self._node(where, s, top) for s in steps)

    def _node(self, where: str, s: FlowStep, top: bool) -> _Node:
        leaves = [x.kind() for x in s.walk() if x.parallel is None]
        stage = NESTED if not top else TOOL_STAGE if all(k == "tool" for k in leaves) else CALLS_STAGE
        tool = self.tool_names.index(s.tool) if s.tool is not None else -1
        node = _Node(self.steps.add(s.name, tool, stage), s.kind())
        node.tool = tool
        node.required = s.required
        node.when = tuple((self.steps.names.index(name), tuple(self.steps.label(w) for w in wanted))
                          for name, wanted in s.when.items())
        if s.model is not None:
            node.endpoint = self.models.index(s.model)
            stream = f"flow.{where}.{s.name}"
            node.prompt = BlockSampler(token_draw(s.prompt_tokens), self.streams.rng(stream + ".prompt"))
            node.output = BlockSampler(token_draw(s.output_tokens), self.streams.rng(stream + ".output"))
            if s.labels:
                node.verdict = BlockSampler(uniform01, self.streams.rng(stream + ".label"))
                shares = np.cumsum(list(s.labels.values()))
                node.verdicts = tuple((float(c), self.steps.label(k)) for c, k in zip(shares, s.labels))
        if s.parallel is not None:
            node.branches = tuple(self._compile(where, branch, False) for branch in s.parallel)
        return node

    # --- running ----------------------------------------------------------------------
    def has_steps(self, cls: int) -> tuple[bool, bool]:
        """(steps before the answer?, steps after it?) for class `cls`."""
        before, after = self.plans[cls]
        return bool(before), bool(after)

    def before(self, r, then: Then) -> None:
        r.flow = _State()
        self._sequence(r, self.plans[self.rec.cls[r.i]][0], 0, then, True)

    def after(self, r, then: Then) -> None:
        if r.flow is None:
            r.flow = _State()
        self._sequence(r, self.plans[self.rec.cls[r.i]][1], 0, then, True)

    def _alive(self, r) -> bool:
        return self.life.live.get(r.i) is r

    def _sequence(self, r, nodes: tuple, k: int, then: Then, top: bool) -> None:
        """Run nodes[k:] one after another, then `then`. A failed required step stops the sequence; at the top
        level it ends the request."""
        state = r.flow
        while k < len(nodes):
            if state.failed:
                if top:
                    self.life.stop_flow(r)
                    return
                break
            node = nodes[k]
            k += 1
            if not self._holds(state, node):
                self._log(r, node, self.env._now, SKIPPED, 0)
                continue
            self._start(r, node, lambda k=k: self._sequence(r, nodes, k, then, top))
            return
        if top and state.failed:
            self.life.stop_flow(r)
            return
        then()

    @staticmethod
    def _holds(state: _State, node: _Node) -> bool:
        return all(state.labels.get(step, -1) in allowed for step, allowed in node.when)

    def _start(self, r, node: _Node, then: Then) -> None:
        now = self.env._now
        if node.kind == "tool":
            self._attempt(r, node, then, now, 1)
        elif node.kind == "model":
            self._call(r, node, then, now)
        else:
            left = [len(node.branches)]

            def branch_done() -> None:
                left[0] -= 1
                if left[0] == 0 and self._alive(r):
                    self._log(r, node, now, FAILED if r.flow.failed else OK, 0)
                    then()

            for branch in node.branches:
                self._sequence(r, branch, 0, branch_done, False)

    def _log(self, r, node: _Node, start: float, label: int, attempts: int) -> None:
        r.flow.labels[node.step] = label
        self.rec.flow_log += (r.i, node.step, start, self.env._now, label, attempts)

    def _done(self, r, node: _Node, then: Then, start: float, label: int, attempts: int) -> None:
        self._log(r, node, start, label, attempts)
        if label == FAILED and node.required:
            r.flow.failed = True
        then()

    # --- tools ------------------------------------------------------------------------
    def _attempt(self, r, node: _Node, then: Then, start: float, attempt: int) -> None:
        guard = self.life.guard
        if guard is not None and guard.tool_cap is not None:
            if r.tools + 1 > guard.tool_cap:
                r.limit = LIMITS.index("tool_calls")
                self._done(r, node, then, start, SKIPPED if attempt == 1 else FAILED, attempt - 1)
                return
            r.tools += 1
        ok, back = self.tools[node.tool].attempt(self.env._now)
        call_later(self.env, back - self.env._now, self._back, (r, node, then, start, attempt, ok))

    def _back(self, event) -> None:
        r, node, then, start, attempt, ok = event.value
        if not self._alive(r):
            return
        if ok:
            self._done(r, node, then, start, OK, attempt)
            return
        tool = self.tools[node.tool]
        if attempt >= tool.retry.max_attempts:
            self._done(r, node, then, start, FAILED, attempt)
            return
        call_later(self.env, tool.retry.wait(attempt, None), self._again, (r, node, then, start, attempt + 1))

    def _again(self, event) -> None:
        r, node, then, start, attempt = event.value
        if self._alive(r):
            self._attempt(r, node, then, start, attempt)

    # --- model steps --------------------------------------------------------------------
    def _call(self, r, node: _Node, then: Then, start: float) -> None:
        rec, i = self.rec, r.i
        prompt, output = node.prompt(), node.output()
        guard = self.life.guard
        if guard is not None and not guard.allows(r, prompt + output if guard.max_tokens is not None else 0):
            self._done(r, node, then, start, SKIPPED, 0)
            return
        r.hops += 1
        r.tokens += prompt + output
        endpoint = node.endpoint
        if self.life.spilling:  # a long queue may send the call to its overflow
            endpoint = self.endpoints[endpoint].destination().index
        c = self.calls.new(rec.cls[i], endpoint, start, prompt, output, rec.user[i], rec.feature[i])
        self.life.parent.append(i)
        self.rec.flow_calls.append(c)
        self.side[c] = (r, node, then, start)
        r.flow.calls.add(c)
        if guard is not None:
            guard.watch_call(r, c)
        self.endpoints[endpoint].submit(c)

    def call_done(self, c: int) -> None:
        """A model step's call ended (or was stopped at its time limit): label the step, go on."""
        r, node, then, start = self.side.pop(c)
        r.flow.calls.discard(c)
        if not self._alive(r):
            return
        if self.calls.outcome[c] != COMPLETED:
            self._done(r, node, then, start, FAILED, 1)
            return
        label = OK
        if node.verdict is not None:
            u = node.verdict()
            label = next((k for share, k in node.verdicts if u < share), node.verdicts[-1][1])
        self._done(r, node, then, start, label, 1)

    def timed_out(self, c: int) -> None:
        """A model step's call passed its time limit: it stops, the step fails."""
        self.endpoints[self.calls.endpoint[c]].cancel(c, TIMED_OUT)
        self.call_done(c)

    def stop(self, r) -> None:
        """The request ended: its model steps still in flight are cancelled (their places freed)."""
        for c in sorted(r.flow.calls):
            self.side.pop(c, None)
            self.endpoints[self.calls.endpoint[c]].cancel(c, TIMED_OUT)
        r.flow.calls.clear()

    # --- results ----------------------------------------------------------------------
    def stats(self, now: float) -> dict[str, float]:
        """Per tool over the whole run: the mean wait for a slot and the utilisation."""
        out: dict[str, float] = {}
        for name, tool in zip(self.tool_names, self.tools):
            out.update(tool.slots.stats(now, f"tool_{name}"))
        return out


def flow_rows(rec: Recorder) -> Optional[np.ndarray]:
    """`recorder.flow_log` as rows of FLOW_FIELDS (None without flows)."""
    if rec.flow_log is None:
        return None
    return Recorder.rows(rec.flow_log, len(FLOW_FIELDS))
