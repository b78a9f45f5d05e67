"""The profile's tier order in compute time, measured (``make bench-tiers``, with the stack up).

Runs the ``tiers`` experiment spec against the stack ``make up`` started — each default subject's
unmodified model alone on mobile, edge and cloud, one request at a time — in ``--rounds`` rounds; per
round and subject, takes each tier's median per-request compute (the hop that ran the model, from
``records.csv``) and the ratios mobile/edge and edge/cloud; compares the median over rounds with the
ratios of the tiers' device speeds (``bundle.json``). The tiers' runs follow one another, so a host
that speeds up or slows down in between moves one round's ratio; the median over rounds does not.
Goal: every ratio within ±10 % of the profile's, and mobile ≥ 1.3 × edge ≥ cloud on ``laptop``.
The speed ratio is the compute ratio only between tiers with as many onnxruntime threads; a pair with
different threads is shown without a goal.

``--folder`` (repeatable) analyses existing runs of the spec instead, one round each.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loadgen.__main__ import main as loadgen_main
from loadgen.records import read_records

TOLERANCE = 0.10
PAIRS = (("mobile", "edge"), ("edge", "cloud"))
PLACEMENT_TIER = {"M": "mobile", "E": "edge", "C": "cloud"}


def compute_ms(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """subject → tier → median compute of the hop on the tier its placement names (successful requests)."""
    samples: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["status"] != 200:
            continue
        subject, strategy = r["strategy"].split(".", 1)
        tier = PLACEMENT_TIER.get(strategy.rsplit("@", 1)[1])
        hop = next((i for i in range(int(r["hops"])) if r.get(f"hop{i}_tier") == tier), None)
        if tier is None or hop is None or not r[f"hop{hop}_compute_ms"]:
            continue
        samples.setdefault((subject, tier), []).append(r[f"hop{hop}_compute_ms"])
    medians: dict[str, dict[str, float]] = {}
    for (subject, tier), values in samples.items():
        medians.setdefault(subject, {})[tier] = round(statistics.median(values), 4)
    return medians


def compare(rounds: list[dict[str, dict[str, float]]], tiers: dict[str, Any]) -> list[dict[str, Any]]:
    """Each subject's ratio of every tier pair, the median over rounds, against its devices' speed ratio."""
    rows = []
    for subject in sorted({s for medians in rounds for s in medians}):
        for slow, fast in PAIRS:
            per_round = [
                m[subject][slow] / m[subject][fast]
                for m in rounds
                if slow in m.get(subject, {}) and fast in m.get(subject, {})
            ]
            if not per_round:
                continue
            expected = tiers[fast]["device"]["speed"] / tiers[slow]["device"]["speed"]
            same_threads = (
                tiers[slow]["onnxruntime"]["intra_op_threads"] == tiers[fast]["onnxruntime"]["intra_op_threads"]
            )
            measured = statistics.median(per_round)
            rows.append(
                {
                    "subject": subject,
                    "pair": f"{slow}/{fast}",
                    "compute_ms": [
                        round(statistics.median(m[subject][t] for m in rounds if t in m.get(subject, {})), 4)
                        for t in (slow, fast)
                    ],
                    "rounds": [round(r, 3) for r in per_round],
                    "measured": round(measured, 3),
                    "profile": round(expected, 3),
                    "off_pct": round(100 * (measured / expected - 1), 1),
                    "goal_met": abs(measured / expected - 1) <= TOLERANCE if same_threads else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", action="append", help="an existing results folder of the tiers spec")
    parser.add_argument("--rounds", type=int, default=3, help="runs of the spec when no --folder is given")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    folders = [Path(f) for f in args.folder or []]
    for i in range(0 if folders else args.rounds):
        run_id = time.strftime(f"%Y%m%d-%H%M%S-tier-order-{i + 1}")
        code = loadgen_main(["run", "--spec", "tiers", "--results", args.results, "--run-id", run_id])
        if code != 0:
            return code
        folders.append(Path(args.results) / run_id)
    tiers = json.loads((folders[0] / "bundle.json").read_text())["tiers"]
    rows = compare([compute_ms(read_records(folder)) for folder in folders], tiers)
    print(
        f"\nper-request compute (median) of the unmodified model, {len(folders)} round(s): "
        + ", ".join(map(str, folders))
    )
    print(
        f"{'subject':<17}{'pair':<14}{'compute ms':>16}{'rounds':>20}{'median':>8}{'profile':>9}{'off':>8}  goal ±10 %"
    )
    for row in rows:
        goal = {True: "met", False: "MISSED", None: "n/a (threads differ)"}[row["goal_met"]]
        slow_ms, fast_ms = row["compute_ms"]
        rounds = " ".join(f"{r:.2f}" for r in row["rounds"])
        print(
            f"{row['subject']:<17}{row['pair']:<14}{slow_ms:>8.2f} / {fast_ms:<5.2f}{rounds:>20}{row['measured']:>8.2f}"
            f"{row['profile']:>9.2f}{row['off_pct']:>+7.1f}%  {goal}"
        )
    print(json.dumps({"benchmark": "tier_order", "folders": list(map(str, folders)), "ratios": rows}))
    return 0 if all(row["goal_met"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
