"""The engine contract: fastmesh._core (Cython) and fastmesh._engine_py (pure
Python) both implement exactly this interface, with the records of
fastmesh.records, the counters, limits and argument checks of
fastmesh.contract and the defaults of fastmesh.defaults.
tests/test_engine_parity.py holds both engines to this file."""

from fastmesh.exchange import ExchangeSettings
from fastmesh.records import Batch, ConnectionInfo
from fastmesh.routing import RouteTable
from fastmesh.tls import ListenerTls

IMPLEMENTATION: str  # "cython" or "python"
SPLICE_SUPPORTED: bool

class Engine:
    def __init__(
        self,
        workers: int = ...,
        *,
        pipe_size: int = ...,
        max_pipes: int = ...,
        buffer_size: int = ...,
        splice: bool = ...,
        io_uring: bool = ...,
    ) -> None:
        """Defaults: fastmesh.defaults.DEFAULTS. TypeError or ValueError for options
        fastmesh.contract.check_engine_options() refuses."""
    @property
    def workers(self) -> int: ...
    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
    @property
    def splice_enabled(self) -> bool: ...
    @property
    def io_uring(self) -> bool:
        """The workers make their plain receives and sends through io_uring, batched."""
    @property
    def io_uring_unavailable(self) -> str | None:
        """Why io_uring was asked for and is not used; None when it is, or was not asked for."""
    @property
    def has_identity(self) -> bool:
        """set_identity() was called: mTLS is possible."""
    def start(self) -> None:
        """Start the worker threads. RuntimeError once stopped."""
    def stop(self) -> None:
        """Stop the worker threads; reset every open connection (recorded as SHUTDOWN)."""
    def set_identity(self, cert_chain: str, key: str, roots: str, trust_domain: str) -> None:
        """The mesh identity for the handshakes to come (PEM files, as fastmesh.certs
        names them): inbound mTLS, and ISTIO_MUTUAL toward mesh peers. Open
        connections keep theirs. ValueError for files TLS refuses (the identity in
        force stays), TypeError for arguments that are not text."""
    def add_listener(self, fd: int, routes: RouteTable, exchange: ExchangeSettings | None = None,
                     tls: ListenerTls | None = None, max_connections: int = 0) -> int:
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning
        the fd) and route each connection by `routes` (whose clusters say how they
        originate TLS); with `exchange`, run the peer metadata exchange (over TLS when
        ALPN negotiated istio-peer-exchange, in plaintext when its settings say so);
        `tls` says what an inbound listener accepts. Past `max_connections` open
        connections (0: no limit) a new one is reset at once and counted
        (listener_overflows). Every worker accepts on it and
        keeps what it accepts. Returns the listener id. TypeError or ValueError for
        what fastmesh.contract.check_listener() refuses, OSError for a bad fd,
        RuntimeError once stopped."""
    def remove_listener(self, listener_id: int) -> None:
        """Stop accepting on that listener; open connections go on. ValueError for an
        id never returned by add_listener()."""
    def relay(self, down_fd: int, up_fd: int) -> int:
        """Relay an established socket pair; the engine owns and closes both fds.
        Returns the connection id. OSError for a bad fd, RuntimeError once stopped."""
    def collect(self) -> Batch:
        """Everything that changed since the previous call, in one batch."""
    def connections(self) -> list[ConnectionInfo]:
        """Every open connection's state, for diagnosis."""
    def stats(self) -> dict[str, int]:
        """fastmesh.contract.STATS, in that order, summed over the workers."""
