# A connection's life in a worker: made, registered with epoll, queued to run,
# ended with a recorded reason, and freed once its batch of events is over.


cdef inline uint64_t counter(Conn *c, int i) noexcept nogil:
    # i: 0 down_rx, 1 down_tx, 2 up_rx, 3 up_tx
    if i == 0:
        return c.flows[DOWN].rx
    if i == 1:
        return c.flows[UP].tx
    if i == 2:
        return c.flows[UP].rx
    return c.flows[DOWN].tx


cdef inline uint64_t next_id(Worker *w) noexcept nogil:
    w.seq += 1
    return w.seq * MAX_WORKERS + <uint64_t>w.index


cdef ClosedRecord *record_closed(Worker *w, uint64_t conn_id, int listener_id, int cluster, int endpoint,
                                 int reason, int err) noexcept nogil:
    # The record of a connection that ended (or was turned away), byte deltas 0:
    # the caller fills them in. NULL if it could not be kept (counted).
    cdef size_t cap
    cdef ClosedRecord *grown
    cdef ClosedRecord *r
    if w.nclosed == w.closed_cap:
        cap = w.closed_cap * 2 if w.closed_cap else 256
        if cap > MAX_CLOSED_RECORDS:
            w.stats[S_RECORDS_DROPPED] += 1  # collect() has not been called for a very long time
            return NULL
        grown = <ClosedRecord *>realloc(w.closed, cap * sizeof(ClosedRecord))
        if grown == NULL:
            w.stats[S_RECORDS_DROPPED] += 1
            return NULL
        w.closed = grown
        w.closed_cap = cap
    r = &w.closed[w.nclosed]
    w.nclosed += 1
    memset(r, 0, sizeof(ClosedRecord))
    r.id = conn_id
    r.listener_id = listener_id
    r.cluster = cluster
    r.endpoint = endpoint
    r.reason = reason
    r.err = err
    return r


cdef Conn *new_conn(Worker *w, int down_fd, int up_fd, Listener *l, int cluster, int endpoint,
                    int state) noexcept nogil:
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    cdef int s
    if c == NULL:
        return NULL
    c.id = next_id(w)
    c.listener = l
    c.listener_id = l.id if l != NULL else NONE
    c.cluster = cluster
    c.endpoint = endpoint
    c.state = state
    c.active_at = w.now
    c.first_eof = NONE
    c.x.side = NONE
    c.tls_side = NONE
    c.ends[DOWN].fd = down_fd
    c.ends[UP].fd = up_fd
    for s in range(2):
        c.flows[s].pipe_r = -1
        c.flows[s].pipe_w = -1
    c.next = w.conns
    if w.conns != NULL:
        w.conns.prev = c
    w.conns = c
    w.stats[S_ACTIVE_CONNECTIONS] += 1
    return c


cdef bint register_end(Worker *w, Conn *c, int s) noexcept nogil:
    # A socket, edge-triggered, for reading and writing, once: the data path then
    # makes no epoll_ctl calls.
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.u64 = <uint64_t>(<uintptr_t>c | <uintptr_t>s)
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, c.ends[s].fd, &ev) < 0:
        w.err = errno
        return False
    return True


cdef bint register_conn(Worker *w, Conn *c) noexcept nogil:
    return register_end(w, c, DOWN) and register_end(w, c, UP)


cdef void finish(Worker *w, Conn *c, int reason, int err) noexcept nogil:
    # Record the end of a connection whose fds the caller has closed.
    cdef int s
    cdef ClosedRecord *r
    for s in range(TIMER_KINDS):
        disarm(w, c, s)
    if c.cluster != NONE:
        release_endpoint(c.listener, c.cluster, c.endpoint)
    leave_listener(c.listener)
    for s in range(2):
        release_flow(w, &c.flows[s])
    r = record_closed(w, c.id, c.listener_id, c.cluster, c.endpoint, reason, err)
    if r != NULL:
        for s in range(4):
            r.delta[s] = counter(c, s) - c.reported[s]
    exchange_finish(w, c, r)
    if r != NULL and r.peer_state != PEER_NONE:
        r.principal = c.principal  # reported with the peer
        c.principal = NULL
    tls_release(c)
    if c.prev != NULL:
        c.prev.next = c.next
    else:
        w.conns = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    c.state = CLOSED
    w.stats[S_ACTIVE_CONNECTIONS] -= 1
    w.trim_heap = True
    # Events for c may still be pending in this batch: free it after the batch.
    # A conn in the ready queue is buried when run_ready() pops it.
    if not c.queued:
        c.grave_next = w.grave
        w.grave = c


cdef void close_clean(Worker *w, Conn *c) noexcept nogil:
    close(c.ends[DOWN].fd)
    close(c.ends[UP].fd)
    finish(w, c, R_DOWNSTREAM_CLOSE if c.first_eof == DOWN else R_UPSTREAM_CLOSE, 0)


cdef void close_idle(Worker *w, Conn *c) noexcept nogil:
    # Its cluster's idleTimeout passed without a byte: a clean end both ways (close_notify
    # where TLS, best effort: an idle socket has room for it), as Envoy's tcp_proxy does.
    cdef int s
    for s in range(2):
        if c.ends[s].ssl != NULL:
            tls_close_notify(&c.ends[s])
        close(c.ends[s].fd)
    w.stats[S_IDLE_TIMEOUTS] += 1
    finish(w, c, R_IDLE_TIMEOUT, 0)


cdef void abort_conn(Worker *w, Conn *c, int failed_side, int err) noexcept nogil:
    # The failed side is gone; reset the other so its peer learns it at once.
    close_with_reset(c.ends[1 - failed_side].fd)
    close_with_reset(c.ends[failed_side].fd)
    w.stats[S_RESETS_PROPAGATED] += 1
    finish(w, c, R_DOWNSTREAM_RESET if failed_side == DOWN else R_UPSTREAM_RESET, err)


cdef void reset_both(Worker *w, Conn *c, int reason, int err) noexcept nogil:
    # This relay cannot go on with the connection: neither side may take it for a clean end.
    close_with_reset(c.ends[DOWN].fd)
    close_with_reset(c.ends[UP].fd)
    finish(w, c, reason, err)


cdef void connect_failed(Worker *w, Conn *c, int reason, int err) noexcept nogil:
    close(c.ends[UP].fd)
    close(c.ends[DOWN].fd)
    w.stats[S_CONNECT_TIMEOUTS if reason == R_CONNECT_TIMEOUT else S_CONNECT_FAILURES] += 1
    finish(w, c, reason, err)


cdef void enqueue(Worker *w, Conn *c) noexcept nogil:
    # Run c in this iteration, after the batch of events.
    if not c.queued:
        c.queued = True
        c.ready_next = w.ready
        w.ready = c


cdef void defer(Worker *w, Conn *c) noexcept nogil:
    # Run c in the next iteration: it used up its turn in this one.
    if not c.queued:
        c.queued = True
        c.ready_next = w.later
        w.later = c


cdef void bury(Worker *w) noexcept nogil:
    cdef Conn *c = w.grave
    cdef Conn *nxt
    w.grave = NULL
    while c != NULL:
        nxt = c.grave_next
        free(c)
        c = nxt
