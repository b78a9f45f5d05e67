"""Write a variant to disk: its stage ONNX files and the manifest that describes them.

Whatever produces submodels (the operators, the demo models, test fixtures) hands over ONNX models in
stage order and gets a folder a tier can serve: files named ``stage<i>.onnx``, sha256 and sizes
recorded, tensor specs read from the ONNX graphs (symbolic dimensions become ``-1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from services.contracts.dtypes import ONNX_ELEM_TYPES
from services.contracts.errors import ConfigError
from services.contracts.manifest import (
    AccuracySpec,
    ExitSpec,
    ManifestSpec,
    StageSpec,
    TensorSpec,
    sha256_file,
    write_manifest,
)


@dataclass(frozen=True, slots=True)
class StageModel:
    model: onnx.ModelProto
    exit: ExitSpec | None = None


def tensor_specs(values: Sequence[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        datatype = ONNX_ELEM_TYPES.get(tensor_type.elem_type)
        if datatype is None:
            raise ConfigError(
                f"tensor '{value.name}' has ONNX element type {tensor_type.elem_type}, which V2 cannot carry"
            )
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        specs.append(TensorSpec(name=value.name, datatype=datatype, shape=shape))
    return tuple(specs)


def write_variant(
    folder: Path,
    *,
    name: str,
    subject: str,
    operator: str,
    stages: Sequence[StageModel],
    outputs: Sequence[str],
    accuracy: AccuracySpec | None = None,
    parameters: Mapping[str, str | int | float | bool] | None = None,
) -> ManifestSpec:
    """Save ``stages`` under ``folder`` and write a validated manifest beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    stage_specs = []
    for index, stage in enumerate(stages):
        file = folder / f"stage{index}.onnx"
        onnx.save_model(stage.model, str(file))
        graph = stage.model.graph
        stage_specs.append(
            StageSpec(
                file=file.name,
                sha256=sha256_file(file),
                size_bytes=file.stat().st_size,
                inputs=tensor_specs(list(graph.input)),
                outputs=tensor_specs(list(graph.output)),
                exit=stage.exit,
            )
        )
    last = stage_specs[-1]
    finals = []
    for output in outputs:
        spec = last.output(output)
        if spec is None:
            raise ConfigError(f"final output '{output}' is not an output of the last stage of {name}")
        finals.append(spec)
    manifest = ManifestSpec(
        name=name,
        subject=subject,
        operator=operator,
        stages=tuple(stage_specs),
        outputs=tuple(finals),
        accuracy=accuracy,
        parameters=dict(parameters or {}),
    )
    write_manifest(manifest, folder)
    return manifest
