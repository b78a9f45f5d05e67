"""tierlab's HTTP/1.1 server: a lean ASGI server on asyncio that receives each request body straight into one
buffer, grown as the body arrives.

Why tierlab has its own: a hop carries tensors of up to megabytes, and the server's body path was most of the
hop tax. One round trip of a 1 MiB body to a null ASGI app (``make bench-overhead``, client in another process,
p50 on this machine): a bare socket 0.28–0.33 ms, this server 0.41 ms, granian 2.8.7 0.89 ms, uvicorn 0.55
(uvloop + httptools) 1.21–1.66 ms. uvicorn appends each piece the parser hands it to one ``bytes`` and pauses
reading every 64 KiB until the app has taken it; an ``asyncio.Protocol`` that only collects ``data_received``
pieces and joins them still took 1.2–1.4 ms. Here an ``asyncio.BufferedProtocol`` hands the event loop the
request's own ``bytearray`` to read into: the kernel's copy is the only one (bar a growth step), and the app
gets that buffer.

What it does: ASGI 3 (``http`` and ``lifespan``); HTTP/1.1 and 1.0, keep-alive as RFC 9112 §9 says
(``Connection: close`` and any 1.0 request end the connection after their response), pipelined
requests answered in order; Content-Length bodies (in pieces of at most ``BODY_PIECE_BYTES``, each read only
when the app asks for it, so the app can refuse a body before a byte of it is read) and chunked bodies (parsed
by ``httptools``; such a connection closes after its response); ``Expect: 100-continue``; HEAD; responses of
a known length, or chunked (close-delimited to a 1.0 client) when the app streams without one; graceful
shutdown. Heads are parsed by ``httptools`` (llhttp, the parser uvicorn uses), which rejects malformed and
ambiguous framing (400); a 1.1 request without exactly one Host is 400, a transfer coding other than chunked
501, upgrades 501. Not: TLS, HTTP/2, upgrades.

What a hostile client can make it hold (``ServerLimits``, the way nginx and Kestrel bound the same things):

- **connections**: at most ``max_connections``, ``max_connections_per_peer`` from one address; beyond, a 503
  and a close. An idle connection holds no buffer; a head at most ``MAX_HEAD_BYTES``.
- **work**: a pipelined request starts once the answers before it have been sent (bar
  ``PIPELINE_UNSENT_BYTES``): a client that pipelines requests and reads nothing has one answer made for it,
  not as many as the kernel's buffers hold (a burst of them delays everyone's requests).
- **time**: the idle time between requests (``keep_alive_s``), a head from its first byte to its end
  (``head_timeout_s``, 408), a body that stops (``body_idle_s``) or arrives slower than
  ``body_min_rate_bytes_s`` once ``body_grace_s`` has passed (Kestrel's 240 B/s after 5 s; 408), a client that
  reads nothing of its response for ``send_timeout_s`` (reset). A body is never cut for its total time: an
  emulated 1 Mbit/s link takes 13 s for a 1.6 MB tensor and must be served.
- **memory**: a body's buffer is allocated as bytes arrive (what the socket has ready, growing eightfold,
  so at most 16× what has arrived, or 64 KiB), charged to a ``BodyBudget`` shared with the app's decoding,
  whose total and per-peer share are limits; beyond them the request gets 503.
- **closing**: after refusing a request whose body it has not read, the server half-closes and drains up to
  ``linger_bytes`` for ``linger_s`` (nginx's lingering close), so a client still sending reads the answer
  instead of a reset.

Bodies reach the app as ``bytearray`` (ASGI says ``bytes``; a bytearray is one copy fewer, and every reader
here — numpy, ``json``, Starlette's ``Request`` — takes either). The app learns its connection's peer from the
ASGI ``client``; an app that decodes bodies shares the server's ``BodyBudget`` (``run(…, budget=)``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import http
import logging
import re
import signal
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import unquote

import httptools
import uvloop

log = logging.getLogger("tierlab.server")

MAX_HEAD_BYTES = 64 * 1024
FIRST_HEAD_BYTES = 8 * 1024  # a connection's head buffer starts here and doubles up to MAX_HEAD_BYTES
BODY_PIECE_BYTES = 16 << 20
FIRST_BODY_BYTES = 64 * 1024  # a body buffer's first allocation (or what the socket has ready, if more)
GROWTH = 8  # a body buffer grows at least this many times over when full: a 1 MiB body is copied once, 130 kB
CHECK_EVERY_S = 0.5  # how often a body's progress is checked
PIPELINE_UNSENT_BYTES = 16 * 1024  # a pipelined request starts once the answers before it are sent but this
PIPELINE_CHECK_S = 0.01  # how often a pipelined request checks whether its client has read the answers before it
_SIOCOUTQNSD = 0x894B  # Linux: bytes in a TCP socket's send queue not yet sent
_SCRATCH = bytearray(64 * 1024)  # what a lingering close drains into (the bytes are thrown away)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# the end of a head; a bare LF ends it too, so that it is answered (400) rather than waited on
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# a head as RFC 9112 §2–§5 and RFC 9110 §5.5–§5.6 write it: request-line, field lines (token ":" OWS value
# OWS, visible characters, obs-text, spaces and tabs), CRLF line ends. llhttp accepts more (double spaces,
# control characters, leading empty lines); what it accepts beyond this is refused, as h11 refuses it.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_HEAD = re.compile(
    _TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r\n(?:" + _TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n)*\r\n"
)
_NO_UPGRADES = "protocol upgrades are not served here"
_NO_BODY_STATUSES = frozenset({204, 304})
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_ASGI = {"version": "3.0", "spec_version": "2.4"}

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class BodyBudget:
    """Bytes of request bodies, and of what decoding them takes, that a server holds at once: ``total_bytes``
    in all, ``peer_share`` of it for one peer address. The server charges body buffers as they grow and
    releases them when their exchange ends; an app charges its decoding (``try_charge``/``release``)."""

    def __init__(self, total_bytes: int, peer_share: float = 0.5) -> None:
        self.total_bytes = total_bytes
        self.peer_bytes = max(1, int(total_bytes * peer_share))
        self.held_bytes = 0
        self.peak_bytes = 0
        self.refused = 0
        self.by_peer: dict[str, int] = {}

    def try_charge(self, peer: str, nbytes: int) -> bool:
        """Charge ``nbytes`` to ``peer``, or False (nothing charged) when it would pass a limit."""
        held = self.by_peer.get(peer, 0)
        if self.held_bytes + nbytes > self.total_bytes or held + nbytes > self.peer_bytes:
            self.refused += 1
            return False
        self.by_peer[peer] = held + nbytes
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return True

    def release(self, peer: str, nbytes: int) -> None:
        left = self.by_peer.get(peer, 0) - nbytes
        if left > 0:
            self.by_peer[peer] = left
        else:
            self.by_peer.pop(peer, None)
        self.held_bytes -= nbytes

    def refusal(self, nbytes: int) -> str:
        return (f"the request needs {nbytes} bytes more than the tier's budget for request bodies has left "
                f"({self.total_bytes} bytes in all, {self.peer_bytes} per client address); retry later")  # fmt: skip


@dataclass(frozen=True)
class ServerLimits:
    """What one connection, and all of them, may hold (see the module's notes)."""

    max_connections: int = 512
    max_connections_per_peer: int = 256
    keep_alive_s: float = 75.0
    head_timeout_s: float = 10.0
    body_min_rate_bytes_s: float = 240.0
    body_grace_s: float = 5.0
    body_idle_s: float = 30.0
    send_timeout_s: float = 30.0
    linger_s: float = 2.0
    linger_bytes: int = 4 << 20
    body_budget_bytes: int = 256 << 20
    body_budget_peer_share: float = 0.5

    @property
    def memory_bound_bytes(self) -> int:
        """The most request data hostile clients can make the server hold: full heads on every connection,
        and the body budget."""
        return self.max_connections * MAX_HEAD_BYTES + self.body_budget_bytes


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
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_complete = False
        self.method = ""
        self.http_version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.expect_continue = False
        # body
        self.remaining = 0  # Content-Length bytes not yet handed to the app
        self.body_done = False
        self.body_given = False  # the app has had the last http.request message
        self.chunks: list[bytes] = []
        self.chunk_waiter: asyncio.Future[None] | None = None
        self.failure: tuple[int, str] | None = None  # the server's answer when the body broke a limit
        self.charged_bytes = 0  # what this exchange holds of the body budget
        # response
        self.started = False
        self.head_written = False
        self.complete = False
        self.status = 200
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.streaming = False  # a chunked (or, to a 1.0 client, close-delimited) response
        self.head_only = False

    # ------------------------------------------------------------------ httptools callbacks
    def on_url(self, url: bytes) -> None:
        if not self.head_complete:  # (a chunked body's parser goes on into whatever was pipelined after it)
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_complete:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if not self.head_complete:
            self.head_complete = True
            # read here: llhttp forgets a bodiless request's keep-alive once its message completes
            self.http_version = self.parser.get_http_version()
            # 1.0's optional keep-alive is not offered (nor by h11): a 1.0 request's connection ends with it
            self.keep_alive = self.parser.should_keep_alive() and self.http_version == "1.1"
            self.method = self.parser.get_method().decode("latin-1")

    def on_body(self, body: bytes) -> None:
        if not self.body_done and self.failure is None:
            if not self.connection.charge(self, len(body)):
                return
            self.connection.body_progress(len(body))
            self.chunks.append(body)
            self._wake()

    def on_message_complete(self) -> None:
        if self.head_complete and not self.body_done:
            self.body_done = True
            self._wake()

    def _wake(self) -> None:
        if self.chunk_waiter is not None and not self.chunk_waiter.done():
            self.chunk_waiter.set_result(None)

    def fail(self, status: int, reason: str) -> None:
        """The body broke a limit: the app sees a disconnect, the client gets ``status``."""
        if self.failure is None:
            self.failure = (status, reason)
            self.keep_alive = False
            self._wake()

    # ------------------------------------------------------------------ the head
    def read_head(self) -> None:
        """Framing and options from the parsed head; _HeadError for what this server does not take."""
        if self.http_version not in ("1.0", "1.1"):
            raise _HeadError(505, f"HTTP/{self.http_version} is not served here: HTTP/1.1 or 1.0")
        hosts = sum(1 for k, _ in self.headers if k == b"host")
        if hosts > 1 or (hosts == 0 and self.http_version == "1.1"):
            raise _HeadError(400, "an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)")
        lengths = [v for k, v in self.headers if k == b"content-length"]
        encodings = [v.strip().lower() for k, v in self.headers if k == b"transfer-encoding"]
        if encodings:
            if encodings != [b"chunked"]:
                raise _HeadError(501, "the only transfer coding served is chunked, in one Transfer-Encoding header")
            if self.http_version != "1.1":
                raise _HeadError(400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1)")
            self.chunked, self.keep_alive = True, False  # llhttp would parse past its end: one per connection
        elif lengths:
            self.remaining = int(lengths[0])  # llhttp has rejected non-numbers and conflicting values
        self.body_done = not self.chunked and not self.remaining
        self.expect_continue = self.http_version == "1.1" and any(
            k == b"expect" and v.lower() == b"100-continue" for k, v in self.headers
        )
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
            "http_version": self.http_version,
            "server": tuple(transport.get_extra_info("sockname")[:2]),
            "client": (self.connection.peer, self.connection.peer_port),
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
        if self.body_given or connection.closed or self.failure is not None:
            if self.failure is not None and not self.body_given:
                return {"type": "http.disconnect"}
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
        piece = await connection.read_piece(self, min(self.remaining, BODY_PIECE_BYTES))
        if piece is None:
            return {"type": "http.disconnect"}
        self.remaining -= len(piece)
        self.body_done = not self.remaining
        self.body_given = self.body_done
        return {"type": "http.request", "body": piece, "more_body": not self.body_done}

    async def _receive_chunks(self) -> Message:
        connection = self.connection
        connection.body_started()
        while not self.chunks and not self.body_done and not connection.closed and self.failure is None:
            self.chunk_waiter = connection.loop.create_future()
            connection.resume()
            await self.chunk_waiter
        connection.body_stopped()
        if self.failure is not None or ((connection.closed or connection.eof) and not self.body_done):
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
        elif self.streaming and self.http_version == "1.1":
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
                if self.http_version == "1.1":
                    headers = [*headers, (b"transfer-encoding", b"chunked")]
                else:
                    self.keep_alive = False  # a 1.0 client reads a body of unknown length to the close
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
    Content-Length body lands in the piece ``read_piece`` grows as it arrives, the only copy made of it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer, self.peer_port = "", 0
        self.buffer = bytearray()  # allocated when the first byte comes
        self.filled = 0  # bytes in buffer not parsed yet
        self.scanned = 0  # where the search for the end of the head resumes
        self.piece: bytearray | None = None  # the body piece being read into
        self.piece_filled = 0
        self.piece_size = 0  # what the piece will hold when whole
        self.piece_waiter: asyncio.Future[bool] | None = None
        self.piece_result: bytearray | None = None
        self.exchange: _Exchange | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.eof = False
        self.paused = False
        self.lingering = False
        self.linger_left = 0
        self.disconnected: asyncio.Future[None] = self.loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.timer: asyncio.TimerHandle | None = None
        # a body's progress: bytes and reading time (only while the app waits for it), and the last byte's time
        self.body_bytes = 0
        self.body_read_s = 0.0
        self.body_reading_since: float | None = None
        self.body_last_byte = 0.0
        self.counted = False

    # ------------------------------------------------------------------ asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.peer, self.peer_port = str(peer[0]), int(peer[1]) if len(peer) > 1 else 0
        server = self.server
        peers = server.peer_connections.get(self.peer, 0)
        server.refused.add(self)  # until it is counted (a refused one is closed by the server's stop too)
        if len(server.connections) >= self.limits.max_connections:
            self._refuse(503, f"the tier has {len(server.connections)} connections open (limit "
                              f"{self.limits.max_connections}); retry later")  # fmt: skip
            return
        if peers >= self.limits.max_connections_per_peer:
            self._refuse(503, f"{self.peer} has {peers} connections open to this tier (limit "
                              f"{self.limits.max_connections_per_peer} per address); retry later")  # fmt: skip
            return
        self.counted = True
        server.refused.discard(self)
        server.connections.add(self)
        server.peer_connections[self.peer] = peers + 1
        self._arm(self.limits.keep_alive_s, self._idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.lingering:
            return memoryview(_SCRATCH)
        if self.piece is not None:
            if self.piece_filled == len(self.piece):
                self._grow_piece()
            if self.piece is not None:
                return memoryview(self.piece)[self.piece_filled :]
            # refused: what arrives lands in the head buffer (bounded; it pauses when full) until the close
        if self.filled == len(self.buffer):
            self._grow_buffer()
        return memoryview(self.buffer)[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.lingering:
                self.linger_left -= nbytes
                if self.linger_left <= 0:
                    self.close()
                return
            if self.piece is not None:
                self.piece_filled += nbytes
                self.body_progress(nbytes)
                if self.piece_filled == self.piece_size:
                    self._piece_done(True)
                return
            if self.exchange is None and self.filled == 0 and nbytes:
                self._arm(self.limits.head_timeout_s, self._head_late)  # a head started: it has this long
            self.filled += nbytes
            self._advance()
        except Exception:  # a bug, not a client's fault: say so, answer what can be answered, close
            log.exception("reading from %s failed", self.peer)
            self._refuse(500, "Internal Server Error")

    def eof_received(self) -> bool:
        """The client has sent everything (a half-close): answer what it sent whole, then close."""
        self.eof = True
        if self.lingering:
            self.close()
            return False
        # an app listening for the client to go away learns it now (the tier cancels a forward, as uvicorn
        # would); one that answers anyway still has its answer written: the client may be reading
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        exchange = self.exchange
        if exchange is not None:
            if exchange.body_done and exchange.failure is None:
                return True
            self.close()  # a body cut short never comes whole: the client is gone
            exchange._wake()
            self._piece_done(False)
            return False
        if self.filled:
            self._advance()
        if self.exchange is None:
            self.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.refused.discard(self)
        if self.counted:
            self.counted = False
            self.server.connections.discard(self)
            left = self.server.peer_connections.get(self.peer, 1) - 1
            if left > 0:
                self.server.peer_connections[self.peer] = left
            else:
                self.server.peer_connections.pop(self.peer, None)
        self._disarm()
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        self._piece_done(False)
        self.buffer, self.filled = bytearray(), 0  # now, not when the collector breaks this protocol's cycles
        if self.exchange is not None:
            self.exchange._wake()
            self._release(self.exchange)
        self.writable.set()

    @property
    def limits(self) -> ServerLimits:
        return self.server.limits  # replaced as a whole when a tier's links are re-shaped

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
        """Read again, unless pipelined bytes already fill the head buffer (they wait for this response)."""
        full = self.piece is None and not self.lingering and self.filled >= MAX_HEAD_BYTES
        if self.paused and not self.closed and not full and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _grow_buffer(self) -> None:
        size = min(MAX_HEAD_BYTES, max(FIRST_HEAD_BYTES, 2 * len(self.buffer)))
        if size <= len(self.buffer):  # full of pipelined bytes behind a request in flight: wait for it
            self.pause()
            size = len(self.buffer) + FIRST_HEAD_BYTES  # (the loop may ask once more before the pause holds)
        grown = bytearray(size)
        grown[: self.filled] = memoryview(self.buffer)[: self.filled]
        self.buffer = grown

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
                data = bytes(memoryview(self.buffer)[: self.filled])
                self.filled = 0
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    if not exchange.body_done:
                        exchange.fail(400, "malformed chunked body")
                except httptools.HttpParserError:
                    exchange.fail(400, "malformed chunked body")
            elif self.filled >= MAX_HEAD_BYTES:
                self.pause()  # pipelined bytes fill the buffer: wait for this response
            return
        found = _HEAD_END.search(self.buffer, max(0, self.scanned - 3), self.filled)
        if found is None:
            self.scanned = self.filled
            if self.filled >= MAX_HEAD_BYTES:
                self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            elif self.eof:
                self.close()  # half a head and then nothing: there is no request to answer
            return
        self._start(found.end())

    def _start(self, head_bytes: int) -> None:
        assert self.transport is not None
        exchange = _Exchange(self)
        parser = exchange.parser
        head = bytes(memoryview(self.buffer)[:head_bytes])
        if _HEAD.fullmatch(head) is None:
            self._refuse(400, "malformed request head (RFC 9112: request-line, field lines, CRLF line ends)")
            return
        try:
            parser.feed_data(head)
            if not exchange.head_complete:
                raise _HeadError(400, "incomplete request head")
            if parser.should_upgrade():
                raise _HeadError(501, _NO_UPGRADES)
            exchange.read_head()
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
        self._disarm()
        self.exchange, self.parser = exchange, parser if exchange.chunked else None
        self.body_bytes, self.body_read_s, self.body_reading_since = 0, 0.0, None
        if not exchange.body_done:
            self.pause()  # the body is read when the app asks for it
            if exchange.chunked and self.filled:
                self._advance()  # what came with the head goes to the chunked body's parser
        self.task = self.loop.create_task(self._run(exchange, scope))

    async def read_piece(self, exchange: _Exchange, size_bytes: int) -> bytearray | None:
        """The next ``size_bytes`` of a Content-Length body, read straight into a buffer grown as it arrives
        (None: the client went away first, or the body broke a limit and the exchange carries the answer)."""
        taken = min(self.filled, size_bytes)
        piece = bytearray(memoryview(self.buffer)[:taken]) if taken else bytearray()
        if taken:
            self._consume(taken)
            if not self.charge(exchange, taken):
                return None
        if taken < size_bytes:
            if self.eof or self.closed:
                self.close()  # the rest of the body cannot come
                return None
            self.piece, self.piece_filled, self.piece_size = piece, taken, size_bytes
            self.piece_waiter = self.loop.create_future()
            self.body_started()
            self.resume()
            whole = await self.piece_waiter
            self.body_stopped()
            if not whole or self.piece_result is None:
                return None
            piece, self.piece_result = self.piece_result, None
        if exchange.remaining > size_bytes:
            self.pause()  # the next piece is read when the app asks for it
        else:
            self.resume()  # the body is done: keep reading, for pipelined requests and to notice a disconnect
        return piece

    def _grow_piece(self) -> None:
        """More room in the body piece: what the socket has ready, at least ``GROWTH`` times the room it had,
        and all of it once that is half its size (few copies: each growth copies what arrived so far)."""
        assert self.piece is not None and self.exchange is not None
        size = len(self.piece)
        grown = max(FIRST_BODY_BYTES, GROWTH * size, self.piece_filled + self._ready_bytes())
        grown = self.piece_size if 2 * grown >= self.piece_size else grown
        if not self.charge(self.exchange, grown - size):
            self._piece_done(False)
            return
        if size == 0:
            self.piece = bytearray(grown)
        else:
            bigger = bytearray(grown)
            bigger[: self.piece_filled] = memoryview(self.piece)[: self.piece_filled]
            self.piece = bigger

    def _ready_bytes(self) -> int:
        """Bytes the kernel holds for this socket now (FIONREAD), 0 if it cannot say."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return 0
        ready = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, ready, True)
        except OSError:
            return 0
        return int(ready[0])

    def _piece_done(self, complete: bool) -> None:
        if self.piece is not None:
            self.piece_result = self.piece if complete else None
            self.piece = None
        waiter, self.piece_waiter = self.piece_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(complete)

    # ------------------------------------------------------------------ a body's limits
    def charge(self, exchange: _Exchange, nbytes: int) -> bool:
        """Charge a body's growth to the budget; on refusal the exchange fails with 503."""
        if nbytes <= 0:
            return True
        budget = self.server.budget
        assert budget is not None
        if not budget.try_charge(self.peer, nbytes):
            exchange.fail(503, budget.refusal(nbytes))
            return False
        exchange.charged_bytes += nbytes
        return True

    def _release(self, exchange: _Exchange) -> None:
        if exchange.charged_bytes and self.server.budget is not None:
            self.server.budget.release(self.peer, exchange.charged_bytes)
            exchange.charged_bytes = 0

    def body_started(self) -> None:
        now = self.loop.time()
        self.body_reading_since = now
        self.body_last_byte = now
        self._arm(CHECK_EVERY_S, self._check_body)

    def body_stopped(self) -> None:
        if self.body_reading_since is not None:
            self.body_read_s += self.loop.time() - self.body_reading_since
            self.body_reading_since = None
        self._disarm()

    def body_progress(self, nbytes: int) -> None:
        self.body_bytes += nbytes
        self.body_last_byte = self.loop.time()

    def _check_body(self) -> None:
        """A body that stopped, or that arrives slower than the minimum rate once its grace has passed: 408."""
        exchange, since = self.exchange, self.body_reading_since
        if exchange is None or since is None or self.closed:
            return
        now = self.loop.time()
        reading_s = self.body_read_s + now - since
        limits = self.limits
        if now - self.body_last_byte >= limits.body_idle_s:
            reason = f"the request body stopped arriving for {limits.body_idle_s:g} s"
        elif reading_s >= limits.body_grace_s and self.body_bytes < limits.body_min_rate_bytes_s * reading_s:
            reason = (f"the request body arrived at {self.body_bytes / reading_s:.0f} bytes/s, under the minimum "
                      f"of {limits.body_min_rate_bytes_s:g} bytes/s")  # fmt: skip
        else:
            self._arm(CHECK_EVERY_S, self._check_body)
            return
        exchange.fail(408, reason)
        self._piece_done(False)

    # ------------------------------------------------------------------ writing
    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if not self.closed and self.transport is not None and parts:
            self.transport.writelines(parts)

    async def drained(self) -> None:
        """Wait until the client has read enough of the response; one that reads nothing for the send
        timeout is closed."""
        if not self.writable.is_set():
            try:
                async with asyncio.timeout(self.limits.send_timeout_s):
                    await self.writable.wait()
            except TimeoutError:
                log.info("%s read nothing of its response for %g s: closed", self.peer, self.limits.send_timeout_s)
                self.abort()

    def response_done(self, exchange: _Exchange) -> None:
        """The last byte of the response is written: the next pipelined request, or the end."""
        self._release(exchange)
        if self.closed:
            return
        if not exchange.keep_alive:
            client_done = exchange.body_done and not self.filled and not exchange.chunked
            if self.eof or (client_done and not self._may_send_more(exchange)):
                self.close()
            elif exchange.remaining > self.limits.linger_bytes:
                self.close()  # more unread body than a lingering close drains: it would end in a reset anyway
            else:
                self.linger()  # it may still be sending (a body we did not read, pipelined requests)
            return
        self.exchange = self.parser = None
        if self.filled:  # a pipelined request is here already
            self.pause()
            self._start_pipelined(self.loop.time())
            return
        self._arm(self.limits.keep_alive_s, self._idle)
        self.resume()
        if self.eof:
            self.close()

    def _start_pipelined(self, since: float) -> None:
        """The next pipelined request once the answers before it have left this host (at most
        ``PIPELINE_UNSENT_BYTES`` unsent): a client that reads nothing gets no more work done for it, and is
        closed after ``send_timeout_s``. Reading waits meanwhile; the head then has the head's time."""
        if self.closed or self.exchange is not None:
            return
        if self._unsent_bytes() > PIPELINE_UNSENT_BYTES:
            if self.loop.time() - since >= self.limits.send_timeout_s:
                log.info("%s read nothing of its responses for %g s: closed", self.peer, self.limits.send_timeout_s)
                self.abort()
            else:
                self._arm(PIPELINE_CHECK_S, lambda: self._start_pipelined(since))
            return
        self._arm(self.limits.head_timeout_s, self._head_late)
        self.resume()
        self._advance()

    def _unsent_bytes(self) -> int:
        """Response bytes not yet sent: the transport's buffer and the kernel's unsent queue (SIOCOUTQNSD)."""
        if self.transport is None:
            return 0
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            queued = array.array("i", [0])
            with contextlib.suppress(OSError):
                fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, queued, True)
                unsent += int(queued[0])
        return unsent

    @staticmethod
    def _may_send_more(exchange: _Exchange) -> bool:
        """Whether a client may still be sending after this exchange: not when it asked to close."""
        return exchange.http_version == "1.1" and not any(
            k == b"connection" and b"close" in v.lower() for k, v in exchange.headers
        )

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
            if exchange.failure is not None and not exchange.started:
                await self._plain(exchange, *exchange.failure)
            elif not exchange.started:
                if not self.closed:
                    log.error("the app answered nothing to %s %s", scope["method"], scope["path"])
                    await self._plain(exchange, 500, "Internal Server Error")
                else:
                    self._release(exchange)
            else:
                self.close()  # a response cut short cannot be completed

    @staticmethod
    async def _plain(exchange: _Exchange, status: int, text: str) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        exchange.keep_alive = False
        await exchange.send({"type": "http.response.start", "status": status, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": body})

    def _refuse(self, status: int, reason: str) -> None:
        """Answer what this server cannot take (a head, a connection beyond the limits), then close."""
        if self.closed:
            return
        body = reason.encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _PHRASES.get(status, "").encode("latin-1"), len(body))
        )
        self.write([head, body])
        self.linger()

    # ------------------------------------------------------------------ lifetime
    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle(self) -> None:
        if self.exchange is None and not self.filled:
            self.close()

    def _head_late(self) -> None:
        if self.exchange is None and not self.closed:
            self._refuse(408, f"the request head did not arrive within {self.limits.head_timeout_s:g} s")

    def linger(self) -> None:
        """Half-close after the answer and drain what the client still sends, for a while, then close: a
        client that is still sending reads the answer instead of a reset (nginx's lingering close)."""
        if self.closed or self.transport is None:
            return
        if self.eof or not self.transport.can_write_eof():
            self.close()
            return
        self.transport.write_eof()
        self.lingering = True
        self.buffer, self.filled = bytearray(), 0  # nothing more is parsed
        self.linger_left = self.limits.linger_bytes
        self._piece_done(False)
        self._arm(self.limits.linger_s, self.close)
        self.paused = True  # resume whatever the state
        self.resume()

    def shutdown(self) -> None:
        """Close now if idle; otherwise after the response in flight."""
        if self.exchange is None:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self._disarm()
            self.transport.close()

    def abort(self) -> None:
        """End a connection whose client reads nothing with a reset: a close would queue a FIN behind the
        answers it will never read, and the kernel would keep them (and the client its connection)."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self._disarm()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


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


@dataclass
class Server:
    """Serve ``app`` on ``host:port`` within ``limits`` until SIGTERM or SIGINT (or :meth:`stop`)."""

    app: ASGIApp
    host: str
    port: int
    limits: ServerLimits = field(default_factory=ServerLimits)
    graceful_s: float = 5.0
    state: dict[str, Any] = field(default_factory=dict)
    address: tuple[str, int] | None = None  # where it listens, once it does

    budget: BodyBudget | None = None  # default: one sized by ``limits``

    def __post_init__(self) -> None:
        self.connections: set[_Connection] = set()
        self.refused: set[_Connection] = set()  # beyond the caps: answered 503, closing
        self.peer_connections: dict[str, int] = {}
        if self.budget is None:
            self.budget = BodyBudget(self.limits.body_budget_bytes, self.limits.body_budget_peer_share)
        self.date = _Date()
        self.stopping = False
        self._stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop

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
            for connection in [*self.connections, *self.refused]:
                if connection.task is not None and not connection.task.done():
                    connection.task.cancel()
                connection.close()
            await lifespan.shutdown()


def serve(server: Server) -> None:
    """Serve on uvloop until SIGTERM or SIGINT; raises RuntimeError when the app's startup fails."""
    uvloop.run(server.serve())


def run(app: ASGIApp, *, host: str, port: int, limits: ServerLimits | None = None) -> None:
    """Serve ``app`` with its own budget (the null tier of the benchmarks)."""
    serve(Server(app, host=host, port=port, limits=limits or ServerLimits()))
