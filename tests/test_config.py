"""Config files: Istio's samples load unchanged, every malformed config gets its
own precise error, and a sidecar built from Istio's kinds routes as they say."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.routing import RouteTable

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "tests" / "fixtures" / "istio").glob("*.yaml"))
BOOKINFO = ROOT / "src" / "fastmesh" / "bookinfo"


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


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
    result = subprocess.run([sys.executable, "-m", "fastmesh", "check",
                             *[arg for path in SAMPLES for arg in ("-c", str(path))]],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "12 document(s) OK\n")


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
    assert built.warnings == [f"{path}: document 3 (Sidecar ratings-v2): spec.outbound[0]: a VirtualService names "
                              "db.default.svc.cluster.local but none of its tcp routes matches port 7000: "
                              "connections will be closed with NR"]
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
    result = subprocess.run([sys.executable, "-m", "fastmesh", "check", "-c", "rules.yaml"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT / "tests" / "fixtures")
    assert (result.returncode, result.stderr) == (1, expected)
