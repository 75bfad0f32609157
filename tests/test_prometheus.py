"""A real Prometheus scrapes two fastmesh sidecars; its query API returns the exact
counts, byte totals and labels: the Istio TCP task's "enter
istio_tcp_connections_opened_total and Execute" step, done for real."""

from __future__ import annotations

import time

import pytest

from conftest import MONGODB_V1, RATINGS_V2, query
from test_metrics_endpoint import config, hello_server, send_world
from fastmesh.routing import INBOUND, OUTBOUND

pytestmark = pytest.mark.bench_tools

CONNECTIONS = 7


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
