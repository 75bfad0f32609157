"""TLS as Istio's sidecars use it: the ALPN lists, the DestinationRule TLS modes a
cluster originates with, the PeerAuthentication modes an inbound listener
accepts, and what a listener gives the engine. Settings only: the engines do
the TLS (fastmesh/native/tls.pxi, fastmesh/_engine_py.py) and fastmesh.certs
loads the mesh identity."""

from __future__ import annotations

from dataclasses import dataclass

from fastmesh.defaults import DEFAULTS

EXCHANGE_ALPN = "istio-peer-exchange"  # the exchange runs only when TLS negotiated this
CLIENT_ALPN = (EXCHANGE_ALPN, "istio")  # what an ISTIO_MUTUAL cluster offers
SERVER_ALPN = (EXCHANGE_ALPN, "h2", "http/1.1")  # what an inbound listener advertises

# Cipher suites in Envoy's order on CPUs with AES instructions: AES-128-GCM first,
# the cheapest per byte. TLS 1.2 offers the GCM ciphers Istio's inbound listener does.
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                 "ECDHE-RSA-AES256-GCM-SHA384:AES128-GCM-SHA256:AES256-GCM-SHA384")
# A server keeps the sessions it may resume in memory (stateful tickets), at most
# this many per identity: OpenSSL 3.0 decodes a stateless ticket's client
# certificate on every resumption, which costs more than the rest of the handshake.
# A client sidecar keeps one session per endpoint and every handshake issues a new
# one, so most cached sessions are never asked for again: OpenSSL's default (20,480)
# held some 50 MiB of them after a soak. Past this many the least recently used goes,
# and a client whose session went does one full handshake.
SESSION_CACHE_SIZE = 1024

# DestinationRule trafficPolicy.tls.mode
DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL = "DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"
CLIENT_MODES = (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)
# PeerAuthentication mtls.mode (DISABLE as above)
PERMISSIVE, STRICT = "PERMISSIVE", "STRICT"
SERVER_MODES = (DISABLE, PERMISSIVE, STRICT)


def encode_alpn(protocols: tuple[str, ...]) -> bytes:
    """The wire form of an ALPN list: each name preceded by its length."""
    return b"".join(bytes([len(p)]) + p.encode() for p in protocols)


@dataclass(frozen=True)
class ClientTls:
    """How a cluster's connections originate TLS (a DestinationRule's tls). ISTIO_MUTUAL
    uses the mesh identity and offers CLIENT_ALPN; SIMPLE and MUTUAL use the files named,
    as Istio documents them. A cluster without one originates ISTIO_MUTUAL to the
    endpoints labelled security.istio.io/tlsMode: istio (auto mTLS), plaintext to others."""

    mode: str
    ca_certificates: str = ""  # file: the roots that sign the server (SIMPLE, MUTUAL)
    client_certificate: str = ""  # file (MUTUAL)
    private_key: str = ""  # file (MUTUAL)
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()  # the server's SAN must be one of these (empty: any of the mesh)

    def __post_init__(self) -> None:
        if self.mode not in CLIENT_MODES:
            raise ValueError(f"tls mode must be one of {', '.join(CLIENT_MODES)}, not {self.mode!r}")
        if self.mode == MUTUAL and not (self.client_certificate and self.private_key):
            raise ValueError("tls mode MUTUAL needs clientCertificate and privateKey")
        if self.mode in (SIMPLE, MUTUAL) and not self.ca_certificates:
            raise ValueError(f"tls mode {self.mode} needs caCertificates: fastmesh does not trust the system roots")


@dataclass(frozen=True)
class ListenerTls:
    """A listener's TLS, given to Engine.add_listener(tls=...). Inbound: `mode` says what
    clients may connect with (STRICT: mTLS from the mesh only; PERMISSIVE: mTLS or
    plaintext, told apart by the first bytes; DISABLE: plaintext). Outbound: each cluster's
    ClientTls, or auto mTLS to mesh-peer endpoints. Both need the engine's mesh identity
    (Engine.set_identity) for anything but DISABLE and plaintext."""

    mode: str = DISABLE
    handshake_timeout: float = DEFAULTS.tls_handshake_timeout
    detect_timeout: float = DEFAULTS.exchange_detect_timeout  # PERMISSIVE: the app's first bytes wait this long
    # A virtual inbound listener: the mode of each of its RouteTable's destinations (an app
    # port's PeerAuthentication), in their order; a connection to none of them has `mode`.
    destination_modes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for mode in (self.mode, *self.destination_modes):
            if mode not in SERVER_MODES:
                raise ValueError(f"mtls mode must be one of {', '.join(SERVER_MODES)}, not {mode!r}")
        for name in ("handshake_timeout", "detect_timeout"):
            value = getattr(self, name)
            if not 0 < value < 1e9:
                raise ValueError(f"{name} must be positive, not {value!r}")
