// SPDX-License-Identifier: GPL-2.0
/* fastmesh's outbound capture at connect(): `fastmesh capture --ebpf`.
 *
 * iptables REDIRECT rewrites every packet of a captured connection (conntrack's NAT, a route
 * lookup again for each). These programs move the connection instead, once: connect() to a
 * captured destination becomes connect() to the sidecar's outbound port on 127.0.0.1, so the
 * app and the sidecar then talk over plain loopback with no per-packet work. What the app
 * meant to reach is remembered, and given back to the sidecar by getsockopt(SO_ORIGINAL_DST),
 * as conntrack would, and to the app by getpeername(), so that neither can tell.
 *
 * The programs are attached once to the root cgroup and act only in the network namespaces
 * listed in fm_netns_cfg, each with its own rules (the same choices ISTIO_OUTPUT makes):
 * IPv4 TCP only; never loopback or an excluded port; the proxy's uid or gid only towards the
 * namespace's own addresses (to the inbound port); never an excluded network; and, when
 * include networks are given, only those. The struct layouts are mirrored in fastmesh/capture_ebpf.py. */

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SO_ORIGINAL_DST 80 /* <linux/netfilter_ipv4.h> */
#define SOL_IP 0          /* libc's, which the BPF target cannot include */
#define SOCK_STREAM 1
#define AF_INET 2
#define MAX_IDS 4
#define MAX_PORTS 16
#define MAX_NETS 16
#define MAX_LOCAL 8
#define LOOPBACK_NET 0x7f000000
#define LOOPBACK_ONE 0x7f000001

struct net4 {
    __u32 addr; /* network order, already masked */
    __u32 mask; /* network order */
};

struct netns_config {
    __u16 proxy_port;   /* host order */
    __u16 inbound_port; /* host order */
    __u8 include_all;
    __u8 n_uids, n_gids, n_ports, n_excluded, n_included, n_local;
    __u8 pad[5];
    __u32 uids[MAX_IDS];
    __u32 gids[MAX_IDS];
    __u16 excluded_ports[MAX_PORTS]; /* host order */
    struct net4 excluded[MAX_NETS];
    struct net4 included[MAX_NETS];
    __u32 local[MAX_LOCAL]; /* the namespace's own addresses, network order */
};

struct origin {
    __u64 netns;
    __u32 addr; /* network order */
    __u16 port; /* network order */
    __u16 pad;
};

struct peer {
    __u64 netns;
    __u32 addr; /* the app's end of the loopback connection, network order */
    __u32 port; /* host order */
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u64); /* netns cookie */
    __type(value, struct netns_config);
} fm_netns_cfg SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 262144);
    __type(key, __u64); /* the app socket's cookie */
    __type(value, struct origin);
} fm_by_cookie SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 262144);
    __type(key, struct peer);
    __type(value, struct origin);
} fm_by_peer SEC(".maps");

static __always_inline int in_net(const struct net4 *nets, __u8 count, __u32 addr)
{
    for (int i = 0; i < MAX_NETS; i++) {
        if (i >= count)
            break;
        if ((addr & nets[i].mask) == nets[i].addr)
            return 1;
    }
    return 0;
}

static __always_inline int is_proxy(const struct netns_config *cfg)
{
    __u64 ids = bpf_get_current_uid_gid();
    __u32 uid = (__u32)ids, gid = (__u32)(ids >> 32);
    for (int i = 0; i < MAX_IDS; i++) {
        if ((i < cfg->n_uids && cfg->uids[i] == uid) || (i < cfg->n_gids && cfg->gids[i] == gid))
            return 1;
    }
    return 0;
}

/* The sidecar port a connect() goes to instead, or 0 to leave it alone. */
static __always_inline __u16 redirect_port(const struct netns_config *cfg, __u32 addr, __u16 port)
{
    if ((bpf_ntohl(addr) & 0xff000000) == LOOPBACK_NET)
        return 0;
    for (int i = 0; i < MAX_PORTS; i++)
        if (i < cfg->n_ports && cfg->excluded_ports[i] == port)
            return 0;
    int proxy = is_proxy(cfg);
    for (int i = 0; i < MAX_LOCAL; i++)
        if (i < cfg->n_local && cfg->local[i] == addr)
            /* The pod's own address: the sidecar calling it goes to the inbound listener, as
             * ISTIO_OUTPUT's `-o lo ... -j ISTIO_IN_REDIRECT`; an app calling itself does not. */
            return proxy ? cfg->inbound_port : 0;
    if (proxy || in_net(cfg->excluded, cfg->n_excluded, addr))
        return 0;
    if (!cfg->include_all && !in_net(cfg->included, cfg->n_included, addr))
        return 0;
    return cfg->proxy_port;
}

SEC("cgroup/connect4")
int fm_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM || (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0))
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct netns_config *cfg = bpf_map_lookup_elem(&fm_netns_cfg, &netns);
    if (!cfg)
        return 1;
    __u32 addr = ctx->user_ip4;
    __u16 port = (__u16)ctx->user_port; /* network order in the low 16 bits */
    __u16 to = redirect_port(cfg, addr, bpf_ntohs(port));
    if (!to)
        return 1;
    struct origin origin = {.netns = netns, .addr = addr, .port = port};
    __u64 cookie = bpf_get_socket_cookie(ctx);
    bpf_map_update_elem(&fm_by_cookie, &cookie, &origin, BPF_ANY);
    ctx->user_ip4 = bpf_htonl(LOOPBACK_ONE);
    ctx->user_port = bpf_htons(to);
    return 1;
}

/* Once the kernel has picked the app's port: the sidecar knows the app by that port. */
SEC("sockops")
int fm_sockops(struct bpf_sock_ops *ops)
{
    if (ops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ops);
    struct origin *origin = bpf_map_lookup_elem(&fm_by_cookie, &cookie);
    if (!origin)
        return 1;
    struct peer peer = {.netns = origin->netns, .addr = ops->local_ip4, .port = ops->local_port};
    bpf_map_update_elem(&fm_by_peer, &peer, origin, BPF_ANY);
    return 1;
}

/* The sidecar's getsockopt(SO_ORIGINAL_DST) on the connection it accepted from the app. */
SEC("cgroup/getsockopt")
int fm_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct peer peer = {.netns = bpf_get_netns_cookie(ctx), .addr = sk->dst_ip4,
                        .port = bpf_ntohs(sk->dst_port)};
    struct origin *origin = bpf_map_lookup_elem(&fm_by_peer, &peer);
    if (!origin)
        return 1;
    struct sockaddr_in *out = ctx->optval;
    if ((void *)(out + 1) > ctx->optval_end)
        return 1; /* a buffer too small for a sockaddr_in: the kernel's answer stands */
    __builtin_memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = origin->port;
    out->sin_addr.s_addr = origin->addr;
    ctx->optlen = sizeof(*out);
    asm volatile("" ::: "memory"); /* two 4-byte stores: the verifier refuses one 8-byte store */
    ctx->retval = 0;
    return 1;
}

/* The app asking whom it is connected to hears the address it dialled. */
SEC("cgroup/getpeername4")
int fm_getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct origin *origin = bpf_map_lookup_elem(&fm_by_cookie, &cookie);
    if (!origin)
        return 1;
    ctx->user_ip4 = origin->addr;
    ctx->user_port = origin->port;
    return 1;
}

char LICENSE[] SEC("license") = "GPL";
