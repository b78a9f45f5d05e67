"""tierlab's HTTP/1.1 server against real sockets: bodies whole and in pieces, keep-alive and pipelining,
chunked bodies, ``Expect: 100-continue``, refusals before the body, malformed heads, disconnects, streamed
responses, lifespan, and a graceful stop that lets the request in flight finish."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import uvloop

from services.tier import server as server_module
from services.tier.server import Server

Scope = MutableMapping[str, Any]


async def read_body(receive: Any, pieces: list[int] | None = None) -> bytearray | None:
    """An ASGI request's whole body (each piece's size noted in ``pieces``), or None if the client left."""
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if pieces is not None:
            pieces.append(len(message["body"]))
        body += message["body"]
        more = message.get("more_body", False)
    return body


class Recorder:
    """An ASGI app that answers each request with what it received, and notes what it saw."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.pieces: list[int] = []
        self.disconnected = threading.Event()
        self.started_up = False
        self.finished: list[str] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.started_up = True
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/refuse":  # answers before reading a byte of the body
            await self._answer(send, 413, b"too large")
            return
        if path == "/fail":
            raise RuntimeError("the app broke")
        if path == "/big":  # more than any socket buffer holds: a client that reads nothing blocks the send
            await self._answer(send, 200, bytes(8 << 20))
            return
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = await read_body(receive, self.pieces)
        if body is None:
            return
        self.bodies.append(bytes(body))
        if path == "/medium":  # more than a few answers' worth of a pipelining client's socket buffers
            await self._answer(send, 200, bytes(100_000))
            return
        if path == "/slow":
            await asyncio.sleep(0.5)
            self.finished.append(path)
        if path == "/wait-for-disconnect":
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
            return
        await self._answer(send, 200, f"{scope['method']} {path} {len(body)}".encode())

    @staticmethod
    async def _answer(send: Any, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Running:
    def __init__(self, app: Recorder, server: Server, thread: threading.Thread) -> None:
        self.app, self.server, self.thread = app, server, thread
        self.connections: list[http.client.HTTPConnection] = []

    @property
    def port(self) -> int:
        assert self.server.address is not None
        return self.server.address[1]

    def connection(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.connections.append(connection)  # closed at stop
        return connection

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        for connection in self.connections:
            connection.close()
        self.server.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(10)


def start(app: Recorder, **options: Any) -> Running:
    server = Server(app, host="127.0.0.1", port=0, **options)
    thread = threading.Thread(target=lambda: uvloop.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while server.address is None:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return Running(app, server, thread)


@pytest.fixture
def running() -> Iterator[Running]:
    served = start(Recorder())
    yield served
    served.stop()
    for stream in _streams.values():
        stream.close()
    _streams.clear()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """The next response (head, body) on a raw socket; the body by Content-Length (to EOF without one).
    Bytes past it stay buffered for the next call (pipelined responses can arrive in one segment)."""
    if sock not in _streams:
        _streams[sock] = sock.makefile("rb")
    stream = _streams[sock]
    lines = []
    while (line := stream.readline()) not in (b"\r\n", b""):
        lines.append(line.rstrip(b"\r\n"))
    head = b"\r\n".join(lines)
    length = next((int(v.split(b":")[1]) for v in lines if v.lower().startswith(b"content-length")), None)
    return head, stream.read() if length is None else stream.read(length)


_streams: dict[socket.socket, Any] = {}  # emptied after each test


def test_a_large_body_arrives_whole_and_the_connection_is_kept(running: Running) -> None:
    body = os.urandom(3 << 20)
    connection = running.connection()
    for _ in range(2):
        connection.request("POST", "/echo?x=1", body=body)
        reply = connection.getresponse()
        assert (reply.status, reply.read()) == (200, f"POST /echo {len(body)}".encode())
    assert running.app.bodies == [body, body]
    assert running.app.started_up


def test_a_body_beyond_the_piece_size_arrives_in_pieces(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "BODY_PIECE_BYTES", 1 << 20)
    body = os.urandom((2 << 20) + 5)
    connection = running.connection()
    connection.request("POST", "/echo", body=body)
    assert connection.getresponse().read() == f"POST /echo {len(body)}".encode()
    assert running.app.pieces == [1 << 20, 1 << 20, 5]
    assert running.app.bodies == [body]


def test_pipelined_requests_are_answered_in_order(running: Running) -> None:
    with running.raw() as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock)[1] == b"POST /a 3"
        assert read_response(sock)[1] == b"GET /b 0"


def test_a_chunked_body_is_read_and_the_connection_closes_after(running: Running) -> None:
    with running.raw() as sock:
        sock.sendall(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )
        head, body = read_response(sock)
        assert body == b"POST /c 7"
        assert b"connection: close" in head.lower()
        assert sock.recv(10) == b""
    assert running.app.bodies == [b"abcdefg"]


def test_expect_continue_gets_100_before_the_body_is_sent(running: Running) -> None:
    with running.raw() as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        assert read_response(sock)[1] == b"POST /e 5"


def test_a_refusal_before_the_body_closes_the_connection(running: Running) -> None:
    with running.raw() as sock:
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\npartial")
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 413") and body == b"too large"
        assert b"connection: close" in head.lower()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * (70 * 1024), 431),
    ],
)
def test_heads_it_cannot_take_get_a_clear_status(running: Running, raw: bytes, status: int) -> None:
    with running.raw() as sock:
        sock.sendall(raw)
        head, _ = read_response(sock)
        assert head.startswith(f"HTTP/1.1 {status}".encode())
    connection = running.connection()  # and it goes on serving
    connection.request("GET", "/after")
    assert connection.getresponse().status == 200


def test_an_app_error_is_a_500_and_nothing_else_breaks(running: Running) -> None:
    connection = running.connection()
    connection.request("GET", "/fail")
    assert connection.getresponse().status == 500
    connection = running.connection()
    connection.request("HEAD", "/after")
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read() == b""


def test_a_streamed_response_is_chunked(running: Running) -> None:
    connection = running.connection()
    connection.request("GET", "/stream")
    reply = connection.getresponse()
    assert reply.getheader("transfer-encoding") == "chunked"
    assert reply.read() == b"one,two,three"


def test_a_client_that_goes_away_is_seen_as_a_disconnect(running: Running) -> None:
    with running.raw() as sock:
        sock.sendall(b"POST /wait-for-disconnect HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.2)
    assert running.app.disconnected.wait(5)


def test_a_stop_lets_the_request_in_flight_finish() -> None:
    served = start(Recorder(), graceful_s=5.0)
    replies: list[int] = []

    def slow() -> None:
        connection = served.connection()
        connection.request("POST", "/slow", body=b"x")
        replies.append(connection.getresponse().status)

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.2)
    served.stop()
    client.join(10)
    assert replies == [200] and served.app.finished == ["/slow"]


def test_a_failed_startup_stops_the_server_with_its_reason() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no models"})

    with pytest.raises(RuntimeError, match="no models"):
        uvloop.run(Server(app, host="127.0.0.1", port=0).serve())
