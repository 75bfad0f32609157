"""Who is on the other end of each connection: the identity its TLS certificate
proved, and the workload its peer-exchange frame names. Payloads are decoded in
batches and cached by their bytes (a peer sends the same frame on every
connection, so a payload is decoded once). With a lifetime (the sidecar's stats
eviction interval), a payload no connection brought for that long is forgotten,
so peers that came and went do not stay in memory."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, NamedTuple, Sequence

from fastmesh.exchange import ExchangeError, decode_payload
from fastmesh.identity import UNKNOWN_WORKLOAD, Workload, peer_workload
from fastmesh.records import Batch, Closed

log = logging.getLogger("fastmesh.exchange")

# Distinct payloads remembered; a mesh has few workloads, so this only bounds a hostile peer.
_CACHE_LIMIT = 4096

# The exchange's events under one set of names, the metric's and /stats's: Istio's
# metadata_exchange stat names where the meaning is the same, then fastmesh's own.
# Each is an engine stats key, or None for the two counted here, as payloads decode.
EXCHANGE_EVENTS = (
    ("alpn_protocol_found", "exchange_enabled"),
    ("alpn_protocol_not_found", "exchange_disabled"),
    ("metadata_added", "exchange_frames_sent"),
    ("initial_header_not_found", "exchange_no_frame"),
    ("header_not_found", None),
    ("peer_found", None),
    ("frame_too_large", "exchange_frames_too_large"),
    ("frame_truncated", "exchange_frames_truncated"),
    ("frame_timed_out", "exchange_frames_timed_out"),
    ("detect_timeout", "exchange_detect_timeouts"),
)
ENGINE_EVENT_KEYS = frozenset(key for _, key in EXCHANGE_EVENTS if key is not None)


class PeerInfo(NamedTuple):
    workload: Workload  # from the exchange; UNKNOWN_WORKLOAD without one
    principal: str = ""  # the verified SPIFFE id; "" without mTLS


UNKNOWN_PEER = PeerInfo(UNKNOWN_WORKLOAD)


def namespace_of(principal: str) -> str:
    """The namespace in spiffe://<td>/ns/<namespace>/sa/<sa>, else ''."""
    parts = principal.split("/")
    return parts[4] if len(parts) >= 7 and parts[3] == "ns" and parts[5] == "sa" else ""


class PeerDirectory:
    """Knows each connection's peer. The sidecar's pipeline gives it every batch
    (on_batch), then lets telemetry ask peer_of() about that batch's connections,
    then forget()s the ones that closed. With `payload_lifetime` seconds (0: for
    ever), a decoded payload is kept at least that long after it last came, and
    at most twice that (Envoy's mark and sweep of unused stats)."""

    def __init__(self, payload_lifetime: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.payloads_decoded = 0  # peers found (valid payloads)
        self.payloads_invalid = 0  # a frame whose payload is not an Any holding a Struct (header_not_found)
        self._decoded: dict[bytes, Workload | None] = {}
        # The payloads of the lifetime before this one: those that come again move back to
        # _decoded, the others go with the next turn, and their memory with the whole dict.
        self._decoded_before: dict[bytes, Workload | None] = {}
        self.payload_lifetime = payload_lifetime
        self._clock = clock
        self._turned_at = clock() if payload_lifetime > 0 else 0.0
        self._peers: dict[int, PeerInfo] = {}  # settled connections
        self._awaiting: set[int] = set()  # connections whose Peer record has not come yet

    def on_batch(self, batch: Batch) -> None:
        if self.payload_lifetime > 0:
            self._age_payloads()
        for opened in batch.opened:
            if opened.identifies_peer:
                self._awaiting.add(opened.conn_id)
        for peer in batch.peers:
            self._awaiting.discard(peer.conn_id)
            workload = UNKNOWN_WORKLOAD if peer.payload is None else self._decode(peer.payload)
            principal = peer.principal or ""
            if not workload.namespace and principal:
                # As Istio: without the exchange, the namespace the certificate names.
                workload = dataclasses.replace(workload, namespace=namespace_of(principal))
            self._peers[peer.conn_id] = PeerInfo(workload, principal)

    def forget(self, closed: Sequence[Closed]) -> None:
        """Drop what is known of connections that closed (once they are reported)."""
        for record in closed:
            self._peers.pop(record.conn_id, None)
            self._awaiting.discard(record.conn_id)

    def _age_payloads(self) -> None:
        now = self._clock()
        if now - self._turned_at >= self.payload_lifetime:
            self._decoded_before, self._decoded = self._decoded, {}
            self._turned_at = now

    def _decode(self, payload: bytes) -> Workload:
        cached = self._decoded.get(payload, False)
        if cached is False:
            cached = self._decoded_before.pop(payload, False)  # it came again: kept for this lifetime too
            if cached is False:
                try:
                    metadata, _ = decode_payload(payload)
                    cached = peer_workload(metadata)
                except ExchangeError as exc:
                    log.warning("a peer sent an istio-peer-exchange frame that does not decode (%s); "
                                "its connections are labelled with an unknown peer", exc)
                    cached = None
            if len(self._decoded) >= _CACHE_LIMIT:
                self._decoded.clear()
            self._decoded[payload] = cached
        if cached is None:
            self.payloads_invalid += 1
            return UNKNOWN_WORKLOAD
        self.payloads_decoded += 1
        return cached

    def peer_of(self, conn_id: int) -> PeerInfo | None:
        """The connection's peer; None while its Peer record may still come."""
        peer = self._peers.get(conn_id)
        if peer is not None:
            return peer
        return None if conn_id in self._awaiting else UNKNOWN_PEER

    def events(self, engine_stats: dict[str, int]) -> dict[str, int]:
        """Every exchange event's count, by its name in EXCHANGE_EVENTS."""
        here = {"header_not_found": self.payloads_invalid, "peer_found": self.payloads_decoded}
        return {event: engine_stats[key] if key is not None else here[event] for event, key in EXCHANGE_EVENTS}
