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
    assert "==> cleaning up" in result.stderr


def test_the_demo_with_prometheus_prints_the_promql_answers():
    result = demo("--database", "embedded", "--requests", "3", "--prometheus")
    assert result.returncode == 0, result.stderr
    for reporter in ("source", "destination"):
        assert (f'istio_tcp_connections_opened_total{{reporter="{reporter}", source_workload="ratings-v2", '
                f'destination_workload="mongodb-v1", destination_service_name="mongodb"}} 3') in result.stdout
