/* The batch backend: fastmesh's readiness model (each socket registered once with epoll, edge-triggered,
 * its readiness remembered per side) with the loop turn's system calls gathered into io_uring: every
 * receive the turn's events allow goes in one submission, then every send those receives made possible
 * in another. Each request carries MSG_DONTWAIT, so it completes inside the submission (a socket with
 * nothing to give or no room answers -EAGAIN at once): the ring is a way to make many calls in one, not
 * a completion model, and a connection's state is settled at the end of each phase as with plain calls.
 * The question it answers: is io_uring's gain the fewer kernel entries, which this shape keeps, or the
 * completion model (multishot receives, deferred task work) of uring.c, which it does not. */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CLIENT, UPSTREAM };
#define MAX_EVENTS 512
#define ROUNDS 8                /* receive/send phases a turn gives a connection before the next epoll_wait */

struct direction {              /* bytes read from fd[i], to be written to fd[1 - i] */
    char *buf;
    size_t off, len;
    bool eof, shut;
};

struct conn {
    int fd[2];
    bool readable[2], writable[2];
    bool hup[2];                /* the peer's FIN (EPOLLRDHUP) or an error was reported */
    struct direction d[2];
    bool connected, dead, queued;
    struct conn *next_ready, *next_dead;
};

static int ep;
static struct io_uring ring;
static size_t buffer_size;
static struct conn *ready, *dead_list;

static uint64_t tag(struct conn *c, int side) { return (uint64_t)(uintptr_t)c | (uint64_t)side; }

static void enqueue(struct conn *c)
{
    if (!c->queued) {
        c->queued = true;
        c->next_ready = ready;
        ready = c;
    }
}

static void finish(struct conn *c, bool reset)
{
    if (c->dead)
        return;
    c->dead = true;
    for (int side = 0; side < 2; side++) {
        if (reset)
            reset_on_close(c->fd[side]);
        close(c->fd[side]);
    }
    c->next_dead = dead_list;
    dead_list = c;
}

typedef void settle_fn(struct conn *, int, int);

static void run_phase(unsigned count, settle_fn *settle);

/* A request of the phase; when the submission queue is full, what it holds is run first. */
static struct io_uring_sqe *sqe_for(uint64_t data, unsigned *count, settle_fn *settle)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
        run_phase(*count, settle);
        *count = 0;
        sqe = io_uring_get_sqe(&ring);
        if (!sqe)
            die("io_uring_get_sqe");
    }
    io_uring_sqe_set_data64(sqe, data);
    ++*count;
    return sqe;
}

/* Submit what the phase prepared and take every completion; `settle` applies one to its connection. */
static void run_phase(unsigned count, settle_fn *settle)
{
    if (!count)
        return;
    int err = io_uring_submit_and_wait(&ring, count);
    if (err < 0) {
        errno = -err;
        die("io_uring_submit_and_wait");
    }
    unsigned head, seen = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&ring, head, cqe) {
        uint64_t data = io_uring_cqe_get_data64(cqe);
        settle((struct conn *)(uintptr_t)(data & ~(uint64_t)1), (int)(data & 1), cqe->res);
        seen++;
    }
    io_uring_cq_advance(&ring, seen);
    if (seen != count)
        die("a MSG_DONTWAIT request did not complete inside its submission");
}

static void received(struct conn *c, int i, int res)
{
    struct direction *d = &c->d[i];
    if (c->dead)
        return;
    if (res > 0) {
        d->len = (size_t)res;
        /* A short read drained the socket and a new edge will come; not so once the FIN is in, which a
         * short read may have stopped at and no later edge announces. */
        if ((size_t)res < buffer_size && !c->hup[i])
            c->readable[i] = false;
    } else if (res == 0) {
        d->eof = true;
    } else if (res == -EAGAIN) {
        c->readable[i] = false;
    } else {
        finish(c, true);
    }
}

static void sent(struct conn *c, int i, int res)
{
    struct direction *d = &c->d[i];
    if (c->dead)
        return;
    if (res > 0) {
        d->off += (size_t)res;
        d->len -= (size_t)res;
        if (d->len)
            c->writable[1 - i] = false; /* a short send filled the socket: wait for EPOLLOUT */
        else
            d->off = 0;
    } else if (res == -EAGAIN) {
        c->writable[1 - i] = false;
    } else {
        finish(c, true);
    }
}

static bool can_receive(struct conn *c, int i)
{
    return c->connected && c->readable[i] && !c->d[i].eof && c->d[i].len == 0;
}

static bool can_send(struct conn *c, int i)
{
    return c->d[i].len && c->writable[1 - i];
}

/* Receive phase, send phase, then the ends of stream, up to ROUNDS times while any connection can move. */
static void run_ready(void)
{
    for (int round = 0; round < ROUNDS && ready; round++) {
        unsigned count = 0;
        for (struct conn *c = ready; c; c = c->next_ready)
            for (int i = 0; i < 2 && !c->dead; i++)
                if (can_receive(c, i))
                    io_uring_prep_recv(sqe_for(tag(c, i), &count, received), c->fd[i], c->d[i].buf, buffer_size,
                                       MSG_DONTWAIT);
        run_phase(count, received);
        count = 0;
        for (struct conn *c = ready; c; c = c->next_ready)
            for (int i = 0; i < 2 && !c->dead; i++)
                if (can_send(c, i))
                    io_uring_prep_send(sqe_for(tag(c, i), &count, sent), c->fd[1 - i], c->d[i].buf + c->d[i].off,
                                       c->d[i].len, MSG_NOSIGNAL | MSG_DONTWAIT);
        run_phase(count, sent);
        struct conn *again = NULL, *next;
        for (struct conn *c = ready; c; c = next) {
            next = c->next_ready;
            c->queued = false;
            for (int i = 0; i < 2 && !c->dead; i++)
                if (c->d[i].eof && !c->d[i].len && !c->d[i].shut) {
                    shutdown(c->fd[1 - i], SHUT_WR);
                    c->d[i].shut = true;
                }
            if (!c->dead && c->d[CLIENT].shut && c->d[UPSTREAM].shut)
                finish(c, false);
            if (!c->dead && (can_receive(c, 0) || can_receive(c, 1) || can_send(c, 0) || can_send(c, 1))) {
                c->queued = true;
                c->next_ready = again;
                again = c;
            }
        }
        ready = again;
    }
}

static void on_event(struct conn *c, int side, uint32_t events)
{
    if (c->dead)
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->readable[side] = true;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        c->hup[side] = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        c->writable[side] = true;
    if (side == UPSTREAM && !c->connected) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd[UPSTREAM], SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, true);
            return;
        }
        c->connected = true;
    }
    enqueue(c);
}

static bool watch(struct conn *c, int side)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = tag(c, side)};
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd[side], &ev) == 0;
}

static bool adopt(int fds[2], bool connected)
{
    struct conn *c = calloc(1, sizeof *c + 2 * buffer_size);
    if (!c)
        return false;
    c->fd[CLIENT] = fds[0];
    c->fd[UPSTREAM] = fds[1];
    c->d[0].buf = (char *)(c + 1);
    c->d[1].buf = c->d[0].buf + buffer_size;
    c->connected = connected;
    if (!watch(c, CLIENT) || !watch(c, UPSTREAM))
        finish(c, true);   /* closes both: taken all the same */
    return true;
}

int run_batch(const struct relay_config *cfg)
{
    struct epoll_event events[MAX_EVENTS];
    buffer_size = cfg->buffer_size;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.u64 = 0};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, cfg->listen_fd, &lev) < 0)
        die("epoll_ctl listen");
    int err = io_uring_queue_init(1024, &ring, IORING_SETUP_SINGLE_ISSUER);
    if (err < 0) {
        errno = -err;
        die("io_uring_queue_init");
    }

    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, ready ? 0 : -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int k = 0; k < n; k++) {
            uint64_t t = events[k].data.u64;
            if (t == 0)
                accept_clients(cfg, adopt);
            else
                on_event((struct conn *)(uintptr_t)(t & ~(uint64_t)1), (int)(t & 1), events[k].events);
        }
        run_ready();
        while (dead_list) {
            struct conn *c = dead_list;
            dead_list = c->next_dead;
            free(c);
        }
    }
}
