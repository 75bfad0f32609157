"""`python -m fastmesh metrics`: the istio_tcp_* series of a metrics endpoint as a
table, one row per label set, as the Prometheus console lists them."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

# Counter columns, by metric name.
COUNTERS = {
    "istio_tcp_connections_opened_total": "OPENED",
    "istio_tcp_connections_closed_total": "CLOSED",
    "istio_tcp_received_bytes_total": "RECEIVED",
    "istio_tcp_sent_bytes_total": "SENT",
}
# The labels that tell series apart in practice; --all-labels shows the rest.
KEY_LABELS = ("reporter", "source_workload", "destination_workload", "destination_service_name", "response_flags")


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def tcp_rows(text: str, all_labels: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the TCP series in an exposition text."""
    series: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    label_names: list[str] = list(KEY_LABELS)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in COUNTERS:
                continue
            if all_labels:
                label_names += [name for name in sample.labels if name not in label_names]
            key = tuple(sorted(sample.labels.items()))
            series.setdefault(key, {})[COUNTERS[sample.name]] = sample.value
    header = [name.upper() for name in label_names] + list(COUNTERS.values())
    rows = []
    for key, values in sorted(series.items()):
        labels = dict(key)
        rows.append([labels.get(name, "") for name in label_names]
                    + [f"{values.get(column, 0):.0f}" for column in COUNTERS.values()])
    return header, rows


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` in an exposition text."""
    return [(dict(sample.labels), sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def console_line(name: str, labels: dict[str, str], value: float) -> str:
    """One series as Prometheus's console lists a query's answer: the name, the labels
    in order, the value (a counter's without a decimal point)."""
    inner = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels) if key != "__name__")
    shown = f"{value:.0f}" if float(value).is_integer() else f"{value:g}"
    return f"{name}{{{inner}}} {shown}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "no istio_tcp_* series yet\n"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


def show(url: str, all_labels: bool, out: TextIO) -> None:
    header, rows = tcp_rows(fetch(url), all_labels)
    out.write(format_table(header, rows))


def run(url: str, watch: float | None, all_labels: bool, out: TextIO = sys.stdout) -> int:
    try:
        if watch is None:
            show(url, all_labels, out)
            return 0
        while True:
            out.write("\033[H\033[J")  # clear the terminal, as watch(1) does
            out.write(f"{url}  every {watch:g}s  {time.strftime('%H:%M:%S')}\n\n")
            show(url, all_labels, out)
            out.flush()
            time.sleep(watch)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"fastmesh metrics: cannot read {url}: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
