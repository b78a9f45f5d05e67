"""The tier's data plane: run this tier's stages of a pipeline, exit early or forward, time every hop.

It knows nothing of HTTP: it takes a decoded :class:`~services.contracts.codec.InferRequest` and gives an
:class:`~services.contracts.codec.InferResponse`, raising the contract's errors. A request names a
model (a variant) and optionally a placement; the tier runs the consecutive stages the placement gives
it, stops at a confident exit head, or forwards the next stage's inputs to the tier that runs it and
relays the answer with its own hop record added.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from services.contracts import pipeline as p
from services.contracts.calibration import calibration_feeds, calibration_model_bytes, session_options, time_runs
from services.contracts.clock import sleep_until
from services.contracts.codec import InferRequest, InferResponse
from services.contracts.device import CalibrationTimesSpec, DevicePacer, DeviceSpec
from services.contracts.errors import (
    BadParameter,
    ConfigError,
    DoesNotFit,
    ModelNotFound,
    ModelNotLoaded,
    TensorMismatch,
    Unavailable,
)
from services.contracts.kernels import KernelClass, profile_shares
from services.contracts.manifest import ManifestSpec, load_manifest, verify_stage_files
from services.contracts.pipeline import HopTiming, PipelineRequest
from services.contracts.repository import MIB, ModelState, RepositoryModelSpec, StartupModels, estimated_peak_mib
from services.contracts.runkey import Strategy
from services.contracts.specs import TIERS, DeploymentSpec, Placement, TierName, placements_for
from services.tier.forwarder import Forwarder
from services.tier.limits import (
    MemoryBudget,
    process_peak_rss_bytes,
    process_rss_bytes,
    release_memory,
    reset_peak_rss,
)
from services.tier.runtime import StageSession, StagesResult, check_inputs, run_stages
from services.tier.telemetry import TierTelemetry

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_NS_PER_MS = 1_000_000
# stages this cheap run on the event loop: a worker-thread hand-off costs 100-250 µs (benchmarks/overhead.py)
INLINE_COMPUTE_MAX_US = 300.0


def _ms(ns: int) -> float:
    return round(ns / _NS_PER_MS, 4)


@functools.lru_cache(maxsize=256)
def _placement_name(text: str) -> str:
    """A placement's canonical name (validated once per distinct text: it is on every request's path)."""
    return Placement.parse(text).name


def _batch_items(stage: StageSession, inputs: Mapping[str, np.ndarray]) -> int:
    first = stage.spec.inputs[0]
    if not first.shape or first.shape[0] != -1:
        return 1
    return max(1, int(inputs[first.name].shape[0]))


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A variant this stack serves, with the placements a request may choose (the first is default)."""

    manifest: ManifestSpec
    folder: Path
    placements: dict[str, Placement]

    @property
    def name(self) -> str:
        return self.manifest.name

    def default_placement(self, tier: TierName) -> str:
        """Without a placement, a request runs from the tier it reached: the first placement starting there."""
        count = len(self.manifest.stages)
        starting_here = (name for name, pl in self.placements.items() if pl.stage_tiers(count)[0] == tier)
        return next(starting_here, next(iter(self.placements)))

    def strategy(self, placement: str) -> str:
        return str(Strategy(self.name, placement))

    def stages_on(self, tier: TierName) -> list[int]:
        """Every stage some served placement puts on ``tier`` (the sessions the tier must load)."""
        count = len(self.manifest.stages)
        return sorted({i for pl in self.placements.values() for i, t in enumerate(pl.stage_tiers(count)) if t == tier})


def resolve_models(deployment: DeploymentSpec, deployment_dir: Path) -> dict[str, ServedModel]:
    """Read every manifest the deployment names, verify its files, and check its placements."""
    root = deployment_dir / deployment.models_dir
    models: dict[str, ServedModel] = {}
    for entry in deployment.models:
        path = root / entry.manifest
        manifest = load_manifest(path)
        folder = path if path.is_dir() else path.parent
        verify_stage_files(manifest, folder)
        if manifest.name in models:
            raise ConfigError(
                f"two manifests name the model '{manifest.name}' ({models[manifest.name].folder}, {folder})"
            )
        count = len(manifest.stages)
        names = entry.placements or tuple(pl.name for pl in placements_for(count))
        placements: dict[str, Placement] = {}
        for name in names:
            placement = Placement.parse(name)
            try:
                placement.stage_tiers(count)
            except ValueError as exc:
                raise ConfigError(f"model '{manifest.name}': {exc}") from None
            placements[placement.name] = placement
        models[manifest.name] = ServedModel(manifest, folder, placements)
    return models


@dataclass
class DataPlane:
    tier: TierName
    models: dict[str, ServedModel]
    forwarder: Forwarder
    telemetry: TierTelemetry
    compute_slots: int = 1
    max_queue: int = 64
    device: DeviceSpec = field(default_factory=DeviceSpec)
    pacer: DevicePacer = field(default_factory=lambda: DevicePacer(DeviceSpec(), None))
    threads: int = 1
    memory: MemoryBudget = field(default_factory=MemoryBudget)
    sessions: dict[tuple[str, int], StageSession] = field(default_factory=dict)
    stage_cost_us: dict[tuple[str, int], float] = field(default_factory=dict)  # warm-up median
    ready: bool = False
    load_error: str | None = None
    repository: dict[str, RepositoryModelSpec] = field(init=False)
    _executor: ThreadPoolExecutor = field(init=False)
    _loading: threading.Lock = field(init=False, default_factory=threading.Lock)
    _compute_pending: int = 0
    _calibration_shares: dict[KernelClass, float] | None = None

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(self.compute_slots, thread_name_prefix=f"{self.tier}-compute")
        self.repository = {name: self._entry(model, "UNAVAILABLE", "not loaded") for name, model in self.models.items()}

    # ------------------------------------------------------------------------------------- lifecycle

    def load(self, options: ort.SessionOptions, warmup_runs: int, startup: StartupModels) -> None:
        """Load the ``startup`` models (blocking; run it in a thread), then serve. A model that does not fit
        stays UNAVAILABLE with the reason and the tier serves the others; a broken one stops the tier."""
        names = list(self.models) if startup == "all" else [] if startup == "none" else list(startup)
        try:
            for name in names:
                try:
                    self.load_model(name, options, warmup_runs)
                except DoesNotFit as exc:
                    log.warning("%s", exc.message)
        except (ConfigError, ModelNotFound) as exc:
            self.load_error = exc.message
            log.critical("%s cannot serve: %s", self.tier, exc.message)
            return
        except Exception as exc:  # never "still loading" for ever: the reason goes to health and the log
            self.load_error = f"loading failed: {type(exc).__name__}: {exc}"
            log.critical("%s cannot serve: %s", self.tier, self.load_error, exc_info=exc)
            return
        self.ready = True
        self.telemetry.ready.labels(self.tier).set(1)
        loaded = sum(entry.ready for entry in self.repository.values())
        log.info(
            "%s ready: %d of %d model(s) loaded, %d stage session(s)",
            self.tier,
            loaded,
            len(self.models),
            len(self.sessions),
        )

    def _entry(
        self, model: ServedModel, state: ModelState, reason: str = "", measured: dict[str, float] | None = None
    ) -> RepositoryModelSpec:
        stages = model.stages_on(self.tier)
        file_bytes = sum(model.manifest.stages[i].size_bytes for i in stages)
        return RepositoryModelSpec(
            name=model.name,
            state=state,
            reason=reason,
            placements=tuple(model.placements),
            stages_here=tuple(stages),
            file_mib=round(file_bytes / MIB, 3),
            **(measured or {}),
        )

    def index(self, *, ready_only: bool = False) -> list[RepositoryModelSpec]:
        """The repository index: every model this tier can serve, its state and measured load costs."""
        return [entry for entry in self.repository.values() if entry.ready or not ready_only]

    def load_model(self, name: str, options: ort.SessionOptions, warmup_runs: int) -> RepositoryModelSpec:
        """Create and warm the sessions of the model's stages on this tier, measuring what that costs;
        DoesNotFit (the model stays UNAVAILABLE) when its estimated peak exceeds the memory free."""
        model = self.model(name)
        with self._loading:
            if self.repository[name].ready:
                return self.repository[name]
            entry = self._entry(model, "LOADING")
            free_mib, of = self.memory.free_mib()
            need_mib = estimated_peak_mib(entry.file_mib)
            if need_mib > free_mib:
                reason = f"does not fit: needs ~{need_mib:.0f} MiB, {free_mib:.0f} MiB free of {of}"
                self.repository[name] = self._entry(model, "UNAVAILABLE", reason)
                raise DoesNotFit(f"{name} on {self.tier}: {reason}")
            self.repository[name] = entry
            rss_before = process_rss_bytes()
            measures_peak = reset_peak_rss()
            started = time.perf_counter_ns()
            try:
                stages = {i: StageSession.load(model.manifest, model.folder, i, options) for i in entry.stages_here}
                loaded = time.perf_counter_ns()
                costs = {i: stage.warm(warmup_runs) for i, stage in stages.items()}
                if self.device.is_paced:  # each stage paced by its own kernel classes
                    stages = {i: stage.profiled(model.folder, options) for i, stage in stages.items()}
            except ConfigError as exc:
                self.repository[name] = self._entry(model, "UNAVAILABLE", f"load failed: {exc.message}")
                raise
            warmed = time.perf_counter_ns()
            for index, stage in stages.items():
                self.stage_cost_us[(name, index)] = costs[index]
                self.sessions[(name, index)] = stage
            measured = {
                "resident_mib": round(max(0, process_rss_bytes() - rss_before) / MIB, 2),
                "load_ms": round(_ms(loaded - started), 2),
                "warmup_ms": round(_ms(warmed - loaded), 2),
            }
            if measures_peak:
                measured["peak_mib"] = round(max(0, process_peak_rss_bytes() - rss_before) / MIB, 2)
            self.repository[name] = self._entry(model, "READY", measured=measured)
            log.info("%s loaded %s: %s", self.tier, name, measured)
            return self.repository[name]

    def unload_model(self, name: str) -> RepositoryModelSpec:
        """Drop the model's sessions here (requests already computing finish with them)."""
        model = self.model(name)
        with self._loading:
            self.repository[name] = self._entry(model, "UNLOADING")
            for index in model.stages_on(self.tier):
                self.sessions.pop((name, index), None)
                self.stage_cost_us.pop((name, index), None)
            release_memory()
            self.repository[name] = self._entry(model, "UNAVAILABLE", "unloaded")
            return self.repository[name]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------------------- infer

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ModelNotFound(f"model '{name}' is not served here; served: {sorted(self.models)}")
        return served

    def strategies(self) -> set[str]:
        return {m.strategy(pl) for m in self.models.values() for pl in m.placements}

    def admit(self, model_name: str) -> None:
        """What can be told before a request's body is read: ready, the model served, room for the work."""
        self._check_ready()
        self.model(model_name)
        self._check_room()

    def _check_room(self) -> None:
        """503 when every compute slot is busy and the queue behind them is full."""
        limit = self.compute_slots + self.max_queue
        if self._compute_pending >= limit:
            raise Unavailable(
                f"{self.tier} has {self._compute_pending} requests in or waiting for compute "
                f"(limit {limit}); retry later"
            )

    def _check_ready(self) -> None:
        if not self.ready:
            reason = self.load_error or "sessions are still loading"
            raise Unavailable(f"{self.tier} is not ready: {reason}", retry_after_s=1 if self.load_error is None else 30)

    def _plan(self, model: ServedModel, control: PipelineRequest) -> tuple[str, tuple[TierName, ...], list[int]]:
        placement = control.placement or model.default_placement(self.tier)
        try:
            placement = _placement_name(placement)
        except ValueError as exc:
            raise BadParameter(f"parameter 'placement': {exc}") from None
        if placement not in model.placements:
            raise BadParameter(
                f"placement {placement} is not served for '{model.name}'; served: {list(model.placements)}"
            )
        stage_tiers = model.placements[placement].stage_tiers(len(model.manifest.stages))
        first = control.stage
        if first >= len(stage_tiers):
            raise BadParameter(f"stage {first} does not exist; '{model.name}' has {len(stage_tiers)} stages")
        if stage_tiers[first] != self.tier:
            if first == 0 and control.hop == 0 and TIERS.index(self.tier) < TIERS.index(stage_tiers[0]):
                return placement, stage_tiers, []  # relay: the device sends its input on, over the link
            raise BadParameter(
                f"stage {first} of {model.strategy(placement)} runs on {stage_tiers[first]}, not {self.tier}: "
                f"send the request to {stage_tiers[first]}"
            )
        local = [first]
        while local[-1] + 1 < len(stage_tiers) and stage_tiers[local[-1] + 1] == self.tier:
            local.append(local[-1] + 1)
        return placement, stage_tiers, local

    async def infer(self, model_name: str, request: InferRequest, *, received_ns: int, bytes_in: int) -> InferResponse:
        """Run this tier's part of the request's pipeline; ``received_ns`` is when its body was read."""
        self._check_ready()
        model = self.model(model_name)
        control = PipelineRequest.from_parameters(request.parameters)
        placement, stage_tiers, local = self._plan(model, control)
        if any((model.name, index) not in self.sessions for index in local):
            entry = self.repository[model.name]
            raise ModelNotLoaded(
                f"model '{model.name}' is not loaded on {self.tier} ({entry.state}"
                + (f": {entry.reason}" if entry.reason else "")
                + f"); load it with POST /v2/repository/models/{model.name}/load"
            )
        final_names = [t.name for t in model.manifest.outputs]
        unknown = [o.name for o in request.outputs if o.name not in final_names]
        if unknown:
            raise TensorMismatch(f"unknown output(s) {unknown}; '{model.name}' gives {final_names}")
        check_inputs(model.manifest.stages[local[0] if local else 0].inputs, request.inputs)

        self.telemetry.inflight_now.inc()
        try:
            if local:
                result = await self._compute(model, local, request.inputs, control.exit_threshold, received_ns)
            else:
                result = StagesResult(dict(request.inputs), -1, False, 0, 0)
            answered_here = result.exited or result.last_stage == len(stage_tiers) - 1
            if answered_here:
                outputs, parameters = self._answer(model, result), {}
                send_ns = bytes_out = 0
            else:
                next_stage = result.last_stage + 1
                feeds = {s.name: result.tensors[s.name] for s in model.manifest.stages[next_stage].inputs}
                budget_s = p.forward_budget_s(
                    control.timeout_ms, received_ns, time.perf_counter_ns(), self.forwarder.timeout_s
                )
                forwarded = await self.forwarder.forward(
                    stage_tiers[next_stage],
                    model.name,
                    feeds,
                    control.forward_parameters(
                        placement=placement,
                        stage=next_stage,
                        hop=control.hop + 1,
                        timeout_ms=budget_s * 1e3 if control.timeout_ms is not None else None,
                    ),
                    timeout_s=budget_s,
                )
                outputs, parameters = forwarded.response.outputs, dict(forwarded.response.parameters)
                send_ns, bytes_out = forwarded.send_ns, forwarded.bytes_out
        finally:
            self.telemetry.inflight_now.dec()

        serving_ns = time.perf_counter_ns() - received_ns - result.queue_ns - result.compute_ns - send_ns
        charge_ns = await self._charge_serving(serving_ns)
        hop = HopTiming(
            tier=self.tier,
            first_stage=local[0] if local else -1,
            last_stage=result.last_stage,
            queue_ms=_ms(result.queue_ns),
            compute_ms=_ms(result.compute_ns),
            send_ms=_ms(send_ns),
            total_ms=_ms(time.perf_counter_ns() - received_ns),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            host_ms=_ms(result.host_ns),
            pace_ms=_ms(result.pace_ns),
            overran=result.overran,
            serving_ms=_ms(max(0, serving_ns)),
            serving_charge_ms=_ms(charge_ns),
        )
        strategy = model.strategy(placement)
        self.telemetry.record_hop(model.name, strategy, hop, exited_here=answered_here and result.exited)
        parameters.update(hop.to_parameters(control.hop))
        parameters[p.STRATEGY] = strategy
        if answered_here:
            parameters.update(
                {p.EXIT_STAGE: result.last_stage, p.EXITED_EARLY: result.exited, p.HOP_COUNT: control.hop + 1}
            )
        request_id = control.request_id or request.id
        if request_id is not None:
            parameters[p.REQUEST_ID] = request_id
        return InferResponse(model.name, self._select(outputs, request), parameters, request.id, "1")

    async def _charge_serving(self, serving_ns: int) -> int:
        """Hold the answer while a slower device would still be serving (decode, plan, encode at its serving
        ratio); returns the wait in ns."""
        ratio = self.pacer.serving_ratio if self.device.is_paced else 1.0
        charge_ns = round(max(0, serving_ns) * (ratio - 1.0)) if ratio > 1.0 else 0
        if charge_ns > 0:
            await sleep_until(time.perf_counter() + charge_ns / 1e9)
        return charge_ns

    async def _compute(
        self,
        model: ServedModel,
        local: list[int],
        inputs: Mapping[str, np.ndarray],
        exit_threshold: float | None,
        received_ns: int,
    ) -> StagesResult:
        stages = [self.sessions[(model.name, index)] for index in local]
        # warm-up timed one item; a batch costs about that many times more
        cost_us = sum(self.stage_cost_us[(model.name, index)] for index in local) * _batch_items(stages[0], inputs)
        # a paced run waits out the device's compute time: never on the event loop
        if self._compute_pending == 0 and cost_us <= INLINE_COMPUTE_MAX_US and not self.device.is_paced:
            return run_stages(stages, inputs, exit_threshold, received_ns)
        # the device's cores are shared by the stages computing on it now (this one included)
        cores = self.device.cores / min(self.compute_slots, self._compute_pending + 1)
        paced = functools.partial(
            run_stages,
            factor=self.pacer.factor if self.device.is_paced else None,
            cores=cores,
            threads=self.threads,
        )
        return await self._on_compute_slot(paced, stages, inputs, exit_threshold, received_ns)

    async def _on_compute_slot(self, work: Callable[..., _T], *args: Any) -> _T:
        """Run ``work`` on a compute slot (a worker thread), or 503 when slots and queue are full. The slot
        is held until the work has ended, even when the caller stops waiting (a client that went away):
        a worker still computing is a slot in use."""
        self._check_room()
        self._compute_pending += 1
        loop = asyncio.get_running_loop()
        try:
            running = self._executor.submit(work, *args)
        except BaseException:
            self._compute_pending -= 1
            raise
        running.add_done_callback(lambda _: self._slot_freed(loop))
        result = asyncio.wrap_future(running, loop=loop)
        # a caller that stopped waiting leaves nobody to read the work's outcome: read it here
        result.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(result)

    def _slot_freed(self, loop: asyncio.AbstractEventLoop) -> None:
        """(on the worker thread) the work has ended: its slot is free, counted on the event loop"""

        def freed() -> None:
            self._compute_pending -= 1

        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing is counted any more
            loop.call_soon_threadsafe(freed)

    async def calibrate(self, runs: int, *, allow_spinning: bool) -> CalibrationTimesSpec:
        """Time the calibration model single-stream on a compute slot, paced like every stage, with the
        served sessions' thread count and spin setting."""

        def timed() -> CalibrationTimesSpec:
            options = session_options(self.threads, allow_spinning=allow_spinning)
            factor = self.calibration_factor(options)
            wall_ms, _, cpu_ms = time_runs(options, runs, factor=factor)
            return CalibrationTimesSpec(
                tier=self.tier,
                device=self.device,
                factor=round(factor, 6),
                threads=self.threads,
                allow_spinning=allow_spinning,
                wall_ms=tuple(wall_ms),
                cpu_ms=tuple(cpu_ms),
            )

        return await self._on_compute_slot(timed)

    def calibration_factor(self, options: ort.SessionOptions) -> float:
        """Device ÷ host time for the calibration model, single stream (its kernel classes profiled once)."""
        if not self.device.is_paced:
            return 1.0
        if self._calibration_shares is None:
            self._calibration_shares = profile_shares(calibration_model_bytes(), options, calibration_feeds())
        return self.pacer.factor(self._calibration_shares, self.device.cores)

    @staticmethod
    def _answer(model: ServedModel, result: StagesResult) -> dict[str, np.ndarray]:
        if result.exited:
            head = model.manifest.stages[result.last_stage].exit
            assert head is not None  # run_stages exits only at a head
            final = model.manifest.final_output_for(head)
            assert final is not None  # the manifest validator guarantees it
            return {final.name: result.tensors[head.output]}
        return {t.name: result.tensors[t.name] for t in model.manifest.outputs}

    @staticmethod
    def _select(outputs: dict[str, np.ndarray], request: InferRequest) -> dict[str, np.ndarray]:
        if not request.outputs:
            return outputs
        return {o.name: outputs[o.name] for o in request.outputs if o.name in outputs}
