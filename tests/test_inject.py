"""`fastmesh kube-inject`: what it adds to each pod (exactly), the inbound ports the input's
Services give it, the --mesh documents and --mtls, what it leaves alone, that a second run
changes nothing, its errors; and the sidecar reads the pod's node metadata at start. (The
injected Bookinfo manifests of deploy/kubernetes are checked by test_kubernetes.py.)"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml
from conftest import free_port, wait_until
from test_kubernetes import DEPLOY, objects, routes, sidecar_plan

from fastmesh import ca, certs, podinfo
from fastmesh.cli import main
from fastmesh.config import load_documents
from fastmesh.identity import MetadataError

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


def expected_volumes(workload: str, mtls: bool = False) -> list[dict]:
    return [{"name": "fastmesh-config", "configMap": {"name": f"{workload}-fastmesh"}},
            {"name": "workload-certs", "secret": {"secretName": f"{workload}-fastmesh-certs", "optional": not mtls,
                                                  **({"defaultMode": 0o440} if mtls else {})}},
            {"name": "istio-podinfo", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]


def kube_inject(capsys, text: str, monkeypatch, *flags: str) -> tuple[int, str, str]:
    """`fastmesh kube-inject -f - FLAGS` with `text` on stdin: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = main(["kube-inject", "-f", "-", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def injected(capsys, monkeypatch, text: str, *flags: str) -> list[dict]:
    code, out, err = kube_inject(capsys, text, monkeypatch, *flags)
    assert (code, err) == (0, "")
    return list(yaml.safe_load_all(out))


def sidecar_documents(configmap: dict) -> list[dict]:
    return list(yaml.safe_load_all(configmap["data"]["sidecar.yaml"]))


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

    # The ConfigMap the sidecar reads, written before the Deployment: a default Sidecar document
    # (no Service in the input selects the pod: every inbound port is InboundPassthroughClusterIpv4).
    assert configmap["metadata"] == {"name": "reviews-v1-fastmesh", "namespace": "shop"}
    assert sidecar_documents(configmap) == [{
        "apiVersion": "fastmesh.io/v1alpha1", "kind": "Sidecar",
        "metadata": {"name": "reviews-v1", "namespace": "shop"},
        "spec": {"podInfo": "/etc/istio/pod", "virtualOutbound": {"port": 15001}, "virtualInbound": {"port": 15006},
                 "exchange": {"plaintext": True}, "metrics": "0.0.0.0:15090", "admin": "127.0.0.1:15000",
                 "health": "0.0.0.0:15021"}}]


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
    # No namespace in the input: none on the ConfigMap either (kubectl's namespace applies to both).
    assert configmap["metadata"] == {"name": "sleep-fastmesh"}
    (sidecar,) = sidecar_documents(configmap)
    assert sidecar["metadata"] == {"name": "sleep", "namespace": "default"}
    assert sidecar["spec"]["virtualInbound"] == {"port": 15006}


SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports:
  - {name: http, port: 80, targetPort: 9080}       # numeric
  - {name: tls, port: 443, targetPort: https}      # named: the container port of that name
  - {name: admin, port: 9901}                      # none: the port itself
  - {name: dns, port: 53, protocol: UDP}           # not TCP: capture does not redirect it
  - {name: gone, port: 81, targetPort: missing}    # a name no container port has: not this pod
---
apiVersion: v1
kind: Service
metadata: {name: reviews-canary, namespace: shop}
spec:
  selector: {app: reviews, version: v1}
  ports: [{port: 8080, targetPort: 9080}, {port: 7070}]   # 9080 is reviews' already
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 6060}]}   # another version's
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec: {selector: {app: reviews}, ports: [{port: 5050}]}   # another namespace's
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {type: ExternalName, externalName: example.org, ports: [{port: 4040}]}   # no selector: no pods
"""


def test_the_services_selecting_the_pod_name_its_virtual_inbound_ports(capsys, monkeypatch, tmp_path):
    deployment = DEPLOYMENT.replace("ports: [{containerPort: 9080}, {containerPort: 9443}]",
                                    "ports: [{containerPort: 9080}, {containerPort: 9443, name: https}]")
    docs = injected(capsys, monkeypatch, deployment + "---\n" + SERVICES)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (sidecar,) = sidecar_documents(configmap)
    assert sidecar["spec"]["virtualInbound"] == {"port": 15006, "ports": [
        {"port": 9080, "service": "reviews"}, {"port": 9443, "service": "reviews"}, {"port": 9901, "service": "reviews"},
        {"port": 7070, "service": "reviews-canary"}]}
    # As the sidecar runs it: each port to the app on that port, as that Service of the pod's namespace.
    (_, inbound) = sidecar_plan(configmap, tmp_path, {"app": "reviews"}).sidecar.listeners
    assert routes(inbound) == {("0.0.0.0", port): [(f"inbound|{port}||{service}.shop.svc.cluster.local",
                                                     (("127.0.0.1", port),))]
                               for port, service in [(9080, "reviews"), (9443, "reviews"), (9901, "reviews"),
                                                     (7070, "reviews-canary")]}


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


def test_injecting_twice_gives_the_output_of_once(capsys, monkeypatch, tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    text = SERVICE_AND_CONFIGMAP + "---\n" + DEPLOYMENT + "---\n" + POD
    once = kube_inject(capsys, text, monkeypatch, "--mesh", str(mesh), "--mtls")
    assert once[0] == 0 and once[1].count("kind: ConfigMap") == 3
    assert kube_inject(capsys, once[1], monkeypatch, "--mesh", str(mesh), "--mtls") == once
    assert kube_inject(capsys, once[1], monkeypatch) == once


MESH = """\
# The mesh's own documents, as a user writes them.
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  ports: [{number: 9080, name: tcp, protocol: TCP}]
  resolution: DNS
"""
POLICY = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
"""


def test_mesh_files_follow_the_sidecar_document_in_every_configmap(capsys, monkeypatch, tmp_path):
    (tmp_path / "entry.yaml").write_text(MESH + "---\n")  # a stray separator: an empty document, dropped
    (tmp_path / "policy.yaml").write_text(POLICY)
    docs = injected(capsys, monkeypatch, DEPLOYMENT + "---\n" + POD,
                    "--mesh", str(tmp_path / "entry.yaml"), "--mesh", str(tmp_path / "policy.yaml"))
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert [c["metadata"]["name"] for c in configmaps] == ["reviews-v1-fastmesh", "sleep-fastmesh"]
    for configmap in configmaps:
        sidecar, *mesh = sidecar_documents(configmap)
        assert sidecar["kind"] == "Sidecar"
        assert mesh == [yaml.safe_load(MESH), yaml.safe_load(POLICY)]
        # serve -c reads the multi-document file.
        (tmp_path / "sidecar.yaml").write_text(configmap["data"]["sidecar.yaml"])
        assert [d.kind for d in load_documents([tmp_path / "sidecar.yaml"])] == [
            "Sidecar", "ServiceEntry", "PeerAuthentication"]


def test_a_broken_mesh_file_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.replace("number: 9080", "numbr: 9080"))
    assert kube_inject(capsys, POD, monkeypatch, "--mesh", str(mesh)) == (1, "", (
        f"fastmesh kube-inject: {mesh}: document 0 (ServiceEntry ratings): spec.ports[0].number: required field "
        f"is missing; {mesh}: document 0 (ServiceEntry ratings): spec.ports[0].numbr: unknown field "
        "(did you mean 'number'?)\n"))
    mesh.write_text(MESH + "---\n" + yaml.safe_dump({"apiVersion": "fastmesh.io/v1alpha1", "kind": "Sidecar",
                                           "metadata": {"name": "mine"}, "spec": {}}))
    assert kube_inject(capsys, POD, monkeypatch, "--mesh", str(mesh)) == (1, "", (
        f"fastmesh kube-inject: {mesh}: document 1 (Sidecar mine): a Sidecar document; "
        "kube-inject writes each pod's own\n"))
    assert kube_inject(capsys, POD, monkeypatch, "--mesh", str(tmp_path / "missing.yaml")) == (
        1, "", f"fastmesh kube-inject: {tmp_path / 'missing.yaml'}: No such file or directory\n")


def test_mtls_reads_the_workloads_certificates_from_its_secret_which_the_pod_needs(capsys, monkeypatch, tmp_path):
    configmap, pod = injected(capsys, monkeypatch, POD, "--mtls")
    (sidecar,) = sidecar_documents(configmap)
    assert sidecar["spec"]["certs"] == "/var/run/secrets/workload-spiffe-credentials"
    assert pod["spec"]["volumes"] == expected_volumes("sleep", mtls=True)  # the Secret is not optional
    assert pod["spec"]["securityContext"] == {"fsGroup": 1337}  # the proxy reads the 0440 key by group
    (mount,) = [m for m in pod["spec"]["initContainers"][1]["volumeMounts"] if m["name"] == "workload-certs"]
    assert mount["mountPath"] == sidecar["spec"]["certs"]
    # `ca issue` writes the files serve --certs reads: what `kubectl create secret generic
    # sleep-fastmesh-certs --from-file=DIR/` puts in the Secret, one file each.
    ca.init(tmp_path / "root")
    identity = ca.issue(tmp_path / "root", "default", "sleep", tmp_path / "sleep")
    assert sorted(p.name for p in (tmp_path / "sleep").iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    assert certs.load_identity(tmp_path / "sleep").spiffe_id == identity == "spiffe://cluster.local/ns/default/sa/sleep"
    # As the kubelet mounts it: root's files, group fsGroup, mode 0440. The proxy runs in that group.
    key = tmp_path / "sleep" / "key.pem"
    key.chmod(0o440)
    os.chown(key, 0, os.getegid())
    assert certs.load_identity(tmp_path / "sleep").spiffe_id == identity


@pytest.mark.parametrize("pod_context, fs_group, keeps", [
    ("", 1337, []),                                  # ours: the proxy's own group already
    ("  securityContext: {fsGroup: 2000}\n", 2000, ["--groups", "2000"]),   # the pod's: kept past the switch
    ("  securityContext: null\n", 1337, []),
])
def test_under_tproxy_the_proxy_keeps_the_fsgroup_that_reads_its_certificates(capsys, monkeypatch, pod_context,
                                                                            fs_group, keeps):
    # Started as root, the kubelet gives the proxy the pod's fsGroup as a supplementary group; the
    # switch to 1337 must keep it, or the Secret's 0440 key becomes unreadable at its first rotation.
    annotated = POD.replace("metadata: {name: sleep,", "metadata: {name: sleep, annotations: "
                            "{sidecar.istio.io/interceptionMode: TPROXY},") + pod_context
    _, pod = injected(capsys, monkeypatch, annotated, "--mtls")
    assert pod["spec"]["securityContext"] == {"fsGroup": fs_group}
    sidecar = pod["spec"]["initContainers"][1]
    assert sidecar["args"] == ["serve", "-c", "/etc/fastmesh/sidecar.yaml", "--user", "1337", "--group", "1337",
                               *keeps]
    _, plain = injected(capsys, monkeypatch, annotated)  # no Secret to read: nothing to keep
    assert plain["spec"]["initContainers"][1]["args"][-2:] == ["--group", "1337"]


def test_tproxy_interception_binds_as_root_then_becomes_the_proxy_user(capsys, monkeypatch, tmp_path):
    annotated = POD.replace("metadata: {name: sleep,", "metadata: {name: sleep, annotations: "
                            "{sidecar.istio.io/interceptionMode: TPROXY},")
    configmap, pod = injected(capsys, monkeypatch, annotated)
    init, sidecar = pod["spec"]["initContainers"]
    assert init["args"] == [arg if arg != "REDIRECT" else "TPROXY" for arg in CAPTURE]
    assert sidecar["args"] == ["serve", "-c", "/etc/fastmesh/sidecar.yaml", "--user", "1337", "--group", "1337"]
    assert sidecar["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
        "privileged": False, "readOnlyRootFilesystem": True,
        "capabilities": {"add": ["NET_RAW", "SETUID", "SETGID"], "drop": ["ALL"]}}
    assert {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "TPROXY"} in sidecar["env"]
    (document,) = sidecar_documents(configmap)
    assert document["spec"]["virtualInbound"] == {"port": 15006, "interceptionMode": "TPROXY"}
    path = tmp_path / "sidecar.yaml"
    path.write_text(configmap["data"]["sidecar.yaml"])
    (listener,) = [d for d in load_documents([str(path)]) if d.kind == "Sidecar"]
    assert listener.spec.virtual_inbound.interception_mode == "TPROXY"
    assert kube_inject(capsys, POD.replace("metadata: {name: sleep,", "metadata: {name: sleep, annotations: "
                                           "{sidecar.istio.io/interceptionMode: NONE},"), monkeypatch) == (
        1, "", "fastmesh kube-inject: <stdin>: document 1 (Pod sleep): sidecar.istio.io/interceptionMode: 'NONE' "
               "is not one of REDIRECT, TPROXY\n")


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
    """The injected mongodb sidecar's own Sidecar document and environment (ports made free;
    the mesh's documents left out, whose host names only a cluster's DNS resolves), as the
    kubelet would start it: /config_dump shows the node metadata taken from the pod."""
    manifest = objects(DEPLOY / "mongodb.yaml")
    proxy = manifest["Deployment"]["spec"]["template"]["spec"]["initContainers"][1]
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "labels").write_text('app="mongodb"\nversion="v1"\n')
    document = sidecar_documents(manifest["ConfigMap"])[0]
    admin = free_port()
    spec = document["spec"]
    spec.update(podInfo=str(tmp_path / "pod"), virtualOutbound={"port": 0}, admin=f"127.0.0.1:{admin}",
                metrics="127.0.0.1:0", health="127.0.0.1:0")
    spec["virtualInbound"].update(port=0, bind="127.0.0.1")
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
