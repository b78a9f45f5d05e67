"""Durable records: a torn tail is cut on open and never swallows later rows, rows reach the OS at once and
the disk within the stated interval, a resumed run continues its seqs and clock and records what was in
flight, and a full disk stops the run with the rows written so far intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadgen.records import (
    FIELDS,
    RECORDS_FILE,
    RUNS_FILE,
    SYNC_INTERVAL_S,
    RecordsFull,
    RecordWriter,
    finished_runs,
    mark_finished,
    read_records,
    resume_state,
)


def _row(run: str, seq: int, **extra: Any) -> dict[str, Any]:
    return {"run": run, "seq": seq, "sample_id": seq, "end_ms": 10.0 * seq, "latency_ms": 1.5, "status": 200,
            "bytes_in": 10, **extra}  # fmt: skip


def test_a_row_torn_inside_a_quoted_field_is_cut_and_later_rows_survive(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path)
    for seq in range(3):
        writer.write(_row("r", seq, error="a, quoted\nmultiline error"))
    writer.close()
    with (tmp_path / RECORDS_FILE).open("a") as handle:
        handle.write('r,,,,,,,3,3,,,,,,,0,"connection failed: half a quo')  # killed mid-row, inside quotes
    writer = RecordWriter(tmp_path)
    assert writer.repaired_bytes > 0
    for seq in range(3, 40):
        writer.write(_row("r", seq))
    writer.close()
    records = read_records(tmp_path)
    assert [int(r["seq"]) for r in records] == list(range(40))
    assert records[0]["error"] == "a, quoted multiline error"  # one physical line per row


def test_reading_leaves_out_a_torn_row_without_touching_the_file(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path)
    writer.write(_row("r", 0))
    writer.close()
    path = tmp_path / RECORDS_FILE
    with path.open("a") as handle:
        handle.write("r,,," + "," * (len(FIELDS) - 4))  # all the commas, but no newline: still torn
    size = path.stat().st_size
    assert [r["seq"] for r in read_records(tmp_path)] == [0] and path.stat().st_size == size


def test_a_torn_runs_line_does_not_swallow_the_next(tmp_path: Path) -> None:
    mark_finished(tmp_path, {"run": "a", "n": 1})
    with (tmp_path / RUNS_FILE).open("a") as handle:
        handle.write('{"run": "b", "n"')
    mark_finished(tmp_path, {"run": "c", "n": 3})
    assert set(finished_runs(tmp_path)) == {"a", "c"}
    assert (tmp_path / RUNS_FILE).read_text().count("\n") == 2


def test_resume_continues_seq_from_the_maximum_and_names_what_was_in_flight(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path)
    for seq in range(6):
        writer.issued("r", seq)
    for seq in (0, 1, 4, 2):  # open loop: answers come out of order; 3 and 5 were in flight at the kill
        writer.write(_row("r", seq, status=200 if seq != 4 else 503))
    writer.close()
    finished, partial = resume_state(tmp_path)
    resumed = partial["r"]
    assert not finished
    assert resumed.lost_seqs == [3, 5] and resumed.next_seq == 6
    assert resumed.elapsed_ms == 40.0  # the clock continues where the last answer ended


_WRITER = """
import sys, time
from pathlib import Path
from loadgen.records import RecordWriter
writer = RecordWriter(Path(sys.argv[1]))
seq = 0
while True:
    writer.issued("r", seq)
    writer.write({"run": "r", "seq": seq, "end_ms": time.time() * 1e3, "status": 200})
    seq += 1
    time.sleep(0.001)
"""


@pytest.mark.parametrize("round_", range(3))
def test_a_kill_9_loses_nothing_that_was_written(tmp_path: Path, round_: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while len(read_records(tmp_path)) < 200 + 100 * round_:
            assert time.monotonic() < deadline and child.poll() is None, "the writer did not start"
            time.sleep(0.02)
        killed_ms = time.time() * 1e3
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    records = read_records(tmp_path)
    lost_window_ms = killed_ms - max(float(r["end_ms"]) for r in records)
    assert lost_window_ms <= SYNC_INTERVAL_S * 1e3, f"the last {lost_window_ms:.0f} ms of rows were lost"
    _, partial = resume_state(tmp_path)
    assert len(partial["r"].lost_seqs) <= 1  # at most the one request between its issue and its row
    assert [int(r["seq"]) for r in records] == list(range(len(records)))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills up for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]
    if os.geteuid() != 0 or subprocess.run(command, check=False).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_with_a_clear_message_and_keeps_every_row_written(tiny_disk: Path) -> None:
    writer = RecordWriter(tiny_disk)
    written = 0
    with pytest.raises(RecordsFull) as raised:
        for seq in range(100_000):
            writer.write(_row("r", seq, error="x" * 200))
            written += 1
    writer.close()
    (tiny_disk / "issued.log").unlink()  # space back
    assert "the disk is full" in str(raised.value) and "make bench-resume" in str(raised.value)
    records = read_records(tiny_disk)
    assert [int(r["seq"]) for r in records] == list(range(written))  # each row reached the OS as written
    RecordWriter(tiny_disk).close()  # opens again once space is back: any torn tail is cut
    assert len(read_records(tiny_disk)) == written
