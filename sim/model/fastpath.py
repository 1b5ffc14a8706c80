"""A run without events, for the workloads where none is needed: open-loop Poisson traffic on FIFO slots.

When every class arrives as a Poisson process and every endpoint is a plain FIFO queue in front of
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
probability zero under Poisson arrivals; the event path orders them by when they were scheduled,
this loop departures first. `simulation.fast_path: false` runs the event path (the reference);
tests compare the two on every eligible shipped workload and on generated ones.
"""
from __future__ import annotations

import heapq
import math
from itertools import islice
from typing import Callable, Optional

import numpy as np

from sim.config.arrivals import PoissonArrivals
from sim.config.schema import Api, SelfHosted, Workload
from sim.metrics.recorder import COMPLETED, NAN, Recorder
from sim.model.serving.api import MIN_TOKENS_PER_S
from sim.model.streams import BlockSampler, Streams, token_draw
from sim.model.traffic.arrivals import _choice

INF = math.inf


def eligible(workload: Workload) -> bool:
    """Whether the workload runs on the fast path (see the module's docstring)."""
    if not workload.simulation.fast_path or workload.pipeline is not None or workload.rate_limits:
        return False
    for cls in workload.traffic.classes.values():
        if not isinstance(cls.arrival, PoissonArrivals) or cls.deadline_s is not None or cls.batch:
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


def draws(sampler: BlockSampler, n: int) -> list:
    """The next n values of a block sampler, as n calls of it would hand them out."""
    return list(islice(iter(sampler, None), n))


def simulate_fast(workload: Workload, replication: int = 0, seed: Optional[int] = None,
                  progress: Optional[Callable[[float, int], None]] = None, ticks: int = 20) -> Recorder:
    """One replication of an `eligible` workload: the records `simulate` would return, without events."""
    from sim.model.pipeline import monitor_times  # the event path's module; imported late, it imports this one

    sim = workload.simulation
    streams = Streams(sim.seed if seed is None else seed, replication)
    classes = workload.traffic.classes
    features = list(dict.fromkeys(f for cls in classes.values() for f in (cls.features or {})))
    rec = Recorder(list(classes), list(workload.models), features, [c.priority for c in classes.values()])
    _arrivals(rec, workload, streams, features)
    samples = list(monitor_times(sim, workload.measure_end_s()))
    counters: list[dict] = [{} for _ in samples]
    gauges: list[dict] = [{} for _ in samples]
    n = len(rec.arrival)
    rec.admit, rec.first_token, rec.end = [NAN] * n, [NAN] * n, [NAN] * n
    rec.replica, rec.outcome = [-1] * n, [COMPLETED] * n
    endpoint = np.asarray(rec.endpoint, dtype=np.int64)
    for k, (name, model) in enumerate(workload.models.items()):
        mine = np.flatnonzero(endpoint == k).tolist()
        service, ttft = _service(model, name, streams, [rec.output[i] for i in mine])
        servers, slots = (model.replicas, model.max_batch) if isinstance(model, SelfHosted) else (1, model.concurrency)
        times = fifo_slots([rec.arrival[i] for i in mine], service, ttft, servers, slots, samples)
        admit, first, end, replica, sampled = times
        for j, i in enumerate(mine):
            rec.admit[i], rec.first_token[i], rec.end[i], rec.replica[i] = admit[j], first[j], end[j], replica[j]
        for s, (busy, area, work, held, waiting) in enumerate(sampled):
            counters[s][name] = (busy, area, work, held)
            gauges[s][name] = (servers, servers, waiting)
    rec.samples = list(zip(samples, counters))
    rec.gauges = list(zip(samples, gauges))
    if progress is not None:  # the run is over before a person could read a line; say it all at once
        arrival = np.asarray(rec.arrival)
        for tick in range(1, ticks + 1):
            progress(tick / ticks, int(np.searchsorted(arrival, tick / ticks * sim.duration_s)))
    return rec


def _arrivals(rec: Recorder, workload: Workload, streams: Streams, features: list[str]) -> None:
    """Every class's Poisson arrivals and their draws (tokens, user, feature, endpoint), merged in time order."""
    sim = workload.simulation
    endpoint_index = {name: k for k, name in enumerate(workload.models)}
    feature_index = {name: k for k, name in enumerate(features)}
    columns = []
    first_user = 0
    for k, (name, cls) in enumerate(workload.traffic.classes.items()):
        times = _poisson_times(cls.arrival.rate_rps * workload.traffic.rate_scale,
                               streams.rng(f"class.{name}.arrivals"), sim.duration_s)
        n = len(times)
        prompt = draws(BlockSampler(token_draw(cls.prompt_tokens), streams.rng(f"class.{name}.prompt")), n)
        output = draws(BlockSampler(token_draw(cls.output_tokens), streams.rng(f"class.{name}.output")), n)
        if cls.max_output_tokens is not None:
            output = [min(o, cls.max_output_tokens) for o in output]
        users = cls.users
        if users.count > 1:
            weights = (np.arange(1, users.count + 1, dtype=float) ** -users.zipf_s).tolist()
            user = [first_user + u for u in draws(BlockSampler(_choice(weights), streams.rng(f"class.{name}.users")), n)]
        else:
            user = [first_user] * n
        first_user += users.count
        mix = cls.endpoint_mix()
        targets = [endpoint_index[e] for e in mix]
        endpoint = ([targets[e] for e in draws(BlockSampler(_choice(list(mix.values())),
                                                            streams.rng(f"class.{name}.endpoints")), n)]
                    if len(mix) > 1 else [targets[0]] * n)
        mixed = cls.features or {}
        if len(mixed) > 1:
            ids = [feature_index[f] for f in mixed]
            feature = [ids[f] for f in draws(BlockSampler(_choice(list(mixed.values())),
                                                          streams.rng(f"class.{name}.features")), n)]
        else:
            feature = [feature_index[next(iter(mixed))] if mixed else -1] * n
        columns.append((times, [k] * n, endpoint, prompt, output, user, feature))
    if len(columns) == 1:
        times, cls_, endpoint, prompt, output, user, feature = columns[0]
    else:  # by time; equal times (probability zero) by class order
        merged = sorted((t, k, j) for k, col in enumerate(columns) for j, t in enumerate(col[0]))
        pick = lambda c: [columns[k][c][j] for _, k, j in merged]  # noqa: E731
        times, cls_, endpoint, prompt, output, user, feature = (pick(c) for c in range(7))
    rec.arrival, rec.cls, rec.endpoint = list(times), list(cls_), list(endpoint)
    rec.prompt, rec.output, rec.user, rec.feature = list(prompt), list(output), list(user), list(feature)


def _poisson_times(rate: float, rng: np.random.Generator, until: float) -> list[float]:
    """Arrival times as PoissonSource makes them: now + gap, one gap after another, while before `until`."""
    mean_gap = 1.0 / rate
    gap = BlockSampler(lambda r, n: mean_gap * r.standard_exponential(n), rng)
    times = []
    now = 0.0
    while True:
        # A block at a time: cumulative sums are sequential additions, as the event path's now + gap.
        block = np.cumsum(np.asarray([now] + draws(gap, 4096)))[1:]
        inside = int(np.searchsorted(block, until, side="left"))
        times += block[:inside].tolist()
        if inside < len(block):
            return times
        now = float(block[-1])


def _service(model, name: str, streams: Streams, output: list[int]) -> tuple[list[float], list[float]]:
    """Per request of the endpoint, in arrival order: (time holding a slot, time to the first token)."""
    n = len(output)
    if model.service_time is not None:
        service = draws(BlockSampler(model.service_time.sample, streams.rng(f"endpoint.{name}.service")), n)
        return service, service
    first = draws(BlockSampler(model.ttft_s.sample, streams.rng(f"endpoint.{name}.service")), n)
    speed = draws(BlockSampler(model.output_tokens_per_s.sample, streams.rng(f"endpoint.{name}.speed")), n)
    service = [f + (o - 1) / max(s, MIN_TOKENS_PER_S) for f, o, s in zip(first, output, speed)]
    return service, first


def fifo_slots(arrival: list[float], service: list[float], ttft: list[float], servers: int, slots: int,
               samples: list[float]) -> tuple[list, list, list, list, list]:
    """FIFO requests on `servers` servers of `slots` slots each, as the event path serves them.

    Returns per request (admit, first token, end, server) and per sample time (busy, area, work, held,
    waiting): each server's counters accumulated at the same instants, in the same order, as
    SlotServer._account does, and summed over the servers in order as Endpoint.counters does.
    """
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
