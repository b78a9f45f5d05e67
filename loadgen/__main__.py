"""``python -m loadgen``: run an experiment against the stack, remake its report, recommend a strategy.

python -m loadgen run [--spec quick|default|FILE] [--resume latest|RUN_DIR]
python -m loadgen report RUN_DIR
python -m loadgen recommend [RUN_DIR] --p95-ms 20 --max-accuracy-drop 0.01
python -m loadgen schema [--write]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from loadgen import chaos
from loadgen.records import RecordsFull
from loadgen.spec import SCHEMA_FILE_NAME, SPECS_DIR, json_schema, load_spec
from services.contracts.decisions import AnswerSpec
from services.contracts.errors import ConfigError
from services.contracts.runkey import SweepCell

console = Console(stderr=True)
SCHEMA_FILE = SPECS_DIR / SCHEMA_FILE_NAME


class RunProgress:
    """A bar for the experiment and one for the current run, with ETAs; plain lines when not on a terminal."""

    def __init__(self) -> None:
        self.live = console.is_terminal
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)  # fmt: skip
        self.total = self.done = 0
        self.started = time.monotonic()
        self.experiment: Any = None
        self.run: Any = None

    def start(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        if self.live:
            self.bars.start()
            self.experiment = self.bars.add_task("experiment", total=total, completed=done)
        elif done:
            console.print(f"resuming: {done} of {total} runs already finished")

    def begin_run(self, key: str, max_samples: int, done: int) -> None:
        if self.live:
            if self.run is not None:
                self.bars.remove_task(self.run)
            self.run = self.bars.add_task(key, total=max_samples, completed=done)

    def sample(self) -> None:
        if self.live:
            self.bars.advance(self.run)

    def end_run(self, info: dict[str, Any]) -> None:
        self.done += 1
        if self.live:
            self.bars.advance(self.experiment)
        if "not_runnable" in info:
            console.print(
                f"[{self.done}/{self.total}] {info['run']}: not runnable on this profile: {info['not_runnable']}"
            )
        elif not self.live:
            elapsed = time.monotonic() - self.started
            console.print(f"[{self.done}/{self.total}] {info['run']}: n={info['n']} errors={info['errors']} "
                          f"({info['stop_reason']}), {elapsed:.0f} s elapsed")  # fmt: skip

    def stop(self) -> None:
        if self.live:
            self.bars.stop()


def _latest(results: Path) -> Path:
    folders = sorted((p for p in results.glob("*") if (p / "spec.yaml").exists()), key=lambda p: p.stat().st_mtime)
    if not folders:
        raise ConfigError(f"no experiments in {results}/: run `make bench` first")
    return folders[-1]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    from loadgen.chaos import clear_left_in_force
    from loadgen.planning import plan_experiment
    from loadgen.runner import Experiment, execute, start_folder
    from loadgen.target import Stack
    from loadgen.telemetry import LoadgenTelemetry

    results = Path(args.results)
    if args.resume:
        folder = _latest(results) if args.resume == "latest" else Path(args.resume)
        spec = load_spec(str(folder / "spec.yaml"))
    else:
        spec = load_spec(args.spec)
        folder = start_folder(results, spec, args.run_id)
    stack = Stack.from_state(Path(args.state))
    if args.resume and spec.faults:  # a loadgen killed mid-fault left it in force: put the stack back first
        for cleared in clear_left_in_force(folder, stack, stack.runtime_control()):
            console.print(cleared)
    stack.check_ready()
    if spec.resources and stack.state.profile != spec.resources:
        raise ConfigError(f"spec '{spec.name}' wants resources '{spec.resources}'; the stack is up with "
                          f"'{stack.state.profile}' (make up PROFILE={spec.resources})")  # fmt: skip
    plan = plan_experiment(spec, stack, Path(args.models))
    for skipped in plan.skipped:
        console.print(f"skipped: {skipped}")
    if not plan.runs:
        raise ConfigError("nothing to run: no selected strategy is served by the stack")
    telemetry = LoadgenTelemetry()
    # on the host beside a Docker stack: listen on docker0, where Prometheus reaches host.docker.internal
    bridge = stack.metrics_bind() if args.metrics_bind is None else None
    targets = Path(args.targets_dir) if args.targets_dir else (Path(args.state).parent / "stack" / "targets")
    url = telemetry.serve(args.metrics_bind or bridge or "127.0.0.1", args.metrics_port,
                          targets if (bridge or args.targets_dir) else None,
                          args.metrics_target or ("host.docker.internal" if bridge else None))  # fmt: skip
    console.print(f"experiment {folder.name}: {len(plan.runs)} runs on the {stack.runtime} stack; "
                  f"records in {folder}/records.csv; metrics at {url}")  # fmt: skip
    experiment = Experiment(spec, stack, folder, models_dir=Path(args.models), telemetry=telemetry,
                            say=console.print)  # fmt: skip
    progress = RunProgress()
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    try:
        execute(experiment, plan, progress)
    except KeyboardInterrupt:
        progress.stop()
        console.print(f"interrupted: what was answered is in {folder}/records.csv; "
                      f"continue with: python -m loadgen run --resume {folder}")  # fmt: skip
        return 130
    except RecordsFull as exc:  # disk full: stop measuring, keep what was written
        progress.stop()
        console.print(f"tierlab loadgen: {exc.strerror}")
        return 1
    finally:
        progress.stop()
        telemetry.close()
    console.print(f"runs finished in {time.monotonic() - started:.0f} s")
    return _report(folder, print_table=True)


def _report(folder: Path, *, print_table: bool) -> int:
    missing = [m for m in ("scipy", "scikit_posthocs", "plotly") if importlib.util.find_spec(m) is None]
    if missing:  # e.g. the loadgen image, which carries only what serving and load need
        console.print(f"records are in {folder}; the report needs {', '.join(missing)} (the `report` extra): "
                      f"make it on the host with `python -m loadgen report {folder.name}`")  # fmt: skip
        return 0
    from loadgen.accuracy import load_offline
    from loadgen.records import finished_runs, read_records
    from loadgen.report import write_report
    from loadgen.runner import write_json
    from loadgen.summary import summarise

    records = read_records(folder)
    bundle = json.loads((folder / "bundle.json").read_text()) if (folder / "bundle.json").exists() else {}
    if not records and not bundle.get("not_runnable"):
        raise ConfigError(f"{folder} has no records")
    spec = load_spec(str(folder / "spec.yaml"))
    summary = summarise(
        records,
        folder.name,
        spec.sweep,
        runs=finished_runs(folder),
        networks=bundle.get("networks"),
        slo_ms=spec.slo_ms,
        offline=load_offline(folder),
        devices={t: info.get("device_model") for t, info in (bundle.get("tiers") or {}).items()},
    )
    write_json(folder / "summary.json", summary)
    path = write_report(folder, summary, records, bundle)
    if print_table:
        print_ranking(summary)
        print_answers(
            [AnswerSpec.model_validate(a) for a in summary["answers"]], "the answer (report.html's first screen)"
        )
        print_faults(summary["faults"])
    console.print(f"summary: {folder / 'summary.json'}\nreport:  {path}")
    return 0


def print_ranking(summary: dict[str, Any], per_tier: int = 3) -> None:
    """Per subject/scenario/network: the fastest strategies on each tier and among the splits."""
    out = Console(width=None if console.is_terminal else 140)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in summary["strategies"]:
        if not SweepCell.names(e["network"]):
            groups.setdefault((e["subject"], e["scenario"], e["network"]), []).append(e)
    for (subject, scenario, network), entries in groups.items():
        table = Table(title=f"{subject} · {scenario} · network {network}", title_justify="left")
        for column in ("tier", "rank", "strategy", "p50 ms", "p95 ms [95 % CI]", "accuracy", "exit rate", "errors"):
            table.add_column(column)
        for tier in ("M", "E", "C", "split"):
            ranked = sorted(
                (e for e in entries if (e["placement"] == tier) or (tier == "split" and "-" in e["placement"])),
                key=lambda e: e["latency_ms"].get("p95", float("inf")),
            )
            for rank, e in enumerate(ranked[:per_tier], 1):
                lat, acc = e["latency_ms"], e.get("accuracy")
                table.add_row(
                    tier if rank == 1 else "", str(rank), e["strategy"].removeprefix(f"{subject}."),
                    f"{lat.get('p50', 0):.2f}",
                    f"{lat.get('p95', 0):.2f} [{lat.get('p95_low', 0):.2f}–{lat.get('p95_high', 0):.2f}]",
                    f"{acc['value']:.3f}" if acc else "–", f"{e['exit_rate']:.2f}" if e.get("exit_rate") else "–",
                    str(e["errors"]),
                )  # fmt: skip
        out.print(table)


def print_faults(rows: list[dict[str, Any]]) -> None:
    """The fault table (one row per fault and run) and what the failed requests said."""
    if not rows:
        return
    table = Table(title="faults (recovered: the p50 of 10 answered requests within 10 % of before)")
    for _, head in chaos.FAULT_COLUMNS:
        table.add_column(head, justify="left" if head in ("fault", "strategy") else "right")
    for row in rows:
        cells = [row.get(key) for key, _ in chaos.FAULT_COLUMNS]
        table.add_row(*("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in cells))
    Console(stderr=True, width=max(console.width, 180)).print(table)
    for row in rows:
        if row.get("error"):
            console.print(f"  {row['fault']}: {row['error']}")
        for where, count in sorted((row.get("failures") or {}).items()):
            console.print(f"  {row['fault']} · {row['strategy']}: {count} failed at {where}")


def _folder(results: Path, name: str) -> Path:
    """``latest``, a path, or a run id under ``results``."""
    if name == "latest":
        return _latest(results)
    folder = Path(name)
    if not folder.is_dir() and (results / name).is_dir():
        folder = results / name
    if not (folder / "spec.yaml").exists():
        raise ConfigError(f"{folder} is not an experiment folder (no spec.yaml)")
    return folder


def cmd_report(args: argparse.Namespace) -> int:
    folder = _folder(Path(args.results), args.folder)
    return _report(folder, print_table=args.table)


def print_answers(answers: list[AnswerSpec], title: str) -> None:
    """The answer table, as the report's first screen shows it."""
    from loadgen.recommend import ANSWER_HEAD, answer_rows

    table = Table(title=title, title_justify="left")
    for column in ANSWER_HEAD:
        table.add_column(column)
    for row in answer_rows(answers):
        table.add_row(*row)
    Console(width=None if console.is_terminal else 200).print(table)


def cmd_recommend(args: argparse.Namespace) -> int:
    from loadgen.recommend import answer, explain

    folder = _folder(Path(args.results), args.folder)
    path = folder / "summary.json"
    if not path.exists() or "variants" not in json.loads(path.read_text()):  # older summaries: remade
        _report(folder, print_table=False)
    summary = json.loads(path.read_text())
    answers = answer(summary, p95_ms=args.p95_ms, max_drop=args.max_accuracy_drop, subject=args.subject,
                     scenario=args.scenario, network=args.network)  # fmt: skip
    if not answers:
        raise ConfigError(f"{folder} has no runs matching the filters")
    print_answers(answers, f"{folder.name}: {answers[0].constraint} (95 % confidence on accuracy)")
    for found in answers:
        for line in explain(found):
            print(line)
    return 0 if all(a.winner for a in answers) else 1


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.write:
        SCHEMA_FILE.write_text(text)
        print(f"wrote {SCHEMA_FILE}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment against the stack `make up` started")
    run.add_argument("--spec", default="default", help="built-in spec name (default, quick) or a YAML path")
    run.add_argument("--resume", help="continue an interrupted experiment: its folder, or 'latest'")
    run.add_argument("--run-id", help="folder name under --results (default: time + spec name)")
    run.add_argument("--results", default="results")
    run.add_argument("--models", default="models")
    run.add_argument("--state", default=".local/stack.json", help="the stack's state file (make up writes it)")
    run.add_argument("--metrics-port", type=int, default=0, help="the loadgen's /metrics port (0: any free)")
    run.add_argument("--metrics-bind", help="address for /metrics (default: docker0 beside a Docker stack, else lo)")
    run.add_argument("--metrics-target", help="host name Prometheus scrapes the loadgen at")
    run.add_argument("--targets-dir", help="Prometheus file_sd folder to register in")
    run.set_defaults(handler=cmd_run)
    report = commands.add_parser("report", help="remake summary.json and report.html from the records")
    report.add_argument("folder", nargs="?", default="latest")
    report.add_argument("--results", default="results")
    report.add_argument("--table", action="store_true", help="also print the ranking table")
    report.set_defaults(handler=cmd_report)
    rec = commands.add_parser("recommend", help="which strategy meets a latency budget and an accuracy floor")
    rec.add_argument("folder", nargs="?", default="latest")
    rec.add_argument("--results", default="results")
    rec.add_argument("--p95-ms", type=float, required=True)
    rec.add_argument("--max-accuracy-drop", type=float, default=0.01, help="below identity, in points (0.01 = 1)")
    rec.add_argument("--subject")
    rec.add_argument("--scenario")
    rec.add_argument("--network")
    rec.set_defaults(handler=cmd_recommend)
    schema = commands.add_parser("schema", help="print (or --write) the experiment spec's JSON Schema")
    schema.add_argument("--write", action="store_true")
    schema.set_defaults(handler=cmd_schema)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        console.print(f"tierlab loadgen: {exc.message}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
