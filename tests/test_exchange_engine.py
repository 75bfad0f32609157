"""The peer metadata exchange on the data path, on both engines: frames written
and stripped with application bytes exact, crossing frames, server-first and
client-first apps, peers that do not exchange, and every kind of bad frame."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import pytest
from conftest import (
    CLIENT, CLIENT_FRAME, GREETING, SERVER, SERVER_FRAME, assert_closed_by_relay, independent_frame,
    listening_socket, random_bytes, read_all, sha256,
)
from frame_oracle import FrameReader, Outcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmesh.contract import FRAME_CHUNK, frame_buffer_size
from fastmesh.exchange import MAGIC, ExchangeSettings, decode_payload
from fastmesh.reasons import CloseReason
from fastmesh.routing import RouteTable



class Side:
    """One engine with one exchanging listener, like one sidecar."""

    def __init__(self, make_engine: Any, role: str, frame: bytes, upstream: tuple[str, int],
                 mesh_peer: bool = True, **settings: Any) -> None:
        self.engine = make_engine()
        self.sock = listening_socket()
        self.sock.setblocking(False)
        routes = RouteTable.single([upstream], mesh_peer=mesh_peer)
        self.engine.add_listener(self.sock.fileno(), routes, ExchangeSettings(role, frame, plaintext=True, **settings))
        self.engine.start()
        self.address = self.sock.getsockname()
        self.peers: dict[int, bytes | None] = {}
        self.closed: dict[int, tuple] = {}
        self.bytes = [0, 0, 0, 0]  # down_rx, down_tx, up_rx, up_tx over all connections

    def collect(self) -> None:
        _, updated, closed, peers = self.engine.collect()
        for conn_id, *deltas in updated:
            self.bytes = [a + b for a, b in zip(self.bytes, deltas)]
        for record in closed:
            self.closed[record.conn_id] = record
            self.bytes = [a + b for a, b in zip(self.bytes, record[6:])]
        for peer in peers:
            assert peer.conn_id not in self.peers, "a peer was reported twice"
            assert peer.principal is None  # plaintext
            self.peers[peer.conn_id] = peer.payload

    def wait_closed(self, count: int, timeout: float = 20.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        while len(self.closed) < count and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.02)
        assert len(self.closed) == count
        return list(self.closed.values())

    def stats(self) -> dict[str, int]:
        return {k: v for k, v in self.engine.stats().items() if k.startswith("exchange")}

    def close(self) -> None:
        self.sock.close()


def decoded(payload: bytes | None) -> dict | None:
    return None if payload is None else decode_payload(payload)[0]


def echo_exact(size: int, greeting: bytes = b""):
    """An app that may greet, then echoes `size` bytes and closes."""

    def handler(conn: socket.socket) -> str:
        if greeting:
            conn.sendall(greeting)
        data = b""
        while len(data) < size:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        conn.sendall(data)
        return sha256(data)

    return handler


def pair(make_engine, app_address, **settings):
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app_address, **settings)
    outbound = Side(make_engine, "outbound", CLIENT_FRAME, inbound.address, **settings)
    return outbound, inbound


@pytest.mark.parametrize("greeting", [b"", GREETING], ids=["client-first", "server-first"])
def test_a_pair_learns_both_peers_and_relays_exact_bytes(make_engine, upstream, greeting):
    payload = random_bytes(3 << 20)
    app = upstream(echo_exact(len(payload), greeting))
    outbound, inbound = pair(make_engine, app.address)
    with socket.create_connection(outbound.address) as client:
        if greeting:
            assert client.recv(len(greeting), socket.MSG_WAITALL) == greeting  # no frame before it
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(payload), sha256(payload))
    assert app.wait(1) == [sha256(payload)]
    for side, peer in ((outbound, SERVER), (inbound, CLIENT)):
        side.wait_closed(1)
        assert [decoded(p) for p in side.peers.values()] == [peer]
        # Frames are never counted: each side saw exactly the application's bytes.
        total = len(payload) + len(greeting)
        assert side.bytes == [len(payload), total, total, len(payload)]
        assert side.stats()["exchange_frames_sent"] == 1
        assert side.stats()["exchange_frames_received"] == 1
    assert inbound.stats()["exchange_detect_timeouts"] == 0


def test_frames_that_cross_on_the_wire_are_both_stripped(make_engine, upstream):
    # A mesh upstream that writes its frame and greeting at once, before reading ours.
    def eager_peer(conn: socket.socket) -> tuple:
        conn.sendall(SERVER_FRAME + GREETING)
        reader, result, data = FrameReader(), None, b""
        while result is None or result.outcome is Outcome.NEED_MORE:
            result = reader.feed(conn.recv(4096))
        data = result.rest
        while len(data) < 5:
            data += conn.recv(4096)
        conn.sendall(b"pong!")
        return result.metadata, data

    app = upstream(eager_peer)
    outbound = Side(make_engine, "outbound", CLIENT_FRAME, app.address)
    with socket.create_connection(outbound.address) as client:
        client.sendall(b"ping!")
        assert client.recv(len(GREETING) + 5, socket.MSG_WAITALL) == GREETING + b"pong!"
    assert app.wait(1) == [(CLIENT, b"ping!")]
    outbound.wait_closed(1)
    assert [decoded(p) for p in outbound.peers.values()] == [SERVER]


def test_an_inbound_listener_passes_a_plain_client_through_untouched(make_engine, upstream):
    payload = b"*1\r\n$4\r\nPING\r\n" + random_bytes(100_000)
    app = upstream(echo_exact(len(payload)))
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address)
    with socket.create_connection(inbound.address) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(payload), sha256(payload))  # and no frame in front
    assert app.wait(1) == [sha256(payload)]
    inbound.wait_closed(1)
    assert list(inbound.peers.values()) == [None]
    assert inbound.stats()["exchange_no_frame"] == 1 and inbound.stats()["exchange_frames_sent"] == 0


def test_a_plain_client_of_a_server_first_app_gets_the_greeting_after_the_detect_timeout(make_engine, upstream):
    app = upstream(echo_exact(4, GREETING))
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address, detect_timeout=0.05)
    with socket.create_connection(inbound.address) as client:
        assert client.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        client.sendall(b"quit")
        assert client.recv(4, socket.MSG_WAITALL) == b"quit"
    inbound.wait_closed(1)
    assert list(inbound.peers.values()) == [None]
    assert inbound.stats()["exchange_detect_timeouts"] == 1
    assert inbound.stats()["exchange_frames_sent"] == 0


def test_an_outbound_listener_exchanges_only_with_upstreams_marked_mesh_peers(make_engine, upstream):
    app = upstream(echo_exact(5))
    outbound = Side(make_engine, "outbound", CLIENT_FRAME, app.address, mesh_peer=False)
    with socket.create_connection(outbound.address) as client:
        client.sendall(b"hello")
        assert client.recv(5, socket.MSG_WAITALL) == b"hello"
    assert app.wait(1) == [sha256(b"hello")]  # no frame reached the plain upstream
    outbound.wait_closed(1)
    assert outbound.peers == {}
    assert outbound.stats()["exchange_disabled"] == 1 and outbound.stats()["exchange_enabled"] == 0


def test_a_mesh_upstream_that_answers_without_a_frame_is_an_unknown_peer(make_engine, upstream):
    def plain(conn: socket.socket) -> bytes:
        data = b""
        while len(data) < len(CLIENT_FRAME) + 5:
            data += conn.recv(4096)
        conn.sendall(b"plain reply")
        return data

    app = upstream(plain)
    outbound = Side(make_engine, "outbound", CLIENT_FRAME, app.address)
    with socket.create_connection(outbound.address) as client:
        client.sendall(b"hello")
        assert client.recv(11, socket.MSG_WAITALL) == b"plain reply"
    assert app.wait(1) == [CLIENT_FRAME + b"hello"]
    outbound.wait_closed(1)
    assert list(outbound.peers.values()) == [None]
    assert outbound.bytes == [5, 11, 11, 5]


def collect_all(conn: socket.socket) -> bytes:
    """What the app received before the end of stream or a reset."""
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


HEADER_100 = struct.pack("!II", MAGIC, 100)


@pytest.mark.parametrize(
    "sent, pause, reason_stat",
    [
        (struct.pack("!II", MAGIC, 0x7FFFFFFF) + b"x" * 10, False, "exchange_frames_too_large"),
        (HEADER_100 + b"x" * 10, False, "exchange_frames_truncated"),  # then EOF
        (HEADER_100[:6], False, "exchange_frames_truncated"),  # EOF inside the header
        (HEADER_100 + b"x" * 10, True, "exchange_frames_timed_out"),  # then silence
        (HEADER_100[:5], True, "exchange_frames_timed_out"),
    ],
    ids=["too-large", "truncated-payload", "truncated-header", "stalled-payload", "stalled-header"],
)
def test_a_frame_that_cannot_be_trusted_resets_the_connection_and_leaks_nothing(
        make_engine, upstream, sent, pause, reason_stat):
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address, frame_timeout=0.2)
    client = socket.create_connection(inbound.address)
    client.sendall(sent)
    try:
        if not pause:
            client.shutdown(socket.SHUT_WR)
    except OSError:  # the reset may already be in (a too-large header is refused at once)
        pass
    assert_closed_by_relay(client)
    client.close()
    (record,) = inbound.wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_PROTOCOL_ERROR
    assert app.wait(1) == [b""]  # not one byte of the frame reached the app
    assert inbound.stats()[reason_stat] == 1
    assert inbound.peers == {} and inbound.bytes == [0, 0, 0, 0]


def test_identical_peer_frames_are_held_once_and_each_connection_still_gets_its_peer(make_engine, upstream):
    # One workload sends the same frame on every connection: the engine keeps one
    # copy for all of them. Distinct frames, more than it keeps, are each reported right.
    frames = [independent_frame(dict(CLIENT, NAME=f"ratings-v2-{i}"), f"sidecar~10.0.0.{i}~r.default~x")
              for i in range(20)]
    sent = [frames[0]] * 30 + frames[1:] + frames[1:3]  # 30 alike, 19 new (past the 16 kept), 2 recent again
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address)
    for i, frame in enumerate(sent):
        with socket.create_connection(inbound.address) as client:
            client.sendall(frame + b"app %d" % i)
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == (len(SERVER_FRAME), sha256(SERVER_FRAME))
    assert sorted(app.wait(len(sent))) == sorted(b"app %d" % i for i in range(len(sent)))
    inbound.wait_closed(len(sent))
    assert sorted(inbound.peers.values()) == sorted(frame[8:] for frame in sent)
    # 29 repeats of the first; frames 1 and 2 again, by then replaced among the 16 kept
    assert inbound.stats()["exchange_frames_shared"] == 29
    assert inbound.stats()["exchange_frames_received"] == len(sent)


def wait_for_stat(side: Side, name: str, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while side.stats()[name] != value and time.monotonic() < deadline:
        time.sleep(0.02)
    assert side.stats()[name] == value


def test_memory_for_a_frame_follows_the_bytes_that_came_not_the_declared_size(make_engine, upstream):
    # 20 peers each declare a payload of over 50 KiB and send only the header: the
    # engine must not hold 20 times that for them. Then the frames come, in pieces.
    metadata = dict(CLIENT, LABELS={f"label-{i}": "v" * 40 for i in range(1000)})
    frame = independent_frame(metadata, "sidecar~10.0.0.1~big.default~default.svc.cluster.local")
    assert 50_000 < len(frame) - 8 < 64 * 1024
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address, frame_timeout=20.0)
    clients = [socket.create_connection(inbound.address) for _ in range(20)]
    try:
        for client in clients:
            client.sendall(frame[:8])
        # Both engines count what they allocate, fastmesh.contract.frame_buffer_size():
        # FRAME_CHUNK once the header is in, whatever it declares.
        wait_for_stat(inbound, "exchange_partial_bytes", 20 * FRAME_CHUNK)
        for client in clients[:10]:  # 5,000 more bytes each: the buffers grow fourfold
            client.sendall(frame[8:5008])
        expected = 10 * FRAME_CHUNK + 10 * frame_buffer_size(5008, len(frame))
        assert frame_buffer_size(5008, len(frame)) == 4 * FRAME_CHUNK
        wait_for_stat(inbound, "exchange_partial_bytes", expected)
        for client in clients[10:]:
            client.sendall(frame[8:5008])
        for piece in range(5008, len(frame), 7000):
            for client in clients:
                client.sendall(frame[piece:piece + 7000])
            time.sleep(0.01)
        for i, client in enumerate(clients):
            client.sendall(b"app %d" % i)
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == (len(SERVER_FRAME), sha256(SERVER_FRAME))  # our answer to a peer
    finally:
        for client in clients:
            client.close()
    assert sorted(app.wait(20)) == sorted(b"app %d" % i for i in range(20))
    inbound.wait_closed(20)
    assert list(inbound.peers.values()) == [frame[8:]] * 20
    assert inbound.stats()["exchange_partial_bytes"] == 0


@pytest.mark.parametrize("prefix", [b"=", b"=#", b"=#\x04"], ids=["1", "2", "3"])
@pytest.mark.parametrize("then", ["eof", "silence"])
def test_bytes_that_only_begin_like_the_magic_are_application_bytes(make_engine, upstream, prefix, then):
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address, frame_timeout=0.2)
    with socket.create_connection(inbound.address) as client:
        client.sendall(prefix)
        if then == "silence":
            time.sleep(0.5)  # past the frame timeout: the bytes go on as they are
            client.sendall(b"more")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
    expected = prefix + (b"more" if then == "silence" else b"")
    assert app.wait(1) == [expected]
    inbound.wait_closed(1)
    assert list(inbound.peers.values()) == [None]
    assert inbound.bytes[0] == len(expected)


def test_a_wrong_magic_and_a_payload_that_is_not_a_struct(make_engine, upstream):
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address)
    wrong_magic = struct.pack("!II", MAGIC ^ 1, 3) + b"abc"
    garbage = struct.pack("!II", MAGIC, 5) + b"\xff" * 5
    for sent in (wrong_magic, garbage + b"app bytes"):
        with socket.create_connection(inbound.address) as client:
            client.sendall(sent)
            client.shutdown(socket.SHUT_WR)
            client.recv(1000)
    # The first passes through as it is; the second's frame is well formed on the
    # wire, so it is stripped and its payload is left to the decoder (an unknown peer).
    assert sorted(app.wait(2)) == sorted([wrong_magic, b"app bytes"])
    inbound.wait_closed(2)
    assert sorted(inbound.peers.values(), key=repr) == sorted([None, b"\xff" * 5], key=repr)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(app_bytes=st.binary(min_size=0, max_size=3000),
       cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=6))
def test_any_split_of_a_frame_and_application_bytes_reaches_the_app_exact(make_engine, upstream, app_bytes, cuts):
    stream = CLIENT_FRAME + app_bytes
    app = upstream(collect_all)
    inbound = Side(make_engine, "inbound", SERVER_FRAME, app.address)
    try:
        with socket.create_connection(inbound.address) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = 0
            for cut in sorted(set(c for c in cuts if c < len(stream))) + [len(stream)]:
                client.sendall(stream[start:cut])
                start = cut
                time.sleep(0.002)  # separate segments, so the engine reads the pieces apart
            client.shutdown(socket.SHUT_WR)
            reader, answer = FrameReader(), b""
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert app.wait(1) == [app_bytes]
        result = reader.feed(answer)
        assert result.outcome is Outcome.FOUND and result.metadata == SERVER and result.rest == b""
        inbound.wait_closed(1)
        assert [decoded(p) for p in inbound.peers.values()] == [CLIENT]
    finally:
        inbound.close()
        app.close()
