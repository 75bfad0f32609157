"""fastmesh: a TCP sidecar proxy whose data path runs in Cython.

The names below are imported when first used, so that reading a config
(`fastmesh check`) loads neither an engine nor an HTTP server."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastmesh._version import __version__

_PUBLIC = {
    "IMPLEMENTATION": "fastmesh.engine",
    "Engine": "fastmesh.engine",
    "Relay": "fastmesh.relay",
    "Sidecar": "fastmesh.sidecar",
    "BackgroundSidecar": "fastmesh.sidecar",
    "SidecarConfig": "fastmesh.settings",
    "ListenerConfig": "fastmesh.settings",
    "ExchangeConfig": "fastmesh.settings",
    "RouteTable": "fastmesh.routing",
    "Cluster": "fastmesh.routing",
    "ExchangeSettings": "fastmesh.exchange",
    "CloseReason": "fastmesh.reasons",
    "Batch": "fastmesh.records",
    "Opened": "fastmesh.records",
    "Updated": "fastmesh.records",
    "Closed": "fastmesh.records",
    "Peer": "fastmesh.records",
}

__all__ = [
    "__version__", "IMPLEMENTATION", "Engine", "Relay", "Sidecar", "BackgroundSidecar", "SidecarConfig",
    "ListenerConfig", "ExchangeConfig", "RouteTable", "Cluster", "ExchangeSettings", "CloseReason", "Batch",
    "Opened", "Updated", "Closed", "Peer",
]
assert set(__all__) == {"__version__", *_PUBLIC}

if TYPE_CHECKING:
    from fastmesh.engine import IMPLEMENTATION, Engine
    from fastmesh.exchange import ExchangeSettings
    from fastmesh.reasons import CloseReason
    from fastmesh.records import Batch, Closed, Opened, Peer, Updated
    from fastmesh.relay import Relay
    from fastmesh.routing import Cluster, RouteTable
    from fastmesh.settings import ExchangeConfig, ListenerConfig, SidecarConfig
    from fastmesh.sidecar import BackgroundSidecar, Sidecar


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
