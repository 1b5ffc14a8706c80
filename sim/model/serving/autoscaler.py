"""Replica autoscaling for self-hosted endpoints, the way a Kubernetes HPA does it.

Every `interval_s` it measures the metric summed over replicas, asks for
ceil(total / target) replicas (clamped to [min, max]), as ceil(replicas x
per-replica metric / target) does when every replica is up; starts new
ones at once (each pays the cold start before it serves) and removes surplus
ones only after a cooldown since the last change (they drain: no new requests,
billed until their running requests finish).

`ScaleToZero` releases an endpoint's capacity once it has been empty for a while
and brings it back, cold, when the next request comes (Knative's and serverless
inference's scale to zero); while it is asleep the autoscaler stands by.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import simpy

from sim.config.schema import Autoscale
from sim.config.serving import ScaleToZero as ScaleToZeroSpec
from sim.model.events import call_later

from .endpoint import Endpoint
from .engine import ReplicaLifecycle


class Autoscaler:
    """Watches one endpoint and adds or drains its replicas."""

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, spec: Autoscale,
                 new_replica: Callable[[], ReplicaLifecycle], until: float,
                 idle: Optional["ScaleToZero"] = None) -> None:
        self.env = env
        self.endpoint = endpoint
        self.spec = spec
        self.new_replica = new_replica
        self.until = until
        self.idle = idle  # while it holds the endpoint at zero, no replica is added
        self.last_change = 0.0
        self.last_work = 0.0

    def start(self) -> None:
        call_later(self.env, self.spec.interval_s, self._tick)

    def active(self) -> list[ReplicaLifecycle]:
        """Replicas that count: serving or loading (not draining, not retired)."""
        return [r for r in self.endpoint.servers if not r.draining]

    def demand(self, active: list[ReplicaLifecycle]) -> float:
        """The metric summed over replicas: replicas needed = ceil(demand / target).

        Summing (rather than averaging over replicas, loading ones included) keeps a
        replica that is still loading from looking idle: the HPA's own precaution.
        """
        metric = self.spec.metric
        if metric == "utilisation":  # full-batch capacity in use over the last interval
            work = self.endpoint.counters(self.env.now)[2]
            done, self.last_work = work - self.last_work, work
            return done / self.spec.interval_s
        if metric == "queue_length":
            return float(self.endpoint.waiting)
        return float(self.endpoint.waiting + sum(r.load for r in active))

    def _tick(self, event) -> None:
        now = self.env.now
        endpoint = self.endpoint
        # Retired replicas leave the dispatch list (which every arrival scans) but keep counting.
        endpoint.retired += [r for r in endpoint.servers if r.retired is not None]
        endpoint.servers = [r for r in endpoint.servers if r.retired is None]
        active = self.active()
        spec = self.spec
        needed = math.ceil(self.demand(active) / spec.target - 1e-9)
        desired = min(spec.max_replicas, max(spec.min_replicas, needed))
        if self.idle is not None and self.idle.asleep:
            desired = len(active)  # scaled to zero: the next request wakes the endpoint, not the autoscaler
        if desired > len(active):
            for _ in range(desired - len(active)):
                replica = self.new_replica()
                endpoint.servers.append(replica)
                if replica.serving:  # no cold start: it takes queued requests now (a loading one does once loaded)
                    endpoint.refill(replica)
            self.last_change = now
        elif desired < len(active) and now - self.last_change >= spec.scale_down_cooldown_s:
            # Drain the least useful first: still loading, then the least loaded.
            for replica in sorted(active, key=lambda r: (r.serving, r.load, -r.index))[: len(active) - desired]:
                replica.drain()
            self.last_change = now
        if now + spec.interval_s < self.until:
            call_later(self.env, spec.interval_s, self._tick)


class ScaleToZero:
    """Puts an endpoint to sleep once it has been empty (nothing waiting or running) for `idle_s`.

    Asleep, a self-hosted endpoint holds no replica (none is billed) and an API endpoint no slot;
    the next arrival wakes it: `replicas` new replicas (autoscale: min_replicas), or the API's
    slots, come up after `cold_start_s`, and requests wait in the queue meanwhile.

    It sees arrivals and departures by wrapping the endpoint's `submit` (at build time, before
    anything holds on to it) and its `on_done` and `cancel` (`watch`, once the request lifecycle
    has set them). Every arrival and every new idle stretch bumps `generation`: an idle timer
    fires only if nothing happened since it was set.
    """

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, spec: ScaleToZeroSpec,
                 new_replica: Optional[Callable[[float], ReplicaLifecycle]] = None, replicas: int = 1) -> None:
        self.env = env
        self.endpoint = endpoint
        self.spec = spec
        self.new_replica = new_replica  # self-hosted: starts a replica loading for the given seconds
        self.replicas = replicas
        self.asleep = False
        self.generation = 0
        self.wakes: list[float] = []  # when it woke (each wake is a cold start)
        self._submit = endpoint.submit
        endpoint.submit = self.arrive
        endpoint.idle = self

    def arrive(self, i: int) -> None:
        """Request i arrives: an idle timer set before is void; asleep, the endpoint wakes first."""
        self.generation += 1
        if self.asleep:
            self._wake()
        self._submit(i)

    def watch(self) -> None:
        """Start watching departures (after the lifecycle set `on_done`): empty from time 0, it may sleep."""
        endpoint = self.endpoint
        done, cancel = endpoint.on_done, endpoint.cancel

        def departed(i: int) -> None:
            if done is not None:
                done(i)
            if self._empty():
                self._arm()

        def cancelled(i: int, outcome: int) -> None:
            cancel(i, outcome)
            # An engine frees a cancelled sequence's place at the end of the step in progress (milliseconds
            # later), with no hook: the idle stretch counts from the cancel, and the timer checks it is empty.
            self._arm()

        endpoint.on_done, endpoint.cancel = departed, cancelled
        self._arm()

    def _empty(self) -> bool:
        endpoint = self.endpoint
        return not endpoint.waiting and not any(server.load for server in endpoint.servers)

    def _arm(self) -> None:
        self.generation += 1
        call_later(self.env, self.spec.idle_s, self._idle_for_long, self.generation)

    def _idle_for_long(self, event) -> None:
        if event.value == self.generation and not self.asleep and self._empty():
            self._sleep()

    def _sleep(self) -> None:
        self.asleep = True
        endpoint = self.endpoint
        if self.new_replica is None:
            for server in endpoint.servers:
                server.sleep()
            return
        for replica in endpoint.servers:
            if replica.retired is None:
                replica.drain()  # empty: it retires (stops billing) now, loading or not
        endpoint.retired += endpoint.servers
        endpoint.servers = []

    def _wake(self) -> None:
        self.asleep = False
        self.wakes.append(self.env.now)
        cold = self.spec.cold_start_s
        if self.new_replica is None:
            for server in self.endpoint.servers:
                server.wake(cold)
            return
        for _ in range(self.replicas):
            self.endpoint.servers.append(self.new_replica(cold))
