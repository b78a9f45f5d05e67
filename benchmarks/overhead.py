"""What the testbed itself costs, measured side by side in one run (``make bench-overhead``).

P1 hop tax     a 3-stage pipeline (M-E-C) on loopback, unshaped, whose stages only relay a tensor of
               4 KB, 200 KB or 1 MB; e2e latency minus the same submodels' in-process onnxruntime
               compute, divided by the 3 hops it crosses (client → mobile → edge → cloud), under tierlab's
               server and under uvicorn in alternating rounds. Goal ≤ 1 ms p50, and at 1 MB ≤ 0.5× uvicorn's.
P2 codec       encode + decode throughput of the V2 binary codec vs base64-in-JSON (what the studies sent)
               on a 1 MB tensor. Goal ≥ 2 GB/s and ≥ 20× base64-JSON.
P3 throughput  requests/s of one tier at concurrency 4 vs the same model in-process with the same
               onnxruntime threads. Goal ≥ 90 %.

The last line printed is one JSON object for tracking results over time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import helper

from services.contracts import codec
from services.contracts.calibration import session_options
from services.contracts.specs import TIERS
from services.contracts.variant import StageModel, write_variant
from services.demo import local_deployment, onnx_model, write_deployment
from services.local import LocalStack, free_ports
from services.tier.limits import host_cpu_count, read_limits

RELAY_SIZES_BYTES = {"4KB": 4 * 1024, "200KB": 200 * 1024, "1MB": 1024 * 1024}
HOPS = 3
P3_DIM = 1024
P3_LAYERS = 4
P3_BATCH = 8
P3_CONCURRENCY = 4


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ------------------------------------------------------------------------------------------ models


def build_relay(root: Path, label: str, size_bytes: int) -> str:
    """A 3-stage variant passing a ``size_bytes`` FP32 tensor stage to stage, answering a scalar."""
    n = size_bytes // 4
    scale = {"scale": np.array(1.0001, np.float32)}
    shift = {"shift": np.array(0.5, np.float32)}
    stages = [
        onnx_model("relay0", [helper.make_node("Mul", ["x", "scale"], ["h0"])], {"x": [1, n]}, {"h0": [1, n]}, scale),
        onnx_model(
            "relay1",
            [helper.make_node("Add", ["h0", "shift"], ["h1"])],
            {"h0": [1, n]},
            {"h1": [1, n]},
            shift,
        ),
        onnx_model(
            "relay2",
            [helper.make_node("ReduceMax", ["h1"], ["y"], axes=[1], keepdims=1)],
            {"h1": [1, n]},
            {"y": [1, 1]},
            {},
        ),
    ]
    name = f"relay-{label}.partition3"
    write_variant(
        root / name,
        name=name,
        subject=f"relay-{label}",
        operator="partition",
        stages=[StageModel(m) for m in stages],
        outputs=["y"],
    )
    return name


def build_dense(root: Path) -> str:
    """A compute-bound one-stage model (a few ms per batch) for the throughput comparison."""
    rng = np.random.default_rng(0)
    nodes, weights, source = [], {}, "x"
    for layer in range(P3_LAYERS):
        target = "y" if layer == P3_LAYERS - 1 else f"h{layer}"
        weights[f"w{layer}"] = (rng.normal(size=(P3_DIM, P3_DIM)) / np.sqrt(P3_DIM)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [source, f"w{layer}"], [target]))
        source = target
    model = onnx_model("dense", nodes, {"x": ["batch", P3_DIM]}, {"y": ["batch", P3_DIM]}, weights)
    name = "dense.identity"
    write_variant(
        root / name,
        name=name,
        subject="dense",
        operator="identity",
        stages=[StageModel(model)],
        outputs=["y"],
    )
    return name


# --------------------------------------------------------------------------------------------- P1


class Client:
    """A kept-alive stdlib HTTP client: the leanest way to time a request from Python."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, encoded: codec.Encoded) -> bytes:
        self.connection.request("POST", path, body=encoded.body(), headers=encoded.http_headers())
        reply = self.connection.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{path}: {reply.status} {body[:300]!r}")
        return body

    def close(self) -> None:
        self.connection.close()


def _sink(listener: socket.socket, size: int) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(size))
    while True:
        received = 0
        while received < size:
            n = connection.recv_into(buffer[received:])
            if not n:
                return
            received += n
        connection.sendall(b"ok")


def socket_floor_ms(size_bytes: int, requests: int) -> list[float]:
    """Send ``size_bytes`` to another process over loopback TCP and wait for 2 bytes back: the kernel's floor."""
    listener = socket.create_server(("127.0.0.1", 0))
    sink = multiprocessing.get_context("fork").Process(target=_sink, args=(listener, size_bytes), daemon=True)
    sink.start()
    data = b"x" * size_bytes
    times = []
    with socket.create_connection(listener.getsockname()) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(requests + requests // 10):
            started = time.perf_counter_ns()
            client.sendall(data)
            client.recv(2)
            if i >= requests // 10:
                times.append((time.perf_counter_ns() - started) / 1e6)
    sink.join(5)
    listener.close()
    return times


@contextlib.contextmanager
def null_tier(port: int, server: str = "tierlab") -> Iterator[str]:
    """The null tier in its own process, under the tiers' server (``tierlab``) or ``uvicorn``."""
    argv = [sys.executable, "-m", "benchmarks.null_tier", "--port", str(port), "--server", server]
    process = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the null tier did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def round_trips_ms(url: str, path: str, encoded: codec.Encoded, requests: int) -> list[float]:
    client = Client(url)
    try:
        for _ in range(max(20, requests // 10)):
            client.post(path, encoded)
        times = []
        for _ in range(requests):
            started = time.perf_counter_ns()
            client.post(path, encoded)
            times.append((time.perf_counter_ns() - started) / 1e6)
        return times
    finally:
        client.close()


def inprocess_stage_ms(folder: Path, feeds: dict[str, np.ndarray], threads: int, repeats: int) -> float:
    """Median in-process onnxruntime time of each stage of a variant, summed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    total = 0.0
    for stage in manifest["stages"]:
        session = ort.InferenceSession(str(folder / stage["file"]), session_options(threads, allow_spinning=False))
        outputs = [o["name"] for o in stage["outputs"]]
        for _ in range(20):
            result = session.run(outputs, feeds)
        times = []
        for _ in range(repeats):
            started = time.perf_counter_ns()
            result = session.run(outputs, feeds)
            times.append((time.perf_counter_ns() - started) / 1e6)
        feeds = dict(zip(outputs, result, strict=True))
        total += statistics.median(times)
    return total


def _relay_request(label: str) -> tuple[np.ndarray, codec.Encoded]:
    """The relays' input of size ``label`` and its V2 request, sent through all three tiers."""
    x = np.random.default_rng(0).normal(size=(1, RELAY_SIZES_BYTES[label] // 4)).astype(np.float32)
    return x, codec.encode_request({"x": x}, parameters={"placement": "M-E-C"})


def hop_taxes_ms(
    stack: LocalStack, model: str, encoded: codec.Encoded, requests: int, compute_ms: float
) -> list[float]:
    """Per request through ``stack``'s three tiers: (e2e - the stages' in-process compute) / 3 hops."""
    e2e = round_trips_ms(stack.url("mobile"), f"/v2/models/{model}/infer", encoded, requests)
    return [(t - compute_ms) / HOPS for t in e2e]


def p1_hop_tax(
    stacks: dict[str, LocalStack], root: Path, models: dict[str, str], *, threads: int, requests: int, rounds: int
) -> dict[str, Any]:
    """Per tensor size: the hop tax through the same relays under tierlab's server and under uvicorn, in
    alternating rounds (a burst of load on the machine lands on both, not on one), each server's p50 the
    median of its rounds' p50s; and one round trip of the same body to the null tier under each server and
    over a bare socket (the floors the hop is compared with)."""
    results: dict[str, Any] = {}
    per_round = max(20, requests // rounds)
    with null_tier(free_ports(1)[0], "tierlab") as null_url, null_tier(free_ports(1)[0], "uvicorn") as uvicorn_url:
        for label, model in models.items():
            x, encoded = _relay_request(label)
            compute_ms = inprocess_stage_ms(root / model, {"x": x}, threads, repeats=100)
            taxes: dict[str, list[float]] = {server: [] for server in stacks}
            p50s: dict[str, list[float]] = {server: [] for server in stacks}
            for _ in range(rounds):
                for server, stack in stacks.items():
                    tax = hop_taxes_ms(stack, model, encoded, per_round, compute_ms)
                    taxes[server] += tax
                    p50s[server].append(percentile(tax, 50))
            null = round_trips_ms(null_url, "/", encoded, requests)
            null_uvicorn = round_trips_ms(uvicorn_url, "/", encoded, requests)
            floor = socket_floor_ms(encoded.size_bytes, requests)
            hop_p50 = statistics.median(p50s["tierlab"])
            results[label] = {
                "e2e_ms_p50": hop_p50 * HOPS + compute_ms,
                "e2e_ms_p99": percentile(taxes["tierlab"], 99) * HOPS + compute_ms,
                "compute_ms": compute_ms,
                "hop_tax_ms_p50": hop_p50,
                "hop_tax_ms_p99": percentile(taxes["tierlab"], 99),
                "hop_tax_uvicorn_ms_p50": statistics.median(p50s["uvicorn"]),
                "hop_tax_ratio_by_round": [t / u for t, u in zip(p50s["tierlab"], p50s["uvicorn"], strict=True)],
                "null_tierlab_ms_p50": percentile(null, 50),
                "null_uvicorn_ms_p50": percentile(null_uvicorn, 50),
                "socket_floor_ms_p50": percentile(floor, 50),
            }
    return results


# --------------------------------------------------------------------------------------------- P2


def _rate_gb_s(work: Callable[[], object], size_bytes: int, min_time_s: float = 1.0) -> float:
    work()
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_time_s:
        work()
        runs += 1
    return runs * size_bytes / elapsed / 1e9


def p2_codec() -> dict[str, float]:
    tensor = np.random.default_rng(0).normal(size=(1, 262144)).astype(np.float32)  # 1 MiB

    def binary() -> object:
        encoded = codec.encode_request({"x": tensor})
        return codec.decode_request(encoded.body(), encoded.header_length).inputs["x"]

    def base64_json() -> object:
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": list(tensor.shape),
                        "data": base64.b64encode(tensor.tobytes()).decode(),
                    }
                ]
            }
        )
        entry = json.loads(body)["inputs"][0]
        return np.frombuffer(base64.b64decode(entry["data"]), np.float32).reshape(entry["shape"])

    assert np.array_equal(binary(), base64_json())  # type: ignore[arg-type]
    binary_gbps, base64_gbps = _rate_gb_s(binary, tensor.nbytes), _rate_gb_s(base64_json, tensor.nbytes)
    return {
        "codec_gbps": binary_gbps,
        "base64_json_gbps": base64_gbps,
        "vs_base64": binary_gbps / base64_gbps,
    }


# --------------------------------------------------------------------------------------------- P3


def _closed_loop_rps(call: Callable[[], object], concurrency: int, duration_s: float) -> float:
    counts = [0] * concurrency
    stop = time.perf_counter() + duration_s

    def worker(index: int) -> None:
        while time.perf_counter() < stop:
            call()
            counts[index] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid`` so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def p3_throughput(
    stack: LocalStack, root: Path, model: str, threads: int, *, duration_s: float, rounds: int
) -> dict[str, float]:
    """In-process and tier throughput in alternating rounds (medians), and where the tier's CPU goes: per
    request, its event-loop thread, its other threads (onnxruntime and the compute slot), and the client."""
    x = np.random.default_rng(0).normal(size=(P3_BATCH, P3_DIM)).astype(np.float32)
    session = ort.InferenceSession(str(root / model / "stage0.onnx"), session_options(threads, allow_spinning=False))
    encoded = codec.encode_request({"x": x}, parameters={"placement": "E"})
    local = threading.local()

    def call() -> object:
        if not hasattr(local, "client"):
            local.client = Client(stack.url("edge"))
        return local.client.post(f"/v2/models/{model}/infer", encoded)

    pid = stack.processes["edge"].pid
    _closed_loop_rps(lambda: session.run(None, {"x": x}), 1, 1.0)
    _closed_loop_rps(call, P3_CONCURRENCY, 1.0)
    inprocess, served, ort_cpu_ms, loop_ms, workers_ms, client_ms, busy = [], [], [], [], [], [], []
    for _ in range(rounds):
        cpu = time.process_time()
        rps = _closed_loop_rps(lambda: session.run(None, {"x": x}), 1, duration_s / rounds)
        inprocess.append(rps)
        ort_cpu_ms.append((time.process_time() - cpu) * 1e3 / (rps * duration_s / rounds))
        before, cpu, started = _thread_cpu_s(pid), time.process_time(), time.perf_counter()
        computed = _compute_seconds(stack.url("edge"))
        rps = _closed_loop_rps(call, P3_CONCURRENCY, duration_s / rounds)
        elapsed_s = time.perf_counter() - started
        requests = rps * elapsed_s
        client_ms.append((time.process_time() - cpu) * 1e3 / requests)
        busy.append((_compute_seconds(stack.url("edge")) - computed) / elapsed_s)
        after = _thread_cpu_s(pid)
        spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
        loop_ms.append(spent.get(pid, 0.0) * 1e3 / requests)
        workers_ms.append(sum(v for tid, v in spent.items() if tid != pid) * 1e3 / requests)
        served.append(rps)
    med = statistics.median
    cpu_ms = med(workers_ms) + med(loop_ms) + med(client_ms)
    return {
        "inprocess_rps": med(inprocess),
        "tier_rps": med(served),
        "ratio": med(served) / med(inprocess),
        "tier_compute_utilisation": med(busy),
        "inprocess_cpu_ms": med(ort_cpu_ms),
        "tier_workers_cpu_ms": med(workers_ms),
        "tier_loop_cpu_ms": med(loop_ms),
        "client_cpu_ms": med(client_ms),
        # what the machine's cores allow when every request costs this much CPU, wherever it runs
        "cores_ceiling_rps": host_cpu_count() / cpu_ms * 1e3,
        "ceiling_ratio": min(host_cpu_count() / cpu_ms * 1e3, med(inprocess)) / med(inprocess),
    }


def _compute_seconds(url: str) -> float:
    """Seconds the tier's stages have spent computing, from its own Prometheus metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    pattern = re.compile(r'^tierlab_stage_duration_seconds_sum\{[^}]*phase="compute"[^}]*\} (\S+)$', re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="P1 requests per tensor size")
    parser.add_argument("--duration-s", type=float, default=6.0, help="P3 measuring time per side")
    parser.add_argument("--rounds", type=int, default=3, help="P1 and P3 alternating rounds (medians reported)")
    args = parser.parse_args(argv)

    cores = read_limits().intra_op_threads(host_cpu_count())
    tier_args = ["--log-level", "warning", "--no-allow-spinning"]
    with tempfile.TemporaryDirectory(prefix="tierlab-bench-") as tmp:
        root = Path(tmp)
        relays = {label: build_relay(root, label, size) for label, size in RELAY_SIZES_BYTES.items()}
        dense = build_dense(root)

        def deployment(models: list[str], name: str) -> Path:
            ports = dict(zip(TIERS, free_ports(3), strict=True))
            return write_deployment(local_deployment(models, models_dir=str(root), ports=ports), root / name)

        def relay_stack(server: str) -> LocalStack:
            return LocalStack(
                deployment(list(relays.values()), f"p1-{server}.yaml"),
                log_dir=root / f"logs-p1-{server}",
                tier_args=[*tier_args, "--intra-op-threads", str(cores), "--http-server", server],
            )

        print(f"P1: three tiers on loopback ({cores} onnxruntime threads each) under tierlab's server and under "
              f"uvicorn, {args.rounds} alternating rounds …", file=sys.stderr)  # fmt: skip
        with relay_stack("tierlab") as ours, relay_stack("uvicorn") as theirs:
            stacks = {"tierlab": ours, "uvicorn": theirs}
            p1 = p1_hop_tax(stacks, root, relays, threads=cores, requests=args.requests, rounds=args.rounds)
        p3: dict[int, dict[str, float]] = {}
        for threads in sorted({1, cores}):
            print(f"P3: one tier, {threads} onnxruntime thread(s) …", file=sys.stderr)
            with LocalStack(
                deployment([dense], f"p3-{threads}.yaml"),
                tiers=("edge",),
                log_dir=root / f"logs-p3-{threads}",
                tier_args=[*tier_args, "--intra-op-threads", str(threads)],
            ) as stack:
                p3[threads] = p3_throughput(stack, root, dense, threads, duration_s=args.duration_s, rounds=args.rounds)
    p2 = p2_codec()
    report(p1, p2, p3, cores)
    return 0


def report(p1: dict[str, Any], p2: dict[str, float], p3: dict[int, dict[str, float]], cores: int) -> None:
    print("\nP1 hop tax (M-E-C on loopback, unshaped; per hop = (e2e - in-process compute) / 3), ms p50")
    print(f"{'tensor':>8} {'e2e':>7} {'e2e p99':>8} {'hop':>7} {'hop p99':>8} {'uvicorn hop':>12}")
    for label, r in p1.items():
        print(
            f"{label:>8} {r['e2e_ms_p50']:7.3f} {r['e2e_ms_p99']:8.3f} {r['hop_tax_ms_p50']:7.3f} "
            f"{r['hop_tax_ms_p99']:8.3f} {r['hop_tax_uvicorn_ms_p50']:12.3f}"
        )
    worst = max(p1.values(), key=lambda r: r["hop_tax_ms_p50"])
    print(f"  goal ≤ 1.0 ms p50 per hop up to 1 MB: worst {worst['hop_tax_ms_p50']:.3f} ms (under uvicorn "
          f"{max(r['hop_tax_uvicorn_ms_p50'] for r in p1.values()):.3f} ms)")  # fmt: skip
    for label, r in p1.items():
        rounds = ", ".join(f"{v:.2f}" for v in r["hop_tax_ratio_by_round"])
        print(f"  {label}: hop ÷ uvicorn's hop {r['hop_tax_ms_p50'] / r['hop_tax_uvicorn_ms_p50']:.2f}× "
              f"(rounds: {rounds})")  # fmt: skip
    print("  each step's share of a hop, ms p50 (one round trip of the same body from another process):")
    print(f"{'tensor':>8} {'kernel':>8} {'+ server':>9} {'+ tier':>8} {'= hop':>7}   {'uvicorn server':>15}")
    for label, r in p1.items():
        kernel, server = r["socket_floor_ms_p50"], r["null_tierlab_ms_p50"]
        print(
            f"{label:>8} {kernel:8.3f} {server - kernel:9.3f} {r['hop_tax_ms_p50'] - server:8.3f} "
            f"{r['hop_tax_ms_p50']:7.3f}   {r['null_uvicorn_ms_p50'] - kernel:15.3f}"
        )
    print(
        "  kernel: a bare socket between two processes; server: a null app under tierlab's server, less the"
        " kernel;\n  tier: decode, plan, the onnxruntime call, encode, forward and metrics, less both"
    )
    print(
        f"\nP2 codec on 1 MiB: binary {p2['codec_gbps']:.2f} GB/s, base64-JSON {p2['base64_json_gbps']:.3f} GB/s, "
        f"{p2['vs_base64']:.0f}×   (goal ≥ 2 GB/s and ≥ 20×)"
    )
    print(
        f"\nP3 throughput ({P3_LAYERS}×{P3_DIM}² MatMul, batch {P3_BATCH}, concurrency {P3_CONCURRENCY}; "
        f"the client shares this machine's {host_cpu_count()} cores; medians of alternating rounds)"
    )
    for threads, r in p3.items():
        print(
            f"  {threads} thread(s): tier {r['tier_rps']:.0f} req/s vs in-process {r['inprocess_rps']:.0f} req/s "
            f"= {r['ratio']:.1%}   (goal ≥ 90 %)"
        )
        print(
            f"      CPU per request: onnxruntime {r['tier_workers_cpu_ms']:.3f} ms in the tier "
            f"({r['inprocess_cpu_ms']:.3f} ms in-process), the tier's event loop {r['tier_loop_cpu_ms']:.3f} ms, "
            f"the client {r['client_cpu_ms']:.3f} ms"
        )
        print(
            f"      at that CPU per request the cores serve at most {r['cores_ceiling_rps']:.0f} req/s "
            f"= {r['ceiling_ratio']:.1%} of in-process; the tier computed {r['tier_compute_utilisation']:.1%} "
            "of the time"
        )
    summary = {
        "p1_hop_tax_ms_p50": round(worst["hop_tax_ms_p50"], 3),
        "p1_hop_tax_ms_p99": round(max(r["hop_tax_ms_p99"] for r in p1.values()), 3),
        "p1_hop_tax_ms_p50_by_size": {k: round(r["hop_tax_ms_p50"], 3) for k, r in p1.items()},
        "p1_hop_tax_uvicorn_ms_p50_by_size": {k: round(r["hop_tax_uvicorn_ms_p50"], 3) for k, r in p1.items()},
        "p1_hop_tax_ratio_by_size": {
            k: round(r["hop_tax_ms_p50"] / r["hop_tax_uvicorn_ms_p50"], 3) for k, r in p1.items()
        },
        "p1_null_tierlab_ms_p50_by_size": {k: round(r["null_tierlab_ms_p50"], 3) for k, r in p1.items()},
        "p1_null_uvicorn_ms_p50_by_size": {k: round(r["null_uvicorn_ms_p50"], 3) for k, r in p1.items()},
        "p1_socket_floor_ms_p50_by_size": {k: round(r["socket_floor_ms_p50"], 3) for k, r in p1.items()},
        "p2_codec_gbps": round(p2["codec_gbps"], 2),
        "p2_vs_base64": round(p2["vs_base64"], 1),
        "p3_throughput_ratio": round(p3[1]["ratio"], 3),
        "p3_throughput_ratio_by_threads": {str(t): round(r["ratio"], 3) for t, r in p3.items()},
        "p3_ceiling_ratio_by_threads": {str(t): round(r["ceiling_ratio"], 3) for t, r in p3.items()},
        "p3_cpu_ms_per_request_by_threads": {
            str(t): {
                k: round(r[k], 4)
                for k in ("inprocess_cpu_ms", "tier_workers_cpu_ms", "tier_loop_cpu_ms", "client_cpu_ms")
            }
            for t, r in p3.items()
        },
        "p3_tier_compute_utilisation": round(p3[1]["tier_compute_utilisation"], 3),
        "cores": cores,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
