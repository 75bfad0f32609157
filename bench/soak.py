"""The soak: two sidecar pairs as processes (plaintext with fastmesh's exchange, and mTLS),
each outbound sidecar -> inbound sidecar -> upstream servers in worker processes, driven by
those workers' clients (soak_traffic.py) with thousands of concurrent connections of random
sizes, split writes, half-closes, resets, aborts, slow readers and writers. Checks
(soak_checks.py): every byte each way by sha256, every connection's end, both reporters'
`istio_tcp_*` totals against the clients' counts, and each sidecar's RSS and open fds back to
their baseline after the load. See bench/README.md.

    python bench/soak.py [--duration 600] [--connections 100000] [--bytes 50e9] [--concurrency 2000] ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mtls
import peers
import report
import soak_checks
import soak_traffic
from fastmesh.tls import SESSION_CACHE_SIZE
from prometheus_client.parser import text_string_to_metric_families
from soak_traffic import (
    ACTIVE,
    DOWN_BYTES,
    FAILED,
    FINISHED,
    STARTED,
    UP_BYTES,
    Job,
    Pool,
    Traffic,
)

BENCH = Path(__file__).resolve().parent
HOST = peers.HOST
SERVICE = "mongodb.default.svc.cluster.local"
PAIRS = ("plaintext", "mtls")   # Plan.pair indexes this
WARMUP_MAX_SIZE = 1 << 20       # warm-up connections stay small, but large enough to splice through pipes
# The baseline is the sidecars' steady state: an mTLS inbound's cache of TLS sessions full (half the
# warm-up goes through each pair, each connection leaves one session), as after any crowd. Filled after
# a baseline taken earlier, the cache alone was some 7 MiB of the after-load RSS (the sessions of a
# crowd pin pages of a heap it spread).
DEFAULT_WARMUP = 2 * SESSION_CACHE_SIZE + 300
ENGINE_GAUGES = ("pipes_pooled", "pipes_in_use", "buffers_in_use", "active_connections", "tls_handshakes",
                 "tls_resumed", "tls_truncated", "resets_propagated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load at most (default 600)")
    p.add_argument("--connections", type=int, default=100_000,
                   help="connections to open at most, half through each pair (default 100000)")
    p.add_argument("--bytes", type=soak_traffic.parse_bytes, default=50 * 10**9,
                   help="bytes (both directions) that --connections should move: sets the mean size, "
                        "bytes / connections / 2 per direction (default 50e9)")
    p.add_argument("--sizes", default="", metavar="alpha=A,zero=Z,max=SIZE",
                   help="size distribution per direction: 0 with probability zero (0.05), else Lomax of tail "
                        "index alpha (1.1) cut at max (64MiB), scaled to the mean --bytes sets")
    p.add_argument("--mix", default="", metavar="KIND=WEIGHT,...",
                   help="weights of the connection kinds (default " +
                        ",".join(f"{k}={w}" for k, w in soak_traffic.DEFAULT_MIX.items()) + ")")
    p.add_argument("--slow-fraction", type=float, default=0.05,
                   help="chance of each slow side (client/server writer/reader) per connection (default 0.05)")
    p.add_argument("--slow-seconds", type=float, default=2.0, help="how long a slow side stays slow (default 2)")
    p.add_argument("--concurrency", type=int, default=2000, help="connections open at once (default 2000)")
    p.add_argument("--workers", type=int, default=3, help="traffic processes, each with clients and an upstream "
                                                         "server (default 3)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"warm-up connections before the baseline (default {DEFAULT_WARMUP}: enough to fill the mTLS "
                        "inbound's TLS session cache)")
    p.add_argument("--seed", type=int, default=1, help="seed of every plan and stream (default 1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one connection may take (default 300)")
    p.add_argument("--reporting-duration", default="1s", help="the sidecars' --reporting-duration (default 1s)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds after the sidecars are idle before the baseline and the after-load sample")
    p.add_argument("--sidecar-args", default="", metavar="[VAR=VALUE ...] OPTIONS",
                   help="extra `fastmesh serve` options for all four sidecars; leading VAR=VALUE words set their "
                        "environment (e.g. 'GLIBC_TUNABLES=glibc.malloc.trim_threshold=0 --workers 2')")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="where soak.json and soak.png go")
    p.add_argument("--record", metavar="NAME", help="also keep the run as DATE-COMMIT-NAME.json and .png "
                                                    "(refused on a working tree with changes)")
    a = p.parse_args(argv)
    if a.record:
        a.record = report.record_stem(a.record)
    return a


# ------------------------------------------------------------------ the sidecars

@dataclass
class Sidecar:
    name: str           # plaintext:outbound, ...
    listen: int
    metrics: int
    admin: int
    proc: peers.Proc

    def scrape(self) -> list:
        url = f"http://{HOST}:{self.metrics}/stats/prometheus"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def active(self) -> int:
        return sum(int(s.value) for s in self.scrape() if s.name == "fastmesh_active_connections")

    def implementation(self) -> str:
        """The engine the sidecar runs ('cython' or 'python'), from its admin port."""
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}/stats", timeout=10) as response:
            return json.load(response)["implementation"]

    def engine_stats(self) -> dict:
        """The admin port's /stats engine gauges that explain fds and memory kept after a load."""
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}/stats", timeout=10) as response:
            stats = json.load(response)
        engine = stats.get("engine", stats)
        return {key: engine[key] for key in ENGINE_GAUGES if key in engine}

    def resources(self) -> dict:
        pid = self.proc.pid
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def start_sidecars(tmp: Path, upstreams: list[int], a: argparse.Namespace) -> list[Sidecar]:
    """Each pair's inbound sidecar (in front of every worker's server), then its outbound one."""
    options = peers.parse_variant("soak=" + a.sidecar_args)   # leading VAR=VALUE words: the environment
    env = peers.fastmesh_env(options.env)
    certs = mtls.make_certs(tmp, env)
    started = []
    for pair in PAIRS:
        inbound_port = peers.free_port()
        for side, port, upstream_ports, args in (
                ("inbound", inbound_port, upstreams,
                 [*peers.INBOUND_SIDECAR, *(mtls.fastmesh_args("server", certs) if pair == "mtls" else
                                            ["--plaintext-exchange"])]),
                ("outbound", peers.free_port(), [inbound_port],
                 [*peers.OUTBOUND_SIDECAR, "--mesh-peer", *(mtls.fastmesh_args("client", certs) if pair == "mtls"
                                                            else ["--plaintext-exchange"])])):
            metrics, admin = peers.free_port(), peers.free_port()
            argv = [sys.executable, "-m", "fastmesh", "serve", "--listen", f"{HOST}:{port}",
                    *(arg for upstream in upstream_ports for arg in ("--upstream", f"{HOST}:{upstream}")),
                    "--destination-service", SERVICE, "--metrics", f"{HOST}:{metrics}", "--admin", f"{HOST}:{admin}",
                    "--reporting-duration", a.reporting_duration, *args, *options.args]
            sidecar = Sidecar(f"{pair}:{side}", port, metrics, admin, peers.Proc(f"{pair}-{side}", argv, tmp, env=env,
                                                                            cwd=tmp))
            started.append(sidecar)
            sidecar.proc.wait_listening(port, timeout=60)
            sidecar.proc.wait_listening(metrics, timeout=60)
    return started


# ------------------------------------------------------------------ running the load

@dataclass
class Run:
    """The soak's state: sidecars, workers' shared counters, and the timeline sampled once a second."""

    a: argparse.Namespace
    traffic: Traffic
    pool: Pool
    sidecars: list[Sidecar]
    listeners: list[socket.socket]
    counters: list
    stop: object
    started: float = field(default_factory=time.monotonic)
    timeline: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    _next_sample: float = 0.0

    def tick(self, phase: str) -> None:
        """Sample every second; a sidecar that died ends the run."""
        for sidecar in self.sidecars:
            if not sidecar.proc.alive():
                raise RuntimeError(f"{sidecar.name} exited ({sidecar.proc.popen.returncode}):\n{sidecar.proc.tail()}")
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + 1.0
        totals = [sum(row[i] for row in self.counters) for i in range(6)]
        self.timeline.append({"t": round(now - self.started, 2), "phase": phase,
                              **{s.name: s.resources() for s in self.sidecars},
                              "started": totals[STARTED], "finished": totals[FINISHED], "up": totals[UP_BYTES],
                              "down": totals[DOWN_BYTES], "active": totals[ACTIVE], "failed": totals[FAILED]})

    def mark(self, what: str) -> None:
        self.events.append({"t": round(time.monotonic() - self.started, 2), "event": what})

    def phase(self, name: str, job: Job, deadline: float | None = None) -> tuple[list, list]:
        """Fork the workers for one job, stop new connections at `deadline`, wait until every client
        is done and the sidecars are idle, drain the servers; return all client and server records."""
        self.stop.value = 0
        context = multiprocessing.get_context("fork")
        workers, pipes = [], []
        for index, listener in enumerate(self.listeners):
            ours, theirs = context.Pipe()
            worker = context.Process(target=soak_traffic.worker_main, daemon=True,
                                     args=(index, len(self.listeners), self.traffic, self.pool, job, listener,
                                           self.counters[index], self.stop, theirs))
            worker.start()
            theirs.close()
            workers.append(worker)
            pipes.append(ours)
        self.mark(f"{name} started")
        waiting = set(range(len(pipes)))
        while waiting:
            for index in list(waiting):
                if pipes[index].poll():
                    try:
                        pipes[index].recv()
                    except EOFError:
                        workers[index].join()
                        raise RuntimeError(f"traffic worker {index} exited ({workers[index].exitcode})") from None
                    waiting.discard(index)
            if deadline is not None and time.monotonic() > deadline and not self.stop.value:
                self.stop.value = 1
                self.mark(f"{name}: --duration reached")
            self.tick(name)
            time.sleep(0.05)
        self.mark(f"{name}: clients done")
        self.wait_idle(name)
        for pipe in pipes:
            pipe.send("drain")
        clients, servers = [], []
        for pipe, worker in zip(pipes, workers):
            while not pipe.poll(0.2):
                self.tick(name)
            found_clients, found_servers = pipe.recv()
            clients += found_clients
            servers += found_servers
            worker.join()
        return clients, servers

    def wait_idle(self, phase: str, timeout: float = 120.0) -> None:
        """Until no sidecar has an open connection (every relayed connection has closed)."""
        deadline = time.monotonic() + timeout
        while any(s.active() for s in self.sidecars):
            if time.monotonic() > deadline:
                raise RuntimeError("connections still open in the sidecars after the clients finished: "
                                   + ", ".join(f"{s.name} {s.active()}" for s in self.sidecars))
            self.tick(phase)
            time.sleep(0.2)

    def settled_resources(self, phase: str) -> dict:
        """After the sidecars went idle and --settle seconds: each sidecar's RSS and fds."""
        self.wait_idle(phase)
        until = time.monotonic() + self.a.settle
        while time.monotonic() < until:
            self.tick(phase)
            time.sleep(0.1)
        self.mark(f"{phase} sample")
        return {s.name: {**s.resources(), "engine": s.engine_stats()} for s in self.sidecars}

    def final_totals(self, expected: dict[int, int], timeout: float = 30.0) -> dict[str, dict]:
        """Each sidecar's istio_tcp_* totals once every connection has been reported closed (the
        final flush), or what they are after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            totals = {s.name: soak_checks.reporter_totals(s.scrape()) for s in self.sidecars}
            flushed = all(totals[s.name].get("istio_tcp_connections_closed_total", 0)
                          >= expected[PAIRS.index(s.name.split(":")[0])] for s in self.sidecars)
            if flushed or time.monotonic() > deadline:
                return totals
            self.tick("flush")
            time.sleep(0.5)


def traffic_of(a: argparse.Namespace, max_size: int | None = None) -> Traffic:
    sizes = soak_traffic.parse_sizes(a.sizes, a.bytes / max(1, a.connections) / 2)
    if max_size is not None:
        sizes = soak_traffic.SizeDistribution(min(sizes.mean, max_size / 16), max_size, sizes.alpha, sizes.zero)
    mix = soak_traffic.parse_mix(a.mix) if a.mix else dict(soak_traffic.DEFAULT_MIX)
    return Traffic(a.seed, sizes, mix, a.slow_fraction, a.slow_seconds)


def soak(a: argparse.Namespace, tmp: Path) -> dict:
    """The whole run; returns the JSON document (checks included)."""
    workers = max(1, a.workers)
    listeners = [upstream_listener() for _ in range(workers)]
    traffic = traffic_of(a)
    counters = [soak_traffic.progress_counters() for _ in range(workers)]
    stop = soak_traffic.stop_flag()
    sidecars = start_sidecars(tmp, [s.getsockname()[1] for s in listeners], a)
    run = Run(a, traffic, Pool(a.seed), sidecars, listeners, counters, stop)
    engines = {s.name: s.implementation() for s in sidecars}
    targets = tuple((HOST, s.listen) for s in sidecars if s.name.endswith(":outbound"))
    per_worker = max(1, a.concurrency // workers)

    warm = Run(a, traffic_of(a, WARMUP_MAX_SIZE), run.pool, sidecars, listeners, counters, stop,
               run.started, run.timeline, run.events)
    # The warm-up opens its connections all at once (up to --concurrency), so the engine's pools of
    # pipes and buffers have served a crowd before the baseline is taken.
    warm_clients, warm_servers = warm.phase("warm-up", Job(0, a.warmup, targets, max(1, min(a.warmup, a.concurrency)
                                                                                     // workers), a.timeout))
    baseline = run.settled_resources("baseline")
    load_started = time.monotonic()
    clients, servers = run.phase("load", Job(a.warmup, a.connections, targets, per_worker, a.timeout),
                                 deadline=load_started + a.duration)
    load_seconds = time.monotonic() - load_started
    after = run.settled_resources("after-load")

    verdicts = soak_checks.judge(warm.traffic, warm_clients, warm_servers)
    load_verdicts = soak_checks.judge(traffic, clients, servers)
    verdicts.add(load_verdicts)   # the reporters counted the warm-up too
    expected = {pair: tally.connections for pair, tally in verdicts.pairs.items()}
    totals = run.final_totals(expected)
    checks = soak_checks.connection_checks(verdicts, len(warm_clients) + len(clients))
    for index, pair in enumerate(PAIRS):
        checks += soak_checks.metric_checks(pair, verdicts.pairs[index], totals[f"{pair}:outbound"],
                                            totals[f"{pair}:inbound"])
    checks += [soak_checks.resource_check(s.name, baseline[s.name], after[s.name]) for s in sidecars]
    for sidecar in sidecars:
        sidecar.proc.stop(grace=30)
        code = sidecar.proc.popen.returncode
        checks.append(soak_checks.Check(f"{sidecar.name} exits cleanly on SIGTERM", code == 0, f"exit status {code}"))
    doc = document(a, run, load_verdicts, verdicts, totals, baseline, after, checks, load_seconds, len(clients))
    doc["engines"] = engines
    return doc


def upstream_listener() -> socket.socket:
    """A worker's upstream listening socket, bound before the workers fork (they inherit it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(4096)
    return sock


# ------------------------------------------------------------------ the report

def document(a, run: Run, load: soak_checks.Verdicts, everything: soak_checks.Verdicts, totals: dict,
             baseline: dict, after: dict, checks: list, load_seconds: float, load_connections: int) -> dict:
    up = sum(t.up + t.up_bounds[1] for t in load.pairs.values())
    down = sum(t.down + t.down_bounds[0] for t in load.pairs.values())
    peak = {s.name: {key: max(sample[s.name][key] for sample in run.timeline) for key in ("rss_kib", "fds")}
            for s in run.sidecars}
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
        "commit": report.source_commit(),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "sizes": asdict(run.traffic.sizes),
        "load": {"seconds": round(load_seconds, 1), "connections": load_connections,
                 "by_kind": dict(load.kinds), "by_pair": {PAIRS[i]: t.connections for i, t in load.pairs.items()},
                 "up_bytes": up, "down_bytes": down, "bytes": up + down,
                 "throughput_mb_s": round((up + down) / max(load_seconds, 1e-9) / 1e6, 1)},
        "errors": dict(everything.errors),
        "problems": {name: found[:20] for name, found in everything.problems.items()},
        "expected": {PAIRS[i]: asdict(t) for i, t in everything.pairs.items()},
        "reporters": {name: {(k if isinstance(k, str) else "/".join(k)): (sorted(v) if isinstance(v, set) else v)
                             for k, v in found.items()} for name, found in totals.items()},
        "resources": {"baseline": baseline, "after": after, "peak": peak},
        "timeline": run.timeline,
        "events": run.events,
        "checks": [{"check": c.name, "status": "PASS" if c.ok else "FAIL", "detail": c.detail} for c in checks],
    }


def summary(doc: dict) -> str:
    load = doc["load"]
    lines = [(f"soak: {load['connections']:,} connections in {load['seconds']:.0f} s "
              f"({load['by_pair'].get('plaintext', 0):,} plaintext, {load['by_pair'].get('mtls', 0):,} mTLS), "
              f"{load['bytes'] / 1e9:.2f} GB ({load['up_bytes'] / 1e9:.2f} up, {load['down_bytes'] / 1e9:.2f} down), "
              f"{load['throughput_mb_s']} MB/s; engines {sorted(set(doc['engines'].values()))}"),
             "kinds: " + ", ".join(f"{k} {v:,}" for k, v in sorted(load["by_kind"].items())),
             "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(doc["errors"].items())) or "none")]
    for name, base in doc["resources"]["baseline"].items():
        after, peak = doc["resources"]["after"][name], doc["resources"]["peak"][name]
        lines.append(f"{name}: RSS {base['rss_kib'] / 1024:.1f} -> peak {peak['rss_kib'] / 1024:.1f} -> "
                     f"{after['rss_kib'] / 1024:.1f} MiB, fds {base['fds']} -> peak {peak['fds']} -> {after['fds']}")
    lines += [("PASS " if c["status"] == "PASS" else "FAIL ") + f"{c['check']}: {c['detail']}" for c in doc["checks"]]
    return "\n".join(lines)


def chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = doc["timeline"]
    t = [s["t"] for s in timeline]
    names = list(doc["resources"]["baseline"])
    fig, (rss, fds, rate) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for name in names:
        rss.plot(t, [s[name]["rss_kib"] / 1024 for s in timeline], label=name)
        fds.plot(t, [s[name]["fds"] for s in timeline], label=name)
    mb_s = [0.0] + [((b["up"] + b["down"]) - (a["up"] + a["down"])) / max(b["t"] - a["t"], 1e-9) / 1e6
                    for a, b in itertools.pairwise(timeline)]
    rate.plot(t, mb_s, color="tab:blue", label="MB/s (both directions)")
    open_now = rate.twinx()
    open_now.plot(t, [s["active"] for s in timeline], color="tab:orange", label="open connections")
    for ax in (rss, fds, rate):
        for event in doc["events"]:
            ax.axvline(event["t"], color="grey", lw=0.6, ls=":")
    rss.set_ylabel("RSS (MiB)")
    fds.set_ylabel("open fds")
    rate.set_ylabel("MB/s")
    open_now.set_ylabel("open connections")
    rate.set_xlabel("seconds")
    rss.legend(fontsize=7, ncol=2)
    fds.legend(fontsize=7, ncol=2)
    rate.legend(loc="upper left", fontsize=7)
    open_now.legend(loc="upper right", fontsize=7)
    failed = [c["check"] for c in doc["checks"] if c["status"] == "FAIL"]
    fig.suptitle(f"fastmesh soak {doc['started']}: {doc['load']['connections']:,} connections, "
                 f"{doc['load']['bytes'] / 1e9:.2f} GB, {'all checks pass' if not failed else f'{len(failed)} FAIL'}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(doc: dict, out: Path, record: str | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in filter(None, ("soak", record)):
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        written.append(out / f"{stem}.json")
        try:
            chart(doc, out / f"{stem}.png")
            written.append(out / f"{stem}.png")
        except ImportError:
            print("matplotlib is missing (pip install matplotlib): no PNG", file=sys.stderr)
    return written


def keep_logs(tmp: Path, into: Path) -> list[Path]:
    """The sidecars' logs of a run that failed a check, which would go with its temporary directory."""
    into.mkdir(parents=True, exist_ok=True)
    kept = []
    for log in sorted(tmp.glob("*.log")):
        kept.append(into / log.name)
        kept[-1].write_bytes(log.read_bytes())
    return kept


def main(argv=None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastmesh-soak-") as tmp:
        try:
            doc = soak(a, Path(tmp))
        finally:
            peers.stop_all()
        failed = [c["check"] for c in doc["checks"] if c["status"] == "FAIL"]
        kept = keep_logs(Path(tmp), a.out / "soak-logs") if failed else []
    print(summary(doc))
    for path in [*write(doc, a.out, a.record), *kept]:
        print(f"wrote {path}")
    if failed:
        print(f"soak: {len(failed)} checks failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
