"""cgroup limit parsing (v1 and v2) and the onnxruntime thread count that follows from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tier.limits import (
    CgroupLimits,
    MemoryBudget,
    parse_cfs,
    parse_cpu_list,
    parse_cpu_max,
    parse_memory_limit,
    parse_memory_stat,
    parse_proc_cgroup,
    process_peak_rss_bytes,
    process_rss_bytes,
    read_limits,
    read_memory_in_use,
)


def test_parsers() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("50000", "100000") == 0.5
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit("9223372036854771712\n") is None  # v1's "unlimited"
    assert parse_memory_limit("536870912\n") == 512 << 20
    assert parse_cpu_list("0-3,6,8-9\n") == 7
    assert parse_cpu_list("1") == 1
    assert parse_proc_cgroup("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/x\n") == {
        "memory": "/docker/abc",
        "cpu": "/docker/abc",
        "cpuacct": "/docker/abc",
        "": "/x",
    }


@pytest.mark.parametrize(
    ("quota", "cpuset", "host", "threads", "cores"),
    [
        (None, None, 16, 16, 16.0),
        (1.5, None, 16, 1, 1.5),
        (0.25, None, 8, 1, 0.25),
        (4.0, 2, 16, 2, 2.0),
        (None, 3, 2, 2, 2.0),
    ],
)
def test_threads_follow_the_quota_not_the_host(
    quota: float | None, cpuset: int | None, host: int, threads: int, cores: float
) -> None:
    limits = CgroupLimits("v2", quota, cpuset, None)
    assert limits.intra_op_threads(host) == threads
    assert limits.cpu_cores(host) == cores


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_v2_nested_cgroup_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    sys_root, proc = tmp_path / "sys", tmp_path / "cgroup"
    write(
        sys_root,
        {
            "cgroup.controllers": "cpu memory cpuset\n",
            "cpu.max": "max 100000\n",
            "kubepods/cpu.max": "100000 100000\n",
            "kubepods/memory.max": "1073741824\n",
            "kubepods/pod/cpu.max": "250000 100000\n",
            "kubepods/pod/memory.max": "max\n",
            "kubepods/pod/cpuset.cpus.effective": "0-3\n",
        },
    )
    proc.write_text("0::/kubepods/pod\n")
    assert read_limits(sys_root, proc) == CgroupLimits("v2", 1.0, 4, 1 << 30)


def test_v1_inside_a_container(tmp_path: Path) -> None:
    sys_root, proc = tmp_path / "sys", tmp_path / "cgroup"
    write(
        sys_root,
        {
            "cpu/cpu.cfs_quota_us": "150000\n",
            "cpu/cpu.cfs_period_us": "100000\n",
            "memory/memory.limit_in_bytes": "268435456\n",
            "cpuset/cpuset.cpus": "0-1\n",
        },
    )
    proc.write_text("4:memory:/\n3:cpu,cpuacct:/\n2:cpuset:/\n")
    assert read_limits(sys_root, proc) == CgroupLimits("v1", 1.5, 2, 256 << 20)


def test_v1_unlimited_and_no_cgroup_at_all(tmp_path: Path) -> None:
    sys_root, proc = tmp_path / "sys", tmp_path / "cgroup"
    write(
        sys_root,
        {
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
        },
    )
    proc.write_text("")
    assert read_limits(sys_root, proc) == CgroupLimits("v1", None, None, None)
    assert read_limits(tmp_path / "nothing", tmp_path / "none") == CgroupLimits("none", None, None, None)


def test_memory_in_use_is_the_working_set_without_inactive_page_cache(tmp_path: Path) -> None:
    sys_root, proc = tmp_path / "sys", tmp_path / "cgroup"
    write(
        sys_root,
        {
            "memory/memory.usage_in_bytes": "300000000\n",
            "memory/memory.stat": "cache 200000000\ntotal_inactive_file 100000000\ntotal_rss 90000000\n",
        },
    )
    proc.write_text("4:memory:/\n")
    assert read_memory_in_use(sys_root, proc) == 200_000_000
    v2_root = tmp_path / "v2"
    write(
        v2_root, {"cgroup.controllers": "memory\n", "memory.current": "5000\n", "memory.stat": "inactive_file 1000\n"}
    )
    proc.write_text("0::/\n")
    assert read_memory_in_use(v2_root, proc) == 4000
    assert read_memory_in_use(tmp_path / "nothing", proc) is None
    assert parse_memory_stat("a 1\nb 2\n", "b") == 2 and parse_memory_stat("a 1\n", "b") == 0


def test_a_memory_budget_counts_against_this_process_and_says_of_what() -> None:
    free_mib, of = MemoryBudget(budget_bytes=1 << 40).free_mib()
    assert of == "the tier's budget of 1048576 MiB" and 0 < free_mib < 1 << 20
    assert MemoryBudget().free_mib()[1] == "the host's available memory"
    assert process_rss_bytes() > 0 and process_peak_rss_bytes() >= process_rss_bytes()
