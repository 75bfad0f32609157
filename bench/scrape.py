"""Scrape cost: a real fastmesh sidecar holding N open connections spread over M
label sets; times GET /stats/prometheus end to end (HTTP included).

    python bench/scrape.py [--connections 5000] [--label-sets 1000] [--scrapes 30]

Until the peer exchange fills in peers, the M distinct peer workloads are
assigned by the bench itself through the telemetry's peer lookup (connection id
-> workload); everything else (engine, batches, reporting, exposition, HTTP) is
the real code path.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fastmesh.addr import Address
from fastmesh.identity import NodeMetadata, Workload
from fastmesh.peers import PeerInfo
from fastmesh.routing import OUTBOUND
from fastmesh.settings import ListenerConfig, SidecarConfig
from fastmesh.sidecar import BackgroundSidecar

import report  # bench/report.py: this script's directory is on sys.path

BENCH = Path(__file__).resolve().parent


# The clients and the server that holds their connections run in a child process,
# so that each process stays within the file descriptor limit (20,000 here).
CLIENTS = r"""
import resource, socket, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
count = int(sys.argv[1])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(4096)
print(server.getsockname()[1], flush=True)
relay_port = int(sys.stdin.readline())
held = []
threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(count)], daemon=True).start()
clients = []
for _ in range(count):
    client = socket.create_connection(("127.0.0.1", relay_port))
    client.sendall(b"0123456789")
    clients.append(client)
while len(held) < count:
    time.sleep(0.05)
print("ready", flush=True)
sys.stdin.readline()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--label-sets", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "scrape.json")
    parser.add_argument("--record", metavar="NAME",
                        help="also keep the result as DATE-COMMIT-NAME.json beside --out, to be committed")
    args = parser.parse_args()
    record = report.record_stem(args.record) if args.record else None
    commit = report.source_commit()  # the code measured: as it is when the run starts

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * args.connections + 500  # two sockets per relayed connection, plus pipes and the rest
    if hard < needed:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} fds this run needs")

    clients = subprocess.Popen([sys.executable, "-c", CLIENTS, str(args.connections)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    running = None
    try:
        upstream_port = int(clients.stdout.readline())
        node = NodeMetadata({"NAME": "ratings-v2-1", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v2",
                             "LABELS": {"app": "ratings", "version": "v2"}})
        listener = ListenerConfig.to_upstreams(Address("127.0.0.1", 0), [("127.0.0.1", upstream_port)], OUTBOUND,
                                               "mongodb.default.svc.cluster.local")
        config = SidecarConfig(listeners=[listener], admin=None, metrics=Address("127.0.0.1", 0),
                               node_metadata=node, reporting_duration=0.5)
        running = BackgroundSidecar(config)
        peers = [Workload(f"client-{i}", f"ns-{i % 10}", f"app-{i}", "v1", f"app-{i}", "v1", "Kubernetes")
                 for i in range(args.label_sets)]
        assigned: dict[int, Workload] = {}
        running.sidecar.telemetry.peer_of = lambda conn_id: PeerInfo(assigned.setdefault(
            conn_id, peers[len(assigned) % len(peers)]))
        clients.stdin.write(f"{running.listen.port}\n")
        clients.stdin.flush()
        if clients.stdout.readline().strip() != "ready":
            sys.exit("the client process did not open its connections")
        telemetry = running.sidecar.telemetry
        deadline = time.monotonic() + 60
        while len(telemetry.series) < args.label_sets:
            if time.monotonic() > deadline:
                sys.exit(f"only {len(telemetry.series)} label sets were reported")
            time.sleep(0.2)
        url = "http://%s:%d/stats/prometheus" % running.sidecar.metrics_address
        times, size = [], 0
        for _ in range(args.scrapes):
            start = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as response:
                size = len(response.read())
            times.append((time.perf_counter() - start) * 1000)
        active = running.sidecar.relay.stats()["active_connections"]
        label_sets = len(telemetry.series)
    finally:
        clients.stdin.close()
        clients.wait(30)
        if running is not None:
            running.stop()

    result = {
        "command": "python bench/scrape.py " + " ".join(sys.argv[1:]), "commit": commit,
        "connections": args.connections, "active_connections": active,
        "label_sets": label_sets, "scrapes": args.scrapes,
        "body_bytes": size, "ms_min": round(min(times), 2), "ms_median": round(statistics.median(times), 2),
        "ms_max": round(max(times), 2), "budget_ms": args.budget_ms,
        "pass": statistics.median(times) <= args.budget_ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if record:
        (args.out.parent / f"{record}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{'PASS' if result['pass'] else 'FAIL'}: median scrape {result['ms_median']} ms "
          f"with {active} open connections across {result['label_sets']} label sets (budget {args.budget_ms} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
