/* What an idle mutual-TLS connection keeps allocated inside OpenSSL, by allocation site.
 *
 *   tls_memory SERVER_CERTS CLIENT_CERTS CONNECTIONS CIPHERSUITES SESSION_CACHE READ_AHEAD ALPN...
 *
 * Opens CONNECTIONS pairs of SSL objects over socketpairs with the contexts fastmesh's engine makes
 * (native/tls.pxi new_context: the same options, modes, verification, stateful tickets, the client
 * resuming a copy of its last session), lets each finish its handshake and take its ticket, frees
 * the record buffers as the engine does once a read finds nothing, and keeps them all open. Every
 * allocation OpenSSL makes goes through CRYPTO_set_mem_functions, which names its file and line; what
 * is still allocated at the end, less what was allocated before, is printed as JSON, per pair. */
#include <fcntl.h>
#include <malloc.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define SLOTS (1u << 22) /* live allocations tracked at once: far more than 2 x 20,000 pairs make */
#define MAX_SITES 4096

struct allocation { void *ptr; size_t size; const char *file; int line; };
struct site { const char *file; int line; long bytes; long count; };

static struct allocation *live;
static struct site sites[MAX_SITES];
static int nsites;

static size_t slot_of(const void *ptr) { return ((size_t)ptr >> 4) * 2654435761u % SLOTS; }

static void remember(void *ptr, size_t size, const char *file, int line)
{
    size_t i = slot_of(ptr);
    while (live[i].ptr)
        i = (i + 1) % SLOTS;
    live[i] = (struct allocation){ptr, size, file ? file : "?", line}; /* no file: OPENSSL_NO_FILENAMES */
}

static void forget(void *ptr)
{
    size_t i = slot_of(ptr), j, home;
    while (live[i].ptr != ptr) {
        if (!live[i].ptr)
            return; /* allocated before the hooks */
        i = (i + 1) % SLOTS;
    }
    live[i].ptr = NULL;
    /* Linear probing: move back the entries that probed past the freed slot. */
    for (j = (i + 1) % SLOTS; live[j].ptr; j = (j + 1) % SLOTS) {
        home = slot_of(live[j].ptr);
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            live[i] = live[j];
            live[j].ptr = NULL;
            i = j;
        }
    }
}

static void *hook_malloc(size_t size, const char *file, int line)
{
    void *ptr = malloc(size);
    if (ptr)
        remember(ptr, size, file, line);
    return ptr;
}

static void *hook_realloc(void *old, size_t size, const char *file, int line)
{
    void *ptr;
    if (old)
        forget(old);
    ptr = realloc(old, size);
    if (ptr)
        remember(ptr, size, file, line);
    return ptr;
}

static void hook_free(void *ptr, const char *file, int line)
{
    (void)file, (void)line;
    if (ptr)
        forget(ptr);
    free(ptr);
}

/* Adds (sign +1) or takes away (-1) every live allocation, by site. */
static void tally(int sign)
{
    for (size_t i = 0; i < SLOTS; i++) {
        struct allocation *a = &live[i];
        int k;
        if (!a->ptr)
            continue;
        for (k = 0; k < nsites; k++)
            if (sites[k].line == a->line && strcmp(sites[k].file, a->file) == 0)
                break;
        if (k == nsites) {
            if (nsites == MAX_SITES)
                continue;
            sites[nsites++] = (struct site){a->file, a->line, 0, 0};
        }
        sites[k].bytes += sign * (long)a->size;
        sites[k].count += sign;
    }
}

static SSL_SESSION *last_session; /* the client's, as the engine keeps one per endpoint */
static long resumed;              /* pairs whose handshake resumed a session */

static int on_new_session(SSL *ssl, SSL_SESSION *session)
{
    (void)ssl;
    SSL_SESSION_free(last_session);
    last_session = session;
    return 1; /* the reference is ours */
}

static int select_first(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                        unsigned int inlen, void *arg)
{
    (void)ssl, (void)arg;
    if (inlen == 0)
        return SSL_TLSEXT_ERR_NOACK;
    *out = in + 1;
    *outlen = in[0];
    return SSL_TLSEXT_ERR_OK;
}

struct settings { const char *ciphersuites; long cache; long read_ahead; unsigned char alpn[256]; unsigned alpn_len; };

static void fail(const char *what)
{
    fprintf(stderr, "tls_memory: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static SSL_CTX *context(int server, const char *dir, const struct settings *s)
{
    char path[4096];
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx)
        fail("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    if (SSL_CTX_set_ciphersuites(ctx, s->ciphersuites) != 1)
        fail("ciphersuites");
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, s->read_ahead);
    snprintf(path, sizeof path, "%s/cert-chain.pem", dir);
    if (SSL_CTX_use_certificate_chain_file(ctx, path) != 1)
        fail(path);
    snprintf(path, sizeof path, "%s/key.pem", dir);
    if (SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM) != 1)
        fail(path);
    snprintf(path, sizeof path, "%s/root-cert.pem", dir);
    if (SSL_CTX_load_verify_locations(ctx, path, NULL) != 1)
        fail(path);
    if (server) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
        SSL_CTX_set_alpn_select_cb(ctx, select_first, NULL);
        SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"fastmesh", 8);
        SSL_CTX_set_num_tickets(ctx, 1);
        SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_CIPHER_SERVER_PREFERENCE);
        SSL_CTX_sess_set_cache_size(ctx, s->cache);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(ctx, on_new_session);
        if (SSL_CTX_set_alpn_protos(ctx, s->alpn, s->alpn_len) != 0)
            fail("alpn");
    }
    return ctx;
}

/* One pair, handshaken, its ticket taken, its buffers freed; returns its two SSL objects. */
static void open_pair(SSL_CTX *server_ctx, SSL_CTX *client_ctx, SSL **kept)
{
    int fds[2], done_server = 0, done_client = 0;
    char byte;
    SSL *server, *client;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0)
        fail("socketpair");
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    fcntl(fds[1], F_SETFL, O_NONBLOCK);
    server = SSL_new(server_ctx);
    client = SSL_new(client_ctx);
    if (!server || !client || SSL_set_fd(server, fds[0]) != 1 || SSL_set_fd(client, fds[1]) != 1)
        fail("SSL_new");
    SSL_set_accept_state(server);
    SSL_set_connect_state(client);
    if (last_session) { /* a copy for each connection, as the engine resumes */
        SSL_SESSION *copy = SSL_SESSION_dup(last_session);
        SSL_set_session(client, copy);
        SSL_SESSION_free(copy);
    }
    for (int turn = 0; turn < 100 && !(done_server && done_client); turn++) {
        done_client = done_client || SSL_do_handshake(client) == 1;
        done_server = done_server || SSL_do_handshake(server) == 1;
    }
    if (!(done_server && done_client))
        fail("handshake");
    resumed += SSL_session_reused(client);
    SSL_read(client, &byte, 1); /* the ticket; then nothing to read */
    SSL_read(server, &byte, 1);
    SSL_free_buffers(client);
    SSL_free_buffers(server);
    kept[0] = server;
    kept[1] = client;
}

static size_t in_use(void)
{
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}

int main(int argc, char **argv)
{
    struct settings s = {0};
    long pairs, warm = 200;
    size_t before, after;
    SSL **kept;
    long total = 0;
    if (argc < 8) {
        fprintf(stderr, "usage: tls_memory SERVER_CERTS CLIENT_CERTS CONNECTIONS CIPHERSUITES SESSION_CACHE "
                        "READ_AHEAD ALPN...\n");
        return 2;
    }
    pairs = atol(argv[3]);
    s.ciphersuites = argv[4];
    s.cache = atol(argv[5]);
    s.read_ahead = atol(argv[6]);
    for (int i = 7; i < argc; i++) {
        size_t n = strlen(argv[i]);
        if (n == 0 || n > 255 || s.alpn_len + 1 + n > sizeof s.alpn)
            fail("alpn name");
        s.alpn[s.alpn_len++] = (unsigned char)n;
        memcpy(s.alpn + s.alpn_len, argv[i], n);
        s.alpn_len += n;
    }
    live = calloc(SLOTS, sizeof *live);
    kept = calloc(2 * (size_t)(pairs + warm), sizeof *kept);
    if (!live || !kept || pairs <= 0)
        fail("arguments or memory");
    if (!CRYPTO_set_mem_functions(hook_malloc, hook_realloc, hook_free))
        fail("CRYPTO_set_mem_functions");
    SSL_CTX *server_ctx = context(1, argv[1], &s), *client_ctx = context(0, argv[2], &s);
    /* The warm-up fills what is made once (caches, the first full handshake) and the server's
     * session cache, which holds up to SESSION_CACHE sessions whatever the connections. */
    for (long i = 0; i < warm; i++)
        open_pair(server_ctx, client_ctx, kept + 2 * i);
    tally(-1);
    resumed = 0;
    before = in_use();
    for (long i = 0; i < pairs; i++)
        open_pair(server_ctx, client_ctx, kept + 2 * (warm + i));
    after = in_use();
    tally(+1);
    for (int k = 0; k < nsites; k++)
        total += sites[k].bytes;
    printf("{\"openssl\": \"%s\", \"pairs\": %ld, \"resumed_pairs\": %ld, \"tracked_bytes_per_pair\": %.1f, "
           "\"malloc_in_use_per_pair\": %.1f, \"sites\": [",
           OpenSSL_version(OPENSSL_VERSION), pairs, resumed, (double)total / pairs, (double)(after - before) / pairs);
    for (int k = 0, first = 1; k < nsites; k++) {
        if (sites[k].bytes <= 0)
            continue;
        printf("%s{\"site\": \"%s:%d\", \"bytes_per_pair\": %.1f, \"allocations_per_pair\": %.2f}", first ? "" : ", ",
               sites[k].file, sites[k].line, (double)sites[k].bytes / pairs, (double)sites[k].count / pairs);
        first = 0;
    }
    printf("]}\n");
    return 0;
}
