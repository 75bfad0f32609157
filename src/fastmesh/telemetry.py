"""Istio's TCP metrics from the engine's batches.

Series are keyed by Istio's 23 standard TCP labels. A connection's label set is
fixed the first time it is reported (as Istio's stats plugin fills its request
info once). Closed connections are recorded at the next batch read (every
second); the byte deltas of open connections are added every reporting
interval (Istio's `tcpReportingDuration`, 15 s by default). Only connections
that changed are touched in Python.

With an eviction interval (Istio's `statsEvictionInterval`), a series that has
no open connection and has not changed for that long is dropped at the next
report; should its label set come back, its counters start again from 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Callable, Iterator

from fastmesh.identity import LATEST, UNKNOWN, Workload
from fastmesh.peers import UNKNOWN_PEER, PeerInfo
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch
from fastmesh.routing import OUTBOUND, SERVICELESS_CLUSTERS, RouteTable

# Istio >= 1.10 standard TCP labels (response_code and grpc_response_status are not TCP labels).
TCP_LABELS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
    "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)

# Envoy's short response flags for the ways a connection can end badly before
# its labels are fixed: UF upstream connection failure, DC/UC downstream/upstream
# connection termination, DPE/UPE downstream/upstream protocol error (here, a
# peer exchange frame that could not be trusted), NR no route, UH no healthy
# upstream, UO upstream overflow (the cluster's maxConnections).
_RESPONSE_FLAGS = {
    CloseReason.CONNECT_FAILED: "UF",
    CloseReason.CONNECT_TIMEOUT: "UF",
    CloseReason.LOCAL_ERROR: "UF",
    CloseReason.DOWNSTREAM_RESET: "DC",
    CloseReason.UPSTREAM_RESET: "UC",
    CloseReason.DOWNSTREAM_PROTOCOL_ERROR: "DPE",
    CloseReason.UPSTREAM_PROTOCOL_ERROR: "UPE",
    CloseReason.NO_ROUTE: "NR",
    CloseReason.NO_HEALTHY_UPSTREAM: "UH",
    CloseReason.OVERFLOW: "UO",
    CloseReason.UPSTREAM_TLS_ERROR: "UF",  # Envoy's upstream connection failure, of TLS
}


def response_flags(reason: int | None) -> str:
    return _RESPONSE_FLAGS.get(reason, "-") if reason is not None else "-"  # type: ignore[call-overload]


def service_namespace(host: str) -> str:
    """The namespace in a Kubernetes service host `<name>.<namespace>.svc[.<domain>]`, else ''."""
    parts = host.split(".")
    return parts[1] if len(parts) >= 3 and parts[2] == "svc" else ""


def service_name(host: str, destination_namespace: str) -> str:
    """Istio's destination_service_name: the short name when the host's second label
    is the destination namespace, else the whole host."""
    parts = host.split(".")
    if len(parts) >= 2 and parts[1] == destination_namespace:
        return parts[0]
    return host


@dataclasses.dataclass(frozen=True)
class ListenerTelemetry:
    """What a listener's connections are labelled with, apart from the peer."""

    direction: str  # INBOUND (reporter=destination) or OUTBOUND (reporter=source)
    local: Workload
    destination_service: str = ""  # FQDN, e.g. mongodb.default.svc.cluster.local
    routes: RouteTable | None = None  # a routed listener: each cluster names its own service
    local_principal: str = ""  # our certificate's SPIFFE id, reported for connections over mTLS

    def service_for(self, cluster: int | None) -> str:
        """destination_service of a connection: its routed cluster's host, else the listener's
        (the cluster's name for a virtual listener's connection to an unknown destination,
        e.g. PassthroughCluster)."""
        if cluster is not None and self.routes is not None:
            routed = self.routes.clusters[cluster]
            if routed.name in SERVICELESS_CLUSTERS:
                return routed.name
            if routed.service:
                return routed.service
        return self.destination_service

    def labels(self, peer: PeerInfo, flags: str, service: str | None = None) -> tuple[str, ...]:
        outbound = self.direction == OUTBOUND
        source, destination = (self.local, peer.workload) if outbound else (peer.workload, self.local)
        # As Istio's stats: both principals from the certificates of an mTLS connection
        # (ours only when it had one), and the inbound reporter's policy mutual_tls for those.
        local_principal = self.local_principal if peer.principal else ""
        source_principal, destination_principal = ((local_principal, peer.principal) if outbound
                                                   else (peer.principal, local_principal))
        policy = "unknown" if outbound else "mutual_tls" if peer.principal else "none"
        host = self.destination_service if service is None else service
        # Istio takes the namespace from the destination node only; fastmesh falls back
        # to the service host's namespace when the peer is unknown (see README).
        namespace = destination.namespace or service_namespace(host)
        short = service_name(host, namespace) if host else ""
        if host in SERVICELESS_CLUSTERS:  # no service: Istio names the cluster, the host is unknown
            host, short = "", host
        values = (
            "source" if outbound else "destination",
            source.workload, source.namespace, source_principal, source.app, source.version,
            source.canonical_service, source.canonical_revision or LATEST, source.cluster,
            destination.workload, destination.namespace, destination_principal, destination.app,
            destination.version, host, short,
            namespace, destination.canonical_service, destination.canonical_revision or LATEST,
            destination.cluster,
            "tcp", flags, policy,
        )
        return tuple(value or UNKNOWN for value in values)


class TcpSeries:
    """The four counters of one label set, and what eviction needs to know of it."""

    __slots__ = ("opened", "closed", "sent", "received", "key", "open_connections", "changed_at")

    def __init__(self, key: tuple[str, ...] = ()) -> None:
        self.opened = self.closed = self.sent = self.received = 0
        self.key = key
        self.open_connections = 0  # connections reported to it and still open: it is kept while any is
        self.changed_at = 0.0  # with eviction: when it last changed with no connection open


class _Conn:
    __slots__ = ("listener_id", "cluster", "series", "pending_received", "pending_sent",
                 "opened_reported", "waited")

    def __init__(self, listener_id: int | None, cluster: int | None) -> None:
        self.listener_id = listener_id
        self.cluster = cluster
        self.series: TcpSeries | None = None
        self.pending_received = 0
        self.pending_sent = 0
        self.opened_reported = False
        self.waited = False  # it sat out a report because its peer was not known yet


PeerLookup = Callable[[int], "PeerInfo | None"]  # conn id -> peer, or None while still unknown


class TcpTelemetry:
    """Folds engine batches into Istio TCP series: give it every batch (on_batch) and
    call report() every reporting interval. It labels the connections of the
    listeners added with add_listener(); `peer_of` says who a connection's peer is.
    With `eviction_interval` seconds (0: never), report() also drops the series that
    had no open connection and no change for that long, by `clock`."""

    def __init__(self, peer_of: PeerLookup | None = None, eviction_interval: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._listeners: dict[int, ListenerTelemetry] = {}
        self.series: dict[tuple[str, ...], TcpSeries] = {}
        self.peer_of: PeerLookup = peer_of or (lambda conn_id: UNKNOWN_PEER)
        self._open: dict[int, _Conn] = {}
        self._by_origin: dict[tuple[int, str, PeerInfo, str], TcpSeries] = {}
        self._dirty: set[int] = set()  # open connections with something to report
        self.eviction_interval = eviction_interval
        self._clock = clock
        # With eviction: the series without an open connection, least recently changed first,
        # so a sweep stops at the first one still fresh (it costs what it evicts).
        self._idle: OrderedDict[tuple[str, ...], TcpSeries] = OrderedDict()
        self.evicted = 0  # series dropped so far

    def add_listener(self, listener_id: int, labels: ListenerTelemetry) -> None:
        """Report the connections of this listener, labelled so (from their next report on,
        for a listener already added)."""
        self._listeners[listener_id] = labels
        self._by_origin.clear()

    def labels_of(self, listener_id: int) -> ListenerTelemetry | None:
        return self._listeners.get(listener_id)

    def _series_for(self, conn_id: int, listener_id: int | None, cluster: int | None,
                    reason: int | None, may_wait: bool = False) -> TcpSeries | None:
        """The series a connection reports to, or None to wait (peer still unknown and
        `may_wait`) or to skip (not a telemetry listener, e.g. a pair given to Engine.relay)."""
        peer = self.peer_of(conn_id)
        if peer is None:
            if may_wait and reason is None:
                return None  # the peer may still make itself known: wait
            # Closed without one, or waited a whole period (a client that never
            # speaks first, a server that never answers): recorded as unknown.
            peer = UNKNOWN_PEER
        flags = response_flags(reason)
        listener = self._listeners.get(listener_id) if listener_id is not None else None
        if listener is None:
            return None
        service = listener.service_for(cluster)
        # Looked up by what decides the labels, so the 23 labels are built once per
        # label set, not once per connection.
        origin = (listener_id, service, peer, flags)
        series = self._by_origin.get(origin)
        if series is None:
            key = listener.labels(peer, flags, service)
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = TcpSeries(key)
            self._by_origin[origin] = series
        return series

    def _went_idle(self, series: TcpSeries, now: float) -> None:
        """A series changed by a close: with no connection left open, its eviction clock restarts."""
        if series.open_connections == 0:
            series.changed_at = now
            self._idle[series.key] = series
            self._idle.move_to_end(series.key)

    def on_batch(self, batch: Batch) -> None:
        # received is what was read from the listener's downstream, sent what was written to it.
        open_conns = self._open
        dirty = self._dirty
        evicting = self.eviction_interval > 0
        now = self._clock() if evicting and batch.closed else 0.0
        for opened in batch.opened:
            open_conns[opened.conn_id] = _Conn(opened.listener_id, opened.cluster)
            dirty.add(opened.conn_id)
        for updated in batch.updated:
            conn = open_conns.get(updated.conn_id)
            if conn is not None:
                conn.pending_received += updated.down_rx
                conn.pending_sent += updated.down_tx
                dirty.add(updated.conn_id)
        for closed in batch.closed:
            conn = open_conns.pop(closed.conn_id, None)
            if closed.reason == CloseReason.DOWNSTREAM_TLS_ERROR and not (conn and conn.opened_reported):
                dirty.discard(closed.conn_id)
                continue  # a client refused at its handshake never reached the app (Istio reports none)
            if conn is None:  # opened and closed between two reads: no state was kept
                series = self._series_for(closed.conn_id, closed.listener_id, closed.cluster, closed.reason)
                if series is not None:
                    series.opened += 1
                    series.closed += 1
                    series.received += closed.down_rx
                    series.sent += closed.down_tx
                    if evicting:
                        self._went_idle(series, now)
                continue
            dirty.discard(closed.conn_id)
            series = conn.series
            if series is not None:
                series.open_connections -= 1
            else:
                series = self._series_for(closed.conn_id, closed.listener_id, closed.cluster, closed.reason)
                if series is None:
                    continue
            if not conn.opened_reported:
                series.opened += 1
            series.closed += 1
            series.received += conn.pending_received + closed.down_rx
            series.sent += conn.pending_sent + closed.down_tx
            if evicting:
                self._went_idle(series, now)

    def report(self) -> None:
        """Add what open connections did since the last report (Istio's periodic record)."""
        still_dirty: set[int] = set()
        for conn_id in self._dirty:
            conn = self._open[conn_id]
            series = conn.series
            if series is None:
                # A connection sits out one report at most: its bytes must not wait for a
                # peer frame that may never come (Istio 1.7 holds them for as long as that).
                series = conn.series = self._series_for(conn_id, conn.listener_id, conn.cluster,
                                                        None, may_wait=not conn.waited)
                if series is None:
                    if conn.listener_id in self._listeners:
                        conn.waited = True
                        still_dirty.add(conn_id)  # waiting for its peer
                    continue
                series.open_connections += 1
                self._idle.pop(series.key, None)  # kept while the connection is open
            if not conn.opened_reported:
                conn.opened_reported = True
                series.opened += 1
            series.received += conn.pending_received
            series.sent += conn.pending_sent
            conn.pending_received = conn.pending_sent = 0
        self._dirty = still_dirty
        if self.eviction_interval > 0:
            self._evict(self._clock() - self.eviction_interval)

    def _evict(self, unchanged_since: float) -> None:
        """Drop the series without an open connection that last changed at or before
        `unchanged_since` (Istio's statsEvictionInterval)."""
        idle = self._idle
        evicted = 0
        while idle:
            series = next(iter(idle.values()))
            if series.changed_at > unchanged_since:
                break
            idle.popitem(last=False)
            del self.series[series.key]
            evicted += 1
        if evicted:
            self.evicted += evicted
            self._by_origin.clear()  # it may name evicted series; it refills from the labels
            if evicted >= len(self.series):
                # A dict keeps its table as keys go: copy what is left, so memory follows.
                self.series = dict(self.series)
                self._idle = OrderedDict(idle)

    def samples(self) -> Iterator[tuple[tuple[str, ...], TcpSeries]]:
        return iter(self.series.items())
