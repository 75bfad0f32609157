"""Who is on the other end of each connection: the identity its TLS certificate
proved, and the workload its peer-exchange frame names. Payloads are decoded in
batches and cached by their bytes (a peer sends the same frame on every
connection, so a payload is decoded once)."""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple, Sequence

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
    then forget()s the ones that closed."""

    def __init__(self) -> None:
        self.payloads_decoded = 0  # peers found (valid payloads)
        self.payloads_invalid = 0  # a frame whose payload is not an Any holding a Struct (header_not_found)
        self._decoded: dict[bytes, Workload | None] = {}
        self._peers: dict[int, PeerInfo] = {}  # settled connections
        self._awaiting: set[int] = set()  # connections whose Peer record has not come yet

    def on_batch(self, batch: Batch) -> None:
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

    def _decode(self, payload: bytes) -> Workload:
        cached = self._decoded.get(payload, False)
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
