"""What an experiment decides, as documents: a variant's accuracy from its deployed requests and its offline
evaluation, its drop from the unmodified model with a confidence interval, the decision "within X points" at
a stated confidence, and the answer to a constraint (the strategy to use, with its numbers). Written into
``summary.json`` by the loadgen's summary, read by the report and ``recommend``; the decisions themselves are
made in ``loadgen.accuracy`` and ``loadgen.recommend``.

Drops are in units of the metric (0.01 = one point of accuracy or of mIoU), positive when the variant is worse.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, computed_field, model_validator

from services.contracts.manifest import FrozenSpec

CONFIDENCE = 0.95  # of every interval and decision here (two-sided intervals)

EvidenceSource = Literal["deployed", "offline"]
DecisionOutcome = Literal["within", "beyond", "inconclusive", "unscored"]


class ReasonSpec(FrozenSpec):
    """Why a run is INVALID: a short ``kind`` reasons are counted by ("p50 CI unmet", "throttled", …) and the
    whole sentence."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


class VerdictSpec(FrozenSpec):
    """A run's verdict, as MLPerf LoadGen gives one: VALID or INVALID with the reasons, requested vs effective
    settings (``loadgen.verdict`` has the rules)."""

    valid: bool
    reasons: tuple[ReasonSpec, ...] = Field(description="why the run is INVALID; empty when VALID")
    notes: tuple[str, ...] = Field(description="worth knowing, not invalidating")
    requested: dict[str, Any]
    effective: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _as_written(cls, document: Any) -> Any:
        """The label is derived (written for readers, dropped on reading); results written before reasons had
        kinds carry sentences, read as kind "other"."""
        if isinstance(document, dict):
            document = {k: v for k, v in document.items() if k != "label"}
            reasons = document.get("reasons")
            if isinstance(reasons, list | tuple):
                document["reasons"] = [{"kind": "other", "text": r} if isinstance(r, str) else r for r in reasons]
        return document

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        return "VALID" if self.valid else "INVALID"


class IntervalSpec(FrozenSpec):
    """An estimate with its 95 % confidence interval, from ``n`` items."""

    value: float
    low: float
    high: float
    n: int = Field(ge=0)


class DropSpec(IntervalSpec):
    """The variant's metric below identity's on the same items (paired), with its 95 % CI."""

    source: EvidenceSource = Field(description="deployed requests, or the offline evaluation of the whole split")
    split_items: int | None = Field(default=None, description="items in the evaluation split (offline evidence)")


class VariantAccuracySpec(FrozenSpec):
    """One variant's accuracy, pooled over every run of it (each placement computes the same function)."""

    subject: str
    variant: str
    metric: str
    deployed: IntervalSpec | None = Field(description="its deployed requests, one outcome per distinct sample")
    offline: IntervalSpec | None = Field(description="its offline evaluation on the whole evaluation split")
    offline_same_items: float | None = Field(
        default=None, description="the offline metric on exactly the items its requests were answered for"
    )
    agreement_p: float | None = Field(default=None, description="paired test: deployed vs offline, same items")
    answers_differing: int | None = Field(
        default=None, description="deployed answers whose outcome differs from the offline outcome of their item"
    )
    answers_checked: int | None = Field(default=None, description="deployed answers compared with offline ones")
    flag: str | None = Field(default=None, description="set when deployed and offline differ beyond the CIs")
    drop: DropSpec | None = Field(default=None, description="below identity, on the evidence decisions use")


class AccuracyDecisionSpec(FrozenSpec):
    """Is a variant within ``max_drop`` of identity at 95 % confidence: the drop's whole CI at or below it
    (within), its whole CI above it (beyond), or neither (inconclusive, with the items that would decide)."""

    outcome: DecisionOutcome
    max_drop: float
    drop: DropSpec | None = None
    more_items: int | None = Field(default=None, description="inconclusive: about how many more paired items decide")
    text: str


class StrategyNumbersSpec(FrozenSpec):
    """What the answer table shows of one strategy."""

    strategy: str
    variant: str
    placement: str
    p95_ms: float
    p95_low_ms: float
    p95_high_ms: float
    p50_ms: float
    accuracy: AccuracyDecisionSpec
    valid: bool


class RuledOutSpec(FrozenSpec):
    strategy: str
    kind: Literal["errors", "latency", "accuracy", "invalid"]
    why: str


class AnswerSpec(FrozenSpec):
    """The answer to one constraint for one subject × scenario × network: the strategy to use (the fastest
    p95 among VALID runs that meet the budget and are within the accuracy drop), its runner-ups, faster
    strategies whose accuracy the data cannot decide, and why every other was ruled out."""

    subject: str
    scenario: str
    network: str
    constraint: str
    p95_budget_ms: float | None
    max_drop: float
    winner: StrategyNumbersSpec | None
    runner_ups: tuple[StrategyNumbersSpec, ...] = ()
    undecided: tuple[StrategyNumbersSpec, ...] = Field(
        default=(), description="faster than the winner, within budget, VALID, accuracy inconclusive"
    )
    untrusted: tuple[StrategyNumbersSpec, ...] = Field(
        default=(), description="would meet the constraint, but their runs are INVALID"
    )
    ruled_out: tuple[RuledOutSpec, ...] = ()
    runs: int
    valid_runs: int
    invalid_kinds: dict[str, int] = Field(default_factory=dict, description="INVALID reasons by kind, with counts")

    @property
    def use(self) -> str | None:
        """The phrase scripts read: ``use <subject>.<variant>@<placement>``."""
        return f"use {self.winner.strategy}" if self.winner else None
