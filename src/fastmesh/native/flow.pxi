# The data path: each direction of a connection fills from its source and
# drains to its destination, through a pipe (splice, for bulk transfers) or a
# buffer (recv/send, for small messages), until the kernel says EAGAIN.
# Readiness is remembered in End flags, set by edge-triggered events.


cdef inline ssize_t read_end(End *src, char *into, size_t room) noexcept nogil:
    # Bytes from a side into a buffer, recv-like: plaintext reads the socket, a TLS
    # end decrypts through OpenSSL (and never splices).
    if src.ssl != NULL:
        return tls_read_records(src, into, room)
    return recv(src.fd, into, room, MSG_DONTWAIT)


cdef inline ssize_t peek_end(End *src, char *into, size_t room) noexcept nogil:
    if src.ssl != NULL:
        return tls_read(src, into, room, True)
    return recv(src.fd, into, room, MSG_PEEK | MSG_DONTWAIT)


cdef inline ssize_t write_end(End *dst, const char *data, size_t n) noexcept nogil:
    # Bytes from a buffer to a side, send-like: plaintext sends them, a TLS end encrypts them.
    if dst.ssl != NULL:
        return tls_write(dst, data, n)
    return send(dst.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT)


cdef inline bint end_stream(End *dst, bint both_ended) noexcept nogil:
    # Pass an end of stream on: close_notify first on a TLS end. When the other
    # direction has ended too, close() follows at once and sends the FIN itself.
    # False when it must wait until the socket is writable.
    if dst.ssl != NULL and tls_close_notify(dst) < 0:
        dst.writable = False
        return False
    if not both_ended:
        shutdown(dst.fd, SHUT_WR)
    return True


cdef int gave(Worker *w, Conn *c, int s, ssize_t n) noexcept nogil:
    # What a write of n bytes of side s's direction (or -1, errno set) does to it.
    cdef Flow *f = &c.flows[s]
    cdef uint32_t hidden
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
        return MOVED
    if n < 0 and errno == EAGAIN:
        c.ends[1 - s].writable = False
    elif n < 0 and errno != EINTR:
        w.err = errno
        return FAILED
    return IDLE


cdef int drain(Worker *w, Conn *c, int s) noexcept nogil:
    # Give what is in flight from side s to the other side; once nothing is in
    # flight, return the pipe or buffer and pass an end of stream on.
    cdef Flow *f = &c.flows[s]
    cdef End *dst = &c.ends[1 - s]
    cdef ssize_t n
    cdef int result = IDLE
    if f.pending > 0 and dst.writable:
        if f.pipe_r >= 0:
            n = splice(f.pipe_r, NULL, dst.fd, NULL, f.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        else:
            n = write_end(dst, f.buf + f.buf_off, f.pending)
        result = gave(w, c, s, n)
        if result == FAILED:
            return FAILED
    if f.pending == 0:
        if f.pipe_r >= 0:
            give_pipe(w, f)
        elif f.buf != NULL:
            give_buf(w, f)
        if f.src_eof and end_stream(dst, c.flows[1 - s].shut):
            f.shut = True
    return result


cdef int fill(Worker *w, Conn *c, int s) noexcept nogil:
    # Read from side s into the pipe or buffer of that direction.
    cdef Flow *f = &c.flows[s]
    cdef End *src = &c.ends[s]
    cdef ssize_t n
    cdef size_t room
    cdef int settled
    if not src.readable or f.src_eof or f.stalled:
        return IDLE
    if c.x.read != XR_IDLE and s == c.x.side:
        settled = read_peer_frame(w, c, s)
        if settled != MOVED:
            return settled
    elif c.x.hold and s != c.x.side:
        return IDLE  # inbound: the app's first bytes wait for the client's
    if f.pipe_r < 0 and f.buf == NULL:
        # Like HAProxy's splice-auto: small messages are cheaper to copy (no
        # pipe, no trailing EAGAIN call); bulk transfers are spliced.
        if not (f.bulk and take_pipe(w, f)):
            if f.bulk:
                w.stats[S_SPLICE_FALLBACKS] += 1
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
        n = read_end(src, f.buf + f.pending, room)
        if n > 0 and <size_t>n < room and not src.hup and src.ssl == NULL:
            src.readable = False
    elif f.pending == 0:
        f.buf_off = 0
        n = read_end(src, f.buf, <size_t>w.buffer_size)
        read_into_empty(w, f, src, n)
    else:
        return IDLE  # the buffer is refilled only once it is empty
    return took(w, c, s, n)


cdef inline void read_into_empty(Worker *w, Flow *f, End *src, ssize_t n) noexcept nogil:
    # What a read into the empty buffer says of the source beyond its bytes.
    if n == w.buffer_size:
        f.bulk = w.use_splice and not f.copy_only
    elif n > 0 and not src.hup and src.ssl == NULL:
        # recv returns all that is queued, up to the size asked for: a short
        # read means the socket is drained, and new bytes will raise a new edge.
        # Not so once the FIN is in: a short read may have stopped at it, and
        # the next recv returns 0 with no new edge to announce it. Nor over TLS:
        # SSL_read returns one record, and more may be queued.
        src.readable = False


cdef int took(Worker *w, Conn *c, int s, ssize_t n) noexcept nogil:
    # What a read of n bytes from side s (or -1, errno set) does to its direction.
    cdef Flow *f = &c.flows[s]
    cdef End *src = &c.ends[s]
    if n > 0:
        f.pending += <uint32_t>n
        f.rx += <uint64_t>n
        return MOVED
    if n == 0:
        f.src_eof = True
        if c.first_eof == NONE:
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
    if src.ssl != NULL and errno == ECONNRESET:
        w.stats[S_TLS_TRUNCATED] += 1  # no close_notify came: passed on as a reset, not an end
    w.err = errno
    return FAILED


cdef int pump(Worker *w, Conn *c, int s) noexcept nogil:
    # Drain and fill side s's direction until the kernel says EAGAIN or the
    # direction has had its share of this turn.
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


cdef inline bint securing(Conn *c) noexcept nogil:
    # TLS not settled yet: nothing is relayed (native/tls.pxi drives it).
    return c.tls_phase == TLS_DETECT or c.tls_phase == TLS_HANDSHAKE


cdef void drive(Worker *w, Conn *c) noexcept nogil:
    cdef int s, r
    if securing(c):
        tls_drive(w, c)
        if c.state != OPEN or securing(c):
            return
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


cdef bint connected(Worker *w, Conn *c) noexcept nogil:
    # The upstream answered: the connection opens (TLS toward it, or the exchange, starts).
    # False when that ended it.
    disarm(w, c, T_CONNECT)
    c.state = OPEN
    if c.tls_mode != CT_PLAIN:
        if not start_tls(w, c, UP):  # originate TLS toward the upstream
            tls_failed(w, c, S_TLS_ERROR_LOCAL)
            return False
    else:
        exchange_connected(w, c)
    if c.tls_phase == TLS_DETECT:
        arm(w, c, T_TLS, now_s() + c.listener.detect_timeout)  # a server-first app's greeting waits
    return True


cdef void on_conn_event(Worker *w, Conn *c, int s, uint32_t events) noexcept nogil:
    cdef End *e = &c.ends[s]
    cdef int err
    if c.state == CLOSED:
        return
    c.active_at = w.now
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        e.readable = True
    if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        e.hup = True
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        e.writable = True
    if c.state == SECURING:  # STRICT: only the downstream is registered, for its handshake
        enqueue(w, c)
        return
    if c.state == CONNECTING:
        # Downstream bytes wait in the kernel until the upstream answers, but for a
        # client's TLS, which goes on meanwhile (PERMISSIVE).
        if s == DOWN and securing(c):
            enqueue(w, c)
            return
        if s != UP or not (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)):
            return
        if events & (EPOLLERR | EPOLLHUP):  # a clean EPOLLOUT means connected: no SO_ERROR call
            err = socket_error(e.fd)
            if err != 0:
                connect_failed(w, c, R_CONNECT_FAILED, err)
                return
        if not connected(w, c):
            return
    elif events & EPOLLERR:
        err = socket_error(e.fd)
        if err != 0:
            abort_conn(w, c, s, err)
            return
    enqueue(w, c)


cdef void fill_ready(Worker *w, bint leave_plain) noexcept nogil:
    # The reading pass over the ready connections; leave_plain: not the plain receives
    # (plain_read_next), which native/batch.pxi makes through the ring.
    cdef Conn *c = w.ready
    cdef int s, r
    while c != NULL:
        if c.state == OPEN and not securing(c):
            for s in range(2):
                if leave_plain and plain_read_next(c, s):
                    continue
                r = fill(w, c, s)
                if r == FAILED:
                    abort_conn(w, c, s, w.err)
                    break
                if r == GONE:
                    break
        c = c.ready_next


cdef void run_ready(Worker *w) noexcept nogil:
    cdef Conn *c
    cdef Conn *nxt
    # Reads first, writes after, as HAProxy does: the peers our writes wake up
    # then run once we have read everything that was ready, instead of
    # preempting us in the middle of the batch.
    if batching(w):
        read_ready_batched(w)
        send_ready_batched(w)
    else:
        fill_ready(w, False)
    c = w.ready
    w.ready = NULL
    while c != NULL:
        nxt = c.ready_next
        c.queued = False
        if c.state == OPEN:
            drive(w, c)
        elif c.state != CLOSED:
            if securing(c):
                tls_drive(w, c)  # a client's TLS before, or while, the upstream connects
        elif c.state == CLOSED:
            c.grave_next = w.grave
            w.grave = c
        c = nxt
