"""The CPU and memory limits a tier runs under, read from its cgroup (v1 or v2), not the host.

A container limited to 1.5 CPUs on a 16-core host must run onnxruntime with 1 intra-op thread, not 16:
threads beyond the quota only get throttled. ``read_cpu_throttling`` reads the CFS counters (``cpu.stat``)
that say how often the quota ran out. Parsers are pure functions of file text; ``read_limits``
walks the process's cgroup and its ancestors (the tightest limit wins) under a root that tests replace
with a fake tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

from services.contracts.device import CpuThrottlingSpec
from services.contracts.repository import MIB

# cgroup v1 reports "no memory limit" as a page-rounded LONG_MAX; anything this large means unlimited
_V1_UNLIMITED_MEMORY_BYTES = 1 << 62
_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    version: Literal["v1", "v2", "none"]
    cpu_quota_cores: float | None  # None: no CFS quota
    cpuset_cpu_count: int | None  # None: cpuset not readable
    memory_limit_bytes: int | None  # None: unlimited

    def cpu_cores(self, host_cpu_count: int) -> float:
        """The cores this process may use: quota, cpuset and host count, the smallest."""
        candidates = [float(host_cpu_count)]
        if self.cpu_quota_cores is not None:
            candidates.append(self.cpu_quota_cores)
        if self.cpuset_cpu_count is not None:
            candidates.append(float(self.cpuset_cpu_count))
        return min(candidates)

    def intra_op_threads(self, host_cpu_count: int) -> int:
        """onnxruntime intra-op threads: whole cores available, at least one (like Go's automaxprocs)."""
        return max(1, math.floor(self.cpu_cores(host_cpu_count)))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("max 100000" or "150000 100000") → cores, None when unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` → cores, None when the quota is -1."""
    quota = int(quota_text.strip())
    if quota <= 0:
        return None
    return quota / int(period_text.strip())


def parse_memory_limit(text: str) -> int | None:
    """``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) → bytes, None when unlimited."""
    value = text.strip()
    if value == "max":
        return None
    limit = int(value)
    return None if limit >= _V1_UNLIMITED_MEMORY_BYTES else limit


def parse_cpu_list(text: str) -> int:
    """A cpuset list ("0-3,6,8-9") → how many CPUs it names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` → {controller: path}; the v2 unified entry is keyed ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _candidates(base: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup folder and its ancestors (that exist), innermost first, plus ``base``."""
    folders: list[Path] = []
    relative = PurePosixPath(cgroup_path)
    for ancestor in [relative, *relative.parents]:
        folder = base / str(ancestor).lstrip("/")
        if folder.is_dir() and folder not in folders:
            folders.append(folder)
    if base.is_dir() and base not in folders:
        folders.append(base)
    return folders


def _read(folder: Path, name: str) -> str | None:
    try:
        return (folder / name).read_text()
    except OSError:
        return None


def _tightest(values: list[_N | None]) -> _N | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def read_limits(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupLimits:
    """Read this process's CPU quota, cpuset and memory limit, whichever cgroup version is mounted."""
    try:
        paths = parse_proc_cgroup(proc_cgroup.read_text())
    except OSError:
        paths = {}
    if (root / "cpu").is_dir() or (root / "cpu,cpuacct").is_dir():
        return _read_v1(root, paths)
    if (root / "cgroup.controllers").is_file():
        return _read_v2(root, paths.get("", "/"))
    return CgroupLimits("none", None, None, None)


def _read_v1(root: Path, paths: dict[str, str]) -> CgroupLimits:
    cpu_base = root / "cpu" if (root / "cpu").is_dir() else root / "cpu,cpuacct"
    quotas: list[float | None] = []
    for folder in _candidates(cpu_base, paths.get("cpu", "/")):
        quota, period = _read(folder, "cpu.cfs_quota_us"), _read(folder, "cpu.cfs_period_us")
        if quota is not None and period is not None:
            quotas.append(parse_cfs(quota, period))
    memories = [
        parse_memory_limit(text)
        for folder in _candidates(root / "memory", paths.get("memory", "/"))
        if (text := _read(folder, "memory.limit_in_bytes")) is not None
    ]
    cpuset_folders = _candidates(root / "cpuset", paths.get("cpuset", "/"))
    cpuset = next(
        (t for f in cpuset_folders if (t := _read(f, "cpuset.effective_cpus") or _read(f, "cpuset.cpus"))),
        None,
    )
    return CgroupLimits(
        "v1",
        _tightest(quotas),
        parse_cpu_list(cpuset) if cpuset and cpuset.strip() else None,
        _tightest(memories),
    )


def _read_v2(root: Path, path: str) -> CgroupLimits:
    folders = _candidates(root, path)
    quotas = [parse_cpu_max(t) for f in folders if (t := _read(f, "cpu.max")) is not None]
    memories = [parse_memory_limit(t) for f in folders if (t := _read(f, "memory.max")) is not None]
    cpuset = next((t for f in folders if (t := _read(f, "cpuset.cpus.effective"))), None)
    return CgroupLimits(
        "v2",
        _tightest(quotas),
        parse_cpu_list(cpuset) if cpuset and cpuset.strip() else None,
        _tightest(memories),
    )


def parse_cpu_model(cpuinfo: str) -> str | None:
    """The CPU's name from ``/proc/cpuinfo``: ``model name`` on x86, ``Model``/``Hardware`` on ARM boards, else
    the first ``CPU part`` (ARM cores name no model of their own)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "CPU part"):
        if key in fields:
            return fields[key]
    return None


def host_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str | int | None]:
    """The machine the tier runs on, as a run bundle names it: the node's hostname (a Swarm task is told it
    in ``TIERLAB_NODE_HOSTNAME``; a container's own hostname is its id), CPU model, kernel and architecture
    (a container shares both with its host)."""
    try:
        model = parse_cpu_model(cpuinfo.read_text(errors="replace"))
    except OSError:
        model = None
    uname = os.uname()
    return {
        "hostname": os.environ.get("TIERLAB_NODE_HOSTNAME") or uname.nodename,
        "node_id": os.environ.get("TIERLAB_NODE_ID"),
        "cpu_model": model,
        "cpus": host_cpu_count(),
        "kernel": uname.release,
        "arch": uname.machine,
    }


def host_cpu_count() -> int:
    return os.cpu_count() or 1


def parse_cpu_stat(text: str) -> CpuThrottlingSpec:
    """``cpu.stat`` (v1: ``throttled_time`` ns; v2: ``throttled_usec``) → the CFS throttling counters."""
    fields = dict(line.split(maxsplit=1) for line in text.splitlines() if len(line.split()) == 2)
    throttled_s = (
        int(fields["throttled_time"]) / 1e9
        if "throttled_time" in fields
        else int(fields.get("throttled_usec", 0)) / 1e6
    )
    return CpuThrottlingSpec(
        periods=int(fields.get("nr_periods", 0)),
        throttled_periods=int(fields.get("nr_throttled", 0)),
        throttled_s=round(throttled_s, 6),
    )


def read_cpu_throttling(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CpuThrottlingSpec | None:
    """This process's cgroup CFS statistics (the innermost ``cpu.stat``), None where none is readable."""
    try:
        paths = parse_proc_cgroup(proc_cgroup.read_text())
    except OSError:
        paths = {}
    if (root / "cpu").is_dir() or (root / "cpu,cpuacct").is_dir():
        base, path = (root / "cpu" if (root / "cpu").is_dir() else root / "cpu,cpuacct"), paths.get("cpu", "/")
    else:
        base, path = root, paths.get("", "/")
    for folder in _candidates(base, path):
        text = _read(folder, "cpu.stat")
        if text is not None and "nr_periods" in text:
            return parse_cpu_stat(text)
    return None


def parse_memory_stat(text: str, key: str) -> int:
    """One counter of ``memory.stat`` (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def read_memory_in_use(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The cgroup's working set: usage less the inactive page cache the kernel reclaims before it OOM-kills
    (what ``docker stats`` shows); None where no memory controller is readable."""
    try:
        paths = parse_proc_cgroup(proc_cgroup.read_text())
    except OSError:
        paths = {}
    if (root / "memory").is_dir():
        folders, usage_file, inactive_key = (
            _candidates(root / "memory", paths.get("memory", "/")),
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    else:
        folders, usage_file, inactive_key = _candidates(root, paths.get("", "/")), "memory.current", "inactive_file"
    for folder in folders:
        usage = _read(folder, usage_file)
        if usage is not None and usage.strip().isdigit():
            inactive = parse_memory_stat(_read(folder, "memory.stat") or "", inactive_key)
            return max(0, int(usage) - inactive)
    return None


def _proc_status_bytes(key: str, status: Path = Path("/proc/self/status")) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # kB
    return 0


def process_rss_bytes() -> int:
    """This process's resident set now."""
    return _proc_status_bytes("VmRSS")


def process_peak_rss_bytes() -> int:
    """This process's peak resident set since the last ``reset_peak_rss``."""
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Start a new peak (writing 5 to ``/proc/self/clear_refs``); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def host_memory_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's ``MemAvailable`` (a process with no memory limit competes for this)."""
    return _proc_status_bytes("MemAvailable", meminfo)


@dataclass(frozen=True)
class MemoryBudget:
    """What a tier may hold in memory: an explicit budget (``TIERLAB_MEMORY_BUDGET_MB``; for tiers
    without a cgroup limit, e.g. ``make up RUNTIME=local``), else the cgroup's limit, else the host."""

    budget_bytes: int | None = None
    # the cgroup's limit now: read at every check, since a runtime may change it while the tier runs
    read_limit_bytes: Callable[[], int | None] = lambda: None

    def free_mib(self) -> tuple[float, str]:
        """MiB free now, and what they are free of (for messages)."""
        if self.budget_bytes is not None:
            return (
                self.budget_bytes - process_rss_bytes()
            ) / MIB, f"the tier's budget of {self.budget_bytes / MIB:.0f} MiB"
        limit_bytes = self.read_limit_bytes()
        if limit_bytes is not None:
            in_use = read_memory_in_use()
            used = in_use if in_use is not None else process_rss_bytes()
            return (limit_bytes - used) / MIB, f"the tier's limit of {limit_bytes / MIB:.0f} MiB"
        return host_memory_available_bytes() / MIB, "the host's available memory"


def release_memory() -> None:
    """Give freed session memory back to the OS (glibc keeps freed heap otherwise), so RSS falls on unload."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
