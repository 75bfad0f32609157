"""Which engine runs: the Cython one unless FASTMESH_NO_EXTENSIONS says otherwise,
and never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastmesh


def implementation_in_subprocess(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "FASTMESH_NO_EXTENSIONS"}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", "import fastmesh; print(fastmesh.IMPLEMENTATION)"],
        env=environment, capture_output=True, text=True, check=True, timeout=60,
    )
    return result.stdout.strip()


@pytest.mark.skipif(bool(os.environ.get("FASTMESH_NO_EXTENSIONS")), reason="the suite runs on the twin")
def test_the_cython_engine_is_the_one_in_use():
    # Fails when the extension was not built or does not load: the fallback
    # to the Python twin must never go unnoticed in this suite.
    assert fastmesh.IMPLEMENTATION == "cython"
    assert fastmesh.Engine.__module__ == "fastmesh._core"


def test_no_extensions_selects_the_python_twin():
    assert implementation_in_subprocess(FASTMESH_NO_EXTENSIONS="1") == "python"


def test_default_selection_in_a_fresh_interpreter():
    assert implementation_in_subprocess() == "cython"  # whatever this suite runs on: the extension is built
