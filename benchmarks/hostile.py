"""The hostile-client benchmark (``make bench-hostile``, with the stack up): does a tier stay up, bounded and
available while hostile clients hammer it?

Against the mobile tier (the one a device's clients reach), ``--hostile`` connections in four kinds, a
quarter each, each reconnecting as soon as the tier drops it: heads that promise a body and send none,
bodies sent one byte a second, clients that pipeline requests and never read an answer, and 64 MiB JSON
tensors sent as fast as the socket takes them. Beside them one legitimate client sends ``--rate`` requests a
second (the unmodified ResNet subject on mobile, binary tensors, keep-alive), first alone (the quiet phase),
then with the hostile clients running.

Reported: whether the tier was OOM-killed or restarted, its resident memory's peak during the hostile
phase against the bound its limits give (the body budget, and a full head on every connection, over what it
held before), the legitimate client's success rate, and its p99 under attack ÷ its quiet p99. Goals: not
killed, RSS within the bound, success ≥ 99 %, p99 ratio ≤ 3. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from benchmarks.attack import KINDS
from loadgen.target import Stack
from services.contracts import codec
from services.contracts.dtypes import NUMPY_DTYPES
from services.contracts.errors import ConfigError
from services.contracts.transport import json_call
from services.stack.compose import CONTAINER_PORT
from services.stack.containers import PROJECT
from services.stack.docker import output
from services.tier.server import MAX_HEAD_BYTES

SUCCESS_GOAL = 0.99
P99_RATIO_GOAL = 3.0
MIB = 1 << 20


@dataclass
class Legit:
    """A client at a fixed rate on one keep-alive connection (reconnecting after an error)."""

    host: str
    port: int
    body: bytes
    headers: dict[str, str]
    path: str
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def run(self, rate_rps: float, duration_s: float) -> None:
        self.latencies_ms, self.failures = [], []
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        period = 1.0 / rate_rps
        started = time.perf_counter()
        for i in range(int(rate_rps * duration_s)):
            time.sleep(max(0.0, started + i * period - time.perf_counter()))
            sent = time.perf_counter()
            try:
                connection.request("POST", self.path, body=self.body, headers=self.headers)
                reply = connection.getresponse()
                text = reply.read()
                if reply.status != 200:
                    self.failures.append(f"{reply.status}: {text[:120]!r}")
                else:
                    self.latencies_ms.append((time.perf_counter() - sent) * 1e3)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        connection.close()

    @property
    def success(self) -> float:
        total = len(self.latencies_ms) + len(self.failures)
        return len(self.latencies_ms) / total if total else 0.0

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("inf")


def _attacker(stack: Stack, path: str, args: argparse.Namespace, header_bytes: int) -> subprocess.Popen[str]:
    """``benchmarks/attack.py`` in the tier image, on the device network (another address than this
    host's), limited to ``--attacker-cpus``: hostile clients on another machine."""
    if stack.state.images is None:
        raise ConfigError("the stack's state names no tier image: make up")
    image = stack.state.images.tier
    script = Path(__file__).with_name("attack.py").resolve()
    argv = ["docker", "run", "--rm", "--network", f"{PROJECT}_device", "--cpus", f"{args.attacker_cpus:g}",
            "--memory", "1g", "-v", f"{script}:/attack.py:ro", "--entrypoint", "python", image, "/attack.py",
            "--host", "mobile", "--port", str(CONTAINER_PORT), "--path", path, "--count", str(args.hostile),
            "--duration-s", str(args.hostile_s + 3), "--header-bytes", str(header_bytes),
            "--kinds", args.kinds]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _inputs_of(url: str, model: str) -> dict[str, np.ndarray]:
    """Zeros of each input the model's V2 metadata names (a free dimension as 1)."""
    code, metadata = json_call(f"{url}/v2/models/{model}")
    if code != 200:
        raise ConfigError(f"no metadata for {model}: {code} {metadata}")
    return {
        entry["name"]: np.zeros([max(d, 1) for d in entry["shape"]], NUMPY_DTYPES[entry["datatype"]])
        for entry in metadata["inputs"]
    }


def _container_facts(name: str) -> dict[str, Any]:
    facts = output(["docker", "inspect", name, "--format", "{{json .State}}"])
    state = json.loads(facts)
    restarts = output(["docker", "inspect", name, "--format", "{{.RestartCount}}"])
    return {"oom_killed": bool(state.get("OOMKilled")), "running": bool(state.get("Running")),
            "started_at": state.get("StartedAt"), "restarts": int(restarts or 0)}  # fmt: skip


def _setup(args: argparse.Namespace) -> tuple[Stack, Legit, int]:
    """The Docker stack, its mobile tier serving the model, and the legitimate client's request."""
    stack = Stack.from_state()
    stack.check_ready()
    if stack.runtime != "docker":
        raise ConfigError("needs the Docker stack (make up), whose tiers have memory limits")
    loaded = stack.load("mobile", args.model)
    if isinstance(loaded, str):
        raise ConfigError(f"{loaded} (make up SUBJECTS=fmnist-resnet)")
    entry = urlsplit(stack.urls["mobile"])
    path = f"/v2/models/{args.model}/infer"
    encoded = codec.encode_request(_inputs_of(stack.urls["mobile"], args.model), parameters={"placement": "M"})
    legit = Legit(entry.hostname or "127.0.0.1", entry.port or 80, encoded.body(), encoded.http_headers(), path)
    return stack, legit, encoded.header_length or 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hostile", type=int, default=200, help="hostile connections, a quarter of each kind")
    parser.add_argument("--rate", type=float, default=20.0, help="the legitimate client's requests per second")
    parser.add_argument("--quiet-s", type=float, default=60.0, help="as long as the hostile phase: p99s of as many")
    parser.add_argument("--hostile-s", type=float, default=60.0)
    parser.add_argument("--model", default="fmnist-resnet.identity")
    parser.add_argument("--attacker-cpus", type=float, default=1.0, help="the hostile clients' container's CPUs")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"some of {','.join(KINDS)}, shared evenly")
    args = parser.parse_args(argv)
    try:
        stack, legit, header_bytes = _setup(args)
    except ConfigError as exc:
        print(f"bench-hostile: {exc.message}", file=sys.stderr)
        return exc.exit_code
    status = stack.status("mobile")
    container = "tierlab_mobile_1"
    before = _container_facts(container)

    print(f"warming up, then {args.quiet_s:g} s of the legitimate client alone at {args.rate:g} req/s …",
          file=sys.stderr)  # fmt: skip
    legit.run(args.rate, 5.0)
    legit.run(args.rate, args.quiet_s)
    quiet = {"p50_ms": statistics.median(legit.latencies_ms), "p99_ms": legit.p99_ms, "success": legit.success}
    rss_before = stack.status("mobile").memory.rss_mib
    stack.reset_peak("mobile")

    print(f"{args.hostile_s:g} s with {args.hostile} hostile connections ({args.kinds}) from a container "
          f"of {args.attacker_cpus:g} CPU on the device network …", file=sys.stderr)  # fmt: skip
    attacker = _attacker(stack, legit.path, args, header_bytes)
    time.sleep(3)  # the hostile clients are connecting
    legit.run(args.rate, args.hostile_s)
    try:
        attacked, _ = attacker.communicate(timeout=120)
        answers = json.loads(attacked.strip().splitlines()[-1]) if attacked.strip() else {}
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        attacker.kill()
        answers = {}
    after = _container_facts(container)
    peak_mib = stack.status("mobile").memory.peak_rss_mib if after["running"] else None

    budget_mib = round(status.server.body_budget_bytes / MIB, 1)
    bound_mib = round(rss_before + budget_mib + status.server.max_connections * MAX_HEAD_BYTES / MIB, 1)
    result = {
        "hostile_connections": args.hostile,
        "oom_killed": after["oom_killed"],
        "restarted": after["started_at"] != before["started_at"] or not after["running"],
        "memory_limit_mib": round(limit / MIB, 1) if (limit := status.limits.memory_limit_bytes) else None,
        "rss_before_mib": rss_before,
        "rss_peak_mib": peak_mib,
        "rss_bound_mib": bound_mib,
        "body_budget_mib": budget_mib,
        "max_connections": status.server.max_connections,
        "legit_quiet_p99_ms": round(quiet["p99_ms"], 2),
        "legit_hostile_p99_ms": round(legit.p99_ms, 2),
        "legit_p99_ratio": round(legit.p99_ms / quiet["p99_ms"], 2),
        "legit_success": round(legit.success, 4),
        "legit_requests": len(legit.latencies_ms) + len(legit.failures),
        "hostile_answers": answers,
    }
    _report(result, legit, args)
    print(json.dumps(result))
    return 0


def _report(result: dict[str, Any], legit: Legit, args: argparse.Namespace) -> None:
    budget_mib, connections = result["body_budget_mib"], result["max_connections"]
    rss_before, bound_mib = result["rss_before_mib"], result["rss_bound_mib"]
    quiet_p99 = result["legit_quiet_p99_ms"]
    failures = sorted(set(legit.failures))[:5]
    print(f"\nmobile tier under {args.hostile} hostile connections for {args.hostile_s:g} s "
          f"(memory limit {result['memory_limit_mib']} MiB):")  # fmt: skip
    print(f"  OOM-killed: {result['oom_killed']}; restarted: {result['restarted']}")
    print(f"  RSS {rss_before} MiB before, peak {result['rss_peak_mib']} MiB during; bound {bound_mib} MiB "
          f"(before + body budget {budget_mib} MiB + a full head on each of "
          f"{connections} connections)")  # fmt: skip
    print(f"  legitimate client at {args.rate:g} req/s: success {legit.success:.2%} (goal ≥ {SUCCESS_GOAL:.0%}), "
          f"p99 {legit.p99_ms:.2f} ms vs {quiet_p99:.2f} ms quiet = {result['legit_p99_ratio']}× "
          f"(goal ≤ {P99_RATIO_GOAL:g}×)")  # fmt: skip
    if failures:
        print(f"  its failures: {failures}")
    for kind, answers in result["hostile_answers"].items():
        print(f"  {kind:14s} answered: {answers}")


if __name__ == "__main__":
    sys.exit(main())
