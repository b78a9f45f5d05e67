"""A subject's trained models and their cache: the teacher, and the models QAT, pruning and distillation train
from it (the white-box steps), each exported once to ONNX under ``models/<subject>/_work/``.

They are keyed by what shapes a trained model — the subject, the build settings, the dataset split and the
source of this module and everything it imports (``operators.sources``) — and not by the black-box
operators, the evaluation or the manifest, so a change there re-makes the variants from these files without
training anything again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from operators import whitebox
from operators.data import Samples, SplitData
from operators.nets import ConvNet
from operators.sources import hash_of, sources_of
from operators.subjects import BuildSettings, Subject
from operators.training import Progress, export_onnx, predict

WORK_DIR = "_work"


def training_sources() -> list[Path]:
    """The source files that shape a trained model: this module and what it imports."""
    return sources_of([Path(__file__)])


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainedModels:
    """The white-box models of one subject at one setting, trained on first use and cached on disk."""

    subject: Subject
    settings: BuildSettings
    split: SplitData
    root: Path
    progress: Callable[[str, int], Progress]
    code: str = field(default_factory=lambda: hash_of(training_sources()))
    _nets: dict[str, nn.Module] = field(default_factory=dict)
    _teacher_logits: tuple[Samples, np.ndarray] | None = None

    @property
    def work(self) -> Path:
        return self.root / self.subject.name / WORK_DIR

    def key(self) -> str:
        return key_of(self.subject.name, self.settings.key(), self.split.record, self.code)

    def example(self) -> dict[str, np.ndarray]:
        return {k: v[:1] for k, v in self.split.train.inputs.items()}

    def teacher(self) -> nn.Module:
        """The trained subject model, cached on disk (white-box results are cached as their ONNX)."""
        if "teacher" not in self._nets:
            path = self.work / f"teacher-{self.key()}.pt"
            if path.exists():
                model = torch.load(path, weights_only=False)
            else:
                model = self._train("teacher")
                self.work.mkdir(parents=True, exist_ok=True)
                torch.save(model, path)
            self._nets["teacher"] = model.eval()
        return self._nets["teacher"]

    def teacher_logits(self) -> tuple[Samples, np.ndarray]:
        """The training items distillation draws from (the first ``student_items``) and the teacher's logits on
        them, computed once per build: structured pruning's recovery draws from the same (one pass over 40,000
        items cost ResNeXt about a minute on 2 cores; each step made its own before)."""
        if self._teacher_logits is None:
            train = self.split.train.head(self.subject.student_items(self.settings))
            self._teacher_logits = (train, predict(self.teacher(), train))
        return self._teacher_logits

    def _progress(self, label: str, items: int) -> Progress:
        return self.progress(f"{self.subject.name}: {label}", items)

    def _train(self, kind: str) -> nn.Module:
        s, split, subject = self.settings, self.split, self.subject
        tune_items = subject.items(s.finetune_items)
        finetune = subject.fit_settings(tune_items, s, subject.lr / 10)
        if kind == "teacher":
            return subject.train_teacher(split, s, self._progress("training the model", subject.items(s.train_items)))
        teacher = self.teacher()
        if kind == "qat":  # only adapting to quantization noise: a gentler rate than pruning's recovery
            finetune = replace(finetune, lr=subject.lr / 30)
            return whitebox.qat(
                teacher, split.train, finetune, self._progress("quantization-aware training", tune_items)
            )
        if kind == "prune":
            model, _ = whitebox.prune_unstructured(
                teacher, split.train, finetune, self._progress("pruning", tune_items)
            )
            return model
        if kind == "prune-structured":
            if not isinstance(teacher, ConvNet):
                raise ValueError(f"structured pruning needs a ConvNet; {subject.name} is {type(teacher).__name__}")
            recovery = replace(
                finetune, items=round(tune_items * subject.structured_recovery), lr=subject.lr / 3, alpha=0.5
            )
            train, logits = self.teacher_logits()
            return whitebox.prune_structured(
                teacher, train, recovery, logits, self._progress("structured pruning", recovery.items)
            )
        if kind == "distill":
            train, logits = self.teacher_logits()
            items = subject.student_items(s)
            return subject.train_student(train, logits, s, self._progress("distilling a student", items))
        raise ValueError(f"unknown white-box step {kind}")

    def onnx_of(self, kind: str) -> onnx.ModelProto:
        path = self.work / f"{kind}-{self.key()}.onnx"
        if not path.exists():
            model = self.teacher() if kind == "teacher" else self._train(kind)
            export_onnx(model, self.example(), path)
        return onnx.load(str(path))
