"""deploy/kubernetes: valid Kubernetes objects (checked offline against the
Kubernetes schemas), and everything in them consistent: the fastmesh config in
the ConfigMaps with the pods' ports, probes and Prometheus annotations; the
native sidecars; one namespace throughout; the traffic Job's path to the
database; Prometheus's pod discovery, whose relabelling a real Prometheus runs
here against a real sidecar."""

from __future__ import annotations

import json
import re
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
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
SIDECAR_MANIFESTS = [DEPLOY / "mongodb.yaml", DEPLOY / "ratings-v2.yaml"]
NAMESPACE = "default"  # the one the Istio documents and node metadata in the ConfigMaps name
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
IN_CLUSTER_HOST = re.compile(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local\b")


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents(path)}


def sidecar_plan(configmap: dict, tmp_path: Path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(configmap["data"]["sidecar.yaml"])
    return plan(load_documents([config]), resolve=False)  # cluster DNS names are resolved in the pod


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
def test_the_sidecar_config_and_the_pod_agree(path, tmp_path):
    found = objects(path)
    built = sidecar_plan(found["ConfigMap"], tmp_path)
    sidecar = built.sidecar
    pod = found["Deployment"]["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    assert int(annotations["prometheus.io/port"]) == sidecar.metrics.port

    # A native sidecar: an init container that keeps running, so the kubelet starts it
    # (and waits for its startup probe) before the app, and stops it after the app.
    (proxy,) = pod["spec"]["initContainers"]
    assert (proxy["name"], proxy["restartPolicy"]) == ("fastmesh", "Always")
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

    # Without certificates in the pods, both sidecars exchange metadata in plaintext,
    # else neither reporter's series would name the other workload.
    assert sidecar.certs is None and sidecar.exchange.enabled and sidecar.exchange.plaintext
    for listener in sidecar.listeners:
        if listener.direction == "inbound":  # the Service sends its port to the sidecar
            (service_port,) = found["Service"]["spec"]["ports"]
            assert service_port["targetPort"] == listener.listen.port
            assert listener.listen.port in container_ports(proxy)
        else:  # the app reaches its database through the outbound listener
            env = {e["name"]: e["value"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
            assert env["MONGO_DB_URL"] == f"mongodb://127.0.0.1:{listener.listen.port}/test"
            assert [w for w in built.warnings if "will be resolved when serving" in w]


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
            if inner["kind"] == "Sidecar":
                assert inner["spec"]["nodeMetadata"]["NAMESPACE"] == NAMESPACE
        hosts = IN_CLUSTER_HOST.findall(text)
        assert hosts, f"{path.name}: no in-cluster host name"
        for service, namespace in hosts:  # every name in the config is a Service of the manifests
            assert (service, namespace) in {(s, NAMESPACE) for s in services}


def test_the_traffic_job_reaches_the_database_through_ratings_sidecar(tmp_path):
    job = objects(DEPLOY / "traffic.yaml")["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (client,) = pod["containers"]
    env = {e["name"]: e["value"] for e in client["env"]}
    assert int(env["REQUESTS"]) > 0
    assert '"$RATINGS_URL"' in client["command"][-1] and '"$REQUESTS"' in client["command"][-1]
    url = urlsplit(env["RATINGS_URL"])
    assert re.fullmatch(r"/ratings/[0-9]+", url.path)  # ratings-v2 answers it from MongoDB

    # The URL names the ratings Service and its port, which leads to the ratings
    # container of ratings-v2's pods ...
    ratings = objects(DEPLOY / "ratings-v2.yaml")
    service = ratings["Service"]
    assert url.hostname == service["metadata"]["name"]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    template = ratings["Deployment"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    app = containers(template["spec"])["ratings"]
    assert service_port.get("targetPort", service_port["port"]) in container_ports(app)
    # ... whose queries go to its sidecar's outbound port, routed to the mongodb Service.
    (outbound,) = sidecar_plan(ratings["ConfigMap"], tmp_path).sidecar.listeners
    env = {e["name"]: e["value"] for e in app["env"]}
    assert urlsplit(env["MONGO_DB_URL"]).port == outbound.listen.port
    assert outbound.listen.host == "127.0.0.1"
    (cluster,) = outbound.routes.clusters
    assert cluster.service == f"{objects(DEPLOY / 'mongodb.yaml')['Service']['metadata']['name']}.{NAMESPACE}" \
                              ".svc.cluster.local"


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
    # discovery would find: ratings-v2's pod (annotated; here the sidecar's metrics
    # port is a free one) and Prometheus's own (not annotated: dropped).
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
                                "namespace": NAMESPACE, "pod": "ratings-v2-0", "app": "ratings", "version": "v2"}
    with urllib.request.urlopen(base + "/api/v1/targets", timeout=10) as response:
        targets = json.load(response)["data"]
    assert [t["scrapeUrl"] for t in targets["activeTargets"]] == [f"http://{metrics}/stats/prometheus"]
    assert [t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in targets["droppedTargets"]] == [
        "prometheus-0"]
