"""The variant manifest: what an operator produced and what a tier needs to serve it.

A variant is an ordered list of stages; each stage is one ONNX submodel file (with its sha256), the
tensors it takes and gives, and optionally an exit head: an output holding class logits that, when the
softmax confidence reaches the threshold, answers the request at that stage. Stage ``i + 1`` takes only
tensors stage ``i`` gives, so a tier forwards exactly the next stage's inputs. The manifest sits beside
its submodels as ``manifest.json`` (``models/<subject>/<variant>/manifest.json``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.contracts.dtypes import NUMPY_DTYPES, Datatype
from services.contracts.errors import ChecksumMismatch, ConfigError

MANIFEST_FILENAME = "manifest.json"
SHA256_HEX_LENGTH = 64


class FrozenSpec(BaseModel):
    """Base of every spec: immutable, validated, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


SpecT = TypeVar("SpecT", bound=FrozenSpec)


def load_yaml_spec(path: Path, spec_type: type[SpecT], what: str) -> SpecT:
    """Read a YAML (or JSON) file into ``spec_type``; every problem is a ConfigError naming ``what`` and path."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    try:
        return spec_type.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{what} {path} is invalid:\n{exc}") from None


class TensorSpec(FrozenSpec):
    """A tensor a stage takes or gives; ``-1`` in ``shape`` is a dimension of any size (the batch)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _dims_known_or_dynamic(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError(f"dimensions must be >= 0 or -1 (dynamic), got {list(shape)}")
        return shape

    @property
    def bytes_per_item(self) -> int:
        """Bytes of one batch item (dynamic dimensions count as 1; a BYTES element as 1 byte)."""
        count = 1
        for dim in self.shape[1:]:
            count *= max(dim, 1)
        return count * (NUMPY_DTYPES[self.datatype].itemsize if self.datatype != "BYTES" else 1)

    def fits(self, other: TensorSpec) -> bool:
        """Same datatype and rank, and every dimension equal or dynamic on either side."""
        return (
            self.datatype == other.datatype
            and len(self.shape) == len(other.shape)
            and all(a == b or -1 in (a, b) for a, b in zip(self.shape, other.shape, strict=True))
        )

    def accepts(self, datatype: str, shape: Sequence[int]) -> str | None:
        """None if a tensor of this datatype and shape fits this spec, else why not."""
        if datatype != self.datatype:
            return f"tensor '{self.name}' must be {self.datatype}, got {datatype}"
        if len(shape) != len(self.shape) or any(w not in (-1, g) for w, g in zip(self.shape, shape, strict=True)):
            return f"tensor '{self.name}' must have shape {list(self.shape)} (-1 = any), got {list(shape)}"
        return None


class ExitSpec(FrozenSpec):
    """An early-exit head: ``output`` holds class logits; confident enough, they answer as ``answers``."""

    output: str = Field(min_length=1)
    answers: str | None = Field(default=None, description="final output it stands in for; default the first")
    threshold: float = Field(ge=0.0, le=1.0, description="max softmax probability needed to exit")
    confidence: Literal["max_softmax"] = "max_softmax"


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """An exit head's confidence per item: the largest softmax probability along the last axis.

    Tiers and the offline evaluation both use this, so a variant's recorded exit curve is what it serves.
    """
    values = logits.astype(np.float64, copy=False)
    exp = np.exp(values - values.max(axis=-1, keepdims=True))
    probs: np.ndarray = exp.max(axis=-1) / exp.sum(axis=-1)
    return probs


class StageSpec(FrozenSpec):
    file: str = Field(min_length=1, description="ONNX file, relative to the manifest's folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    exit: ExitSpec | None = None

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


class AccuracySpec(FrozenSpec):
    metric: str = Field(min_length=1, description="accuracy, macro_f1, miou, …")
    value: float
    ci95: tuple[float, float]
    n: int = Field(ge=1)
    split: Literal["evaluation"] = "evaluation"
    others: dict[str, float] = Field(default_factory=dict, description="further metrics, e.g. macro_f1")


class OutcomesFileSpec(FrozenSpec):
    """The file of per-item offline outcomes beside the manifest (``services.contracts.scoring``)."""

    file: str = Field(min_length=1, description="relative to the manifest's folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExitCurvePoint(FrozenSpec):
    """The variant's metric and how many items exit early, at one confidence threshold (evaluation split)."""

    threshold: float = Field(ge=0.0, le=1.0)
    metric: float
    exit_rate: float = Field(ge=0.0, le=1.0, description="share answered before the last stage")


class ManifestSpec(FrozenSpec):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the variant's model name")
    subject: str = Field(min_length=1)
    operator: str = Field(min_length=1)
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1, description="the final outputs a client gets")
    accuracy: AccuracySpec | None = None
    exit_curve: tuple[ExitCurvePoint, ...] = ()
    outcomes: OutcomesFileSpec | None = Field(default=None, description="what each evaluation item got offline")
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[0].inputs

    @model_validator(mode="after")
    def _stages_chain(self) -> ManifestSpec:
        for index, (stage, following) in enumerate(zip(self.stages, self.stages[1:], strict=False)):
            for wanted in following.inputs:
                given = stage.output(wanted.name)
                if given is None:
                    raise ValueError(f"stage {index + 1} takes '{wanted.name}', which stage {index} does not give")
                if not given.fits(wanted):
                    raise ValueError(
                        f"stage {index} gives '{wanted.name}' as {given.datatype}{list(given.shape)} but "
                        f"stage {index + 1} takes {wanted.datatype}{list(wanted.shape)}"
                    )
        last = self.stages[-1]
        for final in self.outputs:
            if last.output(final.name) is None:
                raise ValueError(f"final output '{final.name}' is not an output of the last stage")
        if last.exit is not None:
            raise ValueError("the last stage cannot have an exit head: it answers anyway")
        for index, stage in enumerate(self.stages):
            if stage.exit is not None:
                self._check_exit(index, stage, stage.exit)
        return self

    def _check_exit(self, index: int, stage: StageSpec, head: ExitSpec) -> None:
        given = stage.output(head.output)
        if given is None:
            raise ValueError(f"stage {index} exit head output '{head.output}' is not one of its outputs")
        answered = self.final_output_for(head)
        if answered is None:
            raise ValueError(f"stage {index} exit head answers '{head.answers}', which is not a final output")
        if not given.fits(answered):
            raise ValueError(
                f"stage {index} exit head '{head.output}' is {given.datatype}{list(given.shape)} but the final "
                f"output '{answered.name}' is {answered.datatype}{list(answered.shape)}"
            )

    def final_output_for(self, head: ExitSpec) -> TensorSpec | None:
        wanted = head.answers or self.outputs[0].name
        return next((t for t in self.outputs if t.name == wanted), None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: Path) -> ManifestSpec:
    """Read and validate a manifest file; ``path`` may be the file or its folder."""
    file = path / MANIFEST_FILENAME if path.is_dir() else path
    try:
        raw = file.read_bytes()  # bytes: a file that is not UTF-8 is invalid JSON, not a crash
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {file}: {exc.strerror}") from None
    try:
        return ManifestSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise ConfigError(f"manifest {file} is invalid:\n{exc}") from None


def verify_stage_files(manifest: ManifestSpec, folder: Path) -> None:
    """Check that every stage file exists and hashes to its recorded sha256."""
    for index, stage in enumerate(manifest.stages):
        file = folder / stage.file
        if not file.is_file():
            raise ConfigError(f"{manifest.name} stage {index}: submodel file {file} does not exist")
        actual = sha256_file(file)
        if actual != stage.sha256:
            raise ChecksumMismatch(
                f"{manifest.name} stage {index}: {file} has sha256 {actual}, the manifest says {stage.sha256}"
            )


def write_manifest(manifest: ManifestSpec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / MANIFEST_FILENAME
    file.write_text(manifest.model_dump_json(indent=2, exclude_none=True) + "\n")
    return file
