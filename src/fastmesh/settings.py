"""A sidecar's settings: its listeners (where each accepts, where its connections
go, how they are labelled) and what runs around them. The command line builds
them from flags, fastmesh.config.mesh from Istio's documents; both take their
defaults from fastmesh.defaults. Nothing here starts anything: reading and
checking a config loads neither an engine nor an HTTP server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from pathlib import Path

from fastmesh.addr import Address, parse_address
from fastmesh.contract import MAX_WORKERS
from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import ExchangeSettings, encode_frame
from fastmesh.identity import NodeMetadata
from fastmesh.routing import DIRECTIONS, INBOUND, OUTBOUND, RouteTable
from fastmesh.tls import DISABLE, PERMISSIVE, SERVER_MODES, ListenerTls

__all__ = ["ExchangeConfig", "ListenerConfig", "SidecarConfig", "INBOUND", "OUTBOUND"]


@dataclass(frozen=True)
class ListenerConfig:
    """One listener: where it accepts, where its connections go, and how they are labelled."""

    listen: Address
    routes: RouteTable
    direction: str = OUTBOUND
    destination_service: str = ""  # FQDN; a cluster that names its own service overrides it
    mtls: str | None = None  # inbound: the PeerAuthentication mode; None: the sidecar's default
    transparent: bool = False  # it takes connections iptables TPROXY hands it (IP_TRANSPARENT)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}")
        if self.mtls is not None and self.mtls not in SERVER_MODES:
            raise ValueError(f"mtls mode must be one of {', '.join(SERVER_MODES)}, not {self.mtls!r}")

    @classmethod
    def to_upstreams(cls, listen: Address, upstreams: Sequence[str | tuple[str, int]], direction: str = OUTBOUND,
                     destination_service: str = "", mesh_peer: bool = False,
                     connect_timeout: float = DEFAULTS.connect_timeout,
                     idle_timeout: float = DEFAULTS.idle_timeout) -> "ListenerConfig":
        """A listener relaying to `upstreams` round robin (`serve --listen --upstream`);
        names are resolved now. mesh_peer: they run sidecars that exchange metadata."""
        routes = RouteTable.single(upstreams, connect_timeout, mesh_peer, idle_timeout=idle_timeout)
        return cls(listen, routes, direction, destination_service)


@dataclass(frozen=True)
class ExchangeConfig:
    """The peer metadata exchange: an inbound listener looks for it in every client's
    first bytes; an outbound one sends to its upstreams only when they are mesh peers."""

    enabled: bool = DEFAULTS.exchange
    plaintext: bool = DEFAULTS.exchange_plaintext  # also on plaintext connections (fastmesh's own variant)
    max_payload: int = DEFAULTS.exchange_max_payload
    timeout: float = DEFAULTS.exchange_timeout
    detect_timeout: float = DEFAULTS.exchange_detect_timeout


def _address(text: str) -> Address:
    return parse_address(text, allow_port_zero=True)


@dataclass(frozen=True)
class SidecarConfig:
    listeners: Sequence[ListenerConfig] = ()
    workers: int = DEFAULTS.workers
    workers_auto: str | None = None  # `workers: auto`: how the count was measured (fastmesh.cpus); else None
    drain_timeout: float = DEFAULTS.drain_timeout
    max_connections: int = DEFAULTS.max_connections  # per listener; 0: no limit
    pipe_size: int = DEFAULTS.pipe_size
    max_pipes: int = DEFAULTS.max_pipes
    splice: bool = DEFAULTS.splice
    io_uring: bool = DEFAULTS.io_uring  # batch the workers' receives and sends (serve --io-uring)
    admin: Address | None = field(default_factory=lambda: _address(DEFAULTS.admin))
    metrics: Address | None = field(default_factory=lambda: _address(DEFAULTS.metrics))
    health: Address | None = field(  # /healthz/ready for a kubelet's probes
        default_factory=lambda: None if DEFAULTS.health is None else _address(DEFAULTS.health))
    node_metadata: NodeMetadata = field(default_factory=NodeMetadata)
    reporting_duration: float = DEFAULTS.reporting_duration
    stats_eviction_interval: float = DEFAULTS.stats_eviction_interval  # 0: series are never evicted
    exchange: ExchangeConfig = ExchangeConfig()
    certs: Path | None = None  # the mesh identity: cert-chain.pem, key.pem, root-cert.pem (fastmesh.certs)
    peer_authentication: str = DEFAULTS.peer_authentication  # inbound listeners without a mode of their own
    tls_handshake_timeout: float = DEFAULTS.tls_handshake_timeout

    def __post_init__(self) -> None:
        object.__setattr__(self, "listeners", tuple(self.listeners))
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, not {self.workers}")
        if self.max_connections < 0:
            raise ValueError(f"max_connections must be 0 (no limit) or positive, not {self.max_connections}")
        if self.peer_authentication not in SERVER_MODES:
            raise ValueError(f"peer authentication must be one of {', '.join(SERVER_MODES)}, "
                             f"not {self.peer_authentication!r}")
        for name in ("drain_timeout", "reporting_duration", "stats_eviction_interval"):
            value = getattr(self, name)
            if not 0 <= value < 1e9 or (name == "reporting_duration" and value == 0):
                raise ValueError(f"{name} must be {'positive' if name == 'reporting_duration' else 'zero or more'}"
                                 f", not {value!r}")

    def replace(self, **changes: object) -> "SidecarConfig":
        return dataclasses.replace(self, **changes)

    def exchange_settings(self, listener: ListenerConfig) -> ExchangeSettings | None:
        """What a listener's engine does about the exchange (it then decides per connection:
        over TLS by the ALPN negotiated, in plaintext by fastmesh's rules when asked)."""
        exchange = self.exchange
        if not exchange.enabled:
            return None
        metadata = self.node_metadata
        return ExchangeSettings(
            role=listener.direction,
            frame=encode_frame(metadata.values, metadata.node_id()),  # once, not per connection
            max_payload=exchange.max_payload,
            frame_timeout=exchange.timeout,
            detect_timeout=exchange.detect_timeout,
            plaintext=exchange.plaintext,
        )

    def listener_tls(self, listener: ListenerConfig) -> ListenerTls:
        """A listener's TLS: inbound, its PeerAuthentication mode (DISABLE without certs);
        outbound, the handshake timeout (each cluster says how it originates TLS)."""
        if listener.direction != INBOUND:
            return ListenerTls(DISABLE, self.tls_handshake_timeout, self.exchange.detect_timeout)
        mode = self._served_mode(listener.mtls)
        # A virtual inbound listener's app ports each have their own PeerAuthentication.
        ports = tuple(self._served_mode(d.mtls or listener.mtls) for d in listener.routes.destinations)
        return ListenerTls(mode, self.tls_handshake_timeout, self.exchange.detect_timeout, ports)

    def _served_mode(self, mode: str | None) -> str:
        mode = mode or self.peer_authentication
        if self.certs is None and mode == PERMISSIVE:
            return DISABLE  # no identity: of TLS and plaintext, plaintext is what can be served
        return mode
