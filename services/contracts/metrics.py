"""Prometheus metric names, label keys and buckets shared by tiers, the loadgen and the dashboards.

Label values are always bounded: ``tier`` is one of three, ``model`` a served variant (or ``unknown``),
``strategy`` a served ``model@placement`` (or ``unknown``), ``phase`` and ``status`` small fixed sets.
"""

from __future__ import annotations

from typing import Final

NAMESPACE: Final = "tierlab"

# label keys
TIER: Final = "tier"
MODEL: Final = "model"
STRATEGY: Final = "strategy"
PHASE: Final = "phase"
DIRECTION: Final = "direction"
STATUS: Final = "status"
LINK: Final = "link"
BACKEND: Final = "backend"
UNKNOWN_LABEL: Final = "unknown"

# stage phases of the timing model (see services.contracts.pipeline)
PHASES: Final = ("queue", "compute", "send", "host", "pace", "serving_charge")

# metric names (prometheus-client adds _seconds/_total suffix conventions as written here)
REQUEST_SECONDS: Final = "tierlab_request_duration_seconds"
STAGE_SECONDS: Final = "tierlab_stage_duration_seconds"
BYTES: Final = "tierlab_bytes"  # counter: tierlab_bytes_total{direction="in"|"out"}
EARLY_EXITS: Final = "tierlab_early_exits"  # counter: tierlab_early_exits_total
ERRORS: Final = "tierlab_errors"  # counter: tierlab_errors_total{status}
INFLIGHT: Final = "tierlab_inflight_requests"
CPU_LIMIT_CORES: Final = "tierlab_cpu_limit_cores"
MEMORY_LIMIT_BYTES: Final = "tierlab_memory_limit_bytes"
ORT_THREADS: Final = "tierlab_ort_intra_op_threads"
DEVICE_SPEED: Final = "tierlab_device_speed"  # a relative device core's speed vs a host core (measured devices: 0)
OVERRAN: Final = "tierlab_emulation_overran"  # counter: stages the host alone ran longer than the device would
CPU_PERIODS: Final = "tierlab_cpu_cfs_periods"  # cgroup cpu.stat, as read at scrape time
CPU_THROTTLED_PERIODS: Final = "tierlab_cpu_cfs_throttled_periods"
CPU_THROTTLED_SECONDS: Final = "tierlab_cpu_cfs_throttled_seconds"
READY: Final = "tierlab_ready"
LINK_INFO: Final = "tierlab_link"  # info: tierlab_link_info{link, backend, ...}
LINK_DELAY_MS: Final = "tierlab_link_delay_ms"
LINK_RATE_MBIT: Final = "tierlab_link_rate_mbit"

# 0.1 ms … 60 s, roughly three buckets a decade
LATENCY_BUCKETS_S: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
