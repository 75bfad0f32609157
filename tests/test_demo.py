"""`python -m fastmesh demo`: Istio's TCP metrics task end to end, with each database."""

from __future__ import annotations

import subprocess
import sys

import pytest


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmesh", "demo", *args], capture_output=True, text=True,
                          timeout=120)


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
    assert f"==> database: {named}" in result.stderr
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
    # REPORTER SOURCE_PRINCIPAL DESTINATION_PRINCIPAL CONNECTION_SECURITY_POLICY OPENED CLOSED
    assert rows(result.stdout) == [["source", ratings, mongodb, "unknown", "3", "3"],
                                   ["destination", ratings, mongodb, "mutual_tls", "3", "3"]]
    for query in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        series = answers(result.stdout, query)
        assert {reporter: (labels["source_principal"], labels["destination_principal"], labels["source_workload"],
                           value) for reporter, (labels, value) in series.items()} == {
            "source": (ratings, mongodb, "ratings-v2", "3"), "destination": (ratings, mongodb, "ratings-v2", "3")}


def test_the_demo_with_prometheus_prints_the_promql_answers():
    result = demo("--database", "embedded", "--requests", "3", "--prometheus")
    assert result.returncode == 0, result.stderr
    for query in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
        series = answers(result.stdout, query)
        assert sorted(series) == ["destination", "source"]
        for labels, value in series.values():
            # Prometheus's answer: the sidecar's labels and the scrape's job and instance.
            assert (labels["job"], labels["source_workload"], labels["destination_workload"], value) == (
                "fastmesh", "ratings-v2", "mongodb-v1", "3")
        assert {labels["instance"] for labels, _ in series.values()} == {"127.0.0.1:15090", "127.0.0.1:15091"}
