"""After a burst, a worker's pools shrink back: the splice pipes no connection took for a
whole sweep (contract.IDLE_SWEEP) are closed, down to two, so the fds a burst opened return
to what the steady load needs (the soak's bar). The Cython engine: the twin copies through
memory and keeps no pipes. Both engines give their freed heap back once a worker is idle."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import random_bytes, sha256, wait_until

from fastmesh import _engine_py
from fastmesh.contract import IDLE_SWEEP

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


def test_the_twin_gives_the_heap_back_once_its_connections_are_gone(engine_module, monkeypatch, upstream,
                                                                     relay_to):
    # As the C engine's sweep calls malloc_trim(0) once a worker is idle: a crowd's freed buffers
    # stayed resident in the twin (the soak's mTLS sidecars: a hundred MiB, given back by it).
    if engine_module is not _engine_py:
        pytest.skip("the C engine's trim is in native/pools.pxi")
    trims: list[float] = []
    monkeypatch.setattr(_engine_py, "trim_heap", lambda: trims.append(time.monotonic()))
    server = upstream(echo)
    engine, address = relay_to(server.address, workers=1)

    def one() -> None:
        with socket.create_connection(address) as conn:
            conn.sendall(b"x")
            assert conn.recv(64) == b"x"

    time.sleep(2 * IDLE_SWEEP)
    assert trims == []  # nothing ended yet: nothing to give back
    one()
    wait_until(lambda: len(trims) == 1)
    with socket.create_connection(address) as held:  # open: the heap is in use
        held.sendall(b"y")
        assert held.recv(64) == b"y"
        one()
        time.sleep(2 * IDLE_SWEEP)
        assert len(trims) == 1
    wait_until(lambda: len(trims) == 2)  # both gone
    time.sleep(2 * IDLE_SWEEP)
    assert len(trims) == 2  # once for each time the worker went idle
