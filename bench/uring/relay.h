/* A minimal single-threaded plaintext TCP relay, listen port -> one upstream, with three interchangeable
 * backends (epoll.c, uring.c, batch.c): a prototype to measure whether io_uring pays against fastmesh's epoll shape.
 * Both backends keep a byte stream exact, pass a half-close on (EOF one way -> shutdown(SHUT_WR) the other
 * way), and reset the other side when one side fails. */
#ifndef RELAY_H
#define RELAY_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>

struct relay_config {
    int listen_fd;                  /* bound, listening, non-blocking */
    struct sockaddr_in upstream;
    size_t buffer_size;             /* bytes per receive buffer */
    unsigned buffers;               /* io_uring: provided buffers in the ring (a power of two) */
    unsigned queue_cap;             /* io_uring: buffers queued one way before receiving pauses */
};

/* Shared by both backends, so they make the same per-connection system calls outside the data path. */
int upstream_socket(int type_flags); /* socket(2)'s SOCK_* type flags; TCP_NODELAY; -1 on failure */
void set_nodelay(int fd);
void reset_on_close(int fd);        /* SO_LINGER 0: close() sends RST, so the far end sees the failure */
void die(const char *what);
/* epoll and batch: accept up to 64 waiting clients; for each, open its upstream socket and start the
 * connect (both non-blocking), then give the pair to `adopt` (connected: the connect completed at once),
 * which closes nothing and says false when it cannot take them. A client that cannot be set up is reset. */
void accept_clients(const struct relay_config *cfg, bool (*adopt)(int fds[2], bool connected));

int run_epoll(const struct relay_config *cfg);
int run_uring(const struct relay_config *cfg);
int run_batch(const struct relay_config *cfg);

#endif
