"""`python -m fastmesh metrics` against pages that are and are not Prometheus text:
a table, or one line saying why not (exit 1); `--watch` retries through failed
fetches with a status line, and writes plain text when its output is not a terminal."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import sys
import threading

import pytest
from aiohttp import web

from conftest import free_port, wait_until

GOOD = (200, "text/plain; version=0.0.4", b"""\
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_workload="ratings-v2",\
destination_workload="mongodb-v1",destination_service_name="mongodb",response_flags="-"} 3
""")
TABLE = """\
REPORTER  SOURCE_WORKLOAD  DESTINATION_WORKLOAD  DESTINATION_SERVICE_NAME  RESPONSE_FLAGS  OPENED  CLOSED  RECEIVED  SENT
source    ratings-v2       mongodb-v1            mongodb                   -               3       0       0         0
"""
HTML = (200, "text/html", b"<!DOCTYPE html>\n<html><body><h1>Grafana</h1></body></html>\n")
NOT_FOUND = (404, "text/plain", b"404: Not Found")


class Pages:
    """An aiohttp server on 127.0.0.1 answering each GET with the next of `answers`
    (status, content type, body); the last one answers for ever after."""

    def __init__(self, answers: list[tuple[int, str, bytes]], port: int = 0) -> None:
        self.answers = list(answers)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(10)
        self.url = "http://127.0.0.1:%d/stats/prometheus" % self.runner.addresses[0][1]

    async def _answer(self, _: web.Request) -> web.Response:
        status, content_type, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    async def _start(self, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def pages():
    started: list[Pages] = []

    def start(*answers: tuple[int, str, bytes], port: int = 0) -> Pages:
        started.append(Pages(list(answers), port))
        return started[-1]

    yield start
    for server in started:
        server.close()


def metrics(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmesh", "metrics", *args], capture_output=True, text=True,
                          timeout=60)


def test_a_metrics_page_is_shown_as_a_table(pages):
    result = metrics("--url", pages(GOOD).url)
    assert (result.returncode, result.stdout, result.stderr) == (0, TABLE, "")


def test_prometheus_text_without_tcp_series_is_not_an_error(pages):
    result = metrics("--url", pages((200, "text/plain", b"# TYPE up gauge\nup 1\n")).url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "no istio_tcp_* series yet\n", "")


@pytest.mark.parametrize("answer, reason", [
    (HTML, "not Prometheus text: "),
    ((200, "application/json", b'{"status": "success", "data": {"resultType": "vector", "result": []}}'),
     "not Prometheus text: "),
    ((200, "text/plain", b"hello there\nall is well\n"), "not Prometheus text: "),
    ((200, "application/octet-stream", bytes(range(256))), "not Prometheus text: not UTF-8"),
    (NOT_FOUND, "HTTP 404 Not Found"),
    ((503, "text/plain", b"upstream connect error"), "HTTP 503 Service Unavailable"),
    (None, "connection refused"),
], ids=["html", "json", "garbage", "binary", "404", "503", "refused"])
def test_a_page_that_is_not_prometheus_text_is_one_line_and_exit_1(pages, answer, reason):
    url = pages(answer).url if answer is not None else "http://127.0.0.1:%d/stats/prometheus" % free_port()
    result = metrics("--url", url)
    assert (result.returncode, result.stdout) == (1, "")
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"fastmesh metrics: cannot read {url}: {reason}")
    if not reason.endswith(": "):
        assert line == f"fastmesh metrics: cannot read {url}: {reason}"


class Output:
    """Everything a process writes to `fd`, read as it comes (a pipe's or a pty's end)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # a pty's end once the process is gone
                return
            if not chunk:
                return
            self.data += chunk

    def text(self) -> str:
        return self.data.decode().replace("\r\n", "\n")  # a terminal writes \r\n


def watching(url: str, stdout: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastmesh", "metrics", "--url", url, "--watch", "100ms"],
                            stdout=stdout, stderr=subprocess.PIPE)


def refreshes(url: str, text: str) -> list[str]:
    """What each refresh showed under its header line (and a terminal's clear-screen code)."""
    return re.split(rf"(?m)^(?:\x1b\[H\x1b\[J)?{re.escape(url)}  every 0\.1s  \d\d:\d\d:\d\d\n\n", text)[1:]


def test_watch_retries_failed_fetches_and_writes_plain_text_to_a_pipe(pages):
    port = free_port()
    url = "http://127.0.0.1:%d/stats/prometheus" % port
    process = watching(url, subprocess.PIPE)
    try:
        assert process.stdout is not None
        output = Output(process.stdout.fileno())
        refused = "fetch failed (connection refused); retrying in 0.1s\n"
        wait_until(lambda: output.text().count(refused) >= 2)
        assert process.poll() is None  # still trying
        pages(HTML, NOT_FOUND, GOOD, port=port)  # the endpoint comes up, wrong at first
        wait_until(lambda: output.text().count(TABLE) >= 2)
    finally:
        process.terminate()
        process.wait(30)
    output.thread.join(10)
    text = output.text()
    assert "\x1b" not in text  # no screen-clearing codes in a pipe
    shown = refreshes(url, text)
    up = next(i for i, body in enumerate(shown) if body != refused + "\n")  # a blank line between refreshes
    assert up >= 2
    assert shown[up].startswith("fetch failed (not Prometheus text: ")
    assert shown[up].endswith("); retrying in 0.1s\n\n")
    assert shown[up + 1] == "fetch failed (HTTP 404 Not Found); retrying in 0.1s\n\n"
    assert shown[up + 2] == TABLE + "\n"
    assert process.stderr is not None and process.stderr.read() == b""


def test_watch_on_a_terminal_redraws_and_keeps_the_last_table_in_sight(pages):
    server = pages(GOOD, NOT_FOUND, GOOD)
    master, slave = pty.openpty()
    process = watching(server.url, slave)
    os.close(slave)
    try:
        output = Output(master)
        wait_until(lambda: output.text().count(TABLE) >= 3)  # the table, the failure under it, the table again
    finally:
        process.terminate()
        process.wait(30)
    output.thread.join(10)
    os.close(master)
    text = output.text()
    assert text.startswith("\x1b[H\x1b[J" + server.url)
    assert text.count("\x1b[H\x1b[J") == text.count(server.url)  # every refresh redraws the screen
    shown = refreshes(server.url, text)
    assert shown[0] == TABLE
    assert re.fullmatch(r"fetch failed \(HTTP 404 Not Found\); retrying in 0\.1s\n\nlast read at "
                        r"\d\d:\d\d:\d\d:\n" + re.escape(TABLE), shown[1])
    assert shown[2] == TABLE
