"""A real Prometheus scrapes two fastmesh sidecars; its query API returns the exact
counts, byte totals and labels: the Istio TCP task's "enter
istio_tcp_connections_opened_total and Execute" step, done for real."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import MONGODB_V1, RATINGS_V2, free_port
from test_metrics_endpoint import config, hello_server, send_world
from fastmesh.routing import INBOUND, OUTBOUND

pytestmark = pytest.mark.bench_tools

CONNECTIONS = 7


@pytest.fixture
def prometheus(tmp_path):
    """start(targets) -> base URL of a Prometheus scraping those targets every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `bash ci/install-test-deps.sh` (README)")
    processes = []

    def start(targets: list[tuple[str, int]]) -> str:
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: fastmesh\n    metrics_path: /stats/prometheus\n"
            "    static_configs:\n      - targets: [%s]\n" % ", ".join('"%s:%d"' % t for t in targets)
        )
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
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(base: str, promql: str) -> list[dict]:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def by_reporter(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["reporter"]: float(r["value"][1]) for r in result}


def test_prometheus_sees_exact_counts_bytes_and_labels(upstream, sidecar, prometheus):
    server = upstream(hello_server)
    inbound = sidecar(config(server.address, INBOUND, MONGODB_V1, reporting_duration=1.0))
    outbound = sidecar(config(inbound.listen, OUTBOUND, RATINGS_V2, reporting_duration=1.0))
    base = prometheus([outbound.sidecar.metrics_address, inbound.sidecar.metrics_address])

    send_world(outbound.listen, CONNECTIONS)
    server.wait(CONNECTIONS)

    expected = {
        "istio_tcp_connections_opened_total": CONNECTIONS,
        "istio_tcp_connections_closed_total": CONNECTIONS,
        "istio_tcp_received_bytes_total": 6 * CONNECTIONS,
        "istio_tcp_sent_bytes_total": 12 * CONNECTIONS,
    }
    deadline = time.monotonic() + 60
    while True:
        seen = {name: by_reporter(query(base, name)) for name in expected}
        if all(seen[name] == {"source": value, "destination": value} for name, value in expected.items()):
            break
        assert time.monotonic() < deadline, f"Prometheus still answers {seen}"
        time.sleep(0.5)

    (opened,) = query(base, 'istio_tcp_connections_opened_total{reporter="destination"}')
    labels = opened["metric"]
    assert labels["job"] == "fastmesh"
    assert labels["instance"] == "%s:%d" % inbound.sidecar.metrics_address
    assert {k: labels[k] for k in (
        "destination_workload", "destination_app", "destination_version", "destination_service",
        "destination_service_name", "destination_service_namespace", "destination_canonical_service",
        "destination_canonical_revision", "request_protocol", "response_flags", "connection_security_policy",
    )} == {
        "destination_workload": "mongodb-v1", "destination_app": "mongodb", "destination_version": "v1",
        "destination_service": "mongodb.default.svc.cluster.local", "destination_service_name": "mongodb",
        "destination_service_namespace": "default", "destination_canonical_service": "mongodb",
        "destination_canonical_revision": "v1", "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": "none",
    }
    # The query a dashboard would use: bytes per source workload, from the client side.
    (sent,) = query(base, 'sum by (source_workload) (istio_tcp_sent_bytes_total{reporter="source"})')
    assert sent["metric"] == {"source_workload": "ratings-v2"} and float(sent["value"][1]) == 12 * CONNECTIONS
