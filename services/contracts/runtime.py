"""The runtime contract: what the loadgen (fault scenarios, OOM checks) may ask of wherever the tiers run.

The runtimes themselves — local processes, Docker containers, Swarm services — live in
``services.stack.runtime`` and bring a stack up and down; the loadgen never imports them. It receives a
``TierRuntime`` from ``runtime_for``, which finds the runtime the stack's state names among the installed
``tierlab.runtimes`` entry points (``pyproject.toml``). Where none is installed — the in-stack loadgen's
image carries no Docker driver — ``runtime_for`` raises ``Unsupported``, which says so::

    runtime = runtime_for(state, state_file)       # what `make up` recorded in .local/stack.json
    runtime.kill("edge"); runtime.start("edge")    # SIGKILL, then start it again as an orchestrator would
    runtime.pause("edge"); runtime.resume("edge")  # freeze (cgroup freezer / SIGSTOP) and thaw
    runtime.set_limits("edge", TierLimits(0.2, None))  # squeeze its CPU (a CFS quota) or memory limit
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from services.contracts.errors import ConfigError
from services.contracts.specs import TierName
from services.contracts.stack_state import StackStateSpec

ENTRY_POINT_GROUP = "tierlab.runtimes"
TierRun = Literal["running", "paused", "exited", "missing"]


class Unsupported(ConfigError):
    """The runtime cannot do this (e.g. a CPU limit on a local process), or no runtime is installed here;
    the message says what can."""


@dataclass(frozen=True, slots=True)
class TierProcess:
    """One tier as its runtime sees it (not as it answers: that is its ``/tierlab/status``)."""

    tier: TierName
    run: TierRun
    oom_killed: bool = False
    exit_code: int | None = None


@dataclass(frozen=True, slots=True)
class TierLimits:
    """The CPU and memory limits the runtime applies to a tier; None = unlimited."""

    cpu_cores: float | None
    memory_bytes: int | None
    memory_swap_bytes: int | None = None  # memory + swap, where the runtime sets it apart (Docker)


@runtime_checkable
class TierRuntime(Protocol):
    """The faults a chaos scenario injects and what it reads back, for one way of running the tiers."""

    name: str
    state: StackStateSpec

    def processes(self) -> dict[TierName, TierProcess]: ...

    def kill(self, tier: TierName) -> None:
        """Kill the tier at once (SIGKILL): no drain, no goodbye, as a crash or a pulled plug."""

    def start(self, tier: TierName) -> None:
        """Start a killed or exited tier again, with the configuration it was brought up with."""

    def stop(self, tier: TierName) -> None: ...

    def restart(self, tier: TierName) -> None:
        """Stop the tier gracefully (SIGTERM) and start it again."""

    def pause(self, tier: TierName) -> None:
        """Freeze every process of the tier (it holds its connections and answers nothing)."""

    def resume(self, tier: TierName) -> None: ...

    def limits(self, tier: TierName) -> TierLimits: ...

    def set_limits(self, tier: TierName, limits: TierLimits) -> None:
        """Give a running tier exactly these limits (None = unlimited): a squeeze, and putting it back."""

    def exec(self, tier: TierName, argv: list[str]) -> str:
        """Run ``argv`` where the tier runs; its output (``ConfigError`` with what it printed if it fails)."""

    def logs(self, tail: int = 100) -> str: ...

    def down(self) -> list[str]:
        """Stop every tier and whatever else the runtime started; returns what was stopped."""

    def metrics_bind(self) -> str | None:
        """The address a loadgen on this host listens on so that the stack's Prometheus scrapes it (as
        ``host.docker.internal``); None where the stack's Prometheus cannot reach this host."""

    def oom_killed(self) -> list[TierName]:
        """The tiers the kernel's OOM killer stopped; none where this process cannot ask."""

    def wait_ready(self, tier: TierName, timeout_s: float) -> float:
        """Seconds until ``tier`` answers ready (``ConfigError`` after ``timeout_s``)."""


def installed_runtimes() -> dict[str, Any]:
    """The runtime classes installed here, by name (the ``tierlab.runtimes`` entry points), not loaded."""
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def runtime_for(state: StackStateSpec, state_file: Path | None = None) -> TierRuntime:
    """The runtime that brought up the stack ``state`` describes (``.local/stack.json``)."""
    kind = state.runtime
    installed = installed_runtimes()
    if kind not in installed:
        known = ", ".join(sorted(installed)) or "none"
        raise Unsupported(
            f"the stack's runtime {kind!r} is not installed in this environment (installed: {known}); "
            "the host's venv has them all (pip install -e '.[stack]'), the tier image none"
        )
    runtime: TierRuntime = installed[kind].load()(state, state_file)
    return runtime
