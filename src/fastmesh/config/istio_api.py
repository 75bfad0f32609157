"""The Kubernetes-style documents fastmesh reads: Istio's networking.istio.io
kinds (the fields that matter to TCP, as Istio documents them) and fastmesh's
own Sidecar kind. Models are strict: a misspelt field is an error, not ignored.

Fields Istio defines but fastmesh does not act on for TCP (HTTP routes, outlier
detection, consistent hashing, ...) are accepted so that Istio's files load
unchanged; fastmesh.config.mesh says which ones it ignores.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from fastmesh.contract import MAX_WORKERS
from fastmesh.cpus import AUTO
from fastmesh.defaults import DEFAULTS
from fastmesh.durations import Duration, DurationOrOff


class Model(BaseModel):
    # camelCase in YAML, as in Istio's API; unknown fields are rejected.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


Port = Field(ge=1, le=65535)


class ObjectMeta(BaseModel):
    # Kubernetes adds many fields (uid, resourceVersion, ...) to what `kubectl get -o yaml` prints.
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)
    namespace: str = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


# ---------------------------------------------------------------- DestinationRule


class PortSelector(Model):
    number: int = Port


class TcpSettings(Model):
    max_connections: Optional[int] = Field(default=None, ge=0)
    connect_timeout: Optional[Duration] = None
    idle_timeout: Optional[DurationOrOff] = None  # Istio's default: 1h; 0s: never
    tcp_keepalive: Optional[dict[str, Any]] = None


class ConnectionPool(Model):
    tcp: Optional[TcpSettings] = None
    http: Optional[dict[str, Any]] = None


LbPolicy = Literal["ROUND_ROBIN", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "LEAST_REQUEST", "UNSPECIFIED"]


class LoadBalancer(Model):
    simple: Optional[LbPolicy] = None
    consistent_hash: Optional[dict[str, Any]] = None
    locality_lb_setting: Optional[dict[str, Any]] = None
    warmup_duration_secs: Optional[str] = None


class ClientTLS(Model):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
    client_certificate: Optional[str] = None
    private_key: Optional[str] = None
    ca_certificates: Optional[str] = None
    credential_name: Optional[str] = None
    subject_alt_names: list[str] = []
    sni: Optional[str] = None
    insecure_skip_verify: Optional[bool] = None


class PortTrafficPolicy(Model):
    port: Optional[PortSelector] = None
    load_balancer: Optional[LoadBalancer] = None
    connection_pool: Optional[ConnectionPool] = None
    outlier_detection: Optional[dict[str, Any]] = None
    tls: Optional[ClientTLS] = None


class TrafficPolicy(Model):
    load_balancer: Optional[LoadBalancer] = None
    connection_pool: Optional[ConnectionPool] = None
    outlier_detection: Optional[dict[str, Any]] = None
    tls: Optional[ClientTLS] = None
    port_level_settings: list[PortTrafficPolicy] = []
    tunnel: Optional[dict[str, Any]] = None


class Subset(Model):
    name: str = Field(min_length=1)
    labels: dict[str, str] = {}
    traffic_policy: Optional[TrafficPolicy] = None


class DestinationRule(Model):
    host: str = Field(min_length=1)
    traffic_policy: Optional[TrafficPolicy] = None
    subsets: list[Subset] = []
    export_to: list[str] = []
    workload_selector: Optional[dict[str, Any]] = None


# ---------------------------------------------------------------- VirtualService


class Destination(Model):
    host: str = Field(min_length=1)
    subset: Optional[str] = None
    port: Optional[PortSelector] = None


class RouteDestination(Model):
    destination: Destination
    weight: Optional[int] = Field(default=None, ge=0, le=100)


class L4MatchAttributes(Model):
    destination_subnets: list[str] = []
    port: Optional[int] = Field(default=None, ge=1, le=65535)
    source_subnet: Optional[str] = None
    source_labels: dict[str, str] = {}
    gateways: list[str] = []
    source_namespace: Optional[str] = None


class TCPRoute(Model):
    match: list[L4MatchAttributes] = []
    route: list[RouteDestination] = Field(min_length=1)


class VirtualService(Model):
    hosts: list[str] = []
    gateways: list[str] = []
    http: list[dict[str, Any]] = []
    tls: list[dict[str, Any]] = []
    tcp: list[TCPRoute] = []
    export_to: list[str] = []


# ---------------------------------------------------------------- ServiceEntry, WorkloadEntry, Gateway


class ServicePort(Model):
    number: int = Port
    protocol: Optional[str] = None
    name: str = Field(min_length=1)
    target_port: Optional[int] = Field(default=None, ge=1, le=65535)


class WorkloadEntry(Model):
    address: str = Field(min_length=1)
    ports: dict[str, int] = {}
    labels: dict[str, str] = {}
    network: Optional[str] = None
    locality: Optional[str] = None
    weight: Optional[int] = Field(default=None, ge=0)
    service_account: Optional[str] = None


class WorkloadSelector(Model):
    labels: dict[str, str] = {}


class ServiceEntry(Model):
    hosts: list[str] = Field(min_length=1)
    addresses: list[str] = []
    ports: list[ServicePort] = []
    location: Optional[Literal["MESH_EXTERNAL", "MESH_INTERNAL"]] = None
    resolution: Optional[Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]] = None
    endpoints: list[WorkloadEntry] = []
    workload_selector: Optional[WorkloadSelector] = None
    export_to: list[str] = []
    subject_alt_names: list[str] = []


# ---------------------------------------------------------------- PeerAuthentication (security.istio.io)


MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class PeerAuthenticationMtls(Model):
    mode: MtlsMode = "UNSET"  # UNSET: inherit from the namespace's, then the mesh's


class MatchLabels(Model):
    match_labels: dict[str, str] = {}  # istio.io's type.v1beta1.WorkloadSelector


class PeerAuthentication(Model):
    selector: Optional[MatchLabels] = None  # none: every workload of its namespace (of the mesh, in istio-system)
    mtls: Optional[PeerAuthenticationMtls] = None
    port_level_mtls: dict[int, PeerAuthenticationMtls] = {}


class Gateway(Model):
    # Accepted so that Istio's samples load; fastmesh is not a gateway.
    selector: dict[str, str] = {}
    servers: list[dict[str, Any]] = []


# ---------------------------------------------------------------- fastmesh's own kind


ListenPort = Field(ge=0, le=65535)  # 0: any free port (tests, embedding)


class InboundListener(Model):
    port: int = ListenPort  # where the sidecar accepts
    bind: str = "0.0.0.0"
    target_port: int = Port  # the local app's port, on 127.0.0.1
    service: str = ""  # destination_service, e.g. mongodb.default.svc.cluster.local


class OutboundListener(Model):
    port: int = ListenPort  # where the local app connects
    bind: str = "127.0.0.1"
    host: str = Field(min_length=1)  # the service it reaches, routed by the VirtualServices
    service_port: Optional[int] = Field(default=None, ge=1, le=65535)  # defaults to `port`


class VirtualOutboundListener(Model):
    """Istio's virtualOutbound: where `fastmesh capture` redirects the pod's outbound TCP. Each
    connection's service is picked by its original destination (a ServiceEntry's addresses
    and ports); one no config knows goes to that address, as PassthroughCluster."""
    port: int = Field(default=DEFAULTS.capture_outbound_port, ge=0, le=65535)
    bind: str = "127.0.0.1"  # iptables REDIRECT in OUTPUT rewrites the destination to 127.0.0.1


class InboundPort(Model):
    port: int = Port  # an app port, as a connection's original destination names it
    service: str = ""  # destination_service, e.g. mongodb (short names take the Sidecar's namespace)


class VirtualInboundListener(Model):
    """Istio's virtualInbound: where `fastmesh capture` redirects the pod's inbound TCP. Each
    connection goes to the app on its original port (127.0.0.1), with that port's
    PeerAuthentication; a port `ports` does not name is InboundPassthroughClusterIpv4."""
    port: int = Field(default=DEFAULTS.capture_inbound_port, ge=0, le=65535)
    bind: str = "0.0.0.0"  # iptables REDIRECT in PREROUTING: connections arrive on the pod's addresses
    ports: list[InboundPort] = []
    # As `fastmesh capture -m` (Istio's sidecar.istio.io/interceptionMode): under TPROXY the
    # listener is transparent, which needs CAP_NET_RAW or CAP_NET_ADMIN.
    interception_mode: Literal["REDIRECT", "TPROXY"] = "REDIRECT"


class ExchangeOptions(Model):
    enabled: bool = DEFAULTS.exchange
    plaintext: bool = DEFAULTS.exchange_plaintext  # also on plaintext connections (fastmesh's own variant)
    max_payload: int = Field(default=DEFAULTS.exchange_max_payload, ge=0, le=0xFFFFFFFF)
    timeout: Duration = DEFAULTS.exchange_timeout
    detect_timeout: Duration = DEFAULTS.exchange_detect_timeout


_WORKER_NUMBER = TypeAdapter(Annotated[int, Field(ge=1, le=MAX_WORKERS)])


def _workers(value: Any) -> int | str:
    """A number as an int field takes it (its own messages), or `auto`; other words are named as wrong."""
    if value == AUTO:
        return AUTO
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, or {AUTO} (as many as this process "
                         "has CPUs)")
    try:
        return _WORKER_NUMBER.validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


# Sidecar.workers: a count, or `auto` (fastmesh.cpus measures it when the config is built).
Workers = Annotated[int | Literal["auto"], PlainValidator(_workers)]


class Sidecar(Model):
    node_metadata: dict[str, Any] = {}
    # A directory with the pod's Downward API labels file: nodeMetadata's missing keys are then
    # filled from it and from POD_NAME, POD_NAMESPACE, ... (fastmesh.podinfo), as kube-inject sets up.
    pod_info: Optional[str] = None
    inbound: list[InboundListener] = []
    outbound: list[OutboundListener] = []
    virtual_outbound: Optional[VirtualOutboundListener] = None
    virtual_inbound: Optional[VirtualInboundListener] = None
    tcp_reporting_duration: Duration = DEFAULTS.reporting_duration
    # Istio's statsEvictionInterval; absent (the default, 0, is not a duration one can write): never
    stats_eviction_interval: DurationOrOff = DEFAULTS.stats_eviction_interval  # 0s: series are never evicted
    metrics: Optional[str] = DEFAULTS.metrics
    admin: Optional[str] = DEFAULTS.admin
    health: Optional[str] = DEFAULTS.health  # Istio's 0.0.0.0:15021, /healthz/ready
    exchange: ExchangeOptions = ExchangeOptions()
    connect_timeout: Duration = DEFAULTS.connect_timeout  # a DestinationRule's connectTimeout overrides it
    idle_timeout: DurationOrOff = DEFAULTS.idle_timeout  # a DestinationRule's idleTimeout overrides it; 0s: never
    workers: Workers = DEFAULTS.workers  # or auto
    io_uring: bool = DEFAULTS.io_uring  # serve --io-uring
    max_connections: int = Field(default=DEFAULTS.max_connections, ge=0)  # per listener (serve --max-connections)
    certs: Optional[str] = None  # the directory of cert-chain.pem, key.pem, root-cert.pem (serve --certs)
    tls_handshake_timeout: Duration = DEFAULTS.tls_handshake_timeout


# (apiVersion group, kind) -> spec model
ISTIO_GROUP = "networking.istio.io"
SECURITY_GROUP = "security.istio.io"
FASTMESH_GROUP = "fastmesh.io"
KINDS: dict[tuple[str, str], type[BaseModel]] = {
    (ISTIO_GROUP, "DestinationRule"): DestinationRule,
    (ISTIO_GROUP, "VirtualService"): VirtualService,
    (ISTIO_GROUP, "ServiceEntry"): ServiceEntry,
    (ISTIO_GROUP, "WorkloadEntry"): WorkloadEntry,
    (ISTIO_GROUP, "Gateway"): Gateway,
    (SECURITY_GROUP, "PeerAuthentication"): PeerAuthentication,
    (FASTMESH_GROUP, "Sidecar"): Sidecar,
}
API_VERSIONS = {ISTIO_GROUP: ("v1alpha3", "v1beta1", "v1"), SECURITY_GROUP: ("v1beta1", "v1"),
                FASTMESH_GROUP: ("v1alpha1",)}
