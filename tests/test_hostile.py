"""Hostile input on every port, and least privilege (issue 13, items 3 and 5): slowloris
clients, stalled handshakes and frames, connection floods, YAML bombs, oversized and binary
files, malformed node metadata and certificates, what each port serves, and `serve --user`.

Covered elsewhere, and not repeated here: stalled and cut TLS handshakes in the engine
(test_tls_engine.py, test_bytes_that_are_not_a_good_handshake_are_refused_under_strict),
stalled and oversized exchange frames in the engine and at a sidecar
(test_exchange_engine.py, test_a_frame_that_cannot_be_trusted_resets_the_connection_and_leaks_nothing;
test_exchange_counters.py), floods at the engine's listener limit (test_listener_limit.py), a
broken certificate set refused on rotation while the old one serves (test_tls_sidecar.py,
test_new_certificates_serve_new_handshakes_while_open_connections_go_on), key files readable by
others (test_tls_sidecar.py, test_a_set_that_cannot_serve_is_refused_with_the_file_and_the_reason),
binary and oversized HTTP requests and a flood of idle HTTP connections (test_cli.py)."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import assert_closed_by_relay, free_port, random_bytes, sha256, wait_until
from test_cli import run_cli, serve  # noqa: F401 (fixture)
from test_exchange_counters import frame_header
from test_health import get
from test_listener_limit import echo_lines, refused, roundtrip
from test_tls_engine import CLIENT_HELLO_START

from fastmesh import bounded_yaml, ca
from fastmesh.addr import Address
from fastmesh.admin import HEADER_TIMEOUT
from fastmesh.certs import CertificateWatcher, load_identity

# How long a hostile client waits for the sidecar to close it before the test fails: well
# past every timeout under test (10 s for an HTTP request head, 1 s for handshakes and frames).
PATIENCE = 3 * HEADER_TIMEOUT


# ---------------------------------------------------------------- slowloris


class Slowloris(threading.Thread):
    """A client that sends `head` one byte every `pause` and then nothing (`head` empty:
    nothing at all), until the server closes the connection or PATIENCE runs out."""

    def __init__(self, address: tuple[str, int], head: bytes, pause: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(address, timeout=10)
        self.head, self.pause = head, pause
        self.closed_by_server = False
        self.answer = b""
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + PATIENCE
        for byte in itertools.chain(self.head, itertools.repeat(None)):
            if time.monotonic() > deadline:
                return
            try:
                if byte is not None:
                    self.sock.send(bytes([byte]))
                if select.select([self.sock], [], [], self.pause)[0]:
                    data = self.sock.recv(4096)
                    if not data:
                        self.closed_by_server = True
                        return
                    self.answer += data
            except (BrokenPipeError, ConnectionResetError):
                self.closed_by_server = True
                return

    def result(self) -> tuple[bool, bytes]:
        self.join(PATIENCE + 10)
        self.sock.close()
        return self.closed_by_server, self.answer


# A request head that never ends: a header value that grows a byte at a time.
ENDLESS_HEAD = b"GET /stats/prometheus HTTP/1.1\r\nHost: fastmesh\r\nX-Slow: " + b"a" * 200


def test_slowloris_on_the_metrics_admin_and_health_ports_is_closed_and_good_requests_go_on(serve, upstream):  # noqa: F811
    server = upstream(lambda conn: conn.sendall(b"relayed"))
    health = ("127.0.0.1", free_port())
    proxy = serve(server.address, "--health", f"{health[0]}:{health[1]}")
    ports = {"metrics": proxy.metrics, "admin": proxy.admin, "health": health}
    slow = {(name, kind): Slowloris(address, head) for name, address in ports.items()
            for kind, head in (("silent", b""), ("dribbling", ENDLESS_HEAD))}
    # Meanwhile every port answers good requests, and the relay relays.
    assert proxy.get("/stats/prometheus", proxy.metrics)[0] == 200
    assert proxy.get("/ready") == (200, "LIVE\n")
    assert proxy.get("/healthz/ready", health)[0] == 200
    with socket.create_connection(proxy.listen, timeout=10) as client:
        assert client.recv(100) == b"relayed"
    # Each slow connection is closed by the sidecar, without an answer.
    assert {key: client.result() for key, client in slow.items()} == {key: (True, b"") for key in slow}
    assert proxy.get("/stats/prometheus", proxy.metrics)[0] == 200
    assert proxy.stop() == 0


def dribble(address: tuple[str, int], payload: bytes, pause: float = 0.1) -> bytes:
    """Send `payload` a byte at a time, then the end of stream; what came back (an echo)."""
    with socket.create_connection(address, timeout=20) as client:
        for byte in payload:
            client.sendall(bytes([byte]))
            time.sleep(pause)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer


def echo_back(address: tuple[str, int], payload: bytes) -> str:
    """sha256 of what an echo upstream sent back for `payload`, sent whole."""
    with socket.create_connection(address, timeout=20) as client:
        return roundtrip(client, payload)


def test_slow_clients_are_relayed_and_stalled_handshakes_and_frames_are_cut_and_counted(serve, upstream,  # noqa: F811
                                                                                       mesh_certs):
    # A sidecar pair over mTLS: the outbound port, and the inbound one (PERMISSIVE, so that
    # plaintext clients with a partial frame reach its exchange too).
    app = upstream(echo_lines)
    inbound = serve(app.address, "--direction", "inbound", "--certs", str(mesh_certs.identity("default", "db")),
                    "--peer-authentication", "PERMISSIVE", "--plaintext-exchange",
                    "--tls-handshake-timeout", "1s", "--exchange-timeout", "1s")
    outbound = serve(inbound.listen, "--mesh-peer", "--certs", str(mesh_certs.identity("default", "app")))
    payload = b"slow but legitimate"
    slow = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for name, address in (("outbound", outbound.listen), ("inbound", inbound.listen)):
            slow[name] = [pool.submit(dribble, address, payload) for _ in range(3)]
        stalled = [socket.create_connection(inbound.listen, timeout=PATIENCE) for _ in range(3)]
        for client in stalled:
            client.sendall(CLIENT_HELLO_START)  # a handshake begun, never finished
        partial = socket.create_connection(inbound.listen, timeout=PATIENCE)
        partial.sendall(frame_header(100) + b"x" * 10)  # a frame begun, never finished
        good = random_bytes(1 << 20)
        for _ in range(5):  # good clients go on meanwhile, byte-exact
            assert echo_back(outbound.listen, good) == sha256(good)
        for client in (*stalled, partial):
            assert_closed_by_relay(client)
            client.close()
        # A slow client is a legitimate one: relayed whole (the idle timeout bounds a silent one).
        assert {name: [f.result() for f in futures] for name, futures in slow.items()} == {
            "outbound": [payload] * 3, "inbound": [payload] * 3}
    stats = inbound.stats()
    assert stats["engine"]["tls_error_timeout"] == 3
    assert stats["metadata_exchange"]["frame_timed_out"] == 1
    assert inbound.stop() == 0 and outbound.stop() == 0


def flooded(address: tuple[str, int]) -> bool:
    """A connection past the limit was reset without a byte (it may be before connect() returns)."""
    try:
        client = socket.create_connection(address, timeout=10)
    except ConnectionResetError:
        return True
    with client:
        return refused(client)


def test_a_flood_past_max_connections_is_refused_at_once_and_open_connections_keep_their_bytes(serve, upstream):  # noqa: F811
    server = upstream(echo_lines)
    proxy = serve(server.address, "--max-connections", "3")
    payload = random_bytes(256 * 1024)
    within = [socket.create_connection(proxy.listen, timeout=20) for _ in range(3)]
    try:
        for client in within:
            assert roundtrip(client, payload) == sha256(payload)
        assert [flooded(proxy.listen) for _ in range(50)] == [True] * 50
        for client in within:  # unharmed: the same connections, every byte back
            assert roundtrip(client, payload) == sha256(payload)
        assert server.accepted == 3  # not one of the flood reached the upstream
        assert proxy.stats()["engine"]["listener_overflows"] == 50
    finally:
        for client in within:
            client.close()
    assert proxy.stop() == 0


# ---------------------------------------------------------------- hostile files


def yaml_bomb(levels: int = 9) -> str:
    """Billion laughs: each anchor a list of nine aliases of the one before (9**9 strings)."""
    lines = ['    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def sidecar_document(listen: int, admin: int, node_metadata: str = "    NAME: app-0\n", target: int = 9) -> str:
    """A Sidecar with one inbound listener on 127.0.0.1:`listen` to the app on `target`."""
    return f"""\
apiVersion: fastmesh.io/v1alpha1
kind: Sidecar
metadata: {{name: app}}
spec:
  nodeMetadata:
{node_metadata}  inbound: [{{port: {listen}, bind: 127.0.0.1, targetPort: {target}}}]
  admin: 127.0.0.1:{admin}
  metrics: null
"""


HOSTILE_CONFIGS = {
    "billion-laughs": (lambda: sidecar_document(1, 2, yaml_bomb()),
                       "more than 1,000,000 nodes once its aliases are expanded"),
    "oversized": (lambda: sidecar_document(1, 2) + "#" * (bounded_yaml.MAX_BYTES + 1),
                  "larger than 4 MiB, the most fastmesh reads"),
    "nested-deep": (lambda: sidecar_document(1, 2, "    X: " + "[" * 200_000 + "]" * 200_000 + "\n"),
                    "nested more than 100 deep"),
    "binary": (lambda: "\udcff\udcfe\x00garbage", "not UTF-8 text (byte 0xff at offset 0)"),
}


def write_hostile(path: Path, case: str) -> str:
    """Put the case in `path` at once (as a ConfigMap update swaps it); the message it gets."""
    make, message = HOSTILE_CONFIGS[case]
    staged = path.with_suffix(".staged")
    staged.write_bytes(make().encode("utf-8", "surrogateescape"))
    os.replace(staged, path)
    return message


# Runs `python -m fastmesh ARGV` in a grandchild and prints its peak RSS (KiB). Not the child
# itself: a process forked from pytest keeps pytest's own peak in its ru_maxrss across exec.
MEASURED = textwrap.dedent("""
    import os, sys
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "fastmesh", *sys.argv[1:]])
    _, status, usage = os.wait4(pid, 0)
    print(usage.ru_maxrss)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def run_measured(tmp_path: Path, *args: str) -> tuple[int, str, float]:
    """`python -m fastmesh ARGS`: its exit status, its stderr and its peak RSS in MiB."""
    with (tmp_path / "stderr").open("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-c", MEASURED, *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=stderr, start_new_session=True, text=True)
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"{args} still running after 60 s")
        stderr.seek(0)
        return process.returncode, stderr.read(), int(out) / 1024


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_file_is_refused_in_one_line_in_bounded_memory_and_time(tmp_path, command, case):
    path = tmp_path / "mesh.yaml"
    message = write_hostile(path, case)
    code, stderr, peak_mib = run_measured(tmp_path, command, "-c", str(path))
    lines = stderr.splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].endswith(f"{path}: {message}"), stderr
    assert peak_mib < 300  # nothing was expanded or read whole (a bomb expanded takes gigabytes)


def test_a_hostile_config_on_reload_is_refused_and_the_old_one_keeps_serving(tmp_path, upstream):
    from test_reload import serving

    server = upstream(echo_lines)
    listen, admin = free_port(), free_port()
    path = tmp_path / "mesh.yaml"
    path.write_text(sidecar_document(listen, admin, target=server.address[1]))
    log = tmp_path / "serve.log"
    refusals = 0

    def refused_again(why: str, message: str) -> None:
        nonlocal refusals
        refusals += 1
        wait_until(lambda: log.read_text().count("config not reloaded") == refusals)
        assert log.read_text().splitlines()[-1].endswith(
            f"config not reloaded ({why}), the config in force keeps serving: {path}: {message}")

    with serving(log, path) as process:
        wait_until(lambda: dumped(admin) is not None)
        before = dumped(admin)
        for case in sorted(HOSTILE_CONFIGS):
            message = write_hostile(path, case)
            refused_again("a config file changed", message)
            process.send_signal(signal.SIGHUP)
            refused_again("SIGHUP", message)
            assert dumped(admin) == before
            assert echo_back(("127.0.0.1", listen), b"still relayed") == sha256(b"still relayed")
        moved = free_port()
        path.write_text(sidecar_document(moved, admin, target=server.address[1]))  # a good one is taken again
        wait_until(lambda: [listener["address"] for listener in dumped(admin)["listeners"]] == [f"127.0.0.1:{moved}"])
    assert "Traceback" not in log.read_text()


def dumped(admin: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def serve_refusal(*args: str) -> str:
    """The one line `serve --listen … ARGS` logs as it refuses to start (exit 1, no traceback)."""
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--no-admin",
                     "--no-metrics", *args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and " ERROR fastmesh: " in lines[0], result.stderr
    return lines[0].split(" ERROR fastmesh: ", 1)[1]


@pytest.mark.parametrize("name, content, message", [
    ("list.yaml", b"- NAME\n- app-0\n", "expected a mapping of node metadata keys, got list"),
    ("scalar.json", b'"app-0"', "expected a mapping of node metadata keys, got str"),
    ("types.yaml", b"NAME: [app-0]\n", "NAME must be a string, got list"),
    ("labels.json", b'{"LABELS": {"version": 2}}', "LABELS must be a map of strings to strings"),
    ("binary.yaml", b"\xff\x00\x13\x37", "not UTF-8 text (byte 0xff at offset 0)"),
    ("huge.json", b'{"NAME": "' + b"a" * bounded_yaml.MAX_BYTES + b'"}', "larger than 4 MiB, the most fastmesh reads"),
    ("bomb.yaml", b"LABELS: {}\nX:\n" + yaml_bomb().encode(), "more than 1,000,000 nodes once its aliases are expanded"),
    ("deep.json", b"[" * 200_000 + b"]" * 200_000, "nested too deep"),
    ("broken.json", b'{"NAME": ', "not valid JSON: Expecting value: line 1 column 10 (char 9)"),
], ids=lambda value: value if isinstance(value, str) and value.count(".") == 1 else "")
def test_malformed_node_metadata_is_a_one_line_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert serve_refusal("--node-metadata", str(path)) == f"{path}: {message}"


def test_a_directory_as_node_metadata_is_a_one_line_error(tmp_path):
    assert serve_refusal("--node-metadata", str(tmp_path)) == f"{tmp_path}: Is a directory"


def broken_sets(good: Path) -> dict[str, tuple[str, bytes | None, str]]:
    """Each malformed case: (file, its new content or None for a directory, the message's end)."""
    key = (good / "key.pem").read_bytes()
    return {
        "garbage PEM": ("cert-chain.pem", b"-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
                        "cert-chain.pem: not PEM certificates"),
        "truncated key": ("key.pem", key[:len(key) // 2], "key.pem: not an unencrypted PEM private key"),
        "huge root": ("root-cert.pem", (good / "root-cert.pem").read_bytes() * 2000,
                      "root-cert.pem: larger than 1 MiB, not a PEM file fastmesh reads"),
        "directory as key": ("key.pem", None, "key.pem: Is a directory"),
    }


def break_set(directory: Path, file: str, content: bytes | None) -> None:
    target = directory / file
    target.unlink()
    if content is None:
        target.mkdir()
    else:
        target.write_bytes(content)
        target.chmod(0o600)


def test_malformed_certificate_files_are_a_one_line_error_at_start(mesh_certs, tmp_path):
    good = mesh_certs.identity("default", "db")
    for case, (file, content, message) in broken_sets(good).items():
        broken = Path(shutil.copytree(good, tmp_path / case.replace(" ", "-")))
        break_set(broken, file, content)
        line = serve_refusal("--certs", str(broken))
        assert line.startswith(f"--certs: {broken}/{message}"), (case, line)


def test_malformed_certificate_files_on_rotation_are_refused_and_the_old_set_stays(mesh_certs, tmp_path):
    # The watcher's half of rotation (the sidecar's is test_tls_sidecar.py's rotation test).
    good = mesh_certs.identity("default", "db")
    for case, (file, content, message) in broken_sets(good).items():
        mounted = Path(shutil.copytree(good, tmp_path / case.replace(" ", "-")))
        applied = []
        watcher = CertificateWatcher(load_identity(mounted), applied.append)
        break_set(mounted, file, content)
        assert (watcher.check(), watcher.check()) == (False, False)  # seen, then refused once it stood still
        assert (watcher.refused, applied, watcher.identity.directory) == (1, [], mounted), case


# ---------------------------------------------------------------- least privilege


@pytest.mark.parametrize("path", ["/config_dump", "/stats", "/connections", "/ready", "/healthz/ready", "/"])
def test_the_metrics_port_serves_only_metrics(serve, upstream, path):  # noqa: F811
    proxy = serve(upstream(lambda conn: None).address)
    assert proxy.get(path, proxy.metrics)[0] == 404
    status, body = proxy.get("/stats/prometheus", proxy.metrics)
    assert status == 200 and "fastmesh_active_connections" in body  # the sidecar's health is a metric there
    assert proxy.stop() == 0


def test_admin_stays_on_loopback_unless_told_and_the_metrics_port_is_the_one_on_every_address(tmp_path):
    from fastmesh.cli import build_parser

    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2"])
    assert (str(args.admin), str(args.metrics), args.health) == ("127.0.0.1:15000", "0.0.0.0:15090", None)
    path = tmp_path / "mesh.yaml"
    path.write_text(sidecar_document(15001, 15000).replace("  admin: 127.0.0.1:15000\n", ""))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "admin: http://127.0.0.1:15000/\n" in result.stdout


def test_config_dump_never_shows_a_private_key(sidecar, upstream, mesh_certs):
    from conftest import one_listener

    from fastmesh.routing import INBOUND

    certs = mesh_certs.identity("default", "db")
    running = sidecar(one_listener(Address("127.0.0.1", 0), [upstream(echo_lines).address], INBOUND,
                                   admin=Address("127.0.0.1", 0), metrics=None, certs=certs))
    status, body = get(running.sidecar.admin_address, "/config_dump")
    assert status == 200 and json.loads(body)["identity"]["certs"] == str(certs)  # the identity is loaded
    key_lines = (certs / "key.pem").read_text().splitlines()[1:-1]
    assert "PRIVATE KEY" not in body and not any(line in body for line in key_lines)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: serve --user switches users")
NOBODY = pwd.getpwnam("nobody")


def low_free_ports(count: int) -> list[int]:
    """Free ports below 1024 on 127.0.0.1, which only root may bind."""
    found = []
    for port in range(1023, 900, -1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    pytest.fail("no free ports below 1024")


def ids_of_every_thread(pid: int) -> set[tuple[str, str, str]]:
    """The Uid, Gid and Groups lines of each thread of `pid`, as /proc shows them."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        found.add(tuple(" ".join(fields[name].split()) for name in ("Uid", "Gid", "Groups")))
    return found




def nobodys_ids() -> tuple[str, str, str]:
    """What /proc shows for a process that runs as nobody with its own groups."""
    groups = " ".join(str(gid) for gid in os.getgrouplist("nobody", NOBODY.pw_gid))
    return " ".join([str(NOBODY.pw_uid)] * 4), " ".join([str(NOBODY.pw_gid)] * 4), groups


@needs_root
def test_serve_user_drops_root_in_every_thread_after_binding_ports_below_1024(serve, upstream):  # noqa: F811
    server = upstream(echo_lines)
    listen, metrics = low_free_ports(2)
    proxy = serve(server.address, "--listen", f"127.0.0.1:{listen}", "--metrics", f"127.0.0.1:{metrics}",
                  "--user", "nobody")  # the last --listen and --metrics are the ones argparse keeps
    proxy.listen, proxy.metrics = ("127.0.0.1", listen), ("127.0.0.1", metrics)
    assert ids_of_every_thread(proxy.process.pid) == {nobodys_ids()}  # the engine's workers too
    payload = random_bytes(1 << 20)
    assert echo_back(proxy.listen, payload) == sha256(payload)
    assert proxy.get("/stats/prometheus", proxy.metrics)[0] == 200
    assert f"running as nobody (uid {NOBODY.pw_uid}, gid {NOBODY.pw_gid})" in proxy.output()
    assert proxy.stop() == 0


@pytest.fixture
def world_readable_dir():
    """A directory nobody may read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fastmesh-hostile-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def give_to_nobody(*paths: Path) -> None:
    for path in paths:
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)


def rotate_identity(mesh_certs, certs: Path, staged: Path, own) -> None:
    """A new identity for db, issued in `staged`, owned by `own`, moved into `certs` file by file."""
    ca.issue(mesh_certs.root, "default", "db", staged)
    own(*staged.iterdir())
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        os.replace(staged / name, certs / name)


@needs_root
def test_after_the_drop_a_reload_and_a_certificate_rotation_still_apply(upstream, mesh_certs, world_readable_dir):
    # Files read after the drop (the config on reload, certificates on rotation) are read as
    # nobody: here they are nobody's, as the README asks.
    from test_reload import ask, config, tagging

    backends = [upstream(tagging(b"v1:")), upstream(tagging(b"v2:"))]
    certs = Path(shutil.copytree(mesh_certs.identity("default", "db"), world_readable_dir / "certs"))
    give_to_nobody(certs, *certs.iterdir())
    listen, admin = free_port(), free_port()
    path = world_readable_dir / "mesh.yaml"
    path.write_text(config(listen, admin, backends, "v1") + f"  certs: {certs}\n")  # the Sidecar comes last
    log = world_readable_dir / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "fastmesh", "serve", "-c", str(path), "--user", "nobody"],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: dumped(admin) is not None)
        assert ids_of_every_thread(process.pid) == {nobodys_ids()}
        assert ask(listen) == b"v1:?"
        moved = path.with_suffix(".staged")
        moved.write_text(config(listen, admin, backends, "v2") + f"  certs: {certs}\n")
        os.replace(moved, path)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: ask(listen) == b"v2:?")
        rotate_identity(mesh_certs, certs, world_readable_dir / "rotated", give_to_nobody)
        wait_until(lambda: dumped(admin)["identity"]["rotations"] == 1)
        assert ask(listen) == b"v2:?"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    text = log.read_text()
    assert "config reloaded (SIGHUP)" in text and "new certificates in force" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text


POD_FS_GROUP = 2000  # a group nobody is not in, as a pod's own fsGroup


def as_a_secret_volume(*paths: Path) -> None:
    """As the kubelet mounts a Secret under an fsGroup with defaultMode 0440: root's, that group's."""
    for path in paths:
        os.chown(path, 0, POD_FS_GROUP)
        path.chmod(0o440)


@needs_root
def test_supplementary_groups_kept_past_the_drop_read_a_rotated_secret(upstream, mesh_certs, world_readable_dir):
    # kube-inject's TPROXY sidecar: started as root, it keeps the pod's fsGroup (--groups) when it
    # becomes the proxy user, so the certificates it reads after the switch are still readable.
    server = upstream(echo_lines)
    certs = Path(shutil.copytree(mesh_certs.identity("default", "db"), world_readable_dir / "certs"))
    as_a_secret_volume(*certs.iterdir())
    listen, admin = free_port(), free_port()
    log = world_readable_dir / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fastmesh", "serve", "--listen", f"127.0.0.1:{listen}", "--upstream",
             f"{server.address[0]}:{server.address[1]}", "--certs", str(certs), "--admin", f"127.0.0.1:{admin}",
             "--no-metrics", "--user", "nobody", "--group", str(NOBODY.pw_gid), "--groups", str(POD_FS_GROUP)],
            stdout=output, stderr=subprocess.STDOUT, extra_groups=[POD_FS_GROUP])  # the kubelet's fsGroup
    try:
        wait_until(lambda: dumped(admin) is not None)
        uid = " ".join([str(NOBODY.pw_uid)] * 4)
        gid = " ".join([str(NOBODY.pw_gid)] * 4)
        groups = " ".join(str(g) for g in sorted((NOBODY.pw_gid, POD_FS_GROUP)))
        assert ids_of_every_thread(process.pid) == {(uid, gid, groups)}
        rotate_identity(mesh_certs, certs, world_readable_dir / "rotated", as_a_secret_volume)
        wait_until(lambda: dumped(admin)["identity"]["rotations"] == 1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    text = log.read_text()
    assert "new certificates in force" in text and "Traceback" not in text and "ERROR" not in text, text


def test_an_unknown_user_or_group_is_a_one_line_error():
    assert serve_refusal("--user", "no-such-user") == "--user no-such-user: no such user"
    assert serve_refusal("--user", "nobody", "--group", "no-such-group") == "--group no-such-group: no such group"
    assert serve_refusal("--user", "nobody", "--groups", "1234,no-such-group") == (
        "--groups no-such-group: no such group")


# A serve that is not root: everything it needs imported first (this Python may be root's
# alone), then it becomes nobody and asks to run as root.
AS_NOBODY = """\
import os, sys
import uvloop, fastmesh.cli, fastmesh.engine, fastmesh.privileges, fastmesh.reload, fastmesh.sidecar
os.setgroups([])
os.setgid({gid})
os.setuid({uid})
sys.exit(fastmesh.cli.main(sys.argv[1:]))
"""


@needs_root
def test_switching_to_another_user_without_root_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY.format(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid), "serve", "--listen",
         "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--no-admin", "--no-metrics", "--user", "root"],
        capture_output=True, text=True, timeout=60, cwd="/", check=False)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.endswith(f" ERROR fastmesh: --user root (uid 0, gid 0): only root can switch to another user; "
                         f"serve runs as uid {NOBODY.pw_uid}, gid {NOBODY.pw_gid}")
