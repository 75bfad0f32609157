"""HOST:PORT parsing and resolution for listeners and upstreams."""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse `host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDRESS]:PORT")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: the port must be a number")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return Address(host or "0.0.0.0", port)


def resolve(address: Address) -> list[Address]:
    """Numeric addresses for a host name (one entry per distinct address), looked up
    now: names are resolved once, when a listener or config is built."""
    try:
        ipaddress.ip_address(address.host)
        return [address]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {address.host!r}: {exc.strerror}") from None
    found: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            resolved = Address(sockaddr[0], sockaddr[1])
            if resolved not in found:
                found.append(resolved)
    if not found:
        raise ValueError(f"{address.host!r} has no IPv4 or IPv6 address")
    return found


IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75  # <linux/in.h>, <linux/in6.h>


def bind_listener(address: Address, backlog: int, transparent: bool = False) -> socket.socket:
    """A non-blocking listening socket; the error names the address on failure. `transparent`:
    it takes connections iptables TPROXY hands it (IP_TRANSPARENT, which needs CAP_NET_RAW or
    CAP_NET_ADMIN)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            except PermissionError:
                raise PermissionError(1, "interceptionMode TPROXY needs CAP_NET_RAW or CAP_NET_ADMIN "
                                         "(IP_TRANSPARENT)") from None
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock
