"""The soak's checks: every connection's bytes and end against its plan, each reporter's
`istio_tcp_*` totals against what the clients counted, and the sidecars' memory and file
descriptors against their baseline. Each check is a name, PASS or FAIL, and what it found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from soak_traffic import (
    ABORTS,
    EXPECTED_ENDS,
    HEADER,
    ClientRecord,
    Plan,
    ServerRecord,
    Traffic,
)

MiB = 1 << 20
RSS_SLACK = 5 * MiB   # the bar: RSS within 5 MiB of the baseline after the load
FD_SLACK = 10         # and file descriptors within 10
SHOWN = 5             # conn ids named per problem


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class PairTally:
    """What the clients and servers of one pair counted: connections, and bytes each way, exact
    (every byte known at both ends) and, for mid-stream aborts, the bounds the relays' counts
    must fall between (what the far end got, what the near end sent)."""

    connections: int = 0
    up: int = 0
    down: int = 0
    up_bounds: list[int] = field(default_factory=lambda: [0, 0])
    down_bounds: list[int] = field(default_factory=lambda: [0, 0])
    client_resets: int = 0   # connections the client reset (DC's upper bound)
    server_resets: int = 0   # connections the server reset (UC's upper bound)


@dataclass
class Verdicts:
    problems: dict[str, list[str]] = field(default_factory=dict)   # check name -> "id: what"
    kinds: Counter = field(default_factory=Counter)                 # connections by kind
    errors: Counter = field(default_factory=Counter)                # failures by kind
    pairs: dict[int, PairTally] = field(default_factory=lambda: {0: PairTally(), 1: PairTally()})

    def problem(self, check: str, conn_id: int | None, what: str) -> None:
        self.problems.setdefault(check, []).append(f"{conn_id}: {what}")

    def add(self, other: Verdicts) -> None:
        """Another phase's verdicts (the warm-up's and the load's make the run's)."""
        for name, problems in other.problems.items():
            self.problems.setdefault(name, []).extend(problems)
        self.kinds.update(other.kinds)
        self.errors.update(other.errors)
        for pair, tally in other.pairs.items():
            mine = self.pairs[pair]
            for name in ("connections", "up", "down", "client_resets", "server_resets"):
                setattr(mine, name, getattr(mine, name) + getattr(tally, name))
            for bounds in (mine.up_bounds, tally.up_bounds), (mine.down_bounds, tally.down_bounds):
                bounds[0][:] = [x + y for x, y in zip(*bounds)]


COMPLETED, BYTES, ENDS, REACHED = ("connections completed", "bytes exact (sha256 per connection and direction)",
                                   "every connection ended as its client ended it",
                                   "every connection reached the upstream")


def judge(traffic: Traffic, clients: list[ClientRecord], servers: list[ServerRecord]) -> Verdicts:
    """Each connection's client and server records against its plan."""
    found = Verdicts()
    by_id: dict[int, ServerRecord] = {}
    anonymous = []
    for record in servers:
        if record.conn_id is None:
            anonymous.append(record)
        elif record.conn_id in by_id:
            found.problem(REACHED, record.conn_id, "served twice")
        else:
            by_id[record.conn_id] = record
    empties = 0
    for client in clients:
        plan = traffic.plan(client.conn_id)
        found.kinds[plan.kind] += 1
        tally = found.pairs[plan.pair]
        if client.error:
            found.errors["client " + client.error] += 1
            found.problem(COMPLETED, client.conn_id, f"{plan.kind}: client {client.error}")
        if not client.error.startswith("connect-"):
            tally.connections += 1
        if plan.kind == "empty":
            empties += 1
            _judge_empty(found, plan, client)
            continue
        server = by_id.pop(client.conn_id, None)
        if server is None:
            found.errors["server missing"] += 1
            found.problem(REACHED, client.conn_id, f"{plan.kind}: no server saw it")
            continue
        if server.error:
            found.errors["server " + server.error] += 1
            found.problem(COMPLETED, client.conn_id, f"{plan.kind}: server {server.error}")
        if (client.end, server.end) != EXPECTED_ENDS[plan.kind]:
            found.problem(ENDS, client.conn_id, f"{plan.kind}: client saw {client.end or '-'}, server saw "
                          f"{server.end or '-'}, expected {'/'.join(EXPECTED_ENDS[plan.kind])}")
        _judge_bytes(found, plan, client, server)
        tally.client_resets += plan.kind in ("client-reset", "client-abort")
        tally.server_resets += plan.kind in ("server-reset", "server-abort")
    for conn_id in by_id:
        found.problem(REACHED, conn_id, "served, but no client opened it")
    for record in anonymous:
        if record.error:
            found.errors["server " + record.error] += 1
            found.problem(COMPLETED, None, f"a connection without a header: {record.error}")
    clean_empties = sum(1 for record in anonymous if not record.error and record.received == record.sent == 0)
    if clean_empties != empties:
        found.problem(REACHED, None, f"{empties} empty connections opened, {clean_empties} served")
    return found


def _judge_empty(found: Verdicts, plan: Plan, client: ClientRecord) -> None:
    if (client.sent, client.received) != (0, 0) or client.end != EXPECTED_ENDS["empty"][0]:
        found.problem(ENDS, plan.conn_id, f"empty: client sent {client.sent}, got {client.received}, saw "
                      f"{client.end or '-'}")


def _judge_bytes(found: Verdicts, plan: Plan, client: ClientRecord, server: ServerRecord) -> None:
    tally = found.pairs[plan.pair]
    if plan.kind in ABORTS:
        # Mid-stream: what arrived must be a prefix (its sha256 that of the stream's same prefix),
        # and the aborting side must have stopped exactly where its plan says.
        stopped = client.sent == HEADER.size + plan.abort_at if plan.kind == "client-abort" \
            else server.sent == plan.abort_at
        prefixes = (server.received <= client.sent and server.received_digest == server.received_ok
                    and client.received <= server.sent and client.received_digest == client.received_ok)
        if not (stopped and prefixes):
            found.problem(BYTES, plan.conn_id, f"{plan.kind}: up {client.sent} sent / {server.received} received, "
                          f"down {server.sent} sent / {client.received} received, prefixes "
                          f"{'match' if prefixes else 'differ'}, abort at {plan.abort_at}")
        tally.up_bounds[0] += server.received
        tally.up_bounds[1] += client.sent
        tally.down_bounds[0] += client.received
        tally.down_bounds[1] += server.sent
        return
    up, down = HEADER.size + plan.up, plan.down
    if not (client.sent == server.received == up and client.sent_digest == server.received_digest):
        found.problem(BYTES, plan.conn_id, f"{plan.kind}: up planned {up}, sent {client.sent}, received "
                      f"{server.received}, sha256 {'equal' if client.sent_digest == server.received_digest else 'differ'}")
    if not (server.sent == client.received == down and server.sent_digest == client.received_digest):
        found.problem(BYTES, plan.conn_id, f"{plan.kind}: down planned {down}, sent {server.sent}, received "
                      f"{client.received}, sha256 {'equal' if server.sent_digest == client.received_digest else 'differ'}")
    tally.up += client.sent
    tally.down += client.received


def connection_checks(found: Verdicts, clients: int) -> list[Check]:
    out = []
    for name in (COMPLETED, REACHED, ENDS, BYTES):
        problems = found.problems.get(name, [])
        detail = f"{clients:,} connections" if not problems else \
            f"{len(problems)} problems: " + "; ".join(problems[:SHOWN]) + (" ..." if len(problems) > SHOWN else "")
        out.append(Check(name, not problems, detail))
    return out


# ------------------------------------------------------------------ the reporters

TCP_METRICS = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
               "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")
ALLOWED_FLAGS = {"-", "DC", "UC"}


def reporter_totals(samples: list) -> dict:
    """{metric: total, (metric, response_flags): total, 'reporters': {...}} from scraped samples."""
    totals: dict = {"reporters": set()}
    for sample in samples:
        name = sample.name if sample.name.endswith("_total") else sample.name + "_total"
        if name not in TCP_METRICS:
            continue
        totals[name] = totals.get(name, 0) + int(sample.value)
        key = (name, sample.labels.get("response_flags", ""))
        totals[key] = totals.get(key, 0) + int(sample.value)
        totals["reporters"].add(sample.labels.get("reporter", ""))
    return totals


def metric_checks(pair_name: str, tally: PairTally, outbound: dict, inbound: dict) -> list[Check]:
    """Both reporters' totals against the clients' counts: connections exact; bytes exact, plus
    within the aborts' bounds when there were any (then also ordered along the path)."""
    out = []
    for side, totals, reporter in (("outbound", outbound, "source"), ("inbound", inbound, "destination")):
        got = {name: totals.get(name, 0) for name in TCP_METRICS}
        wrong = []
        for name in TCP_METRICS[:2]:
            if got[name] != tally.connections:
                wrong.append(f"{name} {got[name]:,}, clients opened {tally.connections:,}")
        for name, exact, (low, high) in (("istio_tcp_received_bytes_total", tally.up, tally.up_bounds),
                                         ("istio_tcp_sent_bytes_total", tally.down, tally.down_bounds)):
            if not exact + low <= got[name] <= exact + high:
                wrong.append(f"{name} {got[name]:,}, clients counted {exact:,}"
                             + (f" + [{low:,}, {high:,}] aborted" if high else ""))
        flags = {flag for metric, flag in (k for k in totals if isinstance(k, tuple))}
        if flags - ALLOWED_FLAGS:
            wrong.append(f"response_flags {sorted(flags - ALLOWED_FLAGS)}")
        for flag, bound, who in (("DC", tally.client_resets, "client"), ("UC", tally.server_resets, "server")):
            count = totals.get(("istio_tcp_connections_opened_total", flag), 0)
            if count > bound:
                wrong.append(f"{count} connections flagged {flag}, only {bound} {who} resets")
        if totals["reporters"] - {reporter}:
            wrong.append(f"reporter {sorted(totals['reporters'])}")
        detail = "; ".join(wrong) if wrong else ", ".join(f"{name.removeprefix('istio_tcp_')} {got[name]:,}"
                                                          for name in TCP_METRICS)
        out.append(Check(f"{pair_name} {side} reporter's totals", not wrong, detail))
    if tally.up_bounds[1] or tally.down_bounds[1]:   # bytes the outbound relay read cannot outnumber...
        up_ok = outbound.get(TCP_METRICS[2], 0) >= inbound.get(TCP_METRICS[2], 0)
        down_ok = inbound.get(TCP_METRICS[3], 0) >= outbound.get(TCP_METRICS[3], 0)
        out.append(Check(f"{pair_name} reporters agree along the path", up_ok and down_ok,
                         "received: outbound >= inbound, sent: inbound >= outbound" if up_ok and down_ok else
                         f"received {outbound.get(TCP_METRICS[2], 0):,} / {inbound.get(TCP_METRICS[2], 0):,}, "
                         f"sent {outbound.get(TCP_METRICS[3], 0):,} / {inbound.get(TCP_METRICS[3], 0):,}"))
    return out


# ------------------------------------------------------------------ memory and descriptors

def resource_check(name: str, baseline: dict, after: dict) -> Check:
    """RSS within RSS_SLACK and open fds within FD_SLACK of the baseline (growth; less is fine)."""
    rss = after["rss_kib"] * 1024 - baseline["rss_kib"] * 1024
    fds = after["fds"] - baseline["fds"]
    ok = rss <= RSS_SLACK and fds <= FD_SLACK
    pooled = [found.get("engine", {}).get("pipes_pooled") for found in (baseline, after)]
    # Each pipe the engine keeps for reuse is two fds: say how many of the fds those are.
    why = f"; pipes pooled {pooled[0]} -> {pooled[1]}" if None not in pooled else ""
    return Check(f"{name} back to baseline", ok,
                 f"RSS {baseline['rss_kib'] / 1024:.1f} -> {after['rss_kib'] / 1024:.1f} MiB ({rss / MiB:+.1f}, bar "
                 f"+{RSS_SLACK / MiB:.0f}), fds {baseline['fds']} -> {after['fds']} ({fds:+d}, bar +{FD_SLACK}){why}")
