"""`python -m fastmesh query`: ask a Prometheus server an instant PromQL query and
print its answer as the Prometheus console lists it, one line per series
(`istio_tcp_connections_opened_total{label="value",...} 10`). With --wait, ask
again until every --expect LABEL=VALUE is matched by some series, so a script can
wait for exactly what it is about to show, and say what is missing if it never comes."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from fastmesh.metrics_view import console_line

POLL_INTERVAL = 0.5  # Prometheus scrapes the walkthroughs' sidecars every second
REQUEST_TIMEOUT = 10.0


class QueryError(Exception):
    """A one-line reason the query has no answer. `final`: asking again cannot help
    (a PromQL error, a server that is not Prometheus)."""

    def __init__(self, message: str, final: bool) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class Expectation:
    """--expect LABEL=VALUE: some series of the answer has this label value."""

    label: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Expectation:
        label, sep, value = text.partition("=")
        if not sep or not label:
            raise ValueError(f"{text!r} is not LABEL=VALUE")
        return cls(label, value)

    def matched_by(self, series: dict[str, Any]) -> bool:
        return series["metric"].get(self.label) == self.value

    def __str__(self) -> str:
        return f'{self.label}="{self.value}"'


def instant_query(prometheus: str, expr: str, timeout: float = REQUEST_TIMEOUT) -> tuple[str, list]:
    """(resultType, result) of GET /api/v1/query; QueryError otherwise."""
    url = prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        # Prometheus explains a refused query in a JSON body (400 bad_data, 422 execution, 503 not ready).
        error = _prometheus_error(exc.read())
        raise QueryError(f"{url} answered HTTP {exc.code}" + (f": {error}" if error else ""),
                         final=exc.code < 500) from None
    except (urllib.error.URLError, OSError) as exc:
        raise QueryError(f"cannot reach Prometheus at {prometheus}: {getattr(exc, 'reason', exc)}", final=False) from None
    try:
        answer = json.loads(body)
        data = answer["data"]
        return data["resultType"], data["result"]
    except (ValueError, TypeError, KeyError):
        raise QueryError(f"{url} did not answer as Prometheus's query API does (got {body[:60]!r})", final=True) from None


def _prometheus_error(body: bytes) -> str:
    try:
        answer = json.loads(body)
        return f"{answer['errorType']}: {answer['error']}"
    except (ValueError, TypeError, KeyError):
        return ""


def console_lines(result_type: str, result: list) -> list[str]:
    """The answer as the console lists it: a vector's series in Prometheus's label
    order (label names sorted, then compared name by name and value by value, as
    labels.Compare does), each `name{labels} value`; a scalar or string as its value."""
    if result_type in ("scalar", "string"):
        return [str(result[1])]
    if result_type != "vector":
        raise QueryError(f"the answer is a {result_type}: ask for an instant vector (no range selector)", final=True)
    ordered = sorted(result, key=lambda series: sorted(series["metric"].items()))
    return [console_line(series["metric"].get("__name__", ""), series["metric"], float(series["value"][1]))
            for series in ordered]


def unmet(expr: str, result_type: str, result: list, expectations: list[Expectation]) -> str | None:
    """What the answer lacks, in words; None when every expectation is matched by some
    series (with no expectation, when the answer is not an empty vector)."""
    if result_type != "vector":
        return None if not expectations else f"{expr} is a {result_type}, not series with labels"
    if not expectations:
        return None if result else f"no series of {expr}"
    absent = [e for e in expectations if not any(e.matched_by(series) for series in result)]
    if not absent:
        return None
    return f"no series of {expr} with " + ", ".join(map(str, absent)) + f" (the answer has {len(result)} series)"


def ask(prometheus: str, expr: str, expectations: list[Expectation], wait: float,
        progress: Callable[[str], None]) -> list[str]:
    """The console lines of the first answer that meets every expectation, asking
    again for up to `wait` seconds; QueryError naming what is still missing after that."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        timeout = REQUEST_TIMEOUT if not wait else min(REQUEST_TIMEOUT, max(deadline - time.monotonic(), 0.5))
        try:
            result_type, result = instant_query(prometheus, expr, timeout)
            reason = unmet(expr, result_type, result, expectations)
            if reason is None:
                return console_lines(result_type, result)
        except QueryError as exc:
            if exc.final:
                raise
            reason = str(exc)
        if time.monotonic() >= deadline:
            raise QueryError(f"after {wait:g}s, {reason}" if wait else reason, final=True)
        if not announced:
            wanted = ", ".join(map(str, expectations)) or "any series"
            progress(f"waiting up to {wait:g}s for {expr}: {wanted}")
            announced = True
        time.sleep(POLL_INTERVAL)


def run(prometheus: str, expr: str, wait: float, expectations: list[Expectation],
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`fastmesh query`: the lines on `out` (exit 0), or one line on `err` saying why not (exit 1)."""
    out, err = out or sys.stdout, err or sys.stderr

    def progress(message: str) -> None:
        print(f"fastmesh query: {message}", file=err, flush=True)

    try:
        lines = ask(prometheus, expr, expectations, wait, progress)
    except QueryError as exc:
        print(f"fastmesh query: {exc}", file=err)
        return 1
    out.writelines(line + "\n" for line in lines)
    return 0
