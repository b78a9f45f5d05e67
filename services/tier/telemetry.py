"""A tier's Prometheus metrics: one registry per tier (tests run several in one process).

Names and label keys come from ``services.contracts.metrics`` so dashboards and the loadgen agree.
Label values are bounded by construction: callers pass only served model and strategy names, and
``label_for`` maps anything else to ``unknown``.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from services.contracts import metrics as m
from services.contracts.device import CpuThrottlingSpec, DeviceSpec
from services.contracts.pipeline import HopTiming
from services.tier.limits import CgroupLimits
from services.tier.links import LinkState

_MS_PER_S = 1e3


@dataclass(frozen=True, slots=True)
class _StrategySeries:
    """The labelled children of one (model, strategy), resolved once."""

    request: Any
    queue: Any
    compute: Any
    send: Any
    host: Any
    pace: Any
    serving_charge: Any
    overran: Any
    bytes_in: Any
    bytes_out: Any
    early_exits: Any


def label_for(value: str | None, allowed: Container[str]) -> str:
    return value if value is not None and value in allowed else m.UNKNOWN_LABEL


class TierTelemetry:
    def __init__(self, tier: str, registry: CollectorRegistry | None = None) -> None:
        self.tier = tier
        self.registry = registry or CollectorRegistry()
        served = [m.TIER, m.MODEL, m.STRATEGY]
        r = self.registry
        if registry is None:
            # process_cpu_seconds_total and process_resident_memory_bytes: usage beside the cgroup limits
            ProcessCollector(registry=r)
        self.request_seconds = Histogram(
            m.REQUEST_SECONDS,
            "Time in this tier per request, downstream tiers included",
            served,
            buckets=m.LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            m.STAGE_SECONDS,
            "Time per phase of this tier's part of a request (queue, compute = host + pace, send, serving_charge)",
            [*served, m.PHASE],
            buckets=m.LATENCY_BUCKETS_S,
            registry=r,
        )
        self.bytes = Counter(
            m.BYTES, "Request bytes received (in) and forwarded (out)", [*served, m.DIRECTION], registry=r
        )
        self.early_exits = Counter(m.EARLY_EXITS, "Requests answered by an exit head on this tier", served, registry=r)
        self.overran = Counter(
            m.OVERRAN, "Stage runs the host alone took longer than the emulated device would have", served, registry=r
        )
        self.errors = Counter(
            m.ERRORS, "Requests answered with an error, by status", [m.TIER, m.MODEL, m.STATUS], registry=r
        )
        self.inflight = Gauge(m.INFLIGHT, "Infer requests in this tier now", [m.TIER], registry=r)
        self.cpu_limit = Gauge(m.CPU_LIMIT_CORES, "CPU cores this tier may use (cgroup quota)", [m.TIER], registry=r)
        self.memory_limit = Gauge(m.MEMORY_LIMIT_BYTES, "Memory limit (cgroup); 0 = unlimited", [m.TIER], registry=r)
        self.ort_threads = Gauge(m.ORT_THREADS, "onnxruntime intra-op threads per session", [m.TIER], registry=r)
        self.ready = Gauge(m.READY, "1 when every session is loaded and warmed", [m.TIER], registry=r)
        self.device_speed = Gauge(m.DEVICE_SPEED, "A device core's speed relative to a host core", [m.TIER], registry=r)
        # cumulative counters owned by the kernel: gauges set from cpu.stat when scraped
        self.cpu_periods = Gauge(m.CPU_PERIODS, "CFS periods with runnable work (cpu.stat)", [m.TIER], registry=r)
        self.cpu_throttled_periods = Gauge(
            m.CPU_THROTTLED_PERIODS, "CFS periods in which the quota ran out (cpu.stat)", [m.TIER], registry=r
        )
        self.cpu_throttled_seconds = Gauge(
            m.CPU_THROTTLED_SECONDS, "Time the tier's threads were held back by CFS (cpu.stat)", [m.TIER], registry=r
        )
        link_labels = [m.TIER, m.LINK, m.BACKEND]
        self.link_info = Gauge(f"{m.LINK_INFO}_info", "Link emulation in force (value 1)", link_labels, registry=r)
        self.link_delay = Gauge(m.LINK_DELAY_MS, "Configured one-way link delay", link_labels, registry=r)
        self.link_rate = Gauge(m.LINK_RATE_MBIT, "Configured link rate; 0 = unlimited", link_labels, registry=r)
        self.inflight_now = self.inflight.labels(tier)  # resolved once: touched twice per request
        self.inflight_now.set(0)
        self.ready.labels(tier).set(0)
        self._by_strategy: dict[tuple[str, str], _StrategySeries] = {}

    def record_limits(self, limits: CgroupLimits, cpu_cores: float, threads: int, device: DeviceSpec) -> None:
        self.device_speed.labels(self.tier).set(0.0 if device.model else device.speed)
        self.cpu_limit.labels(self.tier).set(cpu_cores)
        self.memory_limit.labels(self.tier).set(limits.memory_limit_bytes or 0)
        self.ort_threads.labels(self.tier).set(threads)

    def record_links(self, states: Sequence[LinkState]) -> None:
        for gauge in (self.link_info, self.link_delay, self.link_rate):
            gauge.clear()  # a re-shaped link may have changed backend: drop the old series
        for state in states:
            labels = (self.tier, state.link, state.backend.value)
            self.link_info.labels(*labels).set(1)
            self.link_delay.labels(*labels).set(state.spec.delay_ms)
            self.link_rate.labels(*labels).set(state.spec.rate_mbit or 0)

    def _series(self, model: str, strategy: str) -> _StrategySeries:
        # .labels() hashes and locks on every call: resolve a strategy's children once, on the hot path never
        series = self._by_strategy.get((model, strategy))
        if series is None:
            labels = (self.tier, model, strategy)
            series = _StrategySeries(
                request=self.request_seconds.labels(*labels),
                queue=self.stage_seconds.labels(*labels, "queue"),
                compute=self.stage_seconds.labels(*labels, "compute"),
                send=self.stage_seconds.labels(*labels, "send"),
                host=self.stage_seconds.labels(*labels, "host"),
                pace=self.stage_seconds.labels(*labels, "pace"),
                serving_charge=self.stage_seconds.labels(*labels, "serving_charge"),
                overran=self.overran.labels(*labels),
                bytes_in=self.bytes.labels(*labels, "in"),
                bytes_out=self.bytes.labels(*labels, "out"),
                early_exits=self.early_exits.labels(*labels),
            )
            self._by_strategy[(model, strategy)] = series
        return series

    def record_hop(self, model: str, strategy: str, hop: HopTiming, *, exited_here: bool) -> None:
        series = self._series(model, strategy)
        series.request.observe(hop.total_ms / _MS_PER_S)
        series.queue.observe(hop.queue_ms / _MS_PER_S)
        series.compute.observe(hop.compute_ms / _MS_PER_S)
        if hop.send_ms:
            series.send.observe(hop.send_ms / _MS_PER_S)
        if hop.first_stage >= 0:
            series.host.observe(hop.host_ms / _MS_PER_S)
            series.pace.observe(hop.pace_ms / _MS_PER_S)
        if hop.serving_charge_ms:
            series.serving_charge.observe(hop.serving_charge_ms / _MS_PER_S)
        if hop.overran:
            series.overran.inc()
        series.bytes_in.inc(hop.bytes_in)
        series.bytes_out.inc(hop.bytes_out)
        if exited_here:
            series.early_exits.inc()

    def record_error(self, model: str, status: int) -> None:
        self.errors.labels(self.tier, model, str(status)).inc()

    def record_throttling(self, throttling: CpuThrottlingSpec | None) -> None:
        if throttling is not None:
            self.cpu_periods.labels(self.tier).set(throttling.periods)
            self.cpu_throttled_periods.labels(self.tier).set(throttling.throttled_periods)
            self.cpu_throttled_seconds.labels(self.tier).set(throttling.throttled_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
