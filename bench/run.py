"""Benchmark fastmesh against no relay, haproxy, nginx and socat, side by side
in one run (the machine is shared and noisy: only ratios within a run mean
anything). See bench/README.md.

    python bench/run.py [--quick] [--relays direct,fastmesh,haproxy,nginx,socat] [--repeat K] ...
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import latency
import mtls
import peers
import report
import syscalls
import workloads
from peers import RelaySpec

BENCH = Path(__file__).resolve().parent
KINDS = ["direct", "fastmesh", "haproxy", "nginx", "socat"]   # the default rows
OPTIONAL = list(peers.PROTOTYPES)   # rows only --relays asks for
# Measurement units in run order; each starts a fresh relay in front of its own backend.
UNITS = ["idle_rss", "iperf_1", "iperf_4", "redis_keepalive", "redis_reconnect", "latency"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s iperf3, 20k/5k redis requests, 1 repeat")
    p.add_argument("--seconds", type=float, help="iperf3 duration per run (default 5)")
    p.add_argument("--requests", type=int, help="redis-benchmark requests with keep-alive (default 100000)")
    p.add_argument("--reconnect-requests", type=int,
                   help="redis-benchmark requests when reconnecting per request (default 10000: many more "
                        "exhaust the client's ephemeral ports within one run)")
    p.add_argument("--latency-requests", type=int,
                   help="redis-benchmark requests per latency point (1 and 10 clients, keep-alive; default 20000)")
    p.add_argument("--idle-connections", type=int, help="connections held open for the RSS test (default 5000)")
    p.add_argument("--repeat", type=int, help="runs of each measurement, median taken (default 3)")
    p.add_argument("--relays", default=",".join(KINDS),
                   help=f"comma list from {','.join(KINDS + OPTIONAL)} (default: {','.join(KINDS)}); proto-epoll and "
                        "proto-uring are bench/uring's minimal C relay on epoll and on io_uring")
    p.add_argument("--fastmesh-variant", action="append", default=[], metavar="NAME=ARGS",
                   help="extra row fastmesh[NAME]: leading VAR=VALUE words set the environment, the rest are "
                        "serve options, e.g. 'py=FASTMESH_NO_EXTENSIONS=1' or 'w2=--workers 2' (repeatable)")
    p.add_argument("--pairs", action="store_true",
                   help="add rows pair[exchange] and pair[no-exchange]: an outbound and an inbound fastmesh "
                        "in a row, with the peer metadata exchange on and off; and haproxy[pair], nginx[pair]: "
                        "the same two hops made of haproxy or nginx")
    p.add_argument("--mtls", action="store_true",
                   help="add rows pair[mtls], pair[mtls-no-exchange] (two fastmesh sidecars over mutual TLS, the "
                        "exchange on and off), haproxy[tls-pair], nginx[tls-pair] (the same pair made of haproxy "
                        "or nginx stream) and the plaintext pair[exchange] for reference")
    p.add_argument("--routed", action="store_true",
                   help="add row fastmesh[routed]: fastmesh configured by Istio ServiceEntry, DestinationRule "
                        "and VirtualService files (serve -c) instead of --listen/--upstream")
    p.add_argument("--pin", action="store_true",
                   help="pin every relay to CPU 1 and the clients and servers to CPU 0 (taskset), for every row "
                        "alike: less spread between runs, at the cost of a placement chosen for all "
                        "(--pin-layout apart)")
    p.add_argument("--pin-layout", choices=list(peers.PIN_LAYOUTS),
                   help="pin as --pin, with the relay on CPU 1 alone (apart), beside the backend server "
                        "(with-server) or beside the client (with-client)")
    p.add_argument("--haproxy-threads", type=int, default=1, help="haproxy nbthread (default 1)")
    p.add_argument("--socat-backlog", type=int,
                   help="add backlog=N to socat's listener (default: socat's own, 5; see README)")
    p.add_argument("--syscalls", action="store_true",
                   help="after the untraced runs, count every row's system calls and wake-ups per request "
                        "(and per hop of a pair) in traced runs of its own, under perf stat: bench/syscalls.py")
    p.add_argument("--skip", default="", help=f"comma list of measurements to leave out, from {','.join(UNITS)}")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="output directory (default bench/results)")
    p.add_argument("--record", metavar="NAME",
                   help="also keep this run as DATE-COMMIT-NAME.json and .md in the output directory, to be "
                        "committed with the figures taken from it (refused on a working tree with changes)")
    a = p.parse_args(argv)
    if a.record:
        a.record = report.record_stem(a.record)  # before the run: a dirty tree is refused at once
    quick = dict(seconds=2, requests=20000, reconnect_requests=5000, latency_requests=10000, idle_connections=5000,
                 repeat=1)
    full = dict(seconds=5, requests=100000, reconnect_requests=10000, latency_requests=20000, idle_connections=5000,
                repeat=3)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def relay_specs(a: argparse.Namespace) -> list[RelaySpec]:
    wanted = [r.strip() for r in a.relays.split(",") if r.strip()]
    unknown = set(wanted) - set(KINDS + OPTIONAL)
    if unknown:
        sys.exit(f"unknown relays {sorted(unknown)}; choose from {KINDS + OPTIONAL}")
    specs = []
    for kind in KINDS:
        if kind in wanted:
            specs.append(RelaySpec(kind, kind))
        if kind == "fastmesh":
            specs += [peers.parse_variant(v) for v in a.fastmesh_variant]
            if a.pairs:
                specs += peers.sidecar_pairs() + [peers.relay_pair(peer) for peer in ("haproxy", "nginx")]
            if a.mtls:
                specs += [p for p in peers.mtls_pairs() if p.name not in {s.name for s in specs}]
            if a.routed:
                specs.append(peers.routed_spec())
    specs += [RelaySpec(name, "prototype") for name in OPTIONAL if name in wanted]
    # A bench of fastmesh without fastmesh means nothing: a row that cannot even
    # print its version stops the run.
    for s in specs:
        if s.kind == "fastmesh" and peers.fastmesh_version(s) is None:
            sys.exit(f"{s.name}: `python -m fastmesh --version` failed; install fastmesh first (pip install -e .)")
    return specs


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    return lines[0].strip() if lines else ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def machine_facts(specs: list[RelaySpec]) -> dict:
    w = peers.which
    model = next((l.split(":", 1)[1].strip() for l in _read("/proc/cpuinfo").splitlines()
                  if l.startswith("model name")), "unknown")
    return {
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": model,
        "kernel": platform.release(), "python": sys.version.split()[0], "hostname": platform.node(),
        "loadavg_start": _read("/proc/loadavg"),
        "tools": {
            "iperf3": _first_line([w("iperf3"), "--version"]),
            "haproxy": _first_line([w("haproxy"), "-v"]),
            "nginx": _first_line([w("nginx"), "-v"]),
            "nginx_stream_module": peers.nginx_stream_module() or "built in",
            "socat": _first_line([w("socat"), "-V"]).replace("socat by Gerhard Rieger", "").strip() or "socat",
            "redis-server": _first_line([w("redis-server"), "--version"]),
            "redis-benchmark": _first_line([w("redis-benchmark"), "--version"]),
            **{s.name: peers.fastmesh_version(s) for s in specs if s.kind == "fastmesh"},
            **({"gcc": _first_line(["gcc", "--version"]),
                "liburing-dev": _first_line(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"])}
               if any(s.kind == "prototype" for s in specs) else {}),
        },
        "sysctl": {k: _read(f"/proc/sys/net/{k.replace('.', '/')}") for k in
                   ("ipv4.tcp_tw_reuse", "ipv4.ip_local_port_range", "core.somaxconn")},
    }


def measure(unit: str, spec: RelaySpec, a: argparse.Namespace, tmp: Path, opts: peers.Options) -> dict:
    """One measurement of one relay: start its backend and the relay, run the client, stop both."""
    with ExitStack() as stack:
        if unit == "idle_rss":
            backend = stack.enter_context(workloads.hold_server())
            upstream = backend.port
        elif unit.startswith("iperf"):
            upstream = stack.enter_context(workloads.iperf_server(tmp))
        else:
            # A fresh server on a fresh port for every run: TIME_WAIT entries left by
            # earlier runs' connections to a shared port would throttle connect() for
            # everyone (the port search fills up), whichever relay is measured.
            upstream = stack.enter_context(workloads.redis_server(tmp))
        relay = stack.enter_context(peers.running(spec, upstream, tmp, opts))
        if unit == "latency":
            return latency.measure(relay, a.latency_requests)
        if unit == "idle_rss":
            return workloads.idle_rss(relay, backend, a.idle_connections)
        if unit.startswith("iperf"):
            return workloads.iperf(relay, a.seconds, 1 if unit == "iperf_1" else 4)
        return workloads.redis_bench(relay, a.requests if unit == "redis_keepalive" else a.reconnect_requests,
                                     keepalive=unit == "redis_keepalive")


def forks_per_connection(idle: dict) -> bool:
    """A relay that forks per connection (socat) would count its shared pages
    once per child in an RSS sum (GBs that are not really in use): use PSS for it."""
    return idle["processes_after"] - idle["processes_before"] >= idle["connections"] // 2


def headline(unit: str, raw: dict) -> dict[str, float]:
    """The numbers that go into the tables, keyed by metric."""
    if unit == "idle_rss":
        return {"idle_rss": raw["pss_growth_mib" if forks_per_connection(raw) else "rss_growth_mib"]}
    if unit == "latency":
        return latency.headline(raw)
    if unit.startswith("iperf"):
        out = {unit: raw["bits_per_second"]}
        if unit == "iperf_1" and "cpu_seconds_per_gb" in raw:
            out["cpu_per_gb"] = raw["cpu_seconds_per_gb"]   # CPU/GB rides on the 1-stream run
        return out
    out = {unit: raw["requests_per_second"]}
    if "cpu_us_per_request" in raw:
        out["cpu_" + unit.removeprefix("redis_")] = raw["cpu_us_per_request"]
    if "kernel_us_per_request" in raw:
        out["kernel_" + unit.removeprefix("redis_")] = raw["kernel_us_per_request"]
    return out


def _show(unit: str, nums: dict[str, float]) -> str:
    if unit == "latency":
        return latency.show(nums)
    parts = []
    for m, v in nums.items():
        parts.append({"iperf_1": f"{v / 1e9:.2f} Gbit/s", "iperf_4": f"{v / 1e9:.2f} Gbit/s",
                      "cpu_per_gb": f"{v:.3f} CPU s/GB", "cpu_keepalive": f"{v:.2f} CPU µs/req",
                      "cpu_reconnect": f"{v:.2f} CPU µs/req", "kernel_keepalive": f"{v:.2f} kernel µs/req",
                      "kernel_reconnect": f"{v:.2f} kernel µs/req", "idle_rss": f"{v:+.1f} MiB"}.get(m, f"{v:,.0f} req/s"))
    return ", ".join(parts)


def main(argv=None) -> int:
    a = parse_args(argv)
    commit = report.source_commit()  # the code measured: as it is when the run starts
    notes: list[str] = []
    installed = peers.ensure_tools()
    if installed:
        notes.append(f"installed Debian packages: {' '.join(installed)}")
    if layout := peers.pin_layout(a.pin, a.pin_layout):
        notes.append(peers.describe_layout(layout))
    specs = relay_specs(a)
    if not specs:
        sys.exit("nothing to measure")
    units = [u for u in UNITS if u not in {s.strip() for s in a.skip.split(",")}]
    nofile = workloads.raise_nofile(2 * a.idle_connections + 1000)
    opts = peers.Options(haproxy_threads=a.haproxy_threads, socat_backlog=a.socat_backlog,
                         nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    machine = machine_facts(specs)
    tw = machine["sysctl"]["ipv4.tcp_tw_reuse"]
    notes.append(f"net.ipv4.tcp_tw_reuse = {tw} "
                 + {"0": "(off: reconnect mode may exhaust ephemeral ports in TIME_WAIT)",
                    "1": "(reuse of TIME_WAIT ports for all outgoing connections)",
                    "2": "(reuse of TIME_WAIT ports on loopback only: enough for reconnect mode here)"}.get(tw, ""))
    if opts.haproxy_maxconn < 20000:
        notes.append(f"haproxy maxconn lowered from 20000 to {opts.haproxy_maxconn}: the RLIMIT_NOFILE hard limit "
                     f"is {opts.nofile} and cannot be raised here, and haproxy will not start unless it can have "
                     "2.5 descriptors per connection (two sockets plus splice pipes)")
    notes.append(f"haproxy: nbthread {a.haproxy_threads}, mode tcp, option splice-auto, "
                 f"maxconn {opts.haproxy_maxconn}; "
                 "nginx: 1 worker, worker_connections 20000; socat: one forked process per connection, "
                 + (f"backlog {a.socat_backlog}" if a.socat_backlog else
                    "default backlog 5 (connection bursts overflow it: 1 s SYN retransmits; see --socat-backlog)"))
    if "idle_rss" in units:
        notes.append("idle RSS growth is VmRSS summed over the relay's processes; for a relay that forks a process "
                     "per connection (socat) it is PSS growth instead (marked PSS), since an RSS sum counts shared "
                     "pages once per child (both sums are in the JSON raw results); direct has no relay process")
    if nofile < 2 * a.idle_connections + 100:
        notes.append(f"RLIMIT_NOFILE only {nofile}: idle test may fail")

    # Ctrl-C raises KeyboardInterrupt; make SIGTERM/SIGHUP do the same so the finally blocks stop every child.
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    started = datetime.now(timezone.utc)
    raw: dict[str, dict[str, list]] = {s.name: {} for s in specs}
    samples: dict[str, dict[str, list[float]]] = {s.name: {m: [] for m in report.ALL_METRICS} for s in specs}
    errors: list[dict] = []
    interrupted = False
    traced = None   # bench/syscalls.py's counts, with --syscalls
    print(f"relays: {', '.join(s.name for s in specs)}; {a.repeat} repeat(s); iperf3 {a.seconds:g}s; "
          f"redis {a.requests}/{a.reconnect_requests} requests, {a.latency_requests} per latency point; "
          f"{a.idle_connections} idle connections", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastmesh-bench-") as tmpname:
        tmp = Path(tmpname)
        if any(s.kind == "pair" and s.outbound.tls for s in specs):
            opts.certs = mtls.make_certs(tmp, peers.fastmesh_env({}))
            notes.append("mTLS rows: a root and two RSA 2048 identities from `fastmesh ca` (ratings-v2 as "
                         "spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2, mongodb as .../sa/default); "
                         "fastmesh outbound --mesh-peer --certs, inbound --certs --peer-authentication STRICT; "
                         "haproxy: server ssl crt ca-file verify required alpn istio-peer-exchange,istio, bind ssl "
                         "crt ca-file verify required; nginx: proxy_ssl with proxy_ssl_verify off (it checks host "
                         "names, the certificates carry a URI SAN only), ssl_verify_client on; every relay resumes "
                         "sessions as it does by default")
        try:
            for rep in range(a.repeat):
                # Rotate the order each repeat so no relay always runs first (or right after another).
                order = specs[rep % len(specs):] + specs[:rep % len(specs)]
                for unit in units:
                    for spec in order:
                        if unit == "idle_rss" and spec.kind == "direct":
                            continue
                        label = f"[{rep + 1}/{a.repeat}] {unit:<16} {spec.name:<16}"
                        try:
                            result = measure(unit, spec, a, tmp, opts)
                        except Exception as exc:  # one failed measurement must not lose the others
                            if not isinstance(exc, (workloads.MeasureError, RuntimeError, OSError)):
                                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
                            errors.append({"relay": spec.name, "metric": unit, "repeat": rep, "error": str(exc)})
                            print(f"{label} ERROR {str(exc).splitlines()[0]}", flush=True)
                            continue
                        raw[spec.name].setdefault(unit, []).append(result)
                        nums = headline(unit, result)
                        for m, v in nums.items():
                            samples[spec.name][m].append(v)
                        print(f"{label} {_show(unit, nums)}", flush=True)
            if a.syscalls:   # runs of their own, after the rates: tracing perturbs them
                traced = syscalls.measure(specs, a.requests, a.reconnect_requests, tmp, opts)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: stopping every started process, writing partial results", file=sys.stderr)
        finally:
            peers.stop_all()

    values = {r: {m: report.median(v) for m, v in ms.items()} for r, ms in samples.items()}
    machine["loadavg_end"] = _read("/proc/loadavg")
    doc = {
        "started": started.strftime("%Y-%m-%d %H:%M:%SZ"),
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit,
        "duration_seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "interrupted": interrupted,
        "machine": machine,
        "config": {"seconds": a.seconds, "requests": a.requests, "reconnect_requests": a.reconnect_requests,
                   "idle_connections": a.idle_connections, "repeat": a.repeat, "redis_clients": 50,
                   "latency_requests": a.latency_requests, "latency_clients": list(latency.CLIENTS),
                   "haproxy_threads": a.haproxy_threads, "haproxy_maxconn": opts.haproxy_maxconn,
                   "socat_backlog": a.socat_backlog, "nofile_limit": nofile, "measurements": units,
                   "relays": {s.name: s.describe() for s in specs}},
        "relays": [s.name for s in specs],
        "metrics": {m: {"label": l, "unit": u, "higher_is_better": h,
                        "raw_unit": "bit/s" if m.startswith("iperf") else u}
                    for m, (l, u, h) in report.ALL_METRICS.items()},
        "values": values,          # medians, raw units (bit/s for iperf3)
        "added_latency": latency.added(values),   # relay minus direct, µs
        "samples": samples,        # every run's headline number
        "raw": raw,                # every run's full result
        "idle_pss": [r for r in raw if any(forks_per_connection(x) for x in raw[r].get("idle_rss", []))],
        "ratios": report.ratios(values),
        "checks": report.checks(values),
        "notes": notes,
        "errors": errors,
    }
    md = report.write(doc, a.out, a.record)
    if traced is not None:
        md += "\n" + syscalls.write(syscalls.document(traced, a.requests, a.reconnect_requests, specs, commit,
                                                     doc["command"]), a.out, a.record and f"{a.record}-syscalls")
    print()
    print(md)
    kept = f", {a.record}.json and .md" if a.record else ""
    print(f"\nwrote {a.out / 'latest.json'}, latest.md, latest.png{kept} after {doc['duration_seconds']:.0f} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
