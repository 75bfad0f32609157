# What Python reads (with the GIL, under the worker's lock): the records of one
# worker's connections for collect(), and their state for connections().
# Records are the named tuples of fastmesh.records, built without a Python call each.


cdef inline object index_or_none(int index):
    return None if index == NONE else index


cdef inline object endpoint_in_cluster(Listener **listeners, int listener_id, int cluster, int endpoint):
    # The records name an endpoint by its index within its cluster.
    if endpoint == NONE:
        return None
    return endpoint - listeners[listener_id].clusters[cluster].first


cdef object payload_of(char *frame, uint32_t length, object previous):
    # The payload of a frame as bytes: the previous object again when equal, so
    # that its hash is computed once for the whole batch.
    cdef Py_ssize_t size = length - FRAME_HEADER
    if previous is not None and len(<bytes>previous) == size and memcmp(<char *><bytes>previous, frame + FRAME_HEADER, size) == 0:
        return previous
    return frame[FRAME_HEADER:length]


cdef object report_peer(list peers, uint64_t conn_id, int state, Frame *frame, char *principal, object previous):
    # Add a settled peer to collect()'s list: its frame's payload (None for a peer that
    # sent no frame) and its verified identity (None without TLS). Releases the frame
    # and the principal; returns the payload object the next report may reuse.
    cdef object payload = None
    cdef object identity = None
    if state == PEER_FOUND and frame != NULL:
        payload = previous = payload_of(frame.data, frame.len, previous)
    if principal != NULL:
        identity = principal.decode("utf-8", "replace")
        free(principal)
    peers.append(tuple_new(Peer, (conn_id, payload, identity)))
    release_frame(frame)
    return previous


cdef object collect_worker(Worker *w, Listener **listeners, list opened, list updated, list closed,
                           list peers, object last_payload):
    cdef Conn *c = w.conns
    cdef ClosedRecord *r
    cdef uint64_t d[4]
    cdef size_t j
    cdef int k
    cdef bint changed
    while c != NULL:
        if not c.announced:
            c.announced = True
            opened.append(tuple_new(Opened, (
                c.id, index_or_none(c.listener_id), index_or_none(c.cluster),
                endpoint_in_cluster(listeners, c.listener_id, c.cluster, c.endpoint), bool(c.identifies))))
        changed = False
        for k in range(4):
            d[k] = counter(c, k) - c.reported[k]
            if d[k]:
                changed = True
                c.reported[k] += d[k]
        if changed:
            updated.append(tuple_new(Updated, (c.id, d[0], d[1], d[2], d[3])))
        if c.x.report != PEER_NONE:
            last_payload = report_peer(peers, c.id, c.x.report, c.x.peer, c.principal, last_payload)
            c.x.report = PEER_NONE
            c.x.peer = NULL
            c.principal = NULL
        c = c.next
    for j in range(w.nclosed):
        r = &w.closed[j]
        closed.append(tuple_new(Closed, (
            r.id, index_or_none(r.listener_id), index_or_none(r.cluster),
            endpoint_in_cluster(listeners, r.listener_id, r.cluster, r.endpoint), r.reason, r.err,
            r.delta[0], r.delta[1], r.delta[2], r.delta[3])))
        if r.peer_state != PEER_NONE:
            last_payload = report_peer(peers, r.id, r.peer_state, r.peer, r.principal, last_payload)
            r.peer = NULL
            r.principal = NULL
    w.nclosed = 0
    return last_payload


cdef object flow_info(Flow *f):
    return tuple_new(FlowInfo, (bool(f.src_eof), bool(f.shut), f.pending, f.rx, f.tx))


cdef object connections_of(Worker *w, Listener **listeners, list found):
    cdef Conn *c = w.conns
    while c != NULL:
        found.append(tuple_new(ConnectionInfo, (
            c.id, w.index, index_or_none(c.listener_id), index_or_none(c.cluster),
            endpoint_in_cluster(listeners, c.listener_id, c.cluster, c.endpoint),
            "securing" if c.state == SECURING or securing(c) else "connecting" if c.state == CONNECTING else "open",
            flow_info(&c.flows[DOWN]), flow_info(&c.flows[UP]))))
        c = c.next
