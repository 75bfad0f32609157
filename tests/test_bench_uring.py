"""bench/uring/: the io_uring relay prototype and its epoll twin, built with gcc against liburing, each held
to exact bytes both ways, half-close passed on in either direction, many connections sharing a small
buffer ring (receives that run out of buffers or pause behind a long queue), and failures passed on as
resets."""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import free_port, random_bytes, read_all, sha256, stop_process
from test_engine_data import exchange

URING = Path(__file__).resolve().parent.parent / "bench" / "uring"
BACKENDS = ("epoll", "uring", "batch")
MiB = 1 << 20


def build_unavailable() -> str:
    if not shutil.which("gcc") or not shutil.which("make"):
        return "gcc and make are needed to build bench/uring/relay"
    if not Path("/usr/include/liburing.h").exists():
        return "liburing-dev is not installed (apt-get install liburing-dev)"
    return ""


@pytest.fixture(scope="session")
def relay_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reason := build_unavailable():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("uring") / "relay"
    subprocess.run(["make", "-s", "-C", str(URING), f"OUT={out}"], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture
def relay(relay_binary):
    """relay(backend, upstream_address, *options) -> the relay's listening address."""
    processes: list[subprocess.Popen] = []

    def start(backend: str, address: tuple[str, int], *options: str) -> tuple[str, int]:
        process = subprocess.Popen([str(relay_binary), f"--{backend}", "--listen", "127.0.0.1:0",
                                    "--upstream", f"{address[0]}:{address[1]}", *options],
                                   stdout=subprocess.PIPE, text=True)
        processes.append(process)
        words = process.stdout.readline().split()   # "listening 127.0.0.1:PORT BACKEND"
        assert words[0] == "listening" and words[2] == backend, words
        host, port = words[1].rsplit(":", 1)
        return host, int(port)

    yield start
    for process in processes:
        assert process.poll() is None, f"relay exited with {process.returncode}"
        stop_process(process)


def echo_with_digest(conn: socket.socket) -> tuple[int, str]:
    """Echo everything back; after the client's EOF pass it on and report what arrived."""
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(65536):
        conn.sendall(chunk)
        digest.update(chunk)
        total += len(chunk)
    conn.shutdown(socket.SHUT_WR)
    return total, digest.hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_of_megabytes_is_byte_exact_both_ways(backend, upstream, relay):
    payload = random_bytes(6 * MiB + 4321)
    server = upstream(echo_with_digest)
    with socket.create_connection(relay(backend, server.address), timeout=30) as client:
        assert exchange(client, payload) == (len(payload), sha256(payload))
    assert server.wait(1) == [(len(payload), sha256(payload))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_half_close_is_passed_on_and_the_answer_still_flows(backend, upstream, relay):
    request, response = random_bytes(3 * MiB), random_bytes(5 * MiB + 7)

    def answer_after_eof(conn: socket.socket) -> tuple[int, str]:
        received = read_all(conn)   # ends only at the FIN the relay passes on
        conn.sendall(response)
        return received

    server = upstream(answer_after_eof)
    with socket.create_connection(relay(backend, server.address), timeout=30) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(response), sha256(response))
    assert server.wait(1) == [(len(request), sha256(request))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_half_close_is_passed_on_and_the_client_still_sends(backend, upstream, relay):
    greeting, request = random_bytes(2 * MiB + 1), random_bytes(4 * MiB)

    def speak_first_then_listen(conn: socket.socket) -> tuple[int, str]:
        conn.sendall(greeting)
        conn.shutdown(socket.SHUT_WR)
        return read_all(conn)

    server = upstream(speak_first_then_listen)
    with socket.create_connection(relay(backend, server.address), timeout=30) as client:
        assert read_all(client) == (len(greeting), sha256(greeting))
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""   # both ways closed: the relay closes the connection
    assert server.wait(1) == [(len(request), sha256(request))]


# A small ring and a short queue: receives run out of buffers and pause behind slow senders, and resume.
@pytest.mark.parametrize("backend,options", [("epoll", ()), ("uring", ()), ("batch", ()),
                                             ("uring", ("--buffers", "16", "--queue-cap", "4"))],
                         ids=["epoll", "uring", "batch", "uring-small-ring"])
def test_many_connections_at_once_are_each_byte_exact(backend, options, upstream, relay):
    payloads = [random_bytes(256 * 1024 + 1013 * i) for i in range(40)]
    server = upstream(echo_with_digest)
    address = relay(backend, server.address, *options)
    results: dict[int, tuple[int, str]] = {}

    def client(index: int) -> None:
        with socket.create_connection(address, timeout=30) as sock:
            results[index] = exchange(sock, payloads[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {i: (len(p), sha256(p)) for i, p in enumerate(payloads)}
    assert sorted(server.wait(len(payloads))) == sorted((len(p), sha256(p)) for p in payloads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_upstream_reset_reaches_the_client_as_a_reset(backend, upstream, relay):
    def read_then_reset(conn: socket.socket) -> bytes:
        got = conn.recv(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return got

    server = upstream(read_then_reset)
    with socket.create_connection(relay(backend, server.address), timeout=30) as client:
        client.sendall(b"hello")
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    assert server.wait(1) == [b"hello"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_upstream_reaches_the_client_as_a_reset(backend, relay):
    with socket.create_connection(relay(backend, ("127.0.0.1", free_port()))) as client:
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
