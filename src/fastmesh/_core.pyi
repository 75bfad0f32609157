"""Type stub for the relay engine. fastmesh._core (Cython) and fastmesh._engine_py
(pure Python) both implement exactly this interface."""

from typing import Sequence

from fastmesh.exchange import ExchangeSettings

# One tuple per connection, as returned by Engine.collect(). conn_id is an opaque
# integer, unique within an engine.
# opened:  (conn_id, listener_id, upstream_index)
# updated: (conn_id, d_down_rx, d_down_tx, d_up_rx, d_up_tx)
# closed:  (conn_id, listener_id, upstream_index, reason, errno,
#           d_down_rx, d_down_tx, d_up_rx, d_up_tx)
# peers:   (conn_id, payload) once per exchanging connection, when the peer's first
#           bytes are settled: the payload of its istio-peer-exchange frame (a
#           serialized google.protobuf.Any, not yet checked), or None when they were
#           not a frame. A connection that closed since the last call may appear.
# d_* are deltas since the previous collect(): down_rx = bytes read from downstream,
# down_tx = bytes written to downstream, up_rx = read from upstream, up_tx = written
# to upstream. listener_id and upstream_index are -1 for pairs given to relay().
Opened = tuple[int, int, int]
Updated = tuple[int, int, int, int, int]
Closed = tuple[int, int, int, int, int, int, int, int, int]
Peer = tuple[int, bytes | None]

IMPLEMENTATION: str  # "cython" or "python"
SPLICE_SUPPORTED: bool

class Engine:
    def __init__(
        self,
        workers: int = 1,
        *,
        pipe_size: int = 1048576,
        max_pipes: int = 4096,
        buffer_size: int = 65536,
        splice: bool = True,
    ) -> None: ...
    @property
    def workers(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def splice_enabled(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None:
        """Stop the worker threads; reset every open connection (recorded as SHUTDOWN)."""
    def add_listener(
        self,
        fd: int,
        upstreams: Sequence[tuple[str, int]],
        connect_timeout: float = 5.0,
        exchange: ExchangeSettings | None = None,
    ) -> int:
        """Accept on a bound, listening, non-blocking socket (the caller keeps owning
        the fd) and relay each connection to the next upstream, round robin.
        upstreams are numeric IPv4/IPv6 addresses. exchange: the peer metadata
        exchange settings, or None for none. Returns the listener id."""
    def remove_listener(self, listener_id: int) -> None:
        """Stop accepting on that listener; open connections go on."""
    def relay(self, down_fd: int, up_fd: int) -> int:
        """Relay an established socket pair; the engine owns and closes both fds."""
    def collect(self) -> tuple[list[Opened], list[Updated], list[Closed], list[Peer]]:
        """Everything that changed since the previous call, in one batch."""
    def stats(self) -> dict[str, int]:
        """Engine health counters: active_connections, connections_accepted,
        connections_relayed, connect_failures, connect_timeouts, accept_errors,
        accept_paused, pipes_in_use, pipes_pooled, buffers_in_use,
        splice_fallbacks, loop_iterations, resets_propagated, records_dropped,
        and fastmesh.exchange.EXCHANGE_STATS."""
