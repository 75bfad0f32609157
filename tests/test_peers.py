"""PeerDirectory: peer payloads from the engine's batches, decoded once per
distinct payload, and the answer telemetry gets for each connection."""

from __future__ import annotations

import logging

from conftest import MONGODB_SERVICE, MONGODB_V1, RATINGS_V2, closed, independent_frame, opened

from fastmesh.exchange import HEADER, encode_frame
from fastmesh.identity import Workload
from fastmesh.peers import ENGINE_EVENT_KEYS, UNKNOWN_PEER, PeerDirectory, PeerInfo
from fastmesh.records import Batch, Peer
from fastmesh.routing import INBOUND
from fastmesh.telemetry import ListenerTelemetry, TcpTelemetry

INBOUND_LISTENER, PLAIN_LISTENER = 0, 1
RATINGS_PAYLOAD = encode_frame(RATINGS_V2.values, "ratings")[HEADER.size:]


def directory() -> PeerDirectory:
    return PeerDirectory()


def test_a_connection_waits_for_its_exchange_and_then_has_the_peers_identity():
    peers = directory()
    peers.on_batch(Batch([opened(10, INBOUND_LISTENER, identifies_peer=True), opened(11, PLAIN_LISTENER)], [], []))
    assert peers.peer_of(10) is None  # exchanging, not settled: telemetry waits
    assert peers.peer_of(11) == UNKNOWN_PEER  # the engine said no Peer record would come
    peers.on_batch(Batch([], [], [], [Peer(10, RATINGS_PAYLOAD)]))
    assert peers.peer_of(10) == PeerInfo(
        Workload("ratings-v2", "default", "ratings", "v2", "ratings", "v2", "Kubernetes"))


def test_a_peer_known_by_its_certificate_alone_has_its_namespace_from_the_san():
    # As Istio's stats: without the exchange, the namespace the SPIFFE id names.
    peers = directory()
    principal = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings-v2"
    peers.on_batch(Batch([opened(10, INBOUND_LISTENER, identifies_peer=True)], [], [], [Peer(10, None, principal)]))
    assert peers.peer_of(10) == PeerInfo(Workload(namespace="bookinfo"), principal)
    peers.on_batch(Batch([], [], [], [Peer(11, RATINGS_PAYLOAD, principal)]))
    assert peers.peer_of(11).workload.namespace == "default"  # the exchange says better


def decoded(peers: PeerDirectory) -> tuple[int, int]:
    """The two events the directory counts itself: (peer_found, header_not_found)."""
    events = peers.events(dict.fromkeys(ENGINE_EVENT_KEYS, 0))
    return events["peer_found"], events["header_not_found"]


def test_a_peer_that_sent_no_frame_is_unknown():
    peers = directory()
    peers.on_batch(Batch([opened(10, INBOUND_LISTENER, identifies_peer=True)], [], [], [Peer(10, None)]))
    assert peers.peer_of(10) == UNKNOWN_PEER
    assert decoded(peers) == (0, 0)


def test_a_payload_is_decoded_once_however_many_connections_carry_it(monkeypatch):
    import fastmesh.peers

    calls = []
    real = fastmesh.peers.decode_payload
    monkeypatch.setattr(fastmesh.peers, "decode_payload", lambda p: calls.append(p) or real(p))
    peers = directory()
    peers.on_batch(Batch([opened(i, INBOUND_LISTENER, identifies_peer=True) for i in range(100)], [], [],
                         [Peer(i, RATINGS_PAYLOAD) for i in range(100)]))
    assert len(calls) == 1
    assert {peers.peer_of(i).workload.workload for i in range(100)} == {"ratings-v2"}
    assert decoded(peers) == (100, 0)


def test_a_payload_that_does_not_decode_is_an_unknown_peer_counted_and_logged_once(caplog):
    peers = directory()
    garbage = b"\xff" * 5
    wrong_type = independent_frame({"NAME": "x"}, "id", type_url="type.googleapis.com/google.protobuf.Empty")
    with caplog.at_level(logging.WARNING, logger="fastmesh.exchange"):
        peers.on_batch(Batch([], [], [], [Peer(1, garbage), Peer(2, garbage), Peer(3, wrong_type[HEADER.size:])]))
    assert [peers.peer_of(i) for i in (1, 2, 3)] == [UNKNOWN_PEER] * 3
    assert decoded(peers) == (0, 3)
    assert len(caplog.records) == 2  # once per distinct payload
    assert "not a google.protobuf.Any" in caplog.records[0].getMessage()
    assert "google.protobuf.Empty" in caplog.records[1].getMessage()


def test_labels_of_the_wrong_type_in_a_peers_metadata_are_ignored():
    payload = independent_frame({"WORKLOAD_NAME": "w", "NAMESPACE": "ns", "CLUSTER_ID": 7,
                                 "LABELS": {"app": "a", "version": 2}}, "id")[HEADER.size:]
    peers = directory()
    peers.on_batch(Batch([], [], [], [Peer(1, payload)]))
    assert peers.peer_of(1) == PeerInfo(Workload("w", "ns", "a", "", "a", "latest", ""))


def test_a_connection_that_closed_in_the_batch_is_labelled_with_its_peer_then_forgotten():
    peers = directory()
    telemetry = TcpTelemetry(peer_of=peers.peer_of)
    telemetry.add_listener(INBOUND_LISTENER, ListenerTelemetry(INBOUND, MONGODB_V1.workload(), MONGODB_SERVICE))
    batch = Batch([opened(10, INBOUND_LISTENER, identifies_peer=True)], [],
                  [closed(10, 1, 6, 12, listener_id=INBOUND_LISTENER)],
                  [Peer(10, RATINGS_PAYLOAD)])
    peers.on_batch(batch)
    telemetry.on_batch(batch)  # the sidecar's pipeline: peers, telemetry, then forget
    peers.forget(batch.closed)
    ((labels, series),) = telemetry.samples()
    assert labels[1] == "ratings-v2" and labels[9] == "mongodb-v1"
    assert (series.opened, series.closed, series.received, series.sent) == (1, 1, 6, 12)
    assert peers.peer_of(10) == UNKNOWN_PEER and not peers._peers and not peers._awaiting
