"""`fastmesh check -c FILE…`: `serve -c`'s own validation (fastmesh.preflight)
without serving. Problems go to stderr with exit status 1, as `serve` would
refuse them; otherwise what `serve` would run: each listener with its routes and
TLS, the metrics, admin and health addresses, the identity and the exchange."""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from fastmesh import preflight
from fastmesh.certs import load_identity
from fastmesh.routing import RouteTable
from fastmesh.settings import INBOUND, ListenerConfig, SidecarConfig


def run(paths: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        built = preflight.from_files(paths)
    except ValueError as exc:  # ConfigError: one problem per line
        for problem in str(exc).splitlines():
            print(f"error: {problem}", file=err)
        return 1
    for warning in built.warnings:
        print(f"warning: {warning}", file=err)
    out.write("".join(line + "\n" for line in describe(built.sidecar)))
    return 0


def describe(config: SidecarConfig) -> list[str]:
    lines = ["OK: serve would run"]
    for listener in config.listeners:
        lines += _listener(config, listener)
    if config.workers_auto is not None:  # a number given is in the file as it is
        lines.append(f"workers: {config.workers} (auto: {config.workers_auto})")
    lines.append(f"metrics: {_url(config.metrics, '/stats/prometheus')}")
    lines.append(f"admin: {_url(config.admin, '/')}")
    lines.append(f"health: {_url(config.health, '/healthz/ready')}")
    if config.certs is None:
        lines.append("identity: none (no certs): no mTLS")
    else:
        identity = load_identity(config.certs)
        lines.append(f"identity: {identity.spiffe_id} (certs in {config.certs}, valid until "
                     f"{identity.not_after:%Y-%m-%d %H:%M} UTC)")
    exchange = config.exchange
    lines.append("exchange: " + ("off" if not exchange.enabled else
                                 "over mTLS and plaintext (fastmesh's own variant)" if exchange.plaintext else
                                 "over mTLS (Istio's ALPN)"))
    return lines


def _listener(config: SidecarConfig, listener: ListenerConfig) -> list[str]:
    service = f" for {listener.destination_service}" if listener.destination_service else ""
    inbound = listener.direction == INBOUND
    tls = f", mTLS {config.listener_tls(listener).mode}" if inbound else ""
    lines = [f"{listener.direction} {listener.listen}{service}{tls}:"]
    routes = listener.routes
    # A virtual listener: each known original destination's routes, then everything else's.
    modes = config.listener_tls(listener).destination_modes if inbound else ()
    for number, destination in enumerate(routes.destinations):
        host, port = destination.address
        where = f"port {port}" if destination.any_address else f"{host}:{port}"
        lines.append(f"  to {where}{', mTLS ' + modes[number] if modes else ''}:")
        lines += ["  " + line for line in _routes(config, routes, destination.routes, inbound)]
    if routes.destinations:
        lines.append("  to any other destination:")
    lines += _routes(config, routes, routes.routes, inbound, "    " if routes.destinations else "  ")
    return lines


def _routes(config: SidecarConfig, table: RouteTable, routes: tuple[tuple[int, int], ...], inbound: bool,
            indent: str = "  ") -> list[str]:
    if not routes:
        return [f"{indent}no route (NR)"]
    lines = []
    for index, weight in routes:
        cluster = table.clusters[index]
        endpoints = ", ".join(f"{h}:{p}{' (mesh)' if cluster.is_mesh_peer(i) else ''}"
                              for i, (h, p) in enumerate(cluster.endpoints)) or (
            "the original destination" if cluster.lb == "PASSTHROUGH" else
            "the app on the original port" if cluster.lb == "LOCAL_PASSTHROUGH" else "no endpoint (UH)")
        # A cluster's TLS as the sidecar originates it (inbound: to the local app, plaintext).
        origination = "" if inbound else "; tls " + (
            cluster.tls.mode if cluster.tls is not None else
            "auto (ISTIO_MUTUAL to mesh peers)" if config.certs is not None else "DISABLE")
        lines.append(f"{indent}weight {weight}: {cluster.name} [{cluster.lb}] -> {endpoints}{origination}")
    return lines


def _url(address: object, path: str) -> str:
    return "off" if address is None else f"http://{address}{path}"
