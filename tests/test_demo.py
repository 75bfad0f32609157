"""`python -m fastmesh demo`: Istio's TCP metrics task end to end, with each database.
Every run takes its ports from a free range (--port-base), never the defaults, which
other tests and engineers on this machine use."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import free_port, wait_until

from fastmesh import demo_ports, demo_servers

DEMO = [sys.executable, "-m", "fastmesh", "demo"]
PORTS = len(demo_ports.PORTS)  # the demo's ports, Prometheus's included


def free_port_base(count: int = PORTS) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1, below the kernel's ephemeral
    range: a port in it may be taken by any connection's local end before the demo binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        base = random.randrange(10000, low - count)
        with ExitStack() as held:
            try:
                for port in range(base, base + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


def demo(*args: str, base: int | None = None) -> subprocess.CompletedProcess:
    """The demo run to its end, on the ports from `base` (by default, a free range)."""
    base = free_port_base() if base is None else base
    return subprocess.run([*DEMO, "--port-base", str(base), *args], capture_output=True, text=True, check=False,
                          timeout=120)


def request_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("==>   request ")]


def rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith(("source ", "destination "))]


def answers(stdout: str, query: str) -> dict[str, tuple[dict[str, str], str]]:
    """The series the demo lists for a query, `name{label="value",...} N`, by reporter."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith(query + "{"):
            inner, value = line[len(query) + 1:].rsplit("} ", 1)
            labels = dict(pair.split("=", 1) for pair in inner.split('",'))
            labels = {key: text.strip('"') for key, text in labels.items()}
            assert list(labels) == sorted(labels), line  # in order, as Prometheus lists them
            found[labels["reporter"]] = (labels, value)
    return found


@pytest.mark.parametrize("database, named", [
    ("embedded", "an embedded TCP ratings service"),
    ("redis", "Redis"),
    ("mariadb", "MariaDB (Bookinfo's ratings-v2-mysql path)"),
])
def test_the_demo_shows_both_reporters_with_the_peers_workloads(database, named):
    result = demo("--database", database, "--requests", "6")
    assert result.returncode == 0, result.stderr
    # Chosen explicitly, and said so (not "not installed"); one line per request.
    assert re.search(rf"^==> database: {re.escape(named)} on 127\.0\.0\.1:\d+ \(chosen with --database {database}\)$",
                     result.stderr, re.MULTILINE), result.stderr
    assert "not installed" not in result.stderr
    ratings = {1: 5, 2: 4}  # reviews 1 and 2 in turn
    assert request_lines(result.stderr) == [f"==>   request {i} of 6: review {2 - i % 2}, rating {ratings[2 - i % 2]}"
                                            for i in range(1, 7)]
    source, destination = rows(result.stdout)
    # REPORTER SOURCE_WORKLOAD DESTINATION_WORKLOAD DESTINATION_SERVICE_NAME RESPONSE_FLAGS OPENED CLOSED ...
    assert source[:7] == ["source", "ratings-v2", "mongodb-v1", "mongodb", "-", "6", "6"]
    assert destination[:7] == ["destination", "ratings-v2", "mongodb-v1", "mongodb", "-", "6", "6"]
    assert source[7:] == destination[7:] and int(source[7]) > 0  # the same bytes on both sides
    # The task's two queries, answered series by series.
    for query in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        series = answers(result.stdout, query)
        assert sorted(series) == ["destination", "source"]
        for labels, value in series.values():
            assert value == "6"
            assert (labels["source_workload"], labels["destination_workload"]) == ("ratings-v2", "mongodb-v1")
            assert labels["connection_security_policy"] == ("unknown" if labels["reporter"] == "source" else "none")
    assert "==> cleaning up" in result.stderr


def test_the_demo_along_the_mutual_tls_branch_shows_both_principals():
    result = demo("--database", "embedded", "--requests", "3", "--mtls")
    assert result.returncode == 0, result.stderr
    ratings, mongodb = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2", "spiffe://cluster.local/ns/default/sa/default"
    assert f"==> ratings-v2: identity {ratings}" in result.stderr
    assert len(request_lines(result.stderr)) == 3
    # REPORTER SOURCE_PRINCIPAL DESTINATION_PRINCIPAL CONNECTION_SECURITY_POLICY OPENED CLOSED
    assert rows(result.stdout) == [["source", ratings, mongodb, "unknown", "3", "3"],
                                   ["destination", ratings, mongodb, "mutual_tls", "3", "3"]]
    for query in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        series = answers(result.stdout, query)
        assert {reporter: (labels["source_principal"], labels["destination_principal"], labels["source_workload"],
                           value) for reporter, (labels, value) in series.items()} == {
            "source": (ratings, mongodb, "ratings-v2", "3"), "destination": (ratings, mongodb, "ratings-v2", "3")}


def test_the_demo_with_prometheus_prints_the_promql_answers():
    base = free_port_base()
    result = demo("--database", "embedded", "--requests", "3", "--prometheus", base=base)
    assert result.returncode == 0, result.stderr
    for query in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        series = answers(result.stdout, query)
        assert sorted(series) == ["destination", "source"]
        for labels, value in series.values():
            # Prometheus's answer: the sidecar's labels and the scrape's job and instance.
            assert (labels["job"], labels["source_workload"], labels["destination_workload"], value) == (
                "fastmesh", "ratings-v2", "mongodb-v1", "3")
        # The sidecars' metrics ports: --port-base + 4 and + 5.
        assert {labels["instance"] for labels, _ in series.values()} == {f"127.0.0.1:{base + 4}",
                                                                        f"127.0.0.1:{base + 5}"}


QUERIES = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total")


def promql(url: str, query: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query}), timeout=10) as page:
        return json.load(page)["data"]["result"]


def children(pid: int) -> dict[int, tuple[str, str]]:
    """The processes whose parent is `pid`, from /proc: pid -> (name, start time)."""
    found = {}
    for entry in Path("/proc").iterdir():
        started = _started(entry)
        if started is not None and started[1] == pid:
            found[int(entry.name)] = (started[0], started[2])
    return found


def _started(entry: Path) -> tuple[str, int, str] | None:
    """(name, parent, start time) of the process /proc/PID, or None if there is none."""
    try:
        stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
    except OSError:  # it has just exited
        return None
    if not stat:
        return None
    name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
    return name, int(fields[1]), fields[19]  # fields 3, 4 and 22 of proc(5)'s stat


def still_running(processes: dict[int, tuple[str, str]]) -> list[str]:
    """Those of `processes` that exist still (the same pid and start time)."""
    left = []
    for pid, (name, start) in processes.items():
        now = _started(Path(f"/proc/{pid}"))
        if now is not None and (now[0], now[2]) == (name, start):
            left.append(f"{name} ({pid})")
    return left


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_demo_keep_answers_through_its_prometheus_until_ctrl_c_and_leaves_nothing_behind(tmp_path):
    base, requests = free_port_base(), 5
    temp, cwd, out, err = tmp_path / "tmp", tmp_path / "cwd", tmp_path / "stdout", tmp_path / "stderr"
    temp.mkdir()
    cwd.mkdir()
    with open(out, "w") as stdout, open(err, "w") as stderr:  # TMPDIR: every temporary file it makes is in `temp`
        process = subprocess.Popen([*DEMO, "--database", "redis", "--requests", str(requests), "--prometheus",
                                    "--keep", "--port-base", str(base)], stdout=stdout, stderr=stderr, cwd=cwd,
                                   env={**os.environ, "TMPDIR": str(temp)})
    try:
        wait_until(lambda: "Everything keeps running" in out.read_text() or process.poll() is not None, 90)
        assert process.poll() is None, err.read_text()
        printed = out.read_text()
        url = re.search(r"^Prometheus: (\S+)$", printed, re.MULTILINE).group(1)
        assert url == f"http://127.0.0.1:{base + 7}"  # Prometheus's port is the last of --port-base's
        assert f"enter {QUERIES[0]}, click Execute" in printed and f"then the same with {QUERIES[1]}" in printed
        # The task's two queries, typed into the Prometheus it left running: both reporters, each
        # from its own sidecar's metrics port, every connection opened and closed.
        metrics_ports = {"source": base + 4, "destination": base + 5}
        for query in QUERIES:
            series = promql(url, query)
            assert sorted((s["metric"]["reporter"], s["metric"]["instance"], s["metric"]["source_workload"],
                           s["metric"]["destination_workload"], s["value"][1]) for s in series) == sorted(
                (reporter, f"127.0.0.1:{port}", "ratings-v2", "mongodb-v1", str(requests))
                for reporter, port in metrics_ports.items()), query
        # --port-base moved every port: all of base..base+7 are the demo's, and listen.
        assert [port for port in range(base, base + PORTS) if not listening(port)] == []
        assert f"==> ratings-v2 sidecar: listening on 127.0.0.1:{base + 1}, metrics on 127.0.0.1:{base + 4}, " \
               f"admin on 127.0.0.1:{base}" in err.read_text()
        assert f"==> mongodb-v1 sidecar: listening on 127.0.0.1:{base + 2}, metrics on 127.0.0.1:{base + 5}, " \
               f"admin on 127.0.0.1:{base + 3}" in err.read_text()
        assert f"==> database: Redis on 127.0.0.1:{base + 6}" in err.read_text()
        started = children(process.pid)
        assert sorted(name for name, _ in started.values()) == ["prometheus", "redis-server"]
        workdir = Path(re.search(r"removes (\S+)$", printed, re.MULTILINE).group(1))
        assert workdir.parent == temp and (workdir / "tsdb").is_dir()
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(60) == 0, err.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "==> SIGINT: stopping" in err.read_text()
    assert still_running(started) == []
    assert list(temp.iterdir()) == [] and list(cwd.iterdir()) == []
    assert [port for port in range(base, base + PORTS) if listening(port)] == []


def test_a_taken_port_of_port_base_is_refused_naming_it():
    base = free_port_base()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 6))
        taken.listen()
        result = demo("--database", "embedded", base=base)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"demo: port {base + 6} (--port-base {base} + 6, for the database) is in "
                                          "use; choose another --port-base")


def test_a_taken_default_port_is_replaced_by_a_free_one_and_the_message_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy, free = taken.getsockname()[1], free_port()
        table = (demo_ports.Port("client", busy, "ratings-v2's sidecar, where the app connects"),
                 demo_ports.Port("database", free, "the database"),
                 demo_ports.Port("prometheus", free_port(), "Prometheus"))  # left out without --prometheus
        messages: list[str] = []
        ports = demo_ports.choose(None, False, messages.append, table)
    assert ports["database"] == free and list(ports) == ["client", "database"]
    assert ports["client"] not in (busy, free)
    client = ports["client"]
    assert messages == [f"port {busy} is in use; using {client} for ratings-v2's sidecar, where the app connects"]


NO_MARIADB = "MariaDB is not installed (no mariadbd, mariadb-install-db, mariadb)"


@pytest.mark.parametrize("installed, chosen, why", [
    (["redis-server"], demo_servers.Redis, f"{NO_MARIADB}; --database auto found Redis (redis-server)"),
    ([], demo_servers.Embedded,
     f"{NO_MARIADB}; Redis is not installed (no redis-server); --database auto falls back to it"),
])
def test_database_auto_says_what_it_found(tmp_path, monkeypatch, installed, chosen, why):
    for program in installed:  # a PATH that has just these
        (tmp_path / program).symlink_to(shutil.which(program))
    monkeypatch.setenv("PATH", str(tmp_path))
    database, said = demo_servers.choose_database("auto")
    assert (type(database), said) == (chosen, why)
