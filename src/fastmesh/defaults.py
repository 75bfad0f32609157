"""The one table of defaults. The command line, the `Sidecar` kind, SidecarConfig,
the relay and both engines read their defaults from here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    # engine
    workers: int = 1
    pipe_size: int = 1 << 20  # bytes per splice pipe
    max_pipes: int = 4096  # pipes in flight before bulk transfers copy instead (0: never splice)
    buffer_size: int = 64 * 1024  # bytes per copy buffer
    splice: bool = True
    # Batch each loop turn's receives and sends into io_uring submissions (serve --io-uring).
    # FASTMESH_IO_URING=1 makes it the default of every engine the process makes (the whole
    # test suite can run so); the twin then says it makes plain calls.
    io_uring: bool = bool(os.environ.get("FASTMESH_IO_URING"))
    # connections
    connect_timeout: float = 10.0  # Istio's default for a cluster's connectTimeout
    idle_timeout: float = 3600.0  # Istio's connectionPool.tcp.idleTimeout: no byte either way for 1h; 0: never
    drain_timeout: float = 5.0  # on SIGINT/SIGTERM
    backlog: int = 4096
    # Open connections each listener takes at most; past it a new one is reset at once and
    # counted (Envoy's listener connection limit, or HAProxy's maxconn). 0: no limit.
    max_connections: int = 0
    # the control plane's endpoints
    admin: str = "127.0.0.1:15000"  # Envoy's admin port
    metrics: str = "0.0.0.0:15090"  # Envoy's Prometheus port
    # Istio's health port is 0.0.0.0:15021; off unless asked for, since two sidecars on one
    # machine (tests, the walkthroughs) would both want it. The Kubernetes manifests set it.
    health: str | None = None
    # telemetry
    reporting_duration: float = 15.0  # Istio's tcpReportingDuration
    collect_interval: float = 1.0  # how often the engine's batch is read
    # Istio's statsEvictionInterval: a series with no open connection and no change for this long
    # leaves the exposition. 0: never (as in Istio, where it is off unless annotated).
    stats_eviction_interval: float = 0.0
    # the peer metadata exchange
    exchange: bool = True
    exchange_plaintext: bool = False  # Istio exchanges only over mTLS; fastmesh's plaintext variant is opt-in
    exchange_max_payload: int = 64 * 1024
    exchange_timeout: float = 5.0  # from a frame's first byte to its last
    exchange_detect_timeout: float = 0.1  # inbound: a server-first app's greeting waits this long
    # mutual TLS
    tls_handshake_timeout: float = 10.0  # from the TCP connection to the end of the handshake
    peer_authentication: str = "PERMISSIVE"  # Istio's default mtls.mode
    certs_poll_interval: float = 1.0  # how often the certificate files are checked for a new set
    # transparent capture: istio-iptables' defaults, and the virtual outbound listener they feed
    capture_outbound_port: int = 15001  # -p, Istio's virtualOutbound
    capture_inbound_port: int = 15006  # -z, Istio's virtualInbound
    proxy_uid: int = 1337  # -u (and -g): Istio's proxy user, whose connections are never captured
    capture_excluded_inbound_ports: str = "15090,15021"  # -d: the metrics and health ports


DEFAULTS = Defaults()
