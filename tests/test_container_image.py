"""deploy/Dockerfile and .dockerignore, checked without Docker: a build stage with
the compiler makes the wheels, a final stage installs them and has no compiler, runs
as Istio's proxy user and exposes the sidecar's ports; the build context keeps out
.git, build output and caches, and keeps everything the wheel is built from."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths  # the Docker SDK's reading of .dockerignore

from fastmesh.addr import parse_address
from fastmesh.defaults import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = ("gcc", "g++", "build-essential", "libc6-dev", "cython")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, `\\` continuations joined."""
    found, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    return found


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            found.append([])
        found[-1].append(instruction)
    return found


def run_commands(stage: list[tuple[str, str]]) -> str:
    return " ".join(arguments for keyword, arguments in stage if keyword == "RUN")


def test_the_wheel_is_built_in_a_stage_of_its_own_and_the_final_image_has_no_compiler():
    *builders, final = stages()
    (builder,) = builders
    base, _, name = builder[0][1].partition(" AS ")
    assert name  # named, for the final stage's COPY --from
    assert final[0][1] == base  # the wheel's Python ABI is the final image's
    built = shlex.split(run_commands(builder))
    assert "gcc" in built
    wheel_dir = built[built.index("--wheel-dir") + 1]

    installed = shlex.split(run_commands(final))
    assert not [word for word in COMPILERS if word in installed]
    # Of Debian's packages, only iptables, for the init container's `fastmesh capture`.
    first = installed.index("--no-install-recommends") + 1
    packages = installed[first:installed.index("&&", first)]
    assert packages == ["iptables"]
    copies = [arguments for keyword, arguments in final if keyword == "COPY"]
    assert copies == [f"--from={name} {wheel_dir} {wheel_dir}"]
    pip = installed.index("pip")
    install = installed[pip:installed.index("&&", pip)]
    assert install[:3] == ["pip", "install", "--no-cache-dir"]
    assert {"--no-index", "fastmesh"} <= set(install)  # the built wheels only, not the network
    assert install[install.index("--find-links") + 1] == wheel_dir


def test_the_final_image_runs_as_istios_proxy_user_and_exposes_the_sidecars_ports():
    final = stages()[-1]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users == ["1337"]
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    (exposed,) = [arguments.split() for keyword, arguments in final if keyword == "EXPOSE"]
    admin, metrics = parse_address(DEFAULTS.admin).port, parse_address(DEFAULTS.metrics).port
    # outbound, inbound and health as the Kubernetes manifests (and Istio) use them
    assert sorted(map(int, exposed)) == sorted({15001, 15006, admin, metrics, 15021})
    entrypoint = dict(final)["ENTRYPOINT"]
    assert entrypoint == '["python", "-m", "fastmesh"]'


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A checkout as the build sees it: the tracked files, what a build and the tests
    leave behind, and the real .dockerignore."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    left_behind = [".git/HEAD", ".git/objects/ab/cdef", "build/lib.linux-x86_64-cpython-311/fastmesh/_core.so",
                   "src/fastmesh/_core.cpython-311-x86_64-linux-gnu.so", "src/fastmesh/__pycache__/cli.cpython-311.pyc",
                   "tests/__pycache__/conftest.cpython-311.pyc", "src/fastmesh.egg-info/PKG-INFO",
                   "bench/results/2025-01-01-abcdef.json", ".pytest_cache/v/cache/nodeids", ".hypothesis/examples/x"]
    for name in [*tracked.stdout.split(), *left_behind]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (tmp_path / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    return tmp_path


def sent(context: Path) -> set[str]:
    lines = (context / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return {path for path in exclude_paths(str(context), patterns) if (context / path).is_file()}


def test_the_build_context_leaves_out_git_build_output_and_caches(context):
    files = sent(context)
    for kept_out in (".git/", "build/", ".pytest_cache/", ".hypothesis/", "bench/results/", "src/fastmesh.egg-info/"):
        assert not [f for f in files if f.startswith(kept_out)], kept_out
    assert not [f for f in files if f.endswith((".so", ".pyc")) or "__pycache__" in f]


def test_the_build_context_keeps_what_the_wheel_is_built_from(context):
    files = sent(context)
    tracked_source = subprocess.run(["git", "ls-files", "src"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert tracked_source and set(tracked_source) <= files
    assert {"pyproject.toml", "setup.py", "README.md"} <= files  # README.md: pyproject's readme
