"""The client a tier uses to hand intermediate tensors to the next tier.

Tensors always travel as V2 binary data over kept-alive HTTP/1.1 connections, one small pool per next
tier. The client is an asyncio protocol over ``httptools`` (the parser uvicorn serves with) rather
than aiohttp or httpx: ``benchmarks/forwarding.py`` measures it against both, and the forward call is
the hop tax every partitioned request pays. The body's chunks (JSON header, then array views) are
written with ``writelines``: no join, no copy of the tensors.

Any failure becomes a :class:`~services.contracts.errors.NextTierError` (502),
:class:`~services.contracts.errors.NextTierTimeout` (504) or, when the next tier is busy or not ready,
:class:`~services.contracts.errors.Unavailable` (503 with its Retry-After), whose message names the hop
(``edge -> cloud``), so a client several hops upstream still learns where the pipeline broke. Where a
link is emulated in userspace, the forwarder holds the request and the response as the link would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import orjson

from services.contracts import codec
from services.contracts.codec import Buffer, InferResponse, Parameters
from services.contracts.errors import BadRequest, NextTierError, NextTierTimeout, Unavailable, hop_name
from services.contracts.specs import TierName
from services.contracts.transport import Pool, Reply
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


def _retry_after_s(value: str | None) -> int:
    """Retry-After in seconds (delta form); 1 when absent or an HTTP date."""
    return int(value) if value is not None and value.strip().isdigit() else 1


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
        self._pools: dict[TierName, Pool] = {}
        for peer, url in self._endpoints.items():
            parts = urlsplit(url)
            self._pools[peer] = Pool(parts.hostname or "127.0.0.1", parts.port or 80)

    @property
    def tier(self) -> TierName:
        return self._tier

    async def start(self) -> None:
        """Nothing to open ahead: connections are made on first use and kept alive."""

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def set_links(self, links: Mapping[TierName, UserspaceLink | None]) -> None:
        """Emulate new link conditions from the next request on (requests in flight keep the old ones)."""
        self._links = dict(links)

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def exchange(
        self,
        peer: TierName,
        path: str,
        headers: Mapping[str, str],
        chunks: Sequence[Buffer],
        size_bytes: int,
        *,
        timeout_s: float | None = None,
        emulate_link: bool = True,
    ) -> tuple[Reply, int]:
        """One POST to ``peer`` through the emulated link: (reply, elapsed ns). Raises the hop's 502/504.
        ``emulate_link=False`` leaves out what userspace adds (delay, rate): the path's own cost, for probes."""
        hop = hop_name(self._tier, peer)
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise NextTierTimeout(f"{hop}: the caller's time budget ran out before forwarding")
        pool = self._pools[peer]
        head = pool.post_head(path, headers, size_bytes)
        link = self._links.get(peer) if emulate_link else None
        started = time.perf_counter_ns()
        try:
            async with asyncio.timeout(timeout_s):
                if link is not None:
                    await link.send(size_bytes)
                reply = await pool.request(head, chunks)
                if link is not None:
                    await link.receive(len(reply.body))
        except TimeoutError:
            raise NextTierTimeout(f"{hop}: no answer within {timeout_s:.3g} s") from None
        except OSError as exc:
            raise NextTierError(f"{hop}: cannot reach {self._endpoints[peer]}: {exc}") from None
        return reply, time.perf_counter_ns() - started

    async def forward(
        self,
        next_tier: TierName,
        model: str,
        inputs: Mapping[str, np.ndarray],
        parameters: Parameters,
        *,
        timeout_s: float | None = None,
    ) -> Forwarded:
        hop = hop_name(self._tier, next_tier)
        started = time.perf_counter_ns()
        encoded = codec.encode_request(inputs, parameters=parameters)
        path = f"/v2/models/{model}/infer"
        reply, _ = await self.exchange(
            next_tier, path, encoded.http_headers(), encoded.chunks, encoded.size_bytes, timeout_s=timeout_s
        )
        if reply.status != 200:
            message = f"{hop} answered {reply.status}: {_error_message(reply.body)}"
            if reply.status == Unavailable.status_code:  # busy or not ready: the caller may retry, and when
                raise Unavailable(message, retry_after_s=_retry_after_s(reply.headers.get("retry-after")))
            raise (NextTierTimeout(message) if reply.status == NextTierTimeout.status_code else NextTierError(message))
        try:
            header_length = codec.parse_header_length(reply.headers.get(codec.HEADER_LENGTH_HTTP_HEADER.lower()))
            response = codec.decode_response(reply.body, header_length)
        except BadRequest as exc:  # the next tier's fault, never the client's
            raise NextTierError(f"{hop} answered a malformed body: {exc.message}") from None
        return Forwarded(response, encoded.size_bytes, len(reply.body), time.perf_counter_ns() - started)
