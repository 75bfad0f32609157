"""Real servers driven by real clients through fastmesh, on 127.0.0.1 only:
redis-server with redis-cli and redis-benchmark, and iperf3.

Each test starts its own server on a free port, runs the client against a
`Relay` (the Cython engine behind the asyncio control plane) and checks what
the client saw and what the relay counted: every connection opened was closed
by its peers (none left for the engine's stop to reset), no connect failures,
and the bytes read on one side equal the bytes written on the other.

The binaries come from Debian packages that CI installs with the README's test
set-up (ci/install-test-deps.sh); when one is missing the test fails, it does
not skip.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from typing import Any, Callable, Iterator

import pytest

from conftest import free_port
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch
from fastmesh.relay import Relay

from fastmesh.engine import Engine

pytestmark = pytest.mark.bench_tools

MiB = 1 << 20
SETUP_HINT = (
    "run the README's test set-up, `bash ci/install-test-deps.sh` (as root), which installs "
    "the Debian packages iperf3, redis-server, redis-tools, prometheus and mariadb-server"
)
PIPE_SIZE = MiB  # the engine's default pipe_size: the most one direction holds in the relay


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {SETUP_HINT}")
    return path


def default_engine() -> Any:
    """The engine fastmesh picks (test_engine_selection.py checks which one it is)."""
    return Engine(1)


def start_server(args: list[str], log_path) -> subprocess.Popen:
    # Output to a file, not a pipe nobody reads while the test runs.
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def tail(path) -> str:
    return path.read_bytes()[-2000:].decode(errors="replace") if path.exists() else ""


def start_until_ready(what: str, args_for: Callable[[int], list[str]],
                      ready: Callable[[subprocess.Popen, int], bool], log_path) -> tuple[int, subprocess.Popen]:
    """Start a server on a free port and wait (bounded) until `ready(proc, port)`.
    A server that exits at once most likely lost its port to someone else
    between free_port() and its bind: it gets two more tries on other ports."""
    for _ in range(3):
        port = free_port()
        proc = start_server(args_for(port), log_path)
        deadline = time.monotonic() + 15
        while proc.poll() is None and not ready(proc, port):
            if time.monotonic() > deadline:
                stop_server(proc)
                pytest.fail(f"{what} on port {port} was not ready within 15 s: {tail(log_path)}")
            time.sleep(0.02)
        if proc.poll() is None:
            return port, proc
    pytest.fail(f"{what} exited with status {proc.returncode}: {tail(log_path)}")


# ---------------------------------------------------------------- the relay


class PerConnection:
    """A Relay consumer: per-connection byte totals and how each connection ended."""

    def __init__(self) -> None:
        # conn_id -> [down_rx, down_tx, up_rx, up_tx]
        self.bytes: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
        self.ended: dict[int, tuple[int, int]] = {}  # conn_id -> (reason, errno)

    def __call__(self, batch: Batch) -> None:
        for updated in batch.updated:
            self.bytes[updated.conn_id] = [a + b for a, b in zip(self.bytes[updated.conn_id], updated[1:])]
        for closed in batch.closed:
            self.bytes[closed.conn_id] = [a + b for a, b in zip(self.bytes[closed.conn_id], closed[6:])]
            self.ended[closed.conn_id] = (closed.reason, closed.errno)


class RelayRun:
    """What one relay saw: totals, engine stats and per-connection records, all
    read after the relay was closed."""

    def __init__(self, counters: dict[str, int], stats: dict[str, int], conns: PerConnection) -> None:
        self.counters = counters
        self.stats = stats
        self.conns = conns

    def assert_clean(self, connections: int) -> None:
        c = self.counters
        assert c["connections_opened"] == c["connections_closed"] == connections, c
        # Every connection was ended by its peers before close(): none was
        # reset by the engine's stop (closed_shutdown), none failed to connect.
        for bad in ("shutdown", "connect_failed", "connect_timeout", "local_error"):
            assert f"closed_{bad}" not in c, c
        assert self.stats["connect_failures"] == self.stats["connect_timeouts"] == 0, self.stats
        assert self.stats["accept_errors"] == 0 and self.stats["records_dropped"] == 0, self.stats

    def assert_bytes_balanced(self) -> None:
        c = self.counters
        assert c["downstream_rx_bytes"] == c["upstream_tx_bytes"], c
        assert c["downstream_tx_bytes"] == c["upstream_rx_bytes"], c


def listen_entry(port: int) -> tuple[int, int] | None:
    """(accept queue length, socket inode) of the socket listening on
    127.0.0.1:port, from /proc/net/tcp (rx_queue of a LISTEN entry is its
    accept queue); None when nothing listens there."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[4].split(":")[1], 16), int(fields[9])
    return None


def accept_queue_length(port: int) -> int:
    entry = listen_entry(port)
    return entry[0] if entry else 0


def listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether proc itself has a socket listening on 127.0.0.1:port."""
    entry = listen_entry(port)
    if entry is None:
        return False
    try:
        links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    except OSError:  # exited meanwhile
        return False
    return f"socket:[{entry[1]}]" in links


def wait_accept_queue_empty(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while accept_queue_length(port):
        assert time.monotonic() < deadline, f"the relay left connections in its accept queue for {timeout} s"
        time.sleep(0.01)


def through_relay(upstream_port: int, drive: Callable[[int], Any]) -> tuple[Any, RelayRun]:
    """Run the blocking `drive(relay_port)` in a worker thread while a Relay on
    127.0.0.1 forwards to 127.0.0.1:upstream_port; close the relay once the
    connections drained and return drive's result and what the relay saw."""

    async def main() -> tuple[Any, RelayRun]:
        relay = Relay(engine=default_engine(), collect_interval=0.1)
        conns = PerConnection()
        relay.add_consumer(conns)
        try:
            listener = await relay.listen("127.0.0.1:0", [f"127.0.0.1:{upstream_port}"])
            result = await asyncio.to_thread(drive, listener.address.port)
        except BaseException:
            await relay.close()
            raise
        # The client exited, but its last connections may still wait in the
        # listener's accept queue (redis-benchmark -k 0 closes spare ones at
        # once): close() stops accepting first, so let the engine take them all.
        # Then give the relay the time to see every close from the peers
        # (bounded), stop it and read the last batch.
        await asyncio.to_thread(wait_accept_queue_empty, listener.address.port)
        await relay.close(drain_timeout=10.0)
        return result, RelayRun(relay.counters(), relay.stats(), conns)

    return asyncio.run(main())


# ---------------------------------------------------------------- redis


def redis_cli(port: int, *args: str, input: bytes | None = None) -> bytes:
    result = subprocess.run(
        [tool("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        input=input, capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@pytest.fixture
def redis_server(tmp_path) -> Iterator[int]:
    """A redis-server of its own on a free port; yields the port once it answers PING."""
    server, cli = tool("redis-server"), tool("redis-cli")

    def answers_ping(proc: subprocess.Popen, port: int) -> bool:
        if not listens(proc, port):  # not yet, or someone else's port
            return False
        try:
            ping = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), "ping"],
                                  capture_output=True, timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return ping.stdout.strip() == b"PONG"

    port, proc = start_until_ready(
        "redis-server",
        lambda port: [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", str(tmp_path)],
        answers_ping, tmp_path / "redis-server.log",
    )
    try:
        yield port
    finally:
        stop_server(proc)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_redis_cli_sets_and_gets_a_4_mib_value_through_the_relay(redis_server):
    # 4 MiB of random bytes as hex: 8 MiB of text that redis-cli passes unchanged.
    value = os.urandom(4 * MiB).hex().encode()

    def drive(port: int) -> tuple[bytes, bytes, bytes]:
        stored = redis_cli(port, "-x", "SET", "key", input=value)  # -x: the last argument is stdin
        fetched = redis_cli(port, "GET", "key")
        size = redis_cli(port, "DBSIZE")
        return stored, fetched, size

    (stored, fetched, size), run = through_relay(redis_server, drive)
    assert stored == b"OK\n"
    # Not a tty: redis-cli prints the raw value and a newline. Compared by digest
    # so that a failure does not print 8 MiB.
    assert fetched.endswith(b"\n")
    assert (len(fetched) - 1, sha256(fetched[:-1])) == (len(value), sha256(value))
    assert size == b"1\n"

    run.assert_clean(connections=3)  # one connection per redis-cli invocation
    run.assert_bytes_balanced()
    # The value crossed the relay once in each direction, plus the protocol framing.
    assert len(value) < run.counters["downstream_rx_bytes"] < len(value) + 1024
    assert len(value) < run.counters["downstream_tx_bytes"] < len(value) + 1024
    assert set(run.conns.ended.values()) <= {(CloseReason.DOWNSTREAM_CLOSE, 0)}


# What redis-benchmark (7.0, src/redis-benchmark.c) really opens:
# - main() first calls getRedisConfig() on a connection of its own
#   (CONFIG GET save, CONFIG GET appendonly), then closes it: 1 connection;
# - each test in -t (here 3: ping_inline, set, get) is a benchmark() call that
#   creates -c clients, and frees them all when the test ends;
# - with -k 1 a client is reused for all its requests: 3 * 20 connections;
# - with -k 0 clientDone() frees the client after each reply and, unless that
#   reply completed the test (requests_finished >= requests), creates its
#   replacement first: each test opens 20 + (n - 1) connections. Replacements
#   made near the end that find every request already issued
#   (requests_issued >= requests) send nothing, but were opened all the same.
# So -k 1 gives 1 + 3 * 20 = 61 connections, -k 0 -n 1000 gives
# 1 + 3 * (20 + 999) = 3058, at least the 3000 requests. Observed exactly so,
# with or without the relay (redis INFO total_connections_received), provided
# the relay is closed only once its accept queue is empty (through_relay):
# the spare connections redis-benchmark closes as it exits may still wait
# there, and Relay.close() stops accepting before anything else.
@pytest.mark.parametrize(
    "keepalive, requests, connections",
    [(1, 3000, 1 + 3 * 20), (0, 1000, 1 + 3 * (20 + 1000 - 1))],
    ids=["keepalive", "reconnect-per-request"],
)
def test_redis_benchmark_through_the_relay(redis_server, keepalive, requests, connections):
    clients, tests = 20, ("PING_INLINE", "SET", "GET")

    def drive(port: int) -> subprocess.CompletedProcess:
        # redis-benchmark retries forever when it cannot connect: always a timeout.
        return subprocess.run(
            [tool("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port),
             "-t", "ping_inline,set,get", "-n", str(requests), "-c", str(clients),
             "-k", str(keepalive), "-q"],
            capture_output=True, timeout=60,
        )

    result, run = through_relay(redis_server, drive)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    for name in tests:
        assert f"{name}: " in output and "requests per second" in output, output

    run.assert_clean(connections=connections)
    if not keepalive:
        assert run.counters["connections_opened"] >= len(tests) * requests  # one per request at least
    run.assert_bytes_balanced()
    # Each request was a command in and a reply out.
    assert run.counters["downstream_rx_bytes"] >= len(tests) * requests * len("PING\r\n")
    assert run.counters["downstream_tx_bytes"] >= len(tests) * requests * len("+OK\r\n")


# ---------------------------------------------------------------- iperf3


@pytest.fixture
def iperf3_server(tmp_path) -> Iterator[tuple[int, subprocess.Popen]]:
    """`iperf3 -s -1` (one test, then exit) on a free port of 127.0.0.1."""
    iperf3 = tool("iperf3")
    port, proc = start_until_ready(
        "iperf3 -s",
        lambda port: [iperf3, "-s", "-p", str(port), "-1", "-B", "127.0.0.1"],
        # Not probed by connecting: `iperf3 -s -1` would take a probe for its one test.
        listens,
        tmp_path / "iperf3-server.log",
    )
    try:
        yield port, proc
    finally:
        stop_server(proc)


AMOUNT = 200 * MiB  # iperf3 reads "-n 200M" as 200 * 1024 * 1024 bytes


def run_iperf3(relay_port: int, *extra: str) -> dict:
    result = subprocess.run(
        [tool("iperf3"), "-c", "127.0.0.1", "-p", str(relay_port), "-n", "200M", "-J",
         "--connect-timeout", "5000", *extra],
        capture_output=True, timeout=60,
    )
    report = json.loads(result.stdout) if result.stdout.strip().startswith(b"{") else {}
    assert result.returncode == 0 and "error" not in report, (
        result.stdout.decode(errors="replace")[-2000:] + result.stderr.decode(errors="replace"))
    return report


def split_connections(run: RelayRun) -> tuple[int, int]:
    """(control, data) connection ids: iperf3 opens a control connection, then
    one data connection (-P 1); the data connection is the one that moved 200 MiB."""
    assert len(run.conns.ended) == 2, run.conns.ended
    data = max(run.conns.bytes, key=lambda conn_id: sum(run.conns.bytes[conn_id]))
    (control,) = set(run.conns.ended) - {data}
    return control, data


def test_iperf3_reverse_through_the_relay_is_byte_exact(iperf3_server):
    # -R: the server sends, the client receives. In bytes mode the client, as
    # receiver, ends the test only once it has received all 200 MiB, so the
    # amount is exact on both ends.
    port, server = iperf3_server
    report, run = through_relay(port, lambda relay_port: run_iperf3(relay_port, "-R"))
    assert server.wait(timeout=30) == 0
    sent, received = report["end"]["sum_sent"]["bytes"], report["end"]["sum_received"]["bytes"]
    assert sent == received == AMOUNT

    # Two connections: iperf3's control connection (parameters, results as
    # JSON) and the data connection.
    run.assert_clean(connections=2)
    run.assert_bytes_balanced()
    assert run.counters["downstream_tx_bytes"] >= AMOUNT  # the data direction, both connections
    control, data = split_connections(run)
    down_rx, down_tx, up_rx, up_tx = run.conns.bytes[data]
    assert down_tx == up_rx == received  # the data connection carried exactly the test's bytes...
    assert down_rx == up_tx == 37  # ...and, the other way, only iperf3's 37-byte cookie
    assert run.conns.bytes[control][0] == run.conns.bytes[control][3]
    assert run.conns.bytes[control][1] == run.conns.bytes[control][2]


def test_iperf3_forward_through_the_relay(iperf3_server):
    # Forward (client sends) cannot be byte exact end to end, with or without a
    # relay: in bytes mode the iperf3 client ends the test as soon as its last
    # byte is *written* to its socket and says so on the control connection;
    # the server then stops counting and closes the data socket with bytes
    # still unread (iperf3 3.12 on plain loopback, no relay: about 4-6 MiB of
    # 200 MiB go uncounted). That close with unread data is a reset, which the
    # relay passes on to the client; what the relay held at that moment (at most
    # one pipe) is dropped with the reset. So here: the sender sent exactly
    # 200 MiB, the receiver counted no more than that and no more than the
    # relay delivered, the control connection is exact both ways, and the data
    # connection is either exact (a clean close) or an upstream reset that lost
    # at most what one direction of the relay can hold.
    port, server = iperf3_server
    report, run = through_relay(port, run_iperf3)
    assert server.wait(timeout=30) == 0
    sent, received = report["end"]["sum_sent"]["bytes"], report["end"]["sum_received"]["bytes"]
    assert sent == AMOUNT
    assert 0 < received <= sent

    counters = run.counters
    assert counters["connections_opened"] == counters["connections_closed"] == 2, counters
    for bad in ("shutdown", "connect_failed", "connect_timeout", "local_error"):
        assert f"closed_{bad}" not in counters, counters
    assert run.stats["connect_failures"] == run.stats["accept_errors"] == 0, run.stats

    control, data = split_connections(run)
    c_down_rx, c_down_tx, c_up_rx, c_up_tx = run.conns.bytes[control]
    assert (c_down_rx, c_down_tx) == (c_up_tx, c_up_rx)
    assert run.conns.ended[control][0] in (CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE)

    down_rx, down_tx, up_rx, up_tx = run.conns.bytes[data]
    assert down_tx == up_rx == 0  # nothing flows back on an iperf3 data connection
    assert up_tx >= received + 37  # the server counted only what the relay delivered (after the cookie)
    assert down_rx <= sent + 37
    reason, err = run.conns.ended[data]
    if reason == CloseReason.UPSTREAM_RESET:
        assert err in (errno.ECONNRESET, errno.EPIPE)
        assert 0 <= down_rx - up_tx <= PIPE_SIZE
    else:
        assert reason in (CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE)
        assert down_rx == up_tx == sent + 37
        run.assert_bytes_balanced()
