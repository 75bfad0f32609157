"""`fastmesh kube-inject`: what it adds to each pod (exactly), what it leaves alone, that a
second run changes nothing, its errors; the injected plain Bookinfo manifests are valid
Kubernetes (strict, offline); and the sidecar reads the pod's node metadata at start."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.request

import kubernetes_validate
import pytest
import yaml
from conftest import free_port, wait_until
from test_kubernetes import DEPLOY, KUBERNETES_VERSION, documents, sidecar_plan

from fastmesh import podinfo
from fastmesh.cli import main
from fastmesh.identity import MetadataError

PLAIN = DEPLOY / "plain"
CAPTURE = ["capture", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
           "-b", "*", "-d", "15090,15021"]
STATUS = ('{"initContainers":["fastmesh-init","fastmesh"],"containers":null,'
          '"volumes":["fastmesh-config","workload-certs","istio-podinfo"],"imagePullSecrets":null,'
          '"revision":"default"}')

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v1, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  template:
    metadata:
      labels: {app: reviews, version: v1}
      annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9080", team: books}
    spec:
      initContainers: [{name: migrate, image: migrate:1}]
      containers:
      - {name: reviews, image: reviews:1, ports: [{containerPort: 9080}, {containerPort: 9443}]}
      - {name: logger, image: logger:1}
      volumes: [{name: data, emptyDir: {}}]
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: sleep, labels: {app.kubernetes.io/name: sleeper}}
spec:
  containers: [{name: sleep, image: curl:1}]
"""
SERVICE_AND_CONFIGMAP = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {selector: {app: reviews}, ports: [{port: 9080, name: http}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {a.conf: "line one\\nline two\\n", b: "1"}
"""


def expected_init_containers(owner: str, workload: str, apps: str, extra_env: list | None = None) -> list[dict]:
    """What Istio's injector would add, spelled out (owner: the ISTIO_META_OWNER path)."""
    def field(name, path):
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    probe = {"httpGet": {"path": "/healthz/ready", "port": 15021}}
    return [
        {"name": "fastmesh-init", "image": "fastmesh:0.1", "args": CAPTURE,
         "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                             "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
                             "allowPrivilegeEscalation": False, "privileged": False,
                             "readOnlyRootFilesystem": False}},
        {"name": "fastmesh", "image": "fastmesh:0.1", "restartPolicy": "Always",
         "args": ["serve", "-c", "/etc/fastmesh/sidecar.yaml"],
         "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"},
                   {"name": "status-port", "containerPort": 15021, "protocol": "TCP"}],
         "env": [field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace"),
                 field("SERVICE_ACCOUNT", "spec.serviceAccountName"), field("INSTANCE_IP", "status.podIP"),
                 {"name": "ISTIO_META_WORKLOAD_NAME", "value": workload},
                 {"name": "ISTIO_META_OWNER", "value": f"kubernetes://apis/{owner}"},
                 {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
                 {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
                 {"name": "ISTIO_META_APP_CONTAINERS", "value": apps}, *(extra_env or [])],
         "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 600},
         "readinessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
         "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
         "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True,
                             "allowPrivilegeEscalation": False, "privileged": False,
                             "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
         "volumeMounts": [{"name": "fastmesh-config", "mountPath": "/etc/fastmesh", "readOnly": True},
                          {"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials",
                           "readOnly": True},
                          {"name": "istio-podinfo", "mountPath": "/etc/istio/pod", "readOnly": True}]},
    ]


def expected_volumes(workload: str) -> list[dict]:
    return [{"name": "fastmesh-config", "configMap": {"name": f"{workload}-fastmesh"}},
            {"name": "workload-certs", "secret": {"secretName": f"{workload}-fastmesh-certs", "optional": True}},
            {"name": "istio-podinfo", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]


def kube_inject(capsys, text: str, monkeypatch) -> tuple[int, str, str]:
    """`fastmesh kube-inject -f -` with `text` on stdin: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["kube-inject", "-f", "-"])
    out, err = capsys.readouterr()
    return code, out, err


def injected(capsys, monkeypatch, text: str) -> list[dict]:
    code, out, err = kube_inject(capsys, text, monkeypatch)
    assert (code, err) == (0, "")
    return list(yaml.safe_load_all(out))


def test_a_deployment_gets_the_init_container_the_sidecar_volumes_labels_and_annotations(capsys, monkeypatch):
    configmap, deployment = injected(capsys, monkeypatch, DEPLOYMENT)
    original = yaml.safe_load(DEPLOYMENT)
    template, spec = deployment["spec"]["template"], deployment["spec"]["template"]["spec"]
    assert spec["initContainers"] == [
        *expected_init_containers("apps/v1/namespaces/$(POD_NAMESPACE)/deployments/reviews-v1", "reviews-v1",
                                  "reviews,logger", [{"name": "ISTIO_PROMETHEUS_ANNOTATIONS",
                                                      "value": '{"scrape":"true","port":"9080"}'}]),
        {"name": "migrate", "image": "migrate:1"},  # the app's own init containers run after the sidecar starts
    ]
    assert spec["containers"] == original["spec"]["template"]["spec"]["containers"]
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}}, *expected_volumes("reviews-v1")]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15090", "team": "books",
        "prometheus.io/path": "/stats/prometheus",
        "kubectl.kubernetes.io/default-container": "reviews",
        "kubectl.kubernetes.io/default-logs-container": "reviews",
        "istio.io/rev": "default", "sidecar.istio.io/status": STATUS}
    assert template["metadata"]["labels"] == {
        "app": "reviews", "version": "v1", "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": "reviews", "service.istio.io/canonical-revision": "v1"}
    # Nothing outside the pod template changes.
    del deployment["spec"]["template"], original["spec"]["template"]
    assert deployment == original

    # The ConfigMap the sidecar reads, written before the Deployment: a default Sidecar document.
    assert configmap["metadata"] == {"name": "reviews-v1-fastmesh", "namespace": "shop"}
    assert yaml.safe_load(configmap["data"]["sidecar.yaml"]) == {
        "apiVersion": "fastmesh.io/v1alpha1", "kind": "Sidecar",
        "metadata": {"name": "reviews-v1", "namespace": "shop"},
        "spec": {"podInfo": "/etc/istio/pod", "virtualOutbound": {"port": 15001},
                 "inbound": [{"port": 15006, "bind": "0.0.0.0", "targetPort": 9080}],
                 "exchange": {"plaintext": True}, "metrics": "0.0.0.0:15090", "admin": "127.0.0.1:15000",
                 "health": "0.0.0.0:15021"}}


def test_a_pod_is_its_own_workload(capsys, monkeypatch):
    configmap, pod = injected(capsys, monkeypatch, POD)
    assert pod["spec"]["initContainers"] == expected_init_containers(
        "v1/namespaces/$(POD_NAMESPACE)/pods/sleep", "sleep", "sleep")
    assert pod["spec"]["volumes"] == expected_volumes("sleep")
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "sleeper", "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": "sleeper", "service.istio.io/canonical-revision": "latest"}
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15090", "prometheus.io/path": "/stats/prometheus",
        "kubectl.kubernetes.io/default-container": "sleep", "kubectl.kubernetes.io/default-logs-container": "sleep",
        "istio.io/rev": "default", "sidecar.istio.io/status": STATUS}
    # No namespace in the input: none on the ConfigMap either (kubectl's namespace applies to both);
    # no container port: no inbound listener.
    assert configmap["metadata"] == {"name": "sleep-fastmesh"}
    assert "inbound" not in yaml.safe_load(configmap["data"]["sidecar.yaml"])["spec"]


def test_other_documents_pass_through_unchanged(capsys, monkeypatch):
    docs = injected(capsys, monkeypatch, SERVICE_AND_CONFIGMAP + "---\n" + POD)
    assert docs[:2] == list(yaml.safe_load_all(SERVICE_AND_CONFIGMAP))
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap", "ConfigMap", "Pod"]


def test_a_configmap_of_the_sidecars_name_in_the_input_is_kept_and_not_written_again(capsys, monkeypatch):
    own = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: sleep-fastmesh}\ndata: {sidecar.yaml: mine}\n"
    docs = injected(capsys, monkeypatch, own + "---\n" + POD)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Pod"]
    assert docs[0] == yaml.safe_load(own)


@pytest.mark.parametrize("mark", [
    "metadata: {name: sleep, annotations: {sidecar.istio.io/inject: \"false\"}}",
    "metadata: {name: sleep, labels: {sidecar.istio.io/inject: \"false\"}}",
    "metadata: {name: sleep, annotations: {sidecar.istio.io/status: \"{}\"}}",
], ids=["inject-false-annotation", "inject-false-label", "injected-by-istio"])
def test_pods_opted_out_or_injected_already_are_left_as_they_are(capsys, monkeypatch, mark):
    text = POD.replace("metadata: {name: sleep, labels: {app.kubernetes.io/name: sleeper}}", mark)
    assert injected(capsys, monkeypatch, text) == [yaml.safe_load(text)]


def test_a_pod_with_a_fastmesh_container_is_left_as_it_is(capsys, monkeypatch):
    text = POD.replace("[{name: sleep, image: curl:1}]", "[{name: sleep, image: curl:1}, {name: fastmesh, image: f}]")
    assert injected(capsys, monkeypatch, text) == [yaml.safe_load(text)]


def test_injecting_twice_gives_the_output_of_once(capsys, monkeypatch):
    text = SERVICE_AND_CONFIGMAP + "---\n" + DEPLOYMENT + "---\n" + POD
    once = kube_inject(capsys, text, monkeypatch)
    assert once[0] == 0 and once[1].count("kind: ConfigMap") == 3
    assert kube_inject(capsys, once[1], monkeypatch) == once


def test_errors_are_one_line(capsys, monkeypatch, tmp_path):
    assert main(["kube-inject", "-f", str(tmp_path / "missing.yaml")]) == 1
    missing = f"fastmesh kube-inject: {tmp_path / 'missing.yaml'}: No such file or directory\n"
    assert capsys.readouterr() == ("", missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [x\n")
    assert main(["kube-inject", "-f", str(bad)]) == 1
    unparsed = f"fastmesh kube-inject: {bad}: line 4: not valid YAML: expected ',' or ']', but got '<stream end>'\n"
    assert capsys.readouterr() == ("", unparsed)
    assert kube_inject(capsys, POD + "---\n- a list\n", monkeypatch) == (
        1, "", "fastmesh kube-inject: <stdin>: document 2 is not a mapping (a list)\n")
    assert kube_inject(capsys, "kind: Deployment\nmetadata: {name: d}\nspec: {}\n", monkeypatch) == (
        1, "", "fastmesh kube-inject: <stdin>: document 1 (Deployment d) has no spec.template\n")


def injected_plain(name: str) -> list[dict]:
    """deploy/kubernetes/plain/NAME through the command, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "fastmesh", "kube-inject", "-f", str(PLAIN / name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("name", ["ratings-v2.yaml", "mongodb.yaml"])
def test_the_injected_plain_manifests_are_valid_kubernetes_and_their_sidecar_config_loads(name, tmp_path):
    docs = injected_plain(name)
    for document in docs:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert [d for d in docs if d["kind"] != "ConfigMap"] == documents(PLAIN / name)[:-1] + [docs[-1]]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    pod = docs[-1]["spec"]["template"]["spec"]
    (app_port,) = [p["containerPort"] for c in pod["containers"] for p in c["ports"]]
    (tmp_path / "pod").mkdir()  # podInfo: a labels file as the Downward API writes it
    (tmp_path / "pod" / "labels").write_text('app="x"\n')
    config = configmap["data"]["sidecar.yaml"].replace("/etc/istio/pod", str(tmp_path / "pod"))
    sidecar = sidecar_plan({"data": {"sidecar.yaml": config}}, tmp_path).sidecar
    inbound, outbound = sorted(sidecar.listeners, key=lambda listener: listener.direction)
    assert (inbound.direction, inbound.listen.port, outbound.direction, outbound.listen.port) == (
        "inbound", 15006, "outbound", 15001)
    assert [tuple(c.endpoints[0]) for c in inbound.routes.clusters] == [("127.0.0.1", app_port)]
    proxy = pod["initContainers"][1]
    assert {p["containerPort"] for p in proxy["ports"]} == {sidecar.metrics.port, sidecar.health.port}


def test_node_metadata_from_the_pod_fills_only_what_the_document_lacks(tmp_path):
    (tmp_path / "labels").write_text('app="ratings"\nversion="v2"\npod-template-hash="5d8f7c9b4"\n')
    environ = {"POD_NAME": "ratings-v2-5d8f7c9b4-x7k2p", "POD_NAMESPACE": "default",
               "SERVICE_ACCOUNT": "bookinfo-ratings-v2", "INSTANCE_IP": "10.1.2.3",
               "ISTIO_META_WORKLOAD_NAME": "ratings-v2", "ISTIO_META_CLUSTER_ID": "Kubernetes",
               "ISTIO_META_LABELS": "ignored: a map is not taken from a string", "HOME": "/root"}
    assert podinfo.complete({"CLUSTER_ID": "east"}, environ, tmp_path) == {
        "NAME": "ratings-v2-5d8f7c9b4-x7k2p", "NAMESPACE": "default", "SERVICE_ACCOUNT": "bookinfo-ratings-v2",
        "INSTANCE_IPS": "10.1.2.3", "WORKLOAD_NAME": "ratings-v2", "CLUSTER_ID": "east",
        "LABELS": {"app": "ratings", "version": "v2", "pod-template-hash": "5d8f7c9b4"}}
    # Without the injector's ISTIO_META_WORKLOAD_NAME, a pod is its own workload.
    assert podinfo.pod_metadata({"POD_NAME": "sleep"}, tmp_path)["WORKLOAD_NAME"] == "sleep"


def test_a_labels_file_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    with pytest.raises(MetadataError, match=f"^{tmp_path}/labels: No such file or directory$"):
        podinfo.pod_metadata({}, tmp_path)
    (tmp_path / "labels").write_text('app="ratings"\nversion=v2\n')
    with pytest.raises(MetadataError, match=r"labels: line 2: expected key=\"value\", got 'version=v2'$"):
        podinfo.pod_metadata({}, tmp_path)


def test_serve_reads_the_pods_node_metadata_at_start(tmp_path):
    """The injected mongodb sidecar's own config and environment (ports made free), as the
    kubelet would start it: /config_dump shows the node metadata taken from the pod."""
    docs = injected_plain("mongodb.yaml")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    proxy = docs[-1]["spec"]["template"]["spec"]["initContainers"][1]
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "labels").write_text('app="mongodb"\nversion="v1"\n')
    document = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    admin = free_port()
    spec = document["spec"]
    spec.update(podInfo=str(tmp_path / "pod"), virtualOutbound={"port": 0}, admin=f"127.0.0.1:{admin}",
                metrics="127.0.0.1:0", health="127.0.0.1:0")
    spec["inbound"][0].update(port=0, bind="127.0.0.1")
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(document))
    downward = {"POD_NAME": "mongodb-v1-6b8d9c-q2w4e", "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": "default",
                "INSTANCE_IP": "10.1.2.4"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("POD_", "ISTIO_META_"))},
           **downward}
    for variable in proxy["env"]:
        if "value" in variable:  # as the kubelet expands $(VAR) references
            env[variable["name"]] = variable["value"].replace("$(POD_NAMESPACE)", downward["POD_NAMESPACE"])
    process = subprocess.Popen([sys.executable, "-m", "fastmesh", "serve", "-c", str(tmp_path / "sidecar.yaml")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found: dict = {}

        def dumped() -> bool:
            assert process.poll() is None, "serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as response:
                    found.update(json.load(response))
            except OSError:
                return False
            return True

        wait_until(dumped)
        assert found["telemetry"]["node_metadata"] == {
            "NAME": "mongodb-v1-6b8d9c-q2w4e", "NAMESPACE": "default", "SERVICE_ACCOUNT": "default",
            "INSTANCE_IPS": "10.1.2.4", "WORKLOAD_NAME": "mongodb-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/mongodb-v1",
            "CLUSTER_ID": "Kubernetes", "INTERCEPTION_MODE": "REDIRECT", "APP_CONTAINERS": "mongodb",
            "LABELS": {"app": "mongodb", "version": "v1"}}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_the_existing_deployments_are_not_touched_by_a_second_injection(capsys, monkeypatch):
    # The hand-written manifests already carry a `fastmesh` native sidecar: kube-inject leaves them be.
    text = (DEPLOY / "ratings-v2.yaml").read_text()
    assert injected(capsys, monkeypatch, text) == documents(DEPLOY / "ratings-v2.yaml")
