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
``models/<subject>/_work/`` by the narrower key of what trains them (``operators.trained``). Beside each
manifest, ``outcomes.npz`` keeps what every evaluation item got (``services.contracts.scoring``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from operators.blackbox import BLACK_BOX, BlackBoxContext, Draft
from operators.data import SplitData
from operators.evaluate import BUILD_THREADS_ENV, evaluate
from operators.sources import PACKAGE, hash_of, sources_of
from operators.subjects import SUBJECTS, BuildSettings, Subject
from operators.trained import WORK_DIR, TrainedModels, key_of
from operators.training import Progress
from operators.variants import VARIANTS, WHITE_BOX
from services.contracts.errors import ConfigError
from services.contracts.manifest import (
    MANIFEST_FILENAME,
    ManifestSpec,
    OutcomesFileSpec,
    load_manifest,
    sha256_file,
    verify_stage_files,
    write_manifest,
)
from services.contracts.samples import write_samples
from services.contracts.scoring import write_outcomes
from services.contracts.variant import StageModel, write_variant

# code that shapes no artefact: the command line and the bring-your-own entry
_NOT_IN_ARTEFACTS = {"__main__.py", "byo.py"}


def artefact_sources() -> list[Path]:
    """The source files that shape a variant: the operators' modules (not ``_NOT_IN_ARTEFACTS``) and the
    ``services.contracts`` modules they import (``operators.sources``)."""
    return sources_of(f for f in sorted(PACKAGE.glob("*.py")) if f.name not in _NOT_IN_ARTEFACTS)


def source_hash() -> str:
    """The hash of ``artefact_sources()``: a change there re-makes the variants (``operators.trained`` says
    what retrains their models)."""
    return hash_of(artefact_sources())


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
    trained: TrainedModels = field(init=False)

    def __post_init__(self) -> None:
        self.trained = TrainedModels(self.subject, self.settings, self.split, self.root, self.reporter.training)

    # ---------------------------------------------------------------------------------------- variants

    def variant_key(self, variant: str) -> str:
        return key_of(self.trained.key(), self.code, VARIANTS[variant])

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
        model = self.trained.onnx_of(first)
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
    evaluation = evaluate(manifest, folder, split.evaluation.head(evaluation_items), metric)
    outcomes = write_outcomes(folder, evaluation.outcomes)
    manifest = manifest.model_copy(
        update={
            "accuracy": evaluation.accuracy,
            "exit_curve": evaluation.curve,
            "outcomes": OutcomesFileSpec(file=outcomes.name, sha256=sha256_file(outcomes)),
        }
    )
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
