"""Statistics a run's verdict rests on: percentiles with bootstrap CIs, proportions with Wilson CIs,
Kruskal-Wallis + Dunn post-hoc (Holm) and Cliff's δ for latency, exact McNemar for paired accuracy.

Library tests where they exist (scipy, scikit-posthocs); by hand only Cliff's δ (a two-line statistic
with no well-kept package) and its words (Romano et al. 2006 thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
Values = Sequence[float] | np.ndarray
_Z95 = 1.959963984540054


def percentile_ci(
    samples: np.ndarray, q: float, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """The ``q``-th percentile and its percentile-bootstrap CI."""
    samples = np.asarray(samples, dtype=np.float64)
    estimate = float(np.percentile(samples, q))
    if len(samples) < 2:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(samples), size=(resamples, len(samples)))
    boot = np.percentile(samples[picks], q, axis=1)
    tail = (1 - level) / 2 * 100
    return estimate, float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


def latency_summary(samples_ms: Values, *, seed: int = 0) -> dict[str, float]:
    """p50/p90/p95/p99 with 95 % CIs, mean and max, in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    out: dict[str, float] = {"n": float(len(values))}
    if not len(values):
        return out
    for q in PERCENTILES:
        est, low, high = percentile_ci(values, q, seed=seed)
        key = f"p{q:g}"
        out[key], out[f"{key}_low"], out[f"{key}_high"] = round(est, 4), round(low, 4), round(high, 4)
    out["mean"] = round(float(values.mean()), 4)
    out["max"] = round(float(values.max()), 4)
    return out


def wilson(successes: int, n: int) -> tuple[float, float, float]:
    """Proportion and its Wilson score 95 % interval."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    z2 = _Z95 * _Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def cliffs_delta(a: Values, b: Values) -> float:
    """P(a > b) − P(a < b) over all pairs: +1 when every ``a`` is larger (slower)."""
    x, y = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(x) or not len(y):
        return math.nan
    greater = np.searchsorted(y, x, side="left").sum()  # pairs with y < x
    less = (len(y) - np.searchsorted(y, x, side="right")).sum()  # pairs with y > x
    return float((greater - less) / (len(x) * len(y)))


def delta_words(delta: float) -> str:
    """Romano et al. (2006): |δ| < 0.147 negligible, < 0.33 small, < 0.474 medium, else large."""
    size = abs(delta)
    if math.isnan(size):
        return "unknown"
    if size < 0.147:
        return "negligible"
    if size < 0.33:
        return "small"
    if size < 0.474:
        return "medium"
    return "large"


def kruskal(groups: Mapping[str, Values]) -> tuple[float, float]:
    """Kruskal-Wallis H and p across the groups (at least two with data)."""
    from scipy import stats

    usable = [np.asarray(v) for v in groups.values() if len(v)]
    if len(usable) < 2:
        return math.nan, math.nan
    result = stats.kruskal(*usable)
    return float(result.statistic), float(result.pvalue)


def dunn_holm(groups: Mapping[str, Values]) -> dict[tuple[str, str], float]:
    """Dunn's post-hoc p-values for every pair, Holm-adjusted (scikit-posthocs)."""
    import scikit_posthocs as sp

    names = [k for k, v in groups.items() if len(v)]
    if len(names) < 2:
        return {}
    table = sp.posthoc_dunn([np.asarray(groups[k]) for k in names], p_adjust="holm")
    values = table.to_numpy()
    return {(a, b): float(values[i, j]) for i, a in enumerate(names) for j, b in enumerate(names) if i != j}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar on paired outcomes: (a right & b wrong, a wrong & b right, two-sided p)."""
    from scipy import stats

    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names on the front of (latency lower is better, accuracy higher is better)."""
    ordered = sorted(points, key=lambda p: (p[1], -p[2]))
    front, best_accuracy = [], -math.inf
    for name, _, accuracy in ordered:
        if accuracy > best_accuracy:
            front.append(name)
            best_accuracy = accuracy
    return front
