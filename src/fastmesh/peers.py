"""Who is on the other end of each connection: the peer payloads the engine
reads off the wire, decoded in batches and cached by their bytes (a peer sends
the same frame on every connection, so a payload is decoded once)."""

from __future__ import annotations

import logging

from fastmesh.exchange import ExchangeError, ExchangeSettings, decode_payload
from fastmesh.identity import UNKNOWN_WORKLOAD, Workload, peer_workload
from fastmesh.relay import Batch
from fastmesh.routing import RouteTable

log = logging.getLogger("fastmesh.exchange")

# Distinct payloads remembered; a mesh has few workloads, so this only bounds a hostile peer.
_CACHE_LIMIT = 4096


class PeerDirectory:
    """Feed it with Relay.add_consumer(directory.on_batch) *before* the telemetry
    consumer; TcpTelemetry asks it for each connection's peer with peer_of()."""

    def __init__(self) -> None:
        # Listener id -> its exchange settings and routes, for the listeners that exchange.
        self.listeners: dict[int, tuple[ExchangeSettings, RouteTable]] = {}
        self.payloads_decoded = 0  # peers found (valid payloads)
        self.payloads_invalid = 0  # a frame whose payload is not an Any holding a Struct (header_not_found)
        self._decoded: dict[bytes, Workload | None] = {}
        self._peers: dict[int, Workload] = {}  # settled connections
        self._awaiting: set[int] = set()  # exchanging connections not settled yet
        self._forget: list[int] = []  # closed in the previous batch

    def on_batch(self, batch: Batch) -> None:
        # Connections closed in the previous batch were looked up by its consumers: drop them.
        for conn_id in self._forget:
            self._peers.pop(conn_id, None)
            self._awaiting.discard(conn_id)
        listeners = self.listeners
        for conn_id, listener_id, upstream_index in batch.opened:
            exchanging = listeners.get(listener_id)
            if exchanging is not None and exchanging[0].exchanges_with(exchanging[1].is_mesh_peer(upstream_index)):
                self._awaiting.add(conn_id)
        for conn_id, payload in batch.peers:
            self._awaiting.discard(conn_id)
            self._peers[conn_id] = UNKNOWN_WORKLOAD if payload is None else self._decode(payload)
        self._forget = [record[0] for record in batch.closed]

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

