"""What OpenSSL itself keeps for each idle mutual-TLS connection, by allocation site: the floor
under the idle RSS of bench/run.py --mtls that no relay built on this OpenSSL goes below.

    python bench/tls_memory.py [--connections 5000] [--record NAME]

Builds bench/tls_memory.c (gcc, libssl-dev), makes mesh identities with `fastmesh ca`, and opens
the connections as pairs of SSL objects (a server's and a client's) in one process, with the
engine's TLS settings: its TLS 1.3 cipher suites, session cache and ALPN from fastmesh.tls, the
rest mirrored in the C file from native/tls.pxi. Each pair resumes the client's last session, as
the engine's connections to one endpoint do. The output is the bytes per pair still allocated,
by OpenSSL source file and line, and grouped by file.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastmesh import tls

import mtls  # bench/: this script's directory is on sys.path
import report

BENCH = Path(__file__).resolve().parent
READ_AHEAD = 4 * 16384 + 4 * 256  # native/tls.pxi TLS_READ_AHEAD (the buffer is freed when idle)


def build(tmp: Path) -> Path:
    binary = tmp / "tls_memory"
    r = subprocess.run(["gcc", "-O2", "-o", str(binary), str(BENCH / "tls_memory.c"), "-lssl", "-lcrypto"],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"building bench/tls_memory.c failed (gcc and libssl-dev are needed):\n{r.stderr}")
    return binary


def by_file(sites: list[dict]) -> list[tuple[str, float]]:
    """Bytes per pair for each OpenSSL source file, largest first."""
    files: collections.Counter[str] = collections.Counter()
    for site in sites:
        files[site["site"].rsplit(":", 1)[0].removeprefix("../")] += site["bytes_per_pair"]
    return files.most_common()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="pairs held open (default 5000)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "tls-memory.json")
    parser.add_argument("--record", metavar="NAME",
                        help="also keep the result as DATE-COMMIT-NAME.json beside --out, to be committed")
    args = parser.parse_args()
    record = report.record_stem(args.record) if args.record else None
    with tempfile.TemporaryDirectory(prefix="tls-memory-") as name:
        tmp = Path(name)
        binary = build(tmp)
        certs = mtls.make_certs(tmp, dict(os.environ))
        r = subprocess.run([str(binary), str(certs.of("server").dir), str(certs.of("client").dir),
                            str(args.connections), tls.TLS13_CIPHERSUITES, str(tls.SESSION_CACHE_SIZE),
                            str(READ_AHEAD), *tls.CLIENT_ALPN], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"bench/tls_memory.c failed:\n{r.stderr}")
    measured = json.loads(r.stdout)
    measured["sites"].sort(key=lambda site: -site["bytes_per_pair"])
    result = {"command": "python bench/tls_memory.py " + " ".join(sys.argv[1:]), "commit": report.source_commit(),
              **measured, "by_file": [{"file": f, "bytes_per_pair": round(b, 1)} for f, b in by_file(measured["sites"])]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    args.out.write_text(text)
    if record:
        (args.out.parent / f"{record}.json").write_text(text)
    print(f"{result['openssl']}: {result['pairs']} idle pairs (a server's SSL and a client's), per pair "
          f"{result['tracked_bytes_per_pair']:.0f} bytes allocated by OpenSSL, "
          f"{result['malloc_in_use_per_pair']:.0f} in use in malloc")
    for entry in result["by_file"][:12]:
        print(f"  {entry['bytes_per_pair']:8.0f}  {entry['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
