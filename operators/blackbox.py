"""Black-box operators: they need only an ONNX classifier and data, so they apply to any user model too.

A ``Draft`` is a variant in the making: ONNX stage models, their exit heads, the final output names and
what the operators recorded. Operators take a draft and give a new one, so compositions are chains
(``qee`` = early-exit then sptq; ``sptq-partition`` = partition then sptq):

``identity``      the model as it is.
``partition``     cut into 2 or 3 stages at the valid cuts (``onnxgraph.find_cuts``) nearest to equal
                  shares of compute, preferring fewer bytes crossing; every valid cut is recorded.
``early-exit``    linear heads on pooled features at 1 or 2 cuts, trained on the frozen backbone's
                  features (train split); one threshold for all heads, the lowest whose cascade accuracy
                  on the *calibration* split stays within 1 point of the full model's.
``sptq``          onnxruntime static QDQ quantization of every stage, calibrated on the calibration split
                  (each stage on what the stages before it give), per-channel int8 weights, uint8
                  activations with ``reduce_range`` (no collapse on CPUs without VNNI).
``dynq``          onnxruntime dynamic quantization (int8 weights, activations quantized at run time).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from operators.data import Samples, SplitData
from operators.evaluate import StageRun, build_threads, choose_threshold, trace
from operators.onnxgraph import (
    Cut,
    attach_exit_head,
    balanced_cuts,
    find_cuts,
    fixed_batch,
    pool_features,
    split_stages,
    with_outputs,
)
from services.contracts.manifest import ExitSpec

Scalar = str | int | float | bool
EXIT_TOLERANCE = 0.01
HEAD_TRAIN_STEPS = 300
CALIBRATION_BATCH = 32
RUN_BATCH = 128


@dataclass(frozen=True)
class StageDraft:
    model: onnx.ModelProto
    exit: ExitSpec | None = None


@dataclass(frozen=True)
class Draft:
    stages: tuple[StageDraft, ...]
    outputs: tuple[str, ...]
    parameters: dict[str, Scalar] = field(default_factory=dict)
    cuts: tuple[Cut, ...] = ()  # every valid cut of the whole model, when a partition looked
    batch: int | None = None  # the batch the model was exported with, if fixed: every stage runs at exactly it

    @classmethod
    def of(cls, model: onnx.ModelProto) -> Draft:
        return cls((StageDraft(model),), tuple(o.name for o in model.graph.output), batch=fixed_batch(model))

    def with_parameters(self, **values: Scalar) -> Draft:
        return replace(self, parameters={**self.parameters, **values})

    def only_stage(self, operator: str) -> onnx.ModelProto:
        if len(self.stages) != 1 or self.stages[0].exit is not None:
            raise ValueError(f"{operator} applies to a one-stage model without exit heads; apply it first in a chain")
        return self.stages[0].model


@dataclass(frozen=True)
class BlackBoxContext:
    split: SplitData
    head_train_items: int
    calibration_items: int
    seed: int = 0


Operator = Callable[[Draft, BlackBoxContext], Draft]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = build_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_batched(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray], outputs: list[str], batch: int | None = None
) -> dict[str, np.ndarray]:
    batch = batch or RUN_BATCH
    runner = session(model)
    names = [i.name for i in runner.get_inputs()]
    count = len(next(iter(inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for start in range(0, count, batch):
        values = runner.run(outputs, {n: inputs[n][start : start + batch] for n in names})
        for name, value in zip(outputs, values, strict=True):
            chunks[name].append(value)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


# -------------------------------------------------------------------------------------------- operators


def identity(draft: Draft, _: BlackBoxContext) -> Draft:
    return draft


def partition(ways: int) -> Operator:
    def apply(draft: Draft, _: BlackBoxContext) -> Draft:
        model = draft.only_stage("partition")
        cuts = find_cuts(model)
        chosen = balanced_cuts(cuts, ways)
        stages = split_stages(model, chosen, f"partition{ways}")
        crossing = {f"cut{i}_bytes_per_item": c.bytes_per_item for i, c in enumerate(chosen)}
        return replace(draft, stages=tuple(StageDraft(s) for s in stages), cuts=tuple(cuts)).with_parameters(
            ways=ways, valid_cuts=len(cuts), **crossing
        )

    return apply


def _feature_tensor(cut: Cut, model: onnx.ModelProto) -> str:
    """The cut's activation to pool for a head: the largest floating tensor that crosses."""
    features = with_outputs(model, cut.tensors)
    runner = session(features)
    shapes = {o.name: o.shape for o in runner.get_outputs()}
    ranked = sorted(
        cut.tensors, key=lambda n: np.prod([d if isinstance(d, int) else 1 for d in shapes[n]]), reverse=True
    )
    return ranked[0]


def train_linear_head(
    features: np.ndarray, targets: np.ndarray, classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised-by-training features (full batch, Adam)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(features.astype(np.float32))
    y = torch.from_numpy(targets)
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(HEAD_TRAIN_STEPS):
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy()


def early_exit(heads: int) -> Operator:
    def apply(draft: Draft, ctx: BlackBoxContext) -> Draft:
        model = draft.only_stage("early-exit")
        cuts = find_cuts(model)
        chosen = balanced_cuts(cuts, heads + 1)
        feature_names = [_feature_tensor(c, model) for c in chosen]
        train = ctx.split.train.head(ctx.head_train_items)
        final = draft.outputs[0]
        probe = run_batched(with_outputs(model, feature_names), train.inputs, [*feature_names, final], draft.batch)
        classes = probe[final].shape[1]
        stages = split_stages(model, chosen, f"early_exit{heads}")
        headed = []
        for index, name in enumerate(feature_names):
            weight, bias = train_linear_head(pool_features(probe[name]), train.targets, classes, ctx.seed + index)
            headed.append(attach_exit_head(stages[index], name, weight, bias, output=f"exit{index}_logits"))
        threshold = _calibrated_threshold([*headed, stages[-1]], feature_names, final, ctx)
        stage_drafts = [
            StageDraft(m, ExitSpec(output=f"exit{i}_logits", threshold=threshold)) for i, m in enumerate(headed)
        ]
        return replace(draft, stages=(*stage_drafts, StageDraft(stages[-1])), cuts=tuple(cuts)).with_parameters(
            exit_heads=heads, exit_tolerance=EXIT_TOLERANCE, threshold_chosen_on="calibration"
        )

    return apply


def _calibrated_threshold(
    models: list[onnx.ModelProto], features: list[str], final: str, ctx: BlackBoxContext
) -> float:
    runs = []
    for index, model in enumerate(models):
        outputs = tuple(o.name for o in model.graph.output)
        runs.append(
            StageRun(
                session(model),
                tuple(i.name for i in model.graph.input),
                outputs,
                f"exit{index}_logits" if index < len(features) else None,
            )
        )
    calibration = ctx.split.calibration
    traced = trace(runs, calibration, final)
    full_accuracy = float(np.mean(traced.final.argmax(axis=1) == calibration.targets))
    return choose_threshold(traced, calibration.targets, full_accuracy, EXIT_TOLERANCE)


class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no types
    def __init__(self, inputs: dict[str, np.ndarray], batch: int = CALIBRATION_BATCH) -> None:
        count = len(next(iter(inputs.values())))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[s : s + batch] for k, v in inputs.items()} for s in range(0, count, batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


# weight-bearing operators only: LayerNorm, Softmax and residual adds stay in float, where int8 would lose
# most (static int8 on every op took MiniLM from 75 % to 37 % accuracy here)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# activation ranges from the 99.99th percentile of the calibration values, not their extremes: a handful of
# outlier activations set MinMax's scale for all the rest. Measured on the distilled segmenter (`make
# models`, mIoU over 1,200 canvases, its fp32 0.636): MinMax 0.616 (0.616 with 1,024 calibration items),
# entropy 0.616, percentile 0.631; the teacher keeps 0.658 either way
CALIBRATION_PERCENTILE = 99.99
SPTQ_SETTINGS: dict[str, Scalar] = {
    "quant_format": "QDQ",
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,
    "quantized_ops": "+".join(QUANTIZED_OPS),
    "activation_products": "float",
    "calibrate_method": "Percentile",
    "calibrate_percentile": CALIBRATION_PERCENTILE,
    "calibrated_on": "calibration",
}


def _quantize_stages(
    draft: Draft,
    quantize: Callable[[Path, Path, dict[str, np.ndarray], int | None], None],
    calibration: Samples | None,
) -> tuple[StageDraft, ...]:
    """Quantize each stage; stage i sees what the fp32 stages before it give for the calibration inputs."""
    quantized = []
    feeds = dict(calibration.inputs) if calibration is not None else {}
    with tempfile.TemporaryDirectory(prefix="tierlab-quant-") as tmp:
        folder = Path(tmp)
        for index, stage in enumerate(draft.stages):
            source, prepared, target = (folder / f"{index}-{n}.onnx" for n in ("fp32", "pre", "int8"))
            onnx.save_model(stage.model, str(source))
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            names = [i.name for i in stage.model.graph.input]
            quantize(prepared, target, {n: feeds[n] for n in names if n in feeds}, draft.batch)
            quantized.append(StageDraft(onnx.load(str(target)), stage.exit))
            if calibration is not None and index + 1 < len(draft.stages):
                outputs = [o.name for o in stage.model.graph.output]
                feeds.update(run_batched(stage.model, {n: feeds[n] for n in names}, outputs, draft.batch))
    return tuple(quantized)


def activation_products(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes multiplying two activations (attention's Q·Kᵀ and P·V), which static int8 ruins."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in QUANTIZED_OPS and n.op_type != "Conv" and not any(i in constant for i in n.input[:2])
    ]


def sptq(draft: Draft, ctx: BlackBoxContext) -> Draft:
    def quantize(source: Path, target: Path, inputs: dict[str, np.ndarray], batch: int | None) -> None:
        model = onnx.load(str(source))
        quantize_static(
            str(source),
            str(target),
            _Reader(inputs, batch or CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=activation_products(model),
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
        )

    calibration = ctx.split.calibration.head(ctx.calibration_items)
    stages = _quantize_stages(draft, quantize, calibration)
    return replace(draft, stages=stages).with_parameters(**SPTQ_SETTINGS, calibration_items=len(calibration))


def dynq(draft: Draft, _: BlackBoxContext) -> Draft:
    def quantize(source: Path, target: Path, _: dict[str, np.ndarray], __: int | None) -> None:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)

    stages = _quantize_stages(draft, quantize, None)
    return replace(draft, stages=stages).with_parameters(dynq_weight_type="QInt8", dynq_per_channel=True)


BLACK_BOX: dict[str, Operator] = {
    "identity": identity,
    "partition2": partition(2),
    "partition3": partition(3),
    "early-exit": early_exit(1),
    "early-exit2": early_exit(2),
    "sptq": sptq,
    "dynq": dynq,
}
