"""Run the three tiers as plain processes on this host: no Docker, for tests and fast iteration.

Each tier is the same entry point the containers use (``python -m services tier``), listening where
the deployment file says. ``LocalStack`` starts them, waits until every tier is ready, and stops them
(also on errors); a tier that dies while starting is reported with the end of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from services.contracts.specs import TIERS, TierName, load_deployment
from services.contracts.stack_state import LocalTierSpec, StackStateSpec
from services.contracts.transport import json_call

_POLL_INTERVAL_S = 0.1
_LOG_TAIL_BYTES = 4000


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now on 127.0.0.1 (for tests that start tiers side by side)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_get_json(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, Any]]:
    """GET a JSON document; (status, body as a dict, empty when it is none), status 0 when nothing answers."""
    code, body = json_call(url, timeout_s=timeout_s)
    return code, body if isinstance(body, dict) else {}


class LocalStack:
    """Three (or fewer) tier processes on this host, from one deployment file."""

    def __init__(
        self,
        deployment: Path,
        *,
        tiers: Sequence[TierName] = TIERS,
        tier_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        detach: bool = False,
    ) -> None:
        self.deployment = deployment
        self.spec = load_deployment(deployment)
        self.tiers = tuple(tiers)
        self.tier_args = tuple(tier_args)
        self.env_overrides = dict(env or {})
        self.env = {**os.environ, **self.env_overrides}
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tierlab-local-"))
        self.detach = detach  # tiers outlive this process (own session), stopped later by their pids
        self.processes: dict[TierName, subprocess.Popen[bytes]] = {}
        self.argvs: dict[TierName, list[str]] = {}

    def url(self, tier: TierName) -> str:
        return self.spec.tiers[tier].base_url

    def log_path(self, tier: TierName) -> Path:
        return self.log_dir / f"{tier}.log"

    def start(self, timeout_s: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for tier in self.tiers:
            port = self.url(tier).rsplit(":", 1)[1]
            argv = [
                sys.executable,
                "-m",
                "services",
                "tier",
                "--tier",
                tier,
                "--deployment",
                str(self.deployment),
                "--port",
                port,
                *self.tier_args,
            ]
            self.argvs[tier] = argv
            with self.log_path(tier).open("wb") as log:
                self.processes[tier] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=self.detach
                )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(self.tiers)
        while waiting:
            for tier in sorted(waiting):
                code = self.processes[tier].poll()
                if code is not None:
                    raise RuntimeError(f"{tier} tier exited with code {code} while starting:\n{self.log_tail(tier)}")
                status, _ = http_get_json(f"{self.url(tier)}/v2/health/ready")
                if status == 200:
                    waiting.discard(tier)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"tiers {sorted(waiting)} not ready after {timeout_s:g} s; logs in {self.log_dir}")
            if waiting:
                time.sleep(_POLL_INTERVAL_S)

    def log_tail(self, tier: TierName) -> str:
        data = self.log_path(tier).read_bytes() if self.log_path(tier).exists() else b""
        return data[-_LOG_TAIL_BYTES:].decode(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def state(self) -> StackStateSpec:
        """What another process needs to find, stop and start the tiers again (``services.stack.runtime``)."""
        return StackStateSpec(
            runtime="local",
            deployment=str(self.deployment),
            urls={t: self.url(t) for t in self.processes},
            env=self.env_overrides,
            tiers={
                t: LocalTierSpec(pid=p.pid, url=self.url(t), log=str(self.log_path(t)), argv=self.argvs[t])
                for t, p in self.processes.items()
            },
        )

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
