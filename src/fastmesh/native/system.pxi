# Small wrappers around the system calls every piece uses.


cdef inline double now_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline void set_nodelay(int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


cdef inline void close_with_reset(int fd) noexcept nogil:
    # SO_LINGER 0 makes close() send RST instead of FIN.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    close(fd)


cdef inline int socket_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef inline void wake(Worker *w) noexcept nogil:
    cdef uint64_t one = 1
    write(w.wakefd, &one, sizeof(one))
