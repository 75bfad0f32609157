"""The control plane around one engine: listeners, the periodic batch read,
running totals, and logs of failed connections.

The engine moves the bytes; this object runs on the asyncio (uvloop) loop and
reads the engine once per `collect_interval`, never per chunk or per byte.
Consumers (telemetry, later) receive each batch as it is read.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno as errno_names
import logging
import os
import socket
from typing import Callable, NamedTuple, Sequence

from fastmesh.addr import Address, bind_listener, parse_address, resolve
from fastmesh.engine import IMPLEMENTATION, Engine
from fastmesh.exchange import ExchangeSettings
from fastmesh.routing import RouteTable
from fastmesh.reasons import CloseReason, describe

log = logging.getLogger("fastmesh.relay")

# Closes that mean the upstream was never reached: logged, grouped per upstream and cause.
_FAILURE_REASONS = frozenset({
    CloseReason.CONNECT_FAILED, CloseReason.CONNECT_TIMEOUT, CloseReason.LOCAL_ERROR,
    CloseReason.NO_ROUTE, CloseReason.NO_HEALTHY_UPSTREAM, CloseReason.OVERFLOW,
})


class Batch(NamedTuple):
    """One read of the engine; see fastmesh/_core.pyi for the tuple layouts."""

    opened: list[tuple[int, int, int]]
    updated: list[tuple[int, int, int, int, int]]
    closed: list[tuple[int, int, int, int, int, int, int, int, int]]
    peers: Sequence[tuple[int, bytes | None]] = ()  # exchange outcomes: (conn_id, peer payload or None)


BatchConsumer = Callable[[Batch], None]


@dataclasses.dataclass
class Listener:
    id: int
    address: Address  # as bound (port 0 resolved)
    routes: RouteTable
    sock: socket.socket
    exchange: ExchangeSettings | None = None

    def target(self, upstream_index: int) -> str:
        """The endpoint (or, for a connection refused before one was picked, the cluster) for logs."""
        located = self.routes.locate(upstream_index)
        if located is None:
            return "no route"
        cluster = self.routes.clusters[located[0]]
        if located[1] < 0:
            return f"cluster {cluster.name}"
        return str(Address(*cluster.endpoints[located[1]]))


@dataclasses.dataclass
class Totals:
    connections_opened: int = 0
    connections_closed: int = 0
    downstream_rx: int = 0  # bytes read from downstreams
    downstream_tx: int = 0  # bytes written to downstreams
    upstream_rx: int = 0
    upstream_tx: int = 0
    close_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_bytes(self, d_down_rx: int, d_down_tx: int, d_up_rx: int, d_up_tx: int) -> None:
        self.downstream_rx += d_down_rx
        self.downstream_tx += d_down_tx
        self.upstream_rx += d_up_rx
        self.upstream_tx += d_up_tx


async def route_table(upstreams: Sequence[str | Address] | RouteTable, connect_timeout: float = 5.0,
                      mesh_peer: bool = False) -> RouteTable:
    """`upstreams` as a route table: a RouteTable as it is, else one cluster of the
    addresses (names resolved now), round robin."""
    if isinstance(upstreams, RouteTable):
        return upstreams
    targets: list[Address] = []
    for upstream in upstreams:
        parsed = upstream if isinstance(upstream, Address) else parse_address(upstream)
        targets.extend(await resolve(parsed))
    if not targets:
        raise ValueError("a listener needs at least one upstream")
    return RouteTable.single([(t.host, t.port) for t in targets], connect_timeout, mesh_peer)


class Relay:
    """An engine plus the listeners it serves, driven from the running event loop."""

    def __init__(
        self,
        *,
        workers: int = 1,
        collect_interval: float = 1.0,
        backlog: int = 4096,
        engine: Engine | None = None,
        **engine_options: int | bool,
    ) -> None:
        if collect_interval <= 0:
            raise ValueError("collect_interval must be positive")
        self.engine = engine if engine is not None else Engine(workers, **engine_options)
        self.collect_interval = collect_interval
        self.backlog = backlog
        self.listeners: dict[int, Listener] = {}  # accepting now
        self.retired: dict[int, Listener] = {}  # replaced or stopped; their connections may still be open
        self.totals = Totals()
        self._seen: set[int] = set()  # open connection ids already counted as opened
        self._consumers: list[BatchConsumer] = []
        self._collector: asyncio.Task[None] | None = None
        self._warned_dropped = False
        self._accept_errors_logged = 0

    @property
    def implementation(self) -> str:
        return IMPLEMENTATION

    def add_consumer(self, consumer: BatchConsumer) -> None:
        """Call `consumer(batch)` with every batch read from the engine."""
        self._consumers.append(consumer)

    async def listen(
        self,
        listen: str | Address,
        upstreams: Sequence[str | Address] | RouteTable,
        *,
        connect_timeout: float = 5.0,
        exchange: ExchangeSettings | None = None,
        mesh_peer: bool = False,
    ) -> Listener:
        """Bind `listen` and route every connection: to `upstreams` round robin (names
        resolved now; `mesh_peer`: they run sidecars that exchange metadata), or by a
        RouteTable. With `exchange`, the listener runs the peer metadata exchange."""
        address = listen if isinstance(listen, Address) else parse_address(listen, allow_port_zero=True)
        routes = await route_table(upstreams, connect_timeout, mesh_peer)
        sock = bind_listener(address, self.backlog)
        try:
            listener_id = self.engine.add_listener(sock.fileno(), routes, connect_timeout, exchange)
        except BaseException:
            sock.close()
            raise
        bound = Address(*sock.getsockname()[:2])
        listener = Listener(listener_id, bound, routes, sock, exchange)
        self.listeners[listener_id] = listener
        self.start()
        log.info("listening on %s, routing to %s", bound,
                 "; ".join(f"{c.name} ({len(c.endpoints)} endpoint(s))" for c in routes.clusters) or "nothing")
        return listener

    def start(self) -> None:
        """Start the engine and the periodic collector (idempotent)."""
        self.engine.start()
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def _collect_forever(self) -> None:
        while True:
            await asyncio.sleep(self.collect_interval)
            self.collect()

    def collect(self) -> Batch:
        """Read the engine's batch now, fold it into the totals and pass it on."""
        batch = Batch(*self.engine.collect())
        totals = self.totals
        for conn_id, _, _ in batch.opened:
            self._seen.add(conn_id)
        totals.connections_opened += len(batch.opened)
        for _, d0, d1, d2, d3 in batch.updated:
            totals.add_bytes(d0, d1, d2, d3)
        failures: collections.Counter[tuple[int, int, int, int]] = collections.Counter()
        for conn_id, listener_id, upstream_index, reason, err, d0, d1, d2, d3 in batch.closed:
            if conn_id in self._seen:
                self._seen.discard(conn_id)
            else:  # opened and closed between two reads
                totals.connections_opened += 1
            totals.connections_closed += 1
            totals.add_bytes(d0, d1, d2, d3)
            totals.close_reasons[reason] += 1  # named in counters(), not per connection
            if reason in _FAILURE_REASONS:
                failures[(listener_id, upstream_index, reason, err)] += 1
        if failures:
            self._log_failures(failures)
        self._log_accept_errors()
        for consumer in self._consumers:
            consumer(batch)
        return batch

    def _log_failures(self, failures: collections.Counter[tuple[int, int, int, int]]) -> None:
        # One line per (listener, upstream, cause) per read: a dead upstream under
        # load is reported, not a log line per refused connection.
        for (listener_id, upstream_index, reason, err), count in failures.items():
            listener = self.listeners.get(listener_id) or self.retired.get(listener_id)
            where = str(listener.address) if listener else f"listener {listener_id}"
            target = listener.target(upstream_index) if listener else "upstream"
            cause = f"{errno_names.errorcode.get(err, err)}: {os.strerror(err)}" if err else describe(reason)
            log.warning(
                "%s: %d connection(s) closed, %s to %s (%s)",
                where, count, describe(reason).replace("_", " "), target, cause,
            )

    def _log_accept_errors(self) -> None:
        # Accept failures never reach a connection record: watch the engine's counter.
        errors = self.engine.stats()["accept_errors"]
        if errors > self._accept_errors_logged:
            log.warning(
                "%d accept failure(s) since the last read (out of file descriptors or memory?); "
                "the listener pauses 100 ms after each", errors - self._accept_errors_logged,
            )
            self._accept_errors_logged = errors

    def counters(self) -> dict[str, int]:
        """Connection and byte totals since start (as of the last collect)."""
        t = self.totals
        return {
            "connections_opened": t.connections_opened,
            "connections_closed": t.connections_closed,
            "connections_active": t.connections_opened - t.connections_closed,
            "downstream_rx_bytes": t.downstream_rx,
            "downstream_tx_bytes": t.downstream_tx,
            "upstream_rx_bytes": t.upstream_rx,
            "upstream_tx_bytes": t.upstream_tx,
            **{f"closed_{describe(reason)}": n for reason, n in sorted(t.close_reasons.items())},
        }

    def stats(self) -> dict[str, int]:
        """The engine's health counters."""
        stats = self.engine.stats()
        if stats.get("records_dropped") and not self._warned_dropped:
            self._warned_dropped = True
            log.error("the engine dropped %d closed-connection records", stats["records_dropped"])
        return stats

    def reroute(self, listener_id: int, routes: RouteTable, exchange: ExchangeSettings | None) -> Listener:
        """New routes (and exchange) for a listener's new connections, on the same socket:
        the engine stops watching it and a new listener takes it over, so connections
        waiting in its backlog are not lost and open ones keep their old routes.
        Returns the new listener (with a new id); the old id stays known for logs."""
        old = self.listeners.pop(listener_id)
        self.engine.remove_listener(old.id)
        try:
            new_id = self.engine.add_listener(old.sock.fileno(), routes, exchange=exchange)
        except BaseException:
            # The engine refused the new routes: the old ones go on serving, under a new id.
            restored = self.engine.add_listener(old.sock.fileno(), old.routes, exchange=old.exchange)
            self.listeners[restored] = Listener(restored, old.address, old.routes, old.sock, old.exchange)
            self.retired[listener_id] = old
            raise
        listener = Listener(new_id, old.address, routes, old.sock, exchange)
        self.listeners[new_id] = listener
        self.retired[listener_id] = old
        log.info("%s: new routes in force for new connections", old.address)
        return listener

    def retire(self, listener_id: int) -> None:
        """Stop accepting on one listener and close its socket; its open connections go on."""
        listener = self.listeners.pop(listener_id)
        self.engine.remove_listener(listener.id)
        listener.sock.close()
        self.retired[listener_id] = listener

    def stop_accepting(self) -> None:
        """Close every listener; open connections go on."""
        for listener in self.listeners.values():
            self.engine.remove_listener(listener.id)
            listener.sock.close()
        self.listeners.clear()

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, give open connections up to `drain_timeout` seconds
        to finish, then stop the engine (resetting what is still open)."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.engine.running and loop.time() < deadline and self.engine.stats()["active_connections"]:
            await asyncio.sleep(0.05)
        if self._collector is not None:
            self._collector.cancel()
            self._collector = None
        self.engine.stop()
        self.collect()

    async def __aenter__(self) -> "Relay":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
