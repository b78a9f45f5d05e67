"""The experiment spec: what to run (subjects × variants × placements × scenarios × networks), how long,
with which seeds. YAML files in ``loadgen/specs/`` (``default``, ``quick``) or any path; validated here,
with a JSON Schema (``loadgen/specs/schema.json``, ``python -m loadgen schema``) for editors.

A run is one strategy × scenario × network condition. Networks are the stack's network profiles
(``compose/network-<name>.yml``), applied to the running tiers between runs without a restart; a
``sweep`` adds a grid of link rates (the studies' bandwidth grid) for a few strategies, shown as a heatmap.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.contracts.errors import ConfigError
from services.contracts.manifest import FrozenSpec, load_yaml_spec
from services.contracts.specs import LinkName, LinkSpec, TierName

SPECS_DIR = Path(__file__).parent / "specs"
SCHEMA_FILE_NAME = "schema.json"
ScenarioKind = Literal["single-stream", "server", "offline", "burst"]


class ScenarioSpec(FrozenSpec):
    """A load pattern (MLPerf's names): one at a time, Poisson arrivals, max throughput, or bursts."""

    kind: ScenarioKind
    rate_rps: float | None = Field(default=None, gt=0, description="server: mean arrival rate")
    concurrency: int = Field(default=4, ge=1, le=256, description="offline: requests kept in flight")
    burst_size: int = Field(default=8, ge=1, le=1000, description="burst: requests sent at once")
    burst_interval_s: float = Field(default=0.5, gt=0, description="burst: time between bursts")

    @model_validator(mode="after")
    def _rate_for_server(self) -> ScenarioSpec:
        if self.kind == "server" and self.rate_rps is None:
            raise ValueError("a server scenario needs rate_rps")
        return self

    @property
    def name(self) -> str:
        match self.kind:
            case "server":
                return f"server@{self.rate_rps:g}rps"
            case "offline":
                return f"offline@{self.concurrency}"
            case "burst":
                return f"burst{self.burst_size}/{self.burst_interval_s:g}s"
            case _:
                return self.kind


class StoppingSpec(FrozenSpec):
    """When a run has enough samples: at least ``min_samples``; then, checked every ``check_every``, once the
    95 % bootstrap CIs of p50 and p95 are each narrower than ±``ci_rel_width`` of the estimate (like
    MLPerf's early stopping, a statement about the percentile, not the mean); at most ``max_samples`` or
    ``max_duration_s``."""

    min_samples: int = Field(default=100, ge=10)
    max_samples: int = Field(default=1000, ge=10)
    max_duration_s: float = Field(default=30.0, gt=0)
    ci_rel_width: float = Field(default=0.05, gt=0, lt=1)
    check_every: int = Field(default=50, ge=10)

    @model_validator(mode="after")
    def _ordered(self) -> StoppingSpec:
        if self.max_samples < self.min_samples:
            raise ValueError("max_samples must be at least min_samples")
        return self


class SelectionSpec(FrozenSpec):
    subject: str
    variants: list[str] | Literal["all"] = "all"
    placements: list[str] | Literal["all"] = "all"


class SweepSpec(FrozenSpec):
    """A grid over two links' rates (rows × columns) for a few strategies; delay/jitter stay the network's."""

    strategies: list[str] = Field(min_length=1, description="model@placement, e.g. fmnist-resnet.partition2@M-C")
    rows_link: LinkName = "mobile-edge"
    rows_rate_mbit: list[float] = Field(min_length=1)
    columns_link: LinkName = "edge-cloud"
    columns_rate_mbit: list[float] = Field(min_length=1)
    samples: int = Field(default=30, ge=5, description="requests per cell and strategy (single-stream)")

    def cells(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.rows_rate_mbit, self.columns_rate_mbit))

    def links(self, base: dict[LinkName, LinkSpec], row_rate: float, column_rate: float) -> dict[LinkName, LinkSpec]:
        changed = dict(base)
        for link, rate in ((self.rows_link, row_rate), (self.columns_link, column_rate)):
            changed[link] = (base.get(link) or LinkSpec()).model_copy(update={"rate_mbit": rate})
        return changed


FaultAction = Literal["kill", "pause", "restart", "cut-link", "cpu", "memory"]
_TIER_FAULTS = ("kill", "pause", "restart", "cpu", "memory")


class FaultSpec(FrozenSpec):
    """One fault injected into every run of the experiment, timed from the run's start (Chaos Mesh's
    PodChaos/NetworkChaos/StressChaos, realised by the stack's runtime and the tiers' link control):

    - ``kill``: SIGKILL the tier; after ``duration_s`` it is started again (as an orchestrator would), its
      links re-shaped and the run's variants loaded again.
    - ``pause``: freeze the tier for ``duration_s`` (cgroup freezer or SIGSTOP), then thaw it.
    - ``restart``: stop it gracefully and start it again at once (``duration_s`` is 0).
    - ``cut-link``: 100 % loss on ``link`` for ``duration_s`` (tc blackhole, or userspace), then restore it.
    - ``cpu`` / ``memory``: squeeze the tier to ``cpu_cores`` / ``memory_mib`` for ``duration_s``.
    """

    action: FaultAction
    tier: TierName | None = None
    link: LinkName | None = None
    at_s: float = Field(ge=0, le=3600, description="seconds after the run's start")
    duration_s: float = Field(default=0.0, ge=0, le=3600)
    cpu_cores: float | None = Field(default=None, gt=0, le=256)
    memory_mib: int | None = Field(default=None, ge=16, le=1 << 20)

    @model_validator(mode="after")
    def _complete(self) -> FaultSpec:
        if self.action in _TIER_FAULTS and self.tier is None:
            raise ValueError(f"a {self.action} fault needs a tier")
        if self.action == "cut-link" and self.link is None:
            raise ValueError("a cut-link fault needs a link")
        if self.action == "cpu" and self.cpu_cores is None:
            raise ValueError("a cpu fault needs cpu_cores")
        if self.action == "memory" and self.memory_mib is None:
            raise ValueError("a memory fault needs memory_mib")
        if self.action == "restart" and self.duration_s:
            raise ValueError("a restart happens at once: no duration_s")
        if self.action != "restart" and not self.duration_s:
            raise ValueError(f"a {self.action} fault needs duration_s > 0")
        return self

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    @property
    def name(self) -> str:
        what = {"cpu": f" to {self.cpu_cores} cores", "memory": f" to {self.memory_mib} MiB"}.get(self.action, "")
        return f"{self.action} {self.tier or self.link}{what} @{self.at_s:g}+{self.duration_s:g}s"


class ExperimentSpec(FrozenSpec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    selections: list[SelectionSpec] = Field(min_length=1)
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    networks: list[str] = Field(default_factory=lambda: ["lan"], min_length=1, description="network profiles")
    resources: str | None = Field(default=None, description="the resource profile the stack must be up with")
    warmup_requests: int = Field(default=10, ge=0)
    stopping: StoppingSpec = StoppingSpec()
    sweep: SweepSpec | None = None
    seed: int = 0
    request_timeout_s: float = Field(default=30.0, gt=0)
    faults: list[FaultSpec] = Field(
        default_factory=list, description="injected into every run; a run then lasts stopping.max_duration_s"
    )
    slo_ms: float | None = Field(default=None, gt=0, description="a request slower than this (or failed) misses")

    @model_validator(mode="after")
    def _faults_fit(self) -> ExperimentSpec:
        faults = sorted(self.faults, key=lambda f: f.at_s)
        for earlier, later in itertools.pairwise(faults):
            if later.at_s < earlier.end_s:
                raise ValueError(f"faults overlap: {earlier.name} and {later.name}")
        if faults and faults[-1].end_s >= self.stopping.max_duration_s:
            raise ValueError(
                f"the last fault ends at {faults[-1].end_s:g} s: stopping.max_duration_s "
                f"({self.stopping.max_duration_s:g} s) must leave time after it to see the recovery"
            )
        if faults and self.sweep is not None:
            raise ValueError("faults and a sweep do not mix: put them in separate experiments")
        return self


def spec_path(name_or_path: str) -> Path:
    """``quick`` → loadgen/specs/quick.yaml; anything with a slash or suffix is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return SPECS_DIR / f"{name_or_path}.yaml"


def load_spec(name_or_path: str) -> ExperimentSpec:
    path = spec_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
        raise ConfigError(f"no experiment spec {path} (built-in specs: {known})")
    return load_yaml_spec(path, ExperimentSpec, "experiment spec")


def json_schema() -> dict[str, object]:
    return ExperimentSpec.model_json_schema()
