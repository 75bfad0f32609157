"""Least privilege for `serve --user USER [--group GROUP]`: started as root to bind every
port (ports below 1024 included), the sidecar then runs as USER, as Istio's runs as uid 1337.

The account is looked up before anything is bound, so that a user that does not exist, or
a switch that this process may not make, is refused at once. The drop itself happens once
every port is bound: supplementary groups, group, then user (in that order: without root,
the first two could no longer be changed), for every thread of the process (glibc applies
setuid and its kin to all of them, the engine's workers included)."""

from __future__ import annotations

import grp
import importlib
import os
import pwd
from dataclasses import dataclass

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39  # <linux/capability.h>


def has_capabilities(*numbers: int) -> bool:
    """Whether this process holds every one of these capabilities (CAP_*) in its effective set."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
                return all(effective >> number & 1 for number in numbers)
    return False


# Modules a running sidecar may import after the drop, when the files of this Python may
# no longer be readable (an interpreter under /root): the codec that resolving a host name
# added by a reload needs. Everything else serve runs was imported while starting.
_IMPORTED_BEFORE_DROP = ("encodings.idna",)


@dataclass(frozen=True)
class Account:
    """Who the sidecar runs as once its ports are bound."""

    name: str  # as given on the command line, for messages
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _group_id(text: str, flag: str) -> int:
    number = _number(text)
    if number is not None:
        return number
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"{flag} {text}: no such group") from None


def account(user: str, group: str | None = None, groups: str | None = None) -> Account:
    """The account `--user USER --group GROUP --groups G,...` name (a name or a number each). A
    number without a passwd entry is allowed (a container's uid 1337 often has none); its group is
    then the same number unless --group says. --groups adds supplementary groups (a pod's fsGroup,
    through which the kubelet lets the proxy read its Secret). ValueError for a name that does not
    exist, or a switch only root may make while this process is not root."""
    uid, entry = _number(user), None
    try:
        entry = pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(user)
    except KeyError:
        if uid is None:
            raise ValueError(f"--user {user}: no such user") from None
    if entry is not None:
        uid = entry.pw_uid
    assert uid is not None
    gid = entry.pw_gid if entry is not None else uid
    if group is not None:
        gid = _group_id(group, "--group")
    # The user's own groups when it has an entry (a group that may read the key, as an fsGroup).
    supplementary = tuple(os.getgrouplist(entry.pw_name, gid)) if entry is not None and group is None else (gid,)
    for extra in (name.strip() for name in (groups or "").split(",") if name.strip()):
        extra_gid = _group_id(extra, "--groups")
        if extra_gid not in supplementary:
            supplementary += (extra_gid,)
    found = Account(user, uid, gid, supplementary)
    if os.geteuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
        raise ValueError(f"--user {found}: only root can switch to another user; serve runs as uid "
                         f"{os.getuid()}, gid {os.getgid()}")
    return found


def drop(to: Account) -> None:
    """Become `to` for good, in every thread; OSError should the system refuse it."""
    for module in _IMPORTED_BEFORE_DROP:
        importlib.import_module(module)
    if os.geteuid() != 0:
        return  # account() made sure this process already is `to`
    os.setgroups(list(to.groups))
    os.setgid(to.gid)  # as root: real, effective and saved ids alike
    os.setuid(to.uid)
    if (to.uid != 0 and 0 in os.getresuid()) or (to.gid != 0 and 0 in os.getresgid()):
        raise OSError(f"still root after switching to {to}")
