"""Which strategy for a constraint: one function (:func:`answer`) answers for ``make recommend``, the report's
first screen and ``summary.json`` (``answers``, under ``ANSWER_CONSTRAINTS``), so the three always agree.

Per subject × scenario × network, the strategy to use is the one with the lowest p95 among the runs that

- are VALID (``loadgen.verdict``): an INVALID run is never recommended; when only INVALID runs would meet the
  constraint the answer names them to be rerun;
- failed at most 1 % of their requests and meet the p95 budget;
- belong to a variant within the allowed accuracy drop of identity at 95 % confidence (``loadgen.accuracy``:
  the variant's requests pooled over every run of it, paired with identity on the same items, backed by the
  offline evaluation of the whole split). A variant the data cannot decide is not ruled out: when it is faster
  than the winner it is listed as *undecided*, with about how many more paired items would decide it.

Ties in p95 go to the smaller accuracy drop. Drops are in units of the metric (0.01 = one point).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from loadgen.accuracy import IDENTITY, decide
from services.contracts.decisions import (
    AccuracyDecisionSpec,
    AnswerSpec,
    RuledOutSpec,
    StrategyNumbersSpec,
    VariantAccuracySpec,
    VerdictSpec,
)
from services.contracts.runkey import Strategy, SweepCell

MAX_ERROR_RATE = 0.01
# the constraints the report and summary.json answer for: (name, p95 budget in ms or None, accuracy drop)
ANSWER_CONSTRAINTS: tuple[tuple[str, float | None, float], ...] = (
    ("fastest, within 1 point", None, 0.01),
    ("fastest, within 3 points", None, 0.03),
    ("fastest, any accuracy", None, 1.0),
)
ANSWER_HEAD = ("subject · scenario · network", "constraint", "use", "p95 ms [95 % CI]",
               "accuracy drop, points [95 % CI]", "VALID runs", "INVALID because", "also")  # fmt: skip


def _decision(entry: Mapping[str, Any], accuracy: VariantAccuracySpec | None, max_drop: float) -> AccuracyDecisionSpec:
    if entry["variant"] == IDENTITY:
        return AccuracyDecisionSpec(outcome="within", max_drop=max_drop, text="the unmodified model")
    if accuracy is None or accuracy.drop is None:
        why = "no identity to compare with" if accuracy is not None else "no accuracy measured (latency only)"
        return AccuracyDecisionSpec(outcome="unscored", max_drop=max_drop, text=why)
    return decide(accuracy.drop, max_drop)


def _numbers(entry: Mapping[str, Any], decision: AccuracyDecisionSpec, valid: bool) -> StrategyNumbersSpec:
    latency = entry["latency_ms"]
    return StrategyNumbersSpec(
        strategy=entry["strategy"], variant=entry["variant"], placement=entry["placement"],
        p95_ms=latency["p95"], p95_low_ms=latency["p95_low"], p95_high_ms=latency["p95_high"],
        p50_ms=latency["p50"], accuracy=decision, valid=valid,
    )  # fmt: skip


def _rank(numbers: StrategyNumbersSpec) -> tuple[float, float]:
    """Fastest tail first; among equal tails, the smaller accuracy drop."""
    drop = numbers.accuracy.drop
    return numbers.p95_ms, drop.value if drop is not None else 0.0


def groups_of(summary: Mapping[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """The summary's runs by subject × scenario × network (sweep cells are the heatmap's, not answered)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in summary["strategies"]:
        if not SweepCell.names(e["network"]):
            groups.setdefault((e["subject"], e["scenario"], e["network"]), []).append(e)
    return groups


def answer(
    summary: Mapping[str, Any],
    *,
    p95_ms: float | None,
    max_drop: float,
    constraint: str | None = None,
    subject: str | None = None,
    scenario: str | None = None,
    network: str | None = None,
) -> list[AnswerSpec]:
    """The answer for every subject × scenario × network of ``summary`` (filtered by the keywords given)."""
    accuracies = {(v["subject"], v["variant"]): VariantAccuracySpec.model_validate(v)
                  for v in summary.get("variants") or []}  # fmt: skip
    label = constraint or _constraint_label(p95_ms, max_drop)
    answers = []
    for (subj, scen, net), entries in groups_of(summary).items():
        if (subject and subj != subject) or (scenario and scen != scenario) or (network and net != network):
            continue
        chosen, undecided, untrusted, ruled_out = [], [], [], []
        kinds: Counter[str] = Counter()
        valid_runs = 0
        for e in entries:
            verdict = VerdictSpec.model_validate(e["verdict"]) if e.get("verdict") else None
            valid = verdict is None or verdict.valid
            valid_runs += valid
            kinds.update(r.kind for r in (verdict.reasons if verdict else ()))
            p95 = e["latency_ms"].get("p95", math.inf)
            if e["error_rate"] > MAX_ERROR_RATE or "p95" not in e["latency_ms"]:
                ruled_out.append(RuledOutSpec(strategy=e["strategy"], kind="errors",
                                              why=f"{e['error_rate']:.0%} of requests failed"))  # fmt: skip
                continue
            if p95_ms is not None and p95 > p95_ms:
                ruled_out.append(RuledOutSpec(strategy=e["strategy"], kind="latency",
                                              why=f"p95 {p95:.1f} ms > {p95_ms:g} ms"))  # fmt: skip
                continue
            decision = _decision(e, accuracies.get((subj, e["variant"])), max_drop)
            numbers = _numbers(e, decision, valid)
            if decision.outcome == "beyond":
                ruled_out.append(RuledOutSpec(strategy=e["strategy"], kind="accuracy", why=decision.text))
            elif not valid:
                assert verdict is not None
                why = "INVALID run: " + "; ".join(r.text for r in verdict.reasons)
                ruled_out.append(RuledOutSpec(strategy=e["strategy"], kind="invalid", why=why))
                untrusted.append(numbers)
            elif decision.outcome == "inconclusive":
                undecided.append(numbers)
            else:
                chosen.append(numbers)
        chosen.sort(key=_rank)
        winner = chosen[0] if chosen else None
        faster = [u for u in sorted(undecided, key=_rank) if winner is None or _rank(u) < _rank(winner)]
        answers.append(
            AnswerSpec(
                subject=subj,
                scenario=scen,
                network=net,
                constraint=label,
                p95_budget_ms=p95_ms,
                max_drop=max_drop,
                winner=winner,
                runner_ups=tuple(chosen[1:4]),
                undecided=tuple(faster),
                untrusted=tuple(sorted(untrusted, key=_rank)),
                ruled_out=tuple(sorted(ruled_out, key=_kind_order)),
                runs=len(entries),
                valid_runs=valid_runs,
                invalid_kinds=dict(kinds.most_common()),
            )
        )
    return answers


def _kind_order(r: RuledOutSpec) -> tuple[int, str]:
    return ("accuracy", "latency", "invalid", "errors").index(r.kind), r.strategy


def _constraint_label(p95_ms: float | None, max_drop: float) -> str:
    budget = f"p95 ≤ {p95_ms:g} ms, " if p95_ms is not None else "fastest, "
    points = max_drop * 100
    return f"{budget}within {points:g} point{'s' * (points != 1)}" if max_drop < 1 else f"{budget}any accuracy"


def standard_answers(summary: Mapping[str, Any]) -> list[AnswerSpec]:
    """The answers under ``ANSWER_CONSTRAINTS``, in the order the report and summary.json show them."""
    found = [a for name, budget, drop in ANSWER_CONSTRAINTS
             for a in answer(summary, p95_ms=budget, max_drop=drop, constraint=name)]  # fmt: skip
    return sorted(found, key=lambda a: (a.subject, a.scenario, a.network))


# ------------------------------------------------------------------------------------------ how it reads


def _drop_cell(decision: AccuracyDecisionSpec) -> str:
    drop = decision.drop
    if drop is None:
        return "0 (identity)" if decision.text == "the unmodified model" else f"– ({decision.text})"
    return f"{drop.value * 100:.1f} [{drop.low * 100:.1f}, {drop.high * 100:.1f}] ({drop.source})"


def kinds_text(kinds: Mapping[str, int]) -> str:
    """``6 × p50 CI unmet, 1 × throttled``."""
    return ", ".join(f"{count} × {kind}" for kind, count in kinds.items()) or "–"


def _also(a: AnswerSpec) -> str:
    parts = []
    if a.undecided:
        shown = ", ".join(f"{Strategy.parse(u.strategy).operator}@{u.placement} (p95 {u.p95_ms:.2f})"
                          for u in a.undecided[:2])  # fmt: skip
        parts.append(f"faster, accuracy undecided: {shown}")
    if a.winner is None and a.untrusted:
        parts.append(f"{a.untrusted[0].strategy} would, but its run is INVALID: rerun it")
    return "; ".join(parts) or "–"


def answer_rows(answers: Sequence[AnswerSpec]) -> list[list[str]]:
    """The answer table (``ANSWER_HEAD``), one row per answer: the report's first screen and ``recommend``'s."""
    rows = []
    for a in answers:
        w = a.winner
        rows.append([
            f"{a.subject} · {a.scenario} · {a.network}", a.constraint,
            f"{w.variant}@{w.placement}" if w else "none: no VALID strategy meets it",
            f"{w.p95_ms:.2f} [{w.p95_low_ms:.2f}, {w.p95_high_ms:.2f}]" if w else "–",
            _drop_cell(w.accuracy) if w else "–",
            f"{a.valid_runs} of {a.runs}", kinds_text(a.invalid_kinds), _also(a),
        ])  # fmt: skip
    return rows


def explain(a: AnswerSpec, *, runner_ups: int = 3) -> list[str]:
    """The answer in sentences: the winner as ``use <subject>.<variant>@<placement>`` (scripts read that
    phrase), its runner-ups, what is undecided and what was ruled out."""
    head = f"{a.subject} · {a.scenario} · network {a.network} · {a.constraint}"

    def line(n: StrategyNumbersSpec) -> str:
        return (f"{n.strategy}: p95 {n.p95_ms:.2f} ms [{n.p95_low_ms:.2f}–{n.p95_high_ms:.2f}], "
                f"p50 {n.p50_ms:.2f} ms, accuracy {n.accuracy.text}")  # fmt: skip

    if a.winner is None:
        lines = [f"{head}: no VALID strategy meets the constraint; closest misses:",
                 *(f"  {r.strategy}: {r.why}" for r in a.ruled_out[:5])]  # fmt: skip
        if a.untrusted:
            lines.append(f"  {a.untrusted[0].strategy} would, but its run is INVALID: rerun it before trusting it")
    else:
        best = a.winner
        lines = [f"{head}: use {line(best)}"]
        for n in a.runner_ups[:runner_ups]:
            overlap = n.p95_low_ms <= best.p95_high_ms
            lines.append(f"  runner-up {line(n)}" + ("  (p95 CI overlaps the winner's)" if overlap else ""))
    lines += [f"  undecided {line(n)}" for n in a.undecided]
    if a.ruled_out:
        shown = "; ".join(f"{r.strategy}: {r.why}" for r in a.ruled_out[:3])
        lines.append(f"  {len(a.ruled_out)} ruled out, e.g. {shown}")
    return lines
