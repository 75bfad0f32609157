"""`python -m fastmesh demo`: Istio's "Collecting Metrics for TCP Services" task
on this machine. ratings-v2 talks to its database over TCP through its own
outbound sidecar and the database's inbound sidecar, configured by the Istio
files in fastmesh/bookinfo/; with --mtls, along the task's mutual-TLS branch
(an ISTIO_MUTUAL DestinationRule and a workload identity for each side). Then
both reporters' istio_tcp_* series are shown as a table, and the task's two
queries are answered series by series, as Prometheus's console lists them.
Everything started is stopped at the end or on Ctrl-C (the task's Cleanup step)."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Callable, TextIO

from fastmesh import ca, metrics_view
from fastmesh.addr import Address
from fastmesh.config import load_documents, plan
from fastmesh.config.istio_api import Sidecar as SidecarSpec
from fastmesh.config.loader import Document
from fastmesh.settings import SidecarConfig
from fastmesh.sidecar import Sidecar

CONFIG = Path(__file__).resolve().parent / "bookinfo"
MESH_FILES = ("mesh.yaml", "destination-rule-mongodb.yaml", "virtual-service-mongodb.yaml")
MTLS_RULE = "destination-rule-mongodb-mtls.yaml"  # the task's branch "If you enabled mutual TLS"
# The service accounts of Bookinfo's workloads: ratings-v2 runs as bookinfo-ratings-v2,
# the database as its namespace's default account.
IDENTITIES = {"ratings-v2": ("default", "bookinfo-ratings-v2"), "mongodb-v1": ("default", "default")}
# The task's queries: "istio_tcp_connections_opened_total" and "..._closed_total".
QUERIES = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total")
DATABASE_PORT = 27018  # where mongodb-v1-sidecar.yaml hands connections
CLIENT_PORT = 15001  # where ratings-v2-sidecar.yaml accepts the app's connections


class DemoError(RuntimeError):
    """Something the demo needs is missing or busy; the message says what to do."""


class Database(abc.ABC):
    """The database behind the inbound sidecar, and a client for ratings-v2's queries."""

    name = ""

    @abc.abstractmethod
    def start(self, stack: ExitStack, workdir: Path) -> None:
        """Start it on DATABASE_PORT with two ratings; `stack` stops it."""

    @abc.abstractmethod
    def query(self, port: int, review: int) -> str:
        """One connection to `port` asking for a review's rating; the rating."""


def _wait_listening(port: int, process: subprocess.Popen | None, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            detail = log.read_text()[-1500:] if log and log.exists() else ""
            raise DemoError(f"{what} exited with status {process.returncode}\n{detail}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within 30 s")


def _process(stack: ExitStack, argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    return process


class MariaDB(Database):
    """Bookinfo's ratings-v2-mysql path: a ratings table, queried per review."""

    name = "MariaDB (Bookinfo's ratings-v2-mysql path)"

    def start(self, stack: ExitStack, workdir: Path) -> None:
        datadir = workdir / "mariadb"
        subprocess.run([shutil.which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
                        f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        log = workdir / "mariadbd.log"
        process = _process(stack, [shutil.which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={datadir}",
                                   "--user=root", f"--port={DATABASE_PORT}", "--bind-address=127.0.0.1",
                                   f"--socket={datadir}/mariadb.sock", "--skip-log-bin", "--skip-name-resolve",
                                   "--innodb-buffer-pool-size=16M"], log)
        _wait_listening(DATABASE_PORT, process, "mariadbd", log)
        # The data, loaded straight into the database (not through the mesh), as Bookinfo's image does.
        self._sql(DATABASE_PORT, "CREATE DATABASE test; "
                                 "CREATE TABLE test.ratings (ReviewID INT PRIMARY KEY, Rating INT); "
                                 "INSERT INTO test.ratings VALUES (1, 5), (2, 4)")

    def _sql(self, port: int, statements: str) -> str:
        result = subprocess.run([shutil.which("mariadb") or "mariadb", "-h", "127.0.0.1", "-P", str(port), "-u",
                                 "root", "-N", "-e", statements], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise DemoError(f"mariadb client: {result.stderr.strip()}")
        return result.stdout.strip()

    def query(self, port: int, review: int) -> str:
        return self._sql(port, f"SELECT Rating FROM test.ratings WHERE ReviewID = {review}")


class Redis(Database):
    name = "Redis"

    def start(self, stack: ExitStack, workdir: Path) -> None:
        log = workdir / "redis.log"
        process = _process(stack, [shutil.which("redis-server") or "redis-server", "--port", str(DATABASE_PORT),
                                   "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                           log)
        _wait_listening(DATABASE_PORT, process, "redis-server", log)
        with socket.create_connection(("127.0.0.1", DATABASE_PORT)) as conn:
            conn.sendall(b"SET rating:1 5\r\nSET rating:2 4\r\n")
            conn.recv(64)

    def query(self, port: int, review: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET rating:%d\r\n" % review)
            return conn.recv(64).decode().split("\r\n")[1]


class Embedded(Database):
    """A tiny ratings service in this process: `GET <review>` answers the rating."""

    name = "an embedded TCP ratings service (no MariaDB or Redis installed)"
    ratings = {1: 5, 2: 4}

    def start(self, stack: ExitStack, workdir: Path) -> None:
        import threading

        server = socket.create_server(("127.0.0.1", DATABASE_PORT))

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    request = conn.recv(64).decode().split()
                    rating = self.ratings.get(int(request[1]), 0) if len(request) == 2 else 0
                    conn.sendall(b"%d\n" % rating)

        threading.Thread(target=serve, daemon=True).start()
        stack.callback(server.close)

    def query(self, port: int, review: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET %d\n" % review)
            return conn.recv(64).decode().strip()


DATABASES = {"mariadb": MariaDB, "redis": Redis, "embedded": Embedded}
_NEEDS = {"mariadb": ("mariadbd", "mariadb-install-db", "mariadb"), "redis": ("redis-server",), "embedded": ()}


def choose_database(wanted: str = "auto") -> Database:
    """The one asked for, or the first installed of MariaDB, Redis, the embedded service."""
    for name in (DATABASES if wanted == "auto" else (wanted,)):
        missing = [tool for tool in _NEEDS[name] if shutil.which(tool) is None]
        if not missing:
            return DATABASES[name]()
        if wanted != "auto":
            raise DemoError(f"--database {name} needs {', '.join(missing)} (Debian: apt-get install "
                            f"{'mariadb-server mariadb-client' if name == 'mariadb' else 'redis-server'})")
    return Embedded()


def _prometheus(stack: ExitStack, workdir: Path, targets: list[Address]) -> int:
    binary = shutil.which("prometheus")
    if binary is None:
        raise DemoError("--prometheus needs the prometheus server (Debian: apt-get install prometheus)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "fastmesh", "metrics_path": "/stats/prometheus",
                            "static_configs": [{"targets": [str(t) for t in targets]}]}],
    }))
    log = workdir / "prometheus.log"
    process = _process(stack, [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], log)
    _wait_listening(port, process, "prometheus", log)
    return port


def promql(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


def sidecar_configs(mtls: bool, workdir: Path, progress: Callable[[str], None]) -> dict[str, SidecarConfig]:
    """ratings-v2's and the database's sidecars from the Istio files; with mtls, the
    ISTIO_MUTUAL rule instead of the plaintext one, and an identity for each (made by
    `fastmesh ca` in workdir) in place of the plaintext exchange."""
    rules = [MTLS_RULE if mtls and name == "destination-rule-mongodb.yaml" else name for name in MESH_FILES]
    files = {"ratings-v2": [*rules, "ratings-v2-sidecar.yaml"], "mongodb-v1": ["mongodb-v1-sidecar.yaml"]}
    if mtls:
        root = workdir / "mesh-root"
        ca.init(root)
    configs = {}
    for name, names in files.items():
        documents = load_documents([CONFIG / f for f in names])
        if mtls:
            namespace, account = IDENTITIES[name]
            progress(f"{name}: identity {ca.issue(root, namespace, account, workdir / name)}")
            documents = [_with_identity(d, workdir / name) if isinstance(d.spec, SidecarSpec) else d
                         for d in documents]
        configs[name] = plan(documents).sidecar
    return configs


def _with_identity(document: Document, certs: Path) -> Document:
    """The Sidecar document with `certs` set and the plaintext exchange off (Istio's
    exchange runs inside mTLS only)."""
    spec = document.spec
    exchange = spec.exchange.model_copy(update={"plaintext": False})
    return dataclasses.replace(document, spec=spec.model_copy(update={"certs": str(certs), "exchange": exchange}))


async def run(requests: int, with_prometheus: bool, database_name: str, out: TextIO,
              progress: Callable[[str], None], mtls: bool = False) -> int:
    database = choose_database(database_name)
    with tempfile.TemporaryDirectory(prefix="fastmesh-demo-") as tmp, ExitStack() as processes:
        workdir = Path(tmp)
        if mtls:
            progress(f"mutual TLS: {MTLS_RULE} (ISTIO_MUTUAL), a mesh root from `fastmesh ca init`")
        configs = sidecar_configs(mtls, workdir, progress)
        async with AsyncExitStack() as sidecars:
            progress(f"database: {database.name}, on 127.0.0.1:{DATABASE_PORT}")
            await asyncio.to_thread(database.start, processes, workdir)
            for name in ("mongodb-v1", "ratings-v2"):
                sidecar = Sidecar(configs[name])
                await sidecar.start()
                sidecars.push_async_callback(sidecar.stop, 0.0)
                listen = ", ".join(str(listener.address) for listener in sidecar.relay.listeners.values())
                progress(f"{name} sidecar: listening on {listen}, metrics on {sidecar.metrics_address}")
            metrics = [configs["ratings-v2"].metrics, configs["mongodb-v1"].metrics]
            prometheus = None
            if with_prometheus:
                prometheus = await asyncio.to_thread(_prometheus, processes, workdir, [m for m in metrics if m])
                progress(f"prometheus: http://127.0.0.1:{prometheus}, scraping both sidecars every second")
            progress(f"ratings-v2 sends {requests} queries to its database through 127.0.0.1:{CLIENT_PORT}")
            for i in range(requests):
                answer = await asyncio.to_thread(database.query, CLIENT_PORT, 1 + i % 2)
                if i < 2:
                    progress(f"  review {1 + i % 2}: rating {answer}")
            progress("waiting for the sidecars to report (tcpReportingDuration 1s)")
            await asyncio.sleep(2.5)
            texts = []
            for name, address in (("ratings-v2's sidecar (reporter=source)", metrics[0]),
                                  ("mongodb-v1's sidecar (reporter=destination)", metrics[1])):
                url = f"http://{address}/stats/prometheus"
                texts.append(await asyncio.to_thread(metrics_view.fetch, url))
                header, rows = metrics_view.tcp_rows(texts[-1], all_labels=mtls)
                if mtls:  # the principals and the security policy are what this branch shows
                    header, rows = _columns(header, rows, ("REPORTER", "SOURCE_PRINCIPAL", "DESTINATION_PRINCIPAL",
                                                           "CONNECTION_SECURITY_POLICY", "OPENED", "CLOSED"))
                out.write(f"\n{name}: {url}\n{metrics_view.format_table(header, rows)}")
            if prometheus is not None:
                await _answer_from_prometheus(prometheus, out, progress)
            else:
                _answer_from_sidecars(texts, out)
            progress("cleaning up: sidecars, database" + (", prometheus" if prometheus else ""))
    return 0


def _columns(header: list[str], rows: list[list[str]], keep: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    where = [header.index(name) for name in keep]
    return list(keep), [[row[i] for i in where] for row in rows]


def _answer_from_sidecars(texts: list[str], out: TextIO) -> None:
    """The task's two queries, answered from both sidecars' endpoints (no Prometheus
    here: its answer would add the scrape's instance and job labels)."""
    for query in QUERIES:
        out.write(f"\n{query}  (both sidecars' /stats/prometheus; Prometheus adds instance and job)\n")
        for text in texts:
            for labels, value in metrics_view.samples(text, query):
                out.write(metrics_view.console_line(query, labels, value) + "\n")


async def _answer_from_prometheus(port: int, out: TextIO, progress: Callable[[str], None]) -> None:
    progress("asking Prometheus the task's queries (it needs a few scrapes)")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(promql, port, QUERIES[0])
        if len({r["metric"].get("reporter") for r in result}) == 2:
            break
        await asyncio.sleep(1)
    for query in QUERIES:
        out.write(f"\n{query}  (Prometheus http://127.0.0.1:{port})\n")
        for series in await asyncio.to_thread(promql, port, query):
            out.write(metrics_view.console_line(query, series["metric"], float(series["value"][1])) + "\n")
