"""Bring your own model: the black-box operators on any ONNX image classifier and a folder of images.

For example the ONNX model zoo's ResNet-50 with a folder ``images/<class>/<file>.jpg`` whose class
folders sort in the model's class order::

    python -m operators byo --onnx resnet50-v2-7.onnx --images imagenette/ --name resnet50 --width 224 --height 224

Every variant of ``BYO_VARIANTS`` lands in ``<out>/<name>/<variant>/`` with its manifest and accuracy, ready
to be served by the tiers. The images are split into train (exit heads), calibration (quantization,
exit thresholds) and evaluation (accuracy) by seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from operators.blackbox import BlackBoxContext, Draft
from operators.build import apply_chain, realise
from operators.data import image_folder_split
from operators.variants import VARIANTS
from services.contracts.manifest import ManifestSpec

BYO_VARIANTS = ("identity", "partition2", "partition3", "sptq", "dynq", "early-exit", "qee", "sptq-partition")


def byo(
    model_path: Path,
    images: Path,
    out: Path,
    *,
    name: str,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    operators: Sequence[str] | None = None,
    seed: int = 0,
    head_train_items: int = 2000,
    calibration_items: int = 256,
    evaluation_items: int = 5000,
) -> list[ManifestSpec]:
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model {model_path} does not exist")
    wanted = list(operators or BYO_VARIANTS)
    unsupported = [v for v in wanted if v not in BYO_VARIANTS]
    if unsupported:
        raise ValueError(f"byo applies only black-box variants {BYO_VARIANTS}, not {unsupported}")
    model = onnx.load(str(model_path))
    input_name = model.graph.input[0].name
    split = image_folder_split(images, input_name, size=size, mean=mean, std=std, seed=seed)
    context = BlackBoxContext(split, head_train_items, calibration_items, seed)
    built = []
    for variant in wanted:
        draft = apply_chain(Draft.of(model), VARIANTS[variant], context, lambda _step: None)
        built.append(
            realise(
                draft,
                out / name,
                name,
                variant,
                {"source": model_path.name},
                split=split,
                evaluation_items=evaluation_items,
                metric="accuracy",
            )
        )
    return built
