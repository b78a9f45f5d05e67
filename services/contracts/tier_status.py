"""A tier's status (``GET /tierlab/status``): what it is, what it may use, what it holds, how it is linked.

One writer, the tier (``services.tier.app.Tier.status``), and one reader, ``read_tier_status`` (``make
status``, ``python -m services status``, the loadgen's run bundle and throttling/memory reads, the
benchmarks). Fields a newer tier adds are ignored by an older reader.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.contracts.device import CpuThrottlingSpec, DeviceModelSpec, DeviceSpec
from services.contracts.repository import RepositoryModelSpec
from services.contracts.specs import LinkName, LinkSpec, TierName


class _Status(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CgroupLimitsStatus(_Status):
    """The limits the kernel applies to the tier's process now (a runtime may squeeze a running tier)."""

    cgroup: Literal["v1", "v2", "none"]
    cpu_quota_cores: float | None
    cpuset_cpu_count: int | None
    memory_limit_bytes: int | None
    cpu_cores: float = Field(description="the cores the tier counts on: the quota, else the cpuset, else the host's")


class HostStatus(_Status):
    """The machine the tier runs on (a container shares its kernel and CPU)."""

    hostname: str
    node_id: str | None = None
    cpu_model: str | None = None
    cpus: int | None = None
    kernel: str | None = None
    arch: str | None = None


class OnnxruntimeStatus(_Status):
    intra_op_threads: int
    allow_spinning: bool


class LinkStatus(LinkSpec):
    """One of the tier's links: its conditions and how they are applied."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    link: LinkName
    peer: TierName
    backend: str = Field(description="netem, tbf+userspace, userspace or none")
    device: str | None = None
    note: str = ""

    def conditions(self) -> LinkSpec:
        """The link's conditions alone."""
        return LinkSpec.model_validate(self.model_dump(include=set(LinkSpec.model_fields)))


class MemoryStatus(_Status):
    free_mib: float = Field(description="memory free for models: the budget, the cgroup limit or the host's")
    of: str = Field(description="what free_mib is measured against")
    rss_mib: float
    peak_rss_mib: float = Field(description="the resident peak since the last model load or peak reset")


class ServerStatus(_Status):
    """The HTTP server's limits, and under tierlab's own server what it holds now."""

    http_server: str
    max_connections: int
    max_connections_per_peer: int
    body_budget_bytes: int
    body_min_rate_bytes_s: float
    memory_bound_bytes: int
    connections: int | None = None
    budget_held_bytes: int | None = None
    budget_peak_bytes: int | None = None
    budget_refusals: int | None = None


class TierStatusSpec(_Status):
    tier: TierName
    ready: bool
    load_error: str | None = None
    limits: CgroupLimitsStatus
    device: DeviceSpec
    device_model: DeviceModelSpec | None = None
    compute_slots: int = 1
    host: HostStatus
    cpu_throttling: CpuThrottlingSpec | None = None
    onnxruntime: OnnxruntimeStatus
    links: list[LinkStatus] = Field(default_factory=list)
    memory: MemoryStatus
    server: ServerStatus
    models: dict[str, RepositoryModelSpec] = Field(default_factory=dict)

    def loaded_summary(self) -> str:
        """The repository in a phrase: "3 of 28 variants loaded, 2 do not fit; 812 MiB free of …"."""
        entries = list(self.models.values())
        refused = sum(e.reason.startswith("does not fit") for e in entries)
        text = f"{sum(e.ready for e in entries)} of {len(entries)} variants loaded"
        if refused:
            text += f", {refused} do not fit"
        return text + f"; {self.memory.free_mib:.0f} MiB free of {self.memory.of}"


def read_tier_status(body: Any) -> TierStatusSpec:
    """A tier's status from its JSON answer (``pydantic.ValidationError`` when it is not one)."""
    return TierStatusSpec.model_validate(body)
