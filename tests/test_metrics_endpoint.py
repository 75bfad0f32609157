"""The metrics port of real sidecars: Istio's TCP series with exact values and
labels for both reporters, periodic reporting of open connections, OpenMetrics."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import MONGODB_SERVICE as MONGODB
from conftest import MONGODB_V1, RATINGS_V2, assert_closed_by_relay, free_port, one_listener
from fastmesh.addr import Address
from fastmesh.identity import NodeMetadata
from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.peers import PeerInfo
from fastmesh.settings import ExchangeConfig, SidecarConfig

LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)


def config(upstream: tuple[str, int], direction: str, node: NodeMetadata, **overrides) -> SidecarConfig:
    return one_listener(LOOPBACK_ANY_PORT, [upstream], direction, MONGODB, admin=None, metrics=LOOPBACK_ANY_PORT,
                        node_metadata=node, **overrides)


def hello_server(conn: socket.socket) -> None:
    # Istio's e2e TCP test: the client sends "world\n", the server answers "hello world\n".
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    conn.sendall(b"hello " + data)


def send_world(address: tuple[str, int], connections: int) -> None:
    """Istio's e2e client: each connection sends "world\\n" and expects "hello world\\n"."""
    for _ in range(connections):
        with socket.create_connection(address) as client:
            client.sendall(b"world\n")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(64) == b"hello world\n"


def tcp_series(text: str, parser=parse_text) -> dict[tuple[str, str], dict]:
    """{(metric, reporter): {"value": v, "labels": {...}}} for the istio_tcp_* samples."""
    found = {}
    for family in parser(text):
        for sample in family.samples:
            if sample.name.startswith("istio_tcp_"):
                key = (sample.name, sample.labels["reporter"])
                assert key not in found, f"more than one series for {key}"
                found[key] = {"value": sample.value, "labels": sample.labels}
    return found


def wait_for(scrape, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        _, text = scrape()
        series = tcp_series(text)
        if predicate(series) or time.monotonic() > deadline:
            return series
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["plaintext", "plaintext-exchange", "mtls"])
def test_both_reporters_count_istios_reference_traffic_exactly(upstream, sidecar, mesh_certs, transport):
    # Plaintext with no exchange: peers unknown; fastmesh's plaintext exchange: peers
    # known; mTLS (Istio's way): peers known, both principals, mutual_tls inbound.
    server = upstream(hello_server)
    exchange = transport != "plaintext"
    mtls = transport == "mtls"
    options = {"exchange": ExchangeConfig(plaintext=transport == "plaintext-exchange")}

    def certs(account: str) -> dict:
        return {"certs": mesh_certs.identity("default", account)} if mtls else {}

    inbound = sidecar(config(server.address, INBOUND, MONGODB_V1, reporting_duration=0.5, **options,
                             **certs("mongodb")))
    outbound = sidecar(config(inbound.listen, OUTBOUND, RATINGS_V2, reporting_duration=0.5, mesh_peer=exchange,
                              **options, **certs("bookinfo-ratings-v2")))
    send_world(outbound.listen, 10)
    server.wait(10)

    for running, reporter in ((outbound, "source"), (inbound, "destination")):
        series = wait_for(running.scrape, lambda s: s.get(
            ("istio_tcp_connections_closed_total", reporter), {}).get("value") == 10)
        values = {name: s["value"] for (name, rep), s in series.items() if rep == reporter}
        # Exactly what the clients sent and received: the exchange frames are never counted.
        assert values == {
            "istio_tcp_connections_opened_total": 10,
            "istio_tcp_connections_closed_total": 10,
            "istio_tcp_received_bytes_total": 60,
            "istio_tcp_sent_bytes_total": 120,
        }
    server_side = {
        "destination_workload": "mongodb-v1", "destination_workload_namespace": "default",
        "destination_app": "mongodb", "destination_version": "v1", "destination_canonical_service": "mongodb",
        "destination_canonical_revision": "v1", "destination_cluster": "Kubernetes",
    }
    client_side = {
        "source_workload": "ratings-v2", "source_workload_namespace": "default", "source_app": "ratings",
        "source_version": "v2", "source_canonical_service": "ratings", "source_canonical_revision": "v2",
        "source_cluster": "Kubernetes",
    }
    unknown_server = {k: ("latest" if k.endswith("revision") else "unknown") for k in server_side}
    unknown_client = {k: ("latest" if k.endswith("revision") else "unknown") for k in client_side}
    common = {
        "source_principal": mesh_certs.spiffe("default", "bookinfo-ratings-v2") if mtls else "unknown",
        "destination_principal": mesh_certs.spiffe("default", "mongodb") if mtls else "unknown",
        "destination_service": MONGODB, "destination_service_name": "mongodb",
        "destination_service_namespace": "default", "request_protocol": "tcp", "response_flags": "-",
    }
    source = tcp_series(outbound.scrape()[1])[("istio_tcp_connections_opened_total", "source")]["labels"]
    assert source == {"reporter": "source", **client_side, **(server_side if exchange else unknown_server),
                      **common, "connection_security_policy": "unknown"}
    destination = tcp_series(inbound.scrape()[1])[("istio_tcp_connections_opened_total", "destination")]["labels"]
    assert destination == {"reporter": "destination", **(client_side if exchange else unknown_client),
                           **server_side, **common, "connection_security_policy": "mutual_tls" if mtls else "none"}


def test_an_open_connection_is_reported_every_period(upstream, sidecar):
    def answer_then_hold(conn: socket.socket) -> None:
        received = b""
        while len(received) < 70:
            received += conn.recv(70 - len(received))
        conn.sendall(b"x" * 30)
        while conn.recv(65536):  # stay open until the client leaves
            pass

    server = upstream(answer_then_hold)
    outbound = sidecar(config(server.address, OUTBOUND, RATINGS_V2, reporting_duration=0.5))
    with socket.create_connection(outbound.listen) as client:
        client.sendall(b"y" * 70)
        assert client.recv(30) == b"x" * 30
        series = wait_for(outbound.scrape,
                          lambda s: s.get(("istio_tcp_received_bytes_total", "source"), {}).get("value") == 70)
        assert {name: s["value"] for (name, _), s in series.items()} == {
            "istio_tcp_connections_opened_total": 1,
            "istio_tcp_connections_closed_total": 0,
            "istio_tcp_received_bytes_total": 70,
            "istio_tcp_sent_bytes_total": 30,
        }


def test_a_refused_upstream_is_counted_with_response_flag_uf(sidecar):
    outbound = sidecar(config(("127.0.0.1", free_port()), OUTBOUND, RATINGS_V2))
    with socket.create_connection(outbound.listen) as client:
        assert_closed_by_relay(client)
    series = wait_for(outbound.scrape,
                      lambda s: ("istio_tcp_connections_closed_total", "source") in s)
    closed = series[("istio_tcp_connections_closed_total", "source")]
    assert closed["value"] == 1 and closed["labels"]["response_flags"] == "UF"
    _, text = outbound.scrape()
    health = {f.name: f.samples[0].value for f in parse_text(text) if f.name.startswith("fastmesh_")}
    assert health["fastmesh_upstream_connect_failures"] == 1
    assert health["fastmesh_active_connections"] == 0


def test_openmetrics_when_the_scraper_asks_and_both_paths_serve_the_same(upstream, sidecar):
    server = upstream(hello_server)
    outbound = sidecar(config(server.address, OUTBOUND, RATINGS_V2))
    send_world(outbound.listen, 1)
    wait_for(outbound.scrape, lambda s: ("istio_tcp_connections_closed_total", "source") in s)
    content_type, text = outbound.scrape(accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    series = tcp_series(text, parse_openmetrics)
    assert series[("istio_tcp_sent_bytes_total", "source")]["value"] == 12
    plain_type, plain = outbound.scrape("/metrics")
    assert plain_type.startswith("text/plain; version=0.0.4")
    assert tcp_series(plain) == tcp_series(outbound.scrape("/stats/prometheus")[1])


def metrics_url_after(upstream, sidecar, connections: int) -> str:
    """The metrics URL of an outbound sidecar once `connections` closed connections are recorded."""
    server = upstream(hello_server)
    outbound = sidecar(config(server.address, OUTBOUND, RATINGS_V2))
    send_world(outbound.listen, connections)
    wait_for(outbound.scrape, lambda s: s.get(
        ("istio_tcp_connections_closed_total", "source"), {}).get("value") == connections)
    return "http://%s:%d/stats/prometheus" % outbound.sidecar.metrics_address


def test_the_metrics_command_prints_the_series_as_a_table(upstream, sidecar):
    url = metrics_url_after(upstream, sidecar, 3)
    result = subprocess.run([sys.executable, "-m", "fastmesh", "metrics", "--url", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["REPORTER", "SOURCE_WORKLOAD", "DESTINATION_WORKLOAD", "DESTINATION_SERVICE_NAME", "RESPONSE_FLAGS",
         "OPENED", "CLOSED", "RECEIVED", "SENT"],
        ["source", "ratings-v2", "unknown", "mongodb", "-", "3", "3", "18", "36"],
    ]


def test_both_reporters_carry_the_peers_identity_when_it_is_known(upstream, sidecar):
    # The peer lookup is what the peer exchange fills in; here each side is told
    # its peer directly, and the series must carry the other side's identity.
    server = upstream(hello_server)
    inbound = sidecar(config(server.address, INBOUND, MONGODB_V1, reporting_duration=0.5))
    outbound = sidecar(config(inbound.listen, OUTBOUND, RATINGS_V2, reporting_duration=0.5))
    inbound.sidecar.telemetry.peer_of = lambda conn_id: PeerInfo(RATINGS_V2.workload())
    outbound.sidecar.telemetry.peer_of = lambda conn_id: PeerInfo(MONGODB_V1.workload())
    send_world(outbound.listen, 4)
    server.wait(4)
    identity = ("source_workload", "source_app", "source_version", "source_canonical_service",
                "destination_workload", "destination_app", "destination_version",
                "destination_canonical_service", "destination_canonical_revision", "destination_service_name")
    expected_identity = ("ratings-v2", "ratings", "v2", "ratings",
                         "mongodb-v1", "mongodb", "v1", "mongodb", "v1", "mongodb")
    for running, reporter in ((outbound, "source"), (inbound, "destination")):
        series = wait_for(running.scrape, lambda s: s.get(
            ("istio_tcp_connections_closed_total", reporter), {}).get("value") == 4)
        assert {name: s["value"] for (name, _), s in series.items()} == {
            "istio_tcp_connections_opened_total": 4,
            "istio_tcp_connections_closed_total": 4,
            "istio_tcp_received_bytes_total": 24,
            "istio_tcp_sent_bytes_total": 48,
        }
        labels = series[("istio_tcp_connections_opened_total", reporter)]["labels"]
        assert tuple(labels[name] for name in identity) == expected_identity


def test_metrics_watch_refreshes_until_interrupted(upstream, sidecar):
    url = metrics_url_after(upstream, sidecar, 2)
    watcher = subprocess.Popen([sys.executable, "-m", "fastmesh", "metrics", "--url", url, "--watch", "100ms"],
                               stdout=subprocess.PIPE, text=True)
    lines = []
    for line in watcher.stdout:  # read until the table has been drawn three times
        lines.append(line)
        if sum(seen.startswith("source") for seen in lines) == 3:
            break
    watcher.send_signal(signal.SIGINT)
    watcher.stdout.close()
    assert watcher.wait(30) == 0
    assert sum("RESPONSE_FLAGS" in line for line in lines) == 3
    rows = [line.split() for line in lines if line.startswith("source")]
    assert rows == [["source", "ratings-v2", "unknown", "mongodb", "-", "2", "2", "12", "24"]] * 3
