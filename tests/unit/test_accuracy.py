"""Accuracy decisions: pooled over a variant's runs, paired with identity, backed by the offline evaluation of the
whole split, decided at 95 % confidence — and the stopping rule for bimodal (early-exit) latencies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from loadgen import stats
from loadgen.accuracy import decide, variant_accuracies
from loadgen.convergence import convergence
from loadgen.planning import placement_offset
from loadgen.recommend import answer
from loadgen.summary import summarise
from services.contracts.decisions import DropSpec
from services.contracts.scoring import OfflineOutcomes, confusion, outcomes_of

SPLIT = 1500
PLACEMENTS = ("M", "E", "C", "M-E", "M-C")
RUN_ITEMS = 200


def _windows() -> dict[str, range]:
    """The items each placement's runs answer (each placement starts at its own place, as the runner does)."""
    return {p: range(placement_offset(p, SPLIT), placement_offset(p, SPLIT) + RUN_ITEMS) for p in PLACEMENTS}


def _record(strategy: tuple[str, str], seq: int, sample_id: int, correct: bool, latency_ms: float) -> dict[str, Any]:
    variant, placement = strategy
    return {"run": f"s.{variant}@{placement}|single-stream|paper", "subject": "s",
            "strategy": f"s.{variant}@{placement}", "variant": variant, "placement": placement,
            "scenario": "single-stream", "network": "paper", "seq": seq, "sample_id": sample_id,
            "intended_ms": seq * 10.0, "start_ms": seq * 10.0, "end_ms": seq * 10.0 + latency_ms,
            "latency_ms": latency_ms, "service_ms": latency_ms, "lag_ms": 0.0, "status": 200, "hops": 0,
            "exit_stage": 0, "exited_early": False, "correct": correct, "bytes_out": 3136}  # fmt: skip


def _noisy_matrix() -> tuple[dict[str, np.ndarray], list[dict[str, Any]], dict[str, float]]:
    """Identity at 91.3 % offline; distill 1.5 points below it, qat 0.9 above, on the same 1,500 items. The runs
    answer 200 items each, and the items of identity@C happen to be easy (95 %) while those of distill@M hold
    some of its losses (86.5 %): a per-run rule against the best identity run sees distill 8.5 points down."""
    win = _windows()
    identity = np.ones(SPLIT, dtype=bool)
    outside = [i for i in range(SPLIT) if not any(i in w for w in win.values())]
    wrong = [*win["M"][:23], *win["C"][:10], *outside[:97]]
    identity[wrong] = False
    distill = identity.copy()
    distill[[*win["M"][23:27], *outside[200:236]]] = False  # 40 items it gets wrong that identity got right
    distill[outside[:17]] = True  # 17 it gets right that identity got wrong
    qat = identity.copy()
    qat[outside[17:30]] = True
    correct = {"identity": identity, "distill": distill, "qat": qat}
    latency = {("identity", "M"): 4.0, ("identity", "E"): 3.1, ("identity", "C"): 9.0, ("identity", "M-E"): 5.0,
               ("identity", "M-C"): 8.0, ("distill", "M"): 1.96, ("distill", "E"): 2.9, ("distill", "C"): 8.5,
               ("distill", "M-E"): 3.5, ("distill", "M-C"): 7.0, ("qat", "M"): 2.7, ("qat", "E"): 2.58,
               ("qat", "C"): 8.8, ("qat", "M-E"): 4.0, ("qat", "M-C"): 7.5}  # fmt: skip
    records = []
    jitter = np.random.default_rng(0)
    for (variant, placement), p95 in latency.items():
        for seq, item in enumerate(win[placement]):
            spread = float(jitter.uniform(0.9, 1.0))  # p95 close to the stated value
            records.append(_record((variant, placement), seq, item, bool(correct[variant][item]), p95 * spread))
    per_run = {f"{v}@{p}": float(np.mean([r["correct"] for r in records if (r["variant"], r["placement"]) == (v, p)]))
               for v, p in latency}  # fmt: skip
    return correct, records, per_run


def test_pooled_paired_accuracy_holds_a_decision_that_per_run_noise_would_flip() -> None:
    correct, records, per_run = _noisy_matrix()
    # the old rule: a run's accuracy against the best identity run; it rules distill out at 3 points
    best_identity = max(a for k, a in per_run.items() if k.startswith("identity@"))
    assert best_identity - per_run["distill@M"] > 0.03
    offline = {("s", v): OfflineOutcomes("accuracy", np.zeros(SPLIT, dtype=np.int64), correct=c)
               for v, c in correct.items()}  # fmt: skip
    runs = {r["run"]: {"run": r["run"], "stop_reason": "p50 and p95 95 % CIs within ±5%", "duration_s": 2.0,
                       "requested": {"scenario_kind": "single-stream", "min_samples": 50, "max_samples": 300,
                                     "ci_rel_width": 0.05}} for r in records}  # fmt: skip
    network: dict[str, Any] = {"problems": [], "problems_after": [], "speed_problems_before": [],
                               "speed_problems_after": []}  # fmt: skip
    summary = summarise(records, "noisy", runs=runs, networks={"paper": network}, offline=offline)
    assert all(e["verdict"]["valid"] for e in summary["strategies"])
    accuracy = {v["variant"]: v for v in summary["variants"]}
    drop = DropSpec.model_validate(accuracy["distill"]["drop"])
    assert drop.source == "offline" and drop.n == SPLIT  # the runs cover 1,000 items: the whole split decides
    assert drop.value == pytest.approx(23 / SPLIT, abs=1e-4) and drop.high < 0.03
    assert accuracy["distill"]["flag"] is None and accuracy["identity"]["deployed"]["n"] == 1000
    (within_3,) = answer(summary, p95_ms=None, max_drop=0.03)
    assert within_3.winner is not None and within_3.winner.strategy == "s.distill@M", within_3
    assert "s.distill@M" not in {r.strategy for r in within_3.ruled_out}
    # the summary's own answer for "within 3 points" is the same (one function answers everywhere)
    kept = [a for a in summary["answers"] if a["constraint"] == "fastest, within 3 points"]
    assert kept[0]["winner"]["strategy"] == "s.distill@M"


def test_a_deployment_that_computes_something_else_is_flagged_and_decided_on_its_requests() -> None:
    correct, records, _ = _noisy_matrix()
    broken = [{**r, "correct": False} if r["variant"] == "qat" and r["sample_id"] % 4 == 0 else r for r in records]
    offline = {("s", v): OfflineOutcomes("accuracy", np.zeros(SPLIT, dtype=np.int64), correct=c)
               for v, c in correct.items()}  # fmt: skip
    found = variant_accuracies(broken, offline, {("s", "identity"), ("s", "qat")})
    qat = found[("s", "qat")]
    assert qat.flag is not None and "does not compute what was evaluated" in qat.flag
    assert qat.drop is not None and qat.drop.source == "deployed" and qat.drop.value > 0.15
    assert found[("s", "identity")].flag is None


def test_decisions_within_beyond_and_inconclusive_with_the_items_that_would_decide() -> None:
    def drop(value: float, half: float) -> DropSpec:
        return DropSpec(value=value, low=value - half, high=value + half, n=1500, source="offline", split_items=1500)

    assert decide(drop(0.015, 0.007), 0.03).outcome == "within"
    assert decide(drop(0.05, 0.01), 0.03).outcome == "beyond"
    undecided = decide(drop(0.02, 0.013), 0.03)
    assert undecided.outcome == "inconclusive" and undecided.more_items is not None
    # the interval narrows as 1/√n: 1,500 × (1.3/1.0)² ≈ 2,535 items decide it, 1,035 more than measured
    assert undecided.more_items == pytest.approx(1035, abs=2) and "the evaluation split holds 1,500" in undecided.text
    assert decide(None, 0.03).outcome == "unscored"


def test_newcombes_paired_interval_covers_the_true_drop_95_times_in_100() -> None:
    rng = np.random.default_rng(7)
    truth, covered, trials = 0.015, 0, 2000
    for _ in range(trials):  # 300 paired items: both right 85 %, only identity right 4 %, only variant 2.5 %
        cells = rng.multinomial(300, [0.85, 0.04, 0.025, 0.085])
        _, low, high = stats.newcombe_paired(*map(int, cells))
        covered += low <= truth <= high
    assert 0.93 <= covered / trials <= 0.975
    theta, low, high = stats.newcombe_paired(180, 0, 0, 20)  # no discordant pair: an interval, not a point
    assert theta == 0 and low < -0.005 and high > 0.005


def test_a_segmenter_drop_is_paired_over_items_in_miou() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, size=(120, 8, 8))
    good = np.eye(3)[targets].transpose(0, 3, 1, 2) * 5.0  # the right class scores highest everywhere
    worse = good.copy()
    worse[:20, :, :2, :] = np.roll(worse[:20, :, :2, :], 1, axis=1)  # a fifth of the items lose two rows
    base = outcomes_of("miou", good, targets, np.zeros(120, dtype=np.int64))
    lesser = outcomes_of("miou", worse, targets, np.zeros(120, dtype=np.int64))
    assert base.metric_on(np.arange(120)) == 1.0 and base.confusion is not None
    assert np.array_equal(base.confusion, confusion(targets, targets, 3))
    found = variant_accuracies([], {("seg", "identity"): base, ("seg", "sptq"): lesser}, {("seg", "identity"),
                                                                                        ("seg", "sptq")})  # fmt: skip
    drop = found[("seg", "sptq")].drop
    assert drop is not None and drop.source == "offline" and 0 < drop.low <= drop.value <= drop.high


def test_the_stopping_rule_converges_on_a_bimodal_latency_and_says_which_rule() -> None:
    rng = np.random.default_rng(3)
    stage = rng.random(300) < 0.5  # half the requests exit at stage 0 (2 ms), half answer at stage 1 (4 ms)
    latencies = np.where(stage, rng.normal(2.0, 0.05, 300), rng.normal(4.0, 0.1, 300))
    modes = np.where(stage, 0, 1)
    pooled = convergence(latencies, None, 0.05)
    assert pooled.rule == "quantiles" and not pooled.met  # the p50 sits between the modes
    judged = convergence(latencies, modes, 0.05)
    assert judged.rule == "modes" and judged.met and set(judged.half_widths) == {"p50 of stage 0", "p50 of stage 1"}
    assert judged.exit_rate is not None and 0.4 < judged.exit_rate[0] < 0.6
    rare = np.where(np.arange(300) < 6, 0, 1)  # 2 % exits: one mode, judged by its quantiles
    assert convergence(latencies, rare, 0.05).rule == "quantiles"
