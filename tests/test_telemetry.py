"""Istio TCP telemetry from engine batches: the 23 labels with Istio's values,
periodic and close-time reporting, response flags, node metadata files."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from conftest import MONGODB_SERVICE, MONGODB_V1, RATINGS_V2, closed, one_listener, opened, updated
from fastmesh.addr import Address
from fastmesh.identity import MetadataError, NodeMetadata, Workload, load_node_metadata, parse_node_metadata
from fastmesh.peers import PeerInfo
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch
from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.settings import ExchangeConfig
from fastmesh.telemetry import TCP_LABELS, ListenerTelemetry, TcpTelemetry, service_name



def labels(values: tuple[str, ...]) -> dict[str, str]:
    assert len(values) == len(TCP_LABELS) == 23
    return dict(zip(TCP_LABELS, values))


def test_outbound_labels_with_an_unknown_peer():
    listener = ListenerTelemetry(OUTBOUND, RATINGS_V2.workload(), MONGODB_SERVICE)
    assert labels(listener.labels(PeerInfo(Workload()), "-")) == {
        "reporter": "source",
        "source_workload": "ratings-v2",
        "source_workload_namespace": "default",
        "source_principal": "unknown",
        "source_app": "ratings",
        "source_version": "v2",
        "source_canonical_service": "ratings",
        "source_canonical_revision": "v2",
        "source_cluster": "Kubernetes",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": MONGODB_SERVICE,
        # Istio would say the whole host and "unknown" here; fastmesh reads the
        # namespace from the service host when the peer is unknown (README).
        "destination_service_name": "mongodb",
        "destination_service_namespace": "default",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "latest",
        "destination_cluster": "unknown",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }


def test_inbound_labels_with_a_known_peer_match_istios_bookinfo_expectation():
    # The labels Istio's 1.7 integration test expects for ratings-v2 -> mongodb.
    listener = ListenerTelemetry(INBOUND, MONGODB_V1.workload(), MONGODB_SERVICE)
    result = labels(listener.labels(PeerInfo(RATINGS_V2.workload()), "-"))
    assert {k: result[k] for k in (
        "reporter", "request_protocol", "destination_service_name", "destination_canonical_service",
        "destination_canonical_revision", "destination_app", "destination_version", "source_app",
        "source_version", "source_workload", "source_workload_namespace",
        "destination_workload_namespace", "destination_service_namespace",
    )} == {
        "reporter": "destination", "request_protocol": "tcp", "destination_service_name": "mongodb",
        "destination_canonical_service": "mongodb", "destination_canonical_revision": "v1",
        "destination_app": "mongodb", "destination_version": "v1", "source_app": "ratings",
        "source_version": "v2", "source_workload": "ratings-v2", "source_workload_namespace": "default",
        "destination_workload_namespace": "default", "destination_service_namespace": "default",
    }
    assert result["connection_security_policy"] == "none"
    assert result["destination_workload"] == "mongodb-v1"


@pytest.mark.parametrize("direction", [OUTBOUND, INBOUND])
def test_an_mtls_connection_carries_both_principals_as_istio_reports_them(direction):
    # Istio's stats: principals from the certificates' URI SANs; the inbound reporter's
    # policy mutual_tls, the outbound's unknown.
    local, peer = ("spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2",
                   "spiffe://cluster.local/ns/default/sa/mongodb")
    if direction == INBOUND:
        local, peer = peer, local
    listener = ListenerTelemetry(direction, RATINGS_V2.workload(), MONGODB_SERVICE, local_principal=local)
    result = labels(listener.labels(PeerInfo(MONGODB_V1.workload(), peer), "-"))
    assert (result["source_principal"], result["destination_principal"]) == (
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2", "spiffe://cluster.local/ns/default/sa/mongodb")
    assert result["connection_security_policy"] == ("unknown" if direction == OUTBOUND else "mutual_tls")
    plaintext = labels(listener.labels(PeerInfo(MONGODB_V1.workload()), "-"))  # the same listener, no TLS
    assert (plaintext["source_principal"], plaintext["destination_principal"]) == ("unknown", "unknown")
    assert plaintext["connection_security_policy"] == ("unknown" if direction == OUTBOUND else "none")


@pytest.mark.parametrize(
    "node_labels, canonical",
    [
        ({"service.istio.io/canonical-name": "c", "app.kubernetes.io/name": "k", "app": "a"}, ("c", "latest")),
        ({"app.kubernetes.io/name": "k", "app": "a", "app.kubernetes.io/version": "9", "version": "v"}, ("k", "9")),
        ({"app": "a", "version": "v"}, ("a", "v")),
        ({"service.istio.io/canonical-revision": "r", "version": "v"}, ("productpage-v1", "r")),
        ({}, ("productpage-v1", "latest")),
    ],
)
def test_canonical_service_and_revision_follow_the_injector(node_labels, canonical):
    workload = NodeMetadata({"WORKLOAD_NAME": "productpage-v1", "LABELS": node_labels}).workload()
    assert (workload.canonical_service, workload.canonical_revision) == canonical


@pytest.mark.parametrize(
    "host, namespace, expected",
    [
        ("mongodb.default.svc.cluster.local", "default", "mongodb"),
        ("mongodb.default.svc.cluster.local", "other", "mongodb.default.svc.cluster.local"),
        ("example.com", "default", "example.com"),
    ],
)
def test_destination_service_name(host, namespace, expected):
    assert service_name(host, namespace) == expected


def fresh(direction: str = OUTBOUND) -> TcpTelemetry:
    telemetry = TcpTelemetry()
    telemetry.add_listener(0, ListenerTelemetry(direction, RATINGS_V2.workload(), MONGODB_SERVICE))
    return telemetry


def only_series(telemetry: TcpTelemetry):
    ((key, series),) = telemetry.samples()
    return labels(key), (series.opened, series.closed, series.received, series.sent)


def test_open_connections_are_reported_each_period_and_at_close():
    telemetry = fresh()
    telemetry.on_batch(Batch([opened(1)], [updated(1, 100, 40)], []))
    assert list(telemetry.samples()) == []  # nothing until the reporting period ends
    telemetry.report()
    assert only_series(telemetry)[1] == (1, 0, 100, 40)
    telemetry.on_batch(Batch([], [updated(1, 5, 7)], []))
    telemetry.report()
    telemetry.report()  # nothing changed: nothing added, opened still counted once
    assert only_series(telemetry)[1] == (1, 0, 105, 47)
    telemetry.on_batch(Batch([], [updated(1, 1, 1)], [closed(1, CloseReason.DOWNSTREAM_CLOSE, 2, 3)]))
    assert only_series(telemetry)[1] == (1, 1, 108, 51)  # the close is recorded without waiting


def test_a_connection_that_opens_and_closes_between_reports_counts_once():
    telemetry = fresh(INBOUND)
    telemetry.on_batch(Batch([], [], [closed(9, CloseReason.UPSTREAM_CLOSE, 6, 12)]))
    result, values = only_series(telemetry)
    assert values == (1, 1, 6, 12)
    assert result["reporter"] == "destination" and result["response_flags"] == "-"


@pytest.mark.parametrize(
    "reason, flags",
    [
        (CloseReason.CONNECT_FAILED, "UF"),
        (CloseReason.CONNECT_TIMEOUT, "UF"),
        (CloseReason.LOCAL_ERROR, "UF"),
        (CloseReason.DOWNSTREAM_RESET, "DC"),
        (CloseReason.UPSTREAM_RESET, "UC"),
        (CloseReason.SHUTDOWN, "-"),
    ],
)
def test_response_flags_of_a_connection_that_ends_before_its_first_report(reason, flags):
    telemetry = fresh()
    telemetry.on_batch(Batch([opened(1)], [], [closed(1, reason, errno=111)]))
    result, values = only_series(telemetry)
    assert result["response_flags"] == flags
    assert values == (1, 1, 0, 0)


def test_labels_are_fixed_at_the_first_report():
    # As Istio fills a connection's request info once: a reset after the first
    # report adds to the same series rather than splitting it.
    telemetry = fresh()
    telemetry.on_batch(Batch([opened(1)], [updated(1, 10, 0)], []))
    telemetry.report()
    telemetry.on_batch(Batch([], [], [closed(1, CloseReason.UPSTREAM_RESET, errno=104)]))
    result, values = only_series(telemetry)
    assert result["response_flags"] == "-" and values == (1, 1, 10, 0)


def inbound_with_peers(peers: dict[int, PeerInfo | None]) -> TcpTelemetry:
    telemetry = TcpTelemetry(peer_of=peers.get)
    telemetry.add_listener(0, ListenerTelemetry(INBOUND, MONGODB_V1.workload(), MONGODB_SERVICE))
    return telemetry


def test_a_peer_that_is_not_known_yet_holds_the_report_back_until_close():
    telemetry = inbound_with_peers({1: None})
    telemetry.on_batch(Batch([opened(1)], [updated(1, 3, 0)], []))
    telemetry.report()
    assert list(telemetry.samples()) == []
    telemetry.on_batch(Batch([], [], [closed(1, CloseReason.DOWNSTREAM_CLOSE, 1, 0)]))
    result, values = only_series(telemetry)
    assert result["source_workload"] == "unknown" and values == (1, 1, 4, 0)  # recorded, unlike Istio 1.7


def test_a_peer_still_unknown_after_a_whole_period_is_reported_unknown_and_stays_so():
    # A client that never speaks first, or a mesh upstream that never answers:
    # its bytes must not wait for a frame that may never come.
    peers: dict[int, PeerInfo | None] = {1: None}
    telemetry = inbound_with_peers(peers)
    telemetry.on_batch(Batch([opened(1)], [updated(1, 0, 50)], []))
    telemetry.report()
    assert list(telemetry.samples()) == []  # the first report waits for the peer
    telemetry.on_batch(Batch([], [updated(1, 0, 7)], []))
    telemetry.report()
    result, values = only_series(telemetry)
    assert result["source_workload"] == "unknown" and values == (1, 0, 0, 57)
    peers[1] = PeerInfo(RATINGS_V2.workload())  # a frame that comes after that cannot relabel what was reported
    telemetry.on_batch(Batch([], [], [closed(1, CloseReason.UPSTREAM_CLOSE, 0, 3)]))
    result, values = only_series(telemetry)
    assert result["source_workload"] == "unknown" and values == (1, 1, 0, 60)


def test_a_client_that_never_speaks_is_reported_while_its_connection_stays_open(sidecar, upstream):
    # A server-first app streaming to a plain client that sends nothing: the
    # inbound exchange never settles, yet the bytes are reported after one period.
    greeting = bytes(range(256)) * 4

    def stream_then_wait(conn: socket.socket) -> None:
        conn.sendall(greeting)
        conn.recv(1)  # until the client goes

    app = upstream(stream_then_wait)
    inbound = sidecar(one_listener(
        Address("127.0.0.1", 0), [app.address], INBOUND, MONGODB_SERVICE, admin=None,
        metrics=Address("127.0.0.1", 0), node_metadata=MONGODB_V1, reporting_duration=0.2,
        exchange=ExchangeConfig(plaintext=True, detect_timeout=0.05)))
    with socket.create_connection(inbound.listen) as client:
        assert client.recv(len(greeting), socket.MSG_WAITALL) == greeting
        deadline = time.monotonic() + 20
        while True:
            found = inbound.samples()
            if "istio_tcp_sent_bytes_total" in found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        (sent,) = found["istio_tcp_sent_bytes_total"]
        assert sent.value == len(greeting) and sent.labels["source_workload"] == "unknown"
        assert sent.labels["destination_workload"] == "mongodb-v1"
        assert [s.value for s in found["istio_tcp_connections_opened_total"]] == [1]
        assert [s.value for s in found["istio_tcp_connections_closed_total"]] == [0]  # still open
        assert [s.value for s in found["istio_tcp_received_bytes_total"]] == [0]


def test_pairs_outside_any_listener_are_not_reported():
    telemetry = fresh()
    telemetry.on_batch(Batch([opened(1, None, None, None)], [updated(1, 5, 5)], [closed(2, 1, 1, 1, None, None, None)]))
    telemetry.report()
    assert list(telemetry.samples()) == []


def test_node_metadata_from_json_and_yaml(tmp_path):
    data = {"NAME": "p", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2",
            "LABELS": {"app": "ratings", "version": "v2"}, "INSTANCE_IPS": "10.0.0.1"}
    (tmp_path / "node.json").write_text(json.dumps(data))
    (tmp_path / "node.yaml").write_text(
        "NAME: p\nNAMESPACE: default\nWORKLOAD_NAME: ratings-v2\nINSTANCE_IPS: 10.0.0.1\n"
        "LABELS:\n  app: ratings\n  version: v2\n")
    for name in ("node.json", "node.yaml"):
        metadata = load_node_metadata(tmp_path / name)
        assert metadata.values == data
        assert metadata.node_id() == "sidecar~10.0.0.1~p.default~default.svc.cluster.local"


@pytest.mark.parametrize(
    "data, message",
    [
        (["NAME"], "expected a mapping of node metadata keys, got list"),
        ({"NAMESPACE": 7}, "NAMESPACE must be a string, got int"),
        ({"LABELS": {"app": 1}}, "LABELS must be a map of strings to strings"),
        ({"LABELS": "app=ratings"}, "LABELS must be a map of strings to strings"),
    ],
)
def test_bad_node_metadata_is_rejected_precisely(data, message):
    with pytest.raises(MetadataError, match=message):
        parse_node_metadata(data, "node.yaml")


def test_unreadable_and_malformed_metadata_files(tmp_path):
    with pytest.raises(MetadataError, match="missing.json: No such file or directory"):
        load_node_metadata(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MetadataError, match="bad.json: not valid JSON"):
        load_node_metadata(tmp_path / "bad.json")


def test_the_readmes_label_list_is_the_exported_one_in_order():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    bullet = readme.split("- the four `istio_tcp_*` counters", 1)[1].split("\n- ", 1)[0]
    assert tuple(re.findall(r"`([a-z_]+)`", bullet)) == TCP_LABELS
