"""fastmesh: a TCP sidecar proxy whose data path runs in Cython."""

from fastmesh._version import __version__
from fastmesh.engine import IMPLEMENTATION, Engine
from fastmesh.exchange import ExchangeSettings
from fastmesh.reasons import CloseReason
from fastmesh.relay import Relay

__all__ = ["IMPLEMENTATION", "Engine", "CloseReason", "ExchangeSettings", "Relay", "__version__"]
