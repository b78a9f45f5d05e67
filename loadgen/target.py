"""The system under test, as the loadgen sees it: the tiers of a running stack.

Requests enter at the mobile tier (the device): a placement that starts on edge or cloud is relayed by
the device over its link, as the input would travel. The stack is found from ``.local/stack.json``
(written by ``make up``, Docker or local); control calls re-shape and probe links between runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pydantic import ValidationError

from services.contracts import codec
from services.contracts import pipeline as p
from services.contracts.codec import Buffer
from services.contracts.errors import ConfigError, MalformedBody, StackNotUp, hop_name
from services.contracts.repository import RepositoryModelSpec
from services.contracts.runtime import TierRuntime, Unsupported, runtime_for
from services.contracts.specs import TIERS, LinkMeasurementSpec, LinkName, LinkSpec, TierName
from services.contracts.stack_state import StackStateSpec, read_stack_state
from services.contracts.tier_status import TierStatusSpec, read_tier_status
from services.contracts.transport import Pool, Reply, probe_links, use_stack_token
from services.contracts.transport import json_call as control

STATE_FILE = Path(".local/stack.json")
CLIENT_OVERHEAD_PAIRS = 200
CLIENT_OVERHEAD_WARMUP = 20
CLIENT_OVERHEAD_GAP_S = 0.002  # a pause, as between requests at a few hundred per second


@dataclass(frozen=True)
class Answer:
    status: int
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    error: str
    bytes_out: int
    bytes_in: int


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """An infer request ready to write: its HTTP head and body buffers."""

    head: bytes
    body: Sequence[Buffer]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Sent:
    """A request's reply (None when none came, with ``error`` saying why) and when it was in (perf_counter ns)."""

    reply: Reply | None
    error: str
    ended_ns: int


class Stack:
    """The running tiers: where to send, how to re-shape and measure links, what they serve."""

    def __init__(self, urls: dict[TierName, str], state: StackStateSpec, state_file: Path | None = None) -> None:
        self.urls = urls
        self.state = state
        self.state_file = state_file
        entry = urlsplit(urls["mobile"])
        self.pool = Pool(entry.hostname or "127.0.0.1", entry.port or 80)

    @classmethod
    def from_state(cls, path: Path = STATE_FILE) -> Stack:
        """The stack ``make up`` recorded (``check_ready`` says whether it serves)."""
        state = read_stack_state(path)
        if state is None:
            raise StackNotUp(f"no stack is up ({path} is missing or not a stack's state): run `make up` first")
        missing = [t for t in TIERS if t not in state.urls]
        if missing:
            raise StackNotUp(f"the stack in {path} has no {', '.join(missing)} tier: make up")
        urls = {t: state.urls[t] for t in TIERS}
        use_stack_token(state)  # control calls (links, loads, probes) carry the stack's token
        return cls(urls, state, path)

    entry_hop = hop_name("loadgen", "mobile")

    @property
    def runtime(self) -> str:
        return self.state.runtime

    def check_ready(self) -> None:
        for tier in TIERS:
            code, body = control(f"{self.urls[tier]}/v2/health/ready", timeout_s=5)
            if code != 200:
                raise StackNotUp(f"{tier} at {self.urls[tier]} is not ready ({code}: {body}); see `make status`")

    def status(self, tier: TierName) -> TierStatusSpec:
        code, body = control(f"{self.urls[tier]}/tierlab/status")
        if code != 200:
            raise ConfigError(f"{tier} status failed: {code} {body}")
        try:
            return read_tier_status(body)
        except ValidationError as exc:
            raise ConfigError(f"{tier} answered a status this loadgen cannot read: {exc}") from None

    def reset_peak(self, tier: TierName) -> None:
        """Start a new resident-memory peak on ``tier`` (best effort: a tier that is down has none)."""
        control(f"{self.urls[tier]}/tierlab/memory/reset-peak", method="POST", body={})

    def oom_killed(self) -> list[TierName]:
        """The tiers the kernel's OOM killer stopped, where the runtime can tell (Docker's OOMKilled); none
        where no runtime is installed (the in-stack loadgen)."""
        try:
            return self.runtime_control().oom_killed()
        except Unsupported:
            return []

    def metrics_bind(self) -> str | None:
        """Where a loadgen on this host listens for the stack's Prometheus; None where it cannot reach us."""
        try:
            return self.runtime_control().metrics_bind()
        except Unsupported:
            return None

    def runtime_control(self) -> TierRuntime:
        """The stack's runtime (kill, pause, limits …) for fault scenarios (``services.contracts.runtime``)."""
        return runtime_for(self.state, self.state_file)

    def served_placements(self, model: str) -> list[str] | None:
        """The placements the stack serves ``model`` under; None when it does not serve it."""
        code, body = control(f"{self.urls['mobile']}/v2/models/{model}")
        if code != 200:
            return None
        return str(body["parameters"]["placements"]).split(",")

    def index(self, tier: TierName) -> dict[str, RepositoryModelSpec]:
        """The tier's model repository: every model it can serve, by name, with its state."""
        code, body = control(f"{self.urls[tier]}/v2/repository/index", method="POST", body={})
        if code != 200:
            raise ConfigError(f"{tier} repository index failed: {code} {body}")
        return {e["name"]: RepositoryModelSpec.model_validate(e) for e in body}

    def load(self, tier: TierName, model: str) -> RepositoryModelSpec | str:
        """Load ``model`` on ``tier``: its index entry with the measured costs, or why it cannot be loaded."""
        code, body = control(
            f"{self.urls[tier]}/v2/repository/models/{model}/load", method="POST", body={}, timeout_s=600
        )
        if code == 200:
            return RepositoryModelSpec.model_validate(body)
        return f"{tier} cannot load {model}: {body.get('error', body) if isinstance(body, dict) else body}"

    def unload(self, tier: TierName, model: str) -> None:
        code, body = control(f"{self.urls[tier]}/v2/repository/models/{model}/unload", method="POST", body={})
        if code != 200:
            raise ConfigError(f"{tier} could not unload {model}: {code} {body}")

    def shape(self, links: dict[LinkName, LinkSpec]) -> list[dict[str, Any]]:
        """Apply link conditions to every tier (no restart); returns the link states the tiers report.
        All tiers or none: a tier that refuses puts the tiers already re-shaped back as they were."""
        body = {name: spec.model_dump(mode="json") for name, spec in links.items()}
        states: list[dict[str, Any]] = []
        done: dict[TierName, dict[LinkName, dict[str, Any]]] = {}
        for tier in TIERS:
            before = {s.link: s.conditions().model_dump(mode="json") for s in self.status(tier).links}
            code, reply = control(f"{self.urls[tier]}/tierlab/links", method="PUT", body=body)
            if code != 200:
                for shaped, old in done.items():
                    control(f"{self.urls[shaped]}/tierlab/links", method="PUT", body=old)
                raise ConfigError(f"{tier} refused the link conditions: {code} {reply.get('error', reply)}")
            done[tier] = before
            states += reply["links"]
        return states

    def measure_links(self, pings: int = 20, bulk_s: float = 0.5) -> list[LinkMeasurementSpec]:
        return probe_links(self.urls, pings=pings, bulk_s=bulk_s)

    def prepare(
        self, model: str, inputs: dict[str, np.ndarray], *, placement: str, request_id: str, timeout_s: float
    ) -> PreparedRequest:
        """A request encoded and framed, ready to write: the loadgen does this before the request is due."""
        # the tiers get the budget less a margin: a slow hop times out in a tier, which names it, before here
        budget_ms = p.forward_budget_s(timeout_s * 1e3, 0, 0, timeout_s) * 1e3
        parameters: codec.Parameters = {
            p.PLACEMENT: placement,
            p.REQUEST_ID: request_id,
            p.TIMEOUT_MS: round(budget_ms, 3),
        }
        encoded = codec.encode_request(inputs, parameters=parameters)
        head = self.pool.post_head(f"/v2/models/{model}/infer", encoded.http_headers(), encoded.size_bytes)
        return PreparedRequest(head, encoded.chunks, encoded.size_bytes)

    async def send(self, request: PreparedRequest, *, timeout_s: float) -> Sent:
        """Write ``request`` and wait for the reply; the end time is taken as the reply is in, before decoding."""
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self.pool.request(request.head, request.body)
            return Sent(reply, "", time.perf_counter_ns())
        except TimeoutError:
            return Sent(None, f"{self.entry_hop}: no answer within {timeout_s:g} s", time.perf_counter_ns())
        except OSError as exc:
            return Sent(None, f"{self.entry_hop}: cannot reach {self.urls['mobile']}: {exc}", time.perf_counter_ns())

    def answer(self, request: PreparedRequest, sent: Sent) -> Answer:
        """What the reply says; a failure of any kind is an answer with a status and an error, never an exception."""
        reply, size = sent.reply, request.size_bytes
        if reply is None:
            return Answer(0, {}, {}, sent.error, size, 0)
        if reply.status != 200:
            try:
                message = str(json.loads(reply.body).get("error", reply.body[:200]))
            except ValueError:
                message = reply.body[:200].decode(errors="replace")
            return Answer(reply.status, {}, {}, message, size, len(reply.body))
        try:
            header = codec.parse_header_length(reply.headers.get(codec.HEADER_LENGTH_HTTP_HEADER.lower()))
            response = codec.decode_response(reply.body, header)
        except MalformedBody as exc:
            return Answer(0, {}, {}, f"{self.entry_hop}: malformed answer: {exc.message}", size, len(reply.body))
        return Answer(200, response.outputs, dict(response.parameters), "", size, len(reply.body))

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, placement: str, request_id: str, timeout_s: float
    ) -> Answer:
        """One request, prepared, sent and read at once (warm-up and control use; runs split the three)."""
        request = self.prepare(model, inputs, placement=placement, request_id=request_id, timeout_s=timeout_s)
        return self.answer(request, await self.send(request, timeout_s=timeout_s))

    async def client_overhead(self, pairs: int = CLIENT_OVERHEAD_PAIRS) -> dict[str, float]:
        """The loadgen's HTTP client's own share of a round trip: ``GET /v2/health/live`` on the entry tier
        through the client and over a bare socket (``paired_overhead``). The loadgen's other work is off the
        measured path."""
        entry = urlsplit(self.urls["mobile"])
        head = f"GET /v2/health/live HTTP/1.1\r\nHost: {entry.netloc}\r\n\r\n".encode("latin-1")
        return await paired_overhead(self.pool, (entry.hostname or "127.0.0.1", entry.port or 80), head, (), pairs)

    def close(self) -> None:
        self.pool.close()


async def paired_overhead(
    pool: Pool,
    address: tuple[str, int],
    head: bytes,
    body: Sequence[Buffer],
    pairs: int,
    *,
    gap_s: float = CLIENT_OVERHEAD_GAP_S,
    warmup: int = CLIENT_OVERHEAD_WARMUP,
) -> dict[str, float]:
    """The same request through ``pool`` and over a bare blocking socket to ``address``, in pairs: random
    order, each pair after a pause of ``gap_s`` and one discarded bare exchange (it wakes what the pause put
    to sleep, so both of the pair run warm); the medians and the median of the differences, in ms."""
    payload = head + b"".join(bytes(part) for part in body)
    rng = random.Random(0)
    client_ms: list[float] = []
    bare_ms: list[float] = []
    with socket.create_connection(address, timeout=5) as bare:
        bare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pairs + warmup):
            await asyncio.sleep(gap_s)
            bare_exchange(bare, payload)
            for through_pool in (True, False) if rng.random() < 0.5 else (False, True):
                began_ns = time.perf_counter_ns()
                if through_pool:
                    await pool.request(head, body)
                else:
                    bare_exchange(bare, payload)
                (client_ms if through_pool else bare_ms).append((time.perf_counter_ns() - began_ns) / 1e6)
    client, floor = client_ms[warmup:], bare_ms[warmup:]
    return {
        "client_ms_p50": round(statistics.median(client), 4),
        "bare_socket_ms_p50": round(statistics.median(floor), 4),
        "overhead_ms_p50": round(statistics.median(c - b for c, b in zip(client, floor, strict=True)), 4),
        "pairs": pairs,
    }


def bare_exchange(connection: socket.socket, request: bytes) -> None:
    """Send ``request`` and read one whole response (head and Content-Length body) with blocking calls."""
    connection.sendall(request)
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the entry tier closed the connection")
        data += chunk
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < end + 4 + length:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the entry tier closed the connection")
        data += chunk
