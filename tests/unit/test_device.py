"""Device speed: the spec's quota arithmetic, every shipped profile consistent with it, cpu.stat parsing,
the pacing of a run to its device speed, and speed-fidelity judgement (pure; no Docker)."""

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
    DeviceSpec,
    SpeedMeasurementSpec,
    pace,
)
from services.contracts.specs import TIERS
from services.tier.limits import parse_cpu_stat, read_cpu_throttling

ROOT = Path(__file__).resolve().parents[2]


def test_quota_is_cores_times_speed_with_headroom_never_under_the_kernel_minimum() -> None:
    assert DeviceSpec(speed=0.5, cores=1, cfs_period_us=20_000).cfs_quota_us() == int(0.5 * QUOTA_HEADROOM * 20_000)
    assert DeviceSpec(speed=0.25, cores=4, cfs_period_us=10_000).cfs_quota_us() == int(QUOTA_HEADROOM * 10_000)
    assert DeviceSpec(speed=0.05, cores=1, cfs_period_us=1_000).cfs_quota_us() == 1_000  # the kernel's minimum
    assert DeviceSpec(speed=1.0, cores=8).threads(2.0) == 2 and DeviceSpec(speed=0.5, cores=1).threads(2.0) == 1
    # a paced device: no more threads than whole host cores of its capacity, one host core left to the rest
    assert DeviceSpec(speed=0.25, cores=4).threads(2.0) == 1 and DeviceSpec(speed=0.5, cores=4).threads(8.0) == 3
    assert DeviceSpec(speed=0.25, cores=6).threads(2.0) == 1 and DeviceSpec(speed=0.25, cores=6).threads(8.0) == 2
    with pytest.raises(ValidationError):
        DeviceSpec(speed=1.5)
    with pytest.raises(ValidationError):
        DeviceSpec(speed=0.0)


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
        assert entry["cpu_quota"] == device.cfs_quota_us(), f"{profile} {tier}: quota ≠ cores × speed × headroom"
        assert "cpus" not in entry, "cpus would override cpu_period and cpu_quota"


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


def test_pace_stretches_a_run_to_its_cpu_time_over_the_speed() -> None:
    # a run that used 20 ms of CPU on a device at speed 0.5 ends no sooner than 40 ms after it began
    started = time.perf_counter_ns()
    pace(started, 20_000_000, 0.5)
    assert time.perf_counter_ns() - started >= 40_000_000
    started = time.perf_counter_ns()
    pace(started, 20_000_000, 1.0)  # host speed: no wait at all
    assert time.perf_counter_ns() - started < 20_000_000


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
            CalibrationTimesSpec(tier="mobile", device=device, threads=1, allow_spinning=False, wall_ms=block,
                                 cpu_ms=tuple(w * speed for w in block))
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
    with pytest.raises(ValueError, match="as many host rounds"):
        SpeedMeasurementSpec.of([], [])
