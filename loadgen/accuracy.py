"""A variant's accuracy for decisions: from enough items, paired with the unmodified model, with its uncertainty.

Accuracy is a property of the function a variant computes, and every placement of a variant computes the same
function, so its requests are pooled over all its runs (one outcome per distinct sample id: the runs of one
placement share their samples, and each placement starts at its own place in the subject's sample order).
The evidence a decision rests on:

- **paired**: the variant's drop is measured against identity on the *same* items (most items agree, so the
  paired interval is far narrower than two separate ones); never against a maximum of noisy runs;
- **enough items**: the deployed requests when they cover at least as many items as the offline evaluation of
  the whole evaluation split (``outcomes.npz``, written by the build, copied into the results folder), else
  that offline evaluation — the same function, which the deployed requests check item by item: a variant
  whose deployed outcomes differ from its offline outcomes on the same items (exact McNemar, or a paired t-test
  of per-image IoU, p < 0.05) is flagged as a deployment bug, and then only its deployed requests count.

Intervals (``loadgen.stats``): a drop in accuracy (paired proportions) by Newcombe's hybrid score interval
(Newcombe 1998, method 10: Wilson intervals of both accuracies joined by their correlation; it stays sensible
with no discordant items, where a bootstrap collapses to a point); a drop in mIoU by a paired percentile
bootstrap over items (mIoU is not a mean of per-item values, so each resample sums the items' pixel confusion
matrices); a deployed per-image IoU by a t interval. "Within X points" holds when the drop's whole 95 % CI is
at most X, "beyond" when it is wholly above; otherwise the data cannot decide, and the decision says about
how many paired items would (an interval narrows as 1/√n).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadgen import stats
from services.contracts.decisions import (
    AccuracyDecisionSpec,
    DropSpec,
    IntervalSpec,
    VariantAccuracySpec,
)
from services.contracts.errors import ConfigError
from services.contracts.manifest import load_manifest, sha256_file
from services.contracts.scoring import OfflineOutcomes, load_outcomes

IDENTITY = "identity"
AGREEMENT_ALPHA = 0.05
OFFLINE_DIR = "offline"  # in a results folder: offline/<subject>/<variant>.npz, copied when the experiment starts


def snapshot_offline(models_dir: Path, folder: Path, variants: Iterable[tuple[str, str]]) -> list[str]:
    """Copy the offline outcomes of ``variants`` (and of each subject's identity) into the results folder, so
    its summary can be remade after the models are rebuilt (a resumed experiment keeps its first copies);
    returns what could not be copied, and why."""
    missing = []
    wanted = set(variants) | {(subject, IDENTITY) for subject, _ in variants}
    for subject, variant in sorted(wanted):
        source = models_dir / subject / variant
        target = folder / OFFLINE_DIR / subject / f"{variant}.npz"
        if target.exists():
            continue
        try:
            manifest = load_manifest(source)
        except ConfigError:
            missing.append(f"{subject}.{variant}: not built")
            continue
        if manifest.outcomes is None:
            missing.append(f"{subject}.{variant}: built without per-item outcomes (rebuild it: make models)")
            continue
        file = source / manifest.outcomes.file
        if not file.is_file() or sha256_file(file) != manifest.outcomes.sha256:
            missing.append(f"{subject}.{variant}: {file} does not match its manifest (rebuild it: make models)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    return missing


def load_offline(folder: Path) -> dict[tuple[str, str], OfflineOutcomes]:
    """The offline outcomes an experiment copied when it started."""
    return {(f.parent.name, f.stem): load_outcomes(f) for f in sorted((folder / OFFLINE_DIR).glob("*/*.npz"))}


@dataclass
class DeployedOutcomes:
    """A variant's answered requests: the first outcome per distinct sample id, and every (sample id, outcome)
    pair (for the check against the offline outcomes, which every run must pass)."""

    metric: str
    by_item: dict[int, float] = field(default_factory=dict)
    every: list[tuple[int, float]] = field(default_factory=list)

    def add(self, sample_id: int, outcome: float) -> None:
        self.by_item.setdefault(sample_id, outcome)
        self.every.append((sample_id, outcome))


def deployed_outcomes(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], DeployedOutcomes]:
    """Per (subject, variant): its answered, scored requests over all its runs (sweep cells included)."""
    pooled: dict[tuple[str, str], DeployedOutcomes] = {}
    for r in records:
        if r["status"] != 200 or r.get("sample_id") is None:
            continue
        if r.get("correct") is not None:
            metric, outcome = "accuracy", float(bool(r["correct"]))
        elif r.get("score") is not None:
            metric, outcome = "miou", float(r["score"])
        else:
            continue
        pooled.setdefault((r["subject"], r["variant"]), DeployedOutcomes(metric)).add(int(r["sample_id"]), outcome)
    return pooled


def correct_drop(identity: np.ndarray, variant: np.ndarray) -> tuple[float, float, float]:
    """Identity's accuracy minus the variant's on paired 0/1 outcomes, with its 95 % interval."""
    a, b = identity.astype(bool), variant.astype(bool)
    return stats.newcombe_paired(int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b)), int(np.sum(~a & ~b)))


def miou_drop(identity: OfflineOutcomes, variant: OfflineOutcomes) -> tuple[float, float, float]:
    """Identity's mIoU minus the variant's over every item, with its paired bootstrap 95 % interval."""
    return stats.bootstrap(lambda picked: identity.metric_on(picked) - variant.metric_on(picked), len(variant))


def _interval(value: float, low: float, high: float, n: int) -> IntervalSpec:
    return IntervalSpec(value=round(value, 5), low=round(low, 5), high=round(high, 5), n=n)


def _pooled(outcomes: DeployedOutcomes) -> IntervalSpec:
    values = np.fromiter(outcomes.by_item.values(), dtype=np.float64)
    if outcomes.metric == "accuracy":
        return _interval(*stats.wilson(int(values.sum()), len(values)), len(values))
    return _interval(*stats.mean_interval(values), len(values))


def _offline(outcomes: OfflineOutcomes) -> IntervalSpec:
    n = len(outcomes)
    if outcomes.correct is not None:
        return _interval(*stats.wilson(int(outcomes.correct.sum()), n), n)
    return _interval(*stats.bootstrap(outcomes.metric_on, n), n)


@dataclass(frozen=True)
class Agreement:
    """Deployed answers against the offline outcomes of their items: the paired test's p, how many differ, and
    both per-item means over those answers."""

    p: float | None
    differing: int
    checked: int
    deployed: float
    offline: float


def _agreement(deployed: DeployedOutcomes, offline: OfflineOutcomes) -> Agreement:
    ids = np.array([i for i, _ in deployed.every if i < len(offline)], dtype=np.int64)
    if not len(ids):
        return Agreement(None, 0, 0, math.nan, math.nan)
    got = np.array([o for i, o in deployed.every if i < len(offline)], dtype=np.float64)
    expected = offline.per_item()[ids]
    if offline.correct is not None:
        _, _, p = stats.mcnemar_exact(list(got.astype(bool)), list(expected.astype(bool)))
    else:
        keep = ~np.isnan(expected)
        p = stats.paired_t_p(got[keep], expected[keep])
    differing = int(np.sum(np.abs(got - expected) > 1e-6))
    return Agreement(p, differing, len(ids), float(np.nanmean(got)), float(np.nanmean(expected)))


def _paired_deployed(identity: DeployedOutcomes, variant: DeployedOutcomes) -> tuple[float, float, float, int] | None:
    shared = sorted(set(identity.by_item) & set(variant.by_item))
    if not shared:
        return None
    a = np.array([identity.by_item[i] for i in shared])
    b = np.array([variant.by_item[i] for i in shared])
    drop = correct_drop(a, b) if variant.metric == "accuracy" else stats.mean_interval(a - b)
    return (*drop, len(shared))


def variant_accuracies(
    records: Iterable[Mapping[str, Any]],
    offline: Mapping[tuple[str, str], OfflineOutcomes],
    variants: Iterable[tuple[str, str]],
) -> dict[tuple[str, str], VariantAccuracySpec]:
    """Every (subject, variant) of ``variants`` with its pooled deployed accuracy, its offline accuracy, their
    agreement, and its drop from identity on the evidence decisions use."""
    deployed = deployed_outcomes(records)
    found: dict[tuple[str, str], VariantAccuracySpec] = {}
    flagged: set[tuple[str, str]] = set()
    for key in sorted(set(variants)):
        mine, theirs = deployed.get(key), offline.get(key)
        if mine is None and theirs is None:
            continue
        agreement = flag = None
        if mine is not None and theirs is not None:
            agreement = _agreement(mine, theirs)
            if agreement.p is not None and agreement.p < AGREEMENT_ALPHA:
                flag = (f"deployed {agreement.deployed:.3f} vs offline {agreement.offline:.3f} on the same "
                        f"{agreement.checked} answers ({agreement.differing} differ, p = {agreement.p:.2g}): the "
                        "deployment does not compute what was evaluated")  # fmt: skip
                flagged.add(key)
        same_items = agreement.offline if agreement is not None and agreement.checked else None
        found[key] = VariantAccuracySpec(
            subject=key[0], variant=key[1], metric=(theirs.metric if theirs else mine.metric),  # type: ignore[union-attr]
            deployed=_pooled(mine) if mine else None, offline=_offline(theirs) if theirs else None,
            offline_same_items=None if same_items is None or math.isnan(same_items) else round(same_items, 5),
            agreement_p=agreement.p if agreement else None, flag=flag,
            answers_differing=agreement.differing if agreement else None,
            answers_checked=agreement.checked if agreement else None,
        )  # fmt: skip
    for (subject, variant), spec in list(found.items()):
        if variant == IDENTITY or (subject, IDENTITY) not in found:
            continue
        drop = _drop(
            subject, variant, deployed, offline, trust_offline=not ({(subject, variant), (subject, IDENTITY)} & flagged)
        )
        found[(subject, variant)] = spec.model_copy(update={"drop": drop})
    return found


def _drop(
    subject: str,
    variant: str,
    deployed: Mapping[tuple[str, str], DeployedOutcomes],
    offline: Mapping[tuple[str, str], OfflineOutcomes],
    *,
    trust_offline: bool,
) -> DropSpec | None:
    """The drop from identity on the deployed pairs when they cover the split (or the offline outcomes are
    missing or not trusted), else on the offline evaluation of the whole split."""
    pairs = None
    if (subject, IDENTITY) in deployed and (subject, variant) in deployed:
        pairs = _paired_deployed(deployed[(subject, IDENTITY)], deployed[(subject, variant)])
    base, mine = offline.get((subject, IDENTITY)), offline.get((subject, variant))
    use_offline = trust_offline and base is not None and mine is not None and len(base) == len(mine)
    if use_offline and (pairs is None or pairs[3] < len(mine)):  # type: ignore[arg-type]
        assert base is not None and mine is not None
        value, low, high = (
            correct_drop(base.correct, mine.correct)
            if mine.correct is not None and base.correct is not None
            else miou_drop(base, mine)
        )
        return DropSpec(value=round(value, 5), low=round(low, 5), high=round(high, 5), n=len(mine),
                        source="offline", split_items=len(mine))  # fmt: skip
    if pairs is None:
        return None
    value, low, high, n = pairs
    return DropSpec(value=round(value, 5), low=round(low, 5), high=round(high, 5), n=n, source="deployed",
                    split_items=len(mine) if mine is not None else None)  # fmt: skip


def _points(value: float) -> str:
    return f"{value * 100:.1f}"


def describe_drop(drop: DropSpec) -> str:
    where = (f"offline, all {drop.n:,} items paired" if drop.source == "offline"
             else f"deployed, {drop.n:,} items paired")  # fmt: skip
    return f"{_points(drop.value)} [{_points(drop.low)}, {_points(drop.high)}] points ({where})"


def decide(drop: DropSpec | None, max_drop: float) -> AccuracyDecisionSpec:
    """Within ``max_drop`` of identity, beyond it, or inconclusive (with about how many more paired items would
    decide), at 95 % confidence."""
    if drop is None:
        return AccuracyDecisionSpec(outcome="unscored", max_drop=max_drop, text="no accuracy measured")
    points = round(max_drop * 100, 6)
    limit = f"{points:g} point{'s' * (points != 1)}"
    if drop.high <= max_drop:
        return AccuracyDecisionSpec(outcome="within", max_drop=max_drop, drop=drop,
                                    text=f"drop {describe_drop(drop)}: within {limit}")  # fmt: skip
    if drop.low > max_drop:
        return AccuracyDecisionSpec(outcome="beyond", max_drop=max_drop, drop=drop,
                                    text=f"drop {describe_drop(drop)}: beyond {limit}")  # fmt: skip
    gap = abs(max_drop - drop.value)
    half = (drop.high - drop.value) if drop.value <= max_drop else (drop.value - drop.low)
    needed = math.ceil(drop.n * (half / gap) ** 2) if gap > 1e-9 else None
    more = needed - drop.n if needed is not None else None
    if more is None:
        why = "the drop sits at the limit: no number of items decides it"
    elif drop.split_items is not None and needed is not None and needed > drop.split_items:
        why = f"~{more:,} more paired items would decide; the evaluation split holds {drop.split_items:,}"
    else:
        why = f"~{more:,} more paired items would decide"
    return AccuracyDecisionSpec(outcome="inconclusive", max_drop=max_drop, drop=drop, more_items=more,
                                text=f"drop {describe_drop(drop)}: inconclusive at {limit}: {why}")  # fmt: skip
