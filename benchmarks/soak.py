"""The soak benchmark (``make bench-soak``, with the stack up): does the stack stay the same under load?

First the strategy's capacity is measured (``offline``, ``--concurrency`` closed loops, ``--capacity-s``
seconds: answered requests per second). Then it runs for ``--minutes`` at ``--load`` (80 %) of that
capacity as Poisson arrivals (``server``), while every tier's resident memory is read from its
``/tierlab/status`` every ``--sample-s`` seconds. Reported: each tier's RSS slope (least squares, MiB per
minute, and what it would add over an hour), the error rate, and the p50/p99 of each minute — p99 drift is
the last two minutes' p99 over the first two's (after the first minute, which warms the caches).
Goals: RSS slope under ``RSS_SLOPE_GOAL_MIB_PER_MIN`` on every tier, errors under ``ERROR_RATE_GOAL``,
p99 drift within ±``P99_DRIFT_GOAL``. Both phases are loadgen experiments: their folders stay under
``results/`` for the report. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadgen.__main__ import main as loadgen_main
from loadgen.records import read_records
from loadgen.target import STATE_FILE, Stack

RSS_SLOPE_GOAL_MIB_PER_MIN = 1.0
ERROR_RATE_GOAL = 0.001
P99_DRIFT_GOAL = 0.20
_ENDLESS = 10_000_000  # a sample count no run reaches: the run lasts its max_duration_s


def _spec(name: str, strategy: str, scenario: dict[str, Any], duration_s: float) -> dict[str, Any]:
    model, placement = strategy.split("@")
    subject, variant = model.split(".", 1)
    return {
        "name": name,
        "selections": [{"subject": subject, "variants": [variant], "placements": [placement]}],
        "scenarios": [scenario],
        "networks": ["lan"],
        "warmup_requests": 20,
        "stopping": {"min_samples": _ENDLESS, "max_samples": _ENDLESS, "max_duration_s": duration_s},
        "request_timeout_s": 10,
    }


def _run(spec: dict[str, Any], results: Path, run_id: str) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(spec, handle)
    if loadgen_main(["run", "--spec", handle.name, "--results", str(results), "--run-id", run_id]) != 0:
        sys.exit(f"the {spec['name']} run failed: see {results / run_id}")
    return read_records(results / run_id)


class RssSampler(threading.Thread):
    """Every tier's resident MiB, every ``interval_s``, as (seconds since start, MiB) per tier."""

    def __init__(self, stack: Stack, interval_s: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.stack, self.interval_s = stack, interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {t: [] for t in stack.urls}
        self.stopping = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopping.wait(self.interval_s):
            for tier in self.stack.urls:
                try:
                    rss = self.stack.status(tier).memory.rss_mib
                except Exception:  # a tier that does not answer is a gap here: the errors show it
                    continue
                self.samples[tier].append((time.monotonic() - started, rss))


def rss_slopes(samples: dict[str, list[tuple[float, float]]]) -> dict[str, float | None]:
    """Least-squares MiB per minute per tier (None with fewer than three samples)."""
    slopes: dict[str, float | None] = {}
    for tier, points in samples.items():
        if len(points) < 3:
            slopes[tier] = None
            continue
        seconds, mib = np.array(points).T
        slopes[tier] = round(float(np.polyfit(seconds / 60.0, mib, 1)[0]), 4)
    return slopes


def per_minute(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """p50, p99, requests and errors of each whole minute of the run (by intended send time)."""
    minutes: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r["intended_ms"] is not None:
            minutes.setdefault(int(r["intended_ms"] // 60_000), []).append(r)
    rows = []
    for minute in sorted(minutes):
        rs = minutes[minute]
        ok = [r["latency_ms"] for r in rs if r["status"] == 200]
        p50, p99 = np.percentile(ok, [50, 99]) if ok else (np.nan, np.nan)
        rows.append({"minute": minute, "requests": len(rs), "errors": len(rs) - len(ok),
                     "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fmnist-resnet.partition3@M-E-C", help="model@placement")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured capacity")
    parser.add_argument("--concurrency", type=int, default=4, help="closed loops of the capacity run")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--results", default="results")
    args = parser.parse_args()

    results, stamp = Path(args.results), time.strftime("%Y%m%d-%H%M%S")
    stack = Stack.from_state(STATE_FILE)
    stack.check_ready()
    offline = {"kind": "offline", "concurrency": args.concurrency}
    records = _run(_spec("soak-capacity", args.strategy, offline, args.capacity_s), results, f"{stamp}-soak-capacity")
    ok = [r for r in records if r["status"] == 200]
    span_s = (max(r["end_ms"] for r in ok) - min(r["intended_ms"] for r in ok)) / 1e3
    capacity_rps = len(ok) / span_s
    rate_rps = round(args.load * capacity_rps, 2)
    print(f"capacity of {args.strategy}: {capacity_rps:.1f} req/s at {args.concurrency} in flight; "
          f"soaking at {rate_rps:g} req/s ({args.load:.0%}) for {args.minutes:g} min")  # fmt: skip

    sampler = RssSampler(stack, args.sample_s)
    sampler.start()
    server = {"kind": "server", "rate_rps": rate_rps}
    soak_s = args.minutes * 60.0
    records = _run(_spec("soak", args.strategy, server, soak_s), results, f"{stamp}-soak")
    sampler.stopping.set()
    sampler.join()

    minutes = [m for m in per_minute(records) if m["minute"] < int(soak_s // 60)]  # whole minutes only
    errors = sum(1 for r in records if r["status"] != 200)
    error_rate = errors / len(records) if records else 1.0
    slopes = rss_slopes(sampler.samples)
    settled = minutes[1:]  # the first minute warms caches and pools
    first, last = settled[:2], settled[-2:]
    drift = (
        float(np.mean([m["p99_ms"] for m in last]) / np.mean([m["p99_ms"] for m in first]) - 1.0)
        if len(settled) >= 4 else None
    )  # fmt: skip

    print(f"{'minute':>6} {'requests':>9} {'errors':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for m in minutes:
        print(f"{m['minute']:>6} {m['requests']:>9} {m['errors']:>7} {m['p50_ms']:>9.3f} {m['p99_ms']:>9.3f}")
    for tier, slope in slopes.items():
        points = sampler.samples[tier]
        span = f"{points[0][1]:.1f} → {points[-1][1]:.1f} MiB" if points else "no samples"
        per_hour = f"{slope * 60:+.1f} MiB/h" if slope is not None else "-"
        print(f"RSS {tier:<6} {span}, slope {slope if slope is not None else '-'} MiB/min ({per_hour})")
    shown = "-" if drift is None else f"{drift:+.1%}"
    print(
        f"errors {errors} of {len(records)} ({error_rate:.3%}); p99 drift {shown} (last two minutes vs the "
        "first two after the first)"
    )
    goals = {
        "rss_slope": all(s is not None and s < RSS_SLOPE_GOAL_MIB_PER_MIN for s in slopes.values()),
        "error_rate": error_rate < ERROR_RATE_GOAL,
        "p99_drift": drift is not None and abs(drift) <= P99_DRIFT_GOAL,
    }
    print(json.dumps({
        "benchmark": "soak", "strategy": args.strategy, "runtime": stack.runtime,
        "capacity_rps": round(capacity_rps, 2), "rate_rps": rate_rps, "minutes": args.minutes,
        "requests": len(records), "error_rate": round(error_rate, 6),
        "rss_slope_mib_per_min": slopes, "p99_drift": None if drift is None else round(drift, 4),
        "per_minute": minutes, "goals_met": goals,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
