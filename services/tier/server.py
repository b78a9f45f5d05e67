"""tierlab's HTTP/1.1 server: a lean ASGI server on asyncio that receives each request body straight into one
buffer sized by its Content-Length.

Why tierlab has its own: a hop carries tensors of up to megabytes, and the server's body path was most of the
hop tax. One round trip of a 1 MiB body to a null ASGI app (``make bench-overhead``, client in another process,
p50 on this machine): a bare socket 0.28–0.33 ms, this server 0.41 ms, granian 2.8.7 0.89 ms, uvicorn 0.55
(uvloop + httptools) 1.21–1.66 ms. uvicorn appends each piece the parser hands it to one ``bytes`` and pauses
reading every 64 KiB until the app has taken it; an ``asyncio.Protocol`` that only collects ``data_received``
pieces and joins them still took 1.2–1.4 ms. Here an ``asyncio.BufferedProtocol`` hands the event loop the
request's own ``bytearray`` to read into: the kernel's copy is the only one, and the app gets that buffer.

What it does: ASGI 3 (``http`` and ``lifespan``); HTTP/1.1 keep-alive, pipelined requests answered in order;
Content-Length bodies (in pieces of at most ``BODY_PIECE_BYTES``, each read only when the app asks for it, so
the app can refuse a body before a byte of it is read) and chunked bodies (parsed by ``httptools``; such a
connection closes after its response); ``Expect: 100-continue``; HEAD; responses of a known length, or chunked
when the app streams without one; an idle timeout (between requests, and for a head that does not arrive);
heads capped at ``MAX_HEAD_BYTES`` (431); graceful shutdown. Heads are parsed by ``httptools`` (llhttp, the
parser uvicorn uses), which rejects malformed and ambiguous framing (400). Not: TLS, HTTP/2, upgrades.

Bodies reach the app as ``bytearray`` (ASGI says ``bytes``; a bytearray is one copy fewer, and every reader
here — numpy, ``json``, Starlette's ``Request`` — takes either).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import unquote

import httptools
import uvloop

log = logging.getLogger("tierlab.server")

MAX_HEAD_BYTES = 64 * 1024
BODY_PIECE_BYTES = 16 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_UPGRADES = "protocol upgrades are not served here"
_NO_BODY_STATUSES = frozenset({204, 304})
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_ASGI = {"version": "3.0", "spec_version": "2.4"}

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class _HeadError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, formatdate(second, usegmt=True).encode("latin-1")
        return self.value


class _Exchange:
    """One request and its response: the httptools callbacks of its head (and of a chunked body), and the
    ASGI ``receive``/``send`` the app is given."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_complete = False
        self.method = ""
        self.keep_alive = True
        self.chunked = False
        self.expect_continue = False
        # body
        self.remaining = 0  # Content-Length bytes not yet handed to the app
        self.body_done = False
        self.body_given = False  # the app has had the last http.request message
        self.chunks: list[bytes] = []
        self.chunk_waiter: asyncio.Future[None] | None = None
        # response
        self.started = False
        self.head_written = False
        self.complete = False
        self.status = 200
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.streaming = False  # a chunked response
        self.head_only = False

    # ------------------------------------------------------------------ httptools callbacks
    def on_url(self, url: bytes) -> None:
        if not self.head_complete:  # (a chunked body's parser goes on into whatever was pipelined after it)
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_complete:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_complete = True

    def on_body(self, body: bytes) -> None:
        if not self.body_done:
            self.chunks.append(body)
            self._wake()

    def on_message_complete(self) -> None:
        if self.head_complete and not self.body_done:
            self.body_done = True
            self._wake()

    def _wake(self) -> None:
        if self.chunk_waiter is not None and not self.chunk_waiter.done():
            self.chunk_waiter.set_result(None)

    # ------------------------------------------------------------------ the head
    def read_head(self, parser: httptools.HttpRequestParser) -> None:
        """Framing and options from the parsed head; _HeadError for what this server does not take."""
        self.method = parser.get_method().decode("latin-1")
        self.keep_alive = parser.should_keep_alive()
        lengths = [v for k, v in self.headers if k == b"content-length"]
        encodings = b",".join(v for k, v in self.headers if k == b"transfer-encoding").lower()
        if encodings:
            if encodings.replace(b" ", b"").split(b",")[-1] != b"chunked":
                raise _HeadError(400, "a Transfer-Encoding must end with chunked")
            self.chunked, self.keep_alive = True, False  # llhttp would parse past its end: one per connection
        elif lengths:
            self.remaining = int(lengths[0])  # llhttp has rejected non-numbers and conflicting values
        self.body_done = not self.chunked and not self.remaining
        self.expect_continue = any(k == b"expect" and v.lower() == b"100-continue" for k, v in self.headers)
        self.head_only = self.method == "HEAD"

    def scope(self, server: Server, transport: asyncio.Transport) -> dict[str, Any]:
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise _HeadError(400, "invalid request target") from None
        raw_path = url.path or b"/"
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "server": tuple(transport.get_extra_info("sockname")[:2]),
            "client": tuple(transport.get_extra_info("peername")[:2]),
            "scheme": "http",
            "method": self.method,
            "root_path": "",
            "path": unquote(raw_path.decode("ascii", errors="surrogateescape")),
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "state": dict(server.state),
        }

    # ------------------------------------------------------------------ ASGI receive
    async def receive(self) -> Message:
        connection = self.connection
        if self.body_given or connection.closed:
            # shielded: an app that cancels this wait (it stopped listening) must not cancel the connection's future
            await asyncio.shield(connection.disconnected)
            return {"type": "http.disconnect"}
        if self.expect_continue:
            self.expect_continue = False
            connection.write([_CONTINUE])
        if self.chunked:
            return await self._receive_chunks()
        if self.body_done:
            self.body_given = True  # a request without a body still gets its (empty) http.request
            return {"type": "http.request", "body": b"", "more_body": False}
        piece = await connection.read_piece(min(self.remaining, BODY_PIECE_BYTES))
        if piece is None:
            return {"type": "http.disconnect"}
        self.remaining -= len(piece)
        self.body_done = not self.remaining
        self.body_given = self.body_done
        return {"type": "http.request", "body": piece, "more_body": not self.body_done}

    async def _receive_chunks(self) -> Message:
        connection = self.connection
        while not self.chunks and not self.body_done and not connection.closed:
            self.chunk_waiter = connection.loop.create_future()
            connection.resume()
            await self.chunk_waiter
        if connection.closed and not self.body_done:
            return {"type": "http.disconnect"}
        if not self.body_done:
            connection.pause()  # what the client sends next is parsed when the app asks for it
        body = b"".join(self.chunks)
        self.chunks.clear()
        self.body_given = self.body_done
        return {"type": "http.request", "body": body, "more_body": not self.body_done}

    # ------------------------------------------------------------------ ASGI send
    async def send(self, message: Message) -> None:
        connection = self.connection
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = int(message["status"])
            self.response_headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.started or self.complete:
            raise RuntimeError("http.response.body sent before http.response.start or after the last body")
        body = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if connection.closed:
            self.complete = not more
            return
        parts: list[bytes | bytearray | memoryview] = []
        if not self.head_written:
            parts.append(self._response_head(len(body), more))
            self.head_written = True
        if self.head_only or self.status in _NO_BODY_STATUSES:
            pass
        elif self.streaming:
            if body:
                parts += [b"%x\r\n" % len(body), body, b"\r\n"]
            if not more:
                parts.append(b"0\r\n\r\n")
        elif body:
            parts.append(body)
        connection.write(parts)
        if not more:
            self.complete = True
            connection.response_done(self)
        await connection.drained()

    def _response_head(self, body_bytes: int, more: bool) -> bytes:
        names = {k for k, _ in self.response_headers}
        headers = self.response_headers
        if b"content-length" not in names and b"transfer-encoding" not in names:
            if more:
                self.streaming = True
                headers = [*headers, (b"transfer-encoding", b"chunked")]
            elif self.status not in _NO_BODY_STATUSES:
                headers = [*headers, (b"content-length", b"%d" % body_bytes)]
        if not self.keep_alive or self.connection.server.stopping or not self.body_done:
            self.keep_alive = False  # an unread body, a chunked request or a shutdown: this connection ends here
            headers = [*headers, (b"connection", b"close")]
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, _PHRASES.get(self.status, "").encode("latin-1"))]
        lines.append(b"date: " + self.connection.server.date.now() + b"\r\n")
        lines += [k + b": " + v + b"\r\n" for k, v in headers]
        lines.append(b"\r\n")
        return b"".join(lines)


class _Connection(asyncio.BufferedProtocol):
    """One client connection. Heads (and chunked bodies, and pipelined bytes) land in ``buffer``; a
    Content-Length body lands in the piece ``read_piece`` allocates, the only copy made of it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(MAX_HEAD_BYTES)
        self.view = memoryview(self.buffer)
        self.filled = 0  # bytes in buffer not parsed yet
        self.scanned = 0  # where the search for the end of the head resumes
        self.piece: memoryview | None = None  # the body piece being read into
        self.piece_filled = 0
        self.piece_waiter: asyncio.Future[bool] | None = None
        self.exchange: _Exchange | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.paused = False
        self.disconnected: asyncio.Future[None] = self.loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.idle_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.server.connections.add(self)
        self._arm_idle_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.piece is not None:
            return self.piece[self.piece_filled :]
        return self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.piece is not None:
            self.piece_filled += nbytes
            if self.piece_filled == len(self.piece):
                self._piece_done(True)
            return
        self.filled += nbytes
        self._advance()

    def eof_received(self) -> bool:
        return False  # a client that stops sending is gone: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        self._piece_done(False)
        if self.exchange is not None:
            self.exchange._wake()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # ------------------------------------------------------------------ reading
    def pause(self) -> None:
        if not self.paused and not self.closed and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _consume(self, count: int) -> None:
        """Drop the first ``count`` buffered bytes."""
        rest = self.filled - count
        if rest:
            self.buffer[:rest] = self.buffer[count : self.filled]
        self.filled, self.scanned = rest, 0

    def _advance(self) -> None:
        """Act on buffered bytes: a chunked body goes to its parser; a new head starts an exchange."""
        exchange = self.exchange
        if exchange is not None:
            if exchange.chunked and not exchange.body_done and self.parser is not None:
                data = bytes(self.view[: self.filled])
                self.filled = 0
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserError:
                    self._fail_exchange(400, "malformed chunked body")
            elif self.filled == len(self.buffer):
                self.pause()  # pipelined bytes fill the buffer: wait for this response
            return
        end = self.buffer.find(b"\r\n\r\n", max(0, self.scanned - 3), self.filled)
        if end < 0:
            self.scanned = self.filled
            if self.filled == len(self.buffer):
                self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return
        self._start(end + 4)

    def _start(self, head_bytes: int) -> None:
        assert self.transport is not None
        exchange = _Exchange(self)
        parser = httptools.HttpRequestParser(exchange)
        try:
            parser.feed_data(bytes(self.view[:head_bytes]))
            if not exchange.head_complete:
                raise _HeadError(400, "incomplete request head")
            if parser.should_upgrade():
                raise _HeadError(501, _NO_UPGRADES)
            exchange.read_head(parser)
            scope = exchange.scope(self.server, self.transport)
        except httptools.HttpParserUpgrade:
            self._refuse(501, _NO_UPGRADES)
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request head: {exc}")
            return
        except _HeadError as exc:
            self._refuse(exc.status, str(exc))
            return
        self._consume(head_bytes)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.exchange, self.parser = exchange, parser if exchange.chunked else None
        if not exchange.body_done:
            self.pause()  # the body is read when the app asks for it
            if exchange.chunked and self.filled:
                self._advance()  # what came with the head goes to the chunked body's parser
        self.task = self.loop.create_task(self._run(exchange, scope))

    async def read_piece(self, size_bytes: int) -> bytearray | None:
        """The next ``size_bytes`` of a Content-Length body, read straight into a new buffer (None: the client
        went away first)."""
        piece = bytearray(size_bytes)
        taken = min(self.filled, size_bytes)
        if taken:
            piece[:taken] = self.view[:taken]
            self._consume(taken)
        if taken < size_bytes:
            self.piece, self.piece_filled = memoryview(piece), taken
            self.piece_waiter = self.loop.create_future()
            self.resume()
            if not await self.piece_waiter:
                return None
        exchange = self.exchange
        if exchange is not None and exchange.remaining > size_bytes:
            self.pause()  # the next piece is read when the app asks for it
        else:
            self.resume()  # the body is done: keep reading, for pipelined requests and to notice a disconnect
        return piece

    def _piece_done(self, complete: bool) -> None:
        if self.piece is not None:
            self.piece.release()
            self.piece = None
        waiter, self.piece_waiter = self.piece_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(complete)

    # ------------------------------------------------------------------ writing
    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if not self.closed and self.transport is not None and parts:
            self.transport.writelines(parts)

    async def drained(self) -> None:
        if not self.writable.is_set():
            await self.writable.wait()

    def response_done(self, exchange: _Exchange) -> None:
        """The last byte of the response is written: the next pipelined request, or the end."""
        if not exchange.keep_alive or self.closed:
            self.close()
            return
        self.exchange = self.parser = None
        self._arm_idle_timer()
        self.resume()
        if self.filled:
            self._advance()

    # ------------------------------------------------------------------ the app
    async def _run(self, exchange: _Exchange, scope: dict[str, Any]) -> None:
        try:
            await self.server.app(scope, exchange.receive, exchange.send)
        except Exception:
            log.exception("the app failed on %s %s", scope["method"], scope["path"])
            if not exchange.started:
                await self._plain(exchange, 500, "Internal Server Error")
            elif not exchange.complete:
                self.close()
            return
        if not exchange.complete:
            if not exchange.started:
                log.error("the app answered nothing to %s %s", scope["method"], scope["path"])
                await self._plain(exchange, 500, "Internal Server Error")
            else:
                self.close()  # a response cut short cannot be completed

    @staticmethod
    async def _plain(exchange: _Exchange, status: int, text: str) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        exchange.keep_alive = False
        await exchange.send({"type": "http.response.start", "status": status, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": body})

    def _fail_exchange(self, status: int, reason: str) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.started:
            exchange.body_done, exchange.keep_alive = True, False
            self.loop.create_task(self._plain(exchange, status, reason))
        else:
            self.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a head this server cannot take, then close."""
        body = reason.encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _PHRASES.get(status, "").encode("latin-1"), len(body))
        )
        self.write([head, body])
        self.close()

    # ------------------------------------------------------------------ lifetime
    def _arm_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    def _idle(self) -> None:
        if self.exchange is None:
            self.close()

    def shutdown(self) -> None:
        """Close now if idle; otherwise after the response in flight."""
        if self.exchange is None:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


class _Lifespan:
    """The ASGI lifespan protocol: startup before the server listens, shutdown after it has stopped."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.answers: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self.inbox.get()

    async def _send(self, message: Message) -> None:
        await self.answers.put(message)

    async def _run(self) -> None:
        try:
            await self.app({"type": "lifespan", "asgi": _ASGI, "state": self.state}, self._receive, self._send)
            await self.answers.put({"type": "lifespan.unsupported"})  # an app may return at once: no lifespan
        except BaseException as exc:
            await self.answers.put({"type": "lifespan.failed", "message": f"{type(exc).__name__}: {exc}"})
            if not isinstance(exc, Exception):
                raise

    async def _step(self, phase: str) -> None:
        await self.inbox.put({"type": f"lifespan.{phase}"})
        answer = await self.answers.get()
        if answer["type"] == "lifespan.unsupported":
            return
        if answer["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"the app's {phase} failed: {answer.get('message', answer['type'])}")

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        await self._step("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._step("shutdown")
            await self.task


class Server:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT (or :meth:`stop`)."""

    def __init__(
        self, app: ASGIApp, *, host: str, port: int, keep_alive_s: float = 75.0, graceful_s: float = 5.0
    ) -> None:
        self.app = app
        self.host, self.port = host, port
        self.keep_alive_s = keep_alive_s
        self.graceful_s = graceful_s
        self.state: dict[str, Any] = {}
        self.connections: set[_Connection] = set()
        self.date = _Date()
        self.stopping = False
        self._stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop
        self.address: tuple[str, int] | None = None  # where it listens, once it does

    def stop(self) -> None:
        """Stop (call it on the server's loop: ``loop.call_soon_threadsafe(server.stop)`` from elsewhere)."""
        if self._stop is not None:
            self._stop.set()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        lifespan = _Lifespan(self.app, self.state)
        await lifespan.startup()
        listener = await self.loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=2048
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                self.loop.add_signal_handler(signum, self.stop)
        bound = listener.sockets[0].getsockname() if listener.sockets else (self.host, self.port)
        self.address = (bound[0], bound[1])
        log.info("serving on http://%s:%s", *self.address)
        try:
            await self._stop.wait()
        finally:
            self.stopping = True
            listener.close()
            for connection in list(self.connections):
                connection.shutdown()
            deadline = self.loop.time() + self.graceful_s
            while any(c.exchange is not None for c in self.connections) and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            for connection in list(self.connections):
                if connection.task is not None and not connection.task.done():
                    connection.task.cancel()
                connection.close()
            await lifespan.shutdown()


def run(app: ASGIApp, *, host: str, port: int, keep_alive_s: float = 75.0, graceful_s: float = 5.0) -> None:
    """Serve ``app`` on uvloop until SIGTERM or SIGINT; raises RuntimeError when the app's startup fails."""
    uvloop.run(Server(app, host=host, port=port, keep_alive_s=keep_alive_s, graceful_s=graceful_s).serve())
