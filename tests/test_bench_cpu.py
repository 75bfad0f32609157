"""bench/: a relay's CPU split into its own (user) and the kernel's part, the kernel's part per request in
the run's table, the CPU-per-request bars in its checks, and bench/uring's minimal C relay as rows
(proto-epoll, proto-uring) beside the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # bench/peers.py, importable once bench/ is on the path
import report
import run
import workloads
from test_bench_uring import build_unavailable

TICK = 0.01   # at least one clock tick of slack on each side of a /proc figure

# Burns `SECONDS` of CPU time in user code or in the kernel (reading /dev/zero), then says so and waits:
# its figures are then fixed, whatever else the machine is doing.
BURNER = """
import os, sys
part = sys.argv[1]
with open("/dev/zero", "rb", buffering=0) as zero:
    while getattr(os.times(), part) < %f:
        if part == "system":
            zero.read(1 << 20)
        else:
            sum(range(10000))
print("done", flush=True)
sys.stdin.read()
"""
SECONDS = 0.3


@pytest.mark.parametrize("part", ["user", "system"])
def test_cpu_split_tells_the_relays_own_time_from_the_kernels(part):
    burner = subprocess.Popen([sys.executable, "-c", BURNER % SECONDS, part], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert burner.stdout.readline() == "done\n"
        user, kernel = peers.cpu_split(burner.pid)
        assert peers.cpu_seconds(burner.pid) == pytest.approx(user + kernel)
    finally:
        burner.communicate("")
    burned, other = (user, kernel) if part == "user" else (kernel, user)
    assert burned >= SECONDS - TICK
    assert other < burned / 2


def test_the_kernel_columns_and_the_cpu_bars_of_a_run():
    values = {"haproxy": {"cpu_keepalive": 8.0, "cpu_reconnect": 40.0, "kernel_keepalive": 7.2},
              "nginx": {"cpu_keepalive": 7.6},
              "fastmesh": {"cpu_keepalive": 5.9, "cpu_reconnect": 31.0, "kernel_keepalive": 5.6}}
    found = {c["check"]: c for c in report.checks(values) if c["relay"] == "fastmesh"}
    # 0.75 x 8.0 = 6.0 and 0.75 x 7.6 = 5.7 per keep-alive request; 0.75 x 40 = 30 per reconnect.
    assert [(found[name]["bar"], found[name]["status"]) for name in (
        "CPU keepalive <= 0.75 x haproxy's", "CPU keepalive <= 0.75 x nginx's", "CPU reconnect <= 0.75 x haproxy's")
    ] == [(pytest.approx(6.0), "PASS"), (pytest.approx(5.7), "FAIL"), (pytest.approx(30.0), "FAIL")]
    assert report.fmt("kernel_keepalive", 5.6) == "5.60"
    assert report.ratios(values)["fastmesh"]["kernel_keepalive"]["vs_haproxy"] == pytest.approx(5.6 / 7.2)
    assert run.headline("redis_keepalive", {"requests_per_second": 1000.0, "cpu_us_per_request": 5.9,
                                            "kernel_us_per_request": 5.6}) == {
        "redis_keepalive": 1000.0, "cpu_keepalive": 5.9, "kernel_keepalive": 5.6}


def test_the_prototype_rows_are_asked_for_by_name_and_are_not_in_the_default_run():
    specs = run.relay_specs(run.parse_args(["--relays", "direct,proto-uring,proto-epoll"]))
    assert [(s.name, s.kind) for s in specs] == [("direct", "direct"), ("proto-epoll", "prototype"),
                                                 ("proto-uring", "prototype")]
    assert not any(s.kind == "prototype" for s in run.relay_specs(run.parse_args([])))
    with pytest.raises(SystemExit, match="unknown relays"):
        run.relay_specs(run.parse_args(["--relays", "proto-poll"]))


@pytest.mark.parametrize("name", list(peers.PROTOTYPES))
def test_a_prototype_row_serves_redis_and_has_its_cpu_split(name, tmp_path):
    if reason := build_unavailable():
        pytest.skip(reason)
    for tool in ("redis-server", "redis-benchmark"):
        if not peers.which(tool):
            pytest.skip(f"{tool} is not installed")
    try:
        with workloads.redis_server(tmp_path) as backend:
            with peers.running(peers.RelaySpec(name, "prototype"), backend, tmp_path, peers.Options()) as relay:
                got = workloads.redis_bench(relay, 3000, keepalive=False, clients=5)
    finally:
        peers.stop_all()
    assert got["requests_per_second"] > 0
    # A connection per request: the relay accepts and connects 3,000 times, all in the kernel.
    assert 0 < got["kernel_us_per_request"] <= got["cpu_us_per_request"]


@pytest.mark.parametrize("layout, server, client", [("apart", "0", "0"), ("with-server", "1", "0"),
                                                    ("with-client", "0", "1")])
def test_a_pin_layout_puts_the_server_or_the_client_beside_the_relay(layout, server, client, monkeypatch):
    monkeypatch.setattr(peers, "PIN", dict(peers.PIN_LAYOUTS[layout]))
    assert [peers.pinned(role, ["x"]) for role in ("relay", "server", "client")] == [
        ["taskset", "-c", "1", "x"], ["taskset", "-c", server, "x"], ["taskset", "-c", client, "x"]]
    assert run.parse_args(["--pin-layout", layout]).pin_layout == layout
