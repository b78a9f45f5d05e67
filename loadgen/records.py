"""Per-request records, written as they come: one CSV row per answered (or failed) request, flushed at
once, so Ctrl-C or a crash loses at most the requests in flight. ``runs.jsonl`` gets a line when a run
finishes; ``--resume`` skips finished runs and continues an unfinished one from its records.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

RECORDS_FILE = "records.csv"
RUNS_FILE = "runs.jsonl"
MAX_HOPS = 4
HOP_KEYS = (
    "tier",
    "first_stage",
    "last_stage",
    "queue_ms",
    "compute_ms",
    "send_ms",
    "total_ms",
    "bytes_in",
    "bytes_out",
)
FIELDS = (
    "run",
    "subject",
    "strategy",
    "variant",
    "placement",
    "scenario",
    "network",
    "seq",
    "sample_id",
    "intended_ms",  # since the run's start
    "start_ms",
    "end_ms",
    "latency_ms",  # end − intended: what a user waits, coordinated-omission safe
    "service_ms",  # end − start
    "lag_ms",  # start − intended: the schedule's lag
    "status",
    "error",
    "hops",
    *(f"hop{i}_{k}" for i in range(MAX_HOPS) for k in HOP_KEYS),
    "exit_stage",
    "exited_early",
    "prediction",
    "target",
    "correct",
    "score",
    "bytes_out",
    "bytes_in",
)
_NUMERIC = {"seq", "sample_id", "intended_ms", "start_ms", "end_ms", "latency_ms", "service_ms", "lag_ms", "status",
            "hops", "exit_stage", "prediction", "target", "score", "bytes_out", "bytes_in"}  # fmt: skip


class RecordWriter:
    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORDS_FILE
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file: TextIO = self.path.open("a", newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        self._writer.writerow(record)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "" or value is None:
            out[key] = None
        elif key in _NUMERIC or (key.startswith("hop") and not key.endswith("_tier")):
            out[key] = float(value)
        elif key in ("correct", "exited_early"):
            out[key] = value == "True"
        else:
            out[key] = value
    return out


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every complete row; a row cut short by a crash (the last line) is dropped."""
    path = folder / RECORDS_FILE
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [_typed(r) for r in rows if r.get("bytes_in") is not None and None not in r]


def finished_runs(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / RUNS_FILE
    if not path.exists():
        return {}
    runs = {}
    for line in path.read_text().splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        runs[info["run"]] = info
    return runs


def mark_finished(folder: Path, info: dict[str, Any]) -> None:
    with (folder / RUNS_FILE).open("a") as handle:
        handle.write(json.dumps(info) + "\n")


def by_run(records: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["run"], []).append(record)
    yield from groups.items()
