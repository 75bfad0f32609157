"""Bounded telemetry under churn (Istio's statsEvictionInterval): a series with no open
connection and no change for the eviction interval leaves the exposition, and with it
its memory; a series with an open connection stays however long; live series keep
their counts; a label set that comes back starts again from 0; off by default."""

from __future__ import annotations

import gc
import socket
import tracemalloc

import pytest
from conftest import (
    MONGODB_SERVICE,
    MONGODB_V1,
    closed,
    independent_frame,
    one_listener,
    opened,
    read_all,
    sha256,
    updated,
    wait_until,
)
from frame_oracle import FrameReader, Outcome

from fastmesh.addr import Address
from fastmesh.cli import build_parser
from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.config.istio_api import Sidecar as SidecarKind
from fastmesh.exchange import HEADER
from fastmesh.exposition import TcpSeriesRenderer
from fastmesh.peers import PeerDirectory
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch, Peer
from fastmesh.routing import INBOUND
from fastmesh.settings import ExchangeConfig, SidecarConfig
from fastmesh.telemetry import ListenerTelemetry, TcpTelemetry

INTERVAL = 60.0
NORMAL = CloseReason.DOWNSTREAM_CLOSE
CHURN = 20_000  # short-lived peer identities


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def peer_frame(name: str) -> bytes:
    """An exchange frame of a client workload of its own."""
    return independent_frame({"NAME": f"{name}-0", "NAMESPACE": "churn", "WORKLOAD_NAME": name,
                              "LABELS": {"app": name, "version": "v1"}, "CLUSTER_ID": "Kubernetes"},
                             f"sidecar~10.1.0.1~{name}-0.churn~churn.svc.cluster.local")


class Pipeline:
    """A sidecar's telemetry pipeline (peers, telemetry, the exposition's renderer) on a fake clock,
    inbound to mongodb, fed records as the engine would."""

    def __init__(self, eviction_interval: float = INTERVAL) -> None:
        self.clock = FakeClock()
        self.peers = PeerDirectory(payload_lifetime=eviction_interval, clock=self.clock)
        self.telemetry = TcpTelemetry(self.peers.peer_of, eviction_interval=eviction_interval, clock=self.clock)
        self.telemetry.add_listener(0, ListenerTelemetry(INBOUND, MONGODB_V1.workload(), MONGODB_SERVICE))
        self.renderer = TcpSeriesRenderer(self.telemetry)

    def batch(self, batch: Batch) -> None:
        """As Sidecar._on_batch orders it."""
        self.peers.on_batch(batch)
        self.telemetry.on_batch(batch)
        self.peers.forget(batch.closed)

    def connect(self, conn_id: int, name: str) -> None:
        self.batch(Batch([opened(conn_id, identifies_peer=True)], [], [],
                         [Peer(conn_id, peer_frame(name)[HEADER.size:])]))

    def later(self, seconds: float) -> None:
        """Time passes, with the batch read and the report a sidecar runs."""
        self.clock.now += seconds
        self.batch(Batch([], [], []))
        self.telemetry.report()

    def values(self) -> dict[str, tuple[int, int, int, int]]:
        """Each series by its source workload: (opened, closed, received, sent)."""
        return {key[1]: (s.opened, s.closed, s.received, s.sent) for key, s in self.telemetry.samples()}

    def scrape(self) -> bytes:
        return self.renderer.render(openmetrics=False)


def test_eviction_is_off_by_default_everywhere():
    assert SidecarConfig().stats_eviction_interval == 0
    assert build_parser().parse_args(["serve"]).stats_eviction_interval == 0
    assert SidecarKind().stats_eviction_interval == 0
    clock = FakeClock()
    telemetry = TcpTelemetry(clock=clock)
    telemetry.add_listener(0, ListenerTelemetry(INBOUND, MONGODB_V1.workload(), MONGODB_SERVICE))
    telemetry.on_batch(Batch([], [], [closed(1, NORMAL, 10, 20)]))
    clock.now += 10 * 365 * 86400.0
    telemetry.report()
    assert [(s.opened, s.closed, s.received, s.sent) for _, s in telemetry.samples()] == [(1, 1, 10, 20)]
    assert telemetry.evicted == 0


@pytest.mark.parametrize("text, seconds", [("5m", 300.0), ("1500ms", 1.5), ("0s", 0.0), ("0", 0.0)])
def test_the_flag_takes_an_istio_duration_or_0_for_off(text, seconds):
    assert build_parser().parse_args(["serve", "--stats-eviction-interval", text]).stats_eviction_interval == seconds


def test_the_sidecar_kinds_field_sets_the_sidecars_interval(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("apiVersion: fastmesh.io/v1alpha1\nkind: Sidecar\nmetadata: {name: db}\n"
                    "spec:\n  statsEvictionInterval: 5m\n  inbound: [{port: 0, targetPort: 27017}]\n")
    assert plan(load_documents([path])).sidecar.stats_eviction_interval == 300.0
    path.write_text(path.read_text().replace("5m", "0s"))  # off, as the flag's 0s
    assert plan(load_documents([path])).sidecar.stats_eviction_interval == 0.0
    path.write_text(path.read_text().replace("0s", "300"))
    with pytest.raises(ConfigError, match="spec.statsEvictionInterval: expected a duration such as 500ms"):
        plan(load_documents([path]))


def test_a_series_with_an_open_connection_stays_however_long_then_goes_an_interval_after_its_close():
    pipeline = Pipeline()
    pipeline.connect(1, "long-lived")
    for _ in range(100):  # 100 intervals, idle or not
        pipeline.batch(Batch([], [updated(1, 3, 5)], []))
        pipeline.later(INTERVAL)
    assert pipeline.values() == {"long-lived": (1, 0, 300, 500)}
    pipeline.later(10 * INTERVAL)  # no bytes at all for ten intervals: still open, still kept
    assert pipeline.values() == {"long-lived": (1, 0, 300, 500)}
    pipeline.batch(Batch([], [], [closed(1, NORMAL, 7, 0)]))
    pipeline.later(INTERVAL - 1)
    assert pipeline.values() == {"long-lived": (1, 1, 307, 500)}
    pipeline.later(1)
    assert pipeline.values() == {} and pipeline.telemetry.evicted == 1
    assert pipeline.scrape().count(b"\nistio_tcp_") == 0


def test_a_change_restarts_the_clock_and_a_series_that_comes_back_starts_from_zero():
    pipeline = Pipeline()
    pipeline.batch(Batch([], [], [closed(1, NORMAL, 10, 10)]))  # opened and closed between two reads
    pipeline.later(INTERVAL / 2)
    pipeline.batch(Batch([], [], [closed(2, NORMAL, 1, 1)]))  # the same label set changes again
    pipeline.later(INTERVAL / 2 + 1)
    assert pipeline.values() == {"unknown": (2, 2, 11, 11)}  # an interval after its first close, kept
    pipeline.later(INTERVAL / 2)
    assert pipeline.values() == {}
    pipeline.batch(Batch([], [], [closed(3, NORMAL, 4, 4)]))
    assert pipeline.values() == {"unknown": (1, 1, 4, 4)}  # a counter reset, as rate() expects


def test_an_open_connection_keeps_its_series_from_its_first_report_on():
    pipeline = Pipeline()
    pipeline.connect(1, "client")
    pipeline.batch(Batch([], [], [closed(1, NORMAL, 5, 5)]))
    pipeline.later(INTERVAL - 1)
    # Reported in the very report that would have evicted the idle series: it joins it.
    pipeline.connect(2, "client")
    pipeline.later(1)
    assert pipeline.values() == {"client": (2, 1, 5, 5)}
    # One whose peer is still unknown sits that report out and keeps nothing: the series goes,
    # and the connection starts a new one, from 0, once its peer is known.
    pipeline.batch(Batch([opened(3, identifies_peer=True)], [updated(3, 8, 9)], [closed(2, NORMAL, 0, 0)]))
    pipeline.later(INTERVAL)
    assert pipeline.values() == {}
    pipeline.batch(Batch([], [], [], [Peer(3, peer_frame("client")[HEADER.size:])]))
    pipeline.later(1)
    assert pipeline.values() == {"client": (1, 0, 8, 9)}
    pipeline.later(5 * INTERVAL)
    assert pipeline.values() == {"client": (1, 0, 8, 9)}


# A churned peer's payload: its name's digits written into one encoded payload, so that 20,000
# payloads cost a bytes.replace each (the same length keeps every protobuf length right).
_CHURN_PAYLOAD = peer_frame("churn-#####")[HEADER.size:]


def churn(pipeline: Pipeline, first_id: int, count: int, per_batch: int = 500) -> None:
    """`count` short-lived connections, each of a peer identity of its own, opened and
    closed in batches of `per_batch` as a busy sidecar reads them."""
    for start in range(first_id, first_id + count, per_batch):
        ids = range(start, min(start + per_batch, first_id + count))
        pipeline.batch(Batch([opened(i, identifies_peer=True) for i in ids], [],
                             [closed(i, NORMAL, 11, 13) for i in ids],
                             [Peer(i, _CHURN_PAYLOAD.replace(b"#####", b"%05d" % i)) for i in ids]))


def test_twenty_thousand_peer_identities_leave_memory_and_the_scrape_as_they_found_them():
    pipeline = Pipeline()
    pipeline.connect(1, "long-lived")
    pipeline.batch(Batch([], [updated(1, 100, 200)], []))
    pipeline.later(1)
    first_scrape = pipeline.scrape()
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        churn(pipeline, 2, CHURN)
        pipeline.batch(Batch([], [updated(1, 1, 2)], []))  # the live series moves meanwhile
        pipeline.later(1)
        assert len(pipeline.telemetry.series) == CHURN + 1
        assert len(pipeline.scrape()) > 1000 * len(first_scrape)
        gc.collect()
        at_peak = tracemalloc.get_traced_memory()[0]
        pipeline.later(INTERVAL)  # every churned series is an interval old: evicted
        pipeline.later(INTERVAL)  # and the payloads no connection brought again are forgotten
        last_scrape = pipeline.scrape()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert pipeline.telemetry.evicted == CHURN
    assert pipeline.values() == {"long-lived": (1, 0, 101, 202)}
    assert last_scrape == first_scrape.replace(b"} 100\n", b"} 101\n").replace(b"} 200\n", b"} 202\n")
    assert at_peak - baseline > 20 << 20  # the churn was there to be measured (MiB of it)...
    assert after - baseline < 256 << 10  # ...and is gone again, to within 256 KiB


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


class MeshClient:
    """A client connection that sends its own peer frame and takes the sidecar's answering
    frame off what it reads."""

    def __init__(self, address: tuple[str, int], name: str) -> None:
        self.sock = socket.create_connection(address, timeout=20)
        self.sock.sendall(peer_frame(name))
        self._frame: FrameReader | None = FrameReader()
        self.frame = b""  # the sidecar's, as it came

    def read(self, count: int) -> bytes:
        """The next `count` application bytes."""
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(65536)
            assert chunk, "the sidecar ended the connection"
            if self._frame is None:
                data += chunk
                continue
            # The sidecar's frame comes first, unless ours reached it after --exchange-detect-timeout
            # (a busy machine): then the app's bytes come alone.
            self.frame += chunk
            result = self._frame.feed(chunk)
            assert result.outcome is not Outcome.INVALID, result
            if result.outcome is not Outcome.NEED_MORE:
                self._frame = None
                self.frame = self.frame[:len(self.frame) - len(result.rest)]
                data += result.rest
        return data


def tcp_samples(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("istio_tcp_")]


def tcp_values(body: str) -> list[str]:
    """The values of the istio_tcp_* samples: opened, closed, sent, received for each label set."""
    return [line.rsplit(" ", 1)[1] for line in tcp_samples(body)]


def test_end_to_end_twenty_thousand_short_lived_peers_are_evicted_and_a_long_lived_one_is_intact(
        sidecar, upstream):
    app = upstream(echo)
    inbound = sidecar(one_listener(
        Address("127.0.0.1", 0), [app.address], INBOUND, MONGODB_SERVICE, admin=None,
        metrics=Address("127.0.0.1", 0), node_metadata=MONGODB_V1, reporting_duration=0.2,
        stats_eviction_interval=1.0, exchange=ExchangeConfig(plaintext=True)))
    telemetry = inbound.sidecar.telemetry
    long_lived = MeshClient(inbound.listen, "long-lived")
    with long_lived.sock:
        long_lived.sock.sendall(b"a" * 1000)
        assert long_lived.read(1000) == b"a" * 1000
        frame = long_lived.frame
        answers = {(1, sha256(b"x")), (len(frame) + 1, sha256(frame + b"x"))}
        wait_until(lambda: tcp_values(inbound.scrape()[1]) == ["1", "0", "1000", "1000"])
        start = inbound.scrape()[1]

        for first in range(0, CHURN, 20):  # 20 at a time, so that round trips overlap
            clients = [MeshClient(inbound.listen, f"churn-{i}") for i in range(first, first + 20)]
            for client in clients:
                client.sock.sendall(b"x")
                client.sock.shutdown(socket.SHUT_WR)
            for client in clients:
                with client.sock:
                    assert read_all(client.sock) in answers  # the app's b"x", after the sidecar's frame
        wait_until(lambda: telemetry.evicted == CHURN)

        long_lived.sock.sendall(b"b" * 500)
        assert long_lived.read(500) == b"b" * 500
        wait_until(lambda: tcp_values(inbound.scrape()[1]) == ["1", "0", "1500", "1500"])
        end = inbound.scrape()[1]
    assert telemetry.evicted == CHURN and len(telemetry.series) == 1
    (key,) = telemetry.series
    assert key[1] == "long-lived" and key[9] == "mongodb-v1"
    assert tcp_samples(end) == [line.replace(" 1000", " 1500") for line in tcp_samples(start)]
    # The health metrics' counters grew by a few digits; a churned series alone is ~3 KB.
    assert abs(len(end) - len(start)) < 256
