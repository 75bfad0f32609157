"""The addresses one sidecar listens on (its listeners, metrics, admin, health), and which
of them cannot all be bound: found before anything is bound, so that `serve` and
`check` name both settings instead of failing at bind with "address in use"."""

from __future__ import annotations

import ipaddress
from typing import Iterable

from fastmesh.addr import Address


def _overlap(a: Address, b: Address) -> bool:
    """Whether binding both fails on Linux (SO_REUSEADDR, no SO_REUSEPORT): same port,
    and the same host or a wildcard covering the other. Port 0 picks a free port."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    try:
        ips = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:  # a name: compared as written
        return False
    for ip, other in (ips, ips[::-1]):
        if ip.is_unspecified and (ip.version == other.version or ip.version == 6):  # [::] is dual stack
            return True
    return False


def conflicts(named: Iterable[tuple[str, Address | None]]) -> list[str]:
    """One problem per address that overlaps an earlier one; `named` pairs each address
    (None: not served) with the setting it comes from, e.g. "spec.metrics" or "--admin"."""
    problems: list[str] = []
    seen: list[tuple[str, Address]] = []
    for name, address in named:
        if address is None:
            continue
        for earlier_name, earlier in seen:
            if _overlap(earlier, address):
                same = "is also" if earlier == address else f"overlaps {earlier},"
                problems.append(f"{name}: {address} {same} {earlier_name}'s address: only one of them can listen")
                break
        seen.append((name, address))
    return problems
