/* relay --epoll|--uring|--batch --listen [HOST:]PORT --upstream HOST:PORT [--buffer-size N] [--buffers N]
 *       [--queue-cap N]
 * Prints "listening HOST:PORT" once it accepts connections (PORT 0 picks a free port). */
#define _GNU_SOURCE
#include "relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

void die(const char *what)
{
    perror(what);
    exit(1);
}

void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void reset_on_close(int fd)
{
    struct linger now = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
}

int upstream_socket(int type_flags)
{
    int fd = socket(AF_INET, SOCK_STREAM | type_flags, 0);
    if (fd >= 0)
        set_nodelay(fd);
    return fd;
}

static int accept_client(const struct relay_config *cfg, int fds[2], bool *connected)
{
    int fd = accept4(cfg->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
            perror("accept4");
        return 0;
    }
    set_nodelay(fd);
    fds[0] = fd;
    fds[1] = upstream_socket(SOCK_NONBLOCK | SOCK_CLOEXEC);
    *connected = fds[1] >= 0 && connect(fds[1], (const struct sockaddr *)&cfg->upstream, sizeof cfg->upstream) == 0;
    if (fds[1] < 0 || (!*connected && errno != EINPROGRESS)) {
        reset_on_close(fd);
        close(fd);
        if (fds[1] >= 0)
            close(fds[1]);
        return -1;
    }
    return 1;
}

void accept_clients(const struct relay_config *cfg, bool (*adopt)(int fds[2], bool connected))
{
    for (int batch = 0; batch < 64; batch++) {
        int fds[2];
        bool connected;
        int got = accept_client(cfg, fds, &connected);
        if (got == 0)
            return;
        if (got > 0 && !adopt(fds, connected)) {
            close(fds[0]);
            close(fds[1]);
        }
    }
}

static void parse_address(const char *text, struct sockaddr_in *out, int need_host)
{
    char host[64] = "127.0.0.1";
    const char *colon = strrchr(text, ':');
    const char *port = colon ? colon + 1 : text;
    if (colon) {
        size_t n = (size_t)(colon - text);
        if (n == 0 || n >= sizeof host) {
            fprintf(stderr, "bad address %s\n", text);
            exit(2);
        }
        memcpy(host, text, n);
        host[n] = 0;
    } else if (need_host) {
        fprintf(stderr, "want HOST:PORT, got %s\n", text);
        exit(2);
    }
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((unsigned short)atoi(port));
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
}

static int listen_on(const struct sockaddr_in *addr)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0)
        die("bind");
    if (listen(fd, 4096) < 0)
        die("listen");
    return fd;
}

static void usage(void)
{
    fprintf(stderr, "usage: relay --epoll|--uring|--batch --listen [HOST:]PORT --upstream HOST:PORT "
                    "[--buffer-size N] [--buffers N] [--queue-cap N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    struct relay_config cfg = {.buffer_size = 16384, .buffers = 2048, .queue_cap = 32, .listen_fd = -1};
    struct sockaddr_in listen_addr;
    const char *backend = NULL, *listen_text = NULL, *upstream_text = NULL;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(arg, "--epoll") || !strcmp(arg, "--uring") || !strcmp(arg, "--batch"))
            backend = arg + 2;
        else if (value && !strcmp(arg, "--listen"))
            listen_text = argv[++i];
        else if (value && !strcmp(arg, "--upstream"))
            upstream_text = argv[++i];
        else if (value && !strcmp(arg, "--buffer-size"))
            cfg.buffer_size = strtoul(argv[++i], NULL, 10);
        else if (value && !strcmp(arg, "--buffers"))
            cfg.buffers = (unsigned)strtoul(argv[++i], NULL, 10);
        else if (value && !strcmp(arg, "--queue-cap"))
            cfg.queue_cap = (unsigned)strtoul(argv[++i], NULL, 10);
        else
            usage();
    }
    if (!backend || !listen_text || !upstream_text || cfg.buffer_size == 0 || cfg.queue_cap == 0
        || cfg.buffers == 0 || cfg.buffers > 32768 || (cfg.buffers & (cfg.buffers - 1)))
        usage();   /* the kernel wants a power-of-two buffer ring of at most 32768 entries */

    parse_address(listen_text, &listen_addr, 0);
    parse_address(upstream_text, &cfg.upstream, 1);
    signal(SIGPIPE, SIG_IGN);
    cfg.listen_fd = listen_on(&listen_addr);

    socklen_t len = sizeof listen_addr;
    getsockname(cfg.listen_fd, (struct sockaddr *)&listen_addr, &len);
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &listen_addr.sin_addr, host, sizeof host);
    printf("listening %s:%d %s\n", host, ntohs(listen_addr.sin_port), backend);
    fflush(stdout);

    if (!strcmp(backend, "uring"))
        return run_uring(&cfg);
    return strcmp(backend, "batch") ? run_epoll(&cfg) : run_batch(&cfg);
}
