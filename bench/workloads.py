"""The measurements: iperf3 throughput (and the relay's CPU per GB on the way),
redis-benchmark request rates, and relay memory for idle connections."""

from __future__ import annotations

import csv
import io
import json
import resource
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peers import HOST, Proc, Relay, cpu_seconds, cpu_split, free_port, memory_kib, pinned, which


class MeasureError(RuntimeError):
    pass


def raise_nofile(want: int) -> int:
    """The idle test holds ~2 descriptors per connection in this process (client
    end and backend end); root may lift the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ------------------------------------------------------------------- iperf3

@contextmanager
def iperf_server(logdir: Path) -> Iterator[int]:
    """A one-shot iperf3 server (-1) per measurement: a fresh server cannot be
    left wedged by an earlier failed test."""
    port = free_port()
    proc = Proc("iperf3-server", pinned("server", [which("iperf3"), "-s", "-1", "-B", HOST, "-p", str(port)]), logdir)
    try:
        proc.wait_listening(port)
        yield port
    finally:
        proc.stop(grace=2.0)


def iperf(relay: Relay, seconds: float, streams: int) -> dict:
    """Bits per second received by the backend; with the relay's CPU seconds spent meanwhile."""
    argv = [which("iperf3"), "-c", HOST, "-p", str(relay.port), "-t", str(seconds), "-P", str(streams),
            "-J", "--connect-timeout", "5000"]
    cpu0 = cpu_seconds(*relay.pids) if relay.pids else None
    try:
        r = subprocess.run(pinned("client", argv), capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise MeasureError("iperf3 client timed out") from None
    cpu1 = cpu_seconds(*relay.pids) if relay.pids else None
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise MeasureError(f"iperf3 exit {r.returncode}: {(r.stderr or r.stdout)[-300:]}") from None
    if r.returncode or "error" in doc:
        raise MeasureError(f"iperf3: {doc.get('error', r.returncode)}")
    got = doc["end"]["sum_received"]
    out = {"bits_per_second": got["bits_per_second"], "bytes": got["bytes"], "seconds": got["seconds"]}
    if cpu0 is not None:
        out["relay_cpu_seconds"] = round(cpu1 - cpu0, 3)
        out["cpu_seconds_per_gb"] = (cpu1 - cpu0) / (got["bytes"] / 1e9)
    return out


# -------------------------------------------------------------------- redis

@contextmanager
def redis_server(logdir: Path) -> Iterator[int]:
    port = free_port()
    argv = [which("redis-server"), "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--maxclients", "10000"]
    proc = Proc("redis-server", pinned("server", argv), logdir, cwd=logdir)
    try:
        proc.wait_listening(port)
        yield port
    finally:
        proc.stop(grace=2.0)


def redis_benchmark(port: int, clients: int, requests: int, options: list[str],
                    keepalive: bool = True) -> subprocess.CompletedProcess:
    """redis-benchmark's PING_INLINE against `port`; `options` pick its output (-q --csv, or --precision 3)."""
    argv = [which("redis-benchmark"), "-h", HOST, "-p", str(port), "-t", "ping_inline", "-c", str(clients),
            "-n", str(requests), "-k", "1" if keepalive else "0", *options]
    # redis-benchmark spins forever when it cannot connect, so bound it (assumes >= 500 req/s).
    try:
        return subprocess.run(pinned("client", argv), capture_output=True, text=True, timeout=30 + requests / 500,
                              check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError("redis-benchmark timed out (relay refusing or stalling connections?)") from None


def redis_bench(relay: Relay, requests: int, keepalive: bool, clients: int = 50) -> dict:
    cpu0 = cpu_split(*relay.pids) if relay.pids else None
    r = redis_benchmark(relay.port, clients, requests, ["-q", "--csv"], keepalive)
    cpu1 = cpu_split(*relay.pids) if relay.pids else None
    rows = [row for row in csv.DictReader(io.StringIO(r.stdout)) if row.get("test") == "PING_INLINE"]
    if r.returncode or not rows:
        raise MeasureError(f"redis-benchmark exit {r.returncode}: {(r.stderr or r.stdout)[-300:]}")
    row = rows[0]
    out = {"requests_per_second": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
           "p99_ms": float(row["p99_latency_ms"])}
    if cpu0 is not None:
        # What a request costs the relay: steadier than the rate, which the scheduler's
        # placement of client, relay and server on the cores decides.
        user, kernel = (after - before for after, before in zip(cpu1, cpu0))
        out["relay_cpu_seconds"] = round(user + kernel, 3)
        out["cpu_us_per_request"] = (user + kernel) / requests * 1e6
        # The kernel's part (system calls and the TCP work they do) is the part no relay's own
        # code can make smaller without making fewer or cheaper calls.
        out["kernel_us_per_request"] = kernel / requests * 1e6
    return out


# --------------------------------------------------------------------- idle

class HoldServer:
    """A backend that accepts connections and holds them, never reading: the
    relay in front of it keeps every connection open and idle."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(4096)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with self.accepted:
                self.held.append(conn)
                self.accepted.notify_all()

    def wait_for(self, count: int, deadline: float) -> bool:
        with self.accepted:
            return self.accepted.wait_for(lambda: len(self.held) >= count, max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()
        for c in self.held:
            c.close()
        self.held.clear()


@contextmanager
def hold_server() -> Iterator[HoldServer]:
    server = HoldServer()
    try:
        yield server
    finally:
        server.close()


def idle_rss(relay: Relay, backend: HoldServer, conns: int, timeout: float = 120.0, window: int = 4) -> dict:
    """Relay memory (summed over its processes) before and after `conns` idle
    connections are open end to end, i.e. accepted by the backend.

    Connects are paced to at most `window` not yet through to the backend: socat
    listens with a backlog of 5, and overflowing an accept queue costs a 1 s SYN
    retransmit, which would measure the ramp rather than the memory."""
    base = memory_kib(*relay.pids)
    clients: list[socket.socket] = []
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        for _ in range(conns):
            if not backend.wait_for(len(clients) - window, deadline):
                raise MeasureError(f"backend holds {len(backend.held)} of {len(clients)} connections opened "
                                   f"in {timeout:.0f}s")
            s = socket.socket()
            s.settimeout(10)
            try:
                s.connect((HOST, relay.port))
            except OSError as exc:
                s.close()
                raise MeasureError(f"connect {len(clients) + 1} of {conns} failed: {exc}") from None
            clients.append(s)
        if not backend.wait_for(conns, deadline):
            raise MeasureError(f"backend holds {len(backend.held)} of {conns} connections after {timeout:.0f}s")
        ramp = time.monotonic() - t0
        time.sleep(0.5)  # let the relay finish whatever it allocates per connection
        held = memory_kib(*relay.pids)
    finally:
        for s in clients:
            s.close()
    return {
        "connections": conns,
        "open_seconds": round(ramp, 2),
        "rss_before_kib": base["rss_kib"], "rss_after_kib": held["rss_kib"],
        "rss_growth_mib": (held["rss_kib"] - base["rss_kib"]) / 1024,
        "pss_growth_mib": (held["pss_kib"] - base["pss_kib"]) / 1024,
        "processes_before": base["processes"], "processes_after": held["processes"],
    }
