"""Idle timeouts as Istio has them (connectionPool.tcp.idleTimeout, 1 hour by default; serve
--idle-timeout): a relayed connection with no byte either way for its cluster's idle timeout is
closed cleanly on both sides and counted (idle_timeouts, CloseReason.IDLE_TIMEOUT), and one
that keeps talking is never. Both engines; the config and flag forms."""

from __future__ import annotations

import socket
import textwrap
import threading
import time

from conftest import Collector, wait_until
from test_tls_engine import MONGODB, RATINGS, App, Sidecar, client_context, tls_connect
from fastmesh.cli import build_parser
from fastmesh.config import load_documents, plan
from fastmesh.defaults import DEFAULTS
from fastmesh.reasons import CloseReason
from fastmesh.routing import RouteTable
from fastmesh.tls import ListenerTls

IDLE = 1.0  # seconds; the engines check every contract.IDLE_SWEEP, so it fires within 2 s


def echo_until_end(conn: socket.socket) -> bytes:
    seen = b""
    while chunk := conn.recv(65536):
        seen += chunk
        conn.sendall(chunk)
    return seen


def test_an_idle_connection_is_closed_cleanly_and_counted(upstream, relay_to):
    server = upstream(echo_until_end)
    engine, address = relay_to(server.address, idle_timeout=IDLE)
    collector = Collector(engine)
    with socket.create_connection(address) as quiet, socket.create_connection(address) as talking:
        quiet.sendall(b"hello\n")
        assert quiet.recv(64) == b"hello\n"
        stop = threading.Event()

        def keep_talking() -> None:  # a byte well within every idle timeout, for 4 timeouts
            deadline = time.monotonic() + 4 * IDLE
            while time.monotonic() < deadline and not stop.is_set():
                talking.sendall(b".")
                assert talking.recv(1) == b"."
                time.sleep(IDLE / 4)

        talker = threading.Thread(target=keep_talking)
        talker.start()
        quiet.settimeout(20)
        assert quiet.recv(64) == b""  # a clean end of stream (FIN), not a reset
        talker.join()
        stop.set()
        (record,) = collector.wait_closed(1)
        assert (CloseReason(record.reason), record.bytes) == (CloseReason.IDLE_TIMEOUT, [6, 6, 6, 6])
        assert engine.stats()["idle_timeouts"] == 1
        talking.sendall(b"still here")  # the one that kept talking is open
        talking.settimeout(20)
        assert talking.recv(64) == b"still here"
    seen = sorted(server.wait(2), key=len)
    assert seen[0] == b"hello\n" and seen[1].strip(b".") == b"still here"  # every byte through, each way


def test_zero_means_never(upstream, relay_to):
    server = upstream(echo_until_end)
    engine, address = relay_to(server.address, idle_timeout=0)
    with socket.create_connection(address) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        time.sleep(3 * IDLE)  # three idle timeouts' worth of silence: nothing happens
        client.sendall(b"y")
        assert client.recv(1) == b"y"
    wait_until(lambda: engine.stats()["active_connections"] == 0)
    assert engine.stats()["idle_timeouts"] == 0


def test_the_destination_rule_the_sidecar_and_the_flag_set_it(tmp_path):
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: mongodb, namespace: default}
        spec:
          host: mongodb.default.svc.cluster.local
          trafficPolicy: {connectionPool: {tcp: {idleTimeout: 30s}}}
          subsets:
          - {name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {tcp: {idleTimeout: 0s}}}}
        ---
        apiVersion: fastmesh.io/v1alpha1
        kind: Sidecar
        metadata: {name: ratings, namespace: default}
        spec:
          idleTimeout: 5m
          outbound:
          - {port: 0, host: mongodb.default.svc.cluster.local, servicePort: 27017}
          - {port: 0, host: reviews.default.svc.cluster.local, servicePort: 9080}
          inbound: [{port: 0, targetPort: 9080}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: mongodb, namespace: default}
        spec:
          hosts: [mongodb.default.svc.cluster.local]
          tcp: [{route: [{destination: {host: mongodb.default.svc.cluster.local, subset: v1}, weight: 50},
                         {destination: {host: mongodb.default.svc.cluster.local}, weight: 50}]}]
        """))
    listeners = plan(load_documents([str(tmp_path / "mesh.yaml")]), resolve=False).sidecar.listeners
    timeouts = {c.name: c.idle_timeout for listener in listeners for c in listener.routes.clusters}
    assert timeouts == {
        "outbound|27017|v1|mongodb.default.svc.cluster.local": 0.0,  # the subset's 0s: never
        "outbound|27017||mongodb.default.svc.cluster.local": 30.0,  # the rule's
        "outbound|9080||reviews.default.svc.cluster.local": 300.0,  # no rule: the Sidecar's
        "inbound|0||": 300.0,
    }
    parser = build_parser()
    assert parser.parse_args(["serve", "--listen", ":1", "--upstream", ":2"]).idle_timeout == DEFAULTS.idle_timeout == 3600
    assert parser.parse_args(["serve", "--listen", ":1", "--upstream", ":2", "--idle-timeout", "0"]).idle_timeout == 0
    assert parser.parse_args(["serve", "--listen", ":1", "--upstream", ":2", "--idle-timeout", "90s"]).idle_timeout == 90


def test_an_idle_mtls_connection_ends_with_close_notify_not_a_truncation(make_engine, upstream, mesh_certs):
    app = App(upstream)
    inbound = Sidecar(make_engine, mesh_certs.identity(*MONGODB), RouteTable.single([app.address], idle_timeout=IDLE),
                      None, ListenerTls("STRICT"))
    ctx = client_context(mesh_certs.identity(*RATINGS), mesh_certs.root, alpn=("istio",))
    with tls_connect(inbound.address, ctx) as client:
        client.sendall(b"ping")
        client.sock.settimeout(20)
        assert client.recv(64) == b""  # close_notify; an end of stream without it raises SSLEOFError
    (record,) = inbound.wait_closed(1)
    assert CloseReason(record.reason) == CloseReason.IDLE_TIMEOUT
    assert app.received == [b"ping"]
