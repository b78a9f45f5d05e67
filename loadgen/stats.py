"""Statistics a run's verdict and an experiment's decisions rest on: percentiles with bootstrap CIs,
proportions with Wilson CIs, Kruskal-Wallis + Dunn post-hoc (Holm) and Cliff's δ for latency, exact McNemar
and Newcombe's interval for paired accuracy, paired bootstraps and t intervals for other metrics.

Library tests where they exist (scipy, scikit-posthocs); by hand only Cliff's δ (a two-line statistic
with no well-kept package) and its words (Romano et al. 2006 thresholds), Wilson's interval (a formula) and
Newcombe's paired-difference interval (scipy and statsmodels give McNemar's test but no interval for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

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


def newcombe_paired(both: int, only_first: int, only_second: int, neither: int) -> tuple[float, float, float]:
    """First proportion minus second on paired items, with Newcombe's (1998) method-10 95 % interval."""
    n = both + only_first + only_second + neither
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    _, l1, u1 = wilson(both + only_first, n)
    _, l2, u2 = wilson(both + only_second, n)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return theta, theta - delta, theta + epsilon


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float, float]:
    """``statistic`` of the items ``0…n-1`` and its paired percentile-bootstrap 95 % interval (items resampled)."""
    from scipy import stats

    items = np.arange(n)
    result = stats.bootstrap(
        (items,), statistic, vectorized=False, n_resamples=resamples, confidence_level=level,
        method="percentile", random_state=np.random.default_rng(0),
    )  # fmt: skip
    return statistic(items), float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(values: np.ndarray, *, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of per-item values (per-image IoU, or paired differences of them) with its t interval."""
    from scipy import stats

    mean = float(values.mean())
    if len(values) < 2 or not np.any(values != values[0]):
        return mean, mean, mean
    half = float(stats.sem(values)) * float(stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return mean, mean - half, mean + half


def paired_t_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of a paired t-test of ``a`` against ``b``; 1.0 when they are identical item by item."""
    from scipy import stats

    if len(a) < 2 or not np.any(a != b):
        return 1.0
    return float(stats.ttest_rel(a, b).pvalue)


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
