"""Command line: `python -m fastmesh serve ...` and `python -m fastmesh metrics ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fastmesh._version import __version__
from fastmesh.addr import Address, parse_address
from fastmesh.defaults import DEFAULTS
from fastmesh.durations import format_duration, parse_duration
from fastmesh.tls import SERVER_MODES

if TYPE_CHECKING:
    from fastmesh.privileges import Account
    from fastmesh.settings import SidecarConfig
    from fastmesh.sidecar import Sidecar

log = logging.getLogger("fastmesh")


def _address(text: str) -> Address:
    try:
        return parse_address(text, allow_port_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_or_off(text: str) -> float:
    """A duration, or 0 (`0`, `0s`) for off."""
    return 0.0 if text.strip() == "0" else _duration(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _workers(text: str) -> int | str:
    from fastmesh.cpus import AUTO

    return AUTO if text == AUTO else _positive_int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


class _Version(argparse.Action):
    """--version names the engine in use, which is loaded only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and engine, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from fastmesh.engine import IMPLEMENTATION

        parser.exit(message=f"fastmesh {__version__} ({IMPLEMENTATION} engine)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmesh",
        description="A TCP sidecar proxy: relays TCP at kernel speed and reports Istio's TCP metrics.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="relay a listener to an upstream",
        description="Accept TCP connections on --listen and relay each one, byte for byte, to --upstream; "
                    "or run the sidecar that config files (-c) describe.",
    )
    serve.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                       help="YAML file(s) of Istio DestinationRule, VirtualService, ServiceEntry, WorkloadEntry "
                            "and one fastmesh Sidecar document; repeatable. Instead of --listen/--upstream: the "
                            "Sidecar document then sets the listeners, identity, exchange, metrics and admin, and "
                            "the files are reloaded on change or SIGHUP")
    serve.add_argument("--listen", type=_address, metavar="HOST:PORT",
                       help="address to accept on, e.g. 0.0.0.0:15001 or [::]:15001")
    serve.add_argument("--upstream", type=_address, action="append", metavar="HOST:PORT",
                       help="where to relay; repeat for several upstreams (round robin); host names are resolved once")
    serve.add_argument("--workers", type=_workers, default=DEFAULTS.workers, metavar="N|auto",
                       help=f"relay threads (default {DEFAULTS.workers}; one epoll loop each, without the GIL); "
                            "auto: one per CPU this process may use (its affinity mask, capped by its cgroup's "
                            "CPU quota, rounded up)")
    serve.add_argument("--admin", type=_address, default=_address(DEFAULTS.admin), metavar="HOST:PORT",
                       help=f"admin endpoint: /ready, /stats, /config_dump (default {DEFAULTS.admin})")
    serve.add_argument("--no-admin", action="store_true", help="do not serve the admin endpoint")
    serve.add_argument("--health", type=_address, metavar="HOST:PORT",
                       default=_address(DEFAULTS.health) if DEFAULTS.health else None,
                       help="health endpoint for a kubelet's probes: /healthz/ready, 200 once listening, 503 "
                            "while draining (Istio's is 0.0.0.0:15021; default: not served)")
    serve.add_argument("--connect-timeout", type=_duration, default=DEFAULTS.connect_timeout, metavar="DURATION",
                       help="upstream connect timeout, e.g. 500ms, 5s "
                            f"(default {format_duration(DEFAULTS.connect_timeout)})")
    serve.add_argument("--idle-timeout", type=_duration_or_off, default=DEFAULTS.idle_timeout, metavar="DURATION",
                       help="close a connection with no byte either way for this long, e.g. 30m; 0: never "
                            "(Istio's connectionPool.tcp.idleTimeout; default "
                            f"{format_duration(DEFAULTS.idle_timeout)})")
    serve.add_argument("--drain-timeout", type=_duration, default=DEFAULTS.drain_timeout, metavar="DURATION",
                       help="on SIGINT/SIGTERM, how long open connections may finish "
                            f"(default {format_duration(DEFAULTS.drain_timeout)})")
    serve.add_argument("--max-connections", type=_count, default=DEFAULTS.max_connections, metavar="N",
                       help="open connections each listener takes at most; past it a new one is reset at once "
                            "and counted (listener_overflows in /stats), open ones unharmed (default 0: no limit)")
    serve.add_argument("--pipe-size", type=_positive_int, default=DEFAULTS.pipe_size, metavar="BYTES",
                       help=f"splice pipe size (default {DEFAULTS.pipe_size})")
    serve.add_argument("--max-pipes", type=_count, default=DEFAULTS.max_pipes, metavar="N",
                       help=f"pipes in flight before falling back to copying (default {DEFAULTS.max_pipes}; "
                            "0 disables splice)")
    serve.add_argument("--no-splice", action="store_true", help="copy with recv/send instead of splice")
    serve.add_argument("--io-uring", action="store_true",
                       help="make each loop turn's receives in one io_uring submission and its sends in another, "
                            "instead of a system call each (plaintext copies; splice, TLS and the exchange make "
                            "their own calls); where io_uring is unavailable a warning says why and plain calls "
                            "are made (the Sidecar kind's ioUring: true)")
    telemetry = serve.add_argument_group("telemetry (Istio TCP metrics)")
    telemetry.add_argument("--direction", choices=["outbound", "inbound"], default="outbound",
                           help="outbound: this sidecar is the client's, metrics say reporter=source; "
                                "inbound: the server's, reporter=destination (default outbound)")
    telemetry.add_argument("--node-metadata", metavar="FILE",
                           help="Istio node metadata of the local workload (JSON or YAML: NAME, NAMESPACE, "
                                "WORKLOAD_NAME, LABELS, CLUSTER_ID, ...)")
    telemetry.add_argument("--destination-service", default="", metavar="FQDN",
                           help="the service behind --upstream, e.g. mongodb.default.svc.cluster.local")
    telemetry.add_argument("--reporting-duration", type=_duration, default=DEFAULTS.reporting_duration,
                           metavar="DURATION", help="how often open connections' bytes are reported (Istio's "
                           f"tcpReportingDuration; default {format_duration(DEFAULTS.reporting_duration)})")
    telemetry.add_argument("--stats-eviction-interval", type=_duration_or_off,
                           default=DEFAULTS.stats_eviction_interval, metavar="DURATION",
                           help="drop a series with no open connection and no change for this long, e.g. 5m; "
                                "should it come back, its counters start again from 0 (Istio's "
                                "statsEvictionInterval; default 0: never)")
    telemetry.add_argument("--metrics", type=_address, default=_address(DEFAULTS.metrics), metavar="HOST:PORT",
                           help=f"Prometheus endpoint: /stats/prometheus and /metrics (default {DEFAULTS.metrics})")
    telemetry.add_argument("--no-metrics", action="store_true", help="no telemetry and no metrics endpoint")
    exchange = serve.add_argument_group(
        "peer metadata exchange (istio-peer-exchange)",
        "Sidecars tell each other their workload identity in the first bytes of each connection. "
        "An inbound listener looks for a peer's frame in every client's first bytes and answers it; "
        "an outbound listener sends its frame only to an upstream declared a mesh peer.")
    tls = serve.add_argument_group(
        "mutual TLS (Istio's ISTIO_MUTUAL)",
        "With --certs, an outbound listener reaches mesh peers (--mesh-peer) over mTLS with Istio's ALPN, "
        "and an inbound one accepts what --peer-authentication says.")
    tls.add_argument("--certs", type=Path, metavar="DIR",
                     help="the workload identity: DIR/cert-chain.pem, DIR/key.pem, DIR/root-cert.pem (as Istio "
                          "mounts them; `fastmesh ca issue` writes them); watched: new files serve new handshakes")
    tls.add_argument("--peer-authentication", choices=list(SERVER_MODES), default=DEFAULTS.peer_authentication,
                     help="inbound: STRICT (mTLS from the mesh only; the app sees a connection once its client "
                          "is verified), PERMISSIVE (mTLS or plaintext, told apart by the first bytes) or DISABLE "
                          f"(default {DEFAULTS.peer_authentication}; without --certs, plaintext)")
    tls.add_argument("--tls-handshake-timeout", type=_duration, default=DEFAULTS.tls_handshake_timeout,
                     metavar="DURATION", help="time for a TLS handshake to complete "
                     f"(default {format_duration(DEFAULTS.tls_handshake_timeout)})")
    exchange.add_argument("--mesh-peer", action="store_true",
                          help="outbound: the upstreams run sidecars: mTLS to them with --certs (the exchange "
                               "by ALPN), else plaintext (the exchange with --plaintext-exchange)")
    exchange.add_argument("--plaintext-exchange", action="store_true",
                          help="exchange on plaintext connections too: fastmesh's own variant, for sidecars "
                               "without certificates (Istio exchanges only over mTLS)")
    exchange.add_argument("--no-exchange", action="store_true",
                          help="never exchange: relay every byte as it comes (peers stay unknown)")
    exchange.add_argument("--exchange-max-payload", type=_positive_int, default=DEFAULTS.exchange_max_payload,
                          metavar="BYTES", help="largest peer frame payload accepted; a larger one resets the "
                          f"connection (default {DEFAULTS.exchange_max_payload})")
    exchange.add_argument("--exchange-timeout", type=_duration, default=DEFAULTS.exchange_timeout, metavar="DURATION",
                          help="time for a peer frame to arrive whole once it has begun "
                               f"(default {format_duration(DEFAULTS.exchange_timeout)})")
    exchange.add_argument("--exchange-detect-timeout", type=_duration, default=DEFAULTS.exchange_detect_timeout,
                          metavar="DURATION", help="inbound: how long a server-first app's first bytes wait for "
                          "the client's, so that a mesh client gets our frame first "
                          f"(default {format_duration(DEFAULTS.exchange_detect_timeout)})")
    serve.add_argument("--user", metavar="USER",
                       help="started as root: once every port is bound, run as USER (a name or a uid; Istio's "
                            "sidecar runs as 1337); the files read later (--certs, -c) must be readable by USER")
    serve.add_argument("--group", metavar="GROUP",
                       help="with --user: run with GROUP (a name or a gid) instead of USER's own group")
    serve.add_argument("--groups", metavar="GROUP[,GROUP...]",
                       help="with --user: supplementary groups to keep as well (names or gids), such as the "
                            "pod's fsGroup that may read a Secret's key")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    ca = commands.add_parser(
        "ca",
        help="make a mesh root and workload identities (Istio's file layout)",
        description="A certificate authority as Istio's self-signed one: `ca init DIR` makes a root, `ca issue DIR "
                    "...` a workload identity with the SPIFFE URI SAN spiffe://<trust-domain>/ns/<NS>/sa/<SA>.")
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    ca_init = ca_commands.add_parser("init", help="make a mesh root: DIR/root-cert.pem and DIR/root-key.pem")
    ca_init.add_argument("directory", metavar="DIR")
    ca_init.add_argument("--trust-domain", default="cluster.local", help="default cluster.local, as Istio's")
    ca_init.add_argument("--key-type", choices=["rsa", "ecdsa"], default="rsa",
                         help="RSA 2048 (Istio's default) or ECDSA P-256")
    ca_issue = ca_commands.add_parser("issue", help="write OUT/cert-chain.pem, OUT/key.pem, OUT/root-cert.pem")
    ca_issue.add_argument("directory", metavar="DIR", help="the root made by `ca init`")
    ca_issue.add_argument("--namespace", required=True, metavar="NS")
    ca_issue.add_argument("--service-account", required=True, metavar="SA")
    ca_issue.add_argument("--out", required=True, metavar="OUT")
    ca_issue.add_argument("--ttl", type=_duration, default=24 * 3600.0, metavar="DURATION",
                          help="lifetime (default 24h, Istio's; at most 90 days)")
    ca_issue.add_argument("--key-type", choices=["rsa", "ecdsa"], default="rsa",
                          help="RSA 2048 (Istio's default) or ECDSA P-256")

    check = commands.add_parser(
        "check",
        help="validate config files as serve -c does, without serving",
        description="Run the checks `serve -c` runs before it binds anything, the same function: report every "
                    "problem (file, document, field, what was expected) as `serve` would refuse it, or else what "
                    "`serve` would run: each listener's address, direction, routes and TLS, the metrics, admin "
                    "and health addresses, the identity and the exchange.",
    )
    check.add_argument("-c", "--config", action="append", required=True, metavar="FILE", help="YAML file (repeatable)")

    demo = commands.add_parser(
        "demo",
        help="run Istio's TCP metrics task (Bookinfo's ratings-v2 and its database) on this machine",
        description="Start a database (MariaDB or Redis if installed, else an embedded service), its inbound "
                    "sidecar and ratings-v2's outbound sidecar from the Istio files in fastmesh/bookinfo/, send "
                    "traffic, show both reporters' istio_tcp_* series, and clean up. Uses ports 15000, 15001, "
                    "15006, 15010, 15090, 15091, 27018 (and 9090 for --prometheus) on 127.0.0.1; one that is "
                    "taken is replaced by a free port, and the message says which.",
    )
    demo.add_argument("--requests", type=_positive_int, default=10, metavar="N",
                      help="database queries ratings-v2 sends, one connection each (default 10)")
    demo.add_argument("--database", choices=["auto", "mariadb", "redis", "embedded"], default="auto",
                      help="the database behind the sidecars (default: MariaDB if installed, else Redis, else an "
                           "embedded TCP service)")
    demo.add_argument("--prometheus", action="store_true",
                      help="also run a Prometheus server scraping both sidecars and print its PromQL answers")
    demo.add_argument("--mtls", action="store_true",
                      help="the task's mutual-TLS branch: an ISTIO_MUTUAL DestinationRule and a workload identity "
                           "for each sidecar (made with `fastmesh ca` in a temporary directory); shows both "
                           "principals")
    demo.add_argument("--keep", action="store_true",
                      help="leave the sidecars, the database (and Prometheus) running after the answers, print "
                           "where to look, and stop them all and remove their files on Ctrl-C or SIGTERM")
    demo.add_argument("--port-base", type=_positive_int, metavar="N",
                      help="use ports N, N+1, ... instead, in the order above (Prometheus's last); refuse to "
                           "start if one is taken")
    demo.add_argument("--pods", action="store_true",
                      help="as root: the pods in network namespaces on a bridge (ratings-v2 and mongodb each with "
                           "fastmesh capture and a sidecar as uid 1337, mTLS between them, and a pod without one), "
                           "Redis as the database; removed at the end")

    metrics = commands.add_parser(
        "metrics",
        help="show a sidecar's istio_tcp_* series as a table",
        description="Read a fastmesh (or Envoy) metrics endpoint and print the TCP series, one row per label set.",
    )
    metrics.add_argument("--url", default="http://127.0.0.1:15090/stats/prometheus",
                         help="metrics endpoint (default http://127.0.0.1:15090/stats/prometheus)")
    metrics.add_argument("--watch", nargs="?", type=_duration, const=2.0, default=None, metavar="DURATION",
                         help="refresh every DURATION (default 2s) until Ctrl-C")
    metrics.add_argument("--all-labels", action="store_true", help="a column for every label, not just the key ones")

    query = commands.add_parser(
        "query",
        help="ask Prometheus a PromQL query; print the series as its console lists them",
        description="Ask a Prometheus server an instant query and print one line per series, "
                    'name{label="value",...} value, in Prometheus\'s label order. With --wait, ask again until '
                    "every --expect is matched by some series; exit 1 naming what is missing if it never is.",
    )
    query.add_argument("expr", metavar="EXPR", help="PromQL, e.g. istio_tcp_connections_opened_total")
    query.add_argument("--prometheus", default="http://127.0.0.1:9090", metavar="URL",
                       help="the Prometheus server (default http://127.0.0.1:9090)")
    query.add_argument("--wait", type=_duration, default=0.0, metavar="DURATION",
                       help="keep asking for up to DURATION, e.g. 60s, until the answer has what --expect names "
                            "(or, without --expect, any series); default: ask once")
    query.add_argument("--expect", action="append", default=[], type=_expectation, metavar="LABEL=VALUE",
                       help="some series must have this label value, e.g. reporter=destination; repeatable")

    capture = commands.add_parser(
        "capture",
        help="redirect this network namespace's TCP to the sidecar with iptables, as istio-iptables does",
        description="Install istio-iptables' nat rules (REDIRECT mode) in the current network namespace, in one "
                    "iptables-restore transaction per address family: outbound TCP to --proxy-port, inbound TCP to "
                    "--inbound-capture-port, the proxy's own uid and gid never captured. Running it again replaces "
                    "the rules; `uncapture` removes them.",
    )
    capture.add_argument("-p", "--proxy-port", default=str(DEFAULTS.capture_outbound_port), metavar="PORT",
                         help=f"where outbound TCP is redirected (default {DEFAULTS.capture_outbound_port})")
    capture.add_argument("-z", "--inbound-capture-port", default=str(DEFAULTS.capture_inbound_port), metavar="PORT",
                         help=f"where inbound TCP is redirected (default {DEFAULTS.capture_inbound_port})")
    capture.add_argument("-u", "--proxy-uid", default=str(DEFAULTS.proxy_uid), metavar="UID",
                         help=f"the sidecar's uid, whose traffic is never captured (default {DEFAULTS.proxy_uid})")
    capture.add_argument("-g", "--proxy-gid", metavar="GID", help="likewise, its gid (default: the uid)")
    capture.add_argument("-m", "--inbound-interception-mode", choices=["REDIRECT", "TPROXY"], default="REDIRECT",
                         help="REDIRECT (default: NAT) or TPROXY (inbound handed over without NAT or conntrack; "
                              "the Sidecar's virtualInbound then needs interceptionMode: TPROXY)")
    capture.add_argument("-i", "--include-outbound-cidrs", default="*", metavar="CIDRS",
                         help="outbound destinations captured: '*' (default) or a comma list")
    capture.add_argument("-x", "--exclude-outbound-cidrs", default="", metavar="CIDRS",
                         help="outbound destinations never captured, a comma list (default none)")
    capture.add_argument("-b", "--include-inbound-ports", default="*", metavar="PORTS",
                         help="inbound ports captured: '*' (default: all but 22 and -d's) or a comma list")
    capture.add_argument("-d", "--exclude-inbound-ports", default=DEFAULTS.capture_excluded_inbound_ports,
                         metavar="PORTS", help="inbound ports never captured under -b '*' "
                                               f"(default {DEFAULTS.capture_excluded_inbound_ports})")
    capture.add_argument("-o", "--exclude-outbound-ports", default="", metavar="PORTS",
                         help="outbound destination ports never captured (default none)")
    capture.add_argument("-k", "--kube-virt-interfaces", default="", metavar="IFACES",
                         help="interfaces of VMs inside the pod, whose traffic is captured as outbound")
    capture.add_argument("--ebpf", action="store_true",
                         help="capture IPv4 outbound TCP at connect() with eBPF (cgroup/connect4) instead of NAT on "
                              "every packet; needs bpftool, CAP_BPF and CAP_SYS_ADMIN")
    capture.add_argument("--dry-run", action="store_true", help="print the rules iptables-save will list; change nothing")
    commands.add_parser("uncapture", help="remove every rule and chain `capture` made",
                        description="Remove the ISTIO_* chains `capture` made and the rules that jump to them.")
    inject = commands.add_parser(
        "kube-inject",
        help="add a fastmesh sidecar to Kubernetes manifests, as istioctl kube-inject adds Istio's",
        description="Read Kubernetes documents and write them to stdout with a fastmesh sidecar in every "
                    "Deployment, StatefulSet, DaemonSet, Job and Pod: an init container running `fastmesh "
                    "capture`, the sidecar as a native sidecar, the pod's identity from the Downward API, "
                    "Istio's labels and Prometheus annotations, and a ConfigMap with a default Sidecar "
                    "document (virtualInbound on the ports the input's Services send the pod) and the "
                    "--mesh documents. Other documents, and pods already injected or annotated "
                    "sidecar.istio.io/inject: \"false\", pass through unchanged.")
    inject.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="the manifests, or - for stdin")
    inject.add_argument("--image", default="fastmesh:0.1", help="the sidecar's image (default fastmesh:0.1)")
    inject.add_argument("--mesh", action="append", default=[], metavar="FILE",
                        help="Istio documents (ServiceEntry, VirtualService, DestinationRule, PeerAuthentication, "
                             "...) written into every pod's ConfigMap after its Sidecar document, checked as "
                             "serve -c checks them; repeatable. Istio's counterpart is istioctl kube-inject "
                             "--meshConfigFile (there istiod serves the documents)")
    inject.add_argument("--mtls", action="store_true",
                        help="the Sidecar reads its certificates from the Secret <workload>-fastmesh-certs, "
                             "which the pod then needs to start (without: plaintext, the Secret optional)")
    return parser


def _expectation(text: str) -> Any:
    from fastmesh.promql import Expectation

    try:
        return Expectation.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config(args: argparse.Namespace, starting: bool = True) -> "SidecarConfig":
    """The config `serve` starts with, checked by fastmesh.preflight as `check` checks it
    (starting=False: what a live reload applies)."""
    from fastmesh import preflight
    from fastmesh.cpus import worker_count
    from fastmesh.identity import NodeMetadata, load_node_metadata
    from fastmesh.settings import ExchangeConfig, ListenerConfig, SidecarConfig

    if args.config:
        built = (preflight.from_files if starting else preflight.reloaded)(args.config)
        for warning in built.warnings:
            log.warning("%s", warning)
        return built.sidecar.replace(io_uring=True) if args.io_uring else built.sidecar

    if args.mesh_peer and args.direction == "inbound":
        raise ValueError("--mesh-peer is for outbound listeners: an inbound one detects mesh clients itself")
    listener = ListenerConfig.to_upstreams(args.listen, args.upstream, args.direction, args.destination_service,
                                           args.mesh_peer, args.connect_timeout, args.idle_timeout)
    workers, workers_auto = worker_count(args.workers)
    config = SidecarConfig(
        listeners=[listener],
        workers=workers,
        workers_auto=workers_auto,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        pipe_size=args.pipe_size,
        max_pipes=args.max_pipes,
        splice=not args.no_splice,
        io_uring=args.io_uring,
        admin=None if args.no_admin else args.admin,
        metrics=None if args.no_metrics else args.metrics,
        health=args.health,
        node_metadata=load_node_metadata(args.node_metadata) if args.node_metadata else NodeMetadata(),
        reporting_duration=args.reporting_duration,
        stats_eviction_interval=args.stats_eviction_interval,
        exchange=ExchangeConfig(not args.no_exchange, args.plaintext_exchange, args.exchange_max_payload,
                                args.exchange_timeout, args.exchange_detect_timeout),
        certs=args.certs,
        peer_authentication=args.peer_authentication,
        tls_handshake_timeout=args.tls_handshake_timeout,
    )
    preflight.check_flags(config)
    return config


async def _drop_privileges(sidecar: Sidecar, run_as: Account) -> None:
    """Every port is bound: become `run_as` (fastmesh.privileges), or stop and raise."""
    from fastmesh import privileges

    try:
        privileges.drop(run_as)
    except OSError:
        await sidecar.stop(drain_timeout=0)  # nothing goes on serving as root
        raise
    log.info("running as %s", run_as)


async def serve(args: argparse.Namespace) -> int:
    from fastmesh import privileges
    from fastmesh.engine import IMPLEMENTATION
    from fastmesh.reload import ConfigWatcher, stamps
    from fastmesh.sidecar import Sidecar

    read = stamps(args.config) if args.config else []  # before the files are read: see ConfigWatcher
    # The signals are ours before anything listens: the admin endpoint answers while start() goes on,
    # and a SIGTERM then (a pod deleted as it comes up) must stop the sidecar once it has started,
    # gracefully, not kill it by the default action; a SIGHUP then is a reload asked for.
    stop = asyncio.Event()
    reload_asked = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    try:
        run_as = privileges.account(args.user, args.group, args.groups) if args.user else None  # before binding
        sidecar = Sidecar(_config(args))
        await sidecar.start()
        if run_as is not None:
            await _drop_privileges(sidecar, run_as)
    except (OSError, ValueError) as exc:
        for problem in str(exc).splitlines():  # a ConfigError's, one per line as `check` prints them
            log.error("%s", problem)
        return 1

    watching = None
    if args.config:
        watcher = ConfigWatcher(args.config, sidecar, lambda: _config(args, starting=False), read)
        loop.add_signal_handler(signal.SIGHUP, watcher.request)
        if reload_asked.is_set():
            watcher.request()
        watching = loop.create_task(watcher.run())
    else:  # nothing to reload: as Envoy does, a SIGHUP is not a reason to exit
        loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: serve reloads only config files (-c)")
    measured = sidecar.config.workers_auto
    log.info("ready: %s engine, %d worker(s)%s", IMPLEMENTATION, sidecar.config.workers,
             f" (auto: {measured})" if measured else "")
    await stop.wait()
    if watching is not None:
        watching.cancel()

    log.info("stopping: no longer accepting, draining for up to %gs", args.drain_timeout)
    await sidecar.stop()
    counters = sidecar.relay.counters()
    log.info(
        "stopped after %d connection(s), %d bytes in, %d bytes out",
        counters["connections_opened"], counters["downstream_rx_bytes"], counters["downstream_tx_bytes"],
    )
    return 0


def check(paths: list[str]) -> int:
    """`fastmesh check`: serve's own validation (fastmesh.check)."""
    from fastmesh import check as checking

    return checking.run(paths)


def run_ca(args: argparse.Namespace) -> int:
    """`fastmesh ca init|issue`: a one-line error (exit 1) or what was written (exit 0)."""
    import datetime

    from fastmesh import ca

    try:
        if args.ca_command == "init":
            ca.init(args.directory, args.trust_domain, args.key_type)
            print(f"mesh root for trust domain {args.trust_domain} in {args.directory}: "
                  f"{ca.ROOT_CERT}, {ca.ROOT_KEY} (keep this one secret)")
            return 0
        identity = ca.issue(args.directory, args.namespace, args.service_account, args.out,
                            datetime.timedelta(seconds=args.ttl), args.key_type)
    except (ca.CaError, OSError) as exc:
        print(f"fastmesh ca: {exc}", file=sys.stderr)
        return 1
    print(f"{identity} in {args.out}: {ca.CERT_CHAIN}, {ca.KEY}, {ca.ROOT_CERT}")
    return 0


def run(coro_fn: Any, *args: Any) -> int:
    """Run a coroutine function on uvloop, or on asyncio's own loop without it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_fn(*args))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_fn(*args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.config and (args.listen or args.upstream):
            parser.error("give either -c/--config or --listen and --upstream, not both")
        if not args.config and (args.listen is None or not args.upstream):
            parser.error("serve needs --listen and --upstream, or -c/--config FILE")
        for flag, value in (("--group", args.group), ("--groups", args.groups)):
            if value is not None and args.user is None:
                parser.error(f"{flag} goes with --user")
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return run(serve, args)
    if args.command == "demo":
        from fastmesh import demo

        def progress(message: str) -> None:
            print(f"==> {message}", file=sys.stderr, flush=True)

        try:
            logging.getLogger("fastmesh").setLevel(logging.WARNING)  # the demo reports its own progress
            options = demo.Options(args.requests, args.prometheus, args.database, args.mtls, args.keep,
                                   args.port_base, args.pods)
            return run(demo.run, options, sys.stdout, progress)
        except (demo.DemoError, demo.ca.CaError, OSError, subprocess.CalledProcessError) as exc:
            log.error("demo: %s", exc)
            return 1
        except KeyboardInterrupt:
            progress("interrupted: everything the demo started is stopped")
            return 130
        except asyncio.CancelledError:  # SIGTERM before --keep's wait
            progress("terminated: everything the demo started is stopped")
            return 128 + signal.SIGTERM
    if args.command == "ca":
        return run_ca(args)
    if args.command in ("capture", "uncapture"):
        from fastmesh import capture

        return capture.run(args)
    if args.command == "check":
        return check(args.config)
    if args.command == "kube-inject":
        from fastmesh import inject

        return inject.run(args.filename, args.image, args.mesh, args.mtls)
    if args.command == "metrics":
        from fastmesh import metrics_view

        return metrics_view.run(args.url, args.watch, args.all_labels)
    if args.command == "query":
        from fastmesh import promql

        return promql.run(args.prometheus, args.expr, args.wait, args.expect)
    raise AssertionError(args.command)
