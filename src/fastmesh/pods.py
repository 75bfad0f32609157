"""A mesh of pods as network namespaces on a bridge, as a Kubernetes node runs them: each pod
has its own address, its own iptables and its own processes, and the apps in it connect to
each other's addresses knowing nothing of the proxy.

- `ratings-v2`: a mesh pod whose app is a Redis client (the calls below, made from this
  process in the pod's namespace);
- `mongodb`: a mesh pod whose app is the database, redis-server on 0.0.0.0:6379;
- `plain`: no sidecar and no capture; a client too, and an echo server on port 8080 that no
  config knows (the PassthroughCluster case).

A mesh pod is set up as `istioctl kube-inject` sets one up: `fastmesh capture` (the init
container), then the sidecar (`fastmesh serve -c`) with its own workload identity from one
mesh CA (`fastmesh ca`), a virtualOutbound and a virtualInbound listener, its node metadata,
the database's ServiceEntry (the mongodb pod's address, mTLS by ISTIO_MUTUAL) and a
PERMISSIVE PeerAuthentication for the database. The bridge lives in a namespace of its own,
the "node", which is where the metrics and health ports are reached from, as a kubelet and
Prometheus reach them. Nothing in the host's own namespace is touched.

`Mesh` is a context manager: everything it made (processes, capture rules, namespaces, the
bridge and veths with them, its temporary directory) is removed at the end, also on a failure
or Ctrl-C halfway through starting."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastmesh import ca
from fastmesh.defaults import DEFAULTS
from fastmesh.demo_servers import _process

__all__ = ["Mesh", "Pod", "PodSpec", "PodsError", "RedisSession", "demo_traffic", "echo", "missing_tools", "rating",
           "redis_session"]

T = TypeVar("T")

NAMESPACE = "default"  # the Kubernetes namespace of every pod here
NODE_ADDRESS = "10.80.0.1"  # the bridge's own address, in the node namespace
PREFIX_LENGTH = 24
DATABASE_PORT = 6379
ECHO_PORT = 8080
METRICS_PORT = 15090
HEALTH_PORT = 15021  # Istio's; excluded from capture by its defaults (-d 15090,15021), as 15090 is
DATABASE_SERVICE = f"mongodb.{NAMESPACE}.svc.cluster.local"
RATINGS = {1: 5, 2: 4}  # review -> rating, as Bookinfo's ratings data has them
# The sidecar runs as Istio's proxy user, so `fastmesh capture` keeps its defaults (-u 1337).
# That user cannot read this Python installation (it may live under /root), so the sidecar
# keeps one capability, CAP_DAC_READ_SEARCH (read any file), as an ambient one; it has no
# NET_ADMIN and cannot change the rules that capture it. Under `capture -m TPROXY` it keeps
# CAP_NET_RAW too, which a transparent listener needs (Istio gives its proxy NET_ADMIN for it).
PROXY_UID = DEFAULTS.proxy_uid


def as_proxy_user(transparent: bool = False) -> tuple[str, ...]:
    """setpriv's argv to run a command as the proxy user, with the capabilities above."""
    caps = "+dac_read_search" + (",+net_raw" if transparent else "")
    return ("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}")


TOOLS = ("ip", "iptables", "iptables-save", "setpriv", "redis-server")
CLONE_NEWNET = 0x40000000  # <linux/sched.h>

_meshes = itertools.count()


class PodsError(RuntimeError):
    """The mesh could not be built; the message says why, in a line or a log's tail."""


@dataclasses.dataclass(frozen=True)
class PodSpec:
    """A pod: its role (the name used here), address and, for a mesh pod, its workload."""

    name: str
    address: str
    workload: str = ""  # empty: no sidecar and no capture
    service_account: str = "default"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def mesh(self) -> bool:
        return bool(self.workload)

    @property
    def principal(self) -> str:
        return ca.spiffe_id(ca.DEFAULT_TRUST_DOMAIN, NAMESPACE, self.service_account)


RATINGS_V2 = PodSpec("ratings-v2", "10.80.0.2", "ratings-v2", "bookinfo-ratings-v2", {"app": "ratings", "version": "v2"})
MONGODB = PodSpec("mongodb", "10.80.0.3", "mongodb-v1", "default", {"app": "mongodb", "version": "v1"})
PLAIN = PodSpec("plain", "10.80.0.4")
PODS = (RATINGS_V2, MONGODB, PLAIN)
REPORTERS = ((RATINGS_V2.name, "source"), (MONGODB.name, "destination"))  # the mesh pods and how they report


def missing_tools() -> str:
    """Why a mesh cannot be built here, in one line ('' when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge and iptables)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian: apt-get install iproute2 iptables util-linux redis-server)"
    return ""


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise PodsError(f"{' '.join(argv)}: {' '.join(result.stderr.split()) or f'exit status {result.returncode}'}")
    return result.stdout


_setns = ctypes.CDLL(None, use_errno=True).setns


class Pod:
    """A network namespace; `call` runs code inside it."""

    def __init__(self, spec: PodSpec, netns: str) -> None:
        self.spec = spec
        self.netns = netns
        self.rules_before_capture = ""  # iptables_rules() just before `fastmesh capture`

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return self.spec.address

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) on a thread of its own that joins this namespace first: sockets it
        makes belong to the pod (they stay there wherever they are used afterwards), and so do
        processes it starts. The thread ends with the call, so it holds no namespace open."""
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                with open(f"/run/netns/{self.netns}") as handle:
                    if _setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.netns}: {os.strerror(ctypes.get_errno())}")
                outcome["value"] = function(*args)
            except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread, re-raised there)
                outcome["error"] = exc

        thread = threading.Thread(target=inside, name=f"netns {self.netns}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def connect(self, host: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from this pod, as its app would make it."""
        return self.call(socket.create_connection, (host, port), timeout)

    def command(self, *argv: str) -> list[str]:
        """argv run inside this pod."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str) -> str:
        return _run(*self.command(*argv))

    def iptables_rules(self) -> str:
        """iptables-save and ip6tables-save (what is installed), without their comment lines
        and with the packet counters zeroed, so that two snapshots compare as rules."""
        tools = ["iptables-save"] + (["ip6tables-save"] if shutil.which("ip6tables-save") else [])
        text = "".join(self.run(tool) for tool in tools)
        return re.sub(r"\[\d+:\d+\]", "[0:0]", "".join(line for line in text.splitlines(True)
                                                      if not line.startswith("#")))

    def __repr__(self) -> str:
        return f"Pod({self.name!r}, {self.address}, netns {self.netns})"


# --- the apps ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RedisSession:
    """One connection's replies, and the bytes the client sent and received on it."""

    replies: list[bytes | None]
    sent: int
    received: int


def _resp(*words: bytes) -> bytes:
    """A command in the Redis protocol (RESP): an array of bulk strings."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words)


def _reply(stream: Any) -> tuple[bytes | None, int]:
    """One reply (a status, an integer, an error or a bulk string) and its length on the wire."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise PodsError(f"the database closed the connection mid-reply ({line!r})")
    if line[:1] == b"-":
        raise PodsError(f"the database answered {line.decode().strip()}")
    if line[:1] != b"$":
        return line[1:-2], len(line)
    size = int(line[1:-2])
    if size < 0:
        return None, len(line)
    data = stream.read(size + 2)
    return data[:-2], len(line) + len(data)


def redis_session(pod: Pod, host: str, *commands: tuple[bytes, ...], port: int = DATABASE_PORT) -> RedisSession:
    """One connection from `pod` to the database at host:port: each command in turn, its reply
    read before the next; then the client closes."""
    replies, sent, received = [], 0, 0
    with pod.connect(host, port) as conn, conn.makefile("rb") as stream:
        for words in commands:
            request = _resp(*words)
            conn.sendall(request)
            sent += len(request)
            reply, size = _reply(stream)
            replies.append(reply)
            received += size
    return RedisSession(replies, sent, received)


def rating(pod: Pod, host: str, review: int) -> str:
    """ratings-v2's query: a review's rating, one connection."""
    reply = redis_session(pod, host, (b"GET", b"rating:%d" % review)).replies[0]
    return reply.decode() if reply is not None else "none"


def echo(pod: Pod, host: str, payload: bytes, port: int = ECHO_PORT) -> bytes:
    """What the echo server at host:port sends back for `payload` (all of it, once it has seen
    the end of the stream)."""
    with pod.connect(host, port) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def demo_traffic(mesh: Mesh, requests: int, progress: Callable[[str], None]) -> None:
    """`demo --pods`'s traffic: ratings-v2's queries to the database's pod address, one connection
    each, alternating between the two reviews; one from the plain pod; and one from ratings-v2 to
    the echo server no config knows."""
    ratings, plain = mesh.pods[RATINGS_V2.name], mesh.pods[PLAIN.name]
    progress(f"ratings-v2 sends {requests} queries to {MONGODB.address}:{DATABASE_PORT} (mongodb's pod address)")
    for i in range(requests):
        review = 1 + i % 2
        progress(f"  request {i + 1} of {requests}: review {review}, rating {rating(ratings, MONGODB.address, review)}")
    progress(f"plain (no sidecar) asks too: review 1, rating {rating(plain, MONGODB.address, 1)} (PERMISSIVE)")
    answer = echo(ratings, PLAIN.address, b"hello from ratings-v2")
    progress(f"ratings-v2 to {PLAIN.address}:{ECHO_PORT}, which no config knows: {answer.decode()!r} back "
             "(PassthroughCluster)")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# --- the sidecars' documents --------------------------------------------------------------------


def _document(api_version: str, kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec}


def _database_documents(name: str, host: str, port: int) -> list[dict]:
    """The database as a mesh service named `host` on `port`: its ServiceEntry (the mongodb pod's
    address, its workload in the mesh: tlsMode istio, so its connections exchange metadata) and
    ISTIO_MUTUAL towards it."""
    endpoint_labels = {**MONGODB.labels, "security.istio.io/tlsMode": "istio"}
    return [
        _document("networking.istio.io/v1beta1", "ServiceEntry", name, {
            "hosts": [host], "addresses": [MONGODB.address], "location": "MESH_INTERNAL",
            "resolution": "STATIC", "ports": [{"number": port, "name": "tcp-redis", "protocol": "TCP"}],
            "endpoints": [{"address": MONGODB.address, "labels": endpoint_labels,
                           "serviceAccount": MONGODB.service_account}]}),
        _document("networking.istio.io/v1beta1", "DestinationRule", name, {
            "host": host, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}),
    ]


def mesh_documents() -> list[dict]:
    """What every sidecar of the mesh is given, as a cluster's istiod would: the database's
    service at the mongodb pod's address, ISTIO_MUTUAL towards it, PERMISSIVE at it."""
    return [
        *_database_documents("mongodb", DATABASE_SERVICE, DATABASE_PORT),
        _document("security.istio.io/v1beta1", "PeerAuthentication", "mongodb", {
            "selector": {"matchLabels": {"app": MONGODB.labels["app"]}}, "mtls": {"mode": "PERMISSIVE"}}),
    ]


# The database addressed directly, without capture (bench/capture.py's reference): ratings-v2's
# app dials its sidecar's own outbound port, which dials the mongodb sidecar's own inbound port.
DIRECT_OUTBOUND_PORT, DIRECT_INBOUND_PORT = 16379, 16380
DIRECT_SERVICE = f"mongodb-direct.{NAMESPACE}.svc.cluster.local"


def direct_documents() -> list[dict]:
    """The same database, mTLS and exchange as mesh_documents(), at the mongodb sidecar's
    DIRECT_INBOUND_PORT."""
    return _database_documents("mongodb-direct", DIRECT_SERVICE, DIRECT_INBOUND_PORT)


def sidecar_document(spec: PodSpec, certs: Path, reporting: str, direct: bool = False,
                     interception_mode: str = "REDIRECT") -> dict:
    """A mesh pod's Sidecar: the two virtual listeners capture redirects to, its workload's
    node metadata and identity, the metrics and health ports on every address; `direct`: also
    the listeners of the directly addressed path (direct_documents())."""
    inbound_ports = [{"port": DATABASE_PORT, "service": "mongodb"}] if spec is MONGODB else []
    listeners: dict[str, list] = {}
    if direct and spec is MONGODB:
        listeners["inbound"] = [{"port": DIRECT_INBOUND_PORT, "bind": "0.0.0.0", "targetPort": DATABASE_PORT,
                                 "service": "mongodb"}]
    elif direct:
        listeners["outbound"] = [{"port": DIRECT_OUTBOUND_PORT, "host": DIRECT_SERVICE,
                                  "servicePort": DIRECT_INBOUND_PORT}]
    return _document("fastmesh.io/v1alpha1", "Sidecar", spec.workload, {
        **listeners,
        "nodeMetadata": {"NAME": f"{spec.workload}-0", "NAMESPACE": NAMESPACE, "WORKLOAD_NAME": spec.workload,
                         "SERVICE_ACCOUNT": spec.service_account, "CLUSTER_ID": "Kubernetes",
                         "INSTANCE_IPS": spec.address, "LABELS": spec.labels},
        "virtualOutbound": {"port": DEFAULTS.capture_outbound_port},
        "virtualInbound": {"port": DEFAULTS.capture_inbound_port, "ports": inbound_ports,
                           "interceptionMode": interception_mode},
        "certs": str(certs),
        "metrics": f"0.0.0.0:{METRICS_PORT}",
        "health": f"0.0.0.0:{HEALTH_PORT}",
        "admin": "127.0.0.1:15000",
        "tcpReportingDuration": reporting,
    })


# --- the mesh ------------------------------------------------------------------------------------


class Mesh:
    """The three pods on a bridge, started by `start()` (or `with`), removed by `stop()`."""

    def __init__(self, progress: Callable[[str], None] = lambda message: None, reporting: str = "500ms",
                 prefix: str | None = None, direct: bool = False, capture_flags: tuple[str, ...] = ()) -> None:
        self.progress = progress
        self.direct = direct  # the sidecars also serve the directly addressed path (bench/capture.py)
        self.capture_flags = capture_flags  # `fastmesh capture`'s, e.g. ("-m", "TPROXY", "--ebpf")
        # Under TPROXY the inbound listeners are transparent (they take REDIRECT's connections too).
        self.interception_mode = "TPROXY" if "TPROXY" in capture_flags else "REDIRECT"
        self.reporting = reporting  # the sidecars' tcpReportingDuration
        self.prefix = prefix or f"fmpods-{os.getpid()}-{next(_meshes)}"  # every namespace's name starts so
        self.node = Pod(PodSpec("node", NODE_ADDRESS), f"{self.prefix}-node")
        self.pods = {spec.name: Pod(spec, f"{self.prefix}-{spec.name}") for spec in PODS}
        self.workdir: Path | None = None
        self._namespaces: list[str] = []
        self._processes = ExitStack()  # stops them, last started first
        self._started: dict[str, tuple[subprocess.Popen, Path]] = {}  # what -> its process and log
        self._captured: set[str] = set()
        self._echo: _EchoServer | None = None

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # - start

    def start(self) -> None:
        why = missing_tools()
        if why:
            raise PodsError(f"a mesh of pods {why}")
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
            self._network()
            identities = self._identities()
            self._database()
            self._echo_server()
            for pod in self.pods.values():
                if pod.spec.mesh:
                    self._capture(pod)
                    self._sidecar(pod, identities[pod.name])
            for pod in self.pods.values():
                if pod.spec.mesh:
                    self._wait_ready(pod)
        except BaseException:  # Ctrl-C too: whatever was made is removed
            self.stop()
            raise

    def _network(self) -> None:
        self._namespace(self.node)
        self.node.run("ip", "link", "add", "br0", "type", "bridge")
        self.node.run("ip", "addr", "add", f"{NODE_ADDRESS}/{PREFIX_LENGTH}", "dev", "br0")
        self.node.run("ip", "link", "set", "br0", "up")
        for pod in self.pods.values():
            self._namespace(pod)
            port = f"v-{pod.name}"[:15]  # the pod's end of the veth, on the bridge
            _run("ip", "link", "add", "eth0", "netns", pod.netns, "type", "veth",
                 "peer", "name", port, "netns", self.node.netns)
            self.node.run("ip", "link", "set", port, "master", "br0", "up")
            pod.run("ip", "addr", "add", f"{pod.address}/{PREFIX_LENGTH}", "dev", "eth0")
            pod.run("ip", "link", "set", "eth0", "up")
        self.progress(f"pods on bridge br0 ({NODE_ADDRESS}/{PREFIX_LENGTH}, namespace {self.node.netns}): "
                      + ", ".join(f"{pod.name} {pod.address}" for pod in self.pods.values()))

    def _namespace(self, pod: Pod) -> None:
        _run("ip", "netns", "add", pod.netns)
        self._namespaces.append(pod.netns)
        pod.run("ip", "link", "set", "lo", "up")

    def _identities(self) -> dict[str, Path]:
        assert self.workdir is not None
        root = ca.init(self.workdir / "mesh-root")
        identities = {}
        for pod in self.pods.values():
            if pod.spec.mesh:
                identities[pod.name] = self.workdir / f"{pod.name}-certs"
                identity = ca.issue(root, NAMESPACE, pod.spec.service_account, identities[pod.name])
                self.progress(f"{pod.name}: identity {identity}")
        return identities

    def _database(self) -> None:
        pod = self.pods[MONGODB.name]
        assert self.workdir is not None
        self._start(pod, "redis-server", [shutil.which("redis-server") or "redis-server", "--port", str(DATABASE_PORT),
                                          "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.workdir)])
        self._wait(pod, "redis-server", lambda: pod.connect("127.0.0.1", DATABASE_PORT, 1.0).close())
        # The data, loaded straight into the database (not through the mesh), as Bookinfo's image does.
        redis_session(pod, "127.0.0.1", *((b"SET", b"rating:%d" % review, b"%d" % value)
                                          for review, value in RATINGS.items()))
        self.progress(f"mongodb: redis-server on 0.0.0.0:{DATABASE_PORT} with the ratings")

    def _echo_server(self) -> None:
        pod = self.pods[PLAIN.name]
        self._echo = pod.call(_EchoServer, ("0.0.0.0", ECHO_PORT), _Echo)
        threading.Thread(target=self._echo.serve_forever, args=(0.1,), name="echo", daemon=True).start()
        self.progress(f"plain: no sidecar; an echo server on 0.0.0.0:{ECHO_PORT} that no config knows")

    def _capture(self, pod: Pod, flags: tuple[str, ...] | None = None) -> None:
        # Make the nat and mangle tables exist first (a chain made and deleted; listing them does not, with
        # iptables-nft): uncapture leaves an empty one behind where there was none, and this
        # snapshot is what uncapture must give back.
        for tool in ("iptables", "ip6tables")[:1 + bool(shutil.which("ip6tables"))]:
            for table in ("nat", "mangle"):  # -m TPROXY's rules are mangle's
                pod.run(tool, "-t", table, "-N", "FASTMESH_PODS")
                pod.run(tool, "-t", table, "-X", "FASTMESH_PODS")
        pod.rules_before_capture = pod.iptables_rules()
        self._captured.add(pod.name)
        flags = self.capture_flags if flags is None else flags
        done = pod.run(sys.executable, "-m", "fastmesh", "capture", *flags).strip()
        self.progress(f"{pod.name}: fastmesh capture {' '.join(flags)}: {done}")

    def capture(self, name: str, flags: tuple[str, ...] | None = None) -> None:
        """`fastmesh capture` again in a mesh pod, after uncapture(); `flags`: other than the mesh's."""
        self._capture(self.pods[name], flags)

    def uncapture(self, name: str) -> str:
        pod = self.pods[name]
        done = pod.run(sys.executable, "-m", "fastmesh", "uncapture").strip()
        self._captured.discard(name)
        return done

    def _sidecar(self, pod: Pod, certs: Path) -> None:
        assert self.workdir is not None
        config = self.workdir / f"{pod.name}-sidecar.yaml"
        documents = [*mesh_documents(), *(direct_documents() if self.direct else []),
                     sidecar_document(pod.spec, certs, self.reporting, self.direct, self.interception_mode)]
        config.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        transparent = self.interception_mode == "TPROXY"
        self._start(pod, f"{pod.name}-sidecar", [*as_proxy_user(transparent), sys.executable, "-m", "fastmesh", "serve",
                                                 "-c", str(config), "--log-level", "warning"])

    def _start(self, pod: Pod, what: str, argv: list[str]) -> None:
        assert self.workdir is not None
        # Our environment: FASTMESH_NO_EXTENSIONS, if set, picks the sidecars' engine too.
        log = self.workdir / f"{what}.log"
        self._started[what] = _process(self._processes, pod.command(*argv), log), log

    def _wait(self, pod: Pod, what: str, probe: Callable[[], Any], timeout: float = 30.0) -> None:
        """Until probe() returns without an OSError; PodsError with the log's tail if the process
        exits or the time runs out."""
        process, log = self._started[what]
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe()
                return
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with status {process.returncode}" if process.poll() is not None else \
                    f"was not ready within {timeout:.0f} s"
                raise PodsError(f"{what} in {pod.name} {state}\n{log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    def _wait_ready(self, pod: Pod) -> None:
        """As a kubelet's readiness probe: the sidecar's /healthz/ready, from the node."""
        self._wait(pod, f"{pod.name}-sidecar", lambda: self.fetch(self.health_url(pod.name), 2.0))
        self.progress(f"{pod.name}: sidecar ready (uid {PROXY_UID}), metrics on {self.metrics_url(pod.name)}")

    # - using it

    def started(self, what: str) -> subprocess.Popen:
        """A process the mesh started: "redis-server", or "<pod>-sidecar"."""
        return self._started[what][0]

    def health_url(self, name: str) -> str:
        return f"http://{self.pods[name].address}:{HEALTH_PORT}/healthz/ready"

    def metrics_address(self, name: str) -> str:
        return f"{self.pods[name].address}:{METRICS_PORT}"

    def metrics_url(self, name: str) -> str:
        return f"http://{self.metrics_address(name)}/stats/prometheus"

    def fetch(self, url: str, timeout: float = 10.0) -> str:
        """A page of a pod's port, read from the node (as Prometheus and a kubelet reach it)."""
        def read() -> str:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read().decode()
        return self.node.call(read)

    def namespaces(self) -> list[str]:
        """The network namespaces of this mesh that exist now."""
        listed = _run("ip", "netns", "list").split("\n")
        return [line.split()[0] for line in listed if line.startswith(f"{self.prefix}-")]

    # - stop

    def stop(self) -> None:
        """Remove everything: the capture rules, the processes, the echo server, the namespaces
        (their veths and the bridge go with them), the temporary directory. Safe to call again,
        or after a start that failed halfway; one step failing does not stop the others."""
        for name in sorted(self._captured):
            with contextlib.suppress(PodsError):
                self.uncapture(name)
        self._captured.clear()
        self._processes.close()
        self._started.clear()
        if self._echo is not None:
            self._echo.shutdown()
            self._echo.server_close()
            self._echo = None
        while self._namespaces:
            subprocess.run(["ip", "netns", "del", self._namespaces.pop()], capture_output=True, check=False)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
