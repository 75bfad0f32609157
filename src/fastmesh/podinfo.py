"""Node metadata from the pod a sidecar runs in, read at start as Istio's pilot-agent reads it:
the Downward API's environment (POD_NAME, POD_NAMESPACE, SERVICE_ACCOUNT, INSTANCE_IP), the
ISTIO_META_* variables the injector sets, and the pod's labels file (DIR/labels)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastmesh.identity import MetadataError

# Downward API variable -> node metadata key (pilot-agent's names).
POD_ENV = {"POD_NAME": "NAME", "POD_NAMESPACE": "NAMESPACE", "SERVICE_ACCOUNT": "SERVICE_ACCOUNT",
           "INSTANCE_IP": "INSTANCE_IPS"}
META_PREFIX = "ISTIO_META_"  # ISTIO_META_WORKLOAD_NAME=ratings-v2 -> WORKLOAD_NAME
MAP_KEYS = ("LABELS", "PLATFORM_METADATA")  # maps: not taken from a string variable
LABELS_FILE = "labels"


def read_labels(path: Path) -> dict[str, str]:
    """The Downward API's labels file: one `key="value"` line per label, the value quoted as
    Go's strconv.Quote does, which for the characters a label may hold is JSON's quoting."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise MetadataError(f"{path}: {exc.strerror}") from None
    labels = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        try:
            value = json.loads(quoted) if sep else None
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, str):
            raise MetadataError(f"{path}: line {number}: expected key=\"value\", got {line!r}")
        labels[key] = value
    return labels


def pod_metadata(environ: Mapping[str, str], directory: Path) -> dict[str, Any]:
    """What the pod says about itself. WORKLOAD_NAME is the injector's ISTIO_META_WORKLOAD_NAME
    (the Deployment's, StatefulSet's, ... name); a pod nothing owns is its own workload."""
    found: dict[str, Any] = {}
    for name, value in environ.items():
        key = name.removeprefix(META_PREFIX)
        if name.startswith(META_PREFIX) and key and key not in MAP_KEYS:
            found[key] = value
    for name, key in POD_ENV.items():
        if environ.get(name):
            found[key] = environ[name]
    if "NAME" in found:
        found.setdefault("WORKLOAD_NAME", found["NAME"])
    found["LABELS"] = read_labels(directory / LABELS_FILE)
    return found


def complete(values: Mapping[str, Any], environ: Mapping[str, str], directory: str | Path) -> dict[str, Any]:
    """The Sidecar document's nodeMetadata with what it lacks taken from the pod: the
    document's own keys win, so a config can still pin any of them."""
    return {**pod_metadata(environ, Path(directory)), **values}
