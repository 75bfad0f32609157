"""Mutual TLS on the data path, on both engines: a sidecar pair with exact bytes and
both principals, independent clients (Python's ssl, openssl s_client) with and
without Istio's ALPN, no plaintext on the wire between the sidecars, and every
kind of bad input refused with its counter, without a byte reaching the app and
without harm to the connections that behave."""

from __future__ import annotations

import ctypes
import datetime
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    CLIENT, CLIENT_FRAME, GREETING, SERVER, SERVER_FRAME, MeshCerts, listening_socket, random_bytes, read_all,
    sha256, stop_accepting,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from frame_oracle import FrameReader, Outcome
from test_metrics_endpoint import hello_server

from fastmesh import _engine_py, _twin_tls, ca
from fastmesh.exchange import ExchangeSettings, decode_payload
from fastmesh.reasons import CloseReason
from fastmesh.routing import Cluster, RouteTable
from fastmesh.tls import CLIENT_ALPN, ListenerTls

RATINGS, MONGODB = ("default", "bookinfo-ratings-v2"), ("default", "mongodb")


class App:
    """The local app behind an inbound sidecar: it counts what reaches it."""

    def __init__(self, upstream: Any, greeting: bytes = b"", answer: bytes | None = None,
                 greeting_delay: float = 0.0) -> None:
        self.connections = 0
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.greeting = greeting
        self.greeting_delay = greeting_delay  # seconds from the connection to the greeting
        self.answer = answer
        self.server = upstream(self._handle)
        self.address = self.server.address

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        if self.greeting:
            time.sleep(self.greeting_delay)
            conn.sendall(self.greeting)
        data = read_all_bytes(conn)
        with self.lock:
            self.received.append(data)
        conn.sendall(self.answer if self.answer is not None else data)


def read_all_bytes(conn: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = conn.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class Sidecar:
    """One engine, as one sidecar: its identity, one listener."""

    def __init__(self, make_engine: Any, certs: Path | None, routes: RouteTable, exchange: ExchangeSettings | None,
                 tls: ListenerTls | None) -> None:
        self.engine = make_engine()
        if certs is not None:
            self.engine.set_identity(str(certs / ca.CERT_CHAIN), str(certs / ca.KEY), str(certs / ca.ROOT_CERT),
                                     "cluster.local")
        self.sock = listening_socket()
        self.sock.setblocking(False)
        self.engine.add_listener(self.sock.fileno(), routes, exchange, tls)
        self.engine.start()
        self.address = self.sock.getsockname()
        self.peers: dict[int, Any] = {}
        self.closed: dict[int, Any] = {}

    def collect(self) -> None:
        batch = self.engine.collect()
        for peer in batch.peers:
            self.peers[peer.conn_id] = peer
        for record in batch.closed:
            self.closed[record.conn_id] = record

    def wait_closed(self, count: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.closed) < count and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.02)
        assert len(self.closed) == count, self.closed
        return list(self.closed.values())

    def stat(self, name: str, value: int, timeout: float = 10.0) -> None:
        """Wait until the engine's counter says `value`."""
        deadline = time.monotonic() + timeout
        while self.engine.stats()[name] != value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.engine.stats()[name] == value, {k: v for k, v in self.engine.stats().items() if v}


def inbound_side(make_engine: Any, certs: MeshCerts, app: App, mode: str = "STRICT", exchange: bool = True,
                 **tls: Any) -> Sidecar:
    return Sidecar(make_engine, certs.identity(*MONGODB), RouteTable.single([app.address]),
                   ExchangeSettings("inbound", SERVER_FRAME) if exchange else None, ListenerTls(mode, **tls))


def outbound_side(make_engine: Any, certs: Path | None, upstream: tuple[str, int], exchange: bool = True,
                  cluster: Cluster | None = None) -> Sidecar:
    routes = RouteTable((cluster,), ((0, 1),)) if cluster else RouteTable.single([upstream], mesh_peer=True)
    return Sidecar(make_engine, certs, routes, ExchangeSettings("outbound", CLIENT_FRAME) if exchange else None, None)


def client_context(certs: Path | None, roots: Path, alpn: tuple[str, ...] = CLIENT_ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(roots / ca.ROOT_CERT))
    if certs is not None:
        ctx.load_cert_chain(str(certs / ca.CERT_CHAIN), str(certs / ca.KEY))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class TlsClient:
    """A TLS client over memory BIOs, so that it can half-close (close_notify) and go on
    reading, as TLS 1.3 allows and ssl.SSLSocket.unwrap() does not."""

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, delay: float = 0.0) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        time.sleep(delay)  # a client slow to start its handshake
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing)
        self._call(self.obj.do_handshake)

    def _call(self, operation: Any, *args: Any) -> Any:
        while True:
            try:
                result = operation(*args)
                self._flush()
                return result
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(data)

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def selected_alpn_protocol(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def getpeercert(self) -> dict:
        return self.obj.getpeercert()

    def sendall(self, data: bytes) -> None:
        self._call(self.obj.write, data)

    def recv(self, size: int) -> bytes:
        try:
            return self._call(self.obj.read, size)
        except ssl.SSLZeroReturnError:
            return b""

    def close_notify(self) -> None:
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's comes when it is done: we read on
        self._flush()

    def read_all(self) -> bytes:
        data = b""
        try:
            while chunk := self.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        return data

    def __enter__(self) -> "TlsClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def tls_connect(address: tuple[str, int], ctx: ssl.SSLContext, delay: float = 0.0) -> TlsClient:
    return TlsClient(address, ctx, delay)


# ---------------------------------------------------------------- a pair of sidecars


@pytest.mark.parametrize("greeting", [b"", GREETING], ids=["client-first", "server-first"])
def test_an_mtls_pair_relays_exact_bytes_and_learns_both_identities(make_engine, upstream, mesh_certs, greeting):
    payload = random_bytes(3 << 20)
    app = App(upstream, greeting, answer=random_bytes(2 << 20))
    inbound = inbound_side(make_engine, mesh_certs, app)
    outbound = outbound_side(make_engine, mesh_certs.identity(*RATINGS), inbound.address)
    with socket.create_connection(outbound.address) as client:
        if greeting:
            assert client.recv(len(greeting), socket.MSG_WAITALL) == greeting
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)  # a half-close: close_notify toward the inbound sidecar
        assert read_all(client) == (len(app.answer), sha256(app.answer))
    app.server.wait(1)
    assert app.received == [payload]
    for side, peer, principal in ((outbound, SERVER, MeshCerts.spiffe(*MONGODB)),
                                  (inbound, CLIENT, MeshCerts.spiffe(*RATINGS))):
        (record,) = side.wait_closed(1)
        assert record.reason in (CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE)
        (found,) = side.peers.values()
        assert found.principal == principal and decode_payload(found.payload)[0] == peer
        stats = side.engine.stats()
        assert (stats["tls_handshakes"], stats["exchange_enabled"], stats["exchange_frames_sent"]) == (1, 1, 1)
        # Frames and TLS records are never counted: both sides saw the app's bytes.
        total_up = len(payload)
        total_down = len(app.answer) + len(greeting)
        assert (record.down_rx + record.up_tx, record.up_rx + record.down_tx) == (2 * total_up, 2 * total_down)


def test_the_peers_last_bytes_survive_our_close_notify(make_engine, upstream, mesh_certs):
    # Istio's e2e TCP client: "world\n" and its end of stream at once; the app answers
    # "hello world\n" as soon as it has the line. The client's end of stream becomes our
    # close_notify toward the inbound sidecar while the answer may already wait, decrypted
    # or not, in our TLS buffers: TLS 1.3 closes one direction, and not one byte may be lost.
    def hello(conn: socket.socket) -> None:
        hello_server(conn)
        read_all_bytes(conn)  # and stay until the client's end of stream

    server = upstream(hello)
    inbound = Sidecar(make_engine, mesh_certs.identity(*MONGODB), RouteTable.single([server.address]),
                      ExchangeSettings("inbound", SERVER_FRAME), ListenerTls("STRICT"))
    outbound = outbound_side(make_engine, mesh_certs.identity(*RATINGS), inbound.address)
    for _ in range(100):
        with socket.create_connection(outbound.address) as client:
            client.sendall(b"world\n")
            client.shutdown(socket.SHUT_WR)
            assert read_all_bytes(client) == b"hello world\n"
    for record in outbound.wait_closed(100):
        assert record.reason in (CloseReason.DOWNSTREAM_CLOSE, CloseReason.UPSTREAM_CLOSE)
    assert outbound.engine.stats()["tls_truncated"] == 0


def resumes(engine_module: Any) -> bool:
    """Whether this engine resumes TLS sessions here: the twin not on a Python whose ssl module
    leaks a session copy on every read (fastmesh._twin_tls.RESUMPTION)."""
    return engine_module is not _engine_py or _twin_tls.RESUMPTION


def test_sessions_are_resumed_between_the_sidecars(engine_module, make_engine, upstream, mesh_certs):
    app = App(upstream, answer=b"ok")
    inbound = inbound_side(make_engine, mesh_certs, app, exchange=False)
    outbound = outbound_side(make_engine, mesh_certs.identity(*RATINGS), inbound.address, exchange=False)
    for _ in range(4):
        with socket.create_connection(outbound.address) as client:
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == (2, sha256(b"ok"))
    inbound.wait_closed(4)
    assert inbound.engine.stats()["tls_handshakes"] == 4
    if resumes(engine_module):
        assert inbound.engine.stats()["tls_resumed"] >= 2  # the first is full; the ticket comes with its answer
    else:
        assert inbound.engine.stats()["tls_resumed"] == 0


def test_every_connection_after_the_first_resumes_after_a_reset_and_when_many_start_at_once(
        engine_module, make_engine, upstream, mesh_certs):
    # A reset (no close_notify) must not cost the next connection a full handshake,
    # nor may connections that start together from the same session.
    app = App(upstream, answer=b"ok")
    inbound = inbound_side(make_engine, mesh_certs, app, exchange=False)
    outbound = outbound_side(make_engine, mesh_certs.identity(*RATINGS), inbound.address, exchange=False)

    def one() -> None:
        with socket.create_connection(outbound.address) as client:
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == (2, sha256(b"ok"))

    one()  # the full handshake, whose ticket the outbound keeps
    reset = socket.create_connection(outbound.address)
    reset.sendall(b"x")
    inbound.stat("tls_handshakes", 2)
    time.sleep(0.2)  # the outbound reads the ticket that follows the handshake
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # an RST: passed on as a reset, no close_notify either way
    inbound.wait_closed(2)
    one()
    together = [threading.Thread(target=one) for _ in range(8)]
    for thread in together:
        thread.start()
    for thread in together:
        thread.join()
    inbound.wait_closed(11)
    stats = inbound.engine.stats()
    assert (stats["tls_handshakes"], stats["tls_resumed"]) == (11, 10 if resumes(engine_module) else 0)


@pytest.mark.parametrize("version, leaks", [((3, 11, 7), True), ((3, 11, 14), True), ((3, 12, 7), True),
                                            ((3, 12, 8), False), ((3, 13, 0), True), ((3, 13, 1), False),
                                            ((3, 14, 0), False)])
def test_the_twin_reads_no_session_where_the_read_leaks(version, leaks):
    assert _twin_tls._session_getter_leaks(version) is leaks


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2). Unlike the RSS it does not
    count freed memory the heap keeps, which in a process as busy as the suite's moves by megabytes."""
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        pytest.skip("no mallinfo2: not glibc 2.33 or later")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd  # the arenas' chunks in use, and the mmapped ones


@pytest.mark.skipif(_twin_tls.RESUMPTION, reason="this Python's ssl module does not leak a read session")
def test_the_twins_mtls_connections_leave_no_memory_behind(mesh_certs):
    # python/cpython#116810: each read of SSLObject.session leaked a copy of the session, which
    # the twin read twice a connection: 2,000 connections grew malloc's bytes in use by some 21 MiB.
    # The app here keeps nothing of a connection (the upstream fixture keeps each one's thread).
    app_sock = listening_socket()

    def answer() -> None:
        while True:
            try:
                conn, _ = app_sock.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"ok")

    acceptor = threading.Thread(target=answer, daemon=True)
    acceptor.start()
    app = SimpleNamespace(address=app_sock.getsockname())
    engines: list[Any] = []

    def twin(**options: Any) -> Any:
        engines.append(_engine_py.Engine(**options))
        return engines[-1]

    try:
        inbound = inbound_side(twin, mesh_certs, app, exchange=False)
        outbound = outbound_side(twin, mesh_certs.identity(*RATINGS), inbound.address, exchange=False)

        def connections(count: int) -> None:
            for _ in range(count):
                with socket.create_connection(outbound.address) as client:
                    client.sendall(b"x")
                    client.shutdown(socket.SHUT_WR)
                    assert read_all(client) == (2, sha256(b"ok"))
            for side in (inbound, outbound):  # the records, taken as a sidecar's collector takes them
                side.engine.collect()

        connections(500)  # the heap's working set
        before = heap_in_use()
        connections(2000)
        assert heap_in_use() - before < 4 << 20  # a leaked session a read: some 21 MiB
    finally:
        for engine in engines:
            engine.stop()
        stop_accepting(app_sock, acceptor)


def test_no_plaintext_crosses_the_wire_between_the_sidecars(make_engine, upstream, mesh_certs):
    # A relay of the test's own between the two sidecars records every byte.
    app = App(upstream)
    inbound = inbound_side(make_engine, mesh_certs, app)
    wire: list[bytes] = []
    middle = listening_socket()

    def forward(src: socket.socket, dst: socket.socket) -> None:
        while chunk := src.recv(65536):
            wire.append(chunk)
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)

    def relay() -> None:
        conn, _ = middle.accept()
        far = socket.create_connection(inbound.address)
        threads = [threading.Thread(target=forward, args=pair) for pair in ((conn, far), (far, conn))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        conn.close()
        far.close()

    threading.Thread(target=relay, daemon=True).start()
    outbound = outbound_side(make_engine, mesh_certs.identity(*RATINGS), middle.getsockname())
    secret = b"the rating is five stars " * 400
    with socket.create_connection(outbound.address) as client:
        client.sendall(secret)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == (len(secret), sha256(secret))
    captured = b"".join(wire)
    assert len(captured) > len(secret)
    for plain in (b"rating is five", b"ratings-v2", b"mongodb-v1", CLIENT_FRAME[:8], SERVER_FRAME[:8]):
        assert plain not in captured, plain
    assert captured[0] == 0x16  # a TLS handshake record first
    middle.close()


# ---------------------------------------------------------------- independent clients


def test_a_python_ssl_client_with_istio_alpn_exchanges_a_frame_and_reaches_the_app(make_engine, upstream, mesh_certs):
    app = App(upstream, answer=b"PONG")
    inbound = inbound_side(make_engine, mesh_certs, app)
    with tls_connect(inbound.address, client_context(mesh_certs.identity(*RATINGS), mesh_certs.root)) as conn:
        assert conn.selected_alpn_protocol() == "istio-peer-exchange"
        assert conn.getpeercert()["subjectAltName"] == (("URI", MeshCerts.spiffe(*MONGODB)),)
        conn.sendall(CLIENT_FRAME + b"PING")
        reader, result, data = FrameReader(), None, b""
        while result is None or result.outcome is Outcome.NEED_MORE:
            result = reader.feed(conn.recv(4096))
        assert result.outcome is Outcome.FOUND and result.metadata == SERVER
        data = result.rest
        conn.close_notify()  # the app sees its end of stream
        data += conn.read_all()
    assert data == b"PONG"
    app.server.wait(1)
    assert app.received == [b"PING"]  # our frame was taken off the stream


def test_a_client_offering_istio_alone_gets_the_apps_bytes_and_no_frame(make_engine, upstream, mesh_certs):
    app = App(upstream, greeting=GREETING)
    inbound = inbound_side(make_engine, mesh_certs, app)
    ctx = client_context(mesh_certs.identity(*RATINGS), mesh_certs.root, alpn=("istio",))
    with tls_connect(inbound.address, ctx) as conn:
        assert conn.selected_alpn_protocol() is None  # the server does not advertise istio: no exchange
        assert conn.recv(len(GREETING)) == GREETING
        conn.sendall(b"\x3d\x23\x04\x67 not a frame here")  # relayed as it is: no exchange runs
        conn.close_notify()
        assert conn.read_all() == b"\x3d\x23\x04\x67 not a frame here"
    app.server.wait(1)
    assert app.received == [b"\x3d\x23\x04\x67 not a frame here"]
    inbound.stat("exchange_disabled", 1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (Debian: openssl)")
def test_openssl_s_client_with_a_mesh_certificate_reads_a_valid_frame(make_engine, upstream, mesh_certs, tmp_path):
    received: list[bytes] = []

    def line_app(conn: socket.socket) -> None:  # answers a line and closes: s_client keeps its side open
        data = b""
        while not data.endswith(b"\n"):
            data += conn.recv(64)
        received.append(data)
        conn.sendall(b"answer from the app\n")

    app = upstream(line_app)
    inbound = Sidecar(make_engine, mesh_certs.identity(*MONGODB), RouteTable.single([app.address]),
                      ExchangeSettings("inbound", SERVER_FRAME), ListenerTls("STRICT"))
    certs = mesh_certs.identity(*RATINGS)
    (tmp_path / "in").write_bytes(CLIENT_FRAME + b"hello\n")
    result = subprocess.run(
        ["openssl", "s_client", "-connect", "%s:%d" % inbound.address, "-alpn", "istio-peer-exchange,istio",
         "-cert", str(certs / ca.CERT_CHAIN), "-key", str(certs / ca.KEY), "-CAfile", str(certs / ca.ROOT_CERT),
         "-quiet", "-ign_eof"],
        stdin=(tmp_path / "in").open("rb"), capture_output=True, timeout=30)
    reader = FrameReader()
    found = reader.feed(result.stdout)
    assert found.outcome is Outcome.FOUND, (result.stdout[:200], result.stderr[-500:])
    assert found.metadata == SERVER and found.rest == b"answer from the app\n"
    app.wait(1)
    assert received == [b"hello\n"]  # our frame was taken off the stream


# ---------------------------------------------------------------- bad input


def foreign_identity(tmp_path: Path) -> Path:
    """An identity from another mesh's root."""
    ca.init(tmp_path / "other-root")
    ca.issue(tmp_path / "other-root", "default", "intruder", tmp_path / "intruder")
    return tmp_path / "intruder"


def custom_identity(certs: MeshCerts, out: Path, san: str, not_before: datetime.datetime,
                    not_after: datetime.datetime) -> Path:
    """A leaf signed by the mesh root with the validity and SAN given (made here, not by fastmesh.ca)."""
    root_key = serialization.load_pem_private_key((certs.root / ca.ROOT_KEY).read_bytes(), password=None)
    root_cert = x509.load_pem_x509_certificate((certs.root / ca.ROOT_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(root_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=True)
            .sign(root_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / ca.CERT_CHAIN).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / ca.KEY).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    (out / ca.KEY).chmod(0o600)
    (out / ca.ROOT_CERT).write_bytes((certs.root / ca.ROOT_CERT).read_bytes())
    return out


NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def bad_client(case: str, mesh_certs: MeshCerts, tmp_path: Path) -> Path | None:
    if case == "no_certificate":
        return None
    if case == "untrusted":
        return foreign_identity(tmp_path)
    if case == "expired":
        return custom_identity(mesh_certs, tmp_path / "expired", MeshCerts.spiffe(*RATINGS), NOW - 2 * DAY, NOW - DAY)
    if case == "not_yet_valid":
        return custom_identity(mesh_certs, tmp_path / "later", MeshCerts.spiffe(*RATINGS), NOW + DAY, NOW + 2 * DAY)
    assert case == "peer_identity"  # signed by the mesh root, outside its trust domain
    return custom_identity(mesh_certs, tmp_path / "elsewhere", "spiffe://other.domain/ns/default/sa/x",
                           NOW - DAY, NOW + DAY)


def assert_still_serves(inbound: Sidecar, mesh_certs: MeshCerts, app: App) -> None:
    """A well-behaved client gets through after the bad one: nothing was harmed."""
    before = app.connections
    with tls_connect(inbound.address, client_context(mesh_certs.identity(*RATINGS), mesh_certs.root,
                                                     alpn=("istio",))) as conn:
        conn.sendall(b"good")
        conn.close_notify()
        assert conn.read_all() == b"good"
    deadline = time.monotonic() + 10
    while app.connections == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.connections == before + 1


@pytest.mark.parametrize("case", ["no_certificate", "untrusted", "expired", "not_yet_valid", "peer_identity"])
def test_a_client_certificate_the_mesh_does_not_allow_is_refused_before_the_app(make_engine, upstream, mesh_certs,
                                                                                tmp_path, case):
    app = App(upstream)
    inbound = inbound_side(make_engine, mesh_certs, app)
    ctx = client_context(bad_client(case, mesh_certs, tmp_path), mesh_certs.root, alpn=("istio",))
    try:
        with tls_connect(inbound.address, ctx) as conn:
            conn.sendall(b"let me in")  # TLS 1.3: the server's verdict comes after the client's Finished
            assert conn.read_all() == b""
    except (ssl.SSLError, ConnectionError):
        pass
    inbound.stat(f"tls_error_{case}", 1)
    (record,) = inbound.wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_TLS_ERROR
    assert app.connections == 0  # STRICT: no connection reached the app, let alone a byte
    assert_still_serves(inbound, mesh_certs, app)


def raw_client(address: tuple[str, int], data: bytes, then: str) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        if data:
            sock.sendall(data)
        if then == "close":
            return
        if then == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        try:
            answer = sock.recv(100)  # nothing, or a TLS alert: never a byte of the app
            assert answer == b"" or answer[0] == 0x15, answer
        except ConnectionResetError:
            pass


CLIENT_HELLO_START = bytes.fromhex("16030100f4010000f00303") + bytes(32)  # a record header, a hello's first bytes


@pytest.mark.parametrize("data, then, counter", [
    (b"PING\r\n", "wait", "tls_error_plaintext"),
    (b"\x16\x03\x01\x00\x05garbage that is no handshake", "wait", "tls_error_protocol"),
    (CLIENT_HELLO_START, "close", "tls_error_reset"),
    (CLIENT_HELLO_START, "wait", "tls_error_timeout"),
    (b"", "wait", "tls_error_timeout"),
], ids=["plaintext", "garbage-hello", "truncated-hello-then-close", "truncated-hello-then-silence", "silence"])
def test_bytes_that_are_not_a_good_handshake_are_refused_under_strict(make_engine, upstream, mesh_certs, data,
                                                                      then, counter):
    app = App(upstream)
    inbound = inbound_side(make_engine, mesh_certs, app, handshake_timeout=0.5)
    raw_client(inbound.address, data, then)
    inbound.stat(counter, 1)
    assert app.connections == 0
    assert_still_serves(inbound, mesh_certs, app)


def test_a_stream_that_ends_without_close_notify_is_a_reset_not_an_end(make_engine, upstream, mesh_certs):
    # A peer sidecar killed mid-stream: its TCP FIN (or RST) without close_notify. The app
    # must see a reset, never a clean end of stream that would pass truncated data as whole.
    seen: list[str] = []

    def app(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
            seen.append("end")
        except ConnectionResetError:
            seen.append("reset")

    server = upstream(app)
    inbound = Sidecar(make_engine, mesh_certs.identity(*MONGODB), RouteTable.single([server.address]), None,
                      ListenerTls("STRICT"))
    raw = socket.create_connection(inbound.address, timeout=10)
    ctx = client_context(mesh_certs.identity(*RATINGS), mesh_certs.root, alpn=("istio",))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    raw.sendall(outgoing.read())
    tls.write(b"half of a transfer")
    raw.sendall(outgoing.read())
    time.sleep(0.2)
    raw.shutdown(socket.SHUT_WR)  # FIN, no close_notify
    server.wait(1)
    assert seen == ["reset"]
    (record,) = inbound.wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_RESET
    assert inbound.engine.stats()["tls_truncated"] == 1
    raw.close()


def test_permissive_serves_tls_and_plaintext_on_one_port(make_engine, upstream, mesh_certs):
    app = App(upstream, greeting=GREETING)
    inbound = inbound_side(make_engine, mesh_certs, app, mode="PERMISSIVE", exchange=False, detect_timeout=0.05)
    with socket.create_connection(inbound.address, timeout=10) as plain:  # a server-first app's plain client
        assert plain.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        plain.sendall(b"plain")
        plain.shutdown(socket.SHUT_WR)
        assert read_all_bytes(plain) == b"plain"
    ctx = client_context(mesh_certs.identity(*RATINGS), mesh_certs.root, alpn=("istio",))
    with tls_connect(inbound.address, ctx) as conn:
        assert conn.recv(len(GREETING)) == GREETING
        conn.sendall(b"secured")
        conn.close_notify()
        assert conn.read_all() == b"secured"
    app.server.wait(2)
    assert sorted(app.received) == [b"plain", b"secured"]
    inbound.wait_closed(2)
    principals = sorted(p.principal or "" for p in inbound.peers.values())
    assert principals == ["", MeshCerts.spiffe(*RATINGS)]
    stats = inbound.engine.stats()
    assert (stats["tls_plaintext"], stats["tls_handshakes"]) == (1, 1)


def test_permissive_still_handshakes_with_a_tls_client_slower_than_the_detect_timeout(make_engine, upstream,
                                                                                     mesh_certs):
    # The detect timeout is a server-first app's wait; a client-first app has said nothing, so a
    # TLS client that starts late (a loaded machine) is not taken for plaintext: its ClientHello
    # would reach the app. The app's own first bytes still decide plaintext after the timeout.
    app = App(upstream)
    inbound = inbound_side(make_engine, mesh_certs, app, mode="PERMISSIVE", exchange=False, detect_timeout=0.05)
    ctx = client_context(mesh_certs.identity(*RATINGS), mesh_certs.root, alpn=("istio",))
    with tls_connect(inbound.address, ctx, delay=0.5) as conn:
        conn.sendall(b"secured late")
        conn.close_notify()
        assert conn.read_all() == b"secured late"
    app.server.wait(1)
    assert app.received == [b"secured late"]
    (record,) = inbound.wait_closed(1)
    assert record.reason == CloseReason.DOWNSTREAM_CLOSE
    assert [p.principal for p in inbound.peers.values()] == [MeshCerts.spiffe(*RATINGS)]
    stats = inbound.engine.stats()
    assert (stats["tls_plaintext"], stats["tls_handshakes"]) == (0, 1)

    late = App(upstream, greeting=GREETING, greeting_delay=0.3)  # server-first, greeting past the timeout
    slow = inbound_side(make_engine, mesh_certs, late, mode="PERMISSIVE", exchange=False, detect_timeout=0.05)
    with socket.create_connection(slow.address, timeout=10) as plain:
        assert plain.recv(len(GREETING), socket.MSG_WAITALL) == GREETING
        plain.sendall(b"plain")
        plain.shutdown(socket.SHUT_WR)
        assert read_all_bytes(plain) == b"plain"
    assert slow.engine.stats()["tls_plaintext"] == 1


# ---------------------------------------------------------------- DestinationRule TLS toward a server


def tls_server(upstream: Any, certs: Path, require_client: bool) -> Any:
    """A TLS server of the test's own (Python ssl) on the upstream fixture: the upstream of
    SIMPLE and MUTUAL clusters. Each connection's result is the client's certificate
    (empty without one), or "refused"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs / ca.CERT_CHAIN), str(certs / ca.KEY))
    if require_client:
        ctx.load_verify_locations(str(certs / ca.ROOT_CERT))
        ctx.verify_mode = ssl.CERT_REQUIRED

    def serve(raw: socket.socket) -> Any:
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                peer = conn.getpeercert()
                conn.sendall(b"tls server says hi")
                conn.unwrap()
                return peer
        except (ssl.SSLError, OSError):
            return "refused"

    return upstream(serve)


@pytest.mark.parametrize("mode", ["SIMPLE", "MUTUAL"])
def test_a_destination_rule_originates_simple_and_mutual_tls_with_its_own_files(make_engine, upstream, mesh_certs,
                                                                               mode):
    from fastmesh.tls import ClientTls

    server_certs = mesh_certs.identity("external", "api")
    client_certs = mesh_certs.identity("default", "caller")
    server = tls_server(upstream, server_certs, require_client=mode == "MUTUAL")
    tls = ClientTls(mode, ca_certificates=str(server_certs / ca.ROOT_CERT),
                    client_certificate=str(client_certs / ca.CERT_CHAIN) if mode == "MUTUAL" else "",
                    private_key=str(client_certs / ca.KEY) if mode == "MUTUAL" else "",
                    sni="api.example.com", subject_alt_names=(MeshCerts.spiffe("external", "api"),))
    outbound = outbound_side(make_engine, None, server.address, exchange=False,
                             cluster=Cluster("outbound|443||api.example.com", "api.example.com", (server.address,),
                                             tls=tls))
    with socket.create_connection(outbound.address, timeout=10) as client:
        client.shutdown(socket.SHUT_WR)
        assert read_all_bytes(client) == b"tls server says hi"
    (peer,) = (outbound.wait_closed(1), outbound.peers)[1].values()
    assert peer.principal == MeshCerts.spiffe("external", "api")
    if mode == "MUTUAL":
        assert server.wait(1)[0]["subjectAltName"] == (("URI", MeshCerts.spiffe("default", "caller")),)


def test_a_server_outside_the_subject_alt_names_is_refused(make_engine, upstream, mesh_certs):
    from fastmesh.tls import ClientTls

    server_certs = mesh_certs.identity("external", "api")
    server = tls_server(upstream, server_certs, require_client=False)
    tls = ClientTls("SIMPLE", ca_certificates=str(server_certs / ca.ROOT_CERT),
                    subject_alt_names=("spiffe://cluster.local/ns/external/sa/someone-else",))
    outbound = outbound_side(make_engine, None, server.address, exchange=False,
                             cluster=Cluster("outbound|443||api", "api", (server.address,), tls=tls))
    with socket.create_connection(outbound.address, timeout=10) as client:
        try:
            assert client.recv(64) == b""
        except ConnectionResetError:
            pass
    (record,) = outbound.wait_closed(1)
    assert record.reason == CloseReason.UPSTREAM_TLS_ERROR
    assert outbound.engine.stats()["tls_error_peer_identity"] == 1
