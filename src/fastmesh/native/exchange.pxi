# Istio's peer metadata exchange (istio-peer-exchange) on the data path: our
# frame written ahead of the first bytes toward the peer, and the peer's frame
# read off the front of its stream before anything is counted or forwarded. The
# header is peeked first and exactly the frame's bytes are read, so application
# bytes never pass through here. The payload goes to Python with the next batch.


cdef void exchange_begin(Worker *w, Listener *l, Conn *c) noexcept nogil:
    w.stats[S_EXCHANGE_ENABLED] += 1
    c.identifies = True
    c.x.read = XR_HEADER
    c.x.can_send = True
    if l.xrole == X_OUTBOUND:
        c.x.side = UP           # the frame leads toward the peer, once connected
        if c.state == OPEN:
            send_local_frame(w, c)
    else:
        c.x.side = DOWN
        c.x.hold = True         # a server-first app waits for the client's first bytes, briefly
        if c.state == OPEN:
            arm(w, c, T_EXCHANGE, now_s() + l.xdetect_timeout)


cdef void exchange_gate(Worker *w, Listener *l, Conn *c) noexcept nogil:
    # Whether a plaintext connection exchanges metadata, decided once as it opens:
    # fastmesh's own variant, only where the listener asks for it, by the plaintext
    # rules (outbound to mesh-peer endpoints; inbound, any client that sends a frame).
    if l.xrole == X_NONE or not l.xplaintext:
        return
    if l.xrole == X_OUTBOUND and (c.endpoint == NONE or not l.mesh_peer[c.endpoint]):
        w.stats[S_EXCHANGE_DISABLED] += 1
        return
    exchange_begin(w, l, c)


cdef void exchange_after_tls(Worker *w, Listener *l, Conn *c, bint alpn_found) noexcept nogil:
    # Over TLS the exchange runs when ALPN negotiated istio-peer-exchange, as Istio's
    # filter does (alpn_protocol_found); else the peer is known by its certificate.
    if l.xrole != X_NONE and alpn_found:
        exchange_begin(w, l, c)
        return
    if l.xrole != X_NONE:
        w.stats[S_EXCHANGE_DISABLED] += 1
    c.x.report = PEER_NOT_FOUND


cdef void exchange_after_plaintext_detect(Worker *w, Listener *l, Conn *c, bint spoke) noexcept nogil:
    # PERMISSIVE, a plaintext client: the plaintext rules, or nobody to know. A client
    # that has not spoken by the detect timeout has had its wait: the app's bytes go.
    if l.xrole != X_NONE and l.xplaintext:
        exchange_begin(w, l, c)
        if not spoke:
            disarm(w, c, T_EXCHANGE)
            w.stats[S_EXCHANGE_DETECT_TIMEOUTS] += 1
            c.x.hold = False
            c.x.can_send = False
        return
    if l.xrole != X_NONE:
        w.stats[S_EXCHANGE_DISABLED] += 1
    c.x.report = PEER_NOT_FOUND


cdef void exchange_connected(Worker *w, Conn *c) noexcept nogil:
    # The upstream connect completed: outbound, our frame leads, before any app
    # byte; inbound, the app's first bytes wait a moment for the client's.
    if c.x.can_send and c.x.side == UP:
        send_local_frame(w, c)
    elif c.x.hold:
        arm(w, c, T_EXCHANGE, now_s() + c.listener.xdetect_timeout)


cdef void send_local_frame(Worker *w, Conn *c) noexcept nogil:
    # Put our frame at the head of the direction toward the peer, which has
    # carried nothing yet. Its bytes are not counted as relayed.
    cdef Listener *l = c.listener
    cdef Flow *f = &c.flows[1 - c.x.side]
    c.x.can_send = False
    if f.pending != 0 or f.pipe_r >= 0 or f.buf != NULL or not take_buf(w, f):
        return  # no memory for it: the peer will not learn who we are, nothing else is lost
    memcpy(f.buf, l.xframe, l.xframe_len)
    f.pending = l.xframe_len
    f.unseen = l.xframe_len
    w.stats[S_EXCHANGE_FRAMES_SENT] += 1


cdef void exchange_settled(Worker *w, Conn *c, int peer_state) noexcept nogil:
    # The peer's first bytes are known to be a frame (now read) or not a frame.
    c.x.read = XR_IDLE
    c.x.report = peer_state
    disarm(w, c, T_EXCHANGE)
    if c.x.hold:
        c.x.hold = False
        # Inbound answers only a peer that spoke the protocol.
        if peer_state == PEER_FOUND and c.x.can_send:
            send_local_frame(w, c)
    c.x.can_send = False


cdef int exchange_failed(Worker *w, Conn *c, int s) noexcept nogil:
    # A frame that cannot be trusted: what follows it cannot be told apart from
    # it, so the connection is reset rather than passing on bytes of unknown meaning.
    reset_both(w, c, R_DOWNSTREAM_PROTOCOL_ERROR if s == DOWN else R_UPSTREAM_PROTOCOL_ERROR, EPROTO)
    return GONE


cdef void drop_partial_frame(Worker *w, Conn *c) noexcept nogil:
    w.stats[S_EXCHANGE_PARTIAL_BYTES] -= c.x.cap
    free(c.x.buf)
    c.x.buf = NULL
    c.x.cap = 0


cdef void exchange_finish(Worker *w, Conn *c, ClosedRecord *r) noexcept nogil:
    # The connection ended: a peer learnt since the last collect() goes with its
    # record (r, when there is one), and what the exchange held is freed.
    if r != NULL and c.x.report != PEER_NONE:
        r.peer_state = c.x.report
        if c.x.report == PEER_FOUND:
            r.peer = c.x.peer
            c.x.peer = NULL
    release_frame(c.x.peer)
    c.x.peer = NULL
    if c.x.buf != NULL:
        drop_partial_frame(w, c)


cdef int peek_header(Worker *w, Conn *c, int s) noexcept nogil:
    # XR_HEADER: peek at the first bytes (bytes that turn out not to be a frame
    # stay in the socket and go on by the ordinary path). IDLE: wait for more;
    # MOVED: settled (not a frame) or XR_PAYLOAD begun; FAILED or GONE as fill().
    cdef Listener *l = c.listener
    cdef End *src = &c.ends[s]
    cdef unsigned char header[FRAME_HEADER]
    cdef ssize_t n
    cdef uint32_t size
    n = peek_end(src, <char *>header, FRAME_HEADER)
    while n < 0 and errno == EINTR:
        n = peek_end(src, <char *>header, FRAME_HEADER)
    if n < 0:
        if errno == EAGAIN:
            src.readable = False
            return IDLE
        w.err = errno
        return FAILED
    if n == 0 or memcmp(header, fm_exchange_magic, <size_t>(n if n < 4 else 4)) != 0:
        w.stats[S_EXCHANGE_NO_FRAME] += 1
        exchange_settled(w, c, PEER_NOT_FOUND)
        return MOVED
    if n < FRAME_HEADER:
        if src.hup:  # the stream ends here
            if n < 4:  # a prefix of the magic is just application bytes
                w.stats[S_EXCHANGE_NO_FRAME] += 1
                exchange_settled(w, c, PEER_NOT_FOUND)
                return MOVED
            w.stats[S_EXCHANGE_FRAMES_TRUNCATED] += 1
            return exchange_failed(w, c, s)
        if not c.x.started:
            c.x.started = True
            arm(w, c, T_EXCHANGE, now_s() + l.xframe_timeout)
        if src.ssl == NULL or not SSL_has_pending(src.ssl):
            src.readable = False  # a new edge comes with the next bytes
        return IDLE
    size = ntohl((<uint32_t *>&header[4])[0])
    if size > l.xmax_payload:
        w.stats[S_EXCHANGE_FRAMES_TOO_LARGE] += 1
        return exchange_failed(w, c, s)
    # The frame, header included, is read to its last byte and no further; a
    # frame of the usual size (under FRAME_CHUNK) in one recv.
    c.x.len = FRAME_HEADER + size
    c.x.cap = c.x.len if c.x.len < FRAME_CHUNK else FRAME_CHUNK
    c.x.buf = <char *>malloc(c.x.cap)
    if c.x.buf == NULL:
        c.x.cap = 0
        w.err = ENOMEM
        return FAILED
    w.stats[S_EXCHANGE_PARTIAL_BYTES] += c.x.cap
    c.x.got = 0
    c.x.read = XR_PAYLOAD
    if not c.x.started:
        c.x.started = True
        arm(w, c, T_EXCHANGE, now_s() + l.xframe_timeout)
    return MOVED


cdef int read_peer_frame(Worker *w, Conn *c, int s) noexcept nogil:
    # Read the peer's frame off the front of side s. IDLE: wait for more bytes.
    # MOVED: settled, application bytes follow. FAILED or GONE as fill().
    cdef End *src = &c.ends[s]
    cdef ssize_t n
    cdef uint32_t cap
    cdef char *grown
    cdef int peeked
    if c.x.read == XR_HEADER:
        peeked = peek_header(w, c, s)
        if peeked != MOVED or c.x.read != XR_PAYLOAD:
            return peeked
    while c.x.got < c.x.len:
        if c.x.got == c.x.cap:
            # Memory follows the bytes that came, not the size a header claims:
            # a peer that declares a large frame and sends nothing holds FRAME_CHUNK.
            cap = c.x.cap * 4 if c.x.cap < c.x.len / 4 else c.x.len
            grown = <char *>realloc(c.x.buf, cap)
            if grown == NULL:
                w.err = ENOMEM
                return FAILED
            w.stats[S_EXCHANGE_PARTIAL_BYTES] += cap - c.x.cap
            c.x.buf = grown
            c.x.cap = cap
        n = read_end(src, c.x.buf + c.x.got, c.x.cap - c.x.got)
        if n > 0:
            c.x.got += <uint32_t>n
        elif n == 0:
            w.stats[S_EXCHANGE_FRAMES_TRUNCATED] += 1
            return exchange_failed(w, c, s)
        elif errno == EAGAIN:
            src.readable = False
            return IDLE
        elif errno != EINTR:
            w.err = errno
            return FAILED
    w.stats[S_EXCHANGE_FRAMES_RECEIVED] += 1
    w.stats[S_EXCHANGE_PARTIAL_BYTES] -= c.x.cap
    c.x.peer = share_frame(w, c.x.buf, c.x.len)  # without memory for it, only who the peer is is lost
    c.x.buf = NULL
    c.x.cap = 0
    exchange_settled(w, c, PEER_FOUND)
    return MOVED


cdef void exchange_timer(Worker *w, Conn *c) noexcept nogil:
    # A connection's exchange deadline (T_EXCHANGE) has passed.
    cdef unsigned char header[8]
    cdef ssize_t n
    if c.x.read == XR_PAYLOAD:
        w.stats[S_EXCHANGE_FRAMES_TIMED_OUT] += 1
        exchange_failed(w, c, c.x.side)
        return
    if c.x.started:
        # Part of a header and then silence: a whole magic is a frame that never
        # completed; less than that is application bytes that happen to match.
        n = peek_end(&c.ends[c.x.side], <char *>header, 8)
        if n >= 4:
            w.stats[S_EXCHANGE_FRAMES_TIMED_OUT] += 1
            exchange_failed(w, c, c.x.side)
            return
        w.stats[S_EXCHANGE_NO_FRAME] += 1
        exchange_settled(w, c, PEER_NOT_FOUND)
        c.ends[c.x.side].readable = True  # read what was only peeked
    else:
        # Inbound, nothing from the client yet: release the app's first bytes
        # without our frame. A frame that still comes first is read as usual.
        w.stats[S_EXCHANGE_DETECT_TIMEOUTS] += 1
        disarm(w, c, T_EXCHANGE)
        c.x.hold = False
        c.x.can_send = False
    defer(w, c)  # timers run after this iteration's ready list
