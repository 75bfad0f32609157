"""After a burst, a worker's pools shrink back: the splice pipes no connection took for a
whole sweep (contract.IDLE_SWEEP) are closed, down to two, so the fds a burst opened return
to what the steady load needs (the soak's bar). The Cython engine: the twin copies through
memory and keeps no pipes."""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import random_bytes, sha256, wait_until

IDLE_KEEP = 2  # _core.pxd POOL_IDLE_KEEP


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(1 << 20):
        conn.sendall(chunk)


def test_pipes_pooled_after_a_burst_are_closed_once_unneeded(engine_module, upstream, relay_to):
    if engine_module.IMPLEMENTATION == "python":
        pytest.skip("the twin engine copies through memory: it has no pipes to pool")
    server = upstream(echo)
    engine, address = relay_to(server.address, workers=1)  # IDLE_KEEP is per worker
    payload = random_bytes(4 << 20)
    digests: list[str] = []

    def client() -> None:
        with socket.create_connection(address) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            received = b""
            while len(received) < len(payload):
                received += conn.recv(1 << 20)
            sender.join()
            digests.append(sha256(received))

    clients = [threading.Thread(target=client) for _ in range(12)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    assert digests == [sha256(payload)] * 12
    wait_until(lambda: engine.stats()["pipes_in_use"] == 0)
    burst = engine.stats()["pipes_pooled"]
    assert burst > IDLE_KEEP  # the burst left more pipes than the steady state keeps
    wait_until(lambda: engine.stats()["pipes_pooled"] <= IDLE_KEEP)
    with socket.create_connection(address) as conn:  # and the relay goes on as before
        conn.sendall(b"after")
        assert conn.recv(64) == b"after"
