"""Planning an experiment: every run a spec asks for that the stack can serve (a strategy × scenario ×
network, and the bandwidth sweep's cells), each placement starting at its own share of the subject's
sample order; what the stack cannot serve is listed, not silently dropped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loadgen.spec import ExperimentSpec, ScenarioSpec, StoppingSpec
from loadgen.target import Stack
from services.contracts.errors import ConfigError
from services.contracts.manifest import ManifestSpec, load_manifest
from services.contracts.runkey import Strategy, SweepCell
from services.contracts.specs import LinkName, LinkSpec, network_profile_links, placements_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunPlan:
    subject: str
    model: str
    variant: str
    placement: str
    scenario: ScenarioSpec
    network: str
    stopping: StoppingSpec
    warmup: int

    @property
    def strategy(self) -> str:
        return str(Strategy(self.model, self.placement))

    @property
    def key(self) -> str:
        return f"{self.strategy}|{self.scenario.name}|{self.network}"


@dataclass
class Plan:
    runs: list[RunPlan]
    skipped: list[str] = field(default_factory=list)


# every placement, in a fixed order: each starts at its own share of a subject's sample order
ALL_PLACEMENTS = tuple(placement.name for size in (1, 2, 3) for placement in placements_for(size)
                       if size == 1 or len(placement.tiers) == size)  # fmt: skip


def placement_offset(placement: str, samples: int) -> int:
    """Where a placement's runs start in a subject's sample order (its share of the order)."""
    index = ALL_PLACEMENTS.index(placement) if placement in ALL_PLACEMENTS else 0
    return index * (samples // len(ALL_PLACEMENTS))


def network_links(name: str) -> dict[LinkName, LinkSpec]:
    return network_profile_links(PROJECT_ROOT / "compose" / f"network-{name}.yml")


def plan_experiment(spec: ExperimentSpec, stack: Stack, models_dir: Path) -> Plan:
    """Every run the spec asks for that the stack can serve; what it cannot is listed, not silently dropped."""
    plan = Plan([])
    chosen: list[tuple[str, ManifestSpec, str]] = []
    for selection in spec.selections:
        folders = sorted(p.parent for p in (models_dir / selection.subject).glob("*/manifest.json"))
        if not folders:
            raise ConfigError(f"no built variants of {selection.subject} in {models_dir}: run `make models`")
        built = {f.name: f for f in folders if not f.name.startswith("_")}
        wanted = list(built) if selection.variants == "all" else selection.variants
        for variant in wanted:
            if variant not in built:
                plan.skipped.append(f"{selection.subject}.{variant}: not built")
                continue
            manifest = load_manifest(built[variant])
            served = stack.served_placements(manifest.name)
            if served is None:
                plan.skipped.append(f"{manifest.name}: not served by the stack (make up SUBJECTS=…)")
                continue
            placements = served if selection.placements == "all" else [p for p in selection.placements if p in served]
            for placement in placements:
                chosen.append((selection.subject, manifest, placement))
    for network in spec.networks:
        for scenario in spec.scenarios:
            for subject, manifest, placement in chosen:
                variant = manifest.name.split(".", 1)[1]
                plan.runs.append(
                    RunPlan(
                        subject,
                        manifest.name,
                        variant,
                        placement,
                        scenario,
                        network,
                        spec.stopping,
                        spec.warmup_requests,
                    )
                )
    if spec.sweep is not None:
        stopping = StoppingSpec(min_samples=spec.sweep.samples, max_samples=spec.sweep.samples, max_duration_s=60)
        planned = {Strategy(m.name, pl) for _, m, pl in chosen}
        sweepable = []
        for strategy in map(Strategy.parse, spec.sweep.strategies):
            if strategy in planned or strategy.placement in (stack.served_placements(strategy.model) or []):
                sweepable.append((strategy.model, strategy.placement))
            else:
                plan.skipped.append(f"sweep {strategy}: not served")
        for row, column in spec.sweep.cells():
            for model, placement in sweepable:
                subject, variant = model.split(".", 1)
                plan.runs.append(
                    RunPlan(
                        subject,
                        model,
                        variant,
                        placement,
                        ScenarioSpec(kind="single-stream"),
                        str(SweepCell(row, column)),
                        stopping,
                        2,
                    )
                )
    return plan
