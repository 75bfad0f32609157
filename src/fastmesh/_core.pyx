# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""The relay engine: epoll worker threads that move bytes between socket pairs
with splice(2), without the GIL and without a Python call per chunk.

Each worker owns an epoll set, the connections it accepted and a pool of pipes.
All sockets are edge-triggered and registered once for reading and writing, so
the data path makes no epoll_ctl calls: readiness is remembered in flags and
each direction is pumped until the kernel says EAGAIN. A pipe is held only
while a direction has bytes in flight, so an idle connection holds none.

A listener may run Istio's peer metadata exchange (istio-peer-exchange) on
each connection: the engine writes the local frame (built once, in Python)
ahead of the first bytes toward the peer, and reads the peer's frame off the
front of the stream before anything is counted or forwarded. It reads exactly
the frame's bytes (the header is peeked first), so the application bytes
behind it never pass through the engine's hands and splicing starts as usual.
The payload goes to Python with the next batch, which decodes it.

Python sees the engine in batches: collect() returns the new, changed and
closed connections since the previous call, and the peers learnt. A worker holds its mutex while it
handles one batch of events (never while it waits in epoll_wait), and every
call from Python takes that mutex, so counters are read consistently.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from libc.errno cimport (
    errno, EAGAIN, EINTR, EINPROGRESS, ECONNABORTED, EPROTO, EMFILE, ENFILE,
    ENOBUFS, ENOMEM, ETIMEDOUT, EINVAL,
)

from fastmesh._linux cimport *

import ipaddress
import os
import threading

from fastmesh.reasons import CloseReason
from fastmesh.exchange import EXCHANGE_STATS
from fastmesh.routing import LB_POLICIES, ROUTING_STATS, RouteTable

IMPLEMENTATION = "cython"
SPLICE_SUPPORTED = True


cdef extern from *:
    """
    static inline unsigned long long fm_fetch_inc(unsigned long long *p) {
        return __atomic_fetch_add(p, 1ULL, __ATOMIC_RELAXED);
    }
    static inline unsigned long long fm_fetch_dec(unsigned long long *p) {
        return __atomic_fetch_sub(p, 1ULL, __ATOMIC_RELAXED);
    }
    static inline unsigned long long fm_load(unsigned long long *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    /* istio-peer-exchange's magic, big-endian, as it starts a frame on the wire */
    static const unsigned char fm_exchange_magic[4] = {0x3D, 0x23, 0x04, 0x67};
    """
    unsigned long long fm_fetch_inc(unsigned long long *p) nogil
    unsigned long long fm_fetch_dec(unsigned long long *p) nogil
    unsigned long long fm_load(unsigned long long *p) nogil
    const unsigned char fm_exchange_magic[4]


cdef enum:
    MAX_WORKERS = 64
    MAX_LISTENERS = 16384      # ids are not reused: each reload that changes a listener takes one
    MAX_EVENTS = 256
    PUMP_ROUNDS = 8            # fill+drain rounds per direction before other connections get a turn
    ACCEPT_BATCH = 64          # accepts per listener event, for the same reason
    POOL_KEEP = 64             # empty pipes and buffers a worker keeps for reuse
    MAX_CLOSED_RECORDS = 1048576

# Tags in the low bits of epoll_event.data: malloc'd structs are 16-byte aligned.
cdef enum:
    TAG_DOWN = 0
    TAG_UP = 1
    TAG_LISTENER = 2
    TAG_MASK = 3

cdef enum:
    DOWN = 0                   # the side that connected to us
    UP = 1                     # the side we connected to

cdef enum:
    CONNECTING = 1
    OPEN = 2
    CLOSED = 3

# drain() and fill() results
cdef enum:
    IDLE = 0
    MOVED = 1
    FAILED = -1
    GONE = -2                  # the connection was closed on the spot (a bad exchange frame)

# pump() results
cdef enum:
    PUMP_OK = 0
    PUMP_SRC_FAILED = 1
    PUMP_DST_FAILED = 2
    PUMP_GONE = 3

# The peer metadata exchange: a listener's role, a connection's reading state,
# and what collect() reports about the peer.
cdef enum:
    X_NONE = 0
    X_OUTBOUND = 1             # send our frame to mesh-peer upstreams as soon as connected; read theirs
    X_INBOUND = 2              # look for a frame in the downstream's first bytes; answer with ours

cdef enum:
    XR_IDLE = 0                # not looking (no exchange, or the peer's first bytes are settled)
    XR_HEADER = 1              # peeking at the first bytes for the 8-byte header
    XR_PAYLOAD = 2             # header taken; reading exactly its payload

cdef enum:
    FRAME_HEADER = 8           # magic and payload length, both big-endian uint32
    FRAME_CHUNK = 4096         # a frame's buffer starts this small and grows with what arrives
    FRAMES_KEPT = 16           # recent peer frames a worker keeps to share (each at most FRAME_CHUNK)

cdef enum:
    PEER_NONE = 0              # nothing to report
    PEER_NOT_FOUND = 1         # the first bytes were not a frame: application bytes, passed on
    PEER_FOUND = 2             # a frame was read; its payload goes with the report

# Close reasons; the module checks at import that they equal fastmesh.reasons.CloseReason.
cdef enum:
    R_DOWNSTREAM_CLOSE = 1
    R_UPSTREAM_CLOSE = 2
    R_DOWNSTREAM_RESET = 3
    R_UPSTREAM_RESET = 4
    R_CONNECT_FAILED = 5
    R_CONNECT_TIMEOUT = 6
    R_LOCAL_ERROR = 7
    R_SHUTDOWN = 8
    R_DOWNSTREAM_PROTOCOL_ERROR = 9
    R_UPSTREAM_PROTOCOL_ERROR = 10
    R_NO_ROUTE = 11
    R_NO_HEALTHY_UPSTREAM = 12
    R_OVERFLOW = 13

# A cluster's load-balancing policy (fastmesh.routing.LB_POLICIES).
cdef enum:
    LB_ROUND_ROBIN = 0
    LB_LEAST_CONN = 1
    LB_RANDOM = 2
    LB_PASSTHROUGH = 3         # to the client's original destination (transparent capture)

cdef enum:
    SO_ORIGINAL_DST = 80       # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST has the same value

for _name, _code in (
    ("DOWNSTREAM_CLOSE", R_DOWNSTREAM_CLOSE), ("UPSTREAM_CLOSE", R_UPSTREAM_CLOSE),
    ("DOWNSTREAM_RESET", R_DOWNSTREAM_RESET), ("UPSTREAM_RESET", R_UPSTREAM_RESET),
    ("CONNECT_FAILED", R_CONNECT_FAILED), ("CONNECT_TIMEOUT", R_CONNECT_TIMEOUT),
    ("LOCAL_ERROR", R_LOCAL_ERROR), ("SHUTDOWN", R_SHUTDOWN),
    ("DOWNSTREAM_PROTOCOL_ERROR", R_DOWNSTREAM_PROTOCOL_ERROR),
    ("UPSTREAM_PROTOCOL_ERROR", R_UPSTREAM_PROTOCOL_ERROR),
    ("NO_ROUTE", R_NO_ROUTE), ("NO_HEALTHY_UPSTREAM", R_NO_HEALTHY_UPSTREAM), ("OVERFLOW", R_OVERFLOW),
):
    if CloseReason[_name] != _code:
        raise ImportError(f"fastmesh._core close code {_name} does not match fastmesh.reasons")


cdef struct Frame:
    # A peer's frame, header included. A workload sends the same frame on every
    # connection, so the connections that received the same bytes share one.
    int refs
    uint32_t len
    char *data


cdef struct Flow:
    # Bytes moving from one side to the other, through a pipe (splice) or a buffer (copy).
    int pipe_r
    int pipe_w
    int pipe_cap
    char *buf
    uint32_t buf_off
    uint32_t pending           # taken from the source, not yet given to the destination
    uint32_t unseen            # leading pending bytes that are our exchange frame: not counted in tx
    bint stalled               # a pipe with bytes in it took no more: refill after a drain
    bint copy_only             # splice refused this socket (EINVAL): use the buffer
    bint bulk                  # a read filled the whole buffer: splice from now on
    bint src_eof
    bint shut                  # the end of stream was passed on (SHUT_WR)
    uint64_t rx                # bytes read from the source
    uint64_t tx                # bytes written to the destination


cdef struct End:
    int fd
    bint readable
    bint writable
    bint hup                   # an event reported the peer's FIN (EPOLLRDHUP) or an error


# A connection's deadlines: each kind has its own list in the worker, so that
# timers look only at the connections that have one.
cdef enum:
    T_CONNECT = 0              # the upstream connect must complete
    T_EXCHANGE = 1             # the peer's exchange frame must complete (or, inbound, begin)
    TIMER_KINDS = 2


cdef struct Timer:
    Conn *prev                 # Worker.timed[kind]
    Conn *next
    double deadline            # CLOCK_MONOTONIC seconds
    bint armed


cdef struct Conn:
    Conn *prev                 # Worker.conns
    Conn *next
    Conn *ready_next           # Worker.ready or Worker.later
    Conn *grave_next           # Worker.grave
    uint64_t id
    int listener_id
    int upstream_index
    int state
    int first_eof              # the side whose end of stream came first, or -1
    bint queued
    bint announced
    Timer timers[TIMER_KINDS]
    End ends[2]
    Flow flows[2]              # flows[DOWN] moves DOWN -> UP, flows[UP] moves UP -> DOWN
    uint64_t reported[4]       # down_rx, down_tx, up_rx, up_tx already given to collect()
    # peer metadata exchange
    int xside                  # the peer's side (UP outbound, DOWN inbound), -1 without exchange
    int xread                  # XR_*
    bint xhold                 # inbound: nothing moves toward the peer until its first bytes are settled
    bint xcan_send             # our frame may still go first toward the peer
    bint xstarted              # frame bytes have been seen: the frame deadline runs
    int xreport                # PEER_* waiting for collect()
    char *xbuf                 # the peer's frame while it arrives, header included
    uint32_t xlen
    uint32_t xgot
    uint32_t xcap              # bytes allocated at xbuf (up to xlen)
    Frame *xpeer               # the peer's frame once read, until collect() takes it


cdef struct ClosedRecord:
    uint64_t id
    int listener_id
    int upstream_index
    int reason
    int err
    uint64_t delta[4]
    int peer_state             # PEER_*
    Frame *peer                # the frame of a PEER_FOUND (a reference the record holds)


cdef struct Cluster:
    int first                  # its endpoints are Listener.ups[first:first + count]
    int count
    int lb                     # LB_*
    unsigned long long max_connections  # 0: no limit
    unsigned long long active  # open connections (atomic: workers share listeners)
    unsigned long long rr
    double connect_timeout


cdef struct Listener:
    int id
    int fd
    bint active
    # routing (fastmesh.routing.RouteTable): a route, then an endpoint of its cluster
    int nup                    # endpoints of all clusters
    sockaddr_storage *ups
    socklen_t *uplens
    int *ep_cluster            # endpoint -> its cluster
    unsigned long long *ep_active  # open connections per endpoint, for LEAST_CONN
    int nclusters
    Cluster *clusters
    sockaddr_storage local     # the bound address: a PASSTHROUGH destination equal to it goes nowhere
    int nsched                 # 0: no route
    int *sched                 # cluster indexes in weighted round-robin order
    unsigned long long rr
    double paused_until[MAX_WORKERS]  # per worker: accept paused after EMFILE and the like
    # peer metadata exchange
    int xrole                  # X_*
    unsigned char *mesh_peer   # per endpoint: the outbound exchange is on toward it
    char *xframe               # our frame, header included
    uint32_t xframe_len
    uint32_t xmax_payload
    double xframe_timeout      # from a frame's first byte to its last
    double xdetect_timeout     # inbound: how long the upstream's first bytes wait for the peer's


cdef struct Worker:
    int index
    int nworkers
    int epfd
    int wakefd
    bint stop
    pthread_mutex_t lock
    Conn *conns
    Conn *timed[TIMER_KINDS]   # connections with an armed timer of each kind
    Conn *ready                # to run in this iteration
    Conn *later                # to run in the next one
    Conn *grave
    uint64_t seq
    int err                    # errno of the last failed pump
    int npaused
    uint64_t random_state      # xorshift64 for LB_RANDOM
    Listener **listeners
    int *nlisteners
    # configuration
    int pipe_size
    int max_pipes
    int buffer_size
    bint use_splice
    # pools
    int npool
    int pool_r[POOL_KEEP]
    int pool_w[POOL_KEEP]
    int pool_cap[POOL_KEEP]
    int nbufs
    char *bufs[POOL_KEEP]
    # closed connections waiting for collect()
    ClosedRecord *closed
    size_t nclosed
    size_t closed_cap
    # health counters
    uint64_t active
    uint64_t accepted
    uint64_t relayed
    uint64_t connect_failures
    uint64_t connect_timeouts
    uint64_t accept_errors
    uint64_t accept_paused
    uint64_t pipes_in_use
    uint64_t buffers_in_use
    uint64_t splice_fallbacks
    uint64_t loop_iterations
    uint64_t resets
    uint64_t records_dropped
    uint64_t no_route
    uint64_t no_healthy_upstream
    uint64_t overflows
    # exchange counters (Istio's metadata_exchange stats, and why frames were refused)
    uint64_t x_enabled
    uint64_t x_disabled
    uint64_t x_frames_sent
    uint64_t x_frames_received
    uint64_t x_no_frame
    uint64_t x_detect_timeouts
    uint64_t x_too_large
    uint64_t x_truncated
    uint64_t x_timed_out
    uint64_t x_shared
    Frame *kept[FRAMES_KEPT]   # recent distinct peer frames, each with a reference of its own
    int nkept
    int kept_next              # the one to replace when all are in use


# ---------------------------------------------------------------- small helpers

cdef inline double now_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline void set_nodelay(int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


cdef inline void close_with_reset(int fd) noexcept nogil:
    # SO_LINGER 0 makes close() send RST instead of FIN.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    close(fd)


cdef inline int socket_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef inline uint64_t counter(Conn *c, int i) noexcept nogil:
    # i: 0 down_rx, 1 down_tx, 2 up_rx, 3 up_tx
    if i == 0:
        return c.flows[DOWN].rx
    if i == 1:
        return c.flows[UP].tx
    if i == 2:
        return c.flows[UP].rx
    return c.flows[DOWN].tx


cdef inline void wake(Worker *w) noexcept nogil:
    cdef uint64_t one = 1
    write(w.wakefd, &one, sizeof(one))


# ---------------------------------------------------------------- pipes and buffers

cdef bint take_pipe(Worker *w, Flow *f) noexcept nogil:
    cdef int fds[2]
    cdef int cap
    if w.npool > 0:
        w.npool -= 1
        f.pipe_r = w.pool_r[w.npool]
        f.pipe_w = w.pool_w[w.npool]
        f.pipe_cap = w.pool_cap[w.npool]
    else:
        if <int>w.pipes_in_use >= w.max_pipes:
            return False
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return False
        if w.pipe_size > 0:
            fcntl(fds[1], F_SETPIPE_SZ, w.pipe_size)  # may be refused; the size read back is what counts
        cap = fcntl(fds[1], F_GETPIPE_SZ)
        f.pipe_r = fds[0]
        f.pipe_w = fds[1]
        f.pipe_cap = cap if cap > 0 else 65536
    w.pipes_in_use += 1
    return True


cdef void give_pipe(Worker *w, Flow *f) noexcept nogil:
    # Only an empty pipe can be reused; one still holding bytes is closed with them.
    if f.pending == 0 and w.npool < POOL_KEEP:
        w.pool_r[w.npool] = f.pipe_r
        w.pool_w[w.npool] = f.pipe_w
        w.pool_cap[w.npool] = f.pipe_cap
        w.npool += 1
    else:
        close(f.pipe_r)
        close(f.pipe_w)
    f.pipe_r = -1
    f.pipe_w = -1
    w.pipes_in_use -= 1


cdef bint take_buf(Worker *w, Flow *f) noexcept nogil:
    if w.nbufs > 0:
        w.nbufs -= 1
        f.buf = w.bufs[w.nbufs]
    else:
        f.buf = <char *>malloc(w.buffer_size)
        if f.buf == NULL:
            return False
    f.buf_off = 0
    w.buffers_in_use += 1
    return True


cdef void give_buf(Worker *w, Flow *f) noexcept nogil:
    if w.nbufs < POOL_KEEP:
        w.bufs[w.nbufs] = f.buf
        w.nbufs += 1
    else:
        free(f.buf)
    f.buf = NULL
    w.buffers_in_use -= 1


cdef void release_flow(Worker *w, Flow *f) noexcept nogil:
    if f.pipe_r >= 0:
        give_pipe(w, f)
    if f.buf != NULL:
        give_buf(w, f)
    f.pending = 0


# ---------------------------------------------------------------- shared peer frames

cdef void release_frame(Frame *f) noexcept nogil:
    if f != NULL:
        f.refs -= 1
        if f.refs == 0:
            free(f.data)
            free(f)


cdef Frame *share_frame(Worker *w, char *data, uint32_t length) noexcept nogil:
    """A reference to a frame holding `data`, which it takes over: one the worker
    keeps if the same bytes came before, else a new one, kept for the connections
    to come. NULL without memory."""
    cdef Frame *f
    cdef int i
    for i in range(w.nkept):
        f = w.kept[i]
        if f.len == length and memcmp(f.data, data, length) == 0:
            free(data)
            f.refs += 1
            w.x_shared += 1
            return f
    f = <Frame *>malloc(sizeof(Frame))
    if f == NULL:
        free(data)
        return NULL
    f.data = data
    f.len = length
    f.refs = 1
    if length <= FRAME_CHUNK:  # a large frame is not kept: what a peer can pin stays small
        if w.nkept < FRAMES_KEPT:
            w.nkept += 1
        else:
            release_frame(w.kept[w.kept_next])  # connections still holding it keep it alive
        w.kept[w.kept_next] = f
        w.kept_next = (w.kept_next + 1) % FRAMES_KEPT
        f.refs += 1
    return f


# ---------------------------------------------------------------- connection lifecycle

cdef ClosedRecord *record_closed(Worker *w, uint64_t conn_id, int listener_id, int upstream_index,
                                 int reason, int err, uint64_t d0, uint64_t d1, uint64_t d2,
                                 uint64_t d3) noexcept nogil:
    cdef size_t cap
    cdef ClosedRecord *grown
    cdef ClosedRecord *r
    if w.nclosed == w.closed_cap:
        cap = w.closed_cap * 2 if w.closed_cap else 256
        if cap > MAX_CLOSED_RECORDS:
            w.records_dropped += 1  # collect() has not been called for a very long time
            return NULL
        grown = <ClosedRecord *>realloc(w.closed, cap * sizeof(ClosedRecord))
        if grown == NULL:
            w.records_dropped += 1
            return NULL
        w.closed = grown
        w.closed_cap = cap
    r = &w.closed[w.nclosed]
    w.nclosed += 1
    r.id = conn_id
    r.listener_id = listener_id
    r.upstream_index = upstream_index
    r.reason = reason
    r.err = err
    r.delta[0] = d0
    r.delta[1] = d1
    r.delta[2] = d2
    r.delta[3] = d3
    r.peer_state = PEER_NONE
    r.peer = NULL
    return r


cdef inline uint64_t next_id(Worker *w) noexcept nogil:
    w.seq += 1
    return w.seq * MAX_WORKERS + <uint64_t>w.index


cdef Conn *new_conn(Worker *w, int down_fd, int up_fd, int listener_id,
                    int upstream_index, int state) noexcept nogil:
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    cdef int s
    if c == NULL:
        return NULL
    c.id = next_id(w)
    c.listener_id = listener_id
    c.upstream_index = upstream_index
    c.state = state
    c.first_eof = -1
    c.xside = -1
    c.ends[DOWN].fd = down_fd
    c.ends[UP].fd = up_fd
    for s in range(2):
        c.flows[s].pipe_r = -1
        c.flows[s].pipe_w = -1
    c.next = w.conns
    if w.conns != NULL:
        w.conns.prev = c
    w.conns = c
    w.active += 1
    return c


cdef bint register_conn(Worker *w, Conn *c) noexcept nogil:
    cdef epoll_event ev
    cdef int s
    for s in range(2):
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = <uint64_t>(<uintptr_t>c | <uintptr_t>s)
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, c.ends[s].fd, &ev) < 0:
            w.err = errno
            return False
    return True


cdef void arm(Worker *w, Conn *c, int kind, double deadline) noexcept nogil:
    """Set (or move) a connection's deadline of that kind."""
    cdef Timer *t = &c.timers[kind]
    t.deadline = deadline
    if t.armed:
        return
    t.armed = True
    t.prev = NULL
    t.next = w.timed[kind]
    if w.timed[kind] != NULL:
        w.timed[kind].timers[kind].prev = c
    w.timed[kind] = c


cdef void disarm(Worker *w, Conn *c, int kind) noexcept nogil:
    cdef Timer *t = &c.timers[kind]
    if not t.armed:
        return
    if t.prev != NULL:
        t.prev.timers[kind].next = t.next
    elif w.timed[kind] == c:
        w.timed[kind] = t.next
    if t.next != NULL:
        t.next.timers[kind].prev = t.prev
    t.prev = NULL
    t.next = NULL
    t.armed = False


cdef void finish(Worker *w, Conn *c, int reason, int err) noexcept nogil:
    """Record the end of a connection whose fds the caller has closed."""
    cdef int s
    cdef ClosedRecord *r
    for s in range(TIMER_KINDS):
        disarm(w, c, s)
    if c.listener_id >= 0 and c.upstream_index != -1:
        release_endpoint(w.listeners[c.listener_id], c.upstream_index)
    for s in range(2):
        release_flow(w, &c.flows[s])
    r = record_closed(w, c.id, c.listener_id, c.upstream_index, reason, err,
                      counter(c, 0) - c.reported[0], counter(c, 1) - c.reported[1],
                      counter(c, 2) - c.reported[2], counter(c, 3) - c.reported[3])
    # A peer learnt since the last collect() is reported with the close.
    if r != NULL and c.xreport != PEER_NONE:
        r.peer_state = c.xreport
        if c.xreport == PEER_FOUND:
            r.peer = c.xpeer
            c.xpeer = NULL
    release_frame(c.xpeer)
    c.xpeer = NULL
    free(c.xbuf)
    c.xbuf = NULL
    if c.prev != NULL:
        c.prev.next = c.next
    else:
        w.conns = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    c.state = CLOSED
    w.active -= 1
    # Events for c may still be pending in this batch: free it after the batch.
    # A conn in the ready queue is buried when run_ready() pops it.
    if not c.queued:
        c.grave_next = w.grave
        w.grave = c


cdef void close_clean(Worker *w, Conn *c) noexcept nogil:
    close(c.ends[DOWN].fd)
    close(c.ends[UP].fd)
    finish(w, c, R_DOWNSTREAM_CLOSE if c.first_eof == DOWN else R_UPSTREAM_CLOSE, 0)


cdef void abort_conn(Worker *w, Conn *c, int failed_side, int err) noexcept nogil:
    # The failed side is gone; reset the other so its peer learns it at once.
    close_with_reset(c.ends[1 - failed_side].fd)
    close_with_reset(c.ends[failed_side].fd)
    w.resets += 1
    finish(w, c, R_DOWNSTREAM_RESET if failed_side == DOWN else R_UPSTREAM_RESET, err)


cdef void connect_failed(Worker *w, Conn *c, int reason, int err) noexcept nogil:
    close(c.ends[UP].fd)
    close(c.ends[DOWN].fd)
    if reason == R_CONNECT_TIMEOUT:
        w.connect_timeouts += 1
    else:
        w.connect_failures += 1
    finish(w, c, reason, err)


cdef void enqueue(Worker *w, Conn *c) noexcept nogil:
    """Run c in this iteration, after the batch of events."""
    if not c.queued:
        c.queued = True
        c.ready_next = w.ready
        w.ready = c


cdef void defer(Worker *w, Conn *c) noexcept nogil:
    """Run c in the next iteration: it used up its turn in this one."""
    if not c.queued:
        c.queued = True
        c.ready_next = w.later
        w.later = c


# ---------------------------------------------------------------- peer metadata exchange

cdef void exchange_gate(Worker *w, Listener *l, Conn *c, int upstream_index) noexcept nogil:
    """Whether this connection exchanges metadata, decided once as it opens.
    The one place where the plaintext rules live (ALPN would decide here too)."""
    if l.xrole == X_NONE:
        return
    if l.xrole == X_OUTBOUND and (upstream_index < 0 or not l.mesh_peer[upstream_index]):
        w.x_disabled += 1
        return
    w.x_enabled += 1
    c.xread = XR_HEADER
    c.xcan_send = True
    if l.xrole == X_OUTBOUND:
        c.xside = UP           # the frame goes out when the connect completes
    else:
        c.xside = DOWN
        c.xhold = True         # a server-first app waits for the client's first bytes, briefly


cdef void send_local_frame(Worker *w, Conn *c) noexcept nogil:
    """Put our frame at the head of the direction toward the peer, which has
    carried nothing yet. Its bytes are not counted as relayed."""
    cdef Listener *l = w.listeners[c.listener_id]
    cdef Flow *f = &c.flows[1 - c.xside]
    c.xcan_send = False
    if f.pending != 0 or f.pipe_r >= 0 or f.buf != NULL or not take_buf(w, f):
        return  # no memory for it: the peer will not learn who we are, nothing else is lost
    memcpy(f.buf, l.xframe, l.xframe_len)
    f.pending = l.xframe_len
    f.unseen = l.xframe_len
    w.x_frames_sent += 1


cdef void exchange_settled(Worker *w, Conn *c, int peer_state) noexcept nogil:
    """The peer's first bytes are known to be a frame (now read) or not a frame."""
    c.xread = XR_IDLE
    c.xreport = peer_state
    disarm(w, c, T_EXCHANGE)
    if c.xhold:
        c.xhold = False
        # Inbound answers only a peer that spoke the protocol.
        if peer_state == PEER_FOUND and c.xcan_send:
            send_local_frame(w, c)
    c.xcan_send = False


cdef int exchange_failed(Worker *w, Conn *c, int s) noexcept nogil:
    """A frame that cannot be trusted: what follows it cannot be told apart from
    it, so the connection is reset rather than passing on bytes of unknown meaning."""
    close_with_reset(c.ends[DOWN].fd)
    close_with_reset(c.ends[UP].fd)
    finish(w, c, R_DOWNSTREAM_PROTOCOL_ERROR if s == DOWN else R_UPSTREAM_PROTOCOL_ERROR, EPROTO)
    return GONE


cdef int read_peer_frame(Worker *w, Conn *c, int s) noexcept nogil:
    """Read the peer's frame off the front of side s. IDLE: wait for more bytes.
    MOVED: settled, application bytes follow. FAILED or GONE as fill()."""
    cdef Listener *l = w.listeners[c.listener_id]
    cdef End *src = &c.ends[s]
    cdef unsigned char header[FRAME_HEADER]
    cdef ssize_t n
    cdef uint32_t size, cap
    cdef char *grown
    if c.xread == XR_HEADER:
        # Peeked, not read: bytes that turn out not to be a frame stay in the
        # socket and go on by the ordinary path.
        n = recv(src.fd, header, FRAME_HEADER, MSG_PEEK | MSG_DONTWAIT)
        while n < 0 and errno == EINTR:
            n = recv(src.fd, header, FRAME_HEADER, MSG_PEEK | MSG_DONTWAIT)
        if n < 0:
            if errno == EAGAIN:
                src.readable = False
                return IDLE
            w.err = errno
            return FAILED
        if n == 0 or memcmp(header, fm_exchange_magic, <size_t>(n if n < 4 else 4)) != 0:
            w.x_no_frame += 1
            exchange_settled(w, c, PEER_NOT_FOUND)
            return MOVED
        if n < FRAME_HEADER:
            if src.hup:  # the stream ends here
                if n < 4:  # a prefix of the magic is just application bytes
                    w.x_no_frame += 1
                    exchange_settled(w, c, PEER_NOT_FOUND)
                    return MOVED
                w.x_truncated += 1
                return exchange_failed(w, c, s)
            if not c.xstarted:
                c.xstarted = True
                arm(w, c, T_EXCHANGE, now_s() + l.xframe_timeout)
            src.readable = False  # a new edge comes with the next bytes
            return IDLE
        size = ntohl((<uint32_t *>&header[4])[0])
        if size > l.xmax_payload:
            w.x_too_large += 1
            return exchange_failed(w, c, s)
        # The frame, header included, is read to its last byte and no further; a
        # frame of the usual size (under 4 KiB) in one recv.
        c.xlen = FRAME_HEADER + size
        c.xcap = c.xlen if c.xlen < FRAME_CHUNK else FRAME_CHUNK
        c.xbuf = <char *>malloc(c.xcap)
        if c.xbuf == NULL:
            w.err = ENOMEM
            return FAILED
        c.xgot = 0
        c.xread = XR_PAYLOAD
        if not c.xstarted:
            c.xstarted = True
            arm(w, c, T_EXCHANGE, now_s() + l.xframe_timeout)
    while c.xgot < c.xlen:
        if c.xgot == c.xcap:
            # Memory follows the bytes that came, not the size a header claims:
            # a peer that declares a large frame and sends nothing holds 4 KiB.
            cap = c.xcap * 4 if c.xcap < c.xlen / 4 else c.xlen
            grown = <char *>realloc(c.xbuf, cap)
            if grown == NULL:
                w.err = ENOMEM
                return FAILED
            c.xbuf = grown
            c.xcap = cap
        n = recv(src.fd, c.xbuf + c.xgot, c.xcap - c.xgot, MSG_DONTWAIT)
        if n > 0:
            c.xgot += <uint32_t>n
        elif n == 0:
            w.x_truncated += 1
            return exchange_failed(w, c, s)
        elif errno == EAGAIN:
            src.readable = False
            return IDLE
        elif errno != EINTR:
            w.err = errno
            return FAILED
    w.x_frames_received += 1
    c.xpeer = share_frame(w, c.xbuf, c.xlen)
    c.xbuf = NULL
    exchange_settled(w, c, PEER_FOUND)  # without memory for xpeer, only who the peer is is lost
    return MOVED


cdef void exchange_timer(Worker *w, Conn *c) noexcept nogil:
    """A connection's exchange deadline (T_EXCHANGE) has passed."""
    cdef unsigned char header[8]
    cdef ssize_t n
    if c.xread == XR_PAYLOAD:
        w.x_timed_out += 1
        exchange_failed(w, c, c.xside)
        return
    if c.xstarted:
        # Part of a header and then silence: a whole magic is a frame that never
        # completed; less than that is application bytes that happen to match.
        n = recv(c.ends[c.xside].fd, header, 8, MSG_PEEK | MSG_DONTWAIT)
        if n >= 4:
            w.x_timed_out += 1
            exchange_failed(w, c, c.xside)
            return
        w.x_no_frame += 1
        exchange_settled(w, c, PEER_NOT_FOUND)
        c.ends[c.xside].readable = True  # read what was only peeked
    else:
        # Inbound, nothing from the client yet: release the app's first bytes
        # without our frame. A frame that still comes first is read as usual.
        w.x_detect_timeouts += 1
        disarm(w, c, T_EXCHANGE)
        c.xhold = False
        c.xcan_send = False
    defer(w, c)  # timers run after this iteration's ready list


# ---------------------------------------------------------------- the data path

cdef int drain(Worker *w, Conn *c, int s) noexcept nogil:
    """Give what is in flight from side s to the other side; once nothing is
    in flight, return the pipe or buffer and pass an end of stream on."""
    cdef Flow *f = &c.flows[s]
    cdef End *dst = &c.ends[1 - s]
    cdef ssize_t n
    cdef uint32_t hidden
    cdef int result = IDLE
    if f.pending > 0 and dst.writable:
        if f.pipe_r >= 0:
            n = splice(f.pipe_r, NULL, dst.fd, NULL, f.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        else:
            n = send(dst.fd, f.buf + f.buf_off, f.pending, MSG_NOSIGNAL | MSG_DONTWAIT)
        if n > 0:
            f.pending -= <uint32_t>n
            f.tx += <uint64_t>n
            if f.unseen:  # our exchange frame is not relayed bytes
                hidden = f.unseen if <uint32_t>n > f.unseen else <uint32_t>n
                f.unseen -= hidden
                f.tx -= hidden
            if f.pipe_r < 0:
                f.buf_off += <uint32_t>n
            f.stalled = False
            result = MOVED
        elif n < 0 and errno == EAGAIN:
            dst.writable = False
        elif n < 0 and errno != EINTR:
            w.err = errno
            return FAILED
    if f.pending == 0:
        if f.pipe_r >= 0:
            give_pipe(w, f)
        elif f.buf != NULL:
            give_buf(w, f)
        if f.src_eof:
            # When the other direction has ended too, close() follows at once and
            # sends the FIN itself: skip the shutdown call.
            if not c.flows[1 - s].shut:
                shutdown(dst.fd, SHUT_WR)
            f.shut = True
    return result


cdef int fill(Worker *w, Conn *c, int s) noexcept nogil:
    """Read from side s into the pipe or buffer of that direction."""
    cdef Flow *f = &c.flows[s]
    cdef End *src = &c.ends[s]
    cdef ssize_t n
    cdef size_t room
    cdef int settled
    if not src.readable or f.src_eof or f.stalled:
        return IDLE
    if c.xread != XR_IDLE and s == c.xside:
        settled = read_peer_frame(w, c, s)
        if settled != MOVED:
            return settled
    elif c.xhold and s != c.xside:
        return IDLE  # inbound: the app's first bytes wait for the client's
    if f.pipe_r < 0 and f.buf == NULL:
        # Like HAProxy's splice-auto: small messages are cheaper to copy (no
        # pipe, no trailing EAGAIN call); bulk transfers are spliced.
        if not (f.bulk and take_pipe(w, f)):
            if f.bulk:
                w.splice_fallbacks += 1
                f.bulk = False
            if not take_buf(w, f):
                w.err = ENOMEM
                return FAILED
    if f.pipe_r >= 0:
        room = <size_t>(f.pipe_cap - <int>f.pending)
        if room == 0:
            return IDLE
        n = splice(src.fd, NULL, f.pipe_w, NULL, room, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    elif f.unseen > 0 and f.unseen == f.pending and f.buf_off == 0 and f.pending < <uint32_t>w.buffer_size:
        # Only our exchange frame waits: the first application bytes join it, so
        # both leave in one send (and usually one segment).
        room = <size_t>w.buffer_size - f.pending
        n = recv(src.fd, f.buf + f.pending, room, MSG_DONTWAIT)
        if n > 0 and <size_t>n < room and not src.hup:
            src.readable = False
    elif f.pending == 0:
        f.buf_off = 0
        n = recv(src.fd, f.buf, <size_t>w.buffer_size, MSG_DONTWAIT)
        if n == w.buffer_size:
            f.bulk = w.use_splice and not f.copy_only
        elif n > 0 and not src.hup:
            # recv returns all that is queued, up to the size asked for: a short
            # read means the socket is drained, and new bytes will raise a new edge.
            # Not so once the FIN is in: a short read may have stopped at it, and
            # the next recv returns 0 with no new edge to announce it.
            src.readable = False
    else:
        return IDLE  # the buffer is refilled only once it is empty
    if n > 0:
        f.pending += <uint32_t>n
        f.rx += <uint64_t>n
        return MOVED
    if n == 0:
        f.src_eof = True
        if c.first_eof < 0:
            c.first_eof = s
        return MOVED
    if errno == EAGAIN:
        # With bytes already in the pipe, EAGAIN may mean the pipe has no free
        # slot rather than an empty socket: keep the readiness, retry after a drain.
        if f.pending > 0 and f.pipe_r >= 0:
            f.stalled = True
        else:
            src.readable = False
        return IDLE
    if errno == EINVAL and f.pipe_r >= 0 and f.pending == 0:
        f.copy_only = True  # a socket splice cannot read from: copy instead
        give_pipe(w, f)
        return MOVED
    if errno == EINTR:
        return MOVED
    w.err = errno
    return FAILED


cdef int pump(Worker *w, Conn *c, int s) noexcept nogil:
    """Drain and fill side s's direction until the kernel says EAGAIN or the
    direction has had its share of this turn."""
    cdef Flow *f = &c.flows[s]
    cdef int rounds, drained, filled
    for rounds in range(PUMP_ROUNDS):
        if f.shut:
            return PUMP_OK
        drained = drain(w, c, s)
        if drained == FAILED:
            return PUMP_DST_FAILED
        if f.shut:
            return PUMP_OK
        filled = fill(w, c, s)
        if filled == FAILED:
            return PUMP_SRC_FAILED
        if filled == GONE:
            return PUMP_GONE
        if drained == IDLE and filled == IDLE:
            return PUMP_OK
    defer(w, c)
    return PUMP_OK


cdef void drive(Worker *w, Conn *c) noexcept nogil:
    cdef int s, r
    for s in range(2):
        r = pump(w, c, s)
        if r == PUMP_GONE:
            return
        if r == PUMP_SRC_FAILED:
            abort_conn(w, c, s, w.err)
            return
        if r == PUMP_DST_FAILED:
            abort_conn(w, c, 1 - s, w.err)
            return
    if c.flows[DOWN].shut and c.flows[UP].shut:
        close_clean(w, c)


cdef void on_conn_event(Worker *w, Conn *c, int s, uint32_t events) noexcept nogil:
    cdef End *e = &c.ends[s]
    cdef int err
    if c.state == CLOSED:
        return
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        e.readable = True
    if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        e.hup = True
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        e.writable = True
    if c.state == CONNECTING:
        # Downstream bytes wait in the kernel until the upstream answers.
        if s != UP or not (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)):
            return
        if events & (EPOLLERR | EPOLLHUP):  # a clean EPOLLOUT means connected: no SO_ERROR call
            err = socket_error(e.fd)
            if err != 0:
                connect_failed(w, c, R_CONNECT_FAILED, err)
                return
        disarm(w, c, T_CONNECT)
        c.state = OPEN
        if c.xcan_send and c.xside == UP:
            send_local_frame(w, c)  # outbound: the frame leads, before any app byte
        elif c.xhold:
            arm(w, c, T_EXCHANGE, now_s() + w.listeners[c.listener_id].xdetect_timeout)
    elif events & EPOLLERR:
        err = socket_error(e.fd)
        if err != 0:
            abort_conn(w, c, s, err)
            return
    enqueue(w, c)


cdef void release_endpoint(Listener *l, int idx) noexcept nogil:
    """Give back what open_upstream() counted: an endpoint index, or -2 - cluster
    for a PASSTHROUGH connection (which has no endpoint of the cluster's own)."""
    if idx >= 0:
        fm_fetch_dec(&l.ep_active[idx])
        fm_fetch_dec(&l.clusters[l.ep_cluster[idx]].active)
    else:
        fm_fetch_dec(&l.clusters[-2 - idx].active)


cdef bint same_socket_address(sockaddr_storage *a, sockaddr_storage *listener) noexcept nogil:
    # Whether `a` is the listener's own address (a wildcard listener matches any address).
    cdef sockaddr_in *a4
    cdef sockaddr_in *l4
    cdef sockaddr_in6 *a6
    cdef sockaddr_in6 *l6
    cdef int i
    cdef bint any_address = True
    if a.ss_family != listener.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <sockaddr_in *>a
        l4 = <sockaddr_in *>listener
        return a4.sin_port == l4.sin_port and (l4.sin_addr.s_addr == 0 or l4.sin_addr.s_addr == a4.sin_addr.s_addr)
    a6 = <sockaddr_in6 *>a
    l6 = <sockaddr_in6 *>listener
    if a6.sin6_port != l6.sin6_port:
        return False
    for i in range(16):
        if l6.sin6_addr.s6_addr[i] != 0:
            any_address = False
    return any_address or memcmp(&a6.sin6_addr, &l6.sin6_addr, 16) == 0


cdef bint original_destination(int fd, Listener *l, sockaddr_storage *out, socklen_t *length) noexcept nogil:
    """Where the client meant to connect before iptables REDIRECT (SO_ORIGINAL_DST),
    or under TPROXY the socket's own local address. False when that is this listener."""
    memset(out, 0, sizeof(sockaddr_storage))
    length[0] = sizeof(sockaddr_storage)
    if getsockopt(fd, IPPROTO_IP, SO_ORIGINAL_DST, out, length) != 0:
        length[0] = sizeof(sockaddr_storage)
        if getsockopt(fd, IPPROTO_IPV6, SO_ORIGINAL_DST, out, length) != 0:
            length[0] = sizeof(sockaddr_storage)
            if getsockname(fd, <sockaddr *>out, length) != 0:
                return False
    return not same_socket_address(out, &l.local)


cdef int pick_endpoint(Worker *w, Cluster *cl, Listener *l) noexcept nogil:
    cdef int i, best, idx
    cdef unsigned long long load, least
    if cl.count == 1:
        return cl.first
    if cl.lb == LB_RANDOM:
        w.random_state ^= w.random_state << 13
        w.random_state ^= w.random_state >> 7
        w.random_state ^= w.random_state << 17
        return cl.first + <int>(w.random_state % <uint64_t>cl.count)
    best = cl.first + <int>(fm_fetch_inc(&cl.rr) % <unsigned long long>cl.count)
    if cl.lb == LB_LEAST_CONN:
        # The fewest open connections; ties go round robin (the scan starts at the rr pick).
        least = fm_load(&l.ep_active[best])
        for i in range(1, cl.count):
            idx = cl.first + (best - cl.first + i) % cl.count
            load = fm_load(&l.ep_active[idx])
            if load < least:
                least = load
                best = idx
    return best


cdef void refuse(Worker *w, Listener *l, int down_fd, int upstream_index, int reason) noexcept nogil:
    # No upstream connection for this client (NR, UH, UO): close it, record why.
    close(down_fd)
    record_closed(w, next_id(w), l.id, upstream_index, reason, 0, 0, 0, 0, 0)


cdef void open_upstream(Worker *w, Listener *l, int down_fd) noexcept nogil:
    cdef int ci, idx, up_fd, err
    cdef Cluster *cl
    cdef sockaddr_storage *sa
    cdef sockaddr_storage original
    cdef socklen_t salen
    cdef Conn *c
    if l.nsched == 0:
        w.no_route += 1
        refuse(w, l, down_fd, -1, R_NO_ROUTE)
        return
    ci = l.sched[fm_fetch_inc(&l.rr) % <unsigned long long>l.nsched]
    cl = &l.clusters[ci]
    if cl.count == 0 and cl.lb != LB_PASSTHROUGH:
        w.no_healthy_upstream += 1
        refuse(w, l, down_fd, -2 - ci, R_NO_HEALTHY_UPSTREAM)
        return
    if fm_fetch_inc(&cl.active) >= cl.max_connections and cl.max_connections > 0:
        fm_fetch_dec(&cl.active)
        w.overflows += 1
        refuse(w, l, down_fd, -2 - ci, R_OVERFLOW)
        return
    if cl.lb == LB_PASSTHROUGH:
        idx = -2 - ci  # no endpoint of the cluster's own: the connection goes where the client meant
        sa = &original
        if not original_destination(down_fd, l, sa, &salen):
            fm_fetch_dec(&cl.active)
            w.no_healthy_upstream += 1
            refuse(w, l, down_fd, idx, R_NO_HEALTHY_UPSTREAM)
            return
    else:
        idx = pick_endpoint(w, cl, l)
        fm_fetch_inc(&l.ep_active[idx])
        sa = &l.ups[idx]
        salen = l.uplens[idx]
    up_fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if up_fd < 0:
        err = errno
        release_endpoint(l, idx)
        close_with_reset(down_fd)  # a local error resets the client: it must not look like a clean end
        record_closed(w, next_id(w), l.id, idx, R_LOCAL_ERROR, err, 0, 0, 0, 0)
        return
    set_nodelay(up_fd)
    c = new_conn(w, down_fd, up_fd, l.id, idx, CONNECTING)
    if c == NULL:
        release_endpoint(l, idx)
        close(up_fd)
        close_with_reset(down_fd)
        record_closed(w, next_id(w), l.id, idx, R_LOCAL_ERROR, ENOMEM, 0, 0, 0, 0)
        return
    exchange_gate(w, l, c, idx)
    if connect(up_fd, <sockaddr *>sa, salen) < 0 and errno != EINPROGRESS:
        connect_failed(w, c, R_CONNECT_FAILED, errno)
        return
    if not register_conn(w, c):
        close_with_reset(up_fd)
        close_with_reset(down_fd)
        finish(w, c, R_LOCAL_ERROR, w.err)
        return
    # A connect that completed at once still reports EPOLLOUT, which opens the conn.
    arm(w, c, T_CONNECT, now_s() + cl.connect_timeout)


cdef void pause_listener(Worker *w, Listener *l) noexcept nogil:
    # Out of fds or memory: a level-triggered listener would spin, so stop
    # watching it for a moment; the error is counted for the operator.
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
    l.paused_until[w.index] = now_s() + 0.1
    w.npaused += 1
    w.accept_paused += 1


cdef void on_accept(Worker *w, Listener *l) noexcept nogil:
    cdef int i, fd, err
    if not l.active or l.paused_until[w.index] > 0:
        return
    for i in range(ACCEPT_BATCH):
        fd = accept4(l.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            err = errno
            if err == EAGAIN:
                return
            if err == EINTR or err == ECONNABORTED or err == EPROTO:
                continue
            w.accept_errors += 1
            if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                pause_listener(w, l)
            return
        w.accepted += 1
        open_upstream(w, l, fd)


cdef bint watch_listener(Worker *w, Listener *l) noexcept nogil:
    # EPOLLEXCLUSIVE: one worker wakes per incoming connection, not all of them.
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLEXCLUSIVE
    ev.data.u64 = <uint64_t>(<uintptr_t>l | TAG_LISTENER)
    return epoll_ctl(w.epfd, EPOLL_CTL_ADD, l.fd, &ev) == 0


cdef void run_timers(Worker *w) noexcept nogil:
    cdef double now = now_s()
    cdef Conn *c
    cdef Conn *nxt
    cdef Listener *l
    cdef int i, kind
    for kind in range(TIMER_KINDS):
        c = w.timed[kind]
        while c != NULL:
            nxt = c.timers[kind].next
            if now >= c.timers[kind].deadline:
                if kind == T_CONNECT:
                    connect_failed(w, c, R_CONNECT_TIMEOUT, ETIMEDOUT)
                else:
                    exchange_timer(w, c)
            c = nxt
    if w.npaused:
        for i in range(w.nlisteners[0]):
            l = w.listeners[i]
            if l.paused_until[w.index] > 0 and now >= l.paused_until[w.index]:
                l.paused_until[w.index] = 0
                w.npaused -= 1
                if l.active:
                    watch_listener(w, l)


cdef int next_timeout_ms(Worker *w) noexcept nogil:
    cdef double soonest = -1, now, t
    cdef Conn *c
    cdef Listener *l
    cdef int i, kind
    if w.later != NULL:
        return 0
    for kind in range(TIMER_KINDS):
        c = w.timed[kind]
        while c != NULL:
            if soonest < 0 or c.timers[kind].deadline < soonest:
                soonest = c.timers[kind].deadline
            c = c.timers[kind].next
    if w.npaused:
        for i in range(w.nlisteners[0]):
            t = w.listeners[i].paused_until[w.index]
            if t > 0 and (soonest < 0 or t < soonest):
                soonest = t
    if soonest < 0:
        return -1
    now = now_s()
    if soonest <= now:
        return 0
    return <int>((soonest - now) * 1000.0) + 1


cdef void run_ready(Worker *w) noexcept nogil:
    cdef Conn *c = w.ready
    cdef Conn *nxt
    cdef int s, r
    # Reads first, writes after, as HAProxy does: the peers our writes wake up
    # then run once we have read everything that was ready, instead of
    # preempting us in the middle of the batch.
    while c != NULL:
        if c.state == OPEN:
            for s in range(2):
                r = fill(w, c, s)
                if r == FAILED:
                    abort_conn(w, c, s, w.err)
                    break
                if r == GONE:
                    break
        c = c.ready_next
    c = w.ready
    w.ready = NULL
    while c != NULL:
        nxt = c.ready_next
        c.queued = False
        if c.state == OPEN:
            drive(w, c)
        elif c.state == CLOSED:
            c.grave_next = w.grave
            w.grave = c
        c = nxt


cdef void bury(Worker *w) noexcept nogil:
    cdef Conn *c = w.grave
    cdef Conn *nxt
    w.grave = NULL
    while c != NULL:
        nxt = c.grave_next
        free(c)
        c = nxt


cdef void close_all(Worker *w) noexcept nogil:
    cdef Conn *c
    while w.conns != NULL:
        c = w.conns
        close_with_reset(c.ends[DOWN].fd)
        close_with_reset(c.ends[UP].fd)
        finish(w, c, R_SHUTDOWN, 0)
    run_ready(w)  # buries the closed conns that were still queued
    w.ready = w.later
    w.later = NULL
    run_ready(w)
    bury(w)


cdef void worker_loop(Worker *w) noexcept nogil:
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout = -1
    cdef uint64_t tag, drained
    while True:
        n = epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
        pthread_mutex_lock(&w.lock)
        if w.stop:
            break
        w.loop_iterations += 1
        w.ready = w.later
        w.later = NULL
        for i in range(n if n > 0 else 0):
            tag = events[i].data.u64
            if tag == 0:
                read(w.wakefd, &drained, sizeof(drained))
            elif (tag & TAG_MASK) == TAG_LISTENER:
                on_accept(w, <Listener *><uintptr_t>(tag & ~(<uint64_t>TAG_MASK)))
            else:
                on_conn_event(w, <Conn *><uintptr_t>(tag & ~(<uint64_t>TAG_MASK)),
                              <int>(tag & TAG_MASK), events[i].events)
        run_ready(w)
        if w.timed[T_CONNECT] != NULL or w.timed[T_EXCHANGE] != NULL or w.npaused:
            run_timers(w)
        bury(w)
        timeout = next_timeout_ms(w)
        pthread_mutex_unlock(&w.lock)
    close_all(w)
    pthread_mutex_unlock(&w.lock)


# ---------------------------------------------------------------- Python interface

cdef int fill_sockaddr(sockaddr_storage *ss, socklen_t *length, object host, int port) except -1:
    cdef bytes raw = str(ipaddress.ip_address(host)).encode()
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    memset(ss, 0, sizeof(sockaddr_storage))
    if ":" in host:
        sin6 = <sockaddr_in6 *>ss
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(<uint16_t>port)
        if inet_pton(AF_INET6, raw, &sin6.sin6_addr) != 1:
            raise ValueError(f"not an IPv6 address: {host!r}")
        length[0] = sizeof(sockaddr_in6)
    else:
        sin = <sockaddr_in *>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(<uint16_t>port)
        if inet_pton(AF_INET, raw, &sin.sin_addr) != 1:
            raise ValueError(f"not an IPv4 address: {host!r}")
        length[0] = sizeof(sockaddr_in)
    return 0


cdef void free_listener(Listener *l) noexcept nogil:
    free(l.ups)
    free(l.uplens)
    free(l.mesh_peer)
    free(l.ep_cluster)
    free(l.ep_active)
    free(l.clusters)
    free(l.sched)
    free(l.xframe)
    free(l)


cdef object payload_of(char *frame, uint32_t length, object previous):
    """The payload of a frame as bytes: the previous object again when equal, so
    that its hash is computed once for the whole batch."""
    cdef Py_ssize_t size = length - FRAME_HEADER
    if previous is not None and len(<bytes>previous) == size and memcmp(<char *><bytes>previous, frame + FRAME_HEADER, size) == 0:
        return previous
    return frame[FRAME_HEADER:length]


cdef object report_peer(list peers, uint64_t conn_id, int state, Frame *frame, object previous):
    """Add a settled peer to collect()'s list: (conn id, payload), or (conn id, None)
    for a peer that sent no frame. Releases the frame; returns the payload object
    the next report may reuse."""
    cdef object payload = None
    if state == PEER_FOUND and frame != NULL:
        payload = previous = payload_of(frame.data, frame.len, previous)
    peers.append((conn_id, payload))
    release_frame(frame)
    return previous


cdef class Engine:
    """Relays TCP between socket pairs in native worker threads."""

    cdef Worker *_workers
    cdef int _nworkers
    cdef Listener *_listeners[MAX_LISTENERS]
    cdef int _nlisteners
    cdef list _threads
    cdef bint _started
    cdef bint _stopped
    cdef bint _splice
    cdef unsigned long long _next_worker

    def __cinit__(self, int workers=1, *, int pipe_size=1048576, int max_pipes=4096,
                  int buffer_size=65536, bint splice=True):
        cdef Worker *w
        cdef epoll_event ev
        cdef int i
        if workers < 1 or workers > MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, not {workers}")
        if buffer_size < 1024:
            raise ValueError(f"buffer_size must be at least 1024 bytes, not {buffer_size}")
        if pipe_size < 0 or max_pipes < 0:
            raise ValueError("pipe_size and max_pipes cannot be negative")
        self._threads = []
        self._splice = splice
        self._workers = <Worker *>calloc(workers, sizeof(Worker))
        if self._workers == NULL:
            raise MemoryError()
        self._nworkers = workers
        for i in range(workers):
            w = &self._workers[i]
            w.index = i
            w.nworkers = workers
            w.epfd = -1
            w.wakefd = -1
            pthread_mutex_init(&w.lock, NULL)
            w.listeners = self._listeners
            w.nlisteners = &self._nlisteners
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

    def __dealloc__(self):
        cdef Worker *w
        cdef int i, j
        if self._workers != NULL:
            for i in range(self._nworkers):
                w = &self._workers[i]
                if not self._stopped:
                    close_all(w)  # threads never started, or already joined
                for j in range(w.npool):
                    close(w.pool_r[j])
                    close(w.pool_w[j])
                for j in range(w.nbufs):
                    free(w.bufs[j])
                for j in range(w.nclosed):
                    release_frame(w.closed[j].peer)
                free(w.closed)
                for j in range(w.nkept):
                    release_frame(w.kept[j])
                if w.epfd >= 0:
                    close(w.epfd)
                if w.wakefd >= 0:
                    close(w.wakefd)
                pthread_mutex_destroy(&w.lock)
            free(self._workers)
        for i in range(self._nlisteners):
            free_listener(self._listeners[i])

    @property
    def workers(self):
        return self._nworkers

    @property
    def running(self):
        return self._started and not self._stopped

    @property
    def splice_enabled(self):
        return self._workers[0].use_splice

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

    def add_listener(self, int fd, routes, double connect_timeout=5.0, exchange=None):
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning the
        fd) and route each connection: `routes` is a fastmesh.routing.RouteTable, or a list
        of (ip, port) upstreams used round robin with `connect_timeout`. exchange: a
        fastmesh.exchange.ExchangeSettings, or None for no exchange."""
        cdef Listener *l
        cdef int i, j, nup, nclusters
        cdef socklen_t local_length
        cdef bytes frame = b""
        if not isinstance(routes, RouteTable):
            if connect_timeout <= 0:
                raise ValueError(f"connect_timeout must be positive, not {connect_timeout}")
            upstreams = [(str(h), int(p)) for h, p in routes]
            if not upstreams:
                raise ValueError("a listener needs at least one upstream")
            for host, port in upstreams:
                if not 0 < port < 65536:
                    raise ValueError(f"upstream port out of range: {port}")
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise ValueError(f"upstream address must be a numeric IP address, not {host!r}") from None
            routes = RouteTable.single(upstreams, connect_timeout)
        if self._nlisteners >= MAX_LISTENERS:
            raise ValueError(f"at most {MAX_LISTENERS} listeners per engine, counting those replaced by "
                             "reloads: restart to apply more changes")
        if self._stopped:
            raise RuntimeError("the engine is stopped")
        endpoints = routes.endpoints()
        schedule = routes.schedule()
        nup = len(endpoints)
        nclusters = len(routes.clusters)
        if exchange is not None:
            exchange.check(self._workers[0].buffer_size)
            frame = bytes(exchange.frame)
        l = <Listener *>calloc(1, sizeof(Listener))
        if l == NULL:
            raise MemoryError()
        l.ups = <sockaddr_storage *>calloc(nup + 1, sizeof(sockaddr_storage))
        l.uplens = <socklen_t *>calloc(nup + 1, sizeof(socklen_t))
        l.mesh_peer = <unsigned char *>calloc(nup + 1, 1)
        l.ep_cluster = <int *>calloc(nup + 1, sizeof(int))
        l.ep_active = <unsigned long long *>calloc(nup + 1, sizeof(unsigned long long))
        l.clusters = <Cluster *>calloc(nclusters + 1, sizeof(Cluster))
        l.sched = <int *>calloc(len(schedule) + 1, sizeof(int))
        l.xframe = <char *>malloc(len(frame) + 1)
        if (l.ups == NULL or l.uplens == NULL or l.mesh_peer == NULL or l.ep_cluster == NULL
                or l.ep_active == NULL or l.clusters == NULL or l.sched == NULL or l.xframe == NULL):
            free_listener(l)
            raise MemoryError()
        l.nup = nup
        l.nclusters = nclusters
        l.nsched = len(schedule)
        for i, cluster_index in enumerate(schedule):
            l.sched[i] = cluster_index
        j = 0
        for i, cluster in enumerate(routes.clusters):
            l.clusters[i].first = j
            l.clusters[i].count = len(cluster.endpoints)
            l.clusters[i].lb = LB_POLICIES.index(cluster.lb)
            l.clusters[i].max_connections = cluster.max_connections
            l.clusters[i].connect_timeout = cluster.connect_timeout
            for k, (host, port) in enumerate(cluster.endpoints):
                fill_sockaddr(&l.ups[j], &l.uplens[j], host, port)
                l.ep_cluster[j] = i
                l.mesh_peer[j] = cluster.is_mesh_peer(k)
                j += 1
        if exchange is not None:
            l.xrole = X_OUTBOUND if exchange.role == "outbound" else X_INBOUND
            memcpy(l.xframe, <char *>frame, len(frame))
            l.xframe_len = <uint32_t>len(frame)
            l.xmax_payload = exchange.max_payload
            l.xframe_timeout = exchange.frame_timeout
            l.xdetect_timeout = exchange.detect_timeout
        l.fd = fd
        set_nodelay(fd)  # accepted sockets inherit it: one setsockopt per listener, not per connection
        local_length = sizeof(sockaddr_storage)
        getsockname(fd, <sockaddr *>&l.local, &local_length)
        self._lock_all()
        l.id = self._nlisteners
        l.active = True
        self._listeners[self._nlisteners] = l
        self._nlisteners += 1
        failed = 0
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
        cdef int err
        if self._stopped:
            raise RuntimeError("the engine is stopped")
        w = &self._workers[fm_fetch_inc(&self._next_worker) % <unsigned long long>self._nworkers]
        for fd in (down_fd, up_fd):
            if fcntl(fd, F_SETFL, O_NONBLOCK | fcntl(fd, F_GETFL)) < 0:
                raise OSError(errno, f"fd {fd} is not usable")
            set_nodelay(fd)
        with nogil:
            pthread_mutex_lock(&w.lock)
        c = new_conn(w, down_fd, up_fd, -1, -1, OPEN)
        if c == NULL:
            pthread_mutex_unlock(&w.lock)
            raise MemoryError()
        w.relayed += 1
        if not register_conn(w, c):
            err = w.err
            close_with_reset(down_fd)
            close_with_reset(up_fd)
            finish(w, c, R_LOCAL_ERROR, err)
        conn_id = c.id
        pthread_mutex_unlock(&w.lock)
        return conn_id

    def collect(self):
        """Everything that changed since the previous call, in one batch:
        (opened, updated, closed, peers) as described in fastmesh/_core.pyi."""
        cdef list opened = [], updated = [], closed = [], peers = []
        cdef object last_payload = None  # peers send the same frame every time: share one bytes object
        cdef Worker *w
        cdef Conn *c
        cdef ClosedRecord *r
        cdef uint64_t d[4]
        cdef int i, k
        cdef size_t j
        cdef bint changed
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            c = w.conns
            while c != NULL:
                if not c.announced:
                    c.announced = True
                    opened.append((c.id, c.listener_id, c.upstream_index))
                changed = False
                for k in range(4):
                    d[k] = counter(c, k) - c.reported[k]
                    if d[k]:
                        changed = True
                        c.reported[k] += d[k]
                if changed:
                    updated.append((c.id, d[0], d[1], d[2], d[3]))
                if c.xreport != PEER_NONE:
                    last_payload = report_peer(peers, c.id, c.xreport, c.xpeer, last_payload)
                    c.xreport = PEER_NONE
                    c.xpeer = NULL
                c = c.next
            for j in range(w.nclosed):
                r = &w.closed[j]
                closed.append((r.id, r.listener_id, r.upstream_index, r.reason, r.err,
                               r.delta[0], r.delta[1], r.delta[2], r.delta[3]))
                if r.peer_state != PEER_NONE:
                    last_payload = report_peer(peers, r.id, r.peer_state, r.peer, last_payload)
                    r.peer = NULL
            w.nclosed = 0
            pthread_mutex_unlock(&w.lock)
        return opened, updated, closed, peers

    def connections(self):
        """Per-connection state, for diagnosis (admin /connections): one dict each."""
        cdef Worker *w
        cdef Conn *c
        cdef int i, s
        result = []
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            c = w.conns
            while c != NULL:
                entry = {"id": c.id, "worker": i, "listener_id": c.listener_id,
                         "state": {CONNECTING: "connecting", OPEN: "open"}.get(c.state, "closed")}
                for s, side in ((DOWN, "downstream"), (UP, "upstream")):
                    f = &c.flows[s]
                    entry[side] = {
                        "readable": bool(c.ends[s].readable), "writable": bool(c.ends[s].writable),
                        "hup": bool(c.ends[s].hup),
                        "eof": bool(f.src_eof), "shut": bool(f.shut), "pending": f.pending,
                        "stalled": bool(f.stalled), "bulk": bool(f.bulk), "rx": f.rx, "tx": f.tx,
                    }
                result.append(entry)
                c = c.next
            pthread_mutex_unlock(&w.lock)
        return result

    def stats(self):
        """Engine health counters, summed over the workers."""
        cdef Worker *w
        cdef Conn *c
        cdef int i
        totals = dict.fromkeys((
            "active_connections", "connections_accepted", "connections_relayed",
            "connect_failures", "connect_timeouts", "accept_errors", "accept_paused",
            "pipes_in_use", "pipes_pooled", "buffers_in_use", "splice_fallbacks",
            "loop_iterations", "resets_propagated", "records_dropped") + ROUTING_STATS + EXCHANGE_STATS, 0)
        for i in range(self._nworkers):
            w = &self._workers[i]
            with nogil:
                pthread_mutex_lock(&w.lock)
            totals["active_connections"] += w.active
            totals["connections_accepted"] += w.accepted
            totals["connections_relayed"] += w.relayed
            totals["connect_failures"] += w.connect_failures
            totals["connect_timeouts"] += w.connect_timeouts
            totals["accept_errors"] += w.accept_errors
            totals["accept_paused"] += w.accept_paused
            totals["pipes_in_use"] += w.pipes_in_use
            totals["pipes_pooled"] += w.npool
            totals["buffers_in_use"] += w.buffers_in_use
            totals["splice_fallbacks"] += w.splice_fallbacks
            totals["loop_iterations"] += w.loop_iterations
            totals["resets_propagated"] += w.resets
            totals["records_dropped"] += w.records_dropped
            totals["no_route"] += w.no_route
            totals["no_healthy_upstream"] += w.no_healthy_upstream
            totals["upstream_overflows"] += w.overflows
            totals["exchange_enabled"] += w.x_enabled
            totals["exchange_disabled"] += w.x_disabled
            totals["exchange_frames_sent"] += w.x_frames_sent
            totals["exchange_frames_received"] += w.x_frames_received
            totals["exchange_no_frame"] += w.x_no_frame
            totals["exchange_detect_timeouts"] += w.x_detect_timeouts
            totals["exchange_frames_too_large"] += w.x_too_large
            totals["exchange_frames_truncated"] += w.x_truncated
            totals["exchange_frames_timed_out"] += w.x_timed_out
            totals["exchange_frames_shared"] += w.x_shared
            c = w.conns
            while c != NULL:
                if c.xread == XR_PAYLOAD:
                    totals["exchange_partial_bytes"] += c.xcap
                c = c.next
            pthread_mutex_unlock(&w.lock)
        return totals
