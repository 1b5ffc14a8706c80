"""The request lifecycle: build one replication's world from a workload and run it.

arrival -> endpoint queue -> server (engine replica or slots) -> done hook.
Arrivals stop at `duration_s`; the run then drains, so every request that
arrived gets its full latency (no survivor bias from cutting the run short).
"""
from __future__ import annotations

from typing import Callable, Optional

import simpy

from sim.config.schema import Api, SelfHosted, Workload
from sim.metrics.recorder import Recorder

from .api import streaming_draws
from .endpoint import Endpoint
from .engine import EngineReplica
from .offered import full_batch
from .events import call_later
from .arrivals import RequestFactory, SourceContext, build_arrivals, user_count
from .ratelimit import build_gate
from .streams import BlockSampler, Streams
from .slots import SlotServer, plain_draws

MONITOR_POINTS = 100  # counter samples over the run, for warm-up cuts and time series


def simulate(workload: Workload, replication: int = 0, seed: Optional[int] = None) -> Recorder:
    """Run one replication of `workload` and return its records."""
    sim = workload.simulation
    streams = Streams(sim.seed if seed is None else seed, replication)
    env = simpy.Environment()
    classes = workload.traffic.classes
    features = list(dict.fromkeys(f for cls in classes.values() for f in (cls.features or {})))
    recorder = Recorder(list(classes), list(workload.models), features, [c.priority for c in classes.values()])
    endpoints = [build_endpoint(env, name, k, workload, recorder, streams) for k, name in enumerate(workload.models)]
    endpoint_of = recorder.endpoint
    cls_of = recorder.cls
    hooks: list[Optional[Callable[[int], None]]] = []

    def route(i: int) -> None:
        endpoints[endpoint_of[i]].submit(i)

    def done(i: int) -> None:
        hook = hooks[cls_of[i]]
        if hook is not None:
            hook(i)

    submit = build_gate(env, workload, recorder, streams, route, done)
    endpoint_index = {name: k for k, name in enumerate(workload.models)}
    feature_index = {name: k for k, name in enumerate(features)}
    first_user = 0
    for k, (name, cls) in enumerate(classes.items()):
        make = RequestFactory(recorder, k, name, cls, streams, endpoint_index, feature_index, first_user)
        first_user += user_count(cls)
        hooks.append(build_arrivals(SourceContext(env, name, cls, make, submit, streams,
                                                  workload.traffic.rate_scale, sim.duration_s)))
    if any(hook is not None for hook in hooks):  # open-loop-only runs skip the call
        for endpoint in endpoints:
            endpoint.on_done = done
    start_monitor(env, endpoints, recorder, sim.duration_s,
                  sim.warmup_s if isinstance(sim.warmup_s, float) else None)
    env.run()
    return recorder


def build_endpoint(env: simpy.Environment, name: str, index: int, workload: Workload, recorder: Recorder,
                   streams: Streams) -> Endpoint:
    """An endpoint with its servers, as its config says."""
    model = workload.models[name]
    endpoint = Endpoint(env, name, index, recorder)
    service_rng = streams.rng(f"endpoint.{name}.service")
    if isinstance(model, SelfHosted):
        if model.engine is not None:
            batch = full_batch(workload, name)
            endpoint.servers = [
                EngineReplica(env, endpoint, r, model.max_batch, model.engine, recorder,
                              streams.rng(f"endpoint.{name}.replica{r}.noise"), batch)
                for r in range(model.replicas)
            ]
            return endpoint
        slots, replicas = model.max_batch, model.replicas
    elif isinstance(model, Api):
        slots, replicas = model.concurrency, 1
    else:  # pragma: no cover - the schema admits no other kind
        raise TypeError(f"unknown endpoint kind {model.kind}")
    if model.service_time is not None:
        endpoint.prepare = plain_draws(endpoint.pending, BlockSampler(model.service_time.sample, service_rng))
    else:
        speed_rng = streams.rng(f"endpoint.{name}.speed")
        endpoint.prepare = streaming_draws(recorder, endpoint.pending,
                                           BlockSampler(model.ttft_s.sample, service_rng),
                                           BlockSampler(model.output_tokens_per_s.sample, speed_rng))
    endpoint.servers = [SlotServer(env, endpoint, r, slots, recorder) for r in range(replicas)]
    return endpoint


def start_monitor(env: simpy.Environment, endpoints: list[Endpoint], recorder: Recorder, duration: float,
                  warmup: Optional[float]) -> None:
    """Sample every endpoint's cumulative counters on a grid that includes warm-up and the end."""
    times = {duration * k / MONITOR_POINTS for k in range(MONITOR_POINTS + 1)}
    if warmup is not None:
        times.add(warmup)

    def sample(event) -> None:
        now = env.now
        recorder.samples.append((now, {e.name: e.counters(now) for e in endpoints}))

    for t in sorted(times):
        call_later(env, t, sample)
