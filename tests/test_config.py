"""Config files: Istio's samples load unchanged, every malformed config gets its
own precise error, and a sidecar built from Istio's kinds routes as they say."""

from __future__ import annotations

import collections
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_until
from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.defaults import DEFAULTS
from fastmesh.routing import RouteTable

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "tests" / "fixtures" / "istio").glob("*.yaml"))
BOOKINFO = ROOT / "src" / "fastmesh" / "bookinfo"


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def fastmesh(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmesh", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def problems(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        plan(load_documents([path]))
    return str(caught.value)


def test_istios_samples_load_unchanged():
    documents = load_documents(SAMPLES)
    assert collections.Counter(d.kind for d in documents) == {"DestinationRule": 9, "VirtualService": 2, "Gateway": 1}
    ratings = next(d.spec for d in documents if d.kind == "DestinationRule" and d.name == "ratings")
    assert [s.name for s in ratings.subsets] == ["v1", "v2", "v2-mysql", "v2-mysql-vm"]


DR = """\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: db}
spec:
"""
VS = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db]
"""
SIDECAR = """\
apiVersion: fastmesh.io/v1alpha1
kind: Sidecar
metadata: {name: app}
spec:
"""


@pytest.mark.parametrize("text, message", [
    ("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRul\nmetadata: {name: x}\nspec: {}\n",
     "document 0: kind: 'DestinationRul' is not a networking.istio.io kind fastmesh reads"),
    ("apiVersion: networking.istio.io/v2\nkind: DestinationRule\nmetadata: {name: x}\nspec: {}\n",
     "document 0: apiVersion: 'networking.istio.io/v2' is not supported"),
    ("kind: DestinationRule\nmetadata: {name: x}\nspec: {}\n",
     "document 0: apiVersion: expected GROUP/VERSION such as networking.istio.io/v1beta1, got None"),
    ("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: x}\nspecs: {}\n",
     "document 0: specs: unknown field (did you mean 'spec'?)"),
    ("apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {}\nspec: {host: a}\n",
     "document 0 (DestinationRule): metadata.name: Field required"),
    ("- just\n- a list\n", "document 0: expected a mapping with apiVersion, kind, metadata and spec, got list"),
    ("spec: [unclosed\n", "not valid YAML"),
    (DR + "  host: db\n  subset:\n  - name: v1\n",
     "document 0 (DestinationRule db): spec.subset: unknown field (did you mean 'subsets'?)"),
    (DR + "  subsets: []\n", "(DestinationRule db): spec.host: required field is missing"),
    (DR + "  host: db\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBINN\n",
     "spec.trafficPolicy.loadBalancer.simple: Input should be 'ROUND_ROBIN', 'LEAST_CONN', 'RANDOM', "
     "'PASSTHROUGH', 'LEAST_REQUEST' or 'UNSPECIFIED', got 'ROUND_ROBINN'"),
    (DR + "  host: db\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: -1\n",
     "spec.trafficPolicy.connectionPool.tcp.maxConnections: Input should be greater than or equal to 0, got -1"),
    (DR + "  host: db\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        connectTimeout: '5'\n",
     "spec.trafficPolicy.connectionPool.tcp.connectTimeout: '5' is not a duration"),
    (DR + "  host: db\n  subsets:\n  - labels: {version: v1}\n",
     "spec.subsets[0].name: required field is missing"),
    (DR + "  host: db\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUA\n",
     "spec.trafficPolicy.tls.mode: Input should be 'DISABLE', 'SIMPLE', 'MUTUAL' or 'ISTIO_MUTUAL', "
     "got 'ISTIO_MUTUA'"),
    (VS + "  tcp:\n  - match: [{port: 27017}]\n", "(VirtualService db): spec.tcp[0].route: required field is missing"),
    (VS + "  tcp:\n  - route:\n    - destination: {host: db}\n      weight: 150\n",
     "spec.tcp[0].route[0].weight: Input should be less than or equal to 100, got 150"),
    (VS + "  tcp:\n  - match: [{port: 70000}]\n    route:\n    - destination: {host: db}\n",
     "spec.tcp[0].match[0].port: Input should be less than or equal to 65535, got 70000"),
    (VS + "  tcp:\n  - route:\n    - destination: {host: db, port: {number: abc}}\n",
     "spec.tcp[0].route[0].destination.port.number: Input should be a valid integer, unable to parse string "
     "as an integer, got 'abc'"),
    (VS + "  tcp:\n  - route:\n    - destination: {hots: db}\n",
     "spec.tcp[0].route[0].destination.hots: unknown field (did you mean 'host'?)"),
    ("apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n"
     "  ports: [{number: 1, name: p}]\n", "(ServiceEntry s): spec.hosts: required field is missing"),
    ("apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n"
     "  hosts: [s]\n  resolution: MAGIC\n",
     "spec.resolution: Input should be 'NONE', 'STATIC', 'DNS' or 'DNS_ROUND_ROBIN', got 'MAGIC'"),
    (SIDECAR + "  outbound:\n  - {port: -1, host: db}\n",
     "(Sidecar app): spec.outbound[0].port: Input should be greater than or equal to 0, got -1"),
    (SIDECAR + "  tcpReportingDuration: fast\n  inbound: [{port: 1, targetPort: 2}]\n",
     "spec.tcpReportingDuration: 'fast' is not a duration"),
    (SIDECAR + "  nodeMetadata: {LABELS: {version: 2}}\n  inbound: [{port: 1, targetPort: 2}]\n",
     "(Sidecar app): spec.nodeMetadata: LABELS must be a map of strings to strings"),
    (SIDECAR + "  inbound: []\n", "(Sidecar app): spec: a sidecar needs at least one inbound or outbound listener"),
    (SIDECAR + "  outbound: [{port: 1, host: db}]\n---\n" + VS
     + "  tcp:\n  - route:\n    - destination: {host: db, subset: a}\n      weight: 50\n"
     + "    - destination: {host: db, subset: b}\n      weight: 40\n",
     "document 1 (VirtualService db): a tcp route with several destinations needs weights adding up to 100, "
     "got [50, 40]"),
    (DR + "  host: db\n  subsets: {}\n", "(DestinationRule db): spec.subsets: Input should be a valid list"),
    # A problem two documents share is named by the one that says it, then the other.
    (SIDECAR + "  outbound: [{port: 1, host: db}]\n---\n" + DR
     + "  host: db\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n",
     "document 1 (DestinationRule db): the DestinationRule for db.default.svc.cluster.local says ISTIO_MUTUAL: the "
     "Sidecar needs certs (a directory with cert-chain.pem, key.pem, root-cert.pem), "),
    (SIDECAR + "  inbound: [{port: 1, targetPort: 2}]\n---\napiVersion: security.istio.io/v1beta1\n"
     "kind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: STRICT}}\n",
     "document 1 (PeerAuthentication default): a PeerAuthentication says STRICT for port 2: the Sidecar needs certs"),
    (SIDECAR + "  inbound: [{port: 1, targetPort: 2}]\n---\n" + SIDECAR + "  inbound: [{port: 3, targetPort: 4}]\n",
     "expected exactly one fastmesh.io/v1alpha1 Sidecar document to serve, got 2"),
])
def test_each_malformed_config_gets_its_own_precise_error(tmp_path, text, message):
    error = problems(tmp_path, text)
    assert message in error
    assert str(tmp_path / "mesh.yaml") in error or "expected exactly one" in error


def test_every_problem_is_reported_at_once(tmp_path):
    error = problems(tmp_path, DR + "  hots: db\n---\n" + VS + "  tcp:\n  - match: []\n")
    assert len(error.splitlines()) == 3  # hots unknown, host missing, route missing


def mesh(tmp_path: Path, backends: list[tuple[str, int]], extra: str, policy: str = "") -> Path:
    """Two workloads of service db (v1, v2) with sidecar ports on `backends`, a
    DestinationRule with their subsets, and a sidecar whose app reaches db on port 7000."""
    base = textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {{name: db}}
    spec:
      hosts: [db.default.svc.cluster.local]
      ports: [{{number: 7000, name: tcp-db}}]
      resolution: STATIC
      workloadSelector: {{labels: {{app: db}}}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {{name: db-v1}}
    spec: {{address: {backends[0][0]}, ports: {{tcp-db: {backends[0][1]}}}, labels: {{app: db, version: v1}}}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {{name: db-v2}}
    spec: {{address: {backends[1][0]}, ports: {{tcp-db: {backends[1][1]}}}, labels: {{app: db, version: v2}}}}
    ---
    apiVersion: fastmesh.io/v1alpha1
    kind: Sidecar
    metadata: {{name: ratings-v2}}
    spec:
      nodeMetadata: {{NAME: r, NAMESPACE: default, WORKLOAD_NAME: ratings-v2, LABELS: {{app: ratings, version: v2}}}}
      outbound: [{{port: 0, host: db, servicePort: 7000}}]
      metrics: 127.0.0.1:0
      admin: null
      tcpReportingDuration: 500ms
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {{name: db}}
    spec:
      host: db
      subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    """)
    path = tmp_path / "mesh.yaml"
    policy = textwrap.indent(textwrap.dedent(policy), "  ") + "\n" if policy else ""
    path.write_text(base + policy + "---\n" + textwrap.dedent(extra))
    return path


def test_a_plan_follows_the_virtual_service_and_the_destination_rule(tmp_path):
    path = mesh(tmp_path, [("10.0.0.1", 7001), ("10.0.0.2", 7002)], """\
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: db}
    spec:
      hosts: [db]
      tcp:
      - match: [{port: 7000, sourceLabels: {app: reviews}}]
        route: [{destination: {host: db, subset: v2}}]
      - match: [{port: 7000, sourceLabels: {app: ratings}}]
        route:
        - {destination: {host: db, subset: v1}, weight: 75}
        - {destination: {host: db, subset: v2}, weight: 25}
    """, policy="trafficPolicy:\n  connectionPool: {tcp: {maxConnections: 5, connectTimeout: 250ms}}\n"
                "  loadBalancer: {simple: RANDOM}\n  portLevelSettings:\n"
                "  - {port: {number: 7000}, loadBalancer: {simple: LEAST_CONN}}")
    built = plan(load_documents([path]))
    (listener,) = built.sidecar.listeners
    routes = listener.routes
    assert isinstance(routes, RouteTable)
    assert [(c.name, c.endpoints, c.lb, c.max_connections, c.connect_timeout) for c in routes.clusters] == [
        ("outbound|7000|v1|db.default.svc.cluster.local", (("10.0.0.1", 7001),), "LEAST_CONN", 5, 0.25),
        ("outbound|7000|v2|db.default.svc.cluster.local", (("10.0.0.2", 7002),), "LEAST_CONN", 5, 0.25),
    ]
    assert routes.routes == ((0, 75), (1, 25))  # the route whose sourceLabels match ratings-v2
    assert built.warnings == []


def test_the_bookinfo_example_plans_a_mesh_peer_endpoint():
    files = ["mesh.yaml", "destination-rule-mongodb.yaml", "virtual-service-mongodb.yaml", "ratings-v2-sidecar.yaml"]
    built = plan(load_documents([BOOKINFO / f for f in files]))
    (listener,) = built.sidecar.listeners
    (cluster,) = listener.routes.clusters
    assert (cluster.endpoints, cluster.mesh_peers, cluster.lb, cluster.max_connections) == (
        (("127.0.0.1", 15006),), (True,), "LEAST_CONN", 100)
    assert built.sidecar.exchange_settings(listener) is not None


def answering(upstream, *answers: bytes) -> list[tuple[str, int]]:
    """One server per answer (the `upstream` fixture), each sending its answer to every connection."""
    return [upstream(lambda conn, answer=answer: conn.sendall(answer)).address for answer in answers]


def scraped_until(running, done) -> list[str]:
    """The istio_tcp_connections_closed_total lines of a sidecar's metrics, once `done(lines)` (or after 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        _, text = running.scrape()
        lines = [line for line in text.splitlines() if line.startswith("istio_tcp_connections_closed_total{")]
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_a_sidecar_from_config_routes_by_weight_and_labels_the_metrics(tmp_path, sidecar, upstream):
    path = mesh(tmp_path, answering(upstream, b"0", b"1"), """\
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: db}
    spec:
      hosts: [db]
      tcp:
      - route:
        - {destination: {host: db, subset: v1}, weight: 80}
        - {destination: {host: db, subset: v2}, weight: 20}
    """)
    running = sidecar(plan(load_documents([path])).sidecar)
    answers = collections.Counter()
    for _ in range(1000):
        with socket.create_connection(running.listen) as client:
            answers[client.recv(4)] += 1
    assert answers == {b"0": 800, b"1": 200}
    closed = scraped_until(running, lambda lines: bool(lines) and lines[0].endswith(" 1000"))
    assert len(closed) == 1 and closed[0].endswith(" 1000"), closed
    assert 'destination_service="db.default.svc.cluster.local"' in closed[0]
    assert 'destination_service_name="db"' in closed[0] and 'source_workload="ratings-v2"' in closed[0]


def test_no_matching_tcp_route_shows_as_response_flag_nr(tmp_path, sidecar, upstream):
    path = mesh(tmp_path, answering(upstream, b"0", b"1"), """\
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: db}
    spec:
      hosts: [db]
      tcp:
      - match: [{port: 9999}]
        route: [{destination: {host: db, subset: v1}}]
    """)
    built = plan(load_documents([path]))
    assert built.warnings == [f"{path}: document 5 (VirtualService db): spec.tcp: none of its routes matches port "
                              f"7000 of db.default.svc.cluster.local (the port of {path}: document 3 (Sidecar "
                              "ratings-v2): spec.outbound[0]): connections will be closed with NR"]
    running = sidecar(built.sidecar)
    with socket.create_connection(running.listen) as client:
        client.settimeout(10)
        assert client.recv(4) == b""
    closed = scraped_until(running, lambda lines: any('response_flags="NR"' in line for line in lines))
    assert [line.endswith(" 1") for line in closed if 'response_flags="NR"' in line] == [True], closed


def test_the_readmes_check_example_is_what_check_prints():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ python -m fastmesh check -c rules.yaml\n", 1)[1].split("```", 1)[0]
    expected = "".join(line.strip() + "\n" for line in block.splitlines() if line.strip())
    result = fastmesh("check", "-c", "rules.yaml", cwd=ROOT / "tests" / "fixtures")
    assert (result.returncode, result.stderr) == (1, expected)


def sidecar_file(tmp_path: Path, spec: str) -> Path:
    """A file with one fastmesh Sidecar document (named app) whose spec is `spec`."""
    return write(tmp_path, SIDECAR + textwrap.indent(textwrap.dedent(spec), "  "), "sidecar.yaml")


def serve_refuses(paths: list[Path]) -> list[str]:
    """The errors `serve -c PATHS` logs as it exits 1 without serving."""
    result = fastmesh("serve", *[arg for path in paths for arg in ("-c", str(path))])
    assert result.returncode == 1, result.stderr
    return [line.split(" ERROR fastmesh: ", 1)[1] for line in result.stderr.splitlines() if " ERROR fastmesh: " in line]


@pytest.mark.parametrize("case", ["no-sidecar", "same-address", "overlapping-address", "no-certificates"])
def test_check_refuses_what_serve_refuses_with_the_same_message(tmp_path, case):
    port = free_port()
    sidecar = f"{tmp_path / 'sidecar.yaml'}: document 0 (Sidecar app)"
    if case == "no-sidecar":  # Istio's samples alone: valid documents, but nothing says what to serve
        paths = SAMPLES
        expected = ["expected exactly one fastmesh.io/v1alpha1 Sidecar document to serve, got 0 (none found)"]
    elif case == "same-address":
        paths = [sidecar_file(tmp_path, f"inbound: [{{port: {port}, bind: 127.0.0.1, targetPort: 1}}]\n"
                                        f"metrics: 127.0.0.1:{port}\n")]
        expected = [f"{sidecar}: spec.metrics: 127.0.0.1:{port} is also spec.inbound[0]'s address: "
                    "only one of them can listen"]
    elif case == "overlapping-address":
        paths = [sidecar_file(tmp_path, f"outbound: [{{port: {port}, bind: 0.0.0.0, host: db}}]\n"
                                        f"metrics: null\nadmin: 127.0.0.1:{port}\n")]
        expected = [f"{sidecar}: spec.admin: 127.0.0.1:{port} overlaps 0.0.0.0:{port}, spec.outbound[0]'s address: "
                    "only one of them can listen"]
    else:
        (tmp_path / "certs").mkdir()
        paths = [sidecar_file(tmp_path, f"inbound: [{{port: {port}, targetPort: 1}}]\nmetrics: null\nadmin: null\n"
                                        f"certs: {tmp_path / 'certs'}\n")]
        expected = [f"{sidecar}: spec.certs: {tmp_path / 'certs' / 'cert-chain.pem'}: no such file"]
    checked = fastmesh("check", *[arg for path in paths for arg in ("-c", str(path))])
    assert (checked.returncode, checked.stdout, checked.stderr) == (1, "", "".join(f"error: {e}\n" for e in expected))
    assert serve_refuses(paths) == expected


def bookinfo_copy(tmp_path: Path) -> list[str]:
    """The Bookinfo task's config for ratings-v2's sidecar, copied to tmp_path (names relative to it)."""
    files = ["mesh.yaml", "destination-rule-mongodb.yaml", "virtual-service-mongodb.yaml", "ratings-v2-sidecar.yaml"]
    for name in files:
        shutil.copy(BOOKINFO / name, tmp_path / name)
    return files


def test_a_set_check_passes_is_served_as_check_describes_it(tmp_path):
    files = bookinfo_copy(tmp_path)
    listen, metrics, admin = free_port(), free_port(), free_port()
    sidecar = tmp_path / "ratings-v2-sidecar.yaml"
    moved = {"port: 15001": f"port: {listen}", "127.0.0.1:15090": f"127.0.0.1:{metrics}",
             "127.0.0.1:15000": f"127.0.0.1:{admin}"}
    text = sidecar.read_text()
    for fixed, free in moved.items():
        text = text.replace(fixed, free)
    sidecar.write_text(text)
    args = [arg for name in files for arg in ("-c", name)]
    checked = fastmesh("check", *args, cwd=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout.splitlines() == [
        "OK: serve would run",
        f"outbound 127.0.0.1:{listen} for mongodb.default.svc.cluster.local:",
        "  weight 100: outbound|27017|v1|mongodb.default.svc.cluster.local [LEAST_CONN] -> 127.0.0.1:15006 (mesh); "
        "tls DISABLE",
        f"metrics: http://127.0.0.1:{metrics}/stats/prometheus",
        f"admin: http://127.0.0.1:{admin}/",
        "health: off",
        "identity: none (no certs): no mTLS",
        "exchange: over mTLS and plaintext (fastmesh's own variant)",
    ]
    process = subprocess.Popen([sys.executable, "-m", "fastmesh", "serve", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def dump() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as response:
                    return response.read().decode()
            except OSError:
                assert process.poll() is None, "serve exited"
                return ""

        wait_until(lambda: f'"address": "127.0.0.1:{listen}"' in dump())
        assert '"metrics": "127.0.0.1:%d"' % metrics in dump()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_check_names_the_virtual_service_whose_route_is_broken_not_the_sidecar(tmp_path):
    files = bookinfo_copy(tmp_path)
    service = tmp_path / "virtual-service-mongodb.yaml"
    service.write_text(service.read_text().replace("        host: mongodb\n", "        host: mongo\n"))
    checked = fastmesh("check", *[arg for name in files for arg in ("-c", name)], cwd=tmp_path)
    assert (checked.returncode, checked.stderr) == (0, (
        "warning: virtual-service-mongodb.yaml: document 0 (VirtualService mongodb): spec.tcp[0].route[0].destination: "
        "no ServiceEntry defines mongo.default.svc.cluster.local: its connections will fail with UH\n"))
    assert "  weight 100: outbound|27017|v1|mongo.default.svc.cluster.local [ROUND_ROBIN] -> no endpoint (UH); " \
           "tls DISABLE\n" in checked.stdout


def test_the_sidecar_kind_asks_for_io_uring(tmp_path):
    listener = "  inbound: [{port: 1, targetPort: 2}]\n"
    assert plan(load_documents([write(tmp_path, SIDECAR + listener + "  ioUring: true\n")])).sidecar.io_uring
    unsaid = plan(load_documents([write(tmp_path, SIDECAR + listener, "plain.yaml")])).sidecar.io_uring
    assert unsaid is DEFAULTS.io_uring  # off, unless FASTMESH_IO_URING=1
    assert "spec.ioUring: Input should be a valid boolean" in problems(tmp_path, SIDECAR + listener + "  ioUring: soon\n")
