"""onnxruntime sessions for the stages a tier runs: created once, checked against the manifest, warmed,
and for a paced device profiled once into kernel classes.

A ``StageSession`` is one submodel in one persistent ``InferenceSession`` whose thread counts come from
the tier's device. On a paced device its host time is split into kernel classes once, at load (onnxruntime's
profiler, each node classed: ``services.contracts.kernels.profile_shares``), so each stage is paced by its own
factor: an int8 stage and a float stage slow down by the device's own ratios.
``run_stages`` runs a tier's consecutive stages in one call (one thread hop per request), checking each
stage's exit head on the way, and paces the call to the device: it ends no sooner than each stage's host
work times that stage's factor (see ``services.contracts.device``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from services.contracts.device import pace, work_ns
from services.contracts.dtypes import NUMPY_DTYPES, ORT_TYPE_NAMES, datatype_of
from services.contracts.errors import ConfigError, TensorMismatch
from services.contracts.kernels import KernelClass, profile_shares
from services.contracts.manifest import ExitSpec, ManifestSpec, StageSpec, TensorSpec, max_softmax


def _check_against_onnx(stage: StageSpec, session: ort.InferenceSession, where: str) -> None:
    declared = {"input": stage.inputs, "output": stage.outputs}
    actual = {"input": session.get_inputs(), "output": session.get_outputs()}
    for kind, specs in declared.items():
        by_name = {node.name: node for node in actual[kind]}
        for spec in specs:
            node = by_name.get(spec.name)
            if node is None:
                raise ConfigError(f"{where}: the ONNX file has no {kind} '{spec.name}' (has {sorted(by_name)})")
            datatype = ORT_TYPE_NAMES.get(node.type)
            if datatype != spec.datatype or len(node.shape) != len(spec.shape):
                raise ConfigError(
                    f"{where}: {kind} '{spec.name}' is {node.type}{node.shape} in ONNX but "
                    f"{spec.datatype}{list(spec.shape)} in the manifest"
                )
    extra_inputs = {node.name for node in actual["input"]} - {s.name for s in stage.inputs}
    if extra_inputs:
        raise ConfigError(f"{where}: the ONNX file takes inputs the manifest does not list: {sorted(extra_inputs)}")


# a stage's factor at the cores it has: device time ÷ host time (services.contracts.device.DevicePacer.factor)
Factor = Callable[[Mapping[KernelClass, float], float], float]


@dataclass(frozen=True, slots=True)
class StageSession:
    model: str
    index: int
    spec: StageSpec
    session: ort.InferenceSession
    shares: dict[KernelClass, float] = field(default_factory=lambda: {"other": 1.0})

    @classmethod
    def load(cls, manifest: ManifestSpec, folder: Path, index: int, options: ort.SessionOptions) -> StageSession:
        stage = manifest.stages[index]
        where = f"{manifest.name} stage {index} ({folder / stage.file})"
        try:
            session = ort.InferenceSession(str(folder / stage.file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ConfigError(f"{where}: onnxruntime cannot load it: {exc}") from None
        _check_against_onnx(stage, session, where)
        return cls(manifest.name, index, stage, session)

    def profiled(self, folder: Path, options: ort.SessionOptions) -> StageSession:
        """This stage with its host time split into kernel classes (for a paced device)."""
        feeds = {spec.name: _zeros(spec) for spec in self.spec.inputs}
        shares = profile_shares(str(folder / self.spec.file), options, feeds)
        return StageSession(self.model, self.index, self.spec, self.session, shares)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.spec.outputs]
        try:
            outputs = self.session.run(names, dict(feeds))
        except InvalidArgument as exc:  # the values themselves (e.g. a token id past the vocabulary): the client's
            message = str(exc).split("Status Message:")[-1].strip()
            raise TensorMismatch(f"{self.model} stage {self.index} cannot compute on this input: {message}") from None
        return dict(zip(names, outputs, strict=True))

    def warm(self, runs: int) -> float:
        """Run on zeros ``runs`` times; returns the median time of a run in microseconds (inf if none)."""
        feeds = {spec.name: _zeros(spec) for spec in self.spec.inputs}
        times_us = []
        for _ in range(runs):
            started = time.perf_counter_ns()
            try:
                self.run(feeds)
            except Exception as exc:  # onnxruntime's own types, or a TensorMismatch from run
                raise ConfigError(f"{self.model} stage {self.index}: warm-up on zeros failed: {exc}") from None
            times_us.append((time.perf_counter_ns() - started) / 1000)
        return statistics.median(times_us) if times_us else math.inf


def _zeros(spec: TensorSpec) -> np.ndarray:
    shape = [1 if d == -1 else d for d in spec.shape]
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=np.object_)
    return np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise TensorMismatch unless ``inputs`` are exactly the tensors ``specs`` describe."""

    wanted = {s.name for s in specs}
    missing = sorted(wanted - inputs.keys())
    if missing:
        raise TensorMismatch(f"missing input(s) {missing}; the model takes {sorted(wanted)}")
    unexpected = sorted(inputs.keys() - wanted)
    if unexpected:
        raise TensorMismatch(f"unexpected input(s) {unexpected}; the model takes {sorted(wanted)}")
    for spec in specs:
        array = inputs[spec.name]
        if array.size == 0:
            raise TensorMismatch(f"input '{spec.name}' has shape {list(array.shape)}: no items to compute on")
        problem = spec.accepts(datatype_of(array), array.shape)
        if problem:
            raise TensorMismatch(problem)


def exit_confident(head: ExitSpec, outputs: Mapping[str, np.ndarray], threshold: float | None) -> bool:
    """Whether every item of the batch is confident enough to exit at this head."""
    needed = head.threshold if threshold is None else threshold
    confidence = max_softmax(outputs[head.output])
    return bool(np.all(confidence >= needed))


@dataclass(frozen=True, slots=True)
class StagesResult:
    tensors: dict[str, np.ndarray]
    last_stage: int  # the last stage that ran
    exited: bool  # answered by the exit head of ``last_stage``
    queue_ns: int  # from the caller's clock start until the first stage began
    compute_ns: int  # the device's time: the host's run plus the pacing wait
    host_ns: int = 0  # onnxruntime's own run on the host
    device_ns: int = 0  # what the device would take (host work × each stage's factor)

    @property
    def pace_ns(self) -> int:
        return max(0, self.compute_ns - self.host_ns)

    @property
    def overran(self) -> bool:
        """The host alone took longer than the device would have: the emulation is slower than its device."""
        return self.device_ns > 0 and self.host_ns > self.device_ns


def run_stages(
    stages: Sequence[StageSession],
    feeds: Mapping[str, np.ndarray],
    exit_threshold: float | None,
    clock_start_ns: int,
    *,
    factor: Factor | None = None,
    cores: float = 1.0,
    threads: int = 1,
) -> StagesResult:
    """Run consecutive stages, feeding each the previous one's outputs; stop at a confident exit head.

    Runs in a worker thread (or inline when the device is not paced and the stages are cheap);
    ``clock_start_ns`` lets it report how long the request queued for it. With a ``factor`` (a paced device)
    the call ends no sooner than each stage's work (``work_ns``) times that stage's factor at ``cores``.
    """
    started = time.perf_counter_ns()
    tensors: dict[str, np.ndarray] = dict(feeds)
    last, exited = stages[-1].index, False
    device_ns = 0.0
    for stage in stages:
        began, cpu_began = time.perf_counter_ns(), time.thread_time_ns()
        tensors = stage.run({spec.name: tensors[spec.name] for spec in stage.spec.inputs})
        if factor is not None:
            work = work_ns(time.perf_counter_ns() - began, time.thread_time_ns() - cpu_began, threads)
            device_ns += work * factor(stage.shares, cores)
        head = stage.spec.exit
        if head is not None and exit_confident(head, tensors, exit_threshold):
            last, exited = stage.index, True
            break
    host_ns = time.perf_counter_ns() - started
    if factor is not None:
        pace(started, device_ns)
    return StagesResult(
        tensors, last, exited, started - clock_start_ns, time.perf_counter_ns() - started, host_ns, round(device_ns)
    )
