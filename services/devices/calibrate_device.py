"""Calibrate a device you own for tierlab: run this ON THE DEVICE, beside the ONNX files of the kit.

Needs only Python 3.9+, numpy and onnxruntime (any build: x86-64, arm64). It times every ``*.onnx`` file of
its folder at one thread and at the device's cores (the fastest run over a few rounds, like tierlab's host
side), times a serving micro-benchmark (what a tier does around the model: JSON, tensor decoding, dict work),
and writes ``device.json``, which ``python -m services devices import-calibration`` turns into a profile:

    python3 calibrate_device.py                # all cores
    python3 calibrate_device.py --cores 2      # only the two big cores a phone lets you keep busy

This file is copied into the kit as is: it imports nothing of tierlab's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROUNDS, RUNS, WARMUP = 3, 5, 2


def fastest(run: Callable[[], object], runs: int, warmup: int) -> float:
    """The fastest of ``runs`` runs in ms, after ``warmup``."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - started) * 1e3)
    return best


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def serving_work() -> None:
    """What a tier does around a model per hop, in Python: a V2 header, hop records, a tensor decoded."""
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 64, 28, 28], "parameters": {"binary_data_size": 200704}}
        ],
        "parameters": {
            f"hop{i}_{k}": 1.25 for i in range(3) for k in ("queue_ms", "compute_ms", "send_ms", "total_ms")
        },
    }
    text = json.dumps(header)
    for _ in range(20):
        decoded = json.loads(text)
        decoded["parameters"]["strategy"] = "model@M-E-C"
        text = json.dumps(decoded)
    body = bytes(200704)
    tensor = np.frombuffer(body, dtype=np.float32).reshape(1, 64, 28, 28)
    tensor.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="the device's cores to use")
    parser.add_argument("--out", default="device.json")
    args = parser.parse_args()
    folder = Path(__file__).resolve().parent
    models = sorted(folder.glob("*.onnx"))
    if not models:
        raise SystemExit(f"no *.onnx beside {__file__}: copy the whole kit folder to the device")
    threads = sorted({1, args.cores})
    times: dict[int, dict[str, float]] = {t: {} for t in threads}
    for t in threads:
        sessions = {}
        for path in models:
            s = session(path, t)
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in s.get_inputs()[0].shape]
            feeds = {s.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
            sessions[path.stem] = (s, feeds)
        best = dict.fromkeys(sessions, float("inf"))
        for _ in range(ROUNDS):
            for name, (s, feeds) in sessions.items():
                best[name] = min(best[name], fastest(functools.partial(s.run, None, feeds), RUNS, WARMUP))
                print(f"{t} thread(s) {name}: {best[name]:.2f} ms", flush=True)
        times[t] = {name: round(ms, 4) for name, ms in best.items()}
    serving_ms = min(fastest(serving_work, 50, 5) for _ in range(ROUNDS))
    result = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.platform(),
        "onnxruntime": ort.__version__,
        "cores": args.cores,
        "ms": {str(t): v for t, v in times.items()},
        "serving_ms": round(serving_ms, 5),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: copy it back and run python -m services devices import-calibration {args.out}")


if __name__ == "__main__":
    main()
