"""Istio's virtualOutbound: `fastmesh capture` in a pod's network namespace sends the app's
connections to the sidecar's port 15001, which picks each one's service by its original
destination (a ServiceEntry's address and port) and routes it as the VirtualService and
DestinationRule say; a destination no config knows goes to its own address as
PassthroughCluster. The app (another user) knows nothing of the proxy. Both engines, each test in
network namespaces of its own."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import IP, PEER, captured_sidecar, named_echo, netns_unavailable, scrape_pod, sh, stop_process
from fastmesh.config import load_documents, plan
from fastmesh.routing import PASSTHROUGH_CLUSTER

if netns_unavailable():
    pytest.skip(netns_unavailable(), allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SERVICE_IP = "10.96.0.20"  # the database's service address (a ClusterIP: nothing listens on it)
DATABASE_PORT, OUTSIDE_PORT = 27017, 8080  # in the peer namespace: the database, and a server no config knows

CONFIG = textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {{name: mongodb, namespace: default}}
    spec:
      hosts: [mongodb.default.svc.cluster.local]
      addresses: [{SERVICE_IP}]
      ports: [{{number: {DATABASE_PORT}, name: tcp-mongo, protocol: TCP}}]
      resolution: STATIC
      endpoints: [{{address: {PEER}, labels: {{app: mongodb, version: v1}}}}]
    ---
    apiVersion: fastmesh.io/v1alpha1
    kind: Sidecar
    metadata: {{name: ratings-v2, namespace: default}}
    spec:
      nodeMetadata: {{NAME: ratings-v2-1, NAMESPACE: default, WORKLOAD_NAME: ratings-v2,
                     LABELS: {{app: ratings, version: v2}}}}
      virtualOutbound: {{port: 15001}}
      metrics: 127.0.0.1:15090
      admin: null
      tcpReportingDuration: 500ms
    """)

# The app: any user but the sidecar's (here root's, below).
APP_UID = 1000
CLIENT = textwrap.dedent(f"""\
    import encodings.idna, os, socket, sys  # imported before the user change: uid {APP_UID} cannot read them
    os.setgroups([]); os.setgid({APP_UID}); os.setuid({APP_UID})
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
        c.sendall(b"ping\\n")
        answer = b""
        while chunk := c.recv(64):
            answer += chunk
    print(answer.decode().strip())
    """)

def test_the_virtual_outbound_listener_is_built_from_the_service_entries(tmp_path):
    (tmp_path / "sidecar.yaml").write_text(CONFIG)
    listener = plan(load_documents([str(tmp_path / "sidecar.yaml")]), resolve=False).sidecar.listeners[0]
    routes = listener.routes
    assert [(c.name, c.lb) for c in routes.clusters] == [
        (PASSTHROUGH_CLUSTER, "PASSTHROUGH"),
        (f"outbound|{DATABASE_PORT}||mongodb.default.svc.cluster.local", "ROUND_ROBIN")]
    assert routes.routes == ((0, 1),)  # any other destination: PassthroughCluster
    assert [(d.address, d.routes) for d in routes.destinations] == [((SERVICE_IP, DATABASE_PORT), ((1, 100),))]
    assert routes.clusters[1].endpoints == ((PEER, DATABASE_PORT),)
    assert (str(listener.listen), listener.direction) == ("127.0.0.1:15001", "outbound")


@pytest.fixture
def captured_pod(joined_netns, tmp_path):
    """(pod, peer): the database and an outside server in the peer namespace; in the pod,
    `fastmesh capture` and the sidecar with a virtual outbound listener."""
    pod, peer = joined_netns
    sh(IP, "-n", pod, "route", "add", "default", "via", PEER)  # the service address is routed off the pod
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG)
    servers = named_echo(peer, PEER, f"database:{DATABASE_PORT}", f"outside:{OUTSIDE_PORT}")
    try:
        with captured_sidecar(pod, config):
            yield pod, peer
    finally:
        stop_process(servers)


def connect(pod: str, host: str, port: int) -> str:
    return sh(IP, "netns", "exec", pod, sys.executable, "-c", CLIENT, host, str(port)).stdout.strip()


def tcp_series(pod: str) -> dict[str, dict]:
    """destination_service_name -> that series' labels and its opened/closed counts."""
    text = scrape_pod(pod)
    found: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
                entry = found.setdefault(sample.labels["destination_service_name"], {"labels": sample.labels})
                entry[sample.name.split("_")[3]] = sample.value
    return found


def test_captured_connections_are_routed_by_their_original_destination(captured_pod):
    pod, _ = captured_pod
    # The app dials the service address; the sidecar routes it to the ServiceEntry's endpoint.
    for _ in range(3):
        assert connect(pod, SERVICE_IP, DATABASE_PORT) == "database ping"
    # A destination no config knows: straight to it, through the sidecar, as PassthroughCluster.
    for _ in range(2):
        assert connect(pod, PEER, OUTSIDE_PORT) == "outside ping"
    deadline = time.monotonic() + 20
    while True:
        series = tcp_series(pod)
        counts = {name: (entry.get("opened"), entry.get("closed")) for name, entry in series.items()}
        if counts == {"mongodb": (3, 3), PASSTHROUGH_CLUSTER: (2, 2)} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts == {"mongodb": (3, 3), PASSTHROUGH_CLUSTER: (2, 2)}, json.dumps(counts)
    database, outside = series["mongodb"]["labels"], series[PASSTHROUGH_CLUSTER]["labels"]
    assert (database["reporter"], database["source_workload"], database["destination_service"]) == (
        "source", "ratings-v2", "mongodb.default.svc.cluster.local")
    assert (outside["reporter"], outside["source_workload"], outside["destination_service"],
            outside["response_flags"]) == ("source", "ratings-v2", "unknown", "-")
