# Pipes, copy buffers and shared peer frames: what a direction holds only while
# it has bytes in flight, kept in small per-worker pools for reuse.


cdef bint take_pipe(Worker *w, Flow *f) noexcept nogil:
    cdef int fds[2]
    cdef int cap
    if w.npool > 0:
        w.npool -= 1
        w.npool_low = min(w.npool_low, w.npool)
        w.stats[S_PIPES_POOLED] -= 1
        f.pipe_r = w.pool_r[w.npool]
        f.pipe_w = w.pool_w[w.npool]
        f.pipe_cap = w.pool_cap[w.npool]
    else:
        if <int>w.stats[S_PIPES_IN_USE] >= w.max_pipes:
            return False
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return False
        if w.pipe_size > 0:
            fcntl(fds[1], F_SETPIPE_SZ, w.pipe_size)  # may be refused; the size read back is what counts
        cap = fcntl(fds[1], F_GETPIPE_SZ)
        f.pipe_r = fds[0]
        f.pipe_w = fds[1]
        f.pipe_cap = cap if cap > 0 else 65536
    w.stats[S_PIPES_IN_USE] += 1
    return True


cdef void give_pipe(Worker *w, Flow *f) noexcept nogil:
    # Only an empty pipe can be reused; one still holding bytes is closed with them.
    if f.pending == 0 and w.npool < POOL_KEEP:
        w.pool_r[w.npool] = f.pipe_r
        w.pool_w[w.npool] = f.pipe_w
        w.pool_cap[w.npool] = f.pipe_cap
        w.npool += 1
        w.stats[S_PIPES_POOLED] += 1
    else:
        close(f.pipe_r)
        close(f.pipe_w)
    f.pipe_r = -1
    f.pipe_w = -1
    w.stats[S_PIPES_IN_USE] -= 1


cdef bint take_buf(Worker *w, Flow *f) noexcept nogil:
    if w.nbufs > 0:
        w.nbufs -= 1
        w.nbufs_low = min(w.nbufs_low, w.nbufs)
        f.buf = w.bufs[w.nbufs]
    else:
        f.buf = <char *>malloc(w.buffer_size)
        if f.buf == NULL:
            return False
    f.buf_off = 0
    w.stats[S_BUFFERS_IN_USE] += 1
    return True


cdef void give_buf(Worker *w, Flow *f) noexcept nogil:
    if w.nbufs < POOL_KEEP:
        w.bufs[w.nbufs] = f.buf
        w.nbufs += 1
    else:
        free(f.buf)
    f.buf = NULL
    w.stats[S_BUFFERS_IN_USE] -= 1


cdef void release_flow(Worker *w, Flow *f) noexcept nogil:
    if f.pipe_r >= 0:
        give_pipe(w, f)
    if f.buf != NULL:
        give_buf(w, f)
    f.pending = 0


cdef void trim_pools(Worker *w) noexcept nogil:
    # At each sweep: the pooled pipes and buffers no connection took since the last one go,
    # down to POOL_IDLE_KEEP, so that after a burst the fds and memory return to what the
    # steady load needs; a worker left with no connection also gives freed heap back.
    cdef int spare = min(w.npool_low, w.npool - POOL_IDLE_KEEP)
    while spare > 0:
        w.npool -= 1
        close(w.pool_r[w.npool])
        close(w.pool_w[w.npool])
        w.stats[S_PIPES_POOLED] -= 1
        spare -= 1
    spare = min(w.nbufs_low, w.nbufs - POOL_IDLE_KEEP)
    while spare > 0:
        w.nbufs -= 1
        free(w.bufs[w.nbufs])
        spare -= 1
    w.npool_low = w.npool
    w.nbufs_low = w.nbufs
    if w.conns == NULL and w.trim_heap:
        w.trim_heap = False
        malloc_trim(0)


cdef inline bint pools_to_trim(Worker *w) noexcept nogil:
    return w.npool > POOL_IDLE_KEEP or w.nbufs > POOL_IDLE_KEEP or w.trim_heap


cdef void free_pools(Worker *w) noexcept nogil:
    cdef int i
    for i in range(w.npool):
        close(w.pool_r[i])
        close(w.pool_w[i])
    w.npool = 0
    for i in range(w.nbufs):
        free(w.bufs[i])
    w.nbufs = 0
    for i in range(w.nkept):
        release_frame(w.kept[i])
    w.nkept = 0


# ---------------------------------------------------------------- shared peer frames

cdef void release_frame(Frame *f) noexcept nogil:
    if f != NULL:
        f.refs -= 1
        if f.refs == 0:
            free(f.data)
            free(f)


cdef Frame *share_frame(Worker *w, char *data, uint32_t length) noexcept nogil:
    # A reference to a frame holding `data`, which it takes over: one the worker
    # keeps if the same bytes came before, else a new one, kept for the connections
    # to come. NULL without memory.
    cdef Frame *f
    cdef int i
    for i in range(w.nkept):
        f = w.kept[i]
        if f.len == length and memcmp(f.data, data, length) == 0:
            free(data)
            f.refs += 1
            w.stats[S_EXCHANGE_FRAMES_SHARED] += 1
            return f
    f = <Frame *>malloc(sizeof(Frame))
    if f == NULL:
        free(data)
        return NULL
    f.data = data
    f.len = length
    f.refs = 1
    if length <= FRAME_CHUNK:  # a large frame is not kept: what a peer can pin stays small
        if w.nkept < FRAMES_KEPT:
            w.nkept += 1
        else:
            release_frame(w.kept[w.kept_next])  # connections still holding it keep it alive
        w.kept[w.kept_next] = f
        w.kept_next = (w.kept_next + 1) % FRAMES_KEPT
        f.refs += 1
    return f
