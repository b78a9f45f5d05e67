"""Device speed: the spec's quota and thread arithmetic, every shipped profile consistent with it and naming
devices that exist, cpu.stat parsing, pacing to a device time, a measured device's ratios at any core count
and a stage's factor from its kernel classes, and speed-fidelity judgement (pure; no Docker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.contracts.calibration import calibration_model_bytes, check_model, host_times_ms
from services.contracts.device import (
    QUOTA_HEADROOM,
    CalibrationTimesSpec,
    CpuThrottlingSpec,
    DeviceFitSpec,
    DeviceModelSpec,
    DevicePacer,
    DeviceSourceSpec,
    DeviceSpec,
    SpeedMeasurementSpec,
    pace,
    ratios_at,
    stage_factor,
)
from services.contracts.kernels import KERNEL_CLASSES, KernelClass
from services.contracts.specs import TIERS
from services.devices.profiles import known_devices
from services.tier.limits import parse_cpu_stat, read_cpu_throttling

ROOT = Path(__file__).resolve().parents[2]


def synthetic_device(one: dict[KernelClass, float], four: dict[KernelClass, float], cores: int = 4) -> DeviceModelSpec:
    """A measured device with the given ratios at one and four threads (other classes 1.0)."""

    def full(ratios: dict[KernelClass, float]) -> dict[KernelClass, float]:
        return {k: ratios.get(k, 1.0) for k in KERNEL_CLASSES}

    fit = DeviceFitSpec(median_abs_err=0.1, worst_abs_err=0.2, networks=6, predictions=12, median_abs_err_all=0.1,
                        worst_abs_err_all=0.3, predictions_all=40)  # fmt: skip
    return DeviceModelSpec(
        name="synthetic", cores=cores, ratios={1: full(one), 4: full(four)}, serving_ratio=3.0,
        serving_basis="test", source=DeviceSourceSpec(table="t", url="u", engine="e", arithmetic="fp32"),
        fit=fit, host="test host",
    )  # fmt: skip


def test_quota_is_a_host_core_per_slot_with_headroom_and_threads_stay_one_when_paced() -> None:
    assert DeviceSpec(speed=0.5, cores=1, cfs_period_us=20_000).cfs_quota_us() == int((1 + QUOTA_HEADROOM) * 20_000)
    assert DeviceSpec(speed=1.0, cores=4).cfs_quota_us() == int(4.5 * 100_000)  # host speed: its threads' cores
    assert DeviceSpec(model="raspberry-pi-4", cores=4).cfs_quota_us() == 450_000  # four stages at once
    assert DeviceSpec(speed=0.25, cores=4).compute_slots() == 1 and DeviceSpec(model="x", cores=4).compute_slots() == 4
    assert DeviceSpec(speed=1.0, cores=8).threads(2.0) == 2 and DeviceSpec(speed=0.5, cores=4).threads(8.0) == 1
    assert DeviceSpec(model="x", cores=6).threads(8.0) == 1  # its parallelism is modelled, never run here
    with pytest.raises(ValidationError):
        DeviceSpec(speed=1.5)
    with pytest.raises(ValidationError, match=r"measured .* or relative"):
        DeviceSpec(speed=0.5, model="raspberry-pi-4")


@pytest.mark.parametrize(
    "profile", sorted(p.stem.removeprefix("resources-") for p in (ROOT / "compose").glob("resources-*.yml"))
)
def test_every_resource_profile_states_its_devices_and_realises_them(profile: str) -> None:
    path = ROOT / "compose" / f"resources-{profile}.yml"
    text = path.read_text()
    assert text.startswith("# Resource profile"), "the first comment says what the profile stands for"
    services = yaml.safe_load(text)["services"]
    for tier in TIERS:
        entry = services[tier]
        device = DeviceSpec.model_validate(json.loads(entry["environment"]["TIERLAB_DEVICE"]))
        assert entry["cpu_period"] == device.cfs_period_us, f"{profile} {tier}"
        assert entry["cpu_quota"] == device.cfs_quota_us(), f"{profile} {tier}: quota ≠ (slots + headroom) × period"
        assert "cpus" not in entry, "cpus would override cpu_period and cpu_quota"
        assert device.model is None or device.model in known_devices(), f"{profile} {tier}: no such device profile"


def test_the_laptop_profile_keeps_the_studies_tier_order() -> None:
    services = yaml.safe_load((ROOT / "compose" / "resources-laptop.yml").read_text())["services"]
    speed = {t: json.loads(services[t]["environment"]["TIERLAB_DEVICE"])["speed"] for t in TIERS}
    assert speed["edge"] / speed["mobile"] >= 1.3 and speed["cloud"] >= speed["edge"]


def test_cpu_stat_parses_v1_and_v2_and_differences_clamp_at_a_restart(tmp_path: Path) -> None:
    v1 = parse_cpu_stat("nr_periods 200\nnr_throttled 20\nthrottled_time 1500000000\n")
    v2 = parse_cpu_stat(
        "usage_usec 5\nuser_usec 3\nsystem_usec 2\nnr_periods 10\nnr_throttled 1\nthrottled_usec 2500\n"
    )
    assert v1 == CpuThrottlingSpec(periods=200, throttled_periods=20, throttled_s=1.5)
    assert v2 == CpuThrottlingSpec(periods=10, throttled_periods=1, throttled_s=0.0025)
    assert v1.since(v2) == CpuThrottlingSpec(periods=190, throttled_periods=19, throttled_s=1.4975)
    assert v2.since(v1).periods == 0 and v1.throttled_fraction == pytest.approx(0.1)
    folder = tmp_path / "cpu" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.stat").write_text("nr_periods 7\nnr_throttled 3\nthrottled_time 2000000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("3:cpu:/docker/abc\n")
    assert read_cpu_throttling(tmp_path, proc) == CpuThrottlingSpec(periods=7, throttled_periods=3, throttled_s=0.002)
    assert read_cpu_throttling(tmp_path / "none", proc) is None


def test_pace_waits_out_the_device_time() -> None:
    started = time.perf_counter_ns()
    pace(started, 40_000_000)  # the device takes 40 ms for this run
    assert time.perf_counter_ns() - started >= 40_000_000
    started = time.perf_counter_ns()
    pace(started, 0)  # no device time left: no wait at all
    assert time.perf_counter_ns() - started < 20_000_000


def test_a_measured_devices_ratios_follow_its_thread_scaling_and_a_stage_its_classes() -> None:
    device = synthetic_device({"conv": 8.0, "conv_int8": 10.0}, {"conv": 4.0, "conv_int8": 3.0})
    assert ratios_at(device, 1)["conv"] == 8.0 and ratios_at(device, 4)["conv_int8"] == 3.0
    two = ratios_at(device, 2)
    # Amdahl between the fits: conv sped up 2× on 4 cores, so serial share 1/3 → on 2 cores 8 × (1/3 + 1/3)
    assert two["conv"] == pytest.approx(8.0 * (1 / 3 + (2 / 3) / 2))
    assert 3.0 < two["conv_int8"] < 10.0 and ratios_at(device, 16) == ratios_at(device, 4)  # no more than 4 cores
    # a stage paced by its own classes: the int8 stage slows more than the float one on this device
    assert stage_factor({"conv": 0.9, "other": 0.1}, ratios_at(device, 1)) == pytest.approx(0.9 * 8 + 0.1)
    pacer = DevicePacer(DeviceSpec(model="synthetic", cores=4), device)
    assert pacer.factor({"conv_int8": 1.0}, 1) / pacer.factor({"conv": 1.0}, 1) == pytest.approx(10 / 8)
    assert pacer.serving_ratio == 3.0
    relative = DevicePacer(DeviceSpec(speed=0.5), None)
    assert relative.factor({"conv_int8": 1.0}, 1) == relative.factor({"conv": 1.0}, 1) == 2.0
    with pytest.raises(ValueError, match="no fitted model"):
        DevicePacer(DeviceSpec(model="raspberry-pi-4", cores=4), None)


def test_the_calibration_model_is_valid_deterministic_onnx_and_runs() -> None:
    check_model()
    assert calibration_model_bytes() == calibration_model_bytes()
    times = host_times_ms(1, 3)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_speed_fidelity_flags_a_tier_off_its_speed_or_too_jittery() -> None:
    def measured(wall_ms: list[float], speed: float, host_ms: list[float] | None = None) -> SpeedMeasurementSpec:
        """Four rounds of five runs each; the host ran 3 ms a run unless ``host_ms`` gives every run."""
        host = host_ms or [3.0] * len(wall_ms)
        device = DeviceSpec(speed=speed)
        blocks = [tuple(wall_ms[i : i + 5]) for i in range(0, len(wall_ms), 5)]
        rounds = [
            CalibrationTimesSpec(tier="mobile", device=device, factor=1 / speed, threads=1, allow_spinning=False,
                                 wall_ms=block, cpu_ms=tuple(w * speed for w in block))
            for block in blocks
        ]  # fmt: skip
        return SpeedMeasurementSpec.of(rounds, [host[i : i + 5] for i in range(0, len(host), 5)])

    good = measured([6.0] * 19 + [6.5], 0.5)
    assert good.problems() == [] and good.achieved_speed == pytest.approx(0.5) and len(good.round_speeds) == 4
    slow = measured([8.0] * 20, 0.5)
    assert "achieved speed 0.38 (median of 4 rounds), configured 0.5 ± 10 %" in slow.problems()[0]
    jittery = measured([6.0, 6.0, 6.0, 6.0, 12.0] * 4, 0.5)  # a throttled run in every round
    assert any("p95/p50" in p for p in jittery.problems())
    # the machine slowed down for a while: host and tier slowed alike in the same rounds, speed still right
    drifting = measured([6.0] * 10 + [9.0] * 10, 0.5, host_ms=[3.0] * 10 + [4.5] * 10)
    assert drifting.problems() == [] and drifting.achieved_speed == pytest.approx(0.5)
    # one round spoilt by a burst on the tier's side only: the median over rounds shrugs it off
    burst = measured([6.0] * 5 + [10.0] * 5 + [6.0] * 10, 0.5)
    assert burst.problems() == []
    # a measured device faster than one host core on this model: the tier runs at host speed, a gap, not a fault
    faster = [CalibrationTimesSpec(tier="edge", device=DeviceSpec(model="jetson", cores=6), factor=0.5, threads=1,
                                   allow_spinning=False, wall_ms=(3.0,) * 5, cpu_ms=(3.0,) * 5)] * 4  # fmt: skip
    at_host_speed = SpeedMeasurementSpec.of(faster, [[3.0] * 5] * 4)
    assert at_host_speed.configured_speed == 2.0 and at_host_speed.expected_ms == 3.0
    assert at_host_speed.problems() == [] and "2.00× one core of this host" in (at_host_speed.gap() or "")
    assert good.gap() is None
    with pytest.raises(ValueError, match="as many host rounds"):
        SpeedMeasurementSpec.of([], [])
