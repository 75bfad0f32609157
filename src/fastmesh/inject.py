"""`fastmesh kube-inject`: Kubernetes documents in, the same documents out with a fastmesh
sidecar added to every pod (Deployment, StatefulSet, DaemonSet, Job templates and Pods), as
`istioctl kube-inject` adds Istio's: an init container running `fastmesh capture`, the sidecar as
a native sidecar, the pod's identity from the Downward API, Istio's labels and annotations.
Each pod's Sidecar document takes its inbound ports from the Services of the same input that
select it, and the Istio documents of `--mesh` files follow it in the pod's ConfigMap.
Documents are read and written with pyyaml; nothing else is touched."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fastmesh.defaults import DEFAULTS
from fastmesh.identity import (
    CANONICAL_NAME,
    CANONICAL_REVISION,
    canonical_revision,
    canonical_service,
)

IMAGE = "fastmesh:0.1"  # the image deploy/Dockerfile builds (entrypoint `python -m fastmesh`)
INIT_NAME, SIDECAR_NAME = "fastmesh-init", "fastmesh"
PROXY_UID = DEFAULTS.proxy_uid
OUTBOUND_PORT, INBOUND_PORT = DEFAULTS.capture_outbound_port, DEFAULTS.capture_inbound_port
METRICS_PORT, HEALTH_PORT = 15090, 15021  # Envoy's Prometheus port and Istio's health port
CONFIG_DIR, CONFIG_FILE = "/etc/fastmesh", "sidecar.yaml"
CERTS_DIR = "/var/run/secrets/workload-spiffe-credentials"  # Istio's workload-certs mount
PODINFO_DIR = "/etc/istio/pod"  # Istio's istio-podinfo mount
CONFIG_VOLUME, CERTS_VOLUME, PODINFO_VOLUME = "fastmesh-config", "workload-certs", "istio-podinfo"

STATUS = "sidecar.istio.io/status"
INJECT = "sidecar.istio.io/inject"
TLS_MODE = "security.istio.io/tlsMode"
PROMETHEUS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
              "prometheus.io/path": "/stats/prometheus"}
# Istio keeps the app's own scrape annotations in this variable of the sidecar.
PROMETHEUS_ENV = "ISTIO_PROMETHEUS_ANNOTATIONS"

# kind -> the owner reference Istio puts in ISTIO_META_OWNER (API path and resource).
WORKLOADS = {"Deployment": "apps/v1/namespaces/{ns}/deployments", "StatefulSet": "apps/v1/namespaces/{ns}/statefulsets",
             "DaemonSet": "apps/v1/namespaces/{ns}/daemonsets", "Job": "batch/v1/namespaces/{ns}/jobs",
             "Pod": "v1/namespaces/{ns}/pods"}
INTERCEPTION = "sidecar.istio.io/interceptionMode"  # Istio's annotation: REDIRECT (default) or TPROXY
INTERCEPTION_MODES = ("REDIRECT", "TPROXY")


def capture_args(mode: str = "REDIRECT") -> list[str]:
    return ["capture", "-p", str(OUTBOUND_PORT), "-z", str(INBOUND_PORT), "-u", str(PROXY_UID),
            "-m", mode, "-i", "*", "-x", "", "-b", "*", "-d", DEFAULTS.capture_excluded_inbound_ports]


class InjectError(ValueError):
    """Input kube-inject cannot transform; the message is one line naming where."""


@dataclass(frozen=True)
class Options:
    image: str = IMAGE
    mesh: tuple[dict[str, Any], ...] = ()  # Istio documents for every pod's ConfigMap (load_mesh)
    mtls: bool = False  # the Sidecar reads the pod's certificates, which must then be there


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}, "periodSeconds": period,
            "failureThreshold": failures}


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def init_container(image: str, mode: str = "REDIRECT") -> dict[str, Any]:
    """istio-init's job, done by `fastmesh capture` with istio-iptables' flags, as root with
    only the capabilities iptables needs."""
    return {
        "name": INIT_NAME, "image": image, "args": capture_args(mode),
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
                            "allowPrivilegeEscalation": False, "privileged": False,
                            "readOnlyRootFilesystem": False},
    }


def sidecar_security(mode: str, fs_group: int | None = None) -> tuple[list[str], dict[str, Any]]:
    """(serve's extra args, the container's securityContext). Under TPROXY the transparent
    listener needs CAP_NET_RAW, which Kubernetes gives only to root: the proxy binds as root
    and becomes uid 1337 with `serve --user` (Istio runs its proxy as root in this mode),
    keeping the pod's own fsGroup (`fs_group`, when not the proxy's), by which it reads the
    certificates' Secret after the switch too."""
    common = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True}
    if mode == "TPROXY":
        keep = ["--groups", str(fs_group)] if fs_group is not None and fs_group != PROXY_UID else []
        return (["--user", str(PROXY_UID), "--group", str(PROXY_UID), *keep],
                {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, **common,
                 "capabilities": {"add": ["NET_RAW", "SETUID", "SETGID"], "drop": ["ALL"]}})
    return [], {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": True, **common,
                "capabilities": {"drop": ["ALL"]}}


def sidecar_container(image: str, kind: str, name: str, app_containers: list[str],
                      app_prometheus: dict[str, str], mode: str = "REDIRECT",
                      fs_group: int | None = None) -> dict[str, Any]:
    """The proxy as a native sidecar: started (and probed) before the app, stopped after it."""
    env = [_field_env("POD_NAME", "metadata.name"), _field_env("POD_NAMESPACE", "metadata.namespace"),
           _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"), _field_env("INSTANCE_IP", "status.podIP"),
           {"name": "ISTIO_META_WORKLOAD_NAME", "value": name},
           # $(POD_NAMESPACE) is expanded by the kubelet from the variable above.
           {"name": "ISTIO_META_OWNER",
            "value": f"kubernetes://apis/{WORKLOADS[kind].format(ns='$(POD_NAMESPACE)')}/{name}"},
           {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
           {"name": "ISTIO_META_INTERCEPTION_MODE", "value": mode},
           {"name": "ISTIO_META_APP_CONTAINERS", "value": ",".join(app_containers)}]
    if app_prometheus:
        env.append({"name": PROMETHEUS_ENV, "value": json.dumps(app_prometheus, separators=(",", ":"))})
    extra_args, security = sidecar_security(mode, fs_group)
    return {
        "name": SIDECAR_NAME, "image": image, "restartPolicy": "Always",
        "args": ["serve", "-c", f"{CONFIG_DIR}/{CONFIG_FILE}", *extra_args],
        "ports": [{"name": "http-envoy-prom", "containerPort": METRICS_PORT, "protocol": "TCP"},
                  {"name": "status-port", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "env": env,
        "startupProbe": _probe(1, 600),  # Istio's: up to 10 minutes, checked every second
        "readinessProbe": _probe(15, 4),
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": security,
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": CERTS_VOLUME, "mountPath": CERTS_DIR, "readOnly": True},
                         {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True}],
    }


def volumes(name: str, mtls: bool = False) -> list[dict[str, Any]]:
    # Without mTLS the Secret is optional: a pod whose Secret does not exist starts, with an empty
    # directory. With it, such a pod does not start, rather than silently running plaintext.
    return [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(name)}},
        {"name": CERTS_VOLUME, "secret": {"secretName": f"{name}-fastmesh-certs", "optional": not mtls,
                                          # the key readable by the pod's fsGroup (the proxy's), no one else
                                          **({"defaultMode": 0o440} if mtls else {})}},
        {"name": PODINFO_VOLUME, "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}},
    ]


def config_map_name(workload: str) -> str:
    return f"{workload}-fastmesh"


def sidecar_document(name: str, namespace: str, inbound_ports: list[dict[str, Any]],
                     mtls: bool = False, mode: str = "REDIRECT") -> dict[str, Any]:
    """The default Sidecar document: capture's ports as Istio's virtualOutbound and virtualInbound
    (the app ports Services name, with their service), identity from the pod (podInfo),
    fastmesh's plaintext exchange, the ports the pod's probes and annotations name, and the
    certificates at Istio's mount when asked for mTLS."""
    inbound: dict[str, Any] = {"port": INBOUND_PORT}
    if inbound_ports:
        inbound["ports"] = inbound_ports
    if mode != "REDIRECT":
        inbound["interceptionMode"] = mode
    spec: dict[str, Any] = {"podInfo": PODINFO_DIR, "virtualOutbound": {"port": OUTBOUND_PORT},
                            "virtualInbound": inbound}
    if mtls:
        spec["certs"] = CERTS_DIR
    spec.update({"exchange": {"plaintext": True}, "metrics": f"0.0.0.0:{METRICS_PORT}",
                 "admin": "127.0.0.1:15000", "health": f"0.0.0.0:{HEALTH_PORT}"})
    return {"apiVersion": "fastmesh.io/v1alpha1", "kind": "Sidecar",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def config_map(name: str, namespace: str | None, inbound_ports: list[dict[str, Any]],
               options: Options = Options(), mode: str = "REDIRECT") -> dict[str, Any]:
    """The pod's sidecar.yaml: its Sidecar document, then the mesh's Istio documents."""
    metadata: dict[str, Any] = {"name": config_map_name(name)}
    if namespace is not None:
        metadata["namespace"] = namespace
    sidecar = sidecar_document(name, namespace or "default", inbound_ports, options.mtls, mode)
    text = yaml.safe_dump_all([sidecar, *options.mesh], sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {CONFIG_FILE: text}}


def selects(service: dict[str, Any], namespace: str | None, labels: dict[str, Any]) -> bool:
    """A Service of the pod's namespace whose selector the pod's labels match (one without a
    selector selects no pod, as in Kubernetes)."""
    selector = (service.get("spec") or {}).get("selector") or {}
    return ((service.get("metadata") or {}).get("namespace") == namespace and bool(selector)
            and all(key in labels and str(labels[key]) == str(value) for key, value in selector.items()))


def inbound_ports(template: dict[str, Any], namespace: str | None, services: list[dict[str, Any]]) -> list[dict]:
    """virtualInbound's ports: the TCP target ports of the Services that select the pod, each with
    its Service's name; a named targetPort is the app container port of that name (a name no
    container port has sends nothing to this pod, as in Kubernetes). A port two Services name is
    the first one's."""
    labels = (template.get("metadata") or {}).get("labels") or {}
    apps = (template.get("spec") or {}).get("containers") or []
    named = {p["name"]: p["containerPort"] for c in apps for p in (c.get("ports") or [])
             if "name" in p and "containerPort" in p}
    found: dict[int, str] = {}
    for service in services:
        if not selects(service, namespace, labels):
            continue
        for port in (service.get("spec") or {}).get("ports") or []:
            if str(port.get("protocol", "TCP")).upper() != "TCP":
                continue  # capture redirects TCP only
            target = port.get("targetPort", port.get("port"))
            number = named.get(target) if isinstance(target, str) else target
            if isinstance(number, int):
                found.setdefault(number, service["metadata"]["name"])
    return [{"port": number, "service": service} for number, service in found.items()]


def canonical_label(value: str) -> str:
    """A label value as Istio's injector writes it: at most 63 characters, no -_. at the ends."""
    return value[:63].strip("-_.")


def skipped(template: dict[str, Any]) -> bool:
    """Opted out, or injected already (by us or by Istio)."""
    metadata = template.get("metadata") or {}
    for marks in (metadata.get("annotations") or {}, metadata.get("labels") or {}):
        if str(marks.get(INJECT, "")).lower() == "false":
            return True
    if STATUS in (metadata.get("annotations") or {}):
        return True
    spec = template.get("spec") or {}
    names = {c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])}
    return SIDECAR_NAME in names


def interception_mode(template: dict[str, Any], where: str) -> str:
    """The pod's sidecar.istio.io/interceptionMode, REDIRECT when it has none."""
    mode = str(((template.get("metadata") or {}).get("annotations") or {}).get(INTERCEPTION, "REDIRECT"))
    if mode not in INTERCEPTION_MODES:
        raise InjectError(f"{where}: {INTERCEPTION}: {mode!r} is not one of {', '.join(INTERCEPTION_MODES)}")
    return mode


def inject_template(template: dict[str, Any], kind: str, name: str, options: Options = Options(),
                    mode: str = "REDIRECT") -> None:
    """Add the sidecar to a pod template (or a Pod) in place; `mode`: its interception mode."""
    metadata = template.setdefault("metadata", {})
    spec = template.setdefault("spec", {})
    apps = spec.get("containers") or []
    app_names = [c["name"] for c in apps if isinstance(c, dict) and "name" in c]

    annotations = metadata.setdefault("annotations", {})
    app_prometheus = {key.removeprefix("prometheus.io/"): str(annotations[key]) for key in PROMETHEUS
                      if key in annotations}
    if app_prometheus.get("scrape") != "false":  # an app that asked not to be scraped keeps that
        annotations.update(PROMETHEUS)
    else:
        app_prometheus = {}
    if app_names:
        annotations.setdefault("kubectl.kubernetes.io/default-container", app_names[0])
        annotations.setdefault("kubectl.kubernetes.io/default-logs-container", app_names[0])
    annotations["istio.io/rev"] = "default"
    annotations[STATUS] = json.dumps({
        "initContainers": [INIT_NAME, SIDECAR_NAME], "containers": None,
        "volumes": [v["name"] for v in volumes(name)], "imagePullSecrets": None, "revision": "default",
    }, separators=(",", ":"))

    labels = metadata.setdefault("labels", {})
    labels[TLS_MODE] = "istio"
    labels[CANONICAL_NAME] = canonical_label(canonical_service(labels, name))
    labels[CANONICAL_REVISION] = canonical_label(canonical_revision(labels))

    fs_group = None
    if options.mtls:
        # The Secret's files belong to root: the proxy (uid 1337) reads them through the pod's
        # fsGroup, as Istio's injector once set it for its token volume. A pod's own fsGroup stays.
        context = spec["securityContext"] = spec.get("securityContext") or {}
        fs_group = context.setdefault("fsGroup", PROXY_UID)
    spec["initContainers"] = [init_container(options.image, mode),
                              sidecar_container(options.image, kind, name, app_names, app_prometheus, mode,
                                                fs_group),
                              *(spec.get("initContainers") or [])]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes(name, options.mtls)]


def inject_documents(documents: Iterable[Any], source: str = "-", options: Options = Options()) -> list[Any]:
    """Every document, in order, each pod given a sidecar and preceded by its ConfigMap (unless
    the input has a ConfigMap of that name already)."""
    documents = [d for d in documents if d is not None]  # empty documents (a stray `---`) are dropped
    for number, document in enumerate(documents, 1):
        if not isinstance(document, dict):
            raise InjectError(f"{source}: document {number} is not a mapping (a {type(document).__name__})")
    existing = {(d.get("kind"), (d.get("metadata") or {}).get("name"), (d.get("metadata") or {}).get("namespace"))
                for d in documents}
    services = [d for d in documents if d.get("kind") == "Service" and (d.get("metadata") or {}).get("name")]
    result: list[Any] = []
    for number, document in enumerate(documents, 1):
        kind = document.get("kind")
        if kind not in WORKLOADS:
            result.append(document)
            continue
        metadata = document.get("metadata") or {}
        name = metadata.get("name") or str(metadata.get("generateName", "")).rstrip("-")
        if not name:
            raise InjectError(f"{source}: document {number} ({kind}) has no metadata.name")
        template = document if kind == "Pod" else (document.get("spec") or {}).get("template")
        if not isinstance(template, dict):
            raise InjectError(f"{source}: document {number} ({kind} {name}) has no spec.template")
        if skipped(template):
            result.append(document)
            continue
        namespace = metadata.get("namespace")
        mode = interception_mode(template, f"{source}: document {number} ({kind} {name})")
        ports = inbound_ports(template, namespace, services)  # by the input's labels, before Istio's are added
        inject_template(template, kind, name, options, mode)
        if ("ConfigMap", config_map_name(name), namespace) not in existing:
            result.append(config_map(name, namespace, ports, options, mode))
        result.append(document)
    return result


def parse(text: str, source: str) -> list[Any]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InjectError(f"{source}: {where}not valid YAML: {problem}") from None


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a ConfigMap's file) as literal blocks, readable in the output."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def load_mesh(paths: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """The Istio documents of the `--mesh` files, in order, checked by the loader `serve -c`
    uses, so that a pod's sidecar does not fail at start on them."""
    from fastmesh.config import ConfigError, load_documents

    mesh: list[dict[str, Any]] = []
    for path in paths:
        try:
            loaded = load_documents([path])
            with open(path, encoding="utf-8") as file:  # the loader has read it: it parses
                mesh += [document for document in yaml.safe_load_all(file) if document is not None]
        except ConfigError as exc:
            raise InjectError("; ".join(exc.problems)) from None
        except UnicodeDecodeError:
            raise InjectError(f"{path}: not UTF-8 text") from None
        for document in loaded:
            if document.kind == "Sidecar":
                raise InjectError(f"{document.source}: a Sidecar document; kube-inject writes each pod's own")
    return tuple(mesh)


def inject_text(text: str, source: str = "-", options: Options = Options()) -> str:
    return yaml.dump_all(inject_documents(parse(text, source), source, options), Dumper=_Dumper, sort_keys=False)


def run(path: str, image: str = IMAGE, mesh: Sequence[str] = (), mtls: bool = False) -> int:
    """`fastmesh kube-inject -f FILE|- [--mesh FILE ...] [--mtls]`: the injected documents on
    stdout, or one line on stderr (exit 1)."""
    import sys

    try:
        options = Options(image, load_mesh(mesh), mtls)
        if path == "-":
            text, source = sys.stdin.read(), "<stdin>"
        else:
            with open(path, encoding="utf-8") as file:
                text, source = file.read(), path
        sys.stdout.write(inject_text(text, source, options))
    except OSError as exc:
        print(f"fastmesh kube-inject: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError:
        print(f"fastmesh kube-inject: {path}: not UTF-8 text", file=sys.stderr)
        return 1
    except InjectError as exc:
        print(f"fastmesh kube-inject: {exc}", file=sys.stderr)
        return 1
    return 0
