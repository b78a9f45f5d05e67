"""Published device times: the CPU rows of ncnn's benchmark tables, read from its ``benchmark/README.md`` and
kept as data (``data/ncnn-benchmark.tsv``, source and licence in ``data/NOTICE.md``).

ncnn's README prints, per device, the output of ``benchncnn``: a ``num_threads`` line, a ``gpu_device`` line
(-1: the CPU) and one row per network with ``min``, ``max`` and ``avg`` milliseconds. tierlab keeps the
``avg`` of every CPU run; a device's first run at a thread count is the one kept (a section that repeats a
thread count with another build, as Azure's "without AVX512", keeps the first).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from services.contracts.errors import ConfigError

DATA_DIR = Path(__file__).parent / "data"
PUBLISHED_FILE = DATA_DIR / "ncnn-benchmark.tsv"
SOURCE_COMMIT = "a4d2ea1d4422c9e849f166fd7a4aefb52f942f6a"
SOURCE_URL = f"https://github.com/Tencent/ncnn/blob/{SOURCE_COMMIT}/benchmark/README.md"
_THREADS = re.compile(r"^\s*num_threads\s*=\s*(\d+)")
_GPU = re.compile(r"^\s*gpu_device\s*=\s*(-?\d+)")
_ROW = re.compile(r"^\s*(\S+)\s+min\s*=\s*([\d.]+)\s+max\s*=\s*([\d.]+)\s+avg\s*=\s*([\d.]+)")
_COLUMNS = ("table", "threads", "network", "avg_ms")


@dataclass(frozen=True)
class PublishedRun:
    """One ``benchncnn`` run of a device: its thread count and each network's average milliseconds."""

    table: str
    threads: int
    avg_ms: dict[str, float]


def parse_readme(text: str, tables: list[str] | None = None) -> list[PublishedRun]:
    """Every CPU run under each ``### <table>`` heading (only ``tables``, when given: headings, exactly)."""
    runs: list[PublishedRun] = []
    table: str | None = None
    threads: int | None = None
    gpu: int | None = None
    rows: dict[str, float] = {}
    seen: set[tuple[str, int]] = set()

    def close() -> None:
        if table is not None and threads is not None and gpu == -1 and rows and (table, threads) not in seen:
            if tables is None or table in tables:
                runs.append(PublishedRun(table, threads, dict(rows)))
            seen.add((table, threads))

    for line in text.splitlines():
        if line.startswith("### "):
            close()
            table, threads, gpu, rows = line[4:].strip(), None, None, {}
        elif match := _THREADS.match(line):
            close()
            threads, gpu, rows = int(match.group(1)), None, {}
        elif match := _GPU.match(line):
            gpu = int(match.group(1))
        elif (match := _ROW.match(line)) and threads is not None:
            rows[match.group(1)] = float(match.group(4))
    close()
    return runs


def write_published(runs: list[PublishedRun], path: Path = PUBLISHED_FILE) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(_COLUMNS)
        for run in runs:
            for network, ms in run.avg_ms.items():
                writer.writerow((run.table, run.threads, network, f"{ms:g}"))
    return path


def read_published(path: Path = PUBLISHED_FILE) -> list[PublishedRun]:
    by_key: dict[tuple[str, int], dict[str, float]] = {}
    try:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                by_key.setdefault((row["table"], int(row["threads"])), {})[row["network"]] = float(row["avg_ms"])
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path} is not a published-times table: {exc}") from None
    return [PublishedRun(table, threads, rows) for (table, threads), rows in by_key.items()]


def device_runs(table: str, threads: list[int], path: Path = PUBLISHED_FILE) -> dict[int, dict[str, float]]:
    """A device's published times by thread count; ConfigError naming what is missing."""
    runs = {r.threads: r.avg_ms for r in read_published(path) if r.table == table}
    missing = [t for t in threads if t not in runs]
    if missing:
        have = sorted(runs) or "none"
        raise ConfigError(f"no published {missing}-thread run of '{table}' in {path} (it has {have})")
    return {t: runs[t] for t in threads}
