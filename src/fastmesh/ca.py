"""A mesh's certificate authority, as Istio's self-signed one: `fastmesh ca init`
makes a root, `fastmesh ca issue` a workload identity under the file names
Istio mounts (cert-chain.pem, key.pem, root-cert.pem) with the SPIFFE URI SAN
spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.

As istiod: RSA 2048 keys by default (ECDSA P-256 when asked, as
ECC_SIGNATURE_ALGORITHM=ECDSA), a root valid for ten years with the trust domain
as its organisation, workload certificates valid for 24 hours with an empty
subject and a critical SAN. Keys are written 0600; every file is replaced
atomically, so a sidecar watching the directory never reads half a file.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CERT_CHAIN = "cert-chain.pem"
KEY = "key.pem"
DEFAULT_TRUST_DOMAIN = "cluster.local"
ROOT_TTL = datetime.timedelta(days=3650)
WORKLOAD_TTL = datetime.timedelta(hours=24)  # Istio's DEFAULT_WORKLOAD_CERT_TTL
MAX_WORKLOAD_TTL = datetime.timedelta(days=90)  # Istio's MAX_WORKLOAD_CERT_TTL
KEY_TYPES = ("rsa", "ecdsa")
# A DNS-label-like name, as Kubernetes names namespaces and service accounts.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class CaError(ValueError):
    """A CA directory or request that cannot be used; the message says why."""


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Istio's workload identity: spiffe://<td>/ns/<ns>/sa/<sa> (an @ in the trust domain becomes .)."""
    return f"spiffe://{trust_domain.replace('@', '.')}/ns/{namespace}/sa/{service_account}"


def _new_key(key_type: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    raise CaError(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def _write_set(files: list[tuple[Path, bytes, bool]]) -> None:
    """Write (path, data, secret) files as one set: each into a temporary file beside it (0600
    for a secret), then, once every one is written, each renamed over its path in order. A write
    that fails (a full disk) leaves every path as it was, and says which file it was."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data, secret in files:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                staged.append((temporary, path))
                with os.fdopen(fd, "wb") as out:
                    os.fchmod(out.fileno(), 0o600 if secret else 0o644)
                    out.write(data)
            except OSError as exc:
                raise CaError(f"{path}: {exc.strerror or exc}") from None
    except BaseException:
        for temporary, _ in staged:
            os.unlink(temporary)
        raise
    for temporary, path in staged:
        os.replace(temporary, path)


def _pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init(directory: str | Path, trust_domain: str = DEFAULT_TRUST_DOMAIN, key_type: str = "rsa") -> Path:
    """Make a mesh root in `directory`: root-cert.pem and root-key.pem (0600)."""
    directory = Path(directory)
    if not trust_domain or "/" in trust_domain or ":" in trust_domain:
        raise CaError(f"trust domain {trust_domain!r} is not a domain name")
    if (directory / ROOT_KEY).exists():
        raise CaError(f"{directory / ROOT_KEY} exists: a root is made once (remove it to start over)")
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_set([(directory / ROOT_KEY, _pem_key(key), True),
                (directory / ROOT_CERT, cert.public_bytes(serialization.Encoding.PEM), False)])
    return directory


@dataclass(frozen=True)
class Root:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    trust_domain: str


def load_root(directory: str | Path) -> Root:
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / ROOT_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CaError(f"{exc.filename}: no such file (make a root first: fastmesh ca init {directory})") from None
    except ValueError as exc:
        raise CaError(f"{directory}: not a PEM certificate and key: {exc}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CaError(f"{directory / ROOT_KEY}: an RSA or ECDSA key is needed")
    organisations = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    trust_domain = str(organisations[0].value) if organisations else DEFAULT_TRUST_DOMAIN
    return Root(cert, key, trust_domain)


def issue(directory: str | Path, namespace: str, service_account: str, out: str | Path,
          ttl: datetime.timedelta = WORKLOAD_TTL, key_type: str = "rsa") -> str:
    """Write a workload identity signed by the root in `directory` to `out`; return its SPIFFE id."""
    for what, value in (("namespace", namespace), ("service account", service_account)):
        if not _NAME.match(value):
            raise CaError(f"{what} {value!r} is not a Kubernetes name (lower-case letters, digits, '-' and '.')")
    if not datetime.timedelta(seconds=1) <= ttl <= MAX_WORKLOAD_TTL:
        raise CaError(f"the lifetime must be between 1s and {MAX_WORKLOAD_TTL.days * 24}h "
                      f"({MAX_WORKLOAD_TTL.days} days, Istio's maximum)")
    root = load_root(directory)
    identity = spiffe_id(root.trust_domain, namespace, service_account)
    key = _new_key(key_type)
    now = _now()
    not_after = min(now + ttl, root.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))  # as Istio's: the identity is the SAN alone
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=key_type == "rsa",
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    out = Path(out)
    # The key renamed first: a watcher that sees the new certificate finds its key beside it.
    _write_set([(out / KEY, _pem_key(key), True),
                (out / CERT_CHAIN, cert.public_bytes(serialization.Encoding.PEM), False),
                (out / ROOT_CERT, root.cert.public_bytes(serialization.Encoding.PEM), False)])
    return identity
