"""What an engine reports to Python, read in one batch by Engine.collect(): the
records of opened, changed and closed connections and of the peers they learnt.
Both engines build these types; everything above them reads them by name.

A connection accepted on a listener names its route as two indexes into that
listener's RouteTable: `cluster` (into `routes.clusters`) and `endpoint` (into
that cluster's `endpoints`). None stands for what does not apply: no listener
and no cluster for a pair given to Engine.relay(), no cluster when the listener
had no route (NR), no endpoint when none was picked (UH, UO) or the cluster
sends each connection to its original destination (PASSTHROUGH).

Byte counts are deltas since the previous collect(): down_rx bytes read from the
downstream, down_tx written to it, up_rx read from the upstream, up_tx written
to it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class Opened(NamedTuple):
    conn_id: int  # opaque, unique within an engine
    listener_id: int | None
    cluster: int | None
    endpoint: int | None
    identifies_peer: bool  # a Peer record will follow: the connection exchanges or speaks TLS


class Updated(NamedTuple):
    conn_id: int
    down_rx: int
    down_tx: int
    up_rx: int
    up_tx: int


class Closed(NamedTuple):
    conn_id: int
    listener_id: int | None
    cluster: int | None
    endpoint: int | None
    reason: int  # a fastmesh.reasons.CloseReason
    errno: int  # the OS error behind the reason, or 0
    down_rx: int
    down_tx: int
    up_rx: int
    up_tx: int


class Peer(NamedTuple):
    """Once per connection that identifies its peer, when that is settled: the payload
    of its istio-peer-exchange frame (a serialized google.protobuf.Any, not yet
    checked), or None when it sent none; and the identity its TLS certificate proved
    (a SPIFFE id), or None without TLS. The connection may have closed since."""

    conn_id: int
    payload: bytes | None
    principal: str | None = None


class Batch(NamedTuple):
    opened: Sequence[Opened]
    updated: Sequence[Updated]
    closed: Sequence[Closed]
    peers: Sequence[Peer] = ()


class FlowInfo(NamedTuple):
    """One direction of an open connection, as Engine.connections() shows it: the
    bytes read from its source side and written to the other."""

    eof: bool  # the source's end of stream was read
    shut: bool  # ...and passed on to the other side
    pending: int  # bytes read and not yet written
    rx: int
    tx: int


class ConnectionInfo(NamedTuple):
    """An open connection, for diagnosis (the admin port's /connections)."""

    conn_id: int
    worker: int
    listener_id: int | None
    cluster: int | None
    endpoint: int | None
    state: str  # "connecting" (to the upstream) or "open"
    downstream: FlowInfo  # from the downstream toward the upstream
    upstream: FlowInfo  # from the upstream toward the downstream
