"""The tier's routes: Open Inference Protocol (V2) REST over the data plane, and tierlab's own.

``create_app`` wraps a built :class:`~services.tier.app.Tier` in FastAPI behind the raw ASGI infer path
(``services.tier.infer.TierApp``). The routes only adapt: read, call the data plane, answer; one handler
renders every :class:`~services.contracts.errors.TierlabError` as ``{"error": …}`` with its status.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``…/ready``, ``POST …/infer``, ``GET /metrics`` (Prometheus), the model repository extension
(``POST /v2/repository/index``, ``…/models/{name}/load|unload``) and tierlab's own: ``GET /tierlab/status``,
``POST /tierlab/memory/reset-peak``, ``PUT /tierlab/links`` (re-shape links between runs),
``POST /tierlab/probe`` (measure a link), ``POST /tierlab/sink`` (what probes send to) and the speed
calibration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.contracts.calibration import session_options
from services.contracts.device import CalibrationRequestSpec
from services.contracts.errors import (
    TierlabError,
)
from services.contracts.repository import RepositoryIndexRequestSpec
from services.contracts.specs import (
    LinkName,
    LinkProbeSpec,
    LinkSpec,
)
from services.tier.app import Tier
from services.tier.infer import EXTENSIONS, SERVER_NAME, SERVER_VERSION, TierApp, error_reply, unexpected_error
from services.tier.limits import (
    read_cpu_throttling,
    reset_peak_rss,
)
from services.tier.links import (
    clear_links,
)
from services.tier.probe import SINK_PATH, probe_link

log = logging.getLogger(__name__)


def create_app(tier: Tier) -> TierApp:
    plane = tier.dataplane
    settings = tier.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await plane.forwarder.start()
        options = session_options(tier.intra_op_threads, allow_spinning=tier.allow_spinning)
        loading = asyncio.create_task(asyncio.to_thread(plane.load, options, settings.warmup_runs, settings.startup))
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
    async def _tierlab_error(request: Request, exc: TierlabError) -> Response:
        status, headers, body = error_reply(exc, request.path_params.get("name"), plane)
        return Response(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # the reasons without the values: an inf or NaN that was refused cannot be echoed as JSON
        reasons = [f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(reasons)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        status, headers, body = unexpected_error(exc, request.path_params.get("name"), plane)
        return Response(body, status_code=status, headers=headers)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True, "tier": settings.tier}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        body: dict[str, Any] = {
            "ready": plane.ready,
            "tier": settings.tier,
            "links": [s.describe().model_dump(mode="json") for s in tier.links],
        }
        if plane.load_error:
            body["error"] = plane.load_error
        return JSONResponse(body, status_code=200 if plane.ready else 503)

    def model_metadata(name: str) -> dict[str, Any]:
        model = plane.model(name)
        spec = model.manifest

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return {
            "name": spec.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": tensors(spec.inputs),
            "outputs": tensors(spec.outputs),
            "parameters": {
                "subject": spec.subject,
                "operator": spec.operator,
                "stages": len(spec.stages),
                "placements": ",".join(model.placements),
                "default_placement": model.default_placement(settings.tier),
            },
        }

    def model_ready(name: str) -> JSONResponse:
        model = plane.model(name)
        here = all((model.name, i) in plane.sessions for i in model.stages_on(settings.tier))
        is_ready = plane.ready and here
        return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"])
        app.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"])

    @app.get("/metrics")
    async def metrics() -> Response:
        plane.telemetry.record_throttling(read_cpu_throttling())
        body, content_type = plane.telemetry.render()
        return Response(body, media_type=content_type)

    _add_repository_routes(app, tier)
    _add_control_routes(app, tier)
    return TierApp(tier, app)


def _add_repository_routes(app: FastAPI, tier: Tier) -> None:
    """The Open Inference Protocol model-repository extension: index, load, unload."""
    plane = tier.dataplane
    settings = tier.settings

    @app.post("/v2/repository/index")
    async def repository_index(spec: RepositoryIndexRequestSpec | None = None) -> list[dict[str, Any]]:
        """Every model this tier can serve, its state and what loading it cost here (model-repository extension)."""
        ready_only = spec.ready if spec is not None else False
        return [entry.model_dump(mode="json") for entry in plane.index(ready_only=ready_only)]

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str) -> dict[str, Any]:
        """Load the model's stages on this tier (200 when READY; 507 when it does not fit, with the numbers)."""
        options = session_options(tier.intra_op_threads, allow_spinning=tier.allow_spinning)
        entry = await asyncio.to_thread(plane.load_model, name, options, settings.warmup_runs)
        return entry.model_dump(mode="json")

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str) -> dict[str, Any]:
        """Drop the model's sessions on this tier and give their memory back."""
        entry = await asyncio.to_thread(plane.unload_model, name)
        return entry.model_dump(mode="json")


def _add_control_routes(app: FastAPI, tier: Tier) -> None:
    """tierlab's own routes beside the V2 ones: status, re-shaping, link probes, speed calibration."""
    plane = tier.dataplane
    settings = tier.settings

    @app.get("/tierlab/status")
    async def status() -> dict[str, Any]:
        return tier.status().model_dump(mode="json")

    @app.post("/tierlab/memory/reset-peak")
    async def reset_peak() -> dict[str, Any]:
        """Start a new resident-memory peak here (the loadgen does, before each run: a peak per run)."""
        return {"reset": reset_peak_rss(), **tier.memory_now().model_dump(mode="json")}

    @app.put("/tierlab/links")
    async def reshape(specs: dict[LinkName, LinkSpec]) -> dict[str, Any]:
        """Re-shape links between runs of a sweep; the body maps link names to conditions."""
        states = await asyncio.to_thread(tier.reshape, specs)
        return {"tier": settings.tier, "links": [s.describe().model_dump(mode="json") for s in states]}

    @app.post(SINK_PATH)
    async def sink(request: Request) -> dict[str, int]:
        """Where link probes send their bulk transfers: reads the body, answers its size."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    @app.post("/tierlab/calibrate")
    async def calibrate(spec: CalibrationRequestSpec) -> dict[str, Any]:
        """Time the calibration model single-stream here, paced like every stage (speed fidelity)."""
        measured = await plane.calibrate(spec.runs, allow_spinning=tier.allow_spinning)
        return measured.model_dump(mode="json")

    @app.post("/tierlab/probe")
    async def probe(spec: LinkProbeSpec) -> dict[str, Any]:
        """Measure this tier's link towards ``spec.peer`` through the path forwarded tensors take."""
        measured = await probe_link(plane.forwarder, tier.links, spec)
        return measured.model_dump(mode="json")
