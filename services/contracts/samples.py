"""The sample library: a subject's evaluation split, written by the operators build, read by the loadgen.

One ``evaluation.npz`` per subject folder (``models/<subject>/evaluation.npz``): each model input as
``input:<name>`` (row-aligned), the targets (class ids, or per-pixel labels for segmentation), and the
split record (seed, sizes, sha256 of the indices) so a run can say exactly which samples it used. Sample
ids are row numbers within this file. A library without labels (targets all ``UNLABELLED``) serves latency
only; segmentation pixels marked ``IGNORE_LABEL`` are not scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.contracts.errors import ConfigError

SAMPLES_FILENAME = "evaluation.npz"
_INPUT_PREFIX = "input:"
# the target of every sample of a library built without labels (``byo`` with no dataset: latency only)
UNLABELLED = -1
# a segmentation mask's pixels that are not scored (VOC's "void" border)
IGNORE_LABEL = 255


@dataclass(frozen=True)
class SampleSet:
    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    record: dict[str, Any]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def labelled(self) -> bool:
        return not (self.targets.ndim == 1 and bool(np.all(self.targets == UNLABELLED)))

    def item(self, sample_id: int) -> dict[str, np.ndarray]:
        """One sample as a batch of one, by input name."""
        return {name: values[sample_id : sample_id + 1] for name, values in self.inputs.items()}


def write_samples(folder: Path, inputs: dict[str, np.ndarray], targets: np.ndarray, record: dict[str, Any]) -> Path:
    path = folder / SAMPLES_FILENAME
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{_INPUT_PREFIX}{k}": np.ascontiguousarray(v) for k, v in inputs.items()}
    np.savez(path, targets=targets, record=np.array(json.dumps(record)), **arrays)  # type: ignore[arg-type]
    return path


def load_samples(folder: Path) -> SampleSet:
    path = folder / SAMPLES_FILENAME
    try:
        with np.load(path) as data:
            inputs = {k.removeprefix(_INPUT_PREFIX): data[k] for k in data.files if k.startswith(_INPUT_PREFIX)}
            return SampleSet(inputs, data["targets"], json.loads(str(data["record"])))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: run `make models` (it writes each subject's evaluation split)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
