"""What both engines (fastmesh._core and its twin fastmesh._engine_py) share, so
that it is written once: their health counters, limits, frame buffer sizing and
argument checks. fastmesh/_core.pyi is the interface; tests/test_engine_parity.py
holds both engines to it.

setup.py reads COUNTERS (a literal) to generate the Cython engine's counter enum,
so adding a counter is one line here plus the code that counts it.
"""

from __future__ import annotations

from typing import Any

from fastmesh.exchange import ExchangeSettings
from fastmesh.routing import RouteTable
from fastmesh.tls import DISABLE, ISTIO_MUTUAL, ListenerTls

# Engine.stats() keys, in order, summed over the workers: (name, kind, meaning).
# A gauge goes up and down with the state it measures; a counter only goes up.
COUNTERS = (
    ("active_connections", "gauge", "connections open"),
    ("connections_accepted", "counter", "connections accepted on listeners"),
    ("connections_relayed", "counter", "socket pairs given to Engine.relay()"),
    ("connect_failures", "counter", "upstream connects refused or unreachable"),
    ("connect_timeouts", "counter", "upstream connects that did not complete in time"),
    ("accept_errors", "counter", "accept() failures other than a connection gone from the backlog"),
    ("accept_paused", "counter", "times a worker stopped accepting on a listener for a moment (out of fds)"),
    ("pipes_in_use", "gauge", "splice pipes holding bytes in flight"),
    ("pipes_pooled", "gauge", "empty pipes kept for reuse"),
    ("buffers_in_use", "gauge", "copy buffers holding bytes in flight"),
    ("splice_fallbacks", "counter", "bulk transfers that copied because no pipe was free"),
    ("loop_iterations", "counter", "event loop turns of all workers"),
    ("io_uring_submissions", "counter", "io_uring submissions, each a loop turn's receives or its sends (io_uring)"),
    ("io_uring_requests", "counter", "receives and sends made through those submissions"),
    ("io_uring_refused", "counter", "submissions the kernel refused: their calls made plainly, io_uring not used again"),
    ("resets_propagated", "counter", "resets passed from one side to the other"),
    ("records_dropped", "counter", "closed-connection records lost because collect() was not called"),
    # connections that got no upstream
    ("no_route", "counter", "no route for the connection (NR)"),
    ("no_healthy_upstream", "counter", "the routed cluster had no endpoint (UH)"),
    ("upstream_overflows", "counter", "the routed cluster was at its maxConnections (UO)"),
    ("listener_overflows", "counter", "connections refused at accept: the listener was at its max_connections"),
    ("idle_timeouts", "counter", "connections closed after their cluster's idleTimeout without a byte either way"),
    # the peer metadata exchange (Istio's metadata_exchange stats where the meaning is the same)
    ("exchange_enabled", "counter", "connections the exchange was attempted on (alpn_protocol_found)"),
    ("exchange_disabled", "counter", "connections not tried on, of an exchanging listener (alpn_protocol_not_found)"),
    ("exchange_frames_sent", "counter", "our frame written (metadata_added)"),
    ("exchange_frames_received", "counter", "a peer frame read off the stream"),
    ("exchange_no_frame", "counter", "the peer's first bytes were not a frame (initial_header_not_found)"),
    ("exchange_detect_timeouts", "counter", "inbound: the app's first bytes went on before the client spoke"),
    ("exchange_frames_too_large", "counter", "a declared payload above the limit: connection reset"),
    ("exchange_frames_truncated", "counter", "the stream ended inside a frame: connection reset"),
    ("exchange_frames_timed_out", "counter", "a frame began and did not complete in time: connection reset"),
    ("exchange_frames_shared", "counter", "a peer frame equal to a recent one: held once for both"),
    ("exchange_partial_bytes", "gauge", "memory allocated for peer frames still arriving"),
    # mutual TLS
    ("tls_handshakes", "counter", "TLS handshakes completed, with a peer the rules allow"),
    ("tls_resumed", "counter", "of those, resumed sessions (no certificates exchanged)"),
    ("tls_plaintext", "counter", "PERMISSIVE: connections whose first bytes were not TLS"),
    ("tls_truncated", "counter", "TLS streams that ended without close_notify: propagated as a reset"),
    ("tls_error_no_certificate", "counter", "handshakes refused: the client sent no certificate"),
    ("tls_error_untrusted", "counter", "handshakes refused: a certificate from another root"),
    ("tls_error_expired", "counter", "handshakes refused: an expired certificate"),
    ("tls_error_not_yet_valid", "counter", "handshakes refused: a certificate not valid yet"),
    ("tls_error_peer_identity", "counter", "handshakes refused: a SAN outside the trust domain or the allowed SANs"),
    ("tls_error_plaintext", "counter", "STRICT: a client that sent plaintext"),
    ("tls_error_protocol", "counter", "handshakes refused: bytes that are not a valid TLS handshake"),
    ("tls_error_alert", "counter", "handshakes the peer ended with an alert"),
    ("tls_error_timeout", "counter", "handshakes that did not complete in time"),
    ("tls_error_reset", "counter", "handshakes the peer abandoned (reset, end of stream)"),
    ("tls_error_local", "counter", "handshakes this side could not start (no identity, no memory)"),
)
STATS = tuple(name for name, _, _ in COUNTERS)
GAUGES = frozenset(name for name, kind, _ in COUNTERS if kind == "gauge")
TLS_ERROR_PREFIX = "tls_error_"
TLS_ERRORS = tuple(name[len(TLS_ERROR_PREFIX):] for name in STATS if name.startswith(TLS_ERROR_PREFIX))

MAX_WORKERS = 64
MAX_LISTENERS = 16384  # ids are not reused: each reload that changes a listener takes one
MIN_BUFFER_SIZE = 1024
ACCEPT_PAUSE_MS = 100  # how long a worker stops accepting on a listener after EMFILE and the like
ACCEPT_PAUSE = ACCEPT_PAUSE_MS / 1000
# How often a worker checks its open connections against their cluster's idle timeout (one
# walk of its list, rather than a deadline moved on every chunk): timeouts fire this late at most.
IDLE_SWEEP_MS = 1000
IDLE_SWEEP = IDLE_SWEEP_MS / 1000

# A peer frame's buffer starts at FRAME_CHUNK bytes (or the frame's size, if
# smaller) and grows fourfold as bytes arrive, so memory follows what came, not
# what a header claims. Frames up to FRAME_CHUNK are kept for sharing, the
# FRAMES_KEPT most recent distinct ones per worker.
FRAME_CHUNK = 4096
FRAMES_KEPT = 16


def frame_buffer_size(received: int, length: int) -> int:
    """The bytes allocated for a frame of `length` bytes (header included) once
    `received` of them have arrived."""
    size = min(length, FRAME_CHUNK)
    while size <= received and size < length:
        size = size * 4 if size < length // 4 else length  # as the C engine computes it
    return size


def check_engine_options(workers: Any, pipe_size: Any, max_pipes: Any, buffer_size: Any) -> None:
    """TypeError or ValueError for engine options no engine can use."""
    for name, value in (("workers", workers), ("pipe_size", pipe_size), ("max_pipes", max_pipes),
                        ("buffer_size", buffer_size)):
        if not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, not {workers}")
    if buffer_size < MIN_BUFFER_SIZE:
        raise ValueError(f"buffer_size must be at least {MIN_BUFFER_SIZE} bytes, not {buffer_size}")
    if pipe_size < 0 or max_pipes < 0:
        raise ValueError("pipe_size and max_pipes cannot be negative")


def check_listener(routes: Any, exchange: Any, tls: Any, buffer_size: int, listeners: int,
                   has_identity: bool, max_connections: Any = 0) -> None:
    """TypeError or ValueError for a listener an engine cannot add; `listeners` is
    how many the engine has added so far, `has_identity` whether it has a mesh identity."""
    if not isinstance(max_connections, int) or isinstance(max_connections, bool):
        raise TypeError(f"max_connections must be an int, not {type(max_connections).__name__}")
    if not 0 <= max_connections < 2 ** 63:
        raise ValueError(f"max_connections must be 0 (no limit) or positive, not {max_connections}")
    if not isinstance(routes, RouteTable):
        raise TypeError(f"routes must be a fastmesh.routing.RouteTable, not {type(routes).__name__}")
    if exchange is not None:
        if not isinstance(exchange, ExchangeSettings):
            raise TypeError(f"exchange must be a fastmesh.exchange.ExchangeSettings or None, "
                            f"not {type(exchange).__name__}")
        exchange.check(buffer_size)
    if tls is not None and not isinstance(tls, ListenerTls):
        raise TypeError(f"tls must be a fastmesh.tls.ListenerTls or None, not {type(tls).__name__}")
    if not has_identity:
        for mode in (tls.mode, *tls.destination_modes) if tls is not None else ():
            if mode != DISABLE:
                raise ValueError(f"mtls mode {mode} needs the mesh identity: set_identity() first (serve --certs)")
        for cluster in routes.clusters:
            if cluster.tls is not None and cluster.tls.mode == ISTIO_MUTUAL:
                raise ValueError(f"cluster {cluster.name}: ISTIO_MUTUAL needs the mesh identity: set_identity() "
                                 "first (serve --certs)")
    if listeners >= MAX_LISTENERS:
        raise ValueError(f"at most {MAX_LISTENERS} listeners per engine, counting those replaced by "
                         "reloads: restart to apply more changes")


def check_identity(cert_chain: Any, key: Any, roots: Any, trust_domain: Any) -> str:
    """TypeError or ValueError for identity arguments no engine can use; the trust domain."""
    for name, value in (("cert_chain", cert_chain), ("key", key), ("roots", roots), ("trust_domain", trust_domain)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not trust_domain or "/" in trust_domain or len(trust_domain.encode()) > 255:
        raise ValueError(f"trust domain {trust_domain!r} is not a domain name")
    return trust_domain
