"""A run without events, for the workloads where none is needed: open-loop traffic on plain FIFO endpoints.

When every class arrives open-loop (Poisson, schedule, diurnal, MMPP, gamma, or a trace replay without
prefix blocks: its arrival times do not depend on the system) and every endpoint is a plain FIFO
queue with nothing that reacts to time (no rate or provider limits, deadlines, queue caps, priorities,
connection pools, autoscaling, scale to zero, cold starts, batch lanes or pipeline), nothing a request
does depends on an event other than its arrival and what its endpoint's servers did before it. So
each endpoint's run is one loop over its arrivals and its servers' next events in time order, fed
by random draws made in blocks from the same named streams in the same order as the event path's:

- slot servers (`service_time` replicas, API concurrency slots): FIFO servers serve requests in
  arrival order, each on the server the event path would pick (the least loaded at arrival when
  nobody waits, else the one whose slot frees first): the Kiefer-Wolfowitz recursion for c servers,
  with the servers' identities kept (`fifo_slots`);
- engine replicas (continuous batching): the engine's own phase loop (admission, chunked prefill,
  the decode heap, skip-ahead over stretches of identical steps, per-step noise, accounting),
  compiled (`engine_replicas` in sim/_kernels.c, a line-for-line port of engine.EngineReplica).
  Replicas with a prefix cache, slow episodes or stalls, or calibrated ranges to check stay on
  the event path.

The result is the event path's to the bit: the same records, the same monitor samples and gauges
(the same accumulations, in the same order, per server), so every summary, figure and ledger is
the same. Two events at exactly the same instant (an arrival and a departure, say) happen with
probability zero with these arrival processes; the event path orders them by when they were scheduled,
this loop samples first, then departures (and step boundaries), then arrivals. A trace's own times
may repeat: the event path's order among equal arrivals is the trace's, as here, except where an
engine replica's wake-up or another class's arrival falls between them, so a trace with repeated
times runs here only alone on slot endpoints (and one trace class at most: two traces may coincide).
`simulation.fast_path: false` runs the event path (the reference); tests compare the two on every
eligible shipped workload and on generated ones. Without the compiled kernels, slot endpoints run
`fifo_slots`' Python twin and engine workloads the event path (the engine's Python reference), each
with a warning.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Optional

import numpy as np

from sim.config.arrivals import PoissonArrivals, TraceArrivals
from sim.config.schema import Api, SelfHosted, Workload
from sim.metrics.recorder import COMPLETED, NAN, REJECTED, Column, Recorder
from sim.model.kernels import PURE_PYTHON, compiled
from sim.model.offered import full_batch
from sim.model.serving.api import MIN_TOKENS_PER_S
from sim.model.serving.engine import Coefficients
from sim.model.serving.step_clock import BLOCK as NOISE_BLOCK
from sim.model.serving.step_clock import MAX_STRETCH, NoiseSource
from sim.model.streams import BLOCK, Streams, token_draw
from sim.model.traffic.arrivals import TIMED, _choice, times_sampler, user_count

INF = math.inf

_kernels = compiled("_kernels")  # None where built without a C compiler: the Python loops run (same results)
KERNEL_MISSING = ("the compiled kernels (sim/_kernels.c) are not built: the fast path runs its Python loop, the "
                  "same results several times slower; reinstall where a C compiler is available")
ENGINE_KERNEL_MISSING = ("the compiled kernels (sim/_kernels.c) are not built: the engine replicas run on the event "
                         "path, the same results 10-20 times slower; reinstall where a C compiler is available")


def eligible(workload: Workload) -> bool:
    """Whether the workload runs on the fast path (see the module's docstring)."""
    return _plain(workload) and (_kernels is not None or not has_engine(workload))


def engine_without_kernel(workload: Workload) -> bool:
    """Whether the workload would run on the fast path but for its engines' missing compiled kernel."""
    return _kernels is None and _plain(workload) and has_engine(workload)


def has_engine(workload: Workload) -> bool:
    return any(getattr(model, "engine", None) is not None for model in workload.models.values())


def _plain(workload: Workload) -> bool:
    if not workload.simulation.fast_path or workload.pipeline is not None or workload.rate_limits:
        return False
    classes = workload.traffic.classes.values()
    traces = [cls.arrival for cls in classes if isinstance(cls.arrival, TraceArrivals)]
    for cls in classes:
        open_loop = isinstance(cls.arrival, (PoissonArrivals, TraceArrivals, *TIMED))
        if not open_loop or cls.deadline_s is not None or cls.batch:
            return False
    if traces and (len(traces) > 1 or traces[0].replay.block_offsets is not None or (
            (len(classes) > 1 or has_engine(workload)) and not _distinct(_trace_times(traces[0], workload)))):
        return False
    for model in workload.models.values():
        if isinstance(model, SelfHosted):
            if model.autoscale is not None or model.scale_to_zero is not None:
                return False
            if model.engine is not None and not _plain_engine(model, workload.simulation.warm):
                return False
        elif isinstance(model, Api):
            if model.limits is not None or model.scale_to_zero is not None or model.prompt_cache is not None:
                return False
        else:  # pragma: no cover - the schema admits no other kind
            return False
        queue = model.queue
        if (queue is not None and (queue.discipline != "fifo" or queue.capacity is not None
                                   or queue.hold_back is not None or queue.overflow is not None)
                or model.connections is not None):
            return False
    return True


def _trace_times(arrival: TraceArrivals, workload: Workload) -> np.ndarray:
    """A trace's arrival times as TraceSource replays them: scaled, up to duration_s."""
    return arrival.replay.replayed_times(workload.simulation.duration_s, workload.traffic.rate_scale)


def _distinct(times: np.ndarray) -> bool:
    return bool(np.all(times[1:] > times[:-1]))


def _plain_engine(model: SelfHosted, warm: bool) -> bool:
    """Engine replicas the compiled loop runs: up from the start, no prefix cache, no slow time, no range check."""
    engine, st = model.engine, model.engine.step_time
    calibrated = st.calibrated
    checks_range = calibrated is not None and any(
        v is not None for v in (calibrated.decode_seqs_max, calibrated.prefill_tokens_max, calibrated.kv_tokens_max))
    return ((warm or model.cold_start_s <= 0) and engine.prefix_cache is None and st.slow_episodes is None
            and not st.stalls and not checks_range and st.base_s > 0)


def draws(draw: Callable[[np.random.Generator, int], np.ndarray], rng: np.random.Generator, n: int) -> np.ndarray:
    """The first n values a BlockSampler(draw, rng) would hand out: it draws whole blocks of BLOCK, so do we."""
    blocks = [draw(rng, BLOCK) for _ in range(-(-n // BLOCK))]
    return np.concatenate(blocks)[:n] if blocks else draw(rng, 0)  # (an empty draw takes nothing from rng)


def simulate_fast(workload: Workload, replication: int = 0, seed: Optional[int] = None,
                  progress: Optional[Callable[[float, int], None]] = None, ticks: int = 20) -> Recorder:
    """One replication of an `eligible` workload: the records `simulate` would return, without events."""
    from sim.model.pipeline import monitor_times  # the event path's module; imported late, it imports this one

    sim = workload.simulation
    streams = Streams(sim.seed if seed is None else seed, replication)
    rec = Recorder.for_workload(workload)
    _arrivals(rec, workload, streams)
    samples = list(monitor_times(sim, workload.measure_end_s()))
    counters: list[dict] = [{} for _ in samples]
    gauges: list[dict] = [{} for _ in samples]
    n = len(rec.arrival)
    admit, first, end, replica = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1)
    endpoint = np.asarray(rec.endpoint, dtype=np.int64)
    arrival, output = np.asarray(rec.arrival, dtype=float), np.asarray(rec.output, dtype=np.int64)
    prompt = np.asarray(rec.prompt, dtype=np.int64)
    sample_times = np.asarray(samples, dtype=float)
    for k, (name, model) in enumerate(workload.models.items()):
        mine = np.flatnonzero(endpoint == k) if len(workload.models) > 1 else slice(None)
        if getattr(model, "engine", None) is not None:
            servers = model.replicas
            times = engine_replicas(workload, name, streams, arrival[mine], prompt[mine], output[mine], sample_times)
            rec.events += times[-1]
        else:
            service, ttft = _service(model, name, streams, output[mine])
            servers, slots = ((model.replicas, model.max_batch) if isinstance(model, SelfHosted)
                              else (1, model.concurrency))
            times = fifo_slots(arrival[mine], np.ascontiguousarray(service, dtype=float),
                               np.ascontiguousarray(ttft, dtype=float), servers, slots, sample_times)
        admit[mine], first[mine], end[mine], replica[mine], sampled = times[:5]
        for s, (busy, area, work, held, waiting) in enumerate(sampled.tolist()):
            counters[s][name] = (busy, area, work, held)
            gauges[s][name] = (servers, servers, int(waiting))
    rec.admit, rec.first_token, rec.end = Column.of(admit, "d"), Column.of(first, "d"), Column.of(end, "d")
    # Every request completes (the run drains) but those that can never fit an engine's KV cache.
    rec.replica, rec.outcome = Column.of(replica, "q"), Column.of(np.where(np.isnan(admit), REJECTED, COMPLETED), "q")
    if _kernels is None and not PURE_PYTHON:  # not built (PURE_PYTHON: the Python loop was asked for)
        rec.warnings.append(KERNEL_MISSING)
    rec.samples = list(zip(samples, counters))
    rec.gauges = list(zip(samples, gauges))
    if progress is not None:  # the run is over before a person could read a line; say it all at once
        arrival = np.asarray(rec.arrival)
        for tick in range(1, ticks + 1):
            progress(tick / ticks, int(np.searchsorted(arrival, tick / ticks * sim.duration_s)))
    return rec


def _arrivals(rec: Recorder, workload: Workload, streams: Streams) -> None:
    """Every class's arrivals and their draws (tokens, user, feature, endpoint), merged in time order."""
    sim = workload.simulation
    endpoint_index = {name: k for k, name in enumerate(workload.models)}
    feature_index = {name: k for k, name in enumerate(rec.feature_names)}
    columns = []
    first_user = 0
    trace_ids = None  # (class, the trace's request ids) of a trace with ids
    for k, (name, cls) in enumerate(workload.traffic.classes.items()):
        rate_scale = workload.traffic.rate_scale
        if isinstance(cls.arrival, TraceArrivals):  # times and tokens from the trace (TraceSource)
            times = _trace_times(cls.arrival, workload)
            n = len(times)
            prompt, output = cls.arrival.replay.prompt[:n], cls.arrival.replay.output[:n]
            ids = cls.arrival.replay.request_ids
            if ids is not None:
                trace_ids = (k, ids[:n])
        else:
            if isinstance(cls.arrival, PoissonArrivals):
                times = _sampled_times(_PoissonTimes(cls.arrival.rate_rps * rate_scale),
                                       streams.rng(f"class.{name}.arrivals"), sim.duration_s)
            else:
                times = _sampled_times(*times_sampler(name, cls.arrival, rate_scale, sim.duration_s, streams),
                                       sim.duration_s)
            n = len(times)
            prompt = draws(token_draw(cls.prompt_tokens), streams.rng(f"class.{name}.prompt"), n)
            output = draws(token_draw(cls.output_tokens), streams.rng(f"class.{name}.output"), n)
        if cls.max_output_tokens is not None:
            output = np.minimum(output, cls.max_output_tokens)
        users = cls.users
        user = np.full(n, first_user, dtype=np.int64)
        if users.count > 1:
            weights = (np.arange(1, users.count + 1, dtype=float) ** -users.zipf_s).tolist()
            user += draws(_choice(weights), streams.rng(f"class.{name}.users"), n)
        first_user += user_count(cls)
        mix = cls.endpoint_mix()
        targets = np.asarray([endpoint_index[e] for e in mix], dtype=np.int64)
        endpoint = (targets[draws(_choice(list(mix.values())), streams.rng(f"class.{name}.endpoints"), n)]
                    if len(mix) > 1 else np.full(n, targets[0]))
        mixed = cls.features or {}
        ids = np.asarray([feature_index[f] for f in mixed] or [-1], dtype=np.int64)
        feature = (ids[draws(_choice(list(mixed.values())), streams.rng(f"class.{name}.features"), n)]
                   if len(mixed) > 1 else np.full(n, ids[0]))
        columns.append((times, np.full(n, k), endpoint, prompt, output, user, feature))
    merged = [np.concatenate(c) for c in zip(*columns)]
    if len(columns) > 1:  # by time; equal times (probability zero) by class order
        order = np.argsort(merged[0], kind="stable")
        merged = [c[order] for c in merged]
    arrival, cls_, endpoint, prompt, output, user, feature = merged
    if trace_ids is not None:  # as TraceSource keeps them: by request index, up to the trace's last request
        k, ids = trace_ids
        mine = np.flatnonzero(cls_ == k)
        rec.trace_id = [None] * (int(mine[-1]) + 1 if len(mine) else 0)
        for i, trace_id in zip(mine.tolist(), ids.tolist()):
            rec.trace_id[i] = trace_id
    rec.arrival = Column.of(arrival, "d")
    # Unboxed columns throughout: nothing reads a request's record back one at a time here, as the event path does.
    rec.cls, rec.endpoint = Column.of(cls_, "q"), Column.of(endpoint, "q")
    rec.prompt, rec.output = Column.of(prompt, "q"), Column.of(output, "q")
    rec.user, rec.feature = Column.of(user, "q"), Column.of(feature, "q")


class _PoissonTimes:
    """PoissonSource's arrival times as a block sampler: now + gap, one gap after another. A cumulative sum
    adds one after another, as the event path's now + gap does, so the times are the same to the bit."""

    def __init__(self, rate: float) -> None:
        self.mean_gap = 1.0 / rate
        self.now = 0.0

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        gaps = self.mean_gap * rng.standard_exponential(n)  # the event path's draw
        times = np.cumsum(np.concatenate([[self.now], gaps]))[1:]
        self.now = float(times[-1])
        return times


def _sampled_times(sampler: Callable[[np.random.Generator, int], np.ndarray], rng: np.random.Generator,
                   until: float) -> np.ndarray:
    """Arrival times as a source hands them out: the sampler's blocks, up to the first at or past `until`."""
    times = []
    while True:
        block = np.asarray(sampler(rng, BLOCK), dtype=float)
        inside = int(np.searchsorted(block, until, side="left"))
        times.append(block[:inside])
        if inside < len(block):
            return np.concatenate(times)


def _service(model, name: str, streams: Streams, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request of the endpoint, in arrival order: (time holding a slot, time to the first token)."""
    n = len(output)
    if model.service_time is not None:
        service = draws(model.service_time.sample, streams.rng(f"endpoint.{name}.service"), n)
        return service, service
    first = draws(model.ttft_s.sample, streams.rng(f"endpoint.{name}.service"), n)
    speed = draws(model.output_tokens_per_s.sample, streams.rng(f"endpoint.{name}.speed"), n)
    return first + (output - 1) / np.maximum(speed, MIN_TOKENS_PER_S), first


def engine_replicas(workload: Workload, name: str, streams: Streams, arrival: np.ndarray, prompt: np.ndarray,
                    output: np.ndarray, samples: np.ndarray) -> tuple:
    """Endpoint `name`'s engine replicas serving its requests, as the event path's EngineReplicas do.

    Returns per request (admit, first token, end, replica) and per sample time a row (busy, area, work,
    held, waiting), as `fifo_slots` does, then the phases the replicas planned (the event path's
    boundary events). A request that can never fit the KV cache keeps admit NaN (rejected at arrival).
    """
    model = workload.models[name]
    engine, st = model.engine, model.engine.step_time
    n, m = len(arrival), len(samples)
    admit, first, end = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    replica, sampled = np.full(n, -1, dtype=np.int64), np.zeros((m, 5))
    noise = [NoiseSource(st.noise_cv, streams.rng(f"endpoint.{name}.replica{r}.noise"))
             for r in range(model.replicas)] if st.noise_cv > 0 else []
    phases = _kernels.engine_replicas(
        np.ascontiguousarray(arrival, dtype=float), np.ascontiguousarray(prompt, dtype=np.int64),
        np.ascontiguousarray(output, dtype=np.int64), samples, noise, model.replicas, model.max_batch,
        engine.max_batch_tokens, -1 if engine.kv_cache_tokens is None else engine.kv_cache_tokens, MAX_STRETCH,
        NOISE_BLOCK, *Coefficients.of(st, model.max_batch, full_batch(workload, name)), admit, first, end, replica,
        sampled)
    return admit, first, end, replica, sampled, phases


def fifo_slots(arrival: np.ndarray, service: np.ndarray, ttft: np.ndarray, servers: int, slots: int,
               samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FIFO requests on `servers` servers of `slots` slots each, as the event path serves them.

    Returns per request (admit, first token, end, server) and per sample time a row (busy, area, work,
    held, waiting): each server's counters accumulated at the same instants, in the same order, as
    SlotServer._account does, and summed over the servers in order as Endpoint.counters does. The
    compiled kernel (sim/_kernels.c) where it was built, else the same loop in Python.
    """
    n, m = len(arrival), len(samples)
    admit, first, end = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    replica, sampled = np.full(n, -1, dtype=np.int64), np.zeros((m, 5))
    if _kernels is not None:
        _kernels.fifo_slots(np.ascontiguousarray(arrival, dtype=float), service, ttft, servers, slots, samples,
                            admit, first, end, replica, sampled)
        return admit, first, end, replica, sampled
    out = fifo_slots_python(arrival.tolist(), service.tolist(), ttft.tolist(), servers, slots, samples.tolist())
    return (np.asarray(out[0]), np.asarray(out[1]), np.asarray(out[2]), np.asarray(out[3], dtype=np.int64),
            np.asarray(out[4], dtype=float).reshape(m, 5))


def fifo_slots_python(arrival: list[float], service: list[float], ttft: list[float], servers: int, slots: int,
                      samples: list[float]) -> tuple[list, list, list, list, list]:
    """fifo_slots in Python: the reference the compiled kernel follows operation for operation."""
    n = len(arrival)
    admit, first, end, replica = [NAN] * n, [NAN] * n, [NAN] * n, [-1] * n
    load, last, busy, area = [0] * servers, [0.0] * servers, [0.0] * servers, [0.0] * servers
    departures: list[tuple[float, int, int, int]] = []  # (time, order sent, server, request)
    sampled = []
    head = k = order = s_next = 0  # head: next request to start; k: next arrival
    next_sample = samples[0] if samples else INF
    push, pop = heapq.heappush, heapq.heappop
    while True:
        ta = arrival[k] if k < n else INF
        td = departures[0][0] if departures else INF
        if next_sample <= ta and next_sample <= td:
            if next_sample == INF:
                break
            t = next_sample
            totals = [0.0, 0.0, 0.0, 0.0]
            for s in range(servers):
                if load[s]:
                    elapsed = t - last[s]
                    busy[s] += elapsed
                    area[s] += load[s] * elapsed
                last[s] = t
                totals[0] += busy[s]
                totals[1] += area[s]
                totals[2] += area[s] / slots
                totals[3] += t - 0.0
            sampled.append((totals[0], totals[1], totals[2], totals[3], k - head))
            s_next += 1
            next_sample = samples[s_next] if s_next < len(samples) else INF
            continue
        if td <= ta:  # a departure (on a tie with an arrival, first: see the module's docstring)
            t, _, s, i = pop(departures)
            elapsed = t - last[s]  # its server held it: load >= 1
            busy[s] += elapsed
            area[s] += load[s] * elapsed
            last[s] = t
            load[s] -= 1
            end[i] = t
            if head < k:  # the queue's head takes the freed slot
                i = head
                head += 1
                # (accounting again at the same instant adds nothing)
                last[s] = t
                load[s] += 1
                admit[i], replica[i], first[i] = t, s, t + ttft[i]
                push(departures, (t + service[i], order, s, i))
                order += 1
            continue
        i = k
        k += 1
        if head < i:  # someone waits: it joins the queue
            continue
        best = -1
        for s in range(servers):
            if (best < 0 or load[s] < load[best]) and load[s] < slots:
                best = s
        if best < 0:
            continue
        s = best
        if load[s]:
            elapsed = ta - last[s]
            busy[s] += elapsed
            area[s] += load[s] * elapsed
        last[s] = ta
        load[s] += 1
        head += 1
        admit[i], replica[i], first[i] = ta, s, ta + ttft[i]
        push(departures, (ta + service[i], order, s, i))
        order += 1
    return admit, first, end, replica, sampled
