"""Fixtures shared by the rings: demo variants on disk, deployments on free ports, in-process tiers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from operators.build import build
from operators.subjects import TINY
from services.contracts import codec
from services.contracts.manifest import ManifestSpec, load_manifest
from services.contracts.specs import TIERS, LinkName, LinkSpec, TierName
from services.demo import build_demo_mlp, local_deployment, write_deployment
from services.local import free_ports
from services.tier.app import Tier, build_tier
from services.tier.routes import create_app
from services.tier.settings import TierSettings

DEMO_MODELS = ("identity", "partition3", "early-exit")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_demo_mlp(root, seed=7)
    return root


@pytest.fixture(scope="session")
def demo_manifests(demo_root: Path) -> dict[str, ManifestSpec]:
    return {name: load_manifest(demo_root / "demo-mlp" / name) for name in DEMO_MODELS}


@pytest.fixture(scope="session")
def reference_session(demo_root: Path) -> ort.InferenceSession:
    """The unpartitioned demo model, run in-process: what every pipeline must reproduce."""
    return ort.InferenceSession(str(demo_root / "demo-mlp" / "identity" / "stage0.onnx"))


@pytest.fixture
def sample_batch() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)


DeploymentFactory = Callable[..., Path]


@pytest.fixture
def make_deployment(demo_root: Path, tmp_path: Path) -> DeploymentFactory:
    """Write a deployment of the demo models on free loopback ports (or the ports given)."""

    def make(ports: Mapping[TierName, int] | None = None, links: Mapping[LinkName, LinkSpec] | None = None) -> Path:
        chosen = dict(ports) if ports else dict(zip(TIERS, free_ports(3), strict=True))
        spec = local_deployment(
            [f"demo-mlp/{name}/manifest.json" for name in DEMO_MODELS],
            models_dir=str(demo_root),
            ports=chosen,
            links=links,
        )
        return write_deployment(spec, tmp_path / f"deployment-{len(list(tmp_path.glob('deployment-*')))}.yaml")

    return make


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def serve_in_process(settings: TierSettings) -> AsyncIterator[tuple[Tier, httpx.AsyncClient]]:
    """A tier app in this process behind httpx's ASGI transport, lifespan run, sessions loaded."""
    tier = build_tier(settings)
    app = create_app(tier)
    async with app.fastapi.router.lifespan_context(app.fastapi):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{settings.tier}") as client:
            for _ in range(600):
                if tier.dataplane.ready or tier.dataplane.load_error:
                    break
                await asyncio.sleep(0.01)
            yield tier, client


def v2_json_request(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    return body


@pytest.fixture
def tier_settings(make_deployment: DeploymentFactory) -> Callable[..., TierSettings]:
    def settings(tier: str = "edge", deployment: Path | None = None, **overrides: Any) -> TierSettings:
        return TierSettings(tier=tier, deployment=deployment or make_deployment(), warmup_runs=1, **overrides)

    return settings


def infer_over_http(base_url: str, model: str, x: np.ndarray, **parameters: object) -> codec.InferResponse:
    """One V2 binary request to a tier over real HTTP, decoded; HTTP errors raise urllib's HTTPError."""
    encoded = codec.encode_request({"x": x}, parameters=parameters)  # type: ignore[arg-type]
    request = urllib.request.Request(
        f"{base_url}/v2/models/{model}/infer", data=encoded.body(), headers=encoded.http_headers(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        body, header = reply.read(), reply.headers.get(codec.HEADER_LENGTH_HTTP_HEADER)
    return codec.decode_response(body, codec.parse_header_length(header))


def require_tool(name: str) -> str:
    """The path of a system tool the test needs: skipped on a developer machine without it, failed in CI
    (where .ci/run installs it), so a missing tool never passes silently."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


TEST_SETTINGS = replace(
    TINY,
    profile="test",
    train_items=4000,
    finetune_items=1000,
    distill_items=600,
    head_train_items=600,
    calibration_items=64,
    evaluation_items=300,
    fashion_limit=3000,
)


@pytest.fixture(scope="session")
def built_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fmnist-resnet variant and some of the other subjects, built on small budgets (~2.5 min),
    shared by the operator ring and the bench's integration run."""
    root = tmp_path_factory.mktemp("models")
    build(root, TEST_SETTINGS, subjects=["fmnist-resnet"])
    build(
        root, TEST_SETTINGS, subjects=["fmnist-seg"], variants=["identity", "partition2", "partition3", "sptq", "prune"]
    )
    build(
        root,
        TEST_SETTINGS,
        subjects=["fortunes-minilm"],
        variants=["identity", "partition2", "partition3", "early-exit"],
    )
    return root
