"""deploy/kubernetes: the sidecar manifests are exactly kube-inject's output for plain/ and
mesh.yaml (and injecting them again changes nothing); valid Kubernetes objects (checked
offline against the Kubernetes schemas), and everything in them consistent: the fastmesh
config in the ConfigMaps, as the sidecar would load it, with the pods' ports, Services,
probes and Prometheus annotations; the native sidecars; one namespace throughout; the
traffic Job's path to the database through both sidecars; Prometheus's pod discovery,
whose relabelling a real Prometheus runs here against a real sidecar."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from conftest import one_listener, query
from fastmesh.addr import Address
from fastmesh.config import load_documents, plan

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
MESH = DEPLOY / "mesh.yaml"  # Istio documents for the sidecars' ConfigMaps, not for kubectl
MANIFESTS = sorted(path for path in DEPLOY.glob("*.yaml") if path != MESH)
SIDECAR_MANIFESTS = [DEPLOY / "mongodb.yaml", DEPLOY / "ratings-v2.yaml"]
NAMESPACE = "default"  # the one the Istio documents and node metadata in the ConfigMaps name
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
IN_CLUSTER_HOST = re.compile(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local\b")


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents(path)}


def kube_inject(*args: str | Path) -> str:
    """`python -m fastmesh kube-inject ARGS`, as a user runs it: its stdout."""
    done = subprocess.run([sys.executable, "-m", "fastmesh", "kube-inject", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    return done.stdout


def sidecar_plan(configmap: dict, tmp_path: Path, labels: dict[str, str] | None = None):
    """What the sidecar would run from the ConfigMap's sidecar.yaml: its podInfo directory
    (the Downward API's) made here, with the pod's labels."""
    (tmp_path / "pod").mkdir(parents=True, exist_ok=True)
    (tmp_path / "pod" / "labels").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in (labels or {}).items()))
    config = tmp_path / "sidecar.yaml"
    config.write_text(configmap["data"]["sidecar.yaml"].replace("/etc/istio/pod", str(tmp_path / "pod")))
    return plan(load_documents([config]), resolve=False)  # cluster DNS names are resolved in the pod


def routes(listener) -> dict[tuple[str, int], list[tuple[str, tuple]]]:
    """Each original destination a virtual listener knows: the clusters (name, endpoints) it goes to."""
    clusters = listener.routes.clusters
    return {d.address: [(clusters[i].name, clusters[i].endpoints) for i, _ in d.routes]
            for d in listener.routes.destinations}


def template_of(manifest: dict[str, dict]) -> dict:
    return manifest["Deployment"]["spec"]["template"]


def pod_sidecar_plan(manifest: dict[str, dict], tmp_path: Path):
    return sidecar_plan(manifest["ConfigMap"], tmp_path, template_of(manifest)["metadata"]["labels"])


def containers(pod_spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec["containers"]}


def container_ports(container: dict) -> set[int]:
    return {port["containerPort"] for port in container.get("ports", [])}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_is_valid_kubernetes(path):
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    deployment = objects(DEPLOY / "mongodb.yaml")["Deployment"]
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", SIDECAR_MANIFESTS, ids=lambda p: p.name)
def test_the_sidecar_manifests_are_kube_injects_output_and_injecting_them_again_changes_nothing(path):
    output = kube_inject("--mesh", MESH, "-f", DEPLOY / "plain" / path.name)
    text = path.read_text()
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines(keepends=True)))
    assert f"kube-inject --mesh deploy/kubernetes/mesh.yaml -f deploy/kubernetes/plain/{path.name}\n" in header
    assert text.removeprefix(header) == output
    assert kube_inject("--mesh", MESH, "-f", path) == output


@pytest.mark.parametrize("path", SIDECAR_MANIFESTS, ids=lambda p: p.name)
def test_the_sidecar_config_and_the_pod_agree(path, tmp_path):
    found = objects(path)
    built = pod_sidecar_plan(found, tmp_path)
    sidecar = built.sidecar
    pod = template_of(found)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    assert int(annotations["prometheus.io/port"]) == sidecar.metrics.port

    # A native sidecar: an init container that keeps running, so the kubelet starts it
    # (and waits for its startup probe) before the app, and stops it after the app; before it,
    # the capture of the pod's traffic into the sidecar's two virtual listeners.
    capture, proxy = pod["spec"]["initContainers"]
    assert (proxy["name"], proxy["restartPolicy"]) == ("fastmesh", "Always")
    assert (capture["name"], "restartPolicy" in capture) == ("fastmesh-init", False)
    flags = dict(zip(capture["args"][1::2], capture["args"][2::2]))
    assert capture["args"][0] == "capture" and flags["-u"] == str(proxy["securityContext"]["runAsUser"]) == "1337"
    outbound, inbound = sidecar.listeners
    assert (outbound.direction, outbound.listen) == ("outbound", Address("127.0.0.1", int(flags["-p"])))
    assert (inbound.direction, inbound.listen) == ("inbound", Address("0.0.0.0", int(flags["-z"])))
    assert "fastmesh" not in containers(pod["spec"])
    assert proxy["args"] == ["serve", "-c", "/etc/fastmesh/sidecar.yaml"]

    # Probed on the health port, which listens where the kubelet reaches it (the pod's IP).
    assert sidecar.health == Address("0.0.0.0", 15021)
    for probe in ("startupProbe", "readinessProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/healthz/ready", "port": sidecar.health.port}
    assert sidecar.metrics.host == "0.0.0.0"  # Prometheus scrapes the pod's IP too
    assert {sidecar.health.port, sidecar.metrics.port} <= container_ports(proxy)

    mount = proxy["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/fastmesh"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    # The pod's own Sidecar document, then the mesh's Istio documents.
    assert list(yaml.safe_load_all(found["ConfigMap"]["data"]["sidecar.yaml"]))[1:] == documents(MESH)

    # Without certificates in the pods, both sidecars exchange metadata in plaintext,
    # else neither reporter's series would name the other workload.
    assert sidecar.certs is None and sidecar.exchange.enabled and sidecar.exchange.plaintext

    # The port the Service sends to the pod reaches the app on that port through the virtual
    # inbound listener, as the Service's; capture leaves the sidecar's own ports alone.
    (service_port,) = found["Service"]["spec"]["ports"]
    target = service_port.get("targetPort", service_port["port"])
    assert target in {port for app in pod["spec"]["containers"] for port in container_ports(app)}
    service = f"{found['Service']['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert routes(inbound) == {("0.0.0.0", target): [(f"inbound|{target}||{service}", (("127.0.0.1", target),))]}
    assert flags["-d"] == f"{sidecar.metrics.port},{sidecar.health.port}"


def test_one_namespace_throughout():
    services = set()
    for path in MANIFESTS:
        for document in documents(path):
            metadata = document["metadata"]
            if document["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in metadata, f"{path.name}: {document['kind']} {metadata['name']}"
            else:
                assert metadata.get("namespace") == NAMESPACE, f"{path.name}: {document['kind']} {metadata['name']}"
            if document["kind"] == "Service":
                services.add(metadata["name"])
            for subject in document.get("subjects", []):
                assert subject["namespace"] == NAMESPACE
    for path in SIDECAR_MANIFESTS:
        text = objects(path)["ConfigMap"]["data"]["sidecar.yaml"]
        for inner in yaml.safe_load_all(text):
            assert inner["metadata"]["namespace"] == NAMESPACE
            if inner["kind"] == "Sidecar":  # its short service names are Services of its namespace
                assert {port["service"] for port in inner["spec"]["virtualInbound"]["ports"]} <= services
        hosts = IN_CLUSTER_HOST.findall(text)
        assert hosts, f"{path.name}: no in-cluster host name"
        for service, namespace in hosts:  # every name in the config is a Service of the manifests
            assert (service, namespace) in {(s, NAMESPACE) for s in services}


def test_the_traffic_jobs_requests_reach_the_database_through_both_sidecars(tmp_path):
    job = objects(DEPLOY / "traffic.yaml")["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (client,) = pod["containers"]
    env = {e["name"]: e["value"] for e in client["env"]}
    assert int(env["REQUESTS"]) > 0
    assert '"$RATINGS_URL"' in client["command"][-1] and '"$REQUESTS"' in client["command"][-1]
    url = urlsplit(env["RATINGS_URL"])
    assert re.fullmatch(r"/ratings/[0-9]+", url.path)  # ratings-v2 answers it from MongoDB

    # The URL names the ratings Service and its port, which leads to the ratings container of
    # ratings-v2's pods, through its sidecar's virtual inbound listener, as the ratings service ...
    ratings, mongodb = objects(DEPLOY / "ratings-v2.yaml"), objects(DEPLOY / "mongodb.yaml")
    service = ratings["Service"]
    assert url.hostname == service["metadata"]["name"]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    template = template_of(ratings)
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    app = containers(template["spec"])["ratings"]
    target = service_port.get("targetPort", service_port["port"])
    assert target in container_ports(app)
    outbound, inbound = pod_sidecar_plan(ratings, tmp_path / "ratings").sidecar.listeners
    assert routes(inbound)[("0.0.0.0", target)] == [
        (f"inbound|{target}||ratings.{NAMESPACE}.svc.cluster.local", (("127.0.0.1", target),))]

    # ... whose app dials the mongodb Service by its name and port, knowing nothing of the proxy:
    # its sidecar's virtual outbound listener takes that port on any address (the ServiceEntry has
    # none, so the Service's ClusterIP matches) to the mongodb host, subset v1 ...
    database = urlsplit({e["name"]: e["value"] for e in app["env"]}["MONGO_DB_URL"])
    assert database.hostname == mongodb["Service"]["metadata"]["name"]
    host = f"{database.hostname}.{NAMESPACE}.svc.cluster.local"
    assert routes(outbound) == {("0.0.0.0", database.port): [(f"outbound|{database.port}|v1|{host}", ())]}

    # ... and the mongodb Service sends that port to mongodb-v1's pod, whose sidecar's virtual
    # inbound listener hands it to MongoDB on that port, as the mongodb service.
    (db_port,) = mongodb["Service"]["spec"]["ports"]
    assert (db_port["port"], db_port.get("targetPort", db_port["port"])) == (database.port, 27017)
    assert mongodb["Service"]["spec"]["selector"].items() <= template_of(mongodb)["metadata"]["labels"].items()
    _, db_inbound = pod_sidecar_plan(mongodb, tmp_path / "mongodb").sidecar.listeners
    assert routes(db_inbound) == {("0.0.0.0", 27017): [(f"inbound|27017||{host}", (("127.0.0.1", 27017),))]}
    assert 27017 in container_ports(containers(template_of(mongodb)["spec"])["mongodb"])


def kubernetes_pods_job() -> dict:
    configmap = objects(DEPLOY / "prometheus.yaml")["ConfigMap"]
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kubernetes-pods"]
    return job


def test_prometheus_discovers_pods_and_may_read_them():
    found = objects(DEPLOY / "prometheus.yaml")
    job = kubernetes_pods_job()
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = {tuple(rule.get("source_labels", ())): rule for rule in job["relabel_configs"]}
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    assert relabel[(annotation + "scrape",)] == {"source_labels": [annotation + "scrape"], "action": "keep",
                                                 "regex": "true"}
    assert relabel[(annotation + "path",)]["target_label"] == "__metrics_path__"
    assert relabel[("__address__", annotation + "port")]["target_label"] == "__address__"

    # The pod runs with a service account bound to a role that may list and watch pods.
    deployment = found["Deployment"]["spec"]["template"]["spec"]
    account = deployment["serviceAccountName"]
    assert found["ServiceAccount"]["metadata"]["name"] == account
    binding = found["ClusterRoleBinding"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": found["ClusterRole"]["metadata"]["name"]}
    (rule,) = found["ClusterRole"]["rules"]
    assert (rule["apiGroups"], rule["resources"]) == ([""], ["pods"]) and {"list", "watch"} <= set(rule["verbs"])

    # It reads the ConfigMap's prometheus.yml, and `kubectl port-forward svc/prometheus 9090` reaches it.
    (server,) = deployment["containers"]
    config_file = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--config.file="))
    mount = next(m for m in server["volumeMounts"] if config_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in deployment["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    assert Path(config_file).name in found["ConfigMap"]["data"]
    service = found["Service"]
    assert service["metadata"]["name"] == "prometheus"
    assert service["spec"]["selector"].items() <= found["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert [(p["port"], p.get("targetPort", p["port"])) for p in service["spec"]["ports"]] == [(9090, 9090)]
    assert 9090 in container_ports(server)


def discovered_pod(deployment: dict, address: str, annotations: dict[str, str]) -> dict:
    """A target as Prometheus's pod discovery makes it: the pod's address and a declared
    port, its labels and annotations as __meta_kubernetes_* labels."""
    template = deployment["spec"]["template"]
    labels = {"__meta_kubernetes_namespace": deployment["metadata"]["namespace"],
              "__meta_kubernetes_pod_name": deployment["metadata"]["name"] + "-0"}
    for name, value in template["metadata"]["labels"].items():
        labels["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)] = value
    for name, value in annotations.items():
        labels["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)] = value
    return {"targets": [address], "labels": labels}


def test_the_kubernetes_pods_job_scrapes_the_sidecar_the_annotations_name(tmp_path, sidecar, upstream, prometheus):
    # The job's own relabelling, run by a real Prometheus over the targets its pod
    # discovery would find: ratings-v2's pod (annotated by kube-inject; here the sidecar's
    # metrics port is a free one) and Prometheus's own (not annotated: dropped).
    server = upstream(lambda conn: None)
    running = sidecar(one_listener(Address("127.0.0.1", 0), [server.address], admin=None,
                                   metrics=Address("127.0.0.1", 0)))
    metrics = running.sidecar.metrics_address
    ratings = objects(DEPLOY / "ratings-v2.yaml")["Deployment"]
    annotations = {**ratings["spec"]["template"]["metadata"]["annotations"], "prometheus.io/port": str(metrics.port)}
    pods = [discovered_pod(ratings, "127.0.0.1:9080", annotations),
            discovered_pod(objects(DEPLOY / "prometheus.yaml")["Deployment"], "127.0.0.1:9090", {})]
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    job = kubernetes_pods_job()
    del job["kubernetes_sd_configs"]  # no API server here: the same targets, from a file
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")], "refresh_interval": "1s"}]
    job["scrape_interval"] = "1s"
    base = prometheus([], yaml.safe_dump({"scrape_configs": [job]}))

    deadline = time.monotonic() + 30
    while not (up := query(base, 'up{job="kubernetes-pods"}')) and time.monotonic() < deadline:
        time.sleep(0.5)
    (series,) = up
    assert series["value"][1] == "1"
    assert series["metric"] == {"__name__": "up", "job": "kubernetes-pods", "instance": str(metrics),
                                "namespace": NAMESPACE, "pod": "ratings-v2-0", "app": "ratings", "version": "v2",
                                "security_istio_io_tlsMode": "istio", "service_istio_io_canonical_name": "ratings",
                                "service_istio_io_canonical_revision": "v2"}
    with urllib.request.urlopen(base + "/api/v1/targets", timeout=10) as response:
        targets = json.load(response)["data"]
    assert [t["scrapeUrl"] for t in targets["activeTargets"]] == [f"http://{metrics}/stats/prometheus"]
    assert [t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in targets["droppedTargets"]] == [
        "prometheus-0"]
