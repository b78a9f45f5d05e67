"""Command line: ``python -m operators build|list|latency|byo``.

``build``    build the default subjects × variants into ``models/`` (incremental; ``--tiny`` for a quick try)
``list``     subjects, variants, sizes, cut tensor sizes, offline accuracy (``--json`` for a JSON list)
``latency``  in-process onnxruntime latency of every variant at one thread (batch 1)
``byo``      apply the black-box operators to your own ONNX model (with a dataset, or for latency only)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from operators.data import DatasetMissing
from services.contracts.manifest import ManifestSpec


def _variant_row(folder: Path, manifest: ManifestSpec) -> dict[str, Any]:
    size = sum((folder / s.file).stat().st_size for s in manifest.stages)
    # what crosses into each later stage: its inputs, per item
    cut_bytes = [sum(spec.bytes_per_item for spec in following.inputs) for following in manifest.stages[1:]]
    accuracy = manifest.accuracy
    return {
        "name": manifest.name,
        "subject": manifest.subject,
        "operator": manifest.operator,
        "stages": len(manifest.stages),
        "size_bytes": size,
        "cut_bytes_per_item": cut_bytes,
        "metric": accuracy.metric if accuracy else None,
        "accuracy": accuracy.value if accuracy else None,
        "accuracy_ci95": list(accuracy.ci95) if accuracy else None,
        "n": accuracy.n if accuracy else None,
        "exit_thresholds": [s.exit.threshold for s in manifest.stages if s.exit],
        "exit_curve": [p.model_dump() for p in manifest.exit_curve],
        "folder": str(folder),
    }


def run_list(args: argparse.Namespace) -> int:
    from operators.build import list_variants

    rows = [_variant_row(folder, manifest) for folder, manifest in list_variants(Path(args.models))]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no variants in {args.models}: build them with `make models`")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"variants in {args.models}")
    for column in ("variant", "stages", "size", "cut bytes/item", "metric", "value", "95 % CI", "exit thr."):
        table.add_column(column, justify="right" if column not in ("variant", "metric") else "left")
    for r in rows:
        ci = f"{r['accuracy_ci95'][0]:.3f}–{r['accuracy_ci95'][1]:.3f}" if r["accuracy_ci95"] else "-"
        table.add_row(
            r["name"],
            str(r["stages"]),
            f"{r['size_bytes'] / 1e6:.2f} MB",
            ", ".join(f"{b / 1024:.0f} KiB" for b in r["cut_bytes_per_item"]) or "-",
            r["metric"] or "-",
            f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-",
            ci,
            ", ".join(f"{t:g}" for t in r["exit_thresholds"]) or "-",
        )
    Console(width=max(Console().width, 150)).print(table)
    return 0


def stage_latency_ms(folder: Path, manifest: ManifestSpec, runs: int) -> float:
    """Median time of running every stage once (no early exit) on one zero item, one thread."""
    import onnxruntime as ort

    from services.contracts.dtypes import NUMPY_DTYPES

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(str(folder / s.file), options, providers=["CPUExecutionProvider"]) for s in manifest.stages
    ]
    feeds = [
        {t.name: np.zeros([d if d > 0 else 1 for d in t.shape], NUMPY_DTYPES[t.datatype]) for t in s.inputs}
        for s in manifest.stages
    ]
    for session, feed in zip(sessions, feeds, strict=True):
        for _ in range(3):
            session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        for session, feed in zip(sessions, feeds, strict=True):
            session.run(None, feed)
        times.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(times)


def run_latency(args: argparse.Namespace) -> int:
    from operators.build import list_variants

    rows = []
    for folder, manifest in list_variants(Path(args.models)):
        row = _variant_row(folder, manifest)
        row["latency_ms_1thread"] = round(stage_latency_ms(folder, manifest, args.runs), 3)
        rows.append(row)
        if not args.json:
            acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
            print(
                f"{row['name']:<36} {row['size_bytes'] / 1e6:8.2f} MB  {row['metric'] or '-':>9} {acc:>7}  "
                f"{row['latency_ms_1thread']:8.3f} ms"
            )
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _plain_reporter() -> Any:
    """Progress as plain lines, for logs and pipes where a live bar cannot redraw."""
    from operators.build import Reporter

    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    def training(label: str, total: int) -> Any:
        done = [0]
        say(f"{label}: 0/{total} items")

        def advance(n: int) -> None:
            before = done[0] * 4 // max(total, 1)
            done[0] += n
            if done[0] * 4 // max(total, 1) > before:
                say(f"{label}: {min(done[0], total)}/{total} items")

        return advance

    return Reporter(say, training)


@contextlib.contextmanager
def _reporter() -> Iterator[Any]:
    """A live rich progress display on a terminal, plain lines elsewhere."""
    if not sys.stdout.isatty():
        yield _plain_reporter()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from operators.build import Reporter

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        status = progress.add_task("starting", total=None)

        def training(label: str, total: int) -> Any:
            task = progress.add_task(label, total=total)
            return lambda n: progress.advance(task, n)

        yield Reporter(lambda message: progress.update(status, description=message), training)
        progress.update(status, description="done", total=1, completed=1)


def run_build(args: argparse.Namespace) -> int:
    from operators.build import build
    from operators.subjects import FULL, TINY
    from operators.training import training_precision

    try:
        settings = replace(TINY if args.tiny else FULL, precision=training_precision())
        # side by side, the workers print their own lines: a live bar here would fight them
        with _reporter() if args.jobs == 1 else contextlib.nullcontext(_plain_reporter()) as reporter:
            result = build(
                Path(args.models),
                settings,
                subjects=args.subject or None,
                variants=args.variant or None,
                reporter=reporter,
                jobs=args.jobs,
            )
    except (DatasetMissing, FileNotFoundError, ValueError) as exc:
        print(f"tierlab operators: {exc}", file=sys.stderr)
        return 2
    print(
        f"built {len(result.built)}, up to date {len(result.skipped)}, in {result.seconds:.0f} s "
        f"({settings.profile} settings, trained in {settings.precision})"
    )
    return 0


def run_byo(args: argparse.Namespace) -> int:
    from operators.byo import ByoError, byo

    size = (args.width, args.height) if args.width or args.height else None
    if size is not None and None in size:
        print("tierlab operators byo: give both --width and --height", file=sys.stderr)
        return 2
    optional = {k: Path(v) for k in ("images", "texts", "tokenizer", "labels") if (v := getattr(args, k))}
    try:
        built = byo(
            Path(args.onnx),
            Path(args.out),
            name=args.name,
            size=size,
            max_tokens=args.max_tokens,
            mean=args.mean,
            std=args.std,
            operators=args.operator or None,
            say=lambda message: print(message, flush=True),
            **optional,  # type: ignore[arg-type]
        )
    except ByoError as exc:
        print(f"tierlab operators byo: {exc}", file=sys.stderr)
        return 2
    for manifest in built:
        accuracy = manifest.accuracy
        value = f"{accuracy.metric} {accuracy.value:.4f}" if accuracy else "accuracy unknown (latency only)"
        print(f"{manifest.name:<36} {len(manifest.stages)} stage(s)  {value}")
    print(f"sample library: {Path(args.out) / args.name / 'evaluation.npz'}; bench it with a spec naming {args.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from operators.subjects import SUBJECTS
    from operators.variants import VARIANTS

    parser = argparse.ArgumentParser(
        prog="python -m operators", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the default variants into models/")
    build.add_argument("--models", default="models")
    build.add_argument("--subject", action="append", choices=sorted(SUBJECTS), help="only this subject (repeatable)")
    build.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="only this variant (repeatable)")
    build.add_argument("--tiny", action="store_true", help="tiny training budgets: a quick, low-accuracy build")
    build.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="subjects built side by side (cores shared)"
    )
    build.set_defaults(handler=run_build)
    listing = commands.add_parser("list", help="list built variants with sizes and accuracy")
    listing.add_argument("--models", default="models")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=run_list)
    latency = commands.add_parser("latency", help="in-process latency of every variant at one thread")
    latency.add_argument("--models", default="models")
    latency.add_argument("--runs", type=int, default=50)
    latency.add_argument("--json", action="store_true")
    latency.set_defaults(handler=run_latency)
    byo_parser = commands.add_parser(
        "byo", help="black-box operators on your ONNX model (image classifier or segmenter, text classifier)"
    )
    byo_parser.add_argument("--onnx", required=True, help="the exported model (fixed or dynamic batch)")
    byo_parser.add_argument("--name", required=True, help="subject name, e.g. resnet50-imagenette")
    byo_parser.add_argument("--images", help="images: <class>/<image> (classifier) or images/ + masks/ (segmenter)")
    byo_parser.add_argument("--texts", help="texts: <class>/<file>, one text per file (needs --tokenizer)")
    byo_parser.add_argument("--tokenizer", help="the text model's tokenizer folder (tokenizer.json or vocab.txt)")
    byo_parser.add_argument("--labels", help="the model's class names in output order, one per line")
    byo_parser.add_argument("--out", default="models", help="where variants go (<out>/<name>/<variant>)")
    byo_parser.add_argument("--width", type=int, help="image width when the model's is not fixed (default 224)")
    byo_parser.add_argument("--height", type=int, help="image height when the model's is not fixed (default 224)")
    byo_parser.add_argument("--max-tokens", type=int, help="token length when the model's is not fixed (default 128)")
    byo_parser.add_argument("--mean", type=float, nargs=3, default=[0.485, 0.456, 0.406])
    byo_parser.add_argument("--std", type=float, nargs=3, default=[0.229, 0.224, 0.225])
    byo_parser.add_argument("--operator", action="append", help="only these variants (repeatable)")
    byo_parser.set_defaults(handler=run_byo)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
