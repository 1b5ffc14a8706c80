"""Replica autoscaling for self-hosted endpoints, the way a Kubernetes HPA does it.

Every `interval_s` it measures the metric summed over replicas, asks for
ceil(total / target) replicas (clamped to [min, max]), as ceil(replicas x
per-replica metric / target) does when every replica is up; starts new
ones at once (each pays the cold start before it serves) and removes surplus
ones only after a cooldown since the last change (they drain: no new requests,
billed until their running requests finish).
"""
from __future__ import annotations

import math
from typing import Callable

import simpy

from sim.config.schema import Autoscale
from sim.model.events import call_later

from .endpoint import Endpoint
from .engine import EngineReplica


class Autoscaler:
    """Watches one endpoint and adds or drains its replicas."""

    def __init__(self, env: simpy.Environment, endpoint: Endpoint, spec: Autoscale,
                 new_replica: Callable[[], EngineReplica], until: float) -> None:
        self.env = env
        self.endpoint = endpoint
        self.spec = spec
        self.new_replica = new_replica
        self.until = until
        self.last_change = 0.0
        self.last_work = 0.0

    def start(self) -> None:
        call_later(self.env, self.spec.interval_s, self._tick)

    def active(self) -> list[EngineReplica]:
        """Replicas that count: serving or loading (not draining, not retired)."""
        return [r for r in self.endpoint.servers if not r.draining]

    def demand(self, active: list[EngineReplica]) -> float:
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
        if desired > len(active):
            for _ in range(desired - len(active)):
                self.endpoint.servers.append(self.new_replica())
            self.last_change = now
        elif desired < len(active) and now - self.last_change >= spec.scale_down_cooldown_s:
            # Drain the least useful first: still loading, then the least loaded.
            for replica in sorted(active, key=lambda r: (r.serving, r.load, -r.index))[: len(active) - desired]:
                replica.drain()
            self.last_change = now
        if now + spec.interval_s < self.until:
            call_later(self.env, spec.interval_s, self._tick)
