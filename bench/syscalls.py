"""System calls and wake-ups per request through each relay, and per hop through a pair of relays.

For every row, redis-benchmark's PING_INLINE (50 clients, keep-alive, then reconnecting per request)
runs through a fresh relay while `perf stat` counts its processes' system calls (the total from
`raw_syscalls:sys_enter`, the ones a relay's data path makes by name), the wait calls that returned
something ready (`sys_exit_epoll_wait` ... with `ret > 0`), and each thread's voluntary and involuntary
context switches are read from /proc before and after. A pair's two relays are counted apart (the
outbound, then the inbound), so what the second hop costs against the first is a row of its own.
Direct has no relay: its row counts redis-server itself, the floor of a request.

Tracing perturbs the rates, so no rate is reported here: the counts come from their own runs,
the rates from bench/run.py's untraced ones (`run.py --syscalls` runs both).

    python bench/syscalls.py [--requests N] [--reconnect-requests N] [--relays direct,fastmesh,...]
                             [--pairs] [--mtls] [--record NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import mtls
import peers
import report
import workloads
from peers import HOST, RelaySpec

BENCH = Path(__file__).resolve().parent
TRACEFS = [Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")]
TOTAL = "raw_syscalls:sys_enter"
# Named one by one (each syscall tracepoint costs perf tens of ms to enable, all ~360 of them 13 s):
# what relays call per request and per connection; the rest of the total is shown as "other".
CALLS = (
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg",
    "splice", "vmsplice", "tee", "pipe2",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "poll", "ppoll", "select", "pselect6",
    "io_uring_enter", "io_uring_register",
    "accept", "accept4", "connect", "socket", "shutdown", "close", "setsockopt", "getsockopt", "getsockname",
    "getpeername", "fcntl", "ioctl",
    "futex", "eventfd2", "timerfd_settime", "clock_nanosleep", "nanosleep", "sched_yield", "rt_sigprocmask",
    "mmap", "munmap", "madvise", "mprotect", "brk", "openat", "newfstatat", "fstat", "lseek",
    "clone", "clone3", "fork", "vfork", "wait4", "exit", "getpid", "gettid", "tgkill",
)
# Calls that sleep until a descriptor is ready: one that returns with ret > 0 is a wake-up with work.
WAITS = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6")
MODES = {"keepalive": "keep-alive", "reconnect": "reconnect"}
INTERVAL_MS = 100   # perf prints counts this often: its first nonzero line says counting is live
TOP = 5
HEADER = ("| relay | syscalls/req keep-alive | syscalls/req reconnect | wake-ups/req keep-alive "
          "| wake-ups/req reconnect | top calls |")


class TraceError(RuntimeError):
    pass


def traceable_calls() -> list[str]:
    """The CALLS this kernel has an enter tracepoint for (epoll_pwait2 and clone3 are recent)."""
    for root in TRACEFS:
        events = root / "events" / "syscalls"
        if events.is_dir():
            return [c for c in CALLS if (events / f"sys_enter_{c}").is_dir()]
    raise TraceError("no tracefs with syscall events (mount -t tracefs nodev /sys/kernel/tracing)")


def perf_events(calls: list[str]) -> list[str]:
    argv = ["-e", ",".join([TOTAL, "context-switches"] + [f"syscalls:sys_enter_{c}" for c in calls])]
    for wait in (w for w in WAITS if w in calls):
        argv += ["-e", f"syscalls:sys_exit_{wait}", "--filter", "ret > 0"]
    return argv


def interval_sums(text: str) -> dict[str, int]:
    """Each event's count summed over the intervals of `perf stat -x , -I` output: lines of
    time,count,unit,event,... where count is "<not counted>" while no counted thread has run."""
    sums: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.strip().split(",")
        if len(fields) < 4 or fields[0].startswith("#"):
            continue
        count, event = fields[1], fields[3]
        sums[event] = sums.get(event, 0) + (int(count) if count.isdigit() else 0)
    return sums


class SyscallCounter:
    """`perf stat -p` on every process and thread of some process trees, printing counts every
    INTERVAL_MS. Counters are inherited, so threads and processes forked later (socat's per
    connection) count too, even once they have exited; the total is the sum of the intervals."""

    def __init__(self, roots: list[int], calls: list[str], log: Path) -> None:
        perf = peers.which("perf")
        if not perf:
            raise TraceError("perf is not installed (Debian package linux-perf)")
        pids = sorted({pid for root in roots for pid in peers.tree(root)})
        if not pids:
            raise TraceError(f"no live process under {roots}")
        self.log = log
        argv = [perf, "stat", "-x", ",", "-I", str(INTERVAL_MS), *perf_events(calls),
                "-p", ",".join(map(str, pids))]
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out)

    def totals(self) -> dict[str, int]:
        return interval_sums(self.log.read_text(errors="replace"))

    def live(self) -> bool:
        if self.popen.poll() is not None:
            raise TraceError(f"perf stat exited with {self.popen.returncode}: {self.log.read_text()[-500:]}")
        return self.totals().get(TOTAL, 0) > 0

    def stop(self) -> dict[str, int]:
        """The totals, once the intervals holding the load are printed (perf may drop a last, partial one)."""
        time.sleep(3 * INTERVAL_MS / 1000)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return self.totals()


def wait_live(counters: list[SyscallCounter], port: int, timeout: float = 120.0) -> int:
    """perf takes from a fraction of a second to seconds to attach, and prints intervals before it
    has: poke the relay with one empty connection at a time (its accept, connect and close) until
    every counter has seen a system call (a relay idle in epoll_wait would show nothing). Returns how
    many connections it took: they are counted with the load."""
    deadline = time.monotonic() + timeout
    probes = 0
    while not all(c.live() for c in counters):
        if time.monotonic() > deadline:
            raise TraceError(f"perf stat counted nothing in {timeout:.0f}s")
        probes += 1
        try:
            with socket.create_connection((HOST, port), timeout=2):
                pass
        except OSError:
            pass
        time.sleep(0.2)
    time.sleep(2 * INTERVAL_MS / 1000)   # counters are enabled one after another
    return probes


def thread_switches(roots: list[int]) -> dict[int, tuple[int, int]]:
    """tid -> (voluntary, involuntary) context switches, for every thread of the trees."""
    out = {}
    for pid in (pid for root in roots for pid in peers.tree(root)):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
            except (FileNotFoundError, ProcessLookupError):
                continue
            out[int(tid)] = (int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"]))
    return out


def switch_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, int]:
    """Switches made in between by the threads alive at the end (a thread born in between counts from 0).
    A thread that ended in between is lost to /proc; perf's inherited context-switches count keeps it."""
    vol = sum(v - before.get(tid, (0, 0))[0] for tid, (v, _) in after.items())
    invol = sum(i - before.get(tid, (0, 0))[1] for tid, (_, i) in after.items())
    return {"voluntary_switches": vol, "involuntary_switches": invol, "threads": len(after),
            "threads_gone": len(set(before) - set(after))}


def figures(counts: dict[str, int], switches: dict[str, int], calls: list[str], requests: int, probes: int) -> dict:
    """One hop's counts under one load, and the same per request."""
    named = {c: counts.get(f"syscalls:sys_enter_{c}", 0) for c in calls}
    # perf enables its counters one after another, so a call made meanwhile can be in a named
    # count and not in the total: the total is never less than the named calls' sum.
    total = max(counts.get(TOTAL, 0), sum(named.values()))
    waits = {w: counts.get(f"syscalls:sys_exit_{w}", 0) for w in WAITS if w in calls}
    # /proc misses threads that ended before the second reading, or were born and ended in between
    # (socat's children): then perf's inherited count, which has them (the two agree within a few
    # switches otherwise).
    from_proc = not switches["threads_gone"] and not any(named.get(c) for c in ("clone", "clone3", "fork", "vfork"))
    wakeups = (switches["voluntary_switches"] + switches["involuntary_switches"] if from_proc
               else counts.get("context-switches", 0))
    per = {c: n / requests for c, n in named.items() if n}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:TOP]
    return {
        "requests": requests,
        "probe_connections": probes,
        "syscalls": total,
        "calls": {c: n for c, n in named.items() if n},
        "other": total - sum(named.values()),
        "waits_ready": sum(waits.values()),
        "context_switches": counts.get("context-switches", 0),
        **switches,
        "wakeups": wakeups,
        "wakeups_from": "/proc" if from_proc else "perf context-switches",
        "syscalls_per_request": total / requests,
        "wakeups_per_request": wakeups / requests,
        "waits_ready_per_request": sum(waits.values()) / requests,
        "top": [[c, round(v, 3)] for c, v in top],
    }


def listener_pid(port: int) -> int:
    """The process of ours (a descendant of this one) holding the socket that listens on `port`."""
    inode = peers.listening_socket(port)
    for pid in peers.tree(os.getpid())[1:]:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]" for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except (FileNotFoundError, ProcessLookupError):
            continue
    raise TraceError(f"no child process listens on port {port}")


def hops(spec: RelaySpec, relay: peers.Relay, server_port: int) -> dict[str, list[int]]:
    """Row name -> the process trees it counts: a pair's hops apart, direct's server."""
    if spec.kind == "direct":
        return {spec.name: [listener_pid(server_port)]}
    if spec.kind == "pair":
        return {f"{spec.name}:outbound": [relay.proc.pid], f"{spec.name}:inbound": [relay.behind.pid]}
    return {spec.name: relay.pids}


def traced_load(spec: RelaySpec, requests: int, keepalive: bool, tmp: Path, opts: peers.Options,
                calls: list[str]) -> tuple[dict[str, tuple[dict[str, int], dict[str, int]]], int]:
    """One fresh server and relay, one redis-benchmark run: per hop, perf's counts and the /proc switches;
    and the probe connections made before the load."""
    with ExitStack() as stack:
        server_port = stack.enter_context(workloads.redis_server(tmp))
        relay = stack.enter_context(peers.running(spec, server_port, tmp, opts))
        targets = hops(spec, relay, server_port)
        counters = {}
        try:
            for hop, roots in targets.items():
                counters[hop] = SyscallCounter(roots, calls, tmp / f"perf-{hop.replace('/', '_')}.{time.monotonic_ns()}.log")
            probes = wait_live(list(counters.values()), relay.port)
            before = {hop: thread_switches(roots) for hop, roots in targets.items()}
            workloads.redis_bench(relay, requests, keepalive)
            after = {hop: thread_switches(roots) for hop, roots in targets.items()}
        finally:
            counts = {hop: c.stop() for hop, c in counters.items()}
        return {hop: (counts[hop], switch_delta(before[hop], after[hop])) for hop in targets}, probes


def added(samples: list[tuple[dict[str, int], dict[str, int]]]) -> tuple[dict[str, int], dict[str, int]]:
    """Both hops of a pair as one row: their perf counts and their /proc switches, added."""
    counts: dict[str, int] = {}
    switches: dict[str, int] = {}
    for hop_counts, hop_switches in samples:
        for key, n in hop_counts.items():
            counts[key] = counts.get(key, 0) + n
        for key, n in hop_switches.items():
            switches[key] = switches.get(key, 0) + n
    return counts, switches


def measure(specs: list[RelaySpec], requests: int, reconnect_requests: int, tmp: Path, opts: peers.Options) -> dict:
    """Every row under both loads: {"rows": {row: {mode: figures}}, "hops": {pair: [rows]}, "errors": [...]}."""
    calls = traceable_calls()
    rows: dict[str, dict[str, dict]] = {}
    pairs: dict[str, list[str]] = {}
    errors = []
    for spec in specs:
        for mode in MODES:
            count = requests if mode == "keepalive" else reconnect_requests
            try:
                got, probes = traced_load(spec, count, mode == "keepalive", tmp, opts, calls)
            except (TraceError, workloads.MeasureError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                # one failed row must not lose the others
                errors.append({"relay": spec.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                print(f"syscalls {mode:<10} {spec.name:<24} ERROR {str(exc).splitlines()[0]}", flush=True)
                continue
            if spec.kind == "pair":
                pairs[spec.name] = list(got)
                got = {spec.name: added(list(got.values())), **got}
            for row, (counts, switches) in got.items():
                fig = rows.setdefault(row, {})[mode] = figures(counts, switches, calls, count, probes)
                print(f"syscalls {mode:<10} {row:<24} {fig['syscalls_per_request']:6.2f} calls/req, "
                      f"{fig['wakeups_per_request']:5.2f} wake-ups/req", flush=True)
    return {"calls_traced": calls, "rows": rows, "hops": pairs, "errors": errors}


def _cell(fig: dict | None, key: str) -> str:
    return "—" if fig is None else f"{fig[key]:.2f}"


def _top(row: dict) -> str:
    parts = []
    for mode, label in MODES.items():
        if mode in row:
            fig = row[mode]
            calls = ", ".join(f"{c} {v:.2f}" for c, v in fig["top"])
            parts.append(f"{label}: {calls}; ready waits {fig['waits_ready_per_request']:.2f}")
    return " · ".join(parts)


def markdown(doc: dict) -> str:
    lines = ["## System calls and wake-ups per request", "",
             (f"`{doc.get('command', 'python bench/syscalls.py')}` on commit {doc.get('commit', 'unknown')}; "
              f"redis-benchmark PING_INLINE, {doc['config']['clients']} clients, "
              f"{doc['config']['requests']:,} keep-alive / {doc['config']['reconnect_requests']:,} reconnect "
              "requests, under `perf stat` (traced runs: no rates here). Wake-ups are the relay threads' "
              "context switches; ready waits are epoll_wait/poll/select calls that returned ready descriptors. "
              "`direct` counts redis-server itself; `X:outbound` and `X:inbound` are a pair's two hops."), "",
             HEADER, "|---|---:|---:|---:|---:|---|"]
    for name, row in doc["rows"].items():
        lines.append(f"| {name} | {_cell(row.get('keepalive'), 'syscalls_per_request')} "
                     f"| {_cell(row.get('reconnect'), 'syscalls_per_request')} "
                     f"| {_cell(row.get('keepalive'), 'wakeups_per_request')} "
                     f"| {_cell(row.get('reconnect'), 'wakeups_per_request')} | {_top(row)} |")
    if doc["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e['relay']} {e['mode']}: {e['error'].splitlines()[0]}"
                                        for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def write(doc: dict, out: Path, record: str | None = None) -> str:
    """syscalls.json (and RECORD.json, RECORD.md when kept); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    text = json.dumps(doc, indent=2) + "\n"
    (out / "syscalls.json").write_text(text)
    if record:
        (out / f"{record}.json").write_text(text)
        (out / f"{record}.md").write_text(md)
    return md


def document(result: dict, requests: int, reconnect_requests: int, specs: list[RelaySpec], commit: str,
             command: str) -> dict:
    return {
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}", "command": command, "commit": commit,
        "machine": {"cores": os.cpu_count(), "kernel": os.uname().release,
                    "perf": subprocess.run([peers.which("perf") or "perf", "--version"], capture_output=True,
                                           text=True, check=False).stdout.strip(),
                    **{s.name: peers.fastmesh_version(s) for s in specs if s.kind == "fastmesh"}},
        "config": {"requests": requests, "reconnect_requests": reconnect_requests, "clients": 50,
                   "relays": {s.name: s.describe() for s in specs}},
        **result,
    }


def parse_args(argv=None) -> argparse.Namespace:
    import run  # the row list bench/run.py builds (run imports this module: import it late)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100000, help="keep-alive requests per row (default 100000)")
    p.add_argument("--reconnect-requests", type=int, default=10000,
                   help="requests reconnecting each time, per row (default 10000)")
    p.add_argument("--relays", default=",".join(run.KINDS), help=f"comma list from {','.join(run.KINDS)}")
    p.add_argument("--pairs", action="store_true", help="add run.py's --pairs rows, each hop counted apart")
    p.add_argument("--mtls", action="store_true", help="add run.py's --mtls rows, each hop counted apart")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="output directory (default bench/results)")
    p.add_argument("--record", metavar="NAME", help="also keep the run as DATE-COMMIT-NAME.json and .md "
                   "(refused on a working tree with changes)")
    a = p.parse_args(argv)
    a.fastmesh_variant, a.routed = [], False
    if a.record:
        a.record = report.record_stem(a.record)
    a.specs = run.relay_specs(a)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    commit = report.source_commit()
    peers.ensure_tools()
    opts = peers.Options(nofile=workloads.raise_nofile(20000))
    with tempfile.TemporaryDirectory(prefix="fastmesh-syscalls-") as tmpname:
        tmp = Path(tmpname)
        if any(s.kind == "pair" and s.outbound.tls for s in a.specs):
            opts.certs = mtls.make_certs(tmp, peers.fastmesh_env({}))
        try:
            result = measure(a.specs, a.requests, a.reconnect_requests, tmp, opts)
        finally:
            peers.stop_all()
    command = "python bench/syscalls.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = write(document(result, a.requests, a.reconnect_requests, a.specs, commit, command), a.out, a.record)
    print()
    print(md)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
