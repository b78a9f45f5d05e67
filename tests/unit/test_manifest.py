"""Manifest validation: stages chain, exit heads fit, files hash to what the manifest says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.contracts.errors import ChecksumMismatch, ConfigError
from services.contracts.manifest import ManifestSpec, load_manifest, verify_stage_files


def tensor(name: str, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def stage(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "file": "s.onnx",
        "sha256": "0" * 64,
        "size_bytes": 1,
        "inputs": inputs,
        "outputs": outputs,
        **extra,
    }


def manifest(stages: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "name": "m.v",
        "subject": "m",
        "operator": "partition",
        "stages": stages,
        "outputs": outputs or [tensor("y", [-1, 10])],
    }


TWO_STAGES = [
    stage([tensor("x", [-1, 4])], [tensor("h", [-1, 8])]),
    stage([tensor("h", [-1, 8])], [tensor("y", [-1, 10])]),
]


def test_demo_manifests_validate(demo_manifests: dict[str, ManifestSpec], demo_root: Path) -> None:
    for name, spec in demo_manifests.items():
        verify_stage_files(spec, demo_root / "demo-mlp" / name)
    assert len(demo_manifests["partition3"].stages) == 3
    head = demo_manifests["early-exit"].stages[0].exit
    assert head is not None and head.output == "exit_logits"


def test_valid_two_stage_manifest() -> None:
    spec = ManifestSpec.model_validate(manifest(TWO_STAGES))
    assert [t.name for t in spec.inputs] == ["x"]


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (manifest([TWO_STAGES[0], stage([tensor("z", [-1, 8])], [tensor("y", [-1, 10])])]), "does not give"),
        (
            manifest([TWO_STAGES[0], stage([tensor("h", [-1, 8], "FP16")], [tensor("y", [-1, 10])])]),
            "takes FP16",
        ),
        (manifest(TWO_STAGES, [tensor("nope", [-1, 10])]), "not an output of the last stage"),
        (
            manifest([TWO_STAGES[0], {**TWO_STAGES[1], "exit": {"output": "y", "threshold": 0.5}}]),
            "last stage",
        ),
        (
            manifest([{**TWO_STAGES[0], "exit": {"output": "missing", "threshold": 0.5}}, TWO_STAGES[1]]),
            "not one of its outputs",
        ),
        (
            manifest([{**TWO_STAGES[0], "exit": {"output": "h", "threshold": 0.5}}, TWO_STAGES[1]]),
            "final output",
        ),
        (
            manifest([{**TWO_STAGES[0], "exit": {"output": "h", "threshold": 1.5}}, TWO_STAGES[1]]),
            "less than or equal",
        ),
        (manifest([{**TWO_STAGES[0], "sha256": "xyz"}, TWO_STAGES[1]]), "sha256"),
        (manifest([stage([tensor("x", [-3])], [tensor("y", [-1, 10])])]), "dynamic"),
        (manifest([]), "at least 1"),
        ({**manifest(TWO_STAGES), "name": "bad name"}, "name"),
        ({**manifest(TWO_STAGES), "surprise": 1}, "Extra inputs"),
    ],
)
def test_invalid_manifests_say_why(document: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        ManifestSpec.model_validate(document)


def test_checksum_mismatch_is_reported(demo_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "variant"
    source = demo_root / "demo-mlp" / "identity"
    folder.mkdir()
    (folder / "manifest.json").write_text((source / "manifest.json").read_text())
    (folder / "stage0.onnx").write_bytes((source / "stage0.onnx").read_bytes() + b"tampered")
    with pytest.raises(ChecksumMismatch, match="sha256"):
        verify_stage_files(load_manifest(folder), folder)
    (folder / "stage0.onnx").unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        verify_stage_files(load_manifest(folder), folder)


def test_load_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="is invalid"):
        load_manifest(bad)
