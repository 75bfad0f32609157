"""Running out of file descriptors: a counted, logged rejection, never a crash,
a hang or a spin, for both engines, with one worker and with two.

Lowering RLIMIT_NOFILE would hurt the pytest process, so the scenario runs in a
child interpreter per engine: this file run as a script (`python
test_fd_exhaustion.py cython|python WORKERS`, FASTMESH_NO_EXTENSIONS=1 for the
twin), which prints one JSON line of results that the tests below assert on.
In the child, one process holds everything: an echo server thread (the
upstream), a Relay with its engine and listener, and the clients. Every fd the
scenario needs is opened before the limit is lowered, so the budget of free
descriptors is exact:

1. the limit leaves 3 * HELD + 1 free fds; HELD connections are made one at
   a time, each taking 3 (the engine's accepted socket, its upstream socket,
   the echo server's accepted socket): one free fd is left;
2. "upstream side": a client connects; accept4() takes the last fd, socket()
   for the upstream fails with EMFILE; the engine must record a LOCAL_ERROR
   close with errno EMFILE and close the client (twice, which also shows the
   accepted fd was given back);
3. "accept side": a placeholder takes the last fd, two clients connect (the
   kernel completes their handshake and queues them); accept4() fails with
   EMFILE, the engine counts it and pauses the listener (100 ms) instead of
   spinning on a level-triggered listener that stays readable. Meanwhile the
   held connections still relay, bulk data included (the Cython engine
   cannot get a pipe then, and copies);
4. the limit is raised back, the queued clients close: the engine accepts them,
   a new connection relays 2 MiB each way byte exact, the held connections
   still work, and no fd is left behind. (Raised first: fds freed under the
   low limit would let the engine accept a queued client and connect it while
   the echo server, or the upstream socket, finds no fd left.)
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from conftest import ENGINE_MODULES

from fastmesh.reasons import CloseReason

HELD = 4  # connections that fit under the lowered limit
LOCAL_ERRORS = 2  # clients whose upstream socket() fails
QUEUED = 2  # clients left in the accept queue while accept4() fails
PAYLOAD = 2 << 20
MAX_LOOPS_PER_SECOND_WHILE_PAUSED = 300  # a pause/retry every 100 ms: about 20 per worker


@pytest.fixture(
    scope="module",
    params=[(engine, workers) for engine in ENGINE_MODULES for workers in (1, 2)],
    ids=lambda p: f"{p[0]}-{p[1]}worker",
)
def scenario(request: pytest.FixtureRequest) -> dict:
    # Two workers too: each worker accepts on the listener and pauses it on its own
    # (the Cython engine's workers with EPOLLEXCLUSIVE).
    engine, workers = request.param
    env = {k: v for k, v in os.environ.items() if k != "FASTMESH_NO_EXTENSIONS"}
    if engine == "python":
        env["FASTMESH_NO_EXTENSIONS"] = "1"
    try:
        child = subprocess.run(
            [sys.executable, __file__, engine, str(workers)],
            env=env, capture_output=True, text=True, timeout=90,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the {engine} scenario hung (killed after 90 s): {exc.stderr!r}")
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, (
        f"the {engine} scenario exited with {child.returncode} (negative: killed by a signal)\n"
        f"stdout: {child.stdout[-3000:]}\nstderr: {child.stderr[-5000:]}")
    result = json.loads(lines[-1])
    if "error" in result:
        pytest.fail(f"the {engine} scenario failed in stage {result['stage']!r}:\n{result['error']}"
                    f"\nstderr: {child.stderr[-5000:]}")
    return result


def test_the_child_runs_the_expected_engine_to_the_end(scenario):
    assert scenario["implementation"] == scenario["expected"]
    assert scenario["workers"] in (1, 2)
    assert scenario["stage"] == "done"


def test_the_fd_budget_is_exact(scenario):
    # The scenario's premise: after the held connections exactly one fd is free.
    assert scenario["free_fds_after_held"] == 1
    assert scenario["free_fds_after_local_errors"] == 1  # the accepted fds were closed again
    assert scenario["upstream_accept_errors"] == []  # the echo server never ran short


def test_upstream_socket_exhaustion_is_a_counted_logged_local_error(scenario):
    records = scenario["local_error_records"]
    assert len(records) == LOCAL_ERRORS
    for record in records:
        assert (record["reason"], record["err"]) == (CloseReason.LOCAL_ERROR, errno.EMFILE)
        assert record["bytes"] == [0, 0, 0, 0]
        assert (record["listener_id"], record["cluster"], record["endpoint"]) == (0, 0, 0)
    stats = scenario["stats_after_local_errors"]
    # accept4() succeeded for every client: the failing call was socket(). With two
    # workers, the one that loses the race for a connection may still call accept4()
    # while no fd is free, which fails with EMFILE even on an empty queue: counted.
    spurious = (scenario["workers"] - 1) * LOCAL_ERRORS
    assert stats["accept_errors"] <= spurious and stats["accept_paused"] == stats["accept_errors"]
    assert stats["connections_accepted"] == HELD + LOCAL_ERRORS
    assert stats["active_connections"] == HELD
    assert stats["connect_failures"] == 0  # a local failure, not the upstream's
    # The Relay logs each batch of failed connections with the errno's name.
    assert any(
        name == "fastmesh.relay" and "local error" in message and "EMFILE" in message
        for name, _, message in scenario["logs"]
    ), scenario["logs"]
    # The client is told at once, not left waiting.
    assert all(outcome in ("eof", "reset") for outcome in scenario["local_error_client_saw"])


def test_a_local_error_resets_the_client(scenario):
    # fastmesh.reasons documents LOCAL_ERROR as "both sides reset": the client
    # must not take it for a server that chose to close.
    assert scenario["local_error_client_saw"] == ["reset"] * LOCAL_ERRORS


def test_accept_exhaustion_is_counted_and_paused_without_spinning(scenario):
    paused = scenario["paused"]
    before, after = paused["before"], paused["after"]
    assert before["accept_errors"] > 0 and before["accept_paused"] > 0
    assert after["accept_errors"] >= before["accept_errors"]
    # Nothing was accepted while out of fds: the clients wait in the kernel's queue.
    assert after["connections_accepted"] == before["connections_accepted"] == HELD + LOCAL_ERRORS
    # The no-spin check counts loop iterations, not time: a listener retried
    # every 100 ms costs about 20 per second and worker; a spinning one, millions.
    iterations = after["loop_iterations"] - before["loop_iterations"]
    per_second = iterations / paused["seconds"]
    assert per_second < MAX_LOOPS_PER_SECOND_WHILE_PAUSED, paused
    # Established connections keep relaying while the listener is paused.
    assert paused["held_echo_while_paused"] is True
    # ...and move bulk data without a descriptor to spare: the Cython engine
    # falls back from splice (a pipe takes two fds) to copying.
    assert scenario["bulk_while_paused"] == {"length": PAYLOAD, "sha256": scenario["payload_sha256"]}
    stats = scenario["stats_after_bulk_while_paused"]
    assert stats["connections_accepted"] == HELD + LOCAL_ERRORS
    if scenario["implementation"] == "cython":
        assert stats["splice_fallbacks"] > 0 and stats["pipes_in_use"] == 0
    # Accept-side exhaustion is counted in stats() only: neither engine nor the
    # Relay logs it (the Python twin deliberately skips its log for EMFILE).


def test_after_the_limit_is_raised_everything_works_end_to_end(scenario):
    # The queued clients were accepted once fds were available again; they had
    # closed meanwhile, so they end as clean downstream closes with no bytes.
    queued = scenario["queued_records"]
    assert len(queued) == QUEUED
    assert all(r["reason"] == CloseReason.DOWNSTREAM_CLOSE and r["bytes"] == [0, 0, 0, 0] for r in queued)
    # A new connection moves its bytes exactly, both ways.
    fresh = scenario["fresh"]
    assert fresh["echoed"] == {"length": PAYLOAD, "sha256": fresh["sent_sha256"]}
    assert fresh["record"]["bytes"] == [PAYLOAD] * 4
    assert fresh["record"]["reason"] == CloseReason.DOWNSTREAM_CLOSE
    assert scenario["held_echo_after"] is True
    # Totals: every connection opened was closed, none by the final stop.
    counters = scenario["counters"]
    total = HELD + LOCAL_ERRORS + QUEUED + 1
    assert counters["connections_opened"] == counters["connections_closed"] == total
    assert counters["closed_local_error"] == LOCAL_ERRORS
    assert counters["closed_downstream_close"] == total - LOCAL_ERRORS
    assert counters["downstream_rx_bytes"] == counters["upstream_tx_bytes"]
    assert counters["downstream_tx_bytes"] == counters["upstream_rx_bytes"]
    assert scenario["final_stats"]["records_dropped"] == 0
    # No fd was leaked: what is open equals what was open before the scenario,
    # plus the empty pipes the Cython engine keeps pooled for reuse.
    assert scenario["leaked_fds"] == 0


# ---------------------------------------------------------------- the child


def _child(expected: str, workers: int) -> int:
    import asyncio
    import traceback

    import fastmesh

    io_uring = expected.endswith("-io_uring")  # the Cython engine, batching through io_uring
    report: dict = {"expected": expected.removesuffix("-io_uring"), "implementation": fastmesh.IMPLEMENTATION,
                    "workers": workers, "stage": "start"}
    try:
        asyncio.run(_scenario(report, workers, io_uring))
        report["stage"] = "done"
    except BaseException:
        report["error"] = traceback.format_exc()
    print(json.dumps(report), flush=True)
    return 0


async def _scenario(report: dict, workers: int, io_uring: bool) -> None:
    import hashlib
    import logging
    import resource
    import select
    import socket
    import threading
    import time

    from fastmesh.records import Batch
    from fastmesh.relay import Relay

    class ListHandler(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[tuple[str, str, str]] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append((record.name, record.levelname, record.getMessage()))

    class EchoServer:
        """The upstream, in a thread of this process: its fds count too. It waits
        in poll(), not in accept(): on Linux a thread blocked in accept() holds
        a reserved descriptor slot (taken before it sleeps, invisible in
        /proc/self/fd), which would upset the exact budget."""

        def __init__(self) -> None:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(64)
            self.sock.setblocking(False)
            self.port = self.sock.getsockname()[1]
            self.accept_errors: list[int] = []
            threading.Thread(target=self._accept_forever, daemon=True).start()

        def _accept_forever(self) -> None:
            poller = select.poll()  # unlike epoll, poll() needs no descriptor
            poller.register(self.sock, select.POLLIN)
            while True:
                if not poller.poll(100):
                    continue
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # not expected: the budget counts the upstream's fds
                    self.accept_errors.append(exc.errno or 0)
                    time.sleep(0.01)
                    continue
                conn.setblocking(True)
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

        @staticmethod
        def _echo(conn: socket.socket) -> None:
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    class Records:
        """A Relay consumer: per-connection bytes and close records."""

        def __init__(self) -> None:
            self.bytes: dict[int, list[int]] = {}
            self.closed: list[dict] = []

        def __call__(self, batch: Batch) -> None:
            for updated in batch.updated:
                self._add(updated.conn_id, updated[1:])
            for closed in batch.closed:
                self._add(closed.conn_id, closed[6:])
                self.closed.append({"id": closed.conn_id, "listener_id": closed.listener_id,
                                    "cluster": closed.cluster, "endpoint": closed.endpoint,
                                    "reason": closed.reason, "err": closed.errno,
                                    "bytes": self.bytes.pop(closed.conn_id)})

        def _add(self, conn_id: int, deltas: tuple[int, ...]) -> None:
            old = self.bytes.setdefault(conn_id, [0, 0, 0, 0])
            self.bytes[conn_id] = [a + b for a, b in zip(old, deltas)]

    def open_fds() -> list[int]:
        # listdir's own fd is closed once it returns: fstat weeds it out.
        fds = []
        for name in os.listdir("/proc/self/fd"):
            try:
                os.fstat(int(name))
            except OSError:
                continue
            fds.append(int(name))
        return sorted(fds)

    def wait_for(condition, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s")
            time.sleep(0.01)

    def recv_exact(sock: socket.socket, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def echo_ok(sock: socket.socket, message: bytes) -> bool:
        sock.sendall(message)
        return recv_exact(sock, len(message)) == message

    def exchange(sock: socket.socket, data: bytes) -> dict:
        """Send `data` to the echo server while reading its echo; both at once."""
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        digest, length = hashlib.sha256(), 0
        while length < len(data):
            chunk = sock.recv(min(1 << 20, len(data) - length))
            if not chunk:
                break
            digest.update(chunk)
            length += len(chunk)
        sender.join(10)
        return {"length": length, "sha256": digest.hexdigest()}

    def outcome(sock: socket.socket) -> str:
        try:
            return "eof" if sock.recv(1) == b"" else "data"
        except ConnectionResetError:
            return "reset"
        except socket.timeout:
            return "timeout"

    logs = ListHandler()
    report["logs"] = logs.lines
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(logging.INFO)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    server = EchoServer()
    relay = Relay(workers=workers, collect_interval=3600.0, io_uring=io_uring)  # read by hand below
    assert relay.engine.io_uring == io_uring, relay.engine.io_uring_unavailable
    records = Records()
    relay.add_consumer(records)
    listener = await relay.listen("127.0.0.1:0", [f"127.0.0.1:{server.port}"])
    address = ("127.0.0.1", listener.address.port)
    engine = relay.engine

    def wait_closed(count: int, what: str) -> None:
        def done() -> bool:
            relay.collect()
            return len(records.closed) >= count
        wait_for(done, what)

    baseline = len(open_fds())
    # Every fd the clients need, opened before the limit is lowered.
    held = [socket.socket() for _ in range(HELD)]
    refused = [socket.socket() for _ in range(LOCAL_ERRORS)]
    queued = [socket.socket() for _ in range(QUEUED)]
    for sock in held + refused + queued:
        sock.settimeout(10)
    payload = os.urandom(PAYLOAD)
    report["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    # Fill the holes below the highest fd: then fds 0..top are all open and a
    # limit of top + 1 + n leaves exactly n free.
    top = open_fds()[-1]
    fillers = []
    while (fd := os.open(os.devnull, os.O_RDONLY)) < top:
        fillers.append(fd)
    os.close(fd)
    limit = top + 1 + 3 * HELD + 1
    report["limit"] = limit

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        report["stage"] = "held"
        for i, sock in enumerate(held):
            sock.connect(address)
            if not echo_ok(sock, b"held %d" % i):
                raise AssertionError(f"held connection {i} did not echo")
        report["free_fds_after_held"] = limit - len(open_fds())

        report["stage"] = "local errors"
        report["local_error_client_saw"] = []
        for i, sock in enumerate(refused):
            try:
                sock.connect(address)
            except ConnectionResetError:
                # The connect (polled, as the socket has a timeout) may only
                # return after the relay's reset already came back.
                report["local_error_client_saw"].append("reset")
            else:
                report["local_error_client_saw"].append(outcome(sock))
            wait_closed(i + 1, "the LOCAL_ERROR record")
        report["local_error_records"] = list(records.closed)
        report["stats_after_local_errors"] = engine.stats()
        report["free_fds_after_local_errors"] = limit - len(open_fds())

        report["stage"] = "accept paused"
        placeholder = os.open(os.devnull, os.O_RDONLY)  # the last free fd: now none is left
        for sock in queued:
            sock.connect(address)  # completed by the kernel, waits in the accept queue
        wait_for(lambda: engine.stats()["accept_errors"] > 0, "accept_errors")
        before, start = engine.stats(), time.monotonic()
        time.sleep(1.0)
        after, end = engine.stats(), time.monotonic()
        report["paused"] = {"before": before, "after": after, "seconds": end - start,
                            "held_echo_while_paused": echo_ok(held[0], b"still there")}
        # A bulk transfer with no fd to spare: the Cython engine cannot get a
        # pipe (pipe2 fails with EMFILE) and must copy through its buffer instead.
        report["bulk_while_paused"] = exchange(held[1], payload)
        report["stats_after_bulk_while_paused"] = engine.stats()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for sock in queued:
        sock.close()
    os.close(placeholder)

    report["stage"] = "recovery"
    wait_closed(LOCAL_ERRORS + QUEUED, "the queued connections")
    report["queued_records"] = records.closed[LOCAL_ERRORS:]

    with socket.create_connection(address, timeout=10) as fresh:
        def send() -> None:
            fresh.sendall(payload)
            fresh.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        echoed = hashlib.sha256()
        length = 0
        while chunk := fresh.recv(1 << 20):
            echoed.update(chunk)
            length += len(chunk)
        sender.join(10)
    wait_closed(LOCAL_ERRORS + QUEUED + 1, "the fresh connection")
    report["fresh"] = {"sent_sha256": report["payload_sha256"],
                       "echoed": {"length": length, "sha256": echoed.hexdigest()},
                       "record": records.closed[-1]}

    report["held_echo_after"] = all(echo_ok(sock, b"after %d" % i) for i, sock in enumerate(held))
    for sock in held + refused:
        sock.close()
    for fd in fillers:
        os.close(fd)
    wait_closed(LOCAL_ERRORS + QUEUED + 1 + HELD, "the held connections")

    def settled() -> bool:  # the echo server closes its side just after the relay
        report["leaked_fds"] = len(open_fds()) - baseline - 2 * engine.stats()["pipes_pooled"]
        return report["leaked_fds"] == 0
    try:
        wait_for(settled, "fds back to the baseline", timeout=5.0)
    except TimeoutError:
        pass  # reported through leaked_fds

    report["upstream_accept_errors"] = server.accept_errors
    report["stage"] = "close"
    await relay.close(drain_timeout=5.0)
    report["counters"] = relay.counters()
    report["final_stats"] = relay.stats()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2])))
