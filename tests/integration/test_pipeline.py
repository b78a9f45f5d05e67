"""Three tier processes on loopback: partitioned and early-exit pipelines, a stock V2 client, link delay."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from services.contracts import codec
from services.contracts.manifest import ManifestSpec, max_softmax
from services.contracts.pipeline import hops_from_parameters
from services.contracts.specs import TIERS, LinkName, LinkSpec, Placement, TierName
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports, http_get_json
from tests.conftest import infer_over_http

MODELS = ("identity", "partition3", "early-exit")


def _deployment(demo_root: Path, folder: Path, links: Mapping[LinkName, LinkSpec] | None = None) -> Path:
    ports = dict(zip(TIERS, free_ports(3), strict=True))
    spec = local_deployment(
        [f"demo-mlp/{m}/manifest.json" for m in MODELS], models_dir=str(demo_root), ports=ports, links=links
    )
    return write_deployment(spec, folder / "deployment.yaml")


@pytest.fixture(scope="module")
def stack(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    folder = tmp_path_factory.mktemp("stack")
    with LocalStack(
        _deployment(demo_root, folder), log_dir=folder / "logs", tier_args=["--warmup-runs", "1"]
    ) as running:
        yield running


def post(stack: LocalStack, tier: TierName, model: str, x: np.ndarray, **parameters: object) -> codec.InferResponse:
    return infer_over_http(stack.url(tier), model, x, **parameters)


def entry_tier(placement: str) -> TierName:
    return Placement.parse(placement).tiers[0]


def test_three_way_cut_equals_the_whole_model(
    stack: LocalStack, reference_session: ort.InferenceSession, sample_batch: np.ndarray
) -> None:
    expected = reference_session.run(None, {"x": sample_batch})[0]
    answer = post(stack, "mobile", "demo-mlp.partition3", sample_batch, placement="M-E-C", request_id="cut-1")
    assert float(np.max(np.abs(answer.outputs["logits"] - expected))) <= 1e-5
    hops = hops_from_parameters(answer.parameters)
    assert [h.tier for h in hops] == ["mobile", "edge", "cloud"]
    assert [(h.first_stage, h.last_stage) for h in hops] == [(0, 0), (1, 1), (2, 2)]
    assert hops[0].bytes_out == hops[1].bytes_in > 256 * 4 * len(sample_batch)  # h1 crosses mobile -> edge
    assert hops[2].bytes_out == 0 and hops[2].send_ms == 0
    for upstream, downstream in itertools.pairwise(hops):
        assert upstream.send_ms >= downstream.total_ms  # the forward call contains the whole next hop
        assert upstream.total_ms >= upstream.send_ms + upstream.compute_ms
    assert answer.parameters["request_id"] == "cut-1"
    assert answer.parameters["strategy"] == "demo-mlp.partition3@M-E-C"
    assert answer.parameters["exit_stage"] == 2 and answer.parameters["exited_early"] is False


@pytest.mark.parametrize(
    ("model", "placement"),
    [
        ("identity", "M"),
        ("identity", "E"),
        ("identity", "C"),
        ("partition3", "M"),
        ("partition3", "E"),
        ("early-exit", "M-E"),
        ("early-exit", "M-C"),
        ("early-exit", "E-C"),
        ("early-exit", "C"),
    ],
)
def test_every_placement_gives_the_same_answer(
    stack: LocalStack,
    reference_session: ort.InferenceSession,
    sample_batch: np.ndarray,
    model: str,
    placement: str,
) -> None:
    expected = reference_session.run(None, {"x": sample_batch})[0]
    answer = post(
        stack,
        entry_tier(placement),
        f"demo-mlp.{model}",
        sample_batch,
        placement=placement,
        exit_threshold=1.0,
    )
    np.testing.assert_allclose(answer.outputs["logits"], expected, atol=1e-5)
    tiers = [h.tier for h in hops_from_parameters(answer.parameters)]
    assert tiers == list(dict.fromkeys(Placement.parse(placement).tiers))


@pytest.mark.parametrize("placement", ["C", "E"])
def test_the_device_relays_its_input_over_the_link_to_the_first_stage(
    stack: LocalStack, reference_session: ort.InferenceSession, sample_batch: np.ndarray, placement: str
) -> None:
    """Sent to mobile (the device), a pipeline that starts elsewhere crosses the device's link first."""
    expected = reference_session.run(None, {"x": sample_batch})[0]
    answer = post(stack, "mobile", "demo-mlp.identity", sample_batch, placement=placement)
    np.testing.assert_allclose(answer.outputs["logits"], expected, atol=1e-5)
    hops = hops_from_parameters(answer.parameters)
    assert [h.tier for h in hops] == ["mobile", *Placement.parse(placement).tiers]
    assert hops[0].first_stage == -1 and hops[0].compute_ms == 0 and hops[0].bytes_out > 0


def exit_head_confidence(demo_root: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(demo_root / "demo-mlp" / "early-exit" / "stage0.onnx"))
    exit_logits = session.run(["exit_logits"], {"x": x})[0]
    return exit_logits, max_softmax(exit_logits)


def test_early_exit_answers_at_mobile_when_confident(
    stack: LocalStack,
    demo_root: Path,
    demo_manifests: dict[str, ManifestSpec],
    reference_session: ort.InferenceSession,
) -> None:
    head = demo_manifests["early-exit"].stages[0].exit
    assert head is not None
    samples = np.random.default_rng(11).normal(size=(40, 64)).astype(np.float32)
    exit_logits, confidence = exit_head_confidence(demo_root, samples)
    full = reference_session.run(None, {"x": samples})[0]
    confident = confidence >= head.threshold
    assert 0 < confident.sum() < len(samples), "the sample set must hold confident and unsure items"
    for i in range(len(samples)):
        answer = post(stack, "mobile", "demo-mlp.early-exit", samples[i : i + 1], placement="M-C")
        hops = hops_from_parameters(answer.parameters)
        if confident[i]:
            assert answer.parameters["exit_stage"] == 0 and answer.parameters["exited_early"] is True
            assert [h.tier for h in hops] == ["mobile"] and hops[0].bytes_out == 0
            np.testing.assert_allclose(answer.outputs["logits"], exit_logits[i : i + 1], atol=1e-5)
        else:
            assert answer.parameters["exit_stage"] == 1 and answer.parameters["exited_early"] is False
            assert [h.tier for h in hops] == ["mobile", "cloud"]
            np.testing.assert_allclose(answer.outputs["logits"], full[i : i + 1], atol=1e-5)


def test_exit_threshold_parameter_overrides_the_manifest(stack: LocalStack, sample_batch: np.ndarray) -> None:
    always = post(stack, "mobile", "demo-mlp.early-exit", sample_batch, placement="M-E", exit_threshold=0.0)
    never = post(stack, "mobile", "demo-mlp.early-exit", sample_batch, placement="M-E", exit_threshold=1.0)
    assert (always.parameters["exit_stage"], never.parameters["exit_stage"]) == (0, 1)


def test_a_stock_v2_client_calls_a_tier_unchanged(
    stack: LocalStack, reference_session: ort.InferenceSession, sample_batch: np.ndarray
) -> None:
    expected = reference_session.run(None, {"x": sample_batch})[0]
    client = triton.InferenceServerClient(stack.url("mobile").removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("demo-mlp.partition3")
        metadata = client.get_model_metadata("demo-mlp.partition3")
        assert metadata["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 64]}
        for binary in (True, False):
            tensor = triton.InferInput("x", list(sample_batch.shape), "FP32")
            tensor.set_data_from_numpy(sample_batch, binary_data=binary)
            outputs = [triton.InferRequestedOutput("logits", binary_data=binary)]
            result = client.infer(
                "demo-mlp.partition3",
                [tensor],
                outputs=outputs,
                request_id="triton-1",
                parameters={"placement": "M-E-C"},
            )
            np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
            response = result.get_response()
            assert response["id"] == "triton-1" and response["parameters"]["hops"] == 3
    finally:
        client.close()


def test_userspace_link_delay_holds_each_direction(demo_root: Path, tmp_path: Path, sample_batch: np.ndarray) -> None:
    links: dict[LinkName, LinkSpec] = {
        "mobile-edge": LinkSpec(delay_ms=15.0),
        "edge-cloud": LinkSpec(delay_ms=10.0, rate_mbit=100.0),
    }
    with LocalStack(_deployment(demo_root, tmp_path, links), log_dir=tmp_path / "logs") as shaped:
        _, status = http_get_json(f"{shaped.url('edge')}/tierlab/status")
        backends = {link["link"]: (link["backend"], link["note"]) for link in status["links"]}
        assert backends["mobile-edge"] == ("userspace", "peer is on loopback; shaping in userspace")
        assert backends["edge-cloud"][0] == "userspace"
        for _ in range(3):
            started = time.perf_counter()
            answer = post(shaped, "mobile", "demo-mlp.partition3", sample_batch, placement="M-E-C")
            elapsed_ms = (time.perf_counter() - started) * 1000
            hops = hops_from_parameters(answer.parameters)
            # a round trip crosses each link twice; the emulation may only add, never remove
            assert hops[0].send_ms - hops[1].total_ms >= 30.0
            assert hops[1].send_ms - hops[2].total_ms >= 20.0
            assert elapsed_ms >= 50.0


def test_a_missing_next_tier_is_named_upstream(demo_root: Path, tmp_path: Path, sample_batch: np.ndarray) -> None:
    with LocalStack(_deployment(demo_root, tmp_path), tiers=("mobile", "edge"), log_dir=tmp_path / "logs") as partial:
        with pytest.raises(urllib.error.HTTPError) as failure:
            post(partial, "mobile", "demo-mlp.partition3", sample_batch, placement="M-E-C")
        assert failure.value.code == 502
        message = failure.value.read().decode()
        assert "mobile -> edge answered 502: edge -> cloud: cannot reach" in message


def test_a_tier_refuses_to_start_on_a_tampered_model(demo_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(demo_root / "demo-mlp" / "identity", models / "identity")
    with (models / "identity" / "stage0.onnx").open("ab") as handle:
        handle.write(b"x")
    deployment = write_deployment(
        local_deployment(["identity"], models_dir=str(models), ports=dict(zip(TIERS, free_ports(3), strict=True))),
        tmp_path / "d.yaml",
    )
    done = subprocess.run(
        [sys.executable, "-m", "services", "tier", "--tier", "edge", "--deployment", str(deployment)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "has sha256" in done.stderr and "the manifest says" in done.stderr
    with pytest.raises(RuntimeError, match="exited with code 2 while starting"):
        LocalStack(deployment, tiers=("edge",), log_dir=tmp_path / "logs").start()
