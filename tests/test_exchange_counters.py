"""Each peer-exchange counter means what the README says it counts: a sidecar gets
plain, wrong-magic, partial, framed and broken connections, and every event of
`fastmesh_metadata_exchange` and of `/stats`'s `metadata_exchange` (one set of
names for both) moves by exactly the connections that caused it."""

from __future__ import annotations

import errno
import json
import socket
import struct
import urllib.request

from conftest import CLIENT_FRAME, MONGODB_V1, RATINGS_V2, one_listener, wait_until
from fastmesh.addr import Address
from fastmesh.exchange import MAGIC
from fastmesh.peers import EXCHANGE_EVENTS
from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.settings import ExchangeConfig

LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)
NO_EVENTS = dict.fromkeys(event for event, _ in EXCHANGE_EVENTS)


def echo_until_end(conn: socket.socket) -> None:
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    conn.sendall(received)


def exchanging_sidecar(sidecar, upstream_address, direction, node):
    return sidecar(one_listener(LOOPBACK_ANY_PORT, [upstream_address], direction, admin=LOOPBACK_ANY_PORT,
                                metrics=LOOPBACK_ANY_PORT, node_metadata=node,
                                exchange=ExchangeConfig(plaintext=True)))


def exchange(address, sent: bytes) -> bytes | None:
    """What the client reads back after sending `sent` and its end of stream; None for a reset."""
    with socket.create_connection(address, timeout=20) as client:
        answer = b""
        try:
            client.sendall(sent)
            client.shutdown(socket.SHUT_WR)
            while chunk := client.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the reset came before our end of stream
                raise
            return None
        return answer


def frame_header(declared: int) -> bytes:
    return struct.pack("!II", MAGIC, declared)


def admin_events(running) -> dict[str, int]:
    url = "http://%s:%d/stats" % running.sidecar.admin_address
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert not any(key in body["engine"] for key in ("exchange_enabled", "exchange_no_frame")), \
        "an exchange event also under its engine name"
    return body["metadata_exchange"]


def metric_events(running) -> dict[str, int]:
    return {sample.labels["event"]: sample.value for sample in running.samples()["fastmesh_metadata_exchange_total"]}


def events_once_settled(running, connections: int) -> dict[str, int]:
    """The events once all `connections` have closed; the two counted in Python come
    with the engine's next batch, which a scrape reads first."""
    def settled() -> bool:
        stats = running.sidecar.relay.stats()
        return stats["active_connections"] == 0 and \
            stats["exchange_enabled"] + stats["exchange_disabled"] == connections and \
            admin_events(running) == metric_events(running)

    wait_until(settled)
    return admin_events(running)


def test_every_inbound_case_moves_exactly_its_own_counters(upstream, sidecar):
    server = upstream(echo_until_end)
    inbound = exchanging_sidecar(sidecar, server.address, INBOUND, MONGODB_V1)

    # Not a frame: passed on byte-exact, and the client gets no frame of ours.
    assert exchange(inbound.listen, b"PING\r\n") == b"PING\r\n"  # a plain client
    assert exchange(inbound.listen, b"\x3d\x23\x04\x68rest") == b"\x3d\x23\x04\x68rest"  # a wrong magic
    assert exchange(inbound.listen, b"\x3d\x23") == b"\x3d\x23"  # part of the magic, then the end
    # A frame: taken off, answered with ours, the bytes after it passed on.
    answer = exchange(inbound.listen, CLIENT_FRAME + b"hello")
    assert answer is not None and answer[:4] == struct.pack("!I", MAGIC) and answer.endswith(b"hello")
    # A whole frame whose payload is not an Any: removed, the rest passed on.
    answer = exchange(inbound.listen, frame_header(3) + b"\xff\xff\xff" + b"after")
    assert answer is not None and answer.endswith(b"after") and b"\xff\xff\xff" not in answer
    # Frames that cannot be trusted: reset, nothing forwarded.
    assert exchange(inbound.listen, frame_header(65537) + b"x" * 16) is None
    assert exchange(inbound.listen, frame_header(100) + b"x" * 10) is None

    assert events_once_settled(inbound, 7) == {
        **NO_EVENTS,
        "alpn_protocol_found": 7,  # every connection the exchange was attempted on: plain clients too
        "alpn_protocol_not_found": 0,
        "initial_header_not_found": 3,  # the plain client, the wrong magic, the partial magic
        "metadata_added": 2,  # only clients that sent a frame get ours
        "peer_found": 1,
        "header_not_found": 1,
        "frame_too_large": 1,
        "frame_truncated": 1,
        "frame_timed_out": 0,
        "detect_timeout": 0,
    }


def test_an_outbound_listener_counts_upstreams_without_a_sidecar_as_not_exchanging(upstream, sidecar):
    server = upstream(echo_until_end)
    outbound = exchanging_sidecar(sidecar, server.address, OUTBOUND, RATINGS_V2)  # not a mesh peer
    for _ in range(3):
        assert exchange(outbound.listen, b"PING\r\n") == b"PING\r\n"
    assert events_once_settled(outbound, 3) == {**dict.fromkeys(NO_EVENTS, 0), "alpn_protocol_not_found": 3}


def test_a_silent_client_of_a_server_first_app_counts_a_detect_timeout(upstream, sidecar):
    def greet_then_echo(conn: socket.socket) -> None:
        conn.sendall(b"220 ready\r\n")
        echo_until_end(conn)

    server = upstream(greet_then_echo)
    inbound = exchanging_sidecar(sidecar, server.address, INBOUND, MONGODB_V1)
    with socket.create_connection(inbound.listen, timeout=20) as client:
        assert client.recv(64) == b"220 ready\r\n"  # released after the detect timeout, without a frame
        client.sendall(b"QUIT\r\n")
        client.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := client.recv(64):
            rest += chunk
        assert rest == b"QUIT\r\n"
    events = events_once_settled(inbound, 1)
    assert (events["alpn_protocol_found"], events["detect_timeout"], events["metadata_added"],
            events["initial_header_not_found"]) == (1, 1, 0, 1)
