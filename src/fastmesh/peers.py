"""Who is on the other end of each connection: the peer payloads the engine
reads off the wire, decoded in batches and cached by their bytes (a peer sends
the same frame on every connection, so a payload is decoded once)."""

from __future__ import annotations

import logging
from typing import Sequence

from fastmesh.exchange import ExchangeError, ExchangeSettings, decode_payload
from fastmesh.identity import UNKNOWN_WORKLOAD, Workload, peer_workload
from fastmesh.records import Batch, Closed
from fastmesh.routing import RouteTable

log = logging.getLogger("fastmesh.exchange")

# Distinct payloads remembered; a mesh has few workloads, so this only bounds a hostile peer.
_CACHE_LIMIT = 4096


class PeerDirectory:
    """Knows each connection's peer from its exchange. The sidecar's pipeline gives it
    every batch (on_batch), then lets telemetry ask peer_of() about that batch's
    connections, then forget()s the ones that closed."""

    def __init__(self) -> None:
        # Listener id -> its exchange settings and routes, for the listeners that exchange.
        self._listeners: dict[int, tuple[ExchangeSettings, RouteTable]] = {}
        self.payloads_decoded = 0  # peers found (valid payloads)
        self.payloads_invalid = 0  # a frame whose payload is not an Any holding a Struct (header_not_found)
        self._decoded: dict[bytes, Workload | None] = {}
        self._peers: dict[int, Workload] = {}  # settled connections
        self._awaiting: set[int] = set()  # exchanging connections not settled yet

    def add_listener(self, listener_id: int, exchange: ExchangeSettings, routes: RouteTable) -> None:
        """A listener whose connections exchange (those its settings and routes say)."""
        self._listeners[listener_id] = (exchange, routes)

    def on_batch(self, batch: Batch) -> None:
        listeners = self._listeners
        for opened in batch.opened:
            exchanging = opened.listener_id is not None and listeners.get(opened.listener_id)
            if exchanging and exchanging[0].exchanges_with(exchanging[1].is_mesh_peer(opened.cluster,
                                                                                      opened.endpoint)):
                self._awaiting.add(opened.conn_id)
        for peer in batch.peers:
            self._awaiting.discard(peer.conn_id)
            self._peers[peer.conn_id] = UNKNOWN_WORKLOAD if peer.payload is None else self._decode(peer.payload)

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

    def peer_of(self, conn_id: int) -> Workload | None:
        """The connection's peer; None while its exchange is not settled."""
        peer = self._peers.get(conn_id)
        if peer is not None:
            return peer
        return None if conn_id in self._awaiting else UNKNOWN_WORKLOAD

    def counters(self) -> dict[str, int]:
        return {"exchange_peers_found": self.payloads_decoded,
                "exchange_payloads_invalid": self.payloads_invalid}

