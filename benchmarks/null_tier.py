"""A null tier: an ASGI app that reads the request body and answers ``{}`` at once.

Served by the tiers' own server (``python -m benchmarks.null_tier --port N``) or by uvicorn with the settings
the tiers used before (``--server uvicorn``), it gives the floor any Python HTTP hop pays on this machine, so
the benchmarks can print the testbed's cost next to it (and the loadgen's own overhead can be measured
against it).
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Receive, Scope, Send

from services.tier import server

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=("tierlab", "uvicorn"), default="tierlab")
    args = parser.parse_args()
    if args.server == "uvicorn":
        uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", access_log=False,
                    log_level="warning")  # fmt: skip
    else:
        server.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
