# A worker's loop: wait for events, handle the batch under the worker's lock
# (never held while waiting), run the connections made ready, then the timers.


cdef void close_all(Worker *w) noexcept nogil:
    while w.conns != NULL:
        reset_both(w, w.conns, R_SHUTDOWN, 0)
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
        w.now = now_s()
        w.stats[S_LOOP_ITERATIONS] += 1
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
        if w.timed[T_CONNECT] != NULL or w.timed[T_EXCHANGE] != NULL or w.timed[T_TLS] != NULL or w.npaused:
            run_timers(w)
        if (w.conns != NULL or pools_to_trim(w)) and w.now >= w.next_idle_sweep:
            sweep_idle(w)
        bury(w)
        timeout = next_timeout_ms(w)
        pthread_mutex_unlock(&w.lock)
    close_all(w)
    pthread_mutex_unlock(&w.lock)
