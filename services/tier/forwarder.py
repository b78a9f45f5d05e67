"""The client a tier uses to hand intermediate tensors to the next tier.

One kept-alive aiohttp connection pool per tier process; tensors always travel as V2 binary data. Any
failure becomes a :class:`~services.contracts.errors.NextTierError` (502) or
:class:`~services.contracts.errors.NextTierTimeout` (504) whose message names the hop
(``edge -> cloud``), so a client several hops upstream still learns where the pipeline broke. Where a
link is emulated in userspace, the forwarder holds the request and the response as the link would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import numpy as np
import orjson

from services.contracts import codec
from services.contracts.codec import InferResponse, Parameters
from services.contracts.errors import MalformedBody, NextTierError, NextTierTimeout
from services.contracts.specs import TierName
from services.tier.links import UserspaceLink


@dataclass(frozen=True, slots=True)
class Forwarded:
    response: InferResponse
    bytes_out: int
    bytes_in: int
    send_ns: int


def _error_message(body: bytes) -> str:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode(errors="replace")
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    return body[:200].decode(errors="replace")


class Forwarder:
    """Sends a stage's outputs to the tier running the next stage and returns its answer."""

    def __init__(
        self,
        tier: TierName,
        endpoints: Mapping[TierName, str],
        links: Mapping[TierName, UserspaceLink | None],
        *,
        timeout_s: float,
    ) -> None:
        self._tier = tier
        self._endpoints = dict(endpoints)
        self._links = dict(links)
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self, next_tier: TierName, model: str, inputs: Mapping[str, np.ndarray], parameters: Parameters
    ) -> Forwarded:
        hop = f"{self._tier} -> {next_tier}"
        started = time.perf_counter_ns()
        encoded = codec.encode_request(inputs, parameters=parameters)
        body = encoded.body()
        try:
            async with asyncio.timeout(self._timeout_s):
                status, headers, answer = await self._exchange(next_tier, model, body, encoded.http_headers())
        except TimeoutError:
            raise NextTierTimeout(f"{hop}: no answer within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise NextTierError(f"{hop}: cannot reach {self._endpoints[next_tier]}: {exc}") from None
        if status != 200:
            message = f"{hop} answered {status}: {_error_message(answer)}"
            raise NextTierTimeout(message) if status == NextTierTimeout.status_code else NextTierError(message)
        try:
            header_length = codec.parse_header_length(headers.get(codec.HEADER_LENGTH_HTTP_HEADER))
            response = codec.decode_response(answer, header_length)
        except MalformedBody as exc:
            raise NextTierError(f"{hop} answered a malformed body: {exc.message}") from None
        return Forwarded(response, len(body), len(answer), time.perf_counter_ns() - started)

    async def _exchange(
        self, next_tier: TierName, model: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            raise NextTierError(f"{self._tier} -> {next_tier}: forwarder is not started")
        link = self._links.get(next_tier)
        if link is not None:
            await link.send(len(body))
        url = f"{self._endpoints[next_tier]}/v2/models/{model}/infer"
        async with self._session.post(url, data=body, headers=headers) as reply:
            answer = await reply.read()
            status, reply_headers = reply.status, reply.headers
        if link is not None:
            await link.receive(len(answer))
        return status, reply_headers, answer
