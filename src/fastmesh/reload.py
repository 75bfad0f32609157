"""Live reload of `serve -c` config files: on SIGHUP, or when a file changes
(checked every second; a Kubernetes ConfigMap update swaps the file under its
path, which this sees too). A config that does not load is logged and the one
in force keeps serving."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from fastmesh.settings import SidecarConfig
from fastmesh.sidecar import Sidecar

log = logging.getLogger("fastmesh.reload")

Stamp = tuple[int, int, int] | None


def stamps(paths: list[str]) -> list[Stamp]:
    """What the watcher compares: take them before reading the files, so that a change
    made while they are read (or while the sidecar starts) is still a change."""
    return [_stamp(p) for p in paths]


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks, as a ConfigMap mount needs
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


class ConfigWatcher:
    def __init__(self, paths: list[str], sidecar: Sidecar, build: Callable[[], SidecarConfig],
                 read: list[Stamp], interval: float = 1.0) -> None:
        """read: the files' stamps() from before the config in force was built from them."""
        self.paths = paths
        self.sidecar = sidecar
        self.build = build
        self.interval = interval
        self.reloads = 0  # applied
        self.rejected = 0  # configs that did not load
        self._stamps = read
        self._requested = asyncio.Event()

    def request(self) -> None:
        """Reload now (SIGHUP)."""
        self._requested.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._requested.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            requested = self._requested.is_set()
            self._requested.clear()
            now = stamps(self.paths)
            if requested or now != self._stamps:
                self._stamps = now
                await self.reload("SIGHUP" if requested else "a config file changed")

    async def reload(self, why: str) -> bool:
        try:
            config = self.build()
            await self.sidecar.reload(config)
        except (OSError, ValueError) as exc:
            self.rejected += 1
            log.error("config not reloaded (%s), the config in force keeps serving: %s", why, exc)
            return False
        self.reloads += 1
        log.info("config reloaded (%s): %d listener(s)", why, len(self.sidecar.relay.listeners))
        return True
