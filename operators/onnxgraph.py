"""ONNX graph surgery for black-box operators: where a model can be cut, what crosses, and the cutting.

A *cut* after node ``i`` (in the graph's topological order) is valid when the tensors alive across it —
produced at or before ``i`` (or graph inputs) and still consumed after it — are few: the head computes
them and the tail needs nothing else. For a CNN that is one feature map; for a transformer it is the
hidden state plus the expanded attention mask (and the tail then does not drag the embedding table
along, because nothing after the cut reads it). ``find_cuts`` lists every valid cut with the bytes per
item that cross it and the share of the model's multiply-accumulates before it; ``extract`` cuts stages
out with ``onnx.utils.Extractor``; ``attach_exit_head`` adds a pooled linear classifier to a stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.utils import Extractor

from services.contracts.dtypes import NUMPY_DTYPES, ONNX_ELEM_TYPES

MAX_CUT_TENSORS = 3
_BALANCE_STEP = 0.05


@dataclass(frozen=True)
class Cut:
    after_node: int
    tensors: tuple[str, ...]
    bytes_per_item: int
    macs_before_fraction: float

    def describe(self) -> dict[str, object]:
        return {
            "tensors": list(self.tensors),
            "bytes_per_item": self.bytes_per_item,
            "macs_before": round(self.macs_before_fraction, 4),
        }


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (older exporters also list the initializers as inputs)."""
    constant = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constant]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size an exported model is fixed to (its first input's first dimension), or None if dynamic.

    Exporters fix the batch to the example's (often 1) unless told otherwise, and a fixed batch is often baked
    into reshapes too, so tierlab runs such a model in chunks of exactly that size rather than rewriting it.
    """
    inputs = graph_inputs(model)
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _dims(type_proto: onnx.TypeProto) -> list[int]:
    """Dimensions with symbolic ones (the batch) taken as 1."""
    return [d.dim_value if d.HasField("dim_value") else 1 for d in type_proto.tensor_type.shape.dim]


def tensor_bytes_per_item(type_proto: onnx.TypeProto) -> int:
    datatype = ONNX_ELEM_TYPES.get(type_proto.tensor_type.elem_type, "FP32")
    itemsize = NUMPY_DTYPES[datatype].itemsize if datatype != "BYTES" else 1
    return math.prod(_dims(type_proto)) * itemsize


def _node_macs(node: onnx.NodeProto, types: dict[str, onnx.TypeProto], weights: dict[str, onnx.TensorProto]) -> int:
    if not node.output or node.output[0] not in types:
        return 0
    out = math.prod(_dims(types[node.output[0]]))
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        weight = weights.get(node.input[1 if node.op_type != "QLinearConv" else 3])
        return out * math.prod(weight.dims[1:]) if weight is not None else 0
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"):
        source = node.input[0]
        if source in types:
            dims = _dims(types[source])
            return out * (dims[-1] if dims else 1)
    return 0


def _constants(graph: onnx.GraphProto) -> set[str]:
    constant = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in constant or not i for i in node.input)):
            constant.update(node.output)
    return constant


def find_cuts(model: onnx.ModelProto, max_tensors: int = MAX_CUT_TENSORS) -> list[Cut]:
    """Every point of the node order where at most ``max_tensors`` activations cross."""
    model = infer(model)
    graph = model.graph
    types = _types(model)
    weights = {i.name: i for i in graph.initializer}
    constant = _constants(graph)
    nodes = list(graph.node)
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            if name:
                last_use[name] = index
    for output in graph.output:
        last_use[output.name] = len(nodes)
    macs = np.cumsum([_node_macs(n, types, weights) for n in nodes], dtype=np.float64)
    total = float(macs[-1]) if len(macs) and macs[-1] > 0 else 1.0

    live: dict[str, None] = {i.name: None for i in graph.input if i.name not in constant}
    input_names = {i.name for i in graph.input}
    cuts: list[Cut] = []
    for index, node in enumerate(nodes[:-1]):
        for name in node.output:
            if name and name not in constant:
                live[name] = None
        for name in [n for n in live if last_use.get(n, -1) <= index]:
            del live[name]
        crossing = tuple(live)
        if not crossing or len(crossing) > max_tensors or set(crossing) & input_names:
            continue
        if any(n not in types for n in crossing):
            continue
        size = sum(tensor_bytes_per_item(types[n]) for n in crossing)
        cuts.append(Cut(index, crossing, size, float(macs[index]) / total))
    return _distinct(cuts)


def _distinct(cuts: Sequence[Cut]) -> list[Cut]:
    """One cut per crossing set (consecutive elementwise nodes give the same boundary many times)."""
    seen: set[tuple[str, ...]] = set()
    unique = []
    for cut in cuts:
        if cut.tensors not in seen:
            seen.add(cut.tensors)
            unique.append(cut)
    return unique


def balanced_cuts(cuts: Sequence[Cut], ways: int) -> list[Cut]:
    """``ways - 1`` cuts nearest equal shares of compute (in 5 % steps); then fewest bytes; then the later node."""
    chosen: list[Cut] = []
    for k in range(1, ways):
        target, still_needed = k / ways, ways - 1 - k
        candidates = [
            c
            for c in cuts
            if (not chosen or c.after_node > chosen[-1].after_node)
            and sum(d.after_node > c.after_node for d in cuts) >= still_needed
        ]
        if not candidates:
            raise ValueError(f"the model has no valid cuts for a {ways}-way partition ({len(cuts)} valid cuts)")
        chosen.append(
            min(
                candidates,
                key=lambda c: (
                    round(abs(c.macs_before_fraction - target) / _BALANCE_STEP),
                    c.bytes_per_item,
                    -c.after_node,
                ),
            )
        )
    return chosen


def extract(extractor: Extractor, inputs: Sequence[str], outputs: Sequence[str], name: str) -> onnx.ModelProto:
    """The sub-model computing ``outputs`` from ``inputs`` (only the initializers it reads come along)."""
    stage = extractor.extract_model(list(inputs), list(outputs))
    stage.graph.name = name
    del stage.graph.value_info[:]
    onnx.checker.check_model(stage)
    return stage


def split_stages(
    model: onnx.ModelProto, cuts: Sequence[Cut], name: str, extractor: Extractor | None = None
) -> list[onnx.ModelProto]:
    """Cut ``model`` at ``cuts``; pass an ``extractor`` (of the shape-inferred model) to cut it many times."""
    extractor = extractor or Extractor(infer(model))
    input_names = [i.name for i in model.graph.input]
    output_names = [o.name for o in model.graph.output]
    bounds = [tuple(input_names), *(c.tensors for c in cuts), tuple(output_names)]
    stages = [extract(extractor, bounds[i], bounds[i + 1], f"{name}_stage{i}") for i in range(len(bounds) - 1)]
    for index in range(1, len(stages) - 1):
        _route_pass_through(stages[index], stages[index + 1], suffix=f".via{index}")
    return stages


def _route_pass_through(stage: onnx.ModelProto, following: onnx.ModelProto, suffix: str) -> None:
    """Give every tensor a stage only passes on (an input that is also an output) a node of its own.

    A transformer's middle stage hands the attention mask through untouched; a graph whose output *is* an
    input is valid ONNX, but onnxruntime's quantizer cannot sort it. The copy gets a new name, and the
    next stage reads that name.
    """
    inputs = {i.name for i in stage.graph.input}
    for output in stage.graph.output:
        if output.name not in inputs:
            continue
        original, renamed = output.name, output.name + suffix
        stage.graph.node.append(helper.make_node("Identity", [original], [renamed]))
        output.name = renamed
        for value in following.graph.input:
            if value.name == original:
                value.name = renamed
        for node in following.graph.node:
            node.input[:] = [renamed if n == original else n for n in node.input]
        for value in following.graph.output:  # passed on again: the next stage renames it in its turn
            if value.name == original:
                following.graph.node.append(helper.make_node("Identity", [renamed], [original]))
    onnx.checker.check_model(stage)
    onnx.checker.check_model(following)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (to read features)."""
    inferred = infer(model)
    types = _types(inferred)
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    for name in names:
        if name not in existing:
            extended.graph.output.append(helper.make_value_info(name, types[name]))
    return extended


def pool_features(array: np.ndarray) -> np.ndarray:
    """What an exit head sees: the mean over every axis but batch and channel/hidden (NCHW or NTH)."""
    if array.ndim == 4:
        pooled: np.ndarray = array.mean(axis=(2, 3))
    elif array.ndim == 3:
        pooled = array.mean(axis=1)
    else:
        pooled = array.reshape(len(array), -1)
    return pooled


def attach_exit_head(
    stage: onnx.ModelProto, feature: str, weight: np.ndarray, bias: np.ndarray, output: str = "exit_logits"
) -> onnx.ModelProto:
    """Add ``output = pool(feature) @ weight + bias`` to a stage (pooling as in :func:`pool_features`)."""
    types = _types(infer(stage))
    rank = len(types[feature].tensor_type.shape.dim)
    axes = {4: [2, 3], 3: [1]}.get(rank)
    headed = onnx.ModelProto()
    headed.CopyFrom(stage)
    graph = headed.graph
    pooled = f"{output}_pooled"
    opset = next(o.version for o in headed.opset_import if o.domain in ("", "ai.onnx"))
    if axes is None:
        graph.node.append(helper.make_node("Flatten", [feature], [pooled], axis=1))
    elif opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), f"{output}_axes"))
        graph.node.append(helper.make_node("ReduceMean", [feature, f"{output}_axes"], [pooled], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMean", [feature], [pooled], axes=axes, keepdims=0))
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight.astype(np.float32), f"{output}_w"),
            numpy_helper.from_array(bias.astype(np.float32), f"{output}_b"),
        ]
    )
    graph.node.append(helper.make_node("Gemm", [pooled, f"{output}_w", f"{output}_b"], [output]))
    classes = weight.shape[1]
    batch = types[feature].tensor_type.shape.dim[0]
    dim = batch.dim_param if batch.HasField("dim_param") else batch.dim_value
    graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [dim, classes]))
    onnx.checker.check_model(headed)
    return headed
