"""The request lifecycle: build one replication's world from a workload and run it.

arrival -> endpoint queue -> server (engine replica or slots) -> done hook.
Arrivals stop at `duration_s`; the run then drains, so every request that
arrived gets its full latency (no survivor bias from cutting the run short).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import simpy

from sim.config.schema import Api, SelfHosted, Workload
from sim.metrics import recorder as recorder_module
from sim.metrics.recorder import CachedTokens, Recorder
from sim.model.application import caches, retrieval
from sim.model.application import lifecycle as lifecycle_module
from sim.model.application.lifecycle import build_lifecycle
from sim.model.serving import engine
from sim.model.serving.api import BatchLane, streaming_draws
from sim.model.serving.autoscaler import Autoscaler, ScaleToZero
from sim.model.serving.endpoint import Endpoint
from sim.model.serving.engine import ReplicaLifecycle, engine_replica
from sim.model.serving.slots import SlotServer, plain_draws
from sim.model.traffic.arrivals import RequestFactory, SourceContext, build_arrivals, user_count
from sim.model.traffic.ratelimit import Client, attach_provider_limits, build_gate

from . import events, fastpath
from .events import call_at, call_later, run
from .kernels import PURE_PYTHON, not_built
from .offered import full_batch
from .streams import BlockSampler, Streams


def simulate(workload: Workload, replication: int = 0, seed: Optional[int] = None,
             progress: Optional[Callable[[float, int], None]] = None, ticks: int = 20) -> Recorder:
    """Run one replication of `workload` and return its records.

    `progress(share, requests)` is called as the simulated clock passes each of `ticks` equal parts of
    duration_s, with the requests arrived so far.
    """
    if fastpath.eligible(workload):
        return fastpath.simulate_fast(workload, replication, seed, progress, ticks)
    sim = workload.simulation
    streams = Streams(sim.seed if seed is None else seed, replication)
    env = simpy.Environment()
    classes = workload.traffic.classes
    recorder = Recorder.for_workload(workload)
    # With a pipeline, endpoints serve model calls, recorded apart from the requests users make.
    calls = Recorder.for_workload(workload) if workload.pipeline is not None else recorder
    endpoints = [build_endpoint(env, name, k, workload, calls, streams) for k, name in enumerate(workload.models)]
    _connect_overflows(endpoints, workload)
    cls_of = recorder.cls
    hooks: list[Optional[Callable[[int], None]]] = []

    def done(i: int) -> None:
        hook = hooks[cls_of[i]]
        if hook is not None:
            hook(i)

    route = _router(endpoints, calls)
    if workload.pipeline is None:
        submit = build_gate(env, workload, recorder, streams, route, done, endpoints)
    else:
        lifecycle = build_lifecycle(env, workload, recorder, calls, streams, endpoints, done)
        recorder.calls = calls
        attach_provider_limits(env, workload, Client(env, workload, calls, streams, lifecycle.call_done),
                               endpoints, route)
        submit = build_gate(env, workload, recorder, streams, lifecycle.start, done)
    endpoint_index = {name: k for k, name in enumerate(workload.models)}
    feature_index = {name: k for k, name in enumerate(recorder.feature_names)}
    first_user = 0
    for k, (name, cls) in enumerate(classes.items()):
        make = RequestFactory(recorder, k, name, cls, streams, endpoint_index, feature_index, first_user)
        first_user += user_count(cls)
        hooks.append(build_arrivals(SourceContext(env, name, cls, make, submit, streams,
                                                  workload.traffic.rate_scale, sim.duration_s)))
    if workload.pipeline is None and any(hook is not None for hook in hooks):  # open-loop-only runs skip the call
        for endpoint in endpoints:
            endpoint.on_done = done
    for endpoint in endpoints:  # the batch lane and scale to zero see departures through the final on_done
        if endpoint.batch_lane is not None:
            endpoint.batch_lane.connect()
        if endpoint.idle is not None:
            endpoint.idle.watch()
    start_monitor(env, endpoints, recorder, sim, workload.measure_end_s())
    if progress is not None:
        _schedule_ticks(env, sim.duration_s, ticks, lambda share: progress(share, len(recorder.arrival)))
    run(env)
    recorder.events = next(env._eid)  # events scheduled in all (llmsim bench reports them per request)
    if workload.pipeline is not None and lifecycle.flows is not None:
        recorder.flow_stats = lifecycle.flows.stats(env.now)
    if workload.pipeline is not None and lifecycle.retrieval is not None:
        recorder.retrieval_stats = lifecycle.retrieval.stats(env.now)
        recorder.retrieval_usage = lifecycle.retrieval.usage if lifecycle.retrieval.metered else None
    for endpoint in endpoints:
        recorder.warnings += beyond_calibration(endpoint, workload.models[endpoint.name])
    if not PURE_PYTHON:  # the compiled parts missing for want of a build (PURE_PYTHON: Python was asked for)
        if fastpath.engine_without_kernel(workload):
            recorder.warnings.append(fastpath.ENGINE_KERNEL_MISSING)
        missing = _not_built(workload)
        if missing:
            recorder.warnings.append(not_built(missing))
    return recorder


def _not_built(workload: Workload) -> list[str]:
    """The compiled parts this workload's run uses that are not built (their Python twins ran)."""
    pipeline = workload.pipeline
    spec = pipeline.retrieval if pipeline is not None else None
    embedding = spec.embedding if spec is not None else None
    cached = pipeline is not None and any(c is not None for c in (
        pipeline.output_cache, spec.cache if spec is not None else None,
        embedding.cache if embedding is not None else None))
    uses = {
        "event core (sim/_events.c)": (events.COMPILED_CORE, True),
        "engine replica (sim/_engine.c)": (engine._engine, fastpath.has_engine(workload)),
        "flat logs (sim/_records.c)": (recorder_module._records, pipeline is not None),
        "retrieval (sim/_retrieval.c)": (retrieval._retrieval, spec is not None or bool(pipeline and pipeline.tools)),
        "caches (sim/_caches.c)": (caches._caches, cached),
        "request lifecycle (sim/_lifecycle.c)": (lifecycle_module._lifecycle,
                                                 pipeline is not None and not pipeline.has_flows()),
    }
    return [part for part, (module, used) in uses.items() if used and module is None]


def _schedule_ticks(env: simpy.Environment, duration: float, ticks: int, progress: Callable[[float], None]) -> None:
    """progress(k / ticks) at each k-th part of the duration, one tick scheduled at a time."""
    def tick(event) -> None:
        k = event.value
        progress(k / ticks)
        if k < ticks:
            call_later(env, duration / ticks, tick, k + 1)

    call_later(env, duration / ticks, tick, 1)


def beyond_calibration(endpoint: Endpoint, model) -> list[str]:
    """Warnings for replicas driven past the batch sizes and token counts their coefficients were measured on."""
    engine = getattr(model, "engine", None)
    calibrated = engine.step_time.calibrated if engine is not None else None
    if calibrated is None:
        return []
    peak = [max(getattr(s, "peak", (0, 0, 0))[k] for s in endpoint.servers + endpoint.retired) for k in range(3)]
    out = []
    for value, limit, what in zip(peak, (calibrated.decode_seqs_max, calibrated.prefill_tokens_max,
                                         calibrated.kv_tokens_max),
                                  ("sequences decoding", "prompt tokens prefilled", "context tokens read")):
        if limit is not None and value > limit:
            out.append(f"models.{endpoint.name}: a replica reached {value:,} {what} in one step, beyond the "
                       f"{limit:,} its step times were calibrated on ({calibrated.source or 'llmsim calibrate'}): "
                       "the coefficients are extrapolated there")
    return out


def _connect_overflows(endpoints: list[Endpoint], workload: Workload) -> None:
    """Each endpoint with a queue.overflow learns where its overflow goes."""
    by_name = {e.name: e for e in endpoints}
    for endpoint in endpoints:
        overflow = workload.models[endpoint.name].queue.overflow
        if overflow is not None:
            endpoint.spill = (by_name[overflow.to], overflow.above)


def _router(endpoints: list[Endpoint], rec: Recorder) -> Callable[[int], None]:
    """Sends job i (a request, or a model call) to its endpoint (or where that one's overflow goes)."""
    if len(endpoints) == 1:  # one endpoint: no lookup per request
        return endpoints[0].submit
    endpoint_of = rec.endpoint
    if any(e.spill is not None for e in endpoints):

        def route_spilling(i: int) -> None:
            endpoint = endpoints[endpoint_of[i]].destination()
            endpoint_of[i] = endpoint.index
            endpoint.submit(i)

        return route_spilling

    def route(i: int) -> None:
        endpoints[endpoint_of[i]].submit(i)

    return route


def build_endpoint(env: simpy.Environment, name: str, index: int, workload: Workload, recorder: Recorder,
                   streams: Streams) -> Endpoint:
    """An endpoint with its servers, as its config says."""
    model = workload.models[name]
    deadlines = [cls.deadline_s for cls in workload.traffic.classes.values()]
    endpoint = Endpoint(env, name, index, recorder, model.queue, deadlines, model.connections,
                        workload.simulation.warm)
    service_rng = streams.rng(f"endpoint.{name}.service")
    if isinstance(model, SelfHosted):
        if model.engine is not None:
            batch = full_batch(workload, name)
            if model.engine.prefix_cache is not None and recorder.cached_tokens is None:
                recorder.cached_tokens = CachedTokens()  # request -> (prefix tokens read from the cache, computed)

            def new_replica(cold_start_s: float = model.cold_start_s) -> ReplicaLifecycle:
                r = len(endpoint.servers) + len(endpoint.retired)  # a new index (and noise stream) each time
                return engine_replica(env, endpoint, r, model.max_batch, model.engine, recorder,
                                      streams.rng(f"endpoint.{name}.replica{r}.noise"), batch, cold_start_s,
                                      streams.rng(f"endpoint.{name}.replica{r}.episodes"))

            if model.dispatch == "prefix_affinity":
                endpoint.prefer(lambda server, i: server.cached_blocks(i))
            initial_cold = 0.0 if workload.simulation.warm else model.cold_start_s
            for _ in range(model.replicas):
                endpoint.servers.append(new_replica(initial_cold))
            idle = None
            if model.scale_to_zero is not None:  # wakes with the replicas it starts with (autoscale: its minimum)
                count = model.autoscale.min_replicas if model.autoscale is not None else model.replicas
                idle = ScaleToZero(env, endpoint, model.scale_to_zero, new_replica, count)
            if model.autoscale is not None:
                Autoscaler(env, endpoint, model.autoscale, new_replica, workload.simulation.duration_s, idle).start()
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
    if model.scale_to_zero is not None:
        ScaleToZero(env, endpoint, model.scale_to_zero)
    batch_classes = [cls.batch for cls in workload.traffic.classes.values()]
    if isinstance(model, Api) and model.batch is not None and any(batch_classes):  # outermost: batch skips the wake
        BatchLane(env, endpoint, model.batch, batch_classes, recorder, streams.rng(f"endpoint.{name}.batch"))
    return endpoint


def monitor_times(sim, measure_end_s: Optional[float] = None) -> Iterator[float]:
    """When the monitor samples: 0, every timeseries interval, the warm-up, the end of the measuring window
    (`Workload.measure_end_s`, duration_s by default) and duration_s, in order, none past duration_s.

    Generated one at a time: a long run at a fine interval has millions of samples.
    """
    step, duration = sim.timeseries_interval_s, sim.duration_s
    end = duration if measure_end_s is None else measure_end_s
    edges = sorted({duration, end} | ({sim.warmup_s} if isinstance(sim.warmup_s, float) else set()))
    k = e = 0
    t = 0.0
    while True:
        yield t
        while k * step <= t:
            k += 1
        while e < len(edges) and edges[e] <= t:
            e += 1
        t = min(k * step, edges[e]) if e < len(edges) else k * step
        if t > duration:
            return


def start_monitor(env: simpy.Environment, endpoints: list[Endpoint], recorder: Recorder, sim,
                  measure_end_s: Optional[float] = None) -> None:
    """Sample every endpoint's counters and gauges at the `monitor_times`.

    The samples give utilisation and cost over any window between them, and the time series.
    """
    times = monitor_times(sim, measure_end_s)

    calls = recorder.calls

    def sample(event) -> None:
        now = env.now
        recorder.samples.append((now, {e.name: e.counters(now) for e in endpoints}))
        recorder.gauges.append((now, {e.name: e.gauges() for e in endpoints}))
        recorder.spill_logs()  # a long run's logs as unboxed arrays (see FlatLog)
        if calls is not None:
            calls.spill_logs()
        t = next(times, None)
        if t is not None:  # one sample scheduled at a time keeps the event queue short
            # Exactly at the planned time: the summary looks up the samples at the window's edges.
            call_at(env, t, sample, t)

    call_later(env, 0.0, sample, next(times))
