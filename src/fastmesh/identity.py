"""Workload identity: Istio node metadata, and the telemetry labels Istio derives
from it (canonical service and revision as the sidecar injector sets them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fastmesh import bounded_yaml

UNKNOWN = "unknown"
LATEST = "latest"

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"

# Node metadata keys whose values are strings; LABELS and PLATFORM_METADATA are maps.
_STRING_KEYS = (
    "NAME", "NAMESPACE", "WORKLOAD_NAME", "OWNER", "CLUSTER_ID", "MESH_ID", "SERVICE_ACCOUNT",
    "ISTIO_VERSION", "INSTANCE_IPS", "APP_CONTAINERS",
)
_MAP_KEYS = ("LABELS", "PLATFORM_METADATA")


@dataclass(frozen=True)
class Workload:
    """The identity fields telemetry labels come from; empty means not known."""

    workload: str = ""
    namespace: str = ""
    app: str = ""
    version: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    cluster: str = ""

    @property
    def known(self) -> bool:
        return bool(self.workload or self.namespace or self.app)


UNKNOWN_WORKLOAD = Workload()


def canonical_service(labels: Mapping[str, str], workload_name: str) -> str:
    """As Istio's injector: the explicit label, else app.kubernetes.io/name, else app, else the workload."""
    for key in (CANONICAL_NAME, "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return workload_name


def canonical_revision(labels: Mapping[str, str]) -> str:
    """As Istio's injector: the explicit label, else app.kubernetes.io/version, else version, else latest."""
    for key in (CANONICAL_REVISION, "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return LATEST


@dataclass(frozen=True)
class NodeMetadata:
    """Istio's bootstrap node metadata (the keys that travel in the peer exchange)."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> str:
        value = self.values.get(key, "")
        return value if isinstance(value, str) else ""

    @property
    def labels(self) -> Mapping[str, str]:
        labels = self.values.get("LABELS")
        return labels if isinstance(labels, Mapping) else {}

    def workload(self) -> Workload:
        labels = self.labels
        name = self.get("WORKLOAD_NAME")
        return Workload(
            workload=name,
            namespace=self.get("NAMESPACE"),
            app=labels.get("app", ""),
            version=labels.get("version", ""),
            canonical_service=canonical_service(labels, name),
            canonical_revision=canonical_revision(labels),
            cluster=self.get("CLUSTER_ID"),
        )

    def node_id(self) -> str:
        """Istio's node id form, sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local."""
        ip = (self.get("INSTANCE_IPS").split(",") or [""])[0]
        name, namespace = self.get("NAME"), self.get("NAMESPACE")
        if not (name and namespace):
            return ""
        return f"sidecar~{ip or '127.0.0.1'}~{name}.{namespace}~{namespace}.svc.cluster.local"


def peer_workload(metadata: Mapping[str, Any]) -> Workload:
    """The identity in a peer's exchanged metadata. Values of the wrong type are
    ignored (as Istio's conversion to its FlatNode schema drops them), not trusted."""
    labels = metadata.get("LABELS")
    labels = {k: v for k, v in labels.items() if isinstance(v, str)} if isinstance(labels, Mapping) else {}
    return NodeMetadata({**metadata, "LABELS": labels}).workload()


class MetadataError(ValueError):
    """A node metadata file that cannot be used; the message names the file and field."""


def parse_node_metadata(data: Any, source: str = "node metadata") -> NodeMetadata:
    if not isinstance(data, Mapping):
        raise MetadataError(f"{source}: expected a mapping of node metadata keys, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise MetadataError(f"{source}: key {key!r} is not a string")
        if key in _STRING_KEYS and not isinstance(value, str):
            raise MetadataError(f"{source}: {key} must be a string, got {type(value).__name__}")
        if key in _MAP_KEYS:
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise MetadataError(f"{source}: {key} must be a map of strings to strings")
    return NodeMetadata(dict(data))


def load_node_metadata(path: str | Path) -> NodeMetadata:
    """Read node metadata from a JSON or YAML file, within fastmesh.bounded_yaml's limits."""
    path = Path(path)
    try:
        text = bounded_yaml.read_text(path)
        data = json.loads(text) if path.suffix == ".json" else bounded_yaml.load(text)
    except OSError as exc:
        raise MetadataError(f"{path}: {exc.strerror}") from None
    except bounded_yaml.LimitError as exc:
        raise MetadataError(f"{path}: {exc}") from None
    except RecursionError:  # JSON has no depth limit of its own
        raise MetadataError(f"{path}: nested too deep") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MetadataError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return parse_node_metadata(data, str(path))
