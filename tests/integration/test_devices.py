"""Devices in a running tier: each stage paced by its own kernel classes (an int8 and a float stage of one
model slowed by the device's own ratios), hop records carrying device, host and pacing time, stages from
1 ms to 500 ms paced to their device time, a measured device's cores computing stages side by side at its
fitted one-core ratios, and every shipped device fitted against this host to its published numbers.

The tier's emulation is judged against its own configuration (the factors it paces by), never against a
wall-clock goal; each check is the median of several requests."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.contracts import codec
from services.contracts.device import DeviceModelSpec, DeviceSpec, ratios_at, stage_factor
from services.contracts.kernels import KERNEL_CLASSES, KernelClass
from services.contracts.specs import TIERS
from services.contracts.variant import StageModel, write_variant
from services.demo import local_deployment, write_deployment
from services.devices.fit import CHECKED, fit_device
from services.devices.onnxnets import quantize_int8
from services.devices.profiles import known_devices, load_profile
from services.devices.published import device_runs
from services.devices.reference import host_reference
from services.local import free_ports
from services.tier.settings import TierSettings
from tests.conftest import serve_in_process
from tests.unit.test_device import synthetic_device

ROOT = Path(__file__).resolve().parents[2]


def conv_net(size: int, layers: int, channels: int = 32) -> onnx.ModelProto:
    """A chain of 3×3 convolutions on a ``size``×``size`` image: its cost grows as size² × layers."""
    rng = np.random.default_rng(size * 100 + layers)
    nodes, weights, previous, inputs = [], [], "x", 3
    for i in range(layers):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((channels, inputs, 3, 3)) * 0.1).astype(np.float32), f"w{i}"))  # fmt: skip
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        previous, inputs = f"r{i}", channels
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_model(root: Path, name: str, model: onnx.ModelProto) -> str:
    write_variant(root / "convs" / name, name=f"convs.{name}", subject="convs", operator=name,
                  stages=[StageModel(model)], outputs=["y"])  # fmt: skip
    return f"convs/{name}/manifest.json"


def settings_for(
    root: Path, manifests: list[str], device: DeviceSpec, devices: dict[str, DeviceModelSpec]
) -> TierSettings:
    ports = dict(zip(TIERS, free_ports(3), strict=True))
    deployment = local_deployment(manifests, models_dir=str(root), ports=ports)
    deployment = deployment.model_copy(update={"devices": devices})
    path = write_deployment(deployment, root / "deployment.yaml")
    return TierSettings(tier="mobile", deployment=path, warmup_runs=2, device=device, shape_links=False)


async def hops(client: httpx.AsyncClient, model: str, size: int, count: int) -> list[dict[str, Any]]:
    """``count`` single-stream requests; each answer's hop record (``host_ms``, ``compute_ms``, …)."""
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    found = []
    for _ in range(count):
        encoded = codec.encode_request({"x": x})
        reply = await client.post(f"/v2/models/{model}/infer", content=encoded.body(), headers=encoded.http_headers())
        assert reply.status_code == 200, reply.text
        answer = codec.decode_response(reply.content, codec.parse_header_length(
            reply.headers.get(codec.HEADER_LENGTH_HTTP_HEADER)))  # fmt: skip
        found.append({k.removeprefix("hop0_"): v for k, v in answer.parameters.items() if k.startswith("hop0_")})
    return found


def paced_factor(records: list[dict[str, Any]]) -> float:
    """The median ratio of device time (compute) to the host's own run in a set of hop records."""
    return float(statistics.median(r["compute_ms"] / r["host_ms"] for r in records))


@pytest.mark.anyio
async def test_int8_and_float_stages_of_one_model_are_paced_by_the_devices_own_ratios(tmp_path: Path) -> None:
    model = conv_net(64, 4)
    float_manifest = write_model(tmp_path, "float", model)
    onnx.save(model, str(tmp_path / "float.onnx"))
    int8 = onnx.load(str(quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx", (1, 3, 64, 64))))
    int8_manifest = write_model(tmp_path, "int8", int8)
    ratios: dict[KernelClass, float] = {"conv": 3.0, "conv_int8": 9.0, "other": 3.0}
    device = synthetic_device(ratios, ratios)
    settings = settings_for(tmp_path, [float_manifest, int8_manifest], DeviceSpec(model="synthetic", cores=4),
                            {"synthetic": device})  # fmt: skip
    async with serve_in_process(settings) as (tier, client):
        plane = tier.dataplane
        expected = {name: stage_factor(plane.sessions[(f"convs.{name}", 0)].shares, ratios_at(device, 4))
                    for name in ("float", "int8")}  # fmt: skip
        assert plane.sessions[("convs.int8", 0)].shares.get("conv_int8", 0) > 0.5
        measured = {name: paced_factor(await hops(client, f"convs.{name}", 64, 9)) for name in ("float", "int8")}
    for name in ("float", "int8"):  # each stage is paced to its own factor (host work × its classes' ratios)
        assert measured[name] == pytest.approx(expected[name], rel=0.15), (name, measured, expected)
    assert measured["int8"] / measured["float"] > 2.0, "the int8 stage slows by the device's int8 ratio, not the host's"


@pytest.mark.anyio
@pytest.mark.parametrize(("size", "layers"), [(32, 2), (64, 4), (160, 6), (224, 12)])
async def test_stages_from_a_millisecond_to_half_a_second_are_paced_to_their_device_time(
    tmp_path: Path, size: int, layers: int
) -> None:
    manifest = write_model(tmp_path, "float", conv_net(size, layers))
    settings = settings_for(tmp_path, [manifest], DeviceSpec(speed=0.5), {})
    async with serve_in_process(settings) as (_, client):
        records = await hops(client, "convs.float", size, 5)
    assert paced_factor(records) == pytest.approx(2.0, rel=0.1), records  # speed 0.5: device time = 2 × host
    assert all(r["pace_ms"] >= 0 and not r["overran"] for r in records)


@pytest.mark.anyio
async def test_a_measured_devices_cores_compute_stages_side_by_side_at_its_one_core_ratios(tmp_path: Path) -> None:
    """Alone, a stage has the device's four cores (its 4-thread ratio); four at once have one core each (its
    1-thread ratio): throughput at concurrency 4 ÷ at 1 is 4 × ratio₄ ÷ ratio₁, as the device's data says."""
    manifest = write_model(tmp_path, "float", conv_net(64, 4))
    device = synthetic_device({k: 16.0 for k in KERNEL_CLASSES}, {k: 6.0 for k in KERNEL_CLASSES})
    settings = settings_for(tmp_path, [manifest], DeviceSpec(model="synthetic", cores=4), {"synthetic": device})
    async with serve_in_process(settings) as (tier, client):
        assert tier.dataplane.compute_slots == 4
        await hops(client, "convs.float", 64, 2)

        async def throughput(concurrency: int, requests: int = 12) -> float:
            started = time.perf_counter()
            per_loop = requests // concurrency
            await asyncio.gather(*(hops(client, "convs.float", 64, per_loop) for _ in range(concurrency)))
            return per_loop * concurrency / (time.perf_counter() - started)

        rates = {c: statistics.median([await throughput(c) for _ in range(3)]) for c in (1, 4)}
    assert rates[4] / rates[1] == pytest.approx(4 * 6.0 / 16.0, rel=0.2), rates


@pytest.fixture(scope="module")
def reference() -> Any:
    """This host's reference networks (measured once per host and engine, cached in .local/devices)."""
    return host_reference(ROOT, say=lambda _: None)


@pytest.mark.parametrize("name", known_devices())
def test_every_shipped_device_is_fitted_to_its_published_numbers(name: str, reference: Any) -> None:
    """Fitted on all its published networks, each device reproduces them (in sample) and names what its
    leave-one-network-out check gives; its ratios at its cores are below its one-thread ratios (cores help)."""
    profile = load_profile(name)
    fit = fit_device(profile, reference)
    published = device_runs(profile.table or "", list(profile.threads))
    in_sample = []
    for threads, rows in published.items():
        ratios = {k: r / fit.model.engine_transfer[k] for k, r in fit.model.ratios[threads].items()}
        for network, ms in rows.items():
            if network in reference.networks:
                host = reference.networks[network].classes_ms
                predicted = sum(host.get(k, 0.0) * ratios[k] for k in KERNEL_CLASSES)
                in_sample.append(abs(predicted / ms - 1))
    assert statistics.median(in_sample) <= 0.15, f"{name}: the fit does not reproduce its own data"
    assert fit.model.fit.networks >= len(CHECKED) // 2, f"{name}: too few checked networks in its table"
    assert fit.model.fit.predictions == sum(p.network in CHECKED for p in fit.predictions)
    cores = max(profile.threads)
    assert fit.model.ratios[cores]["conv"] < fit.model.ratios[1]["conv"], "more cores make a convolution faster"
