"""Routing in both engines: weighted routes to clusters, load balancing inside a
cluster, and the connections turned away (no route, no endpoint, overflow)."""

from __future__ import annotations

import collections
import socket
import threading
import time

import pytest
from conftest import Collector, assert_closed_by_relay, listening_socket, stop_accepting

from fastmesh.reasons import CloseReason
from fastmesh.routing import Cluster, Destination, RouteTable


class Counting:
    """Servers that count the connections they accept; `hold` keeps them open."""

    def __init__(self, count: int) -> None:
        self.socks = [listening_socket() for _ in range(count)]
        self.accepted = collections.Counter()
        self.held: list[socket.socket] = []
        self.hold = False
        self.lock = threading.Lock()
        self.acceptors = [threading.Thread(target=self._serve, args=(index, sock), daemon=True)
                          for index, sock in enumerate(self.socks)]
        for acceptor in self.acceptors:
            acceptor.start()

    def _serve(self, index: int, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted[index] += 1
                if self.hold:
                    self.held.append(conn)
                    continue
            conn.sendall(b"%d" % index)
            conn.close()

    def address(self, index: int) -> tuple[str, int]:
        return self.socks[index].getsockname()

    def close(self) -> None:
        for sock, acceptor in zip(self.socks, self.acceptors):
            stop_accepting(sock, acceptor)
        for sock in self.held:
            sock.close()


@pytest.fixture
def servers():
    made: list[Counting] = []

    def make(count: int) -> Counting:
        made.append(Counting(count))
        return made[-1]

    yield make
    for counting in made:
        counting.close()


def routed(make_engine, routes: RouteTable):
    engine = make_engine()
    sock = listening_socket()
    sock.setblocking(False)
    engine.add_listener(sock.fileno(), routes)
    engine.start()
    return engine, sock


def answer(address) -> bytes:
    with socket.create_connection(address) as client:
        client.settimeout(10)
        return client.recv(16)


def test_weighted_routes_split_connections_exactly(make_engine, servers):
    backends = servers(2)
    routes = RouteTable((Cluster("v1", "svc", (backends.address(0),)), Cluster("v2", "svc", (backends.address(1),))),
                        ((0, 80), (1, 20)))
    engine, sock = routed(make_engine, routes)
    answers = collections.Counter(answer(sock.getsockname()) for _ in range(1000))
    assert answers == {b"0": 800, b"1": 200}
    collector = Collector(engine)
    records = collector.wait_closed(1000)
    # Each record names its cluster and the endpoint in it.
    assert collections.Counter((r.cluster, r.endpoint) for r in records) == {(0, 0): 800, (1, 0): 200}


def test_round_robin_and_random_spread_over_a_clusters_endpoints(make_engine, servers):
    backends = servers(3)
    endpoints = tuple(backends.address(i) for i in range(3))
    engine, sock = routed(make_engine, RouteTable((Cluster("rr", "svc", endpoints),), ((0, 1),)))
    assert collections.Counter(answer(sock.getsockname()) for _ in range(300)) == {b"0": 100, b"1": 100, b"2": 100}
    engine, sock = routed(make_engine, RouteTable((Cluster("random", "svc", endpoints, lb="RANDOM"),), ((0, 1),)))
    spread = collections.Counter(answer(sock.getsockname()) for _ in range(600))
    assert set(spread) == {b"0", b"1", b"2"} and min(spread.values()) > 100  # 200 each on average


def test_least_conn_sends_new_connections_to_the_least_loaded_endpoint(make_engine, servers):
    backends = servers(2)
    backends.hold = True
    endpoints = (backends.address(0), backends.address(1))
    engine, sock = routed(make_engine, RouteTable((Cluster("lc", "svc", endpoints, lb="LEAST_CONN"),), ((0, 1),)))
    # Four long connections spread 2 + 2 (ties go round robin: clients 0 and 2 to
    # endpoint 0); then endpoint 0's two end, on both sides.
    clients = []
    deadline = time.monotonic() + 10
    for count in range(1, 5):
        clients.append(socket.create_connection(sock.getsockname()))
        while sum(backends.accepted.values()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    assert backends.accepted == {0: 2, 1: 2}
    clients[0].close()
    clients[2].close()
    with backends.lock:
        for conn in backends.held[:]:
            if conn.getsockname() == backends.address(0):
                backends.held.remove(conn)
                conn.close()
    Collector(engine).wait_closed(2)
    more = [socket.create_connection(sock.getsockname()) for _ in range(2)]
    while sum(backends.accepted.values()) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backends.accepted == {0: 4, 1: 2}  # both new ones went to the emptied endpoint
    for client in clients[1::2] + more:
        client.close()


def turned_away(engine, address, reason: CloseReason, cluster: int | None) -> None:
    with socket.create_connection(address) as client:
        assert_closed_by_relay(client)
    (record,) = Collector(engine).wait_closed(1)
    assert (record.reason, record.cluster, record.endpoint) == (reason, cluster, None)


def test_no_route_no_endpoint_and_overflow_turn_the_client_away(make_engine, servers):
    backends = servers(1)
    backends.hold = True
    engine, sock = routed(make_engine, RouteTable((Cluster("nothing", "svc"),), ()))
    turned_away(engine, sock.getsockname(), CloseReason.NO_ROUTE, None)
    assert engine.stats()["no_route"] == 1

    empty, full = Cluster("empty", "svc"), Cluster("full", "svc", (backends.address(0),), max_connections=1)
    engine, sock = routed(make_engine, RouteTable((full, empty), ((1, 1),)))
    turned_away(engine, sock.getsockname(), CloseReason.NO_HEALTHY_UPSTREAM, 1)
    assert engine.stats()["no_healthy_upstream"] == 1

    engine, sock = routed(make_engine, RouteTable((full,), ((0, 1),)))
    first = socket.create_connection(sock.getsockname())
    deadline = time.monotonic() + 10
    while backends.accepted[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    turned_away(engine, sock.getsockname(), CloseReason.OVERFLOW, 0)
    assert engine.stats()["upstream_overflows"] == 1
    first.close()  # the cluster's slot is free again once the first connection ends
    with backends.lock:
        for conn in backends.held:
            conn.close()
        backends.held.clear()
    Collector(engine).wait_closed(1)
    second = socket.create_connection(sock.getsockname())
    while backends.accepted[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backends.accepted[0] == 2
    second.close()


def test_the_schedule_follows_weights_and_tolerates_zero_weights():
    a, b, c = (Cluster(n, "svc", (("127.0.0.1", 1),)) for n in "abc")
    assert collections.Counter(RouteTable((a, b), ((0, 80), (1, 20))).schedule()) == {0: 4, 1: 1}
    assert RouteTable((a, b, c), ((0, 50), (1, 0), (2, 50))).schedule() == (0, 2)
    assert RouteTable((a,), ((0, 0),)).schedule() == (0,)  # all zero: Istio sends everything to the first
    assert RouteTable((a,), ()).schedule() == ()
    with pytest.raises(ValueError, match="route to cluster 3"):
        RouteTable((a,), ((3, 1),))


def test_a_virtual_listeners_destinations_have_their_own_schedules_and_are_checked():
    a, b = (Cluster(n, "svc", (("127.0.0.1", 1),)) for n in "ab")
    known = Destination(("10.96.0.20", 27017), ((0, 50), (1, 50)))
    table = RouteTable((a, b), ((1, 1),), (known,))
    assert (table.schedule(), table.schedule(known.routes)) == ((1,), (0, 1))
    with pytest.raises(ValueError, match="route to cluster 2"):
        RouteTable((a, b), ((1, 1),), (Destination(("10.96.0.20", 27017), ((2, 1),)),))
    with pytest.raises(ValueError, match="given twice"):
        RouteTable((a, b), ((1, 1),), (known, known))
    with pytest.raises(ValueError):
        RouteTable((a, b), ((1, 1),), (Destination(("mongodb", 27017), ((0, 1),)),))  # numeric only


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("inf"), float("nan")])
def test_a_cluster_refuses_a_connect_timeout_no_engine_can_keep(timeout):
    with pytest.raises(ValueError, match="connect timeout must be positive"):
        Cluster("c", "svc", (("127.0.0.1", 1),), connect_timeout=timeout)
