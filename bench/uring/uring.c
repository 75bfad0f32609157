/* The io_uring backend: one ring, one io_uring_submit_and_wait per loop turn. The listener has a multishot
 * accept; each side of a connection has a multishot receive that picks buffers from one provided-buffer
 * ring shared by all connections; the received buffers queue per direction and go out through the ring,
 * one send in flight per direction (a sendmsg of up to MAX_IOV queued buffers when several wait), and
 * return to the buffer ring once sent. Connect, shutdown and close go through the ring too. */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CLIENT, UPSTREAM };
/* user_data: a conn pointer (16-byte aligned) | op << 1 | direction; ops without a conn are bare codes. */
enum { OP_ACCEPT = 1, OP_CONNECT, OP_RECV, OP_SEND, OP_SHUTDOWN, OP_IGNORE };
#define MAX_IOV 8
#define NO_BUF (-1)

struct direction {              /* bytes received on fd[i], to be sent on fd[1 - i] */
    int head, tail;             /* queue of buffer ids, linked through next_buf[] */
    unsigned queued;
    size_t head_off;            /* bytes of the head buffer already sent */
    struct iovec iov[MAX_IOV];
    struct msghdr msg;
    bool receiving, sending, eof, shut, starved;
};

struct conn {
    int fd[2];
    int inflight;               /* requests naming this conn whose last completion has not come */
    struct direction d[2];
    bool connected, dead, reset;
} __attribute__((aligned(16)));

static struct io_uring ring;
static struct io_uring_buf_ring *buf_ring;
static char *buf_base;
static int *next_buf;
static unsigned *buf_len;
static unsigned buf_mask, buf_count, buf_free, returned, queue_cap;
static struct conn **starved;   /* conns with a side whose receive ran out of buffers; each holds a ref */
static size_t nstarved, starved_cap;
static size_t buffer_size;
static const struct relay_config *config;

static struct io_uring_sqe *sqe_for(uint64_t data)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {                 /* the submission queue is full: flush it and go on */
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
        if (!sqe)
            die("io_uring_get_sqe");
    }
    io_uring_sqe_set_data64(sqe, data);
    return sqe;
}

static uint64_t tag(struct conn *c, int op, int i) { return (uint64_t)(uintptr_t)c | (uint64_t)(op << 1) | (uint64_t)i; }

static void give_back(int bid)  /* made visible to the kernel at the end of the turn */
{
    io_uring_buf_ring_add(buf_ring, buf_base + (size_t)bid * buffer_size, (unsigned)buffer_size,
                          (unsigned short)bid, buf_mask, (int)returned++);
    buf_free++;
}

static void settle(struct conn *c);

static void arm_accept(void)
{
    /* Blocking sockets: the ring waits for a socket that is not ready. On an O_NONBLOCK socket a send
     * the peer's window cannot take completes with -EAGAIN instead. */
    io_uring_prep_multishot_accept(sqe_for(OP_ACCEPT), config->listen_fd, NULL, NULL, SOCK_CLOEXEC);
}

static void arm_recv(struct conn *c, int i)
{
    struct io_uring_sqe *sqe = sqe_for(tag(c, OP_RECV, i));
    io_uring_prep_recv_multishot(sqe, c->fd[i], NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
    c->d[i].receiving = true;
    c->inflight++;
}

static void arm_shutdown(struct conn *c, int i)
{
    io_uring_prep_shutdown(sqe_for(tag(c, OP_SHUTDOWN, i)), c->fd[1 - i], SHUT_WR);
    c->inflight++;
}

static void arm_send(struct conn *c, int i)
{
    struct direction *d = &c->d[i];
    struct io_uring_sqe *sqe;
    int n = 0;
    for (int bid = d->head; bid != NO_BUF && n < MAX_IOV; bid = next_buf[bid], n++) {
        size_t skip = n == 0 ? d->head_off : 0;
        d->iov[n].iov_base = buf_base + (size_t)bid * buffer_size + skip;
        d->iov[n].iov_len = buf_len[bid] - skip;
    }
    sqe = sqe_for(tag(c, OP_SEND, i));
    if (n == 1) {
        io_uring_prep_send(sqe, c->fd[1 - i], d->iov[0].iov_base, d->iov[0].iov_len, MSG_NOSIGNAL);
    } else {
        memset(&d->msg, 0, sizeof d->msg);
        d->msg.msg_iov = d->iov;
        d->msg.msg_iovlen = (size_t)n;
        io_uring_prep_sendmsg(sqe, c->fd[1 - i], &d->msg, MSG_NOSIGNAL);
    }
    d->sending = true;
    c->inflight++;
}

/* Receive again unless something holds it back: EOF, failure, no buffers, or a long queue (on_send
 * re-arms once the queue has drained to half). */
static void maybe_rearm(struct conn *c, int i)
{
    struct direction *d = &c->d[i];
    if (!c->dead && c->connected && !d->receiving && !d->eof && !d->starved && d->queued <= queue_cap / 2)
        arm_recv(c, i);
}

static void starve(struct conn *c, int i)
{
    if (nstarved == starved_cap) {
        starved_cap = starved_cap ? 2 * starved_cap : 64;
        starved = realloc(starved, starved_cap * sizeof *starved);
        if (!starved)
            die("realloc");
    }
    c->d[i].starved = true;
    starved[nstarved++] = c;
    c->inflight++;
}

/* At the end of a turn that left buffers free: receive again where the buffers ran out. */
static void feed_starved(void)
{
    size_t n = nstarved;
    if (!n || !buf_free)
        return;
    nstarved = 0;               /* a side that starves again re-enters the list */
    for (size_t k = 0; k < n; k++) {
        struct conn *c = starved[k];
        c->inflight--;
        for (int i = 0; i < 2; i++)
            if (c->d[i].starved) {
                c->d[i].starved = false;
                maybe_rearm(c, i);
            }
        settle(c);
    }
}

/* Cancel what is in flight; the conn is freed when the last of it has completed. */
static void fail(struct conn *c)
{
    if (c->dead)
        return;
    c->dead = c->reset = true;
    for (int side = 0; side < 2; side++)
        io_uring_prep_cancel_fd(sqe_for(OP_IGNORE), c->fd[side], IORING_ASYNC_CANCEL_ALL);
}

static void release(struct conn *c)
{
    for (int i = 0; i < 2; i++)
        for (int bid = c->d[i].head; bid != NO_BUF; bid = next_buf[bid])
            give_back(bid);
    for (int side = 0; side < 2; side++) {
        if (c->reset)
            reset_on_close(c->fd[side]);
        io_uring_prep_close(sqe_for(OP_IGNORE), c->fd[side]);
    }
    free(c);
}

/* After each completion for c: free it once nothing is in flight and nothing more is to come. */
static void settle(struct conn *c)
{
    bool done = c->d[CLIENT].shut && c->d[UPSTREAM].shut;
    if ((c->dead || done) && c->inflight == 0)
        release(c);
    else if (done)
        c->dead = true;
}

static void on_accept(struct io_uring_cqe *cqe)
{
    if (!(cqe->flags & IORING_CQE_F_MORE))
        arm_accept();
    if (cqe->res < 0) {
        if (cqe->res != -ECONNABORTED)
            fprintf(stderr, "accept: %s\n", strerror(-cqe->res));
        return;
    }
    set_nodelay(cqe->res);
    int up = upstream_socket(SOCK_CLOEXEC);
    struct conn *c = aligned_alloc(16, sizeof *c);
    if (up < 0 || !c) {
        close(cqe->res);
        if (up >= 0)
            close(up);
        free(c);
        return;
    }
    memset(c, 0, sizeof *c);
    c->fd[CLIENT] = cqe->res;
    c->fd[UPSTREAM] = up;
    for (int i = 0; i < 2; i++)
        c->d[i].head = c->d[i].tail = NO_BUF;
    io_uring_prep_connect(sqe_for(tag(c, OP_CONNECT, 0)), up, (const struct sockaddr *)&config->upstream,
                          sizeof config->upstream);
    c->inflight++;
}

static void on_connect(struct conn *c, int res)
{
    if (res < 0 || c->dead) {
        fail(c);
        return;
    }
    c->connected = true;
    arm_recv(c, CLIENT);
    arm_recv(c, UPSTREAM);
}

static void on_recv(struct conn *c, int i, struct io_uring_cqe *cqe)
{
    struct direction *d = &c->d[i];
    bool more = cqe->flags & IORING_CQE_F_MORE;
    if (!more)
        d->receiving = false;
    if (cqe->res > 0) {
        int bid = (int)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
        buf_free--;
        if (c->dead) {
            give_back(bid);
            return;
        }
        buf_len[bid] = (unsigned)cqe->res;
        next_buf[bid] = NO_BUF;
        if (d->tail == NO_BUF)
            d->head = bid;
        else
            next_buf[d->tail] = bid;
        d->tail = bid;
        d->queued++;
        if (!d->sending)
            arm_send(c, i);
        if (d->queued >= queue_cap && d->receiving) /* the far side reads slower: stop taking buffers */
            io_uring_prep_cancel64(sqe_for(OP_IGNORE), tag(c, OP_RECV, i), 0);
        else
            maybe_rearm(c, i);
    } else if (c->dead) {
        /* cancelled on failure */
    } else if (cqe->res == -ECANCELED) {
        maybe_rearm(c, i);      /* paused; the queue may have drained meanwhile */
    } else if (cqe->res == 0) {
        d->eof = true;
        if (!d->sending)
            arm_shutdown(c, i);
    } else if (cqe->res == -ENOBUFS) {
        starve(c, i);
    } else {
        fail(c);
    }
}

static void on_send(struct conn *c, int i, int res)
{
    struct direction *d = &c->d[i];
    d->sending = false;
    if (c->dead)
        return;
    if (res < 0) {
        fail(c);
        return;
    }
    size_t sent = (size_t)res;
    while (d->head != NO_BUF && sent >= buf_len[d->head] - d->head_off) {
        int bid = d->head;
        sent -= buf_len[bid] - d->head_off;
        d->head_off = 0;
        d->head = next_buf[bid];
        d->queued--;
        give_back(bid);
    }
    if (d->head == NO_BUF)
        d->tail = NO_BUF;
    d->head_off += sent;
    if (d->head != NO_BUF)
        arm_send(c, i);
    else if (d->eof)
        arm_shutdown(c, i);
    maybe_rearm(c, i);
}

static void on_completion(struct io_uring_cqe *cqe)
{
    uint64_t data = io_uring_cqe_get_data64(cqe);
    if (data == OP_ACCEPT) {
        on_accept(cqe);
        return;
    }
    if (data == OP_IGNORE)
        return;
    struct conn *c = (struct conn *)(uintptr_t)(data & ~(uint64_t)15);
    int op = (int)((data >> 1) & 7), i = (int)(data & 1);
    if (!(cqe->flags & IORING_CQE_F_MORE))
        c->inflight--;
    switch (op) {
    case OP_CONNECT:
        on_connect(c, cqe->res);
        break;
    case OP_RECV:
        on_recv(c, i, cqe);
        break;
    case OP_SEND:
        on_send(c, i, cqe->res);
        break;
    case OP_SHUTDOWN:
        if (cqe->res < 0 && cqe->res != -ENOTCONN)
            fail(c);
        c->d[i].shut = true;
        break;
    }
    settle(c);
}

static void setup_ring(void)
{
    struct io_uring_params p = {0};
    /* Task work runs only when this thread waits: fewer interruptions than the default wake-ups. */
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL;
    p.flags |= IORING_SETUP_CQSIZE;
    p.cq_entries = 16384;
    int err = io_uring_queue_init_params(4096, &ring, &p);
    if (err == -EINVAL) {       /* an older kernel: plain ring */
        memset(&p, 0, sizeof p);
        err = io_uring_queue_init_params(4096, &ring, &p);
    }
    if (err < 0) {
        errno = -err;
        die("io_uring_queue_init");
    }
}

static void setup_buffers(void)
{
    size_t ring_bytes = buf_count * sizeof(struct io_uring_buf);
    buf_ring = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    buf_base = malloc(buf_count * buffer_size);
    next_buf = calloc(buf_count, sizeof *next_buf);
    buf_len = calloc(buf_count, sizeof *buf_len);
    if (buf_ring == MAP_FAILED || !buf_base || !next_buf || !buf_len)
        die("buffers");
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)buf_ring, .ring_entries = buf_count, .bgid = 0};
    int err = io_uring_register_buf_ring(&ring, &reg, 0);
    if (err < 0) {
        errno = -err;
        die("io_uring_register_buf_ring");
    }
    io_uring_buf_ring_init(buf_ring);
    buf_mask = (unsigned)io_uring_buf_ring_mask(buf_count);
    for (unsigned bid = 0; bid < buf_count; bid++)
        give_back((int)bid);
    io_uring_buf_ring_advance(buf_ring, (int)returned);
    returned = 0;
}

int run_uring(const struct relay_config *cfg)
{
    config = cfg;
    buffer_size = cfg->buffer_size;
    buf_count = cfg->buffers;
    queue_cap = cfg->queue_cap;
    setup_ring();
    setup_buffers();
    arm_accept();

    for (;;) {
        unsigned head, seen = 0;
        struct io_uring_cqe *cqe;
        int err = io_uring_submit_and_wait(&ring, 1);
        if (err < 0 && err != -EINTR) {
            errno = -err;
            die("io_uring_submit_and_wait");
        }
        io_uring_for_each_cqe(&ring, head, cqe) {
            on_completion(cqe);
            seen++;
        }
        io_uring_cq_advance(&ring, seen);
        if (returned) {
            io_uring_buf_ring_advance(buf_ring, (int)returned);
            returned = 0;
        }
        feed_starved();
    }
}
