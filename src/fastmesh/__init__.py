"""fastmesh: a TCP sidecar proxy whose data path runs in Cython."""

from fastmesh.engine import IMPLEMENTATION, Engine
from fastmesh.reasons import CloseReason

__version__ = "0.1.0"
__all__ = ["IMPLEMENTATION", "Engine", "CloseReason", "__version__"]
