"""deploy/grafana/fastmesh-tcp.json, checked two ways: as a Grafana dashboard model
(what an import needs), and by running every panel query and every template
variable query against a real Prometheus scraping a real sidecar pair that carried
known traffic. Each answer must be exactly the expected series, so a panel that
names a metric or label fastmesh does not export fails (its answer is empty)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import MONGODB_SERVICE, MONGODB_V1, RATINGS_V2, assert_closed_by_relay, free_port, query
from test_metrics_endpoint import LOOPBACK_ANY_PORT, config, hello_server, send_world

from fastmesh.routing import INBOUND, OUTBOUND
from fastmesh.settings import ListenerConfig

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fastmesh-tcp.json"
GRID_WIDTH = 24  # Grafana's grid has 24 columns
# Grafana's own variables, given a range that covers the whole test: rates are then
# positive exactly where a counter grew while Prometheus watched.
BUILTIN_VALUES = {"__rate_interval": "5m", "__interval": "15s", "__range": "5m"}
# $var, ${var}, ${var:format} and the deprecated [[var]].
VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")

# Each round: connections ratings-v2 -> mongodb-v1 through both sidecars over mTLS, plain
# clients straight to the PERMISSIVE inbound sidecar, and connections to an outbound
# listener whose upstream refuses (UF).
MESH, PLAIN, REFUSED = 3, 2, 1
REQUEST, RESPONSE = len(b"world\n"), len(b"hello world\n")
POSITIVE = "> 0"  # a rate over a counter that grew during the test


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def interpolate(text: str, values: dict[str, str]) -> str:
    """Grafana's variable substitution; a variable without a value raises KeyError."""
    return VARIABLE_REFERENCE.sub(lambda m: values[next(name for name in m.groups() if name)], text)


def targets(dashboard: dict) -> dict[tuple[str, str], str]:
    """{(panel title, refId): expr} for every query of every panel."""
    return {(panel["title"], target["refId"]): target["expr"]
            for panel in dashboard["panels"] for target in panel["targets"]}


def datasource_variable(dashboard: dict) -> str:
    (name,) = [v["name"] for v in dashboard["templating"]["list"]
               if v["type"] == "datasource" and v["query"] == "prometheus"]
    return name


def test_the_dashboard_is_a_grafana_dashboard_on_a_templated_prometheus():
    dashboard = load_dashboard()
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40
    assert isinstance(dashboard["schemaVersion"], int)
    prometheus = {"type": "prometheus", "uid": f"${{{datasource_variable(dashboard)}}}"}
    variables = dashboard["templating"]["list"]
    declared = {v["name"] for v in variables}
    assert len(declared) == len(variables), "two template variables share a name"

    ids = [panel["id"] for panel in dashboard["panels"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]
        assert panel["datasource"] == prometheus, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == prometheus and target["expr"].strip(), panel["title"]
    for variable in variables:
        if variable["type"] == "query":
            assert variable["datasource"] == prometheus and LABEL_VALUES.fullmatch(variable["query"]), variable

    # Every variable a query names is declared, or one of Grafana's own.
    names = dict.fromkeys(declared | set(BUILTIN_VALUES), "x")
    for expr in [*targets(dashboard).values(), *(v["query"] for v in variables if v["type"] == "query")]:
        interpolate(expr, names)


def series(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


def tcp_labels(reporter: str, source: str, destination: str, flags: str, policy: str) -> dict[str, str]:
    return {"reporter": reporter, "source_workload": source, "destination_workload": destination,
            "response_flags": flags, "connection_security_policy": policy}


def tcp_totals(rounds: int) -> list[tuple[dict, dict]]:
    """The istio_tcp_* series the traffic makes: (labels, {opened, closed, received, sent})."""
    def counts(connections: int, request: int = REQUEST, response: int = RESPONSE) -> dict:
        n = connections * rounds
        return {"opened": n, "closed": n, "received": n * request, "sent": n * response}

    return [
        (tcp_labels("source", "ratings-v2", "mongodb-v1", "-", "unknown"), counts(MESH)),
        (tcp_labels("source", "ratings-v2", "unknown", "UF", "unknown"), counts(REFUSED, 0, 0)),
        (tcp_labels("destination", "ratings-v2", "mongodb-v1", "-", "mutual_tls"), counts(MESH)),
        (tcp_labels("destination", "unknown", "mongodb-v1", "-", "none"), counts(PLAIN)),
    ]


def tcp_rates(counter: str, by: tuple[str, ...], **only: str) -> dict[tuple, object]:
    """sum by (`by`) of a counter's rate: positive where the traffic made it grow, else 0."""
    grouped: dict[tuple, int] = defaultdict(int)
    for labels, totals in tcp_totals(1):
        if all(labels[k] == v for k, v in only.items()):
            grouped[series(**{k: labels[k] for k in by})] += totals[counter]
    return {key: POSITIVE if total else 0 for key, total in grouped.items()}


def tcp_table(counter: str, rounds: int) -> dict[tuple, object]:
    return {series(**labels): totals[counter] for labels, totals in tcp_totals(rounds)}


TABLE = "TCP series since each sidecar started"


def expected_answers(outbound: str, inbound: str, rounds: int) -> dict[tuple[str, str], dict[tuple, object]]:
    """{(panel title, refId): {series: value}} after `rounds` rounds of traffic;
    `outbound`/`inbound`: the sidecars' instance labels."""
    def per_sidecar(on_outbound: object, on_inbound: object) -> dict[tuple, object]:
        return {series(instance=outbound): on_outbound, series(instance=inbound): on_inbound}

    by_workload = ("reporter", "source_workload", "destination_workload")
    exchange = {"alpn_protocol_found": POSITIVE, "metadata_added": POSITIVE, "peer_found": POSITIVE,
                "header_not_found": 0, "frame_too_large": 0, "frame_truncated": 0, "frame_timed_out": 0,
                "detect_timeout": 0, "initial_header_not_found": 0,
                "alpn_protocol_not_found": POSITIVE}  # the PERMISSIVE inbound's plaintext clients
    return {
        ("Connections opened, by reporter", "A"): tcp_rates("opened", ("reporter",)),
        ("Connections closed, by reporter", "A"): tcp_rates("closed", ("reporter",)),
        ("Bytes received, by reporter", "A"): tcp_rates("received", ("reporter",)),
        ("Bytes sent, by reporter", "A"): tcp_rates("sent", ("reporter",)),
        ("Bytes by source and destination workload", "A"): tcp_rates("received", by_workload),
        ("Bytes by source and destination workload", "B"): tcp_rates("sent", by_workload),
        ("Connections closed, by response flags", "A"): tcp_rates("closed", ("reporter", "response_flags")),
        ("Connections opened, by connection security policy", "A"):
            tcp_rates("opened", ("connection_security_policy",), reporter="destination"),
        (TABLE, "A"): tcp_table("opened", rounds),
        (TABLE, "B"): tcp_table("closed", rounds),
        (TABLE, "C"): tcp_table("received", rounds),
        (TABLE, "D"): tcp_table("sent", rounds),
        ("Open connections in the engine, by sidecar", "A"): per_sidecar(0, 0),
        ("Upstream connect failures and timeouts, by sidecar", "A"): per_sidecar(POSITIVE, 0),
        ("Upstream connect failures and timeouts, by sidecar", "B"): per_sidecar(0, 0),
        ("TLS, by sidecar", "A"): per_sidecar(POSITIVE, POSITIVE),
        ("TLS, by sidecar", "B"): per_sidecar(0, 0),
        ("TLS, by sidecar", "C"): per_sidecar(0, POSITIVE),
        ("Peer metadata exchange events", "A"): {series(event=e): value for e, value in exchange.items()},
    }


def answer(base: str, expr: str) -> dict[tuple, float]:
    return {series(**found["metric"]): float(found["value"][1]) for found in query(base, expr)}


def satisfies(value: float, wanted: object) -> bool:
    if wanted == POSITIVE:
        return value > 0
    return value == wanted


def mismatches(expected: dict[tuple, object], got: dict[tuple, float]) -> str:
    """What differs between an answer and its expectation ('' when it matches)."""
    if set(got) != set(expected):
        return f"series {sorted(got)}, expected {sorted(expected)}"
    wrong = {key: value for key, value in got.items() if not satisfies(value, expected[key])}
    return f"values {wrong}, expected {[expected[key] for key in wrong]}" if wrong else ""


def wait_for_answers(base: str, queries: dict[tuple[str, str], str], expected: dict, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problems = {key: mismatches(expected[key], answer(base, expr)) for key, expr in queries.items()}
        problems = {key: problem for key, problem in problems.items() if problem}
        if not problems:
            return
        if time.monotonic() > deadline:
            pytest.fail("Prometheus answers the dashboard's queries wrongly:\n" + "\n".join(
                f"{title} [{ref}]: {queries[title, ref]}\n    {problem}" for (title, ref), problem in problems.items()))
        time.sleep(0.5)


def one_round(mesh_listener, inbound_listener, refused_listener) -> None:
    send_world(mesh_listener, MESH)
    send_world(inbound_listener, PLAIN)
    for _ in range(REFUSED):
        with socket.create_connection(refused_listener) as client:
            assert_closed_by_relay(client)


@pytest.mark.bench_tools
def test_every_panel_query_answers_the_traffic_exactly(upstream, sidecar, mesh_certs, prometheus):
    dashboard = load_dashboard()
    values = {"namespace": "default", "service": "mongodb", **BUILTIN_VALUES}
    queries = {key: interpolate(expr, values) for key, expr in targets(dashboard).items()}

    server = upstream(hello_server)
    inbound = sidecar(config(server.address, INBOUND, MONGODB_V1, reporting_duration=0.5,
                             certs=mesh_certs.identity("default", "mongodb")))
    to_mongodb = config(inbound.listen, OUTBOUND, RATINGS_V2, reporting_duration=0.5, mesh_peer=True,
                        certs=mesh_certs.identity("default", "bookinfo-ratings-v2"))
    to_nothing = ListenerConfig.to_upstreams(LOOPBACK_ANY_PORT, [("127.0.0.1", free_port())], OUTBOUND,
                                             MONGODB_SERVICE, mesh_peer=True)
    outbound = sidecar(to_mongodb.replace(listeners=[*to_mongodb.listeners, to_nothing]))
    base = prometheus([outbound.sidecar.metrics_address, inbound.sidecar.metrics_address])
    instances = ["{}:{}".format(*running.sidecar.metrics_address) for running in (outbound, inbound)]
    expected = expected_answers(*instances, rounds=2)
    assert set(queries) == set(expected), "a panel query without an expectation, or the reverse"

    # Round one makes every series; once Prometheus holds them, round two makes them grow,
    # so each rate is positive exactly where traffic went.
    mesh, refused = outbound.listeners
    one_round(mesh, inbound.listen, refused)
    server.wait(MESH + PLAIN)
    totals = {(title, ref): expr for (title, ref), expr in queries.items() if title == TABLE}
    wait_for_answers(base, totals, expected_answers(*instances, rounds=1))
    one_round(mesh, inbound.listen, refused)
    server.wait(2 * (MESH + PLAIN))
    wait_for_answers(base, queries, expected)

    # The template variables' own queries (Grafana's label_values) list what the pair reports.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = LABEL_VALUES.fullmatch(interpolate(variable["query"], values)).groups()
            found = set(answer(base, f"count by ({label}) ({selector})"))
            assert found == {series(**{label: values[variable["name"]]})}, variable["name"]
