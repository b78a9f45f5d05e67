"""Run verdicts: each rule that makes a run INVALID, and a clean run VALID (pure functions of documents)."""

from __future__ import annotations

from typing import Any

import pytest

from loadgen.verdict import judge, tiers_used
from services.contracts.decisions import VerdictSpec

REQUESTED = {"scenario_kind": "single-stream", "rate_rps": None, "min_samples": 100, "max_samples": 2000,
             "max_duration_s": 60.0, "ci_rel_width": 0.05}  # fmt: skip


def _entry(**changes: Any) -> dict[str, Any]:
    entry = {"run": "r", "placement": "E", "scenario": "single-stream", "n": 300, "error_rate": 0.0,
             "throughput_rps": 100.0, "lag_ms_p99": 0.2,
             "latency_ms": {"p50": 10.0, "p50_low": 9.8, "p50_high": 10.2, "p95": 20.0, "p95_low": 19.0,
                            "p95_high": 21.0}}  # fmt: skip
    return {**entry, **changes}


def _info(**changes: Any) -> dict[str, Any]:
    info = {"stop_reason": "p50 and p95 95 % CIs within ±5%", "duration_s": 3.0, "requested": REQUESTED,
            "loadgen_cpu": 0.3, "cpu_throttling": {}}  # fmt: skip
    return {**info, **changes}


CLEAN_NETWORK: dict[str, Any] = {"problems": [], "problems_after": [], "speed_problems_before": [],
                                 "speed_problems_after": []}  # fmt: skip


def test_a_clean_run_is_valid_with_requested_and_effective_settings() -> None:
    verdict = judge(_entry(), _info(), CLEAN_NETWORK)
    assert verdict.valid and verdict.label == "VALID" and verdict.reasons == ()
    assert verdict.requested["max_samples"] == 2000
    assert verdict.effective["samples"] == 300 and verdict.effective["ci_met"] is True


@pytest.mark.parametrize(
    ("entry", "info", "network", "reason"),
    [
        (
            _entry(latency_ms={"p50": 10.0, "p50_low": 9.0, "p50_high": 11.0}),
            _info(stop_reason="max_duration_s (60 s)"),
            CLEAN_NETWORK,
            "with the p50 CI ±10%, wider than the ±0.05 asked",
        ),
        (_entry(error_rate=0.05), _info(), CLEAN_NETWORK, "5.0% of requests failed"),
        (
            _entry(lag_ms_p99=20.0),
            _info(requested={**REQUESTED, "scenario_kind": "server", "rate_rps": 100.0}),
            CLEAN_NETWORK,
            "lagged its schedule",
        ),
        (
            _entry(throughput_rps=50.0),
            _info(requested={**REQUESTED, "scenario_kind": "server", "rate_rps": 100.0}),
            CLEAN_NETWORK,
            "delivered 50.0 req/s of the 100",
        ),
        (_entry(), _info(), {**CLEAN_NETWORK, "problems_after": ["edge-cloud: RTT p50 9 ms"]}, "link fidelity after"),
        (
            _entry(),
            _info(),
            {**CLEAN_NETWORK, "speed_problems_before": ["edge: calibration p50 9 ms"]},
            "speed fidelity before",
        ),
        (
            _entry(),
            _info(cpu_throttling={"edge": {"periods": 100, "throttled_periods": 30, "throttled_s": 0.4}}),
            CLEAN_NETWORK,
            "edge CFS-throttled in 30% of periods",
        ),
        (_entry(), _info(loadgen_cpu=0.97), CLEAN_NETWORK, "the loadgen used 97% of a core"),
        (_entry(), None, CLEAN_NETWORK, "did not finish"),
    ],
)
def test_each_rule_makes_a_run_invalid_with_its_reason(
    entry: dict[str, Any], info: dict[str, Any] | None, network: dict[str, Any], reason: str
) -> None:
    verdict = judge(entry, info, network)
    assert not verdict.valid and verdict.label == "INVALID"
    assert any(reason in r.text for r in verdict.reasons), verdict.reasons


def test_problems_of_tiers_a_run_does_not_use_do_not_count() -> None:
    network = {**CLEAN_NETWORK, "speed_problems_before": ["cloud: calibration p50 9 ms"]}
    throttled = {"cloud": {"periods": 100, "throttled_periods": 90, "throttled_s": 2.0}}
    assert judge(_entry(placement="E"), _info(cpu_throttling=throttled), network).valid
    assert not judge(_entry(placement="M-C"), _info(cpu_throttling=throttled), network).valid
    assert tiers_used("E-C") == ["mobile", "edge", "cloud"] and tiers_used("M") == ["mobile"]


def test_throttling_under_load_is_a_note_and_fixed_sample_counts_need_no_ci() -> None:
    load = {**REQUESTED, "scenario_kind": "offline", "min_samples": 50, "max_samples": 50}
    throttled = {"edge": {"periods": 100, "throttled_periods": 60, "throttled_s": 1.0}}
    verdict = judge(_entry(), _info(requested=load, stop_reason="max_samples (50)", cpu_throttling=throttled),
                    CLEAN_NETWORK)  # fmt: skip
    assert verdict.valid and any("CFS-throttled" in n for n in verdict.notes)
    assert judge(_entry(), _info(), None).notes == (
        "links and device speed not measured for this network (sweep cell)",
    )


def test_a_wide_tail_ci_is_noted_while_a_settled_median_keeps_the_run_valid() -> None:
    wide_tail = {"p50": 10.0, "p50_low": 9.8, "p50_high": 10.2, "p95": 20.0, "p95_low": 14.0, "p95_high": 26.0}
    verdict = judge(_entry(latency_ms=wide_tail), _info(stop_reason="max_samples (300)"), CLEAN_NETWORK)
    assert verdict.valid and verdict.effective["ci_rel_half_width"] == {"p50": 0.02, "p95": 0.3}
    assert any("p95 CI ±30%" in n for n in verdict.notes), verdict.notes


def test_an_oom_killed_tier_makes_its_runs_invalid_and_is_noted_elsewhere() -> None:
    memory = {
        t: {"rss_mib": 150.0, "peak_rss_mib": p, "free_mib": 800.0} for t, p in (("mobile", 212.0), ("edge", 180.5))
    }
    killed = _info(oom_killed=["edge"], unreachable=["edge"], memory_mib=memory)
    verdict = judge(_entry(placement="M-E"), killed, CLEAN_NETWORK)
    assert not verdict.valid and [r.text for r in verdict.reasons] == [
        "edge was OOM-killed during the run: the strategy does not fit its memory limit on this profile"
    ]
    assert [r.kind for r in verdict.reasons] == ["OOM-killed"]
    assert verdict.effective["peak_rss_mib"] == {"mobile": 212.0, "edge": 180.5}
    elsewhere = judge(_entry(placement="M"), killed, CLEAN_NETWORK)  # edge was not on this run's path
    assert elsewhere.valid and any("edge was OOM-killed" in n for n in elsewhere.notes)
    silent = judge(_entry(placement="E"), _info(unreachable=["edge"]), CLEAN_NETWORK)
    assert [r.text for r in silent.reasons] == ["edge stopped answering during the run"]


def test_a_bimodal_run_is_judged_on_its_mean_and_each_modes_median() -> None:
    """An early-exit run whose p50 sits between its two modes: its p50 CI is wide, yet the run converged by the
    rule for two modes (each mode's p50 within the width asked) and stays VALID; a mode still wide is not."""
    wide_p50 = {"p50": 10.0, "p50_low": 7.0, "p50_high": 13.0, "p95": 20.0, "p95_low": 19.0, "p95_high": 21.0}
    widths = {"p50 of stage 0": 0.02, "p50 of stage 1": 0.04}
    converged = {"rule": "modes", "half_widths": widths}
    verdict = judge(_entry(latency_ms=wide_p50, convergence=converged), _info(stop_reason="max_samples (300)"),
                    CLEAN_NETWORK)  # fmt: skip
    assert verdict.valid, verdict.reasons
    assert verdict.effective["convergence"]["rule"] == "modes"
    unsettled = {"rule": "modes", "half_widths": {**widths, "p50 of stage 1": 0.12}}
    verdict = judge(_entry(latency_ms=wide_p50, convergence=unsettled), _info(stop_reason="max_samples (300)"),
                    CLEAN_NETWORK)  # fmt: skip
    assert not verdict.valid and [r.kind for r in verdict.reasons] == ["CI unmet (bimodal)"]
    assert "p50 of stage 1 ±12%" in verdict.reasons[0].text


def test_verdicts_written_before_reasons_had_kinds_still_read() -> None:
    old = {"label": "INVALID", "valid": False, "reasons": ["lagged"], "notes": [], "requested": {}, "effective": {}}
    verdict = VerdictSpec.model_validate(old)
    assert verdict.reasons[0].kind == "other" and verdict.reasons[0].text == "lagged" and verdict.label == "INVALID"
