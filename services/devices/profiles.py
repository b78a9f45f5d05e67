"""Device profiles: a real device and the measurements it is fitted to (``compose/devices/<name>.yaml``).

A profile is data about the device, independent of the host: its cores, where its measured times are — a
published table (ncnn's ``benchmark/README.md``, kept in ``services/devices/data``) or a calibration you ran on
the device yourself (``<name>.device.json`` beside the profile, written by the kit's ``calibrate_device.py``) —
which runs to use, the engine that measured them and what its float rows computed in. ``make up`` fits each
device a resource profile names against the host it runs on (``services.devices.fit``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.contracts.errors import ConfigError
from services.contracts.manifest import FrozenSpec, load_yaml_spec

PROFILES_DIR = Path(__file__).resolve().parents[2] / "compose" / "devices"
CALIBRATION_SUFFIX = ".device.json"


class DeviceProfileSpec(FrozenSpec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str
    cores: int = Field(ge=1, le=256, description="the cores tierlab gives the device (stages computing at once)")
    table: str | None = Field(default=None, description="its table's heading in ncnn's benchmark/README.md")
    calibrated: bool = Field(default=False, description="measured with the kit: <name>.device.json beside it")
    threads: tuple[int, ...] = Field(min_length=1, description="the runs to fit: 1 and the device's cores")
    engine: str = Field(description="the engine that measured it, and its version or date")
    arithmetic: str = Field(description="fp32, or fp16 where ncnn computes float rows in fp16 (ARMv8.2+)")
    notes: str = ""

    @property
    def calibration_file(self) -> Path:
        return PROFILES_DIR / f"{self.name}{CALIBRATION_SUFFIX}"


def known_devices() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> DeviceProfileSpec:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no device profile '{name}'; known: {', '.join(known_devices())}")
    profile = load_yaml_spec(path, DeviceProfileSpec, "device profile")
    if 1 not in profile.threads:
        raise ConfigError(f"device profile {path} must fit its one-thread run (threads: [1, …])")
    if (profile.table is None) == (not profile.calibrated):
        raise ConfigError(f"device profile {path} names a published table or is calibrated (calibrated: true)")
    if profile.calibrated and not profile.calibration_file.is_file():
        raise ConfigError(f"device profile {path} is calibrated but {profile.calibration_file} is missing")
    return profile
