"""Chooses the relay engine: the Cython one, or its pure-Python twin when
FASTMESH_NO_EXTENSIONS is set or the extension cannot be loaded."""

from __future__ import annotations

import logging
import os

NO_EXTENSIONS = bool(os.environ.get("FASTMESH_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    from fastmesh._engine_py import IMPLEMENTATION, SPLICE_SUPPORTED, Engine
else:
    try:
        from fastmesh._core import IMPLEMENTATION, SPLICE_SUPPORTED, Engine
    except ImportError as exc:  # no compiler at install time, or a foreign platform
        logging.getLogger("fastmesh").warning(
            "fastmesh._core is not available (%s); using the pure-Python engine", exc
        )
        from fastmesh._engine_py import IMPLEMENTATION, SPLICE_SUPPORTED, Engine

__all__ = ["IMPLEMENTATION", "SPLICE_SUPPORTED", "Engine"]
