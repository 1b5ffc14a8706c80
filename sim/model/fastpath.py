"""A run without events, for the workloads where none is needed: open-loop traffic on FIFO slots.

When every class arrives open-loop (Poisson, schedule, diurnal, MMPP or gamma: its arrival times do
not depend on the system) and every endpoint is a plain FIFO queue in front of
slot servers (`service_time` replicas or API concurrency slots) with nothing that reacts to time
(no rate or provider limits, deadlines, queue caps, priorities, connection pools, autoscaling, scale
to zero, batch lanes or pipeline), nothing a request does depends on an event other than its
arrival and the departures before it: FIFO servers serve requests in arrival order, each on the
server the event path would pick (the least loaded at arrival when nobody waits, else the one
whose slot frees first). So the whole run is a loop over arrivals and departures in time order
(the Kiefer-Wolfowitz recursion for c servers, with the servers' identities kept), fed by random
draws made in blocks from the same named streams in the same order as the event path's.

The result is the event path's to the bit: the same records, the same monitor samples and gauges
(the same accumulations, in the same order, per server), so every summary, figure and ledger is
the same. Two events at exactly the same instant (an arrival and a departure, say) happen with
probability zero with these arrival processes; the event path orders them by when they were scheduled,
this loop departures first. `simulation.fast_path: false` runs the event path (the reference);
tests compare the two on every eligible shipped workload and on generated ones.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Optional

import numpy as np

from sim.config.arrivals import PoissonArrivals
from sim.config.schema import Api, SelfHosted, Workload
from sim.metrics.recorder import COMPLETED, NAN, Column, Recorder
from sim.model.serving.api import MIN_TOKENS_PER_S
from sim.model.streams import BLOCK, Streams, token_draw
from sim.model.traffic.arrivals import TIMED, _choice, delay_to, times_sampler, user_count

INF = math.inf

try:
    from sim import _kernels
except ImportError:  # built without a C compiler: the Python loops run instead (same results)
    _kernels = None
KERNEL_MISSING = ("the compiled kernels (sim/_kernels.c) are not built: the fast path runs its Python loop, the "
                  "same results several times slower; reinstall where a C compiler is available")


def eligible(workload: Workload) -> bool:
    """Whether the workload runs on the fast path (see the module's docstring)."""
    if not workload.simulation.fast_path or workload.pipeline is not None or workload.rate_limits:
        return False
    for cls in workload.traffic.classes.values():
        if not isinstance(cls.arrival, (PoissonArrivals, *TIMED)) or cls.deadline_s is not None or cls.batch:
            return False
    for model in workload.models.values():
        if isinstance(model, SelfHosted):
            if (model.engine is not None or model.autoscale is not None or model.scale_to_zero is not None
                    or model.service_time is None):
                return False
        elif isinstance(model, Api):
            if model.limits is not None or model.scale_to_zero is not None or model.prompt_cache is not None:
                return False
        else:  # pragma: no cover - the schema admits no other kind
            return False
        queue = model.queue
        if (queue is not None and (queue.discipline != "fifo" or queue.capacity is not None
                                   or queue.hold_back is not None)) or model.connections is not None:
            return False
    return True


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
    for k, (name, model) in enumerate(workload.models.items()):
        mine = np.flatnonzero(endpoint == k) if len(workload.models) > 1 else slice(None)
        service, ttft = _service(model, name, streams, output[mine])
        servers, slots = (model.replicas, model.max_batch) if isinstance(model, SelfHosted) else (1, model.concurrency)
        times = fifo_slots(arrival[mine], np.ascontiguousarray(service, dtype=float),
                           np.ascontiguousarray(ttft, dtype=float), servers, slots, np.asarray(samples, dtype=float))
        admit[mine], first[mine], end[mine], replica[mine], sampled = times
        for s, (busy, area, work, held, waiting) in enumerate(sampled.tolist()):
            counters[s][name] = (busy, area, work, held)
            gauges[s][name] = (servers, servers, int(waiting))
    rec.admit, rec.first_token, rec.end = Column.of(admit, "d"), Column.of(first, "d"), Column.of(end, "d")
    rec.replica, rec.outcome = Column.of(replica, "q"), [COMPLETED] * n
    if _kernels is None:
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
    for k, (name, cls) in enumerate(workload.traffic.classes.items()):
        rate_scale = workload.traffic.rate_scale
        if isinstance(cls.arrival, PoissonArrivals):
            times = _sampled_times(_PoissonTimes(cls.arrival.rate_rps * rate_scale),
                                   streams.rng(f"class.{name}.arrivals"), sim.duration_s)
        else:
            times = _landed(_sampled_times(*times_sampler(name, cls.arrival, rate_scale, sim.duration_s, streams),
                                           sim.duration_s))
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
    rec.arrival = Column.of(arrival, "d")
    rec.cls, rec.endpoint, rec.prompt, rec.output = cls_.tolist(), endpoint.tolist(), prompt.tolist(), output.tolist()
    rec.user, rec.feature = user.tolist(), feature.tolist()


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


def _landed(times: np.ndarray) -> np.ndarray:
    """When a TimesSource's arrivals happen: each is scheduled from the one before with `delay_to`, which lands
    on its time exactly but for the rare time an ulp away (its fallback); replay that arithmetic."""
    before = np.concatenate([[0.0], times[:-1]])
    if np.array_equal(before + (times - before), times):
        return times
    landed, now = [], 0.0
    for t in times.tolist():
        now = now + delay_to(now, t)
        landed.append(now)
    return np.asarray(landed)


def _service(model, name: str, streams: Streams, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per request of the endpoint, in arrival order: (time holding a slot, time to the first token)."""
    n = len(output)
    if model.service_time is not None:
        service = draws(model.service_time.sample, streams.rng(f"endpoint.{name}.service"), n)
        return service, service
    first = draws(model.ttft_s.sample, streams.rng(f"endpoint.{name}.service"), n)
    speed = draws(model.output_tokens_per_s.sample, streams.rng(f"endpoint.{name}.speed"), n)
    return first + (output - 1) / np.maximum(speed, MIN_TOKENS_PER_S), first


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
