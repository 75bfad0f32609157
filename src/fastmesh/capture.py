"""`fastmesh capture` and `fastmesh uncapture`: istio-iptables' nat rules (REDIRECT mode) in
the current network namespace, computed from its flags and applied in one
`iptables-restore --noflush` transaction per address family.

The rules are Istio 1.7's (chains ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT,
ISTIO_REDIRECT; PREROUTING and OUTPUT jump to them), written in the form `iptables-save`
prints them, so `--dry-run` shows exactly what `iptables-save -t nat` will list. The only
rules in the shared built-in chains are the jumps to ISTIO_* chains and the `-k` rules,
which carry Istio's comment: that is how a second `capture` replaces them and `uncapture`
finds them, without remembering the flags they were made with."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")
VIRT_COMMENT = '-m comment --comment "Kubevirt outbound redirect"'  # istio-iptables' own, on -k rules
SSH_PORT = 22  # istio-iptables never captures inbound SSH under `-b '*'`
CAP_NET_ADMIN = 12  # <linux/capability.h>

NO_NET_ADMIN = ("capture needs CAP_NET_ADMIN in this network namespace "
                "(run as root, or as an init container with NET_ADMIN and NET_RAW)")
NO_IPTABLES = "iptables is not installed: apt-get install iptables"
NO_TPROXY = ("-m TPROXY is not supported: fastmesh captures with REDIRECT only "
             "(its listeners read the original destination with SO_ORIGINAL_DST)")


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
    uids: tuple[str, ...]
    gids: tuple[str, ...]
    include: Literal["*"] | tuple[Network, ...]
    exclude: tuple[Network, ...]
    inbound_ports: Literal["*"] | tuple[int, ...]
    inbound_excluded: tuple[int, ...]
    outbound_excluded: tuple[int, ...]
    virt_interfaces: tuple[str, ...]
    loopback_included: bool  # `-i` names a loopback range: Istio then captures app traffic on lo


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
class NatRules:
    """One family's rules, as `iptables-save` lists them (without the `-A CHAIN`)."""

    prerouting_first: list[str] = field(default_factory=list)  # inserted ahead of anyone else's
    prerouting: list[str] = field(default_factory=list)  # appended
    output: list[str] = field(default_factory=list)  # appended
    chains: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in CHAINS})

    def appended(self) -> list[str]:
        """The `-A CHAIN SPEC` lines, in iptables-save's order (all but prerouting_first)."""
        chains = [("PREROUTING", self.prerouting), ("OUTPUT", self.output), *self.chains.items()]
        return [f"-A {chain} {spec}" for chain, specs in chains for spec in specs]

    def lines(self) -> list[str]:
        """Every rule as `iptables-save` lists it in a namespace with no other rules."""
        return [f"-A PREROUTING {spec}" for spec in self.prerouting_first] + self.appended()


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
                       outbound_excluded: str, virt_interfaces: str) -> CaptureOptions:
    """CaptureOptions from the flags' text, or a CaptureError naming the first bad flag."""
    if mode == "TPROXY":
        raise CaptureError(NO_TPROXY)
    uids = parse_ids("-u/--proxy-uid", uid)
    included, loopback = parse_networks("-i/--include-outbound-cidrs", include, wildcard=True)
    excluded, _ = parse_networks("-x/--exclude-outbound-cidrs", exclude)
    return CaptureOptions(
        proxy_port=_one_port("-p/--proxy-port", proxy_port),
        inbound_port=_one_port("-z/--inbound-capture-port", inbound_port),
        uids=uids,
        gids=uids if gid is None else parse_ids("-g/--proxy-gid", gid),  # as istio-iptables: the uid's
        include=included,
        exclude=excluded,  # type: ignore[arg-type]  # '*' refused above
        inbound_ports=parse_ports("-b/--include-inbound-ports", inbound_ports, wildcard=True),
        inbound_excluded=parse_ports("-d/--exclude-inbound-ports", inbound_excluded),  # type: ignore[arg-type]
        outbound_excluded=parse_ports("-o/--exclude-outbound-ports", outbound_excluded),  # type: ignore[arg-type]
        virt_interfaces=parse_interfaces("-k/--kube-virt-interfaces", virt_interfaces),
        loopback_included=loopback,
    )


def _one_port(flag: str, text: str) -> int:
    ports = parse_ports(flag, text)
    if len(ports) != 1:
        raise CaptureError(f"{flag}: {text!r} is not a port (1-65535)")
    return ports[0]  # type: ignore[index]


# --- the rules -------------------------------------------------------------------------

def nat_rules(options: CaptureOptions, family: Family) -> NatRules:
    """istio-iptables' nat rules for one family, in its order."""
    rules = NatRules()
    chains = rules.chains
    chains["ISTIO_REDIRECT"].append(f"-p tcp -j REDIRECT --to-ports {options.proxy_port}")
    chains["ISTIO_IN_REDIRECT"].append(f"-p tcp -j REDIRECT --to-ports {options.inbound_port}")

    if options.inbound_ports:  # '' captures no inbound port
        rules.prerouting.append("-p tcp -j ISTIO_INBOUND")
        if options.inbound_ports == "*":
            for port in (SSH_PORT, *options.inbound_excluded):
                chains["ISTIO_INBOUND"].append(f"-p tcp -m tcp --dport {port} -j RETURN")
            chains["ISTIO_INBOUND"].append("-p tcp -j ISTIO_IN_REDIRECT")
        else:
            for port in options.inbound_ports:
                chains["ISTIO_INBOUND"].append(f"-p tcp -m tcp --dport {port} -j ISTIO_IN_REDIRECT")

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
        declarations = [f":{chain} ACCEPT [0:0]" for chain in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
        declarations += [f":{chain} - [0:0]" for chain in CHAINS]
        parts.append("\n".join([f"# {family.save} -t nat ({family.name})", "*nat", *declarations,
                                *nat_rules(options, family).lines(), "COMMIT"]))
    return "\n".join(parts) + "\n"


# --- the namespace's current rules ------------------------------------------------------

def ours(nat_table: str) -> tuple[list[str], list[str]]:
    """(the rules of ours in PREROUTING and OUTPUT, as `-A CHAIN SPEC`; the ISTIO_* chains
    of ours that exist) in an `iptables-save` nat table."""
    rules, chains = [], []
    for line in nat_table.splitlines():
        if line.startswith(":") and line[1:].split(" ", 1)[0] in CHAINS:
            chains.append(line[1:].split(" ", 1)[0])
        elif line.startswith(("-A PREROUTING ", "-A OUTPUT ")):
            target = line.rsplit(" -j ", 1)[-1].split(" ", 1)[0]
            if target in CHAINS or VIRT_COMMENT in line:
                rules.append(line)
    return rules, chains


def _deletions(nat_table: str) -> list[str]:
    rules, _ = ours(nat_table)
    return ["-D" + rule.removeprefix("-A") for rule in rules]


def capture_transaction(rules: NatRules, nat_table: str) -> str:
    """One transaction: our old rules out, our chains declared (which empties them if they
    exist), the new rules in. Nobody else's rule is touched."""
    lines = ["*nat", *_deletions(nat_table), *(f":{chain} - [0:0]" for chain in CHAINS)]
    lines += [f"-I PREROUTING {n} {spec}" for n, spec in enumerate(rules.prerouting_first, 1)]
    lines += rules.appended()
    return "\n".join([*lines, "COMMIT"]) + "\n"


def uncapture_transaction(nat_table: str) -> str | None:
    """One transaction that removes our rules and chains, or None if there are none."""
    rules, chains = ours(nat_table)
    if not rules and not chains:
        return None
    lines = ["*nat", *_deletions(nat_table)]
    lines += [f":{chain} - [0:0]" for chain in chains]  # emptied first: they jump to each other
    lines += [f"-X {chain}" for chain in chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def nat_section(save_output: str) -> str:
    """The nat table of an `iptables-save` (all tables, which creates none), or ''."""
    match = re.search(r"^\*nat\n.*?^COMMIT$", save_output, re.DOTALL | re.MULTILINE)
    return match.group(0) if match else ""


# --- applying --------------------------------------------------------------------------

def _has_net_admin() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, check=False, input=stdin, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        if "Permission denied" in message or "Operation not permitted" in message:
            raise CaptureError(NO_NET_ADMIN)
        raise CaptureError(f"{shlex.join(argv)} failed: {message}")
    return result.stdout


def families() -> tuple[list[Family], str | None]:
    """The families this namespace can capture, and why IPv6 is left out if it is."""
    if not (shutil.which(IPV4.save) and shutil.which(IPV4.restore)):
        raise CaptureError(NO_IPTABLES)
    if not _has_net_admin():
        raise CaptureError(NO_NET_ADMIN)
    if not (shutil.which(IPV6.save) and shutil.which(IPV6.restore)):
        return [IPV4], "ip6tables is not installed"
    if not os.path.exists("/proc/net/if_inet6"):
        return [IPV4], "IPv6 is disabled in this kernel"
    return [IPV4, IPV6], None


def capture(options: CaptureOptions) -> str:
    """Install (or replace) the rules in every family; on a failure, each family already
    changed gets its nat table back as it was. Returns what was done, one line."""
    present, skipped = families()
    done: list[tuple[Family, str]] = []
    try:
        for family in present:
            nat_table = nat_section(_run([family.save]))
            _run([family.restore, "--noflush"], capture_transaction(nat_rules(options, family), nat_table))
            done.append((family, nat_table))
    except CaptureError:
        for family, nat_table in done:
            if nat_table:
                _run([family.restore, "-T", "nat"], nat_table + "\n")
        raise
    names = " and ".join(family.name for family in present)
    note = f" (IPv6 not captured: {skipped})" if skipped else ""
    return (f"captured {names} TCP: outbound to port {options.proxy_port}, inbound to port "
            f"{options.inbound_port}, uid {','.join(options.uids)} and gid {','.join(options.gids)} "
            f"left alone{note}")


def uncapture() -> str:
    """Remove every rule and chain `capture` made, in every family. Returns one line."""
    present, _ = families()
    removed = []
    for family in present:
        transaction = uncapture_transaction(nat_section(_run([family.save])))
        if transaction:
            _run([family.restore, "--noflush"], transaction)
            removed.append(family.name)
    if not removed:
        return "nothing to uncapture: no ISTIO_* chains in this network namespace"
    return f"uncaptured {' and '.join(removed)}: the ISTIO_* chains and the rules that jump to them are gone"


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
                                     args.kube_virt_interfaces)
        if args.dry_run:
            sys.stdout.write(dry_run_text(options))
        else:
            print(capture(options))
    except CaptureError as exc:
        print(f"fastmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
