/* The epoll backend: fastmesh's small-request shape. One level-triggered epoll loop; each connection has a
 * buffer per direction; a readable side is read once into its empty buffer and the bytes are sent on at
 * once, so a request costs a recv and a send each way. A side is watched only for what it can do next:
 * readable while its buffer is empty, writable while the other direction has bytes left for it. */
#define _GNU_SOURCE
#include "relay.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { CLIENT, UPSTREAM };

struct direction {         /* bytes read from fd[i], to be written to fd[1 - i] */
    char *buf;
    size_t off, len;
    bool eof;              /* fd[i] said EOF */
    bool shut;             /* and fd[1 - i] was shut down for writing after the last byte */
};

struct conn {
    int fd[2];
    uint32_t watched[2];   /* epoll interest now registered per fd; 0: not registered */
    struct direction d[2];
    bool connected, dead;
    struct conn *next_dead;
};

static int ep;
static size_t buffer_size;
static struct conn *dead_list;   /* freed after the batch of events that may still name them */

static uint64_t tag(struct conn *c, int side) { return (uint64_t)(uintptr_t)c | (uint64_t)side; }

static void watch(struct conn *c, int side, uint32_t want)
{
    if (c->watched[side] == want)
        return;
    struct epoll_event ev = {.events = want, .data.u64 = tag(c, side)};
    int op = !c->watched[side] ? EPOLL_CTL_ADD : !want ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(ep, op, c->fd[side], &ev) < 0)
        die("epoll_ctl");
    c->watched[side] = want;
}

/* Unwatched rather than watched for nothing: level-triggered EPOLLHUP would wake the loop forever. */
static void rewatch(struct conn *c)
{
    for (int side = 0; side < 2; side++) {
        uint32_t want = 0;
        if (side == UPSTREAM && !c->connected)
            want = EPOLLOUT;
        else if (c->connected) {
            if (!c->d[side].eof && c->d[side].len == 0)
                want |= EPOLLIN;
            if (c->d[1 - side].len)
                want |= EPOLLOUT;
        }
        watch(c, side, want);
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
        close(c->fd[side]);   /* also leaves the epoll set */
    }
    c->next_dead = dead_list;
    dead_list = c;
}

/* Send what direction i holds to the other side; after its last byte, pass the EOF on. */
static void flush(struct conn *c, int i)
{
    struct direction *d = &c->d[i];
    while (d->len) {
        ssize_t n = send(c->fd[1 - i], d->buf + d->off, d->len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN)
                finish(c, true);
            return;
        }
        d->off += (size_t)n;
        d->len -= (size_t)n;
    }
    d->off = 0;
    if (d->eof && !d->shut) {
        shutdown(c->fd[1 - i], SHUT_WR);
        d->shut = true;
    }
}

static void receive(struct conn *c, int i)
{
    struct direction *d = &c->d[i];
    ssize_t n = recv(c->fd[i], d->buf, buffer_size, 0);
    if (n < 0) {
        if (errno != EAGAIN)
            finish(c, true);
        return;
    }
    if (n == 0)
        d->eof = true;
    d->len = (size_t)n;
    flush(c, i);
}

static void on_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd[UPSTREAM], SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
        finish(c, true);
    else
        c->connected = true;
}

static void on_event(struct conn *c, int side, uint32_t events)
{
    if (c->dead)
        return;
    if (side == UPSTREAM && !c->connected) {
        on_connected(c);
    } else if (events & EPOLLERR) {
        finish(c, true);
    } else {
        if ((events & (EPOLLIN | EPOLLHUP)) && (c->watched[side] & EPOLLIN))
            receive(c, side);
        if (!c->dead && (events & EPOLLOUT) && c->d[1 - side].len)
            flush(c, 1 - side);
    }
    if (c->dead)
        return;
    if (c->d[CLIENT].shut && c->d[UPSTREAM].shut)
        finish(c, false);
    else
        rewatch(c);
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
    rewatch(c);
    return true;
}

int run_epoll(const struct relay_config *cfg)
{
    struct epoll_event events[512];
    buffer_size = cfg->buffer_size;
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.u64 = 0};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, cfg->listen_fd, &lev) < 0)
        die("epoll_ctl listen");

    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int k = 0; k < n; k++) {
            uint64_t t = events[k].data.u64;
            if (t == 0)
                accept_clients(cfg, adopt);
            else
                on_event((struct conn *)(uintptr_t)(t & ~(uint64_t)1), (int)(t & 1), events[k].events);
        }
        while (dead_list) {
            struct conn *c = dead_list;
            dead_list = c->next_dead;
            free(c);
        }
    }
}
