"""Mutual TLS around the engine: `fastmesh ca`, loading and checking certificate
sets (ours, openssl's), rotation while connections stay open, PeerAuthentication
and DestinationRule TLS read from Istio's documents, and serve's errors."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MONGODB_V1, one_listener, wait_until
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from test_tls_engine import App, client_context, tls_connect

from fastmesh import ca
from fastmesh.addr import Address
from fastmesh.certs import CertificateError, CertificateWatcher, load_identity
from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.routing import INBOUND
from fastmesh.tls import ISTIO_MUTUAL

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "istio"
FOREIGN_GID = 54321  # a group this process is not in


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastmesh", *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- fastmesh ca


def test_ca_init_and_issue_write_istios_files_and_identity(tmp_path):
    assert run_cli("ca", "init", str(tmp_path / "root"), "--trust-domain", "example.org").returncode == 0
    result = run_cli("ca", "issue", str(tmp_path / "root"), "--namespace", "bookinfo", "--service-account",
                     "bookinfo-ratings-v2", "--out", str(tmp_path / "ratings"), "--ttl", "2h")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("spiffe://example.org/ns/bookinfo/sa/bookinfo-ratings-v2 in ")
    out = tmp_path / "ratings"
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "root" / "root-key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "cert-chain.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/bookinfo/sa/bookinfo-ratings-v2"]
    assert len(cert.subject) == 0  # as Istio's: the identity is the SAN alone
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(hours=2) <= lifetime <= datetime.timedelta(hours=2, minutes=6)
    root = x509.load_pem_x509_certificate((out / "root-cert.pem").read_bytes())
    assert root.not_valid_after_utc - root.not_valid_before_utc >= datetime.timedelta(days=3650)
    assert load_identity(out).spiffe_id == "spiffe://example.org/ns/bookinfo/sa/bookinfo-ratings-v2"


@pytest.mark.parametrize("args, message", [
    (["issue", "{root}", "--namespace", "Bad_NS", "--service-account", "sa", "--out", "{tmp}/x"], "not a Kubernetes"),
    (["issue", "{tmp}/nowhere", "--namespace", "ns", "--service-account", "sa", "--out", "{tmp}/x"],
     "make a root first"),
    (["issue", "{root}", "--namespace", "ns", "--service-account", "sa", "--out", "{tmp}/x", "--ttl", "2400h"],
     "90 days, Istio's maximum"),
    (["init", "{root}"], "a root is made once"),
])
def test_ca_errors_are_one_line(tmp_path, args, message):
    assert run_cli("ca", "init", str(tmp_path / "root")).returncode == 0
    result = run_cli("ca", *[a.format(root=tmp_path / "root", tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert result.stderr.startswith("fastmesh ca: ") and message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `pages` 4 KiB pages at tmp_path/disk (each file takes at least one page)."""
    mounted = []

    def mount(pages: int) -> Path:
        disk = tmp_path / "disk"
        disk.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4}k", "tmpfs", str(disk)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_ca_init_on_a_full_disk_names_the_file_and_leaves_no_half_root(small_disk):
    disk = small_disk(1)  # room for the key, not for the certificate after it
    result = run_cli("ca", "init", str(disk / "root"))
    assert result.returncode == 1
    assert result.stderr == f"fastmesh ca: {disk / 'root' / 'root-cert.pem'}: No space left on device\n"
    assert list((disk / "root").iterdir()) == []  # so `ca init` may simply run again


def test_ca_issue_on_a_full_disk_writes_no_part_of_the_identity(small_disk, tmp_path):
    ca.init(tmp_path / "root")
    out = small_disk(1) / "ratings"  # room for the key alone
    result = run_cli("ca", "issue", str(tmp_path / "root"), "--namespace", "default", "--service-account",
                     "ratings", "--out", str(out))
    assert result.returncode == 1
    assert result.stderr == f"fastmesh ca: {out / 'cert-chain.pem'}: No space left on device\n"
    assert list(out.iterdir()) == []  # no key.pem without its certificate


# ---------------------------------------------------------------- certificate sets


def copy_identity(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_set_that_cannot_serve_is_refused_with_the_file_and_the_reason(mesh_certs, tmp_path):
    good = mesh_certs.identity("default", "mongodb")
    other = mesh_certs.identity("default", "other")
    cases = {
        "key of another certificate": ("key.pem", (other / "key.pem").read_bytes(), "not the key of"),
        "a root that did not sign it": ("root-cert.pem", (other / "cert-chain.pem").read_bytes(), "not issued by"),
        "no certificate": ("cert-chain.pem", b"not pem\n", "cert-chain.pem: not PEM certificates"),
    }
    for name, (file, content, message) in cases.items():
        broken = copy_identity(good, tmp_path / name.replace(" ", "-"))
        (broken / file).write_bytes(content)
        (broken / "key.pem").chmod(0o600)
        with pytest.raises(CertificateError, match=message):
            load_identity(broken)
    readable = copy_identity(good, tmp_path / "readable")
    (readable / "key.pem").chmod(0o644)
    with pytest.raises(CertificateError, match="readable by others"):
        load_identity(readable)
    # A Secret mounted with fsGroup: readable by a group of this process's, and no one else.
    (readable / "key.pem").chmod(0o640)
    os.chown(readable / "key.pem", -1, os.getegid())
    assert load_identity(readable).spiffe_id == load_identity(good).spiffe_id
    for mode, group in ((0o640, FOREIGN_GID), (0o660, os.getegid()), (0o604, os.getegid())):
        os.chown(readable / "key.pem", -1, group)
        (readable / "key.pem").chmod(mode)
        with pytest.raises(CertificateError, match=f"readable by others \\(mode {mode:o}\\)"):
            load_identity(readable)
    missing = copy_identity(good, tmp_path / "missing")
    (missing / "root-cert.pem").unlink()
    with pytest.raises(CertificateError, match="root-cert.pem: no such file"):
        load_identity(missing)
    with pytest.raises(CertificateError, match="not now"):
        load_identity(good, now=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_certificates_made_by_openssl_in_the_same_layout_serve_alike(sidecar, upstream, mesh_certs, tmp_path):
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
            "-subj", "/O=cluster.local", "-keyout", "root.key", "-out", "root.pem",
            "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign")
    (tmp_path / "leaf.ext").write_text("subjectAltName=critical,URI:spiffe://cluster.local/ns/default/sa/mongodb\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/",
            "-keyout", "key.pem", "-out", "leaf.csr")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "root.pem", "-CAkey", "root.key", "-CAcreateserial",
            "-days", "2", "-extfile", "leaf.ext", "-out", "cert-chain.pem")
    certs = tmp_path / "openssl"
    certs.mkdir()
    for name, source in (("cert-chain.pem", "cert-chain.pem"), ("key.pem", "key.pem"), ("root-cert.pem", "root.pem")):
        shutil.copy(tmp_path / source, certs / name)
    (certs / "key.pem").chmod(0o600)
    assert load_identity(certs).spiffe_id == "spiffe://cluster.local/ns/default/sa/mongodb"
    app = App(upstream)
    inbound = sidecar(one_listener(Address("127.0.0.1", 0), [app.address], INBOUND, admin=None, metrics=None,
                                   node_metadata=MONGODB_V1, certs=certs))
    # A client of that root (made by fastmesh's CA here would be refused: another root).
    client = tmp_path / "client"
    client.mkdir()
    (tmp_path / "client.ext").write_text("subjectAltName=critical,URI:spiffe://cluster.local/ns/default/sa/c\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/",
            "-keyout", "client/key.pem", "-out", "client.csr")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "root.pem", "-CAkey", "root.key", "-CAcreateserial",
            "-days", "2", "-extfile", "client.ext", "-out", "client/cert-chain.pem")
    shutil.copy(tmp_path / "root.pem", client / "root-cert.pem")
    with tls_connect(inbound.listen, client_context(client, client, alpn=("istio",))) as conn:
        conn.sendall(b"hello")
        conn.close_notify()
        assert conn.read_all() == b"hello"


# ---------------------------------------------------------------- rotation


def serial_seen(address: tuple[str, int], client: Path, roots: Path) -> int:
    with tls_connect(address, client_context(client, roots, alpn=("istio",))) as conn:
        serial = int(conn.getpeercert()["serialNumber"], 16)
        conn.sendall(b"x")
        conn.close_notify()
        assert conn.read_all() == b"x"
        return serial


def test_new_certificates_serve_new_handshakes_while_open_connections_go_on(sidecar, upstream, mesh_certs,
                                                                           tmp_path, caplog):
    certs = copy_identity(mesh_certs.identity("default", "mongodb"), tmp_path / "mounted")
    client = mesh_certs.identity("default", "bookinfo-ratings-v2")
    app = App(upstream)
    inbound = sidecar(one_listener(Address("127.0.0.1", 0), [app.address], INBOUND, admin=None, metrics=None,
                                   node_metadata=MONGODB_V1, certs=certs))
    first = serial_seen(inbound.listen, client, mesh_certs.root)
    open_before = tls_connect(inbound.listen, client_context(client, mesh_certs.root, alpn=("istio",)))
    open_before.sendall(b"before ")
    ca.issue(mesh_certs.root, "default", "mongodb", certs)  # a new set in place, as Kubernetes rotates it
    watcher = inbound.sidecar.certificates
    wait_until(lambda: watcher.rotations == 1)
    second = serial_seen(inbound.listen, client, mesh_certs.root)
    assert second != first
    # A broken set (another root's certificate over our key): refused, the last good one serves on.
    foreign = tmp_path / "foreign"
    ca.init(foreign / "root")
    ca.issue(foreign / "root", "default", "mongodb", foreign / "leaf")
    with caplog.at_level(logging.ERROR, logger="fastmesh.certs"):
        shutil.copy(foreign / "leaf" / "cert-chain.pem", certs / "cert-chain.pem")
        wait_until(lambda: watcher.refused == 1)
    assert "new certificates not used, the ones in force" in caplog.text and "not the key of" in caplog.text
    assert serial_seen(inbound.listen, client, mesh_certs.root) == second
    open_before.sendall(b"and after")
    open_before.close_notify()
    assert open_before.read_all() == b"before and after"  # the connection opened before rotation was untouched
    open_before.sock.close()


def test_the_watcher_waits_until_a_changing_set_stands_still(mesh_certs, tmp_path):
    certs = copy_identity(mesh_certs.identity("default", "mongodb"), tmp_path / "set")
    applied = []
    watcher = CertificateWatcher(load_identity(certs), applied.append)
    assert watcher.check() is False  # nothing changed
    ca.issue(mesh_certs.root, "default", "mongodb", certs)
    assert watcher.check() is False  # changed: looked at again at the next poll
    assert watcher.check() is True and len(applied) == 1
    assert watcher.check() is False


# ---------------------------------------------------------------- Istio's documents


SIDECAR = """\
apiVersion: fastmesh.io/v1alpha1
kind: Sidecar
metadata: {{name: db, namespace: default}}
spec:
  nodeMetadata: {{NAME: db-0, NAMESPACE: default, WORKLOAD_NAME: db, LABELS: {{app: db}}}}
  inbound:
  - {{port: 15006, targetPort: 27017}}
  - {{port: 15007, targetPort: 9000}}
  {certs}
"""


def peer_authentication(name: str, namespace: str, body: str) -> str:
    return textwrap.dedent(f"""\
        ---
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
        """) + textwrap.indent(textwrap.dedent(body), "  ")


def modes(tmp_path: Path, documents: str, certs: str = "certs: /etc/certs") -> list[str | None]:
    (tmp_path / "mesh.yaml").write_text(SIDECAR.format(certs=certs) + documents)
    return [listener.mtls for listener in plan(load_documents([tmp_path / "mesh.yaml"])).sidecar.listeners]


def test_peer_authentication_is_picked_as_istio_picks_it(tmp_path):
    assert modes(tmp_path, "") == [None, None]  # none: the sidecar's default (PERMISSIVE)
    mesh = peer_authentication("default", "istio-system", "mtls: {mode: STRICT}\n")
    assert modes(tmp_path, mesh) == ["STRICT", "STRICT"]
    namespace = peer_authentication("default", "default", "mtls: {mode: PERMISSIVE}\n")
    assert modes(tmp_path, mesh + namespace) == ["PERMISSIVE", "PERMISSIVE"]
    workload = peer_authentication("db", "default", """\
        selector: {matchLabels: {app: db}}
        mtls: {mode: UNSET}
        portLevelMtls:
          9000: {mode: DISABLE}
        """)
    # The workload's policy wins; UNSET inherits the namespace's; a port level mode wins for its port.
    assert modes(tmp_path, mesh + namespace + workload) == ["PERMISSIVE", "DISABLE"]
    other = peer_authentication("x", "default", "selector: {matchLabels: {app: other}}\nmtls: {mode: DISABLE}\n")
    assert modes(tmp_path, mesh + other) == ["STRICT", "STRICT"]  # selects another workload


def test_strict_without_certificates_is_a_config_error(tmp_path):
    mesh = peer_authentication("default", "istio-system", "mtls: {mode: STRICT}\n")
    with pytest.raises(ConfigError, match="says STRICT for port 27017: the Sidecar needs certs"):
        modes(tmp_path, mesh, certs="")


def test_bookinfos_destination_rule_all_mtls_loads_and_sets_istio_mutual(tmp_path):
    sidecar = tmp_path / "ratings.yaml"
    sidecar.write_text(textwrap.dedent("""\
        apiVersion: fastmesh.io/v1alpha1
        kind: Sidecar
        metadata: {name: productpage, namespace: default}
        spec:
          nodeMetadata: {NAME: p-0, NAMESPACE: default, WORKLOAD_NAME: productpage-v1}
          outbound:
          - {port: 15001, host: ratings, servicePort: 9080}
          certs: /etc/certs
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: ratings, namespace: default}
        spec:
          hosts: [ratings.default.svc.cluster.local]
          ports: [{number: 9080, name: http}]
          resolution: STATIC
          endpoints: [{address: 10.0.0.7, labels: {version: v1, security.istio.io/tlsMode: istio}}]
        """))
    built = plan(load_documents([sidecar, FIXTURES / "destination-rule-all-mtls.yaml"]))
    (listener,) = built.sidecar.listeners
    (cluster,) = listener.routes.clusters
    assert cluster.tls is not None and cluster.tls.mode == ISTIO_MUTUAL
    assert cluster.tls.sni == "outbound_.9080_._.ratings.default.svc.cluster.local"  # Istio's default SNI
    sidecar.write_text(sidecar.read_text().replace("  certs: /etc/certs\n", ""))
    with pytest.raises(ConfigError, match="says ISTIO_MUTUAL: the Sidecar needs certs"):
        plan(load_documents([sidecar, FIXTURES / "destination-rule-all-mtls.yaml"]))


# ---------------------------------------------------------------- serve


def test_serve_with_certs_that_cannot_serve_says_why_and_exits(mesh_certs, tmp_path):
    broken = copy_identity(mesh_certs.identity("default", "mongodb"), tmp_path / "broken")
    os.chmod(broken / "key.pem", 0o644)
    result = run_cli("serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--no-admin", "--no-metrics",
                     "--certs", str(broken))
    assert result.returncode == 1
    assert "key.pem: readable by others (mode 644): chmod 600 it" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_strict_with_certs_refuses_plaintext_and_serves_mesh_clients(mesh_certs, tmp_path):
    from conftest import free_port

    with socket.create_server(("127.0.0.1", 0)) as app:
        listen = ("127.0.0.1", free_port())
        process = subprocess.Popen(
            [sys.executable, "-m", "fastmesh", "serve", "--listen", "%s:%d" % listen, "--upstream",
             "%s:%d" % app.getsockname(), "--direction", "inbound", "--no-admin", "--no-metrics", "--certs",
             str(mesh_certs.identity("default", "mongodb")), "--peer-authentication", "STRICT"],
            stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: subprocess.run(["ss", "-ltnH", f"sport = {listen[1]}"], capture_output=True,
                                            text=True).stdout.strip() != "")  # listening: no probe connection
            with socket.create_connection(listen) as plain:
                plain.sendall(b"plaintext\r\n")
                try:
                    assert plain.recv(64) in (b"",)
                except ConnectionResetError:
                    pass
            app.settimeout(0.5)
            with pytest.raises(socket.timeout):
                app.accept()  # STRICT: the app never saw the plaintext client
            client = mesh_certs.identity("default", "bookinfo-ratings-v2")
            with tls_connect(listen, client_context(client, mesh_certs.root, alpn=("istio",))) as conn:
                conn.sendall(b"secured")
                app.settimeout(10)
                accepted, _ = app.accept()
                with accepted:
                    assert accepted.recv(64) == b"secured"
        finally:
            process.terminate()
            _, err = process.communicate(timeout=30)
        assert "mTLS as spiffe://cluster.local/ns/default/sa/mongodb" in err
        assert re.search(r"TLS handshakes refused since the last read: (\d+ [a-z ]+, )*1 plaintext", err), err
