"""`fastmesh capture --ebpf`: IPv4 outbound capture at connect() instead of by NAT.

The programs of bpf/capture.bpf.c are loaded once per host with bpftool and attached to the
root of the cgroup v2 hierarchy (so they see every process, as conntrack sees every packet);
they act only in the network namespaces entered in their map `fm_netns_cfg`, keyed by the
namespace's cookie, each with the rules `capture`'s flags give. So capture and uncapture stay
per namespace, as the iptables rules are: `capture --ebpf` adds this namespace's entry (loading
and attaching the programs if no namespace had one), `uncapture` removes it (and detaches the
programs when it was the last). Nothing is pinned: the attachment keeps the programs, the
programs keep their maps, and both are found again by name through the root cgroup.

`ip netns exec` gives a command a /sys of its own, without the cgroup mount, so when no cgroup2
is mounted here one is mounted for the duration of the command (it is the same hierarchy)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastmesh import cpus
from fastmesh.host_tools import ToolFailed, run_tool
from fastmesh.privileges import CAP_BPF, CAP_SYS_ADMIN, has_capabilities

OBJECT = Path(__file__).resolve().parent / "bpf" / "capture.bpf.o"
# program -> bpftool's name for its cgroup attach point
PROGRAMS = {"fm_connect4": "connect4", "fm_sockops": "sock_ops", "fm_getsockopt": "getsockopt",
            "fm_getpeername4": "getpeername4"}
CONFIG_MAP = "fm_netns_cfg"
LOCK = Path("/run/fastmesh-capture-ebpf.lock")  # /run is shared with `ip netns exec`'s mount namespace
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>
# The fixed sizes of struct netns_config (bpf/capture.bpf.c)
MAX_IDS, MAX_PORTS, MAX_NETS, MAX_LOCAL = 4, 16, 16, 8

NO_BPFTOOL = "--ebpf needs bpftool: apt-get install bpftool"
NO_OBJECT = ("--ebpf: this build of fastmesh has no eBPF object (bpf/capture.bpf.o): install clang and "
             "libbpf-dev, then reinstall fastmesh")
NO_PRIVILEGE = "--ebpf needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (it attaches programs to the root cgroup)"


class EbpfError(Exception):
    """A one-line reason the eBPF capture could not be installed or removed."""


def netns_cookie() -> int:
    """The kernel's cookie for the current network namespace, as bpf_get_netns_cookie() gives it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return struct.unpack("<Q", probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def local_addresses() -> list[ipaddress.IPv4Address]:
    """This namespace's own IPv4 addresses but loopback: an app dialling its pod address is not
    captured (ISTIO_OUTPUT's `-o lo` return)."""
    listed = _json(_run(["ip", "-j", "-4", "addr", "show"]), [])
    found = [ipaddress.IPv4Address(info["local"]) for link in listed for info in link.get("addr_info", [])]
    return [address for address in found if not address.is_loopback]


def config_value(options, local: list[ipaddress.IPv4Address]) -> bytes:
    """struct netns_config for `options` (fastmesh.capture.CaptureOptions), byte for byte."""
    include_all = options.include == "*"
    included = [] if include_all else [n for n in options.include if n.version == 4]
    excluded = [n for n in options.exclude if n.version == 4]
    uids, gids = [int(uid) for uid in options.uids], [int(gid) for gid in options.gids]
    for what, items, limit in (("-u uids", uids, MAX_IDS), ("-g gids", gids, MAX_IDS),
                               ("-o ports", options.outbound_excluded, MAX_PORTS),
                               ("-x IPv4 networks", excluded, MAX_NETS), ("-i IPv4 networks", included, MAX_NETS)):
        if len(items) > limit:
            raise EbpfError(f"--ebpf takes at most {limit} {what} ({len(items)} given)")
    local = local[:MAX_LOCAL]

    def padded(values: list[int], count: int, fmt: str) -> bytes:
        return struct.pack(f"<{count}{fmt}", *values, *[0] * (count - len(values)))

    def nets(networks: list) -> bytes:
        packed = b"".join(n.network_address.packed + n.netmask.packed for n in networks)
        return packed + bytes(8 * (MAX_NETS - len(networks)))

    head = struct.pack("<HHB6B5x", options.proxy_port, options.inbound_port, include_all, len(uids), len(gids),
                       len(options.outbound_excluded), len(excluded), len(included), len(local))
    value = (head + padded(uids, MAX_IDS, "I") + padded(gids, MAX_IDS, "I")
             + padded(list(options.outbound_excluded), MAX_PORTS, "H") + nets(excluded) + nets(included)
             + b"".join(a.packed for a in local) + bytes(4 * (MAX_LOCAL - len(local))))
    assert len(value) == 368, len(value)  # sizeof(struct netns_config)
    return value


def install(options) -> None:
    """This namespace's entry, with the programs loaded and attached if they were not."""
    if not OBJECT.exists():
        raise EbpfError(NO_OBJECT)
    key, value = struct.pack("<Q", netns_cookie()), config_value(options, local_addresses())
    with _locked(), _cgroup_root() as root:
        attached = _attached(root)
        if set(attached) != set(PROGRAMS):
            _detach(root, attached)  # a half-attached set from an interrupted capture
            attached = _load_and_attach(root)
        _bpftool("map", "update", "id", str(_config_map(attached)), "key", "hex", *_hex(key),
                 "value", "hex", *_hex(value))


def remove() -> bool:
    """Remove this namespace's entry, and the programs with the last one. False if there was none
    (also when this process could not have made one: no bpftool, or not the capabilities)."""
    if shutil.which("bpftool") is None or not has_capabilities(CAP_BPF, CAP_SYS_ADMIN):
        return False
    if not any(program.get("name") == "fm_connect4" for program in _json(_bpftool("prog", "show", "-j"), [])):
        return False  # nothing loaded: no cgroup to mount, which every plain `capture` would do otherwise
    key = struct.pack("<Q", netns_cookie())
    with _locked(), _cgroup_root() as root:
        attached = _attached(root)
        if "fm_connect4" not in attached:
            return False
        map_id = str(_config_map(attached))
        entries = _json(_bpftool("map", "dump", "id", map_id, "-j"), [])
        ours = any(bytes(int(b, 16) for b in entry["key"]) == key for entry in entries)
        if ours:
            _bpftool("map", "delete", "id", map_id, "key", "hex", *_hex(key))
        if len(entries) - ours == 0:
            _detach(root, attached)
        return ours


# --- bpftool --------------------------------------------------------------------------------

def _run(argv: list[str]) -> str:
    try:
        return run_tool(argv)
    except ToolFailed as failed:
        if failed.missing:
            raise EbpfError(NO_BPFTOOL if argv[0] == "bpftool" else failed.message) from None
        raise EbpfError(NO_PRIVILEGE if failed.denied else f"{' '.join(argv[:4])} failed: {failed.message[-400:]}") \
            from None


def _bpftool(*args: str) -> str:
    return _run(["bpftool", *args])


def _json(text: str, empty):
    """bpftool's -j output (a bare newline where there is nothing to list)."""
    return json.loads(text) if text.strip() else empty


def _hex(data: bytes) -> list[str]:
    return [f"{byte:02x}" for byte in data]


def _attached(root: str) -> dict[str, int]:
    """Our programs attached to the root cgroup: name -> program id."""
    shown = _json(_bpftool("cgroup", "show", root, "-j"), [])
    return {entry["name"]: entry["id"] for entry in shown if entry.get("name") in PROGRAMS}


def _config_map(attached: dict[str, int]) -> int:
    shown = json.loads(_bpftool("prog", "show", "id", str(attached["fm_connect4"]), "-j"))
    for map_id in shown.get("map_ids", []):
        if json.loads(_bpftool("map", "show", "id", str(map_id), "-j")).get("name") == CONFIG_MAP:
            return map_id
    raise EbpfError(f"fm_connect4 (program {attached['fm_connect4']}) has no map {CONFIG_MAP}")


def _load_and_attach(root: str) -> dict[str, int]:
    """Load the object in a bpffs of our own (gone when we return: the attachments hold the
    programs) and attach every program to the root cgroup."""
    with _mounted("bpf") as bpffs:
        pins = Path(bpffs) / "fastmesh"
        _bpftool("prog", "loadall", str(OBJECT), str(pins))
        try:
            for name, attach_type in PROGRAMS.items():
                _bpftool("cgroup", "attach", root, attach_type, "pinned", str(pins / name), "multi")
        except EbpfError:
            _detach(root, _attached(root))
            raise
    return _attached(root)


def _detach(root: str, attached: dict[str, int]) -> None:
    for name, program_id in attached.items():
        _bpftool("cgroup", "detach", root, PROGRAMS[name], "id", str(program_id))


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One capture or uncapture at a time on this host: they read, then change, one map."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _cgroup_root() -> Iterator[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = cpus.cgroup_mounts(mountinfo.read())
    for hierarchy, root, mount_point in mounts:
        if hierarchy == "v2" and root == "/":
            yield str(mount_point)
            return
    with _mounted("cgroup2") as root:
        yield root


@contextlib.contextmanager
def _mounted(fstype: str) -> Iterator[str]:
    where = tempfile.mkdtemp(prefix=f"fastmesh-{fstype}-")
    try:
        _run(["mount", "-t", fstype, fstype, where])
        try:
            yield where
        finally:
            subprocess.run(["umount", where], capture_output=True, check=False)
    finally:
        os.rmdir(where)
