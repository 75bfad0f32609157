# The OpenSSL 3 calls the engine makes, declared here rather than taken from
# OpenSSL's headers, so that a machine with only the runtime library (the one
# Python's own ssl module loads, which setup.py links against) can build the
# extension. Prototypes and values as OpenSSL 3.0 defines them; macros that
# OpenSSL builds on SSL_ctrl and friends are written out as those calls.

from libc.stdint cimport uint64_t


cdef extern from *:
    """
    typedef struct ssl_ctx_st SSL_CTX;
    typedef struct ssl_st SSL;
    typedef struct ssl_method_st SSL_METHOD;
    typedef struct ssl_session_st SSL_SESSION;
    typedef struct x509_st X509;
    typedef struct x509_store_ctx_st X509_STORE_CTX;
    typedef struct bio_st BIO;
    typedef struct stack_st OPENSSL_STACK;
    typedef struct GENERAL_NAME_st GENERAL_NAME;
    typedef struct asn1_string_st ASN1_STRING;

    const SSL_METHOD *TLS_server_method(void);
    const SSL_METHOD *TLS_client_method(void);
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth);
    void SSL_CTX_free(SSL_CTX *ctx);
    int SSL_CTX_up_ref(SSL_CTX *ctx);
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
    int SSL_CTX_check_private_key(const SSL_CTX *ctx);
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath);
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, int (*callback)(int, X509_STORE_CTX *));
    long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
    uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
    int SSL_CTX_set_alpn_protos(SSL_CTX *ctx, const unsigned char *protos, unsigned int protos_len);
    void SSL_CTX_set_alpn_select_cb(SSL_CTX *ctx,
        int (*cb)(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                  const unsigned char *in, unsigned int inlen, void *arg), void *arg);
    int SSL_select_next_proto(unsigned char **out, unsigned char *outlen, const unsigned char *in,
                              unsigned int inlen, const unsigned char *client, unsigned int client_len);
    void SSL_CTX_sess_set_new_cb(SSL_CTX *ctx, int (*new_session_cb)(SSL *ssl, SSL_SESSION *sess));
    int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int sid_ctx_len);
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str);
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str);
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len);

    SSL *SSL_new(SSL_CTX *ctx);
    void SSL_free(SSL *ssl);
    int SSL_set_fd(SSL *s, int fd);
    void SSL_set_connect_state(SSL *s);
    void SSL_set_accept_state(SSL *s);
    int SSL_do_handshake(SSL *s);
    int SSL_read(SSL *ssl, void *buf, int num);
    int SSL_peek(SSL *ssl, void *buf, int num);
    int SSL_write(SSL *ssl, const void *buf, int num);
    int SSL_shutdown(SSL *s);
    void SSL_set_shutdown(SSL *ssl, int mode);
    int SSL_get_error(const SSL *s, int ret_code);
    int SSL_has_pending(const SSL *s);
    int SSL_free_buffers(SSL *ssl);
    BIO *SSL_get_rbio(const SSL *s);
    typedef long (*BIO_callback_fn_ex)(BIO *b, int oper, const char *argp, size_t len, int argi,
                                       long argl, int ret, size_t *processed);
    void BIO_set_callback_ex(BIO *b, BIO_callback_fn_ex callback);
    void BIO_set_callback_arg(BIO *b, char *arg);
    char *BIO_get_callback_arg(const BIO *b);
    void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len);
    X509 *SSL_get1_peer_certificate(const SSL *s);
    long SSL_get_verify_result(const SSL *ssl);
    long SSL_ctrl(SSL *ssl, int cmd, long larg, void *parg);
    int SSL_set_session(SSL *to, SSL_SESSION *session);
    int SSL_session_reused(const SSL *s);
    int SSL_set_ex_data(SSL *ssl, int idx, void *data);
    void *SSL_get_ex_data(const SSL *ssl, int idx);
    void SSL_SESSION_free(SSL_SESSION *ses);
    int SSL_SESSION_up_ref(SSL_SESSION *ses);
    SSL_SESSION *SSL_SESSION_dup(const SSL_SESSION *src);

    unsigned long ERR_get_error(void);
    void ERR_clear_error(void);
    void ERR_error_string_n(unsigned long e, char *buf, size_t len);

    void *X509_get_ext_d2i(const X509 *x, int nid, int *crit, int *idx);
    void X509_free(X509 *a);
    int OPENSSL_sk_num(const OPENSSL_STACK *st);
    void *OPENSSL_sk_value(const OPENSSL_STACK *st, int i);
    void *GENERAL_NAME_get0_value(const GENERAL_NAME *a, int *ptype);
    void GENERAL_NAMES_free(OPENSSL_STACK *a);
    int ASN1_STRING_length(const ASN1_STRING *x);
    const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *x);

    /* ERR_GET_REASON of OpenSSL 3: system errors carry the errno, others a reason code */
    static inline int fm_err_reason(unsigned long e) {
        return (e & (1UL << 31)) ? (int)(e & 0x7FFFFFFF) : (int)(e & 0x7FFFFF);
    }
    """
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_METHOD
    ctypedef struct SSL_SESSION
    ctypedef struct X509
    ctypedef struct X509_STORE_CTX
    ctypedef struct BIO
    ctypedef struct OPENSSL_STACK
    ctypedef struct GENERAL_NAME
    ctypedef struct ASN1_STRING

    const SSL_METHOD *TLS_server_method() nogil
    const SSL_METHOD *TLS_client_method() nogil
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth) nogil
    void SSL_CTX_free(SSL_CTX *ctx) nogil
    int SSL_CTX_up_ref(SSL_CTX *ctx) nogil
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file) nogil
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type) nogil
    int SSL_CTX_check_private_key(const SSL_CTX *ctx) nogil
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath) nogil
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, int (*callback)(int, X509_STORE_CTX *) noexcept nogil) nogil
    long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg) nogil
    uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op) nogil
    int SSL_CTX_set_alpn_protos(SSL_CTX *ctx, const unsigned char *protos, unsigned int protos_len) nogil
    void SSL_CTX_set_alpn_select_cb(SSL_CTX *ctx,
        int (*cb)(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *inp,
                  unsigned int inlen, void *arg) noexcept nogil, void *arg) nogil
    int SSL_select_next_proto(unsigned char **out, unsigned char *outlen, const unsigned char *inp,
                              unsigned int inlen, const unsigned char *client, unsigned int client_len) nogil
    void SSL_CTX_sess_set_new_cb(SSL_CTX *ctx, int (*new_session_cb)(SSL *ssl, SSL_SESSION *sess) noexcept nogil) nogil
    int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int sid_ctx_len) nogil
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets) nogil
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str) nogil
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str) nogil
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len) nogil

    SSL *SSL_new(SSL_CTX *ctx) nogil
    void SSL_free(SSL *ssl) nogil
    int SSL_set_fd(SSL *s, int fd) nogil
    void SSL_set_connect_state(SSL *s) nogil
    void SSL_set_accept_state(SSL *s) nogil
    int SSL_do_handshake(SSL *s) nogil
    int SSL_read(SSL *ssl, void *buf, int num) nogil
    int SSL_peek(SSL *ssl, void *buf, int num) nogil
    int SSL_write(SSL *ssl, const void *buf, int num) nogil
    int SSL_shutdown(SSL *s) nogil
    void SSL_set_shutdown(SSL *ssl, int mode) nogil
    int SSL_get_error(const SSL *s, int ret_code) nogil
    int SSL_has_pending(const SSL *s) nogil
    int SSL_free_buffers(SSL *ssl) nogil
    BIO *SSL_get_rbio(const SSL *s) nogil
    ctypedef long (*BIO_callback_fn_ex)(BIO *b, int oper, const char *argp, size_t len, int argi,
                                        long argl, int ret, size_t *processed) noexcept nogil
    void BIO_set_callback_ex(BIO *b, BIO_callback_fn_ex callback) nogil
    void BIO_set_callback_arg(BIO *b, char *arg) nogil
    char *BIO_get_callback_arg(const BIO *b) nogil
    void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len) nogil
    X509 *SSL_get1_peer_certificate(const SSL *s) nogil
    long SSL_get_verify_result(const SSL *ssl) nogil
    long SSL_ctrl(SSL *ssl, int cmd, long larg, void *parg) nogil
    int SSL_set_session(SSL *to, SSL_SESSION *session) nogil
    int SSL_session_reused(const SSL *s) nogil
    int SSL_set_ex_data(SSL *ssl, int idx, void *data) nogil
    void *SSL_get_ex_data(const SSL *ssl, int idx) nogil
    void SSL_SESSION_free(SSL_SESSION *ses) nogil
    int SSL_SESSION_up_ref(SSL_SESSION *ses) nogil
    SSL_SESSION *SSL_SESSION_dup(const SSL_SESSION *src) nogil

    unsigned long ERR_get_error() nogil
    void ERR_clear_error() nogil
    void ERR_error_string_n(unsigned long e, char *buf, size_t len) nogil
    int fm_err_reason(unsigned long e) nogil

    void *X509_get_ext_d2i(const X509 *x, int nid, int *crit, int *idx) nogil
    void X509_free(X509 *a) nogil
    int OPENSSL_sk_num(const OPENSSL_STACK *st) nogil
    void *OPENSSL_sk_value(const OPENSSL_STACK *st, int i) nogil
    void *GENERAL_NAME_get0_value(const GENERAL_NAME *a, int *ptype) nogil
    void GENERAL_NAMES_free(OPENSSL_STACK *a) nogil
    int ASN1_STRING_length(const ASN1_STRING *x) nogil
    const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *x) nogil


cdef enum:
    SSL_ERROR_NONE = 0
    SSL_ERROR_SSL = 1
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_WANT_WRITE = 3
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6
    BIO_CB_READ = 0x02
    BIO_CB_RETURN = 0x80
    SSL_VERIFY_NONE = 0
    SSL_VERIFY_PEER = 1
    SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 2
    SSL_FILETYPE_PEM = 1
    SSL_SENT_SHUTDOWN = 1
    SSL_RECEIVED_SHUTDOWN = 2
    SSL_MODE_ENABLE_PARTIAL_WRITE = 1
    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 2
    SSL_MODE_RELEASE_BUFFERS = 0x10
    SSL_CTRL_MODE = 33
    SSL_CTRL_SET_READ_AHEAD = 41
    SSL_CTRL_SET_SESS_CACHE_SIZE = 42
    SSL_CTRL_SET_SESS_CACHE_MODE = 44
    SSL_CTRL_SET_TLSEXT_HOSTNAME = 55
    SSL_CTRL_SET_MIN_PROTO_VERSION = 123
    SSL_SESS_CACHE_CLIENT = 1
    SSL_SESS_CACHE_SERVER = 2
    SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
    TLSEXT_NAMETYPE_host_name = 0
    TLS1_2_VERSION = 0x0303
    SSL_TLSEXT_ERR_OK = 0
    SSL_TLSEXT_ERR_NOACK = 3
    OPENSSL_NPN_NEGOTIATED = 1
    SSL_AD_REASON_OFFSET = 1000       # reason codes above it are alerts received from the peer
    SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE = 199
    SSL_R_CERTIFICATE_VERIFY_FAILED = 134
    SSL_R_UNEXPECTED_EOF_WHILE_READING = 294
    NID_subject_alt_name = 85
    GEN_DNS = 2
    GEN_URI = 6
    X509_V_OK = 0
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT = 2
    X509_V_ERR_CERT_SIGNATURE_FAILURE = 7
    X509_V_ERR_CERT_NOT_YET_VALID = 9
    X509_V_ERR_CERT_HAS_EXPIRED = 10
    X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
    X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
    X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21

cdef extern from *:
    """
    static const uint64_t fm_ssl_op_no_renegotiation = (uint64_t)1 << 30;
    static const uint64_t fm_ssl_op_no_compression = (uint64_t)1 << 17;
    static const uint64_t fm_ssl_op_no_ticket = (uint64_t)1 << 14;
    static const uint64_t fm_ssl_op_cipher_server_preference = (uint64_t)1 << 22;
    """
    const uint64_t fm_ssl_op_no_renegotiation
    const uint64_t fm_ssl_op_no_compression
    const uint64_t fm_ssl_op_no_ticket
    const uint64_t fm_ssl_op_cipher_server_preference
