"""The servers `fastmesh demo` runs besides the sidecars: the database behind the inbound
sidecar (MariaDB, Redis or an embedded service) and Prometheus. Each is started on an
ExitStack that stops it, with its files in the demo's working directory."""

from __future__ import annotations

import abc
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from fastmesh.addr import Address

RATINGS = {1: 5, 2: 4}  # review → rating, as Bookinfo's ratings data has them


class DemoError(RuntimeError):
    """Something the demo needs is missing or busy; the message says what to do."""


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


class Database(abc.ABC):
    """The database behind the inbound sidecar, and a client for ratings-v2's queries."""

    name = ""
    product = ""  # the server's own name, for "found" and "not installed"
    needs: tuple[str, ...] = ()  # the programs it runs
    package = ""  # the Debian packages that have them

    @abc.abstractmethod
    def start(self, stack: ExitStack, workdir: Path, port: int) -> None:
        """Start it on 127.0.0.1:`port` with the ratings; `stack` stops it."""

    @abc.abstractmethod
    def query(self, port: int, review: int) -> str:
        """One connection to `port` asking for a review's rating; the rating."""

    @abc.abstractmethod
    def example(self, port: int) -> str:
        """A shell command that sends one query to `port`, for the user to try."""


class MariaDB(Database):
    """Bookinfo's ratings-v2-mysql path: a ratings table, queried per review."""

    name = "MariaDB (Bookinfo's ratings-v2-mysql path)"
    product = "MariaDB"
    needs = ("mariadbd", "mariadb-install-db", "mariadb")
    package = "mariadb-server mariadb-client"

    def start(self, stack: ExitStack, workdir: Path, port: int) -> None:
        datadir = workdir / "mariadb"
        subprocess.run([shutil.which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
                        f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        log = workdir / "mariadbd.log"
        process = _process(stack, [shutil.which("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={datadir}",
                                   f"--tmpdir={workdir}", "--user=root", f"--port={port}", "--bind-address=127.0.0.1",
                                   f"--socket={datadir}/mariadb.sock", "--skip-log-bin", "--skip-name-resolve",
                                   "--innodb-buffer-pool-size=16M"], log)
        _wait_listening(port, process, "mariadbd", log)
        # The data, loaded straight into the database (not through the mesh), as Bookinfo's image does.
        rows = ", ".join(f"({review}, {rating})" for review, rating in RATINGS.items())
        self._sql(port, "CREATE DATABASE test; CREATE TABLE test.ratings (ReviewID INT PRIMARY KEY, Rating INT); "
                        f"INSERT INTO test.ratings VALUES {rows}")

    def _sql(self, port: int, statements: str) -> str:
        result = subprocess.run([shutil.which("mariadb") or "mariadb", "-h", "127.0.0.1", "-P", str(port), "-u",
                                 "root", "-N", "-e", statements], capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            raise DemoError(f"mariadb client: {result.stderr.strip()}")
        return result.stdout.strip()

    def query(self, port: int, review: int) -> str:
        return self._sql(port, f"SELECT Rating FROM test.ratings WHERE ReviewID = {review}")

    def example(self, port: int) -> str:
        return f"mariadb -h 127.0.0.1 -P {port} -u root -e 'SELECT Rating FROM test.ratings WHERE ReviewID = 1'"


class Redis(Database):
    name = "Redis"
    product = "Redis"
    needs = ("redis-server",)
    package = "redis-server"

    def start(self, stack: ExitStack, workdir: Path, port: int) -> None:
        log = workdir / "redis.log"
        process = _process(stack, [shutil.which("redis-server") or "redis-server", "--port", str(port),
                                   "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                           log)
        _wait_listening(port, process, "redis-server", log)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"".join(b"SET rating:%d %d\r\n" % pair for pair in RATINGS.items()))
            conn.recv(64)

    def query(self, port: int, review: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET rating:%d\r\n" % review)
            return conn.recv(64).decode().split("\r\n")[1]

    def example(self, port: int) -> str:
        return f"redis-cli -p {port} get rating:1"


class Embedded(Database):
    """A tiny ratings service in this process: `GET <review>` answers the rating."""

    name = "an embedded TCP ratings service"

    def start(self, stack: ExitStack, workdir: Path, port: int) -> None:
        server = socket.create_server(("127.0.0.1", port))

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    request = conn.recv(64).decode().split()
                    rating = RATINGS.get(int(request[1]), 0) if len(request) == 2 else 0
                    conn.sendall(b"%d\n" % rating)

        def close() -> None:
            with contextlib.suppress(OSError):  # shutdown() wakes serve's accept(), close() alone does not
                server.shutdown(socket.SHUT_RDWR)
            server.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        stack.callback(thread.join, 5)
        stack.callback(close)

    def query(self, port: int, review: int) -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET %d\n" % review)
            return conn.recv(64).decode().strip()

    def example(self, port: int) -> str:
        return (f"python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
                f"s.sendall(b'GET 1\\n'); print(s.recv(64).decode())\"")


DATABASES = {"mariadb": MariaDB, "redis": Redis, "embedded": Embedded}


def _missing(database: type[Database]) -> list[str]:
    return [tool for tool in database.needs if shutil.which(tool) is None]


def choose_database(wanted: str = "auto") -> tuple[Database, str]:
    """The one asked for, or the first installed of MariaDB, Redis, the embedded service;
    and why it is the one, for the user."""
    if wanted != "auto":
        database = DATABASES[wanted]
        missing = _missing(database)
        if missing:
            raise DemoError(f"--database {wanted} needs {', '.join(missing)} (Debian: apt-get install "
                            f"{database.package})")
        return database(), f"chosen with --database {wanted}"
    reasons = []
    for name in ("mariadb", "redis"):
        database = DATABASES[name]
        missing = _missing(database)
        if not missing:
            return database(), "; ".join([*reasons, f"--database auto found {database.product} ({database.needs[0]})"])
        reasons.append(f"{database.product} is not installed (no {', '.join(missing)})")
    return Embedded(), "; ".join([*reasons, "--database auto falls back to it"])


def start_prometheus(stack: ExitStack, workdir: Path, port: int, targets: list[Address]) -> None:
    """Prometheus on 127.0.0.1:`port`, scraping each target's /stats/prometheus every second,
    its data in workdir."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise DemoError("--prometheus needs the prometheus server (Debian: apt-get install prometheus)")
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
