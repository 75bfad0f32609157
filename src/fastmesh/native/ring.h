/* A worker's io_uring, used to make many system calls in one (`Engine(io_uring=True)`): a loop turn's
 * receives go in one submission and its sends in another. Every request carries MSG_DONTWAIT on a
 * non-blocking socket, so it completes inside the submission (-EAGAIN when the socket has nothing to
 * give or no room): the engine's readiness model and state machine stay as they are, and no request
 * outlives the call that made it. Built without liburing (FM_HAVE_LIBURING undefined), fm_ring_new()
 * says io_uring is unavailable and nothing else is reached. */
#ifndef FASTMESH_RING_H
#define FASTMESH_RING_H

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define FM_RING_BATCH 256   /* requests in one submission; a longer phase is run in several */

enum { FM_OP_RECV = 0, FM_OP_SEND = 1 };

#ifdef FM_HAVE_LIBURING
#include <liburing.h>
#endif

typedef struct fm_ring {
#ifdef FM_HAVE_LIBURING
    struct io_uring uring;
#endif
    unsigned count;                         /* requests queued for the next run */
    unsigned long long data[FM_RING_BATCH]; /* the caller's tag of each request, in queue order */
    int fd[FM_RING_BATCH];
    char *buf[FM_RING_BATCH];
    size_t len[FM_RING_BATCH];
    int op[FM_RING_BATCH];
    ssize_t res[FM_RING_BATCH];             /* after a run: each request's result, recv/send-like */
    int err[FM_RING_BATCH];                 /* and its errno when res is -1 */
    unsigned long long submissions;         /* runs that entered the kernel */
    unsigned long long fallbacks;           /* runs made (in part) as plain calls: the ring refused them */
    int broken;                             /* a submission was refused: plain calls from then on */
} fm_ring;

static inline int fm_ring_built(void)
{
#ifdef FM_HAVE_LIBURING
    return 1;
#else
    return 0;
#endif
}

/* NULL and *err set (an errno) when this build or this kernel has no io_uring for us. */
static fm_ring *fm_ring_new(int *err)
{
#ifdef FM_HAVE_LIBURING
    fm_ring *r = calloc(1, sizeof *r);
    int ret;
    if (r == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    /* SUBMIT_ALL: a request that fails to submit does not hold back the ones after it. */
    ret = io_uring_queue_init(FM_RING_BATCH, &r->uring, IORING_SETUP_SUBMIT_ALL);
    if (ret < 0) {
        free(r);
        *err = -ret;
        return NULL;
    }
    return r;
#else
    *err = ENOSYS;
    return NULL;
#endif
}

static void fm_ring_free(fm_ring *r)
{
    if (r == NULL)
        return;
#ifdef FM_HAVE_LIBURING
    io_uring_queue_exit(&r->uring);
#endif
    free(r);
}

static inline int fm_ring_full(const fm_ring *r) { return r->count == FM_RING_BATCH; }

static inline void fm_ring_queue(fm_ring *r, int op, int fd, char *buf, size_t len, unsigned long long data)
{
    unsigned i = r->count++;
    r->op[i] = op;
    r->fd[i] = fd;
    r->buf[i] = buf;
    r->len[i] = len;
    r->data[i] = data;
}

static void fm_ring_plain(fm_ring *r, unsigned i)
{
    r->res[i] = r->op[i] == FM_OP_RECV ? recv(r->fd[i], r->buf[i], r->len[i], MSG_DONTWAIT)
                                       : send(r->fd[i], r->buf[i], r->len[i], MSG_NOSIGNAL | MSG_DONTWAIT);
    r->err[i] = r->res[i] < 0 ? errno : 0;
}

/* Completions of the first `n` requests of the last submission, into res[] and err[]. */
static void fm_ring_reap(fm_ring *r, unsigned n)
{
#ifdef FM_HAVE_LIBURING
    unsigned seen = 0;
    while (seen < n) {
        struct io_uring_cqe *cqe;
        unsigned head, took = 0, i;
        int ret = io_uring_wait_cqe(&r->uring, &cqe);   /* no system call: they completed in the submit */
        if (ret == -EINTR)
            continue;
        if (ret < 0) {   /* cannot happen with requests that complete inline; should it, they fail */
            for (i = 0; i < n; i++)
                if (r->err[i] == -1) {
                    r->res[i] = -1;
                    r->err[i] = -ret;
                }
            r->broken = 1;
            return;
        }
        io_uring_for_each_cqe(&r->uring, head, cqe) {
            i = (unsigned)io_uring_cqe_get_data64(cqe);
            r->res[i] = cqe->res < 0 ? -1 : cqe->res;
            r->err[i] = cqe->res < 0 ? -cqe->res : 0;
            took++;
        }
        io_uring_cq_advance(&r->uring, took);
        seen += took;
    }
#endif
}

/* Make the queued calls, in one submission when the ring takes them, as plain calls when it does not
 * (after which the ring is not used again: requests it left queued must never run). Afterwards res[i]
 * and err[i] hold request i's result. Returns how many there were. */
static unsigned fm_ring_run(fm_ring *r)
{
    unsigned n = r->count, i, taken = 0;
    r->count = 0;
    if (n == 0)
        return 0;
#ifdef FM_HAVE_LIBURING
    if (!r->broken) {
        int ret;
        for (i = 0; i < n; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&r->uring);
            if (r->op[i] == FM_OP_RECV)
                io_uring_prep_recv(sqe, r->fd[i], r->buf[i], r->len[i], MSG_DONTWAIT);
            else
                io_uring_prep_send(sqe, r->fd[i], r->buf[i], r->len[i], MSG_NOSIGNAL | MSG_DONTWAIT);
            io_uring_sqe_set_data64(sqe, i);
            r->err[i] = -1;
        }
        ret = io_uring_submit(&r->uring);
        taken = ret < 0 ? 0 : (unsigned)ret > n ? n : (unsigned)ret;
        if (taken < n)
            r->broken = 1;   /* the kernel took the first `taken` (in order); the rest run plainly */
        r->submissions++;
        fm_ring_reap(r, taken);
    }
#endif
    if (taken < n)
        r->fallbacks++;
    for (i = taken; i < n; i++)
        fm_ring_plain(r, i);
    return n;
}

#endif
