"""Which variants are loaded where while an experiment runs (the tiers' model repositories).

Before a run the loadgen loads its variant on every tier its placement computes on (``POST
/v2/repository/models/{name}/load``), and after the last run of that variant in a row it unloads what
it loaded — never what the tier had loaded before — so a stack holds one variant at a time beyond its
start-up set and four subjects fit a laptop. Each load's measured cost (resident and peak MiB, load and
warm-up ms) goes into the bundle's ``loads``. A load the tier refuses (does not fit its memory) makes
the run *not runnable on this profile*: recorded in the bundle's ``not_runnable`` with the tier's
numbers, and the experiment goes on.
"""

from __future__ import annotations

from typing import Any

from loadgen.target import Stack
from services.contracts.errors import ConfigError
from services.contracts.specs import TierName, placement_tiers


class ModelLoads:
    def __init__(self, stack: Stack, bundle: dict[str, Any]) -> None:
        self.stack = stack
        self.bundle = bundle
        bundle.setdefault("loads", [])
        bundle.setdefault("not_runnable", [])
        self.ours: list[tuple[TierName, str]] = []

    def prepare(self, model: str, placement: str, network: str) -> str | None:
        """Load ``model`` where ``placement`` needs it; None when the run can go, else why it cannot."""
        for tier in placement_tiers(placement):
            if (tier, model) in self.ours:
                continue
            entry = self.stack.index(tier).get(model)
            if entry is not None and entry.ready:
                continue
            loaded = self.stack.load(tier, model)
            if isinstance(loaded, str):
                self.bundle["not_runnable"].append(
                    {"model": model, "placement": placement, "network": network, "tier": tier, "reason": loaded}
                )
                return loaded
            self.ours.append((tier, model))
            costs = loaded.model_dump(
                mode="json", include={"resident_mib", "peak_mib", "load_ms", "warmup_ms", "file_mib"}
            )
            self.bundle["loads"].append({"tier": tier, "model": model, "network": network, **costs})
        return None

    def release(self, model: str | None = None) -> None:
        """Unload what this experiment loaded (of ``model`` only, when given)."""
        for tier, name in list(self.ours):
            if model is None or name == model:
                self.stack.unload(tier, name)
                self.ours.remove((tier, name))

    def reload(self, tier: TierName) -> None:
        """Load again on ``tier`` what this experiment had loaded there (after the tier was restarted)."""
        for where, model in self.ours:
            if where == tier:
                loaded = self.stack.load(tier, model)
                if isinstance(loaded, str):
                    raise ConfigError(loaded)
