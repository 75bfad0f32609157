"""What a listener does with each new connection: pick a route (weighted), then
an endpoint of that route's cluster (by the cluster's load-balancing policy),
within the cluster's connection limit. The engines carry this out per
connection; this module only describes it.

Outcomes that are not a connection, with Envoy's response flags: no route
(NR), a cluster with no endpoint (UH), a cluster at maxConnections (UO).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Sequence

# In the engines' order. PASSTHROUGH sends each connection to the client's original
# destination (before iptables REDIRECT), not to the cluster's endpoints.
LB_POLICIES = ("ROUND_ROBIN", "LEAST_CONN", "RANDOM", "PASSTHROUGH")

# Engine.stats() keys for connections that got no upstream, summed over the workers.
ROUTING_STATS = ("no_route", "no_healthy_upstream", "upstream_overflows")


@dataclass(frozen=True)
class Cluster:
    """Endpoints of one service (and subset) on one port, as Envoy's clusters."""

    name: str  # Envoy's form: outbound|PORT|SUBSET|HOST
    service: str = ""  # the host, for destination_service
    endpoints: tuple[tuple[str, int], ...] = ()
    mesh_peers: tuple[bool, ...] = ()  # per endpoint: it runs a sidecar, so the exchange is used
    lb: str = "ROUND_ROBIN"
    max_connections: int = 0  # 0: no limit
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.mesh_peers and len(self.mesh_peers) != len(self.endpoints):
            raise ValueError(f"cluster {self.name}: mesh_peers names {len(self.mesh_peers)} endpoints, "
                             f"it has {len(self.endpoints)}")
        if self.lb not in LB_POLICIES:
            raise ValueError(f"cluster {self.name}: load balancer {self.lb!r} is not one of {LB_POLICIES}")
        if not 0 < self.connect_timeout < 1e9:
            raise ValueError(f"cluster {self.name}: connect timeout must be positive, not {self.connect_timeout}")
        if self.max_connections < 0:
            raise ValueError(f"cluster {self.name}: max_connections cannot be negative")
        for host, port in self.endpoints:
            ipaddress.ip_address(host)  # numeric only: names are resolved before this point
            if not 0 < port < 65536:
                raise ValueError(f"cluster {self.name}: endpoint port out of range: {port}")

    def is_mesh_peer(self, index: int) -> bool:
        return bool(self.mesh_peers) and self.mesh_peers[index]


@dataclass(frozen=True)
class RouteTable:
    clusters: tuple[Cluster, ...] = ()
    routes: tuple[tuple[int, int], ...] = ()  # (cluster index, weight); none at all: NR
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for index, weight in self.routes:
            if not 0 <= index < len(self.clusters):
                raise ValueError(f"route to cluster {index}: there are {len(self.clusters)} clusters")
            if weight < 0:
                raise ValueError(f"route weight cannot be negative: {weight}")
        offsets, total = [], 0
        for cluster in self.clusters:
            offsets.append(total)
            total += len(cluster.endpoints)
        object.__setattr__(self, "_offsets", tuple(offsets))

    @classmethod
    def single(cls, upstreams: Sequence[tuple[str, int]], connect_timeout: float = 5.0,
               mesh_peer: bool = False, service: str = "") -> "RouteTable":
        """One cluster of `upstreams`, round robin: what `serve --upstream` builds."""
        endpoints = tuple((str(h), int(p)) for h, p in upstreams)
        cluster = Cluster("upstream", service, endpoints, (mesh_peer,) * len(endpoints) if mesh_peer else (),
                          connect_timeout=connect_timeout)
        return cls((cluster,), ((0, 1),))

    def schedule(self) -> tuple[int, ...]:
        """Cluster indexes in the order connections take them: smooth weighted round
        robin over one cycle, so every run of sum(weights) connections splits exactly."""
        routes = [(index, weight) for index, weight in self.routes if weight > 0]
        if not routes and self.routes:
            routes = [(self.routes[0][0], 1)]  # all weights 0: Istio sends everything to the first
        if not routes:
            return ()
        divisor = reduce(math.gcd, (w for _, w in routes))
        weights = [w // divisor for _, w in routes]
        total, current, order = sum(weights), [0] * len(routes), []
        for _ in range(total):
            for i, weight in enumerate(weights):
                current[i] += weight
            best = max(range(len(routes)), key=lambda i: current[i])
            current[best] -= total
            order.append(routes[best][0])
        return tuple(order)

    def endpoints(self) -> list[tuple[str, int]]:
        """Every endpoint of every cluster: an engine's upstream_index indexes this list."""
        return [endpoint for cluster in self.clusters for endpoint in cluster.endpoints]

    def first_endpoint(self, cluster_index: int) -> int:
        """The upstream_index of a cluster's first endpoint."""
        return self._offsets[cluster_index]

    def locate(self, upstream_index: int) -> tuple[int, int] | None:
        """(cluster index, endpoint index in it) of an engine's upstream_index. Values
        below -1 name a cluster that had no endpoint to give (UH, UO): -2 - cluster."""
        if upstream_index <= -2:
            return -2 - upstream_index, -1
        if upstream_index < 0:
            return None
        for index in range(len(self.clusters) - 1, -1, -1):
            if upstream_index >= self._offsets[index]:
                return index, upstream_index - self._offsets[index]
        return None

    def is_mesh_peer(self, upstream_index: int) -> bool:
        where = self.locate(upstream_index)
        return where is not None and where[1] >= 0 and self.clusters[where[0]].is_mesh_peer(where[1])
