"""A tier's status is a typed document: the status phrase, a reader that ignores what a newer tier adds,
and a clear failure for what is not a status."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.contracts.device import DeviceSpec
from services.contracts.repository import RepositoryModelSpec
from services.contracts.tier_status import (
    CgroupLimitsStatus,
    HostStatus,
    LinkStatus,
    MemoryStatus,
    OnnxruntimeStatus,
    ServerStatus,
    TierStatusSpec,
    read_tier_status,
)


def status(**models: RepositoryModelSpec) -> TierStatusSpec:
    return TierStatusSpec(
        tier="edge",
        ready=True,
        limits=CgroupLimitsStatus(
            cgroup="v1", cpu_quota_cores=1.0, cpuset_cpu_count=None, memory_limit_bytes=1 << 30, cpu_cores=1.0
        ),
        device=DeviceSpec(speed=0.8, cores=1),
        host=HostStatus(hostname="h", cpus=2),
        onnxruntime=OnnxruntimeStatus(intra_op_threads=1, allow_spinning=False),
        links=[LinkStatus(link="edge-cloud", peer="cloud", backend="userspace", delay_ms=5.0, rate_mbit=10.0)],
        memory=MemoryStatus(free_mib=812.4, of="the tier's limit of 1024 MiB", rss_mib=120.0, peak_rss_mib=130.0),
        server=ServerStatus(
            http_server="tierlab",
            max_connections=512,
            max_connections_per_peer=256,
            body_budget_bytes=256 << 20,
            body_min_rate_bytes_s=240.0,
            memory_bound_bytes=300 << 20,
        ),
        models=models,
    )


def entry(name: str, state: str, reason: str = "") -> RepositoryModelSpec:
    return RepositoryModelSpec(name=name, state=state, reason=reason, stages_here=(0,), file_mib=1.0)


def test_a_status_says_what_is_loaded_and_what_did_not_fit() -> None:
    summary = status(
        a=entry("a", "READY"),
        b=entry("b", "UNAVAILABLE", "does not fit: needs ~40 MiB, 3 MiB free of the tier's limit of 1024 MiB"),
        c=entry("c", "UNAVAILABLE", "not loaded"),
    ).loaded_summary()
    assert summary == "1 of 3 variants loaded, 1 do not fit; 812 MiB free of the tier's limit of 1024 MiB"


def test_the_wire_document_reads_back_and_a_newer_tiers_fields_are_ignored() -> None:
    written = status(a=entry("a", "READY"))
    wire = written.model_dump(mode="json")
    wire["a_field_a_newer_tier_adds"] = {"x": 1}
    wire["links"][0]["another"] = 2
    read = read_tier_status(wire)
    assert read == written
    assert read.links[0].conditions().rate_mbit == 10.0 and read.links[0].conditions().delay_ms == 5.0


def test_what_is_not_a_status_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="memory"):
        read_tier_status({k: v for k, v in status().model_dump(mode="json").items() if k != "memory"})
