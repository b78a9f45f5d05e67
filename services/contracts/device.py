"""Device speed: how fast a tier's device computes, how the kernel and the tier realise it, how well they did.

A resource profile gives each tier a ``DeviceSpec``: ``speed`` relative to one core of the host tierlab
runs on (0.5 = a stage takes twice as long as on the host) and the device's ``cores``. Two mechanisms
realise it, because measurement showed neither is enough alone:

- **Pacing in the tier** (``pace``, called by ``services.tier.runtime`` after every stage): a stage run
  that used ``c`` ns of CPU on its calling thread (of wall time, with more than one onnxruntime thread:
  ``work_ns``) ends no sooner than ``c / speed`` after it began; the compute slot is held meanwhile.
  This is exact for stages of any length. The kernel alone is not: on a HZ=250 kernel CFS notices an
  exhausted quota only at the next 4 ms tick, so a 0.3 ms stage never throttles and a 3 ms one is slowed
  in 4 ms lumps (measured: period 10 ms / quota 1 ms gave a 3.1 ms job 40 ms, 1.3× the 31 ms asked).
- **CFS bandwidth** (``cpu_period``/``cpu_quota`` in the compose override): the device's whole
  capacity, ``cores × speed`` plus ``QUOTA_HEADROOM`` for tierlab's own serving work, so a tier under
  load cannot do more work than its device could. At Docker's 100 ms period, not a fine one: the
  kernel hands out quota in 5 ms slices (``sched_cfs_bandwidth_slice_us``) and checks it on 4 ms ticks,
  so fine periods throttled even a paced single stream in lumps (measured: 2 ms period / 1 ms quota gave
  a 3 ms job p50 6.1 ms but p95 10 ms; 20 ms period with 1.25 headroom throttled a 0.5-speed single
  stream in 117 of 343 periods).

``SpeedMeasurementSpec`` is speed fidelity, measured like link fidelity: a fixed calibration model run
single-stream on the tier (through the paced path every stage takes) against the same model on the host.
``CpuThrottlingSpec`` is the kernel's CFS statistics of one tier (``cpu.stat``).
"""

from __future__ import annotations

import math
import time

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
# pacing spins the last 0.3 ms of a wait instead of sleeping through it (a sleep wakes late)
PACE_SPIN_NS = 300_000
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
        """onnxruntime intra-op threads: the device's cores, no more than the host gives the tier and, for a
        paced device, no more than the whole host cores of its capacity, leaving one host core to the rest.
        Two paced threads on this two-core host shared both cores with every other tier and the host
        reference, and `rpi4`'s mobile (0.25, 4 cores) read 0.21–0.45 round to round in CI; on one thread
        it reads like `laptop`'s mobile. The device's own parallelism is then not emulated."""
        cap = min(math.floor(self.capacity_cores), math.floor(available_cores) - 1) if self.is_paced else self.cores
        return max(1, min(self.cores, math.floor(available_cores), cap))


def work_ns(ran_ns: int, cpu_ns: int, threads: int) -> int:
    """What a run cost the device, to pace on: for a one-thread run its thread's CPU time (a thread the host
    preempted did not work meanwhile); for a multi-threaded run its wall time, because the calling thread
    blocks while onnxruntime's workers finish, and its CPU time then under-counts the run (measured with two
    threads after a paced idle: 0.98–1.13 ms CPU for a 1.19–1.23 ms run, so a tier paced on it ran 20 %
    faster than its configured speed)."""
    return cpu_ns if threads <= 1 else ran_ns


def pace(started_ns: int, cpu_ns: int, speed: float) -> None:
    """Block until ``cpu_ns / speed`` (the run's ``work_ns``) has passed since ``started_ns``: the device's
    compute time.

    Sleeps until ``PACE_SPIN_NS`` before the end, so the wait costs the tier's CPU quota next to nothing,
    then spins the rest: a sleeping thread wakes 70 µs late on average here (3 % of a 2.7 ms stage, always
    in the same direction), a spinning one on time.
    """
    if speed >= 1.0:
        return
    deadline_ns = started_ns + cpu_ns / speed
    remaining_ns = deadline_ns - time.perf_counter_ns()
    if remaining_ns > PACE_SPIN_NS:
        time.sleep((remaining_ns - PACE_SPIN_NS) / 1e9)
    while time.perf_counter_ns() < deadline_ns:
        pass


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
    allow_spinning: bool = Field(description="the tier's onnxruntime spin setting; the host reference copies it")
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
    """One tier's speed fidelity: its compute time for the calibration model against the host's ÷ speed.

    Measured in rounds that alternate host and tier, so load elsewhere on the machine hits both alike;
    the achieved speed is the median over rounds of host p50 ÷ tier p50 and the jitter the median over
    rounds of the tier's p95 ÷ p50 (a burst that spoils one round moves neither); p50/p95 are over every run.
    """

    tier: str
    configured_speed: float
    threads: int
    host_ms_p50: float = Field(description="the calibration model on the host, unthrottled, same session options")
    tier_ms_p50: float
    tier_ms_p95: float
    round_speeds: tuple[float, ...] = Field(description="host p50 ÷ tier p50 of each interleaved round")
    round_jitters: tuple[float, ...] = Field(description="the tier's p95 ÷ p50 in each round")
    runs: int

    @classmethod
    def of(cls, tier_rounds: list[CalibrationTimesSpec], host_rounds: list[list[float]]) -> SpeedMeasurementSpec:
        """From the tier's and the host's runs, round by round (``tier_rounds[i]`` next to ``host_rounds[i]``)."""
        if not tier_rounds or len(tier_rounds) != len(host_rounds):
            raise ValueError("speed fidelity needs as many host rounds as tier rounds, at least one")
        tier_ms = [ms for block in tier_rounds for ms in block.wall_ms]
        host_ms = [ms for block in host_rounds for ms in block]
        return cls(
            tier=tier_rounds[0].tier,
            configured_speed=tier_rounds[0].device.speed,
            threads=tier_rounds[0].threads,
            host_ms_p50=round(median(host_ms), 4),
            tier_ms_p50=round(median(tier_ms), 4),
            tier_ms_p95=round(percentile(tier_ms, 95), 4),
            round_speeds=tuple(
                round(median(host) / median(block.wall_ms), 4)
                for block, host in zip(tier_rounds, host_rounds, strict=True)
            ),
            round_jitters=tuple(round(percentile(b.wall_ms, 95) / median(b.wall_ms), 4) for b in tier_rounds),
            runs=len(tier_ms),
        )

    @property
    def expected_ms(self) -> float:
        return self.host_ms_p50 / self.configured_speed

    @property
    def achieved_speed(self) -> float:
        return median(self.round_speeds)

    @property
    def p95_over_p50(self) -> float:
        return median(self.round_jitters)

    def problems(self, *, tolerance_pct: float = SPEED_TOLERANCE_PCT) -> list[str]:
        """Where the tier leaves its configured speed; empty when it computes as its device would."""
        found = []
        # compute time within ±tolerance of host ÷ speed: configured ÷ achieved speed within 1 ± tolerance
        if abs(self.configured_speed / self.achieved_speed - 1) > tolerance_pct / 100:
            found.append(
                f"{self.tier}: achieved speed {self.achieved_speed:.2f} (median of {len(self.round_speeds)} "
                f"rounds), configured {self.configured_speed:g} ± {tolerance_pct:g} % in compute time "
                f"(calibration p50 {self.tier_ms_p50:.2f} ms, host {self.host_ms_p50:.2f} ms)"
            )
        if self.configured_speed < 1.0 and self.p95_over_p50 > MAX_P95_OVER_P50:
            found.append(
                f"{self.tier}: calibration p95/p50 {self.p95_over_p50:.2f} (median of {len(self.round_jitters)} "
                f"rounds), at most {MAX_P95_OVER_P50:g} on a slowed tier"
            )
        return found
