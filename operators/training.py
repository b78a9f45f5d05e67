"""One training loop for every torch model here: classifiers, segmenters, students, QAT and pruned nets.

``fit`` runs AdamW with a one-cycle schedule over a budget of items (not epochs), so a build's cost is
set by the settings, and reports progress through a callback. Token sequences train in length buckets, each
batch cut to its longest text (see ``batch_indices``). The loss is cross-entropy on the targets
— per item for classes, per pixel for segmentation — optionally blended with knowledge distillation
from a teacher's logits (Hinton et al.: KL at temperature T, scaled by T²). On a CPU with bfloat16 units
the forward pass runs under bfloat16 autocast (see ``training_precision``); weights, optimizer and loss stay
float32, and so does everything exported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from operators.data import Samples

Progress = Callable[[int], None]  # called with the number of items just trained on
# batches per pool sorted by length (as Hugging Face's ``group_by_length`` sorts its mega-batches)
LENGTH_POOL_BATCHES = 50
PRECISIONS = ("float32", "bfloat16")
PRECISION_ENV = "TIERLAB_TRAIN_PRECISION"


@dataclass(frozen=True)
class FitSettings:
    items: int  # how many training items to show, in total
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0  # distillation
    alpha: float = 0.7  # share of the distillation term
    seed: int = 0
    # layer-wise rate decay (discriminative fine-tuning, Howard & Ruder 2018): a model with ``layer_groups()``
    # gets lr × decay^depth per group, depth 0 at the head; 1.0 = one rate for every parameter
    layer_decay: float = 1.0
    precision: str = "float32"  # of the forward pass: "bfloat16" runs it under autocast


def bf16_supported() -> bool:
    """Whether this CPU has bfloat16 units: x86's AVX-512 BF16 or AMX tiles. (oneDNN's own check,
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported``, also says yes on plain AVX-512, where it emulates
    bfloat16.) torch has no public call for either; these are the ones ``torch.cpu`` keeps."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_precision() -> str:
    """The precision ``make models`` trains in: ``$TIERLAB_TRAIN_PRECISION`` (float32, bfloat16 or auto, the
    default); auto is bfloat16 where the CPU has bfloat16 units, else float32 (emulated bfloat16 is slower).

    Measured side by side (1 thread, an AMD EPYC with AVX-512 BF16; ``make bench-training`` runs the same
    steps): training items/s float32 → bfloat16, ResNet 179 → 332 (×1.85), ResNeXt 163 → 316 (×1.94), the
    segmenter 45.2 → 82.1 (×1.82), MiniLM at 34 tokens 30.5 → 51.3 (×1.68). Builds on CPUs with and
    without bfloat16 units train to slightly different weights; the precision is part of the build's key."""
    chosen = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if chosen == "auto":
        return "bfloat16" if bf16_supported() else "float32"
    if chosen not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={chosen!r}: use one of auto, {', '.join(PRECISIONS)}")
    return chosen


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, settings: FitSettings
) -> torch.Tensor:
    t = settings.temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
    if student.ndim > 2:  # per-pixel logits: average the KL over pixels as cross-entropy does
        soft = soft / float(np.prod(student.shape[2:]))
    return settings.alpha * soft + (1 - settings.alpha) * F.cross_entropy(student, targets)


def memory_format(samples: Samples) -> torch.memory_format:
    """channels_last for image batches: oneDNN's convolutions train 1.1–1.4× more items per second on it
    (`make bench-training`, 1 thread, medians of 3 rounds: ResNet 235 → 259 items/s, ResNeXt 183 → 235,
    the segmenter 59.7 → 82.9); the same numbers, only the layout of the activations differs."""
    images = any(v.ndim == 4 for v in samples.inputs.values())
    return torch.channels_last if images else torch.contiguous_format


def to_layout(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """``model.to(memory_format=layout)``, in place (the keyword is missing from torch's type stubs)."""
    moved: nn.Module = model.to(memory_format=layout)  # type: ignore[call-overload]
    return moved


def sequence_lengths(inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Tokens per item for token sequences (an ``attention_mask`` input, padded at the end); None otherwise."""
    mask = inputs.get("attention_mask")
    return mask.sum(axis=1) if mask is not None and mask.ndim == 2 else None


def batch_indices(samples: Samples, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Each step's items, drawn with replacement. Token sequences are drawn a pool of ``LENGTH_POOL_BATCHES``
    batches at a time, sorted by length, cut into batches and shuffled, so a batch holds texts of about one
    length and ``_batch`` can cut it to its longest. Measured on the fortunes teacher (FULL, 1 thread, two
    fits side by side): mean width 64 → 33.6–33.9 tokens, fit 506–510 → 267–281 s (×1.87); calibration
    accuracy over seeds 0–2 80.59 → 81.56 % on average, evaluation 78.88 → 78.75 %."""
    lengths = sequence_lengths(samples.inputs)
    while lengths is None:
        yield rng.integers(0, len(samples), batch)
    while True:
        pool = rng.integers(0, len(samples), batch * LENGTH_POOL_BATCHES)
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        chunks = [pool[start : start + batch] for start in range(0, len(pool), batch)]
        rng.shuffle(chunks)
        yield from chunks


def _batch(samples: Samples, index: np.ndarray | slice, layout: torch.memory_format) -> dict[str, torch.Tensor]:
    """The items at ``index`` as tensors: images in ``layout``, token sequences cut to the longest of them (the
    rest is padding, which the attention mask already hides)."""
    picked = {name: values[index] for name, values in samples.inputs.items()}
    lengths = sequence_lengths(picked)
    if lengths is not None:
        width = int(lengths.max())
        picked = {name: np.ascontiguousarray(v[:, :width]) if v.ndim == 2 else v for name, v in picked.items()}
    return {
        name: torch.from_numpy(v).contiguous(memory_format=layout if v.ndim == 4 else torch.contiguous_format)
        for name, v in picked.items()
    }


def parameter_groups(model: nn.Module, settings: FitSettings) -> list[dict[str, Any]]:
    """One group at ``settings.lr``, or (with a layer decay) one per ``model.layer_groups()``, head first."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    layer_groups = getattr(model, "layer_groups", None)
    if settings.layer_decay == 1.0 or layer_groups is None:
        return [{"params": trainable, "lr": settings.lr}]
    groups: list[dict[str, Any]] = []
    for depth, parameters in enumerate(layer_groups()):
        wanted = [p for p in parameters if p.requires_grad]
        if wanted:
            groups.append({"params": wanted, "lr": settings.lr * settings.layer_decay**depth})
    grouped = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in trainable if id(p) not in grouped]
    if rest:
        groups.append({"params": rest, "lr": settings.lr})
    return groups


def fit(
    model: nn.Module,
    samples: Samples,
    settings: FitSettings,
    *,
    teacher_logits: np.ndarray | None = None,
    progress: Progress | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``settings.items`` items drawn from ``samples``; returns it in eval mode."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    groups = parameter_groups(model, settings)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = max(1, settings.items // settings.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[float(g["lr"]) for g in groups],
        total_steps=steps,
        pct_start=0.15,
    )
    call = forward or model
    layout = memory_format(samples)
    to_layout(model, layout)
    model.train()
    batches = batch_indices(samples, settings.batch, rng)
    bf16 = settings.precision == "bfloat16"
    for _ in range(steps):
        index = next(batches)
        inputs = _batch(samples, index, layout)
        targets = torch.from_numpy(samples.targets[index])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = call(**inputs).float()
        if teacher_logits is None:
            loss = F.cross_entropy(logits, targets)
        else:
            loss = distillation_loss(logits, torch.from_numpy(teacher_logits[index]), targets, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(settings.batch)
    return to_layout(model, torch.contiguous_format).eval()  # saved and exported as it always was


@torch.no_grad()
def predict(
    model: nn.Module, samples: Samples, batch: int = 256, forward: Callable[..., torch.Tensor] | None = None
) -> np.ndarray:
    call = forward or model
    layout = memory_format(samples)
    to_layout(model, layout).eval()
    outputs = []
    for start in range(0, len(samples), batch):
        outputs.append(call(**_batch(samples, slice(start, start + batch), layout)).contiguous().numpy())
    to_layout(model, torch.contiguous_format)
    return np.concatenate(outputs)


def export_onnx(
    model: nn.Module, example: dict[str, np.ndarray], path: Path, output: str = "logits", dynamic_batch: bool = True
) -> Path:
    """TorchScript ONNX export at opset 17 (the dynamo exporter fails on int8 QDQ).

    With a dynamic batch by default; ``dynamic_batch=False`` exports as the exporter does by default, the
    batch fixed to the example's first dimension of 1 (what users' own exports often look like).
    """
    names = list(example)
    args = tuple(torch.from_numpy(example[n][:1]) for n in names)
    dynamic = {n: {0: "batch"} for n in [*names, output]} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=[output],
            dynamic_axes=dynamic,
        )
    return path
