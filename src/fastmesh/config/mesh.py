"""From Istio's documents to what one sidecar runs: for each outbound listener,
the VirtualService tcp route that applies, its weighted destinations as
clusters (ServiceEntry endpoints, narrowed to a DestinationRule subset, with
its load balancer and connection pool); for each inbound listener, the local
app. Problems that make the config unusable are ConfigErrors; things Istio
would also accept but that will not work as written are warnings."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fastmesh import podinfo
from fastmesh.addr import Address, parse_address, resolve
from fastmesh.bindings import conflicts
from fastmesh.config.istio_api import (
    DestinationRule, PeerAuthentication, ServiceEntry, Sidecar, TrafficPolicy, VirtualService, WorkloadEntry,
)
from fastmesh.config.loader import ConfigError, Document
from fastmesh.cpus import worker_count
from fastmesh.identity import MetadataError, parse_node_metadata
from fastmesh.routing import (
    INBOUND, INBOUND_PASSTHROUGH_CLUSTER, OUTBOUND, PASSTHROUGH_CLUSTER, Cluster, Destination, RouteTable,
)
from fastmesh.settings import ExchangeConfig, ListenerConfig, SidecarConfig
from fastmesh.tls import ISTIO_MUTUAL, STRICT, ClientTls

# The endpoint label Istio's auto-mTLS reads: the endpoint runs a sidecar.
TLS_MODE_LABEL = "security.istio.io/tlsMode"
MESH_GATEWAY = "mesh"
ROOT_NAMESPACE = "istio-system"  # a PeerAuthentication here without a selector applies to the whole mesh
_LB = {"ROUND_ROBIN": "ROUND_ROBIN", "UNSPECIFIED": "ROUND_ROBIN", "LEAST_CONN": "LEAST_CONN",
       "LEAST_REQUEST": "LEAST_CONN", "RANDOM": "RANDOM", "PASSTHROUGH": "PASSTHROUGH"}


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name rule: `reviews` in namespace default is reviews.default.svc.cluster.local."""
    return host if "." in host or host == "*" else f"{host}.{namespace}.svc.cluster.local"


def _single_ip(address: str) -> str | None:
    """A ServiceEntry address as one IP ("10.96.0.20", "10.96.0.20/32"), else None (a range)."""
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return None
    return str(network.network_address) if network.num_addresses == 1 else None


# The protocols Istio serves as plain TCP: a ServiceEntry port of one of them without addresses
# is matched on any address (Istio's 0.0.0.0:PORT listener).
TCP_PROTOCOLS = ("TCP", "MONGO", "MYSQL", "REDIS")


def _tcp_port(port: Any) -> bool:
    if port.protocol is not None:
        return port.protocol.upper() in TCP_PROTOCOLS
    return port.name.split("-")[0].upper() in TCP_PROTOCOLS  # Istio's name-prefix protocol selection


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


@dataclass
class Plan:
    """A sidecar's config built from documents, and what deserves a warning."""

    sidecar: SidecarConfig
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Registry:
    services: list[tuple[Document, ServiceEntry]]
    workloads: list[tuple[Document, WorkloadEntry]]
    rules: list[tuple[Document, DestinationRule]]
    routes: list[tuple[Document, VirtualService]]
    peer_authentications: list[tuple[Document, PeerAuthentication]]

    @classmethod
    def of(cls, documents: Iterable[Document]) -> "_Registry":
        registry = cls([], [], [], [], [])
        for document in documents:
            target = {ServiceEntry: registry.services, WorkloadEntry: registry.workloads,
                      DestinationRule: registry.rules, VirtualService: registry.routes,
                      PeerAuthentication: registry.peer_authentications}.get(type(document.spec))
            if target is not None:
                target.append((document, document.spec))  # type: ignore[arg-type]
        return registry

    def service(self, host: str) -> tuple[Document, ServiceEntry] | None:
        for document, entry in self.services:
            if any(fqdn(h, document.namespace) == host for h in entry.hosts):
                return document, entry
        return None

    def rule(self, host: str) -> tuple[Document, DestinationRule] | None:
        for document, rule in self.rules:
            if fqdn(rule.host, document.namespace) == host:
                return document, rule
        return None

    def endpoints(self, document: Document, entry: ServiceEntry) -> list[WorkloadEntry]:
        found = list(entry.endpoints)
        if entry.workload_selector is not None:
            wanted = entry.workload_selector.labels.items()
            found += [w for d, w in self.workloads
                      if d.namespace == document.namespace and wanted <= w.labels.items()]
        return found


def _policy(rule: DestinationRule | None, subset: str | None, port: int) -> dict[str, Any]:
    """lb, max_connections, connect_timeout and tls for one subset and port: the rule's
    policy, then its port-level settings, then the subset's (and its port level)."""
    result: dict[str, Any] = {}

    def apply(policy: TrafficPolicy | None) -> None:
        if policy is None:
            return
        layers: list[Any] = [policy]
        layers += [p for p in policy.port_level_settings if p.port is not None and p.port.number == port]
        for layer in layers:
            if layer.load_balancer is not None and layer.load_balancer.simple is not None:
                result["lb"] = layer.load_balancer.simple
            tcp = layer.connection_pool.tcp if layer.connection_pool is not None else None
            if tcp is not None and tcp.max_connections is not None:
                result["max_connections"] = tcp.max_connections
            if tcp is not None and tcp.connect_timeout is not None:
                result["connect_timeout"] = tcp.connect_timeout
            if tcp is not None and tcp.idle_timeout is not None:
                result["idle_timeout"] = tcp.idle_timeout
            if layer.tls is not None:
                result["tls"] = layer.tls

    if rule is not None:
        apply(rule.traffic_policy)
        for candidate in rule.subsets:
            if candidate.name == subset:
                apply(candidate.traffic_policy)
    return result


class _Builder:
    def __init__(self, documents: list[Document], sidecar_doc: Document, resolve: bool) -> None:
        self.registry = _Registry.of(documents)
        self.resolve = resolve
        self.doc = sidecar_doc
        self.spec: Sidecar = sidecar_doc.spec  # type: ignore[assignment]
        self.namespace = sidecar_doc.namespace
        self.problems: list[str] = []
        self.warnings: list[str] = []
        try:
            values = self.spec.node_metadata
            if self.spec.pod_info is not None:
                values = podinfo.complete(values, os.environ, self.spec.pod_info)
            self.node = parse_node_metadata(values, f"{sidecar_doc.source}: spec.nodeMetadata")
        except MetadataError as exc:
            self.problems.append(str(exc))
            self.node = parse_node_metadata({})
        self.labels = dict(self.node.labels)
        self.connect_timeout = self.spec.connect_timeout

    def cluster(self, host: str, subset: str | None, port: int, where: str) -> Cluster:
        """where: the setting that names host, subset and port (a VirtualService's destination,
        or the Sidecar's listener when no VirtualService routes it), which warnings name."""
        name = f"outbound|{port}|{subset or ''}|{host}"
        found = self.registry.rule(host)
        rule = found[1] if found is not None else None
        policy = _policy(rule, subset, port)
        lb = _LB[policy.get("lb", "ROUND_ROBIN")]
        # PASSTHROUGH sends each connection to the client's original destination (iptables REDIRECT
        # or TPROXY in front of the listener): the registry's endpoints do not matter.
        endpoints = [] if lb == "PASSTHROUGH" else self.endpoints(host, rule, subset, port, where)
        max_connections = policy.get("max_connections", 0)
        connect_timeout = policy.get("connect_timeout", self.connect_timeout)
        idle_timeout = policy.get("idle_timeout", self.spec.idle_timeout)
        tls = self.client_tls(policy.get("tls"), host, subset, port, found[0].source if found else where)
        try:
            return Cluster(name, host, tuple(e for e, _ in endpoints), tuple(m for _, m in endpoints), lb,
                           max_connections, connect_timeout, tls, idle_timeout)
        except ValueError as exc:  # e.g. a WorkloadEntry port out of range
            self.problems.append(f"{where}: {exc}")
            return Cluster(name, host, (), (), lb, 0, self.connect_timeout, idle_timeout=self.spec.idle_timeout)

    def client_tls(self, tls: Any, host: str, subset: str | None, port: int, where: str) -> ClientTls | None:
        """A DestinationRule's tls for a cluster, as Istio reads it: ISTIO_MUTUAL with the
        mesh identity, Istio's SNI and the service's SANs; SIMPLE and MUTUAL with the files
        named; DISABLE plaintext. None: auto mTLS by the endpoints' tlsMode label.
        where: the DestinationRule's document."""
        if tls is None:
            return None
        if tls.mode == ISTIO_MUTUAL and self.spec.certs is None:
            self.problems.append(f"{where}: the DestinationRule for {host} says ISTIO_MUTUAL: the Sidecar "
                                 f"needs certs (a directory with cert-chain.pem, key.pem, root-cert.pem), "
                                 f"{self.doc.source} has none")
        sans = tuple(tls.subject_alt_names)
        if tls.mode == ISTIO_MUTUAL and not sans:
            found = self.registry.service(host)
            sans = tuple(found[1].subject_alt_names) if found is not None else ()
        sni = tls.sni or (f"outbound_.{port}_.{subset or ''}_.{host}" if tls.mode == ISTIO_MUTUAL else "")
        try:
            return ClientTls(tls.mode, tls.ca_certificates or "", tls.client_certificate or "",
                             tls.private_key or "", sni, sans)
        except ValueError as exc:
            self.problems.append(f"{where}: the DestinationRule for {host}: {exc}")
            return None

    def endpoints(self, host: str, rule: DestinationRule | None, subset: str | None, port: int,
                  where: str) -> list[tuple[tuple[str, int], bool]]:
        """(address, is a mesh peer) of each endpoint of host:port in the subset; none, with a
        warning, when the registry cannot say (connections then fail with UH)."""
        found = self.registry.service(host)
        if found is None:
            self.warnings.append(f"{where}: no ServiceEntry defines {host}: its connections will fail with UH")
            return []
        document, entry = found
        service_port = next((p for p in entry.ports if p.number == port), None)
        if service_port is None:
            self.warnings.append(f"{where}: {host} has no port {port} in {document.source}: "
                                 "its connections will fail with UH")
            return []
        wanted: dict[str, str] = {}
        if subset is not None:
            match = next((s for s in rule.subsets if s.name == subset), None) if rule else None
            if match is None:
                self.warnings.append(f"{where}: subset {subset!r} of {host} is not defined by any "
                                     "DestinationRule: its connections will fail with UH")
                return []
            wanted = match.labels
        found_endpoints = []
        for workload in self.registry.endpoints(document, entry):
            if not wanted.items() <= workload.labels.items():
                continue
            target = workload.ports.get(service_port.name, service_port.target_port or service_port.number)
            mesh_peer = workload.labels.get(TLS_MODE_LABEL) == "istio"
            found_endpoints += [((ip, target), mesh_peer)
                                for ip in self.addresses(workload.address, entry, document)]
        return found_endpoints

    def addresses(self, address: str, entry: ServiceEntry, document: Document) -> list[str]:
        """An endpoint's IP addresses: itself, or what its name resolves to now for
        resolution DNS (as `serve --upstream` resolves names once, at start)."""
        try:
            return [str(ipaddress.ip_address(address))]
        except ValueError:
            pass
        if entry.resolution not in ("DNS", "DNS_ROUND_ROBIN"):
            self.problems.append(f"{document.source}: endpoint address {address!r} is a name: give an IP "
                                 "address, or set resolution: DNS")
            return []
        if not self.resolve:
            self.warnings.append(f"{document.source}: endpoint {address!r} will be resolved when serving")
            return []
        try:
            return [found.host for found in resolve(Address(address, 0))]
        except ValueError as exc:
            self.problems.append(f"{document.source}: endpoint {address!r}: {exc}")
            return []

    def outbound(self, index: int) -> ListenerConfig:
        listener = self.spec.outbound[index]
        where = f"{self.doc.source}: spec.outbound[{index}]"
        host = fqdn(listener.host, self.namespace)
        clusters: list[Cluster] = []
        table = self.routes_to(host, listener.service_port or listener.port, where, clusters)
        return ListenerConfig(self._address(listener.bind, listener.port, where),
                              RouteTable(tuple(clusters), tuple(table)), OUTBOUND, host)

    def virtual_outbound(self) -> ListenerConfig:
        """Istio's virtualOutbound: every ServiceEntry address and port is a destination with
        its host's routes; any other goes to PassthroughCluster (its original address)."""
        listener = self.spec.virtual_outbound
        assert listener is not None
        where = f"{self.doc.source}: spec.virtualOutbound"
        clusters = [Cluster(PASSTHROUGH_CLUSTER, lb="PASSTHROUGH", connect_timeout=self.connect_timeout,
                            idle_timeout=self.spec.idle_timeout)]
        destinations: dict[tuple[str, int], Destination] = {}
        for document, entry in self.registry.services:
            host = fqdn(entry.hosts[0], document.namespace)
            for address in entry.addresses:
                ip = _single_ip(address)
                if ip is None:
                    self.warnings.append(f"{document.source}: spec.addresses: {address!r} is not one IP address: "
                                         "the virtual outbound listener does not match it")
                    continue
                for port in entry.ports:
                    if (ip, port.number) in destinations:
                        continue  # the first ServiceEntry to name an address and port has it, as in Istio
                    table = self.routes_to(host, port.number, f"{document.source}: spec.ports", clusters)
                    destinations[(ip, port.number)] = Destination((ip, port.number), tuple(table))
            if entry.addresses:
                continue
            # No addresses: its TCP ports on any address (an exact address and port wins over it).
            for number, port in enumerate(entry.ports):
                if not _tcp_port(port):
                    self.warnings.append(f"{document.source}: spec.ports[{number}]: a {port.protocol or port.name} "
                                         "port without spec.addresses: the virtual outbound listener does not "
                                         "match it (only TCP ports are matched on any address)")
                elif ("0.0.0.0", port.number) not in destinations:
                    table = self.routes_to(host, port.number, f"{document.source}: spec.ports", clusters)
                    destinations[("0.0.0.0", port.number)] = Destination(("0.0.0.0", port.number), tuple(table))
        return ListenerConfig(self._address(listener.bind, listener.port, where),
                              RouteTable(tuple(clusters), ((0, 1),), tuple(destinations.values())), OUTBOUND)

    def routes_to(self, host: str, port: int, where: str, clusters: list[Cluster]) -> list[tuple[int, int]]:
        """The weighted routes of a connection to host:port: the first matching tcp route of the
        VirtualService for the host, else the host itself. Their clusters are added to `clusters`
        (once each, by name); the routes name them by index there. `where`: the setting that
        names host and port, for warnings."""
        # (destination, weight, namespace, where it is named); destination None: the host itself
        routes: list[tuple[Any, int, str, str]] | None = None
        for document, service in self.registry.routes:
            if service.gateways and MESH_GATEWAY not in service.gateways:
                continue  # bound to gateways only: not a sidecar's route
            if not any(host_matches(fqdn(h, document.namespace), host) for h in service.hosts):
                continue
            if not service.tcp:
                continue  # http/tls routes only: TCP traffic to the host goes straight to it, as in Istio
            routes = []
            for number, route in enumerate(service.tcp):
                if not route.match or any(self._matches(m, port) for m in route.match):
                    routes = self._weighted(route.route, document, f"{document.source}: spec.tcp[{number}]")
                    break
            if not routes:
                self.warnings.append(f"{document.source}: spec.tcp: none of its routes matches port {port} of "
                                     f"{host} (the port of {where}): connections will be closed with NR")
            break
        if routes is None:  # no VirtualService: straight to the service
            routes = [(None, 100, self.namespace, where)]
        table: list[tuple[int, int]] = []
        for destination, weight, namespace, named_at in routes:
            target = host if destination is None else fqdn(destination.host, namespace)
            target_port = destination.port.number if destination is not None and destination.port else port
            cluster = self.cluster(target, destination.subset if destination else None, target_port, named_at)
            if cluster.name not in [c.name for c in clusters]:
                clusters.append(cluster)
            table.append(([c.name for c in clusters].index(cluster.name), weight))
        return table

    def _matches(self, match: Any, port: int) -> bool:
        if match.port is not None and match.port != port:
            return False
        if match.gateways and MESH_GATEWAY not in match.gateways:
            return False
        if match.source_namespace is not None and match.source_namespace != self.node.get("NAMESPACE"):
            return False
        return match.source_labels.items() <= self.labels.items()

    def _weighted(self, destinations: list[Any], document: Document,
                  route: str) -> list[tuple[Any, int, str, str]]:
        """(destination, weight, namespace, where it is named) of a tcp route (at `route`)."""
        named = [f"{route}.route[{index}].destination" for index in range(len(destinations))]
        if len(destinations) == 1:
            return [(destinations[0].destination, 100, document.namespace, named[0])]
        weights = [d.weight for d in destinations]
        if any(w is None for w in weights) or sum(weights) != 100:  # type: ignore[arg-type]
            self.problems.append(f"{document.source}: a tcp route with several destinations needs weights "
                                 f"adding up to 100, got {weights}")
        return [(d.destination, d.weight or 0, document.namespace, where)
                for d, where in zip(destinations, named)]

    def inbound(self, index: int) -> ListenerConfig:
        listener = self.spec.inbound[index]
        where = f"{self.doc.source}: spec.inbound[{index}]"
        app = Cluster(f"inbound|{listener.port}||{listener.service}", listener.service,
                      (("127.0.0.1", listener.target_port),), connect_timeout=self.connect_timeout,
                      idle_timeout=self.spec.idle_timeout)
        mtls = self._inbound_mode(listener.target_port, where)
        return ListenerConfig(self._address(listener.bind, listener.port, where), RouteTable((app,), ((0, 1),)),
                              INBOUND, fqdn(listener.service, self.namespace) if listener.service else "", mtls)

    def virtual_inbound(self) -> ListenerConfig:
        """Istio's virtualInbound: each connection to the app on its original port, the ports
        Services name with their service and each port with its PeerAuthentication mode; any
        other port as InboundPassthroughClusterIpv4."""
        listener = self.spec.virtual_inbound
        assert listener is not None
        where = f"{self.doc.source}: spec.virtualInbound"
        listen = self._address(listener.bind, listener.port, where)
        any_address = "::" if ":" in listen.host else "0.0.0.0"
        clusters = [Cluster(INBOUND_PASSTHROUGH_CLUSTER, lb="LOCAL_PASSTHROUGH", connect_timeout=self.connect_timeout,
                            idle_timeout=self.spec.idle_timeout)]
        destinations: list[Destination] = []
        for number, app_port in enumerate(listener.ports):
            if app_port.port in [d.address[1] for d in destinations]:
                self.problems.append(f"{where}.ports[{number}]: port {app_port.port} is named twice")
                continue
            service = fqdn(app_port.service, self.namespace) if app_port.service else ""
            local = "::1" if any_address == "::" else "127.0.0.1"
            clusters.append(Cluster(f"inbound|{app_port.port}||{service}", service, ((local, app_port.port),),
                                    connect_timeout=self.connect_timeout, idle_timeout=self.spec.idle_timeout))
            mode = self._inbound_mode(app_port.port, f"{where}.ports[{number}]")
            destinations.append(Destination((any_address, app_port.port), ((len(clusters) - 1, 1),), mode))
        return ListenerConfig(listen, RouteTable(tuple(clusters), ((0, 1),), tuple(destinations)), INBOUND,
                              mtls=self._inbound_mode(None, where),
                              transparent=listener.interception_mode == "TPROXY")

    def _inbound_mode(self, port: int | None, where: str) -> str | None:
        """The PeerAuthentication mode of an app port (None: of a port no policy names one
        for), checked against the certs STRICT needs."""
        mtls, policy = self.peer_authentication(port)
        if mtls == STRICT and self.spec.certs is None and policy is not None:
            self.problems.append(f"{policy.source}: a PeerAuthentication says STRICT for "
                                 f"{'port ' + str(port) if port else 'the workload'}: the Sidecar needs certs "
                                 f"(a directory with cert-chain.pem, key.pem, root-cert.pem), {where} has none")
        return mtls

    def peer_authentication(self, port: int | None) -> tuple[str | None, Document | None]:
        """The mtls mode of the app's port and the document that sets it, as Istio picks its
        PeerAuthentication: the workload's (by selector) over its namespace's over the
        mesh's (istio-system); a port-level mode over the policy's own; UNSET inherits.
        (None, None): the default."""
        by_rank: dict[int, tuple[Document, PeerAuthentication]] = {}
        for document, policy in self.registry.peer_authentications:
            if policy.selector is not None:
                if document.namespace == self.namespace and policy.selector.match_labels.items() <= self.labels.items():
                    by_rank.setdefault(0, (document, policy))
            elif document.namespace == self.namespace:
                by_rank.setdefault(1, (document, policy))
            elif document.namespace == ROOT_NAMESPACE:
                by_rank.setdefault(2, (document, policy))
        for rank in sorted(by_rank):
            document, policy = by_rank[rank]
            mode = policy.port_level_mtls[port].mode if port is not None and port in policy.port_level_mtls else "UNSET"
            if mode == "UNSET" and policy.mtls is not None:
                mode = policy.mtls.mode
            if mode != "UNSET":
                return mode, document
        return None, None

    def _address(self, bind: str, port: int, where: str) -> Address:
        try:
            return parse_address(f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}", allow_port_zero=True)
        except ValueError as exc:
            self.problems.append(f"{where}.bind: {exc}")
            return Address("127.0.0.1", port)

    def optional_address(self, text: str | None, name: str) -> Address | None:
        if text is None:
            return None
        try:
            return parse_address(text, allow_port_zero=True)
        except ValueError as exc:
            self.problems.append(f"{self.doc.source}: spec.{name}: {exc}")
            return None

    def build(self) -> Plan:
        spec = self.spec
        listeners = [self.inbound(i) for i in range(len(spec.inbound))]
        listeners += [self.outbound(i) for i in range(len(spec.outbound))]
        if spec.virtual_outbound is not None:
            listeners.append(self.virtual_outbound())
        if spec.virtual_inbound is not None:
            listeners.append(self.virtual_inbound())
        if not listeners:
            self.problems.append(f"{self.doc.source}: spec: a sidecar needs at least one inbound or outbound listener")
        admin = self.optional_address(spec.admin, "admin")
        metrics = self.optional_address(spec.metrics, "metrics")
        health = self.optional_address(spec.health, "health")
        # The listeners in the order built: inbound, outbound, then the virtual ones.
        settings = [f"spec.inbound[{i}]" for i in range(len(spec.inbound))]
        settings += [f"spec.outbound[{i}]" for i in range(len(spec.outbound))]
        settings += ["spec.virtualOutbound"] * (spec.virtual_outbound is not None)
        settings += ["spec.virtualInbound"] * (spec.virtual_inbound is not None)
        named = [(setting, listener.listen) for setting, listener in zip(settings, listeners)]
        named += [("spec.metrics", metrics), ("spec.admin", admin), ("spec.health", health)]
        self.problems += [f"{self.doc.source}: {problem}" for problem in conflicts(named)]
        if self.problems:
            raise ConfigError(self.problems)
        workers, workers_auto = worker_count(spec.workers)
        config = SidecarConfig(
            listeners=listeners,
            workers=workers,
            workers_auto=workers_auto,
            max_connections=spec.max_connections,
            io_uring=spec.io_uring,
            admin=admin,
            metrics=metrics,
            health=health,
            node_metadata=self.node,
            reporting_duration=spec.tcp_reporting_duration,
            stats_eviction_interval=spec.stats_eviction_interval,
            exchange=ExchangeConfig(spec.exchange.enabled, spec.exchange.plaintext, spec.exchange.max_payload,
                                    spec.exchange.timeout, spec.exchange.detect_timeout),
            certs=Path(spec.certs) if spec.certs is not None else None,
            tls_handshake_timeout=spec.tls_handshake_timeout,
        )
        return Plan(config, self.warnings)


def plan(documents: list[Document], resolve: bool = True) -> Plan:
    """The sidecar the documents describe (there must be exactly one fastmesh Sidecar).
    resolve=False leaves DNS endpoints out (with a warning) instead of resolving them."""
    sidecars = [d for d in documents if isinstance(d.spec, Sidecar)]
    if len(sidecars) != 1:
        where = ", ".join(d.source for d in sidecars) or "none found"
        raise ConfigError([f"expected exactly one fastmesh.io/v1alpha1 Sidecar document to serve, "
                           f"got {len(sidecars)} ({where})"])
    return _Builder(documents, sidecars[0], resolve).build()
