"""bench/syscalls.py: system calls and wake-ups per request under redis-benchmark, counted by perf stat
for direct (redis-server itself), one fastmesh and the fastmesh pair hop by hop, on the engine under test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # bench/peers.py, importable once bench/ is on the path
import syscalls

REQUESTS, RECONNECTS = 3000, 300
PAIR = "pair[exchange]"
HOPS = [f"{PAIR}:outbound", f"{PAIR}:inbound"]
# What moves a request's bytes, whichever calls an engine picks.
RECEIVES = ("read", "readv", "recvfrom", "recvmsg", "recvmmsg", "splice")
SENDS = ("write", "writev", "sendto", "sendmsg", "sendmmsg", "splice")


def test_perf_interval_output_is_summed_per_event_and_not_counted_is_zero():
    text = """\
# started on Wed Dec  2 05:05:48 2026

     0.100289130,<not counted>,,raw_syscalls:sys_enter,0,100.00,,
     0.100289130,<not counted>,,syscalls:sys_exit_epoll_wait,0,100.00,,
     0.200728892,1210,,raw_syscalls:sys_enter,140816,100.00,,
     0.200728892,17,,syscalls:sys_exit_epoll_wait,140816,100.00,,
     0.301160651,5,,raw_syscalls:sys_enter,2816,100.00,,
     0.301160651,0,,syscalls:sys_exit_epoll_wait,2816,100.00,,
"""
    assert syscalls.interval_sums(text) == {"raw_syscalls:sys_enter": 1215, "syscalls:sys_exit_epoll_wait": 17}


def test_switches_are_counted_for_the_threads_alive_at_the_end():
    before = {10: (100, 5), 11: (40, 2), 12: (7, 7)}      # 12 ends before the second reading
    after = {10: (130, 9), 11: (41, 2), 13: (3, 1)}       # 13 is born in between: from 0
    assert syscalls.switch_delta(before, after) == {"voluntary_switches": 34, "involuntary_switches": 5,
                                                    "threads": 3, "threads_gone": 1}


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """One traced run of each load for direct, fastmesh and the plaintext pair, on the engine under test."""
    tmp = tmp_path_factory.mktemp("syscalls")
    specs = [peers.RelaySpec("direct", "direct"), peers.RelaySpec("fastmesh", "fastmesh"),
             peers.sidecar_pairs()[0]]
    try:
        result = syscalls.measure(specs, REQUESTS, RECONNECTS, tmp, peers.Options())
    finally:
        peers.stop_all()
    doc = syscalls.document(result, REQUESTS, RECONNECTS, specs, "test", "python bench/syscalls.py (test)")
    return doc, tmp


def test_every_row_and_each_hop_of_the_pair_is_counted_under_both_loads(counted):
    doc, _ = counted
    assert doc["errors"] == []
    assert list(doc["rows"]) == ["direct", "fastmesh", PAIR, *HOPS]
    assert doc["hops"] == {PAIR: HOPS}
    for row in doc["rows"].values():
        assert list(row) == ["keepalive", "reconnect"]
        for mode, fig in row.items():
            assert fig["requests"] == (REQUESTS if mode == "keepalive" else RECONNECTS)
            counts = [fig[k] for k in ("syscalls", "other", "waits_ready", "context_switches", "voluntary_switches",
                                       "involuntary_switches", "wakeups", "probe_connections")]
            assert all(isinstance(n, int) and n >= 0 for n in counts + list(fig["calls"].values())), fig
            assert sum(fig["calls"].values()) + fig["other"] == fig["syscalls"]
            assert fig["syscalls_per_request"] == fig["syscalls"] / fig["requests"]
            # A wait that returned ready descriptors is one of the wait calls made.
            assert fig["waits_ready"] <= sum(fig["calls"].get(w, 0) for w in syscalls.WAITS)


def test_a_request_costs_at_least_a_receive_and_a_send_each_way_through_a_relay(counted):
    doc, _ = counted
    server = doc["rows"]["direct"]["keepalive"]["calls"]
    assert sum(server.get(c, 0) for c in RECEIVES) >= REQUESTS   # redis-server reads each request...
    assert sum(server.get(c, 0) for c in SENDS) >= REQUESTS      # ...and writes each reply
    for relay in ["fastmesh", *HOPS]:
        fig = doc["rows"][relay]["keepalive"]
        assert 2 <= fig["syscalls_per_request"] <= 40, (relay, fig)
        assert sum(fig["calls"].get(c, 0) for c in RECEIVES) >= 2 * REQUESTS, relay
        assert sum(fig["calls"].get(c, 0) for c in SENDS) >= 2 * REQUESTS, relay


def test_reconnecting_costs_every_hop_an_accept_a_connect_and_two_closes_per_request(counted):
    doc, _ = counted
    for relay in ["fastmesh", *HOPS]:
        fig = doc["rows"][relay]["reconnect"]
        calls = fig["calls"]
        assert calls.get("accept4", 0) + calls.get("accept", 0) >= RECONNECTS, relay
        assert calls["connect"] >= RECONNECTS and calls["close"] >= 2 * RECONNECTS, relay
        assert fig["syscalls_per_request"] > doc["rows"][relay]["keepalive"]["syscalls_per_request"], relay


def test_the_pair_row_is_its_two_hops_added(counted):
    doc, _ = counted
    for mode in syscalls.MODES:
        pair, hops = doc["rows"][PAIR][mode], [doc["rows"][h][mode] for h in HOPS]
        for key in ("syscalls", "waits_ready", "context_switches", "wakeups", "voluntary_switches"):
            assert pair[key] == sum(h[key] for h in hops), (mode, key)
        assert pair["calls"] == {c: sum(h["calls"].get(c, 0) for h in hops)
                                 for c in set().union(*(h["calls"] for h in hops))}


def test_the_markdown_table_has_one_row_per_relay_and_hop_and_the_json_is_written(counted, tmp_path):
    doc, _ = counted
    md = syscalls.write(doc, tmp_path, record="2026-01-01-abc1234-test")
    lines = md.splitlines()
    head = lines.index(syscalls.HEADER)
    rows = [line for line in lines[head + 2:] if line.startswith("| ")]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == list(doc["rows"])
    fastmesh = rows[1].split(" | ")
    keepalive = doc["rows"]["fastmesh"]["keepalive"]
    assert fastmesh[1] == f"{keepalive['syscalls_per_request']:.2f}"
    assert fastmesh[3] == f"{keepalive['wakeups_per_request']:.2f}"
    assert fastmesh[5].startswith("keep-alive: " + f"{keepalive['top'][0][0]} {keepalive['top'][0][1]:.2f}")
    assert json.loads((tmp_path / "syscalls.json").read_text())["rows"] == doc["rows"]
    assert (tmp_path / "2026-01-01-abc1234-test.md").read_text() == md
    assert json.loads((tmp_path / "2026-01-01-abc1234-test.json").read_text()) == json.loads(json.dumps(doc))
