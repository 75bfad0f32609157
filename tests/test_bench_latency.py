"""bench/latency.py: redis-benchmark's latency report parsed to exact figures, the latency a relay
adds (its figure minus direct's), the latency bar in the checks, and the run's latency tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import latency  # bench/latency.py, importable once bench/ is on the path
import peers
import report
import workloads

# redis-benchmark 7.0.15, `-t ping_inline -c 1 -n 20000 --precision 3`, as it prints it: the progress
# line rewritten in place with carriage returns (its space padding shortened here), then the report.
ONE_CLIENT = (' \rPING_INLINE: rps=0.0 (overall: 24000.0) avg_msec=0.009 (overall: 0.009)\r \rPING_INLINE: rps=25624.0 (overall: 25617.5) avg_msec=0.036 (overall: 0.036)\r \rPING_INLINE: rps=22736.0 (overall: 24179.6) avg_msec=0.041 (overall: 0.038)\r \rPING_INLINE: rps=12628.0 (overall: 20334.2) avg_msec=0.076 (overall: 0.046)\r \rPING_INLINE: rps=11717.1 (overall: 18175.6) avg_msec=0.082 (overall: 0.052)\r \r'
              """\
====== PING_INLINE ======
  20000 requests completed in 1.15 seconds
  1 parallel clients
  3 bytes payload
  keep alive: 1
  host configuration "save": 
  host configuration "appendonly": no
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.007 milliseconds (cumulative count 4525)
50.000% <= 0.071 milliseconds (cumulative count 13781)
75.000% <= 0.079 milliseconds (cumulative count 17266)
87.500% <= 0.087 milliseconds (cumulative count 18328)
93.750% <= 0.095 milliseconds (cumulative count 19041)
96.875% <= 0.103 milliseconds (cumulative count 19395)
98.438% <= 0.135 milliseconds (cumulative count 19739)
99.219% <= 0.151 milliseconds (cumulative count 19854)
99.609% <= 0.263 milliseconds (cumulative count 19924)
99.805% <= 0.391 milliseconds (cumulative count 19965)
99.902% <= 0.439 milliseconds (cumulative count 19983)
99.951% <= 0.623 milliseconds (cumulative count 19991)
99.976% <= 1.263 milliseconds (cumulative count 19996)
99.988% <= 1.567 milliseconds (cumulative count 19998)
99.994% <= 2.111 milliseconds (cumulative count 19999)
99.997% <= 2.799 milliseconds (cumulative count 20000)
100.000% <= 2.799 milliseconds (cumulative count 20000)

Cumulative distribution of latencies:
96.975% <= 0.103 milliseconds (cumulative count 19395)
99.515% <= 0.207 milliseconds (cumulative count 19903)
99.660% <= 0.303 milliseconds (cumulative count 19932)
99.865% <= 0.407 milliseconds (cumulative count 19973)
99.940% <= 0.503 milliseconds (cumulative count 19988)
99.950% <= 0.607 milliseconds (cumulative count 19990)
99.960% <= 0.703 milliseconds (cumulative count 19992)
99.965% <= 0.807 milliseconds (cumulative count 19993)
99.980% <= 1.303 milliseconds (cumulative count 19996)
99.985% <= 1.407 milliseconds (cumulative count 19997)
99.990% <= 1.607 milliseconds (cumulative count 19998)
100.000% <= 3.103 milliseconds (cumulative count 20000)

Summary:
  throughput summary: 17436.79 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.054     0.000     0.071     0.095     0.143     2.799

""")

# The same tool, `-t ping_inline,ping_mbulk -c 10 -n 3000 --precision 3`: two reports in a row.
TWO_TESTS = """\
====== PING_INLINE ======
  3000 requests completed in 0.03 seconds
  10 parallel clients
  3 bytes payload
  keep alive: 1
  host configuration "save": 
  host configuration "appendonly": no
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.023 milliseconds (cumulative count 26)
50.000% <= 0.055 milliseconds (cumulative count 1877)
75.000% <= 0.063 milliseconds (cumulative count 2298)
87.500% <= 0.079 milliseconds (cumulative count 2776)
93.750% <= 0.087 milliseconds (cumulative count 2856)
96.875% <= 0.103 milliseconds (cumulative count 2911)
98.438% <= 0.143 milliseconds (cumulative count 2956)
99.219% <= 0.239 milliseconds (cumulative count 2978)
99.609% <= 0.279 milliseconds (cumulative count 2989)
99.805% <= 0.359 milliseconds (cumulative count 2995)
99.902% <= 0.367 milliseconds (cumulative count 2998)
99.951% <= 0.375 milliseconds (cumulative count 2999)
99.976% <= 1.111 milliseconds (cumulative count 3000)
100.000% <= 1.111 milliseconds (cumulative count 3000)

Cumulative distribution of latencies:
97.033% <= 0.103 milliseconds (cumulative count 2911)
99.167% <= 0.207 milliseconds (cumulative count 2975)
99.633% <= 0.303 milliseconds (cumulative count 2989)
99.967% <= 0.407 milliseconds (cumulative count 2999)
100.000% <= 1.207 milliseconds (cumulative count 3000)

Summary:
  throughput summary: 111111.11 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.054     0.016     0.055     0.087     0.183     1.111
 
====== PING_MBULK ======
  3000 requests completed in 0.03 seconds
  10 parallel clients
  3 bytes payload
  keep alive: 1
  host configuration "save": 
  host configuration "appendonly": no
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.023 milliseconds (cumulative count 33)
50.000% <= 0.055 milliseconds (cumulative count 1572)
75.000% <= 0.071 milliseconds (cumulative count 2378)
87.500% <= 0.079 milliseconds (cumulative count 2632)
93.750% <= 0.095 milliseconds (cumulative count 2821)
96.875% <= 0.119 milliseconds (cumulative count 2917)
98.438% <= 0.151 milliseconds (cumulative count 2963)
99.219% <= 0.175 milliseconds (cumulative count 2978)
99.609% <= 0.679 milliseconds (cumulative count 2989)
99.805% <= 2.135 milliseconds (cumulative count 2995)
99.902% <= 2.191 milliseconds (cumulative count 2998)
99.951% <= 2.199 milliseconds (cumulative count 2999)
99.976% <= 2.207 milliseconds (cumulative count 3000)
100.000% <= 2.207 milliseconds (cumulative count 3000)

Cumulative distribution of latencies:
95.267% <= 0.103 milliseconds (cumulative count 2858)
99.400% <= 0.207 milliseconds (cumulative count 2982)
99.467% <= 0.303 milliseconds (cumulative count 2984)
99.767% <= 0.703 milliseconds (cumulative count 2993)
99.800% <= 0.807 milliseconds (cumulative count 2994)
100.000% <= 3.103 milliseconds (cumulative count 3000)

Summary:
  throughput summary: 100000.00 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        0.064     0.016     0.055     0.103     0.159     2.207

"""

# The count-less lines of redis-benchmark before 7.0: the percentage is the share of requests at or
# below the latency, and there is no summary.
WITHOUT_COUNTS = """\
====== PING_INLINE ======
  1000 requests completed in 0.02 seconds
  1 parallel clients
  3 bytes payload
  keep alive: 1

50.00% <= 0.1 milliseconds
99.00% <= 0.2 milliseconds
99.95% <= 0.4 milliseconds
100.00% <= 0.6 milliseconds
50000.00 requests per second
"""


def test_the_summary_gives_p50_and_p99_and_the_distributions_p99_9():
    got = latency.parse_report(ONE_CLIENT)
    assert got == {
        "test": "PING_INLINE", "requests": 20000, "seconds": 1.15, "clients": 1,
        "requests_per_second": 17436.79,
        "avg_ms": 0.054, "min_ms": 0.0, "p50_ms": 0.071, "p95_ms": 0.095, "p99_ms": 0.143, "max_ms": 2.799,
        # 99.9 % of 20000 is 19980: 0.391 ms covers 19965, 0.407 ms 19973, 0.439 ms 19983.
        "p999_ms": 0.439,
        "points": 29,
    }


def test_the_named_test_is_read_out_of_several_reports():
    inline = latency.parse_report(TWO_TESTS)
    mbulk = latency.parse_report(TWO_TESTS, "PING_MBULK")
    assert (inline["clients"], inline["requests"], inline["requests_per_second"]) == (10, 3000, 111111.11)
    assert (inline["p50_ms"], inline["p99_ms"], inline["p999_ms"]) == (0.055, 0.183, 0.367)
    assert (mbulk["p50_ms"], mbulk["p99_ms"], mbulk["p999_ms"], mbulk["max_ms"]) == (0.055, 0.159, 2.191, 2.207)


def test_without_a_summary_or_counts_every_percentile_comes_from_the_distribution():
    got = latency.parse_report(WITHOUT_COUNTS)
    assert (got["p50_ms"], got["p99_ms"], got["p999_ms"]) == (0.1, 0.2, 0.4)
    assert "requests_per_second" not in got


@pytest.mark.parametrize("text, error", [
    ("Could not connect to Redis at 127.0.0.1:1: Connection refused\n", "no '====== PING_INLINE ======' report"),
    ("====== PING_INLINE ======\n  20000 requests completed in 1.15 seconds\n",
     "PING_INLINE report has no request count or no latency distribution"),
])
def test_output_without_a_report_is_an_error_that_says_so(text, error):
    with pytest.raises(ValueError, match=error):
        latency.parse_report(text)


def test_a_percentile_is_the_lowest_latency_whose_count_covers_it():
    points = [(0.007, 10), (0.015, 990), (0.023, 999), (0.031, 1000)]
    assert [latency.percentile_ms(points, 1000, q) for q in (1.0, 1.1, 99.0, 99.9, 100.0)] == \
        [0.007, 0.015, 0.015, 0.023, 0.031]


def test_headline_is_microseconds_per_client_count_and_percentile():
    raw = {"clients_1": latency.parse_report(ONE_CLIENT), "clients_10": latency.parse_report(TWO_TESTS)}
    assert latency.headline(raw) == pytest.approx({
        "latency_c1_p50": 71, "latency_c1_p99": 143, "latency_c1_p999": 439,
        "latency_c10_p50": 55, "latency_c10_p99": 183, "latency_c10_p999": 367,
    })
    assert latency.show(latency.headline(raw)) == "1 client 71/143/439 µs; 10 clients 55/183/367 µs"


def values_of(**rows: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """A run's medians: per relay, the six latency figures in latency.METRICS' order."""
    return {relay.replace("_", "[", 1) + ("]" if "_" in relay else ""): dict(zip(latency.METRICS, row, strict=True))
            for relay, row in rows.items()}


RUN = values_of(direct=(15, 31, 63, 55, 127, 255),
                fastmesh=(31, 63, 127, 95, 199, 383),
                haproxy=(39, 71, 135, 103, 207, 391),
                nginx=(39, 79, 143, 111, 223, 447),
                pair_exchange=(55, 103, 199, 151, 303, 511),
                haproxy_pair=(63, 111, 191, 167, 287, 495),
                nginx_pair=(63, 119, 207, 175, 319, 543))


def test_added_latency_is_the_relays_figure_minus_directs():
    added = latency.added({**RUN, "socat": {"latency_c1_p50": 47, "latency_c1_p99": None}})
    assert added["fastmesh"] == {"latency_c1_p50": 16, "latency_c1_p99": 32, "latency_c1_p999": 64,
                                 "latency_c10_p50": 40, "latency_c10_p99": 72, "latency_c10_p999": 128}
    assert added["socat"] == {"latency_c1_p50": 32}   # what was not measured is left out
    assert "direct" not in added
    assert latency.added({"fastmesh": RUN["fastmesh"]}) == {}   # nothing to subtract without direct


def test_the_latency_bars_in_the_checks():
    found = {(c["relay"], c["check"]): c for c in report.checks(RUN) if c["metric"].startswith(report.ADDED)}
    one_hop = found[("fastmesh", "added p50 at 1 client <= 0.8 x haproxy's")]
    # fastmesh adds 16 µs at p50, haproxy 24: the bar is 0.8 x 24.
    assert (one_hop["value"], one_hop["bar"], one_hop["status"]) == (16, pytest.approx(19.2), "PASS")
    pair = found[("pair[exchange]", "added p99 at 10 clients <= best of haproxy[pair] and nginx[pair]")]
    # The pair adds 176 µs at p99 with 10 clients; haproxy's pair 160, nginx's 192.
    assert (pair["value"], pair["bar"], pair["status"]) == (176, 160, "FAIL")
    assert {c["status"] for c in report.checks({"fastmesh": RUN["fastmesh"]})
            if c["metric"].startswith(report.ADDED)} == {"SKIP"}


def test_the_runs_markdown_has_the_latency_and_the_added_latency_tables():
    relays = ["direct", "fastmesh", "haproxy", "socat"]
    values = {r: dict(RUN.get(r, {}), iperf_1=None) for r in relays}
    doc = {"relays": relays, "values": values, "added_latency": latency.added(values),
           "config": {"latency_requests": 20000}}
    head = ("| relay | p50 at 1 client (µs) | p99 at 1 client (µs) | p99.9 at 1 client (µs) | p50 at 10 clients (µs) "
            "| p99 at 10 clients (µs) | p99.9 at 10 clients (µs) |")
    assert report.latency_tables(doc) == [
        "", ("Latency: redis-benchmark PING_INLINE over keep-alive connections, 20,000 requests per point, "
             "median of the runs' percentiles."), "", head, "|---|---:|---:|---:|---:|---:|---:|",
        "| direct | 15 | 31 | 63 | 55 | 127 | 255 |",
        "| fastmesh | 31 | 63 | 127 | 95 | 199 | 383 |",
        "| haproxy | 39 | 71 | 135 | 103 | 207 | 391 |",
        "", "Added latency: the relay's latency minus direct's in this run (lower is better).", "", head,
        "|---|---:|---:|---:|---:|---:|---:|",
        "| fastmesh | +16 | +32 | +64 | +40 | +72 | +128 |",
        "| haproxy | +24 | +40 | +72 | +48 | +80 | +136 |",
    ]
    assert report.latency_tables(dict(doc, values={r: {} for r in relays}, added_latency={})) == []


def test_the_bench_measures_both_client_counts_against_a_real_redis_server(tmp_path):
    with workloads.redis_server(tmp_path) as port:
        raw = latency.measure(peers.Relay("direct", port, None), requests=2000)
    assert sorted(raw) == ["clients_1", "clients_10"]
    for clients in latency.CLIENTS:
        got = raw[f"clients_{clients}"]
        assert (got["test"], got["clients"], got["requests"]) == ("PING_INLINE", clients, 2000)
        assert 0 <= got["min_ms"] <= got["p50_ms"] <= got["p99_ms"] <= got["p999_ms"] <= got["max_ms"]
