"""The HTTP adapter: Open Inference Protocol (V2) REST routes over the tier's data plane.

``build_tier`` realises a :class:`TierSettings` (reads the deployment, verifies manifests, reads cgroup
limits, shapes links); ``create_app`` wraps the resulting :class:`Tier` in FastAPI. The routes only
adapt: read the body within the size cap, decode, call the data plane, encode. One handler renders
every :class:`~services.contracts.errors.TierlabError` as ``{"error": …}`` with its status.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``…/ready``, ``POST …/infer``, ``GET /metrics`` (Prometheus) and ``GET /tierlab/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.contracts import codec
from services.contracts.errors import MalformedBody, PayloadTooLarge, TierlabError
from services.contracts.specs import TIERS, DeploymentSpec, LinkSpec, link_between, load_deployment
from services.tier.dataplane import DataPlane, resolve_models
from services.tier.forwarder import Forwarder
from services.tier.limits import CgroupLimits, host_cpu_count, read_limits
from services.tier.links import CommandRunner, LinkState, LinkTarget, UserspaceLink, clear_links, plan_links, run_command
from services.tier.runtime import session_options
from services.tier.settings import TierSettings
from services.tier.telemetry import TierTelemetry, label_for

log = logging.getLogger(__name__)

SERVER_NAME = "tierlab"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "parameters", "tierlab_pipeline")


@dataclass
class Tier:
    """A tier realised from its settings: what it serves, under which limits, over which links."""

    settings: TierSettings
    deployment: DeploymentSpec
    dataplane: DataPlane
    links: list[LinkState]
    limits: CgroupLimits
    cpu_cores: float
    intra_op_threads: int
    allow_spinning: bool
    run: CommandRunner

    def status(self) -> dict[str, Any]:
        plane = self.dataplane
        return {
            "tier": self.settings.tier,
            "ready": plane.ready,
            "load_error": plane.load_error,
            "limits": {
                "cgroup": self.limits.version,
                "cpu_quota_cores": self.limits.cpu_quota_cores,
                "cpuset_cpu_count": self.limits.cpuset_cpu_count,
                "memory_limit_bytes": self.limits.memory_limit_bytes,
                "cpu_cores": self.cpu_cores,
            },
            "onnxruntime": {"intra_op_threads": self.intra_op_threads, "allow_spinning": self.allow_spinning},
            "links": [state.describe() for state in self.links],
            "models": {
                name: {"stages_here": model.stages_on(self.settings.tier), "placements": list(model.placements)}
                for name, model in plane.models.items()
            },
        }


def build_tier(settings: TierSettings, *, run: CommandRunner = run_command) -> Tier:
    """Read and check everything the tier needs; raises ConfigError with a clear message if it cannot."""
    tier = settings.tier
    deployment = load_deployment(settings.deployment)
    models = resolve_models(deployment, settings.deployment.resolve().parent)
    limits = read_limits()
    cores = limits.cpu_cores(host_cpu_count())
    threads = settings.intra_op_threads or limits.intra_op_threads(host_cpu_count())
    spinning = settings.allow_spinning if settings.allow_spinning is not None else limits.cpu_quota_cores is None

    peers = [t for t in TIERS if t != tier]
    targets = [
        LinkTarget(link_between(tier, peer), peer, urlsplit(deployment.tiers[peer].base_url).hostname or "",
                   deployment.link(tier, peer))
        for peer in peers
    ]  # fmt: skip
    if settings.shape_links:
        states = plan_links(targets, run)
    else:
        states = plan_links([LinkTarget(t.link, t.peer, t.peer_host, LinkSpec()) for t in targets], run)
    for state in states:
        if state.spec.is_shaped:
            log.info("%s link %s: %s %s", tier, state.link, state.backend.value, state.note)

    forwarder = Forwarder(
        tier, {t: e.base_url for t, e in deployment.tiers.items()},
        {s.peer: UserspaceLink.for_state(s) for s in states}, timeout_s=settings.forward_timeout_s,
    )  # fmt: skip
    telemetry = TierTelemetry(tier)
    telemetry.record_limits(limits, cores, threads)
    telemetry.record_links(states)
    plane = DataPlane(tier, models, forwarder, telemetry, compute_slots=settings.compute_slots, max_queue=settings.max_queue)
    return Tier(settings, deployment, plane, states, limits, cores, threads, spinning, run)


async def _read_body(request: Request, cap_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise MalformedBody(f"Content-Length must be an integer, got {declared!r}") from None
        if declared_bytes > cap_bytes:
            raise PayloadTooLarge(f"request body of {declared_bytes} bytes exceeds this tier's cap of {cap_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap_bytes:
            raise PayloadTooLarge(f"request body exceeds this tier's cap of {cap_bytes} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def create_app(tier: Tier) -> FastAPI:
    plane = tier.dataplane
    settings = tier.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await plane.forwarder.start()
        options = session_options(tier.intra_op_threads, allow_spinning=tier.allow_spinning)
        loading = asyncio.create_task(asyncio.to_thread(plane.load, options, settings.warmup_runs))
        try:
            yield
        finally:
            loading.cancel()
            await plane.forwarder.close()
            plane.close()
            clear_links(tier.links, tier.run)

    app = FastAPI(title=f"tierlab {settings.tier} tier", version=SERVER_VERSION, lifespan=lifespan)
    app.state.tier = tier

    @app.exception_handler(TierlabError)
    async def _tierlab_error(request: Request, exc: TierlabError) -> JSONResponse:
        model = label_for(request.path_params.get("name"), plane.models)
        plane.telemetry.record_error(model, exc.status_code)
        if exc.status_code >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
        return JSONResponse(exc.to_json(), status_code=exc.status_code, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        model = label_for(request.path_params.get("name"), plane.models)
        plane.telemetry.record_error(model, 500)
        return JSONResponse({"error": f"internal error in {settings.tier}: {type(exc).__name__}: {exc}"}, 500)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True, "tier": settings.tier}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        body = {"ready": plane.ready, "tier": settings.tier, "links": [s.describe() for s in tier.links]}
        if plane.load_error:
            body["error"] = plane.load_error
        return JSONResponse(body, status_code=200 if plane.ready else 503)

    def model_metadata(name: str) -> dict[str, Any]:
        model = plane.model(name)
        spec = model.manifest

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return {
            "name": spec.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs),
            "parameters": {
                "subject": spec.subject, "operator": spec.operator, "stages": len(spec.stages),
                "placements": ",".join(model.placements), "default_placement": model.default_placement(settings.tier),
            },
        }  # fmt: skip

    def model_ready(name: str) -> JSONResponse:
        model = plane.model(name)
        here = all((model.name, i) in plane.sessions for i in model.stages_on(settings.tier))
        is_ready = plane.ready and here
        return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)

    async def infer(request: Request, name: str) -> Response:
        body = await _read_body(request, settings.max_body_bytes)
        received_ns = time.perf_counter_ns()
        header_length = codec.parse_header_length(request.headers.get(codec.HEADER_LENGTH_HTTP_HEADER))
        decoded = codec.decode_request(body, header_length)
        answer = await plane.infer(name, decoded, received_ns=received_ns, bytes_in=len(body))
        encoded = codec.encode_response(
            answer.model_name, answer.outputs, binary=[decoded.wants_binary(n) for n in answer.outputs],
            parameters=answer.parameters, request_id=answer.id, model_version=answer.model_version,
        )  # fmt: skip
        return Response(encoded.body(), headers=encoded.http_headers())

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"])
        app.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"])
        app.add_api_route(f"{prefix}/infer", infer, methods=["POST"])

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = plane.telemetry.render()
        return Response(body, media_type=content_type)

    @app.get("/tierlab/status")
    async def status() -> dict[str, Any]:
        return tier.status()

    return app

