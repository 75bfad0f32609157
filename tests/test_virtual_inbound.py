"""Istio's virtualInbound: `fastmesh capture` in a pod's network namespace sends every TCP
connection that reaches the pod to the sidecar's port 15006, which hands it to the app on the
port the client meant, with that port's PeerAuthentication mode; a port no Service names still
reaches the app, as InboundPassthroughClusterIpv4. Clients in another namespace dial the pod's
address and know nothing of the proxy. Both engines, each test in network namespaces of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import IP, POD, captured_sidecar, named_echo, netns_unavailable, scrape_pod, sh, stop_process
from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.routing import INBOUND_PASSTHROUGH_CLUSTER

if netns_unavailable():
    pytest.skip(netns_unavailable(), allow_module_level=True)

DATABASE_PORT, ADMIN_PORT = 27017, 9000  # the app's ports: the first a Service names, the second none does

CONFIG = textwrap.dedent(f"""\
    apiVersion: security.istio.io/v1beta1
    kind: PeerAuthentication
    metadata: {{name: mongodb, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: mongodb}}}}
      mtls: {{mode: PERMISSIVE}}
      portLevelMtls: {{{DATABASE_PORT}: {{mode: STRICT}}}}
    ---
    apiVersion: fastmesh.io/v1alpha1
    kind: Sidecar
    metadata: {{name: mongodb, namespace: default}}
    spec:
      nodeMetadata: {{NAME: mongodb-v1-0, NAMESPACE: default, WORKLOAD_NAME: mongodb-v1,
                     LABELS: {{app: mongodb, version: v1}}}}
      virtualInbound:
        ports: [{{port: {DATABASE_PORT}, service: mongodb}}]
        interceptionMode: MODE
      certs: CERTS
      metrics: 127.0.0.1:15090
      admin: null
      tcpReportingDuration: 500ms
    """)

# A client in the peer namespace: plaintext, or mTLS with the identity in a certificate directory.
CLIENT = textwrap.dedent("""\
    import socket, ssl, sys
    host, port = sys.argv[1], int(sys.argv[2])
    c = socket.create_connection((host, port), timeout=20)
    if len(sys.argv) > 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(sys.argv[3] + "/root-cert.pem")
        ctx.load_cert_chain(sys.argv[3] + "/cert-chain.pem", sys.argv[3] + "/key.pem")
        ctx.set_alpn_protocols(["istio"])
        c = ctx.wrap_socket(c)
    try:
        c.sendall(b"ping\\n")
        answer = b""
        while chunk := c.recv(64):
            answer += chunk
    except (ConnectionResetError, ssl.SSLError) as exc:
        answer = b"refused"
    print(answer.decode().strip() or "closed")
    """)

def sidecar_config(tmp_path: Path, certs: Path, mode: str = "REDIRECT") -> Path:
    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG.replace("CERTS", str(certs)).replace("MODE", mode))
    return config


def test_the_virtual_inbound_listener_is_built_from_the_app_ports(tmp_path, mesh_certs):
    config = sidecar_config(tmp_path, mesh_certs.identity("default", "mongodb"))
    sidecar = plan(load_documents([str(config)]), resolve=False).sidecar
    listener = sidecar.listeners[0]
    routes = listener.routes
    assert [(c.name, c.lb, c.endpoints) for c in routes.clusters] == [
        (INBOUND_PASSTHROUGH_CLUSTER, "LOCAL_PASSTHROUGH", ()),
        (f"inbound|{DATABASE_PORT}||mongodb.default.svc.cluster.local", "ROUND_ROBIN",
         (("127.0.0.1", DATABASE_PORT),))]
    assert routes.routes == ((0, 1),)  # any other port: to the app on that port
    assert [(d.address, d.routes, d.mtls) for d in routes.destinations] == [
        (("0.0.0.0", DATABASE_PORT), ((1, 1),), "STRICT")]
    assert (str(listener.listen), listener.direction, listener.mtls) == ("0.0.0.0:15006", "inbound", "PERMISSIVE")
    tls = sidecar.listener_tls(listener)
    assert (tls.mode, tls.destination_modes) == ("PERMISSIVE", ("STRICT",))
    assert listener.transparent is False


def test_tproxy_interception_makes_the_listener_transparent_and_needs_a_capability(tmp_path, mesh_certs):
    config = sidecar_config(tmp_path, mesh_certs.identity("default", "mongodb"), "TPROXY")
    assert plan(load_documents([str(config)]), resolve=False).sidecar.listeners[0].transparent is True
    # Without CAP_NET_RAW and CAP_NET_ADMIN (root, but not those), serve says what it needs.
    drop = ("setpriv", "--bounding-set", "-net_raw,-net_admin", "--inh-caps", "-net_raw,-net_admin")
    result = subprocess.run([*drop, sys.executable, "-m", "fastmesh", "serve", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "interceptionMode TPROXY needs CAP_NET_RAW or CAP_NET_ADMIN (IP_TRANSPARENT)" in result.stderr
    bad = config.read_text().replace("interceptionMode: TPROXY", "interceptionMode: NONE")
    config.write_text(bad)
    with pytest.raises(ConfigError, match="interceptionMode"):
        plan(load_documents([str(config)]), resolve=False)


@pytest.fixture(params=["REDIRECT", "TPROXY"])
def captured_pod(request, joined_netns, tmp_path, mesh_certs):
    """(pod, peer): in the pod, the app on two ports (127.0.0.1), `fastmesh capture` (-m
    REDIRECT or TPROXY) and the sidecar with a virtual inbound listener in the same mode; the
    peer namespace dials the pod's address."""
    pod, peer = joined_netns
    config = sidecar_config(tmp_path, mesh_certs.identity("default", "mongodb"), request.param)
    app = named_echo(pod, "127.0.0.1", f"database:{DATABASE_PORT}", f"admin:{ADMIN_PORT}")
    try:
        with captured_sidecar(pod, config, ("-m", request.param)):
            yield pod, peer
    finally:
        stop_process(app)


def connect(peer: str, port: int, certs: Path | None = None) -> str:
    argv = [IP, "netns", "exec", peer, sys.executable, "-c", CLIENT, POD, str(port)]
    return sh(*argv, *([str(certs)] if certs else [])).stdout.strip()


def tcp_series(pod: str) -> dict[tuple[str, str], dict]:
    """(destination_service_name, connection_security_policy) -> labels and opened/closed counts,
    summed over the key's series; two series under one key (labels that differ elsewhere) fail
    here, naming both label sets."""
    text = scrape_pod(pod)
    found: dict[tuple[str, str], dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"):
                key = (sample.labels["destination_service_name"], sample.labels["connection_security_policy"])
                entry = found.setdefault(key, {"labels": sample.labels})
                assert entry["labels"] == sample.labels, f"two series for {key}: {entry['labels']} and {sample.labels}"
                counter = sample.name.split("_")[3]
                entry[counter] = entry.get(counter, 0) + sample.value
    return found


def test_captured_connections_reach_the_app_on_their_original_port(captured_pod, mesh_certs):
    pod, peer = captured_pod
    client = mesh_certs.identity("default", "ratings")
    # The Service's port is STRICT: an mTLS client reaches it, a plaintext one is refused.
    for _ in range(2):
        assert connect(peer, DATABASE_PORT, client) == "database ping"
    assert connect(peer, DATABASE_PORT) in ("refused", "closed")
    # A port no Service names: PERMISSIVE (the policy's mode), to the app on that port.
    for _ in range(3):
        assert connect(peer, ADMIN_PORT) == "admin ping"
    assert connect(peer, ADMIN_PORT, client) == "admin ping"
    expected = {("mongodb", "mutual_tls"): (2, 2), (INBOUND_PASSTHROUGH_CLUSTER, "none"): (3, 3),
                (INBOUND_PASSTHROUGH_CLUSTER, "mutual_tls"): (1, 1)}
    deadline = time.monotonic() + 20
    while True:
        series = tcp_series(pod)
        counts = {key: (entry.get("opened"), entry.get("closed")) for key, entry in series.items()}
        if counts == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts == expected  # the refused plaintext client never reached the app: no series
    database = series[("mongodb", "mutual_tls")]["labels"]
    assert (database["reporter"], database["destination_workload"], database["destination_service"],
            database["source_principal"], database["destination_principal"]) == (
        "destination", "mongodb-v1", "mongodb.default.svc.cluster.local",
        mesh_certs.spiffe("default", "ratings"), mesh_certs.spiffe("default", "mongodb"))
    other = series[(INBOUND_PASSTHROUGH_CLUSTER, "none")]["labels"]
    assert (other["reporter"], other["destination_service"], other["source_workload"]) == (
        "destination", "unknown", "unknown")
