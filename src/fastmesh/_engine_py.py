"""Pure-Python twin of fastmesh._core, used when the extension cannot load or
FASTMESH_NO_EXTENSIONS=1. Same interface (_core.pyi) and behaviour, but it copies
with recv/send: one test suite runs against both engines.

Each worker thread owns a selector, its connections and a lock held while it handles
a batch of events (never while it waits in select()); every call from Python takes
that lock. Every worker accepts on every listener and keeps what it accepts, as the
Cython engine's workers do (one wakes per connection: EPOLLEXCLUSIVE). Sockets are
level-triggered and watched only for what their connection can do next: that is
how backpressure and "no reading while connecting" work.

The peer metadata exchange follows the Cython engine's rules, except that the
peer's first bytes are read rather than peeked (with level-triggered sockets a
peek would spin): bytes that turn out not to be a frame are passed on from the
connection's own buffer.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import random
import select
import selectors
import socket
import struct
import threading
import time
from typing import Optional

from fastmesh import contract
from fastmesh.contract import ACCEPT_PAUSE, FRAME_CHUNK, FRAMES_KEPT, GAUGES, STATS, frame_buffer_size
from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import HEADER, MAGIC_BYTES, ExchangeSettings
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch, Closed, ConnectionInfo, FlowInfo, Opened, Peer, Updated
from fastmesh.routing import OUTBOUND, RouteTable

IMPLEMENTATION = "python"
SPLICE_SUPPORTED = False

log = logging.getLogger("fastmesh.engine")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
DOWN, UP = 0, 1  # the side that connected to us, the side we connected to
_EMPTY = memoryview(b"")
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends RST, not FIN
_SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST has the same value
# Out of fds or memory: retrying at once would spin, so the listener pauses.
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A connection that died in the backlog: skip it and accept the next one.
_ACCEPT_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO})
_REFUSAL_COUNTERS = {CloseReason.NO_ROUTE: "no_route", CloseReason.NO_HEALTHY_UPSTREAM: "no_healthy_upstream",
                     CloseReason.OVERFLOW: "upstream_overflows"}
# (family, sockaddr, connect timeout) of the upstream a new connection must dial.
_Target = tuple[int, tuple[str, int], float]


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a socketpair given to relay()): nothing to tune


def _close(sock: socket.socket, reset: bool = False) -> None:
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _errno_of(exc: BaseException) -> int:
    return (exc.errno or 0) if isinstance(exc, OSError) else 0


class _SideError(Exception):
    """recv/send failed on one side of a connection; the other side gets the reset."""

    def __init__(self, side: int, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side  # DOWN or UP
        self.errno = error.errno or 0


class _Flow:
    """One direction of a connection: what was read from its source and not yet sent."""

    __slots__ = ("pending", "unseen", "eof", "shut", "rx", "tx")

    def __init__(self) -> None:
        self.pending = _EMPTY  # at most buffer_size bytes in flight
        self.unseen = 0  # leading pending bytes that are our exchange frame: not counted in tx
        self.eof = False  # the source sent its FIN
        self.shut = False  # ...and it was passed on with shutdown(SHUT_WR)
        self.rx = 0  # bytes read from the source
        self.tx = 0  # bytes written to the destination

    @property
    def reading(self) -> bool:
        # Backpressure: nothing more is read until the last chunk is all sent.
        return not self.eof and not self.pending


class _Conn:
    """A relayed pair of sockets and the two flows between them."""

    def __init__(self, conn_id: int, down: socket.socket, up: Optional[socket.socket],
                 listener: Optional[_Listener] = None, cluster: Optional[int] = None,
                 endpoint: Optional[int] = None) -> None:
        self.id = conn_id
        self.listener = listener  # for an accepted connection: its endpoint is released at close
        self.cluster = cluster
        self.endpoint = endpoint
        self.socks: list[Optional[socket.socket]] = [down, up]
        self.masks = [0, 0]  # selector events each side is registered for
        self.flows = (_Flow(), _Flow())  # flows[s] carries the bytes read from side s
        self.deadline: Optional[float] = None  # set while the upstream connect is pending
        self.first_eof = -1
        self.announced = False
        self.closed = False
        self._reported = (0, 0, 0, 0)
        # peer metadata exchange (see the Cython engine for the rules)
        self.exchange: Optional[ExchangeSettings] = None
        self.xside = -1  # the peer's side
        self.xreading = False  # the peer's first bytes are not settled yet
        self.xhold = False  # inbound: nothing moves toward the peer until they are
        self.xcan_send = False  # our frame may still go first toward the peer
        self.xhead = bytearray()  # the first bytes, up to a header's 8
        self.xpayload: Optional[bytearray] = None  # once a header was read
        self.xlen = 0  # the whole frame's length, header included
        self.xdeadline: Optional[float] = None
        self.xstarted = False  # frame bytes seen: the frame deadline runs
        self.xreport: Optional[Peer] = None  # waiting for collect()

    @property
    def listener_id(self) -> Optional[int]:
        return self.listener.id if self.listener is not None else None

    def take_deltas(self) -> tuple[int, int, int, int]:
        """(down_rx, down_tx, up_rx, up_tx) since the previous call."""
        d, u = self.flows
        now = (d.rx, u.tx, u.rx, d.tx)
        deltas = tuple(a - b for a, b in zip(now, self._reported))
        self._reported = now
        return deltas  # type: ignore[return-value]

    def frame_bytes(self) -> int:
        """exchange_partial_bytes: what the Cython engine allocates for the peer's frame
        while it arrives (fastmesh.contract.frame_buffer_size)."""
        if self.xpayload is None:
            return 0
        return frame_buffer_size(HEADER.size + len(self.xpayload), self.xlen)

    def info(self, worker: int) -> ConnectionInfo:
        flows = [FlowInfo(f.eof, f.shut, len(f.pending), f.rx, f.tx) for f in self.flows]
        return ConnectionInfo(self.id, worker, self.listener_id, self.cluster, self.endpoint,
                              "connecting" if self.deadline is not None else "open", *flows)


class _Selector(selectors.EpollSelector if hasattr(select, "epoll") else selectors.DefaultSelector):  # type: ignore[misc]
    """A worker's selector. On Linux it watches listening sockets with EPOLLEXCLUSIVE,
    as the C engine does, so that one worker wakes per new connection: when all
    woke, the ones that found the connection gone could still fail accept() with
    EMFILE (the kernel takes the fd slot first), a failure the C engine never sees."""

    def watch_listener(self, sock: socket.socket, data: object) -> None:
        exclusive = getattr(select, "EPOLLEXCLUSIVE", 0) if isinstance(self, selectors.EpollSelector) else 0
        if exclusive:
            self._EVENT_READ = select.EPOLLIN | exclusive  # read by EpollSelector.register
        try:
            self.register(sock, _READ, data)
        finally:
            self.__dict__.pop("_EVENT_READ", None)


def _target(endpoint: tuple[str, int]) -> tuple[int, tuple[str, int]]:
    host, port = endpoint  # numeric: fastmesh.routing.Cluster checked it
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    return family, (host, port)


class _Listener:
    """A caller's listening socket (our own dup of it) and its route table. Every
    worker accepts on it; a connection stays with the worker that accepted it."""

    def __init__(self, listener_id: int, sock: socket.socket, routes: RouteTable,
                 exchange: Optional[ExchangeSettings]) -> None:
        self.id = listener_id
        self.sock = sock
        self.routes = routes
        self.targets = [[_target(e) for e in cluster.endpoints] for cluster in routes.clusters]
        self.exchange = exchange
        self.closed = False
        self._schedule = routes.schedule()
        self._next = 0
        self._lock = threading.Lock()  # the counts below: workers share listeners
        self._cluster_active = [0] * len(routes.clusters)
        self._cluster_rr = [0] * len(routes.clusters)
        self._endpoint_active = [[0] * len(cluster.endpoints) for cluster in routes.clusters]

    def pick(self, client: socket.socket
             ) -> tuple[Optional[int], Optional[int], Optional[CloseReason], Optional[_Target]]:
        """(cluster, endpoint, None, target) for a connection to make, or (cluster, endpoint,
        reason, None) for a client to turn away. A PASSTHROUGH connection has no endpoint of
        its cluster's own: it goes where the client meant to go."""
        if not self._schedule:
            return None, None, CloseReason.NO_ROUTE, None
        with self._lock:
            ci = self._schedule[self._next % len(self._schedule)]
            self._next += 1
            cluster = self.routes.clusters[ci]
            count = len(cluster.endpoints)
            if count == 0 and cluster.lb != "PASSTHROUGH":
                return ci, None, CloseReason.NO_HEALTHY_UPSTREAM, None
            if cluster.max_connections and self._cluster_active[ci] >= cluster.max_connections:
                return ci, None, CloseReason.OVERFLOW, None
            if cluster.lb == "PASSTHROUGH":
                destination = _original_destination(client, self.sock.getsockname())
                if destination is None:
                    return ci, None, CloseReason.NO_HEALTHY_UPSTREAM, None
                self._cluster_active[ci] += 1
                return ci, None, None, (*destination, cluster.connect_timeout)
            active = self._endpoint_active[ci]
            if cluster.lb == "RANDOM":
                index = random.randrange(count)
            else:
                start = self._cluster_rr[ci] % count
                self._cluster_rr[ci] += 1
                index = start
                if cluster.lb == "LEAST_CONN":  # fewest open connections, ties round robin
                    index = min(((start + i) % count for i in range(count)), key=active.__getitem__)
            self._cluster_active[ci] += 1
            active[index] += 1
            family, addr = self.targets[ci][index]
            return ci, index, None, (family, addr, cluster.connect_timeout)

    def release(self, cluster: int, endpoint: Optional[int]) -> None:
        with self._lock:
            if endpoint is not None:
                self._endpoint_active[cluster][endpoint] -= 1
            self._cluster_active[cluster] -= 1


def _original_destination(client: socket.socket, listener: tuple) -> Optional[tuple[int, tuple[str, int]]]:
    """Where the client meant to connect before iptables REDIRECT (SO_ORIGINAL_DST), or
    under TPROXY the socket's own address; None when that is the listener itself."""
    try:
        raw = client.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        family, address = socket.AF_INET, (socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0])
    except OSError:
        try:
            raw = client.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            family = socket.AF_INET6
            address = (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0])
        except OSError:
            family, address = client.family, client.getsockname()[:2]
    if address[1] == listener[1] and listener[0] in ("0.0.0.0", "::", address[0]):
        return None
    return family, address


class _Worker:
    """One thread, its selector and the connections it owns."""

    def __init__(self, engine: Engine, index: int, buffer_size: int) -> None:
        self.engine = engine
        self.index = index
        self.buffer_size = buffer_size
        self.lock = threading.Lock()
        self.sel = _Selector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, _READ, None)
        self.conns: dict[int, _Conn] = {}
        self.connecting: set[_Conn] = set()
        self.exchanging: set[_Conn] = set()  # connections with an exchange deadline
        self.peers: list[Peer] = []  # of closed connections, waiting for collect()
        self.listeners: dict[int, _Listener] = {}  # every worker accepts on every listener
        self.paused: dict[int, float] = {}  # listener id -> when this worker accepts on it again
        self.closed: list[Closed] = []  # records waiting for collect()
        self.kept: dict[bytes, bytes] = {}  # recent distinct peer payloads, shared by the connections that got them
        self.counters = {name: 0 for name in STATS if name not in GAUGES}
        self.stopping = False
        self.thread: Optional[threading.Thread] = None

    # -- thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"fastmesh-py-worker-{self.index}",
                                       daemon=True)
        self.thread.start()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is already pending

    def _run(self) -> None:
        while True:
            with self.lock:
                if self.stopping:
                    return
                timeout = self._timeout()
            try:
                events = self.sel.select(timeout)
            except OSError:
                log.exception("fastmesh worker %d: select() failed", self.index)
                time.sleep(0.01)
                events = []
            with self.lock:
                if self.stopping:
                    return
                self.counters["loop_iterations"] += 1
                for key, mask in events:
                    try:
                        self._dispatch(key, mask)
                    except Exception:
                        log.exception("fastmesh worker %d: unexpected error", self.index)
                try:
                    self._run_timers()
                except Exception:
                    log.exception("fastmesh worker %d: unexpected error in timers", self.index)

    def _timeout(self) -> Optional[float]:
        times = [c.deadline for c in self.connecting if c.deadline is not None]
        times += [c.xdeadline for c in self.exchanging if c.xdeadline is not None]
        times += self.paused.values()
        if not times:
            return None
        # Capped: select() cannot wait for an arbitrarily long time.
        return min(max(0.0, min(times) - time.monotonic()), 3600.0)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.connecting if c.deadline is not None and c.deadline <= now]:
            self.counters["connect_timeouts"] += 1
            self._finish(conn, CloseReason.CONNECT_TIMEOUT, errno.ETIMEDOUT)
        for conn in [c for c in self.exchanging if c.xdeadline is not None and c.xdeadline <= now]:
            self._exchange_timer(conn)
        for listener_id, resume_at in list(self.paused.items()):
            if resume_at <= now:
                del self.paused[listener_id]
                self.sel.watch_listener(self.listeners[listener_id].sock, self.listeners[listener_id])

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        # Events come from a select() made before the lock was taken: the
        # connection or listener may have been closed meanwhile.
        data = key.data
        if data is None:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass
        elif isinstance(data, _Listener):
            if not data.closed and data.id not in self.paused:
                self._accept(data)
        else:
            conn, side = data
            if conn.closed:
                return
            try:
                self._on_ready(conn, side, mask)
            except Exception as exc:
                log.exception("fastmesh connection %d failed", conn.id)
                self._finish(conn, CloseReason.LOCAL_ERROR, _errno_of(exc), reset=(True, True))

    # -- listeners

    def _accept(self, lst: _Listener) -> None:
        while True:
            try:
                sock, _ = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIP:
                    continue
                self.counters["accept_errors"] += 1
                if exc.errno not in _ACCEPT_EXHAUSTED:
                    log.warning("fastmesh listener %d: accept failed: %s", lst.id, exc)
                self._pause(lst)
                return
            self.counters["connections_accepted"] += 1
            cluster, endpoint, refusal, target = lst.pick(sock)
            if refusal is not None:
                self.counters[_REFUSAL_COUNTERS[refusal]] += 1
                _close(sock)
                self.closed.append(Closed(self.engine._new_id(), lst.id, cluster, endpoint, int(refusal), 0,
                                          0, 0, 0, 0))
                continue
            assert target is not None
            conn = _Conn(self.engine._new_id(), sock, None, lst, cluster, endpoint)
            self._exchange_gate(lst, conn)
            self.add(conn, target)

    def _pause(self, lst: _Listener) -> None:
        self.sel.unregister(lst.sock)
        self.paused[lst.id] = time.monotonic() + ACCEPT_PAUSE
        self.counters["accept_paused"] += 1

    def watch_listener(self, lst: _Listener) -> None:
        self.sel.watch_listener(lst.sock, lst)
        self.listeners[lst.id] = lst

    def drop_listener(self, lst: _Listener) -> None:
        if self.paused.pop(lst.id, None) is None:
            self.sel.unregister(lst.sock)
        del self.listeners[lst.id]

    # -- connections

    def add(self, conn: _Conn, target: Optional[_Target] = None) -> None:
        """Take over a new connection and, for an accepted one, dial its upstream.
        The caller holds self.lock."""
        self.conns[conn.id] = conn
        if target is None:
            self.counters["connections_relayed"] += 1
        try:
            for sock in conn.socks:
                if sock is not None:
                    sock.setblocking(False)
                    _nodelay(sock)
            if target is not None:
                family, addr, timeout = target
                up = socket.socket(family, socket.SOCK_STREAM)
                conn.socks[UP] = up
                up.setblocking(False)
                _nodelay(up)
                rc = up.connect_ex(addr)
                if rc not in (0, errno.EINPROGRESS, errno.EINTR):
                    self.counters["connect_failures"] += 1
                    self._finish(conn, CloseReason.CONNECT_FAILED, rc)
                    return
                # Even a connect that completed at once goes through the writable
                # event, so both paths open the connection the same way.
                conn.deadline = time.monotonic() + timeout
                self.connecting.add(conn)
            self._sync(conn)
        except OSError as exc:
            # Counted and logged once per upstream and cause by the Relay; per connection only at debug.
            log.debug("fastmesh connection %d: cannot set up: %s", conn.id, exc)
            self._finish(conn, CloseReason.LOCAL_ERROR, _errno_of(exc), reset=(True, True))

    def _on_ready(self, conn: _Conn, side: int, mask: int) -> None:
        if conn.deadline is not None:
            self._on_connect(conn)
            return
        try:
            if mask & _READ and conn.flows[side].reading:
                self._read(conn, side)
                if conn.closed:  # a bad exchange frame
                    return
            if mask & _WRITE:
                self._send(conn, 1 - side)  # the flow whose destination is this side
        except _SideError as exc:
            self.counters["resets_propagated"] += 1
            reason = CloseReason.DOWNSTREAM_RESET if exc.side == DOWN else CloseReason.UPSTREAM_RESET
            reset = (exc.side != DOWN, exc.side != UP)  # only the side still standing
            self._finish(conn, reason, exc.errno, reset=reset)
            return
        if conn.flows[DOWN].shut and conn.flows[UP].shut:
            first = CloseReason.DOWNSTREAM_CLOSE if conn.first_eof == DOWN else CloseReason.UPSTREAM_CLOSE
            self._finish(conn, first, 0)
        else:
            self._sync(conn)

    def _on_connect(self, conn: _Conn) -> None:
        up = conn.socks[UP]
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.counters["connect_failures"] += 1
            self._finish(conn, CloseReason.CONNECT_FAILED, err)
            return
        conn.deadline = None
        self.connecting.discard(conn)
        if conn.xcan_send and conn.xside == UP:
            self._send_local_frame(conn)  # outbound: the frame leads, before any app byte
        elif conn.xhold:
            assert conn.exchange is not None
            self._exchange_deadline(conn, conn.exchange.detect_timeout)
        self._sync(conn)

    def _read(self, conn: _Conn, src: int) -> None:
        if conn.xreading and src == conn.xside:
            self._read_peer_frame(conn, src)
            return
        try:
            data = conn.socks[src].recv(self.buffer_size)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _SideError(src, exc) from None
        flow = conn.flows[src]
        if data:
            flow.rx += len(data)
            flow.pending = memoryview(data)
        else:
            flow.eof = True
            if conn.first_eof < 0:
                conn.first_eof = src
        self._send(conn, src)

    def _send(self, conn: _Conn, src: int) -> None:
        """Pass on what flows[src] holds, then its end of stream once all is sent."""
        flow, dst = conn.flows[src], 1 - src
        sock = conn.socks[dst]
        assert sock is not None
        if flow.pending:
            try:
                sent = sock.send(flow.pending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise _SideError(dst, exc) from None
            flow.tx += sent
            if flow.unseen:  # our exchange frame is not relayed bytes
                hidden = min(sent, flow.unseen)
                flow.unseen -= hidden
                flow.tx -= hidden
            flow.pending = flow.pending[sent:] if sent < len(flow.pending) else _EMPTY
        if flow.eof and not flow.pending and not flow.shut:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a dead peer shows up on the next recv/send of that side
            flow.shut = True

    def _wanted(self, conn: _Conn, side: int) -> int:
        if conn.deadline is not None:
            # Connecting: wait for the upstream; downstream bytes stay in the kernel.
            return _WRITE if side == UP else 0
        held = conn.xhold and side != conn.xside  # inbound: the app waits for the client's first bytes
        want = _READ if conn.flows[side].reading and not held else 0
        if conn.flows[1 - side].pending:
            want |= _WRITE
        return want

    def _sync(self, conn: _Conn) -> None:
        """Watch each socket for exactly what its connection can do next."""
        for side in (DOWN, UP):
            sock, have, want = conn.socks[side], conn.masks[side], self._wanted(conn, side)
            if want == have:
                continue
            if not have:
                self.sel.register(sock, want, (conn, side))  # type: ignore[arg-type]
            elif not want:
                self.sel.unregister(sock)  # type: ignore[arg-type]
            else:
                self.sel.modify(sock, want, (conn, side))  # type: ignore[arg-type]
            conn.masks[side] = want

    def _finish(self, conn: _Conn, reason: CloseReason, err: int,
                reset: tuple[bool, bool] = (False, False)) -> None:
        """Close both sockets and record why; never raises."""
        if conn.closed:
            return
        conn.closed = True
        for side, sock in enumerate(conn.socks):
            if sock is None:
                continue
            if conn.masks[side]:
                try:
                    self.sel.unregister(sock)
                except (KeyError, ValueError, OSError):
                    pass
            _close(sock, reset[side])
        conn.masks = [0, 0]
        if conn.listener is not None and conn.cluster is not None:
            conn.listener.release(conn.cluster, conn.endpoint)
        conn.deadline = None
        self.connecting.discard(conn)
        self.exchanging.discard(conn)
        if conn.xreport is not None:
            self.peers.append(conn.xreport)
        self.conns.pop(conn.id, None)
        self.closed.append(Closed(conn.id, conn.listener_id, conn.cluster, conn.endpoint, int(reason), err,
                                  *conn.take_deltas()))

    def release(self) -> None:
        """Close the selector and wake-up sockets once the thread is gone."""
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._finish(conn, CloseReason.SHUTDOWN, 0, reset=(True, True))
        for lst in list(self.listeners.values()):
            self.drop_listener(lst)

    def collect_into(self, opened: list[Opened], updated: list[Updated],
                     closed: list[Closed], peers: list[Peer]) -> None:
        for conn in self.conns.values():
            if not conn.announced:
                conn.announced = True
                opened.append(Opened(conn.id, conn.listener_id, conn.cluster, conn.endpoint))
            deltas = conn.take_deltas()
            if any(deltas):
                updated.append(Updated(conn.id, *deltas))
            if conn.xreport is not None:
                peers.append(conn.xreport)
                conn.xreport = None
        closed.extend(self.closed)
        self.closed = []
        peers.extend(self.peers)
        self.peers = []

    # -- peer metadata exchange

    def _exchange_gate(self, lst: _Listener, conn: _Conn) -> None:
        """Whether this connection exchanges metadata, decided once as it opens."""
        settings = lst.exchange
        if settings is None:
            return
        if not settings.exchanges_with(lst.routes.is_mesh_peer(conn.cluster, conn.endpoint)):
            self.counters["exchange_disabled"] += 1
            return
        self.counters["exchange_enabled"] += 1
        conn.exchange = settings
        conn.xreading = conn.xcan_send = True
        if settings.role == OUTBOUND:
            conn.xside = UP
        else:
            conn.xside = DOWN
            conn.xhold = True

    def _exchange_deadline(self, conn: _Conn, seconds: float) -> None:
        conn.xdeadline = time.monotonic() + seconds
        self.exchanging.add(conn)

    def _send_local_frame(self, conn: _Conn) -> None:
        assert conn.exchange is not None
        conn.xcan_send = False
        flow = conn.flows[1 - conn.xside]
        flow.pending = memoryview(conn.exchange.frame)
        flow.unseen = len(conn.exchange.frame)
        self.counters["exchange_frames_sent"] += 1

    def _settle(self, conn: _Conn, payload: Optional[bytes]) -> None:
        """The peer's first bytes are a frame (payload) or not a frame (None)."""
        conn.xreading = False
        conn.xreport = Peer(conn.id, payload)
        conn.xdeadline = None
        self.exchanging.discard(conn)
        if conn.xhold:
            conn.xhold = False
            if payload is not None and conn.xcan_send:
                self._send_local_frame(conn)  # inbound answers only a peer that spoke the protocol
        conn.xcan_send = False

    def _not_a_frame(self, conn: _Conn, src: int) -> None:
        """The bytes read while looking for a header are application bytes: pass them on."""
        self.counters["exchange_no_frame"] += 1
        head = bytes(conn.xhead)
        conn.xhead = bytearray()
        self._settle(conn, None)
        if head:
            flow = conn.flows[src]
            flow.rx += len(head)
            flow.pending = memoryview(head)
            self._send(conn, src)

    def _bad_frame(self, conn: _Conn, src: int, counter: str) -> None:
        self.counters[counter] += 1
        reason = CloseReason.DOWNSTREAM_PROTOCOL_ERROR if src == DOWN else CloseReason.UPSTREAM_PROTOCOL_ERROR
        self._finish(conn, reason, errno.EPROTO, reset=(True, True))

    def _read_peer_frame(self, conn: _Conn, src: int) -> None:
        settings = conn.exchange
        assert settings is not None
        sock = conn.socks[src]
        assert sock is not None
        got = len(conn.xhead) if conn.xpayload is None else HEADER.size + len(conn.xpayload)
        want = (HEADER.size if conn.xpayload is None else conn.xlen) - got
        try:
            data = sock.recv(min(want, self.buffer_size)) if want else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _SideError(src, exc) from None
        if conn.xpayload is None:
            if not data:  # the stream ends before a header
                if len(conn.xhead) >= len(MAGIC_BYTES):
                    self._bad_frame(conn, src, "exchange_frames_truncated")
                else:
                    self._not_a_frame(conn, src)
                return
            conn.xhead += data
            seen = min(len(conn.xhead), len(MAGIC_BYTES))
            if conn.xhead[:seen] != MAGIC_BYTES[:seen]:
                self._not_a_frame(conn, src)
                return
            if not conn.xstarted:
                conn.xstarted = True
                self._exchange_deadline(conn, settings.frame_timeout)
            if len(conn.xhead) < HEADER.size:
                return
            _, size = HEADER.unpack(conn.xhead)
            if size > settings.max_payload:
                self._bad_frame(conn, src, "exchange_frames_too_large")
                return
            conn.xpayload, conn.xlen = bytearray(), HEADER.size + size
        else:
            if not data and want:
                self._bad_frame(conn, src, "exchange_frames_truncated")
                return
            conn.xpayload += data
        if HEADER.size + len(conn.xpayload) == conn.xlen:
            self.counters["exchange_frames_received"] += 1
            self._settle(conn, self._share(bytes(conn.xpayload)))
            conn.xpayload = None
            self._sync(conn)

    def _share(self, payload: bytes) -> bytes:
        """The payload object of a recent identical frame, else this one, kept (if small)."""
        kept = self.kept.get(payload)
        if kept is not None:
            self.counters["exchange_frames_shared"] += 1
            return kept
        if HEADER.size + len(payload) <= FRAME_CHUNK:
            if len(self.kept) == FRAMES_KEPT:
                del self.kept[next(iter(self.kept))]  # the oldest
            self.kept[payload] = payload
        return payload

    def _exchange_timer(self, conn: _Conn) -> None:
        try:
            self._exchange_deadline_passed(conn)
        except _SideError as exc:
            self.counters["resets_propagated"] += 1
            reason = CloseReason.DOWNSTREAM_RESET if exc.side == DOWN else CloseReason.UPSTREAM_RESET
            self._finish(conn, reason, exc.errno, reset=(exc.side != DOWN, exc.side != UP))

    def _exchange_deadline_passed(self, conn: _Conn) -> None:
        if conn.xstarted:
            # A frame's first bytes and then silence: a whole magic is a frame that never
            # completed; less than that is application bytes that happen to match.
            if conn.xpayload is not None or len(conn.xhead) >= len(MAGIC_BYTES):
                self._bad_frame(conn, conn.xside, "exchange_frames_timed_out")
                return
            self._not_a_frame(conn, conn.xside)
        else:
            # Inbound, nothing from the client yet: release the app's first bytes without
            # our frame. A frame that still comes first is read as usual.
            self.counters["exchange_detect_timeouts"] += 1
            conn.xdeadline = None
            self.exchanging.discard(conn)
            conn.xhold = conn.xcan_send = False
        self._sync(conn)


class Engine:
    """Relays TCP between socket pairs in Python worker threads."""

    def __init__(self, workers: int = DEFAULTS.workers, *, pipe_size: int = DEFAULTS.pipe_size,
                 max_pipes: int = DEFAULTS.max_pipes, buffer_size: int = DEFAULTS.buffer_size,
                 splice: bool = DEFAULTS.splice) -> None:
        # pipe_size, max_pipes and splice only matter to the splice engine.
        contract.check_engine_options(workers, pipe_size, max_pipes, buffer_size)
        self._buffer_size = buffer_size
        self._workers = [_Worker(self, i, buffer_size) for i in range(workers)]
        # Lock order: _lifecycle, then worker locks (in index order), then _lock.
        self._lifecycle = threading.Lock()  # start(), stop() and the calls that add fds
        self._lock = threading.Lock()  # conn ids and round robin
        self._conn_ids = itertools.count(1)
        self._listeners: dict[int, _Listener] = {}  # accepting
        self._listener_ids = 0  # listener ids handed out so far
        self._rr = 0
        self._started = False
        self._stopped = False

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def splice_enabled(self) -> bool:
        return False

    def start(self) -> None:
        """Start the worker threads."""
        with self._lifecycle:
            if self._stopped:
                raise RuntimeError("a stopped engine cannot be started again")
            if self._started:
                return
            self._started = True
            for worker in self._workers:
                worker.start()

    def stop(self) -> None:
        """Stop the worker threads; reset every open connection (recorded as SHUTDOWN)."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            for worker in self._workers:
                with worker.lock:
                    worker.stopping = True
                worker.wake()
            for worker in self._workers:
                if worker.thread is not None:
                    worker.thread.join()
            for worker in self._workers:
                with worker.lock:
                    worker.close_all()
                worker.release()
            for lst in self._listeners.values():
                lst.sock.close()
            self._listeners.clear()

    def __del__(self) -> None:
        # Reached only when no worker thread runs (they reference the engine).
        try:
            self.stop()
        except Exception:
            pass

    def add_listener(self, fd: int, routes: RouteTable, exchange: Optional[ExchangeSettings] = None) -> int:
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning the
        fd) and route each connection by `routes`. exchange: the peer metadata exchange
        settings, or None for none. Returns the listener id."""
        contract.check_listener(routes, exchange, self._buffer_size, self._listener_ids)
        dup = os.dup(fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        sock.setblocking(False)
        with self._lifecycle:  # stop() cannot release the selectors meanwhile
            if self._stopped:
                sock.close()
                raise RuntimeError("the engine is stopped")
            lst = _Listener(self._listener_ids, sock, routes, exchange)
            self._listener_ids += 1
            self._listeners[lst.id] = lst
            for worker in self._workers:
                with worker.lock:
                    worker.watch_listener(lst)
                worker.wake()
        return lst.id

    def remove_listener(self, listener_id: int) -> None:
        """Stop accepting on that listener; open connections go on."""
        if not 0 <= listener_id < self._listener_ids:
            raise ValueError(f"no listener {listener_id}")
        with self._lifecycle:
            lst = self._listeners.pop(listener_id, None)
            if lst is None:
                return
            lst.closed = True
            for worker in self._workers:
                with worker.lock:
                    worker.drop_listener(lst)
            lst.sock.close()  # our dup only: the caller's fd stays open

    def relay(self, down_fd: int, up_fd: int) -> int:
        """Relay an established socket pair; the engine owns and closes both fds."""
        with self._lifecycle:  # stop() cannot release the selectors meanwhile
            if self._stopped:
                raise RuntimeError("the engine is stopped")
            for fd in (down_fd, up_fd):
                os.set_blocking(fd, False)  # OSError for an fd that is not open, as the C engine
            down = socket.socket(fileno=down_fd)
            try:
                up = socket.socket(fileno=up_fd)
            except BaseException:
                down.detach()  # not ours after all: leave the fd to the caller
                raise
            conn = _Conn(self._new_id(), down, up)
            with self._lock:  # round robin over the workers
                worker = self._workers[self._rr % len(self._workers)]
                self._rr += 1
            with worker.lock:
                worker.add(conn)
            worker.wake()
            return conn.id

    def collect(self) -> Batch:
        """Everything that changed since the previous call, in one batch."""
        opened: list[Opened] = []
        updated: list[Updated] = []
        closed: list[Closed] = []
        peers: list[Peer] = []
        for worker in self._workers:
            with worker.lock:
                worker.collect_into(opened, updated, closed, peers)
        return Batch(opened, updated, closed, peers)

    def connections(self) -> list[ConnectionInfo]:
        """Every open connection's state, for diagnosis."""
        found: list[ConnectionInfo] = []
        for worker in self._workers:
            with worker.lock:
                found += [conn.info(worker.index) for conn in worker.conns.values()]
        return found

    def stats(self) -> dict[str, int]:
        """Engine health counters (fastmesh.contract.COUNTERS), summed over the workers."""
        totals = dict.fromkeys(STATS, 0)
        for worker in self._workers:
            with worker.lock:
                for name, value in worker.counters.items():
                    totals[name] += value
                conns = worker.conns.values()
                totals["active_connections"] += len(conns)
                totals["buffers_in_use"] += sum(1 for c in conns for f in c.flows if f.pending)
                totals["exchange_partial_bytes"] += sum(c.frame_bytes() for c in conns)
        return totals

    def _new_id(self) -> int:
        with self._lock:
            return next(self._conn_ids)
