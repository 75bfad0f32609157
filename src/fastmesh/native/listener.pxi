# A Listener from a fastmesh.routing.RouteTable and fastmesh.exchange.ExchangeSettings
# (with the GIL: it reads Python objects), flattened for the workers: every
# cluster's endpoints in one array, the weighted schedule as cluster indexes.


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
    free(l.ep_active)
    free(l.clusters)
    free(l.sched)
    free(l.xframe)
    free(l)


cdef Listener *build_listener(int fd, object routes, object exchange) except NULL:
    cdef Listener *l
    cdef int i, j
    cdef socklen_t local_length
    cdef bytes frame = bytes(exchange.frame) if exchange is not None else b""
    schedule = routes.schedule()
    nup = sum(len(cluster.endpoints) for cluster in routes.clusters)
    l = <Listener *>calloc(1, sizeof(Listener))
    if l == NULL:
        raise MemoryError()
    l.ups = <sockaddr_storage *>calloc(nup + 1, sizeof(sockaddr_storage))
    l.uplens = <socklen_t *>calloc(nup + 1, sizeof(socklen_t))
    l.mesh_peer = <unsigned char *>calloc(nup + 1, 1)
    l.ep_active = <unsigned long long *>calloc(nup + 1, sizeof(unsigned long long))
    l.clusters = <Cluster *>calloc(len(routes.clusters) + 1, sizeof(Cluster))
    l.sched = <int *>calloc(len(schedule) + 1, sizeof(int))
    l.xframe = <char *>malloc(len(frame) + 1)
    if (l.ups == NULL or l.uplens == NULL or l.mesh_peer == NULL
            or l.ep_active == NULL or l.clusters == NULL or l.sched == NULL or l.xframe == NULL):
        free_listener(l)
        raise MemoryError()
    try:
        l.nup = nup
        l.nclusters = len(routes.clusters)
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
                l.mesh_peer[j] = cluster.is_mesh_peer(k)
                j += 1
    except BaseException:
        free_listener(l)
        raise
    if exchange is not None:
        l.xrole = X_OUTBOUND if exchange.role == OUTBOUND else X_INBOUND
        memcpy(l.xframe, <char *>frame, len(frame))
        l.xframe_len = <uint32_t>len(frame)
        l.xmax_payload = exchange.max_payload
        l.xframe_timeout = exchange.frame_timeout
        l.xdetect_timeout = exchange.detect_timeout
    l.fd = fd
    set_nodelay(fd)  # accepted sockets inherit it: one setsockopt per listener, not per connection
    local_length = sizeof(sockaddr_storage)
    getsockname(fd, <sockaddr *>&l.local, &local_length)
    return l
