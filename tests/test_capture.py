"""`fastmesh capture` / `uncapture`: istio-iptables' nat rules, `-m TPROXY`'s mangle rules and
`--ebpf`'s capture at connect(), checked as text (`--dry-run` and `iptables-save`) and by where
connections actually go. Every test that touches iptables
does it in network namespaces of its own, removed at the end, also when the test fails;
the host's own namespace is never touched. Needs root, iproute2 and iptables."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import IP, PEER, POD, ebpf_unavailable, netns_unavailable, sh
from fastmesh import capture_ebpf
from fastmesh.cli import main

if netns_unavailable():
    pytest.skip(netns_unavailable(), allow_module_level=True)

NAT_BUILT_INS = ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
OUR_CHAINS = ":ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"

# istio-iptables' rules for the defaults (-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x ''
# -b '*' -d 15090,15021), by chain, as iptables-save lists them.
DEFAULT_CHAINS = textwrap.dedent("""\
    -A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN
    -A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
    -A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
    -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
    -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
    -A ISTIO_OUTPUT -s {passthrough} -o lo -j RETURN
    -A ISTIO_OUTPUT ! -d {loopback} -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
    -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
    -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
    -A ISTIO_OUTPUT ! -d {loopback} -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
    -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
    -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
    -A ISTIO_OUTPUT -d {loopback} -j RETURN
    -A ISTIO_OUTPUT -j ISTIO_REDIRECT
    -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
    """)
DEFAULT_JUMPS = "-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
DEFAULT_V4 = DEFAULT_CHAINS.format(passthrough="127.0.0.6/32", loopback="127.0.0.1/32")
DEFAULT_V6 = DEFAULT_CHAINS.format(passthrough="::6/128", loopback="::1/128")

FLAGS = ["-p", "15011", "-z", "15016", "-u", "1000", "-g", "1001", "-i", "10.0.0.0/8,fd00::/8",
         "-x", "10.96.0.5/12", "-b", "9080,9081", "-o", "3306", "-k", "eth1"]
FLAGS_RULES = textwrap.dedent("""\
    -A PREROUTING -d {include} -i eth1 -m comment --comment "Kubevirt outbound redirect" -j ISTIO_REDIRECT
    -A PREROUTING -i eth1 -m comment --comment "Kubevirt outbound redirect" -j RETURN
    -A PREROUTING -p tcp -j ISTIO_INBOUND
    -A OUTPUT -p tcp -j ISTIO_OUTPUT
    -A ISTIO_INBOUND -p tcp -m tcp --dport 9080 -j ISTIO_IN_REDIRECT
    -A ISTIO_INBOUND -p tcp -m tcp --dport 9081 -j ISTIO_IN_REDIRECT
    -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15016
    -A ISTIO_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN
    -A ISTIO_OUTPUT -s {passthrough} -o lo -j RETURN
    -A ISTIO_OUTPUT ! -d {loopback} -o lo -m owner --uid-owner 1000 -j ISTIO_IN_REDIRECT
    -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1000 -j RETURN
    -A ISTIO_OUTPUT -m owner --uid-owner 1000 -j RETURN
    -A ISTIO_OUTPUT ! -d {loopback} -o lo -m owner --gid-owner 1001 -j ISTIO_IN_REDIRECT
    -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1001 -j RETURN
    -A ISTIO_OUTPUT -m owner --gid-owner 1001 -j RETURN
    -A ISTIO_OUTPUT -d {loopback} -j RETURN
    {exclude}-A ISTIO_OUTPUT -d {include} -j ISTIO_REDIRECT
    -A ISTIO_OUTPUT -j RETURN
    -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15011
    """)

# Rules of someone else's that were there before capture and must survive it.
FOREIGN = [("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "ACCEPT"),
           ("iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.79.9.9/32", "-p", "tcp", "-j", "ACCEPT"),
           ("iptables", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"),
           ("ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "ACCEPT"),
           ("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "ACCEPT"),
           ("ip6tables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "ACCEPT")]

NO_NET_ADMIN = ("fastmesh capture: capture needs CAP_NET_ADMIN in this network namespace (run as root, or as "
                "an init container with NET_ADMIN and NET_RAW)\n")


@pytest.fixture
def pod(joined_netns):
    """(pod, peer): joined_netns's two namespaces, with some rules of someone else's in the pod."""
    pod, peer = joined_netns
    for rule in FOREIGN:
        sh(IP, "netns", "exec", pod, *rule)
    return pod, peer


def fastmesh(ns: str, *args: str, prefix: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI, run inside `ns` (after `prefix`, e.g. setpriv)."""
    return subprocess.run([IP, "netns", "exec", ns, *prefix, sys.executable, "-m", "fastmesh", *args],
                          check=False, capture_output=True, text=True, timeout=60, env=env)


def saved(ns: str, *args: str) -> str:
    """iptables-save and ip6tables-save in `ns` (args: e.g. -t nat), without the comment
    lines and with counters zeroed."""
    text = "".join(sh(IP, "netns", "exec", ns, tool, *args).stdout for tool in ("iptables-save", "ip6tables-save"))
    return re.sub(r"\[\d+:\d+\]", "[0:0]", "".join(line for line in text.splitlines(True) if not line.startswith("#")))


def dry_run(capsys, *flags: str) -> str:
    assert main(["capture", "--dry-run", *flags]) == 0
    return capsys.readouterr().out


def nat(rules: str) -> str:
    return f"*nat\n{NAT_BUILT_INS}{OUR_CHAINS}{rules}COMMIT\n"


def test_dry_run_prints_istio_iptables_rules_for_the_defaults(capsys):
    assert dry_run(capsys) == (f"# iptables-save -t nat (IPv4)\n{nat(DEFAULT_JUMPS + DEFAULT_V4)}"
                               f"# ip6tables-save -t nat (IPv6)\n{nat(DEFAULT_JUMPS + DEFAULT_V6)}")


def test_dry_run_follows_every_flag(capsys):
    v4 = FLAGS_RULES.format(include="10.0.0.0/8", passthrough="127.0.0.6/32", loopback="127.0.0.1/32",
                            exclude="-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN\n")
    v6 = FLAGS_RULES.format(include="fd00::/8", passthrough="::6/128", loopback="::1/128", exclude="")
    assert dry_run(capsys, *FLAGS) == (f"# iptables-save -t nat (IPv4)\n{nat(v4)}"
                                       f"# ip6tables-save -t nat (IPv6)\n{nat(v6)}")


MANGLE_BUILT_INS = (":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                    ":POSTROUTING ACCEPT [0:0]\n")
# -m TPROXY's inbound rules for the defaults: no conntrack, the SYNs to the transparent listener.
TPROXY_RULES = textwrap.dedent("""\
    -A PREROUTING ! -i lo -p tcp -j ISTIO_INBOUND
    -A ISTIO_INBOUND -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket -j RETURN
    -A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN
    -A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
    -A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
    -A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
    -A ISTIO_TPROXY ! -d {loopback} -p tcp -j TPROXY --on-port 15006 --on-ip {any} --tproxy-mark 0x0/0x0
    """)


def mangle(rules: str) -> str:
    return f"*mangle\n{MANGLE_BUILT_INS}:ISTIO_INBOUND - [0:0]\n:ISTIO_TPROXY - [0:0]\n{rules}COMMIT\n"


def outbound_only(rules: str) -> str:
    """The default nat rules without the inbound ones (-m TPROXY takes those)."""
    return "".join(line for line in rules.splitlines(True) if not line.startswith("-A ISTIO_INBOUND "))


def test_dry_run_of_tproxy_moves_inbound_to_the_mangle_table(capsys):
    v4_nat = nat("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n" + outbound_only(DEFAULT_V4))
    v6_nat = nat("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n" + outbound_only(DEFAULT_V6))
    assert dry_run(capsys, "-m", "TPROXY") == (
        f"# iptables-save -t nat (IPv4)\n{v4_nat}"
        f"# iptables-save -t mangle (IPv4)\n{mangle(TPROXY_RULES.format(loopback='127.0.0.1/32', any='0.0.0.0'))}"
        f"# ip6tables-save -t nat (IPv6)\n{v6_nat}"
        f"# ip6tables-save -t mangle (IPv6)\n{mangle(TPROXY_RULES.format(loopback='::1/128', any='::'))}")


def test_dry_run_of_ebpf_leaves_ipv4_no_nat_rule(capsys):
    ebpf_line = ("# eBPF (capture.bpf.o, on the root cgroup, for this network namespace): IPv4 TCP connect() to a "
                 "captured destination goes to 127.0.0.1:15001\n")
    v4_inbound = "".join(line for line in DEFAULT_V4.splitlines(True)
                         if line.startswith(("-A ISTIO_INBOUND ", "-A ISTIO_IN_REDIRECT ", "-A ISTIO_REDIRECT ")))
    assert dry_run(capsys, "--ebpf") == (
        f"# iptables-save -t nat (IPv4)\n{nat('-A PREROUTING -p tcp -j ISTIO_INBOUND' + chr(10) + v4_inbound)}"
        f"# ip6tables-save -t nat (IPv6)\n{nat(DEFAULT_JUMPS + DEFAULT_V6)}{ebpf_line}")
    # With -m TPROXY as well, IPv4 has no nat rule at all: nothing is tracked.
    assert dry_run(capsys, "-m", "TPROXY", "--ebpf").startswith("# iptables-save -t mangle (IPv4)\n")


def test_a_loopback_include_captures_the_apps_own_loopback_calls_as_istio_iptables_does(capsys):
    rules = dry_run(capsys, "-i", "127.0.0.0/8").split("# ip6tables-save")[0]
    assert "! --uid-owner" not in rules and "! --gid-owner" not in rules
    assert "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT -j RETURN\n" in rules


def test_capture_installs_the_rules_replaces_them_and_uncapture_restores_every_table(pod):
    ns, _ = pod
    before = saved(ns)
    result = fastmesh(ns, "capture", *FLAGS)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == ("captured IPv4 and IPv6 TCP: outbound to port 15011, inbound to port 15016, uid 1000 "
                             "and gid 1001 left alone\n")
    with_flags = saved(ns)

    # Again with the defaults: the old rules are replaced, nobody else's is touched.
    assert fastmesh(ns, "capture").returncode == 0
    v4 = saved(ns, "-t", "nat").split("*nat\n")[1]
    assert v4.startswith(NAT_BUILT_INS + OUR_CHAINS)
    assert v4[len(NAT_BUILT_INS + OUR_CHAINS):] == (
        "-A PREROUTING -p udp -j ACCEPT\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n"
        "-A OUTPUT -d 10.79.9.9/32 -p tcp -j ACCEPT\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        f"{DEFAULT_V4}COMMIT\n")
    once = saved(ns)
    assert fastmesh(ns, "capture").returncode == 0
    assert saved(ns) == once != with_flags

    # Back to the flags, twice: the same as the first time.
    for _ in range(2):
        assert fastmesh(ns, "capture", *FLAGS).returncode == 0
        assert saved(ns) == with_flags

    result = fastmesh(ns, "uncapture")
    assert (result.returncode, result.stdout) == (
        0, "uncaptured IPv4 and IPv6: the ISTIO_* chains and the rules that jump to them are gone\n")
    assert saved(ns) == before
    result = fastmesh(ns, "uncapture")
    assert (result.returncode, result.stdout) == (0, "nothing to uncapture: no ISTIO_* chains in this network namespace\n")
    assert saved(ns) == before


# Listens on each NAME:HOST:PORT as uid/gid ARGV[1] and answers each connection with its
# name and the connection's original destination (SO_ORIGINAL_DST, as a sidecar reads it;
# the socket's own address where no conntrack entry exists, as under TPROXY). The listeners
# are transparent (IP_TRANSPARENT, set as root), as a sidecar's are under -m TPROXY.
SERVER = textwrap.dedent("""
    import encodings.idna, os, socket, struct, sys, threading  # idna: imported before the uid changes
    uid = int(sys.argv[1])
    listeners = []
    for spec in sys.argv[2:]:
        name, host, port = spec.split(":")
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        server.bind((host, int(port)))
        server.listen()
        listeners.append((name, server))
    if uid:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    def serve(name, server):
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST, a sockaddr_in
                    where = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
                except OSError:
                    where = "%s:%d" % conn.getsockname()
                conn.sendall(("%s %s" % (name, where)).encode())
    for name, server in listeners:
        threading.Thread(target=serve, args=(name, server), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

# Connects to ARGV[1]:ARGV[2] as uid ARGV[3], gid ARGV[4], and prints the answer, then whom
# getpeername() says it is connected to.
CLIENT = textwrap.dedent("""
    import encodings.idna, os, socket, sys  # idna: imported before the uid changes
    os.setgroups([]); os.setgid(int(sys.argv[4])); os.setuid(int(sys.argv[3]))
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
        print(conn.recv(256).decode())
        print("%s:%d" % conn.getpeername())
""")


@pytest.fixture
def servers(pod):
    """(pod, peer) with servers: the sidecar's two ports (uid 1337) and the pod's own ports in
    the pod, a real destination in the peer."""
    ns, peer = pod
    processes = []
    for where, uid, specs in ((ns, "1337", ["outbound:0.0.0.0:15001", "inbound:0.0.0.0:15006"]),
                              (ns, "0", ["app:0.0.0.0:9080", "metrics:0.0.0.0:15090", "loopback:127.0.0.1:7070"]),
                              (peer, "0", [f"peer:{PEER}:8080"])):
        process = subprocess.Popen([IP, "netns", "exec", where, sys.executable, "-c", SERVER, uid, *specs],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline() == "ready\n"
    try:
        yield ns, peer
    finally:
        for process in processes:
            process.kill()
            process.wait()


def answer(ns: str, host: str, port: int, uid: int = 0, gid: int = 0) -> str:
    """The server's answer; the client must see itself connected to where it dialled, however
    the connection was captured."""
    out = sh(IP, "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port), str(uid), str(gid)).stdout
    reply, peer = out.splitlines()
    assert peer == f"{host}:{port}"
    return reply


def attached_programs() -> list[str]:
    """Our eBPF programs on the root cgroup now."""
    with capture_ebpf._cgroup_root() as root:
        return sorted(capture_ebpf._attached(root))


def tracked(ns: str, address: str) -> int:
    """How many of `ns`'s conntrack entries name `address`."""
    table = Path("/proc/net/nf_conntrack")
    text = sh(IP, "netns", "exec", ns, "cat", str(table)).stdout if table.exists() else ""
    return sum(f"={address} " in line for line in text.splitlines())


MODES = [(), ("-m", "TPROXY"), ("--ebpf",), ("-m", "TPROXY", "--ebpf")]


@pytest.mark.parametrize("mode", MODES, ids=["redirect", "tproxy", "ebpf", "tproxy-ebpf"])
def test_captured_connections_reach_the_sidecars_ports_with_their_original_destination(servers, mode):
    if "--ebpf" in mode and ebpf_unavailable():
        pytest.skip(ebpf_unavailable())
    ns, peer = servers
    before = saved(ns)
    result = fastmesh(ns, "capture", *mode)
    assert (result.returncode, result.stderr) == (0, "")

    assert answer(ns, PEER, 8080) == f"outbound {PEER}:8080"  # an app's outbound call
    assert answer(ns, PEER, 8080, uid=1337, gid=1337) == f"peer {PEER}:8080"  # the sidecar's own
    assert answer(ns, PEER, 8080, uid=1000, gid=1337) == f"peer {PEER}:8080"  # the sidecar's gid (-g = -u)
    assert answer(ns, "127.0.0.1", 7070) == "loopback 127.0.0.1:7070"  # localhost is left alone
    assert answer(ns, POD, 9080) == f"app {POD}:9080"  # an app calling its own pod address
    assert answer(ns, POD, 9080, uid=1337, gid=1337) == f"inbound {POD}:9080"  # the sidecar calling it

    assert answer(peer, POD, 9080) == f"inbound {POD}:9080"  # inbound, from another namespace
    assert answer(peer, POD, 15090) == f"metrics {POD}:15090"  # an excluded inbound port (-d)
    # Without NAT on either side, the namespace tracks none of those connections.
    assert (tracked(ns, PEER) == 0) == (mode == ("-m", "TPROXY", "--ebpf"))

    result = fastmesh(ns, "uncapture")
    assert (result.returncode, result.stderr) == (0, "")
    assert ("the eBPF capture of this network namespace is gone" in result.stdout) == ("--ebpf" in mode)
    assert saved(ns) == before
    assert answer(ns, PEER, 8080) == f"peer {PEER}:8080"
    assert answer(peer, POD, 9080) == f"app {POD}:9080"
    if "--ebpf" in mode:
        assert attached_programs() == []  # the last namespace's entry took the programs with it


@pytest.mark.skipif(bool(ebpf_unavailable()), reason=ebpf_unavailable() or "-")
@pytest.mark.parametrize("flags, captured", [
    (["-o", "8080"], False),
    (["-x", f"{PEER}/32"], False),
    (["-i", "10.99.0.0/16"], False),
    (["-i", f"10.99.0.0/16,{PEER}/32"], True),
    (["-u", "1000", "-g", "1001"], True),  # 1337 is an app then, and 1000/1001 the proxy
], ids=["excluded-port", "excluded-cidr", "not-included", "included", "other-proxy-ids"])
def test_ebpf_capture_follows_the_outbound_flags(servers, flags, captured):
    ns, _ = servers
    assert fastmesh(ns, "capture", "--ebpf", *flags).returncode == 0
    try:
        expected = f"outbound {PEER}:8080" if captured else f"peer {PEER}:8080"
        direct = f"peer {PEER}:8080"
        proxy_ids_given = "-u" in flags
        assert answer(ns, PEER, 8080) == expected
        assert answer(ns, PEER, 8080, uid=1337, gid=1337) == (expected if proxy_ids_given else direct)
        assert answer(ns, PEER, 8080, uid=1000, gid=1001) == (direct if proxy_ids_given else expected)
    finally:
        assert fastmesh(ns, "uncapture").returncode == 0


@pytest.mark.parametrize("prefix, env, args, expected", [
    (("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"), None, ["capture"], NO_NET_ADMIN),
    ((), {"PATH": "/nonexistent"}, ["capture"],
     "fastmesh capture: iptables is not installed: apt-get install iptables\n"),
    ((), None, ["capture", "-i", "10.0.0.0/33"],
     "fastmesh capture: -i/--include-outbound-cidrs: '10.0.0.0/33' is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)\n"),
    ((), None, ["capture", "-x", "*"],
     "fastmesh capture: -x/--exclude-outbound-cidrs: '*' is not allowed here (name the CIDRs to leave alone)\n"),
    ((), None, ["capture", "-d", "15090,http"],
     "fastmesh capture: -d/--exclude-inbound-ports: '15090,http': 'http' is not a port (1-65535)\n"),
    ((), None, ["capture", "-b", "70000"],
     "fastmesh capture: -b/--include-inbound-ports: '70000': '70000' is not a port (1-65535)\n"),
    ((), None, ["capture", "--ebpf", "-k", "eth1"],
     "fastmesh capture: --ebpf: -k/--kube-virt-interfaces needs the NAT capture (a VM's packets make no connect())\n"),
    ((), None, ["capture", "--ebpf", "-i", "127.0.0.0/8"],
     ("fastmesh capture: --ebpf: -i/--include-outbound-cidrs cannot name a loopback range (connect() to loopback "
      "is never moved)\n")),
    ((), None, ["capture", "--ebpf", "-o", ",".join(str(port) for port in range(1, 18))],
     "fastmesh capture: --ebpf takes at most 16 -o ports (17 given)\n"),
], ids=["no-net-admin", "no-iptables", "bad-cidr", "wildcard-exclude", "bad-port-list", "port-out-of-range",
        "ebpf-virt-interfaces", "ebpf-loopback-include", "ebpf-too-many-ports"])
def test_refusals_are_one_line_exit_1_and_change_nothing(pod, prefix, env, args, expected):
    ns, _ = pod
    before = saved(ns)
    result = fastmesh(ns, *args, prefix=prefix, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", expected)
    assert saved(ns) == before


def test_uncapture_without_net_admin_is_refused(pod):
    ns, _ = pod
    assert fastmesh(ns, "capture").returncode == 0
    captured = saved(ns)
    result = fastmesh(ns, "uncapture", prefix=("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"))
    assert (result.returncode, result.stderr) == (1, NO_NET_ADMIN.replace("fastmesh capture:", "fastmesh uncapture:"))
    assert saved(ns) == captured
