"""Flows: several model calls and tool calls per request, around the pipeline's answer.

    pipeline:
      tools:                     # each a FIFO resource with failures, timeouts and retries
        orders_sql: {concurrency: 4, latency_s: {kind: lognormal, median: 0.08, p95: 0.3},
                     failure_rate: 0.02, timeout_s: 1.0, retry: {max_attempts: 3, backoff_s: 0.1}}
        crm_rest:   {concurrency: 8, latency_s: 0.2, failure_rate: 0.05, price_per_call_usd: 0.001}
      flow:                      # steps one after another; `answer` is the pipeline's own answer
        - {name: classify, model: gpt-4o-mini, prompt_tokens: 300, output_tokens: 5,
           labels: {lookup: 0.6, chat: 0.4}}       # the classifier's verdicts and how often each comes
        - name: lookups
          when: {classify: lookup}                 # runs only when classify said "lookup"
          parallel:                                # branches run at once; the group ends with its last
            - {name: orders, tool: orders_sql, required: true}
            - [{name: profile, tool: crm_rest}, {name: summarise, model: gpt-4o-mini,
               prompt_tokens: 600, output_tokens: 80}]   # a branch may be a sequence of steps
        - answer                                   # output cache, retrieval, the model call, escalation
        - {name: validate, model: gpt-4o-mini, prompt_tokens: 900, output_tokens: 10}
      flows:                     # per class, instead of `flow`
        background: [answer]

Without `flow` (and for classes without one) a request's flow is `[answer]`: the pipeline as before.
A step's label is what later `when` conditions test: a model step's drawn verdict (one of its
`labels`, or `ok`) or `failed`; a tool step's `ok` or `failed`; `skipped` for a step whose
condition did not hold or that a guardrail cap refused.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, Field, model_validator

from .base import MAX_COUNT, MAX_PRICE_USD, Block
from .distributions import Distribution
from .limits import Retry

STEP_LABELS = ("ok", "failed", "skipped")
"""Labels every step can have (a model step's own `labels` add to these)."""


class ToolSpec(Block):
    """A tool a flow calls (a SQL query, a REST API, a code sandbox): a FIFO resource whose calls may fail.

    An attempt holds one of `concurrency` slots for its latency. It fails with `failure_rate` (an error
    returned at the end of its latency), or when it takes longer than `timeout_s` (the caller gives up
    then; the tool still works on it, holding its slot, as a server does with an abandoned request).
    A failed attempt is retried after the `retry` policy's backoff while attempts remain. A flow's
    tool calls are never cached (their data is live); a tool output that may be cached belongs to the
    retrieval stages, where `fresh` marks the hops that must not be.
    """

    concurrency: int = Field(ge=1, le=MAX_COUNT, description="Calls served at once; more wait FIFO.")
    latency_s: Distribution = Field(description="Service time of one attempt.")
    failure_rate: float = Field(0.0, ge=0, lt=1, description="Chance an attempt fails (independent per attempt).")
    timeout_s: Optional[float] = Field(None, gt=0, description="An attempt not back this long after its send fails.")
    retry: Retry = Field(
        default_factory=lambda: Retry(max_attempts=1),
        description="Retries of a failed attempt (max_attempts 1: none).")
    price_per_call_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per attempt (a metered API), billed to the request that made it.")
    hourly_usd: float = Field(
        0.0, ge=0, le=MAX_PRICE_USD, description="USD per hour of the tool's servers, billed over the whole window "
        "and shared among requests by their attempts.")


def _step_shorthand(value: Any) -> Any:
    if value == "answer":
        return {"answer": True}
    if isinstance(value, str):
        raise ValueError(f"{value!r}: a step is `answer` or a mapping with model, tool or parallel")
    return value


def _listed(value: Any) -> Any:
    """One item or a list of them: a list."""
    return value if isinstance(value, list) else [value]


class FlowStep(Block):
    """One step: a model call (`model`), a tool call (`tool`), a parallel group (`parallel`) or `answer`."""

    name: Optional[str] = Field(None, description="The step's name (labels, conditions, the stage profile).")
    model: Optional[str] = Field(None, description="A model call on this endpoint (a classifier, a rewrite, a check).")
    tool: Optional[str] = Field(None, description="A call to this tool of `pipeline.tools`.")
    parallel: Optional[list[Annotated[list["Step"], BeforeValidator(_listed)]]] = Field(
        None, min_length=1, description="Branches run at once (each a step or a list of steps run in order); the "
        "group is done when every branch is.")
    answer: bool = Field(False, description="The pipeline's answer (written `answer`).")
    prompt_tokens: Optional[Distribution] = Field(None, description="A model step's prompt tokens (rounded, >= 1).")
    output_tokens: Optional[Distribution] = Field(None, description="A model step's output tokens (rounded, >= 1).")
    labels: dict[str, float] = Field(
        default_factory=dict, description="A model step's verdicts and their shares (summing to 1): what later "
        "`when` conditions test (default: `ok`).")
    when: dict[str, Annotated[list[str], BeforeValidator(_listed)]] = Field(
        default_factory=dict, description="Run only if each named earlier step has this label (or one of these).")
    required: bool = Field(
        False, description="If the step fails, the request stops once its group is done: the user is told to try "
        "again later (outcome try_later).")

    @model_validator(mode="after")
    def _one_kind(self) -> "FlowStep":
        kinds = [k for k in ("model", "tool", "parallel") if getattr(self, k) is not None]
        kinds += ["answer"] if self.answer else []
        if len(kinds) != 1:
            raise ValueError("a step is exactly one of model, tool, parallel or answer" +
                             (f" (got {', '.join(kinds)})" if kinds else ""))
        if self.answer and (self.when or self.required or self.name not in (None, "answer")):
            raise ValueError("answer: takes no when, required or name (it always runs)")
        if self.model is not None:
            if self.prompt_tokens is None or self.output_tokens is None:
                raise ValueError("a model step needs prompt_tokens and output_tokens")
        elif self.prompt_tokens is not None or self.output_tokens is not None or self.labels:
            raise ValueError("prompt_tokens, output_tokens and labels belong to model steps")
        if self.labels:
            if any(not 0 <= share <= 1 for share in self.labels.values()):
                raise ValueError("labels: shares between 0 and 1")
            if abs(sum(self.labels.values()) - 1.0) > 1e-9:
                raise ValueError(f"labels: shares sum to {sum(self.labels.values()):g}, not 1")
            clash = [k for k in self.labels if k in STEP_LABELS[1:]]
            if clash:
                raise ValueError(f"labels: {clash[0]!r} is reserved (a step is failed or skipped by itself)")
        if self.name is None and not self.answer:
            self.name = self.model or self.tool or "parallel"
        return self

    def kind(self) -> str:
        return "answer" if self.answer else "model" if self.model else "tool" if self.tool else "parallel"

    def walk(self):
        """This step and every step inside it, depth first, in the order they are listed."""
        yield self
        for branch in self.parallel or ():
            for step in branch:
                yield from step.walk()


Step = Annotated[FlowStep, BeforeValidator(_step_shorthand)]
"""A flow step: a mapping, or the word `answer`."""
FlowStep.model_rebuild()

Flow = list[Step]


def check_flow(where: str, flow: list[FlowStep], models: list[str], tools: list[str]) -> None:
    """Raise ValueError naming `where` when the flow refers to unknown models, tools or steps, repeats a name,
    tests a step that does not finish before it, or has `answer` anywhere but once at its top level."""
    answers = [k for k, step in enumerate(flow) if step.answer]
    if len(answers) != 1:
        raise ValueError(f"{where}: `answer` exactly once at the top level (found {len(answers)})")
    seen: set[str] = set()
    for step in (s for top in flow for s in top.walk()):
        if step.answer:
            continue
        if step.name in seen or step.name == "answer":
            raise ValueError(f"{where}: step name {step.name!r} is used twice (name the steps)")
        seen.add(step.name)
        if step.parallel is not None and any(s.answer for b in step.parallel for s in b):
            raise ValueError(f"{where}.{step.name}: `answer` cannot be inside a parallel group")
        if step.model is not None and step.model not in models:
            raise ValueError(f"{where}.{step.name}.model: unknown model {step.model!r} (known: {', '.join(models)})")
        if step.tool is not None and step.tool not in tools:
            known = ", ".join(tools) if tools else "none: add pipeline.tools"
            raise ValueError(f"{where}.{step.name}.tool: unknown tool {step.tool!r} (tools: {known})")
    _check_conditions(where, flow, {})


def _check_conditions(where: str, steps: list[FlowStep], done: dict[str, FlowStep]) -> dict[str, FlowStep]:
    """Walk steps in order: a condition may only test a step finished before this one starts (earlier in
    the same sequence, or before the enclosing group); returns `done` grown by these steps."""
    done = dict(done)
    for step in steps:
        for name, wanted in step.when.items():
            if name not in done:
                raise ValueError(f"{where}.{step.name}.when: {name!r} is not a step that finishes before this one")
            allowed = set(STEP_LABELS) | set(done[name].labels)
            for label in wanted:
                if label not in allowed:
                    raise ValueError(f"{where}.{step.name}.when.{name}: {label!r} is not a label of {name!r} "
                                     f"(labels: {', '.join(sorted(allowed))})")
        inner = {}
        for branch in step.parallel or ():
            inner.update(_check_conditions(where, branch, done))
        done.update(inner)
        if not step.answer:
            done[step.name] = step
    return done
