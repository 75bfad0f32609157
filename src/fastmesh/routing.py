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
from dataclasses import dataclass
from functools import reduce
from typing import Sequence

from fastmesh.addr import Address, parse_address, resolve
from fastmesh.defaults import DEFAULTS
from fastmesh.tls import ClientTls

# A listener's direction: OUTBOUND serves the local app's connections to a service
# (Istio's reporter="source"), INBOUND the connections that reach the local app
# (reporter="destination").
OUTBOUND = "outbound"
INBOUND = "inbound"
DIRECTIONS = (OUTBOUND, INBOUND)

# In the engines' order. PASSTHROUGH sends each connection to the client's original
# destination (before iptables REDIRECT), not to the cluster's endpoints; LOCAL_PASSTHROUGH
# to the loopback address at the original destination's port (the inbound side: the app).
LB_POLICIES = ("ROUND_ROBIN", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "LOCAL_PASSTHROUGH")
PASSTHROUGH_POLICIES = ("PASSTHROUGH", "LOCAL_PASSTHROUGH")


@dataclass(frozen=True)
class Cluster:
    """Endpoints of one service (and subset) on one port, as Envoy's clusters."""

    name: str  # Envoy's form: outbound|PORT|SUBSET|HOST
    service: str = ""  # the host, for destination_service
    endpoints: tuple[tuple[str, int], ...] = ()
    mesh_peers: tuple[bool, ...] = ()  # per endpoint: it runs a sidecar, so the exchange is used
    lb: str = "ROUND_ROBIN"
    max_connections: int = 0  # 0: no limit
    connect_timeout: float = DEFAULTS.connect_timeout
    tls: ClientTls | None = None  # a DestinationRule's tls; None: auto mTLS to the mesh-peer endpoints
    idle_timeout: float = DEFAULTS.idle_timeout  # no byte either way this long: closed; 0: never

    def __post_init__(self) -> None:
        if self.mesh_peers and len(self.mesh_peers) != len(self.endpoints):
            raise ValueError(f"cluster {self.name}: mesh_peers names {len(self.mesh_peers)} endpoints, "
                             f"it has {len(self.endpoints)}")
        if self.lb not in LB_POLICIES:
            raise ValueError(f"cluster {self.name}: load balancer {self.lb!r} is not one of {LB_POLICIES}")
        if not 0 < self.connect_timeout < 1e9:
            raise ValueError(f"cluster {self.name}: connect timeout must be positive, not {self.connect_timeout}")
        if not 0 <= self.idle_timeout < 1e9:
            raise ValueError(f"cluster {self.name}: idle timeout must be 0 (never) or positive, "
                             f"not {self.idle_timeout}")
        if self.max_connections < 0:
            raise ValueError(f"cluster {self.name}: max_connections cannot be negative")
        for host, port in self.endpoints:
            ipaddress.ip_address(host)  # numeric only: names are resolved before this point
            if not 0 < port < 65536:
                raise ValueError(f"cluster {self.name}: endpoint port out of range: {port}")

    def is_mesh_peer(self, index: int) -> bool:
        return bool(self.mesh_peers) and self.mesh_peers[index]

    @property
    def has_mesh_peer(self) -> bool:
        return any(self.mesh_peers)


# The cluster of a virtual outbound listener's connections to a destination no config
# knows: each goes to its original address, and Istio names it so in destination_service_name.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
# The virtual inbound listener's, for an app port no Service names: to the app on that port.
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughClusterIpv4"
# Clusters that stand for no service: destination_service_name is the cluster's name.
SERVICELESS_CLUSTERS = (PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER)


@dataclass(frozen=True)
class Destination:
    """A service address a virtual listener (Istio's virtualOutbound) tells apart by each
    connection's original destination, before iptables REDIRECT: its own routes, into the
    table's clusters."""

    address: tuple[str, int]  # numeric IP, port; 0.0.0.0 or ::, any address of its family at that port
    routes: tuple[tuple[int, int], ...]  # (cluster index, weight); none at all: NR
    mtls: str | None = None  # inbound: the PeerAuthentication mode of its port; None: the listener's

    @property
    def any_address(self) -> bool:
        return ipaddress.ip_address(self.address[0]).is_unspecified


@dataclass(frozen=True)
class RouteTable:
    clusters: tuple[Cluster, ...] = ()
    routes: tuple[tuple[int, int], ...] = ()  # (cluster index, weight); none at all: NR
    # A virtual listener's known destinations; a connection to none of them takes `routes`.
    destinations: tuple[Destination, ...] = ()

    def __post_init__(self) -> None:
        for routes in (self.routes, *(d.routes for d in self.destinations)):
            for index, weight in routes:
                if not 0 <= index < len(self.clusters):
                    raise ValueError(f"route to cluster {index}: there are {len(self.clusters)} clusters")
                if weight < 0:
                    raise ValueError(f"route weight cannot be negative: {weight}")
        seen = set()
        for destination in self.destinations:
            host, port = destination.address
            ipaddress.ip_address(host)
            if not 0 < port < 65536 or destination.address in seen:
                raise ValueError(f"destination {host}:{port}: port out of range, or given twice")
            seen.add(destination.address)

    @classmethod
    def single(cls, upstreams: Sequence[str | tuple[str, int]], connect_timeout: float = DEFAULTS.connect_timeout,
               mesh_peer: bool = False, service: str = "", idle_timeout: float = DEFAULTS.idle_timeout) -> "RouteTable":
        """One cluster of `upstreams`, round robin: what `serve --upstream` builds. Each is
        "HOST:PORT" or (host, port); names are resolved now, once (this may block)."""
        endpoints: list[tuple[str, int]] = []
        for upstream in upstreams:
            address = parse_address(upstream) if isinstance(upstream, str) else Address(*upstream)
            endpoints += [(a.host, a.port) for a in resolve(address) if (a.host, a.port) not in endpoints]
        if not endpoints:
            raise ValueError("a listener needs at least one upstream")
        cluster = Cluster("upstream", service, tuple(endpoints), (mesh_peer,) * len(endpoints) if mesh_peer else (),
                          connect_timeout=connect_timeout, idle_timeout=idle_timeout)
        return cls((cluster,), ((0, 1),))

    def schedule(self, of: tuple[tuple[int, int], ...] | None = None) -> tuple[int, ...]:
        """Cluster indexes in the order connections take them (of `routes`, or of a
        destination's): smooth weighted round robin over one cycle, so every run of
        sum(weights) connections splits exactly."""
        given = self.routes if of is None else of
        routes = [(index, weight) for index, weight in given if weight > 0]
        if not routes and given:
            routes = [(given[0][0], 1)]  # all weights 0: Istio sends everything to the first
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

    def endpoint(self, cluster: int, endpoint: int) -> tuple[str, int]:
        """The address of a connection's endpoint, as its records name it."""
        return self.clusters[cluster].endpoints[endpoint]

    @property
    def has_mesh_peer(self) -> bool:
        return any(cluster.has_mesh_peer for cluster in self.clusters)

    def is_mesh_peer(self, cluster: int | None, endpoint: int | None) -> bool:
        """Whether a connection's endpoint runs a sidecar (so the exchange is used)."""
        return cluster is not None and endpoint is not None and self.clusters[cluster].is_mesh_peer(endpoint)

    def describe(self, cluster: int | None, endpoint: int | None) -> str:
        """A connection's destination for logs: its endpoint, else its cluster, else 'no route'."""
        if cluster is None:
            return "no route"
        if endpoint is None:
            return f"cluster {self.clusters[cluster].name}"
        return str(Address(*self.endpoint(cluster, endpoint)))
