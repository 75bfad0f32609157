"""Live reload of `serve -c`: a changed file or SIGHUP applies the new routes to
new connections without dropping open ones; a bad config is refused and the
one in force keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

from conftest import free_port, wait_until

from fastmesh.reload import ConfigWatcher, stamps


def tagging(tag: bytes):
    """An upstream handler that prefixes every answer with `tag` and echoes until the client leaves."""

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(4096):
            conn.sendall(tag + data)

    return handle


def config(listen: int, admin: int, backends: list, subset: str, typo: bool = False) -> str:
    entries = "".join(
        f"  - {{address: 127.0.0.1, ports: {{tcp: {b.address[1]}}}, labels: {{version: v{i + 1}}}}}\n"
        for i, b in enumerate(backends))
    return f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: db}}
spec:
  hosts: [db.default.svc.cluster.local]
  ports: [{{number: 7000, name: tcp}}]
  resolution: STATIC
  endpoints:
{entries}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: db}}
spec:
  host: db
  {"subset" if typo else "subsets"}: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: db}}
spec:
  hosts: [db]
  tcp: [{{route: [{{destination: {{host: db, subset: {subset}}}}}]}}]
---
apiVersion: fastmesh.io/v1alpha1
kind: Sidecar
metadata: {{name: app}}
spec:
  outbound: [{{port: {listen}, host: db, servicePort: 7000}}]
  admin: 127.0.0.1:{admin}
  metrics: null
"""


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"?")
        return client.recv(16)


def routed_subset(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=5) as response:
        (listener,) = json.load(response)["listeners"]
    return listener["clusters"][0]["name"].split("|")[2]


def _serving_subset(admin: int) -> str | None:
    """routed_subset(), or None while the admin port is not up yet."""
    try:
        return routed_subset(admin)
    except OSError:
        return None


def test_a_change_made_while_the_config_was_read_is_still_seen(tmp_path: Path):
    # serve takes the files' stamps before it reads them, and the watcher starts from those:
    # a file changed while the sidecar was starting (same size, same inode) is reloaded.
    path = tmp_path / "mesh.yaml"
    path.write_text("subset: v1\n")
    read = stamps([str(path)])
    first = path.stat().st_mtime_ns
    path.write_text("subset: v2\n")
    os.utime(path, ns=(first + 10**9, first + 10**9))  # a later mtime, whatever the clock's grain
    built: list[str] = []

    class Sidecar:
        relay = types.SimpleNamespace(listeners={})

        async def reload(self, config: str) -> None:
            built.append(config)

    watcher = ConfigWatcher([str(path)], Sidecar(), path.read_text, read, interval=0.01)

    async def until_reloaded() -> None:
        task = asyncio.create_task(watcher.run())
        for _ in range(1000):
            if watcher.reloads:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(until_reloaded())
    assert built == ["subset: v2\n"]


@contextlib.contextmanager
def serving(log: Path, *paths: Path):
    """`serve -c` each of paths, its output in `log`; stopped with SIGTERM, which must exit 0."""
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "fastmesh", "serve",
                                    *[arg for path in paths for arg in ("-c", str(path))]],
                                   stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0


def test_a_changed_config_reroutes_new_connections_and_keeps_open_ones(tmp_path: Path, upstream):
    v1, v2 = upstream(tagging(b"v1:")), upstream(tagging(b"v2:"))
    listen, admin = free_port(), free_port()
    path = tmp_path / "mesh.yaml"
    path.write_text(config(listen, admin, [v1, v2], "v1"))
    with serving(tmp_path / "serve.log", path) as process:
        # The listener may answer before the admin port is bound: wait for both.
        wait_until(lambda: _answers(listen) and _serving_subset(admin) == "v1")
        assert ask(listen) == b"v1:?"
        held = socket.create_connection(("127.0.0.1", listen), timeout=10)
        held.sendall(b"a")
        assert held.recv(16) == b"v1:a"

        path.write_text(config(listen, admin, [v1, v2], "v2"))  # noticed within a second
        wait_until(lambda: routed_subset(admin) == "v2")
        assert ask(listen) == b"v2:?"
        held.sendall(b"b")
        assert held.recv(16) == b"v1:b"  # the open connection kept its route

        path.write_text(config(listen, admin, [v1, v2], "v1", typo=True))
        wait_until(lambda: "config not reloaded" in (tmp_path / "serve.log").read_text())
        assert "spec.subset: unknown field (did you mean 'subsets'?)" in (tmp_path / "serve.log").read_text()
        assert routed_subset(admin) == "v2" and ask(listen) == b"v2:?"  # the old config keeps serving

        path.write_text(config(listen, admin, [v1, v2], "v1"))
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: routed_subset(admin) == "v1")
        assert ask(listen) == b"v1:?"
        held.sendall(b"c")
        assert held.recv(16) == b"v1:c"
        held.close()


def test_a_reload_warning_names_the_file_and_document_that_was_edited(tmp_path: Path, upstream):
    # One file per document, as `kubectl apply -f` users keep them: an edit to the
    # VirtualService that routes to a subset no DestinationRule defines is reported
    # against the VirtualService's file, not the Sidecar whose listener uses it.
    backends = [upstream(tagging(b"v1:")), upstream(tagging(b"v2:"))]
    listen, admin = free_port(), free_port()
    names = ["service-entry.yaml", "destination-rule.yaml", "virtual-service.yaml", "sidecar.yaml"]
    paths = [tmp_path / name for name in names]
    for path, document in zip(paths, config(listen, admin, backends, "v1").split("---\n")):
        path.write_text(document)
    log = tmp_path / "serve.log"
    with serving(log, *paths):
        wait_until(lambda: _answers(listen))
        edited = config(listen, admin, backends, "v3").split("---\n")
        assert [n for n, path, document in zip(names, paths, edited) if path.read_text() != document] == [
            "virtual-service.yaml"]
        paths[2].write_text(edited[2])
        wait_until(lambda: "config reloaded (a config file changed)" in log.read_text())
        warnings = [line.split(" WARNING fastmesh: ", 1)[1] for line in log.read_text().splitlines()
                    if " WARNING fastmesh: " in line]
        assert warnings == [f"{paths[2]}: document 0 (VirtualService db): spec.tcp[0].route[0].destination: subset "
                            "'v3' of db.default.svc.cluster.local is not defined by any DestinationRule: its "
                            "connections will fail with UH"]
        assert routed_subset(admin) == "v3"  # a warning, not a refusal: Istio would apply it too


def _answers(port: int) -> bool:
    try:
        return bool(ask(port))
    except OSError:
        return False


def test_a_reload_replaces_only_the_listeners_that_changed(sidecar, upstream):
    from fastmesh.addr import Address
    from fastmesh.settings import ListenerConfig, SidecarConfig

    v1, v2 = upstream(tagging(b"v1:")), upstream(tagging(b"v2:"))
    first = ListenerConfig.to_upstreams(Address("127.0.0.1", free_port()), [v1.address])
    second = ListenerConfig.to_upstreams(Address("127.0.0.1", free_port()), [v1.address])
    running = sidecar(SidecarConfig(listeners=[first, second], admin=None, metrics=None))
    relay = running.sidecar.relay
    before = dict(relay.listeners)
    changed = ListenerConfig.to_upstreams(second.listen, [v2.address])
    running.call(running.sidecar.reload(SidecarConfig(listeners=[first, changed], admin=None, metrics=None)))
    after = dict(relay.listeners)
    kept = [i for i in before if i in after]
    assert len(kept) == 1 and before[kept[0]].address.port == first.listen.port
    assert set(relay.retired) == set(before) - set(kept)
    assert ask(first.listen.port) == b"v1:?" and ask(second.listen.port) == b"v2:?"
    running.call(running.sidecar.reload(SidecarConfig(listeners=[first], admin=None, metrics=None)))
    assert list(relay.listeners) == kept  # the second address is no longer in the config: it stops accepting
