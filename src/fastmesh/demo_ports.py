"""The ports `fastmesh demo` takes on 127.0.0.1, and the Bookinfo files moved onto them.

By default each one is the Bookinfo files' own (Prometheus's is its usual 9090); one that is
taken is replaced by a free port, and said so. `--port-base N` puts them all on N, N+1, …
instead, in the order of PORTS, and refuses to start if one of those is taken."""

from __future__ import annotations

import dataclasses
import socket
from contextlib import ExitStack
from typing import Callable, Sequence

from fastmesh.addr import parse_address
from fastmesh.config.istio_api import Sidecar as SidecarSpec
from fastmesh.config.istio_api import WorkloadEntry
from fastmesh.config.loader import Document


@dataclasses.dataclass(frozen=True)
class Port:
    role: str
    default: int  # the port the Bookinfo files (or Prometheus) use
    what: str  # what listens there, as the messages name it


PORTS = (
    Port("client_admin", 15000, "ratings-v2's sidecar admin"),
    Port("client", 15001, "ratings-v2's sidecar, where the app connects"),
    Port("inbound", 15006, "the database's inbound sidecar"),
    Port("server_admin", 15010, "the database's sidecar admin"),
    Port("client_metrics", 15090, "ratings-v2's sidecar metrics"),
    Port("server_metrics", 15091, "the database's sidecar metrics"),
    Port("database", 27018, "the database"),
    Port("prometheus", 9090, "Prometheus"),
)


class PortInUse(RuntimeError):
    """A port --port-base asked for is taken."""


def _bind(stack: ExitStack, port: int) -> int | None:
    """Hold 127.0.0.1:`port` (0: any free one) until `stack` closes; the port, or None if taken.
    SO_REUSEADDR, as the servers set it, so that a port in TIME_WAIT counts as free."""
    sock = stack.enter_context(socket.socket())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()  # a listener, as the servers' own would be
    except OSError:
        return None
    return sock.getsockname()[1]


def choose(base: int | None, with_prometheus: bool, progress: Callable[[str], None],
           table: Sequence[Port] = PORTS) -> dict[str, int]:
    """Each role's port. Every port is held while choosing, so none is chosen twice."""
    wanted = [port for port in table if with_prometheus or port.role != "prometheus"]
    if base is not None and base + len(wanted) - 1 > 65535:
        raise PortInUse(f"--port-base {base} needs ports {base} to {base + len(wanted) - 1}; the last port is 65535")
    chosen = {}
    with ExitStack() as held:
        for offset, port in enumerate(wanted):
            number = port.default if base is None else base + offset
            if _bind(held, number) is not None:
                chosen[port.role] = number
            elif base is not None:
                raise PortInUse(f"port {number} (--port-base {base} + {offset}, for {port.what}) is in use; "
                                f"choose another --port-base")
            else:
                chosen[port.role] = _bind(held, 0)
                progress(f"port {number} is in use; using {chosen[port.role]} for {port.what}")
    return chosen


def describe(ports: dict[str, int]) -> str:
    return ", ".join(f"{ports[port.role]} {port.what}" for port in PORTS if port.role in ports)


def moved(document: Document, ports: dict[str, int]) -> Document:
    """`document` with every port of the Bookinfo defaults in it replaced by its chosen one:
    the sidecars' listeners, metrics and admin, and the database workload's port."""
    by_default = {port.default: ports[port.role] for port in PORTS if port.role in ports}
    spec = document.spec
    if isinstance(spec, SidecarSpec):
        spec = spec.model_copy(update={
            "inbound": [listener.model_copy(update={"port": by_default.get(listener.port, listener.port),
                                                    "target_port": by_default.get(listener.target_port,
                                                                                  listener.target_port)})
                        for listener in spec.inbound],
            "outbound": [listener.model_copy(update={"port": by_default.get(listener.port, listener.port)})
                         for listener in spec.outbound],
            "metrics": _moved_address(spec.metrics, by_default),
            "admin": _moved_address(spec.admin, by_default),
        })
    elif isinstance(spec, WorkloadEntry):
        spec = spec.model_copy(update={"ports": {name: by_default.get(number, number)
                                                 for name, number in spec.ports.items()}})
    return dataclasses.replace(document, spec=spec)


def _moved_address(text: str | None, by_default: dict[int, int]) -> str | None:
    if text is None:
        return None
    address = parse_address(text)
    return f"{address.host}:{by_default.get(address.port, address.port)}"
