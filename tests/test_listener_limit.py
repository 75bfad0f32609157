"""A listener's max_connections (serve --max-connections): past the limit a new connection
is reset at once and counted (listener_overflows), never reaches the upstream, and the open
ones go on with their bytes exact; a closed one frees its place. Both engines."""

from __future__ import annotations

import socket

import pytest

from conftest import random_bytes, sha256, wait_until
from fastmesh.routing import RouteTable

LIMIT = 3


def echo_lines(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


def roundtrip(client: socket.socket, payload: bytes) -> str:
    client.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = client.recv(65536)
        assert chunk, "the relay closed a connection within the limit"
        received += chunk
    return sha256(received)


def refused(client: socket.socket) -> bool:
    """The relay reset the connection without a byte (ECONNRESET, or an end of stream)."""
    client.settimeout(10)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_past_the_limit_are_reset_and_counted(upstream, relay_to):
    server = upstream(echo_lines)
    engine, address = relay_to(server.address, max_connections=LIMIT)
    payload = random_bytes(256 * 1024)
    within = [socket.create_connection(address) for _ in range(LIMIT)]
    try:
        for client in within:
            assert roundtrip(client, payload) == sha256(payload)
        flood = [socket.create_connection(address) for _ in range(5)]
        assert all(refused(client) for client in flood)
        wait_until(lambda: engine.stats()["listener_overflows"] == 5)
        assert server.accepted == LIMIT  # the refused ones never reached the upstream
        for client in within:  # the open connections were not harmed
            assert roundtrip(client, payload) == sha256(payload)
        within.pop().close()  # a place is free again
        wait_until(lambda: engine.stats()["active_connections"] == LIMIT - 1)
        within.append(socket.create_connection(address))
        assert roundtrip(within[-1], payload) == sha256(payload)
        assert engine.stats()["listener_overflows"] == 5
        for client in flood:
            client.close()
    finally:
        for client in within:
            client.close()


def test_no_limit_by_default(upstream, relay_to):
    server = upstream(echo_lines)
    engine, address = relay_to(server.address)
    clients = [socket.create_connection(address) for _ in range(20)]
    try:
        for client in clients:
            assert roundtrip(client, b"x" * 100) == sha256(b"x" * 100)
        assert engine.stats()["listener_overflows"] == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("limit, error", [(-1, ValueError), ("3", TypeError), (True, TypeError)])
def test_a_bad_limit_is_refused(make_engine, limit, error):
    engine = make_engine()
    with socket.create_server(("127.0.0.1", 0)) as sock, pytest.raises(error, match="max_connections"):
        engine.add_listener(sock.fileno(), RouteTable.single([("127.0.0.1", 9)]), max_connections=limit)
