"""Measured devices, host side: the published tables read as ncnn prints them, the committed data complete
for every shipped device, kernel classes of ncnn layers and ONNX nodes, the fit recovering known ratios and
its leave-one-out check, the engine transfer, the ncnn → ONNX conversion, and the calibration kit's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.contracts.errors import ConfigError
from services.contracts.kernels import graph_classes, ncnn_layer_class, profile_shares
from services.devices import onnxnets
from services.devices.fit import engine_transfer, fit_ratios, leave_one_out
from services.devices.kit import import_calibration, read_calibration, write_kit
from services.devices.profiles import known_devices, load_profile
from services.devices.published import device_runs, parse_readme, read_published
from services.devices.reference import HostReferenceSpec, NetworkTimeSpec, networks

README = """
### Some Board (Cortex-A72 x 4)
```
loop_count = 8
num_threads = 4
powersave = 0
gpu_device = 0
          resnet50  min =   20.00  max =   21.00  avg =   20.50
loop_count = 8
num_threads = 4
powersave = 0
gpu_device = -1
          resnet50  min =  260.00  max =  265.00  avg =  262.83
     resnet50_int8  min =  195.60  max =  198.08  avg =  196.65
loop_count = 8
num_threads = 1
powersave = 0
gpu_device = -1
          resnet50  min =  533.15  max =  535.12  avg =  534.11
loop_count = 8
num_threads = 1
gpu_device = -1
          resnet50  min =  999.00  max =  999.00  avg =  999.00
```
### Other Board
"""


def test_a_readme_table_gives_each_cpu_run_once_and_skips_gpu_runs() -> None:
    runs = parse_readme(README)
    assert [(r.table, r.threads) for r in runs] == [
        ("Some Board (Cortex-A72 x 4)", 4),
        ("Some Board (Cortex-A72 x 4)", 1),
    ]
    assert runs[0].avg_ms == {"resnet50": 262.83, "resnet50_int8": 196.65}  # the GPU run's 20.5 is not it
    assert runs[1].avg_ms == {"resnet50": 534.11}  # the first one-thread run is kept, not the repeat
    assert parse_readme(README, ["Other Board"]) == []


def test_every_shipped_device_has_its_published_runs_committed() -> None:
    assert len(known_devices()) >= 5
    published = {r.table for r in read_published()}
    for name in known_devices():
        profile = load_profile(name)
        assert profile.table in published, name
        runs = device_runs(profile.table, list(profile.threads))
        assert all(len(rows) >= 20 for rows in runs.values()), name
        assert 1 in runs and max(runs) == profile.cores, f"{name}: fitted at 1 thread and at its cores"
    pi = device_runs(load_profile("raspberry-pi-4").table or "", [1, 4])  # the numbers, from the source
    assert (pi[1]["resnet50"], pi[1]["resnet50_int8"], pi[4]["resnet50"], pi[4]["resnet50_int8"]) == (
        534.11, 423.96, 262.83, 196.65)  # fmt: skip
    with pytest.raises(ConfigError, match="no published"):
        device_runs("No Such Board", [1])


def test_kernel_classes_of_ncnn_layers() -> None:
    assert ncnn_layer_class("Convolution", {8: "2"}, 56) == "conv_int8"
    assert ncnn_layer_class("ConvolutionDepthWise", {0: "32", 7: "32"}, 112) == "dw"
    assert ncnn_layer_class("ConvolutionDepthWise", {0: "256", 7: "2"}, 13) == "conv"  # grouped: dense per group
    assert ncnn_layer_class("InnerProduct", {0: "1000"}, 1) == "gemv"
    assert ncnn_layer_class("Gemm", {}, 145) == "gemm" and ncnn_layer_class("MultiHeadAttention", {}, 145) == "gemm"
    assert ncnn_layer_class("Pooling", {}, 7) == "other"


def _tiny_model(path: Path) -> Path:
    """A dense convolution, a depthwise one, a matrix times one row and one times many rows."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="dense", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w2"], ["b"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["b"], ["c"], name="pool", axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["c", "w3"], ["y"], name="one-row"),
        helper.make_node("MatMul", ["t", "w4"], ["z"], name="rows"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [64, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 128])],
        [weight("w1", 16, 3, 3, 3), weight("w2", 16, 1, 3, 3), weight("w3", 16, 10), weight("w4", 128, 128)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_kernel_classes_of_an_onnx_graph_and_a_profiled_split(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path / "tiny.onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    classes = graph_classes(model)
    assert classes == {"dense": "conv", "depthwise": "dw", "pool": "other", "one-row": "gemv", "rows": "gemm"}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    feeds = {"x": np.ones((1, 3, 32, 32), np.float32), "t": np.ones((64, 128), np.float32)}
    shares = profile_shares(str(path), options, feeds)
    assert sum(shares.values()) == pytest.approx(1.0) and {"conv", "dw", "gemm"} <= set(shares)
    quantized = onnxnets.quantize_int8(path, tmp_path / "int8.onnx", (1, 3, 32, 32))
    int8_shares = profile_shares(str(quantized), options, feeds)
    assert "conv_int8" in int8_shares and "conv" not in int8_shares


def test_the_fit_recovers_known_ratios_and_leaves_out_what_it_cannot_predict() -> None:
    rng = np.random.default_rng(1)
    host = rng.uniform(1, 20, size=(12, 3))
    host[:, 2] = 0.0
    host[0, 2] = 5.0  # one network alone spends time in the third class
    truth = np.array([8.0, 12.0, 3.0])
    device = host @ truth
    fitted = fit_ratios(host, device, shrink=1e-6)
    assert fitted[:2] == pytest.approx(truth[:2], rel=0.02)
    predictions = leave_one_out(host, device, [f"n{i}" for i in range(12)], 4)
    assert "n0" not in {p.network for p in predictions} and len(predictions) == 11
    # exact data is predicted to within what the pull towards a common ratio costs (a few per cent)
    assert max(abs(p.error) for p in predictions) < 0.05


def test_the_engine_transfer_is_the_median_ratio_over_networks_busy_in_a_class() -> None:
    def network(ncnn: dict[str, float], ort_ms: dict[str, float] | None) -> NetworkTimeSpec:
        return NetworkTimeSpec(wall_ms=sum(ncnn.values()), classes_ms=ncnn,
                               ort_wall_ms=sum(ort_ms.values()) if ort_ms else None, ort_classes_ms=ort_ms)  # fmt: skip

    reference = HostReferenceSpec(host="h", key="k", measured="now", networks={
        "a": network({"conv": 10.0, "other": 1.0}, {"conv": 20.0, "other": 1.0}),
        "b": network({"conv": 10.0}, {"conv": 10.0}),
        "c": network({"conv": 30.0}, {"conv": 10.0}),
        "d": network({"conv_int8": 9.0}, None),  # does not convert: no transfer measured for its class
    })  # fmt: skip
    transfer = engine_transfer(reference)
    assert transfer["conv"] == 1.0 and transfer["conv_int8"] == 1.0  # median of 0.5, 1, 3; int8 unknown


@pytest.mark.parametrize("name", ["squeezenet", "googlenet", "shufflenet_v2", "mobilenet_v3"])
def test_reference_networks_convert_to_onnx_that_runs(name: str) -> None:
    model = onnxnets.to_onnx(name)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    (scores,) = session.run(None, {session.get_inputs()[0].name: np.random.default_rng(0).random(shape, np.float32)})
    assert scores.shape == (1, 1000) and np.all(np.isfinite(scores))


def test_a_network_with_an_unknown_layer_is_named() -> None:
    assert "mobilenet_ssd" in networks()
    with pytest.raises(ConfigError, match="PriorBox"):
        onnxnets.to_onnx("mobilenet_ssd")


def test_the_calibration_kit_and_a_profile_from_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = write_kit(tmp_path / "kit", say=lambda _: None, names=["squeezenet", "squeezenet_int8"])
    assert {p.name for p in kit.iterdir()} == {"squeezenet.onnx", "squeezenet_int8.onnx", "calibrate_device.py",
                                               "README.txt"}  # fmt: skip
    script = (kit / "calibrate_device.py").read_text()
    assert "services." not in script.replace("python -m services", ""), "the device needs no tierlab"
    measured = {"machine": "aarch64", "processor": "Cortex-A72", "system": "Linux", "onnxruntime": "1.20.0",
                "cores": 4, "ms": {"1": {"squeezenet": 70.0}, "4": {"squeezenet": 30.0}}, "serving_ms": 0.4,
                "measured": "2026-12-07T00:00:00Z"}  # fmt: skip
    (tmp_path / "device.json").write_text(json.dumps(measured))
    monkeypatch.setattr("services.devices.kit.PROFILES_DIR", tmp_path / "devices")
    monkeypatch.setattr("services.devices.profiles.PROFILES_DIR", tmp_path / "devices")
    written = import_calibration(tmp_path / "device.json", "my-pi", "my board")
    profile = load_profile("my-pi")
    assert written.name == "my-pi.yaml" and profile.calibrated and profile.threads == (1, 4) and profile.cores == 4
    assert read_calibration(profile.calibration_file).ms[4]["squeezenet"] == 30.0
    (tmp_path / "bad.json").write_text('{"machine": "x"}')
    with pytest.raises(ConfigError, match=r"not a device\.json"):
        read_calibration(tmp_path / "bad.json")
