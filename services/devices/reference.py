"""The host side of every device ratio: ncnn's benchmark networks timed on the host tierlab runs on, with the
same engine the published device tables used (the ``ncnn`` package from PyPI), split into kernel classes.

For each network (``data/ncnn/*.param``, weights empty as ``benchncnn`` runs them) at one thread:

- its whole time, the fastest run of ``ROUNDS`` rounds through every network, ``RUNS`` runs each (what a
  published row is compared with: on a shared VM a neighbour slows runs for seconds at a time, and the median
  of nine back-to-back runs moved by up to 25 % from one measurement to the next, the fastest of fifteen
  by up to 43 % for a network a burst covered; spread over rounds, a burst covers one round);
- its split into kernel classes (``services.contracts.kernels``): every layer is timed alone, in a one-layer
  network fed inputs of the shapes the ``.param`` file records (``-23330`` hints), and the whole time is
  shared out in proportion to the layers' times by class. Layers timed alone include their own call overhead,
  so shares are taken from them, never sums;
- the same network converted to ONNX (``onnxnets``; int8 ones quantised as tierlab's ``sptq``) timed in
  onnxruntime with the tiers' session options and split by its profiler: what the engine transfer from
  ncnn's numbers to the tiers' onnxruntime rests on (``services.devices.fit``).

The measurement takes a few minutes and depends only on the host and the ncnn version, so it is cached in
``.local/devices/`` under a key of both (and of the networks and this code).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import Field

from services.contracts.calibration import session_options
from services.contracts.errors import ConfigError
from services.contracts.kernels import KERNEL_CLASSES, KernelClass, ncnn_layer_class, profile_shares
from services.contracts.manifest import FrozenSpec
from services.devices.published import DATA_DIR

NCNN_DIR = DATA_DIR / "ncnn"
# input shapes (c, h, w) a .param file does not record
INPUT_SHAPES = {"vision_transformer": (3, 384, 384)}
WARMUP, RUNS, ROUNDS, LAYER_RUNS = 2, 5, 3, 5
CACHE_DIR = Path(".local") / "devices"


@dataclass(frozen=True)
class Layer:
    """One line of an ncnn ``.param`` file."""

    line: str
    kind: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict[int, str]

    def top_shapes(self) -> list[list[int]]:
        """The output shapes the file records (``-23330=count,dims,w,h,c,dims,…``)."""
        hint = self.params.get(-23330)
        if not hint:
            return []
        numbers = [int(x) for x in hint.split(",")][1:]
        shapes, i = [], 0
        while i < len(numbers):
            dims = numbers[i]
            shapes.append(numbers[i + 1 : i + 1 + dims])
            i += 1 + dims
        return shapes


def parse_param(text: str) -> list[Layer]:
    layers = []
    for line in (raw for raw in text.splitlines()[2:] if raw.strip()):
        words = line.split()
        inputs, outputs = int(words[2]), int(words[3])
        params = {}
        for pair in words[4 + inputs + outputs :]:
            key, _, value = pair.partition("=")
            params[int(key)] = value
        layers.append(
            Layer(line, words[0], words[1], tuple(words[4 : 4 + inputs]),
                  tuple(words[4 + inputs : 4 + inputs + outputs]), params)
        )  # fmt: skip
    return layers


def networks() -> list[str]:
    return sorted(p.stem for p in NCNN_DIR.glob("*.param"))


class NetworkTimeSpec(FrozenSpec):
    """One network on the host: its whole time and that time split by kernel class, in ncnn (the published
    tables' engine) and, where the network converts to ONNX, in onnxruntime (the tiers' engine)."""

    wall_ms: float = Field(gt=0)
    classes_ms: dict[KernelClass, float]
    ort_wall_ms: float | None = None
    ort_classes_ms: dict[KernelClass, float] | None = None


class HostReferenceSpec(FrozenSpec):
    """The reference networks timed on one host with one ncnn version, one thread."""

    host: str = Field(description="CPU model and engine version")
    key: str
    threads: int = 1
    measured: str = Field(description="when (UTC)")
    networks: dict[str, NetworkTimeSpec]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ncnn() -> Any:
    try:
        import ncnn  # noqa: PLC0415 — the host side only: the tier image never measures references
    except ImportError:
        raise ConfigError(
            "measuring a device's host side needs the ncnn package: .venv/bin/pip install ncnn (make venv does)"
        ) from None
    return ncnn


def _mat(ncnn: Any, shape: list[int]) -> Any:
    mat = ncnn.Mat(*shape) if 1 <= len(shape) <= 3 else ncnn.Mat(1)
    mat.fill(0.01)
    return mat


def _net(ncnn: Any, text: str, threads: int) -> Any:
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_vulkan_compute = False
    with tempfile.NamedTemporaryFile("w", suffix=".param", delete=False) as handle:
        handle.write(text)
    try:
        if net.load_param(handle.name) != 0:
            raise ConfigError(f"ncnn could not read {text.splitlines()[2][:60]}…")
    finally:
        os.unlink(handle.name)
    net.load_model(ncnn.DataReaderFromEmpty())
    return net


def _time(run: Callable[[], None], runs: int, warmup: int) -> float:
    """The fastest of ``runs`` runs, in ms."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1e3)
    return min(times)


def _extractor_run(net: Any, inputs: dict[str, Any], output: str) -> Callable[[], None]:
    def run() -> None:
        extractor = net.create_extractor()
        for name, mat in inputs.items():
            extractor.input(name, mat)
        extractor.extract(output)

    return run


def _run_shapes(net: Any, layers: list[Layer], input_name: str, mat: Any) -> dict[str, list[int]]:
    found = {}
    for layer in layers:
        for top in layer.tops:
            extractor = net.create_extractor()
            extractor.input(input_name, mat)
            status, out = extractor.extract(top)
            if status == 0:
                found[top] = [out.w, out.h, out.c][: out.dims] if out.dims else [out.w]
    return found


@dataclass
class PreparedNetwork:
    """A reference network ready to time: a whole run in each engine, and each engine's split by class."""

    ncnn_run: Callable[[], None]
    ncnn_shares: dict[KernelClass, float]
    ort_run: Callable[[], None] | None = None
    ort_shares: dict[KernelClass, float] | None = None
    keep: Any = None  # what the runs need alive (networks, sessions)


def prepare_network(name: str, threads: int = 1) -> PreparedNetwork:
    """Load reference network ``name`` in ncnn (and onnxruntime, where it converts) and split each engine's
    time for it into kernel classes."""
    ncnn = _ncnn()
    text = (NCNN_DIR / f"{name}.param").read_text()
    layers = parse_param(text)
    shapes: dict[str, list[int]] = {}
    for layer in layers:
        if layer.kind == "Input":
            w, h, c = (int(layer.params.get(i, "0")) for i in (0, 1, 2))
            if name in INPUT_SHAPES:
                c, h, w = INPUT_SHAPES[name]
            shapes[layer.tops[0]] = [w, h, c] if c else [w, h] if h else [w]
        shapes.update(zip(layer.tops, layer.top_shapes(), strict=False))
    first = next(layer for layer in layers if layer.kind == "Input")
    whole = _net(ncnn, text, threads)
    if name in INPUT_SHAPES:  # no shape hints: read every blob's shape off one run
        shapes.update(_run_shapes(whole, layers, first.tops[0], _mat(ncnn, shapes[first.tops[0]])))
    by_class = dict.fromkeys(KERNEL_CLASSES, 0.0)
    for layer in layers:
        if layer.kind in ("Input", "MemoryData") or any(b not in shapes for b in layer.bottoms):
            continue
        feeds = "\n".join(f"Input in{i} 0 1 {b}" for i, b in enumerate(layer.bottoms))
        alone = f"7767517\n{len(layer.bottoms) + 1} {len(layer.bottoms) + len(layer.tops)}\n{feeds}\n{layer.line}\n"
        net = _net(ncnn, alone, threads)
        inputs = {b: _mat(ncnn, shapes[b]) for b in layer.bottoms}
        rows = shapes.get(layer.tops[0], [1])
        out_rows = rows[1] if len(rows) >= 2 else 1
        by_class[ncnn_layer_class(layer.kind, layer.params, out_rows)] += _time(
            _extractor_run(net, inputs, layer.tops[0]), LAYER_RUNS, 1
        )
    total = sum(by_class.values())
    prepared = PreparedNetwork(
        _extractor_run(whole, {first.tops[0]: _mat(ncnn, shapes[first.tops[0]])}, layers[-1].tops[0]),
        {k: v / total for k, v in by_class.items() if v > 0},
        keep=[whole],
    )
    _prepare_onnxruntime(name, prepared)
    return prepared


def _prepare_onnxruntime(name: str, prepared: PreparedNetwork) -> None:
    """The network in onnxruntime at one thread (the tiers' session options) and its split by class; nothing
    when it has a layer the ONNX conversion does not take."""
    from services.devices import onnxnets  # noqa: PLC0415 — onnxnets builds on this module's parser

    try:
        model = onnxnets.to_onnx(name.removesuffix("_int8"))
    except ConfigError:
        return
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    feeds = {model.graph.input[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    options = session_options(1, allow_spinning=False)
    with tempfile.TemporaryDirectory(prefix="tierlab-reference-") as folder:  # the session holds the model
        path = Path(folder) / f"{name}.onnx"
        onnx.save(model, str(path))
        if name.endswith("_int8"):
            path = onnxnets.quantize_int8(path, Path(folder) / "int8.onnx", shape)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        prepared.ort_shares = profile_shares(str(path), options, feeds)
    prepared.ort_run = lambda: session.run(None, feeds)
    prepared.keep.append(session)


def time_networks(names: list[str], threads: int = 1, say: Callable[[str], None] = print) -> dict[str, NetworkTimeSpec]:
    """Each network's split by class, then its whole time in both engines: the fastest run over ``ROUNDS``
    rounds through every network (a burst of load on the machine slows one round of a network, not all)."""
    prepared = {}
    for i, name in enumerate(names, 1):
        prepared[name] = prepare_network(name, threads)
        say(f"  [{i}/{len(names)}] {name}: split into kernel classes")
    best: dict[str, list[float]] = {name: [math.inf, math.inf] for name in names}
    for _ in range(ROUNDS):
        for name, network in prepared.items():
            best[name][0] = min(best[name][0], _time(network.ncnn_run, RUNS, WARMUP))
            if network.ort_run is not None:
                best[name][1] = min(best[name][1], _time(network.ort_run, RUNS, WARMUP))
    found = {}
    for name, network in prepared.items():
        ncnn_ms, ort_ms = best[name]
        ort_classes = None
        if network.ort_shares is not None:
            ort_classes = {k: round(v * ort_ms, 5) for k, v in network.ort_shares.items()}
        found[name] = NetworkTimeSpec(
            wall_ms=round(ncnn_ms, 4),
            classes_ms={k: round(v * ncnn_ms, 5) for k, v in network.ncnn_shares.items()},
            ort_wall_ms=round(ort_ms, 4) if network.ort_run is not None else None,
            ort_classes_ms=ort_classes,
        )
    return found


def reference_key(threads: int = 1) -> tuple[str, str]:
    """(host description, cache key): the CPU, the ncnn version, the networks and this code."""
    ncnn = _ncnn()
    host = f"{cpu_model()}; ncnn {ncnn.__version__}"
    digest = hashlib.sha256(host.encode())
    for name in networks():
        digest.update((NCNN_DIR / f"{name}.param").read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(str(threads).encode())
    return host, digest.hexdigest()[:16]


def host_reference(
    root: Path, *, threads: int = 1, say: Callable[[str], None] = print, refresh: bool = False
) -> HostReferenceSpec:
    """The reference networks on this host, from the cache when this host, engine and code measured them."""
    host, key = reference_key(threads)
    cache = root / CACHE_DIR / f"host-{key}.json"
    if cache.exists() and not refresh:
        try:
            return HostReferenceSpec.model_validate_json(cache.read_bytes())
        except ValueError:
            pass  # a torn or older file: measure again
    names = networks()
    say(f"timing {len(names)} reference networks in ncnn and onnxruntime on this host ({host}); once, cached")
    measured = time_networks(names, threads, say)
    spec = HostReferenceSpec(
        host=host, key=key, threads=threads, networks=measured,
        measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    tmp.replace(cache)
    return spec
