# Accepting and routing: each worker accepts on every listener (EPOLLEXCLUSIVE
# wakes one worker per connection) and keeps what it accepts. A new connection
# takes the next route of the weighted schedule, then an endpoint of that
# route's cluster by its policy, within the cluster's connection limit.


cdef bint watch_listener(Worker *w, Listener *l) noexcept nogil:
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLEXCLUSIVE
    ev.data.u64 = <uint64_t>(<uintptr_t>l | TAG_LISTENER)
    return epoll_ctl(w.epfd, EPOLL_CTL_ADD, l.fd, &ev) == 0


cdef void pause_listener(Worker *w, Listener *l) noexcept nogil:
    # Out of fds or memory: a level-triggered listener would spin, so stop
    # watching it for a moment; the error is counted for the operator.
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
    l.paused_until[w.index] = now_s() + ACCEPT_PAUSE_MS / 1000.0
    w.npaused += 1
    w.stats[S_ACCEPT_PAUSED] += 1


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
            w.stats[S_ACCEPT_ERRORS] += 1
            if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                pause_listener(w, l)
            return
        w.stats[S_CONNECTIONS_ACCEPTED] += 1
        if admitted(w, l, fd):
            on_accepted(w, l, fd)


cdef bint admitted(Worker *w, Listener *l, int fd) noexcept nogil:
    # Within the listener's max_connections (counted open until leave_listener()), or
    # refused at once with a reset, before any upstream work: a flood past the limit
    # costs an accept and a close, and the open connections go on unharmed.
    if fm_fetch_inc(&l.open_connections) < l.max_connections or l.max_connections == 0:
        return True
    fm_fetch_dec(&l.open_connections)
    w.stats[S_LISTENER_OVERFLOWS] += 1
    close_with_reset(fd)
    return False


cdef inline void leave_listener(Listener *l) noexcept nogil:
    if l != NULL:
        fm_fetch_dec(&l.open_connections)


cdef void release_endpoint(Listener *l, int cluster, int endpoint) noexcept nogil:
    # Give back what open_upstream() counted (a PASSTHROUGH connection has no endpoint).
    if endpoint != NONE:
        fm_fetch_dec(&l.ep_active[endpoint])
    fm_fetch_dec(&l.clusters[cluster].active)


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


cdef enum:  # what is known of a connection's original destination
    ORIGINAL_UNREAD = 0
    ORIGINAL_READ = 1  # read, and it is not the listener itself
    ORIGINAL_NONE = 2  # read: there is none


cdef bint original_destination(int fd, Listener *l, sockaddr_storage *out, socklen_t *length) noexcept nogil:
    # Where the client meant to connect before iptables REDIRECT or capture --ebpf
    # (SO_ORIGINAL_DST; the IPv6 level only on an IPv6 listener), or under TPROXY the
    # socket's own local address. False when that is this listener.
    memset(out, 0, sizeof(sockaddr_storage))
    length[0] = sizeof(sockaddr_storage)
    if getsockopt(fd, IPPROTO_IP, SO_ORIGINAL_DST, out, length) == 0:
        return not same_socket_address(out, &l.local)
    length[0] = sizeof(sockaddr_storage)
    if l.local.ss_family == AF_INET6 and getsockopt(fd, IPPROTO_IPV6, SO_ORIGINAL_DST, out, length) == 0:
        return not same_socket_address(out, &l.local)
    length[0] = sizeof(sockaddr_storage)
    if getsockname(fd, <sockaddr *>out, length) != 0:
        return False
    return not same_socket_address(out, &l.local)


cdef int read_original(int fd, Listener *l, sockaddr_storage *out, socklen_t *length) noexcept nogil:
    return ORIGINAL_READ if original_destination(fd, l, out, length) else ORIGINAL_NONE


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


cdef Destination *known_destination(Listener *l, sockaddr_storage *original) noexcept nogil:
    # A virtual listener's destination for that original address, or NULL: its address and
    # port, else the any-address one at its port (a linear scan: a sidecar knows tens of
    # service addresses, and this runs once per connection).
    cdef int i
    cdef Destination *any_address = NULL
    cdef sockaddr_in *a4
    cdef sockaddr_in *d4
    cdef sockaddr_in6 *a6
    cdef sockaddr_in6 *d6
    for i in range(l.ndest):
        if l.dests[i].address.ss_family != original.ss_family:
            continue
        if original.ss_family == AF_INET:
            a4 = <sockaddr_in *>original
            d4 = <sockaddr_in *>&l.dests[i].address
            if a4.sin_port != d4.sin_port:
                continue
            if a4.sin_addr.s_addr == d4.sin_addr.s_addr:
                return &l.dests[i]
            if d4.sin_addr.s_addr == 0:
                any_address = &l.dests[i]
        else:
            a6 = <sockaddr_in6 *>original
            d6 = <sockaddr_in6 *>&l.dests[i].address
            if a6.sin6_port != d6.sin6_port:
                continue
            if memcmp(&a6.sin6_addr, &d6.sin6_addr, 16) == 0:
                return &l.dests[i]
            if memcmp(&in6addr_any, &d6.sin6_addr, 16) == 0:
                any_address = &l.dests[i]
    return any_address


cdef void to_loopback(sockaddr_storage *address) noexcept nogil:
    # The app's side of the pod: the same port on the loopback address of its family.
    if address.ss_family == AF_INET:
        (<sockaddr_in *>address).sin_addr.s_addr = htonl(INADDR_LOOPBACK)
    else:
        memcpy(&(<sockaddr_in6 *>address).sin6_addr, &in6addr_loopback, 16)


cdef int pick_route(Worker *w, Listener *l, int down_fd, int *cluster, int *endpoint, sockaddr_storage *original,
                    int known, sockaddr_storage **sa, socklen_t *salen) noexcept nogil:
    # The next route of the schedule (a virtual listener's: of the connection's original
    # destination, if it knows it), then an endpoint of its cluster (counted as in use) or
    # the client's original destination: 0, or why there is none (R_*, counted). `known`
    # (ORIGINAL_*) says whether `original` and `salen` hold the original destination already.
    cdef Cluster *cl
    cdef Destination *d = NULL
    cdef int ci
    cdef int *sched = l.sched
    cdef int nsched = l.nsched
    cdef unsigned long long *rr = &l.rr
    cluster[0] = NONE
    endpoint[0] = NONE
    if l.ndest > 0:
        if known == ORIGINAL_UNREAD:
            known = read_original(down_fd, l, original, salen)
        d = known_destination(l, original) if known == ORIGINAL_READ else NULL
        if d != NULL:
            sched, nsched, rr = l.sched + d.first, d.count, &d.rr
    if nsched == 0:
        w.stats[S_NO_ROUTE] += 1
        return R_NO_ROUTE
    ci = sched[fm_fetch_inc(rr) % <unsigned long long>nsched]
    cl = &l.clusters[ci]
    cluster[0] = ci
    if cl.count == 0 and cl.lb < LB_PASSTHROUGH:
        w.stats[S_NO_HEALTHY_UPSTREAM] += 1
        return R_NO_HEALTHY_UPSTREAM
    if fm_fetch_inc(&cl.active) >= cl.max_connections and cl.max_connections > 0:
        fm_fetch_dec(&cl.active)
        w.stats[S_UPSTREAM_OVERFLOWS] += 1
        return R_OVERFLOW
    if cl.lb >= LB_PASSTHROUGH:
        # No endpoint of the cluster's own: the connection goes where the client meant
        # (LOCAL: to the app, on the port it meant).
        if known == ORIGINAL_UNREAD:
            known = read_original(down_fd, l, original, salen)
        if known != ORIGINAL_READ:
            fm_fetch_dec(&cl.active)
            w.stats[S_NO_HEALTHY_UPSTREAM] += 1
            return R_NO_HEALTHY_UPSTREAM
        if cl.lb == LB_LOCAL_PASSTHROUGH:
            to_loopback(original)
        sa[0] = original
        return 0
    endpoint[0] = pick_endpoint(w, cl, l)
    fm_fetch_inc(&l.ep_active[endpoint[0]])
    sa[0] = &l.ups[endpoint[0]]
    salen[0] = l.uplens[endpoint[0]]
    return 0


cdef int endpoint_tls(Worker *w, Listener *l, int endpoint) noexcept nogil:
    # How a connection to that endpoint is secured: auto mTLS needs the mesh identity.
    cdef int mode = l.ep_tls[endpoint] if endpoint != NONE else CT_PLAIN
    if mode == CT_AUTO:
        return CT_ISTIO if w.identity.client != NULL else CT_PLAIN
    return mode


cdef bint start_connect(Worker *w, Conn *c, sockaddr_storage *sa, socklen_t salen) noexcept nogil:
    # The upstream connect of a connection that has its route; False when it ended.
    cdef int fd = c.ends[UP].fd
    cdef bint done = connect(fd, <sockaddr *>sa, salen) == 0
    if not done and errno != EINPROGRESS:
        connect_failed(w, c, R_CONNECT_FAILED, errno)
        return False
    # A loopback connect is in progress when connect() returns and done a moment later (the
    # peer's SYN-ACK is handled on the way out of the call): asking again (0) lets the
    # relay start at the next loop turn without waiting, as HAProxy's speculative send does,
    # instead of after a round of EPOLLOUT; the client's first bytes are likely there already.
    if not done:
        if connect(fd, <sockaddr *>sa, salen) == 0 or errno == EISCONN:
            done = True
        elif errno != EALREADY and errno != EINPROGRESS:  # refused already: the error is this call's now
            connect_failed(w, c, R_CONNECT_FAILED, errno)
            return False
    if not done:
        arm(w, c, T_CONNECT, now_s() + c.listener.clusters[c.cluster].connect_timeout)
        return True
    c.ends[UP].writable = True
    c.ends[DOWN].readable = True  # a guess: a read that finds nothing clears it
    if not connected(w, c):
        return False
    defer(w, c)  # not enqueue(): a STRICT connection gets here from inside run_ready()
    return True


cdef void refuse(Worker *w, Listener *l, int down_fd, int cluster, int reason) noexcept nogil:
    # No upstream connection for this client (NR, UH, UO): close it, record why.
    close(down_fd)
    leave_listener(l)
    record_closed(w, next_id(w), l.id, cluster, NONE, reason, 0)


cdef void local_error(Worker *w, Listener *l, int down_fd, int cluster, int endpoint, int err) noexcept nogil:
    # This relay cannot serve the client (no socket, no memory): a reset, so that
    # it does not look like a clean end.
    release_endpoint(l, cluster, endpoint)
    close_with_reset(down_fd)
    leave_listener(l)
    record_closed(w, next_id(w), l.id, cluster, endpoint, R_LOCAL_ERROR, err)


cdef int client_mtls(Listener *l, sockaddr_storage *original, int known) noexcept nogil:
    # What the client is held to: its listener's mode, or a virtual inbound listener's for
    # the app port it meant (each port has its PeerAuthentication).
    cdef Destination *d
    if not l.mtls_by_port or known != ORIGINAL_READ:
        return l.mtls
    d = known_destination(l, original)
    return d.mtls if d != NULL else l.mtls


cdef void on_accepted(Worker *w, Listener *l, int down_fd) noexcept nogil:
    cdef Conn *c
    cdef sockaddr_storage original
    cdef socklen_t length = 0
    cdef int known = ORIGINAL_UNREAD
    cdef int mtls
    if l.ndest > 0:  # a virtual listener: the original destination, read once, picks the mode and the route
        known = read_original(down_fd, l, &original, &length)
    mtls = client_mtls(l, &original, known)
    if mtls != MTLS_STRICT:
        open_upstream(w, l, down_fd, mtls, &original, length, known)
        return
    # STRICT: the client's certificate first; the app sees a connection only once it
    # is verified (connect_secured), so an unauthenticated client never reaches it.
    c = new_conn(w, down_fd, -1, l, NONE, NONE, SECURING)
    if c == NULL:
        close_with_reset(down_fd)
        leave_listener(l)
        record_closed(w, next_id(w), l.id, NONE, NONE, R_LOCAL_ERROR, ENOMEM)
        return
    c.mtls = MTLS_STRICT
    c.identifies = True
    c.tls_side = DOWN
    c.tls_phase = TLS_DETECT
    if not register_end(w, c, DOWN):
        reset_both(w, c, R_LOCAL_ERROR, w.err)
        return
    arm(w, c, T_TLS, now_s() + l.handshake_timeout)


cdef void open_upstream(Worker *w, Listener *l, int down_fd, int mtls, sockaddr_storage *original,
                        socklen_t length, int known) noexcept nogil:
    cdef int ci, idx, up_fd, reason
    cdef sockaddr_storage *sa
    cdef socklen_t salen = length
    cdef Conn *c
    reason = pick_route(w, l, down_fd, &ci, &idx, original, known, &sa, &salen)
    if reason:
        refuse(w, l, down_fd, ci, reason)
        return
    up_fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if up_fd < 0:
        local_error(w, l, down_fd, ci, idx, errno)
        return
    set_nodelay(up_fd)
    c = new_conn(w, down_fd, up_fd, l, ci, idx, CONNECTING)
    if c == NULL:
        close(up_fd)
        local_error(w, l, down_fd, ci, idx, ENOMEM)
        return
    c.tls_mode = endpoint_tls(w, l, idx)
    c.mtls = mtls
    if mtls == MTLS_PERMISSIVE:
        c.identifies = True
        c.tls_side = DOWN
        c.tls_phase = TLS_DETECT  # the client's first byte says which (native/tls.pxi)
    elif c.tls_mode != CT_PLAIN:
        c.identifies = True  # the server's certificate says who it is
    else:
        exchange_gate(w, l, c)
    if not register_conn(w, c):
        reset_both(w, c, R_LOCAL_ERROR, w.err)
        return
    start_connect(w, c, sa, salen)


cdef void connect_secured(Worker *w, Conn *c) noexcept nogil:
    # STRICT, the client verified: now route and connect to the app.
    cdef Listener *l = c.listener
    cdef int reason
    cdef sockaddr_storage original
    cdef sockaddr_storage *sa
    cdef socklen_t salen
    reason = pick_route(w, l, c.ends[DOWN].fd, &c.cluster, &c.endpoint, &original, ORIGINAL_UNREAD, &sa, &salen)
    if reason:
        if c.cluster != NONE:
            fm_fetch_inc(&l.clusters[c.cluster].active)  # what finish() gives back
        reset_both(w, c, reason, 0)
        return
    c.ends[UP].fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if c.ends[UP].fd < 0:
        reset_both(w, c, R_LOCAL_ERROR, errno)
        return
    set_nodelay(c.ends[UP].fd)
    c.state = CONNECTING
    if not register_end(w, c, UP):
        reset_both(w, c, R_LOCAL_ERROR, w.err)
        return
    start_connect(w, c, sa, salen)
