"""Per-request records, durable: one CSV row per answered (or failed) request, and a line in ``runs.jsonl``
when a run finishes; ``--resume`` skips finished runs and continues an unfinished one from its records.

Durability is stated, not hoped for: every row reaches the operating system when it is written (a crash or
``kill -9`` of the loadgen loses only the requests in flight) and the disk within ``SYNC_INTERVAL_S`` (a power
cut loses at most that interval); the fsync runs on a helper thread so the event loop never waits for the
disk. A row is always one physical line (newlines in error texts become spaces), so a torn tail — a crash or
a full disk mid-row — is found and cut back to the last complete row when the file is opened again; a full
disk ends the run with :class:`RecordsFull` and everything written before it intact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from services.contracts.errors import ConfigError
from services.contracts.pipeline import HopTiming

RECORDS_FILE = "records.csv"
RUNS_FILE = "runs.jsonl"
ISSUED_FILE = "issued.log"  # "run<TAB>seq" per request, written before it is sent: what was in flight at a crash
SYNC_INTERVAL_S = 1.0
MAX_HOPS = 4
HOP_KEYS = tuple(f.name for f in dataclasses.fields(HopTiming))  # one column per hop record field
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
    "failed_hop",  # where a failed request broke (``edge -> cloud``; ``loadgen -> mobile`` at the entry)
    "cause",  # timeout, unreachable, unavailable, refused (4xx), bad answer, tier error (5xx)
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
# a failed request's row: the request was issued (its seq is taken) but no answer was recorded before the
# loadgen died; written on resume for every such seq, so issued = recorded holds across a kill
LOST_ERROR = "loadgen: no answer recorded (the loadgen stopped with this request in flight)"
LOST_CAUSE = "lost (the loadgen stopped)"


class RecordsFull(OSError):
    """The records could not be written (disk full, quota, I/O error); what was written before is intact."""


def _csv_complete(line: bytes) -> bool:
    try:
        rows = list(csv.reader([line.decode()]))
    except (UnicodeDecodeError, csv.Error):
        return False
    return len(rows) == 1 and len(rows[0]) == len(FIELDS)


def _json_complete(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


_BLOCK_BYTES = 1 << 16


def _line_start(handle: BinaryIO, end: int) -> int:
    """Offset of the first byte of the line that ends at ``end`` (read backwards in blocks)."""
    pos = end - 1  # the line's own last byte (its newline, when it has one) is not a boundary
    while pos > 0:
        start = max(0, pos - _BLOCK_BYTES)
        handle.seek(start)
        cut = handle.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def repair_tail(path: Path, complete: Callable[[bytes], bool]) -> int:
    """Cut ``path`` back to its last complete line (a torn write's leftovers); returns the bytes removed."""
    if not path.exists():
        return 0
    with path.open("rb+") as handle:
        size = end = handle.seek(0, io.SEEK_END)
        while end > 0:
            start = _line_start(handle, end)
            handle.seek(start)
            line = handle.read(end - start)
            if line.endswith(b"\n") and complete(line[:-1]):
                break
            end = start
        if end < size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        return size - end


class _Syncer(threading.Thread):
    """fsyncs file descriptors when asked, off the caller's thread."""

    def __init__(self, *fds: int) -> None:
        super().__init__(name="records-fsync", daemon=True)
        self.fds, self.wanted, self.stopping = fds, threading.Event(), False
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self.stopping:
                return
            try:
                for fd in self.fds:
                    os.fdatasync(fd)
            except OSError as exc:
                self.error = exc

    def stop(self) -> None:
        self.stopping = True
        self.wanted.set()
        self.join()


def _full(path: Path, exc: OSError, rows: int) -> RecordsFull:
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
    return RecordsFull(
        exc.errno or errno.EIO,
        f"{path}: {reason}; the run stopped, the {rows} rows written before it are intact "
        "— free space and continue with `make bench-resume`",
    )


class RecordWriter:
    """Appends rows to ``records.csv``; see the module's docstring for what survives a crash."""

    def __init__(self, folder: Path, sync_interval_s: float = SYNC_INTERVAL_S) -> None:
        self.path = folder / RECORDS_FILE
        header = _header(self.path)
        if header is not None and header != list(FIELDS):
            raise ConfigError(
                f"{self.path} has other columns than this tierlab writes (another version wrote it): "
                "its report can still be made; new runs go into a new experiment"
            )
        self.repaired_bytes = repair_tail(self.path, _csv_complete)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS, extrasaction="ignore")
        self.rows = 0
        if fresh:  # at once: a reader never finds the file without its header for longer than one write
            try:
                self._file.write(",".join(FIELDS) + "\r\n")
                self._file.flush()
            except OSError as exc:
                self._file.close()
                raise _full(self.path, exc, 0) from exc
        self._issued = os.open(folder / ISSUED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._sync_interval_s = sync_interval_s
        self._next_sync = time.monotonic() + sync_interval_s
        self._syncer = _Syncer(self._file.fileno(), self._issued)

    def _guarded(self, action: Callable[[], object]) -> None:
        try:
            action()
            self._file.flush()
        except OSError as exc:
            raise _full(self.path, exc, self.rows) from exc
        if self._syncer.error is not None:
            raise _full(self.path, self._syncer.error, self.rows)

    def issued(self, run: str, seq: int) -> None:
        """Note a request about to be sent (one unbuffered append: it survives a kill of this process)."""
        try:
            os.write(self._issued, f"{run}\t{seq}\n".encode())
        except OSError as exc:
            raise _full(self.path.with_name(ISSUED_FILE), exc, self.rows) from exc

    def write(self, record: dict[str, Any]) -> None:
        error = record.get("error")
        if isinstance(error, str) and ("\n" in error or "\r" in error):
            record = {**record, "error": " ".join(error.split())}
        self._guarded(lambda: self._writer.writerow(record))
        self.rows += 1
        now = time.monotonic()
        if now >= self._next_sync:
            self._next_sync = now + self._sync_interval_s
            self._syncer.wanted.set()

    def close(self) -> None:
        self._syncer.stop()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fsync(self._issued)
        except OSError:
            pass  # already reported by the write that failed
        finally:
            os.close(self._issued)
            # its buffer may hold the row the full disk refused: cut as a torn tail on the next open
            with contextlib.suppress(OSError):
                self._file.close()


def _typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "" or value is None:
            out[key] = None
        elif key in _NUMERIC or (key.startswith("hop") and not key.endswith(("_tier", "_overran"))):
            out[key] = float(value)
        elif key in ("correct", "exited_early") or key.endswith("_overran"):
            out[key] = value == "True"
        else:
            out[key] = value
    return out


def _header(path: Path) -> list[str] | None:
    """The column names in ``path``'s first line; None when the file is missing or has no whole first line."""
    try:
        with path.open(newline="") as handle:
            first = handle.readline()
    except FileNotFoundError:
        return None
    return next(csv.reader([first]), None) if first.endswith("\n") else None


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every complete row, by the file's own header (a file an older version wrote reads as it was, its
    missing columns empty); a torn last row (a crash mid-write) is left out."""
    path = folder / RECORDS_FILE
    columns = _header(path)
    if columns is None:
        return []
    rows = []
    with path.open(newline="") as handle:
        lines = iter(handle)
        next(lines, None)  # the header
        for line in lines:
            if not line.endswith("\n"):
                break  # torn: the writer cuts it off when it opens the file again
            fields = next(csv.reader([line]), [])
            if len(fields) == len(columns):
                rows.append(_typed({**dict.fromkeys(FIELDS, ""), **dict(zip(columns, fields, strict=True))}))
    return rows


def issued_seqs(folder: Path) -> dict[str, set[int]]:
    """The seqs each run sent, from ``issued.log`` (a torn last line is left out)."""
    path = folder / ISSUED_FILE
    issued: dict[str, set[int]] = {}
    if path.exists():
        for line in path.read_bytes().splitlines(keepends=True):
            run, _, seq = line.decode(errors="replace").rstrip("\n").rpartition("\t")
            if line.endswith(b"\n") and run and seq.isdigit():
                issued.setdefault(run, set()).add(int(seq))
    return issued


def finished_runs(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / RUNS_FILE
    if not path.exists():
        return {}
    runs = {}
    for line in path.read_bytes().splitlines(keepends=True):
        if line.endswith(b"\n") and _json_complete(line):
            info = json.loads(line)
            runs[info["run"]] = info
    return runs


def append_json_line(path: Path, document: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it, after cutting a torn last line (which would swallow
    this one)."""
    repair_tail(path, _json_complete)
    try:
        with path.open("a") as handle:
            handle.write(json.dumps(document) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise _full(path, exc, 0) from exc


def mark_finished(folder: Path, info: dict[str, Any]) -> None:
    """Append a finished run's line to ``runs.jsonl`` (once per run: the fsync is cheap)."""
    append_json_line(folder / RUNS_FILE, info)


@dataclass
class Resumed:
    """What the earlier sessions of one unfinished run left: its rows, and the seqs sent but never answered."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lost_seqs: list[int] = field(default_factory=list)

    @property
    def next_seq(self) -> int:
        return 1 + max([int(r["seq"]) for r in self.records] + self.lost_seqs, default=-1)

    @property
    def elapsed_ms(self) -> float:
        """How long the run had been going when its last session stopped (its clock continues from here)."""
        return max((float(r["end_ms"]) for r in self.records if r["end_ms"] is not None), default=0.0)


def resume_state(folder: Path) -> tuple[set[str], dict[str, Resumed]]:
    """Finished runs, and for each unfinished one what its earlier sessions recorded and lost."""
    finished = set(finished_runs(folder))
    partial: dict[str, Resumed] = {}
    for record in read_records(folder):
        if record["run"] not in finished:
            partial.setdefault(record["run"], Resumed()).records.append(record)
    for run, seqs in issued_seqs(folder).items():
        if run not in finished:
            resumed = partial.setdefault(run, Resumed())
            answered = {int(r["seq"]) for r in resumed.records}
            resumed.lost_seqs = sorted(seqs - answered)
    return finished, partial


def by_run(records: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["run"], []).append(record)
    yield from groups.items()
