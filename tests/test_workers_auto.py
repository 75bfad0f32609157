"""`--workers auto` and `workers: auto`: the CPUs this process may use (its affinity mask
capped by its cgroups' CPU quota, rounded up), from fake cgroup trees, under taskset, on
the command line, in a Sidecar document and in a running `serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXPECTED_IMPLEMENTATION, free_port
from fastmesh import cpus
from fastmesh.cli import build_parser
from fastmesh.config import ConfigError, load_documents, plan
from fastmesh.cpus import CpuCount, Quota
from test_cli import serve  # noqa: F401 (the fixture)
from test_config import sidecar_file

# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("affinity, quota_us, period_us, expected", [
    (2, 50_000, 100_000, 1),  # a pod's limits.cpu: 500m
    (4, 250_000, 100_000, 3),  # 2.5 CPUs, rounded up
    (2, 250_000, 100_000, 2),  # the affinity mask is the tighter
    (8, 100_000, 100_000, 1),
    (8, 100_001, 100_000, 2),  # a hair over one CPU is a second worker
    (4, 1_000, 100_000, 1),  # at least one
    (4, 400_000, 200_000, 2),  # another period
])
def test_the_quota_caps_the_affinity_mask_rounded_up(affinity, quota_us, period_us, expected):
    assert cpus.count(affinity, Quota(quota_us, period_us, Path("/cg/cpu.max"))).count == expected


def test_the_reason_says_how_the_count_was_reached():
    assert str(cpus.count(2, None)) == "2 (2 CPUs in the affinity mask, no CPU quota)"
    assert cpus.count(1, None) == CpuCount(1, "1 CPU in the affinity mask, no CPU quota")
    assert cpus.count(4, Quota(250_000, 100_000, Path("/cg/cpu.max"))) == CpuCount(
        3, "4 CPUs in the affinity mask, a CPU quota of 2.5 CPUs in /cg/cpu.max, rounded up to 3")
    assert cpus.count(96, None) == CpuCount(64, "96 CPUs in the affinity mask, no CPU quota, at most 64")


# ---------------------------------------------------------------- fake /proc/self and cgroup trees


def fake_proc(tmp_path: Path, cgroup: str, *mounts: tuple[str, str, str, Path]) -> Path:
    """A /proc/self stand-in: its `cgroup` file, and mountinfo listing `mounts`, each
    (filesystem type, super options, root in the hierarchy, mount point)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + n} 23 0:{30 + n} {root} {str(point).replace(' ', chr(92) + '040')} rw,relatime - "
             f"{fstype} {fstype} {options}\n" for n, (fstype, options, root, point) in enumerate(mounts)]
    (proc / "mountinfo").write_text("22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n" + "".join(lines))
    return proc


def limit(directory: Path, **files: str) -> Path:
    """Cgroup files in `directory` (cpu_max: cpu.max, cpu_cfs_quota_us: cpu.cfs_quota_us, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")
    return directory


def test_a_v2_pod_limited_to_500m_gets_one_worker(tmp_path):
    unified = tmp_path / "unified"
    limit(unified / "kubepods" / "pod1", cpu_max="max 100000")
    app = limit(unified / "kubepods" / "pod1" / "app", cpu_max="50000 100000")
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/app\n", ("cgroup2", "rw", "/", unified))
    assert cpus.measure(proc, affinity={0, 1}) == CpuCount(
        1, f"2 CPUs in the affinity mask, a CPU quota of 0.5 CPUs in {app / 'cpu.max'}, rounded up to 1")


def test_a_hybrid_host_reads_the_v1_cpu_controller(tmp_path):
    # As this machine: v1 controllers under /sys/fs/cgroup/<name>, v2 at /sys/fs/cgroup/unified.
    limit(tmp_path / "unified" / "pod", cpu_max="max 100000")
    pod = limit(tmp_path / "cpu,cpuacct" / "pod", cpu_cfs_quota_us="250000", cpu_cfs_period_us="100000")
    proc = fake_proc(tmp_path, "4:memory:/pod\n2:cpu,cpuacct:/pod\n0::/pod\n",
                     ("cgroup", "rw,memory", "/", tmp_path / "memory"),
                     ("cgroup", "rw,cpu,cpuacct", "/", tmp_path / "cpu,cpuacct"),
                     ("cgroup2", "rw", "/", tmp_path / "unified"))
    assert cpus.measure(proc, affinity=set(range(4))) == CpuCount(
        3, f"4 CPUs in the affinity mask, a CPU quota of 2.5 CPUs in {pod / 'cpu.cfs_quota_us'}, rounded up to 3")


def test_an_ancestors_quota_and_the_tighter_of_v1_and_v2_count(tmp_path):
    pod = limit(tmp_path / "v2" / "pod", cpu_max="150000 100000")
    limit(tmp_path / "v2" / "pod" / "app", cpu_max="max 100000")
    limit(tmp_path / "cpu" / "pod" / "app", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    proc = fake_proc(tmp_path, "1:cpu:/pod/app\n0::/pod/app\n",
                     ("cgroup", "rw,cpu", "/", tmp_path / "cpu"), ("cgroup2", "rw", "/", tmp_path / "v2"))
    assert cpus.cpu_quota(proc) == Quota(150_000, 100_000, pod / "cpu.max")
    assert cpus.measure(proc, affinity=set(range(8))).count == 2


def test_no_quota_when_v1_says_minus_one_or_nothing_is_readable(tmp_path):
    limit(tmp_path / "cpu" / "pod", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    proc = fake_proc(tmp_path, "1:cpu:/pod\n", ("cgroup", "rw,cpu", "/", tmp_path / "cpu"))
    assert cpus.cpu_quota(proc) is None
    assert cpus.measure(tmp_path / "nowhere", affinity={3}) == CpuCount(1, "1 CPU in the affinity mask, no CPU quota")


def test_a_container_without_a_cgroup_namespace_reads_its_mount_point(tmp_path):
    # mountinfo's root is the container's own cgroup, which /proc/self/cgroup names in full.
    mounted = limit(tmp_path / "sys fs cgroup", cpu_max="200000 100000")
    proc = fake_proc(tmp_path, "0::/docker/abc\n", ("cgroup2", "rw", "/docker/abc", mounted))
    assert cpus.cpu_quota(proc) == Quota(200_000, 100_000, mounted / "cpu.max")


def test_taskset_limits_what_check_reports(tmp_path):
    path = sidecar_file(tmp_path, f"inbound: [{{port: {free_port()}, targetPort: 1}}]\nmetrics: null\n"
                                  "admin: null\nworkers: auto\n")
    one = min(os.sched_getaffinity(0))
    checked = subprocess.run(["taskset", "-c", str(one), sys.executable, "-m", "fastmesh", "check", "-c", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert (checked.returncode, checked.stderr) == (0, "")
    expected = cpus.count(1, cpus.cpu_quota())  # this machine's quota, if any, and one CPU
    assert f"workers: 1 (auto: {expected.reason})" in checked.stdout.splitlines()
    assert expected.reason.startswith("1 CPU in the affinity mask, ")


# ---------------------------------------------------------------- the command line and the Sidecar kind

SERVE = ["serve", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2"]


@pytest.mark.parametrize("given, parsed", [([], 1), (["--workers", "3"], 3), (["--workers", "auto"], "auto")])
def test_serve_takes_a_number_or_auto(given, parsed):
    assert build_parser().parse_args(SERVE + given).workers == parsed


@pytest.mark.parametrize("given", ["0", "abc", "-1"])
def test_serve_refuses_other_workers_with_todays_message(given, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(SERVE + ["--workers", given])
    assert exited.value.code == 2
    assert f"argument --workers: {given!r} is not a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("line, workers, measured", [
    ("", 1, None),
    ("workers: 3\n", 3, None),
    ("workers: auto\n", cpus.measure().count, cpus.measure().reason),
])
def test_the_sidecar_kind_takes_a_number_or_auto(tmp_path, line, workers, measured):
    path = sidecar_file(tmp_path, f"inbound: [{{port: 1, targetPort: 2}}]\nmetrics: null\nadmin: null\n{line}")
    config = plan(load_documents([path])).sidecar
    assert (config.workers, config.workers_auto) == (workers, measured)


@pytest.mark.parametrize("value, message", [
    ("many", "expected a whole number from 1 to 64, or auto (as many as this process has CPUs), got 'many'"),
    ("0", "Input should be greater than or equal to 1, got 0"),
    ("65", "Input should be less than or equal to 64, got 65"),
])
def test_other_workers_in_yaml_are_a_config_error_naming_the_field(tmp_path, value, message):
    path = sidecar_file(tmp_path, f"inbound: [{{port: 1, targetPort: 2}}]\nworkers: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_documents([path])
    assert str(caught.value) == f"{path}: document 0 (Sidecar app): spec.workers: {message}"


# ---------------------------------------------------------------- a running serve


@pytest.mark.parametrize("affinity", ["all", "one"])
def test_serve_workers_auto_runs_the_measured_count(serve, upstream, affinity):  # noqa: F811
    allowed = os.sched_getaffinity(0)
    mask = allowed if affinity == "all" else {min(allowed)}
    expected = cpus.count(len(mask), cpus.cpu_quota())
    os.sched_setaffinity(0, mask)  # inherited by serve, as taskset would set it
    try:
        proxy = serve(upstream(lambda conn: None).address, "--workers", "auto")
    finally:
        os.sched_setaffinity(0, allowed)
    status, body = proxy.get("/config_dump")
    assert status == 200
    engine = json.loads(body)["engine"]
    assert (engine["implementation"], engine["workers"], engine["workers_auto"]) == (
        EXPECTED_IMPLEMENTATION, expected.count, expected.reason)
    assert proxy.stop() == 0
    assert f"ready: {EXPECTED_IMPLEMENTATION} engine, {expected.count} worker(s) (auto: {expected.reason})" \
        in proxy.output()
