"""A mesh of pods in network namespaces on a bridge (fastmesh.pods): ratings-v2 (a Redis
client) and mongodb (redis-server) each behind `fastmesh capture` and a sidecar as uid 1337
with its own identity, and a plain pod without either. The apps dial each other's addresses
and know nothing of the proxy. Both engines: the sidecars inherit FASTMESH_NO_EXTENSIONS
from the test's environment. Every namespace is checked gone at the end, also when a test
fails."""

from __future__ import annotations

import json
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import EXPECTED_IMPLEMENTATION, IP, ebpf_unavailable, netns_unavailable, random_bytes, sha256, wait_until
from fastmesh import metrics_view, pods
from fastmesh.pods import MONGODB, PLAIN, RATINGS_V2
from fastmesh.routing import PASSTHROUGH_CLUSTER

if netns_unavailable() or pods.missing_tools():
    pytest.skip(netns_unavailable() or pods.missing_tools(), allow_module_level=True)

COUNTERS = {"istio_tcp_connections_opened_total": "opened", "istio_tcp_connections_closed_total": "closed",
            "istio_tcp_received_bytes_total": "received", "istio_tcp_sent_bytes_total": "sent"}
# A series by who reported it, who it came from and which service it went to.
KEY = ("reporter", "source_workload", "destination_service_name")


# `fastmesh capture`'s flags: Istio's defaults (NAT), and fastmesh's capture without NAT.
CAPTURE_MODES = {"redirect": (), "tproxy-ebpf": ("-m", "TPROXY", "--ebpf")}


@pytest.fixture(params=list(CAPTURE_MODES))
def mesh(request):
    flags = CAPTURE_MODES[request.param]
    if "--ebpf" in flags and ebpf_unavailable():
        pytest.skip(ebpf_unavailable())
    made = pods.Mesh(capture_flags=flags)  # the sidecars inherit FASTMESH_NO_EXTENSIONS from this environment
    try:
        with made:
            yield made
    finally:
        assert made.namespaces() == []
        root = subprocess.run([IP, "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "10.80.0." not in root  # nothing of the mesh's ever was in the host's namespace


def series(mesh: pods.Mesh, pod: str) -> dict[tuple[str, ...], dict]:
    """KEY -> the series' labels and its four counters, from the pod's metrics port (scraped
    from the node, as Prometheus would)."""
    found: dict[tuple[str, ...], dict] = {}
    for family in text_string_to_metric_families(mesh.fetch(mesh.metrics_url(pod))):
        for sample in family.samples:
            if sample.name in COUNTERS:
                entry = found.setdefault(tuple(sample.labels[k] for k in KEY), {"labels": sample.labels})
                entry[COUNTERS[sample.name]] = sample.value
    return found


def counts(found: dict[tuple[str, ...], dict]) -> dict[tuple[str, ...], tuple]:
    return {key: tuple(entry.get(name) for name in ("opened", "closed", "received", "sent"))
            for key, entry in found.items()}


def settled(mesh: pods.Mesh, expected: dict[str, dict]) -> dict[str, dict]:
    """Both sidecars' series once their counts are `expected` (pod -> counts()); they are
    reported within a second or so of the last close."""
    found: dict[str, dict] = {}

    def done() -> bool:
        found.update({pod: series(mesh, pod) for pod in expected})
        return all(counts(found[pod]) == want for pod, want in expected.items())

    try:
        wait_until(done)
    except AssertionError:
        assert {pod: counts(found[pod]) for pod in expected} == expected
    return found


def test_both_reporters_agree_with_the_clients_with_principals_permissive_and_passthrough(mesh):
    ratings, plain = mesh.pods[RATINGS_V2.name], mesh.pods[PLAIN.name]
    for name in (RATINGS_V2.name, MONGODB.name):  # the sidecars run the engine this run tests
        stats = mesh.pods[name].call(metrics_view.fetch, "http://127.0.0.1:15000/stats")
        assert json.loads(stats)["implementation"] == EXPECTED_IMPLEMENTATION
    # ratings-v2: three connections to the database's pod address, each storing a blob and reading it back.
    blobs = [random_bytes(700 + 100 * i) for i in range(3)]
    mutual = [pods.redis_session(ratings, MONGODB.address, (b"SET", b"blob:%d" % i, blob), (b"GET", b"blob:%d" % i))
              for i, blob in enumerate(blobs)]
    assert [(s.replies[0], sha256(s.replies[1])) for s in mutual] == [(b"OK", sha256(blob)) for blob in blobs]
    # The plain pod: no sidecar, so plaintext into the database's sidecar (PERMISSIVE).
    plaintext = [pods.redis_session(plain, MONGODB.address, (b"GET", b"rating:%d" % review)) for review in (1, 2)]
    assert [s.replies for s in plaintext] == [[b"5"], [b"4"]]
    # A destination no config knows: the plain pod's echo server, through PassthroughCluster.
    payloads = [random_bytes(300), random_bytes(1500)]
    answers = [pods.echo(ratings, PLAIN.address, p) for p in payloads]
    # On a mismatch, the sizes and the first bytes say whether bytes were lost, added or came from elsewhere.
    assert [sha256(a) for a in answers] == [sha256(p) for p in payloads], [
        (len(a), len(p), a[:48]) for a, p in zip(answers, payloads)]

    sent, received = sum(s.sent for s in mutual), sum(s.received for s in mutual)
    plain_sent, plain_received = sum(s.sent for s in plaintext), sum(s.received for s in plaintext)
    echoed = sum(map(len, payloads))
    found = settled(mesh, {
        RATINGS_V2.name: {("source", "ratings-v2", "mongodb"): (3, 3, sent, received),
                          ("source", "ratings-v2", PASSTHROUGH_CLUSTER): (2, 2, echoed, echoed)},
        MONGODB.name: {("destination", "ratings-v2", "mongodb"): (3, 3, sent, received),
                       ("destination", "unknown", "mongodb"): (2, 2, plain_sent, plain_received)},
    })
    ratings_principal, mongodb_principal = RATINGS_V2.principal, MONGODB.principal
    assert ratings_principal == "spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2"
    assert mongodb_principal == "spiffe://cluster.local/ns/default/sa/default"
    principals = ("source_principal", "destination_principal", "connection_security_policy", "destination_workload",
                  "destination_service")
    labels = {(pod, key): tuple(entry["labels"][name] for name in principals)
              for pod, by_key in found.items() for key, entry in by_key.items()}
    assert labels == {
        (RATINGS_V2.name, ("source", "ratings-v2", "mongodb")):
            (ratings_principal, mongodb_principal, "unknown", "mongodb-v1", pods.DATABASE_SERVICE),
        (RATINGS_V2.name, ("source", "ratings-v2", PASSTHROUGH_CLUSTER)):
            ("unknown", "unknown", "unknown", "unknown", "unknown"),  # plaintext: no principal, as Istio's
        (MONGODB.name, ("destination", "ratings-v2", "mongodb")):
            (ratings_principal, mongodb_principal, "mutual_tls", "mongodb-v1", pods.DATABASE_SERVICE),
        (MONGODB.name, ("destination", "unknown", "mongodb")):
            ("unknown", "unknown", "none", "mongodb-v1", pods.DATABASE_SERVICE),
    }


def test_after_uncapture_traffic_flows_directly_and_iptables_are_as_before(mesh):
    ratings, database = mesh.pods[RATINGS_V2.name], mesh.pods[MONGODB.name]
    assert pods.rating(ratings, MONGODB.address, 1) == "5"  # through both sidecars
    through = {("destination", "ratings-v2", "mongodb"): (1, 1)}
    wait_until(lambda: {k: v[:2] for k, v in counts(series(mesh, MONGODB.name)).items()} == through)

    for pod in (ratings, database):
        captured = pod.iptables_rules()
        assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in captured  # capture was really there
        assert mesh.uncapture(pod.name).startswith("uncaptured IPv4")
        assert pod.iptables_rules() == pod.rules_before_capture
    if mesh.capture_flags:
        assert "fm_connect4" not in subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout

    answers = [pods.rating(ratings, MONGODB.address, review) for review in (1, 2, 1)]
    assert answers == ["5", "4", "5"]
    # A scrape first reads every connection the engine has seen: none of the direct ones.
    after = series(mesh, MONGODB.name)
    assert {k: v[:2] for k, v in counts(after).items()} == through
    assert [sample.value for family in text_string_to_metric_families(mesh.fetch(mesh.metrics_url(MONGODB.name)))
            for sample in family.samples if sample.name == "fastmesh_connections_accepted_total"] == [1]
