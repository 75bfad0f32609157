"""`fastmesh query`: a real Prometheus's answers as its console lists them, waiting
for both reporters' series; and, against canned answers, the order of the lines and
a one-line error for a server that is not Prometheus, an HTTP error and a wait that
ends with a series still missing."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp import web

from conftest import MONGODB_V1, RATINGS_V2, free_port
from test_metrics_endpoint import config, hello_server, send_world
from fastmesh.cli import main
from fastmesh.routing import INBOUND, OUTBOUND

CONNECTIONS = 3
OPENED = "istio_tcp_connections_opened_total"


def fastmesh_query(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """(exit status, stdout lines, stderr lines) of `fastmesh query ARGS`."""
    status = main(["query", *args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def console_style(running, value: int) -> str:
    """The line Prometheus's console shows for a sidecar's one opened-connections series."""
    (sample,) = running.samples()[OPENED]
    labels = {**sample.labels, "instance": "{}:{}".format(*running.sidecar.metrics_address), "job": "fastmesh"}
    return OPENED + "{" + ",".join(f'{name}="{labels[name]}"' for name in sorted(labels)) + "} " + str(value)


@pytest.mark.bench_tools
def test_a_real_prometheus_answers_both_reporters_series_console_style(upstream, sidecar, prometheus, capsys):
    server = upstream(hello_server)
    inbound = sidecar(config(server.address, INBOUND, MONGODB_V1, reporting_duration=1.0))
    outbound = sidecar(config(inbound.listen, OUTBOUND, RATINGS_V2, reporting_duration=1.0))
    send_world(outbound.listen, CONNECTIONS)
    server.wait(CONNECTIONS)
    base = prometheus([outbound.sidecar.metrics_address, inbound.sidecar.metrics_address])

    status, lines, err = fastmesh_query(capsys, "--prometheus", base, "--wait", "60s", "--expect", "reporter=source",
                                        "--expect", "reporter=destination", OPENED)
    assert status == 0, err
    # One line per series: each sidecar's own labels, and the scrape's; in label order, which
    # puts connection_security_policy="none" (the destination reporter) before "unknown" (source).
    assert lines == [console_style(running, CONNECTIONS) for running in (inbound, outbound)]

    status, lines, err = fastmesh_query(capsys, "--prometheus", base, f"sum by (reporter) ({OPENED})")
    assert (status, lines, err) == (0, [f'{{reporter="destination"}} {CONNECTIONS}',
                                        f'{{reporter="source"}} {CONNECTIONS}'], [])
    status, lines, err = fastmesh_query(capsys, "--prometheus", base, f"scalar(count({OPENED}))")
    assert (status, lines, err) == (0, ["2"], [])
    status, lines, err = fastmesh_query(capsys, "--prometheus", base, "sum(rate(")
    assert status == 1 and lines == [] and len(err) == 1
    assert err[0].startswith("fastmesh query: ") and " answered HTTP 400: bad_data: " in err[0]


@pytest.fixture
def canned():
    """canned(handler) -> base URL of an aiohttp server answering /api/v1/query with it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = []

    def start(handler) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/query", handler)
        runner = web.AppRunner(app)
        port = free_port()

        async def serve() -> None:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

        asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def vector(*series: dict[str, str], value: str = "1") -> dict:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": s, "value": [1764633600.0, value]} for s in series]}}


def answering(*bodies: dict):
    """A handler giving each body in turn (the last one from then on), counting requests."""
    asked = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request.query["query"])
        return web.json_response(bodies[min(len(asked), len(bodies)) - 1])

    handler.asked = asked
    return handler


def test_series_are_listed_in_prometheus_label_order_with_their_values(canned, capsys):
    base = canned(answering(vector({"__name__": "m", "b": "1"}, {"__name__": "m", "a": "2"},
                                   {"__name__": "m", "a": "10", "z": "x"}, value="1.5")))
    assert fastmesh_query(capsys, "--prometheus", base, "m") == (
        0, ['m{a="10",z="x"} 1.5', 'm{a="2"} 1.5', 'm{b="1"} 1.5'], [])


def test_a_page_that_is_not_prometheus_is_one_line_and_no_wait(canned, capsys):
    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    base = canned(html)
    assert fastmesh_query(capsys, "--prometheus", base, "--wait", "30s", OPENED) == (1, [], [
        f"fastmesh query: {base}/api/v1/query?query={OPENED} did not answer as Prometheus's query API does (got "
        + "b'<html>hello</html>')"])


def test_an_http_error_is_one_line_with_prometheus_own_reason(canned, capsys):
    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400)

    base = canned(refused)
    assert fastmesh_query(capsys, "--prometheus", base, "--wait", "30s", "up{") == (1, [], [
        f"fastmesh query: {base}/api/v1/query?query=up%7B answered HTTP 400: bad_data: parse error"])


def test_a_prometheus_not_ready_yet_is_asked_again(canned, capsys):
    asked = []

    async def not_ready_first(request: web.Request) -> web.Response:
        asked.append(request.query["query"])
        if len(asked) == 1:
            return web.json_response({"status": "error", "errorType": "unavailable", "error": "not ready"}, status=503)
        return web.json_response(vector({"__name__": "up", "job": "fastmesh"}))

    base = canned(not_ready_first)
    status, lines, err = fastmesh_query(capsys, "--prometheus", base, "--wait", "30s", "up")
    assert (status, lines) == (0, ['up{job="fastmesh"} 1'])
    assert err == ["fastmesh query: waiting up to 30s for up: any series"]
    assert asked == ["up", "up"]


def test_a_wait_that_ends_without_a_reporter_names_what_is_missing(canned, capsys):
    handler = answering(vector({"__name__": OPENED, "reporter": "source"}, value="10"))
    base = canned(handler)
    status, lines, err = fastmesh_query(capsys, "--prometheus", base, "--wait", "1s", "--expect", "reporter=source",
                                        "--expect", "reporter=destination", OPENED)
    assert (status, lines) == (1, [])
    assert err == [f'fastmesh query: waiting up to 1s for {OPENED}: reporter="source", reporter="destination"',
                   f'fastmesh query: after 1s, no series of {OPENED} with reporter="destination" (the answer '
                   + "has 1 series)"]
    assert len(handler.asked) >= 2  # asked again before giving up


def test_without_wait_a_missing_series_or_server_is_reported_at_once(canned, capsys):
    base = canned(answering(vector()))
    assert fastmesh_query(capsys, "--prometheus", base, OPENED) == (
        1, [], [f"fastmesh query: no series of {OPENED}"])
    nobody = f"http://127.0.0.1:{free_port()}"
    status, lines, err = fastmesh_query(capsys, "--prometheus", nobody, OPENED)
    assert (status, lines) == (1, [])
    assert err == [f"fastmesh query: cannot reach Prometheus at {nobody}: [Errno 111] Connection refused"]


def test_a_range_vector_is_refused_with_the_reason(canned, capsys):
    base = canned(answering({"status": "success", "data": {"resultType": "matrix", "result": []}}))
    assert fastmesh_query(capsys, "--prometheus", base, f"{OPENED}[5m]") == (1, [], [
        "fastmesh query: the answer is a matrix: ask for an instant vector (no range selector)"])


def test_an_expectation_must_be_label_equals_value(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["query", "--expect", "reporter", OPENED])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fastmesh query: error: argument --expect: 'reporter' is not LABEL=VALUE")
