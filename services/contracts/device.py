"""Device speed: how fast a tier's device computes, how the kernel and the tier realise it, how well they did.

A resource profile gives each tier a ``DeviceSpec``: ``speed`` relative to one core of the host tierlab
runs on (0.5 = a stage takes twice as long as on the host) and the device's ``cores``. Two mechanisms
realise it, because measurement showed neither is enough alone:

- **Pacing in the tier** (``services.tier.runtime``): a stage run that used ``c`` ns of CPU on its
  calling thread ends no sooner than ``c / speed`` after it began; the compute slot is held meanwhile.
  This is exact for stages of any length. The kernel alone is not: on a HZ=250 kernel CFS notices an
  exhausted quota only at the next 4 ms tick, so a 0.3 ms stage never throttles and a 3 ms one is slowed
  in 4 ms lumps (measured: period 10 ms / quota 1 ms gave a 3.1 ms job 40 ms, 1.3× the 31 ms asked).
- **CFS bandwidth at a fine period** (``cpu_period``/``cpu_quota`` in the compose override): the device's
  whole capacity, ``cores × speed`` plus ``QUOTA_HEADROOM`` for tierlab's own serving work, so a tier
  under load cannot do more work than its device could. The period is short (20 ms, not Docker's 100 ms)
  so a throttled tier stalls for milliseconds, not for most of 100 ms.

``SpeedMeasurementSpec`` is speed fidelity, measured like link fidelity: a fixed calibration model run
single-stream on the tier (through the paced path every stage takes) against the same model on the host.
``CpuThrottlingSpec`` is the kernel's CFS statistics of one tier (``cpu.stat``).
"""

from __future__ import annotations

import math

from pydantic import Field

from services.contracts.manifest import FrozenSpec

# the kernel's limits on cpu.cfs_period_us / cfs_quota_us (and cgroup v2's cpu.max)
MIN_CFS_US, MAX_CFS_PERIOD_US = 1_000, 1_000_000
DEFAULT_CFS_PERIOD_US = 100_000
# capacity beyond cores × speed for what is not the model (HTTP, codec, forwarding): without it the
# paced compute alone nearly fills the quota; at 1.25 a back-to-back single stream on a 0.5-speed tier was
# still throttled in a third of its periods (measured with /tierlab/calibrate, see README)
QUOTA_HEADROOM = 1.5
# speed fidelity: compute within ±10 % of host ÷ speed, and p95/p50 of a throttled tier at most 1.5
SPEED_TOLERANCE_PCT = 10.0
MAX_P95_OVER_P50 = 1.5


class DeviceSpec(FrozenSpec):
    """How fast one tier's device is: relative speed of a core, and how many cores it has."""

    speed: float = Field(default=1.0, ge=0.05, le=1.0, description="a device core's speed relative to a host core")
    cores: int = Field(default=1, ge=1, le=256, description="the device's cores (onnxruntime intra-op threads)")
    cfs_period_us: int = Field(default=DEFAULT_CFS_PERIOD_US, ge=MIN_CFS_US, le=MAX_CFS_PERIOD_US)

    @property
    def is_paced(self) -> bool:
        return self.speed < 1.0

    @property
    def capacity_cores(self) -> float:
        """The host cores' worth of CPU the device has: what CFS lets the tier use, with headroom."""
        return self.cores * self.speed * QUOTA_HEADROOM

    def cfs_quota_us(self) -> int:
        """``cpu_quota`` for ``cfs_period_us``: capacity × period, never under the kernel's 1 ms minimum."""
        return max(MIN_CFS_US, math.ceil(round(self.capacity_cores * self.cfs_period_us, 6)))  # no float dust

    def threads(self, available_cores: float) -> int:
        """onnxruntime intra-op threads: the device's cores, no more than the host gives the tier."""
        return max(1, min(self.cores, math.floor(available_cores)))


class CpuThrottlingSpec(FrozenSpec):
    """CFS bandwidth statistics of a tier's cgroup (``cpu.stat``), cumulative since the tier started."""

    periods: int = Field(ge=0, description="enforcement periods with runnable work")
    throttled_periods: int = Field(ge=0, description="periods in which the quota ran out")
    throttled_s: float = Field(ge=0.0, description="total time the group's threads were held back")

    def since(self, before: CpuThrottlingSpec) -> CpuThrottlingSpec:
        """What happened between ``before`` and this reading (a restart resets the counters: clamp at 0)."""
        return CpuThrottlingSpec(
            periods=max(0, self.periods - before.periods),
            throttled_periods=max(0, self.throttled_periods - before.throttled_periods),
            throttled_s=round(max(0.0, self.throttled_s - before.throttled_s), 6),
        )

    @property
    def throttled_fraction(self) -> float:
        return self.throttled_periods / self.periods if self.periods else 0.0


class CalibrationRequestSpec(FrozenSpec):
    """``POST /tierlab/calibrate``: how many single-stream runs of the calibration model to time."""

    runs: int = Field(default=30, ge=3, le=2000)


class CalibrationTimesSpec(FrozenSpec):
    """What a tier measured running the calibration model: wall and thread-CPU ms of each run."""

    tier: str
    device: DeviceSpec
    threads: int
    wall_ms: tuple[float, ...]
    cpu_ms: tuple[float, ...]


def median(values: list[float] | tuple[float, ...]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values: list[float] | tuple[float, ...], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class SpeedMeasurementSpec(FrozenSpec):
    """One tier's speed fidelity: its compute time for the calibration model against the host's ÷ speed."""

    tier: str
    configured_speed: float
    threads: int
    host_ms_p50: float = Field(description="the calibration model on the host, unthrottled, same threads")
    tier_ms_p50: float
    tier_ms_p95: float
    runs: int

    @classmethod
    def of(cls, times: CalibrationTimesSpec, host_ms: list[float]) -> SpeedMeasurementSpec:
        return cls(
            tier=times.tier,
            configured_speed=times.device.speed,
            threads=times.threads,
            host_ms_p50=round(median(host_ms), 4),
            tier_ms_p50=round(median(times.wall_ms), 4),
            tier_ms_p95=round(percentile(times.wall_ms, 95), 4),
            runs=len(times.wall_ms),
        )

    @property
    def expected_ms(self) -> float:
        return self.host_ms_p50 / self.configured_speed

    @property
    def achieved_speed(self) -> float:
        return self.host_ms_p50 / self.tier_ms_p50 if self.tier_ms_p50 > 0 else math.inf

    @property
    def p95_over_p50(self) -> float:
        return self.tier_ms_p95 / self.tier_ms_p50 if self.tier_ms_p50 > 0 else math.inf

    def problems(self, *, tolerance_pct: float = SPEED_TOLERANCE_PCT) -> list[str]:
        """Where the tier leaves its configured speed; empty when it computes as its device would."""
        found = []
        if abs(self.tier_ms_p50 - self.expected_ms) > self.expected_ms * tolerance_pct / 100:
            found.append(
                f"{self.tier}: calibration p50 {self.tier_ms_p50:.2f} ms, expected {self.expected_ms:.2f} "
                f"± {tolerance_pct:g} % (host {self.host_ms_p50:.2f} ms ÷ speed {self.configured_speed:g}); "
                f"achieved speed {self.achieved_speed:.2f}"
            )
        if self.configured_speed < 1.0 and self.p95_over_p50 > MAX_P95_OVER_P50:
            found.append(
                f"{self.tier}: calibration p95/p50 {self.p95_over_p50:.2f}, at most {MAX_P95_OVER_P50:g} "
                "on a slowed tier"
            )
        return found
