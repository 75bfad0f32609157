"""The admin HTTP endpoint (Envoy's port 15000 by default): readiness, engine
health and the effective configuration, served by aiohttp on the control loop."""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from fastmesh.addr import Address
from fastmesh.relay import Relay


def make_app(relay: Relay, config: Callable[[], dict[str, Any]],
             exchange_counters: Callable[[], dict[str, int]] | None = None) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        # Envoy answers LIVE once its listeners are up; fastmesh binds them before this app starts.
        if relay.listeners and relay.engine.running:
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="NOT READY\n")

    async def stats(_: web.Request) -> web.Response:
        body = {"implementation": relay.implementation, "engine": relay.stats(), "totals": relay.counters()}
        if exchange_counters is not None:
            body["exchange"] = exchange_counters()
        return web.json_response(body)

    async def config_dump(_: web.Request) -> web.Response:
        return web.json_response(config())

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config_dump", config_dump)
    return app


async def serve_app(app: web.Application, address: Address) -> tuple[web.AppRunner, Address]:
    """Serve `app` (admin or metrics) on `address`; returns the runner (for cleanup) and the bound address."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"cannot serve on {address}: {exc.strerror}") from None
    bound = runner.addresses[0]
    return runner, Address(bound[0], bound[1])
