# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""The relay engine: epoll worker threads that move bytes between socket pairs
with splice(2), without the GIL and without a Python call per chunk.

Each worker owns an epoll set, the connections it accepted and a pool of pipes.
All sockets are edge-triggered and registered once for reading and writing, so
the data path makes no epoll_ctl calls: readiness is remembered in flags and
each direction is pumped until the kernel says EAGAIN. A pipe is held only
while a direction has bytes in flight, so an idle connection holds none.

Python sees the engine in batches: collect() returns the new, changed and
closed connections since the previous call, and the peers learnt. A worker
holds its mutex while it handles one batch of events (never while it waits in
epoll_wait), and every call from Python takes that mutex, so counters are read
consistently.

The pieces, in native/: system (syscall wrappers), pools (pipes, buffers,
shared frames), conn (a connection's life), timers, flow (the data path),
exchange (istio-peer-exchange), accept (accepting and routing), worker (the
loop), listener (a Listener from a RouteTable), collect (records for Python).
Structures and constants are in _core.pxd; fastmesh/_core.pyi is the interface.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strcmp, strdup, strlen, strncmp
from libc.errno cimport (
    errno, EAGAIN, EINTR, EINPROGRESS, ECONNABORTED, ECONNRESET, EPIPE, EPROTO, EMFILE,
    ENFILE, ENOBUFS, ENOMEM, ETIMEDOUT, EINVAL, EISCONN, EALREADY,
)

from fastmesh._linux cimport *
from fastmesh._openssl cimport *

import ipaddress
import os
import threading

from fastmesh import contract
from fastmesh.defaults import DEFAULTS
from fastmesh.reasons import CloseReason
from fastmesh.records import Batch, Closed, ConnectionInfo, FlowInfo, Opened, Peer, Updated
from fastmesh.routing import LB_POLICIES, OUTBOUND
from fastmesh.tls import (
    CLIENT_ALPN, EXCHANGE_ALPN, SERVER_ALPN, SESSION_CACHE_SIZE, TLS12_CIPHERS, TLS13_CIPHERSUITES, encode_alpn,
)

IMPLEMENTATION = "cython"
SPLICE_SUPPORTED = True

cdef object tuple_new = tuple.__new__  # a named record from a tuple, without calling its class
cdef tuple STATS = contract.STATS

if tuple(fm_stat_names[i].decode() for i in range(N_STATS)) != STATS:
    raise ImportError("fastmesh._core was built from another fastmesh/contract.py: rebuild it")
for _name, _code in (
    ("DOWNSTREAM_CLOSE", R_DOWNSTREAM_CLOSE), ("UPSTREAM_CLOSE", R_UPSTREAM_CLOSE),
    ("DOWNSTREAM_RESET", R_DOWNSTREAM_RESET), ("UPSTREAM_RESET", R_UPSTREAM_RESET),
    ("CONNECT_FAILED", R_CONNECT_FAILED), ("CONNECT_TIMEOUT", R_CONNECT_TIMEOUT),
    ("LOCAL_ERROR", R_LOCAL_ERROR), ("SHUTDOWN", R_SHUTDOWN),
    ("DOWNSTREAM_PROTOCOL_ERROR", R_DOWNSTREAM_PROTOCOL_ERROR),
    ("UPSTREAM_PROTOCOL_ERROR", R_UPSTREAM_PROTOCOL_ERROR),
    ("NO_ROUTE", R_NO_ROUTE), ("NO_HEALTHY_UPSTREAM", R_NO_HEALTHY_UPSTREAM), ("OVERFLOW", R_OVERFLOW),
    ("DOWNSTREAM_TLS_ERROR", R_DOWNSTREAM_TLS_ERROR), ("UPSTREAM_TLS_ERROR", R_UPSTREAM_TLS_ERROR),
):
    if CloseReason[_name] != _code:
        raise ImportError(f"fastmesh._core close code {_name} does not match fastmesh.reasons")

include "native/system.pxi"
include "native/pools.pxi"
include "native/conn.pxi"
include "native/timers.pxi"
include "native/exchange.pxi"
include "native/tls.pxi"
include "native/flow.pxi"
include "native/batch.pxi"
include "native/accept.pxi"
include "native/worker.pxi"
include "native/listener.pxi"
include "native/collect.pxi"

set_alpn_lists(encode_alpn(SERVER_ALPN), encode_alpn(CLIENT_ALPN), EXCHANGE_ALPN.encode())


cdef class Engine:
    """Relays TCP between socket pairs in native worker threads."""

    cdef Worker *_workers
    cdef int _nworkers
    cdef Identity _identity
    cdef Listener *_listeners[MAX_LISTENERS]
    cdef int _nlisteners
    cdef list _threads
    cdef bint _started
    cdef bint _stopped
    cdef unsigned long long _next_worker
    cdef str _io_uring_unavailable

    def __init__(self, int workers=DEFAULTS.workers, *, int pipe_size=DEFAULTS.pipe_size,
                 int max_pipes=DEFAULTS.max_pipes, int buffer_size=DEFAULTS.buffer_size,
                 bint splice=DEFAULTS.splice, bint io_uring=DEFAULTS.io_uring):
        cdef Worker *w
        cdef epoll_event ev
        cdef int i
        if self._workers != NULL:
            raise RuntimeError("an Engine is initialised once")
        contract.check_engine_options(workers, pipe_size, max_pipes, buffer_size)
        self._threads = []
        self._workers = <Worker *>calloc(workers, sizeof(Worker))
        if self._workers == NULL:
            raise MemoryError()
        self._nworkers = workers
        for i in range(workers):
            w = &self._workers[i]
            w.index = i
            w.epfd = -1
            w.wakefd = -1
            pthread_mutex_init(&w.lock, NULL)
            w.listeners = self._listeners
            w.nlisteners = &self._nlisteners
            w.identity = &self._identity
            w.pipe_size = pipe_size
            w.max_pipes = max(1, max_pipes // workers) if max_pipes else 0
            w.buffer_size = buffer_size
            w.use_splice = splice and max_pipes > 0
            w.random_state = int.from_bytes(os.urandom(8), "little") | 1
            w.epfd = epoll_create1(EPOLL_CLOEXEC)
            w.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if w.epfd < 0 or w.wakefd < 0:
                raise OSError(errno, "cannot create the engine's epoll or eventfd")
            ev.events = EPOLLIN
            ev.data.u64 = 0
            if epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.wakefd, &ev) < 0:
                raise OSError(errno, "cannot watch the engine's eventfd")
        if io_uring:
            self._io_uring_unavailable = self._open_rings()

    cdef str _open_rings(self):
        # One ring per worker, or none: why not, when the build or the kernel has none to give
        # (a container's seccomp profile commonly refuses io_uring_setup).
        cdef int i, err = 0
        if not fm_ring_built():
            return "this build of fastmesh has no io_uring (it was compiled without liburing-dev)"
        for i in range(self._nworkers):
            self._workers[i].ring = fm_ring_new(&err)
            if self._workers[i].ring == NULL:
                for i in range(self._nworkers):
                    fm_ring_free(self._workers[i].ring)
                    self._workers[i].ring = NULL
                return f"io_uring_setup: {os.strerror(err)}"
        return None

    def __dealloc__(self):
        cdef Worker *w
        cdef int i
        cdef size_t j
        if self._workers != NULL:
            for i in range(self._nworkers):
                w = &self._workers[i]
                if not self._stopped:
                    close_all(w)  # threads never started, or already joined
                free_pools(w)
                fm_ring_free(w.ring)
                for j in range(w.nclosed):
                    release_frame(w.closed[j].peer)
                    free(w.closed[j].principal)
                free(w.closed)
                if w.epfd >= 0:
                    close(w.epfd)
                if w.wakefd >= 0:
                    close(w.wakefd)
                pthread_mutex_destroy(&w.lock)
            free(self._workers)
        for i in range(self._nlisteners):
            free_listener(self._listeners[i])
        if self._identity.server != NULL:
            SSL_CTX_free(self._identity.server)
        if self._identity.client != NULL:
            SSL_CTX_free(self._identity.client)

    @property
    def workers(self):
        return self._nworkers

    @property
    def running(self):
        return self._started and not self._stopped

    @property
    def splice_enabled(self):
        return self._workers[0].use_splice

    @property
    def io_uring(self):
        """Whether the workers make their plain receives and sends through io_uring, batched."""
        return self._workers[0].ring != NULL

    @property
    def io_uring_unavailable(self):
        """Why io_uring was asked for and is not used (None when it is, or was not asked for)."""
        return self._io_uring_unavailable

    cdef void _lock_all(self) noexcept:
        cdef int i
        with nogil:
            for i in range(self._nworkers):
                pthread_mutex_lock(&self._workers[i].lock)

    cdef void _unlock_all(self) noexcept:
        cdef int i
        for i in range(self._nworkers):
            pthread_mutex_unlock(&self._workers[i].lock)

    def _run_worker(self, int index):
        cdef Worker *w = &self._workers[index]
        with nogil:
            worker_loop(w)

    def start(self):
        """Start the worker threads."""
        if self._stopped:
            raise RuntimeError("a stopped engine cannot be started again")
        if self._started:
            return
        self._started = True
        for i in range(self._nworkers):
            t = threading.Thread(target=self._run_worker, args=(i,),
                                 name=f"fastmesh-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self):
        """Stop the worker threads; reset every open connection (recorded as SHUTDOWN)."""
        cdef Worker *w
        cdef int i
        if self._stopped:
            return
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            w.stop = True
            pthread_mutex_unlock(&w.lock)
            wake(w)
        for t in self._threads:
            t.join()
        if not self._started:
            for i in range(self._nworkers):
                close_all(&self._workers[i])
        self._stopped = True
        self._lock_all()
        for i in range(self._nlisteners):
            self._listeners[i].active = False
        self._unlock_all()

    def set_identity(self, cert_chain, key, roots, trust_domain):
        """The mesh identity for new handshakes (files as fastmesh.certs names them);
        open connections keep theirs. ValueError for a set OpenSSL refuses, and the
        identity in force stays."""
        cdef SSL_CTX *server
        cdef SSL_CTX *client
        cdef SSL_CTX *old_server
        cdef SSL_CTX *old_client
        cdef bytes domain = contract.check_identity(cert_chain, key, roots, trust_domain).encode()
        server = new_context(True, cert_chain, key, roots, True)
        try:
            client = new_context(False, cert_chain, key, roots, True)
        except BaseException:
            SSL_CTX_free(server)
            raise
        self._lock_all()
        old_server = self._identity.server
        old_client = self._identity.client
        self._identity.server = server
        self._identity.client = client
        memcpy(self._identity.trust_domain, <char *>domain, len(domain) + 1)
        self._unlock_all()
        if old_server != NULL:  # an SSL made from it holds its own reference
            SSL_CTX_free(old_server)
        if old_client != NULL:
            SSL_CTX_free(old_client)

    @property
    def has_identity(self):
        return self._identity.server != NULL

    def add_listener(self, int fd, routes, exchange=None, tls=None, max_connections=0):
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning the
        fd) and route each connection by `routes` (a fastmesh.routing.RouteTable).
        exchange: a fastmesh.exchange.ExchangeSettings, or None for no exchange; tls: a
        fastmesh.tls.ListenerTls, or None for plaintext in and auto mTLS out;
        max_connections: open connections it takes at most (0: no limit).
        Returns the listener id."""
        cdef Listener *l
        cdef int i, failed = 0
        contract.check_listener(routes, exchange, tls, self._workers[0].buffer_size, self._nlisteners,
                                self.has_identity, max_connections)
        if self._stopped:
            raise RuntimeError("the engine is stopped")
        l = build_listener(fd, routes, exchange, tls)
        l.max_connections = max_connections
        self._lock_all()
        l.id = self._nlisteners
        l.active = True
        self._listeners[self._nlisteners] = l
        self._nlisteners += 1
        for i in range(self._nworkers):
            if not watch_listener(&self._workers[i], l):
                failed = errno
        if failed:
            l.active = False
            for i in range(self._nworkers):
                epoll_ctl(self._workers[i].epfd, EPOLL_CTL_DEL, fd, NULL)
        self._unlock_all()
        if failed:
            raise OSError(failed, f"cannot watch listener fd {fd}")
        return l.id

    def remove_listener(self, int listener_id):
        """Stop accepting on that listener; open connections go on."""
        cdef Listener *l
        cdef Worker *w
        cdef int i
        if not 0 <= listener_id < self._nlisteners:
            raise ValueError(f"no listener {listener_id}")
        l = self._listeners[listener_id]
        self._lock_all()
        if l.active:
            l.active = False
            for i in range(self._nworkers):
                w = &self._workers[i]
                if l.paused_until[i] > 0:
                    l.paused_until[i] = 0
                    w.npaused -= 1
                else:
                    epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
        self._unlock_all()

    def relay(self, int down_fd, int up_fd):
        """Relay an established socket pair; the engine owns and closes both fds."""
        cdef Worker *w
        cdef Conn *c
        cdef uint64_t conn_id
        if self._stopped:
            raise RuntimeError("the engine is stopped")
        w = &self._workers[fm_fetch_inc(&self._next_worker) % <unsigned long long>self._nworkers]
        for fd in (down_fd, up_fd):
            if fcntl(fd, F_SETFL, O_NONBLOCK | fcntl(fd, F_GETFL)) < 0:
                raise OSError(errno, f"fd {fd} is not usable")
            set_nodelay(fd)
        with nogil:
            pthread_mutex_lock(&w.lock)
        c = new_conn(w, down_fd, up_fd, NULL, NONE, NONE, OPEN)
        if c == NULL:
            pthread_mutex_unlock(&w.lock)
            raise MemoryError()
        w.stats[S_CONNECTIONS_RELAYED] += 1
        conn_id = c.id
        if not register_conn(w, c):
            reset_both(w, c, R_LOCAL_ERROR, w.err)
        pthread_mutex_unlock(&w.lock)
        return conn_id

    def collect(self):
        """Everything that changed since the previous call, in one fastmesh.records.Batch."""
        cdef list opened = [], updated = [], closed = [], peers = []
        cdef object last_payload = None  # peers send the same frame every time: share one bytes object
        cdef Worker *w
        cdef int i
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            try:
                last_payload = collect_worker(w, self._listeners, opened, updated, closed, peers, last_payload)
            finally:
                pthread_mutex_unlock(&w.lock)
        return tuple_new(Batch, (opened, updated, closed, peers))

    def connections(self):
        """Every open connection's state (fastmesh.records.ConnectionInfo), for diagnosis."""
        cdef list found = []
        cdef Worker *w
        cdef int i
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            try:
                connections_of(w, self._listeners, found)
            finally:
                pthread_mutex_unlock(&w.lock)
        return found

    def stats(self):
        """Engine health counters (fastmesh.contract.COUNTERS), summed over the workers."""
        cdef uint64_t totals[N_STATS]
        cdef Worker *w
        cdef int i, k
        memset(totals, 0, sizeof(totals))
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
                for k in range(N_STATS):
                    totals[k] += w.stats[k]
                pthread_mutex_unlock(&w.lock)
        return {STATS[k]: totals[k] for k in range(N_STATS)}
