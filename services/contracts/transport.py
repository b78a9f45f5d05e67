"""HTTP clients every part shares: a lean HTTP/1.1 client over kept-alive connections (asyncio protocol +
``httptools``) for the hot path, and ``json_call`` for small blocking control calls.

The tiers forward tensors with it and the loadgen drives its hot path with it; ``benchmarks/forwarding.py``
measures it against aiohttp and httpx (it is the fastest of the three here). One request at a time per
connection; a :class:`Pool` keeps idle connections to one peer and retries once on a connection the peer
closed while idle. Bodies are written with ``writelines`` (no join, no copy of array views).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httptools

from services.contracts.codec import Buffer
from services.contracts.errors import ConfigError
from services.contracts.specs import LINK_SENDERS, LinkMeasurementSpec, TierName
from services.contracts.stack_state import StackStateSpec

_MAX_IDLE_CONNECTIONS = 32
CONTROL_TOKEN_FILE = "control-token"  # written by `make up` into the stack's folder, mounted into the tiers
_control_token: list[str] = []  # this process's token for control calls (none: the tiers are open)


def new_control_token(folder: Path, name: str = CONTROL_TOKEN_FILE) -> Path:
    """A fresh random secret (the stack's control token, by default) in ``folder``, never in an image."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(secrets.token_hex(32))
    os.chmod(tmp, 0o644)  # the tiers run as their own user and read it through a read-only mount
    tmp.replace(path)
    return path


def read_control_token(path: Path | str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the control token {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"the control token file {path} is empty")
    return token


def use_control_token(token: str | None) -> None:
    """Send ``token`` with this process's control calls from now on (None: send none)."""
    _control_token[:] = [token] if token else []


def use_stack_token(state: StackStateSpec) -> None:
    """Control calls to a stack carry the token its state file names (a stack without one is open)."""
    path = state.control_token_file
    use_control_token(read_control_token(path) if path else None)


def control_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {_control_token[0]}"} if _control_token else {}


class PeerClosed(ConnectionError):
    """The peer closed the connection before a whole response arrived."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reusable = True
        self._waiter: asyncio.Future[Reply] | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._started = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"unparsable HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(PeerClosed("connection closed before the response ended", before_response=not self._started))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(Reply(self.parser.get_status_code(), self._headers, body))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def exchange(self, head: bytes, body: Sequence[Buffer]) -> Reply:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._headers, self._chunks, self._started = {}, [], False
        self.transport.writelines([head, *body])
        return await self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle kept-alive connections to one peer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[Connection] = deque()

    async def _connect(self) -> Connection:
        _, connection = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        return connection

    def post_head(self, path: str, headers: Mapping[str, str], size_bytes: int) -> bytes:
        """The head of ``POST path`` to this peer: request line, Host, ``headers``, Content-Length."""
        lines = [f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append(f"Content-Length: {size_bytes}\r\n\r\n")
        return "".join(lines).encode("latin-1")

    async def post(self, path: str, headers: Mapping[str, str], body: Sequence[Buffer], size_bytes: int) -> Reply:
        return await self.request(self.post_head(path, headers, size_bytes), body)

    async def request(self, head: bytes, body: Sequence[Buffer]) -> Reply:
        while self.idle:
            connection = self.idle.pop()
            if connection.closed:
                continue
            try:
                return self._done(connection, await connection.exchange(head, body))
            except PeerClosed as exc:
                # the peer dropped an idle connection as we reused it: nothing was processed, try anew
                if not exc.before_response:
                    raise
            except BaseException:
                connection.close()
                raise
        connection = await self._connect()
        try:
            return self._done(connection, await connection.exchange(head, body))
        except BaseException:
            connection.close()
            raise

    def _done(self, connection: Connection, reply: Reply) -> Reply:
        if connection.reusable and not connection.closed and len(self.idle) < _MAX_IDLE_CONNECTIONS:
            self.idle.append(connection)
        else:
            connection.close()
        return reply

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def json_call(url: str, *, method: str = "GET", body: Any = None, timeout_s: float = 5.0) -> tuple[int, Any]:
    """A JSON control call (blocking, stdlib): (status, parsed body); (0, reason) when nothing answers.
    An error status keeps its body (parsed, or the raw text) so callers can show what the peer said."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **control_headers()}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def probe_links(
    urls: Mapping[TierName, str],
    *,
    pings: int = 20,
    bulk_s: float = 1.0,
    repeats: int = 1,
    timeout_s: float = 300.0,
) -> list[LinkMeasurementSpec]:
    """Each link measured by the tier that sends over it (``POST /tierlab/probe``), ``repeats`` times in a row
    and merged by ``median_probe`` (RTT p50, p90, the path's own RTT and goodput the medians of the probes',
    the minimum RTT the least), so one probe spoilt by a busy machine does not decide. ConfigError if a
    probe fails."""
    measured = []
    for sender, peer in LINK_SENDERS.values():
        probes = []
        for _ in range(max(1, repeats)):
            code, body = json_call(
                f"{urls[sender]}/tierlab/probe",
                method="POST",
                body={"peer": peer, "pings": pings, "bulk_s": bulk_s},
                timeout_s=timeout_s,
            )
            if code != 200:
                raise ConfigError(f"{sender} could not probe its link to {peer}: {code} {body}")
            probes.append(LinkMeasurementSpec.model_validate(body))
        measured.append(median_probe(probes))
    return measured


def median_probe(probes: Sequence[LinkMeasurementSpec]) -> LinkMeasurementSpec:
    """One link's probes as one: medians of the RTT p50, p90, path RTT and goodput, the least minimum RTT."""
    goodputs = [p.goodput_mbit for p in probes if p.goodput_mbit is not None]
    paths = [p.path_rtt_ms_p50 for p in probes if p.path_rtt_ms_p50 is not None]
    return probes[0].model_copy(
        update={
            "rtt_ms_min": min(p.rtt_ms_min for p in probes),
            "rtt_ms_p50": statistics.median(p.rtt_ms_p50 for p in probes),
            "rtt_ms_p90": statistics.median(p.rtt_ms_p90 for p in probes),
            "path_rtt_ms_p50": statistics.median(paths) if paths else None,
            "goodput_mbit": statistics.median(goodputs) if goodputs else None,
        }
    )
