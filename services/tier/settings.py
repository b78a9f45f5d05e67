"""What one tier process is told: its role, the deployment file, and its serving limits.

Every field can come from the command line (``python -m services tier --tier edge …``) or from an
environment variable ``TIERLAB_<FIELD>`` (``TIERLAB_TIER=edge``), which is how the Docker stack sets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.contracts.device import DeviceSpec
from services.contracts.repository import StartupModels, parse_startup_models
from services.contracts.specs import LinkName, LinkSpec, TierName

_MIB = 1 << 20


class TierSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIERLAB_", frozen=True, extra="forbid")

    tier: TierName
    deployment: Path = Field(description="deployment file (YAML or JSON)")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_mb: float = Field(default=64.0, gt=0, description="larger request bodies get 413")
    max_json_mb: float = Field(
        default=8.0, gt=0, description="larger JSON documents (tensors as JSON) get 413: send binary tensors"
    )
    body_budget_mb: float | None = Field(
        default=None,
        gt=0,
        description="request bodies and their decoding held at once, beyond which 503; default: a quarter of "
        "the tier's memory limit, at most 256 MiB",
    )
    max_connections: int = Field(default=512, ge=1, description="open connections; beyond, 503 and close")
    max_connections_per_peer: int = Field(default=256, ge=1, description="open connections from one address")
    keep_alive_s: float = Field(default=75.0, gt=0, description="an idle connection is closed after this")
    head_timeout_s: float = Field(default=10.0, gt=0, description="a request head must arrive within this or 408")
    body_min_rate_bytes_s: float = Field(
        default=240.0, gt=0, description="a body arriving slower than this once its grace has passed gets 408"
    )
    body_grace_s: float = Field(default=5.0, gt=0, description="how long a body may arrive at any rate")
    body_idle_s: float = Field(default=30.0, gt=0, description="a body with no byte for this long gets 408")
    send_timeout_s: float = Field(default=30.0, gt=0, description="a client reading nothing for this is reset")
    compute_slots: int | None = Field(
        default=None, ge=1, description="stage runs at once; default: the device's (a measured device's cores)"
    )
    max_queue: int = Field(default=64, ge=0, description="requests waiting for a compute slot before 503")
    forward_timeout_s: float = Field(default=30.0, gt=0, description="next tier answers within this or 504")
    device: DeviceSpec | None = Field(
        default=None,
        description="the device's speed and cores (JSON in TIERLAB_DEVICE); default: host speed, cores from the quota",
    )
    intra_op_threads: int | None = Field(default=None, ge=1, description="default: the device's cores")
    allow_spinning: bool | None = Field(default=None, description="default: only when no CPU quota is set")
    warmup_runs: int = Field(default=3, ge=0)
    peer_resolve_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="how long a peer's name may take to resolve at start (a Swarm task's peers may start after it)",
    )
    startup_models: str = Field(
        default="all", description="models loaded at start: all, none, or names (comma-separated); the rest on demand"
    )
    memory_budget_mb: float | None = Field(
        default=None, gt=0, description="refuse loads beyond this (default: the cgroup memory limit)"
    )
    control_token_file: Path | None = Field(
        default=None, description="control routes (POST/PUT but infer) need this token as 'Authorization: Bearer'"
    )
    shape_links: bool = Field(default=True, description="apply the deployment's link specs")
    links: dict[LinkName, LinkSpec] | None = Field(
        default=None, description="link conditions replacing the deployment's (JSON in TIERLAB_LINKS)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    http_server: Literal["tierlab", "uvicorn"] = Field(
        default="tierlab",
        description="tierlab's own server (a body lands in one buffer: the lower hop tax) or uvicorn, to compare",
    )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * _MIB)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * _MIB)

    @property
    def startup(self) -> StartupModels:
        return parse_startup_models(self.startup_models)
