"""Device speed: how fast a tier's device computes, how the kernel and the tier realise it, how well they did.

A resource profile gives each tier a ``DeviceSpec``, one of two kinds:

- a **measured device** (``model: raspberry-pi-4``): a real device fitted to published measurements of it
  (``services.devices``). Its ``DeviceModelSpec`` holds, per thread count, the device's time ÷ this host's
  time for each kernel class (``services.contracts.kernels``: float and int8 convolutions, depthwise, matrix
  products, the rest), so an int8 stage and a float stage of one model slow down by the device's own factors,
  not this host's; a stage's factor is its classes' ratios weighted by its own host time in each class
  (:func:`stage_factor`). The device has ``cores``: that many stages compute at once, and a stage alone runs at
  the device's multi-thread ratios (interpolated by Amdahl's law for the cores it has, :func:`ratios_at`);
- a **relative device** (``speed: 0.5``): one factor, 1 / ``speed``, for every class: a core of this host
  slowed uniformly (the ``laptop`` and ``paper`` profiles: the studies' tier ordering on whatever host runs).

Two mechanisms realise it, because measurement showed neither is enough alone:

- **Pacing in the tier** (``pace``, called by ``services.tier.runtime`` after every stage): a stage run
  that used ``c`` ns of CPU on its calling thread (of wall time, with more than one onnxruntime thread:
  ``work_ns``) ends no sooner than ``c / speed`` after it began; the compute slot is held meanwhile.
  This is exact for stages of any length. The kernel alone is not: on a HZ=250 kernel CFS notices an
  exhausted quota only at the next 4 ms tick, so a 0.3 ms stage never throttles and a 3 ms one is slowed
  in 4 ms lumps (measured: period 10 ms / quota 1 ms gave a 3.1 ms job 40 ms, 1.3× the 31 ms asked).
- **CFS bandwidth** (``cpu_period``/``cpu_quota`` in the compose override): a safety net, one host core
  per compute slot plus ``QUOTA_HEADROOM`` for serving (:meth:`DeviceSpec.cfs_quota_us`), sized so paced
  compute never meets it: the device's capacity is its compute slots, each held for the device's time.
  An earlier cap of ``cores × speed × 1.5`` throttled a paced 200 ms stage on the ``laptop`` mobile in
  17–45 % of its periods (its host compute, 100 ms, exceeded the 75 ms quota of a period). At Docker's
  100 ms period, not a fine one: the kernel hands out quota in 5 ms slices and checks it on 4 ms ticks,
  so fine periods throttled even a paced single stream in lumps (measured: 2 ms period / 1 ms quota gave
  a 3 ms job p50 6.1 ms but p95 10 ms).

``SpeedMeasurementSpec`` is speed fidelity, measured like link fidelity: a fixed calibration model run
single-stream on the tier (through the paced path every stage takes) against the same model on the host.
``CpuThrottlingSpec`` is the kernel's CFS statistics of one tier (``cpu.stat``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from pydantic import Field, field_validator, model_validator

from services.contracts.kernels import KERNEL_CLASSES, KernelClass
from services.contracts.manifest import FrozenSpec

# the kernel's limits on cpu.cfs_period_us / cfs_quota_us (and cgroup v2's cpu.max)
MIN_CFS_US, MAX_CFS_PERIOD_US = 1_000, 1_000_000
DEFAULT_CFS_PERIOD_US = 100_000
# host cores beyond one per compute slot, for what is not the model (HTTP, codec, forwarding)
QUOTA_HEADROOM = 0.5
# speed fidelity: compute within ±10 % of host ÷ speed, and p95/p50 of a throttled tier at most 1.5
SPEED_TOLERANCE_PCT = 10.0
# pacing spins the last 0.3 ms of a wait instead of sleeping through it (a sleep wakes late)
PACE_SPIN_NS = 300_000
MAX_P95_OVER_P50 = 1.5


class DeviceSourceSpec(FrozenSpec):
    """Where a measured device's numbers come from."""

    table: str = Field(description="the published table: its heading, as the source prints it")
    url: str
    engine: str = Field(description="the engine and version (or date) the table was measured with")
    arithmetic: str = Field(description="what its float rows computed in (fp32, or fp16 on ARMv8.2+ cores)")
    notes: str = ""


class DeviceFitSpec(FrozenSpec):
    """How well a fitted device model predicts the device's published times it was not fitted on
    (leave-one-network-out): on the checked networks (``services.devices.fit.CHECKED``), which the tolerance
    applies to, and on every network of the device's table."""

    median_abs_err: float
    worst_abs_err: float
    networks: int = Field(description="distinct checked networks predicted")
    predictions: int = Field(description="checked network × thread-count pairs predicted")
    median_abs_err_all: float
    worst_abs_err_all: float
    predictions_all: int
    tolerance_median: float = 0.15
    tolerance_worst: float = 0.35

    @property
    def within_tolerance(self) -> bool:
        return self.median_abs_err <= self.tolerance_median and self.worst_abs_err <= self.tolerance_worst


class DeviceModelSpec(FrozenSpec):
    """A measured device fitted against this host: per thread count, the device's time ÷ this host's time
    (one onnxruntime thread) for each kernel class. Host-dependent by construction (its host side is measured
    on the host tierlab runs on, ``services.devices``); the device data it was fitted to is not."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = ""
    cores: int = Field(ge=1, le=256)
    ratios: dict[int, dict[KernelClass, float]] = Field(
        description="by thread count: the device's time ÷ this host's onnxruntime time, per class"
    )
    engine_transfer: dict[KernelClass, float] = Field(
        default_factory=dict,
        description="per class, this host's ncnn time ÷ its onnxruntime time for the same networks: folded into "
        "the ratios, so a stage is paced to what the device's published engine would take",
    )
    serving_ratio: float = Field(gt=0, description="device ÷ host for the tier's own serving work")
    serving_basis: str = Field(description="what the serving ratio rests on")
    source: DeviceSourceSpec
    fit: DeviceFitSpec
    host: str = Field(description="the host the ratios were measured against (CPU model, engine version)")

    @field_validator("ratios")
    @classmethod
    def _every_class(cls, ratios: dict[int, dict[KernelClass, float]]) -> dict[int, dict[KernelClass, float]]:
        if 1 not in ratios:
            raise ValueError("ratios need the one-thread fit")
        for threads, by_class in ratios.items():
            missing = [k for k in KERNEL_CLASSES if k not in by_class]
            if missing or any(v <= 0 or not math.isfinite(v) for v in by_class.values()):
                raise ValueError(f"{threads}-thread ratios need every class, positive and finite (missing {missing})")
        return ratios


def ratios_at(model: DeviceModelSpec, cores: float) -> dict[KernelClass, float]:
    """The device's ratios when a stage has ``cores`` of it: fitted where measured, else Amdahl's law per
    class between the one-thread fit and the nearest measured thread count (serial share from the two)."""
    cores = max(1.0, min(cores, float(model.cores)))
    if int(cores) == cores and int(cores) in model.ratios:
        return dict(model.ratios[int(cores)])
    one = model.ratios[1]
    above = sorted(t for t in model.ratios if t > 1)
    if not above:
        return dict(one)
    n = next((t for t in above if t >= cores), above[-1])
    found: dict[KernelClass, float] = {}
    for k in KERNEL_CLASSES:
        speedup = one[k] / model.ratios[n][k]  # how much faster n threads ran this class
        serial = min(1.0, max(0.0, (1 / speedup - 1 / n) / (1 - 1 / n)))
        found[k] = one[k] * (serial + (1 - serial) / cores)
    return found


def stage_factor(shares: Mapping[KernelClass, float], ratios: Mapping[KernelClass, float]) -> float:
    """Device time ÷ host time for a stage whose host time splits into ``shares`` (summing to 1)."""
    total = sum(shares.values())
    if total <= 0:
        return ratios["other"]
    return sum(share / total * ratios[k] for k, share in shares.items())


class DeviceSpec(FrozenSpec):
    """A tier's device: a measured one (``model``, fitted in the deployment's ``devices``) or a relative one
    (``speed`` of a host core), with its ``cores``."""

    speed: float = Field(default=1.0, ge=0.05, le=1.0, description="relative device: a core's speed vs the host's")
    model: str | None = Field(default=None, description="measured device: its name (services/devices/profiles)")
    cores: int = Field(default=1, ge=1, le=256, description="the device's cores: stages computing at once")
    cfs_period_us: int = Field(default=DEFAULT_CFS_PERIOD_US, ge=MIN_CFS_US, le=MAX_CFS_PERIOD_US)

    @model_validator(mode="after")
    def _one_kind(self) -> DeviceSpec:
        if self.model is not None and self.speed != 1.0:
            raise ValueError("a device is measured (model) or relative (speed), not both")
        return self

    @property
    def is_paced(self) -> bool:
        return self.speed < 1.0 or self.model is not None

    def compute_slots(self) -> int:
        """Stages the device computes at once: its cores (a relative device's cores are one host core's)."""
        return self.cores if self.model is not None else 1

    def cfs_quota_us(self) -> int:
        """``cpu_quota`` for ``cfs_period_us``: a host core per compute slot (per onnxruntime thread of a
        host-speed device) plus headroom for serving, so paced compute never meets it (module docstring)."""
        cores = (self.compute_slots() if self.is_paced else self.cores) + QUOTA_HEADROOM
        return max(MIN_CFS_US, math.ceil(round(cores * self.cfs_period_us, 6)))  # no float dust

    def threads(self, available_cores: float) -> int:
        """onnxruntime intra-op threads: one for a paced device (its parallelism is modelled by its cores'
        ratios and compute slots, never run on this host's few cores: two paced threads on a two-core host
        shared both cores with every other tier and read 0.21–0.45 of 0.25 round to round); a host-speed
        device's cores, no more than the host gives it."""
        if self.is_paced:
            return 1
        return max(1, min(self.cores, math.floor(available_cores)))


class DevicePacer:
    """What a tier paces with: the device's ratios at each core count, a stage's factor from its shares."""

    def __init__(self, device: DeviceSpec, model: DeviceModelSpec | None) -> None:
        if device.model is not None and (model is None or model.name != device.model):
            raise ValueError(f"device '{device.model}' has no fitted model in the deployment")
        self.device, self.model = device, model

    def ratios(self, cores: float) -> dict[KernelClass, float]:
        if self.model is None:
            return dict.fromkeys(KERNEL_CLASSES, 1.0 / self.device.speed)
        return ratios_at(self.model, cores)

    def factor(self, shares: Mapping[KernelClass, float], cores: float) -> float:
        return stage_factor(shares, self.ratios(cores))

    @property
    def serving_ratio(self) -> float:
        return self.model.serving_ratio if self.model is not None else 1.0 / self.device.speed


def work_ns(ran_ns: int, cpu_ns: int, threads: int) -> int:
    """What a run cost the device, to pace on: for a one-thread run its thread's CPU time (a thread the host
    preempted did not work meanwhile); for a multi-threaded run its wall time, because the calling thread
    blocks while onnxruntime's workers finish, and its CPU time then under-counts the run (measured with two
    threads after a paced idle: 0.98–1.13 ms CPU for a 1.19–1.23 ms run, so a tier paced on it ran 20 %
    faster than its configured speed)."""
    return cpu_ns if threads <= 1 else ran_ns


def pace(started_ns: int, device_ns: float) -> None:
    """Block until ``device_ns`` (the run's ``work_ns`` × its stage's factor) has passed since ``started_ns``:
    the device's compute time.

    Sleeps until ``PACE_SPIN_NS`` before the end, so the wait costs the tier's CPU quota next to nothing,
    then spins the rest: a sleeping thread wakes 70 µs late on average here (3 % of a 2.7 ms stage, always
    in the same direction), a spinning one on time.
    """
    deadline_ns = started_ns + device_ns
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
    factor: float = Field(default=1.0, gt=0, description="device ÷ host time the tier paces this model by")
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
    """One tier's speed fidelity: its compute time for the calibration model against the host's ÷ speed (a
    measured device's speed for this model is 1 / its factor: the calibration model is float convolutions).

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
            configured_speed=round(1.0 / tier_rounds[0].factor, 6),
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
    def emulable_speed(self) -> float:
        """The speed a tier can show: pacing only slows a stage down, so a device faster than one core of
        this host (for this model) computes at host speed (:meth:`gap`)."""
        return min(self.configured_speed, 1.0)

    @property
    def expected_ms(self) -> float:
        return self.host_ms_p50 / self.emulable_speed

    def gap(self) -> str | None:
        """The emulation gap of a device faster than this host, or None."""
        if self.configured_speed <= 1.0:
            return None
        return (
            f"{self.tier}: its device is {self.configured_speed:.2f}× one core of this host on this model, "
            f"so its stages run at host speed and overrun the device (each run counts them: 'host slower than "
            f"device')"
        )

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
        if abs(self.emulable_speed / self.achieved_speed - 1) > tolerance_pct / 100:
            found.append(
                f"{self.tier}: achieved speed {self.achieved_speed:.2f} (median of {len(self.round_speeds)} "
                f"rounds), configured {self.emulable_speed:.3g} ± {tolerance_pct:g} % in compute time "
                f"(calibration p50 {self.tier_ms_p50:.2f} ms, host {self.host_ms_p50:.2f} ms)"
            )
        if self.configured_speed < 1.0 and self.p95_over_p50 > MAX_P95_OVER_P50:
            found.append(
                f"{self.tier}: calibration p95/p50 {self.p95_over_p50:.2f} (median of {len(self.round_jitters)} "
                f"rounds), at most {MAX_P95_OVER_P50:g} on a slowed tier"
            )
        return found
