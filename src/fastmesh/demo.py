"""`python -m fastmesh demo`: Istio's "Collecting Metrics for TCP Services" task
on this machine. ratings-v2 talks to its database over TCP through its own
outbound sidecar and the database's inbound sidecar, configured by the Istio
files in fastmesh/bookinfo/ (on the ports demo_ports chose); with --mtls, along
the task's mutual-TLS branch (an ISTIO_MUTUAL DestinationRule and a workload
identity for each side). Then both reporters' istio_tcp_* series are shown as a
table, and the task's two queries are answered series by series, as Prometheus's
console lists them. Everything started is stopped, and every file made removed,
at the end, on Ctrl-C or on SIGTERM (the task's Cleanup step); with --keep, the
end is the user's Ctrl-C, so that the task's steps can be followed meanwhile.
With --pods, the same task between pods in network namespaces (fastmesh.pods), the
apps captured by iptables and unaware of the sidecars."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import tempfile
import time
import urllib.parse
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any, Callable, TextIO

from fastmesh import ca, demo_ports, metrics_view, pods, promql
from fastmesh.addr import Address
from fastmesh.config import load_documents, plan
from fastmesh.config.istio_api import Sidecar as SidecarSpec
from fastmesh.config.loader import Document
from fastmesh.demo_servers import Database, DemoError, choose_database, start_prometheus
from fastmesh.settings import SidecarConfig
from fastmesh.sidecar import Sidecar

__all__ = ["DemoError", "Options", "run"]

CONFIG = Path(__file__).resolve().parent / "bookinfo"
MESH_FILES = ("mesh.yaml", "destination-rule-mongodb.yaml", "virtual-service-mongodb.yaml")
MTLS_RULE = "destination-rule-mongodb-mtls.yaml"  # the task's branch "If you enabled mutual TLS"
# The service accounts of Bookinfo's workloads: ratings-v2 runs as bookinfo-ratings-v2,
# the database as its namespace's default account.
IDENTITIES = {"ratings-v2": ("default", "bookinfo-ratings-v2"), "mongodb-v1": ("default", "default")}
# The task's queries: "istio_tcp_connections_opened_total" and "..._closed_total".
QUERIES = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total")
REPORTERS = (("ratings-v2", "source"), ("mongodb-v1", "destination"))
# The columns of the mutual-TLS branch's tables: the principals and the security policy.
MTLS_COLUMNS = ("REPORTER", "SOURCE_PRINCIPAL", "DESTINATION_PRINCIPAL", "CONNECTION_SECURITY_POLICY", "OPENED",
                "CLOSED")
# --pods: also who the client was and where it went (the plain pod, PassthroughCluster).
PODS_COLUMNS = ("REPORTER", "SOURCE_WORKLOAD", "DESTINATION_SERVICE_NAME", *MTLS_COLUMNS[1:])


@dataclasses.dataclass(frozen=True)
class Options:
    requests: int = 10
    prometheus: bool = False
    database: str = "auto"
    mtls: bool = False
    keep: bool = False  # leave everything running until Ctrl-C or SIGTERM
    port_base: int | None = None
    pods: bool = False  # the pods in network namespaces of fastmesh.pods, as root


class _Signals:
    """Ctrl-C and SIGTERM. While the demo works, SIGTERM cancels it as asyncio's own Ctrl-C
    handling does, so that its exit stacks stop everything; while --keep waits, either one
    ends the wait, which is the demo's normal end."""

    def __enter__(self) -> _Signals:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.loop.add_signal_handler(signal.SIGTERM, self.task.cancel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.remove_signal_handler(signal.SIGTERM)

    async def wait(self) -> str:
        """Until Ctrl-C or SIGTERM; the signal's name."""
        stopped: asyncio.Future[int] = self.loop.create_future()

        def stop(signum: int) -> None:
            if not stopped.done():
                stopped.set_result(signum)

        previous = signal.getsignal(signal.SIGINT)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(signum, stop, signum)
        try:
            return signal.Signals(await stopped).name
        finally:
            self.loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)
            self.loop.add_signal_handler(signal.SIGTERM, self.task.cancel)


async def _blocking(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) in a thread. A cancellation (Ctrl-C, SIGTERM) waits for it to return,
    so that whatever it started is on its exit stack before the stack unwinds."""
    call = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait([call])
        raise


def sidecar_configs(mtls: bool, workdir: Path, ports: dict[str, int],
                    progress: Callable[[str], None]) -> dict[str, SidecarConfig]:
    """ratings-v2's and the database's sidecars from the Istio files, on `ports`; with mtls,
    the ISTIO_MUTUAL rule instead of the plaintext one, and an identity for each (made by
    `fastmesh ca` in workdir) in place of the plaintext exchange."""
    rules = [MTLS_RULE if mtls and name == "destination-rule-mongodb.yaml" else name for name in MESH_FILES]
    files = {"ratings-v2": [*rules, "ratings-v2-sidecar.yaml"], "mongodb-v1": ["mongodb-v1-sidecar.yaml"]}
    if mtls:
        root = workdir / "mesh-root"
        ca.init(root)
    configs = {}
    for name, names in files.items():
        documents = [demo_ports.moved(d, ports) for d in load_documents([CONFIG / f for f in names])]
        if mtls:
            namespace, account = IDENTITIES[name]
            progress(f"{name}: identity {ca.issue(root, namespace, account, workdir / name)}")
            documents = [_with_identity(d, workdir / name) if isinstance(d.spec, SidecarSpec) else d
                         for d in documents]
        configs[name] = plan(documents).sidecar
    return configs


def _with_identity(document: Document, certs: Path) -> Document:
    """The Sidecar document with `certs` set and the plaintext exchange off (Istio's
    exchange runs inside mTLS only)."""
    spec = document.spec
    exchange = spec.exchange.model_copy(update={"plaintext": False})
    return dataclasses.replace(document, spec=spec.model_copy(update={"certs": str(certs), "exchange": exchange}))


def _choose_ports(options: Options, progress: Callable[[str], None]) -> dict[str, int]:
    try:
        ports = demo_ports.choose(options.port_base, options.prometheus, progress)
    except demo_ports.PortInUse as exc:
        raise DemoError(str(exc)) from None
    source = "ports" if options.port_base is None else f"ports from --port-base {options.port_base}"
    progress(f"{source}: {demo_ports.describe(ports)}")
    return ports


async def run(options: Options, out: TextIO, progress: Callable[[str], None]) -> int:
    if options.pods:
        return await _run_pods(options, out, progress)
    database, why = choose_database(options.database)
    ports = _choose_ports(options, progress)
    with _Signals() as signals, tempfile.TemporaryDirectory(prefix="fastmesh-demo-") as tmp, \
            ExitStack() as processes:
        workdir = Path(tmp)
        progress(f"working directory: {workdir} (removed at the end)")
        if options.mtls:
            progress(f"mutual TLS: {MTLS_RULE} (ISTIO_MUTUAL), a mesh root from `fastmesh ca init`")
        configs = sidecar_configs(options.mtls, workdir, ports, progress)
        async with AsyncExitStack() as sidecars:
            progress(f"database: {database.name} on 127.0.0.1:{ports['database']} ({why})")
            await _blocking(database.start, processes, workdir, ports["database"])
            for name in ("mongodb-v1", "ratings-v2"):
                sidecar = Sidecar(configs[name])
                await sidecar.start()
                sidecars.push_async_callback(sidecar.stop, 0.0)
                listen = ", ".join(str(listener.address) for listener in sidecar.relay.listeners.values())
                progress(f"{name} sidecar: listening on {listen}, metrics on {sidecar.metrics_address}, "
                         f"admin on {sidecar.admin_address}")
            metrics = {name: configs[name].metrics for name, _ in REPORTERS}
            if options.prometheus:
                await _blocking(start_prometheus, processes, workdir, ports["prometheus"], list(metrics.values()))
                progress(f"prometheus: http://127.0.0.1:{ports['prometheus']}, scraping both sidecars every second")
            await _send(database, ports["client"], options.requests, progress)
            progress("waiting for the sidecars to report (tcpReportingDuration 1s)")
            await asyncio.sleep(2.5)
            texts = [await _show_sidecar(name, reporter, metrics[name], MTLS_COLUMNS if options.mtls else None, out)
                     for name, reporter in REPORTERS]
            if options.prometheus:
                await _answer_from_prometheus(ports["prometheus"], texts, out, progress)
            else:
                _answer_from_sidecars(texts, out)
            if options.keep:
                _how_to_look(out, ports, metrics, database, workdir)
                progress(f"{await signals.wait()}: stopping")
            progress("cleaning up: sidecars, database" + (", prometheus" if options.prometheus else ""))
    progress(f"everything the demo started is stopped; {tmp} is removed")
    return 0


async def _run_pods(options: Options, out: TextIO, progress: Callable[[str], None]) -> int:
    """--pods: the mesh of fastmesh.pods (mTLS between the sidecars, a pod without one),
    its traffic, both reporters' series and the task's queries; then everything removed."""
    unsupported = [flag for flag, given in (("--prometheus", options.prometheus), ("--keep", options.keep),
                                            ("--port-base", options.port_base is not None)) if given]
    if unsupported or options.database not in ("auto", "redis"):
        raise DemoError(f"--pods runs Redis in its pods and answers from the sidecars: it does not take "
                        f"{', '.join(unsupported) or '--database ' + options.database}")
    if pods.missing_tools():
        raise DemoError(f"--pods {pods.missing_tools()}")
    mesh = pods.Mesh(progress, reporting="1s")
    with _Signals():
        try:
            await _blocking(mesh.start)
            await _blocking(pods.demo_traffic, mesh, options.requests, progress)
            progress("waiting for the sidecars to report (tcpReportingDuration 1s)")
            await asyncio.sleep(2.5)
            texts = [await _show_sidecar(name, reporter, mesh.metrics_address(name), PODS_COLUMNS, out, mesh.fetch)
                     for name, reporter in pods.REPORTERS]
            _answer_from_sidecars(texts, out)
        except pods.PodsError as exc:
            raise DemoError(str(exc)) from None
        finally:
            progress("cleaning up: uncapture, sidecars, database, namespaces and bridge")
            mesh.stop()
    progress("everything the demo started is stopped and removed")
    return 0


async def _send(database: Database, port: int, requests: int, progress: Callable[[str], None]) -> None:
    """ratings-v2's queries, one connection each, alternating between the two reviews."""
    progress(f"ratings-v2 sends {requests} queries to its database through 127.0.0.1:{port}")
    for i in range(requests):
        review = 1 + i % 2
        rating = await _blocking(database.query, port, review)
        progress(f"  request {i + 1} of {requests}: review {review}, rating {rating}")


async def _show_sidecar(name: str, reporter: str, address: Address | str, columns: tuple[str, ...] | None,
                        out: TextIO, fetch: Callable[[str], str] = metrics_view.fetch) -> str:
    """One sidecar's istio_tcp_* series as a table (the key labels, or `columns`); its
    exposition text."""
    url = f"http://{address}/stats/prometheus"
    text = await _blocking(fetch, url)
    header, rows = metrics_view.tcp_rows(text, all_labels=columns is not None)
    if columns is not None:
        header, rows = _columns(header, rows, columns)
    out.write(f"\n{name}'s sidecar (reporter={reporter}): {url}\n{metrics_view.format_table(header, rows)}")
    return text


def _columns(header: list[str], rows: list[list[str]], keep: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    where = [header.index(name) for name in keep]
    return list(keep), [[row[i] for i in where] for row in rows]


def _answer_from_sidecars(texts: list[str], out: TextIO) -> None:
    """The task's two queries, answered from both sidecars' endpoints (no Prometheus
    here: its answer would add the scrape's instance and job labels)."""
    for query in QUERIES:
        out.write(f"\n{query}  (both sidecars' /stats/prometheus; Prometheus adds instance and job)\n")
        for text in texts:
            for labels, value in metrics_view.samples(text, query):
                out.write(metrics_view.console_line(query, labels, value) + "\n")


def _totals(series: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    """A query's answer summed by reporter."""
    totals: dict[str, float] = {}
    for labels, value in series:
        totals[labels.get("reporter", "")] = totals.get(labels.get("reporter", ""), 0) + value
    return totals


async def _answer_from_prometheus(port: int, texts: list[str], out: TextIO, progress: Callable[[str], None]) -> None:
    """The task's two queries, asked of Prometheus once its scrapes have caught up with
    what the sidecars reported (`texts`)."""
    progress("asking Prometheus the task's queries (it needs a few scrapes)")
    expected = {query: _totals([pair for text in texts for pair in metrics_view.samples(text, query)])
                for query in QUERIES}
    deadline = time.monotonic() + 60
    while True:
        answers = {query: await _blocking(promql.instant_query, f"http://127.0.0.1:{port}", query)
                   for query in QUERIES}
        scraped = {query: _totals([(s["metric"], float(s["value"][1])) for s in answers[query][1]])
                   for query in QUERIES}
        if scraped == expected:
            break
        if time.monotonic() > deadline:
            progress("Prometheus has not scraped the sidecars' last report within 60 s; its answer so far:")
            break
        await asyncio.sleep(1)
    for query in QUERIES:
        out.write(f"\n{query}  (Prometheus http://127.0.0.1:{port})\n")
        out.writelines(line + "\n" for line in promql.console_lines(*answers[query]))


def _how_to_look(out: TextIO, ports: dict[str, int], metrics: dict[str, Address], database: Database,
                 workdir: Path) -> None:
    """With --keep: where everything is, and the task's steps to follow while it runs."""
    if "prometheus" in ports:
        url = f"http://127.0.0.1:{ports['prometheus']}"
        graph = f"{url}/graph?" + urllib.parse.urlencode({"g0.expr": QUERIES[0], "g0.tab": 0})
        out.write(f"\nPrometheus: {url}\n"
                  f"  the task's steps: open {url}/graph, select Graph, enter {QUERIES[0]}, click Execute;\n"
                  f"  then the same with {QUERIES[1]}\n"
                  f"  (or open {graph})\n")
    else:
        out.write("\nThe sidecars' metrics (--prometheus adds a Prometheus server scraping them):\n")
        for name, _ in REPORTERS:
            out.write(f"  {name}: python -m fastmesh metrics --url http://{metrics[name]}/stats/prometheus --watch\n")
    out.write(f"More traffic through ratings-v2's sidecar: {database.example(ports['client'])}\n"
              f"Everything keeps running until Ctrl-C (or SIGTERM), which stops it and removes {workdir}\n")
    out.flush()
