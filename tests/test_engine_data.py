"""The engine's data path, run against the Cython engine and the Python twin:
exact bytes both ways at once, many connections, half-close, reset, refused and
unanswered upstreams, backpressure, stop, and counters equal to the bytes moved."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest

from conftest import Collector, assert_closed_by_relay, free_port, listening_socket, random_bytes, read_all, sha256

from fastmesh.reasons import CloseReason
from fastmesh.routing import RouteTable

MiB = 1 << 20


def send_then_shutdown(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def exchange(sock: socket.socket, outgoing: bytes) -> tuple[int, str]:
    """Send `outgoing` while reading everything the peer sends; both at once."""
    sender = send_then_shutdown(sock, outgoing)
    received = read_all(sock)
    sender.join()
    return received


def test_large_payloads_both_directions_at_once_are_byte_exact(upstream, relay_to):
    to_upstream, to_client = random_bytes(24 * MiB), random_bytes(24 * MiB + 12345)
    server = upstream(lambda conn: exchange(conn, to_client))
    engine, address = relay_to(server.address)
    with socket.create_connection(address) as client:
        assert exchange(client, to_upstream) == (len(to_client), sha256(to_client))
    assert server.wait(1) == [(len(to_upstream), sha256(to_upstream))]

    (record,) = Collector(engine).wait_closed(1)
    assert record.bytes == [len(to_upstream), len(to_client), len(to_client), len(to_upstream)]
    assert (record.listener_id, record.cluster, record.endpoint) == (0, 0, 0)
    assert record.reason in (CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE)


def test_many_concurrent_connections_each_byte_exact(upstream, relay_to):
    count = 200
    payloads = [random_bytes(64 * 1024 + i * 97) for i in range(count)]

    def echo_with_digest(conn: socket.socket) -> tuple[int, str]:
        # Echo everything back, then report what was received.
        data = bytearray()
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
            data += chunk
        conn.shutdown(socket.SHUT_WR)
        return len(data), sha256(bytes(data))

    server = upstream(echo_with_digest)
    engine, address = relay_to(server.address, workers=2)
    results: dict[int, tuple[int, str]] = {}
    failures: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with socket.create_connection(address) as sock:
                results[index] = exchange(sock, payloads[index])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert results == {i: (len(p), sha256(p)) for i, p in enumerate(payloads)}
    assert sorted(server.wait(count)) == sorted((len(p), sha256(p)) for p in payloads)

    records = Collector(engine).wait_closed(count)
    assert sorted(r.bytes[0] for r in records) == sorted(len(p) for p in payloads)
    assert all(r.bytes == [r.bytes[0]] * 4 for r in records)
    assert engine.stats()["active_connections"] == 0


def test_half_close_from_downstream_keeps_the_other_direction_flowing(upstream, relay_to):
    request, response = random_bytes(3 * MiB), random_bytes(5 * MiB)

    def answer_after_eof(conn: socket.socket) -> tuple[int, str]:
        received = read_all(conn)  # ends at the client's FIN, passed on by the relay
        conn.sendall(response)
        return received

    server = upstream(answer_after_eof)
    engine, address = relay_to(server.address)
    with socket.create_connection(address) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(response), sha256(response))
    assert server.wait(1) == [(len(request), sha256(request))]
    (record,) = Collector(engine).wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_CLOSE


def test_half_close_from_upstream_keeps_the_other_direction_flowing(upstream, relay_to):
    greeting, request = random_bytes(2 * MiB), random_bytes(4 * MiB)

    def speak_first_then_listen(conn: socket.socket) -> tuple[int, str]:
        conn.sendall(greeting)
        conn.shutdown(socket.SHUT_WR)
        return read_all(conn)

    server = upstream(speak_first_then_listen)
    engine, address = relay_to(server.address)
    with socket.create_connection(address) as client:
        assert read_all(client) == (len(greeting), sha256(greeting))  # EOF arrives, client still sends
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    assert server.wait(1) == [(len(request), sha256(request))]
    (record,) = Collector(engine).wait_closed(1)
    assert record.reason == CloseReason.UPSTREAM_CLOSE
    assert record.bytes == [len(request), len(greeting), len(greeting), len(request)]


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_upstream_reset_reaches_the_client_as_a_reset(upstream, relay_to):
    def greet_then_reset(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.recv(5)  # wait for the client's answer, then abort
        reset(conn.dup())

    server = upstream(greet_then_reset)
    engine, address = relay_to(server.address)
    with socket.create_connection(address) as client:
        assert client.recv(5) == b"hello"
        client.sendall(b"world")
        with pytest.raises(ConnectionResetError):
            while client.recv(65536):
                pass
    (record,) = Collector(engine).wait_closed(1)
    assert record.reason == CloseReason.UPSTREAM_RESET
    assert record.err == errno.ECONNRESET
    assert engine.stats()["resets_propagated"] == 1


def test_downstream_reset_reaches_the_upstream_as_a_reset(upstream, relay_to):
    outcome: list[str] = []
    got_data = threading.Event()

    def read_until_reset(conn: socket.socket) -> None:
        try:
            assert conn.recv(5) == b"hello"
            got_data.set()
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    server = upstream(read_until_reset)
    engine, address = relay_to(server.address)
    client = socket.create_connection(address)
    client.sendall(b"hello")
    assert got_data.wait(10)
    reset(client)
    server.wait(1)
    assert outcome == ["reset"]
    (record,) = Collector(engine).wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_RESET


def test_refused_upstream_closes_the_client_and_is_counted(relay_to):
    engine, address = relay_to(("127.0.0.1", free_port()))
    for _ in range(3):
        with socket.create_connection(address) as client:
            assert_closed_by_relay(client)
    records = Collector(engine).wait_closed(3)
    assert {(r.reason, r.err) for r in records} == {(CloseReason.CONNECT_FAILED, errno.ECONNREFUSED)}
    assert all(r.bytes == [0, 0, 0, 0] for r in records)
    assert engine.stats()["connect_failures"] == 3
    assert engine.stats()["active_connections"] == 0


def test_unanswered_upstream_times_out(relay_to):
    # A listener whose accept queue is full drops SYNs, so connect() never completes.
    blackhole = listening_socket(backlog=0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    try:
        engine, address = relay_to(blackhole.getsockname(), connect_timeout=0.3)
        with socket.create_connection(address) as client:
            client.sendall(b"never delivered")
            assert_closed_by_relay(client)
        (record,) = Collector(engine).wait_closed(1)
        assert (record.reason, record.err) == (CloseReason.CONNECT_TIMEOUT, errno.ETIMEDOUT)
        assert record.bytes == [0, 0, 0, 0]  # nothing was read from the client
        assert engine.stats()["connect_timeouts"] == 1
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


def test_slow_reader_stops_reads_on_the_other_side(upstream, relay_to):
    payload = random_bytes(64 * MiB)
    release = threading.Event()

    def read_later(conn: socket.socket) -> tuple[int, str]:
        release.wait(30)
        return read_all(conn)

    server = upstream(read_later)
    pipe_size = 1 * MiB
    engine, address = relay_to(server.address, pipe_size=pipe_size, buffer_size=64 * 1024)
    collector = Collector(engine)
    with socket.create_connection(address) as client:
        sender = send_then_shutdown(client, payload)
        time.sleep(1.0)
        collector.collect()
        (record,) = collector.conns.values()
        in_relay = record.bytes[0] - record.bytes[3]  # read from downstream, not yet written upstream
        # What the relay holds is one pipe or one buffer, whatever the peers do.
        assert 0 <= in_relay <= pipe_size
        assert record.bytes[0] < len(payload) // 2  # reading stopped: the sender is blocked
        stats = engine.stats()
        assert stats["pipes_in_use"] + stats["buffers_in_use"] <= 1
        release.set()
        sender.join(60)
        assert client.recv(1) == b""
    assert server.wait(1) == [(len(payload), sha256(payload))]


def test_stop_resets_open_connections_and_reports_them(upstream, relay_to):
    hold = threading.Event()
    server = upstream(lambda conn: hold.wait(30))
    engine, address = relay_to(server.address)
    collector = Collector(engine)
    with socket.create_connection(address) as client:
        client.sendall(b"ping")
        deadline = time.monotonic() + 10
        while engine.stats()["active_connections"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        engine.stop()
        assert not engine.running
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    hold.set()
    (record,) = collector.wait_closed(1)
    assert record.reason == CloseReason.SHUTDOWN
    assert record.bytes[0] == 4


def test_relay_of_an_established_pair(make_engine):
    engine = make_engine()
    down_app, down_relay = socket.socketpair()
    up_relay, up_app = socket.socketpair()
    conn_id = engine.relay(down_relay.detach(), up_relay.detach())
    engine.start()
    request, response = random_bytes(2 * MiB), random_bytes(MiB)
    sender = send_then_shutdown(down_app, request)
    assert read_all(up_app) == (len(request), sha256(request))
    answer = send_then_shutdown(up_app, response)
    assert read_all(down_app) == (len(response), sha256(response))
    sender.join()
    answer.join()
    collector = Collector(engine)
    (record,) = collector.wait_closed(1)
    assert list(collector.conns) == [conn_id]
    assert (record.listener_id, record.cluster, record.endpoint) == (None, None, None)
    assert record.bytes == [len(request), len(response), len(response), len(request)]
    down_app.close()
    up_app.close()


def test_collect_reports_open_connections_once_and_deltas_between_reads(upstream, relay_to):
    proceed = threading.Event()

    def two_rounds(conn: socket.socket) -> None:
        assert conn.recv(100) == b"a" * 100
        conn.sendall(b"b" * 10)
        proceed.wait(10)
        while conn.recv(65536):
            pass

    server = upstream(two_rounds)
    engine, address = relay_to(server.address)
    with socket.create_connection(address) as client:
        client.sendall(b"a" * 100)
        assert client.recv(10) == b"b" * 10
        opened, updated, closed, peers = engine.collect()
        assert peers == []  # no exchange on this listener
        assert [o[1:] for o in opened] == [(0, 0, 0, False)] and closed == []
        assert [u[1:] for u in updated] == [(100, 10, 10, 100)]
        assert engine.collect() == ([], [], [], [])  # nothing changed: nothing reported
        client.sendall(b"c" * 7)
        deadline = time.monotonic() + 10
        while True:
            opened, updated, closed, _ = engine.collect()
            if updated or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert opened == [] and [u[1:] for u in updated] == [(7, 0, 0, 7)]
        proceed.set()
    server.wait(1)
    (record,) = Collector(engine).wait_closed(1)
    assert record.bytes == [0, 0, 0, 0]  # all was reported while open
    assert record.reason == CloseReason.DOWNSTREAM_CLOSE


def test_round_robin_over_upstreams(make_engine, upstream):
    def answer(tag: bytes):
        return lambda conn: conn.sendall(tag)

    servers = [upstream(answer(b"%d" % i)) for i in range(3)]
    engine = make_engine()
    sock = listening_socket()
    sock.setblocking(False)
    engine.add_listener(sock.fileno(), RouteTable.single([s.address for s in servers]))
    engine.start()
    seen = []
    for _ in range(6):
        with socket.create_connection(sock.getsockname()) as client:
            seen.append(client.recv(1))
    assert seen == [b"0", b"1", b"2", b"0", b"1", b"2"]
    records = Collector(engine).wait_closed(6)
    assert sorted(r.endpoint for r in records) == [0, 0, 1, 1, 2, 2]
    sock.close()


def test_removed_listener_stops_accepting_but_open_connections_go_on(upstream, make_engine):
    server = upstream(lambda conn: conn.sendall(conn.recv(5)))
    engine = make_engine()
    sock = listening_socket()
    sock.setblocking(False)
    listener_id = engine.add_listener(sock.fileno(), RouteTable.single([server.address]))
    engine.start()
    client = socket.create_connection(sock.getsockname())
    time.sleep(0.1)
    engine.remove_listener(listener_id)
    late = socket.create_connection(sock.getsockname())  # queued in the kernel, never accepted
    client.sendall(b"still")
    client.settimeout(10)
    assert client.recv(5) == b"still"
    client.close()
    late.close()
    Collector(engine).wait_closed(1)
    assert engine.stats()["connections_accepted"] == 1
    sock.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": 0}, "workers"),
        ({"buffer_size": 10}, "buffer_size"),
    ],
)
def test_bad_engine_options_are_rejected(engine_module, options, message):
    with pytest.raises(ValueError, match=message):
        engine_module.Engine(**options)


@pytest.mark.parametrize(
    "upstreams, message",
    [([], "at least one upstream"), ([("no-such-host.invalid", 80)], "cannot resolve"),
     ([("127.0.0.1", 70000)], "port")],
)
def test_bad_upstreams_are_rejected_before_they_reach_an_engine(upstreams, message):
    with pytest.raises(ValueError, match=message):
        RouteTable.single(upstreams)


def test_fin_right_behind_small_data_is_never_missed(upstream, relay_to):
    # Data and FIN often arrive together; a read that stops short at the FIN must
    # not be taken for a drained socket (the edge-triggered loop would then wait
    # forever for an event that never comes).
    server = upstream(lambda conn: conn.sendall(conn.recv(64) + b"!") or conn.shutdown(socket.SHUT_WR))
    engine, address = relay_to(server.address)
    failures: list[BaseException] = []

    def clients(offset: int) -> None:
        try:
            for i in range(75):
                with socket.create_connection(address) as client:
                    message = b"%d" % (offset + i)
                    client.sendall(message)
                    client.shutdown(socket.SHUT_WR)
                    client.settimeout(10)
                    assert client.recv(64) == message + b"!"
                    assert client.recv(1) == b""
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=clients, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    records = Collector(engine).wait_closed(300)
    # Which FIN the relay reads first is a race here; both ends closed cleanly.
    assert {r.reason for r in records} <= {CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE}
    # Each reply is the request plus "!": down_rx == up_tx, and up_rx == down_tx == down_rx + 1.
    assert all(r.bytes == [r.bytes[0], r.bytes[0] + 1, r.bytes[0] + 1, r.bytes[0]] for r in records)


SIGPIPE_SCRIPT = r"""
import os, signal, socket, sys, threading, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a program embedding fastmesh may have it
from fastmesh.engine import Engine
from fastmesh.routing import RouteTable
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(8)
def close_unread():
    conn, _ = server.accept()
    conn.recv(1)
    conn.close()  # with bytes unread: the relay's next writes meet EPIPE/ECONNRESET
threading.Thread(target=close_unread, daemon=True).start()
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(8); listener.setblocking(False)
engine = Engine()
engine.add_listener(listener.fileno(), RouteTable.single([server.getsockname()]))
engine.start()
client = socket.create_connection(listener.getsockname())
try:
    for _ in range(64):  # bulk, so the relay is splicing when the upstream goes away
        client.sendall(os.urandom(1 << 20))
except OSError:
    pass
deadline = time.monotonic() + 10
while engine.stats()["active_connections"] and time.monotonic() < deadline:
    time.sleep(0.05)
_, _, closed, _ = engine.collect()
print("alive", [record.reason for record in closed])
"""


def test_an_upstream_reset_mid_transfer_is_survived_with_sigpipe_at_its_default(engine_module):
    # A program embedding fastmesh may restore SIGPIPE's default action (Python ignores it);
    # the relay must still end the connection as an upstream reset, not die.
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if engine_module.IMPLEMENTATION == "python":
        env["FASTMESH_NO_EXTENSIONS"] = "1"
    else:
        env.pop("FASTMESH_NO_EXTENSIONS", None)
    result = subprocess.run([sys.executable, "-c", SIGPIPE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"killed by signal {-result.returncode}" if result.returncode < 0 else result.stderr
    assert result.stdout.strip() == "alive [%d]" % CloseReason.UPSTREAM_RESET
