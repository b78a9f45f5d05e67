"""The framing fuzz ring: raw requests generated from a grammar of HTTP/1.1 messages (methods, targets,
versions, Host, Content-Length, Transfer-Encoding, Connection, Expect, chunk extensions and trailers, one to
three pipelined), then mutated byte-wise, are sent through tierlab's HTTP server and read by h11, the
reference parser, as the oracle.

Each case: the bytes on one connection, then the client's half-close. The server's echo app answers each
request it reads with its method, target and body digest in headers. The server may be *stricter* than h11
(refuse a request h11 takes, with a 4xx, or close after a chunked body or ``Connection: close``), but it
must never read a request h11 does not read at that place, nor read one with other bounds (another body):
that is the disagreement a request-smuggling attack lives in. A traceback in the server's log, a response
stream that does not parse, or a connection left hanging fails the case too."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tier.server import Server, ServerLimits
from tests.integration.test_server import read_body

CASES = 10_000
ABSOLUTE_FORM = re.compile(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*/?(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Seen:
    """One request as a parser framed it."""

    method: bytes
    target: bytes
    body_sha: str


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


async def echo(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with what it read, in headers, and an empty body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    if body is None:
        return
    target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    headers = [
        (b"x-method", scope["method"].encode()),
        (b"x-target", target.hex().encode()),
        (b"x-body", _digest(bytes(body)).encode()),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


class Errors(logging.Handler):
    """The server's ERROR records (a traceback is one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Errors]]:
    limits = ServerLimits(head_timeout_s=2.0, keep_alive_s=2.0, body_idle_s=2.0, linger_s=0.5)
    served = Server(echo, host="127.0.0.1", port=0, limits=limits)
    thread = threading.Thread(target=lambda: uvloop.run(served.serve()), daemon=True)
    errors = Errors()
    logging.getLogger("tierlab.server").addHandler(errors)
    thread.start()
    deadline = time.monotonic() + 10
    while served.address is None:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield served.address[1], errors
    logging.getLogger("tierlab.server").removeHandler(errors)
    served.loop.call_soon_threadsafe(served.stop)
    thread.join(10)


# ------------------------------------------------------------------------------------------ the oracle


def h11_reads(raw: bytes) -> list[tuple[Seen, h11.Request]]:
    """The requests h11 frames in ``raw`` followed by the client's half-close, in order, until it stops."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    connection.receive_data(b"")
    found: list[tuple[Seen, h11.Request]] = []
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            return found
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return found
        if isinstance(event, h11.Request):
            request, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            # the absolute form (scheme://authority/path) reaches an ASGI app as its path and query
            absolute = ABSOLUTE_FORM.match(request.target)
            target = b"/" + absolute[1] if absolute else request.target
            found.append((Seen(request.method, target, _digest(bytes(body))), request))
            if connection.their_state not in (h11.DONE, h11.MUST_CLOSE):
                return found  # CONNECT or Upgrade: what follows is another protocol's
            connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return found  # one of them must close
            connection.start_next_cycle()


def server_reads(port: int, raw: bytes) -> tuple[list[Seen], int | None]:
    """What the server answered to ``raw`` and a half-close: the requests its app read, in order, and the
    status of the refusal that ended them (None: it closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    client = h11.Connection(h11.CLIENT)
    seen: list[Seen] = []
    client.receive_data(bytes(received))
    client.receive_data(b"")
    while True:
        # h11 as a client needs a request to read each response against; the method does not matter (no HEAD)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
        response: h11.Response | None = None
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                if client.trailing_data[0]:
                    raise  # bytes that do not parse as a response: the case fails
                return seen, None  # the server closed without answering this one
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.NEED_DATA:
                break
        if response is None:
            return seen, None
        if response.status_code != 200:
            return seen, response.status_code
        headers = dict(response.headers)
        seen.append(
            Seen(headers[b"x-method"], bytes.fromhex(headers[b"x-target"].decode()), headers[b"x-body"].decode())
        )
        if client.their_state is not h11.DONE:
            return seen, None
        client.start_next_cycle()


# ------------------------------------------------------------------------------------------ the grammar

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
TARGETS = [b"/", b"/v2/models/m/infer", b"/a?b=c&d", b"/%41%20", b"http://tier/x", b"/a/../b"]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"0", b"1", b"f", b"-", b",", b";", b"chunked",
          b"Content-Length: ", b"Transfer-Encoding: ", b"\r\n\r\n", b"HTTP/1.1", b"0\r\n\r\n", b"\xff"]  # fmt: skip


@st.composite
def message(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    headers: list[bytes] = []
    if draw(st.integers(0, 9)):
        headers.append(b"Host: tier")
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "both", "length-twice"]))
    if framing in ("length", "both"):
        headers.append(b"Content-Length: %d" % len(body))
    if framing == "length-twice":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % draw(st.integers(0, 50))]
    if framing in ("chunked", "both"):
        headers.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked"])))
    if draw(st.booleans()):
        headers.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive", b"Close"])))
    if draw(st.integers(0, 5)) == 0:
        headers.append(b"Expect: 100-continue")
    if draw(st.integers(0, 3)) == 0:
        headers.append(b"X-Note: " + draw(st.binary(max_size=8)))
    if framing in ("chunked", "both"):
        pieces, rest = [], body
        while rest:
            size = draw(st.integers(1, max(1, len(rest))))
            extension = draw(st.sampled_from([b"", b"", b";a=b", b" ;x"]))
            pieces.append(b"%x%s\r\n%s\r\n" % (size, extension, rest[:size]))
            rest = rest[size:]
        trailer = draw(st.sampled_from([b"", b"", b"T: v\r\n"]))
        payload = b"".join(pieces) + b"0\r\n" + trailer + b"\r\n"
    else:
        payload = body if framing != "none" else b""
    target = draw(st.sampled_from(TARGETS))
    return (
        method + b" " + target + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + payload
    )


@st.composite
def case(draw: st.DrawFn) -> bytes:
    raw = bytearray(b"".join(draw(st.lists(message(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        match draw(st.sampled_from(["insert", "delete", "replace", "lf"])):
            case "insert":
                raw[at:at] = draw(st.sampled_from(TOKENS))
            case "delete":
                del raw[at : at + draw(st.integers(1, 4))]
            case "replace" if at < len(raw):
                raw[at] = draw(st.integers(0, 255))
            case "lf":
                found = raw.find(b"\r\n", at)
                if found >= 0:
                    del raw[found]
    return bytes(raw)


def check(port: int, errors: Errors, raw: bytes) -> None:
    expected = h11_reads(raw)
    read, refusal = server_reads(port, raw)
    oracle = [seen for seen, _ in expected]
    assert read == oracle[: len(read)], f"the server framed {raw!r} as {read}, h11 as {oracle}"
    if len(read) < len(oracle) and refusal is None:
        # it stopped early without a refusal: only where it closes on purpose (after a chunked body, or
        # Connection: close, which h11 would then not have gone past either)
        last = expected[len(read) - 1][1] if read else None
        chunked = last is not None and any(k == b"transfer-encoding" for k, _ in last.headers)
        assert chunked, f"the server stopped after {read} on {raw!r} without saying why; h11 read {oracle}"
    assert not errors.records, [errors.format(r) for r in errors.records]


@settings(
    max_examples=CASES,
    deadline=None,
    derandomize=os.environ.get("TIERLAB_FUZZ_RANDOM") is None,
    suppress_health_check=list(HealthCheck),
)
@given(raw=case())
def test_the_server_frames_requests_as_h11_does_or_refuses_them(server: tuple[int, Errors], raw: bytes) -> None:
    check(*server, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\nGET /after HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"CONNECT t:443 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
    ],
    ids=[
        "connection-close",
        "http-1.0",
        "transfer-coding",
        "no-host",
        "pipelined",
        "upgrade-after-chunked",
        "truncated-chunked",
    ],
)
def test_known_framing_cases(server: tuple[int, Errors], raw: bytes) -> None:
    check(*server, raw)
