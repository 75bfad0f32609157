# Deadlines: a list per kind of the connections that have one armed, and the
# paused listeners, looked at once per loop turn.


cdef void arm(Worker *w, Conn *c, int kind, double deadline) noexcept nogil:
    # Set (or move) a connection's deadline of that kind.
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
                elif kind == T_TLS:
                    tls_timer(w, c)
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


cdef void sweep_idle(Worker *w) noexcept nogil:
    # Every IDLE_SWEEP_MS: close the relaying connections whose cluster's idle timeout has
    # passed since their last event, and let the pools shrink to what the load still needs.
    cdef Conn *c = w.conns
    cdef Conn *nxt
    cdef double timeout
    w.next_idle_sweep = w.now + IDLE_SWEEP_MS / 1000.0
    trim_pools(w)
    while c != NULL:
        nxt = c.next
        if c.state == OPEN and c.listener != NULL and c.cluster != NONE:
            timeout = c.listener.clusters[c.cluster].idle_timeout
            if timeout > 0 and w.now - c.active_at >= timeout:
                close_idle(w, c)
        c = nxt


cdef int next_timeout_ms(Worker *w) noexcept nogil:
    cdef double soonest = -1, now, t
    cdef Conn *c
    cdef int i, kind
    if w.later != NULL:
        return 0
    if w.conns != NULL or pools_to_trim(w):
        soonest = w.next_idle_sweep
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
