"""Why a relayed connection ended: shared by the Cython engine and its Python twin."""

from __future__ import annotations

import enum


class CloseReason(enum.IntEnum):
    """The integer codes an engine reports in its closed-connection records."""

    DOWNSTREAM_CLOSE = 1  # downstream finished first (FIN); both directions ended cleanly
    UPSTREAM_CLOSE = 2  # upstream finished first (FIN); both directions ended cleanly
    DOWNSTREAM_RESET = 3  # downstream reset or failed; the reset was passed to upstream
    UPSTREAM_RESET = 4  # upstream reset or failed; the reset was passed to downstream
    CONNECT_FAILED = 5  # upstream refused or unreachable (errno recorded)
    CONNECT_TIMEOUT = 6  # upstream did not answer within the connect timeout
    LOCAL_ERROR = 7  # this relay could not go on (errno recorded), both sides reset
    SHUTDOWN = 8  # the engine was stopped while the connection was open
    # A peer metadata exchange frame that cannot be trusted (too large, truncated,
    # never completed) came from that side: both sides reset.
    DOWNSTREAM_PROTOCOL_ERROR = 9
    UPSTREAM_PROTOCOL_ERROR = 10
    # No upstream connection was attempted: the client's connection is closed.
    NO_ROUTE = 11  # the listener has no route (Envoy's NR)
    NO_HEALTHY_UPSTREAM = 12  # the routed cluster has no endpoint (UH)
    OVERFLOW = 13  # the routed cluster is at its maxConnections (UO)
    # A TLS handshake that failed, or a peer that it showed is not allowed: both sides
    # reset, nothing relayed (contract.TLS_ERRORS counts why).
    DOWNSTREAM_TLS_ERROR = 14
    UPSTREAM_TLS_ERROR = 15
    # No byte either way for the cluster's idleTimeout: both sides closed (close_notify, FIN).
    IDLE_TIMEOUT = 16

    @property
    def is_connect_failure(self) -> bool:
        return self in (CloseReason.CONNECT_FAILED, CloseReason.CONNECT_TIMEOUT)


def describe(reason: int) -> str:
    """A lower-case name for logs and JSON, tolerant of unknown codes."""
    try:
        return CloseReason(reason).name.lower()
    except ValueError:
        return f"reason_{reason}"
