"""Turn the collected numbers into ratios, pass/fail checks, JSON, markdown and a PNG."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import latency

# key -> (column label, unit, higher is better): the main table's columns
METRICS = {
    "iperf_1": ("iperf3 1 stream", "Gbit/s", True),
    "iperf_4": ("iperf3 4 streams", "Gbit/s", True),
    "redis_keepalive": ("redis keep-alive", "req/s", True),
    "redis_reconnect": ("redis reconnect", "req/s", True),
    "cpu_per_gb": ("CPU", "s/GB", False),
    "cpu_keepalive": ("CPU keep-alive", "µs/req", False),
    "cpu_reconnect": ("CPU reconnect", "µs/req", False),
    "idle_rss": ("idle RSS growth", "MiB", False),
    # The kernel's part of the two CPU figures before them (stime from /proc): what is left once a
    # relay's own code costs nothing.
    "kernel_keepalive": ("kernel keep-alive", "µs/req", False),
    "kernel_reconnect": ("kernel reconnect", "µs/req", False),
}
ALL_METRICS = {**METRICS, **latency.METRICS}   # the latency table's columns too
ADDED = "added_"   # prefix of a check's metric read from the added latency (relay minus direct)


def unit_of(metric: str) -> str:
    return ALL_METRICS[metric.removeprefix(ADDED)][1]


def median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def ratios(values: dict[str, dict[str, float | None]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """value / direct and value / haproxy for every relay and metric (None when either side is missing)."""
    def div(a, b):
        return a / b if a is not None and b else None
    out = {}
    for relay, row in values.items():
        out[relay] = {m: {"vs_direct": div(row.get(m), values.get("direct", {}).get(m)),
                          "vs_haproxy": div(row.get(m), values.get("haproxy", {}).get(m))} for m in METRICS}
    return out


def checks(values: dict[str, dict[str, float | None]]) -> list[dict]:
    """The bars fastmesh must clear, for every fastmesh row and the exchange pair. A bar whose
    reference is missing is SKIP."""
    added = latency.added(values)

    def get(relay, metric):
        if metric.startswith(ADDED):
            return added.get(relay, {}).get(metric.removeprefix(ADDED))
        return values.get(relay, {}).get(metric)

    def added_p99_vs_best(pairs: tuple[str, str]) -> tuple:
        """The latency bar of a pair: added p99 at 10 clients no more than the better of haproxy's and nginx's."""
        metric = ADDED + latency.metric(10, "p99")
        found = [v for v in (get(r, metric) for r in pairs) if v is not None]
        return (f"added p99 at 10 clients <= best of {' and '.join(pairs)}", metric, "<=", 1.0,
                min(found) if found else None)

    def bars_for(relay: str) -> list[tuple]:
        if relay == "pair[exchange]":  # the exchange's cost, against the same pair without it
            return [
                ("reconnect >= 0.9 x pair without exchange", "redis_reconnect", ">=", 0.9,
                 get("pair[no-exchange]", "redis_reconnect")),
                ("iperf3 1 stream >= 0.95 x pair without exchange", "iperf_1", ">=", 0.95,
                 get("pair[no-exchange]", "iperf_1")),
                added_p99_vs_best(("haproxy[pair]", "nginx[pair]")),
            ]
        if relay == "pair[mtls]":  # against HAProxy's and nginx's TLS pairs, and without the exchange
            tls_peers = ("haproxy[tls-pair]", "nginx[tls-pair]")

            def best(metric, pick=max):
                found = [v for v in (get(r, metric) for r in tls_peers) if v is not None]
                return pick(found) if found else None
            return [
                ("iperf3 1 stream >= 1.2 x best TLS pair", "iperf_1", ">=", 1.2, best("iperf_1")),
                ("redis reconnect >= 1.0 x best TLS pair", "redis_reconnect", ">=", 1.0, best("redis_reconnect")),
                ("redis keep-alive >= 1.0 x best TLS pair", "redis_keepalive", ">=", 1.0, best("redis_keepalive")),
                ("idle RSS growth <= 0.5 x best TLS pair", "idle_rss", "<=", 0.5, best("idle_rss", min)),
                ("reconnect >= 0.95 x mTLS pair without exchange", "redis_reconnect", ">=", 0.95,
                 get("pair[mtls-no-exchange]", "redis_reconnect")),
                added_p99_vs_best(tls_peers),
            ]
        if relay == "fastmesh[routed]":  # routing by Istio's kinds, against the plain listener
            return [("redis keep-alive >= 0.97 x plain fastmesh", "redis_keepalive", ">=", 0.97,
                     get("fastmesh", "redis_keepalive"))]
        if not relay.startswith("fastmesh"):
            return []
        refs_keep = [v for v in (get("haproxy", "redis_keepalive"), get("nginx", "redis_keepalive")) if v is not None]
        cpu_bars = [(f"CPU {what} <= 0.75 x {peer}'s", f"cpu_{what}", "<=", 0.75, get(peer, f"cpu_{what}"))
                    for what, peer in (("keepalive", "haproxy"), ("keepalive", "nginx"), ("reconnect", "haproxy"))]
        return cpu_bars + [
            ("iperf3 1 stream >= 0.70 x direct", "iperf_1", ">=", 0.70, get("direct", "iperf_1")),
            ("redis keep-alive >= 1.0 x max(haproxy, nginx)", "redis_keepalive", ">=", 1.0,
             max(refs_keep) if refs_keep else None),
            ("redis reconnect >= 1.0 x haproxy", "redis_reconnect", ">=", 1.0, get("haproxy", "redis_reconnect")),
            ("CPU/GB <= haproxy", "cpu_per_gb", "<=", 1.0, get("haproxy", "cpu_per_gb")),
            ("idle RSS growth <= 20 MiB", "idle_rss", "<=", None, 20.0),
            ("added p50 at 1 client <= 0.8 x haproxy's", ADDED + latency.metric(1, "p50"), "<=", 0.8,
             get("haproxy", ADDED + latency.metric(1, "p50"))),
        ]

    out = []
    for relay in values:
        for name, metric, op, factor, ref in bars_for(relay):
            value = get(relay, metric)
            bar = None if ref is None else (ref if factor is None else factor * ref)
            if value is None or bar is None:
                status = "SKIP"
            else:
                status = "PASS" if (value >= bar if op == ">=" else value <= bar) else "FAIL"
            out.append({"relay": relay, "check": name, "metric": metric, "value": value, "bar": bar,
                        "status": status})
    return out


def fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    if metric.startswith(ADDED):
        return f"{v:+.0f}"
    if metric.startswith("latency"):
        return f"{v:.0f}"
    if metric.startswith("iperf"):
        return f"{v / 1e9:.2f}"
    if metric.startswith("redis"):
        return f"{v:,.0f}"
    return f"{v:.2f}" if metric.startswith(("cpu", "kernel")) else f"{v:.1f}"


def markdown(doc: dict) -> str:
    relays, values, rat = doc["relays"], doc["values"], doc["ratios"]
    head = "| relay | " + " | ".join(f"{label} ({unit})" for label, unit, _ in METRICS.values()) + " |"
    sep = "|---|" + "---:|" * len(METRICS)
    lines = [f"## fastmesh benchmark — {doc['started']}", "",
             f"`{doc.get('command', 'python bench/run.py')}` on commit {doc.get('commit', 'unknown')}.", "",
             f"{doc['machine']['cores']} cores, kernel {doc['machine']['kernel']}, "
             f"median of {doc['config']['repeat']} run(s); iperf3 {doc['config']['seconds']} s, "
             f"redis {doc['config']['requests']:,} / {doc['config']['reconnect_requests']:,} requests (keep-alive / "
             f"reconnect), {doc['config']['idle_connections']:,} idle connections.", "",
             head, sep]
    for r in relays:
        cells = [fmt(m, values[r].get(m)) for m in METRICS]
        if r in doc.get("idle_pss", []):
            cells[list(METRICS).index("idle_rss")] += " (PSS)"
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios: value ÷ direct / value ÷ haproxy (throughput: higher is better; CPU and RSS: lower is "
              "better; direct has no relay process, so CPU and RSS have no direct ratio).", "",
              "| relay | " + " | ".join(label for label, _, _ in METRICS.values()) + " |", sep]

    def pair(x):
        return " / ".join("—" if v is None else f"{v:.2f}" for v in (x["vs_direct"], x["vs_haproxy"]))
    for r in relays:
        lines.append(f"| {r} | " + " | ".join(pair(rat[r][m]) for m in METRICS) + " |")
    lines += latency_tables(doc)
    if doc["checks"]:
        lines += ["", "Checks:", ""]
        for c in doc["checks"]:
            unit = unit_of(c["metric"])
            lines.append(f"- {c['status']} {c['relay']}: {c['check']} "
                         f"(value {fmt(c['metric'], c['value'])} {unit}, bar {fmt(c['metric'], c['bar'])} {unit})")
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    if doc["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e['relay']} {e['metric']}: {e['error'].splitlines()[0]}"
                                        for e in doc["errors"]]
    return "\n".join(lines) + "\n"


def latency_tables(doc: dict) -> list[str]:
    """Latency per relay, then what each relay adds to direct's, for the rows that measured it."""
    relays = [r for r in doc["relays"] if any(doc["values"][r].get(m) is not None for m in latency.METRICS)]
    if not relays:
        return []
    added = doc.get("added_latency", {})
    head = "| relay | " + " | ".join(f"{label} ({unit})" for label, unit, _ in latency.METRICS.values()) + " |"
    sep = "|---|" + "---:|" * len(latency.METRICS)
    lines = ["", (f"Latency: redis-benchmark PING_INLINE over keep-alive connections, "
                  f"{doc['config'].get('latency_requests', 0):,} requests per point, median of the runs' percentiles."),
             "", head, sep]
    lines += [f"| {r} | " + " | ".join(fmt(m, doc["values"][r].get(m)) for m in latency.METRICS) + " |"
              for r in relays]
    lines += ["", "Added latency: the relay's latency minus direct's in this run (lower is better).", "", head, sep]
    lines += [f"| {r} | " + " | ".join(fmt(ADDED + m, added[r].get(m)) for m in latency.METRICS) + " |"
              for r in relays if r in added]
    return lines


def chart(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relays = [r for r in doc["relays"] if r != "direct"]
    rat = doc["ratios"]
    added = doc.get("added_latency", {})
    # (metrics, y of a relay and metric, title, y scale, reference line, bar label)
    panels = [(["iperf_1", "iperf_4", "redis_keepalive", "redis_reconnect"],
               lambda r, m: rat[r][m]["vs_direct"], "Throughput ÷ direct (higher is better)", "linear", 1.0, "{:.2f}"),
              (["cpu_per_gb", "cpu_keepalive", "cpu_reconnect", "idle_rss"],
               # socat's cost is ~20x haproxy's; fastmesh's may be ~0.1x
               lambda r, m: rat[r][m]["vs_haproxy"], "Cost ÷ haproxy (lower is better)", "log", 1.0, "{:.2f}")]
    if added:
        # A few µs at p50 beside hundreds at p99.9, and noise may make a relay's figure negative: symlog.
        panels.append((list(latency.METRICS), lambda r, m: added.get(r, {}).get(m),
                       "Added latency, relay − direct (µs, lower is better)", "symlog", 0.0, "{:+.0f}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5),
                             gridspec_kw={"width_ratios": [4, 3, 5][:len(panels)]})
    for ax, (metrics, y_of, title, scale, line, label) in zip(axes, panels):
        width = 0.8 / max(1, len(relays))
        for i, r in enumerate(relays):
            ys = [y_of(r, m) or 0 for m in metrics]
            bars = ax.bar([x + i * width for x in range(len(metrics))], ys, width, label=r)
            for b, y in zip(bars, ys):
                if y:
                    ax.annotate(label.format(y), (b.get_x() + b.get_width() / 2, y), ha="center",
                                va="bottom" if y > 0 else "top", fontsize=7)
        ax.axhline(line, color="grey", lw=0.8, ls="--")
        ax.set_yscale(scale, **({"linthresh": 10} if scale == "symlog" else {}))
        ax.set_xticks([x + width * (len(relays) - 1) / 2 for x in range(len(metrics))])
        ax.set_xticklabels([f"{ALL_METRICS[m][0]}\n({ALL_METRICS[m][1]})".replace(" at ", "\nat ") for m in metrics],
                           fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fastmesh benchmark {doc['started']} (median of {doc['config']['repeat']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_commit() -> str:
    """The measured checkout's commit (short), with "-dirty" when its tracked files have changes."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return commit + ("-dirty" if changed else "")


def record_stem(name: str) -> str:
    """DATE-COMMIT-NAME: the file name a recorded run is kept under. Figures quoted from a run must be
    reproducible from its commit, so a working tree with changes is refused."""
    commit = source_commit()
    if commit.endswith("-dirty"):
        sys.exit("--record: the working tree has uncommitted changes; commit them first, so that the "
                 "recorded run names the code it measured")
    if not name.replace("-", "").isalnum():
        sys.exit(f"--record: {name!r}: use letters, digits and '-'")
    return f"{datetime.now(timezone.utc):%Y-%m-%d}-{commit}-{name}"


def write(doc: dict, out: Path, record: str | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    text = json.dumps(doc, indent=2) + "\n"
    (out / "latest.json").write_text(text)
    (out / "latest.md").write_text(md)
    if record:
        (out / f"{record}.json").write_text(text)
        (out / f"{record}.md").write_text(md)
    try:
        chart(doc, out / "latest.png")
    except ImportError:   # numbers matter more than the picture: keep them
        print("matplotlib is missing (pip install matplotlib): no latest.png", file=sys.stderr)
    return md
