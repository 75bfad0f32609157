"""The walkthroughs of Istio's TCP metrics task run as written: the README's (one
bash block) and examples/bookinfo-tcp/'s (its step blocks, in order, as one
script). Each ends with both reporters' series of the task's two queries, as
Prometheus's console lists them; a sidecar that cannot bind its port stops the
walkthrough with the sidecar's own error; nothing is left behind either way. The
walkthroughs use the fixed ports a reader would."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BOOKINFO = ROOT / "examples" / "bookinfo-tcp" / "README.md"
TOOLS = ("redis-server", "redis-cli", "prometheus", "curl")
SIDECAR_PORTS = (15000, 15001, 15006, 15010, 15090, 15091, 9090)
README_PORTS = (*SIDECAR_PORTS, 27017)
BOOKINFO_PORTS = (*SIDECAR_PORTS, 27018)
QUERIES = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total")
REQUESTS = 10  # what both walkthroughs send
SERIES_LINE = re.compile(r"^(istio_tcp_\w+)\{(.*)\} (\S+)$", re.MULTILINE)
LABEL = re.compile(r'(\w+)="([^"]*)"')
RATINGS_V2_PRINCIPAL = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings-v2"
MONGODB_PRINCIPAL = "spiffe://cluster.local/ns/default/sa/default"

# The walkthroughs' own waits add up to at most 160 s (four readiness waits of 10 s, two of 60 s for series).
pytestmark = pytest.mark.timeout(300)
needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason="the walkthroughs need " + ", ".join(t for t in TOOLS if shutil.which(t) is None)
    + " (Debian: apt-get install redis-server redis-tools prometheus curl)",
)


def marked_blocks(path: Path, marker: str) -> list[str]:
    """Every bash block that follows `<!-- marker -->` in a Markdown file, in order."""
    blocks = re.findall(rf"<!-- {marker} -->\s*```bash\n(.*?)```", path.read_text(), re.DOTALL)
    assert blocks, f"{path.name} has no bash block after <!-- {marker} -->"
    return blocks


def readme_walkthrough() -> str:
    (block,) = marked_blocks(README, "readme-walkthrough")
    return block


def bookinfo_walkthrough() -> str:
    return "\n".join(marked_blocks(BOOKINFO, "bookinfo-step"))


@contextlib.contextmanager
def taken(port: int) -> Iterator[None]:
    """127.0.0.1:port listened on by someone else for the duration."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the last run's TIME_WAITs
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        yield


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:port (a TIME_WAIT left by the walkthrough does not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def run_walkthrough(script: str, ports: tuple[int, ...], workspace: Path,
                    held: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Run `script` with bash from the checkout's top directory, as a reader would, its
    `mktemp -d` inside `workspace`; then check it left no process and no file behind."""
    busy = [port for port in ports if port not in held and listening(port)]
    assert not busy, f"ports {busy} are taken by something else; the walkthrough needs them"
    workspace.mkdir()
    env = dict(os.environ, TMPDIR=str(workspace),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    result = subprocess.run(["bash", "-c", script], check=False, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=200)
    assert list(workspace.iterdir()) == [], "the walkthrough left its temporary directory behind"
    left = [port for port in ports if port not in held and listening(port)]
    assert not left, f"the walkthrough left something listening on {left}\n{result.stderr}"
    return result


def answers(stdout: str) -> dict[str, dict[str, tuple[dict[str, str], str]]]:
    """query -> reporter -> (labels, value) of the console lines the walkthrough printed."""
    found: dict[str, dict[str, tuple[dict[str, str], str]]] = {}
    for name, labels, value in SERIES_LINE.findall(stdout):
        series = dict(LABEL.findall(labels))
        reporters = found.setdefault(name, {})
        assert series["reporter"] not in reporters, f"two {series['reporter']} lines for {name}:\n{stdout}"
        reporters[series["reporter"]] = (series, value)
    return found


def assert_both_reporters_answer_both_queries(stdout: str, principals: tuple[str, str], policy: str) -> None:
    found = answers(stdout)
    assert sorted(found) == sorted(QUERIES), stdout
    source_principal, destination_principal = principals
    for query in QUERIES:
        assert sorted(found[query]) == ["destination", "source"], stdout
        for reporter, (labels, value) in found[query].items():
            assert value == str(REQUESTS), f"{query}{{reporter={reporter!r}}} is {value}, not {REQUESTS}"
            assert {k: labels[k] for k in ("source_workload", "destination_workload", "destination_service_name",
                                           "source_principal", "destination_principal", "response_flags")} == {
                "source_workload": "ratings-v2", "destination_workload": "mongodb-v1",
                "destination_service_name": "mongodb", "source_principal": source_principal,
                "destination_principal": destination_principal, "response_flags": "-",
            }, f"{query}, reporter {reporter}"
        # Istio's values: the server's sidecar knows the connection's security, the client's says unknown.
        assert found[query]["destination"][0]["connection_security_policy"] == policy
        assert found[query]["source"][0]["connection_security_policy"] == "unknown"
        assert found[query]["destination"][0]["instance"] == "127.0.0.1:15091"
        assert found[query]["source"][0]["instance"] == "127.0.0.1:15090"


@needs_tools
def test_the_readme_walkthrough_answers_the_tasks_two_queries_for_both_reporters_over_mtls(tmp_path):
    result = run_walkthrough(readme_walkthrough(), README_PORTS, tmp_path / "tmp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stderr
    assert_both_reporters_answer_both_queries(result.stdout, (RATINGS_V2_PRINCIPAL, MONGODB_PRINCIPAL), "mutual_tls")
    # The console lists a query's series in label order: "mutual_tls" before "unknown".
    lines = [line for line in result.stdout.splitlines() if line.startswith(QUERIES[0])]
    assert [dict(LABEL.findall(line))["reporter"] for line in lines] == ["destination", "source"]


@needs_tools
def test_the_readme_walkthrough_stops_with_the_sidecars_own_error_when_its_port_is_taken(tmp_path):
    with taken(15091):  # the database sidecar's metrics port
        result = run_walkthrough(readme_walkthrough(), README_PORTS, tmp_path / "tmp", held=(15091,))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: mongodb-v1 exited" in result.stderr
    assert "cannot serve on 127.0.0.1:15091" in result.stderr and "address already in use" in result.stderr
    assert "ratings-v2: ready" not in result.stdout  # it stopped at the first failure
    assert not SERIES_LINE.search(result.stdout)


@needs_tools
def test_the_bookinfo_walkthrough_runs_step_by_step_and_answers_the_tasks_two_queries(tmp_path):
    result = run_walkthrough(bookinfo_walkthrough(), BOOKINFO_PORTS, tmp_path / "tmp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("query ")] == [
        f"query {i}: rating 5" for i in range(1, REQUESTS + 1)]
    assert "outbound|27017|v1|mongodb.default.svc.cluster.local" in result.stdout  # check's route
    assert_both_reporters_answer_both_queries(result.stdout, ("unknown", "unknown"), "none")


@needs_tools
def test_the_bookinfo_walkthrough_stops_with_the_sidecars_own_error_when_its_port_is_taken(tmp_path):
    with taken(15000):  # ratings-v2's sidecar's admin port
        result = run_walkthrough(bookinfo_walkthrough(), BOOKINFO_PORTS, tmp_path / "tmp", held=(15000,))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: ratings-v2 exited" in result.stderr
    assert "127.0.0.1:15000" in result.stderr and "address already in use" in result.stderr
    assert "query 1" not in result.stdout


@pytest.mark.parametrize("script", [readme_walkthrough, bookinfo_walkthrough], ids=["readme", "bookinfo"])
def test_the_walkthroughs_are_valid_bash_and_install_nothing(script):
    text = script()
    assert "apt-get" not in text and "pip install" not in text
    result = subprocess.run(["bash", "-n", "-c", text], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
