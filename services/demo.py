"""Demo variants and deployment files, so tiers can run before any real subject is built.

``demo-mlp`` is a seeded 3-layer perceptron (64 → 256 → 256 → 10) with an exit head after the first
layer, written three ways: ``identity`` (one stage), ``partition3`` (cut after each layer: runs as
M-E-C) and ``early-exit`` (the first layer plus its exit head, then the rest). The weights are random,
not trained: the demo shows the plumbing (exactness of a cut, early exits, timings), not accuracy.
Real subjects come from ``operators`` (``make models``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from services.contracts.manifest import ExitSpec, ManifestSpec
from services.contracts.specs import (
    TIERS,
    DeploymentSpec,
    LinkName,
    LinkSpec,
    ModelEntrySpec,
    TierEndpointSpec,
    TierName,
)
from services.contracts.variant import StageModel, write_variant

OPSET = 17
IR_VERSION = 9
DEMO_SUBJECT = "demo-mlp"
DEMO_DIMS = (64, 256, 256, 10)
DEMO_EXIT_THRESHOLD = 0.9
DEFAULT_PORTS: dict[TierName, int] = {"mobile": 8001, "edge": 8002, "cloud": 8003}


def onnx_model(
    name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int | str]],
    outputs: Mapping[str, Sequence[int | str]],
    initializers: Mapping[str, np.ndarray],
) -> onnx.ModelProto:
    """An FP32 ONNX model from nodes; shapes may use "batch" for a dynamic dimension."""

    def values(specs: Mapping[str, Sequence[int | str]]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in specs.items()]

    graph = helper.make_graph(
        list(nodes),
        name,
        values(inputs),
        values(outputs),
        [numpy_helper.from_array(array, n) for n, array in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def _dense(layer: str, source: str, target: str, *, relu: bool) -> list[onnx.NodeProto]:
    matmul = f"{layer}_matmul"
    nodes = [
        helper.make_node("MatMul", [source, f"{layer}_w"], [matmul]),
        helper.make_node("Add", [matmul, f"{layer}_b"], [f"{layer}_pre" if relu else target]),
    ]
    if relu:
        nodes.append(helper.make_node("Relu", [f"{layer}_pre"], [target]))
    return nodes


def _weights(
    layer: str, fan_in: int, fan_out: int, rng: np.random.Generator, scale: float = 1.0
) -> dict[str, np.ndarray]:
    w = rng.normal(0.0, scale * np.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32)
    b = rng.normal(0.0, 0.05, fan_out).astype(np.float32)
    return {f"{layer}_w": w, f"{layer}_b": b}


def build_demo_mlp(root: Path, *, seed: int = 0) -> list[ManifestSpec]:
    """Write the three demo-mlp variants under ``root/demo-mlp/``."""
    d_in, d_hidden1, d_hidden2, d_out = DEMO_DIMS
    rng = np.random.default_rng(seed)
    w1, w2, w3 = (
        _weights("l1", d_in, d_hidden1, rng),
        _weights("l2", d_hidden1, d_hidden2, rng),
        _weights("l3", d_hidden2, d_out, rng),
    )
    # a sharper head, so some inputs clear the default exit threshold
    we = _weights("exit", d_hidden1, d_out, rng, scale=4.0)
    b = "batch"
    l1, l2, l3 = (
        _dense("l1", "x", "h1", relu=True),
        _dense("l2", "h1", "h2", relu=True),
        _dense("l3", "h2", "logits", relu=False),
    )
    head = _dense("exit", "h1", "exit_logits", relu=False)

    identity = onnx_model("mlp", l1 + l2 + l3, {"x": [b, d_in]}, {"logits": [b, d_out]}, {**w1, **w2, **w3})
    cut = [
        onnx_model("mlp_s0", l1, {"x": [b, d_in]}, {"h1": [b, d_hidden1]}, w1),
        onnx_model("mlp_s1", l2, {"h1": [b, d_hidden1]}, {"h2": [b, d_hidden2]}, w2),
        onnx_model("mlp_s2", l3, {"h2": [b, d_hidden2]}, {"logits": [b, d_out]}, w3),
    ]
    exit_stage = onnx_model(
        "mlp_ee0",
        l1 + head,
        {"x": [b, d_in]},
        {"h1": [b, d_hidden1], "exit_logits": [b, d_out]},
        {**w1, **we},
    )
    rest = onnx_model("mlp_ee1", l2 + l3, {"h1": [b, d_hidden1]}, {"logits": [b, d_out]}, {**w2, **w3})

    folder = root / DEMO_SUBJECT

    def variant(operator_folder: str, operator: str, stages: list[StageModel]) -> ManifestSpec:
        return write_variant(
            folder / operator_folder,
            name=f"{DEMO_SUBJECT}.{operator_folder}",
            subject=DEMO_SUBJECT,
            operator=operator,
            stages=stages,
            outputs=["logits"],
            parameters={"seed": seed},
        )

    head_spec = ExitSpec(output="exit_logits", threshold=DEMO_EXIT_THRESHOLD)
    return [
        variant("identity", "identity", [StageModel(identity)]),
        variant("partition3", "partition", [StageModel(m) for m in cut]),
        variant("early-exit", "early-exit", [StageModel(exit_stage, head_spec), StageModel(rest)]),
    ]


def local_deployment(
    manifests: Sequence[str],
    *,
    models_dir: str = ".",
    ports: Mapping[TierName, int] = DEFAULT_PORTS,
    host: str = "127.0.0.1",
    links: Mapping[LinkName, LinkSpec] | None = None,
) -> DeploymentSpec:
    """A deployment of three tiers on one host (the local, no-Docker mode)."""
    return DeploymentSpec(
        models_dir=models_dir,
        models=tuple(ModelEntrySpec(manifest=m) for m in manifests),
        tiers={t: TierEndpointSpec(url=f"http://{host}:{ports[t]}") for t in TIERS},
        links=dict(links or {}),
    )


def write_deployment(deployment: DeploymentSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deployment.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def write_demo(root: Path, *, seed: int = 0, ports: Mapping[TierName, int] = DEFAULT_PORTS) -> Path:
    """Write the demo variants and a local deployment serving them; returns the deployment file."""
    manifests = build_demo_mlp(root, seed=seed)
    relative = [f"{DEMO_SUBJECT}/{m.name.split('.', 1)[1]}/manifest.json" for m in manifests]
    return write_deployment(local_deployment(relative, ports=ports), root / "deployment.yaml")
