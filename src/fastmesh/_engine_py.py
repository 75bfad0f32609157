"""Pure-Python twin of fastmesh._core, used when the extension cannot load or
FASTMESH_NO_EXTENSIONS=1. Same interface (_core.pyi) and behaviour, but it copies
with recv/send: one test suite runs against both engines.

Each worker thread owns a selector, its connections and a lock held while it handles
a batch of events (never while it waits in select()); every call from Python takes
that lock. Every worker accepts on every listener and keeps what it accepts, as the
Cython engine's workers do (one wakes per connection: EPOLLEXCLUSIVE). Sockets are
level-triggered and watched only for what their connection can do next: that is
how backpressure and "no reading while connecting" work.

The peer metadata exchange is in _twin_exchange.py, mutual TLS (the ssl module,
memory BIOs) in _twin_tls.py, each a part of the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import itertools
import logging
import os
import random
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from typing import Any, Optional

from fastmesh import contract
from fastmesh._twin_base import DOWN, UP, SideError
from fastmesh._twin_exchange import ExchangeWorkerMixin
from fastmesh._twin_tls import (
    DETECT, HANDSHAKE, OFF, ON, Identity, Sessions, TlsEnd, TlsWorkerMixin, cluster_context,
)
from fastmesh.contract import ACCEPT_PAUSE, GAUGES, IDLE_SWEEP, STATS, frame_buffer_size
from fastmesh.defaults import DEFAULTS
from fastmesh.exchange import HEADER, ExchangeSettings
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch, Closed, ConnectionInfo, FlowInfo, Opened, Peer, Updated
from fastmesh.routing import PASSTHROUGH_POLICIES, RouteTable
from fastmesh.tls import DISABLE, ISTIO_MUTUAL, PERMISSIVE, STRICT, ListenerTls

IMPLEMENTATION = "python"
SPLICE_SUPPORTED = False

log = logging.getLogger("fastmesh.engine")


def _heap_trimmer() -> Any:
    """glibc's malloc_trim(0): the freed heap of every arena back to the system, as the C engine
    gives it back once idle (a crowd's buffers otherwise stay resident); a no-op without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


trim_heap = _heap_trimmer()

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
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
        self.identifies = False  # a Peer record will come: exchange or TLS
        # mutual TLS (see the Cython engine for the rules)
        self.tls: list[Optional[TlsEnd]] = [None, None]
        self.tls_side = -1  # the end that speaks TLS
        self.tls_phase = OFF
        self.tls_mode = ""  # the upstream end's: a fastmesh.tls client mode, "" for plaintext
        self.mtls = DISABLE  # the mode the client is held to: its listener's, or its app port's
        self.active_at = time.monotonic()  # its last event, for its cluster's idle timeout
        self.tls_deadline: Optional[float] = None  # the handshake's, or PERMISSIVE's wait for the client
        self.detect_waited = False  # PERMISSIVE's wait for a TLS client is over: the first side to speak decides
        self.securing = False  # STRICT: the client's handshake first, no upstream yet
        self.holds_route = False  # its cluster (and endpoint) count it: given back at close
        self.session_kept = False
        self.principal: Optional[str] = None  # the peer's verified SPIFFE id

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
        state = ("securing" if self.securing or self.tls_phase in (DETECT, HANDSHAKE)
                 else "connecting" if self.deadline is not None else "open")
        return ConnectionInfo(self.id, worker, self.listener_id, self.cluster, self.endpoint, state, *flows)


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


_UNREAD: Any = object()  # an original destination not read (yet): not a virtual listener's connection


class _Listener:
    """A caller's listening socket (our own dup of it) and its route table. Every
    worker accepts on it; a connection stays with the worker that accepted it."""

    def __init__(self, listener_id: int, sock: socket.socket, routes: RouteTable,
                 exchange: Optional[ExchangeSettings], tls: Optional[ListenerTls], max_connections: int = 0) -> None:
        self.id = listener_id
        self.max_connections = max_connections  # 0: no limit
        self.open_connections = 0  # accepted and not yet closed (under _lock)
        self.sock = sock
        self.local = sock.getsockname()  # what a connection's original destination is compared with
        self.routes = routes
        self.targets = [[_target(e) for e in cluster.endpoints] for cluster in routes.clusters]
        self.exchange = exchange
        self.tls = tls or ListenerTls()
        self.tls_contexts = [cluster_context(cluster.tls) for cluster in routes.clusters]  # SIMPLE, MUTUAL
        self.sessions = Sessions()
        self.closed = False
        self._schedule = routes.schedule()
        self._next = 0
        # A virtual listener: each known original destination's own schedule and position,
        # and (virtual inbound) the mode its app port holds clients to.
        modes = self.tls.destination_modes
        self._destinations = {_canonical(d.address): [routes.schedule(d.routes), 0,
                                                      modes[i] if i < len(modes) else self.tls.mode]
                              for i, d in enumerate(routes.destinations)}
        self._lock = threading.Lock()  # the counts below: workers share listeners
        self._cluster_active = [0] * len(routes.clusters)
        self._cluster_rr = [0] * len(routes.clusters)
        self._endpoint_active = [[0] * len(cluster.endpoints) for cluster in routes.clusters]

    def _known(self, original: Optional[tuple[int, tuple[str, int]]]) -> Optional[list]:
        """The destination of an original address: its own, else the any-address one at its port."""
        if original is None:
            return None
        family, address = original
        any_address = "::" if family == socket.AF_INET6 else "0.0.0.0"
        return (self._destinations.get(_canonical(address))
                or self._destinations.get(_canonical((any_address, address[1]))))

    def original_of(self, client: socket.socket) -> Any:
        """A virtual listener's connection's original destination (None: there is none), read
        once: it picks both the mode and the route. _UNREAD for any other listener."""
        return _original_destination(client, self.local) if self._destinations else _UNREAD

    def client_mtls(self, original: Any) -> str:
        """What a client is held to: the listener's mode, or its app port's (virtual inbound)."""
        if not self.tls.destination_modes or original is _UNREAD:
            return self.tls.mode
        known = self._known(original)
        return known[2] if known is not None else self.tls.mode

    def pick(self, client: socket.socket, original: Any = _UNREAD
             ) -> tuple[Optional[int], Optional[int], Optional[CloseReason], Optional[_Target]]:
        """(cluster, endpoint, None, target) for a connection to make, or (cluster, endpoint,
        reason, None) for a client to turn away. A PASSTHROUGH connection has no endpoint of
        its cluster's own: it goes where the client meant to go. `original`: original_of(client),
        if it was read already."""
        if original is _UNREAD:
            original = self.original_of(client)
        known = self._known(None if original is _UNREAD else original)
        schedule = known[0] if known is not None else self._schedule
        if not schedule:
            return None, None, CloseReason.NO_ROUTE, None
        with self._lock:
            if known is not None:
                ci = schedule[known[1] % len(schedule)]
                known[1] += 1
            else:
                ci = schedule[self._next % len(schedule)]
                self._next += 1
            cluster = self.routes.clusters[ci]
            count = len(cluster.endpoints)
            if count == 0 and cluster.lb not in PASSTHROUGH_POLICIES:
                return ci, None, CloseReason.NO_HEALTHY_UPSTREAM, None
            if cluster.max_connections and self._cluster_active[ci] >= cluster.max_connections:
                return ci, None, CloseReason.OVERFLOW, None
            if cluster.lb in PASSTHROUGH_POLICIES:
                if original is _UNREAD:
                    original = _original_destination(client, self.local)
                destination = original
                if destination is None:
                    return ci, None, CloseReason.NO_HEALTHY_UPSTREAM, None
                if cluster.lb == "LOCAL_PASSTHROUGH":  # the app, on the port the client meant
                    family, (_, port) = destination
                    destination = family, ("::1" if family == socket.AF_INET6 else "127.0.0.1", port)
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

    def admit(self) -> bool:
        """Whether a new connection is within max_connections (then counted open until leave())."""
        with self._lock:
            if self.max_connections and self.open_connections >= self.max_connections:
                return False
            self.open_connections += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.open_connections -= 1

    def release(self, cluster: int, endpoint: Optional[int]) -> None:
        with self._lock:
            if endpoint is not None:
                self._endpoint_active[cluster][endpoint] -= 1
            self._cluster_active[cluster] -= 1

    def endpoint_tls(self, cluster: Optional[int], endpoint: Optional[int], has_identity: bool) -> str:
        """How a connection to that endpoint is secured: its cluster's DestinationRule TLS,
        or auto mTLS to a mesh peer when there is a mesh identity; "" for plaintext."""
        if cluster is None or endpoint is None:
            return ""
        tls = self.routes.clusters[cluster].tls
        if tls is not None:
            return "" if tls.mode == DISABLE else tls.mode
        return ISTIO_MUTUAL if has_identity and self.routes.is_mesh_peer(cluster, endpoint) else ""


def _canonical(address: tuple) -> tuple[bytes, int]:
    """An (ip, port) as the kernel compares it: the packed address and the port."""
    host, port = address[:2]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.inet_pton(family, host), port


def _original_destination(client: socket.socket, listener: tuple) -> Optional[tuple[int, tuple[str, int]]]:
    """Where the client meant to connect before iptables REDIRECT or capture --ebpf
    (SO_ORIGINAL_DST; the IPv6 level only on an IPv6 socket), or under TPROXY the socket's own
    address; None when that is the listener itself."""
    try:
        raw = client.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)  # struct sockaddr_in
        family, address = socket.AF_INET, (socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0])
    except OSError:
        try:
            if client.family != socket.AF_INET6:
                raise
            raw = client.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            family = socket.AF_INET6
            address = (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0])
        except OSError:
            family, address = client.family, client.getsockname()[:2]
    if address[1] == listener[1] and listener[0] in ("0.0.0.0", "::", address[0]):
        return None
    return family, address


class _Worker(ExchangeWorkerMixin, TlsWorkerMixin):
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
        self.securing: set[_Conn] = set()  # connections with a TLS deadline
        self.buffered: set[_Conn] = set()  # TLS bytes already read from the socket: no event will come
        self.peers: list[Peer] = []  # of closed connections, waiting for collect()
        self.listeners: dict[int, _Listener] = {}  # every worker accepts on every listener
        self.paused: dict[int, float] = {}  # listener id -> when this worker accepts on it again
        self.next_idle_sweep = 0.0  # when the open connections are next checked for idleness
        self.heap_to_trim = False  # a connection ended since the heap was last given back
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
                events = self.sel.select(0 if self.buffered else timeout)
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
                while self.buffered:  # as if the TLS end's socket were readable
                    conn = self.buffered.pop()
                    if not conn.closed and conn.tls_side >= 0:
                        self._guarded(conn, conn.tls_side, _READ)
                try:
                    self._run_timers()
                except Exception:
                    log.exception("fastmesh worker %d: unexpected error in timers", self.index)

    def _timeout(self) -> Optional[float]:
        times = [c.deadline for c in self.connecting if c.deadline is not None]
        times += [c.xdeadline for c in self.exchanging if c.xdeadline is not None]
        times += [c.tls_deadline for c in self.securing if c.tls_deadline is not None]
        times += self.paused.values()
        if self.conns or self.heap_to_trim:
            times.append(self.next_idle_sweep)
        if not times:
            return None
        # Capped: select() cannot wait for an arbitrarily long time.
        return min(max(0.0, min(times) - time.monotonic()), 3600.0)

    def _run_timers(self) -> None:
        now = time.monotonic()
        if (self.conns or self.heap_to_trim) and now >= self.next_idle_sweep:
            self._sweep_idle(now)
        for conn in [c for c in self.connecting if c.deadline is not None and c.deadline <= now]:
            self.counters["connect_timeouts"] += 1
            self._finish(conn, CloseReason.CONNECT_TIMEOUT, errno.ETIMEDOUT)
        for conn in [c for c in self.exchanging if c.xdeadline is not None and c.xdeadline <= now]:
            self._exchange_timer(conn)
        for conn in [c for c in self.securing if c.tls_deadline is not None and c.tls_deadline <= now]:
            self._tls_timer(conn)
            if not conn.closed:
                self._guarded(conn, DOWN, 0)
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
            if not conn.closed:
                conn.active_at = time.monotonic()
                self._guarded(conn, side, mask)

    def _sweep_idle(self, now: float) -> None:
        """Every IDLE_SWEEP: close the relaying connections whose cluster's idle timeout has
        passed since their last event, cleanly (close_notify where TLS, best effort); with none
        left open, give the freed heap back."""
        self.next_idle_sweep = now + IDLE_SWEEP
        for conn in list(self.conns.values()):
            lst = conn.listener
            if lst is None or conn.cluster is None or conn.closed or conn in self.connecting or conn.securing:
                continue
            timeout = lst.routes.clusters[conn.cluster].idle_timeout
            if timeout and now - conn.active_at >= timeout:
                for side in (DOWN, UP):
                    if conn.tls[side] is not None:
                        with contextlib.suppress(OSError, ssl.SSLError):
                            self._tls_close_notify(conn, side)
                self.counters["idle_timeouts"] += 1
                self._finish(conn, CloseReason.IDLE_TIMEOUT, 0)
        if not self.conns and self.heap_to_trim:
            self.heap_to_trim = False
            trim_heap()

    def _guarded(self, conn: _Conn, side: int, mask: int) -> None:
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
            if not lst.admit():
                # A flood past the limit costs an accept and a close; open connections go on.
                self.counters["listener_overflows"] += 1
                _close(sock, reset=True)
                continue
            original = lst.original_of(sock)
            mtls = lst.client_mtls(original)
            if mtls == STRICT:
                self._accept_strict(lst, sock)
                continue
            cluster, endpoint, refusal, target = lst.pick(sock, original)
            if refusal is not None:
                self.counters[_REFUSAL_COUNTERS[refusal]] += 1
                _close(sock)
                lst.leave()
                self.closed.append(Closed(self.engine._new_id(), lst.id, cluster, endpoint, int(refusal), 0,
                                          0, 0, 0, 0))
                continue
            assert target is not None
            conn = _Conn(self.engine._new_id(), sock, None, lst, cluster, endpoint)
            conn.holds_route = True
            conn.tls_mode = lst.endpoint_tls(cluster, endpoint, self.engine.has_identity)
            conn.mtls = mtls
            if mtls == PERMISSIVE:
                conn.identifies = True
                conn.tls_side, conn.tls_phase = DOWN, DETECT  # the client's first byte says which
            elif conn.tls_mode:
                conn.identifies = True  # the server's certificate says who it is
            else:
                self._exchange_gate(lst, conn)
            self.add(conn, target)

    def _accept_strict(self, lst: _Listener, sock: socket.socket) -> None:
        # STRICT: the client's certificate first; the app sees a connection only once it
        # is verified (_connect_secured), so an unauthenticated client never reaches it.
        conn = _Conn(self.engine._new_id(), sock, None, lst)
        conn.mtls = STRICT
        conn.identifies = conn.securing = True
        conn.tls_side, conn.tls_phase = DOWN, DETECT
        conn.tls_deadline = time.monotonic() + lst.tls.handshake_timeout
        self.securing.add(conn)
        self.add(conn, None, relayed=False)

    def _connect_secured(self, conn: _Conn) -> None:
        """STRICT, the client verified: now route and connect to the app."""
        lst = conn.listener
        assert lst is not None and conn.socks[DOWN] is not None
        conn.securing = False
        cluster, endpoint, refusal, target = lst.pick(conn.socks[DOWN])
        conn.cluster, conn.endpoint = cluster, endpoint
        if refusal is not None:
            self.counters[_REFUSAL_COUNTERS[refusal]] += 1
            self._finish(conn, refusal, 0, reset=(True, True))
            return
        assert target is not None
        conn.holds_route = True
        self._dial(conn, target)

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

    def add(self, conn: _Conn, target: Optional[_Target] = None, relayed: bool = True) -> None:
        """Take over a new connection and, for an accepted one, dial its upstream (a pair
        given to relay() has both sockets, a STRICT client waits for its handshake).
        The caller holds self.lock."""
        self.conns[conn.id] = conn
        if target is None and relayed:
            self.counters["connections_relayed"] += 1
        try:
            for sock in conn.socks:
                if sock is not None:
                    sock.setblocking(False)
                    _nodelay(sock)
        except OSError as exc:
            self._set_up_failed(conn, exc)
            return
        if target is not None:
            self._dial(conn, target)
        else:
            self._sync(conn)

    def _dial(self, conn: _Conn, target: _Target) -> None:
        try:
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
            self._set_up_failed(conn, exc)

    def _set_up_failed(self, conn: _Conn, exc: OSError) -> None:
        # Counted and logged once per upstream and cause by the Relay; per connection only at debug.
        log.debug("fastmesh connection %d: cannot set up: %s", conn.id, exc)
        self._finish(conn, CloseReason.LOCAL_ERROR, _errno_of(exc), reset=(True, True))

    def _on_ready(self, conn: _Conn, side: int, mask: int) -> None:
        if conn.tls_phase == DETECT and side == UP and conn.detect_waited:
            self._plaintext_client(conn, spoke=False)  # the app spoke first: its client cannot be TLS
        if conn.tls_phase in (DETECT, HANDSHAKE) and side == conn.tls_side:
            self._tls_drive(conn)
            if conn.closed or conn.tls_phase in (DETECT, HANDSHAKE) or conn.deadline is not None:
                if not conn.closed:
                    self._sync(conn)
                return
            if conn.securing:
                return
        elif conn.deadline is not None:
            if side == UP:
                self._on_connect(conn)
            return
        try:
            if mask & _READ and conn.flows[side].reading:
                self._read(conn, side)
                if conn.closed:  # a bad exchange frame
                    return
            if mask & _WRITE:
                self._send(conn, 1 - side)  # the flow whose destination is this side
        except SideError as exc:
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
        if conn.tls_mode:
            self._start_tls(conn, UP)  # originate TLS toward the upstream
            self.securing.add(conn)
            self._tls_drive(conn)
            if conn.closed:
                return
        elif conn.xcan_send and conn.xside == UP:
            self._send_local_frame(conn)  # outbound: the frame leads, before any app byte
        elif conn.xhold:
            assert conn.exchange is not None
            self._exchange_deadline(conn, conn.exchange.detect_timeout)
        if conn.tls_phase == DETECT:
            assert conn.listener is not None
            conn.tls_deadline = time.monotonic() + conn.listener.tls.detect_timeout  # a server-first app waits
            self.securing.add(conn)
        elif conn.tls_phase == HANDSHAKE:  # a PERMISSIVE client's began while connecting: its deadline holds
            self.securing.add(conn)
        self._sync(conn)

    def _recv(self, conn: _Conn, side: int, size: int) -> bytes:
        """Bytes from a side, b"" at its end of stream (close_notify over TLS);
        BlockingIOError when none are there; SideError when it failed."""
        try:
            if conn.tls[side] is not None:
                return self._tls_recv(conn, side, size)
            return conn.socks[side].recv(size)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            raise SideError(side, exc) from None

    def _transmit(self, conn: _Conn, side: int, data: memoryview) -> int:
        """Bytes to a side, as many as it takes now; SideError when it failed."""
        try:
            if conn.tls[side] is not None:
                return self._tls_send(conn, side, data)
            return conn.socks[side].send(data)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise SideError(side, exc) from None

    def _end_stream(self, conn: _Conn, side: int) -> bool:
        """Pass an end of stream on (close_notify first over TLS); False while it waits."""
        try:
            if conn.tls[side] is not None and not self._tls_close_notify(conn, side):
                return False
        except OSError:
            pass  # the peer is gone before our close_notify: as below, its reset comes next
        try:
            conn.socks[side].shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:
            pass  # a dead peer shows up on the next recv/send of that side
        return True

    def _read(self, conn: _Conn, src: int) -> None:
        if conn.xreading and src == conn.xside:
            self._read_peer_frame(conn, src)
            return
        try:
            data = self._recv(conn, src, self.buffer_size)
        except (BlockingIOError, InterruptedError):
            return
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
        if flow.pending:
            sent = self._transmit(conn, dst, flow.pending)
            flow.tx += sent
            if flow.unseen:  # our exchange frame is not relayed bytes
                hidden = min(sent, flow.unseen)
                flow.unseen -= hidden
                flow.tx -= hidden
            flow.pending = flow.pending[sent:] if sent < len(flow.pending) else _EMPTY
        if flow.eof and not flow.pending and not flow.shut:
            flow.shut = self._end_stream(conn, dst)
        elif not flow.pending and conn.tls[src] is not None and conn.tls[src].buffered():
            self.buffered.add(conn)  # room again for what TLS already decrypted

    def _wanted(self, conn: _Conn, side: int) -> int:
        tls = conn.tls[side]
        raw_out = _WRITE if tls is not None and tls.raw_out else 0
        if conn.tls_phase in (DETECT, HANDSHAKE):
            # A TLS end settling: only it is read; the other side's bytes wait.
            if side == conn.tls_side:
                return _READ | raw_out
            if side == UP and conn.detect_waited:
                return _READ  # the app speaking first decides plaintext
            return _WRITE if side == UP and conn.deadline is not None else 0
        if conn.deadline is not None:
            # Connecting: wait for the upstream; downstream bytes stay in the kernel.
            return _WRITE if side == UP else 0
        held = conn.xhold and side != conn.xside  # inbound: the app waits for the client's first bytes
        want = _READ if conn.flows[side].reading and not held else 0
        toward = conn.flows[1 - side]
        # Bytes to write to this side, or an end of stream still to pass on: its close_notify
        # waited for records that a read of this side has since flushed.
        if toward.pending or (toward.eof and not toward.shut):
            want |= _WRITE
        return want | raw_out

    def _sync(self, conn: _Conn) -> None:
        """Watch each socket for exactly what its connection can do next."""
        for side in (DOWN, UP):
            sock, have, want = conn.socks[side], conn.masks[side], self._wanted(conn, side)
            tls = conn.tls[side]
            if want & _READ and tls is not None and conn.tls_phase == ON and tls.buffered():
                self.buffered.add(conn)  # TLS already has bytes of it: no socket event will say so
            if want == have or sock is None:
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
        self.heap_to_trim = True
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
        if conn.listener is not None:
            conn.listener.leave()
            if conn.holds_route:
                conn.listener.release(conn.cluster, conn.endpoint)  # type: ignore[arg-type]
        conn.deadline = conn.tls_deadline = None
        self.connecting.discard(conn)
        self.exchanging.discard(conn)
        self.securing.discard(conn)
        self.buffered.discard(conn)
        conn.tls = [None, None]
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
                opened.append(Opened(conn.id, conn.listener_id, conn.cluster, conn.endpoint, conn.identifies))
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


class Engine:
    """Relays TCP between socket pairs in Python worker threads."""

    def __init__(self, workers: int = DEFAULTS.workers, *, pipe_size: int = DEFAULTS.pipe_size,
                 max_pipes: int = DEFAULTS.max_pipes, buffer_size: int = DEFAULTS.buffer_size,
                 splice: bool = DEFAULTS.splice, io_uring: bool = DEFAULTS.io_uring) -> None:
        # pipe_size, max_pipes, splice and io_uring only matter to the Cython engine.
        self._io_uring_unavailable = "the Python engine makes plain system calls" if io_uring else None
        contract.check_engine_options(workers, pipe_size, max_pipes, buffer_size)
        self._buffer_size = buffer_size
        self._workers = [_Worker(self, i, buffer_size) for i in range(workers)]
        # Lock order: _lifecycle, then worker locks (in index order), then _lock.
        self._lifecycle = threading.Lock()  # start(), stop() and the calls that add fds
        self._lock = threading.Lock()  # conn ids and round robin
        self._conn_ids = itertools.count(1)
        self._listeners: dict[int, _Listener] = {}  # accepting
        self._listener_ids = 0  # listener ids handed out so far
        self._identity: Optional[Identity] = None
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

    @property
    def io_uring(self) -> bool:
        return False

    @property
    def io_uring_unavailable(self) -> str | None:
        return self._io_uring_unavailable

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

    def set_identity(self, cert_chain: str, key: str, roots: str, trust_domain: str) -> None:
        """The mesh identity for new handshakes; open connections keep theirs. ValueError
        for a set the ssl module refuses, and the identity in force stays."""
        contract.check_identity(cert_chain, key, roots, trust_domain)
        identity = Identity(cert_chain, key, roots, trust_domain)
        with self._lifecycle:
            self._identity = identity  # read by the workers as they start handshakes

    @property
    def has_identity(self) -> bool:
        return self._identity is not None

    def add_listener(self, fd: int, routes: RouteTable, exchange: Optional[ExchangeSettings] = None,
                     tls: Optional[ListenerTls] = None, max_connections: int = 0) -> int:
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning the
        fd) and route each connection by `routes`. exchange: the peer metadata exchange
        settings, or None for none; tls: the listener's TLS, or None for plaintext in and
        auto mTLS out; max_connections: open connections it takes at most (0: no limit).
        Returns the listener id."""
        contract.check_listener(routes, exchange, tls, self._buffer_size, self._listener_ids, self.has_identity,
                                max_connections)
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
            try:
                lst = _Listener(self._listener_ids, sock, routes, exchange, tls, max_connections)
            except BaseException:
                sock.close()
                raise
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
