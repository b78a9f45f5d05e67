"""One tier app in-process (httpx ASGI transport): V2 routes, single-tier inference, every error path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.contracts import codec
from services.contracts.codec import InferResponse
from services.contracts.errors import ConfigError
from services.contracts.specs import TIERS
from services.contracts.tier_status import read_tier_status
from services.contracts.transport import new_control_token, use_control_token
from services.demo import local_deployment, write_deployment
from services.local import free_ports
from services.tier.app import build_tier
from services.tier.limits import process_rss_bytes
from services.tier.settings import TierSettings
from tests.conftest import DeploymentFactory, serve_in_process, v2_json_request

pytestmark = pytest.mark.anyio

SettingsFactory = Callable[..., TierSettings]


async def infer(client: httpx.AsyncClient, model: str, x: np.ndarray, **parameters: Any) -> InferResponse:
    encoded = codec.encode_request({"x": x}, parameters=parameters)
    reply = await client.post(f"/v2/models/{model}/infer", content=encoded.body(), headers=encoded.http_headers())
    assert reply.status_code == 200, reply.text
    return codec.decode_response(
        reply.content, codec.parse_header_length(reply.headers.get(codec.HEADER_LENGTH_HTTP_HEADER))
    )


async def test_health_metadata_and_status(tier_settings: SettingsFactory) -> None:
    async with serve_in_process(tier_settings("edge")) as (tier, client):
        assert (await client.get("/v2/health/live")).json()["live"] is True
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert {link["backend"] for link in ready.json()["links"]} == {"none"}
        server = (await client.get("/v2")).json()
        assert server["name"] == "tierlab" and "binary_tensor_data" in server["extensions"]
        meta = (await client.get("/v2/models/demo-mlp.partition3")).json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert meta["parameters"]["placements"] == "M,E,C,M-E-C"
        assert (await client.get("/v2/models/demo-mlp.partition3/versions/1")).json() == meta
        assert (await client.get("/v2/models/demo-mlp.identity/ready")).status_code == 200
        status = (await client.get("/tierlab/status")).json()
        assert status["tier"] == "edge" and status["onnxruntime"]["intra_op_threads"] == tier.intra_op_threads
        assert status["models"]["demo-mlp.partition3"]["stages_here"] == [0, 1, 2]
        read = read_tier_status(status)  # the wire document reads back as the contract says
        assert read == tier.status().model_copy(update={"memory": read.memory, "cpu_throttling": read.cpu_throttling})


async def test_single_tier_inference_matches_onnxruntime(
    tier_settings: SettingsFactory, reference_session: ort.InferenceSession, sample_batch: np.ndarray
) -> None:
    expected = reference_session.run(None, {"x": sample_batch})[0]
    async with serve_in_process(tier_settings("cloud")) as (_, client):
        for model in ("demo-mlp.identity", "demo-mlp.partition3"):
            answer = await infer(client, model, sample_batch, placement="C", request_id="abc")
            np.testing.assert_allclose(answer.outputs["logits"], expected, atol=1e-5)
            assert answer.parameters["request_id"] == "abc"
            assert answer.parameters["hops"] == 1 and answer.parameters["hop0_tier"] == "cloud"
        # a JSON request gets a JSON answer, through the versioned route too
        reply = await client.post(
            "/v2/models/demo-mlp.identity/versions/1/infer",
            json=v2_json_request(sample_batch[:1], placement="C"),
        )
        assert reply.headers["content-type"] == codec.JSON_CONTENT_TYPE
        np.testing.assert_allclose(reply.json()["outputs"][0]["data"], expected[0], atol=1e-5)


async def test_metrics_are_exported_with_bounded_labels(
    tier_settings: SettingsFactory, sample_batch: np.ndarray
) -> None:
    async with serve_in_process(tier_settings("mobile")) as (_, client):
        await infer(client, "demo-mlp.identity", sample_batch, placement="M")
        await client.post("/v2/models/no-such-model/infer", json=v2_json_request(sample_batch))
        text = (await client.get("/metrics")).text
    assert (
        'tierlab_request_duration_seconds_bucket{le="0.0001",model="demo-mlp.identity",strategy="demo-mlp.identity@M",tier="mobile"}'
        in text
    )
    for phase in ("queue", "compute"):
        assert f'phase="{phase}",strategy="demo-mlp.identity@M",tier="mobile"' in text
    assert 'tierlab_bytes_total{direction="in",model="demo-mlp.identity"' in text
    assert 'tierlab_errors_total{model="unknown",status="404",tier="mobile"} 1.0' in text
    assert "no-such-model" not in text
    for gauge in (
        "tierlab_cpu_limit_cores",
        "tierlab_memory_limit_bytes",
        "tierlab_ort_intra_op_threads",
        "tierlab_inflight_requests",
        "tierlab_ready",
    ):
        assert f'{gauge}{{tier="mobile"}}' in text
    assert 'tierlab_link_info{backend="none",link="mobile-edge",tier="mobile"} 1.0' in text


def _bad(body: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    return body, headers or {"Content-Type": "application/json"}


X = np.zeros((1, 64), np.float32)
GOOD = json.dumps(v2_json_request(X, placement="E")).encode()
_EMPTY = codec.encode_request({"x": np.zeros((0, 64), np.float32)}, parameters={"placement": "E"})


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/nope/infer", _bad(GOOD), 404, "model 'nope' is not served"),
        ("/v2/models/demo-mlp.identity/infer", _bad(b"{"), 400, "not valid JSON"),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(GOOD, {codec.HEADER_LENGTH_HTTP_HEADER: "99999"}),
            400,
            "exceeds",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(GOOD, {codec.HEADER_LENGTH_HTTP_HEADER: "abc"}),
            400,
            "integer",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(
                json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 64], "data": [0] * 64}]}).encode()
            ),
            400,
            "must be FP32, got FP64",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(
                json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 63], "data": [0] * 63}]}).encode()
            ),
            400,
            r"must have shape \[-1, 64\]",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(
                json.dumps({"inputs": [{"name": "y", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}).encode()
            ),
            400,
            "missing input",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps({**v2_json_request(X), "outputs": [{"name": "probs"}]}).encode()),
            400,
            "unknown output",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps(v2_json_request(X, placement="Z")).encode()),
            400,
            "tier letters",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps(v2_json_request(X, placement="M-E")).encode()),
            400,
            "not served",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps(v2_json_request(X, placement="M")).encode()),
            400,
            "runs on mobile, not edge",
        ),
        (
            "/v2/models/demo-mlp.partition3/infer",
            _bad(json.dumps(v2_json_request(X, placement="M-E-C")).encode()),
            400,
            "send the request to mobile",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps(v2_json_request(X, exit_threshold=3)).encode()),
            400,
            "within",
        ),
        (
            "/v2/models/demo-mlp.identity/infer",
            _bad(json.dumps(v2_json_request(X, tierlab_stage=5)).encode()),
            400,
            "does not exist",
        ),
        ("/v2/models/demo-mlp.identity/infer", (_EMPTY.body(), _EMPTY.http_headers()), 400, "no items"),
        ("/v2/models/nope", _bad(b""), 404, "not served"),
        ("/v2/nowhere", _bad(b""), 404, "Not Found"),
    ],
)
async def test_bad_requests_get_clear_errors(
    tier_settings: SettingsFactory, path: str, body: tuple[bytes, dict[str, str]], status: int, words: str
) -> None:
    async with serve_in_process(tier_settings("edge")) as (_, client):
        content, headers = body
        reply = await (client.post(path, content=content, headers=headers) if content else client.get(path))
        assert reply.status_code == status
        assert set(reply.json()) == {"error"}
        assert re.search(words, reply.json()["error"]), reply.json()
        assert (await client.get("/v2/health/live")).status_code == 200  # the tier still serves


async def test_body_over_the_cap_is_413(tier_settings: SettingsFactory) -> None:
    big = np.zeros((600, 64), np.float32)  # 150 KB binary
    async with serve_in_process(tier_settings("edge", max_body_mb=0.1)) as (_, client):
        encoded = codec.encode_request({"x": big}, parameters={"placement": "E"})
        reply = await client.post(
            "/v2/models/demo-mlp.identity/infer", content=encoded.body(), headers=encoded.http_headers()
        )
        assert reply.status_code == 413 and "cap of 104857 bytes" in reply.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap holds while streaming
            body = encoded.body()
            for start in range(0, len(body), 16384):
                yield body[start : start + 16384]

        reply = await client.post(
            "/v2/models/demo-mlp.identity/infer", content=chunks(), headers=encoded.http_headers()
        )
        assert reply.status_code == 413


async def test_next_tier_down_is_502_naming_the_hop(
    tier_settings: SettingsFactory, make_deployment: DeploymentFactory
) -> None:
    mobile, edge, cloud = free_ports(3)  # nothing listens on edge's port
    deployment = make_deployment({"mobile": mobile, "edge": edge, "cloud": cloud})
    async with serve_in_process(tier_settings("mobile", deployment)) as (_, client):
        reply = await client.post("/v2/models/demo-mlp.partition3/infer", json=v2_json_request(X, placement="M-E-C"))
        assert reply.status_code == 502
        assert reply.json()["error"].startswith("mobile -> edge: cannot reach http://127.0.0.1:")


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: the slow next tier."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_next_tier_slow_is_504_naming_the_hop(
    tier_settings: SettingsFactory, make_deployment: DeploymentFactory
) -> None:
    async with silent_server() as port:
        mobile, cloud = free_ports(2)
        deployment = make_deployment({"mobile": mobile, "edge": port, "cloud": cloud})
        async with serve_in_process(tier_settings("mobile", deployment, forward_timeout_s=0.3)) as (
            _,
            client,
        ):
            reply = await client.post(
                "/v2/models/demo-mlp.partition3/infer", json=v2_json_request(X, placement="M-E-C")
            )
            assert reply.status_code == 504
            assert reply.json()["error"] == "mobile -> edge: no answer within 0.3 s"


@contextlib.asynccontextmanager
async def canned_server(reply: bytes) -> AsyncIterator[int]:
    """A next tier that reads a request and answers ``reply`` (raw HTTP), whatever was asked."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _http(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_SHORT_HEADER = (
    b'{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":4}}]}'
)
_SHORT_TENSOR = _http("200 OK", _SHORT_HEADER + bytes(4), f"Inference-Header-Content-Length: {len(_SHORT_HEADER)}")


@pytest.mark.parametrize(
    ("reply", "status", "words", "retry_after"),
    [
        (_http("503 Service Unavailable", b'{"error": "busy"}', "Retry-After: 7"), 503, "answered 503: busy", "7"),
        (_http("200 OK", b'{"model_name": "m", "outputs": [{"name": "logits"}]}'), 502, "malformed body", None),
        (_http("200 OK", b"not json"), 502, "malformed body", None),
        (_SHORT_TENSOR, 502, "needs 8", None),  # a TensorMismatch decoding the reply: still the hop's fault
    ],
)
async def test_what_the_next_tier_answers_is_blamed_on_it(
    *,
    tier_settings: SettingsFactory,
    make_deployment: DeploymentFactory,
    reply: bytes,
    status: int,
    words: str,
    retry_after: str | None,
) -> None:
    async with canned_server(reply) as port:
        mobile, cloud = free_ports(2)
        deployment = make_deployment({"mobile": mobile, "edge": port, "cloud": cloud})
        async with serve_in_process(tier_settings("mobile", deployment)) as (_, client):
            answer = await client.post(
                "/v2/models/demo-mlp.partition3/infer", json=v2_json_request(X, placement="M-E-C")
            )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"].startswith("mobile -> edge") and words in answer.json()["error"]
    assert answer.headers.get("retry-after") == retry_after


async def test_more_work_than_admitted_is_503_with_retry_after(tier_settings: SettingsFactory) -> None:
    batch = np.random.default_rng(0).normal(size=(2048, 64)).astype(np.float32)
    async with serve_in_process(tier_settings("edge", compute_slots=1, max_queue=1)) as (_, client):
        encoded = codec.encode_request({"x": batch}, parameters={"placement": "E"})
        replies = await asyncio.gather(
            *[
                client.post(
                    "/v2/models/demo-mlp.identity/infer",
                    content=encoded.body(),
                    headers=encoded.http_headers(),
                )
                for _ in range(6)
            ]
        )
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 2 and 503 in statuses
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "limit 2" in refused.json()["error"]


async def test_a_tier_whose_model_cannot_load_is_not_ready(
    tier_settings: SettingsFactory, demo_root: Any, tmp_path: Any
) -> None:
    models = tmp_path / "models"
    shutil.copytree(demo_root / "demo-mlp" / "identity", models / "identity")
    manifest = json.loads((models / "identity" / "manifest.json").read_text())
    manifest["stages"][0]["inputs"][0]["shape"] = [-1, 64, 1]  # the ONNX file takes rank 2
    (models / "identity" / "manifest.json").write_text(json.dumps(manifest))
    deployment = write_deployment(
        local_deployment(
            ["identity"],
            models_dir=str(models),
            ports=dict(zip(("mobile", "edge", "cloud"), free_ports(3), strict=True)),
        ),
        tmp_path / "d.yaml",
    )
    async with serve_in_process(tier_settings("edge", deployment)) as (_, client):
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503 and "FP32[-1, 64, 1] in the manifest" in ready.json()["error"]
        reply = await client.post("/v2/models/demo-mlp.identity/infer", json=v2_json_request(X, placement="E"))
        assert reply.status_code == 503 and "not ready" in reply.json()["error"]
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_the_model_repository_loads_and_unloads_with_measured_costs(
    tier_settings: SettingsFactory, sample_batch: np.ndarray
) -> None:
    async with serve_in_process(tier_settings("edge", startup_models="demo-mlp.identity")) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert "model_repository" in (await client.get("/v2")).json()["extensions"]
        index = {e["name"]: e for e in (await client.post("/v2/repository/index")).json()}
        assert set(index) == {"demo-mlp.identity", "demo-mlp.partition3", "demo-mlp.early-exit"}
        assert index["demo-mlp.identity"]["state"] == "READY" and index["demo-mlp.identity"]["load_ms"] > 0
        assert index["demo-mlp.partition3"]["state"] == "UNAVAILABLE"
        ready_only = (await client.post("/v2/repository/index", json={"ready": True})).json()
        assert [e["name"] for e in ready_only] == ["demo-mlp.identity"]

        # a model not loaded here: 400 naming the load call, and its ready route says no
        reply = await client.post("/v2/models/demo-mlp.partition3/infer", json=v2_json_request(X, placement="E"))
        assert (
            reply.status_code == 400 and "POST /v2/repository/models/demo-mlp.partition3/load" in reply.json()["error"]
        )
        assert (await client.get("/v2/models/demo-mlp.partition3/ready")).status_code == 503

        loaded = await client.post("/v2/repository/models/demo-mlp.partition3/load")
        assert loaded.status_code == 200 and loaded.json()["state"] == "READY", loaded.text
        assert loaded.json()["stages_here"] == [0, 1, 2] and loaded.json()["resident_mib"] is not None
        await infer(client, "demo-mlp.partition3", sample_batch, placement="E")

        unloaded = await client.post("/v2/repository/models/demo-mlp.partition3/unload")
        assert unloaded.status_code == 200 and unloaded.json()["state"] == "UNAVAILABLE"
        reply = await client.post("/v2/models/demo-mlp.partition3/infer", json=v2_json_request(X, placement="E"))
        assert reply.status_code == 400 and "unloaded" in reply.json()["error"]
        status = (await client.get("/tierlab/status")).json()
        assert (
            read_tier_status(status).loaded_summary().startswith("1 of 3 variants loaded; ")
        )  # identity again; partition3 unloaded
        missing = await client.post("/v2/repository/models/no-such-model/load")
        assert missing.status_code == 404 and "not served here" in missing.json()["error"]


async def test_a_load_beyond_the_memory_budget_is_refused_with_the_numbers(tier_settings: SettingsFactory) -> None:
    budget_mb = process_rss_bytes() / (1 << 20) + 20  # the process as it is, and 20 MiB to spare: not enough
    settings = tier_settings("edge", startup_models="all", memory_budget_mb=budget_mb)
    async with serve_in_process(settings) as (_, client):
        assert (await client.get("/v2/health/ready")).status_code == 200  # the tier serves, the models wait
        index = (await client.post("/v2/repository/index")).json()
        assert {e["state"] for e in index} == {"UNAVAILABLE"}
        assert all(
            re.search(r"does not fit: needs ~\d+ MiB, -?\d+ MiB free of the tier's budget", e["reason"]) for e in index
        )
        refused = await client.post("/v2/repository/models/demo-mlp.identity/load")
        assert refused.status_code == 507 and "does not fit" in refused.json()["error"], refused.text
        status = (await client.get("/tierlab/status")).json()
        assert status["models"]["demo-mlp.identity"]["state"] == "UNAVAILABLE"


async def test_a_startup_model_not_in_the_deployment_is_a_config_error(tier_settings: SettingsFactory) -> None:
    with pytest.raises(ConfigError, match=r"startup model\(s\) \['nope'\] are not in the deployment"):
        build_tier(tier_settings("edge", startup_models="nope"))


@pytest.mark.parametrize(
    "body",
    [
        b'{"mobile-edge": {"delay_ms": 1e999}}',  # JSON's overflow: inf
        b'{"mobile-edge": {"delay_ms": NaN}}',
        b'{"mobile-edge": {"rate_mbit": 1e12}}',
        b'{"mobile-edge": {"delay_ms": 5}, "edge-cloud": {"jitter_ms": -1}}',  # one bad link: none applied
    ],
)
async def test_link_values_out_of_bounds_are_refused_before_any_link_changes(
    tier_settings: SettingsFactory, body: bytes
) -> None:
    async with serve_in_process(tier_settings("edge")) as (_, client):
        before = (await client.get("/tierlab/status")).json()["links"]
        reply = await client.put("/tierlab/links", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 422, reply.text
        assert (await client.get("/tierlab/status")).json()["links"] == before


async def test_concurrent_reshapes_are_serialised(tier_settings: SettingsFactory) -> None:
    async with serve_in_process(tier_settings("edge")) as (_, client):
        delays = [float(d) for d in range(1, 9)]
        replies = await asyncio.gather(
            *(client.put("/tierlab/links", json={"mobile-edge": {"delay_ms": d}}) for d in delays)
        )
        assert all(r.status_code == 200 for r in replies)
        final = [
            link for link in (await client.get("/tierlab/status")).json()["links"] if link["link"] == "mobile-edge"
        ]
        assert len(final) == 1 and final[0]["delay_ms"] in delays  # one whole reshape won, none interleaved


async def test_a_warm_up_failure_is_reported_in_health_not_left_loading(
    tier_settings: SettingsFactory, demo_root: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A model that loads but cannot run (a Reshape that 64 values do not fit): the tier says why."""
    models = tmp_path / "models"
    shutil.copytree(demo_root / "demo-mlp" / "identity", models / "identity")
    manifest = json.loads((models / "identity" / "manifest.json").read_text())
    stage = manifest["stages"][0]
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "odd"], ["r"]),
            helper.make_node("Reshape", ["r", "back"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(np.array([3, -1], np.int64), "odd"),
            numpy_helper.from_array(np.array([-1, 64], np.int64), "back"),
            numpy_helper.from_array(np.zeros((64, 10), np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = models / "identity" / stage["file"]
    onnx.save(model, path)
    stage["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    stage["size_bytes"] = path.stat().st_size
    (models / "identity" / "manifest.json").write_text(json.dumps(manifest))
    deployment = write_deployment(
        local_deployment(["identity"], models_dir=str(models), ports=dict(zip(TIERS, free_ports(3), strict=True))),
        tmp_path / "d.yaml",
    )
    async with serve_in_process(tier_settings("edge", deployment)) as (_, client):
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503 and "warm-up on zeros failed" in ready.json()["error"], ready.text
    assert any("warm-up on zeros failed" in r.getMessage() for r in caplog.records)


async def test_control_routes_cap_their_bodies(tier_settings: SettingsFactory) -> None:
    huge = b'{"mobile-edge": {"delay_ms": 1' + b"0" * (1 << 20) + b"}}"
    async with serve_in_process(tier_settings("edge")) as (_, client):
        for method, path in (("PUT", "/tierlab/links"), ("POST", "/tierlab/probe"), ("POST", "/tierlab/calibrate")):
            reply = await client.request(method, path, content=huge, headers={"content-type": "application/json"})
            assert reply.status_code == 413 and "cap of 65536 bytes" in reply.json()["error"], (path, reply.text)
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_control_routes_need_the_stack_token_and_inference_does_not(
    tier_settings: SettingsFactory, tmp_path: Any
) -> None:
    token_file = new_control_token(tmp_path)
    try:
        async with serve_in_process(tier_settings("edge", control_token_file=token_file)) as (_, client):
            bearer = {"Authorization": f"Bearer {token_file.read_text()}"}
            wrong = {"Authorization": "Bearer not-the-token"}
            links = {"mobile-edge": {"delay_ms": 2}}
            for headers in ({}, wrong):
                refused = await client.put("/tierlab/links", json=links, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
                assert (
                    await client.post("/v2/repository/models/demo-mlp.identity/unload", headers=headers)
                ).status_code == 401
            assert (await client.put("/tierlab/links", json=links, headers=bearer)).status_code == 200
            assert (
                await client.post("/v2/models/demo-mlp.identity/infer", json=v2_json_request(X, placement="E"))
            ).status_code == 200
            assert (await client.get("/tierlab/status")).status_code == 200  # reading is open
    finally:
        use_control_token(None)
