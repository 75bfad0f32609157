"""The peer metadata exchange for the pure-Python twin (fastmesh._engine_py), by the
Cython engine's rules (native/exchange.pxi), except that the peer's first bytes are
read rather than peeked (with level-triggered sockets a peek would spin): bytes
that turn out not to be a frame are passed on from the connection's own buffer."""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING, Any, Optional

from fastmesh._twin_base import DOWN, UP, SideError
from fastmesh.contract import FRAME_CHUNK, FRAMES_KEPT
from fastmesh.exchange import HEADER, MAGIC_BYTES, ExchangeSettings
from fastmesh.reasons import CloseReason
from fastmesh.routing import OUTBOUND

if TYPE_CHECKING:
    from fastmesh._engine_py import _Conn, _Listener


class ExchangeWorkerMixin:
    """The exchange part of the twin's worker: attributes and methods of _engine_py._Worker."""

    counters: dict[str, int]
    exchanging: set
    kept: dict[bytes, bytes]
    buffer_size: int
    _recv: Any
    _send: Any
    _sync: Any
    _finish: Any
    _tls_peer_report: Any

    def _exchange_begin(self, conn: "_Conn", settings: ExchangeSettings) -> None:
        self.counters["exchange_enabled"] += 1
        conn.identifies = True
        conn.exchange = settings
        conn.xreading = conn.xcan_send = True
        if settings.role == OUTBOUND:
            conn.xside = UP  # the frame leads toward the peer, once connected
            if conn.deadline is None and not conn.securing:
                self._send_local_frame(conn)
        else:
            conn.xside = DOWN
            conn.xhold = True  # a server-first app waits for the client's first bytes, briefly
            if conn.deadline is None and not conn.securing:
                self._exchange_deadline(conn, settings.detect_timeout)

    def _exchange_gate(self, lst: "_Listener", conn: "_Conn") -> None:
        """Whether a plaintext connection exchanges metadata, decided once as it opens:
        fastmesh's own variant, only where the listener asks for it."""
        settings = lst.exchange
        if settings is None or not settings.plaintext:
            return
        if not settings.exchanges_with(lst.routes.is_mesh_peer(conn.cluster, conn.endpoint)):
            self.counters["exchange_disabled"] += 1
            return
        self._exchange_begin(conn, settings)

    def _exchange_after_tls(self, conn: "_Conn", alpn_found: bool) -> None:
        """Over TLS the exchange runs when ALPN negotiated istio-peer-exchange."""
        settings = conn.listener.exchange if conn.listener is not None else None
        if settings is not None and alpn_found:
            self._exchange_begin(conn, settings)
            return
        if settings is not None:
            self.counters["exchange_disabled"] += 1
        conn.xreport = self._tls_peer_report(conn, None)

    def _exchange_after_plaintext_detect(self, conn: "_Conn", spoke: bool) -> None:
        """PERMISSIVE, a plaintext client: the plaintext rules, or nobody to know."""
        settings = conn.listener.exchange if conn.listener is not None else None
        if settings is not None and settings.plaintext:
            self._exchange_begin(conn, settings)
            if not spoke:  # it had its wait for the client
                self.counters["exchange_detect_timeouts"] += 1
                conn.xdeadline = None
                self.exchanging.discard(conn)
                conn.xhold = conn.xcan_send = False
            return
        if settings is not None:
            self.counters["exchange_disabled"] += 1
        conn.xreport = self._tls_peer_report(conn, None)

    def _exchange_deadline(self, conn: "_Conn", seconds: float) -> None:
        conn.xdeadline = time.monotonic() + seconds
        self.exchanging.add(conn)

    def _send_local_frame(self, conn: "_Conn") -> None:
        assert conn.exchange is not None
        conn.xcan_send = False
        flow = conn.flows[1 - conn.xside]
        flow.pending = memoryview(conn.exchange.frame)
        flow.unseen = len(conn.exchange.frame)
        self.counters["exchange_frames_sent"] += 1

    def _settle(self, conn: "_Conn", payload: Optional[bytes]) -> None:
        """The peer's first bytes are a frame (payload) or not a frame (None)."""
        conn.xreading = False
        conn.xreport = self._tls_peer_report(conn, payload)
        conn.xdeadline = None
        self.exchanging.discard(conn)
        if conn.xhold:
            conn.xhold = False
            if payload is not None and conn.xcan_send:
                self._send_local_frame(conn)  # inbound answers only a peer that spoke the protocol
        conn.xcan_send = False

    def _not_a_frame(self, conn: "_Conn", src: int) -> None:
        """The bytes read while looking for a header are application bytes: pass them on."""
        self.counters["exchange_no_frame"] += 1
        head = bytes(conn.xhead)
        conn.xhead = bytearray()
        self._settle(conn, None)
        if head:
            flow = conn.flows[src]
            flow.rx += len(head)
            flow.pending = memoryview(head)
            self._send(conn, src)

    def _bad_frame(self, conn: "_Conn", src: int, counter: str) -> None:
        self.counters[counter] += 1
        reason = CloseReason.DOWNSTREAM_PROTOCOL_ERROR if src == DOWN else CloseReason.UPSTREAM_PROTOCOL_ERROR
        self._finish(conn, reason, errno.EPROTO, reset=(True, True))

    def _read_peer_frame(self, conn: "_Conn", src: int) -> None:
        settings = conn.exchange
        assert settings is not None
        got = len(conn.xhead) if conn.xpayload is None else HEADER.size + len(conn.xpayload)
        want = (HEADER.size if conn.xpayload is None else conn.xlen) - got
        try:
            data = self._recv(conn, src, min(want, self.buffer_size)) if want else b""
        except (BlockingIOError, InterruptedError):
            return
        if conn.xpayload is None:
            if not data:  # the stream ends before a header
                if len(conn.xhead) >= len(MAGIC_BYTES):
                    self._bad_frame(conn, src, "exchange_frames_truncated")
                else:
                    self._not_a_frame(conn, src)
                return
            conn.xhead += data
            seen = min(len(conn.xhead), len(MAGIC_BYTES))
            if conn.xhead[:seen] != MAGIC_BYTES[:seen]:
                self._not_a_frame(conn, src)
                return
            if not conn.xstarted:
                conn.xstarted = True
                self._exchange_deadline(conn, settings.frame_timeout)
            if len(conn.xhead) < HEADER.size:
                return
            _, size = HEADER.unpack(conn.xhead)
            if size > settings.max_payload:
                self._bad_frame(conn, src, "exchange_frames_too_large")
                return
            conn.xpayload, conn.xlen = bytearray(), HEADER.size + size
        else:
            if not data and want:
                self._bad_frame(conn, src, "exchange_frames_truncated")
                return
            conn.xpayload += data
        if HEADER.size + len(conn.xpayload) == conn.xlen:
            self.counters["exchange_frames_received"] += 1
            self._settle(conn, self._share(bytes(conn.xpayload)))
            conn.xpayload = None
            self._sync(conn)

    def _share(self, payload: bytes) -> bytes:
        """The payload object of a recent identical frame, else this one, kept (if small)."""
        kept = self.kept.get(payload)
        if kept is not None:
            self.counters["exchange_frames_shared"] += 1
            return kept
        if HEADER.size + len(payload) <= FRAME_CHUNK:
            if len(self.kept) == FRAMES_KEPT:
                del self.kept[next(iter(self.kept))]  # the oldest
            self.kept[payload] = payload
        return payload

    def _exchange_timer(self, conn: "_Conn") -> None:
        try:
            self._exchange_deadline_passed(conn)
        except SideError as exc:
            self.counters["resets_propagated"] += 1
            reason = CloseReason.DOWNSTREAM_RESET if exc.side == DOWN else CloseReason.UPSTREAM_RESET
            self._finish(conn, reason, exc.errno, reset=(exc.side != DOWN, exc.side != UP))

    def _exchange_deadline_passed(self, conn: "_Conn") -> None:
        if conn.xstarted:
            # A frame's first bytes and then silence: a whole magic is a frame that never
            # completed; less than that is application bytes that happen to match.
            if conn.xpayload is not None or len(conn.xhead) >= len(MAGIC_BYTES):
                self._bad_frame(conn, conn.xside, "exchange_frames_timed_out")
                return
            self._not_a_frame(conn, conn.xside)
        else:
            # Inbound, nothing from the client yet: release the app's first bytes without
            # our frame. A frame that still comes first is read as usual.
            self.counters["exchange_detect_timeouts"] += 1
            conn.xdeadline = None
            self.exchanging.discard(conn)
            conn.xhold = conn.xcan_send = False
        self._sync(conn)
