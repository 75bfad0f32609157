# Mutual TLS, as Istio's sidecars speak it, inside the worker loop: non-blocking
# handshakes driven by the connection's epoll events, the peer's identity
# decided here from its certificate's SAN (no Python call per handshake), the
# exchange gated by the ALPN negotiated, and reads and writes through OpenSSL
# for the ends that speak TLS. close_notify carries a half-close; an end of
# stream without it is a truncation, passed on as a reset.

cdef unsigned char fm_server_alpn[64]   # wire form of fastmesh.tls.SERVER_ALPN
cdef unsigned int fm_server_alpn_len
cdef unsigned char fm_client_alpn[64]   # fastmesh.tls.CLIENT_ALPN
cdef unsigned int fm_client_alpn_len
cdef unsigned char fm_exchange_alpn[32]  # fastmesh.tls.EXCHANGE_ALPN
cdef unsigned int fm_exchange_alpn_len
cdef const unsigned char *FM_SESSION_CONTEXT = <const unsigned char *>"fastmesh"
cdef enum:
    TLS_READ_AHEAD = 4 * 16384 + 4 * 256  # four full records and their headers and tags
    TLS_HELD_EOF = -1                     # End.tls_held: close_notify


cdef set_alpn_lists(bytes server, bytes client, bytes exchange):
    global fm_server_alpn_len, fm_client_alpn_len, fm_exchange_alpn_len
    if len(server) > 64 or len(client) > 64 or len(exchange) > 32:
        raise ValueError("ALPN lists too long")
    memcpy(fm_server_alpn, <char *>server, len(server))
    fm_server_alpn_len = len(server)
    memcpy(fm_client_alpn, <char *>client, len(client))
    fm_client_alpn_len = len(client)
    memcpy(fm_exchange_alpn, <char *>exchange, len(exchange))
    fm_exchange_alpn_len = len(exchange)


# ---------------------------------------------------------------- contexts (Python, with the GIL)

cdef str openssl_errors():
    cdef char text[256]
    cdef unsigned long e
    found = []
    e = ERR_get_error()
    while e != 0:
        ERR_error_string_n(e, text, sizeof(text))
        found.append(text.decode(errors="replace"))
        e = ERR_get_error()
    return "; ".join(found) or "unknown OpenSSL error"


cdef int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *inp,
                     unsigned int inlen, void *arg) noexcept nogil:
    # The server's preference, as Envoy's: without a protocol in common the handshake
    # goes on with none (the connection is mTLS without the exchange).
    if SSL_select_next_proto(<unsigned char **>out, outlen, fm_server_alpn, fm_server_alpn_len,
                             inp, inlen) == OPENSSL_NPN_NEGOTIATED:
        return SSL_TLSEXT_ERR_OK
    return SSL_TLSEXT_ERR_NOACK


cdef int on_new_session(SSL *ssl, SSL_SESSION *session) noexcept nogil:
    # A client session to resume later: the last one per endpoint is kept.
    cdef Conn *c = <Conn *>SSL_get_ex_data(ssl, 0)
    cdef Listener *l
    cdef SSL_SESSION *old
    if c == NULL or c.listener == NULL or c.endpoint == NONE:
        return 0
    l = c.listener
    pthread_mutex_lock(&l.session_lock)
    old = l.ep_session[c.endpoint]
    l.ep_session[c.endpoint] = session
    pthread_mutex_unlock(&l.session_lock)
    if old != NULL:
        SSL_SESSION_free(old)
    return 1  # the reference is ours


cdef SSL_CTX *new_context(bint server, object cert_chain, object key, object roots, bint client_cert) except NULL:
    """A context for one side: our certificate (optional for a client), the roots
    the peer must chain to, peer verification, Istio's ALPN for the mesh."""
    cdef SSL_CTX *ctx = SSL_CTX_new(TLS_server_method() if server else TLS_client_method())
    if ctx == NULL:
        raise MemoryError(openssl_errors())
    try:
        SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_2_VERSION, NULL)
        SSL_CTX_set_options(ctx, fm_ssl_op_no_renegotiation | fm_ssl_op_no_compression)
        if (SSL_CTX_set_ciphersuites(ctx, TLS13_CIPHERSUITES.encode()) != 1
                or SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS.encode()) != 1):
            raise ValueError(openssl_errors())
        # Buffers only while data is in flight; writes that may be partial, retried from
        # a buffer that may have moved.
        SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                     | SSL_MODE_RELEASE_BUFFERS, NULL)
        # Read ahead: one recv takes several records rather than two per record (a
        # header, then its body); the buffer is released once it is empty.
        SSL_CTX_ctrl(ctx, SSL_CTRL_SET_READ_AHEAD, 1, NULL)
        SSL_CTX_set_default_read_buffer_len(ctx, TLS_READ_AHEAD)
        if cert_chain:
            if SSL_CTX_use_certificate_chain_file(ctx, str(cert_chain).encode()) != 1:
                raise ValueError(f"{cert_chain}: {openssl_errors()}")
            if SSL_CTX_use_PrivateKey_file(ctx, str(key).encode(), SSL_FILETYPE_PEM) != 1:
                raise ValueError(f"{key}: {openssl_errors()}")
            if SSL_CTX_check_private_key(ctx) != 1:
                raise ValueError(f"{key}: not the key of {cert_chain}")
        if SSL_CTX_load_verify_locations(ctx, str(roots).encode(), NULL) != 1:
            raise ValueError(f"{roots}: {openssl_errors()}")
        if server:
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)
            SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL)
            SSL_CTX_set_session_id_context(ctx, FM_SESSION_CONTEXT, 8)
            SSL_CTX_set_num_tickets(ctx, 1)  # one is all a client keeps
            SSL_CTX_set_options(ctx, fm_ssl_op_no_ticket | fm_ssl_op_cipher_server_preference)
            SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_SIZE, SESSION_CACHE_SIZE, NULL)
        else:
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL)
            SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE,
                         NULL)
            SSL_CTX_sess_set_new_cb(ctx, on_new_session)
            if client_cert and SSL_CTX_set_alpn_protos(ctx, fm_client_alpn, fm_client_alpn_len) != 0:
                raise MemoryError(openssl_errors())
    except BaseException:
        SSL_CTX_free(ctx)
        raise
    return ctx


# ---------------------------------------------------------------- I/O through OpenSSL

cdef inline ssize_t tls_result(SSL *ssl, int ret) noexcept nogil:
    # recv/send-like results: 0 for close_notify; -1 with errno EAGAIN (try again on
    # the next event), ECONNRESET (the stream ended without close_notify) or EPROTO.
    cdef int err = SSL_get_error(ssl, ret)
    cdef unsigned long e
    if err == SSL_ERROR_WANT_READ:
        # Nothing more to read for now: an idle connection keeps no buffer (OpenSSL's
        # release-buffers mode misses some of these moments; this frees only empty ones).
        SSL_free_buffers(ssl)
        set_errno(EAGAIN)
    elif err == SSL_ERROR_WANT_WRITE:
        set_errno(EAGAIN)
    elif err == SSL_ERROR_ZERO_RETURN:
        return 0
    elif err == SSL_ERROR_SYSCALL:
        set_errno(errno if errno != 0 else ECONNRESET)
    else:
        e = ERR_get_error()
        set_errno(ECONNRESET if fm_err_reason(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING else EPROTO)
    return -1


cdef long on_socket_io(BIO *b, int oper, const char *argp, size_t length, int argi, long argl, int ret,
                       size_t *processed) noexcept nogil:
    # After each read OpenSSL makes of the socket: whether it got less than it asked (with
    # read-ahead it asks for far more than a small request), so the socket was empty then.
    cdef End *e
    if oper == (BIO_CB_READ | BIO_CB_RETURN):
        e = <End *>BIO_get_callback_arg(b)
        e.tls_drained = ret > 0 and processed != NULL and processed[0] < length
    return ret


cdef ssize_t tls_read(End *e, char *into, size_t room, bint peek) noexcept nogil:
    cdef int n
    ERR_clear_error()
    # tls_drained speaks of this call's socket reads only: a call that finds its record already
    # in OpenSSL's buffer makes none, and a flag kept from an earlier turn would clear the
    # readiness of bytes that arrived since (their edge already taken).
    e.tls_drained = False
    n = SSL_peek(e.ssl, into, <int>room) if peek else SSL_read(e.ssl, into, <int>room)
    if n > 0:
        return n
    return tls_result(e.ssl, n)


cdef ssize_t tls_read_records(End *e, char *into, size_t room) noexcept nogil:
    # As many records as the room takes, so that a full buffer leaves in one send
    # rather than one per record. What ends the run after some bytes (other than
    # EAGAIN, which also means the socket is drained) is held for the next call:
    # those bytes go on first.
    cdef ssize_t got = 0, n
    cdef int held = e.tls_held
    if held:
        e.tls_held = 0
        if held == TLS_HELD_EOF:
            return 0
        set_errno(held)
        return -1
    while <size_t>got < room:
        n = tls_read(e, into + got, room - got, False)
        if n > 0:
            got += n
            if e.tls_drained and not e.hup and not SSL_has_pending(e.ssl):
                # The socket was emptied by OpenSSL's last read and nothing of it is left
                # undecrypted: the next bytes raise a new edge, so no read to meet EAGAIN.
                # (Not once the FIN is in, as for plaintext: no edge would announce the end.)
                e.readable = False
                break
            continue
        if got == 0:
            return n
        if n == 0:
            e.tls_held = TLS_HELD_EOF
        elif errno == EAGAIN:
            e.readable = False
        elif errno != EINTR:
            e.tls_held = errno
        break
    return got


cdef ssize_t tls_write(End *e, const char *data, size_t n) noexcept nogil:
    cdef int sent
    ERR_clear_error()
    sent = SSL_write(e.ssl, data, <int>n)
    if sent > 0:
        return sent
    if tls_result(e.ssl, sent) == 0:
        set_errno(EPIPE)  # the peer closed its side of TLS: it reads no more
    return -1


cdef int tls_close_notify(End *e) noexcept nogil:
    # Our half of the stream ends: close_notify (TLS 1.3 then still reads the peer's).
    # 0 when it went, -1 with EAGAIN to try again once writable.
    cdef int r
    ERR_clear_error()
    r = SSL_shutdown(e.ssl)
    if r >= 0:
        return 0
    if tls_result(e.ssl, r) < 0 and errno == EAGAIN:
        return -1
    return 0  # the peer is gone: the reset shows up on the next read


cdef void tls_release(Conn *c) noexcept nogil:
    cdef int s
    for s in range(2):
        if c.ends[s].ssl != NULL:
            # OpenSSL drops from the server's cache the session of a connection that
            # ends without close_notify both ways, and the client's last ticket came
            # from it: its next connection would pay for a full handshake. The session
            # is as sound as it was (a reset is passed on as a reset whatever this says).
            SSL_set_shutdown(c.ends[s].ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN)
            SSL_free(c.ends[s].ssl)
            c.ends[s].ssl = NULL
    free(c.principal)
    c.principal = NULL


# ---------------------------------------------------------------- handshakes

cdef bint start_tls(Worker *w, Conn *c, int side) noexcept nogil:
    # An SSL on that end: the server of inbound mTLS (DOWN), or a client (UP) with the
    # cluster's context or the mesh identity, its SNI and the endpoint's last session.
    cdef Listener *l = c.listener
    cdef Cluster *cl
    cdef SSL_CTX *ctx
    cdef SSL *ssl
    cdef SSL_SESSION *session = NULL
    cdef SSL_SESSION *copy
    if side == DOWN:
        ctx = w.identity.server
    else:
        cl = &l.clusters[c.cluster]
        ctx = cl.tls_ctx if cl.tls_ctx != NULL else w.identity.client
    if ctx == NULL:
        return False
    ssl = SSL_new(ctx)
    if ssl == NULL or SSL_set_fd(ssl, c.ends[side].fd) != 1:
        if ssl != NULL:
            SSL_free(ssl)
        return False
    SSL_set_ex_data(ssl, 0, c)
    c.ends[side].tls_drained = False
    BIO_set_callback_arg(SSL_get_rbio(ssl), <char *>&c.ends[side])
    BIO_set_callback_ex(SSL_get_rbio(ssl), on_socket_io)
    if side == DOWN:
        SSL_set_accept_state(ssl)
    else:
        SSL_set_connect_state(ssl)
        if cl.sni != NULL:
            SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, cl.sni)
        pthread_mutex_lock(&l.session_lock)
        session = l.ep_session[c.endpoint]
        if session != NULL:
            SSL_SESSION_up_ref(session)
        pthread_mutex_unlock(&l.session_lock)
        if session != NULL:
            # A copy for each connection: when a TLS 1.3 handshake ends OpenSSL marks
            # its session used up, and the connections starting meanwhile from the
            # same one would fall back to full handshakes.
            copy = SSL_SESSION_dup(session)
            SSL_SESSION_free(session)
            if copy != NULL:
                SSL_set_session(ssl, copy)
                SSL_SESSION_free(copy)
    c.ends[side].ssl = ssl
    c.tls_side = side
    c.tls_phase = TLS_HANDSHAKE
    # Any flow that touches a TLS end copies: splice would bypass OpenSSL.
    c.flows[DOWN].copy_only = True
    c.flows[UP].copy_only = True
    arm(w, c, T_TLS, now_s() + l.handshake_timeout)
    return True


cdef int peer_identity(Worker *w, Conn *c, SSL *ssl) noexcept nogil:
    # Whether the peer may be on the other end: 0, or the S_TLS_ERROR_* to count. A
    # server (ISTIO, or inbound) must be a SPIFFE id of our trust domain, or one of the
    # cluster's subjectAltNames; SIMPLE and MUTUAL without any take a verified chain.
    cdef X509 *cert = SSL_get1_peer_certificate(ssl)
    cdef OPENSSL_STACK *names
    cdef GENERAL_NAME *name
    cdef ASN1_STRING *value
    cdef Cluster *cl = NULL
    cdef const unsigned char *data
    cdef char found[MAX_SAN]
    cdef size_t td_len = strlen(w.identity.trust_domain)
    cdef int i, j, kind, length, verdict = S_TLS_ERROR_PEER_IDENTITY
    cdef bint spiffe_needed = True
    if cert == NULL:
        return S_TLS_ERROR_NO_CERTIFICATE
    if c.tls_side == UP:
        cl = &c.listener.clusters[c.cluster]
        spiffe_needed = cl.nsans == 0 and c.tls_mode == CT_ISTIO
        if cl.nsans == 0 and not spiffe_needed:
            verdict = 0
    names = <OPENSSL_STACK *>X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL)
    X509_free(cert)
    if names == NULL:
        return verdict
    for i in range(OPENSSL_sk_num(names)):
        name = <GENERAL_NAME *>OPENSSL_sk_value(names, i)
        value = <ASN1_STRING *>GENERAL_NAME_get0_value(name, &kind)
        if kind != GEN_URI and kind != GEN_DNS:
            continue
        length = ASN1_STRING_length(value)
        if length <= 0 or length >= MAX_SAN:
            continue
        data = ASN1_STRING_get0_data(value)
        memcpy(found, data, length)
        found[length] = 0
        if kind == GEN_URI and c.principal == NULL and strncmp(found, "spiffe://", 9) == 0:
            c.principal = strdup(found)  # the identity telemetry reports
        if verdict == 0:
            continue
        if spiffe_needed:
            if (kind == GEN_URI and strncmp(found, "spiffe://", 9) == 0 and <size_t>length > 9 + td_len
                    and strncmp(found + 9, w.identity.trust_domain, td_len) == 0 and found[9 + td_len] == b'/'):
                verdict = 0
        else:
            for j in range(cl.nsans):
                if strcmp(found, cl.sans[j]) == 0:
                    verdict = 0
    GENERAL_NAMES_free(names)
    return verdict


cdef int handshake_failure(SSL *ssl, int err) noexcept nogil:
    # Why a handshake failed (err: SSL_get_error's, the error queue still full), as the
    # S_TLS_ERROR_* to count.
    cdef unsigned long e
    cdef int reason
    cdef long verify
    if err == SSL_ERROR_SYSCALL:
        return S_TLS_ERROR_RESET
    e = ERR_get_error()
    reason = fm_err_reason(e)
    if reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
        return S_TLS_ERROR_NO_CERTIFICATE
    if reason == SSL_R_UNEXPECTED_EOF_WHILE_READING:
        return S_TLS_ERROR_RESET
    if reason == SSL_R_CERTIFICATE_VERIFY_FAILED:
        verify = SSL_get_verify_result(ssl)
        if verify == X509_V_ERR_CERT_HAS_EXPIRED:
            return S_TLS_ERROR_EXPIRED
        if verify == X509_V_ERR_CERT_NOT_YET_VALID:
            return S_TLS_ERROR_NOT_YET_VALID
        return S_TLS_ERROR_UNTRUSTED
    if reason > SSL_AD_REASON_OFFSET:
        # An alert from the peer: a client told by our server that its certificate is
        # untrusted sees it here, and the server counts the cause.
        return S_TLS_ERROR_ALERT
    return S_TLS_ERROR_PROTOCOL


cdef void tls_failed(Worker *w, Conn *c, int stat) noexcept nogil:
    w.stats[stat] += 1
    reset_both(w, c, R_DOWNSTREAM_TLS_ERROR if c.tls_side == DOWN else R_UPSTREAM_TLS_ERROR, EPROTO)


cdef bint alpn_is_exchange(SSL *ssl) noexcept nogil:
    cdef const unsigned char *selected
    cdef unsigned int length
    SSL_get0_alpn_selected(ssl, &selected, &length)
    return length == fm_exchange_alpn_len and memcmp(selected, fm_exchange_alpn, length) == 0


cdef void handshake_done(Worker *w, Conn *c) noexcept nogil:
    cdef SSL *ssl = c.ends[c.tls_side].ssl
    cdef int refused = peer_identity(w, c, ssl)
    if refused:
        tls_failed(w, c, refused)
        return
    disarm(w, c, T_TLS)
    c.tls_phase = TLS_ON
    SSL_free_buffers(ssl)  # the handshake's buffers, unless records wait in them
    w.stats[S_TLS_HANDSHAKES] += 1
    if SSL_session_reused(ssl):
        w.stats[S_TLS_RESUMED] += 1
    exchange_after_tls(w, c.listener, c, alpn_is_exchange(ssl))
    if c.state == SECURING:
        connect_secured(w, c)  # STRICT: only now does the app see a connection
    elif c.state == OPEN:
        defer(w, c)  # relaying goes on in drive(), or next turn (this may run after the ready list)


cdef void detect_tls(Worker *w, Conn *c) noexcept nogil:
    # A TLS client speaks first with a handshake record (0x16). Anything else is a
    # plaintext client: refused under STRICT, served under PERMISSIVE. Peeked: its
    # bytes stay for whoever reads them.
    cdef unsigned char first
    cdef ssize_t n = recv(c.ends[DOWN].fd, &first, 1, MSG_PEEK | MSG_DONTWAIT)
    if n < 0:
        if errno == EAGAIN or errno == EINTR:
            c.ends[DOWN].readable = False
            return
        abort_conn(w, c, DOWN, errno)
        return
    if n == 1 and first == 0x16:
        if not start_tls(w, c, DOWN):
            tls_failed(w, c, S_TLS_ERROR_LOCAL)
    elif c.mtls == MTLS_STRICT:
        tls_failed(w, c, S_TLS_ERROR_PLAINTEXT if n == 1 else S_TLS_ERROR_RESET)  # gone before a byte
    else:
        plaintext_client(w, c)


cdef void plaintext_client(Worker *w, Conn *c) noexcept nogil:
    # PERMISSIVE: no TLS on this connection; the plaintext exchange may still run.
    w.stats[S_TLS_PLAINTEXT] += 1
    disarm(w, c, T_TLS)
    c.tls_side = NONE
    c.tls_phase = TLS_OFF
    exchange_after_plaintext_detect(w, c.listener, c, c.ends[DOWN].readable)
    if c.state == OPEN:
        defer(w, c)


cdef void tls_drive(Worker *w, Conn *c) noexcept nogil:
    # Move a connection's TLS on while it is not relaying yet: detect, then handshake.
    cdef int r, err
    if c.tls_phase == TLS_DETECT:
        if not c.ends[DOWN].readable:
            if c.detect_waited and c.ends[UP].readable:
                plaintext_client(w, c)  # the app spoke first: its client cannot be TLS, which speaks first
            return
        detect_tls(w, c)
        if c.state == CLOSED or c.tls_phase != TLS_HANDSHAKE:
            return
    if c.tls_phase != TLS_HANDSHAKE:
        return
    ERR_clear_error()
    r = SSL_do_handshake(c.ends[c.tls_side].ssl)
    if r == 1:
        handshake_done(w, c)
        return
    err = SSL_get_error(c.ends[c.tls_side].ssl, r)
    if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
        return  # the next event of the connection goes on with it
    tls_failed(w, c, handshake_failure(c.ends[c.tls_side].ssl, err))


cdef void tls_timer(Worker *w, Conn *c) noexcept nogil:
    # T_TLS: the client of a PERMISSIVE listener did not speak by the detect timeout,
    # or a handshake did not complete in time. A server-first app's greeting then goes
    # to a plaintext client. While the app is silent too, nothing is decided: a TLS
    # client slowed by load still handshakes when its first byte comes, and the app's
    # first bytes, if they come first, decide plaintext (edge-triggered: UP is readable
    # exactly when the app has sent or closed, since nothing reads it while detecting).
    if c.tls_phase == TLS_DETECT and c.mtls == MTLS_PERMISSIVE:
        if c.ends[UP].readable:
            plaintext_client(w, c)
        else:
            c.detect_waited = True
    else:
        tls_failed(w, c, S_TLS_ERROR_TIMEOUT)
