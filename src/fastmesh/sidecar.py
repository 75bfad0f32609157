"""One sidecar: a relay with its listener, the peer metadata exchange, Istio
TCP telemetry reported every `reporting_duration`, the metrics port, the
admin port and the health port, started and stopped together on the running
event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastmesh._version import __version__
from fastmesh.addr import Address
from fastmesh.admin import HttpEndpoint, make_app, make_health_app, serve_app
from fastmesh.certs import CertificateWatcher, MeshIdentity, load_identity
from fastmesh.engine import IMPLEMENTATION
from fastmesh.exchange import ExchangeSettings
from fastmesh.exposition import MetricsEndpoint
from fastmesh.peers import PeerDirectory
from fastmesh.records import Batch
from fastmesh.relay import Listener, Relay
from fastmesh.settings import ListenerConfig, SidecarConfig
from fastmesh.telemetry import ListenerTelemetry, TcpTelemetry
from fastmesh.tls import ListenerTls

log = logging.getLogger("fastmesh")


class Sidecar:
    """Everything one sidecar runs, from a SidecarConfig: start(), reload(), stop()."""

    def __init__(self, config: SidecarConfig) -> None:
        if not config.listeners:
            raise ValueError("a sidecar needs at least one listener")
        self.config = config
        # Closes are read every second (or faster with a shorter reporting
        # period); open connections' bytes are added every reporting period.
        self.relay = Relay(
            workers=config.workers,
            collect_interval=min(1.0, config.reporting_duration),
            pipe_size=config.pipe_size,
            max_pipes=config.max_pipes,
            splice=config.splice,
            io_uring=config.io_uring,
        )
        if config.io_uring and not self.relay.engine.io_uring:
            log.warning("io_uring asked for and not used, plain system calls instead: %s",
                        self.relay.engine.io_uring_unavailable)
        # With eviction, the peers' decoded payloads go as their series do (the same interval).
        self.peers = PeerDirectory(payload_lifetime=config.stats_eviction_interval)
        self.telemetry: TcpTelemetry | None = (
            TcpTelemetry(peer_of=self.peers.peer_of, eviction_interval=config.stats_eviction_interval)
            if config.metrics is not None else None)
        self.admin_address: Address | None = None
        self.metrics_address: Address | None = None
        self.health_address: Address | None = None
        self.listener_configs: dict[int, ListenerConfig] = {}  # listener id -> the config it was opened with
        self.identity: MeshIdentity | None = None  # the certificates in force (--certs)
        self.certificates: CertificateWatcher | None = None
        self._http: list[HttpEndpoint] = []  # metrics, admin, health
        self._tasks: list[asyncio.Task[None]] = []  # the periodic report, the certificate watcher

    def _on_batch(self, batch: Batch) -> None:
        """Each batch read from the engine, in the one order that works: peers learn who
        is on the other end, telemetry labels the connections by them, then the peers
        of closed connections are dropped."""
        self.peers.on_batch(batch)
        if self.telemetry is not None:
            self.telemetry.on_batch(batch)
        self.peers.forget(batch.closed)

    async def _listen(self, listener_config: ListenerConfig, replacing: int | None = None) -> None:
        """Open a listener, or give an open one (`replacing`) new routes for its new connections."""
        config = self.config
        routes = listener_config.routes
        exchange = config.exchange_settings(listener_config)
        tls = config.listener_tls(listener_config)
        labels = self._labels(listener_config)
        limit = config.max_connections
        if replacing is not None and self._unchanged(replacing, exchange, tls, labels, limit):
            self.listener_configs[replacing] = listener_config
            return  # nothing to do: the engine's listener slots are not spent on it
        if replacing is None:
            listener = await self.relay.listen(listener_config.listen, routes, exchange=exchange, tls=tls,
                                               max_connections=limit, transparent=listener_config.transparent)
        else:
            listener = self.relay.reroute(replacing, routes, exchange, tls, limit)
        self.listener_configs[listener.id] = listener_config
        if self.telemetry is not None:
            self.telemetry.add_listener(listener.id, labels)

    def _labels(self, listener_config: ListenerConfig) -> ListenerTelemetry:
        return ListenerTelemetry(listener_config.direction, self.config.node_metadata.workload(),
                                 listener_config.destination_service, listener_config.routes,
                                 self.identity.spiffe_id if self.identity is not None else "")

    def _unchanged(self, listener_id: int, exchange: ExchangeSettings | None, tls: ListenerTls,
                   labels: ListenerTelemetry, max_connections: int) -> bool:
        current = self.relay.listeners[listener_id]
        return (current.routes == labels.routes and current.exchange == exchange and current.tls == tls
                and current.max_connections == max_connections
                and (self.telemetry is None or self.telemetry.labels_of(listener_id) == labels))

    def _use_identity(self, identity: MeshIdentity) -> None:
        """New certificates for new handshakes (CertificateWatcher's apply)."""
        self.relay.set_identity(identity)
        self.identity = identity
        if self.telemetry is not None:  # our principal, should the identity itself have changed
            for listener_id in self.relay.listeners:
                self.telemetry.add_listener(listener_id, self._labels(self.listener_configs[listener_id]))

    async def reload(self, config: SidecarConfig) -> None:
        """Apply a new config without dropping open connections: listeners on the same
        address get the new routes, identity and exchange for their new connections, new
        addresses are opened, missing ones stop accepting. The metrics, admin and health ports,
        workers, engine options and stats eviction stay as they were started (a restart changes them)."""
        accepting = {self.listener_configs[lid].listen: lid for lid in self.relay.listeners}
        self.config = config.replace(
            workers=self.config.workers, workers_auto=self.config.workers_auto, admin=self.config.admin,
            metrics=self.config.metrics,
            health=self.config.health, stats_eviction_interval=self.config.stats_eviction_interval,
            pipe_size=self.config.pipe_size, max_pipes=self.config.max_pipes, splice=self.config.splice,
            io_uring=self.config.io_uring,
            certs=self.config.certs)
        for listener_config in config.listeners:
            await self._listen(listener_config, accepting.pop(listener_config.listen, None))
        for listener_id in accepting.values():
            self.relay.retire(listener_id)
            log.info("%s: no longer in the config, stopped accepting", self.listener_configs[listener_id].listen)

    async def start(self) -> None:
        """Bind everything; on failure, undo what was started and raise OSError or ValueError."""
        config = self.config
        try:
            if config.certs is not None:
                self.identity = load_identity(config.certs)
                self.relay.set_identity(self.identity)
                self.certificates = CertificateWatcher(self.identity, self._use_identity)
                self._tasks.append(asyncio.get_running_loop().create_task(self.certificates.run()))
                log.info("mTLS as %s (certificates in %s, valid until %s UTC)", self.identity.spiffe_id,
                         config.certs, f"{self.identity.not_after:%Y-%m-%d %H:%M}")
            for listener_config in config.listeners:
                await self._listen(listener_config)
            self.relay.add_consumer(self._on_batch)
            if self.telemetry is not None:
                endpoint = MetricsEndpoint(self.relay, self.telemetry, self.peers,
                                           before_scrape=self.relay.collect)
                http = await serve_app(endpoint.app(), config.metrics)
                self._http.append(http)
                self.metrics_address = http.address
                log.info("metrics on http://%s/stats/prometheus", self.metrics_address)
                self._tasks.append(asyncio.get_running_loop().create_task(self._report_forever()))
            if config.admin is not None:
                http = await serve_app(make_app(self.relay, self.config_dump, self.peers,
                                                self.http_refused), config.admin)
                self._http.append(http)
                self.admin_address = http.address
                log.info("admin on http://%s/", self.admin_address)
            if config.health is not None:
                http = await serve_app(make_health_app(self.relay), config.health)
                self._http.append(http)
                self.health_address = http.address
                log.info("health on http://%s/healthz/ready", self.health_address)
        except BaseException:
            await self.stop(drain_timeout=0)
            raise

    async def _report_forever(self) -> None:
        assert self.telemetry is not None
        while True:
            await asyncio.sleep(self.config.reporting_duration)
            self.relay.collect()
            self.telemetry.report()

    async def stop(self, drain_timeout: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        await self.relay.close(self.config.drain_timeout if drain_timeout is None else drain_timeout)
        if self.telemetry is not None:
            self.telemetry.report()
        for http in self._http:
            await http.close()
        self._http.clear()

    def _listener_dump(self, listener: Listener) -> dict[str, Any]:
        routes = listener.routes
        exchange = listener.exchange
        listener_config = self.listener_configs.get(listener.id)
        return {
            "address": str(listener.address),
            "direction": listener_config.direction if listener_config else None,
            "destination_service": listener_config.destination_service if listener_config else "",
            "clusters": [
                {
                    "name": cluster.name,
                    "service": cluster.service,
                    "endpoints": [str(Address(*e)) for e in cluster.endpoints],
                    "mesh_peers": [cluster.is_mesh_peer(i) for i in range(len(cluster.endpoints))],
                    "load_balancer": cluster.lb,
                    "max_connections": cluster.max_connections,
                    "connect_timeout_seconds": cluster.connect_timeout,
                    "tls": (cluster.tls.mode if cluster.tls is not None else
                            "auto (ISTIO_MUTUAL to mesh peers)" if self.identity is not None else "DISABLE"),
                }
                for cluster in routes.clusters
            ],
            "routes": [{"cluster": routes.clusters[i].name, "weight": w} for i, w in routes.routes],
            "tls": None if listener.tls is None else {
                "mtls": listener.tls.mode,
                "handshake_timeout_seconds": listener.tls.handshake_timeout,
            },
            "exchange": None if exchange is None else {
                "role": exchange.role,
                "plaintext": exchange.plaintext,
                "frame_bytes": len(exchange.frame),
                "max_payload_bytes": exchange.max_payload,
                "frame_timeout_seconds": exchange.frame_timeout,
                "detect_timeout_seconds": exchange.detect_timeout,
            },
        }

    def http_refused(self) -> dict[str, int]:
        """Connections turned away by the metrics, admin and health endpoints, by address."""
        return {str(http.address): http.refused for http in self._http}

    def config_dump(self) -> dict[str, Any]:
        config = self.config
        return {
            "version": __version__,
            "engine": {
                "implementation": IMPLEMENTATION,
                "workers": self.relay.engine.workers,
                "workers_auto": config.workers_auto,  # how `auto` measured them; None: a number was given
                "splice": config.splice and config.max_pipes > 0,
                "pipe_size": config.pipe_size,
                "max_pipes": config.max_pipes,
                "io_uring": self.relay.engine.io_uring,
            },
            "listeners": [self._listener_dump(listener) for listener in self.relay.listeners.values()],
            "telemetry": None if self.telemetry is None else {
                "reporting_duration_seconds": config.reporting_duration,
                "stats_eviction_interval_seconds": config.stats_eviction_interval,
                "node_metadata": dict(config.node_metadata.values),
                "metrics": str(self.metrics_address),
            },
            "identity": None if self.identity is None else {
                "spiffe_id": self.identity.spiffe_id,
                "certs": str(self.identity.directory),
                "not_after": f"{self.identity.not_after:%Y-%m-%dT%H:%M:%SZ}",
                "rotations": self.certificates.rotations if self.certificates else 0,
            },
            "drain_timeout_seconds": config.drain_timeout,
            "admin": str(self.admin_address) if self.admin_address else None,
            "health": f"http://{self.health_address}/healthz/ready" if self.health_address else None,
        }


class BackgroundSidecar:
    """A Sidecar on its own event loop thread, for programs (and tests) that are
    not asyncio themselves. Started on construction; stop() ends it."""

    def __init__(self, config: SidecarConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fastmesh-control", daemon=True)
        self._thread.start()
        self.sidecar = Sidecar(config)
        try:
            self.call(self.sidecar.start())
        except BaseException:
            self._end_loop()
            raise
        self.listeners = [listener.address for listener in self.sidecar.relay.listeners.values()]
        self.listen = self.listeners[0]

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the sidecar's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()  # its selector and self-pipe, rather than leaving them to the GC

    def stop(self, drain_timeout: float = 0.0) -> None:
        if self.loop.is_running():
            self.call(self.sidecar.stop(drain_timeout=drain_timeout))
            self._end_loop()
