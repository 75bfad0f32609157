"""Which engine runs: the Cython one unless FASTMESH_NO_EXTENSIONS says otherwise,
and never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastmesh

try:
    from fastmesh import _core
except ImportError:  # test_the_cython_engine_is_the_one_in_use says so
    _core = None


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


IO_URING_DISABLED = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.mark.skipif(_core is None, reason="fastmesh._core is not built")
def test_an_engine_asked_for_io_uring_where_the_kernel_refuses_it_makes_plain_calls_and_says_why():
    if not os.access(IO_URING_DISABLED, os.W_OK):
        pytest.skip("needs root and kernel.io_uring_disabled to refuse io_uring for a moment")
    before = IO_URING_DISABLED.read_text()
    IO_URING_DISABLED.write_text("2")  # io_uring_setup fails with EPERM, as under a container's seccomp
    try:
        engine = _core.Engine(2, io_uring=True)
    finally:
        IO_URING_DISABLED.write_text(before)
    assert (engine.io_uring, engine.io_uring_unavailable) == (False, "io_uring_setup: Operation not permitted")
    plain = _core.Engine(1, io_uring=False)
    assert (plain.io_uring, plain.io_uring_unavailable) == (False, None)
