"""A pair of sidecars (outbound, then inbound) in front of real databases, driven
by real clients: Redis (the client speaks first) and MariaDB (the server greets
first, as for Bookinfo's ratings-v2-mysql). Over mTLS, as Istio's sidecars, and
over fastmesh's plaintext exchange: both reporters' metrics must carry the other
side's identity, learnt over istio-peer-exchange (and, over mTLS, both principals
from the certificates), with exact counts and the same byte totals on both sides
(frames and TLS records are never counted)."""

from __future__ import annotations

import subprocess
import time

import pymysql
import pytest
import redis

from conftest import RATINGS_V2, MeshCerts, one_listener

from fastmesh.addr import Address
from fastmesh.identity import NodeMetadata
from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.settings import ExchangeConfig
from test_real_servers import listens, redis_server, start_until_ready, stop_server, tool  # noqa: F401 (fixture)

pytestmark = pytest.mark.bench_tools

LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)
REDIS_V1 = NodeMetadata({"NAME": "redis-v1-0", "NAMESPACE": "default", "WORKLOAD_NAME": "redis-v1",
                         "LABELS": {"app": "redis", "version": "v1"}, "CLUSTER_ID": "Kubernetes"})
MYSQLDB_V1 = NodeMetadata({"NAME": "mysqldb-v1-0", "NAMESPACE": "default", "WORKLOAD_NAME": "mysqldb-v1",
                           "LABELS": {"app": "mysqldb", "version": "v1"}, "CLUSTER_ID": "Kubernetes"})


CLIENT_SA = "bookinfo-ratings-v2"


@pytest.fixture(params=["mtls", "plaintext-exchange"])
def transport(request: pytest.FixtureRequest, mesh_certs: MeshCerts) -> MeshCerts | None:
    """The pair's certificates (mTLS, Istio's way), or None (fastmesh's plaintext exchange)."""
    return mesh_certs if request.param == "mtls" else None


def service_account(node: NodeMetadata) -> str:
    return node.get("WORKLOAD_NAME").rsplit("-v", 1)[0]  # redis-v1 runs as the service account redis


def start_pair(sidecar, database: tuple[str, int], database_node: NodeMetadata, service: str,
               certs: MeshCerts | None):
    """The database's inbound sidecar, then ratings-v2's outbound sidecar in front of it."""
    def options(node: NodeMetadata, account: str) -> dict:
        found = dict(admin=None, metrics=LOOPBACK_ANY_PORT, node_metadata=node, reporting_duration=0.5)
        if certs is None:
            found["exchange"] = ExchangeConfig(plaintext=True)
        else:
            found["certs"] = certs.identity("default", account)
        return found

    inbound = sidecar(one_listener(LOOPBACK_ANY_PORT, [database], INBOUND, service,
                                   **options(database_node, service_account(database_node))))
    outbound = sidecar(one_listener(LOOPBACK_ANY_PORT, [inbound.listen], OUTBOUND, service, mesh_peer=True,
                                    **options(RATINGS_V2, CLIENT_SA)))
    return outbound, inbound


def wait_closed(running, connections: int, timeout: float = 20.0) -> dict[str, list]:
    deadline = time.monotonic() + timeout
    while True:
        found = running.samples()
        closed = sum(s.value for s in found.get("istio_tcp_connections_closed_total", []))
        if closed >= connections or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def expected_labels(reporter: str, database: NodeMetadata, service: str, mtls: bool) -> dict[str, str]:
    client, server = RATINGS_V2.workload(), database.workload()
    principal = (lambda account: MeshCerts.spiffe("default", account)) if mtls else (lambda account: "unknown")
    policy = "unknown" if reporter == "source" else "mutual_tls" if mtls else "none"
    return {
        "reporter": reporter,
        "source_workload": client.workload, "source_workload_namespace": "default",
        "source_principal": principal(CLIENT_SA), "source_app": client.app, "source_version": client.version,
        "source_canonical_service": client.app, "source_canonical_revision": client.version,
        "source_cluster": "Kubernetes",
        "destination_workload": server.workload, "destination_workload_namespace": "default",
        "destination_principal": principal(service_account(database)), "destination_app": server.app,
        "destination_version": server.version, "destination_service": service,
        "destination_service_name": service.split(".")[0], "destination_service_namespace": "default",
        "destination_canonical_service": server.app, "destination_canonical_revision": server.version,
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": policy,
    }


def check_both_reporters(outbound, inbound, connections: int, database: NodeMetadata, service: str,
                         mtls: bool) -> None:
    seen = {}
    for running, reporter in ((outbound, "source"), (inbound, "destination")):
        found = wait_closed(running, connections)
        values = {}
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                     "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"):
            (sample,) = found[name]  # one label set: every connection learnt the same peer
            assert sample.labels == expected_labels(reporter, database, service, mtls), name
            values[name] = sample.value
        assert values["istio_tcp_connections_opened_total"] == connections
        assert values["istio_tcp_connections_closed_total"] == connections
        events = {s.labels["event"]: s.value for s in found["fastmesh_metadata_exchange_total"]}
        assert events["metadata_added"] == events["peer_found"] == connections, events
        assert events["header_not_found"] == events["initial_header_not_found"] == 0, events
        if mtls:
            assert events["alpn_protocol_found"] == connections, events  # the exchange ran inside TLS
            handshakes = [s.value for s in found["fastmesh_tls_handshakes_total"]]
            assert handshakes == [connections], handshakes
        seen[reporter] = values
    # Both sidecars counted the application's bytes and nothing else: a frame
    # counted on either side would make these differ by its size.
    assert seen["source"]["istio_tcp_sent_bytes_total"] == seen["destination"]["istio_tcp_sent_bytes_total"] > 0
    assert (seen["source"]["istio_tcp_received_bytes_total"]
            == seen["destination"]["istio_tcp_received_bytes_total"] > 0)


# ---------------------------------------------------------------- Redis: the client speaks first


def test_a_sidecar_pair_in_front_of_redis_learns_both_identities(redis_server, sidecar, transport):
    service = "redis.default.svc.cluster.local"
    outbound, inbound = start_pair(sidecar, ("127.0.0.1", redis_server), REDIS_V1, service, transport)
    value = bytes(range(256)) * 4096  # 1 MiB: the exchange ends, then splicing takes over
    for i in range(5):
        client = redis.Redis(host="127.0.0.1", port=outbound.listen.port, socket_timeout=10)
        assert client.ping()
        assert client.set(f"key{i}", value)
        assert client.get(f"key{i}") == value
        client.close()
    check_both_reporters(outbound, inbound, 5, REDIS_V1, service, transport is not None)


# ---------------------------------------------------------------- MariaDB: the server greets first


@pytest.fixture
def mariadb_port(tmp_path):
    datadir = tmp_path / "mariadb"
    install = subprocess.run(
        [tool("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
         "--auth-root-authentication-method=normal", "--skip-test-db"],
        capture_output=True, timeout=120)
    assert install.returncode == 0, install.stderr.decode(errors="replace")[-2000:]
    server = tool("mariadbd")
    port, proc = start_until_ready(
        "mariadbd",
        lambda port: [server, "--no-defaults", f"--datadir={datadir}", "--user=root", f"--port={port}",
                      "--bind-address=127.0.0.1", f"--socket={datadir}/mariadb.sock", "--skip-log-bin",
                      "--skip-name-resolve", "--innodb-buffer-pool-size=16M"],
        listens, tmp_path / "mariadbd.log",
    )
    yield port
    stop_server(proc)


def test_a_sidecar_pair_in_front_of_mariadb_learns_both_identities(mariadb_port, sidecar, transport):
    service = "mysqldb.default.svc.cluster.local"
    outbound, inbound = start_pair(sidecar, ("127.0.0.1", mariadb_port), MYSQLDB_V1, service, transport)

    def connect() -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=outbound.listen.port, user="root",
                               connect_timeout=10, read_timeout=10, autocommit=True)

    with connect() as db, db.cursor() as cursor:  # Bookinfo's ratings table
        cursor.execute("CREATE DATABASE test")
        cursor.execute("CREATE TABLE test.ratings (ReviewID INT PRIMARY KEY, Rating INT)")
        cursor.execute("INSERT INTO test.ratings VALUES (1, 5), (2, 4)")
    for _ in range(3):
        with connect() as db, db.cursor() as cursor:
            cursor.execute("SELECT ReviewID, Rating FROM test.ratings ORDER BY ReviewID")
            assert cursor.fetchall() == ((1, 5), (2, 4))
    check_both_reporters(outbound, inbound, 4, MYSQLDB_V1, service, transport is not None)
    # The greeting never waited for the detect timeout: the mesh client's frame was there first.
    assert "detect_timeout" not in {
        s.labels["event"] for s in inbound.samples()["fastmesh_metadata_exchange_total"] if s.value}


def test_a_plain_mariadb_client_through_an_inbound_sidecar_is_an_unknown_source(mariadb_port, sidecar, transport):
    # Under PERMISSIVE (Istio's default) with certificates, as with the plaintext exchange:
    # a server-first app still greets a plaintext client, after the detect timeout.
    service = "mysqldb.default.svc.cluster.local"
    _, inbound = start_pair(sidecar, ("127.0.0.1", mariadb_port), MYSQLDB_V1, service, transport)
    with pymysql.connect(host="127.0.0.1", port=inbound.listen.port, user="root", connect_timeout=10) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT 1 + 1")
            assert cursor.fetchall() == ((2,),)
    found = wait_closed(inbound, 1)
    (opened,) = found["istio_tcp_connections_opened_total"]
    assert opened.value == 1
    assert opened.labels["source_workload"] == "unknown" and opened.labels["destination_workload"] == "mysqldb-v1"
    assert opened.labels["connection_security_policy"] == "none" and opened.labels["source_principal"] == "unknown"
    events = {s.labels["event"]: s.value for s in found["fastmesh_metadata_exchange_total"]}
    assert events["metadata_added"] == 0, events
    if transport is None:
        assert events["detect_timeout"] == 1, events
    else:
        assert [s.value for s in found["fastmesh_tls_plaintext_total"]] == [1]
