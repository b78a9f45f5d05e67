"""Kernel classes: the kinds of work a device's speed depends on, and how a model's time splits into them.

A device is not one number: its int8 convolutions, depthwise convolutions, matrix products and memory-bound
layers each run at their own speed relative to another CPU (int8 ÷ fp32 is 0.4 on this VNNI host and 0.8 on a
Raspberry Pi 4). So tierlab splits every model's time into these classes and paces each by the device's ratio
for it (``services.contracts.device``):

========== ==================================================================================================
class      what falls in it
========== ==================================================================================================
conv       dense and grouped convolutions in float (a grouped convolution is a dense one per group)
dw         depthwise convolutions in float (one channel per group)
conv_int8  dense and grouped convolutions on int8 (QLinearConv, ConvInteger; ncnn's int8 Convolution)
dw_int8    depthwise convolutions on int8
gemv       a matrix times one row: fully connected layers at batch 1 (memory-bound: the weights stream by)
gemm       a matrix times many rows: a transformer's projections and attention (compute-bound)
other      everything else: activations, pooling, normalisation, element-wise, reshapes, (de)quantisation
========== ==================================================================================================

Two sources are classified the same way: a layer of an ncnn ``.param`` network (the published device tables
are ncnn's) and a node of an onnxruntime-optimised ONNX graph (what the tiers run), timed by onnxruntime's
profiler (:func:`class_times`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
import onnxruntime as ort

KernelClass = Literal["conv", "dw", "conv_int8", "dw_int8", "gemv", "gemm", "other"]
KERNEL_CLASSES: tuple[KernelClass, ...] = get_args(KernelClass)

_FLOAT_CONV = {"Conv", "FusedConv", "NhwcFusedConv", "NchwcConv"}
_INT8_CONV = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}
_MATMUL = {"Gemm", "MatMul", "FusedMatMul", "FusedGemm", "QGemm", "QLinearMatMul", "MatMulInteger",
           "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "Attention",
           "MultiHeadAttention"}  # fmt: skip


def conv_class(*, int8: bool, depthwise: bool) -> KernelClass:
    if depthwise:
        return "dw_int8" if int8 else "dw"
    return "conv_int8" if int8 else "conv"


def ncnn_layer_class(layer_type: str, params: Mapping[int, str], out_rows: int) -> KernelClass:
    """The class of one layer of an ncnn ``.param`` file (``params`` keyed by ncnn's parameter ids;
    ``out_rows`` the rows of its output: 1 for a vector)."""
    int8 = int(params.get(8, "0")) > 0  # int8_scale_term
    if layer_type == "Convolution":
        return conv_class(int8=int8, depthwise=False)
    if layer_type == "ConvolutionDepthWise":
        outputs, group = int(params.get(0, "1")), int(params.get(7, "1"))
        return conv_class(int8=int8, depthwise=outputs // max(group, 1) <= 1)
    if layer_type == "MultiHeadAttention":
        return "gemm"
    if layer_type in ("InnerProduct", "Gemm", "MatMul"):
        return "gemm" if out_rows > 1 else "gemv"
    return "other"


def onnx_node_class(op_type: str, group: int, weight_shape: list[int] | None, rows: int | None) -> KernelClass:
    """The class of one node of an onnxruntime-optimised graph: its op type, its ``group`` attribute, its
    weight's shape (convolutions) and the rows of its left operand (matrix products; None when unknown)."""
    if op_type in _FLOAT_CONV or op_type in _INT8_CONV:
        depthwise = group > 1 and weight_shape is not None and len(weight_shape) > 1 and weight_shape[1] == 1
        return conv_class(int8=op_type in _INT8_CONV, depthwise=depthwise)
    if op_type in _MATMUL:
        return "gemv" if rows == 1 else "gemm"
    return "other"


def _attribute(node: Any, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def graph_classes(model: Any) -> dict[str, KernelClass]:
    """Each node name of an (optimised) ONNX graph with its class. Shapes come from the initialisers and the
    value infos the optimiser kept; a matrix product whose left operand's rows are unknown counts as gemm."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    found: dict[str, KernelClass] = {}
    for node in model.graph.node:
        weight_index = 3 if node.op_type in ("QLinearConv", "NhwcQLinearConv") else 1
        weight = weights.get(node.input[weight_index]) if len(node.input) > weight_index else None
        left = shapes.get(node.input[0]) if node.input else None
        rows = None
        if left and len(left) >= 2:
            known = [d for d in left[:-1] if d > 0]
            rows = 1 if known and all(d == 1 for d in left[:-1]) else (max(known) if known else None)
        found[node.name] = onnx_node_class(node.op_type, _attribute(node, "group", 1), weight, rows)
    return found


def class_times(
    profile_events: Iterable[Mapping[str, Any]], classes: Mapping[str, KernelClass]
) -> dict[KernelClass, float]:
    """Microseconds per class from onnxruntime's profile events (``*_kernel_time`` node events), each node
    classed by ``classes`` (:func:`graph_classes` of the optimised model; a node it misses is ``other``)."""
    totals: dict[KernelClass, float] = {}
    for event in profile_events:
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            kind = classes.get(name.removesuffix("_kernel_time"), "other")
            totals[kind] = totals.get(kind, 0.0) + float(event.get("dur", 0))
    return totals


def read_profile(path: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(path.read_text())
    return events


PROFILE_RUNS = 5


def profile_shares(
    source: str | bytes, options: ort.SessionOptions, feeds: Mapping[str, np.ndarray], runs: int = PROFILE_RUNS
) -> dict[KernelClass, float]:
    """The share of a model's host time in each kernel class: a profiling session with the tier's options
    (its optimised graph written beside the profile, in the temporary folder) run ``runs`` times on ``feeds``."""
    with tempfile.TemporaryDirectory(prefix="tierlab-profile-") as folder:
        profiling = ort.SessionOptions()
        profiling.intra_op_num_threads = options.intra_op_num_threads
        profiling.inter_op_num_threads = options.inter_op_num_threads
        profiling.graph_optimization_level = options.graph_optimization_level
        profiling.log_severity_level = 3
        profiling.enable_profiling = True
        profiling.profile_file_prefix = os.path.join(folder, "profile")
        profiling.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        session = ort.InferenceSession(source, profiling, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, dict(feeds))
        events = read_profile(Path(session.end_profiling()))
        classes = graph_classes(onnx.load(profiling.optimized_model_filepath, load_external_data=False))
    times = class_times(events, classes)
    total = sum(times.values())
    return {k: v / total for k, v in times.items()} if total > 0 else {"other": 1.0}
