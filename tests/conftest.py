"""Shared fixtures: both engines, threaded test servers on 127.0.0.1, and
helpers that read an engine's batches until the expected connections closed."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from google.protobuf import any_pb2, struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from fastmesh import _engine_py
from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import HEADER, MAGIC
from fastmesh.identity import NodeMetadata
from fastmesh.records import Closed, Opened, Updated
from fastmesh.routing import OUTBOUND, RouteTable
from fastmesh.settings import ListenerConfig, SidecarConfig
from fastmesh.sidecar import BackgroundSidecar

try:
    from fastmesh import _core
except ImportError:  # test_engine_selection.py reports this as a failure
    _core = None

class _IoUringCore:
    """fastmesh._core whose engines make their plain receives and sends through io_uring: the
    Cython engine once more, batching (Engine(io_uring=True)), held to the same tests."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_core, name)

    @staticmethod
    def Engine(*args: Any, **options: Any) -> Any:
        options.setdefault("io_uring", True)
        engine = _core.Engine(*args, **options)
        assert engine.io_uring, f"io_uring is not in use: {engine.io_uring_unavailable}"
        return engine


NO_EXTENSIONS = bool(os.environ.get("FASTMESH_NO_EXTENSIONS"))
# Every engine test runs on both engines, the Cython one also batching through io_uring; under
# FASTMESH_NO_EXTENSIONS=1 (the second run of the README's test command) the whole suite runs on
# the twin only.
ENGINE_MODULES = {"python": _engine_py} if NO_EXTENSIONS else {
    "cython": _core, "cython-io_uring": _IoUringCore() if _core is not None else None, "python": _engine_py}
EXPECTED_IMPLEMENTATION = "python" if NO_EXTENSIONS else "cython"  # what fastmesh.engine must pick


@pytest.fixture(params=sorted(ENGINE_MODULES))
def engine_module(request: pytest.FixtureRequest) -> Any:
    module = ENGINE_MODULES[request.param]
    if module is None:
        pytest.fail("fastmesh._core is not built: run `pip install -e .`")
    return module


@pytest.fixture
def make_engine(engine_module: Any):
    engines = []

    def make(**options: Any) -> Any:
        engine = engine_module.Engine(**options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def listening_socket(backlog: int = 512) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path):
    """start(targets) -> base URL of a Prometheus scraping those targets every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `bash ci/install-test-deps.sh` (README)")
    processes = []

    def start(targets: list[tuple[str, int]], config: str | None = None) -> str:
        """config: a whole prometheus.yml to use instead of the one job scraping `targets`."""
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(config or (
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: fastmesh\n    metrics_path: /stats/prometheus\n"
            "    static_configs:\n      - targets: [%s]\n" % ", ".join('"%s:%d"' % t for t in targets)
        ))
        log = (tmp_path / "prometheus.log").open("w")
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text())

    yield start
    for process in processes:
        stop_process(process)


def query(base: str, promql: str) -> list[dict]:
    """The result of an instant query to the Prometheus at `base`."""
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


class Upstream:
    """A TCP server on 127.0.0.1 that runs `handler(conn)` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], Any], backlog: int = 512) -> None:
        self.handler = handler
        self.sock = listening_socket(backlog)
        self.address = self.sock.getsockname()
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_forever, daemon=True)
        self._acceptor.start()

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                result = self.handler(conn)
            with self._lock:
                self.results.append(result)
        except BaseException as exc:  # reported by the test through .errors
            with self._lock:
                self.errors.append(exc)

    @property
    def accepted(self) -> int:
        """Connections it has accepted so far."""
        with self._lock:
            return len(self._threads)

    def wait(self, count: int, timeout: float = 30.0) -> list[Any]:
        """Wait until `count` handlers finished; return their results."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.results) + len(self.errors) >= count:
                    break
            time.sleep(0.01)
        with self._lock:
            assert len(self.results) + len(self.errors) >= count, "upstream handlers did not finish"
            return list(self.results)

    def close(self) -> None:
        stop_accepting(self.sock, self._acceptor)


def stop_accepting(sock: socket.socket, acceptor: threading.Thread) -> None:
    """Close a listening socket whose accept loop runs in `acceptor`, once the loop has ended.
    close() alone does not wake a thread blocked in accept(): the socket goes on listening for it,
    and a later test's stray connection to that port would be taken and answered by this one's
    handler. shutdown() wakes it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    acceptor.join(10)
    assert not acceptor.is_alive(), "the accept loop did not end"
    sock.close()


@pytest.fixture
def upstream():
    servers: list[Upstream] = []

    def start(handler: Callable[[socket.socket], Any], backlog: int = 512) -> Upstream:
        server = Upstream(handler, backlog)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def relay_to(make_engine):
    """relay_to(upstream_address, **engine_options) -> (engine, listen_address)."""
    sockets: list[socket.socket] = []

    def start(address: tuple[str, int], connect_timeout: float = 5.0, max_connections: int = 0,
              idle_timeout: float = DEFAULTS.idle_timeout, **options: Any):
        engine = make_engine(**options)
        sock = listening_socket()
        sock.setblocking(False)
        sockets.append(sock)
        engine.add_listener(sock.fileno(), RouteTable.single([address], connect_timeout, idle_timeout=idle_timeout),
                            max_connections=max_connections)
        engine.start()
        return engine, sock.getsockname()

    yield start
    for sock in sockets:
        sock.close()


def read_all(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF; return (byte count, sha256)."""
    digest = hashlib.sha256()
    total = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return total, digest.hexdigest()
        digest.update(chunk)
        total += len(chunk)


def assert_closed_by_relay(client: socket.socket) -> None:
    """The relay ended the client's connection without sending it a byte: an end of
    stream, or a reset (the relay may close with the client's bytes unread)."""
    client.settimeout(10)
    try:
        assert client.recv(16) == b""
    except ConnectionResetError:
        pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class ConnRecord:
    """Everything the engine reported about one connection."""

    opened: bool = False
    closed: bool = False
    listener_id: int | None = None
    cluster: int | None = None
    endpoint: int | None = None
    reason: int = 0
    err: int = 0
    bytes: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # down_rx, down_tx, up_rx, up_tx


class Collector:
    """Folds an engine's batches into per-connection records."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.conns: dict[int, ConnRecord] = defaultdict(ConnRecord)
        self.updates_for_closed = 0

    def collect(self) -> None:
        batch = self.engine.collect()
        for opened in batch.opened:
            record = self.conns[opened.conn_id]
            assert not record.opened, "a connection was reported opened twice"
            record.opened = True
            record.listener_id, record.cluster, record.endpoint = opened.listener_id, opened.cluster, opened.endpoint
        for updated in batch.updated:
            record = self.conns[updated.conn_id]
            assert not record.closed, "an update arrived after the close"
            record.bytes = [a + b for a, b in zip(record.bytes, updated[1:])]
        for closed in batch.closed:
            record = self.conns[closed.conn_id]
            assert not record.closed, "a connection was reported closed twice"
            if record.opened:
                assert (record.listener_id, record.cluster, record.endpoint) == closed[1:4]
            record.closed = True
            record.listener_id, record.cluster, record.endpoint = closed.listener_id, closed.cluster, closed.endpoint
            record.reason, record.err = closed.reason, closed.errno
            record.bytes = [a + b for a, b in zip(record.bytes, closed[6:])]

    def closed(self) -> list[ConnRecord]:
        return [r for r in self.conns.values() if r.closed]

    def wait_closed(self, count: int, timeout: float = 20.0) -> list[ConnRecord]:
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            done = self.closed()
            if len(done) >= count or time.monotonic() > deadline:
                assert len(done) == count, f"expected {count} closed connections, engine reported {len(done)}"
                return done
            time.sleep(0.02)


class RunningSidecar(BackgroundSidecar):
    """A BackgroundSidecar that tests can scrape."""

    def scrape(self, path: str = "/stats/prometheus", accept: str = "") -> tuple[str, str]:
        import urllib.request

        request = urllib.request.Request(
            "http://%s:%d%s" % (*self.sidecar.metrics_address, path), headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()

    def samples(self) -> dict[str, list]:
        """The scraped samples by name (each name may have several label sets)."""
        found: dict[str, list] = {}
        for family in text_string_to_metric_families(self.scrape()[1]):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(sample)
        return found


def opened(conn_id: int, listener_id: int | None = 0, cluster: int | None = 0,
           endpoint: int | None = 0, identifies_peer: bool = False) -> Opened:
    return Opened(conn_id, listener_id, cluster, endpoint, identifies_peer)


def updated(conn_id: int, received: int, sent: int) -> Updated:
    """What a relay reports when it read `received` bytes from the downstream (and
    wrote them upstream) and wrote `sent` back."""
    return Updated(conn_id, received, sent, sent, received)


def closed(conn_id: int, reason: int, received: int = 0, sent: int = 0, listener_id: int | None = 0,
           cluster: int | None = 0, endpoint: int | None = 0, errno: int = 0) -> Closed:
    return Closed(conn_id, listener_id, cluster, endpoint, reason, errno, received, sent, sent, received)


def one_listener(listen: Any, upstreams: list, direction: str = OUTBOUND, destination_service: str = "",
                 mesh_peer: bool = False, **options: Any) -> SidecarConfig:
    """A sidecar config with one listener to `upstreams`, as `serve --listen --upstream` builds it."""
    listener = ListenerConfig.to_upstreams(listen, upstreams, direction, destination_service, mesh_peer)
    return SidecarConfig(listeners=[listener], **options)


@pytest.fixture
def sidecar():
    started: list[RunningSidecar] = []

    def start(config: Any) -> RunningSidecar:
        running = RunningSidecar(config)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()
        assert running.loop.is_closed()  # nothing of the sidecar's left for the GC


class MeshCerts:
    """A mesh root (fastmesh ca init) and workload identities issued from it on demand."""

    def __init__(self, base: Path) -> None:
        from fastmesh import ca

        self.base = base
        self.root = base / "root"
        ca.init(self.root)
        self._issued: dict[tuple[str, str], Path] = {}

    def identity(self, namespace: str, service_account: str) -> Path:
        """The directory of cert-chain.pem, key.pem and root-cert.pem for ns/sa."""
        from fastmesh import ca

        key = (namespace, service_account)
        if key not in self._issued:
            out = self.base / f"{namespace}-{service_account}"
            ca.issue(self.root, namespace, service_account, out)
            self._issued[key] = out
        return self._issued[key]

    @staticmethod
    def spiffe(namespace: str, service_account: str) -> str:
        return f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"


@pytest.fixture(scope="session")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> MeshCerts:
    return MeshCerts(tmp_path_factory.mktemp("mesh"))


# Bookinfo's TCP pair, as Istio's injector would describe the pods.
RATINGS_V2 = NodeMetadata({"NAME": "ratings-v2-1", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2",
                           "LABELS": {"app": "ratings", "version": "v2"}, "CLUSTER_ID": "Kubernetes"})
MONGODB_V1 = NodeMetadata({"NAME": "mongodb-v1-0", "NAMESPACE": "default", "WORKLOAD_NAME": "mongodb-v1",
                           "LABELS": {"app": "mongodb", "version": "v1"}, "CLUSTER_ID": "Kubernetes"})
MONGODB_SERVICE = "mongodb.default.svc.cluster.local"


def independent_frame(metadata: dict, node_id: str, type_url: str | None = None) -> bytes:
    """An istio-peer-exchange frame built the way the spec describes it, without fastmesh's code."""
    outer = struct_pb2.Struct()
    outer.update({"x-envoy-peer-metadata": metadata, "x-envoy-peer-metadata-id": node_id})
    envelope = any_pb2.Any()
    envelope.Pack(outer, deterministic=True)
    if type_url is not None:
        envelope.type_url = type_url
    payload = envelope.SerializeToString(deterministic=True)
    return HEADER.pack(MAGIC, len(payload)) + payload


# The two sidecars of the engine-level exchange and TLS tests: their node metadata, the
# frames each sends, and a server-first app's greeting.
CLIENT = {"NAME": "ratings-v2-1", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2",
          "LABELS": {"app": "ratings", "version": "v2"}}
SERVER = {"NAME": "mongodb-v1-0", "NAMESPACE": "default", "WORKLOAD_NAME": "mongodb-v1",
          "LABELS": {"app": "mongodb", "version": "v1"}}
CLIENT_FRAME = independent_frame(CLIENT, "sidecar~10.0.0.1~ratings-v2-1.default~default.svc.cluster.local")
SERVER_FRAME = independent_frame(SERVER, "sidecar~10.0.0.2~mongodb-v1-0.default~default.svc.cluster.local")
GREETING = b"220 server ready\r\n"


# Network namespaces, for what needs iptables or addresses of its own (capture, the virtual
# listeners): each test makes its own, removed at teardown, also when it fails.
IP = shutil.which("ip")
def ebpf_unavailable() -> str:
    """Why `fastmesh capture --ebpf` cannot run here ('' when it can)."""
    from fastmesh import capture_ebpf

    if not shutil.which("bpftool"):
        return "needs bpftool (apt-get install bpftool)"
    return "" if capture_ebpf.OBJECT.exists() else "fastmesh was built without clang: no bpf/capture.bpf.o"


POD, PEER = "10.79.0.1", "10.79.0.2"  # the two ends of joined_netns's veth
_netns_names = itertools.count()


def netns_unavailable() -> str:
    """Why network namespace tests cannot run here ('' when they can)."""
    if os.geteuid() != 0 or IP is None or shutil.which("iptables-save") is None:
        return "needs root, iproute2 (ip netns) and iptables: run as root after ci/install-test-deps.sh"
    return ""


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout`."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def sh(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result


@pytest.fixture
def netns():
    """make(role) -> a new network namespace (its lo up) with a unique name; all are
    removed at teardown."""
    made: list[str] = []

    def make(role: str) -> str:
        name = f"fm-{os.getpid()}-{next(_netns_names)}-{role}"
        sh(IP, "netns", "add", name)
        made.append(name)
        sh(IP, "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in made:
        subprocess.run([IP, "netns", "del", name], check=False, capture_output=True)


# A server for namespace tests: on HOST, for each NAME:PORT, answers every connection with
# NAME and the line it read, then closes. Prints "ready" once listening; stops at stdin's end.
NAMED_ECHO = """\
import socket, sys, threading
def serve(name, port):
    s = socket.create_server((sys.argv[1], port))
    while True:
        c, _ = s.accept()
        data = b""
        while not data.endswith(b"\\n"):
            chunk = c.recv(64)
            if not chunk:
                break
            data += chunk
        c.sendall(name.encode() + b" " + data)
        c.close()
for spec in sys.argv[2:]:
    name, port = spec.split(":")
    threading.Thread(target=serve, args=(name, int(port)), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# The captured sidecars of namespace tests serve their metrics on the pod's 127.0.0.1:15090.
SCRAPE_POD = ("import urllib.request; "
              "print(urllib.request.urlopen('http://127.0.0.1:15090/stats/prometheus').read().decode())")


def named_echo(namespace: str, host: str, *names_and_ports: str) -> subprocess.Popen:
    """NAMED_ECHO in a namespace, ready; the caller stops it (stop_process)."""
    server = subprocess.Popen([IP, "netns", "exec", namespace, sys.executable, "-c", NAMED_ECHO, host,
                               *names_and_ports], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline() == "ready\n"
    return server


def scrape_pod(namespace: str) -> str:
    return sh(IP, "netns", "exec", namespace, sys.executable, "-c", SCRAPE_POD).stdout


@contextlib.contextmanager
def captured_sidecar(pod: str, config: Path, capture_flags: tuple[str, ...] = ()):
    """`fastmesh capture` (with `capture_flags`) in the pod and `serve -c config` there, on this
    run's engine, until its metrics answer. The sidecar runs as root (uid 1337 could not read
    this checkout and its Python), so capture leaves root's connections alone, as Istio's
    leaves uid 1337's."""
    env = dict(os.environ, FASTMESH_NO_EXTENSIONS="1") if NO_EXTENSIONS else dict(os.environ)
    sh(IP, "netns", "exec", pod, sys.executable, "-m", "fastmesh", "capture", "-u", "0", *capture_flags, env=env)
    sidecar = subprocess.Popen([IP, "netns", "exec", pod, sys.executable, "-m", "fastmesh", "serve", "-c",
                                str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([IP, "netns", "exec", pod, sys.executable, "-c", SCRAPE_POD],
                             capture_output=True).returncode != 0:
            assert sidecar.poll() is None, sidecar.stdout.read() if sidecar.stdout else ""
            assert time.monotonic() < deadline, "the sidecar did not start"
            time.sleep(0.2)
        yield sidecar
    finally:
        stop_process(sidecar)


@pytest.fixture
def joined_netns(netns):
    """(pod, peer): two namespaces joined by a veth, POD and PEER at its ends."""
    pod, peer = netns("pod"), netns("peer")
    tag = next(_netns_names)
    sh(IP, "link", "add", f"fmv{tag}p", "netns", pod, "type", "veth", "peer", "name", f"fmv{tag}q", "netns", peer)
    for name, device, address in ((pod, f"fmv{tag}p", POD), (peer, f"fmv{tag}q", PEER)):
        sh(IP, "-n", name, "addr", "add", f"{address}/24", "dev", device)
        sh(IP, "-n", name, "link", "set", device, "up")
    return pod, peer
