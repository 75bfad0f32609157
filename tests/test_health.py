"""The health port a kubelet probes (Istio's 15021 /healthz/ready): 200 while the
listeners accept, 503 from the moment draining begins; set by the Sidecar kind's
`health` field or `serve --health`, off unless asked for, shown in /config_dump."""

from __future__ import annotations

import json
import socket
import textwrap
import threading
import urllib.error
import urllib.request

import pytest

from conftest import one_listener, wait_until
from fastmesh.addr import Address
from fastmesh.cli import _config, build_parser
from fastmesh.config import ConfigError, load_documents, plan

LOOPBACK_ANY_PORT = Address("127.0.0.1", 0)


def get(address: Address, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_ready_is_200_while_listening_and_503_while_draining(upstream, sidecar):
    release = threading.Event()

    def hold(conn: socket.socket) -> None:
        conn.sendall(conn.recv(5))
        release.wait(20)

    server = upstream(hold)
    running = sidecar(one_listener(LOOPBACK_ANY_PORT, [server.address], admin=LOOPBACK_ANY_PORT, metrics=None,
                                   health=LOOPBACK_ANY_PORT))
    health, admin = running.sidecar.health_address, running.sidecar.admin_address
    assert health.port != admin.port
    assert get(health, "/healthz/ready") == (200, "")
    assert get(admin, "/ready") == (200, "LIVE\n")  # the same condition, on both ports
    assert json.loads(get(admin, "/config_dump")[1])["health"] == f"http://{health}/healthz/ready"
    assert get(health, "/ready")[0] == 404  # the health port serves nothing else

    client = socket.create_connection(running.listen)
    client.sendall(b"hello")
    assert client.recv(5, socket.MSG_WAITALL) == b"hello"
    # SIGTERM's path: stop accepting, then drain the open connection for up to 20 s.
    stopping = threading.Thread(target=running.stop, kwargs={"drain_timeout": 20.0})
    stopping.start()
    try:
        wait_until(lambda: get(health, "/healthz/ready")[0] == 503)
        assert get(health, "/healthz/ready") == (503, "not ready: no listener accepting\n")
        assert get(admin, "/ready") == (503, "NOT READY\n")
    finally:
        release.set()  # both ends close: the drain ends there
        client.close()
        stopping.join(30)
    assert not stopping.is_alive()


def sidecar_document(tmp_path, extra: str = "") -> list:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: fastmesh.io/v1alpha1
        kind: Sidecar
        metadata: {name: ratings-v2}
        spec:
          outbound: [{port: 15001, host: 127.0.0.1, servicePort: 27017}]
        """) + extra)
    return load_documents([path])


@pytest.mark.parametrize("field, expected", [
    ("", None),  # off unless asked for: two sidecars on one machine would both want 15021
    ("  health: 0.0.0.0:15021\n", Address("0.0.0.0", 15021)),
    ("  health: '[::]:15021'\n", Address("::", 15021)),
    ("  health: null\n", None),
])
def test_the_sidecar_kind_sets_the_health_address(tmp_path, field, expected):
    assert plan(sidecar_document(tmp_path, field), resolve=False).sidecar.health == expected


def test_a_bad_health_address_is_refused_with_its_field(tmp_path):
    with pytest.raises(ConfigError, match=r"sidecar\.yaml.*spec\.health: .*15021x"):
        plan(sidecar_document(tmp_path, "  health: 0.0.0.0:15021x\n"), resolve=False)


@pytest.mark.parametrize("flags, expected", [
    ([], None),
    (["--health", "0.0.0.0:15021"], Address("0.0.0.0", 15021)),
])
def test_serve_health_flag(flags, expected):
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:15001", "--upstream", "127.0.0.1:6379",
                                      *flags])
    assert _config(args).health == expected
