"""deploy/kubernetes: valid Kubernetes objects (checked offline against the
Kubernetes schemas), and the fastmesh config inside them consistent with the
ports the pods, Services and Prometheus annotations use."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fastmesh.config import load_documents, plan

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def objects(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_is_valid_kubernetes(path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_sidecar_config_and_the_pod_agree(path, tmp_path):
    found = objects(path)
    config = tmp_path / "sidecar.yaml"
    config.write_text(found["ConfigMap"]["data"]["sidecar.yaml"])
    built = plan(load_documents([config]), resolve=False)  # cluster DNS names are resolved in the pod
    sidecar = built.sidecar
    pod = found["Deployment"]["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    assert int(annotations["prometheus.io/port"]) == sidecar.metrics.port
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    proxy = containers["fastmesh"]
    assert proxy["args"] == ["serve", "-c", "/etc/fastmesh/sidecar.yaml"]
    assert proxy["readinessProbe"]["httpGet"]["port"] == sidecar.metrics.port
    mount = proxy["volumeMounts"][0]
    assert mount["mountPath"] == "/etc/fastmesh"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == found["ConfigMap"]["metadata"]["name"]
    for listener in sidecar.listeners:
        if listener.direction == "inbound":  # the Service sends its port to the sidecar
            (service_port,) = found["Service"]["spec"]["ports"]
            assert service_port["targetPort"] == listener.listen.port
        else:  # the app reaches its database through the outbound listener
            env = {e["name"]: e["value"] for c in containers.values() for e in c.get("env", [])}
            assert env["MONGO_DB_URL"] == f"mongodb://127.0.0.1:{listener.listen.port}/test"
            assert [w for w in built.warnings if "will be resolved when serving" in w]


def test_the_schema_check_catches_a_misspelt_field():
    deployment = objects(DEPLOY / "mongodb.yaml")["Deployment"]
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
