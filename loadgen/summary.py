"""From records to verdicts and answers: per-run summaries (latency percentiles with CIs, the convergence
rule and its widths, accuracy with CI, exit rate, errors, per-hop means, the run's VALID/INVALID verdict from
``loadgen.verdict``); per group of comparable runs (subject × scenario × network), Kruskal-Wallis with
Dunn/Holm and Cliff's δ against the fastest strategy, and exact McNemar against the identity variant on the
same samples; per variant, its accuracy pooled over its runs with its drop from identity
(``loadgen.accuracy``); and the answers under the standard constraints (``loadgen.recommend``). Everything in
``summary.json`` is computed here from ``records.csv``, ``runs.jsonl``, the bundle's fidelity and the
offline outcomes the experiment copied.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from loadgen import stats
from loadgen.accuracy import variant_accuracies
from loadgen.chaos import fault_rows
from loadgen.convergence import convergence
from loadgen.recommend import standard_answers
from loadgen.records import MAX_HOPS, by_run
from loadgen.spec import SweepSpec
from loadgen.verdict import judge
from services.contracts.runkey import SweepCell
from services.contracts.scoring import OfflineOutcomes

ALPHA = 0.05


def _hop_breakdown(ok: list[dict[str, Any]]) -> dict[str, float]:
    """Mean ms per request: compute by tier (the host's run and the pacing wait that makes it the device's),
    queue by tier, the serving wait a slow device is charged, transfer by link, and what is left (client,
    codec)."""
    parts: dict[str, float] = defaultdict(float)
    for r in ok:
        hops = int(r.get("hops") or 0)
        accounted = 0.0
        for i in range(min(hops, MAX_HOPS)):
            tier = r[f"hop{i}_tier"]
            compute, host = r[f"hop{i}_compute_ms"] or 0.0, r.get(f"hop{i}_host_ms")
            if host is None:  # records written before hops carried host and pacing time
                parts[f"compute {tier}"] += compute
            else:
                parts[f"compute {tier} (host)"] += host
                parts[f"pacing {tier}"] += max(0.0, compute - host)
            charge = r.get(f"hop{i}_serving_charge_ms") or 0.0
            parts[f"serving charge {tier}"] += charge
            parts[f"queue {tier}"] += r[f"hop{i}_queue_ms"] or 0.0
            accounted += compute + charge + (r[f"hop{i}_queue_ms"] or 0.0)
            if i + 1 < hops:
                transfer = (r[f"hop{i}_send_ms"] or 0.0) - (r[f"hop{i + 1}_total_ms"] or 0.0)
                parts[f"transfer {tier}→{r[f'hop{i + 1}_tier']}"] += transfer
                accounted += transfer
        parts["client + serving overhead"] += r["latency_ms"] - accounted
    return {k: round(v / len(ok), 4) for k, v in parts.items()} if ok else {}


def _emulation(ok: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per tier: its hops that computed, and how many of them the host alone ran longer than the device would
    have (``overran``: the emulation was slower than its device there)."""
    found: dict[str, dict[str, int]] = {}
    for r in ok:
        for i in range(min(int(r.get("hops") or 0), MAX_HOPS)):
            if r.get(f"hop{i}_first_stage") is None or r[f"hop{i}_first_stage"] < 0:
                continue  # a relay computes nothing
            counts = found.setdefault(r[f"hop{i}_tier"], {"hops": 0, "overran": 0})
            counts["hops"] += 1
            counts["overran"] += bool(r.get(f"hop{i}_overran"))
    return found


def summarise_run(records: list[dict[str, Any]], *, ci_rel_width: float = 0.05) -> dict[str, Any]:
    first = records[0]
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_ms"] for r in ok]
    modes = np.array([-1 if r.get("exit_stage") is None else int(r["exit_stage"]) for r in ok], dtype=np.int64)
    converged = convergence(np.asarray(latencies), modes, ci_rel_width)
    exit_rate = [round(v, 4) for v in converged.exit_rate] if converged.exit_rate else None
    # a request lost in flight when the loadgen was killed has a row but no times
    timed = [r for r in records if r["end_ms"] is not None] or [{"end_ms": 0.0, "intended_ms": 0.0, "lag_ms": 0.0}]
    span_s = (max(r["end_ms"] for r in timed) - min(r["intended_ms"] for r in timed)) / 1e3
    entry: dict[str, Any] = {
        key: first[key] for key in ("run", "subject", "strategy", "variant", "placement", "scenario", "network")
    }
    entry.update(
        n=len(records),
        errors=len(records) - len(ok),
        error_rate=round((len(records) - len(ok)) / len(records), 4),
        latency_ms=stats.latency_summary(latencies),
        lag_ms_p50=round(float(np.percentile([r["lag_ms"] for r in timed], 50)), 4),
        lag_ms_p99=round(float(np.percentile([r["lag_ms"] for r in timed], 99)), 4),
        throughput_rps=round(len(ok) / span_s, 3) if span_s > 0 else None,
        exit_rate=round(sum(1 for r in ok if r.get("exited_early")) / len(ok), 4) if ok else None,
        convergence={"rule": converged.rule, "half_widths": converged.half_widths, "exit_rate": exit_rate},
        emulation=_emulation(ok),
        bytes_out_mean=round(float(np.mean([r["bytes_out"] or 0 for r in records])), 1),
        breakdown_ms=_hop_breakdown(ok),
    )
    judged = [r for r in ok if r.get("correct") is not None]
    if judged:
        value, low, high = stats.wilson(sum(bool(r["correct"]) for r in judged), len(judged))
        entry["accuracy"] = {"metric": "accuracy", "value": value, "low": low, "high": high, "n": len(judged)}
    scored = [r["score"] for r in ok if r.get("score") is not None]
    if scored:
        mean, low, high = stats.mean_interval(np.asarray(scored))
        entry["accuracy"] = {"metric": "mIoU", "value": mean, "low": low, "high": high, "n": len(scored)}
    return entry


def _paired(records: list[dict[str, Any]]) -> dict[int, bool]:
    first: dict[int, bool] = {}
    for r in records:
        if r["status"] == 200 and r.get("correct") is not None:
            first.setdefault(int(r["sample_id"]), bool(r["correct"]))
    return first


def compare_group(entries: list[dict[str, Any]], records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    latencies = {e["strategy"]: [r["latency_ms"] for r in records[e["run"]] if r["status"] == 200] for e in entries}
    latencies = {k: v for k, v in latencies.items() if v}
    h, p_value = stats.kruskal(latencies)
    result: dict[str, Any] = {"kruskal_h": h, "kruskal_p": p_value, "vs_fastest": [], "accuracy_vs_identity": []}
    if len(latencies) >= 2:
        fastest = min(latencies, key=lambda k: float(np.median(latencies[k])))
        dunn = stats.dunn_holm(latencies)
        result["fastest"] = fastest
        for strategy, values in latencies.items():
            if strategy == fastest:
                continue
            delta = stats.cliffs_delta(values, latencies[fastest])
            p_holm = dunn.get((strategy, fastest), math.nan)
            words = (f"{stats.delta_words(delta)} effect (δ = {delta:+.2f}), slower than {fastest}"
                     if p_holm < ALPHA else f"not distinguishable from {fastest} (p = {p_holm:.2g})")  # fmt: skip
            result["vs_fastest"].append({"strategy": strategy, "p_holm": p_holm, "cliffs_delta": delta, "words": words})
    identity = next((e for e in entries if e["variant"] == "identity"), None)
    if identity is not None:
        base = _paired(records[identity["run"]])
        for e in entries:
            if e["variant"] == "identity":
                continue
            other = _paired(records[e["run"]])
            shared = sorted(set(base) & set(other))
            if not shared:
                continue
            only_base, only_other, p_mc = stats.mcnemar_exact([base[i] for i in shared], [other[i] for i in shared])
            diff = (only_other - only_base) / len(shared) * 100
            if p_mc < ALPHA:
                words = f"{abs(diff):.1f} points {'better' if diff > 0 else 'worse'} than identity (p = {p_mc:.2g})"
            else:
                words = f"no significant accuracy difference from identity (p = {p_mc:.2g})"
            result["accuracy_vs_identity"].append(
                {"strategy": e["strategy"], "pairs": len(shared), "only_identity_right": only_base,
                 "only_this_right": only_other, "p": p_mc, "words": words}
            )  # fmt: skip
    return result


def summarise(
    records: list[dict[str, Any]],
    run_id: str,
    sweep: SweepSpec | None = None,
    *,
    runs: dict[str, dict[str, Any]] | None = None,
    networks: dict[str, dict[str, Any]] | None = None,
    slo_ms: float | None = None,
    offline: Mapping[tuple[str, str], OfflineOutcomes] | None = None,
    devices: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything in ``summary.json``; ``runs`` are the ``runs.jsonl`` lines and ``networks`` the bundle's
    fidelity per network, which the verdicts need; runs with faults get their fault table (``loadgen.chaos``);
    ``offline`` the variants' offline outcomes (``loadgen.accuracy``), which accuracy decisions rest on with the
    pooled deployed requests; ``answers`` are the recommendations under ``recommend.ANSWER_CONSTRAINTS``."""
    grouped = dict(by_run(records))
    width = {key: (info.get("requested") or {}).get("ci_rel_width") for key, info in (runs or {}).items()}
    entries = [summarise_run(rs, ci_rel_width=width.get(key) or 0.05) for key, rs in grouped.items()]
    faults = []
    for e in entries:
        info = (runs or {}).get(e["run"]) or {}
        verdict = judge(e, info, (networks or {}).get(e["network"]), devices)
        e["verdict"] = verdict.model_dump(mode="json")
        if info.get("faults"):
            end_ms = float(info.get("duration_s") or 0.0) * 1e3
            rows = fault_rows(grouped[e["run"]], info["faults"], slo_ms=slo_ms, run_end_ms=end_ms)
            faults += [{"run": e["run"], "strategy": e["strategy"], "scenario": e["scenario"], **r} for r in rows]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        if not SweepCell.names(e["network"]):
            groups[(e["subject"], e["scenario"], e["network"])].append(e)
    comparisons = [
        {"subject": s, "scenario": sc, "network": n, **compare_group(es, grouped)} for (s, sc, n), es in groups.items()
    ]
    variants = variant_accuracies(records, offline or {}, {(e["subject"], e["variant"]) for e in entries})
    summary: dict[str, Any] = {
        "run_id": run_id,
        "strategies": entries,
        "variants": [v.model_dump(mode="json") for v in variants.values()],
        "comparisons": comparisons,
        "sweep": _sweep(entries, sweep),
        "faults": faults,
    }
    summary["answers"] = [a.model_dump(mode="json") for a in standard_answers(summary)]
    return summary


def _sweep(entries: list[dict[str, Any]], spec: SweepSpec | None) -> dict[str, Any] | None:
    cells = [e for e in entries if SweepCell.names(e["network"])]
    if not cells:
        return None
    rates = [(c.row_mbit_s, c.column_mbit_s) for c in (SweepCell.parse(e["network"]) for e in cells)]
    rows, columns = sorted({r for r, _ in rates}), sorted({c for _, c in rates})
    strategies = sorted({e["strategy"] for e in cells})
    p50 = {s: [[math.nan] * len(columns) for _ in rows] for s in strategies}
    for e, (row, column) in zip(cells, rates, strict=True):
        p50[e["strategy"]][rows.index(row)][columns.index(column)] = e["latency_ms"].get("p50", math.nan)
    best = [
        [min(strategies, key=lambda s: _nan_last(p50[s][i][j])) for j in range(len(columns))] for i in range(len(rows))
    ]
    return {
        "rows_link": spec.rows_link if spec else "rows link",
        "columns_link": spec.columns_link if spec else "columns link",
        "rows_rate_mbit": rows,
        "columns_rate_mbit": columns,
        "p50_ms": p50,
        "best": best,
    }


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value
