"""How an answer is scored against its sample's target, and the per-item outcomes of a variant's offline
evaluation: one definition that the loadgen (per deployed request) and the operators' evaluation (per item
of the evaluation split) share, so a variant's deployed answers and its offline answers compare item by item.

- Classification: the prediction is the arg-max class; an item is correct when it equals the target.
- Segmentation: per item, the mean IoU over the classes present in its prediction or its mask (pixels marked
  ``IGNORE_LABEL`` not scored); the subject's metric, mIoU, is computed from the summed pixel confusion
  matrices of a set of items (:func:`miou_of`), which is why the outcomes keep each item's matrix.

``outcomes.npz`` sits beside a variant's manifest (the manifest names it with its sha256): row ``i`` is sample
id ``i`` of the subject's sample library (``evaluation.npz``), so the loadgen pairs a deployed request with
the offline answer to the same item, and any two variants of a subject item by item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.contracts.errors import ConfigError
from services.contracts.samples import IGNORE_LABEL, UNLABELLED

OUTCOMES_FILENAME = "outcomes.npz"


@dataclass(frozen=True, slots=True)
class ItemScore:
    """One answer against its target: a class (classification) or a per-item IoU (segmentation)."""

    prediction: int | None = None
    target: int | None = None
    correct: bool | None = None
    score: float | None = None

    def columns(self) -> dict[str, int | float | bool]:
        """The fields that are set, as record columns."""
        return {k: v for k in self.__slots__ if (v := getattr(self, k)) is not None}


def item_iou(predicted: np.ndarray, target: np.ndarray) -> float | None:
    """Mean IoU over the classes in either map, scored pixels only; None when no pixel is scored."""
    scored = target != IGNORE_LABEL
    predicted, target = predicted[scored], target[scored]
    classes = np.union1d(np.unique(predicted), np.unique(target))
    if not len(classes):
        return None
    ious = [np.sum((predicted == c) & (target == c)) / np.sum((predicted == c) | (target == c)) for c in classes]
    return round(float(np.mean(ious)), 5)


def score_item(output: np.ndarray, target: np.ndarray) -> ItemScore:
    """Score one item's ``output`` (K class scores, or K×H×W per-pixel scores; no batch dimension)."""
    if target.ndim == 0:
        prediction = int(np.argmax(output.reshape(-1)))
        if int(target) == UNLABELLED:  # a latency-only sample library
            return ItemScore(prediction=prediction)
        return ItemScore(prediction=prediction, target=int(target), correct=prediction == int(target))
    return ItemScore(score=item_iou(np.argmax(output, axis=0), target))


def confusion(predictions: np.ndarray, targets: np.ndarray, classes: int) -> np.ndarray:
    """Per-item confusion matrices (items × classes × classes; rows the target), summed over pixels."""
    flat_p = predictions.reshape(len(predictions), -1)
    flat_t = targets.reshape(len(targets), -1)
    # pixels marked IGNORE_LABEL (or any value outside the classes) land in one extra bin, dropped
    index = np.where(flat_t < classes, flat_t * classes + flat_p, classes * classes)
    counts = np.stack([np.bincount(row, minlength=classes * classes + 1) for row in index])
    return counts[:, : classes * classes].reshape(-1, classes, classes)


def miou_of(matrix: np.ndarray) -> float:
    """mIoU of a summed confusion matrix, over the classes that occur in it."""
    intersection = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - intersection
    present = union > 0
    return float(np.mean(intersection[present] / union[present])) if present.any() else 0.0


@dataclass(frozen=True)
class OfflineOutcomes:
    """What a variant answered to every item of its subject's evaluation split (row = sample id): written by
    the operators' evaluation, read by the loadgen's accuracy decisions."""

    metric: str
    exit_stage: np.ndarray  # the stage whose answer was taken, per item
    correct: np.ndarray | None = None  # classification: bool per item
    confusion: np.ndarray | None = None  # segmentation: items × K × K pixel counts
    item_score: np.ndarray | None = None  # segmentation: the per-item IoU a deployed request is scored with

    def __len__(self) -> int:
        return len(self.exit_stage)

    def metric_on(self, items: np.ndarray) -> float:
        """The subject's metric over the items with these ids (repeats count, as a bootstrap draws them)."""
        if self.confusion is not None:
            return miou_of(self.confusion[items].sum(axis=0))
        assert self.correct is not None
        return float(self.correct[items].mean())

    def per_item(self) -> np.ndarray:
        """Each item's own outcome as a number: 1/0 for correct (classification), its IoU (segmentation)."""
        if self.item_score is not None:
            return self.item_score
        assert self.correct is not None
        return self.correct.astype(np.float64)


def outcomes_of(metric: str, logits: np.ndarray, targets: np.ndarray, exit_stage: np.ndarray) -> OfflineOutcomes:
    """The outcomes of answering with ``logits`` (N×K, or N×K×H×W for pixels) the items with ``targets``."""
    predictions = logits.argmax(axis=1)
    if logits.ndim == 2:
        return OfflineOutcomes(metric, exit_stage, correct=predictions == targets)
    scores = [item_iou(p, t) for p, t in zip(predictions, targets, strict=True)]
    return OfflineOutcomes(
        metric,
        exit_stage,
        confusion=confusion(predictions, targets, logits.shape[1]).astype(np.int32),
        item_score=np.array([np.nan if s is None else s for s in scores], dtype=np.float64),
    )


_ARRAYS = ("exit_stage", "correct", "confusion", "item_score")


def write_outcomes(folder: Path, outcomes: OfflineOutcomes) -> Path:
    path = folder / OUTCOMES_FILENAME
    arrays = {k: v for k in _ARRAYS if (v := getattr(outcomes, k)) is not None}
    np.savez_compressed(path, metric=np.array(outcomes.metric), **arrays)
    return path


def load_outcomes(path: Path) -> OfflineOutcomes:
    try:
        with np.load(path) as data:
            return OfflineOutcomes(
                str(data["metric"]),
                data["exit_stage"],
                **{k: data[k] for k in _ARRAYS[1:] if k in data.files},
            )
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: rebuild the variant (`make models`)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
