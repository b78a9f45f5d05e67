"""Calibrate a device you own: a kit to run on it, and a profile made from what it measured.

``write_kit`` puts the reference networks that convert to ONNX (float and int8, ``onnxnets``) into a folder
with ``calibrate_device.py``; on the device (Python, numpy and onnxruntime only, arm64 included) that script
times each at one thread and at the device's cores and times a serving micro-benchmark, and writes
``device.json``. ``import_calibration`` turns it into ``compose/devices/<name>.yaml`` + ``<name>.device.json``:
a device measured in onnxruntime itself, so no engine transfer is involved (``services.devices.fit``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import yaml
from pydantic import Field, ValidationError

from services.contracts.errors import ConfigError
from services.contracts.manifest import FrozenSpec
from services.devices import calibrate_device, onnxnets
from services.devices.profiles import CALIBRATION_SUFFIX, PROFILES_DIR
from services.devices.reference import networks

KIT_README = """tierlab device calibration kit

Copy this folder to the device, then there (Python 3.9+, numpy and onnxruntime):

    python3 calibrate_device.py              # every core; --cores N for fewer
    # copy device.json back, then on the machine running tierlab:
    python -m services devices import-calibration device.json --name my-device --description "…"

Each network is timed at one thread and at the device's cores (the fastest run over three rounds), and a
serving micro-benchmark times the Python work a tier does around a model.
"""


class CalibrationSpec(FrozenSpec):
    """What ``calibrate_device.py`` measured on a device (``device.json``)."""

    machine: str
    processor: str
    system: str
    onnxruntime: str
    cores: int = Field(ge=1)
    ms: dict[int, dict[str, float]] = Field(description="by thread count: each network's fastest ms")
    serving_ms: float = Field(gt=0)
    measured: str


def write_kit(folder: Path, say: Callable[[str], None] = print, names: list[str] | None = None) -> Path:
    """The kit: every convertible reference network (or ``names``) as ONNX (int8 ones quantised), the script,
    a README."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in names or networks():
        base = name.removesuffix("_int8")
        try:
            model = onnxnets.to_onnx(base)
        except ConfigError:
            continue
        path = folder / f"{name}.onnx"
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
        if name.endswith("_int8"):
            float_path = folder / f".{base}-float.onnx"
            onnx.save(model, str(float_path))
            onnxnets.quantize_int8(float_path, path, shape)
            float_path.unlink()
        else:
            onnx.save(model, str(path))
        written += 1
        say(f"  {path.name}")
    shutil.copyfile(Path(calibrate_device.__file__), folder / "calibrate_device.py")
    (folder / "README.txt").write_text(KIT_README)
    say(f"wrote {written} networks and calibrate_device.py to {folder}: copy the folder to the device")
    return folder


def read_calibration(path: Path) -> CalibrationSpec:
    try:
        return CalibrationSpec.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a device.json from calibrate_device.py:\n{exc}") from None


def import_calibration(path: Path, name: str, description: str, cores: int | None = None) -> Path:
    """``compose/devices/<name>.yaml`` and ``<name>.device.json`` from a kit's ``device.json``."""
    calibration = read_calibration(path)
    cores = cores or calibration.cores
    threads = sorted(t for t in calibration.ms if t in (1, cores))
    if 1 not in threads:
        raise ConfigError(f"{path} has no one-thread times: run calibrate_device.py again")
    profile = {
        "name": name,
        "description": description or f"{calibration.processor} ({calibration.machine}), calibrated",
        "cores": cores,
        "calibrated": True,
        "threads": threads,
        "engine": f"onnxruntime {calibration.onnxruntime} on the device, {calibration.measured}",
        "arithmetic": "fp32 (onnxruntime computes float models in fp32)",
        "notes": calibration.system,
    }
    PROFILES_DIR.mkdir(parents=True, exist_ok=True)
    (PROFILES_DIR / f"{name}{CALIBRATION_SUFFIX}").write_text(json.dumps(calibration.model_dump(mode="json"), indent=1))
    target = PROFILES_DIR / f"{name}.yaml"
    target.write_text(yaml.safe_dump(profile, sort_keys=False, allow_unicode=True))
    return target
