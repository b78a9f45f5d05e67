"""Offline accuracy of a variant: its stage ONNX files run in-process on the evaluation split.

The cascade is what a tier does for single-item requests: each item exits at the first head whose
confidence (:func:`services.contracts.manifest.max_softmax`) reaches the threshold, else it goes on.
Metrics come with a 95 % confidence interval: Wilson's score interval for accuracy, a percentile
bootstrap (1,000 resamples, seeded) for macro-F1 and mIoU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from operators.data import Samples
from services.contracts.manifest import AccuracySpec, ExitCurvePoint, ManifestSpec, max_softmax
from services.contracts.scoring import OfflineOutcomes, confusion, miou_of, outcomes_of

BATCH = 128
BOOTSTRAP_RESAMPLES = 1000
CURVE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)
_Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def macro_f1(predictions: np.ndarray, targets: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = np.sum((predictions == c) & (targets == c))
        fp = np.sum((predictions == c) & (targets != c))
        fn = np.sum((predictions != c) & (targets == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def bootstrap_interval(statistic: object, n: int, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over resamples of ``range(n)``."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(BOOTSTRAP_RESAMPLES)]  # type: ignore[operator]
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def score(logits: np.ndarray, targets: np.ndarray, metric: str) -> AccuracySpec:
    """The subject's metric on final logits (N×K for classes, N×K×H×W for pixels) with its 95 % CI."""
    classes = logits.shape[1]
    predictions = logits.argmax(axis=1)
    n = len(targets)
    if metric == "miou":
        matrices = confusion(predictions, targets, classes)
        value = miou_of(matrices.sum(axis=0))
        pixel_accuracy = float(np.mean((predictions == targets)[targets < classes]))
        ci = bootstrap_interval(lambda idx: miou_of(matrices[idx].sum(axis=0)), n)
        return AccuracySpec(metric="miou", value=value, ci95=ci, n=n, others={"pixel_accuracy": pixel_accuracy})
    correct = predictions == targets
    f1 = macro_f1(predictions, targets, classes)
    others = {"macro_f1": f1}
    if metric == "macro_f1":
        ci = bootstrap_interval(lambda idx: macro_f1(predictions[idx], targets[idx], classes), n)
        return AccuracySpec(metric="macro_f1", value=f1, ci95=ci, n=n, others={"accuracy": float(correct.mean())})
    return AccuracySpec(
        metric="accuracy", value=float(correct.mean()), ci95=wilson_interval(int(correct.sum()), n), n=n, others=others
    )


@dataclass(frozen=True)
class StageRun:
    session: ort.InferenceSession
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    exit_output: str | None


BUILD_THREADS_ENV = "TIERLAB_BUILD_THREADS"  # a build worker's share of the cores (operators.build, jobs > 1)


def build_threads() -> int:
    """onnxruntime threads for the build's own sessions: the worker's share, or 0 (every core)."""
    return int(os.environ.get(BUILD_THREADS_ENV, "0"))


def load_stages(manifest: ManifestSpec, folder: Path, threads: int | None = None) -> list[StageRun]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = build_threads() if threads is None else threads
    options.log_severity_level = 3
    runs = []
    for stage in manifest.stages:
        session = ort.InferenceSession(str(folder / stage.file), options, providers=["CPUExecutionProvider"])
        runs.append(
            StageRun(
                session,
                tuple(t.name for t in stage.inputs),
                tuple(t.name for t in stage.outputs),
                stage.exit.output if stage.exit else None,
            )
        )
    return runs


@dataclass(frozen=True)
class CascadeTrace:
    """Per item: the final logits had no head exited, and each head's logits (evaluated on every item)."""

    final: np.ndarray
    heads: list[np.ndarray]


def trace(stages: Sequence[StageRun], samples: Samples, final_output: str) -> CascadeTrace:
    """Run every item through every stage (exit heads included), keeping what each head said."""
    finals: list[np.ndarray] = []
    heads: list[list[np.ndarray]] = [[] for s in stages if s.exit_output]
    # a model exported with a fixed batch (its first input's first dimension) runs in chunks of exactly that size
    first = stages[0].session.get_inputs()[0].shape[0] if stages else None
    batch = first if isinstance(first, int) and first > 0 else BATCH
    for start in range(0, len(samples), batch):
        tensors = {k: v[start : start + batch] for k, v in samples.inputs.items()}
        head_index = 0
        for stage in stages:
            outputs = stage.session.run(list(stage.outputs), {n: tensors[n] for n in stage.inputs})
            tensors = dict(zip(stage.outputs, outputs, strict=True))
            if stage.exit_output:
                heads[head_index].append(tensors[stage.exit_output])
                head_index += 1
        finals.append(tensors[final_output])
    return CascadeTrace(np.concatenate(finals), [np.concatenate(h) for h in heads])


def cascade(trace_: CascadeTrace, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The logits each item is answered with at ``threshold``, and the index of the stage that answered."""
    logits = trace_.final.copy()
    answered_by = np.full(len(logits), len(trace_.heads), dtype=np.int64)
    pending = np.ones(len(logits), dtype=bool)
    for index, head in enumerate(trace_.heads):
        leave = pending & (max_softmax(head) >= threshold)
        logits[leave] = head[leave]
        answered_by[leave] = index
        pending &= ~leave
    return logits, answered_by


@dataclass(frozen=True)
class Evaluation:
    """A variant's offline metric with its CI, its exit curve (with exit heads) and what each item got."""

    accuracy: AccuracySpec
    curve: tuple[ExitCurvePoint, ...]
    outcomes: OfflineOutcomes


def evaluate(manifest: ManifestSpec, folder: Path, samples: Samples, metric: str) -> Evaluation:
    """The variant's metric at its heads' thresholds, and (with exit heads) the curve over thresholds."""
    final = manifest.outputs[0].name
    traced = trace(load_stages(manifest, folder), samples, final)
    thresholds = [s.exit.threshold for s in manifest.stages if s.exit]
    threshold = thresholds[0] if thresholds else 1.0
    logits, answered_by = cascade(traced, threshold)
    accuracy = score(logits, samples.targets, metric)
    outcomes = outcomes_of(metric, logits, samples.targets, answered_by)
    if not traced.heads:
        return Evaluation(accuracy, (), outcomes)
    curve = []
    for t in sorted({*CURVE_THRESHOLDS, threshold}):
        at, answered_at = cascade(traced, t)
        metric_value = (
            float(np.mean(at.argmax(axis=1) == samples.targets))
            if metric == "accuracy"
            else score(at, samples.targets, metric).value
        )
        curve.append(
            ExitCurvePoint(threshold=t, metric=metric_value, exit_rate=float(np.mean(answered_at < len(traced.heads))))
        )
    return Evaluation(accuracy, tuple(curve), outcomes)


def choose_threshold(traced: CascadeTrace, targets: np.ndarray, full_accuracy: float, tolerance: float) -> float:
    """The lowest threshold whose cascade accuracy stays within ``tolerance`` of the full model (calibration)."""
    for t in sorted(CURVE_THRESHOLDS):
        logits, _ = cascade(traced, t)
        if float(np.mean(logits.argmax(axis=1) == targets)) >= full_accuracy - tolerance:
            return t
    return 1.0
