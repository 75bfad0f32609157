"""Mutual TLS for the pure-Python twin (fastmesh._engine_py), with the ssl module
and memory BIOs: the same rules as the Cython engine's native/tls.pxi (ALPN,
SPIFFE peers of the trust domain, PERMISSIVE detection, STRICT connecting only
once the client is verified, close_notify for a half-close, a truncation passed
on as a reset) and the same counters."""

from __future__ import annotations

import errno
import socket
import ssl
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from fastmesh._twin_base import DOWN, UP
from fastmesh.records import Peer
from fastmesh.tls import CLIENT_ALPN, EXCHANGE_ALPN, MUTUAL, SERVER_ALPN, SIMPLE, TLS12_CIPHERS, ClientTls

if TYPE_CHECKING:
    from fastmesh._engine_py import _Conn

SPIFFE = "spiffe://"
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS client's first bytes
# How a connection's TLS stands (the Cython engine's TLS_* phases).
OFF, DETECT, HANDSHAKE, ON = "off", "detect", "handshake", "on"
_RAW_READ = 65536  # encrypted bytes taken from a socket at a time


def _session_getter_leaks(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether reading SSLObject.session leaks a copy of the session, certificates and all
    (some 6 KB a read): python/cpython#116810, in every 3.11 and in 3.12 and 3.13 until the
    fix of October 2024 (3.12.8 and 3.13.1 have it, at the latest)."""
    return version < (3, 12, 8) or (3, 13) <= version < (3, 13, 1)


# Client sessions kept and resumed, as the C engine does, only where reading one does not
# leak: otherwise every mesh connection would leak its session, and every handshake is full
# (the server issues no ticket that no twin client could keep).
RESUMPTION = not _session_getter_leaks()

# OpenSSL's reasons, as the ssl module names them, for the counters of contract.COUNTERS.
_VERIFY_CODES = {10: "expired", 9: "not_yet_valid"}  # X509_V_ERR_CERT_HAS_EXPIRED, _NOT_YET_VALID


class TlsFailure(Exception):
    """A handshake that cannot go on; `reason` is the tls_error_<reason> counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _context(server: bool, cert_chain: str, key: str, roots: str, mesh_alpn: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the peer is checked by its SAN, not by a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS12_CIPHERS)  # Python's ssl cannot order TLS 1.3's suites: OpenSSL's order there
    try:
        if cert_chain:
            ctx.load_cert_chain(cert_chain, key)
        ctx.load_verify_locations(roots)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{cert_chain or roots}: {exc}") from None
    if server:
        ctx.set_alpn_protocols(list(SERVER_ALPN))
        ctx.num_tickets = 1 if RESUMPTION else 0  # one is all a client keeps
        ctx.options |= ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE  # as the C engine: stateful sessions
    elif mesh_alpn:
        ctx.set_alpn_protocols(list(CLIENT_ALPN))
    return ctx


class Identity:
    """The mesh identity's two contexts, as Engine.set_identity() makes them."""

    def __init__(self, cert_chain: str, key: str, roots: str, trust_domain: str) -> None:
        self.server = _context(True, cert_chain, key, roots, True)
        self.client = _context(False, cert_chain, key, roots, True)
        self.trust_domain = trust_domain


def cluster_context(tls: Optional[ClientTls]) -> Optional[ssl.SSLContext]:
    """A SIMPLE or MUTUAL cluster's own context."""
    if tls is None or tls.mode not in (SIMPLE, MUTUAL):
        return None
    certificate = tls.client_certificate if tls.mode == MUTUAL else ""
    return _context(False, certificate, tls.private_key, tls.ca_certificates, False)


class Sessions:
    """The last client session per endpoint, for resumption; shared by the workers. A
    session resumes only under the context that made it: after a rotation (a new client
    context) the first handshake to each endpoint is a full one, as in the C engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[int, int], tuple[ssl.SSLContext, ssl.SSLSession]] = {}

    def get(self, cluster: int, endpoint: int, ctx: ssl.SSLContext) -> Optional[ssl.SSLSession]:
        with self._lock:
            kept = self._last.get((cluster, endpoint))
        return kept[1] if kept is not None and kept[0] is ctx else None

    def keep(self, cluster: int, endpoint: int, obj: ssl.SSLObject) -> None:
        """The connection's session, if it has a ticket, as the endpoint's last (read only
        where RESUMPTION: each read of obj.session may cost a leaked copy)."""
        if not RESUMPTION:
            return
        session = obj.session
        if session is not None and session.has_ticket:
            with self._lock:
                self._last[(cluster, endpoint)] = (obj.context, session)


class TlsEnd:
    """One end of a connection that speaks TLS: its SSLObject between two memory
    BIOs, and the encrypted bytes not yet written to its socket."""

    __slots__ = ("obj", "incoming", "outgoing", "raw_out", "carried", "read_end", "end_told")

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, sni: Optional[str] = None,
                 session: Optional[ssl.SSLSession] = None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=sni,
                                session=session)
        self.raw_out = b""
        self.carried = b""  # plaintext decrypted before our close_notify, not read yet
        self.read_end: Optional[ssl.SSLError] = None  # and how the peer's stream ended, if it had
        self.end_told = False  # read_end was given to a reader

    def buffered(self) -> bool:
        """Bytes that wait in the BIO or the SSL object, with no socket event to come."""
        return (self.obj.pending() > 0 or self.incoming.pending > 0 or bool(self.carried)
                or (self.read_end is not None and not self.end_told))

    def take_received(self) -> None:
        """Decrypt every record already received into `carried`. Python's ssl sends
        close_notify with unwrap(), which then reads on for the peer's and throws away
        the application data it meets: TLS 1.3's half-close would lose the peer's last
        bytes (the C engine calls SSL_shutdown once, which does not read)."""
        taken = []
        while self.read_end is None:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                self.read_end = exc
                break
            if not chunk:  # the peer's close_notify (Python's ssl returns b"" for it)
                self.read_end = ssl.SSLZeroReturnError()
            taken.append(chunk)
        self.carried += b"".join(taken)


def failure_reason(exc: BaseException) -> str:
    """Why a handshake failed, as the tls_error_<reason> counter."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "untrusted")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        return "reset"
    reason = getattr(exc, "reason", "") or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    if reason == "UNEXPECTED_EOF_WHILE_READING":
        return "reset"
    if "ALERT" in reason:
        return "alert"
    return "protocol"


def peer_principal(obj: ssl.SSLObject) -> tuple[Optional[str], list[str]]:
    """(the first spiffe:// URI SAN, every URI and DNS SAN) of the verified peer."""
    cert = obj.getpeercert() or {}
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("URI", "DNS")]
    principal = next((n for n in names if n.startswith(SPIFFE)), None)
    return principal, names


def peer_allowed(names: list[str], trust_domain: str, tls: Optional[ClientTls], mode: str) -> bool:
    """The Cython engine's peer_identity(): a SPIFFE id of the trust domain for the mesh
    (inbound, or ISTIO_MUTUAL without subjectAltNames), else one of the cluster's SANs."""
    allowed = tls.subject_alt_names if tls is not None else ()
    if allowed:
        return any(name in allowed for name in names)
    if mode in (SIMPLE, MUTUAL):
        return True  # a verified chain is all a DestinationRule without SANs asks
    prefix = f"{SPIFFE}{trust_domain}/"
    return any(name.startswith(prefix) for name in names)


class TlsWorkerMixin:
    """The TLS part of the twin's worker: attributes and methods of _engine_py._Worker."""

    counters: dict[str, int]
    engine: Any
    buffered: set

    # -- socket side of a TLS end

    def _tls_take_raw(self, conn: "_Conn", side: int) -> bool:
        """Move what the socket has into the end's BIO; False when nothing came (yet)."""
        tls = conn.tls[side]
        sock = conn.socks[side]
        assert tls is not None and sock is not None
        try:
            data = sock.recv(_RAW_READ)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise ConnectionResetError(exc.errno, str(exc)) from None
        if data:
            tls.incoming.write(data)
        else:
            tls.incoming.write_eof()
        return True

    def _tls_flush(self, conn: "_Conn", side: int) -> bool:
        """Write the end's encrypted bytes to its socket; True when none are left."""
        tls = conn.tls[side]
        sock = conn.socks[side]
        assert tls is not None and sock is not None
        tls.raw_out += tls.outgoing.read()
        if tls.raw_out:
            try:
                sent = sock.send(tls.raw_out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            tls.raw_out = tls.raw_out[sent:]
        return not tls.raw_out

    # -- handshakes

    def _start_tls(self, conn: "_Conn", side: int) -> None:
        lst = conn.listener
        assert lst is not None
        identity = self.engine._identity
        if side == DOWN:
            conn.tls[DOWN] = TlsEnd(identity.server, server_side=True)
        else:
            cluster = lst.routes.clusters[conn.cluster]
            ctx = lst.tls_contexts[conn.cluster] or identity.client  # ISTIO_MUTUAL needs the identity
            session = lst.sessions.get(conn.cluster, conn.endpoint, ctx)
            sni = cluster.tls.sni if cluster.tls is not None and cluster.tls.sni else None
            conn.tls[UP] = TlsEnd(ctx, server_side=False, sni=sni, session=session)
        conn.tls_side = side
        conn.tls_phase = HANDSHAKE
        conn.tls_deadline = time.monotonic() + lst.tls.handshake_timeout

    def _tls_detect(self, conn: "_Conn") -> None:
        # A TLS client speaks first with a handshake record; anything else is plaintext.
        sock = conn.socks[DOWN]
        assert sock is not None and conn.listener is not None
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        if first and first[0] == TLS_RECORD_HANDSHAKE:
            self._start_tls(conn, DOWN)
        elif conn.mtls == "STRICT":
            raise TlsFailure("plaintext" if first else "reset")  # gone before a byte: abandoned
        else:
            self._plaintext_client(conn, spoke=True)

    @staticmethod
    def _app_spoke(conn: "_Conn") -> bool:
        """The app has sent bytes, or closed (nothing reads it while detecting)."""
        sock = conn.socks[UP]
        assert sock is not None
        try:
            sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass  # an error is the relay's to report
        return True

    def _plaintext_client(self, conn: "_Conn", spoke: bool) -> None:
        self.counters["tls_plaintext"] += 1
        conn.tls_side, conn.tls_phase, conn.tls_deadline = -1, OFF, None
        self._exchange_after_plaintext_detect(conn, spoke)  # type: ignore[attr-defined]

    def _tls_drive(self, conn: "_Conn") -> None:
        """Detect, then handshake, as far as the bytes that came allow."""
        try:
            if conn.tls_phase == DETECT:
                self._tls_detect(conn)
            if conn.tls_phase != HANDSHAKE:
                return
            side = conn.tls_side
            tls = conn.tls[side]
            assert tls is not None
            while True:
                try:
                    tls.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._tls_flush(conn, side)
                    if not self._tls_take_raw(conn, side):
                        return
            self._tls_flush(conn, side)
            self._tls_done(conn)
        except TlsFailure as exc:
            self._tls_failed(conn, exc.reason)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            self._tls_failed(conn, failure_reason(exc))

    def _tls_done(self, conn: "_Conn") -> None:
        side = conn.tls_side
        tls = conn.tls[side]
        lst = conn.listener
        assert tls is not None and lst is not None
        principal, names = peer_principal(tls.obj)
        cluster_tls = lst.routes.clusters[conn.cluster].tls if side == UP else None
        identity = self.engine._identity
        if not peer_allowed(names, identity.trust_domain if identity else "", cluster_tls, conn.tls_mode):
            self._tls_failed(conn, "peer_identity")
            return
        conn.principal = principal
        conn.tls_phase = ON
        conn.tls_deadline = None
        self.counters["tls_handshakes"] += 1
        if tls.obj.session_reused:
            self.counters["tls_resumed"] += 1
        if side == UP:
            lst.sessions.keep(conn.cluster, conn.endpoint, tls.obj)
        self._exchange_after_tls(conn, tls.obj.selected_alpn_protocol() == EXCHANGE_ALPN)  # type: ignore
        if conn.securing:
            self._connect_secured(conn)  # type: ignore[attr-defined]

    def _tls_failed(self, conn: "_Conn", reason: str) -> None:
        from fastmesh.reasons import CloseReason

        self.counters[f"tls_error_{reason}"] += 1
        why = CloseReason.DOWNSTREAM_TLS_ERROR if conn.tls_side == DOWN else CloseReason.UPSTREAM_TLS_ERROR
        self._finish(conn, why, errno.EPROTO, reset=(True, True))  # type: ignore[attr-defined]

    def _tls_timer(self, conn: "_Conn") -> None:
        conn.tls_deadline = None
        assert conn.listener is not None
        if conn.tls_phase == DETECT and conn.mtls == "PERMISSIVE":
            # A server-first app's greeting goes to a plaintext client; while the app is silent
            # too, nothing is decided (native/tls.pxi's tls_timer says why).
            if self._app_spoke(conn):
                self._plaintext_client(conn, spoke=False)
            else:
                conn.detect_waited = True
        else:
            self._tls_failed(conn, "timeout")

    # -- bytes through a TLS end

    def _tls_recv(self, conn: "_Conn", side: int, size: int) -> bytes:
        """recv-like: bytes, b"" at close_notify; BlockingIOError when none yet;
        ConnectionResetError for a stream that ended without close_notify."""
        tls = conn.tls[side]
        assert tls is not None
        while True:
            try:
                if tls.carried:
                    data, tls.carried = tls.carried[:size], tls.carried[size:]
                elif tls.read_end is not None:
                    tls.end_told = True
                    raise tls.read_end
                else:
                    data = tls.obj.read(size)
            except ssl.SSLWantReadError:
                self._tls_flush(conn, side)  # a post-handshake message may want an answer
                if not self._tls_take_raw(conn, side):
                    raise BlockingIOError from None
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError:
                self.counters["tls_truncated"] += 1
                raise ConnectionResetError("the TLS stream ended without close_notify") from None
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS: {exc}") from None
            if tls.buffered():
                self.buffered.add(conn)  # no socket event announces what is left
            if conn.tls_side == UP and conn.listener is not None and not conn.session_kept:
                conn.session_kept = True  # TLS 1.3 tickets come after the handshake
                conn.listener.sessions.keep(conn.cluster, conn.endpoint, tls.obj)
            return data

    def _tls_send(self, conn: "_Conn", side: int, data: memoryview) -> int:
        """send-like: plaintext bytes taken; 0 while earlier records wait for the socket."""
        tls = conn.tls[side]
        assert tls is not None
        if not self._tls_flush(conn, side):
            return 0
        try:
            taken = tls.obj.write(data)
        except ssl.SSLError as exc:
            raise BrokenPipeError(f"TLS: {exc}") from None
        self._tls_flush(conn, side)
        return taken

    def _tls_close_notify(self, conn: "_Conn", side: int) -> bool:
        """Our half of the stream ends; False while close_notify waits for the socket."""
        tls = conn.tls[side]
        assert tls is not None
        if not self._tls_flush(conn, side):
            return False
        tls.take_received()
        try:
            tls.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # sent; the peer's comes on its own (TLS 1.3 reads on)
        return self._tls_flush(conn, side)

    def _tls_peer_report(self, conn: "_Conn", payload: Optional[bytes]) -> Peer:
        return Peer(conn.id, payload, conn.principal)
