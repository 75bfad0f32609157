"""What the README shows as fastmesh's API is there, and reading a config loads
no engine and no HTTP server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import fastmesh

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIG = Path(fastmesh.__file__).with_name("bookinfo")


def test_every_name_the_readme_uses_from_fastmesh_imports_from_it():
    names = set(re.findall(r"\bfastmesh\.([A-Za-z_]\w*)\b(?![/.]\w)", README.read_text()))
    public = {name for name in names if name[0].isupper() and name not in ("md",)}
    assert {"Relay", "Engine", "Sidecar", "ExchangeSettings", "IMPLEMENTATION"} <= public
    for name in sorted(public):
        assert name in fastmesh.__all__, f"README uses fastmesh.{name}, which fastmesh does not export"
        assert getattr(fastmesh, name) is not None


def test_check_reads_a_config_without_loading_an_engine_or_an_http_server():
    script = (
        "import sys\n"
        "from fastmesh.cli import main\n"
        f"assert main(['check', '-c', {str(CONFIG / 'mongodb-v1-sidecar.yaml')!r}]) == 0\n"
        "heavy = ('aiohttp', 'uvloop', 'prometheus_client', 'fastmesh._core', 'fastmesh._engine_py', "
        "'fastmesh.engine', 'fastmesh.relay', 'fastmesh.sidecar')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
