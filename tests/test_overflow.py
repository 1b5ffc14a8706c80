"""A queue's overflow (`queue.overflow`): requests that would wait go to another endpoint instead.

With `above: 0` a c-server endpoint overflows exactly the arrivals that find every server busy: it is an
Erlang loss system (M/G/c/c) whose "lost" requests are served elsewhere, so the share sent on is Erlang B
whatever the service distribution. With `above: N` an arrival that finds N waiting goes on: M/M/c/(c+N)
blocking.
"""
from __future__ import annotations

import re

import pytest
from test_queueing import erlang_b, mmck_blocking
from test_theory import check

from sim.config.loader import ConfigError
from sim.config.schema import Workload
from sim.experiments.run import run

EXPONENTIAL = {"kind": "exponential", "mean": 1.0}


def overflow_workload(rate: float, servers: int, above: int, service=EXPONENTIAL, duration: float = 4_000) -> Workload:
    return Workload.model_validate({
        "simulation": {"duration_s": duration, "warmup_s": 50.0},
        "traffic": {"classes": {"jobs": {"arrival": {"kind": "poisson", "rate_rps": rate}, "prompt_tokens": 1,
                                         "output_tokens": 1, "endpoint": "local"}}},
        "models": {
            "local": {"kind": "self_hosted", "replicas": 1, "max_batch": servers, "service_time": service,
                      "queue": {"overflow": {"to": "burst", "above": above}}},
            "burst": {"kind": "self_hosted", "replicas": 1, "max_batch": 1000, "service_time": service},
        },
    })


def overflow_shares(result) -> list[float]:
    requests = result.requests[result.requests["arrival_s"] >= 50.0]
    assert (requests["outcome"] == "completed").mean() > 0.99  # nobody is turned away: they go elsewhere
    return [float((frame["endpoint"] == "burst").mean()) for _, frame in requests.groupby("replication", sort=True)]


@pytest.mark.parametrize("service", [EXPONENTIAL, {"kind": "lognormal", "mean": 1.0, "p95": 2.5}],
                         ids=["M/M/2/2", "M/G/2/2"])
def test_overflow_above_0_sends_on_the_erlang_b_share(service):
    c, a = 2, 1.5
    share = erlang_b(c, a)  # 0.3103
    result = run(overflow_workload(a, c, 0, service), seed=31, replications=20)
    check(overflow_shares(result), share, f"M/G/{c}/{c} overflow share", max_half=0.08 * share)


def test_overflow_above_n_sends_on_the_mmck_blocking_share():
    c, n, a = 2, 3, 1.5
    share = mmck_blocking(c, c + n, a)  # an arrival finding n waiting (c + n in the system) goes on
    result = run(overflow_workload(a, c, n), seed=32, replications=20)
    check(overflow_shares(result), share, f"M/M/{c}/{c + n} overflow share", max_half=0.12 * share)


@pytest.mark.parametrize("to, message", [
    ("local", "models.local.queue.overflow.to: itself is not another model"),
    ("elsewhere", "models.local.queue.overflow.to: 'elsewhere' is not another model (known: local, burst)"),
])
def test_overflow_goes_to_another_known_model(to, message):
    data = overflow_workload(1.0, 1, 0).model_dump(mode="json", by_alias=True, exclude_unset=True)
    data["models"]["local"]["queue"]["overflow"]["to"] = to
    with pytest.raises(ValueError, match=re.escape(message)):
        Workload.model_validate(data)


def test_overflow_is_one_step(tmp_path):
    from sim.config.loader import load_workload

    text = """\
version: 1
simulation: {duration_s: 100}
traffic: {classes: {jobs: {arrival: {kind: poisson, rate_rps: 1}, prompt_tokens: 1, output_tokens: 1, endpoint: a}}}
models:
  a: {kind: self_hosted, service_time: 1, queue: {overflow: {to: b, above: 0}}}
  b: {kind: self_hosted, service_time: 1, queue: {overflow: {to: a, above: 0}}}
"""
    (tmp_path / "w.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"w.yaml:\d+: .*overflow.to: 'b' overflows itself: one step of overflow"):
        load_workload(tmp_path / "w.yaml")


def test_a_pipelines_model_calls_overflow_too():
    """rag-support with its cheap tier cut to one replica of 8 sequences: its calls queue for tens of seconds;
    with an overflow to the gpt-4o tier at once, none waits there, and the bill carries gpt-4o's tokens."""
    from pathlib import Path

    workload = Path(__file__).resolve().parent.parent / "workloads" / "rag-support.yaml"
    small = ["simulation.duration_s=600", "models.llama8b.replicas=1", "models.llama8b.max_batch=8"]
    spill = ["models.llama8b.queue={overflow: {to: gpt4o, above: 0}}"]
    queued, spilled = (run(workload, replications=2, overrides=small + extra, keep_requests=False).summary
                       for extra in ([], spill))
    assert queued["queue_wait_p95_s"] > 5.0 and spilled["queue_wait_p95_s"] < 0.05
    assert spilled["utilisation_gpt4o"] > 2 * queued["utilisation_gpt4o"]
    assert spilled["cost_per_hour_usd"] > 1.5 * queued["cost_per_hour_usd"]
    assert spilled["requests_completed"] > queued["requests_completed"]


def test_a_flows_model_steps_overflow_too():
    """agent-tools with gpt-4o-mini cut to 4 concurrent calls: with an overflow to gpt-4o its steps stop
    queueing behind them (end-to-end p95 falls by half or more) and gpt-4o serves more."""
    from pathlib import Path

    workload = Path(__file__).resolve().parent.parent / "workloads" / "agent-tools.yaml"
    small = ["simulation.duration_s=600", "models.gpt4o-mini.concurrency=4"]
    spill = ["models.gpt4o-mini.queue={overflow: {to: gpt4o, above: 0}}"]
    queued, spilled = (run(workload, replications=2, overrides=small + extra, keep_requests=False).summary
                       for extra in ([], spill))
    assert spilled["e2e_p95_s"] < 0.5 * queued["e2e_p95_s"]
    assert spilled["utilisation_gpt4o"] > queued["utilisation_gpt4o"]
    assert spilled["utilisation_gpt4o-mini"] < queued["utilisation_gpt4o-mini"]
