"""A tier that no request can stall: what can be refused is refused before the body is read, a body that
trickles in is cut off at the body deadline (408), and the number of bodies read at once is bounded (503)
— while health and other requests keep being answered. Real tier processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.contracts.specs import TIERS, TierName
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports
from services.tier.app import create_app
from tests.conftest import serve_in_process, v2_json_request

BODY_DEADLINE_S = 1.0
MAX_BODIES = 3


@pytest.fixture(scope="module")
def edge(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    folder = tmp_path_factory.mktemp("hostile")
    ports: dict[TierName, int] = dict(zip(TIERS, free_ports(3), strict=True))
    deployment = local_deployment(["demo-mlp/identity/manifest.json"], models_dir=str(demo_root), ports=ports)
    env = {"TIERLAB_BODY_DEADLINE_S": str(BODY_DEADLINE_S), "TIERLAB_MAX_BODIES": str(MAX_BODIES)}
    with LocalStack(write_deployment(deployment, folder / "d.yaml"), tiers=["edge"], env=env, log_dir=folder):
        yield "127.0.0.1", ports["edge"]


def _open_body(address: tuple[str, int], declared: int, sent: bytes) -> socket.socket:
    """Headers that promise ``declared`` bytes of body, then only ``sent`` of them."""
    sock = socket.create_connection(address, timeout=30)
    head = (f"POST /v2/models/demo-mlp.identity/infer HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n"
            f"content-length: {declared}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + sent)
    return sock


def _status(sock: socket.socket) -> int:
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return int(reply.split(b" ", 2)[1])


def _get(address: tuple[str, int], path: str) -> int:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\r\n".encode())
        return _status(sock)


def test_a_trickling_body_gets_408_at_the_deadline_and_the_tier_keeps_serving(edge: tuple[str, int]) -> None:
    with contextlib.closing(_open_body(edge, 10_000, b'{"inputs": [')) as slow:
        assert _get(edge, "/v2/health/live") == 200  # answered while the body hangs
        assert _status(slow) == 408  # cut off at the deadline, not held for ever (the socket waits 30 s at most)
    assert _get(edge, "/v2/health/ready") == 200


def test_bodies_beyond_the_bound_are_refused_before_they_are_read(edge: tuple[str, int]) -> None:
    held = [_open_body(edge, 10_000, b"{") for _ in range(MAX_BODIES)]
    try:
        time.sleep(0.3)  # the tier has started reading all of them
        with contextlib.closing(_open_body(edge, 10_000, b"{")) as one_more:
            assert _status(one_more) == 503
        assert _get(edge, "/v2/health/live") == 200
    finally:
        for sock in held:
            sock.close()


@pytest.mark.anyio
async def test_an_unknown_model_is_refused_before_its_body_is_read(tier_settings: Any) -> None:
    """The body never arrives: an answer can only come from checks made before reading it."""
    async with serve_in_process(tier_settings("edge")) as (tier, _):
        app = create_app(tier)
        sent: list[MutableMapping[str, Any]] = []

        async def never(*_: Any) -> dict[str, Any]:
            await asyncio.sleep(3600)
            raise AssertionError

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v2/models/nope/infer",
                 "headers": [(b"content-length", b"15000000")]}  # fmt: skip
        async with asyncio.timeout(5):
            await app(scope, never, send)
        assert sent[0]["status"] == 404


class SilentPeer:
    """A next tier that accepts connections and never answers; it notes when a connection is closed on it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted = threading.Event()
        self.closed_by_peer = threading.Event()
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.05)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.server.accept()
                conn.settimeout(0.05)
                self._held.append(conn)
                self.accepted.set()
            for conn in self._held:
                with contextlib.suppress(TimeoutError, OSError):
                    if conn.recv(1 << 16) == b"":
                        self.closed_by_peer.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self.server.close()


@pytest.fixture
def silent_peer() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    try:
        yield peer
    finally:
        peer.close()


def test_the_callers_budget_propagates_so_the_slow_hop_is_named(
    demo_root: Path, tmp_path: Path, silent_peer: SilentPeer
) -> None:
    mobile, edge = free_ports(2)
    ports: dict[TierName, int] = {"mobile": mobile, "edge": edge, "cloud": silent_peer.port}
    deployment = local_deployment(["demo-mlp/partition3/manifest.json"], models_dir=str(demo_root), ports=ports)
    with LocalStack(write_deployment(deployment, tmp_path / "d.yaml"), tiers=["mobile", "edge"], log_dir=tmp_path):
        body = json.dumps(v2_json_request(np.zeros((1, 64), np.float32), placement="M-E-C", timeout_ms=1500))
        request = urllib.request.Request(f"http://127.0.0.1:{mobile}/v2/models/demo-mlp.partition3/infer",
                                         data=body.encode(), headers={"content-type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=60)
    error = json.loads(raised.value.read())["error"]
    assert raised.value.code == 504
    # mobile passes on edge's 504: the hop that did not answer is edge -> cloud, not mobile -> edge
    assert error.startswith("mobile -> edge answered 504: edge -> cloud: no answer within"), error


def test_a_caller_that_goes_away_cancels_the_forward(demo_root: Path, tmp_path: Path, silent_peer: SilentPeer) -> None:
    mobile, cloud = free_ports(2)
    ports: dict[TierName, int] = {"mobile": mobile, "edge": silent_peer.port, "cloud": cloud}
    deployment = local_deployment(["demo-mlp/partition3/manifest.json"], models_dir=str(demo_root), ports=ports)
    with LocalStack(write_deployment(deployment, tmp_path / "d.yaml"), tiers=["mobile"], log_dir=tmp_path):
        body = json.dumps(v2_json_request(np.zeros((1, 64), np.float32), placement="M-E-C")).encode()
        with socket.create_connection(("127.0.0.1", mobile), timeout=30) as client:
            head = b"POST /v2/models/demo-mlp.partition3/infer HTTP/1.1\r\nhost: mobile\r\n"
            client.sendall(head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            assert silent_peer.accepted.wait(30), "mobile forwarded to edge"
        # the client is gone: mobile stops waiting on edge (its forward timeout is 30 s) and closes that call
        assert silent_peer.closed_by_peer.wait(10), "mobile kept the forward open after its caller left"
