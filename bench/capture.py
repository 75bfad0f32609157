"""What transparent capture costs the client: redis-benchmark from the ratings-v2 pod to the
database pod of a mesh in network namespaces (fastmesh.pods), through the two sidecars over
mTLS, captured (the app dials the database pod's address; iptables REDIRECT sends it to 15001,
the database pod's to 15006), captured with `-m TPROXY --ebpf` (the app's connect() is moved to
15001 by eBPF, the database pod's inbound SYNs handed to 15006 by TPROXY: no NAT and no
conntrack on either side), against the same pair addressed directly (no rules at
all; the app dials its sidecar's own port, which dials the database sidecar's own port). No
relay at all is measured too, for scale. The modes alternate within each repeat, so each ratio is
within one run. As root.

    python bench/capture.py [--repeat 5] [--requests 100000] [--reconnect-requests 10000] [--pin] [--record NAME]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import report

from fastmesh import pods

BENCH = Path(__file__).resolve().parent
MODES = ("captured", "captured-ebpf", "addressed", "no-sidecar")
# `fastmesh capture`'s flags, per captured mode: Istio's defaults, and fastmesh's capture without NAT
CAPTURE_FLAGS = {"captured": (), "captured-ebpf": ("-m", "TPROXY", "--ebpf")}
CAPTURED = tuple(CAPTURE_FLAGS)
WORKLOADS = ("keepalive", "reconnect")


def target(mode: str) -> tuple[str, int]:
    """Where the ratings-v2 app connects in each mode."""
    if mode == "addressed":
        return "127.0.0.1", pods.DIRECT_OUTBOUND_PORT
    return pods.MONGODB.address, pods.DATABASE_PORT  # captured, or straight to redis-server without rules


def sidecar_pids(mesh: pods.Mesh) -> list[int]:
    # `ip netns exec` and setpriv exec the sidecar: the process started is the sidecar itself.
    return [mesh.started(f"{name}-sidecar").pid for name, _ in pods.REPORTERS]


def cpu_seconds(pids: list[int]) -> float:
    """User and system time of every thread of those processes so far."""
    ticks = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pin(mesh: pods.Mesh) -> list[str]:
    """The sidecars on CPU 1, the database on CPU 0 (the client is run there too), as bench/run.py --pin."""
    for pid in sidecar_pids(mesh):
        subprocess.run(["taskset", "-a", "-p", "2", str(pid)], check=True, capture_output=True)
    subprocess.run(["taskset", "-a", "-p", "1", str(mesh.started("redis-server").pid)], check=True,
                   capture_output=True)
    return ["taskset", "-c", "0"]


def requests_per_second(mesh: pods.Mesh, mode: str, keepalive: bool, requests: int, clients: int,
                        prefix: list[str]) -> float:
    host, port = target(mode)
    out = mesh.pods[pods.RATINGS_V2.name].run(
        *prefix, shutil.which("redis-benchmark") or "redis-benchmark", "-h", host, "-p", str(port), "-t", "ping_inline",
        "-c", str(clients), "-n", str(requests), "-k", "1" if keepalive else "0", "-q", "--csv")
    rows = [row for row in csv.DictReader(io.StringIO(out)) if row.get("test") == "PING_INLINE"]
    if not rows:
        raise SystemExit(f"redis-benchmark ({mode}) printed no result: {out[-300:]!r}")
    return float(rows[0]["rps"])


def set_capture(mesh: pods.Mesh, mode: str) -> None:
    """Both mesh pods as `mode` needs them: captured one way or the other, or not at all."""
    for name, _ in pods.REPORTERS:
        mesh.uncapture(name)
        if mode in CAPTURE_FLAGS:
            mesh.capture(name, CAPTURE_FLAGS[mode])


def markdown(doc: dict) -> str:
    lines = [f"# Capture cost ({doc['date']}, commit {doc['commit']})", "", f"`{doc['command']}`", "",
             "| mode | keep-alive req/s | reconnect req/s | sidecars' CPU keep-alive µs/req | reconnect µs/req |",
             "|---|---|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(f"{doc['medians'][mode][w]:,.0f}" for w in WORKLOADS) + " | "
                     + " | ".join(f"{doc['cpu_us'][mode][w]:.1f}" for w in WORKLOADS) + " |")
    lines += ["", "| ratio | keep-alive | reconnect |", "|---|---|---|",
              *(f"| {mode} / addressed | " + " | ".join(f"{doc['ratios'][mode][w]:.2f}" for w in WORKLOADS) + " |"
                for mode in CAPTURED),
              *(f"| {mode} / addressed, median of each repeat's ratio | "
                + " | ".join(f"{doc['paired_ratios'][mode][w]:.2f}" for w in WORKLOADS) + " |" for mode in CAPTURED),
              "", "Bar (on the ratios of the medians): captured ≥ 0.95 × addressed on both: "
              + "; ".join(f"{mode} {'met' if doc['bar_met'][mode] else 'missed'}" for mode in CAPTURED) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100000, help="keep-alive requests per run")
    parser.add_argument("--reconnect-requests", type=int, default=10000, help="one connection per request")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pin", action="store_true", help="the sidecars on CPU 1, the client and the database on CPU 0")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "capture.json")
    parser.add_argument("--record", metavar="NAME",
                        help="also keep the result as DATE-COMMIT-NAME.json beside --out, to be committed")
    args = parser.parse_args()
    why = pods.missing_tools() or ("" if shutil.which("redis-benchmark") else "needs redis-benchmark (redis-tools)")
    if why:
        sys.exit(f"bench/capture.py {why}")
    record = report.record_stem(args.record) if args.record else None
    commit = report.source_commit()  # the code measured: as it is when the run starts
    samples: dict[str, dict[str, list[float]]] = {mode: {w: [] for w in WORKLOADS} for mode in MODES}
    cpu: dict[str, dict[str, list[float]]] = {mode: {w: [] for w in WORKLOADS} for mode in MODES}
    if not shutil.which("bpftool"):
        sys.exit("bench/capture.py needs bpftool for the captured-ebpf mode (apt-get install bpftool)")
    # The sidecars' inbound listeners are transparent (TPROXY's), which REDIRECT's connections reach as well.
    with pods.Mesh(direct=True, reporting="15s", capture_flags=CAPTURE_FLAGS["captured-ebpf"]) as mesh:
        for pod in mesh.pods.values():
            # Reconnect mode opens tens of thousands of connections to the pod addresses: let each
            # pod's clients (the app, the sidecars) reuse TIME_WAIT ports, as bench/run.py does on loopback.
            pod.run("sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000")
        prefix = pin(mesh) if args.pin else []
        pids = sidecar_pids(mesh)
        state = "captured-ebpf"
        for repeat in range(args.repeat):
            # Alternate the order, so neither mode always runs first on a warm machine.
            for mode in (MODES if repeat % 2 == 0 else tuple(reversed(MODES))):
                wanted = mode if mode in CAPTURED else "off"
                if wanted != state:
                    set_capture(mesh, wanted)
                    state = wanted
                for workload in WORKLOADS:
                    keepalive = workload == "keepalive"
                    count = args.requests if keepalive else args.reconnect_requests
                    before = cpu_seconds(pids)
                    rate = requests_per_second(mesh, mode, keepalive, count, args.clients, prefix)
                    cpu[mode][workload].append((cpu_seconds(pids) - before) / count * 1e6)
                    samples[mode][workload].append(rate)
                    print(f"repeat {repeat + 1}: {mode} {workload}: {rate:,.0f} req/s", flush=True)
    medians = {mode: {w: statistics.median(samples[mode][w]) for w in WORKLOADS} for mode in MODES}
    cpu_us = {mode: {w: statistics.median(cpu[mode][w]) for w in WORKLOADS} for mode in MODES}
    ratios = {mode: {w: medians[mode][w] / medians["addressed"][w] for w in WORKLOADS} for mode in CAPTURED}
    # Each repeat's own ratio: a captured mode and addressed run next to each other, so the machine's
    # drift between repeats (large on a shared host) cancels out of it.
    paired = {mode: {w: statistics.median(c / a for c, a in zip(samples[mode][w], samples["addressed"][w]))
                     for w in WORKLOADS} for mode in CAPTURED}
    doc = {"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "commit": commit,
           "command": "python " + " ".join(["bench/capture.py", *sys.argv[1:]]),
           "samples": samples, "medians": medians, "cpu_us": cpu_us, "ratios": ratios, "paired_ratios": paired,
           "bar_met": {mode: all(ratio >= 0.95 for ratio in ratios[mode].values()) for mode in CAPTURED}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    args.out.write_text(text)
    md = markdown(doc)
    if record:
        (args.out.parent / f"{record}.json").write_text(text)
        (args.out.parent / f"{record}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
