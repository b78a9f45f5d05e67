"""When a run's latency statistics are as narrow as asked: the rule a run stops by, and the one its verdict
judges by, so the two always agree on what "converged" means.

- **quantiles** (one latency mode): the 95 % bootstrap CIs of p50 and p95 each within ±``width`` of the
  estimate (like MLPerf's early stopping, a statement about percentiles, not the mean).
- **modes** (a bimodal latency: an early-exit variant answers from its exit head or from its last stage, two
  clusters of times): a percentile that falls between the clusters moves with the exit rate and its CI never
  narrows, so the rule judges what is stable instead — each mode's own p50 CI within ±``width`` (a mode counts
  when it holds at least ``MIN_MODE_SHARE`` of the answers, and needs 10 of them). The mix of the modes is the
  exit rate, a property of the items served rather than of the system: it is reported with its Wilson CI (and
  the variant's offline exit rate over the whole split is in its manifest), not waited for. A mean was tried
  first and does not settle either: measured on `make bench SPEC=studies`, the mean of quantized early exit on
  M-E was still ±15 % after 300 requests, the spread of its exit rate (±6 points) times the gap between modes.

Numpy only: the loadgen image runs the stopping rule without scipy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loadgen.stats import percentile_ci, wilson

MIN_MODE_SHARE = 0.05
Rule = Literal["quantiles", "modes"]


@dataclass(frozen=True)
class Convergence:
    """Which rule applies, each statistic's 95 % CI half-width relative to its estimate, and whether all are
    within the width asked."""

    rule: Rule
    half_widths: dict[str, float]
    width: float
    exit_rate: tuple[float, float, float] | None = None  # share answered before the last stage, with its CI

    @property
    def met(self) -> bool:
        return all(w <= self.width for w in self.half_widths.values())

    def widths_text(self) -> str:
        """``p50 ±4 %, p95 ±9 %`` or ``p50 of stage 0 ±2 %, p50 of stage 1 ±3 %``."""
        return ", ".join(f"{name} ±{w:.0%}" for name, w in self.half_widths.items())

    def stop_reason(self) -> str:
        if self.rule == "quantiles":
            return f"p50 and p95 95 % CIs within ±{self.width:.0%}"
        rate = (
            f", exit rate {self.exit_rate[0]:.2f} [{self.exit_rate[1]:.2f}, {self.exit_rate[2]:.2f}]"
            if self.exit_rate
            else ""
        )
        return f"bimodal: each mode's p50 95 % CI within ±{self.width:.0%}{rate}"


def _relative(estimate: float, low: float, high: float) -> float:
    return (high - low) / 2 / estimate if estimate > 0 else math.inf


def convergence(
    latencies_ms: np.ndarray, modes: np.ndarray | None, width: float, *, resamples: int = 1000, seed: int = 0
) -> Convergence:
    """The rule for these latencies (``modes``: the answering stage of each, -1 when unknown) and its widths."""
    latencies_ms = np.asarray(latencies_ms, dtype=np.float64)
    counts = Counter(int(m) for m in modes if m >= 0) if modes is not None else Counter()
    answered = sum(counts.values())
    significant = sorted(m for m, c in counts.items() if c >= MIN_MODE_SHARE * answered)
    if len(latencies_ms) < 2:
        return Convergence("quantiles", {"p50": math.inf, "p95": math.inf}, width)
    if len(significant) < 2:
        widths = {}
        for q in (50.0, 95.0):
            estimate, low, high = percentile_ci(latencies_ms, q, resamples=resamples, seed=seed)
            widths[f"p{q:g}"] = round(_relative(estimate, low, high), 4)
        return Convergence("quantiles", widths, width)
    assert modes is not None
    widths = {}
    for mode in significant:
        chosen = latencies_ms[modes == mode]
        if len(chosen) < 10:
            widths[f"p50 of stage {mode}"] = math.inf
            continue
        estimate, low, high = percentile_ci(chosen, 50.0, resamples=resamples, seed=seed)
        widths[f"p50 of stage {mode}"] = round(_relative(estimate, low, high), 4)
    last = max(counts)
    exits = answered - counts[last]
    return Convergence("modes", widths, width, wilson(exits, answered))
