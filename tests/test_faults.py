"""The fault suite (issue 13): each fault made while good clients stream checksummed
bytes through the sidecar, on both engines. The good clients' bytes stay exact; each
fault ends the way Istio's flags and fastmesh's counters say.

Faults covered elsewhere, not repeated here:
- refused upstream: test_engine_data.py::test_refused_upstream_closes_the_client_and_is_counted,
  test_metrics_endpoint.py::test_a_refused_upstream_is_counted_with_response_flag_uf,
  test_cli.py::test_dead_upstream_closes_the_client_is_logged_and_counted_and_serving_goes_on;
- resets: test_engine_data.py::test_upstream_reset_reaches_the_client_as_a_reset,
  ::test_downstream_reset_reaches_the_upstream_as_a_reset,
  ::test_an_upstream_reset_mid_transfer_is_survived_with_sigpipe_at_its_default;
- black hole: test_engine_data.py::test_unanswered_upstream_times_out;
- a TLS stream cut without close_notify: test_tls_engine.py::test_a_stream_that_ends_without_close_notify_is_a_reset_not_an_end;
- fd exhaustion, exact budget, no spinning while paused: test_fd_exhaustion.py (all of it);
- SIGTERM and SIGINT exit 0: test_cli.py::test_serve_relays_exact_bytes_and_exits_cleanly_on_sigterm,
  ::test_sigint_stops_cleanly_and_closes_the_listener; /healthz/ready 503 while draining:
  test_health.py::test_healthz_ready_is_200_while_listening_and_503_while_draining;
- reload (file change, SIGHUP, a bad config refused): test_reload.py::test_a_changed_config_reroutes_new_connections_and_keeps_open_ones;
- rotation, a broken set refused: test_tls_sidecar.py::test_new_certificates_serve_new_handshakes_while_open_connections_go_on.
What those do with one connection or none, the tests below do under load, at the metrics port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    IP,
    MONGODB_SERVICE,
    MONGODB_V1,
    PEER,
    RATINGS_V2,
    Upstream,
    free_port,
    listening_socket,
    netns_unavailable,
    one_listener,
    random_bytes,
    scrape_pod,
    sh,
    sha256,
    stop_process,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from test_cli import EXAMPLES, serve  # noqa: F401 (serve: the fixture)
from test_reload import _answers, ask, routed_subset, serving, tagging
from test_reload import config as reload_config
from test_tls_sidecar import copy_identity, serial_seen

from fastmesh import ca
from fastmesh.addr import Address
from fastmesh.exposition import TcpSeriesRenderer
from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.settings import ListenerConfig, SidecarConfig

MiB = 1 << 20
TIMEOUT = 60.0  # a client that waits longer than this has hung: the test fails, it does not hang
LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)
LONG_REPORTING = 600.0  # no periodic report during a test: each connection is first reported at its close


# ---------------------------------------------------------------- the load


def echo(conn: socket.socket) -> None:
    """The good clients' upstream: everything back, then the end of stream."""
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def read_to_end(sock: socket.socket) -> tuple[int, str]:
    """Read until the stream ends; (bytes read, "eof" for a clean end or "reset")."""
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


def abort(sock: socket.socket) -> None:
    """Close with a reset (RST), as a crashed peer's kernel or a client that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Load:
    """Good clients: each streams its own random payload (a few MiB) to an echo upstream
    through `address` while reading the echo, and checks it by sha256. Each stops at half
    its payload until resume(), so the test makes its fault mid-stream; with hold_open,
    each keeps its connection open after its last byte until finish()."""

    def __init__(self, address: tuple[str, int], clients: int = 4, size: int = 3 * MiB,
                 hold_open: bool = False) -> None:
        self.payloads = [random_bytes(size + 4099 * i) for i in range(clients)]
        self._halfway = [threading.Event() for _ in range(clients)]
        self._echoed = [threading.Event() for _ in range(clients)]
        self._resumed, self._finished = threading.Event(), threading.Event()
        if not hold_open:
            self._finished.set()
        self.results: dict[int, tuple[int, str, str]] = {}
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._client, args=(address, i), daemon=True)
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    @property
    def sent(self) -> int:
        return sum(len(p) for p in self.payloads)

    def _client(self, address: tuple[str, int], index: int) -> None:
        payload = self.payloads[index]
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as sock:
                sender = threading.Thread(target=self._send, args=(sock, payload), daemon=True)
                sender.start()
                self.results[index] = self._receive(sock, index)
                sender.join(TIMEOUT)
        except OSError as exc:  # reported by the test through assert_exact
            self.errors.append(exc)
        finally:
            self._halfway[index].set()  # a failed client must not leave the test waiting
            self._echoed[index].set()

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        half = len(payload) // 2
        try:
            sock.sendall(payload[:half])
            self._resumed.wait(TIMEOUT)
            sock.sendall(payload[half:])
            self._finished.wait(TIMEOUT)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(exc)

    def _receive(self, sock: socket.socket, index: int) -> tuple[int, str, str]:
        size = len(self.payloads[index])
        digest, total, end = hashlib.sha256(), 0, "eof"
        try:
            while chunk := sock.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
                if total == size // 2:
                    self._halfway[index].set()  # the whole first half came back: bytes are moving
                if total == size:
                    self._echoed[index].set()
        except ConnectionResetError:
            end = "reset"
        return total, digest.hexdigest(), end

    def _wait_all(self, events: list[threading.Event], what: str) -> None:
        assert all(event.wait(TIMEOUT) for event in events), f"a client did not get {what} back"
        assert not self.errors, self.errors

    def wait_halfway(self) -> None:
        self._wait_all(self._halfway, "half its echo")

    def resume(self) -> None:
        self._resumed.set()

    def wait_echoed(self) -> None:
        self._wait_all(self._echoed, "all its echo")

    def finish(self) -> None:
        self._finished.set()

    def assert_exact(self) -> None:
        """Every client's echo was its payload, to the byte, ended by a clean end of stream."""
        self.resume()
        self.finish()
        for thread in self._threads:
            thread.join(TIMEOUT)
        assert not self.errors, self.errors
        expected = {i: (len(p), sha256(p), "eof") for i, p in enumerate(self.payloads)}
        wrong = {i: (self.results.get(i, "unfinished"), len(self.payloads[i])) for i in expected
                 if self.results.get(i) != expected[i]}
        assert not wrong, f"clients whose echo was not their payload (got, sent bytes): {wrong}"


# ---------------------------------------------------------------- what the metrics say


def tcp_counts(text: str) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """{(destination_service, response_flags): (opened, closed, received, sent)} of the text,
    summed over the series of each pair (they differ by peer when some peers were unknown)."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("istio_tcp_"):
                values = found.setdefault((sample.labels["destination_service"], sample.labels["response_flags"]), {})
                values[sample.name] = values.get(sample.name, 0) + int(sample.value)
    return {key: (values["istio_tcp_connections_opened_total"], values["istio_tcp_connections_closed_total"],
                  values["istio_tcp_received_bytes_total"], values["istio_tcp_sent_bytes_total"])
            for key, values in found.items()}


def counts_when(scrape: Callable[[], str], done: Callable[[dict], bool]) -> dict:
    """The scraped counts once `done(counts)` holds, or as they stand when time runs out."""
    counts: dict = {}

    def arrived() -> bool:
        counts.clear()
        counts.update(tcp_counts(scrape()))
        return done(counts)

    with contextlib.suppress(AssertionError):
        wait_until(arrived)
    return counts


def peers(text: str) -> set[tuple[str, str, str]]:
    """(reporter, source_workload, destination_workload) of each series of the text."""
    return {(sample.labels["reporter"], sample.labels["source_workload"], sample.labels["destination_workload"])
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "istio_tcp_connections_opened_total"}


def health(text: str) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("fastmesh_")}


# ---------------------------------------------------------------- upstream and client faults


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """An address on 127.0.0.1 that never answers a SYN: a listener whose accept queue
    (backlog 0) one never-accepted connection fills, so the kernel drops new SYNs."""
    with listening_socket(backlog=0) as hole, socket.socket() as filler:
        filler.connect(hole.getsockname())
        yield hole.getsockname()


REQUEST, ANSWER = random_bytes(MiB), random_bytes(MiB)


def reset_mid_stream(conn: socket.socket) -> None:
    """Reads REQUEST, answers ANSWER, and once the client says it has it all, aborts."""
    assert read_exactly(conn, len(REQUEST)) == REQUEST
    conn.sendall(ANSWER)
    conn.recv(1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed by Upstream: RST


def service(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def test_refused_black_holed_and_reset_connections_under_load_end_with_istios_flags(upstream, sidecar):
    good, resetting = upstream(echo), upstream(reset_mid_stream)
    with black_hole() as unanswered:
        targets = {"echo": good.address, "resetting": resetting.address, "refused": ("127.0.0.1", free_port()),
                   "unanswered": unanswered}
        running = sidecar(SidecarConfig(
            listeners=[ListenerConfig.to_upstreams(LOOPBACK_ANY_PORT, [address], OUTBOUND, service(name),
                                                   connect_timeout=0.5) for name, address in targets.items()],
            admin=None, metrics=LOOPBACK_ANY_PORT, node_metadata=RATINGS_V2, reporting_duration=LONG_REPORTING))
        at = dict(zip(targets, running.listeners))
        load = Load(at["echo"])
        load.wait_halfway()

        with socket.create_connection(at["resetting"], timeout=TIMEOUT) as client:  # UC
            client.sendall(REQUEST)
            assert read_exactly(client, len(ANSWER)) == ANSWER
            client.sendall(b"!")
            assert read_to_end(client) == (0, "reset")
        gives_up = socket.create_connection(at["echo"], timeout=TIMEOUT)  # DC: the client resets mid-stream
        gives_up.sendall(REQUEST)
        assert read_exactly(gives_up, len(REQUEST)) == REQUEST
        abort(gives_up)
        for name in ("refused", "unanswered"):  # UF: closed at once, before a byte of the client's is read
            with socket.create_connection(at[name], timeout=TIMEOUT) as client:
                client.sendall(b"hello?")
                assert read_to_end(client)[0] == 0
        load.assert_exact()

    expected = {
        (service("echo"), "-"): (4, 4, load.sent, load.sent),
        (service("echo"), "DC"): (1, 1, len(REQUEST), len(REQUEST)),
        (service("resetting"), "UC"): (1, 1, len(REQUEST) + 1, len(ANSWER)),
        (service("refused"), "UF"): (1, 1, 0, 0),
        (service("unanswered"), "UF"): (1, 1, 0, 0),
    }
    assert counts_when(lambda: running.scrape()[1], expected.__eq__) == expected
    counters = health(running.scrape()[1])
    assert (counters["fastmesh_upstream_connect_failures_total"],
            counters["fastmesh_upstream_connect_timeouts_total"],
            counters["fastmesh_resets_propagated_total"],
            counters["fastmesh_active_connections"]) == (1, 1, 2, 0)


# ---------------------------------------------------------------- a peer sidecar killed


def stream_until_the_peer_goes(conn: socket.socket) -> int:
    """A server that streams after the client's first line until the connection breaks."""
    conn.recv(64)
    chunk, written = random_bytes(1 << 16), 0
    try:
        while True:
            conn.sendall(chunk)
            written += len(chunk)
    except OSError:
        return written


@pytest.mark.parametrize("transport", ["mtls", "plaintext"])
def test_a_peer_sidecar_killed_mid_stream(transport, tmp_path, serve, upstream, sidecar, mesh_certs):  # noqa: F811
    # Over mTLS the peer's kernel ends the stream with a FIN and no close_notify: a
    # truncation, which the client is told of as a reset. In plaintext that FIN is all
    # there is: the client sees a clean end of stream, short of what the app wrote, and
    # only the application's own framing can tell it was cut.
    mtls = transport == "mtls"
    app = upstream(stream_until_the_peer_goes)
    inbound = serve(app.address, "--direction", "inbound", *(
        ("--certs", str(mesh_certs.identity("default", "mongodb")), "--peer-authentication", "STRICT")
        if mtls else ()))
    outbound = sidecar(one_listener(
        LOOPBACK_ANY_PORT, [inbound.listen], OUTBOUND, MONGODB_SERVICE, mesh_peer=mtls, admin=None,
        metrics=LOOPBACK_ANY_PORT, node_metadata=RATINGS_V2, reporting_duration=LONG_REPORTING,
        certs=mesh_certs.identity("default", "bookinfo-ratings-v2") if mtls else None))
    with socket.create_connection(outbound.listen, timeout=TIMEOUT) as client:
        client.sendall(b"stream\n")
        read_exactly(client, 2 * MiB)  # mid-stream
        inbound.process.kill()
        assert inbound.process.wait(TIMEOUT) == -signal.SIGKILL
        rest, end = read_to_end(client)
    assert end == ("reset" if mtls else "eof")
    (written,) = app.wait(1)
    assert 2 * MiB + rest <= written  # what was in the dead sidecar's hands is gone
    with socket.create_connection(outbound.listen, timeout=TIMEOUT) as client:  # the peer is gone: UF
        assert read_to_end(client)[0] == 0

    cut, refused = (MONGODB_SERVICE, "UC" if mtls else "-"), (MONGODB_SERVICE, "UF")
    counts = counts_when(lambda: outbound.scrape()[1], lambda c: len(c) == 2 and all(v[1] == 1 for v in c.values()))
    assert counts.pop(refused) == (1, 1, 0, 0)
    opened, closed, received, sent = counts.pop(cut)
    assert (opened, closed, received, counts) == (1, 1, len(b"stream\n"), {})
    if mtls:  # what the relay had written and the client not yet read went with the reset
        assert sent >= 2 * MiB + rest
    else:
        assert sent == 2 * MiB + rest
    stats = outbound.sidecar.relay.engine.stats()
    # The dead sidecar's kernel ends the stream with a FIN (over mTLS a truncation: no
    # close_notify) or, if it held unread bytes, a reset: either way the client got a reset.
    if mtls:
        assert stats["tls_truncated"] <= 1 and stats["resets_propagated"] >= 1
    else:
        assert stats["tls_truncated"] == 0


# ---------------------------------------------------------------- SIGTERM: drain


def listening(port: int) -> bool:
    """Whether anything listens on 127.0.0.1:port, asked without connecting to it."""
    return subprocess.run(["ss", "-ltnH", f"sport = {port}"], check=False, capture_output=True, text=True,
                          timeout=10).stdout.strip() != ""


STUCK = 100  # what the connection that never finishes sends (and gets back) before the drain


def drained_under_load(address: tuple[str, int], begin_stop: Callable[[], None]) -> tuple[int, int]:
    """Good clients mid-stream and one connection that never finishes, then `begin_stop()`.
    The clients finish within the drain with every byte; the stuck one is reset at its end.
    Returns the connections and the bytes each way the relay must have counted."""
    load = Load(address)
    stuck = socket.create_connection(address, timeout=TIMEOUT)
    stuck.sendall(b"s" * STUCK)
    assert read_exactly(stuck, STUCK) == b"s" * STUCK
    load.wait_halfway()
    begin_stop()
    wait_until(lambda: not listening(address[1]))  # no new connection from here on
    load.assert_exact()
    with stuck:
        assert read_to_end(stuck) == (0, "reset")
    return len(load.payloads) + 1, load.sent + STUCK


def test_sigterm_under_load_drains_exact_bytes_resets_the_rest_and_exits_0(serve, upstream):  # noqa: F811
    proxy = serve(upstream(echo).address, "--drain-timeout", "3s")
    connections, moved = drained_under_load(proxy.listen, lambda: proxy.process.send_signal(signal.SIGTERM))
    assert proxy.process.wait(TIMEOUT) == 0
    # The last word of `serve`: the totals after the engine's final read, every connection counted.
    assert f"stopped after {connections} connection(s), {moved} bytes in, {moved} bytes out" in proxy.output()


def test_the_report_at_stop_holds_every_connection_of_the_drain(upstream, sidecar):
    # A scrape cannot see the report made at stop (the metrics port closes right after it;
    # nothing is pushed), so it is read where an embedding program reads it: the stopped
    # sidecar's telemetry, as its metrics port would have rendered it.
    running = sidecar(one_listener(LOOPBACK_ANY_PORT, [upstream(echo).address], OUTBOUND, MONGODB_SERVICE,
                                   admin=None, metrics=LOOPBACK_ANY_PORT, node_metadata=RATINGS_V2,
                                   reporting_duration=LONG_REPORTING))
    stopping = threading.Thread(target=running.stop, kwargs={"drain_timeout": 3.0})
    connections, moved = drained_under_load(running.listen, stopping.start)
    stopping.join(TIMEOUT)
    assert not running.loop.is_running()
    text = TcpSeriesRenderer(running.sidecar.telemetry).render(openmetrics=False).decode()
    assert tcp_counts(text) == {(MONGODB_SERVICE, "-"): (connections, connections, moved, moved)}


# ---------------------------------------------------------------- SIGHUP reload


def test_sighup_reload_under_load_reroutes_new_connections_and_keeps_every_open_byte(tmp_path, upstream):
    v1, v2 = upstream(echo), upstream(tagging(b"v2:"))
    listen, admin = free_port(), free_port()
    path, log = tmp_path / "mesh.yaml", tmp_path / "serve.log"
    path.write_text(reload_config(listen, admin, [v1, v2], "v1"))
    with serving(log, path) as process:
        wait_until(lambda: _answers(listen))
        load = Load(("127.0.0.1", listen))
        load.wait_halfway()
        # The same size, inode and mtime: the file watcher sees no change, only SIGHUP says so.
        before = path.stat()
        path.write_text(reload_config(listen, admin, [v1, v2], "v2"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: routed_subset(admin) == "v2")
        assert ask(listen) == b"v2:?"
        load.assert_exact()  # the open connections kept v1, the echo, to the end
    assert "config reloaded (SIGHUP): 1 listener(s)" in log.read_text()


# ---------------------------------------------------------------- certificate rotation


@dataclass
class RotatingPair:
    """An mTLS sidecar pair, each side's certificates in a directory of its own to rotate."""

    inbound: Any
    outbound: Any
    server_certs: Path
    client_certs: Path

    def rotate(self, mesh_certs: Any) -> None:
        """New sets in place on both sides, as Kubernetes rotates them; back once both serve."""
        ca.issue(mesh_certs.root, "default", "mongodb", self.server_certs)
        ca.issue(mesh_certs.root, "default", "bookinfo-ratings-v2", self.client_certs)
        wait_until(lambda: (self.inbound.sidecar.certificates.rotations,
                            self.outbound.sidecar.certificates.rotations) == (1, 1))


@pytest.fixture
def rotating_pair(upstream, sidecar, mesh_certs, tmp_path) -> RotatingPair:
    server_certs = copy_identity(mesh_certs.identity("default", "mongodb"), tmp_path / "mongodb")
    client_certs = copy_identity(mesh_certs.identity("default", "bookinfo-ratings-v2"), tmp_path / "ratings")
    inbound = sidecar(one_listener(LOOPBACK_ANY_PORT, [upstream(echo).address], INBOUND, MONGODB_SERVICE,
                                   admin=None, metrics=None, node_metadata=MONGODB_V1, certs=server_certs,
                                   peer_authentication="STRICT"))
    outbound = sidecar(one_listener(LOOPBACK_ANY_PORT, [inbound.listen], OUTBOUND, MONGODB_SERVICE, mesh_peer=True,
                                    admin=None, metrics=None, node_metadata=RATINGS_V2, certs=client_certs))
    return RotatingPair(inbound, outbound, server_certs, client_certs)


def test_certificate_rotation_on_both_sidecars_under_load(rotating_pair, mesh_certs):
    pair = rotating_pair
    first = serial_seen(pair.inbound.listen, pair.client_certs, mesh_certs.root)
    load = Load(pair.outbound.listen)
    load.wait_halfway()
    pair.rotate(mesh_certs)
    assert serial_seen(pair.inbound.listen, pair.client_certs, mesh_certs.root) != first  # new handshakes: new set
    load.assert_exact()  # the connections opened before the rotation, to the end, none cut
    assert (pair.inbound.sidecar.relay.engine.stats()["tls_truncated"],
            pair.outbound.sidecar.relay.engine.stats()["tls_truncated"]) == (0, 0)


def test_new_connections_through_the_pair_after_rotation_keep_every_byte(rotating_pair, mesh_certs):
    before = Load(rotating_pair.outbound.listen, clients=1, size=MiB)  # leaves a session to resume
    before.assert_exact()
    rotating_pair.rotate(mesh_certs)
    after = Load(rotating_pair.outbound.listen, clients=2, size=MiB)
    after.assert_exact()


# ---------------------------------------------------------------- fd exhaustion


def lowest_free_fd(pid: int) -> int:
    """The lowest descriptor number the process has not open: a limit there leaves it none."""
    open_fds = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(open_fds) + 1)) - open_fds)


FLOOD = 8  # connections that arrive while the sidecar has no descriptor left


def test_fd_exhaustion_under_load_backs_off_and_serves_everyone_once_fds_return(serve, upstream):  # noqa: F811
    proxy = serve(upstream(echo).address)
    load = Load(proxy.listen, hold_open=True)  # held open: no descriptor is given back meanwhile
    load.wait_halfway()
    pid = proxy.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid), limits[1]))
    try:
        flood = [socket.create_connection(proxy.listen, timeout=TIMEOUT) for _ in range(FLOOD)]  # queued
        for i, client in enumerate(flood):
            client.sendall(b"flood %d\n" % i)
            client.shutdown(socket.SHUT_WR)
        load.resume()
        load.wait_echoed()  # the second halves crossed a relay without a descriptor to spare
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    for i, client in enumerate(flood):  # accepted once descriptors came back, each one whole
        with client:
            assert client.recv(64, socket.MSG_WAITALL) == b"flood %d\n" % i
    load.assert_exact()
    stats = proxy.stats()
    assert stats["engine"]["accept_errors"] > 0 and stats["engine"]["accept_paused"] > 0
    assert stats["engine"]["connections_accepted"] == len(load.payloads) + FLOOD
    assert stats["totals"].get("closed_local_error", 0) == 0  # none was given up on
    assert proxy.process.poll() is None
    assert proxy.stop() == 0


# ---------------------------------------------------------------- loss and delay


def impair(namespace: str, device: str) -> str:
    """5% loss and 20 ms delay on what reaches `device` in `namespace`: tc netem. A kernel
    without netem (this machine's: CONFIG_NET_SCH_NETEM unset) gets the nearest it has: 5%
    of incoming packets dropped at random by iptables, and tbf's rate limit queueing
    outgoing ones (up to 50 ms). Returns what was used."""
    tc = (IP, "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root")
    netem = subprocess.run([*tc, "netem", "loss", "5%", "delay", "20ms"], check=False, capture_output=True,
                           text=True, timeout=60)
    if netem.returncode == 0:
        return "netem"
    assert "unknown" in netem.stderr, netem.stderr
    sh(IP, "netns", "exec", namespace, "iptables", "-A", "INPUT", "-i", device, "-m", "statistic", "--mode",
       "random", "--probability", "0.05", "-j", "DROP")
    sh(*tc, "tbf", "rate", "40mbit", "burst", "32kb", "latency", "50ms")
    return "iptables-statistic+tbf"


def packets_lost(namespace: str, device: str, how: str) -> int:
    """What `impair` dropped so far: netem's count, or the iptables rule's."""
    if how == "netem":
        shown = sh(IP, "netns", "exec", namespace, "tc", "-s", "qdisc", "show", "dev", device).stdout
        return int(re.search(r"dropped (\d+)", shown).group(1))
    rules = sh(IP, "netns", "exec", namespace, "iptables", "-L", "INPUT", "-v", "-x", "-n").stdout
    (packets,) = [line.split()[0] for line in rules.splitlines() if "statistic" in line]
    return int(packets)


@contextlib.contextmanager
def serving_in(namespace: str, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`fastmesh serve` in a network namespace, on this run's engine (the environment's),
    its output in `log`, from the moment it logs that it is ready."""
    with log.open("w") as output:
        process = subprocess.Popen([IP, "netns", "exec", namespace, sys.executable, "-m", "fastmesh", "serve", *args],
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            return " ready: " in log.read_text()

        wait_until(ready)
        yield process
    finally:
        stop_process(process)


TESTS = Path(__file__).resolve().parent


def in_namespace(namespace: str, role: str, *args: str, **popen: Any) -> subprocess.Popen:
    """This file run as a script in `namespace` (see the end of it)."""
    return subprocess.Popen([IP, "netns", "exec", namespace, sys.executable, __file__, role, *args],
                            cwd=TESTS, text=True, **popen)


@pytest.mark.skipif(bool(netns_unavailable()), reason=netns_unavailable() or "-")
def test_a_sidecar_pair_across_a_lossy_slow_link_keeps_every_byte_and_counts_it(joined_netns, mesh_certs, tmp_path):
    pod, peer = joined_netns
    links = [(pod, veth_of(pod)), (peer, veth_of(peer))]
    (how,) = {impair(namespace, device) for namespace, device in links}
    app = in_namespace(peer, "echo", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert app.stdout is not None
        app_port = int(app.stdout.readline())
        # The default reporting duration (15 s): each connection is reported at its close, its
        # exchange settled however late loss made it (a periodic report may not wait for a peer).
        common = ("--destination-service", MONGODB_SERVICE, "--metrics", "127.0.0.1:15090", "--no-admin")
        inbound = ("--direction", "inbound", "--listen", f"{PEER}:15006", "--upstream", f"127.0.0.1:{app_port}",
                   "--certs", str(mesh_certs.identity("default", "mongodb")), "--peer-authentication", "STRICT",
                   "--node-metadata", str(EXAMPLES / "mongodb-v1.yaml"), *common)
        outbound = ("--listen", "127.0.0.1:15001", "--upstream", f"{PEER}:15006", "--mesh-peer",
                    "--certs", str(mesh_certs.identity("default", "bookinfo-ratings-v2")),
                    "--node-metadata", str(EXAMPLES / "ratings-v2.yaml"), *common)
        with serving_in(peer, tmp_path / "inbound.log", *inbound), serving_in(pod, tmp_path / "outbound.log", *outbound):
            clients = in_namespace(pod, "clients", "127.0.0.1", "15001", stdout=subprocess.PIPE)
            out, _ = clients.communicate(timeout=120)
            assert clients.returncode == 0
            report = json.loads(out)
            assert report["errors"] == [] and report["received"] == report["sent"]
            moved = sum(size for size, _, _ in report["sent"])
            expected = {(MONGODB_SERVICE, "-"): (len(report["sent"]), len(report["sent"]), moved, moved)}
            for namespace, reporter in ((pod, "source"), (peer, "destination")):  # both reporters, to the byte
                assert counts_when(lambda ns=namespace: scrape_pod(ns), expected.__eq__) == expected
                assert peers(scrape_pod(namespace)) == {(reporter, "ratings-v2", "mongodb-v1")}
    finally:
        stop_process(app)
    assert all(packets_lost(namespace, device, how) > 0 for namespace, device in links)  # loss both ways


def veth_of(namespace: str) -> str:
    (device,) = [line.split(":")[1].strip().split("@")[0] for line in
                 sh(IP, "-o", "-n", namespace, "link", "show", "type", "veth").stdout.splitlines()]
    return device


# ---------------------------------------------------------------- as a script, in a namespace


def _echo_server() -> None:
    server = Upstream(echo)
    print(server.address[1], flush=True)
    sys.stdin.read()  # until the test closes it


def _clients(host: str, port: int) -> None:
    load = Load((host, port), clients=4, size=MiB)
    load.resume()
    errors: list[str] = []
    try:
        load.assert_exact()
    except AssertionError as exc:
        errors.append(repr(exc)[:2000])
    print(json.dumps({"errors": errors,
                      "sent": [[len(p), sha256(p), "eof"] for p in load.payloads],
                      "received": [list(load.results.get(i, ())) for i in range(len(load.payloads))]}))


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        _echo_server()
    else:
        _clients(sys.argv[2], int(sys.argv[3]))
