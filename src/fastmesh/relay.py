"""The control plane around one engine: listeners, the periodic batch read,
running totals, and logs of failed connections.

The engine moves the bytes; this object runs on the asyncio (uvloop) loop and
reads the engine once per `collect_interval`, never per chunk or per byte.
Consumers (a sidecar's pipeline of peers and telemetry, or an embedding
program's own) receive each batch as it is read.
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

from fastmesh.addr import Address, bind_listener, parse_address
from fastmesh.certs import MeshIdentity
from fastmesh.contract import TLS_ERROR_PREFIX, TLS_ERRORS
from fastmesh.defaults import DEFAULTS
from fastmesh.engine import IMPLEMENTATION, Engine
from fastmesh.exchange import ExchangeSettings
from fastmesh.reasons import CloseReason, describe
from fastmesh.records import Batch, ConnectionInfo
from fastmesh.routing import RouteTable
from fastmesh.tls import ListenerTls

log = logging.getLogger("fastmesh.relay")

# Engine counters of failures that no connection record carries a cause for.
_LOGGED_ERRORS = ("accept_errors", "listener_overflows") + tuple(TLS_ERROR_PREFIX + reason for reason in TLS_ERRORS)

# Closes that mean the upstream was never reached: logged, grouped per upstream and cause.
_FAILURE_REASONS = frozenset({
    CloseReason.CONNECT_FAILED, CloseReason.CONNECT_TIMEOUT, CloseReason.LOCAL_ERROR,
    CloseReason.NO_ROUTE, CloseReason.NO_HEALTHY_UPSTREAM, CloseReason.OVERFLOW,
})


BatchConsumer = Callable[[Batch], None]


class _Failure(NamedTuple):
    """Closed connections that never reached an upstream, grouped for one log line."""

    listener_id: int | None
    cluster: int | None
    endpoint: int | None
    reason: int
    errno: int


@dataclasses.dataclass
class Listener:
    id: int
    address: Address  # as bound (port 0 resolved)
    routes: RouteTable
    sock: socket.socket
    exchange: ExchangeSettings | None = None
    tls: ListenerTls | None = None
    max_connections: int = 0  # open connections it takes at most; 0: no limit


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


class Relay:
    """An engine plus the listeners it serves, driven from the running event loop."""

    def __init__(
        self,
        *,
        workers: int = DEFAULTS.workers,
        collect_interval: float = DEFAULTS.collect_interval,
        backlog: int = DEFAULTS.backlog,
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
        self._errors_logged: dict[str, int] = {}

    @property
    def implementation(self) -> str:
        return IMPLEMENTATION

    @property
    def running(self) -> bool:
        """The engine runs (started, not yet stopped)."""
        return self.engine.running

    def add_consumer(self, consumer: BatchConsumer) -> None:
        """Call `consumer(batch)` with every batch read from the engine."""
        self._consumers.append(consumer)

    async def listen(
        self,
        listen: str | Address,
        upstreams: Sequence[str | Address] | RouteTable,
        *,
        connect_timeout: float = DEFAULTS.connect_timeout,
        exchange: ExchangeSettings | None = None,
        mesh_peer: bool = False,
        tls: ListenerTls | None = None,
        max_connections: int = 0,
        transparent: bool = False,
    ) -> Listener:
        """Bind `listen` and route every connection: to `upstreams` round robin (names
        resolved now; `mesh_peer`: they run sidecars, reached over mTLS once the relay has an
        identity), or by a RouteTable. With `exchange`, the listener runs the peer metadata
        exchange; `tls` says what an inbound listener accepts (fastmesh.tls.ListenerTls); past
        `max_connections` open connections (0: no limit) new ones are reset at once, counted;
        `transparent`: it takes connections iptables TPROXY hands it."""
        address = listen if isinstance(listen, Address) else parse_address(listen, allow_port_zero=True)
        if isinstance(upstreams, RouteTable):
            routes = upstreams
        else:  # the one place a list of upstreams becomes a route table
            routes = await asyncio.to_thread(RouteTable.single, upstreams, connect_timeout, mesh_peer)
        sock = bind_listener(address, self.backlog, transparent)
        try:
            listener_id = self.engine.add_listener(sock.fileno(), routes, exchange, tls, max_connections)
        except BaseException:
            sock.close()
            raise
        bound = Address(*sock.getsockname()[:2])
        listener = Listener(listener_id, bound, routes, sock, exchange, tls, max_connections)
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
        batch = self.engine.collect()
        totals = self.totals
        for opened in batch.opened:
            self._seen.add(opened.conn_id)
        totals.connections_opened += len(batch.opened)
        for updated in batch.updated:
            totals.add_bytes(updated.down_rx, updated.down_tx, updated.up_rx, updated.up_tx)
        failures: collections.Counter[_Failure] = collections.Counter()
        for closed in batch.closed:
            if closed.conn_id in self._seen:
                self._seen.discard(closed.conn_id)
            else:  # opened and closed between two reads
                totals.connections_opened += 1
            totals.connections_closed += 1
            totals.add_bytes(closed.down_rx, closed.down_tx, closed.up_rx, closed.up_tx)
            totals.close_reasons[closed.reason] += 1  # named in counters(), not per connection
            if closed.reason in _FAILURE_REASONS:
                failures[_Failure(closed.listener_id, closed.cluster, closed.endpoint, closed.reason,
                                  closed.errno)] += 1
        if failures:
            self._log_failures(failures)
        self._log_engine_errors()
        for consumer in self._consumers:
            consumer(batch)
        return batch

    def _log_failures(self, failures: collections.Counter[_Failure]) -> None:
        # One line per (listener, upstream, cause) per read: a dead upstream under
        # load is reported, not a log line per refused connection.
        for (listener_id, cluster, endpoint, reason, err), count in failures.items():
            listener = self.listeners.get(listener_id) or self.retired.get(listener_id)  # type: ignore[arg-type]
            where = str(listener.address) if listener else f"listener {listener_id}"
            target = listener.routes.describe(cluster, endpoint) if listener else "upstream"
            cause = f"{errno_names.errorcode.get(err, err)}: {os.strerror(err)}" if err else describe(reason)
            log.warning(
                "%s: %d connection(s) closed, %s to %s (%s)",
                where, count, describe(reason).replace("_", " "), target, cause,
            )

    def _log_engine_errors(self) -> None:
        # Accept failures and refused handshakes are counted by the engine: one line per
        # kind per read, however many connections it was.
        stats = self.engine.stats()
        new = {name: stats[name] - self._errors_logged.get(name, 0) for name in _LOGGED_ERRORS
               if stats[name] > self._errors_logged.get(name, 0)}
        self._errors_logged.update({name: stats[name] for name in new})
        if "listener_overflows" in new:
            log.warning("%d connection(s) refused at accept since the last read: a listener was at its "
                        "max_connections", new.pop("listener_overflows"))
        if "accept_errors" in new:
            log.warning("%d accept failure(s) since the last read (out of file descriptors or memory?); "
                        "the listener pauses 100 ms after each", new.pop("accept_errors"))
        if new:
            log.warning("TLS handshakes refused since the last read: %s",
                        ", ".join(f"{count} {name[len(TLS_ERROR_PREFIX):].replace('_', ' ')}"
                                  for name, count in new.items()))

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

    def connections(self) -> list[ConnectionInfo]:
        """Every open connection's state, as the engine has it now."""
        return self.engine.connections()

    def stats(self) -> dict[str, int]:
        """The engine's health counters."""
        stats = self.engine.stats()
        if stats.get("records_dropped") and not self._warned_dropped:
            self._warned_dropped = True
            log.error("the engine dropped %d closed-connection records", stats["records_dropped"])
        return stats

    def set_identity(self, identity: MeshIdentity) -> None:
        """The mesh identity for new handshakes (open connections keep theirs); ValueError
        for a set the engine refuses, the one in force staying."""
        self.engine.set_identity(identity.cert_chain, identity.key, identity.roots, identity.trust_domain)

    def reroute(self, listener_id: int, routes: RouteTable, exchange: ExchangeSettings | None,
                tls: ListenerTls | None = None, max_connections: int = 0) -> Listener:
        """New routes (and exchange) for a listener's new connections, on the same socket:
        the engine stops watching it and a new listener takes it over, so connections
        waiting in its backlog are not lost and open ones keep their old routes (and
        count toward the old listener's max_connections, not the new one's).
        Returns the new listener (with a new id); the old id stays known for logs."""
        old = self.listeners.pop(listener_id)
        self.engine.remove_listener(old.id)
        try:
            new_id = self.engine.add_listener(old.sock.fileno(), routes, exchange, tls, max_connections)
        except BaseException:
            # The engine refused the new routes: the old ones go on serving, under a new id.
            restored = self.engine.add_listener(old.sock.fileno(), old.routes, old.exchange, old.tls,
                                                old.max_connections)
            self.listeners[restored] = dataclasses.replace(old, id=restored)
            self.retired[listener_id] = old
            raise
        listener = Listener(new_id, old.address, routes, old.sock, exchange, tls, max_connections)
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
        while self.running and loop.time() < deadline and self.engine.stats()["active_connections"]:
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
