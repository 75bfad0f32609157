"""A workload's mesh identity, from the three files Istio mounts in a directory
(cert-chain.pem, key.pem, root-cert.pem; `serve --certs DIR`), checked before the
engine loads them, and watched so that a new set serves new handshakes without
a restart. Files from `fastmesh ca issue`, openssl or Istio's CA work alike."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastmesh.ca import CERT_CHAIN, KEY, ROOT_CERT
from fastmesh.defaults import DEFAULTS

log = logging.getLogger("fastmesh.certs")

SPIFFE = "spiffe://"


class CertificateError(ValueError):
    """A certificate set that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class MeshIdentity:
    """A checked set of workload certificates."""

    directory: Path
    spiffe_id: str  # the leaf's URI SAN: spiffe://<trust domain>/ns/<ns>/sa/<sa>
    not_after: datetime.datetime

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.spiffe_id)

    @property
    def cert_chain(self) -> str:
        return str(self.directory / CERT_CHAIN)

    @property
    def key(self) -> str:
        return str(self.directory / KEY)

    @property
    def roots(self) -> str:
        return str(self.directory / ROOT_CERT)


def trust_domain_of(identity: str) -> str:
    """The trust domain of a SPIFFE id, or '' when it is not one."""
    if not identity.startswith(SPIFFE):
        return ""
    return identity[len(SPIFFE):].split("/", 1)[0]


# A chain of a few certificates is a few KiB: a file larger than this is not one, and is
# refused before it is read whole.
MAX_PEM_BYTES = 1 << 20


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such file") from None
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{path}: larger than {MAX_PEM_BYTES >> 20} MiB, not a PEM file fastmesh reads")
    return data


def _certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{path}: not PEM certificates") from None
    if not found:
        raise CertificateError(f"{path}: no certificate in it")
    return found


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return extension.value.get_values_for_type(x509.UniformResourceIdentifier)


def _issued_by(cert: x509.Certificate, issuers: list[x509.Certificate]) -> x509.Certificate | None:
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
            return issuer
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def _check_key_mode(key_path: Path) -> None:
    """The key may be read by its owner, and by its group only when that is one of ours (a
    Kubernetes Secret mounted with fsGroup and mode 0440, as kube-inject --mtls mounts it):
    never by other users."""
    try:
        info = key_path.stat()
    except OSError:
        return  # reading it reports what is wrong
    if not stat.S_ISREG(info.st_mode):
        return  # a directory, say: reading it reports what is wrong
    mode = stat.S_IMODE(info.st_mode)
    own_group = info.st_gid == os.getegid() or info.st_gid in os.getgroups()
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and not (own_group and mode & stat.S_IRWXG == stat.S_IRGRP)):
        raise CertificateError(f"{key_path}: readable by others (mode {mode:o}): chmod 600 it")


def load_identity(directory: str | Path, now: datetime.datetime | None = None) -> MeshIdentity:
    """Check the three files in `directory` the way the engine will use them: a key that
    is the leaf's, readable by its owner only, a chain up to a root of root-cert.pem, a
    SPIFFE URI SAN, and a validity that includes now."""
    directory = Path(directory)
    key_path = directory / KEY
    chain = _certificates(directory / CERT_CHAIN)
    roots = _certificates(directory / ROOT_CERT)
    _check_key_mode(key_path)
    key_pem = _read(key_path)  # its own errors, not wrapped as a key that does not parse
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) or (
            key.public_key().public_numbers() != leaf.public_key().public_numbers()):  # type: ignore[union-attr]
        raise CertificateError(f"{key_path}: not the key of the certificate in {directory / CERT_CHAIN}")
    cert, issuers = leaf, chain[1:] + roots
    while _issued_by(cert, roots) is None:
        issuer = _issued_by(cert, issuers)
        if issuer is None or issuer is cert:
            raise CertificateError(f"{directory / CERT_CHAIN}: not issued by a root in {directory / ROOT_CERT}")
        cert = issuer
    identities = [san for san in _uri_sans(leaf) if trust_domain_of(san)]
    if not identities:
        raise CertificateError(f"{directory / CERT_CHAIN}: the certificate has no spiffe:// URI SAN")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise CertificateError(f"{directory / CERT_CHAIN}: valid from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                               f"to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now")
    return MeshIdentity(directory, identities[0], leaf.not_valid_after_utc)


def _stamp(directory: Path) -> tuple:
    stamps = []
    for name in (CERT_CHAIN, KEY, ROOT_CERT):
        try:
            st = os.stat(directory / name)  # follows symlinks, as a Kubernetes secret mount needs
            stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class CertificateWatcher:
    """Polls a certificate directory; a set that changed and then stood still for one
    interval (the three files are not replaced at once) is loaded and handed to
    `apply`. A set that does not load, or that `apply` refuses, is logged once and
    the one in force keeps serving."""

    def __init__(self, identity: MeshIdentity, apply: Callable[[MeshIdentity], None],
                 interval: float = DEFAULTS.certs_poll_interval) -> None:
        self.identity = identity
        self.apply = apply
        self.interval = interval
        self.rotations = 0  # sets put in force
        self.refused = 0  # sets that did not load
        self._stamp = _stamp(identity.directory)
        self._pending: tuple | None = None

    def check(self) -> bool:
        """One poll: True when a new set was put in force."""
        stamp = _stamp(self.identity.directory)
        if stamp == self._stamp:
            self._pending = None
            return False
        if stamp != self._pending:
            self._pending = stamp  # still changing, or just changed: look again next time
            return False
        self._stamp, self._pending = stamp, None
        try:
            identity = load_identity(self.identity.directory)
            self.apply(identity)
        except (CertificateError, ValueError, OSError) as exc:
            # Logged before it is counted: whoever sees the count (another thread) finds the line written.
            log.error("new certificates not used, the ones in force (%s, valid until %s) keep serving: %s",
                      self.identity.spiffe_id, f"{self.identity.not_after:%Y-%m-%d %H:%M} UTC", exc)
            self.refused += 1
            return False
        self.identity = identity
        log.info("new certificates in force for new handshakes: %s, valid until %s UTC", identity.spiffe_id,
                 f"{identity.not_after:%Y-%m-%d %H:%M}")
        self.rotations += 1
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
