"""Which strategy for this constraint: from a results folder's ``summary.json``, the strategies whose p95
latency is within the budget and whose accuracy is within the allowed drop of the identity variant
(the unmodified model, measured in the same experiment), best first, with runner-ups and why the
others were ruled out. An INVALID run (``loadgen.verdict``) is never recommended: it is ruled out with
its verdict's reasons, and when only INVALID runs would meet the constraint the answer says so."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loadgen.spec import SWEEP_PREFIX


@dataclass(frozen=True)
class Recommendation:
    subject: str
    scenario: str
    network: str
    baseline_accuracy: float | None
    chosen: list[dict[str, Any]]
    ruled_out: list[tuple[str, str]]
    untrusted: list[dict[str, Any]]  # INVALID runs that would otherwise meet the constraint


def recommend(
    summary: dict[str, Any],
    *,
    p95_ms: float,
    max_accuracy_drop: float,
    subject: str | None = None,
    scenario: str | None = None,
    network: str | None = None,
) -> list[Recommendation]:
    """One verdict per (subject, scenario, network) group; ``max_accuracy_drop`` in points (0.01 = 1 point)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in summary["strategies"]:
        if e["network"].startswith(SWEEP_PREFIX):
            continue
        if (subject and e["subject"] != subject) or (scenario and e["scenario"] != scenario):
            continue
        if network and e["network"] != network:
            continue
        groups.setdefault((e["subject"], e["scenario"], e["network"]), []).append(e)
    verdicts = []
    for (subj, scen, net), entries in groups.items():
        identity = [e["accuracy"]["value"] for e in entries if e["variant"] == "identity" and e.get("accuracy")]
        baseline = max(identity) if identity else None
        chosen, ruled_out, untrusted = [], [], []
        for e in entries:
            p95 = e["latency_ms"].get("p95", math.inf)
            accuracy = e["accuracy"]["value"] if e.get("accuracy") else None
            verdict = e.get("verdict") or {"valid": True, "reasons": []}
            if e["error_rate"] > 0.01:
                ruled_out.append((e["strategy"], f"{e['error_rate']:.0%} of requests failed"))
            elif p95 > p95_ms:
                ruled_out.append((e["strategy"], f"p95 {p95:.1f} ms > {p95_ms:g} ms"))
            elif baseline is not None and accuracy is not None and baseline - accuracy > max_accuracy_drop:
                ruled_out.append(
                    (e["strategy"], f"accuracy {accuracy:.3f} is {baseline - accuracy:.3f} below identity")
                )
            elif not verdict["valid"]:
                ruled_out.append((e["strategy"], "INVALID run: " + "; ".join(verdict["reasons"])))
                untrusted.append(e)
            else:
                chosen.append(e)

        # fastest tail first; among equally fast (CIs overlap), the more accurate
        def rank(e: dict[str, Any]) -> tuple[float, float]:
            return e["latency_ms"]["p95"], -(e.get("accuracy") or {}).get("value", 0.0)

        chosen.sort(key=rank)
        untrusted.sort(key=rank)
        verdicts.append(Recommendation(subj, scen, net, baseline, chosen, sorted(ruled_out), untrusted))
    return verdicts


def explain(verdict: Recommendation, *, runner_ups: int = 3) -> list[str]:
    head = f"{verdict.subject} · {verdict.scenario} · network {verdict.network}"
    if not verdict.chosen:
        lines = [f"{head}: no VALID strategy meets the constraint; closest misses:",
                 *(f"  {s}: {why}" for s, why in verdict.ruled_out[:5])]  # fmt: skip
        if verdict.untrusted:
            lines.append(
                f"  {verdict.untrusted[0]['strategy']} would, but its run is INVALID: rerun it before trusting it"
            )
        return lines

    def line(e: dict[str, Any]) -> str:
        acc = e.get("accuracy")
        accuracy = f"{acc['metric']} {acc['value']:.3f} [{acc['low']:.3f}–{acc['high']:.3f}]" if acc else "no accuracy"
        lat = e["latency_ms"]
        return (f"{e['strategy']}: p95 {lat['p95']:.2f} ms [{lat['p95_low']:.2f}–{lat['p95_high']:.2f}], "
                f"p50 {lat['p50']:.2f} ms, {accuracy}")  # fmt: skip

    best = verdict.chosen[0]
    lines = [f"{head}: use {line(best)}"]
    for e in verdict.chosen[1 : 1 + runner_ups]:
        overlap = e["latency_ms"]["p95_low"] <= best["latency_ms"]["p95_high"]
        lines.append(f"  runner-up {line(e)}" + ("  (p95 CI overlaps the winner's)" if overlap else ""))
    lines.append(
        f"  {len(verdict.ruled_out)} ruled out, e.g. " + "; ".join(f"{s}: {w}" for s, w in verdict.ruled_out[:3])
    )
    return lines
