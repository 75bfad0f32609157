"""How many CPUs this process may actually use, for `workers: auto`: the CPUs of its
affinity mask, capped by its cgroups' CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
`cpu.cfs_period_us`, in its own cgroup and every ancestor), rounded up, at least 1 and at
most MAX_WORKERS. A pod's `resources.limits.cpu: 500m` is such a quota (so 1 worker), and
2.5 CPUs give 3. The cgroup mounts are found in mountinfo, so v1, v2 and hybrid hosts all
work; a file that is missing or unreadable sets no limit."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastmesh.contract import MAX_WORKERS

AUTO = "auto"  # the `workers` setting that measures
PROC_SELF = Path("/proc/self")


@dataclass(frozen=True)
class Quota:
    """A cgroup's CPU bandwidth: quota_us of CPU time every period_us."""

    quota_us: int
    period_us: int
    source: Path  # the file that says so

    @property
    def cpus(self) -> float:
        return self.quota_us / self.period_us


@dataclass(frozen=True)
class CpuCount:
    count: int
    reason: str  # how it was reached, e.g. "2 CPUs in the affinity mask, no CPU quota"

    def __str__(self) -> str:
        return f"{self.count} ({self.reason})"


def measure(proc: Path = PROC_SELF, affinity: set[int] | None = None) -> CpuCount:
    """The CPUs this process may use; `proc` and `affinity` stand in for /proc/self and
    sched_getaffinity(0) in tests."""
    cpus = len(affinity if affinity is not None else os.sched_getaffinity(0))
    return count(cpus, cpu_quota(proc))


def count(cpus: int, quota: Quota | None, limit: int = MAX_WORKERS) -> CpuCount:
    """`cpus` affinity CPUs under `quota`, rounded up, within 1..limit."""
    reason = f"{_cpus(cpus)} in the affinity mask"
    usable = cpus
    if quota is None:
        reason += ", no CPU quota"
    else:
        rounded = -(-quota.quota_us // quota.period_us)
        reason += f", a CPU quota of {_cpus(quota.cpus)} in {quota.source}, rounded up to {rounded}"
        usable = min(usable, rounded)
    if usable > limit:
        reason += f", at most {limit}"
    return CpuCount(max(1, min(usable, limit)), reason)


def _cpus(number: float) -> str:
    return f"{number:g} CPU{'' if number == 1 else 's'}"


def worker_count(setting: int | str) -> tuple[int, str | None]:
    """A `workers` setting as written: a number as it is, or `auto` measured, with how."""
    if setting != AUTO:
        return int(setting), None
    measured = measure()
    return measured.count, measured.reason


def cpu_quota(proc: Path = PROC_SELF) -> Quota | None:
    """The tightest quota over the process's cpu cgroups (v2 and v1) and their ancestors."""
    memberships = _memberships(_read(proc / "cgroup"))
    quotas = []
    for hierarchy, root, mount_point in cgroup_mounts(_read(proc / "mountinfo")):
        path = memberships.get(hierarchy)
        if path is None:
            continue
        read = _v2_quota if hierarchy == "v2" else _v1_quota
        quotas += [q for directory in _ancestry(root, mount_point, path) if (q := read(directory)) is not None]
    return min(quotas, key=lambda quota: quota.cpus, default=None)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _memberships(text: str) -> dict[str, str]:
    """/proc/self/cgroup: the path of the v2 cgroup ("v2") and of the v1 cpu controller's ("cpu")."""
    found = {}
    for line in text.splitlines():
        hierarchy_id, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy_id == "0" and controllers == "":
            found["v2"] = path
        elif "cpu" in controllers.split(","):
            found["cpu"] = path
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)  # mountinfo's \040


def cgroup_mounts(text: str) -> list[tuple[str, str, Path]]:
    """mountinfo's cgroup mounts that hold CPU limits: (hierarchy, "v2" or v1's "cpu"; root in it;
    mount point)."""
    mounts = []
    for line in text.splitlines():
        mount, _, filesystem = line.partition(" - ")
        fields, details = mount.split(), filesystem.split()
        if len(fields) < 5 or len(details) < 3:
            continue
        if details[0] == "cgroup2":
            hierarchy = "v2"
        elif details[0] == "cgroup" and "cpu" in details[2].split(","):
            hierarchy = "cpu"
        else:
            continue
        mounts.append((hierarchy, _unescape(fields[3]), Path(_unescape(fields[4]))))
    return mounts


def _ancestry(root: str, mount_point: Path, path: str) -> list[Path]:
    """The directories of cgroup `path` and its ancestors up to `mount_point`, which shows `root`
    (a path outside that root, as across cgroup namespaces, is read at the mount point)."""
    relative = PurePosixPath(path).relative_to(root) if PurePosixPath(path).is_relative_to(root) else None
    parts = relative.parts if relative is not None else ()
    return [mount_point.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _number(text: str) -> int | None:
    return int(text) if text.strip().lstrip("-").isdigit() else None


def _v2_quota(directory: Path) -> Quota | None:
    source = directory / "cpu.max"
    quota, _, period = _read(source).strip().partition(" ")  # "max 100000" or "50000 100000"
    return _quota(_number(quota), _number(period), source)


def _v1_quota(directory: Path) -> Quota | None:
    source = directory / "cpu.cfs_quota_us"  # -1: none
    return _quota(_number(_read(source)), _number(_read(directory / "cpu.cfs_period_us")), source)


def _quota(quota: int | None, period: int | None, source: Path) -> Quota | None:
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return Quota(quota, period, source)
