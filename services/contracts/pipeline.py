"""Pipeline control and per-hop timings as they travel in V2 ``parameters``.

V2 parameter values may only be booleans, numbers or strings, so the hop records are flattened:
``hop0_tier``, ``hop0_queue_ms``, … ``hop{k}_…`` for the k-th tier a request visited. A tier that
forwards adds its own ``hop{k}`` record to the ones its next tier answered with.

Timing model of one hop (all in milliseconds, measured with ``perf_counter_ns`` in the tier):

- ``queue_ms``: body received → first local stage starts computing (decode + waiting for a compute slot);
- ``compute_ms``: the device's compute time for this tier's stages, exit checks included: onnxruntime's own
  run on the host (``host_ms``) plus the pacing wait (``pace_ms``) that makes it the device's time;
  ``overran`` when the host alone took longer than the device would have (the emulation is then slower
  than its device, and says so);
- ``send_ms``: forward call to the next tier (encode + link + the next tier's whole ``total_ms`` + decode);
- ``serving_ms``: the rest of the hop on the host (decode, plan, encode: total − queue − compute − send),
  and ``serving_charge_ms`` the wait added so a slow device's serving takes its device's time too;
- ``total_ms``: body received → response encoded, so ``send_ms[k] - total_ms[k+1]`` is the link's transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from services.contracts.codec import Parameters, ParamValue
from services.contracts.errors import BadParameter

# request parameters a client may set
PLACEMENT = "placement"
REQUEST_ID = "request_id"
EXIT_THRESHOLD = "exit_threshold"
TIMEOUT_MS = "timeout_ms"  # the caller's budget: each hop forwards what is left, less its margin
# request parameters only tiers set when they forward
STAGE = "tierlab_stage"
HOP = "tierlab_hop"
# response parameters
STRATEGY = "strategy"
EXIT_STAGE = "exit_stage"
EXITED_EARLY = "exited_early"
HOP_COUNT = "hops"


def _number(params: Parameters, key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadParameter(f"parameter '{key}' must be a finite number, got {value!r}")
    return float(value)


MAX_INDEX = 64  # stages and hops: far beyond any pipeline, small enough for every label and key built from it
MAX_TIMEOUT_MS = 3_600_000.0


def _index(params: Parameters, key: str) -> int:
    value = params.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX:
        raise BadParameter(f"parameter '{key}' must be an integer within [0, {MAX_INDEX}], got {value!r}")
    return value


def _string(params: Parameters, key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadParameter(f"parameter '{key}' must be a string, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class PipelineRequest:
    """The pipeline control a request carries; absent fields take the model's defaults."""

    placement: str | None = None
    request_id: str | None = None
    exit_threshold: float | None = None
    stage: int = 0
    hop: int = 0
    timeout_ms: float | None = None

    @classmethod
    def from_parameters(cls, params: Parameters) -> PipelineRequest:
        threshold = _number(params, EXIT_THRESHOLD)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise BadParameter(f"parameter '{EXIT_THRESHOLD}' must be within [0, 1], got {threshold}")
        timeout_ms = _number(params, TIMEOUT_MS)
        if timeout_ms is not None and not 0.0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise BadParameter(f"parameter '{TIMEOUT_MS}' must be within (0, {MAX_TIMEOUT_MS:g}], got {timeout_ms}")
        return cls(
            placement=_string(params, PLACEMENT),
            request_id=_string(params, REQUEST_ID),
            exit_threshold=threshold,
            stage=_index(params, STAGE),
            hop=_index(params, HOP),
            timeout_ms=timeout_ms,
        )

    def forward_parameters(
        self, *, placement: str, stage: int, hop: int, timeout_ms: float | None = None
    ) -> Parameters:
        params: Parameters = {PLACEMENT: placement, STAGE: stage, HOP: hop}
        if timeout_ms is not None:
            params[TIMEOUT_MS] = round(timeout_ms, 3)
        if self.request_id is not None:
            params[REQUEST_ID] = self.request_id
        if self.exit_threshold is not None:
            params[EXIT_THRESHOLD] = self.exit_threshold
        return params


def forward_budget_s(timeout_ms: float | None, received_ns: int, now_ns: int, ceiling_s: float) -> float:
    """How long a hop may wait for the next tier: the caller's budget left, less a margin (5 %, at least
    5 ms) so that the hop which is really slow times out first and is the one named; never above the
    tier's own forward timeout."""
    if timeout_ms is None:
        return ceiling_s
    left_s = timeout_ms / 1e3 - (now_ns - received_ns) / 1e9
    return min(ceiling_s, left_s - max(0.005, 0.05 * left_s))


@dataclass(frozen=True, slots=True)
class HopTiming:
    """What one tier visit cost; see the module docstring for what each time covers."""

    tier: str
    first_stage: int
    last_stage: int
    queue_ms: float
    compute_ms: float
    send_ms: float
    total_ms: float
    bytes_in: int
    bytes_out: int
    host_ms: float = 0.0
    pace_ms: float = 0.0
    overran: bool = False
    serving_ms: float = 0.0
    serving_charge_ms: float = 0.0

    def to_parameters(self, index: int) -> Parameters:
        return {f"hop{index}_{name}": getattr(self, name) for name in _HOP_FIELDS}

    @classmethod
    def from_parameters(cls, params: Parameters, index: int) -> HopTiming:
        values: dict[str, ParamValue] = {}
        for name in _HOP_FIELDS:
            key = f"hop{index}_{name}"
            if key not in params:
                raise BadParameter(f"response parameters lack '{key}'")
            values[name] = params[key]
        return cls(**values)  # type: ignore[arg-type]


_HOP_FIELDS = tuple(f.name for f in fields(HopTiming))


def hops_from_parameters(params: Parameters) -> list[HopTiming]:
    """Every hop record in a response's parameters, in visiting order."""
    count = params.get(HOP_COUNT, 0)
    if isinstance(count, bool) or not isinstance(count, int):
        raise BadParameter(f"response parameter '{HOP_COUNT}' must be an integer, got {count!r}")
    return [HopTiming.from_parameters(params, index) for index in range(count)]
