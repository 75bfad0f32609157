"""`python -m fastmesh metrics`: the istio_tcp_* series of a metrics endpoint as a
table, one row per label set, as the Prometheus console lists them. Whatever the
URL answers (a refused connection, an HTTP error, a page that is not Prometheus
text) is one line; `--watch` says so and tries again at the next refresh."""

from __future__ import annotations

import http.client
import os
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


class FetchError(Exception):
    """The endpoint gave no TCP series; str() is the reason, one line."""


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _reason(exc: BaseException) -> str:
    """Why a fetch failed, in a few words: "connection refused", "HTTP 404 Not Found"."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else ValueError(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_rows(url: str, all_labels: bool = False) -> tuple[list[str], list[list[str]]]:
    """tcp_rows() of what `url` serves; FetchError if it cannot be read or is not
    Prometheus text (an HTML page, JSON, an error page)."""
    try:
        text = fetch(url)
    except UnicodeDecodeError:
        raise FetchError("not Prometheus text: not UTF-8") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: not a URL urllib reads
        raise FetchError(_one_line(_reason(exc))) from None
    try:
        return tcp_rows(text, all_labels)
    except ValueError as exc:  # prometheus_client's parser on anything but the text format
        raise FetchError(_one_line(f"not Prometheus text: {exc}")) from None


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


def run(url: str, watch: float | None, all_labels: bool, out: TextIO = sys.stdout) -> int:
    try:
        if watch is None:
            out.write(format_table(*read_rows(url, all_labels)))
        else:
            watch_forever(url, watch, all_labels, out)  # until Ctrl-C
    except FetchError as exc:
        print(f"fastmesh metrics: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `metrics --watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # so that the exit's flush is quiet
        return 0
    return 0


def watch_forever(url: str, every: float, all_labels: bool, out: TextIO) -> None:
    """Refresh every `every` seconds. On a terminal, each refresh replaces the screen, as
    watch(1) does; elsewhere (a pipe, a file) refreshes follow each other as plain text,
    a blank line apart. A failed fetch is a status line, and the next refresh tries again."""
    terminal = out.isatty()
    last: tuple[str, str] | None = None  # the last table read, and when
    first = True
    while True:
        now = time.strftime("%H:%M:%S")
        try:
            table = format_table(*read_rows(url, all_labels))
            last, body = (table, now), table
        except FetchError as exc:
            body = f"fetch failed ({exc}); retrying in {every:g}s\n"
            if terminal and last is not None:  # the screen is cleared: keep the last table in sight
                body += f"\nlast read at {last[1]}:\n{last[0]}"
        if terminal:
            out.write("\033[H\033[J")  # clear the terminal, as watch(1) does
        elif not first:
            out.write("\n")
        out.write(f"{url}  every {every:g}s  {now}\n\n{body}")
        out.flush()
        first = False
        time.sleep(every)
