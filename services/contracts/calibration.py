"""The calibration model and the onnxruntime session options every tierlab session uses.

Speed fidelity compares a tier's compute time with the host's for the same work, so both sides must run
the same model with the same session options: a fixed convolutional network (five 3×3 convolutions on
a 28×28 image, about 3 ms on one core of a current x86 server) built here from fixed seeds, byte for byte
the same in the tier image and on the host, and ``session_options`` — the one place thread counts and
spinning are set. ``time_runs`` times it single-stream, as a device would see one request after another;
``measure_speeds`` asks every tier to (``POST /tierlab/calibrate``) and compares with the host.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from services.contracts.device import CalibrationTimesSpec, SpeedMeasurementSpec, pace, work_ns
from services.contracts.errors import ConfigError
from services.contracts.specs import TierName
from services.contracts.transport import json_call

CALIBRATION_INPUT = "x"
CALIBRATION_SHAPE = (1, 1, 28, 28)
_CHANNELS = (32, 64, 64, 64, 64)
_OPSET, _IR_VERSION = 13, 8
# let the session settle (allocations, caches) before timing
WARMUP_RUNS = 20


def session_options(intra_op_threads: int, *, allow_spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # spinning threads burn a CPU quota the stage could use; only spin when the tier owns its cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3
    return options


@cache
def calibration_model_bytes() -> bytes:
    """The calibration network as ONNX bytes (deterministic: fixed seed, fixed graph)."""
    rng = np.random.default_rng(20261123)
    nodes, weights = [], []
    previous, channels_in = CALIBRATION_INPUT, CALIBRATION_SHAPE[1]
    for i, channels in enumerate(_CHANNELS):
        kernel = (rng.standard_normal((channels, channels_in, 3, 3)) * 0.1).astype(np.float32)
        weights.append(numpy_helper.from_array(kernel, f"w{i}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"conv{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        previous, channels_in = f"relu{i}", channels
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "tierlab-calibration",
        [helper.make_tensor_value_info(CALIBRATION_INPUT, TensorProto.FLOAT, list(CALIBRATION_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, _CHANNELS[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    return bytes(model.SerializeToString())


def calibration_session(options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(calibration_model_bytes(), options, providers=["CPUExecutionProvider"])


def calibration_feeds() -> dict[str, np.ndarray]:
    values = np.linspace(0, 1, int(np.prod(CALIBRATION_SHAPE)), dtype=np.float32)
    return {CALIBRATION_INPUT: values.reshape(CALIBRATION_SHAPE)}


def time_runs(options: ort.SessionOptions, runs: int, *, factor: float) -> tuple[list[float], list[float], list[float]]:
    """Milliseconds of each of ``runs`` single-stream runs of the calibration model, each paced to ``factor``
    × its work (``pace``, as a tier paces every stage): the paced wall time, the run's own wall time, its
    thread CPU."""
    session = calibration_session(options)
    feeds = calibration_feeds()
    for _ in range(WARMUP_RUNS):
        session.run(None, feeds)
    wall_ms, run_ms, cpu_ms = [], [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter_ns(), time.thread_time_ns()
        session.run(None, feeds)
        ran_ns, cpu_ns = time.perf_counter_ns() - started, time.thread_time_ns() - cpu_started
        if factor > 1.0:
            pace(started, work_ns(ran_ns, cpu_ns, options.intra_op_num_threads) * factor)
        wall_ms.append(round((time.perf_counter_ns() - started) / 1e6, 4))
        run_ms.append(round(ran_ns / 1e6, 4))
        cpu_ms.append(round(cpu_ns / 1e6, 4))
    return wall_ms, run_ms, cpu_ms


def host_times_ms(threads: int, runs: int, *, allow_spinning: bool = False, factor: float = 1.0) -> list[float]:
    """The host reference: the calibration model in this process, unthrottled, with a tier's thread count
    and spin setting (two spinning threads finish a run sooner than two that sleep between ops), and
    idle between runs as long as the tier's pacing at ``factor`` is, so both start each run from the same
    cache and clock state (measured here: a 2.2 ms run took 8–20 % more CPU after a 2 ms sleep than back to
    back). The reference is each run's own wall time, not the idle after it."""
    return time_runs(session_options(threads, allow_spinning=allow_spinning), runs, factor=factor)[1]


def measure_speeds(urls: Mapping[TierName, str], *, runs: int = 60, rounds: int = 6) -> list[SpeedMeasurementSpec]:
    """Each tier's speed fidelity: ``POST /tierlab/calibrate`` against the host reference, in ``rounds``
    alternating blocks (host, tier, host, tier …) so a burst of load on the machine hits both sides alike.
    ConfigError if a tier cannot calibrate."""
    measured = []
    per_round = max(3, runs // rounds)
    for tier, url in urls.items():
        tier_rounds: list[CalibrationTimesSpec] = []
        host_rounds: list[list[float]] = []
        for _ in range(rounds):
            code, body = json_call(f"{url}/tierlab/calibrate", method="POST", body={"runs": per_round}, timeout_s=300)
            if code != 200:
                raise ConfigError(f"{tier} could not run the calibration model: {code} {body}")
            block = CalibrationTimesSpec.model_validate(body)
            tier_rounds.append(block)
            host_rounds.append(
                host_times_ms(block.threads, per_round, allow_spinning=block.allow_spinning, factor=block.factor)
            )
        measured.append(SpeedMeasurementSpec.of(tier_rounds, host_rounds))
    return measured


def check_model() -> None:
    """Raise if the calibration graph is not valid ONNX (used by the tests)."""
    onnx.checker.check_model(onnx.load_from_string(calibration_model_bytes()))
