"""bench/tls_memory.py: OpenSSL's own allocations per idle mTLS connection pair, by site."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="bench/tls_memory.c is built with gcc")


def test_each_pair_holds_two_ssl_objects_and_two_sessions_and_every_byte_is_placed(tmp_path):
    out = tmp_path / "tls-memory.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "tls_memory.py"), "--connections", "300", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    assert (result["pairs"], result["resumed_pairs"]) == (300, 300)  # as the engine's connections to one endpoint

    def largest_site_of(file: str) -> dict:
        return max((site for site in result["sites"] if site["site"].rsplit(":", 1)[0].endswith(file)),
                   key=lambda site: site["bytes_per_pair"])

    # One SSL object and one session on each side of every pair: nothing of a pair was freed under
    # it, and the ticket each client took replaced its session rather than adding one.
    assert largest_site_of("ssl/ssl_lib.c")["allocations_per_pair"] == 2.0
    assert largest_site_of("ssl/ssl_sess.c")["allocations_per_pair"] == 2.0
    # The grouping adds up to the total, and malloc holds at least what OpenSSL asked of it.
    assert sum(entry["bytes_per_pair"] for entry in result["by_file"]) == pytest.approx(
        result["tracked_bytes_per_pair"], abs=1.0)
    assert result["malloc_in_use_per_pair"] >= result["tracked_bytes_per_pair"]
