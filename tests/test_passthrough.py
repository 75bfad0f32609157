"""DestinationRule `loadBalancer: PASSTHROUGH`: each connection goes where its client
meant it to go before iptables REDIRECT sent it to the sidecar. Runs in two network
namespaces of its own (a client, and a pod with the sidecar and the service), with
both engines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ENGINE_MODULES

SERVICE_IP = "10.77.0.1"  # the service's address, on the loopback of the sidecar's namespace
CLIENT_NET, SIDECAR_NET = "10.78.0.1", "10.78.0.2"  # the two ends of the veth between the namespaces
SETUP_HINT = "needs root, iproute2 and iptables (the README's test set-up installs iptables)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None or os.geteuid() != 0:
        pytest.fail(f"{name}: {SETUP_HINT}")
    return path


def sh(*argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result


@pytest.fixture
def namespaces():
    """(client namespace, sidecar namespace) as `ip netns exec` prefixes. Connections from
    the client to SERVICE_IP:7000 are captured into the sidecar's port 15001 as Istio's
    inbound capture does (nat PREROUTING REDIRECT); the sidecar's own connections are not."""
    ip, iptables = tool("ip"), tool("iptables")
    client, pod = f"fm-pt-client-{os.getpid()}", f"fm-pt-pod-{os.getpid()}"
    try:
        sh(ip, "netns", "add", client)
        sh(ip, "netns", "add", pod)
        sh(ip, "link", "add", "fmpt-c", "netns", client, "type", "veth", "peer", "name", "fmpt-p", "netns", pod)
        for name, commands in (
            (client, [["link", "set", "lo", "up"], ["addr", "add", f"{CLIENT_NET}/24", "dev", "fmpt-c"],
                      ["link", "set", "fmpt-c", "up"], ["route", "add", f"{SERVICE_IP}/32", "via", SIDECAR_NET]]),
            (pod, [["link", "set", "lo", "up"], ["addr", "add", f"{SIDECAR_NET}/24", "dev", "fmpt-p"],
                   ["link", "set", "fmpt-p", "up"], ["addr", "add", f"{SERVICE_IP}/32", "dev", "lo"]]),
        ):
            for command in commands:
                sh(ip, "-n", name, *command)
        sh(ip, "netns", "exec", pod, iptables, "-t", "nat", "-A", "PREROUTING", "-i", "fmpt-p", "-p", "tcp",
           "-d", SERVICE_IP, "--dport", "7000", "-j", "REDIRECT", "--to-ports", "15001")
        yield [ip, "netns", "exec", client], [ip, "netns", "exec", pod]
    finally:
        for name in (client, pod):
            subprocess.run([ip, "netns", "del", name], capture_output=True)


BACKEND = textwrap.dedent(f"""
    import socket
    server = socket.create_server(("{SERVICE_IP}", 7000))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"backend:" + conn.recv(64))
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
            conn.sendall(b"hi")
            print(conn.recv(64))
    except ConnectionResetError:
        print(b"")
    except OSError as exc:  # the sidecar is not listening yet
        print(type(exc).__name__)
""")

SCRAPE = textwrap.dedent("""
    import urllib.request
    print(urllib.request.urlopen("http://127.0.0.1:15090/stats/prometheus", timeout=10).read().decode())
""")


def config(directory: Path) -> Path:
    path = directory / "passthrough.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: external}
        spec:
          host: external.example.com
          trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
        ---
        apiVersion: fastmesh.io/v1alpha1
        kind: Sidecar
        metadata: {name: app}
        spec:
          nodeMetadata: {NAME: app-0, NAMESPACE: default, WORKLOAD_NAME: app, LABELS: {app: app}}
          outbound: [{port: 15001, bind: 0.0.0.0, host: external.example.com}]
          metrics: 127.0.0.1:15090
          admin: null
          tcpReportingDuration: 500ms
    """))
    return path


@pytest.mark.parametrize("engine", sorted(ENGINE_MODULES))
def test_passthrough_connects_to_the_original_destination(namespaces, engine, tmp_path):
    client_ns, pod_ns = namespaces
    env = dict(os.environ, **({"FASTMESH_NO_EXTENSIONS": "1"} if engine == "python" else {}))
    backend = subprocess.Popen([*pod_ns, sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True)
    sidecar = subprocess.Popen([*pod_ns, sys.executable, "-m", "fastmesh", "serve", "-c", str(config(tmp_path))],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert backend.stdout is not None and backend.stdout.readline() == "ready\n"

        def client(host: str, port: int) -> str:
            return sh(*client_ns, sys.executable, "-c", CLIENT, host, str(port)).stdout.strip()

        deadline = time.monotonic() + 30
        while (answer := client(SERVICE_IP, 7000)) != "b'backend:hi'" and time.monotonic() < deadline:
            assert sidecar.poll() is None, sidecar.stdout.read() if sidecar.stdout else ""
            time.sleep(0.2)  # until the sidecar listens (before that, the captured connect is refused)
        assert answer == "b'backend:hi'"
        # Straight to the sidecar's own port: no original destination to go to (UH).
        assert client(SIDECAR_NET, 15001) == "b''"
        flags: list[str] = []
        while time.monotonic() < deadline:
            text = sh(*pod_ns, sys.executable, "-c", SCRAPE).stdout
            flags = [line for line in text.splitlines() if line.startswith("istio_tcp_connections_closed_total{")]
            if any('response_flags="UH"' in line for line in flags):
                break
            time.sleep(0.2)
        assert any('response_flags="-"' in line and 'destination_service="external.example.com"' in line
                   for line in flags), flags
        assert any('response_flags="UH"' in line and line.endswith(" 1") for line in flags), flags
    finally:
        for process in (sidecar, backend):
            process.terminate()
            process.wait(10)
