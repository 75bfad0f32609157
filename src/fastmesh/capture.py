"""`fastmesh capture` and `fastmesh uncapture`: istio-iptables' rules in the current network
namespace, computed from its flags and applied in one `iptables-restore --noflush`
transaction per table and address family.

The nat rules are Istio 1.7's (chains ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT,
ISTIO_REDIRECT; PREROUTING and OUTPUT jump to them), written in the form `iptables-save`
prints them, so `--dry-run` shows exactly what `iptables-save` will list. The only rules in
the shared built-in chains are the jumps to ISTIO_* chains and the `-k` rules, which carry
Istio's comment: that is how a second `capture` replaces them and `uncapture` finds them,
without remembering the flags they were made with.

Two ways to capture without NAT, which costs every packet of a captured connection a
conntrack lookup and a rewrite: `-m TPROXY` takes inbound connections in the mangle table
(mangle_rules()), and `--ebpf` moves IPv4 outbound connections at connect()
(fastmesh.capture_ebpf). With both, IPv4 has no nat rule and the namespace tracks nothing."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fastmesh import capture_ebpf
from fastmesh.host_tools import ToolFailed, run_tool
from fastmesh.privileges import CAP_NET_ADMIN, has_capabilities

CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")  # nat's
MANGLE_CHAINS = ("ISTIO_INBOUND", "ISTIO_TPROXY")  # -m TPROXY's
TABLE_CHAINS = {"nat": CHAINS, "mangle": MANGLE_CHAINS}
VIRT_COMMENT = '-m comment --comment "Kubevirt outbound redirect"'  # istio-iptables' own, on -k rules
SSH_PORT = 22  # istio-iptables never captures inbound SSH under `-b '*'`

NO_NET_ADMIN = ("capture needs CAP_NET_ADMIN in this network namespace "
                "(run as root, or as an init container with NET_ADMIN and NET_RAW)")
NO_IPTABLES = "iptables is not installed: apt-get install iptables"


class CaptureError(Exception):
    """A one-line reason `capture` or `uncapture` refused or failed."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class CaptureOptions:
    """istio-iptables' flags, checked (their defaults are the command line's, from
    fastmesh.defaults). `include` is "*" (every destination) or networks;
    `inbound_ports` is "*" (every port but SSH and `inbound_excluded`) or a list."""

    proxy_port: int
    inbound_port: int
    inbound_mode: Literal["REDIRECT", "TPROXY"]
    uids: tuple[str, ...]
    gids: tuple[str, ...]
    include: Literal["*"] | tuple[Network, ...]
    exclude: tuple[Network, ...]
    inbound_ports: Literal["*"] | tuple[int, ...]
    inbound_excluded: tuple[int, ...]
    outbound_excluded: tuple[int, ...]
    virt_interfaces: tuple[str, ...]
    loopback_included: bool  # `-i` names a loopback range: Istio then captures app traffic on lo
    ebpf: bool = False  # IPv4 outbound moved at connect() by fastmesh.capture_ebpf, not by NAT


@dataclass(frozen=True)
class Family:
    """What differs between the IPv4 and the IPv6 rules."""

    name: str
    version: int
    save: str
    restore: str
    passthrough_source: str  # the inbound passthrough's bind address, as Istio's sidecar uses it
    loopback: str


IPV4 = Family("IPv4", 4, "iptables-save", "iptables-restore", "127.0.0.6/32", "127.0.0.1/32")
IPV6 = Family("IPv6", 6, "ip6tables-save", "ip6tables-restore", "::6/128", "::1/128")


@dataclass
class TableRules:
    """One family's rules in one table, as `iptables-save` lists them (without the `-A CHAIN`)."""

    table: str = "nat"
    prerouting_first: list[str] = field(default_factory=list)  # inserted ahead of anyone else's
    prerouting: list[str] = field(default_factory=list)  # appended
    output: list[str] = field(default_factory=list)  # appended
    chains: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chains = {name: self.chains.get(name, []) for name in TABLE_CHAINS[self.table]}

    def appended(self) -> list[str]:
        """The `-A CHAIN SPEC` lines, in iptables-save's order (all but prerouting_first)."""
        chains = [("PREROUTING", self.prerouting), ("OUTPUT", self.output), *self.chains.items()]
        return [f"-A {chain} {spec}" for chain, specs in chains for spec in specs]

    def lines(self) -> list[str]:
        """Every rule as `iptables-save` lists it in a namespace with no other rules."""
        return [f"-A PREROUTING {spec}" for spec in self.prerouting_first] + self.appended()

    def save_text(self) -> str:
        """The table as `iptables-save -t TABLE` lists it in a namespace with no other rules."""
        built_ins = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
        if self.table == "mangle":
            built_ins = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
        declarations = [f":{chain} ACCEPT [0:0]" for chain in built_ins]
        declarations += [f":{chain} - [0:0]" for chain in self.chains]
        return "\n".join([f"*{self.table}", *declarations, *self.lines(), "COMMIT"])


# --- flags -----------------------------------------------------------------------------

def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_ports(flag: str, text: str, wildcard: bool = False) -> Literal["*"] | tuple[int, ...]:
    if wildcard and text.strip() == "*":
        return "*"
    ports = []
    for item in _list(text):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise CaptureError(f"{flag}: {text!r}: {item!r} is not a port (1-65535)")
        ports.append(int(item))
    return tuple(ports)


def parse_networks(flag: str, text: str, wildcard: bool = False) -> tuple[Literal["*"] | tuple[Network, ...], bool]:
    """The networks of a CIDR list, and whether one of them was given as a loopback address."""
    if text.strip() == "*":
        if not wildcard:
            raise CaptureError(f"{flag}: '*' is not allowed here (name the CIDRs to leave alone)")
        return "*", False
    networks, loopback = [], False
    for item in _list(text):
        try:
            interface = ipaddress.ip_interface(item)
        except ValueError:
            raise CaptureError(f"{flag}: {item!r} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)") from None
        networks.append(interface.network)
        loopback |= interface.ip.is_loopback
    return tuple(networks), loopback


def parse_ids(flag: str, text: str) -> tuple[str, ...]:
    ids = _list(text)
    if not ids or not all(item.isdigit() for item in ids):
        raise CaptureError(f"{flag}: {text!r} is not a user or group id (a number, or a comma list)")
    return tuple(str(int(item)) for item in ids)


def parse_interfaces(flag: str, text: str) -> tuple[str, ...]:
    names = _list(text)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.:@+-]{1,15}", name):
            raise CaptureError(f"{flag}: {name!r} is not a network interface name")
    return tuple(names)


def options_from_flags(proxy_port: str, inbound_port: str, uid: str, gid: str | None, mode: str,
                       include: str, exclude: str, inbound_ports: str, inbound_excluded: str,
                       outbound_excluded: str, virt_interfaces: str, ebpf: bool = False) -> CaptureOptions:
    """CaptureOptions from the flags' text, or a CaptureError naming the first bad flag."""
    uids = parse_ids("-u/--proxy-uid", uid)
    included, loopback = parse_networks("-i/--include-outbound-cidrs", include, wildcard=True)
    if ebpf and loopback:
        raise CaptureError("--ebpf: -i/--include-outbound-cidrs cannot name a loopback range "
                           "(connect() to loopback is never moved)")
    if ebpf and virt_interfaces.strip():
        raise CaptureError("--ebpf: -k/--kube-virt-interfaces needs the NAT capture (a VM's packets make no connect())")
    excluded, _ = parse_networks("-x/--exclude-outbound-cidrs", exclude)
    return CaptureOptions(
        proxy_port=_one_port("-p/--proxy-port", proxy_port),
        inbound_port=_one_port("-z/--inbound-capture-port", inbound_port),
        inbound_mode="TPROXY" if mode == "TPROXY" else "REDIRECT",
        uids=uids,
        gids=uids if gid is None else parse_ids("-g/--proxy-gid", gid),  # as istio-iptables: the uid's
        include=included,
        exclude=excluded,  # type: ignore[arg-type]  # '*' refused above
        inbound_ports=parse_ports("-b/--include-inbound-ports", inbound_ports, wildcard=True),
        inbound_excluded=parse_ports("-d/--exclude-inbound-ports", inbound_excluded),  # type: ignore[arg-type]
        outbound_excluded=parse_ports("-o/--exclude-outbound-ports", outbound_excluded),  # type: ignore[arg-type]
        virt_interfaces=parse_interfaces("-k/--kube-virt-interfaces", virt_interfaces),
        loopback_included=loopback,
        ebpf=ebpf,
    )


def _one_port(flag: str, text: str) -> int:
    ports = parse_ports(flag, text)
    if len(ports) != 1:
        raise CaptureError(f"{flag}: {text!r} is not a port (1-65535)")
    return ports[0]  # type: ignore[index]


# --- the rules -------------------------------------------------------------------------

def table_rules(options: CaptureOptions, family: Family) -> list[TableRules]:
    """Every table's rules for one family: nat's, then mangle's (empty but under -m TPROXY)."""
    return [nat_rules(options, family), mangle_rules(options, family)]


def _inbound(options: CaptureOptions, chain: list[str], target: str) -> None:
    """ISTIO_INBOUND's port choices (-b, -d), each captured port sent to `target`."""
    if options.inbound_ports == "*":
        for port in (SSH_PORT, *options.inbound_excluded):
            chain.append(f"-p tcp -m tcp --dport {port} -j RETURN")
        chain.append(f"-p tcp -j {target}")
    else:
        for port in options.inbound_ports:
            chain.append(f"-p tcp -m tcp --dport {port} -j {target}")


def mangle_rules(options: CaptureOptions, family: Family) -> TableRules:
    """-m TPROXY's inbound capture: each new connection to the pod is handed to the transparent
    inbound listener as it arrives, with no NAT. Unlike istio-iptables' TPROXY rules these use
    no conntrack (no connection mark, no ESTABLISHED match): a packet that is not a SYN and has
    a socket here already is simply delivered, so the namespace tracks no connection at all."""
    rules = TableRules("mangle")
    if options.inbound_mode != "TPROXY" or not options.inbound_ports:
        return rules
    # Loopback (the sidecar dialling the app, and the app's answers) is turned away by the jump
    # itself, whose interface test costs no match extension: most packets go no further.
    rules.prerouting.append("! -i lo -p tcp -j ISTIO_INBOUND")
    chain = rules.chains["ISTIO_INBOUND"]
    chain.append("-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket -j RETURN")
    _inbound(options, chain, "ISTIO_TPROXY")
    any_address = "0.0.0.0" if family.version == 4 else "::"
    rules.chains["ISTIO_TPROXY"].append(f"! -d {family.loopback} -p tcp -j TPROXY --on-port {options.inbound_port} "
                                        f"--on-ip {any_address} --tproxy-mark 0x0/0x0")
    return rules


def nat_rules(options: CaptureOptions, family: Family) -> TableRules:
    """istio-iptables' nat rules for one family, in its order: without the inbound ones under
    -m TPROXY (mangle_rules()), without the outbound ones for IPv4 under --ebpf; none at all
    when both leave nothing to do, so that the namespace tracks no connection."""
    rules = TableRules("nat")
    ebpf = options.ebpf and family.version == 4
    tproxy = options.inbound_mode == "TPROXY"
    if ebpf and (tproxy or not options.inbound_ports):
        return rules
    chains = rules.chains
    chains["ISTIO_REDIRECT"].append(f"-p tcp -j REDIRECT --to-ports {options.proxy_port}")
    chains["ISTIO_IN_REDIRECT"].append(f"-p tcp -j REDIRECT --to-ports {options.inbound_port}")

    if options.inbound_ports and not tproxy:  # '' captures no inbound port
        rules.prerouting.append("-p tcp -j ISTIO_INBOUND")
        _inbound(options, chains["ISTIO_INBOUND"], "ISTIO_IN_REDIRECT")
    if ebpf:
        return rules  # outbound moves at connect() (fastmesh.capture_ebpf), the sidecar's own too

    rules.output.append("-p tcp -j ISTIO_OUTPUT")
    output = chains["ISTIO_OUTPUT"]
    for port in options.outbound_excluded:  # before the rules that send traffic back to the sidecar
        output.append(f"-p tcp -m tcp --dport {port} -j RETURN")
    output.append(f"-s {family.passthrough_source} -o lo -j RETURN")
    for match in [f"--uid-owner {uid}" for uid in options.uids] + [f"--gid-owner {gid}" for gid in options.gids]:
        # The sidecar calling the pod's own address (an app calling itself by its service
        # address) goes to the inbound listener; the rest of its traffic is never captured.
        output.append(f"! -d {family.loopback} -o lo -m owner {match} -j ISTIO_IN_REDIRECT")
        if not options.loopback_included:
            output.append(f"-o lo -m owner ! {match} -j RETURN")  # an app calling itself by pod address
        output.append(f"-m owner {match} -j RETURN")
    output.append(f"-d {family.loopback} -j RETURN")  # apps that talk to localhost on purpose
    for network in _of_family(options.exclude, family):
        output.append(f"-d {network} -j RETURN")

    # -k: traffic from a VM inside the pod is that pod's outbound traffic. istio-iptables
    # inserts each rule at the head of PREROUTING, so the last one made comes first.
    for interface in options.virt_interfaces:
        rules.prerouting_first.insert(0, f"-i {interface} {VIRT_COMMENT} -j RETURN")
    if options.include == "*":
        output.append("-j ISTIO_REDIRECT")
        for interface in options.virt_interfaces:
            rules.prerouting_first.insert(0, f"-i {interface} {VIRT_COMMENT} -j ISTIO_REDIRECT")
    elif networks := _of_family(options.include, family):
        for network in networks:
            for interface in options.virt_interfaces:
                rules.prerouting_first.insert(0, f"-d {network} -i {interface} {VIRT_COMMENT} -j ISTIO_REDIRECT")
            output.append(f"-d {network} -j ISTIO_REDIRECT")
        output.append("-j RETURN")
    return rules


def _of_family(networks: Sequence[Network], family: Family) -> list[Network]:
    return [network for network in networks if network.version == family.version]


def dry_run_text(options: CaptureOptions) -> str:
    """What `iptables-save -t nat` (and ip6tables-save) will list after capture, in a
    namespace with no rules of anyone else's."""
    parts = []
    for family in (IPV4, IPV6):
        for rules in table_rules(options, family):
            if rules.lines():
                parts.append(f"# {family.save} -t {rules.table} ({family.name})\n{rules.save_text()}")
    if options.ebpf:
        parts.append(f"# eBPF ({capture_ebpf.OBJECT.name}, on the root cgroup, for this network namespace): "
                     f"IPv4 TCP connect() to a captured destination goes to 127.0.0.1:{options.proxy_port}")
    return "\n".join(parts) + "\n"


# --- the namespace's current rules ------------------------------------------------------

def ours(table: str, table_text: str) -> tuple[list[str], list[str]]:
    """(the rules of ours in PREROUTING and OUTPUT, as `-A CHAIN SPEC`; the ISTIO_* chains
    of ours that exist) in one table of an `iptables-save`."""
    names = TABLE_CHAINS[table]
    rules, chains = [], []
    for line in table_text.splitlines():
        if line.startswith(":") and line[1:].split(" ", 1)[0] in names:
            chains.append(line[1:].split(" ", 1)[0])
        elif line.startswith(("-A PREROUTING ", "-A OUTPUT ")):
            target = line.rsplit(" -j ", 1)[-1].split(" ", 1)[0]
            if target in names or VIRT_COMMENT in line:
                rules.append(line)
    return rules, chains


def _deletions(table: str, table_text: str) -> list[str]:
    rules, _ = ours(table, table_text)
    return ["-D" + rule.removeprefix("-A") for rule in rules]


def capture_transaction(rules: TableRules, table_text: str) -> str | None:
    """One transaction: our old rules out, our chains declared (which empties them if they
    exist), the new rules in; when `rules` has none, uncapture_transaction(). Nobody else's
    rule is touched."""
    if not rules.lines():
        return uncapture_transaction(rules.table, table_text)
    lines = [f"*{rules.table}", *_deletions(rules.table, table_text), *(f":{chain} - [0:0]" for chain in rules.chains)]
    lines += [f"-I PREROUTING {n} {spec}" for n, spec in enumerate(rules.prerouting_first, 1)]
    lines += rules.appended()
    return "\n".join([*lines, "COMMIT"]) + "\n"


def uncapture_transaction(table: str, table_text: str) -> str | None:
    """One transaction that removes our rules and chains from `table`, or None if there are none."""
    rules, chains = ours(table, table_text)
    if not rules and not chains:
        return None
    lines = [f"*{table}", *_deletions(table, table_text)]
    lines += [f":{chain} - [0:0]" for chain in chains]  # emptied first: they jump to each other
    lines += [f"-X {chain}" for chain in chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def table_section(table: str, save_output: str) -> str:
    """One table of an `iptables-save` (all tables, which creates none), or ''."""
    match = re.search(rf"^\*{table}\n.*?^COMMIT$", save_output, re.DOTALL | re.MULTILINE)
    return match.group(0) if match else ""


# --- applying --------------------------------------------------------------------------

def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        return run_tool(argv, stdin)
    except ToolFailed as failed:
        raise CaptureError(NO_NET_ADMIN if failed.denied else f"{shlex.join(argv)} failed: {failed.message}") from None


def families() -> tuple[list[Family], str | None]:
    """The families this namespace can capture, and why IPv6 is left out if it is."""
    if not (shutil.which(IPV4.save) and shutil.which(IPV4.restore)):
        raise CaptureError(NO_IPTABLES)
    if not has_capabilities(CAP_NET_ADMIN):
        raise CaptureError(NO_NET_ADMIN)
    if not (shutil.which(IPV6.save) and shutil.which(IPV6.restore)):
        return [IPV4], "ip6tables is not installed"
    if not os.path.exists("/proc/net/if_inet6"):
        return [IPV4], "IPv6 is disabled in this kernel"
    return [IPV4, IPV6], None


def capture(options: CaptureOptions) -> str:
    """Install (or replace) the rules in every table and family, then the eBPF entry; on a
    failure, each table already changed is put back as it was. Returns what was done, one line."""
    present, skipped = families()
    done: list[tuple[Family, str, str]] = []  # what was changed, and the table as it was
    try:
        for family in present:
            saved = _run([family.save])
            for rules in table_rules(options, family):
                table_text = table_section(rules.table, saved)
                transaction = capture_transaction(rules, table_text)
                if transaction:
                    _run([family.restore, "--noflush"], transaction)
                    done.append((family, rules.table, table_text))
        _set_ebpf(options)
    except CaptureError:
        for family, table, table_text in reversed(done):
            if table_text:
                _run([family.restore, "-T", table], table_text + "\n")
        raise
    names = " and ".join(family.name for family in present)
    note = f" (IPv6 not captured: {skipped})" if skipped else ""
    how = " (IPv4 at connect(), by eBPF)" if options.ebpf else ""
    return (f"captured {names} TCP: outbound to port {options.proxy_port}{how}, inbound to port "
            f"{options.inbound_port}, uid {','.join(options.uids)} and gid {','.join(options.gids)} "
            f"left alone{note}")


def _set_ebpf(options: CaptureOptions) -> None:
    """This namespace's eBPF entry as `options` say: made with --ebpf, removed without."""
    try:
        if options.ebpf:
            capture_ebpf.install(options)
        else:
            capture_ebpf.remove()
    except capture_ebpf.EbpfError as exc:
        raise CaptureError(str(exc)) from None


def uncapture() -> str:
    """Remove every rule and chain `capture` made, in every family, and this namespace's
    eBPF capture. Returns one line."""
    present, _ = families()
    removed = []
    for family in present:
        saved = _run([family.save])
        transactions = [uncapture_transaction(table, table_section(table, saved)) for table in TABLE_CHAINS]
        for transaction in filter(None, transactions):
            _run([family.restore, "--noflush"], transaction)
        if any(transactions):
            removed.append(family.name)
    try:
        ebpf = capture_ebpf.remove()
    except capture_ebpf.EbpfError as exc:
        raise CaptureError(str(exc)) from None
    if not removed and not ebpf:
        return "nothing to uncapture: no ISTIO_* chains in this network namespace"
    gone = [f"{' and '.join(removed)}: the ISTIO_* chains and the rules that jump to them are gone"] if removed else []
    gone += ["the eBPF capture of this network namespace is gone"] if ebpf else []
    return f"uncaptured {'; '.join(gone)}"


def run(args: argparse.Namespace) -> int:
    """The `capture` and `uncapture` commands: what was done on stdout, or one line on
    stderr and exit status 1."""
    try:
        if args.command == "uncapture":
            print(uncapture())
            return 0
        options = options_from_flags(args.proxy_port, args.inbound_capture_port, args.proxy_uid, args.proxy_gid,
                                     args.inbound_interception_mode, args.include_outbound_cidrs,
                                     args.exclude_outbound_cidrs, args.include_inbound_ports,
                                     args.exclude_inbound_ports, args.exclude_outbound_ports,
                                     args.kube_virt_interfaces, args.ebpf)
        if args.dry_run:
            sys.stdout.write(dry_run_text(options))
        else:
            print(capture(options))
    except CaptureError as exc:
        print(f"fastmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
