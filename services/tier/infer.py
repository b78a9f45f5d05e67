"""The tier's inference path, served straight from ASGI: ``POST /v2/models/{name}/infer`` read within its
caps, decoded, run on the data plane and encoded without FastAPI in the way (``TierApp``); every other
route goes to the FastAPI app behind it (``services.tier.routes``). ``error_reply`` is the one rendering of
a :class:`~services.contracts.errors.TierlabError` as the V2 ``{"error": …}`` body with its status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from services.contracts import codec
from services.contracts.errors import (
    MalformedBody,
    PayloadTooLarge,
    TierlabError,
    Unauthorized,
    Unavailable,
)
from services.tier.app import Tier
from services.tier.dataplane import DataPlane
from services.tier.probe import SINK_PATH
from services.tier.server import BodyBudget
from services.tier.telemetry import label_for

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_HEADER_LENGTH_KEY = codec.HEADER_LENGTH_HTTP_HEADER.lower()
SERVER_NAME = "tierlab"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_repository", "tierlab_pipeline")


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
