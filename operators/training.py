"""One training loop for every torch model here: classifiers, segmenters, students, QAT and pruned nets.

``fit`` runs AdamW with a one-cycle schedule over a budget of items (not epochs), so a build's cost is
set by the settings, and reports progress through a callback. The loss is cross-entropy on the targets
— per item for classes, per pixel for segmentation — optionally blended with knowledge distillation
from a teacher's logits (Hinton et al.: KL at temperature T, scaled by T²).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from operators.data import Samples

Progress = Callable[[int], None]  # called with the number of items just trained on


@dataclass(frozen=True)
class FitSettings:
    items: int  # how many training items to show, in total
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0  # distillation
    alpha: float = 0.7  # share of the distillation term
    seed: int = 0


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, settings: FitSettings
) -> torch.Tensor:
    t = settings.temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t
    if student.ndim > 2:  # per-pixel logits: average the KL over pixels as cross-entropy does
        soft = soft / float(np.prod(student.shape[2:]))
    return settings.alpha * soft + (1 - settings.alpha) * F.cross_entropy(student, targets)


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
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = max(1, settings.items // settings.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
    call = forward or model
    model.train()
    for _ in range(steps):
        index = rng.integers(0, len(samples), settings.batch)
        inputs = {k: torch.from_numpy(v[index]) for k, v in samples.inputs.items()}
        targets = torch.from_numpy(samples.targets[index])
        logits = call(**inputs)
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
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, samples: Samples, batch: int = 256, forward: Callable[..., torch.Tensor] | None = None
) -> np.ndarray:
    call = forward or model
    model.eval()
    outputs = []
    for start in range(0, len(samples), batch):
        inputs = {k: torch.from_numpy(v[start : start + batch]) for k, v in samples.inputs.items()}
        outputs.append(call(**inputs).numpy())
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
