"""The io_uring relay prototype against the same relay on epoll (bench/uring/relay.c), side by side:
redis-benchmark PING_INLINE keep-alive (50 clients) and reconnect (50 clients, a connection per request)
with the relay's CPU per request, latency at 1 client, and one iperf3 stream; no relay at all ("direct")
beside them for scale. The backends alternate within each repeat, their order rotating; the table has
the medians and each io_uring backend ÷ epoll. See bench/README.md.

    python bench/uring/compare.py [--repeat 5] [--requests 100000] [--reconnect-requests 10000]
                                  [--latency-requests 20000] [--iperf-seconds 3] [--pin | --pin-layout L]
                                  [--record NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

URING = Path(__file__).resolve().parent
sys.path.insert(0, str(URING.parent))   # bench/: the harness's modules
import latency
import peers
import report
import run
import workloads
from peers import HOST, Proc, Relay

BACKENDS = ("epoll", "uring", "batch")
ROWS = ("direct", *BACKENDS)
# metric -> (label, unit, higher is better, measured for direct)
METRICS = {
    "keepalive_rps": ("redis keep-alive, 50 clients", "req/s", True, True),
    "keepalive_cpu_us": ("relay CPU per keep-alive request", "µs", False, False),
    "reconnect_rps": ("redis reconnect, 50 clients", "req/s", True, True),
    "reconnect_cpu_us": ("relay CPU per reconnect request", "µs", False, False),
    "latency_p50_us": ("latency p50 at 1 client", "µs", False, True),
    "latency_p99_us": ("latency p99 at 1 client", "µs", False, True),
    "latency_p999_us": ("latency p99.9 at 1 client", "µs", False, True),
    "iperf_gbps": ("iperf3 1 stream", "Gbit/s", True, True),
    "iperf_cpu_s_per_gb": ("relay CPU per GB (iperf3)", "s/GB", False, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--requests", type=int, default=100000, help="keep-alive requests per run")
    p.add_argument("--reconnect-requests", type=int, default=10000)
    p.add_argument("--latency-requests", type=int, default=20000, help="requests at 1 client per run")
    p.add_argument("--iperf-seconds", type=float, default=3, help="0 leaves iperf3 out")
    p.add_argument("--relay-args", default="", help="more options for both backends, e.g. '--buffer-size 65536'")
    p.add_argument("--pin", action="store_true", help="relay on CPU 1, clients and servers on CPU 0")
    p.add_argument("--pin-layout", choices=list(peers.PIN_LAYOUTS),
                   help="pin as bench/run.py does: the relay on CPU 1 alone (apart, = --pin), beside the server "
                        "(with-server) or beside the client (with-client)")
    p.add_argument("--out", type=Path, default=URING.parent / "results")
    p.add_argument("--record", metavar="NAME", help="keep the run as OUT/DATE-COMMIT-NAME.json and .md")
    return p.parse_args(argv)


def build(tmp: Path) -> Path:
    try:
        return peers.prototype_binary(tmp)
    except RuntimeError as exc:
        sys.exit(str(exc))


@contextmanager
def relay(binary: Path, row: str, upstream: int, tmp: Path, extra: list[str]) -> Iterator[Relay]:
    """A fresh relay process of that backend in front of `upstream` ("direct": none)."""
    if row == "direct":
        yield Relay(row, upstream, None)
        return
    port = peers.free_port()
    argv = [str(binary), f"--{row}", "--listen", f"{HOST}:{port}", "--upstream", f"{HOST}:{upstream}", *extra]
    proc = Proc(f"relay-{row}", peers.pinned("relay", argv), tmp)
    try:
        proc.wait_listening(port)
        yield Relay(row, port, proc)
        if not proc.alive():
            raise workloads.MeasureError(f"relay-{row} died: {proc.tail(3)}")
    finally:
        proc.stop(grace=2.0)


def keepalive(r: Relay, a: argparse.Namespace) -> dict[str, float]:
    out = workloads.redis_bench(r, a.requests, keepalive=True)
    return {"keepalive_rps": out["requests_per_second"], "keepalive_cpu_us": out.get("cpu_us_per_request")}


def reconnect(r: Relay, a: argparse.Namespace) -> dict[str, float]:
    out = workloads.redis_bench(r, a.reconnect_requests, keepalive=False)
    return {"reconnect_rps": out["requests_per_second"], "reconnect_cpu_us": out.get("cpu_us_per_request")}


def one_client(r: Relay, a: argparse.Namespace) -> dict[str, float]:
    out = latency.run(r, 1, a.latency_requests)
    return {f"latency_{p}_us": out[f"{p}_ms"] * 1000 for p in latency.PERCENTILES}


def one_stream(r: Relay, a: argparse.Namespace) -> dict[str, float]:
    out = workloads.iperf(r, a.iperf_seconds, 1)
    return {"iperf_gbps": out["bits_per_second"] / 1e9, "iperf_cpu_s_per_gb": out.get("cpu_seconds_per_gb")}


def measure(a: argparse.Namespace, binary: Path, tmp: Path, samples: dict, errors: list[str]) -> None:
    extra = a.relay_args.split()
    redis_units = (("keep-alive", keepalive), ("reconnect", reconnect), ("latency", one_client))
    for repeat in range(a.repeat):
        order = ROWS[repeat % len(ROWS):] + ROWS[:repeat % len(ROWS)]   # a burst of noise hits every row
        with workloads.redis_server(tmp) as redis_port:
            for unit, fn in redis_units:
                for row in order:
                    _sample(partial(_in_front, binary, row, redis_port, tmp, extra, fn, a),
                            f"{unit} {row}", row, samples, errors)
        for row in order if a.iperf_seconds > 0 else ():
            _sample(partial(_iperf, binary, row, tmp, extra, a), f"iperf3 {row}", row, samples, errors)
        print(f"repeat {repeat + 1}/{a.repeat} done", file=sys.stderr)


def _in_front(binary, row, upstream, tmp, extra, fn, a) -> dict[str, float]:
    with relay(binary, row, upstream, tmp, extra) as r:
        return fn(r, a)


def _iperf(binary, row, tmp, extra, a) -> dict[str, float]:
    with workloads.iperf_server(tmp) as port:   # one-shot: a fresh server for every run
        return _in_front(binary, row, port, tmp, extra, one_stream, a)


def _sample(take: Callable[[], dict], what: str, row: str, samples: dict, errors: list[str]) -> None:
    try:
        got = take()
    except (workloads.MeasureError, RuntimeError) as exc:
        errors.append(f"{what}: {exc}")
        print(f"error: {what}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return
    for metric, value in got.items():
        if value is not None:
            samples[metric].setdefault(row, []).append(value)


def summarize(samples: dict) -> tuple[dict, dict]:
    """The medians, and each io_uring backend's ÷ epoll's (ratios[backend][metric])."""
    values = {m: {row: statistics.median(v) for row, v in by_row.items()} for m, by_row in samples.items()}
    ratios = {backend: {m: (v[backend] / v["epoll"] if v.get("epoll") and backend in v else None)
                        for m, v in values.items()} for backend in BACKENDS[1:]}
    return values, ratios


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def markdown(doc: dict) -> str:
    title = (f"io_uring vs epoll relay (bench/uring), median of {doc['config']['repeat']} runs, commit "
             f"{doc['commit']}, Linux {doc['machine']['kernel']}, {doc['machine']['cores']} cores")
    others = BACKENDS[1:]
    lines = [title, "", "| metric | " + " | ".join(ROWS) + " | " + " | ".join(f"{b} ÷ epoll" for b in others)
             + " | better |", "|---|" + "---:|" * (len(ROWS) + len(others)) + "---|"]
    for metric, (label, unit, higher, _) in METRICS.items():
        v = doc["values"].get(metric, {})
        if not v:
            continue
        ratios = [doc["ratios"][b].get(metric) for b in others]
        lines.append(f"| {label} ({unit}) | " + " | ".join(_cell(v.get(row)) for row in ROWS) + " | "
                     + " | ".join("–" if r is None else f"{r:.3f}" for r in ratios)
                     + f" | {'higher' if higher else 'lower'} |")
    if doc["errors"]:
        lines += ["", "Errors:", *(f"- {e.splitlines()[0]}" for e in doc["errors"])]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    facts = run.machine_facts([])
    facts["tools"] = {**{k: facts["tools"][k] for k in ("iperf3", "redis-server", "redis-benchmark")},
                      "liburing-dev": run._first_line(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"]),
                      "gcc": run._first_line(["gcc", "--version"])}
    return facts


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stem = report.record_stem(a.record) if a.record else None   # refuses a dirty tree before the run
    commit = report.source_commit()
    peers.pin_layout(a.pin, a.pin_layout)
    samples: dict = {m: {} for m in METRICS}
    errors: list[str] = []
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="uring-compare-") as tmpdir:
        tmp = Path(tmpdir)
        measure(a, build(tmp), tmp, samples, errors)
    facts["loadavg_end"] = run._read("/proc/loadavg")
    values, ratios = summarize(samples)
    doc = {"kind": "uring-compare", "command": ["python", "bench/uring/compare.py", *(argv or sys.argv[1:])],
           "commit": commit, "machine": facts,
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "values": values, "ratios": ratios, "samples": samples, "errors": errors}
    md = markdown(doc)
    print(md)
    if stem:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (a.out / f"{stem}.md").write_text(md)
        print(f"recorded {a.out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
