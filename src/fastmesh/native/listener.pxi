# A Listener from a fastmesh.routing.RouteTable, fastmesh.exchange.ExchangeSettings
# and fastmesh.tls.ListenerTls (with the GIL: it reads Python objects), flattened
# for the workers: every cluster's endpoints in one array, the weighted schedule
# as cluster indexes, each endpoint's TLS and last session.

CLIENT_TLS_MODES = {"DISABLE": CT_PLAIN, "ISTIO_MUTUAL": CT_ISTIO, "SIMPLE": CT_SIMPLE, "MUTUAL": CT_MUTUAL}
SERVER_TLS_MODES = {"DISABLE": MTLS_DISABLE, "PERMISSIVE": MTLS_PERMISSIVE, "STRICT": MTLS_STRICT}


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
    cdef int i, j
    if l.clusters != NULL:
        for i in range(l.nclusters):
            if l.clusters[i].tls_ctx != NULL:
                SSL_CTX_free(l.clusters[i].tls_ctx)
            free(l.clusters[i].sni)
            for j in range(l.clusters[i].nsans):
                free(l.clusters[i].sans[j])
            free(l.clusters[i].sans)
    if l.ep_session != NULL:
        for i in range(l.nup):
            if l.ep_session[i] != NULL:
                SSL_SESSION_free(l.ep_session[i])
        pthread_mutex_destroy(&l.session_lock)
    free(l.ep_session)
    free(l.ep_tls)
    free(l.ups)
    free(l.uplens)
    free(l.mesh_peer)
    free(l.ep_active)
    free(l.clusters)
    free(l.sched)
    free(l.dests)
    free(l.xframe)
    free(l)


cdef char *c_string(object text) except? NULL:
    cdef bytes raw = str(text).encode()
    cdef char *copy = strdup(raw)
    if copy == NULL:
        raise MemoryError()
    return copy


cdef int cluster_tls(Cluster *cl, object tls) except -1:
    # A cluster's DestinationRule TLS: its mode, its own context for SIMPLE and MUTUAL,
    # its SNI and the SANs the server may have.
    cdef int i
    if tls is None:
        return 0
    cl.tls = CLIENT_TLS_MODES[tls.mode]
    if cl.tls == CT_SIMPLE or cl.tls == CT_MUTUAL:
        cl.tls_ctx = new_context(False, tls.client_certificate if cl.tls == CT_MUTUAL else "", tls.private_key,
                                 tls.ca_certificates, False)
    if tls.sni:
        cl.sni = c_string(tls.sni)
    if tls.subject_alt_names:
        cl.sans = <char **>calloc(len(tls.subject_alt_names), sizeof(char *))
        if cl.sans == NULL:
            raise MemoryError()
        for i, san in enumerate(tls.subject_alt_names):
            cl.sans[i] = c_string(san)
            cl.nsans = i + 1
    return 0


cdef Listener *build_listener(int fd, object routes, object exchange, object tls) except NULL:
    cdef Listener *l
    cdef int i, j
    cdef socklen_t local_length
    cdef bytes frame = bytes(exchange.frame) if exchange is not None else b""
    schedule = routes.schedule()
    destination_schedules = [routes.schedule(d.routes) for d in routes.destinations]
    nup = sum(len(cluster.endpoints) for cluster in routes.clusters)
    l = <Listener *>calloc(1, sizeof(Listener))
    if l == NULL:
        raise MemoryError()
    l.ups = <sockaddr_storage *>calloc(nup + 1, sizeof(sockaddr_storage))
    l.uplens = <socklen_t *>calloc(nup + 1, sizeof(socklen_t))
    l.mesh_peer = <unsigned char *>calloc(nup + 1, 1)
    l.ep_active = <unsigned long long *>calloc(nup + 1, sizeof(unsigned long long))
    l.clusters = <Cluster *>calloc(len(routes.clusters) + 1, sizeof(Cluster))
    l.sched = <int *>calloc(len(schedule) + sum(map(len, destination_schedules)) + 1, sizeof(int))
    l.dests = <Destination *>calloc(len(destination_schedules) + 1, sizeof(Destination))
    l.xframe = <char *>malloc(len(frame) + 1)
    l.ep_tls = <unsigned char *>calloc(nup + 1, 1)
    l.ep_session = <SSL_SESSION **>calloc(nup + 1, sizeof(SSL_SESSION *))
    if (l.ups == NULL or l.uplens == NULL or l.mesh_peer == NULL or l.ep_tls == NULL or l.ep_session == NULL
            or l.ep_active == NULL or l.clusters == NULL or l.sched == NULL or l.dests == NULL
            or l.xframe == NULL):
        free_listener(l)
        raise MemoryError()
    pthread_mutex_init(&l.session_lock, NULL)
    try:
        l.nup = nup
        l.nclusters = len(routes.clusters)
        l.nsched = len(schedule)
        for i, cluster_index in enumerate(schedule):
            l.sched[i] = cluster_index
        j = len(schedule)
        for i, destination in enumerate(routes.destinations):
            fill_sockaddr(&l.dests[i].address, &local_length, destination.address[0], destination.address[1])
            l.dests[i].first = j
            l.dests[i].count = len(destination_schedules[i])
            for cluster_index in destination_schedules[i]:
                l.sched[j] = cluster_index
                j += 1
            l.ndest = i + 1
        j = 0
        for i, cluster in enumerate(routes.clusters):
            l.clusters[i].first = j
            l.clusters[i].count = len(cluster.endpoints)
            l.clusters[i].lb = LB_POLICIES.index(cluster.lb)
            l.clusters[i].max_connections = cluster.max_connections
            l.clusters[i].connect_timeout = cluster.connect_timeout
            l.clusters[i].idle_timeout = cluster.idle_timeout
            cluster_tls(&l.clusters[i], cluster.tls)
            for k, (host, port) in enumerate(cluster.endpoints):
                fill_sockaddr(&l.ups[j], &l.uplens[j], host, port)
                l.mesh_peer[j] = cluster.is_mesh_peer(k)
                # No DestinationRule TLS: auto mTLS, to the endpoints that run a sidecar.
                l.ep_tls[j] = (l.clusters[i].tls if cluster.tls is not None
                               else CT_AUTO if l.mesh_peer[j] else CT_PLAIN)
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
        l.xplaintext = exchange.plaintext
    if tls is not None:
        l.mtls = SERVER_TLS_MODES[tls.mode]
        for i, mode in enumerate(tls.destination_modes[:l.ndest]):
            l.dests[i].mtls = SERVER_TLS_MODES[mode]
            l.mtls_by_port = True
        l.handshake_timeout = tls.handshake_timeout
        l.detect_timeout = tls.detect_timeout
    else:
        l.handshake_timeout = DEFAULTS.tls_handshake_timeout
        l.detect_timeout = DEFAULTS.exchange_detect_timeout
    l.fd = fd
    set_nodelay(fd)  # accepted sockets inherit it: one setsockopt per listener, not per connection
    local_length = sizeof(sockaddr_storage)
    getsockname(fd, <sockaddr *>&l.local, &local_length)
    return l
