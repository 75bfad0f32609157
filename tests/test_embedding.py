"""The README's embedding example runs as written and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import EXPECTED_IMPLEMENTATION

README = Path(__file__).resolve().parent.parent / "README.md"


def embedding_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- embedding-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no embedding example after <!-- embedding-example -->"
    return match.group(1)


def test_readme_embedding_example_runs_and_prints_the_documented_results():
    result = subprocess.run(
        [sys.executable, "-c", embedding_example()], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["b'hello through fastmesh'", "1 22", EXPECTED_IMPLEMENTATION]
