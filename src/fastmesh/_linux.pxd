# The Linux and POSIX calls the relay engine makes, declared for Cython.
# Only what _core.pyx uses; everything here is callable without the GIL.

from libc.stdint cimport uint16_t, uint32_t, uint64_t


cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef long loff_t


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t read(int fd, void *buf, size_t count)


cdef extern from "<fcntl.h>" nogil:
    int O_NONBLOCK
    int O_CLOEXEC
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int F_GETFL
    int F_SETFL
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out,
                   size_t length, unsigned int flags)
    int pipe2(int pipefd[2], int flags)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLL_CTL_MOD
    uint32_t EPOLLIN
    uint32_t EPOLLOUT
    uint32_t EPOLLERR
    uint32_t EPOLLHUP
    uint32_t EPOLLRDHUP
    uint32_t EPOLLET
    uint32_t EPOLLEXCLUSIVE
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    int EFD_NONBLOCK
    int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct linger:
        int l_onoff
        int l_linger

    int AF_INET
    int AF_INET6
    int SOCK_STREAM
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int SOL_SOCKET
    int SO_ERROR
    int SO_LINGER
    int SHUT_WR
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int MSG_PEEK

    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int getsockname(int fd, sockaddr *addr, socklen_t *addrlen)
    int shutdown(int fd, int how)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)


cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP
    int IPPROTO_IP
    int IPPROTO_IPV6

    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t htons(uint16_t x)
    uint32_t htonl(uint32_t x)
    uint32_t ntohl(uint32_t x)
    uint32_t INADDR_LOOPBACK
    const in6_addr in6addr_any
    const in6_addr in6addr_loopback


cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)


cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    struct timespec:
        time_t tv_sec
        long tv_nsec

    int CLOCK_MONOTONIC
    int clock_gettime(int clk_id, timespec *tp)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass

    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
