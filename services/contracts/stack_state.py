"""The stack's state file (``.local/stack.json``): what ``make up`` brought up and how to reach it.

One writer, ``write_stack_state`` (the runtimes' ``up``: local processes, Docker compose, Swarm), and one
reader, ``read_stack_state`` (``make status/down/logs``, the loadgen, the fault scenarios, the benchmarks).
Every field but the runtime and the tiers' URLs is optional, so a state file of an older tierlab still
reads; fields a newer one adds are ignored by an older reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts.specs import TierName

STACK_STATE_VERSION = 1


class StackImagesSpec(BaseModel):
    """The images a Docker or Swarm stack runs (tag or id)."""

    model_config = ConfigDict(extra="ignore")

    tier: str
    prometheus: str | None = None
    grafana: str | None = None
    base: str | None = None


class LocalTierSpec(BaseModel):
    """A tier running as a local process: how to find, signal and start it again."""

    model_config = ConfigDict(extra="ignore")

    pid: int
    url: str
    log: str | None = None
    argv: list[str] = Field(default_factory=list)


class StackStateSpec(BaseModel):
    """A running stack, as its runtime recorded it."""

    model_config = ConfigDict(extra="ignore")

    version: int = STACK_STATE_VERSION
    runtime: str = Field(description="the runtime that brought it up: local, docker or swarm")
    urls: dict[TierName, str] = Field(description="each tier's base URL, as this host reaches it")
    profile: str | None = Field(default=None, description="the resource profile (compose/resources-<name>.yml)")
    network: str | None = Field(default=None, description="the network profile (compose/network-<name>.yml)")
    models_dir: str | None = None
    subjects: list[str] = Field(default_factory=list)
    prometheus: str | None = None
    grafana: str | None = None
    grafana_admin_password_file: str | None = None
    images: StackImagesSpec | None = None
    up_s: float | None = Field(default=None, description="seconds make up took")
    control_token_file: str | None = Field(default=None, description="the bearer token of the tiers' control routes")
    # local processes
    deployment: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="environment the local tiers were started with")
    tiers: dict[TierName, LocalTierSpec] = Field(default_factory=dict)
    # Swarm
    manager: str | None = Field(default=None, description="the Swarm manager's engine (None: this host's)")
    nodes: dict[TierName, dict[str, Any]] = Field(default_factory=dict, description="where each tier's task runs")
    engines: dict[str, str | None] = Field(default_factory=dict, description="each node's engine address")
    swarm_created: bool = Field(default=False, description="make up created the swarm (make down leaves it)")


def write_stack_state(path: Path, state: StackStateSpec) -> None:
    """Record ``state`` at ``path`` (whole, or not at all: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(state.model_dump_json(indent=2))
    partial.replace(path)


def read_stack_state(path: Path) -> StackStateSpec | None:
    """The stack recorded at ``path``; None when there is none, or the file is not a stack's state."""
    try:
        return StackStateSpec.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None
