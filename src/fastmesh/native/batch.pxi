# A loop turn's system calls gathered into a worker's io_uring (Engine(io_uring=True)):
# the plain receives of run_ready's reading pass go in one submission, then the plain sends
# that open its writing pass in another. Each request completes inside its submission
# (native/ring.h), and its result goes through the same steps as the call it stands for
# (took() after a read, gave() after a write), so the state machine is the one of the plain
# calls. TLS ends, the exchange and pipes keep their own calls.


cdef inline unsigned long long ring_tag(Conn *c, int s) noexcept nogil:
    return <unsigned long long><uintptr_t>c | <unsigned long long>s


cdef inline bint plain_read_next(Conn *c, int s) noexcept nogil:
    # fill() would recv into the empty buffer of side s's direction (taking one if need be).
    cdef Flow *f = &c.flows[s]
    cdef End *src = &c.ends[s]
    if not src.readable or f.src_eof or f.stalled or src.ssl != NULL:
        return False
    if c.x.read != XR_IDLE and s == c.x.side:
        return False  # the peer's exchange frame is read first
    if c.x.hold and s != c.x.side:
        return False
    return f.pipe_r < 0 and not f.bulk and f.pending == 0


cdef inline bint plain_send_next(Conn *c, int s) noexcept nogil:
    # drain() would send from the buffer of side s's direction.
    cdef Flow *f = &c.flows[s]
    cdef End *dst = &c.ends[1 - s]
    return f.pending > 0 and dst.writable and f.pipe_r < 0 and f.buf != NULL and dst.ssl == NULL


cdef void settle_batch(Worker *w, bint reads) noexcept nogil:
    # Make the queued calls and give each result to its connection. All of them have completed
    # when fm_ring_run() returns, so a connection ended here takes no buffer a request still names.
    cdef fm_ring *ring = w.ring
    cdef unsigned long long refused = ring.fallbacks
    cdef unsigned n = fm_ring_run(ring)
    cdef unsigned i
    cdef Conn *c
    cdef int s
    cdef ssize_t res
    if n == 0:
        return
    if ring.fallbacks != refused:
        w.stats[S_IO_URING_REFUSED] += 1
    else:
        w.stats[S_IO_URING_SUBMISSIONS] += 1
        w.stats[S_IO_URING_REQUESTS] += n
    for i in range(n):
        c = <Conn *><uintptr_t>(ring.data[i] & ~(<unsigned long long>1))
        s = <int>(ring.data[i] & 1)
        if c.state != OPEN:
            continue  # ended by its other side's result
        res = ring.res[i]
        if res < 0:
            set_errno(ring.err[i])
        if reads:
            read_into_empty(w, &c.flows[s], &c.ends[s], res)
            if took(w, c, s, res) == FAILED:
                abort_conn(w, c, s, w.err)
        elif gave(w, c, s, res) == FAILED:
            abort_conn(w, c, 1 - s, w.err)


cdef void read_ready_batched(Worker *w) noexcept nogil:
    cdef Conn *c
    cdef Flow *f
    cdef int s
    # The reads that are not plain receives first: they may end a connection, which must
    # not happen while a queued request names one of its buffers.
    fill_ready(w, True)
    c = w.ready
    while c != NULL:
        for s in range(2):
            if fm_ring_full(w.ring):
                settle_batch(w, True)
            if c.state != OPEN or securing(c) or not plain_read_next(c, s):
                continue
            f = &c.flows[s]
            if f.buf == NULL and not take_buf(w, f):
                settle_batch(w, True)  # nothing queued names this connection any more
                if c.state == OPEN and fill(w, c, s) == FAILED:  # says ENOMEM
                    abort_conn(w, c, s, w.err)
                continue
            f.buf_off = 0
            fm_ring_queue(w.ring, FM_OP_RECV, c.ends[s].fd, f.buf, <size_t>w.buffer_size, ring_tag(c, s))
        c = c.ready_next
    settle_batch(w, True)


cdef void send_ready_batched(Worker *w) noexcept nogil:
    # The first send of each direction with bytes waiting; drive() does the rest as ever.
    cdef Conn *c = w.ready
    cdef Flow *f
    cdef int s
    while c != NULL:
        for s in range(2):
            if fm_ring_full(w.ring):
                settle_batch(w, False)
            if c.state == OPEN and not securing(c) and plain_send_next(c, s):
                f = &c.flows[s]
                fm_ring_queue(w.ring, FM_OP_SEND, c.ends[1 - s].fd, f.buf + f.buf_off, f.pending, ring_tag(c, s))
        c = c.ready_next
    settle_batch(w, False)


cdef inline bint batching(Worker *w) noexcept nogil:
    return w.ring != NULL and not w.ring.broken
