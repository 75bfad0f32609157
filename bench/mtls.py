"""The mTLS rows: sidecar pairs whose middle hop is mutual TLS, each
relay set up as its users would set it up for a mesh. A mesh root and one
identity per side are made with `fastmesh ca`, in Istio's file-mounted layout,
and every relay reads the same files.

    client -> outbound (plain in, TLS out) -> inbound (TLS in, plain out) -> app
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Istio's ALPN lists (istio-mtls-capture.md): the client's, the server's.
CLIENT_ALPN = ["istio-peer-exchange", "istio"]
SERVER_ALPN = ["istio-peer-exchange", "h2", "http/1.1"]

# side -> (namespace, service account, directory): ratings-v2 calls its database.
IDENTITIES = {"client": ("default", "bookinfo-ratings-v2", "ratings-v2"),
              "server": ("default", "default", "mongodb")}


@dataclass(frozen=True)
class Identity:
    dir: Path

    @property
    def chain(self) -> Path:
        return self.dir / "cert-chain.pem"

    @property
    def key(self) -> Path:
        return self.dir / "key.pem"

    @property
    def root(self) -> Path:
        return self.dir / "root-cert.pem"

    @property
    def combined(self) -> Path:
        """Chain then key in one file, as haproxy's `crt` takes them."""
        return self.dir / "chain-and-key.pem"


@dataclass(frozen=True)
class MeshCerts:
    base: Path

    def of(self, side: str) -> Identity:
        return Identity(self.base / IDENTITIES[side][2])


def make_certs(tmp: Path, env: dict[str, str]) -> MeshCerts:
    """A root (`fastmesh ca init`) and the two workload identities (`ca issue`),
    RSA 2048 as istiod issues them by default; `env` runs the fastmesh under test."""
    base = tmp / "mesh"

    def ca(*args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "fastmesh", "ca", *args], capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"fastmesh ca {' '.join(args)}: {r.stderr.strip()}")

    ca("init", str(base / "root"))
    certs = MeshCerts(base)
    for side, (namespace, account, _) in IDENTITIES.items():
        ident = certs.of(side)
        ca("issue", str(base / "root"), "--namespace", namespace, "--service-account", account, "--out", str(ident.dir))
        ident.combined.write_bytes(ident.chain.read_bytes() + ident.key.read_bytes())
    return certs


def fastmesh_args(side: str, certs: MeshCerts) -> list[str]:
    """The client side reaches its mesh peer (--mesh-peer in the row's args) over
    mTLS; the server side accepts mTLS only, as under a STRICT PeerAuthentication."""
    args = ["--certs", str(certs.of(side).dir)]
    return args if side == "client" else [*args, "--peer-authentication", "STRICT"]


def haproxy_bind(side: str, certs: MeshCerts) -> str:
    """What follows `bind HOST:PORT`: the server side terminates TLS and requires
    a client certificate from the mesh root."""
    if side != "server":
        return ""
    me = certs.of(side)
    return f" ssl crt {me.combined} ca-file {me.root} verify required alpn {','.join(SERVER_ALPN)}"


def haproxy_server(side: str, certs: MeshCerts) -> str:
    """What follows `server backend HOST:PORT`: the client side originates TLS with
    its certificate and verifies the server's chain (haproxy cannot check a URI
    SAN). haproxy keeps the last session per server and resumes it by default."""
    if side != "client":
        return ""
    me = certs.of(side)
    return f" ssl crt {me.combined} ca-file {me.root} verify required alpn {','.join(CLIENT_ALPN)}"


def nginx_listen(side: str) -> str:
    return " ssl" if side == "server" else ""


def nginx_directives(side: str, certs: MeshCerts, protocols: str = "") -> str:
    """nginx stream's TLS: the server side verifies the client's chain
    (ssl_verify_client on). The client side cannot verify the server: nginx checks
    a certificate against proxy_ssl_name, a host name, and mesh certificates carry
    only a URI SAN, so it runs with proxy_ssl_verify off (as nginx users of a mesh
    set it up), which spares it one verification per handshake. nginx's
    stream proxy has no client-side ALPN directive. Sessions resume by default
    (proxy_ssl_session_reuse on; session tickets on the server side). `protocols`: the
    TLS versions of that side (proxy_ssl_protocols, ssl_protocols), or nginx's default."""
    if not side:
        return ""
    me = certs.of(side)
    if side == "client":
        return (f"        proxy_ssl on;\n"
                f"        proxy_ssl_certificate {me.chain};\n"
                f"        proxy_ssl_certificate_key {me.key};\n"
                f"        proxy_ssl_trusted_certificate {me.root};\n"
                f"        proxy_ssl_verify off;\n"
                + (f"        proxy_ssl_protocols {protocols};\n" if protocols else ""))
    return (f"        ssl_certificate {me.chain};\n"
            f"        ssl_certificate_key {me.key};\n"
            f"        ssl_client_certificate {me.root};\n"
            f"        ssl_verify_client on;\n"
            f"        ssl_alpn {' '.join(SERVER_ALPN)};\n"
            + (f"        ssl_protocols {protocols};\n" if protocols else ""))
