"""A null tier: an ASGI app that reads the request body and answers ``{}`` at once.

Serving it with the tiers' own uvicorn settings gives the floor any Python HTTP hop pays on this
machine, so the benchmarks can print the testbed's cost next to it (and the loadgen's own overhead
can be measured against it).
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

_REPLY = b"{}"
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_REPLY)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _REPLY})
