"""`python -m fastmesh serve` as a user runs it: relaying, admin endpoints,
signals, a dead upstream, and bad command lines."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (EXPECTED_IMPLEMENTATION, assert_closed_by_relay, free_port, random_bytes, read_all, sha256,
                      wait_until)
from fastmesh.admin import MAX_HTTP_CONNECTIONS
from fastmesh.cli import build_parser

MiB = 1 << 20


class Serve:
    """A `fastmesh serve` subprocess with its admin endpoint on a free port."""

    def __init__(self, tmp_path: Path, upstream: tuple[str, int], *extra: str, log: Path | None = None) -> None:
        self.listen = ("127.0.0.1", free_port())
        self.admin = ("127.0.0.1", free_port())
        self.metrics = ("127.0.0.1", free_port())
        self.log_path = log or tmp_path / f"serve-{self.listen[1]}.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "fastmesh", "serve",
                "--listen", "%s:%d" % self.listen,
                "--upstream", "%s:%d" % upstream,
                "--admin", "%s:%d" % self.admin,
                "--metrics", "%s:%d" % self.metrics,
                *extra,
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def get(self, path: str, address: tuple[str, int] | None = None) -> tuple[int, str]:
        """GET `path` from the admin port, or from `address` (say, the metrics port)."""
        url = "http://%s:%d%s" % (*(address or self.admin), path)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if self.get("/ready") == (200, "LIVE\n"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("fastmesh serve did not become ready:\n" + self.output())

    def stats(self) -> dict:
        status, body = self.get("/stats")
        assert status == 200
        return json.loads(body)

    def output(self) -> str:
        if not self.log_path.is_file():
            return f"(output went to {self.log_path})"
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(30)
        self.log.close()
        return code


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(upstream: tuple[str, int], *extra: str, log: Path | None = None) -> Serve:
        process = Serve(tmp_path, upstream, *extra, log=log)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


def test_admin_connections_shows_each_open_connection_and_its_bytes(serve, upstream):
    release = threading.Event()

    def hold(conn: socket.socket) -> None:
        conn.sendall(conn.recv(5) + b"!")
        release.wait(20)

    proxy = serve(upstream(hold).address)
    try:
        with socket.create_connection(proxy.listen) as client:
            client.sendall(b"hello")
            assert client.recv(6, socket.MSG_WAITALL) == b"hello!"
            status, body = proxy.get("/connections")
            assert status == 200
            (connection,) = json.loads(body)
            assert {k: connection[k] for k in ("listener_id", "cluster", "endpoint", "state")} == {
                "listener_id": 0, "cluster": 0, "endpoint": 0, "state": "open"}
            assert connection["downstream"] == {"eof": False, "shut": False, "pending": 0, "rx": 5, "tx": 5}
            assert connection["upstream"] == {"eof": False, "shut": False, "pending": 0, "rx": 6, "tx": 6}
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while proxy.get("/connections")[1] != "[]" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.get("/connections") == (200, "[]")


def test_serve_relays_exact_bytes_and_exits_cleanly_on_sigterm(serve, upstream):
    response = random_bytes(3 * MiB)

    def answer(conn: socket.socket) -> tuple[int, str]:
        received = read_all(conn)
        conn.sendall(response)
        return received

    server = upstream(answer)
    proxy = serve(server.address)
    request = random_bytes(5 * MiB)
    with socket.create_connection(proxy.listen) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(response), sha256(response))
    assert server.wait(1) == [(len(request), sha256(request))]

    stats = proxy.stats()
    assert stats["implementation"] == EXPECTED_IMPLEMENTATION
    assert proxy.stop(signal.SIGTERM) == 0
    output = proxy.output()
    assert "stopped after 1 connection(s), %d bytes in, %d bytes out" % (len(request), len(response)) in output


def test_logs_on_a_full_disk_change_nothing_else(serve, upstream):
    # stdout and stderr on a device where every write fails with ENOSPC, like a
    # log volume that filled up: bytes, metrics and a clean exit all the same.
    request = random_bytes(MiB)
    server = upstream(lambda conn: (conn.sendall(request), conn.shutdown(socket.SHUT_WR), read_all(conn))[2])
    proxy = serve(server.address, log=Path("/dev/full"))
    with socket.create_connection(proxy.listen) as client:
        assert read_all(client) == (len(request), sha256(request))
        client.sendall(request[:1000])
    assert server.wait(1) == [(1000, sha256(request[:1000]))]
    status, body = proxy.get("/stats/prometheus", proxy.metrics)
    assert status == 200 and "istio_tcp_connections_opened_total{" in body
    assert proxy.stop() == 0


@pytest.mark.parametrize("hostile", [
    random_bytes(4096),                                        # not HTTP at all
    b"GET /stats HTTP/1.1\r\nX: " + b"a" * 200_000 + b"\r\n\r\n",  # a header far too long
    b"GET /" + b"%" * 100 + b" HTTP/1.1\r\nContent-Length: -1\r\n\r\n",  # nonsense request line and length
], ids=["binary", "huge-header", "bad-length"])
def test_hostile_bytes_on_the_admin_and_metrics_ports_are_refused_and_serving_goes_on(serve, upstream, hostile):
    server = upstream(lambda conn: None)
    proxy = serve(server.address)
    for address in (proxy.admin, proxy.metrics):
        with socket.create_connection(address, timeout=10) as client:
            try:
                client.sendall(hostile)
                answer = client.recv(64)
            except ConnectionResetError:  # refused before reading it all
                answer = b""
            assert answer == b"" or re.match(rb"HTTP/1\.[01] 400 ", answer), answer
    assert proxy.get("/ready") == (200, "LIVE\n")
    assert proxy.get("/stats/prometheus", proxy.metrics)[0] == 200
    assert proxy.stop() == 0


def test_a_flood_of_idle_connections_to_the_metrics_port_is_capped_and_counted(serve, upstream):
    # Idle connections past the cap are closed at once instead of holding descriptors
    # the data plane needs; once they go, scrapes are served again.
    server = upstream(lambda conn: conn.sendall(b"relayed"))
    proxy = serve(server.address)
    flood = [socket.create_connection(proxy.metrics) for _ in range(MAX_HTTP_CONNECTIONS)]
    try:
        time.sleep(0.3)  # all accepted
        for _ in range(10):
            with socket.create_connection(proxy.metrics) as sock:
                assert_closed_by_relay(sock)  # turned away without a byte
        with socket.create_connection(proxy.listen, timeout=10) as client:  # the data plane is untouched
            assert client.recv(100) == b"relayed"
        status, body = proxy.get("/stats")
        assert json.loads(body)["http_connections_refused"]["127.0.0.1:%d" % proxy.metrics[1]] == 10
    finally:
        for sock in flood:
            sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert proxy.get("/stats/prometheus", proxy.metrics)[0] == 200
            break
        except OSError:  # the closes may not all be seen yet
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert proxy.stop() == 0
    assert "10 connection(s) refused so far" not in proxy.output()  # logged at the 1st and every 1000th
    assert "1 connection(s) refused so far, %d already open" % MAX_HTTP_CONNECTIONS in proxy.output()


def test_sigint_stops_cleanly_and_closes_the_listener(serve, upstream):
    server = upstream(lambda conn: None)
    proxy = serve(server.address)
    assert proxy.stop(signal.SIGINT) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.listen, timeout=5)


# serve with the signals named in argv[1] sent to itself in the middle of Sidecar.start(), while it
# binds: as a pod deleted, or a reload asked for, just as its sidecar comes up.
SIGNALLED_WHILE_STARTING = """\
import os, signal, sys
from fastmesh import cli, sidecar

started = sidecar.Sidecar.start

async def start(self):
    for name in sys.argv[1].split(","):
        os.kill(os.getpid(), getattr(signal, name))
    await started(self)

sidecar.Sidecar.start = start
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_sigterm_while_starting_stops_it_gracefully_once_started_and_a_sighup_is_ignored(upstream):
    server = upstream(lambda conn: None)
    result = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_STARTING, "SIGHUP,SIGTERM", "serve",
                             "--listen", f"127.0.0.1:{free_port()}", "--upstream", "%s:%d" % server.address,
                             "--no-admin", "--no-metrics"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # not -1 or -15, the default actions of SIGHUP and SIGTERM
    assert "SIGHUP ignored: serve reloads only config files (-c)" in result.stderr, result.stderr
    assert "stopped after 0 connection(s)" in result.stderr, result.stderr


def test_a_sighup_while_starting_reloads_the_config_files_once_started(tmp_path, upstream):
    from test_reload import config as routed_config

    server = upstream(lambda conn: None)
    path, log = tmp_path / "mesh.yaml", tmp_path / "serve.log"
    path.write_text(routed_config(free_port(), free_port(), [server], "v1"))
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-c", SIGNALLED_WHILE_STARTING, "SIGHUP", "serve", "-c",
                                    str(path)], stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "config reloaded (SIGHUP)" in log.read_text() or process.poll() is not None)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
    assert code == 0 and "config reloaded (SIGHUP)" in log.read_text(), log.read_text()


def test_dead_upstream_closes_the_client_is_logged_and_counted_and_serving_goes_on(serve, upstream):
    dead = ("127.0.0.1", free_port())
    proxy = serve(dead)
    for _ in range(2):
        with socket.create_connection(proxy.listen) as client:
            client.sendall(b"hello?")
            assert_closed_by_relay(client)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = proxy.stats()
        if stats["totals"].get("closed_connect_failed") == 2:
            break
        time.sleep(0.1)
    assert stats["engine"]["connect_failures"] == 2
    assert stats["totals"]["closed_connect_failed"] == 2
    assert proxy.process.poll() is None
    assert proxy.stop() == 0
    assert "connect failed to 127.0.0.1:%d (ECONNREFUSED: Connection refused)" % dead[1] in proxy.output()


def test_config_dump_shows_the_effective_configuration(serve, upstream):
    server = upstream(lambda conn: None)
    proxy = serve(server.address, "--workers", "2", "--connect-timeout", "750ms")
    status, body = proxy.get("/config_dump")
    assert status == 200
    config = json.loads(body)
    assert config["engine"]["workers"] == 2
    exchange = config["listeners"][0].pop("exchange")
    assert (exchange["role"], exchange["plaintext"]) == ("outbound", False)  # over mTLS only, by ALPN
    assert config["identity"] is None  # no --certs
    assert config["listeners"] == [
        {
            "address": "127.0.0.1:%d" % proxy.listen[1],
            "direction": "outbound",
            "destination_service": "",
            "clusters": [{
                "name": "upstream", "service": "", "endpoints": ["%s:%d" % server.address], "mesh_peers": [False],
                "load_balancer": "ROUND_ROBIN", "max_connections": 0, "connect_timeout_seconds": 0.75,
                "tls": "DISABLE",
            }],
            "routes": [{"cluster": "upstream", "weight": 1}],
            "tls": {"mtls": "DISABLE", "handshake_timeout_seconds": 10.0},
        }
    ]
    assert proxy.stop() == 0


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "node-metadata"


@pytest.mark.parametrize("transport", ["mtls", "plaintext-exchange"])
def test_two_serve_processes_learn_each_others_identity(serve, upstream, mesh_certs, transport):
    def hello(conn: socket.socket) -> None:
        conn.sendall(b"hello " + conn.recv(64))

    def certs(account: str) -> tuple[str, ...]:
        if transport == "mtls":
            return ("--certs", str(mesh_certs.identity("default", account)), "--peer-authentication", "STRICT")
        return ("--plaintext-exchange",)

    server = upstream(hello)
    common = ("--destination-service", "mongodb.default.svc.cluster.local", "--reporting-duration", "500ms")
    inbound = serve(server.address, "--direction", "inbound",
                    "--node-metadata", str(EXAMPLES / "mongodb-v1.yaml"), *common, *certs("mongodb"))
    outbound = serve(inbound.listen, "--mesh-peer", "--node-metadata", str(EXAMPLES / "ratings-v2.yaml"), *common,
                     *certs("bookinfo-ratings-v2"))
    with socket.create_connection(outbound.listen) as client:
        client.sendall(b"world\n")
        assert client.recv(64) == b"hello world\n"
    for proxy, peer_label in ((outbound, 'destination_workload="mongodb-v1"'),
                              (inbound, 'source_workload="ratings-v2"')):
        deadline = time.monotonic() + 20
        while True:
            text = proxy.get("/stats/prometheus", proxy.metrics)[1]
            opened = [line for line in text.splitlines() if line.startswith("istio_tcp_connections_opened_total")]
            if opened or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(opened) == 1 and peer_label in opened[0] and opened[0].endswith(" 1"), opened
        if transport == "mtls":
            assert 'source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2"' in opened[0]
            assert 'destination_principal="spiffe://cluster.local/ns/default/sa/mongodb"' in opened[0]
        events = proxy.stats()["metadata_exchange"]
        assert (events["peer_found"], events["header_not_found"], events["alpn_protocol_found"]) == (1, 0, 1)
    assert json.loads(outbound.get("/config_dump")[1])["listeners"][0]["exchange"]["role"] == "outbound"
    if transport == "mtls":
        assert json.loads(inbound.get("/config_dump")[1])["identity"]["spiffe_id"] == \
            "spiffe://cluster.local/ns/default/sa/mongodb"
    assert outbound.stop() == 0 and inbound.stop() == 0


def test_mesh_peer_on_an_inbound_listener_is_refused():
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--direction", "inbound",
                     "--mesh-peer", "--no-admin", "--no-metrics")
    assert result.returncode == 1
    assert "--mesh-peer is for outbound listeners" in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmesh", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--upstream", "127.0.0.1:1"], "serve needs --listen and --upstream, or -c/--config FILE"),
        (["serve", "-c", "x.yaml", "--listen", ":1"], "give either -c/--config or --listen and --upstream"),
        (["serve", "--listen", "nonsense", "--upstream", "127.0.0.1:1"], "'nonsense': expected HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1"], "port 99999 is out of range"),
        (["serve", "--listen", ":1", "--upstream", "::1:80"], "write IPv6 addresses as [ADDRESS]:PORT"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--workers", "0"], "'0' is not a positive whole number"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--connect-timeout", "5"], "'5' is not a duration"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--direction", "sideways"], "invalid choice: 'sideways'"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--exchange-max-payload", "-1"],
         "'-1' is not a positive whole number"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--exchange-timeout", "soon"], "'soon' is not a duration"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--group", "1337"], "--group goes with --user"),
        (["serve", "--listen", ":1", "--upstream", "h:1", "--groups", "2000"], "--groups goes with --user"),
    ],
)
def test_bad_command_lines_get_precise_errors(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_two_settings_on_one_address_are_refused_before_binding_naming_both():
    port = free_port()
    result = run_cli("serve", "--listen", "127.0.0.1:%d" % port, "--upstream", "127.0.0.1:1",
                     "--admin", "127.0.0.1:%d" % port, "--metrics", "0.0.0.0:%d" % port)
    assert result.returncode == 1
    errors = [line.split(" ERROR fastmesh: ", 1)[1] for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors == [f"--metrics: 0.0.0.0:{port} overlaps 127.0.0.1:{port}, --listen's address: only one of them "
                      "can listen",
                      f"--admin: 127.0.0.1:{port} is also --listen's address: only one of them can listen"]


def test_a_busy_listen_address_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("serve", "--listen", "127.0.0.1:%d" % port, "--upstream", "127.0.0.1:1",
                         "--no-admin", "--no-metrics")
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:%d: Address already in use" % port in result.stderr


def test_an_unresolvable_upstream_is_a_clear_error():
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--upstream", "no-such-host.invalid:80",
                     "--no-admin", "--no-metrics")
    assert result.returncode == 1
    assert "cannot resolve 'no-such-host.invalid'" in result.stderr


def test_help_names_every_serve_option():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for option in ("--listen", "--upstream", "--workers", "--admin", "--connect-timeout", "--drain-timeout",
                   "--mesh-peer", "--no-exchange", "--exchange-max-payload", "--exchange-timeout",
                   "--exchange-detect-timeout"):
        assert option in result.stdout


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_usage() -> dict[str, set[str]]:
    """The options the README's usage block ("Using it") shows for each command: "" for
    fastmesh itself, "ca init" for a subcommand's; a command's indented lines continue it."""
    block = README.read_text().split("\n## Using it\n", 1)[1].split("```\n", 2)[1]
    shown: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        line = line.split("  #", 1)[0]  # a comment
        if line.startswith("python -m fastmesh"):
            line = line.removeprefix("python -m fastmesh")
            command = " ".join(itertools.takewhile(lambda word: re.fullmatch("[a-z]+(-[a-z]+)*", word), line.split()))
            shown.setdefault(command, set())
        assert command is not None and (line.startswith(" ") or not line), line
        shown[command] |= set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", line))
    return shown


def parser_usage() -> dict[str, tuple[list[set[str]], bool]]:
    """Each command argparse knows, walking every level of subcommands: its options (the
    option strings of each argument, --help left out) and whether it is a leaf."""
    found: dict[str, tuple[list[set[str]], bool]] = {}

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found[command] = ([set(a.option_strings) for a in parser._actions
                           if a.option_strings and not isinstance(a, argparse._HelpAction)], not subcommands)
        for action in subcommands:
            for name, subparser in action.choices.items():
                walk(subparser, f"{command} {name}".strip())

    walk(build_parser(), "")
    return found


def test_the_readmes_usage_block_shows_every_command_and_option_argparse_knows():
    shown, known = readme_usage(), parser_usage()
    commands = {command for command, (options, leaf) in known.items() if options or leaf}
    assert sorted(shown) == sorted(commands)
    for command in sorted(commands):
        options = known[command][0]
        missing = sorted(min(strings) for strings in options if not strings & shown[command])
        unknown = sorted(shown[command] - set().union(*options))
        assert (command, missing, unknown) == (command, [], [])


def test_serve_io_uring_batches_the_receives_and_sends_or_says_why_not(serve, upstream):
    def echo(conn: socket.socket) -> int:
        total = 0
        while chunk := conn.recv(65536):
            conn.sendall(chunk)
            total += len(chunk)
        return total

    rounds, messages = 200, [random_bytes(100 + i) for i in range(200)]
    server = upstream(echo)
    proxy = serve(server.address, "--io-uring")
    with socket.create_connection(proxy.listen) as client:
        for message in messages:  # request and answer, as redis-benchmark's clients do
            client.sendall(message)
            assert client.recv(len(message), socket.MSG_WAITALL) == message
    assert server.wait(1) == [sum(map(len, messages))]
    counts = [proxy.stats()["engine"][key] for key in ("io_uring_submissions", "io_uring_requests",
                                                         "io_uring_refused")]
    in_use = json.loads(proxy.get("/config_dump")[1])["engine"]["io_uring"]
    if EXPECTED_IMPLEMENTATION == "python":
        assert (in_use, counts) == (False, [0, 0, 0])
        assert ("io_uring asked for and not used, plain system calls instead: the Python engine makes plain "
                "system calls") in proxy.output()
        return
    assert in_use and "io_uring asked for" not in proxy.output()
    submissions, requests, refused = counts
    # Each round: the request's receive and send, the answer's receive and send, all through the ring.
    assert requests >= 4 * rounds and 0 < submissions <= requests and refused == 0
