"""The HTTP adapter: Open Inference Protocol (V2) REST routes over the tier's data plane.

``build_tier`` realises a :class:`TierSettings` (reads the deployment, verifies manifests, reads cgroup
limits, shapes links); ``create_app`` wraps the resulting :class:`Tier` in FastAPI. The routes only
adapt: read the body within the size cap, decode, call the data plane, encode. One handler renders
every :class:`~services.contracts.errors.TierlabError` as ``{"error": …}`` with its status.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``…/ready``, ``POST …/infer`` (served straight from ASGI, see ``TierApp``), ``GET /metrics``
(Prometheus), and tierlab's own: ``GET /tierlab/status``, ``PUT /tierlab/links`` (re-shape links
between runs), ``POST /tierlab/probe`` (measure a link) and ``POST /tierlab/sink`` (what probes send to).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from services.contracts import codec
from services.contracts.calibration import session_options
from services.contracts.device import CalibrationRequestSpec, DevicePacer, DeviceSpec
from services.contracts.errors import (
    ConfigError,
    MalformedBody,
    PayloadTooLarge,
    TierlabError,
    Unauthorized,
    Unavailable,
)
from services.contracts.repository import MIB, RepositoryIndexRequestSpec
from services.contracts.specs import (
    TIERS,
    DeploymentSpec,
    LinkName,
    LinkProbeSpec,
    LinkSpec,
    TierName,
    link_between,
    load_deployment,
)
from services.contracts.tier_status import (
    CgroupLimitsStatus,
    HostStatus,
    MemoryStatus,
    OnnxruntimeStatus,
    ServerStatus,
    TierStatusSpec,
)
from services.contracts.transport import read_control_token, use_control_token
from services.tier.dataplane import DataPlane, resolve_models
from services.tier.forwarder import Forwarder
from services.tier.limits import (
    CgroupLimits,
    MemoryBudget,
    host_cpu_count,
    host_facts,
    process_peak_rss_bytes,
    process_rss_bytes,
    read_cpu_throttling,
    read_limits,
    reset_peak_rss,
)
from services.tier.links import (
    CommandRunner,
    LinkState,
    LinkTarget,
    UserspaceLink,
    clear_links,
    plan_links,
    run_command,
)
from services.tier.probe import SINK_PATH, probe_link
from services.tier.server import BodyBudget, Server, ServerLimits
from services.tier.settings import TierSettings
from services.tier.telemetry import TierTelemetry, label_for

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_HEADER_LENGTH_KEY = codec.HEADER_LENGTH_HTTP_HEADER.lower()
SERVER_NAME = "tierlab"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_repository", "tierlab_pipeline")


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
    control_token: str | None = None
    host: dict[str, str | int | None] = field(default_factory=host_facts)  # the machine it runs on
    http_server: Server | None = None  # tierlab's own server, when it serves this tier (its limits follow links)
    _reshaping: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def server_limits(self) -> ServerLimits:
        """The HTTP server's limits from the settings: the body budget a share of the memory limit, and the
        minimum body rate under half the slowest link's, so a tensor an emulated link delivers at its
        configured rate is never cut off."""
        settings = self.settings
        memory = self.limits.memory_limit_bytes
        budget_bytes = (
            int(settings.body_budget_mb * MIB) if settings.body_budget_mb
            else min(DEFAULT_BODY_BUDGET_BYTES, memory // 4) if memory else DEFAULT_BODY_BUDGET_BYTES
        )  # fmt: skip
        rates = [s.spec.rate_mbit * 1e6 / 8 for s in self.links if s.spec.rate_mbit]
        return ServerLimits(
            max_connections=settings.max_connections,
            max_connections_per_peer=settings.max_connections_per_peer,
            keep_alive_s=settings.keep_alive_s,
            head_timeout_s=settings.head_timeout_s,
            body_min_rate_bytes_s=min([settings.body_min_rate_bytes_s, *(r / 2 for r in rates)]),
            body_grace_s=settings.body_grace_s,
            body_idle_s=settings.body_idle_s,
            send_timeout_s=settings.send_timeout_s,
            body_budget_bytes=budget_bytes,
        )

    def reshape(self, specs: Mapping[LinkName, LinkSpec]) -> list[LinkState]:
        """Apply new conditions to this tier's links (links not named keep theirs); no restart needed.
        One reshape at a time; the specs arrive validated (finite, bounded), and a backend that fails to
        apply them leaves the old conditions back in place."""
        with self._reshaping:
            old = {s.link: s.spec for s in self.links}
            targets = link_targets(self.settings.tier, self.deployment, {**old, **specs})
            clear_links(self.links, self.run)
            try:
                self.links = plan_links(targets, self.run)
            except Exception:
                self.links = plan_links(link_targets(self.settings.tier, self.deployment, old), self.run)
                raise
        self.dataplane.forwarder.set_links({s.peer: UserspaceLink.for_state(s) for s in self.links})
        self.dataplane.telemetry.record_links(self.links)
        if self.http_server is not None:
            self.http_server.limits = self.server_limits()  # a slower link lowers the minimum body rate
        for state in self.links:
            log.info("%s link %s now %s %s", self.settings.tier, state.link, state.backend.value, state.note)
        return self.links

    def memory_now(self) -> MemoryStatus:
        """Free memory (against the budget, the cgroup limit or the host), this process's resident set now
        and its peak since the last model load or peak reset (each starts a new peak)."""
        free_mib, of = self.dataplane.memory.free_mib()
        return MemoryStatus(
            free_mib=round(free_mib, 1),
            of=of,
            rss_mib=round(process_rss_bytes() / MIB, 1),
            peak_rss_mib=round(process_peak_rss_bytes() / MIB, 1),
        )

    def status(self) -> TierStatusSpec:
        """This tier now (``GET /tierlab/status``; ``services.contracts.tier_status`` is its reader)."""
        plane = self.dataplane
        limits = read_limits()  # now: a runtime may squeeze a running tier (onnxruntime keeps its start threads)
        return TierStatusSpec(
            tier=self.settings.tier,
            ready=plane.ready,
            load_error=plane.load_error,
            limits=CgroupLimitsStatus(
                cgroup=limits.version,
                cpu_quota_cores=limits.cpu_quota_cores,
                cpuset_cpu_count=limits.cpuset_cpu_count,
                memory_limit_bytes=limits.memory_limit_bytes,
                cpu_cores=self.cpu_cores,
            ),
            device=plane.device,
            device_model=plane.pacer.model,
            compute_slots=plane.compute_slots,
            host=HostStatus.model_validate(self.host),
            cpu_throttling=read_cpu_throttling(),
            onnxruntime=OnnxruntimeStatus(intra_op_threads=self.intra_op_threads, allow_spinning=self.allow_spinning),
            links=[state.describe() for state in self.links],
            memory=self.memory_now(),
            server=self.server_now(),
            models={entry.name: entry for entry in plane.index()},
        )

    def server_now(self) -> ServerStatus:
        """The HTTP server's limits and, under tierlab's own server, what it holds now: connections, the
        body budget's use and its peak."""
        server = self.http_server
        limits = server.limits if server is not None else self.server_limits()
        budget = server.budget if server is not None else None
        return ServerStatus(
            http_server=self.settings.http_server,
            max_connections=limits.max_connections,
            max_connections_per_peer=limits.max_connections_per_peer,
            body_budget_bytes=limits.body_budget_bytes,
            body_min_rate_bytes_s=limits.body_min_rate_bytes_s,
            memory_bound_bytes=limits.memory_bound_bytes,
            connections=len(server.connections) if server is not None and budget is not None else None,
            budget_held_bytes=budget.held_bytes if budget is not None else None,
            budget_peak_bytes=budget.peak_bytes if budget is not None else None,
            budget_refusals=budget.refused if budget is not None else None,
        )


def link_targets(tier: TierName, deployment: DeploymentSpec, specs: Mapping[LinkName, LinkSpec]) -> list[LinkTarget]:
    """This tier's links towards each peer, with the conditions ``specs`` give (unshaped if absent)."""
    return [
        LinkTarget(
            link_between(tier, peer),
            peer,
            urlsplit(deployment.tiers[peer].base_url).hostname or "",
            specs.get(link_between(tier, peer), LinkSpec()),
        )
        for peer in TIERS
        if peer != tier
    ]


def build_tier(settings: TierSettings, *, run: CommandRunner = run_command) -> Tier:
    """Read and check everything the tier needs; raises ConfigError with a clear message if it cannot."""
    tier = settings.tier
    deployment = load_deployment(settings.deployment)
    models = resolve_models(deployment, settings.deployment.resolve().parent)
    limits = read_limits()
    cores = limits.cpu_cores(host_cpu_count())
    # a device's cores are limited by the host's (and a cpuset), not by the quota, which carries its speed
    device = settings.device or DeviceSpec(cores=limits.intra_op_threads(host_cpu_count()))
    unquoted = CgroupLimits(limits.version, None, limits.cpuset_cpu_count, limits.memory_limit_bytes)
    threads = settings.intra_op_threads or device.threads(unquoted.cpu_cores(host_cpu_count()))
    try:
        pacer = DevicePacer(device, deployment.devices.get(device.model) if device.model else None)
    except ValueError as exc:
        raise ConfigError(f"{tier}: {exc} (make up fits the profile's devices into it)") from None
    if device.model:
        log.info("%s is a %s with %d core(s), paced by kernel class", tier, device.model, device.cores)
    elif device.is_paced:
        log.info("%s computes at speed %g of a host core, %d core(s)", tier, device.speed, device.cores)
    spinning = settings.allow_spinning if settings.allow_spinning is not None else limits.cpu_quota_cores is None

    configured = {**deployment.links, **(settings.links or {})} if settings.shape_links else {}
    states = plan_links(link_targets(tier, deployment, configured), run, settings.peer_resolve_s)
    for state in states:
        if state.spec.is_shaped:
            log.info("%s link %s: %s %s", tier, state.link, state.backend.value, state.note)

    forwarder = Forwarder(
        tier,
        {t: e.base_url for t, e in deployment.tiers.items()},
        {s.peer: UserspaceLink.for_state(s) for s in states},
        timeout_s=settings.forward_timeout_s,
    )
    telemetry = TierTelemetry(tier)
    telemetry.record_limits(limits, cores, threads, device)
    telemetry.record_links(states)
    plane = DataPlane(
        tier,
        models,
        forwarder,
        telemetry,
        compute_slots=settings.compute_slots or device.compute_slots(),
        max_queue=settings.max_queue,
        device=device,
        pacer=pacer,
        threads=threads,
        memory=MemoryBudget(
            int(settings.memory_budget_mb * MIB) if settings.memory_budget_mb else None,
            lambda: read_limits().memory_limit_bytes,
        ),
    )
    unknown = [n for n in settings.startup if n not in models] if isinstance(settings.startup, tuple) else []
    if unknown:
        raise ConfigError(f"startup model(s) {unknown} are not in the deployment; it has {sorted(models)}")
    token = read_control_token(settings.control_token_file) if settings.control_token_file else None
    use_control_token(token)  # this tier's own control calls (probes into a peer's sink) carry it
    return Tier(settings, deployment, plane, states, limits, cores, threads, spinning, run, token)


def error_reply(exc: TierlabError, model: str | None, plane: DataPlane) -> tuple[int, dict[str, str], bytes]:
    """The one rendering of an error: status, headers and the V2 ``{"error": …}`` body; counted."""
    plane.telemetry.record_error(label_for(model, plane.models), exc.status_code)
    if exc.status_code >= 500:
        log.warning("%s: %d %s", model or "-", exc.status_code, exc.message)
    return (
        exc.status_code,
        {"Content-Type": codec.JSON_CONTENT_TYPE, **exc.headers()},
        orjson.dumps(exc.to_json()),
    )


def unexpected_error(exc: Exception, model: str | None, plane: DataPlane) -> tuple[int, dict[str, str], bytes]:
    log.error("unexpected error serving %s", model or "-", exc_info=exc)
    wrapped = TierlabError(f"internal error in {plane.tier}: {type(exc).__name__}: {exc}")
    return error_reply(wrapped, model, plane)


CONTROL_BODY_CAP_BYTES = 64 * 1024  # link specs, probe and load requests are a few hundred bytes
OFF_LOOP_DECODE_BYTES = 256 * 1024  # JSON, or BYTES elements, beyond this are decoded on a worker thread
DEFAULT_BODY_BUDGET_BYTES = 256 * MIB

_INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/[^/]+)?/infer$")


class _Disconnected(Exception):
    """The client went away before sending its whole body."""


class TierApp:
    """The ASGI app: ``POST …/infer`` is served straight from ASGI (the hot path, measured in
    ``benchmarks/overhead.py``); everything else — metadata, health, metrics, lifespan — is FastAPI."""

    def __init__(self, tier: Tier, fastapi: FastAPI) -> None:
        self.tier = tier
        self.fastapi = fastapi
        self.plane = tier.dataplane
        self.cap_bytes = tier.settings.max_body_bytes
        self.max_json_bytes = tier.settings.max_json_bytes
        self.server_limits = tier.server_limits()
        # request bodies and their decoding: shared with tierlab's server, which charges the bodies
        self.budget = BodyBudget(self.server_limits.body_budget_bytes, self.server_limits.body_budget_peer_share)
        self.control_token = tier.control_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            infer = _INFER_PATH.match(scope["path"])
            if infer is not None and scope["method"] == "POST":
                await self._infer(infer["name"], scope, receive, send)
                return
            if infer is None and not self._authorized(scope):
                refused = Unauthorized("this route needs the stack's control token (Authorization: Bearer …)")
                await self._reply(send, *error_reply(refused, None, self.plane))
                return
            if scope["path"] != SINK_PATH:
                # control routes take small JSON bodies: read here, capped and in time, then handed to FastAPI
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                try:
                    body = await self._read_body(headers.get("content-length"), receive, CONTROL_BODY_CAP_BYTES)
                except _Disconnected:
                    return
                except TierlabError as exc:
                    await self._reply(send, *error_reply(exc, None, self.plane))
                    return
                receive = _replay(body, receive)
        await self.fastapi(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        """Every POST/PUT but inference (links, probes, loads, calibration) needs the token, when there is one."""
        if self.control_token is None:
            return True
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.control_token}".encode())

    @staticmethod
    async def _reply(send: Send, status: int, headers: Mapping[str, str], body: bytes) -> None:
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.plane.admit(name)  # not ready, no such model, no room: said before a byte of the body is read
            header_length = codec.parse_header_length(headers.get(_HEADER_LENGTH_KEY))
            declared = headers.get("content-length")
            if header_length is not None or (declared or "").isdigit():
                self._check_json_size(header_length if header_length is not None else int(declared or 0))
            body = await self._read_body(declared, receive, self.cap_bytes)
            received_ns = time.perf_counter_ns()
            json_bytes = len(body) if header_length is None else header_length
            self._check_json_size(json_bytes)  # (a chunked body declares no length)
            decoded = await self._decode(body, header_length, json_bytes, scope)
            answer = await self._unless_gone(
                self.plane.infer(name, decoded, received_ns=received_ns, bytes_in=len(body)), receive
            )
            encoded = codec.encode_response(
                answer.model_name,
                answer.outputs,
                binary=[decoded.wants_binary(n) for n in answer.outputs],
                parameters=answer.parameters,
                request_id=answer.id,
                model_version=answer.model_version,
            )
            status, reply_headers, reply = 200, encoded.http_headers(), encoded.body()
        except _Disconnected:
            return
        except TierlabError as exc:
            status, reply_headers, reply = error_reply(exc, name, self.plane)
        except Exception as exc:
            status, reply_headers, reply = unexpected_error(exc, name, self.plane)
        await self._reply(send, status, reply_headers, reply)

    @staticmethod
    async def _unless_gone(work: Coroutine[Any, Any, _T], receive: Receive) -> _T:
        """``work``'s result, unless the caller disconnects first: then the work is cancelled (a forward in
        flight closes its connection, so the next tier cancels too) and _Disconnected is raised. The work
        runs in this task, and one waiter on ``receive`` cancels it (a task for each and ``asyncio.wait``
        cost the event loop 15 % of a request's Python time, measured with cProfile)."""
        handler = asyncio.current_task()
        assert handler is not None
        gone = asyncio.ensure_future(receive())  # after the body, the only message left is http.disconnect
        disconnected, working = False, True

        def on_gone(waiter: asyncio.Future[Message]) -> None:
            nonlocal disconnected
            # (a callback already scheduled when the work ended must not cancel what the handler does next)
            if working and not waiter.cancelled() and waiter.exception() is None:
                disconnected = True
                handler.cancel()

        gone.add_done_callback(on_gone)
        try:
            return await work
        except asyncio.CancelledError:
            if disconnected and handler.uncancel() == 0:
                raise _Disconnected from None
            raise
        finally:
            working = False
            gone.remove_done_callback(on_gone)
            gone.cancel()

    def _check_json_size(self, json_bytes: int) -> None:
        if json_bytes > self.max_json_bytes:
            raise PayloadTooLarge(
                f"a JSON document of {json_bytes} bytes exceeds this tier's cap of {self.max_json_bytes} bytes "
                f"(JSON tensors decode at up to {codec.JSON_DECODE_PEAK_FACTOR}× their size): send the tensors as "
                f"binary data (the V2 binary extension, header {_HEADER_LENGTH_KEY}), as tierlab's own hops do"
            )

    async def _decode(
        self, body: bytes, header_length: int | None, json_bytes: int, scope: Scope
    ) -> codec.InferRequest:
        """The request decoded, its JSON's decoding charged to the body budget while it runs (503 when the
        budget has no room); a big document, or many BYTES elements, on a worker thread."""
        charge = codec.JSON_DECODE_PEAK_FACTOR * json_bytes
        peer = str((scope.get("client") or ("-",))[0])
        if not self.budget.try_charge(peer, charge):
            raise Unavailable(self.budget.refusal(charge))
        try:
            # parsing a big JSON document, or splitting many BYTES elements, would freeze every other request
            many_elements = len(body) > OFF_LOOP_DECODE_BYTES and b'"BYTES"' in body[: header_length or 0]
            if json_bytes > OFF_LOOP_DECODE_BYTES or many_elements:
                return await asyncio.to_thread(codec.decode_request, body, header_length)
            return codec.decode_request(body, header_length)
        finally:
            self.budget.release(peer, charge)

    @staticmethod
    async def _read_body(declared: str | None, receive: Receive, cap_bytes: int) -> bytes:
        if declared is not None:
            try:
                declared_bytes = int(declared)
            except ValueError:
                raise MalformedBody(f"Content-Length must be an integer, got {declared!r}") from None
            if declared_bytes > cap_bytes:
                raise PayloadTooLarge(
                    f"request body of {declared_bytes} bytes exceeds this route's cap of {cap_bytes} bytes"
                )
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap_bytes:
                raise PayloadTooLarge(f"request body exceeds this route's cap of {cap_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) once, then waits on the real one (for a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


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
