"""ncnn's benchmark networks as ONNX: the same architectures onnxruntime runs, with random weights.

tierlab's tiers run onnxruntime and the published device tables are ncnn's, so the part of a device ratio that
is the engine, not the CPU, is measured here: each reference network is converted from its ``.param`` file
(layer by layer, shapes kept: ncnn's ``c×h×w`` blobs become ``1×c×h×w``, its row blobs ``h×w``, its vectors
``1×w``), its int8 twin made by onnxruntime's static QDQ quantisation (per-channel int8 weights, uint8
activations with ``reduce_range``, as tierlab's ``sptq`` operator), and both timed in onnxruntime on this
host. The same files make the calibration kit a real device runs (``services.devices.kit``).

Written by hand because no package converts ncnn's format to ONNX (pnnx goes the other way); it covers the
layers of the reference networks and says which layer it does not know.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.contracts.errors import ConfigError
from services.devices.reference import INPUT_SHAPES, NCNN_DIR, Layer, parse_param

OPSET = 17
_ACTIVATIONS = {1: "Relu", 4: "Sigmoid", 6: "HardSwish"}
_BINARY = {0: "Add", 1: "Sub", 2: "Mul", 3: "Div", 4: "Max", 5: "Min", 6: "Pow"}


@dataclass
class _Graph:
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weights: list[onnx.TensorProto] = field(default_factory=list)
    kind: dict[str, str] = field(default_factory=dict)  # blob -> "chw" | "hw" | "w"
    channels: dict[str, int] = field(default_factory=dict)  # chw: c; hw: w (columns); w: w
    count: int = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}__{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.weights.append(numpy_helper.from_array(array, name))
        return name

    def random(self, base: str, shape: tuple[int, ...], scale: float = 0.05) -> str:
        return self.const(base, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def add(self, op: str, inputs: list[str], outputs: list[str], **attributes: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.name(op), **attributes))

    def like(self, top: str, bottom: str, channels: int | None = None) -> None:
        self.kind[top] = self.kind[bottom]
        self.channels[top] = self.channels[bottom] if channels is None else channels

    def activate(self, source: str, top: str, kind: int, params: str | None) -> None:
        if kind == 3:  # clip
            low, high = (float(x) for x in (params or "2,0,6").split(",")[1:3])
            self.add("Clip", [source, self.const("lo", np.array(low, np.float32)),
                              self.const("hi", np.array(high, np.float32))], [top])  # fmt: skip
        elif kind == 2:
            self.add("LeakyRelu", [source], [top], alpha=0.1)
        else:
            self.add(_ACTIVATIONS.get(kind, "Relu"), [source], [top])


def _ints(p: dict[int, str], key: int, default: int) -> int:
    return int(p.get(key, default))


def _conv(g: _Graph, layer: Layer) -> None:
    p, bottom, top = layer.params, layer.bottoms[0], layer.tops[0]
    outputs, kw = _ints(p, 0, 1), _ints(p, 1, 1)
    kh, dw = _ints(p, 11, kw), _ints(p, 2, 1)
    dh, sw = _ints(p, 12, dw), _ints(p, 3, 1)
    sh, group = _ints(p, 13, sw), _ints(p, 7, 1) if layer.kind == "ConvolutionDepthWise" else 1
    inputs = g.channels[bottom]
    weight = g.random(layer.name, (outputs, inputs // group, kh, kw), 1 / math.sqrt(inputs * kh * kw / group))
    feeds = [bottom, weight] + ([g.const(layer.name + "_b", np.zeros(outputs, np.float32))] if _ints(p, 5, 0) else [])
    attributes: dict[str, object] = {"kernel_shape": [kh, kw], "strides": [sh, sw], "dilations": [dh, dw],
                                     "group": group}  # fmt: skip
    left = _ints(p, 4, 0)
    if left in (-233, -234):
        attributes["auto_pad"] = "SAME_UPPER" if left == -233 else "SAME_LOWER"
    else:
        top_pad = _ints(p, 14, left)
        attributes["pads"] = [top_pad, left, _ints(p, 16, top_pad), _ints(p, 15, left)]
    activation = _ints(p, 9, 0)
    out = g.name(layer.name) if activation else top
    g.add("Conv", feeds, [out], **attributes)
    if activation:
        g.activate(out, top, activation, p.get(10))
    g.kind[top], g.channels[top] = "chw", outputs


def _pool(g: _Graph, layer: Layer) -> None:
    p, bottom, top = layer.params, layer.bottoms[0], layer.tops[0]
    maximum = _ints(p, 0, 0) == 0
    if _ints(p, 4, 0):  # global pooling: a vector, unless it keeps its dimensions
        pooled = g.name(layer.name)
        g.add("GlobalMaxPool" if maximum else "GlobalAveragePool", [bottom], [pooled])
        if _ints(p, 7, 0):
            g.add("Identity", [pooled], [top])
            g.like(top, bottom)
        else:
            g.add("Flatten", [pooled], [top], axis=1)
            g.kind[top], g.channels[top] = "w", g.channels[bottom]
        return
    kw, sw = _ints(p, 1, 1), _ints(p, 2, 1)
    kh, sh = _ints(p, 11, kw), _ints(p, 12, sw)
    left = _ints(p, 3, 0)
    top_pad = _ints(p, 13, left)
    mode = _ints(p, 5, 0)  # 0 full (ceil), 1 valid, 2 same upper, 3 same lower
    attributes: dict[str, object] = {"kernel_shape": [kh, kw], "strides": [sh, sw]}
    if mode in (2, 3):
        attributes["auto_pad"] = "SAME_UPPER" if mode == 2 else "SAME_LOWER"
    else:
        attributes["pads"] = [top_pad, left, _ints(p, 15, top_pad), _ints(p, 14, left)]
        attributes["ceil_mode"] = int(mode == 0)
    g.add("MaxPool" if maximum else "AveragePool", [bottom], [top], **attributes)
    g.like(top, bottom)


def _dense(g: _Graph, layer: Layer) -> None:
    """InnerProduct (a vector in) and Gemm (rows in, ``8=`` outputs, ``9=`` inputs)."""
    p, bottom, top = layer.params, layer.bottoms[0], layer.tops[0]
    source = bottom
    if layer.kind == "InnerProduct":
        outputs = _ints(p, 0, 1)
        inputs = _ints(p, 2, outputs) // outputs
        if g.kind[bottom] != "w":
            source = g.name("flat")
            g.add("Flatten", [bottom], [source], axis=1)
        bias, activation = _ints(p, 1, 0), _ints(p, 9, 0)
    else:
        outputs, inputs, bias, activation = _ints(p, 8, 1), _ints(p, 9, 1), 1, 0
    weight = g.random(layer.name, (inputs, outputs), 1 / math.sqrt(inputs))
    product = g.name(layer.name)
    g.add("MatMul", [source, weight], [product])
    out = g.name(layer.name) if activation else top
    if bias:
        g.add("Add", [product, g.const(layer.name + "_b", np.zeros(outputs, np.float32))], [out])
    else:
        g.add("Identity", [product], [out])
    if activation:
        g.activate(out, top, activation, p.get(10))
    g.kind[top] = "w" if g.kind[bottom] in ("w", "chw") else "hw"
    g.channels[top] = outputs


def _attention(g: _Graph, layer: Layer) -> None:
    """ncnn's MultiHeadAttention on ``tokens × embed`` rows: q, k, v and output projections around scaled
    dot-product attention per head."""
    p, top = layer.params, layer.tops[0]
    embed, heads = _ints(p, 0, 1), _ints(p, 1, 1)
    depth = embed // heads
    q, k, v = (layer.bottoms * 3)[:3]
    projected = []
    for which, source in zip("qkv", (q, k, v), strict=True):
        out = g.name(f"{layer.name}_{which}")
        g.add("MatMul", [source, g.random(f"{layer.name}_w{which}", (embed, embed), 1 / math.sqrt(embed))], [out])
        split = g.name(f"{layer.name}_{which}h")
        g.add("Reshape", [out, g.const("shape", np.array([-1, heads, depth], np.int64))], [split])
        heads_first = g.name(f"{layer.name}_{which}t")
        g.add("Transpose", [split], [heads_first], perm=[1, 0, 2] if which != "k" else [1, 2, 0])
        projected.append(heads_first)
    scores, weights, mixed = g.name("scores"), g.name("weights"), g.name("mixed")
    g.add("MatMul", projected[:2], [scores])
    scaled = g.name("scaled")
    g.add("Mul", [scores, g.const("scale", np.array(1 / math.sqrt(depth), np.float32))], [scaled])
    g.add("Softmax", [scaled], [weights], axis=-1)
    g.add("MatMul", [weights, projected[2]], [mixed])
    rows_first, joined = g.name("rows"), g.name("joined")
    g.add("Transpose", [mixed], [rows_first], perm=[1, 0, 2])
    g.add("Reshape", [rows_first, g.const("shape", np.array([-1, embed], np.int64))], [joined])
    g.add("MatMul", [joined, g.random(f"{layer.name}_wo", (embed, embed), 1 / math.sqrt(embed))], [top])
    g.kind[top], g.channels[top] = "hw", embed


def _binary(g: _Graph, layer: Layer) -> None:
    op = _BINARY[_ints(layer.params, 0, 0)]
    feeds = list(layer.bottoms)
    if len(feeds) == 1:  # with a scalar
        feeds.append(g.const("scalar", np.array(float(layer.params.get(2, "0")), np.float32)))
    elif g.kind[feeds[0]] != g.kind[feeds[1]]:  # a per-channel vector against a c×h×w blob
        vector = 0 if g.kind[feeds[0]] == "w" else 1
        expanded = g.name("unsqueeze")
        g.add("Unsqueeze", [feeds[vector], g.const("axes", np.array([2, 3], np.int64))], [expanded])
        feeds[vector] = expanded
    g.add(op, feeds, [layer.tops[0]])
    wide = max(layer.bottoms, key=lambda b: ("w", "hw", "chw").index(g.kind[b]))
    g.like(layer.tops[0], wide)


def _split(g: _Graph, layer: Layer) -> None:
    for top in layer.tops:
        g.add("Identity", [layer.bottoms[0]], [top])
        g.like(top, layer.bottoms[0])


def _unary(op: str, **attributes: Any) -> Callable[[_Graph, Layer], None]:
    def convert(g: _Graph, layer: Layer) -> None:
        g.add(op, [layer.bottoms[0]], [layer.tops[0]], **attributes)
        g.like(layer.tops[0], layer.bottoms[0])

    return convert


def _relu(g: _Graph, layer: Layer) -> None:
    slope = float(layer.params.get(0, "0"))
    _unary("LeakyRelu", alpha=slope)(g, layer) if slope else _unary("Relu")(g, layer)


def _gated(g: _Graph, layer: Layer) -> None:
    """Swish (x · sigmoid x) and GELU (x · ½(1 + erf(x / √2)))."""
    bottom = layer.bottoms[0]
    gate = g.name("gate")
    if layer.kind == "Swish":
        g.add("Sigmoid", [bottom], [gate])
    else:
        scaled, error, shifted = g.name("scaled"), g.name("erf"), g.name("shifted")
        g.add("Mul", [bottom, g.const("c", np.array(1 / math.sqrt(2), np.float32))], [scaled])
        g.add("Erf", [scaled], [error])
        g.add("Add", [error, g.const("one", np.array(1.0, np.float32))], [shifted])
        g.add("Mul", [shifted, g.const("half", np.array(0.5, np.float32))], [gate])
    g.add("Mul", [bottom, gate], [layer.tops[0]])
    g.like(layer.tops[0], bottom)


def _eltwise(g: _Graph, layer: Layer) -> None:
    op = {0: "Mul", 1: "Add", 2: "Max"}[_ints(layer.params, 0, 1)]
    total = layer.bottoms[0]
    for i, other in enumerate(layer.bottoms[1:]):
        out = layer.tops[0] if i == len(layer.bottoms) - 2 else g.name(layer.name)
        g.add(op, [total, other], [out])
        total = out
    g.like(layer.tops[0], layer.bottoms[0])


def _concat(g: _Graph, layer: Layer) -> None:
    bottom = layer.bottoms[0]
    axis = _ints(layer.params, 0, 0) + (1 if g.kind[bottom] == "chw" else 0)
    g.add("Concat", list(layer.bottoms), [layer.tops[0]], axis=axis)
    g.like(layer.tops[0], bottom, sum(g.channels[b] for b in layer.bottoms) if axis == 1 else None)


def _slice(g: _Graph, layer: Layer) -> None:
    bottom = layer.bottoms[0]
    sizes = [int(x) for x in layer.params[-23300].split(",")[1:]]
    rest = (g.channels[bottom] - sum(s for s in sizes if s != -233)) // max(1, sizes.count(-233))
    sizes = [rest if s == -233 else s for s in sizes]
    g.add("Split", [bottom, g.const("split", np.array(sizes, np.int64))], list(layer.tops), axis=1)
    for top, size in zip(layer.tops, sizes, strict=True):
        g.like(top, bottom, size)


def _shuffle(g: _Graph, layer: Layer) -> None:
    bottom = layer.bottoms[0]
    groups, channels = _ints(layer.params, 0, 1), g.channels[bottom]
    grouped, swapped, shape = g.name("grouped"), g.name("swapped"), g.name("shape")
    g.add("Reshape", [bottom, g.const("s", np.array([0, groups, channels // groups, -1], np.int64))], [grouped])
    g.add("Transpose", [grouped], [swapped], perm=[0, 2, 1, 3])
    g.add("Shape", [bottom], [shape])
    g.add("Reshape", [swapped, shape], [layer.tops[0]])
    g.like(layer.tops[0], bottom)


def _softmax(g: _Graph, layer: Layer) -> None:
    _unary("Softmax", axis=1 if g.kind[layer.bottoms[0]] == "chw" else -1)(g, layer)


def _lrn(g: _Graph, layer: Layer) -> None:
    p = layer.params
    _unary("LRN", size=_ints(p, 1, 5), alpha=float(p.get(2, "1e-4")), beta=float(p.get(3, "0.75")))(g, layer)


def _layer_norm(g: _Graph, layer: Layer) -> None:
    width = _ints(layer.params, 0, 1)
    scale = g.const("gamma", np.ones(width, np.float32))
    g.add("LayerNormalization", [layer.bottoms[0], scale, g.const("beta", np.zeros(width, np.float32))],
          [layer.tops[0]], axis=-1)  # fmt: skip
    g.like(layer.tops[0], layer.bottoms[0])


def _memory(g: _Graph, layer: Layer) -> None:
    w, h = _ints(layer.params, 0, 1), _ints(layer.params, 1, 0)
    g.add("Identity", [g.random(layer.name, (h, w) if h else (1, w))], [layer.tops[0]])
    g.kind[layer.tops[0]], g.channels[layer.tops[0]] = ("hw" if h else "w"), w


def _reshape(g: _Graph, layer: Layer) -> None:
    bottom, top = layer.bottoms[0], layer.tops[0]
    rows = _ints(layer.params, 1, 0)
    if g.kind[bottom] == "chw" and layer.kind == "Reshape" and rows > 0:  # c×h×w → rows (ViT's patches)
        g.add("Reshape", [bottom, g.const("shape", np.array([rows, -1], np.int64))], [top])
        g.kind[top], g.channels[top] = "hw", -1
    elif g.kind[bottom] == "chw" and layer.kind in ("Reshape", "Flatten"):
        g.add("Flatten", [bottom], [top], axis=1)
        g.kind[top], g.channels[top] = "w", -1
    else:
        _unary("Identity")(g, layer)


def _permute(g: _Graph, layer: Layer) -> None:
    g.add("Transpose", [layer.bottoms[0]], [layer.tops[0]], perm=[1, 0])
    g.kind[layer.tops[0]], g.channels[layer.tops[0]] = "hw", -1


def _crop(g: _Graph, layer: Layer) -> None:
    """ViT's class token: the first row."""
    bounds = [g.const(n, np.array([v], np.int64)) for n, v in (("start", 0), ("end", 1), ("axis", 0))]
    g.add("Slice", [layer.bottoms[0], *bounds], [layer.tops[0]])
    g.like(layer.tops[0], layer.bottoms[0])


_CONVERT: dict[str, Callable[[_Graph, Layer], None]] = {
    "Convolution": _conv, "ConvolutionDepthWise": _conv, "Pooling": _pool, "InnerProduct": _dense,
    "Gemm": _dense, "MultiHeadAttention": _attention, "BinaryOp": _binary, "Split": _split, "ReLU": _relu,
    "Swish": _gated, "GELU": _gated, "HardSwish": _unary("HardSwish"), "HardSigmoid": _unary("HardSigmoid"),
    "Sigmoid": _unary("Sigmoid"), "Eltwise": _eltwise, "Concat": _concat, "Slice": _slice,
    "ShuffleChannel": _shuffle, "Softmax": _softmax, "LRN": _lrn, "LayerNorm": _layer_norm, "MemoryData": _memory,
    "Reshape": _reshape, "Flatten": _reshape, "Dropout": _reshape, "Noop": _reshape, "Permute": _permute,
    "Crop": _crop,
}  # fmt: skip


def to_onnx(name: str, seed: int = 0) -> onnx.ModelProto:
    """Reference network ``name`` (``data/ncnn/<name>.param``) as an ONNX model with random weights."""
    layers = parse_param((NCNN_DIR / f"{name}.param").read_text())
    g = _Graph(np.random.default_rng(seed))
    inputs = []
    for layer in layers:
        if layer.kind == "Input":
            w, h, c = (_ints(layer.params, i, 0) for i in (0, 1, 2))
            c, h, w = INPUT_SHAPES.get(name, (c, h, w))
            inputs.append(helper.make_tensor_value_info(layer.tops[0], TensorProto.FLOAT, [1, c, h, w]))
            g.kind[layer.tops[0]], g.channels[layer.tops[0]] = "chw", c
        elif layer.kind in _CONVERT:
            _CONVERT[layer.kind](g, layer)
        else:
            raise ConfigError(f"converting ncnn to ONNX: layer {layer.kind} ({layer.name}) is not supported")
    output = helper.make_tensor_value_info(layers[-1].tops[0], TensorProto.FLOAT, None)
    graph = helper.make_graph(g.nodes, name, inputs, [output], g.weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def quantize_int8(source: Path, target: Path, input_shape: tuple[int, ...], samples: int = 4) -> Path:
    """Static QDQ int8 of ``source`` (random calibration inputs: only the speed matters here)."""
    from onnxruntime.quantization import (  # noqa: PLC0415 — quantisation tooling, host-side only
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    inputs = onnx.load(str(source), load_external_data=False).graph.input
    shapes = {i.name: tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim) for i in inputs}
    shapes[inputs[0].name] = input_shape
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.left = samples

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            if self.left < 0:
                return None
            return {name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()}

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return target
