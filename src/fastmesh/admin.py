"""The HTTP side of a sidecar, served by aiohttp on the control loop: the admin
endpoint (Envoy's port 15000 by default: readiness, engine health, open
connections, the effective configuration), the health endpoint a kubelet probes
(Istio's /healthz/ready), and the capped server that carries them and the metrics
endpoint."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiohttp import web

from fastmesh.addr import Address
from fastmesh.peers import ENGINE_EVENT_KEYS, PeerDirectory
from fastmesh.relay import Relay

log = logging.getLogger("fastmesh.admin")


def serving(relay: Relay) -> bool:
    """Ready for traffic: the listeners are up and the engine runs. False before start
    and from the moment draining begins (the listeners close first)."""
    return bool(relay.listeners) and relay.running


def make_app(relay: Relay, config: Callable[[], dict[str, Any]],
             peers: PeerDirectory | None = None,
             http_refused: Callable[[], dict[str, int]] | None = None) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        # Envoy answers LIVE once its listeners are up; fastmesh binds them before this app starts.
        if serving(relay):
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="NOT READY\n")

    async def stats(_: web.Request) -> web.Response:
        engine = relay.stats()
        body: dict[str, Any] = {"implementation": relay.implementation, "totals": relay.counters()}
        if peers is not None:
            # The exchange's events once, by the names the metric gives them.
            body["metadata_exchange"] = peers.events(engine)
            engine = {key: value for key, value in engine.items() if key not in ENGINE_EVENT_KEYS}
        body["engine"] = engine
        if http_refused is not None:
            body["http_connections_refused"] = http_refused()
        return web.json_response(body)

    async def connections(_: web.Request) -> web.Response:
        # Each open connection's state, per direction, for a connection that seems stuck.
        return web.json_response([{**info._asdict(), "downstream": info.downstream._asdict(),
                                   "upstream": info.upstream._asdict()} for info in relay.connections()])

    async def config_dump(_: web.Request) -> web.Response:
        return web.json_response(config())

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/connections", connections)
    app.router.add_get("/config_dump", config_dump)
    return app


def make_health_app(relay: Relay) -> web.Application:
    """Istio's health port (15021): GET /healthz/ready, 200 when admin's /ready says LIVE,
    503 otherwise. A port of its own because a kubelet probes the pod's IP while the admin
    port stays on 127.0.0.1 (the Kubernetes manifests serve it on 0.0.0.0:15021)."""
    async def healthz_ready(_: web.Request) -> web.Response:
        if serving(relay):
            return web.Response()
        return web.Response(status=503, text="not ready: no listener accepting\n")

    app = web.Application()
    app.router.add_get("/healthz/ready", healthz_ready)
    return app


# Open connections per HTTP endpoint. A scraper and an operator need a few; a flood of
# idle ones would otherwise take file descriptors from the data plane.
MAX_HTTP_CONNECTIONS = 64
# A connection has this long to send a whole request head, from its start or from the end
# of its last response, and is then closed (aiohttp's keep-alive timer, which also runs
# while a head is arriving; its own default is an hour): a slowloris client that sends a
# byte now and then, or nothing, cannot hold one of the 64 places for longer.
HEADER_TIMEOUT = 10.0


class _TurnAway(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()  # before a byte is read: the descriptor is free at once


class HttpEndpoint:
    """An aiohttp app served on one address with at most `limit` connections open;
    the ones beyond are closed at once, counted in `refused` and logged."""

    def __init__(self, runner: web.AppRunner, limit: int) -> None:
        self._runner = runner
        self._limit = limit
        self._server: asyncio.AbstractServer | None = None
        self.address: Address | None = None
        self.refused = 0

    def _protocol(self) -> asyncio.BaseProtocol:
        handlers = self._runner.server
        assert handlers is not None
        if len(handlers.connections) < self._limit:
            return handlers()
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("http://%s/: %d connection(s) refused so far, %d already open",
                        self.address, self.refused, self._limit)
        return _TurnAway()

    async def start(self, address: Address) -> None:
        await self._runner.setup()
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._protocol, address.host, address.port, reuse_address=True)
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(exc.errno, f"cannot serve on {address}: {exc.strerror}") from None
        bound = self._server.sockets[0].getsockname()
        self.address = Address(bound[0], bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()  # closes the open connections too


async def serve_app(app: web.Application, address: Address, limit: int = MAX_HTTP_CONNECTIONS) -> HttpEndpoint:
    """Serve `app` (admin or metrics) on `address`; close() the result to stop."""
    endpoint = HttpEndpoint(web.AppRunner(app, access_log=None, keepalive_timeout=HEADER_TIMEOUT), limit)
    await endpoint.start(address)
    return endpoint
