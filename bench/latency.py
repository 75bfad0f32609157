"""Per-request latency through a relay: redis-benchmark's PING_INLINE over
keep-alive connections at 1 and at 10 clients, p50, p99 and p99.9 read from
its full report (`--precision 3`: microseconds), and the latency a relay adds
(its figure minus direct's in the same run)."""

from __future__ import annotations

import math
import re

from peers import Relay
from workloads import MeasureError, redis_benchmark

CLIENTS = (1, 10)
PERCENTILES = {"p50": 50.0, "p99": 99.0, "p999": 99.9}
PERCENTILE_LABELS = {"p50": "p50", "p99": "p99", "p999": "p99.9"}


def metric(clients: int, percentile: str) -> str:
    return f"latency_c{clients}_{percentile}"


# key -> (column label, unit, higher is better): what the latency table and the JSON show, in µs.
METRICS = {metric(c, p): (f"{PERCENTILE_LABELS[p]} at {c} client{'s' if c > 1 else ''}", "µs", False)
           for c in CLIENTS for p in PERCENTILES}

_HEADER = re.compile(r"^====== (?P<test>.+?) ======$")
_COMPLETED = re.compile(r"^(?P<requests>\d+) requests completed in (?P<seconds>[\d.]+) seconds$")
_CLIENTS = re.compile(r"^(?P<clients>\d+) parallel clients$")
# Both distributions: "99.902% <= 0.439 milliseconds (cumulative count 19983)". redis-benchmark
# before 7 printed no count: there the percentage is the share of requests at or below the latency.
_POINT = re.compile(r"^(?P<percent>[\d.]+)% <= (?P<ms>[\d.]+) milliseconds(?: \(cumulative count (?P<count>\d+)\))?$")
_THROUGHPUT = re.compile(r"^throughput summary: (?P<rps>[\d.]+) requests per second$")


def _lines(text: str) -> list[str]:
    # The progress line is rewritten in place with carriage returns; the report follows it.
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]


def parse_report(text: str, test: str = "PING_INLINE") -> dict:
    """The figures of one test in redis-benchmark's full (not -q, not --csv) report.

    p50 and p99 are the summary's (HdrHistogram's value at that percentile). The summary has no
    p99.9, so it comes from the two printed distributions, whose points are exact (latency,
    requests at or below it) pairs: the lowest printed latency that 99.9 % of the requests did
    not exceed, which is the true p99.9 or the next printed point above it."""
    block: list[str] | None = None
    for line in _lines(text):
        header = _HEADER.match(line)
        if header and block is not None:
            break   # the next test's report
        if header:
            block = [] if header["test"] == test else None
        elif block is not None:
            block.append(line)
    if block is None:
        raise ValueError(f"no '====== {test} ======' report in redis-benchmark's output")

    out: dict = {"test": test}
    points: list[tuple[float, int]] = []
    summary_names: list[str] | None = None
    for line in block:
        if m := _COMPLETED.match(line):
            out["requests"], out["seconds"] = int(m["requests"]), float(m["seconds"])
        elif m := _CLIENTS.match(line):
            out["clients"] = int(m["clients"])
        elif m := _POINT.match(line):
            percent, ms = float(m["percent"]), float(m["ms"])
            if m["count"] is not None:
                points.append((ms, int(m["count"])))
            elif "requests" in out:
                points.append((ms, round(percent / 100 * out["requests"])))
        elif m := _THROUGHPUT.match(line):
            out["requests_per_second"] = float(m["rps"])
        elif line.startswith("latency summary"):
            summary_names = []
        elif summary_names == []:
            summary_names = line.split()   # "avg min p50 p95 p99 max": the next line holds the numbers
        elif summary_names:
            out.update({f"{name}_ms": float(v) for name, v in zip(summary_names, line.split(), strict=True)})
            summary_names = None
    if "requests" not in out or not points:
        raise ValueError(f"redis-benchmark's {test} report has no request count or no latency distribution")
    points.sort()
    out["points"] = len(points)
    for name, q in PERCENTILES.items():
        if f"{name}_ms" not in out:
            out[f"{name}_ms"] = percentile_ms(points, out["requests"], q)
    return out


def percentile_ms(points: list[tuple[float, int]], total: int, q: float) -> float:
    """The lowest latency whose cumulative count covers q % of `total` requests. `points` ascend."""
    need = math.ceil(total * q / 100)
    for ms, count in points:
        if count >= need:
            return ms
    return points[-1][0]


def run(relay: Relay, clients: int, requests: int) -> dict:
    try:
        r = redis_benchmark(relay.port, clients, requests, ["--precision", "3"])
    except MeasureError as exc:   # say which of the two client counts stalled
        raise MeasureError(f"-c {clients}: {exc}") from None
    try:
        if r.returncode:
            raise ValueError(f"exit {r.returncode}")
        return parse_report(r.stdout)
    except ValueError as exc:
        raise MeasureError(f"redis-benchmark -c {clients}: {exc}: {(r.stderr or r.stdout)[-300:]}") from None


def measure(relay: Relay, requests: int) -> dict:
    """Both client counts through one relay instance, `requests` each."""
    return {f"clients_{c}": run(relay, c, requests) for c in CLIENTS}


def headline(raw: dict) -> dict[str, float]:
    """µs per metric, for the tables."""
    return {metric(c, p): raw[f"clients_{c}"][f"{p}_ms"] * 1000 for c in CLIENTS for p in PERCENTILES}


def show(nums: dict[str, float]) -> str:
    """One console line: p50/p99/p99.9 per client count."""
    return "; ".join(f"{c} client{'s' if c > 1 else ''} " + "/".join(f"{nums[metric(c, p)]:.0f}" for p in PERCENTILES)
                     + " µs" for c in CLIENTS)


def added(values: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """What each relay adds to a request: its latency minus direct's (medians of the same run)."""
    direct = values.get("direct", {})
    out = {}
    for relay, row in values.items():
        if relay == "direct":
            continue
        diffs = {m: row[m] - direct[m] for m in METRICS if row.get(m) is not None and direct.get(m) is not None}
        if diffs:
            out[relay] = diffs
    return out
