"""Build every default variant of every subject into ``models/``, incrementally, with progress shown.

A variant is a chain of operators (``VARIANTS``): a white-box operator first, if any (it gives a new
torch model, exported to ONNX), then black-box operators on the ONNX draft. Each variant lands in
``models/<subject>/<variant>/`` with its stage files and a manifest holding its offline accuracy on
the evaluation split (95 % CI) and, with exit heads, its accuracy/exit-rate curve.

With ``jobs`` > 1 the subjects are built side by side in worker processes, the machine's cores shared
between them (``torch`` and onnxruntime get ``cores // jobs`` threads each): the small convolutions of the
default subjects gain little from a second thread, so two subjects on one core each finish sooner than
one after the other on two. The longest subjects start first.

Reruns are incremental: every artefact is keyed by a hash of what it is made from — the operators'
source, the settings, the dataset split, the chain — and a variant whose manifest carries the same
key and whose files verify is skipped. Trained torch models and their ONNX exports are cached under
``models/<subject>/_work/``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

import operators
from operators import whitebox
from operators.blackbox import BLACK_BOX, BlackBoxContext, Draft
from operators.data import Samples, SplitData
from operators.evaluate import BUILD_THREADS_ENV, evaluate
from operators.nets import ConvNet
from operators.subjects import SUBJECTS, BuildSettings, Subject
from operators.training import Progress, export_onnx, predict
from operators.variants import VARIANTS, WHITE_BOX
from services.contracts.errors import ConfigError
from services.contracts.manifest import (
    MANIFEST_FILENAME,
    ManifestSpec,
    load_manifest,
    verify_stage_files,
    write_manifest,
)
from services.contracts.samples import write_samples
from services.contracts.variant import StageModel, write_variant

WORK_DIR = "_work"
# code that shapes no artefact: the command line and the bring-your-own entry
_NOT_IN_ARTEFACTS = {"__main__.py", "byo.py"}


def artefact_sources() -> list[Path]:
    """The source files that shape an artefact: the operators' modules (not ``_NOT_IN_ARTEFACTS``) and the
    ``services.contracts`` modules they import, followed through the contracts' own imports. Found by
    reading the import statements, so a contracts module the operators never load (the link and transport
    specs, the device calibration) can change without rebuilding every model."""
    package = Path(operators.__file__).parent
    contracts = package.parent / "services" / "contracts"
    wanted = [f for f in sorted(package.glob("*.py")) if f.name not in _NOT_IN_ARTEFACTS]
    found: list[Path] = []
    while wanted:
        file = wanted.pop(0)
        if file in found:
            continue
        found.append(file)
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "services.contracts":
                names = [f"services.contracts.{a.name}" for a in node.names]  # from services.contracts import x
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.startswith("services.contracts."):
                    wanted.append(contracts / f"{name.split('.')[2]}.py")
    return sorted(found)


def source_hash() -> str:
    """The hash of ``artefact_sources()``: a change there rebuilds what it made."""
    digest = hashlib.sha256()
    for file in artefact_sources():
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Reporter:
    """Where the build says what it does: a message per step, an item count while training."""

    step: Callable[[str], None] = print
    training: Callable[[str, int], Progress] = field(default=lambda _label, _total: lambda _n: None)


@dataclass
class SubjectBuild:
    subject: Subject
    settings: BuildSettings
    root: Path
    reporter: Reporter
    split: SplitData
    code: str
    _nets: dict[str, nn.Module] = field(default_factory=dict)
    _teacher_logits: tuple[Samples, np.ndarray] | None = None

    @property
    def work(self) -> Path:
        return self.root / self.subject.name / WORK_DIR

    def base_key(self) -> str:
        return _key(self.subject.name, self.settings.key(), self.split.record, self.code)

    def example(self) -> dict[str, np.ndarray]:
        return {k: v[:1] for k, v in self.split.train.inputs.items()}

    # ------------------------------------------------------------------------------ white-box models

    def teacher(self) -> nn.Module:
        """The trained subject model, cached on disk (white-box results are cached as their ONNX)."""
        if "teacher" not in self._nets:
            path = self.work / f"teacher-{self.base_key()}.pt"
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
        return self.reporter.training(f"{self.subject.name}: {label}", items)

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
        path = self.work / f"{kind}-{self.base_key()}.onnx"
        if not path.exists():
            model = self.teacher() if kind == "teacher" else self._train(kind)
            export_onnx(model, self.example(), path)
        return onnx.load(str(path))

    # ---------------------------------------------------------------------------------------- variants

    def variant_key(self, variant: str) -> str:
        return _key(self.base_key(), VARIANTS[variant])

    def up_to_date(self, variant: str) -> bool:
        folder = self.root / self.subject.name / variant
        if not (folder / MANIFEST_FILENAME).exists():
            return False
        try:
            manifest = load_manifest(folder)
            verify_stage_files(manifest, folder)
        except ConfigError:
            return False
        return manifest.parameters.get("build_key") == self.variant_key(variant) and manifest.accuracy is not None

    def build_variant(self, variant: str) -> ManifestSpec:
        chain = VARIANTS[variant]
        first = chain[0] if chain[0] in WHITE_BOX else "teacher"
        model = self.onnx_of(first)
        extra: dict[str, str | int | float | bool] = {"weight_sparsity": round(weight_sparsity(model), 4)}
        context = BlackBoxContext(
            self.split, self.settings.head_train_items, self.settings.calibration_items, self.settings.seed
        )
        draft = apply_chain(
            Draft.of(model), chain, context, lambda step: self.reporter.step(f"{self.subject.name}.{variant}: {step}")
        )
        parameters = {**extra, "build_key": self.variant_key(variant), "settings": self.settings.profile}
        self.reporter.step(f"{self.subject.name}.{variant}: evaluating")
        return realise(
            draft,
            self.root / self.subject.name,
            self.subject.name,
            variant,
            parameters,
            split=self.split,
            evaluation_items=self.settings.evaluation_items,
            metric=self.subject.metric,
        )


def weight_sparsity(model: onnx.ModelProto) -> float:
    """Share of zeros among the weights of a model's matrices and convolution kernels."""
    zeros = total = 0
    for tensor in model.graph.initializer:
        if len(tensor.dims) >= 2:
            values = numpy_helper.to_array(tensor)
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
    return zeros / total if total else 0.0


def apply_chain(draft: Draft, chain: Sequence[str], context: BlackBoxContext, say: Callable[[str], None]) -> Draft:
    """Run the chain's black-box steps on ``draft`` (a white-box first step made ``draft`` already)."""
    for step in chain:
        if step in BLACK_BOX:
            say(step)
            draft = BLACK_BOX[step](draft, context)
    return draft.with_parameters(chain="+".join(chain))


def realise(
    draft: Draft,
    subject_folder: Path,
    subject: str,
    variant: str,
    parameters: dict[str, str | int | float | bool],
    *,
    split: SplitData,
    evaluation_items: int,
    metric: str | None,
) -> ManifestSpec:
    """Write a draft as ``<subject_folder>/<variant>/`` and record its offline accuracy in its manifest
    (none when ``metric`` is None: a model built without labels, for latency only)."""
    folder = subject_folder / variant
    manifest = write_variant(
        folder,
        name=f"{subject}.{variant}",
        subject=subject,
        operator=variant,
        stages=[StageModel(s.model, s.exit) for s in draft.stages],
        outputs=list(draft.outputs),
        parameters={**draft.parameters, **parameters, **split.record},
    )
    if draft.cuts:
        (subject_folder / "cuts.json").write_text(json.dumps([c.describe() for c in draft.cuts], indent=1))
    if metric is None:
        return manifest
    accuracy, curve = evaluate(manifest, folder, split.evaluation.head(evaluation_items), metric)
    manifest = ManifestSpec.model_validate({**manifest.model_dump(), "accuracy": accuracy, "exit_curve": curve})
    write_manifest(manifest, folder)
    return manifest


@dataclass(frozen=True)
class BuildResult:
    built: list[str]
    skipped: list[str]
    seconds: float


def _build_alone(
    root: Path, settings: BuildSettings, name: str, variants: Sequence[str] | None, threads: int
) -> BuildResult:
    """One subject in a worker process, on ``threads`` threads, saying what it does line by line."""
    torch.set_num_threads(threads)
    os.environ[BUILD_THREADS_ENV] = str(threads)

    def say(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    return build(root, settings, subjects=[name], variants=variants, reporter=Reporter(say))


def build(
    root: Path,
    settings: BuildSettings,
    *,
    subjects: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    reporter: Reporter | None = None,
    jobs: int = 1,
) -> BuildResult:
    """Build (or skip, when up to date) the requested variants of the requested subjects, ``jobs`` subjects
    at a time."""
    started = time.perf_counter()
    reporter = reporter or Reporter()
    unknown = [s for s in subjects or () if s not in SUBJECTS]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}; known: {sorted(SUBJECTS)}")
    unknown = [v for v in variants or () if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    names = list(subjects or SUBJECTS)
    if jobs > 1 and len(names) > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        reporter.step(
            f"building {', '.join(names)}: {jobs} at a time, {threads} thread(s) each, trained in {settings.precision}"
        )
        longest_first = sorted(names, key=lambda n: -SUBJECTS[n].build_cost)
        context = multiprocessing.get_context("spawn")  # no torch state forked from this process
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            done = list(pool.map(_build_alone, *zip(*[(root, settings, n, variants, threads) for n in longest_first],
                                                   strict=True)))  # fmt: skip
        return BuildResult([b for r in done for b in r.built], [k for r in done for k in r.skipped],
                           time.perf_counter() - started)  # fmt: skip
    built, skipped = [], []
    code = source_hash()
    for name in names:
        subject = SUBJECTS[name]
        wanted = [v for v in subject.variants if variants is None or v in variants]
        if not wanted:
            continue
        reporter.step(f"{name}: loading data")
        work = SubjectBuild(subject, settings, root, reporter, subject.load(settings), code)
        evaluation = work.split.evaluation.head(settings.evaluation_items)
        write_samples(root / name, evaluation.inputs, evaluation.targets, {"subject": name, **work.split.record})
        for variant in wanted:
            if work.up_to_date(variant):
                skipped.append(f"{name}.{variant}")
                continue
            work.build_variant(variant)
            built.append(f"{name}.{variant}")
    return BuildResult(built, skipped, time.perf_counter() - started)


def list_variants(root: Path) -> list[tuple[Path, ManifestSpec]]:
    found = []
    for file in sorted(root.glob(f"*/*/{MANIFEST_FILENAME}")):
        if file.parent.parent.name.startswith("_") or file.parent.name == WORK_DIR:
            continue
        try:
            found.append((file.parent, load_manifest(file)))
        except ConfigError:
            continue
    return found
