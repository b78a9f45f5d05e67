"""Fault scenarios: inject the spec's faults into a run while its load goes on, and read what they did.

``FaultInjector`` runs beside the load (``loadgen.engine.drive``) on the same event loop: at each fault's
``at_s`` it acts through the stack's runtime (``services.contracts.runtime``: kill, pause, limits) or the tiers'
link control (a cut is 100 % loss, see ``services.tier.links``), clears the fault after ``duration_s``, and
brings the stack back as an orchestrator would: a killed tier is started again, its links re-shaped and
the run's variants loaded again. Each fault's timeline (injected, cleared, tier ready; ms since the run's
start) goes into the run's line in ``runs.jsonl``; blocking runtime calls run on a worker thread, so the
load keeps its schedule.

``fault_rows`` turns a run's records and timelines into the fault table: requests before (answered before
the fault began), during (sent before it was cleared and still out when it began) and after, failed,
p50/p95 before and after, SLO misses, time until the tier was ready and until latency was back within
``RECOVERED_WITHIN`` of before — and the failed requests counted by the hop and cause their records name.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.loads import ModelLoads
from loadgen.records import append_json_line
from loadgen.spec import FaultSpec
from loadgen.target import Stack
from services.contracts.errors import ConfigError
from services.contracts.runtime import TierLimits, TierRuntime
from services.contracts.specs import LinkName, LinkSpec, TierName

JOURNAL_FILE = "faults.jsonl"  # each fault's injection and clearing, fsynced: what a killed loadgen left in force
RECOVERED_WITHIN = 0.10  # latency p50 back within 10 % of before
RECOVERY_WINDOW = 10  # … over this many consecutive requests, all answered
READY_TIMEOUT_S = 120.0


# the fault table's columns (key in a row, heading), for the terminal and the report
FAULT_COLUMNS = (
    ("fault", "fault"),
    ("strategy", "strategy"),
    ("requests_before", "before"),
    ("requests_during", "during"),
    ("requests_after", "after"),
    ("failed_during", "failed during"),
    ("failed_after", "failed after"),
    ("p50_before_ms", "p50 before ms"),
    ("p50_after_ms", "p50 after ms"),
    ("p95_before_ms", "p95 before ms"),
    ("p95_during_ms", "p95 during ms"),
    ("p95_after_ms", "p95 after ms"),
    ("slo_misses", "SLO misses"),
    ("ready_after_s", "ready after s"),
    ("recovered_after_s", "recovered after s"),
)


@dataclass
class FaultEvent:
    """What happened to one fault in one run; times in ms since the run's start (None: did not happen)."""

    fault: str
    action: str
    target: str
    injected_ms: float | None = None
    cleared_ms: float | None = None
    ready_ms: float | None = None  # the tier (or link) serving again: ready, links re-shaped, variants loaded
    error: str | None = None  # the fault could not be injected or cleared: why


class FaultJournal:
    """``faults.jsonl``: a line before a fault is injected (with what undoes it) and one once it is cleared,
    each fsynced, so a loadgen killed mid-fault leaves a record of what is still in force, and
    ``clear_left_in_force`` (run when an experiment resumes) puts the stack back."""

    def __init__(self, folder: Path, run: str) -> None:
        self.path, self.run = folder / JOURNAL_FILE, run

    def write(self, fault: FaultSpec, state: str, **undo: Any) -> None:
        append_json_line(self.path, {"run": self.run, "fault": fault.name, "state": state, "action": fault.action,
                                     "tier": fault.tier, "link": fault.link, **undo})  # fmt: skip


def clear_left_in_force(folder: Path, stack: Stack, runtime: TierRuntime) -> list[str]:
    """Undo every fault ``faults.jsonl`` shows injected and never cleared (the loadgen died mid-fault);
    returns what was done, for the log."""
    path = folder / JOURNAL_FILE
    if not path.exists():
        return []
    open_faults: dict[tuple[str, str], dict[str, Any]] = {}
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:  # a torn last line: the fault it began was not injected
            continue
        key = (line["run"], line["fault"])
        if line["state"] == "injecting":
            open_faults[key] = line
        else:
            open_faults.pop(key, None)
    done = []
    for (run, fault), line in open_faults.items():
        tier: TierName | None = line.get("tier")
        if tier is not None:
            runs = runtime.processes()[tier].run
            if runs == "paused":
                runtime.resume(tier)
            elif runs in ("exited", "missing"):  # killed: started again, and serving before the run goes on
                runtime.start(tier)
                runtime.wait_ready(tier, READY_TIMEOUT_S)
            if line.get("restore_limits"):
                runtime.set_limits(tier, TierLimits(**line["restore_limits"]))
        if line.get("restore_links"):
            stack.shape({k: LinkSpec.model_validate(v) for k, v in line["restore_links"].items()})
        append_json_line(path, {"run": run, "fault": fault, "state": "cleared", "by": "resume"})
        done.append(f"{fault} ({run}) was still in force: cleared")
    return done


class FaultInjector:
    """Injects ``faults`` into one run; ``events`` is filled as they happen."""

    def __init__(
        self,
        faults: list[FaultSpec],
        stack: Stack,
        runtime: TierRuntime,
        loads: ModelLoads,
        links: dict[LinkName, LinkSpec],
        *,
        journal: FaultJournal,
        resumed_at_s: float = 0.0,
    ) -> None:
        self.faults = sorted(faults, key=lambda f: f.at_s)
        self.stack, self.runtime, self.loads, self.links = stack, runtime, loads, links
        self.journal = journal
        self.resumed_at_s = resumed_at_s  # a run resumed after a loadgen stop: faults before this are past
        self.events = [FaultEvent(f.name, f.action, str(f.tier or f.link)) for f in self.faults]

    async def run(self, started_ns: int) -> None:
        """Every fault in turn, timed from ``started_ns`` (``time.perf_counter_ns``, the run's clock)."""

        def now_ms() -> float:
            return (time.perf_counter_ns() - started_ns) / 1e6

        for fault, event in zip(self.faults, self.events, strict=True):
            if fault.at_s < self.resumed_at_s:
                event.error = "not injected: the loadgen stopped before it and the run resumed after its time"
                continue
            await asyncio.sleep(max(0.0, fault.at_s - now_ms() / 1e3))
            injected_ms = round(now_ms(), 3)
            try:
                undo = await asyncio.to_thread(self._inject, fault)
            except ConfigError as exc:
                self.journal.write(fault, "not injected")  # nothing in force: a resume must not undo it
                event.error = f"not injected: {exc.message}"
                continue
            event.injected_ms = injected_ms
            await asyncio.sleep(max(0.0, fault.end_s - now_ms() / 1e3))
            try:
                await asyncio.to_thread(undo)
                self.journal.write(fault, "cleared")
                event.cleared_ms = round(now_ms(), 3)
                await asyncio.to_thread(self._serving_again, fault)
                event.ready_ms = round(now_ms(), 3)
            except ConfigError as exc:
                event.error = f"not recovered: {exc.message}"

    def _inject(self, fault: FaultSpec) -> Any:
        """Apply ``fault`` now (journalled first, with what undoes it); returns what clears it."""
        runtime = self.runtime
        undo: dict[str, Any] = {}
        if fault.action == "cut-link":
            undo["restore_links"] = {k: v.model_dump(mode="json") for k, v in self.links.items()}
        if fault.action in ("cpu", "memory"):
            assert fault.tier is not None
            undo["restore_limits"] = asdict(runtime.limits(fault.tier))
        self.journal.write(fault, "injecting", **undo)
        match fault.action:
            case "kill":
                assert fault.tier is not None
                tier: TierName = fault.tier
                runtime.kill(tier)
                return lambda: runtime.start(tier)
            case "pause":
                assert fault.tier is not None
                paused: TierName = fault.tier
                runtime.pause(paused)
                return lambda: runtime.resume(paused)
            case "restart":
                assert fault.tier is not None
                runtime.restart(fault.tier)
                return lambda: None
            case "cut-link":
                assert fault.link is not None
                cut = {**self.links, fault.link: (self.links.get(fault.link) or LinkSpec()).model_copy(
                    update={"loss_pct": 100.0})}  # fmt: skip
                self.stack.shape(cut)
                return lambda: self.stack.shape(self.links)
            case _:  # cpu, memory
                assert fault.tier is not None
                squeezed: TierName = fault.tier
                before = TierLimits(**undo["restore_limits"])
                if fault.action == "cpu":
                    runtime.set_limits(squeezed, TierLimits(fault.cpu_cores, before.memory_bytes))
                else:
                    assert fault.memory_mib is not None
                    runtime.set_limits(squeezed, TierLimits(before.cpu_cores, fault.memory_mib << 20))
                return lambda: runtime.set_limits(squeezed, before)

    def _serving_again(self, fault: FaultSpec) -> None:
        """After a fault is cleared: the tier ready, and after a (re)start its links and variants restored."""
        if fault.tier is None:
            return
        self.runtime.wait_ready(fault.tier, READY_TIMEOUT_S)
        if fault.action in ("kill", "restart"):  # it came back as `make up` started it
            self.stack.shape(self.links)
            self.loads.reload(fault.tier)


def _percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    p50, p95 = np.percentile(latencies, [50, 95])
    return round(float(p50), 3), round(float(p95), 3)


def _recovered_ms(after: list[dict[str, Any]], baseline_p50_ms: float | None) -> float | None:
    """Intended time of the first request that starts ``RECOVERY_WINDOW`` answered requests whose p50 is
    within ``RECOVERED_WITHIN`` of before; None when latency never came back in the run."""
    if baseline_p50_ms is None:
        return None
    for i in range(len(after) - RECOVERY_WINDOW + 1):
        window = after[i : i + RECOVERY_WINDOW]
        if all(r["status"] == 200 for r in window):
            p50 = float(np.median([r["latency_ms"] for r in window]))
            if p50 <= (1 + RECOVERED_WITHIN) * baseline_p50_ms:
                return float(window[0]["intended_ms"])
    return None


def fault_rows(
    records: list[dict[str, Any]], events: list[dict[str, Any]], *, slo_ms: float | None, run_end_ms: float
) -> list[dict[str, Any]]:
    """One row per fault of a run (see the module's docstring); ``events`` as ``FaultEvent`` dicts."""
    timed = sorted((r for r in records if r.get("intended_ms") is not None), key=lambda r: r["intended_ms"])
    rows = []
    injected_events = [e for e in events if e.get("injected_ms") is not None]
    for event in events:
        row: dict[str, Any] = {"fault": event["fault"], "error": event.get("error")}
        if event.get("injected_ms") is None:
            rows.append(row)
            continue
        position = injected_events.index(event)
        # before: from when the previous fault had been recovered from (or the run's start)
        previous = injected_events[position - 1] if position else {}
        start = float(previous.get("ready_ms") or previous.get("cleared_ms") or 0.0)
        injected = float(event["injected_ms"])
        cleared = float(event.get("cleared_ms") or run_end_ms)
        end = float(injected_events[position + 1]["injected_ms"]) if position + 1 < len(injected_events) else run_end_ms
        # before: answered before the fault began; during: sent before it was cleared and still out when it began
        windows: dict[str, list[dict[str, Any]]] = {"before": [], "during": [], "after": []}
        for r in timed:
            if start <= r["intended_ms"] < cleared:
                ended_before = r["end_ms"] is not None and r["end_ms"] < injected
                windows["before" if ended_before else "during"].append(r)
            elif cleared <= r["intended_ms"] < end:
                windows["after"].append(r)
        for name, rs in windows.items():
            row[f"requests_{name}"] = len(rs)
            row[f"failed_{name}"] = sum(1 for r in rs if r["status"] != 200)
        p50_before, p95_before = _percentiles([r["latency_ms"] for r in windows["before"] if r["status"] == 200])
        p50_after, p95_after = _percentiles([r["latency_ms"] for r in windows["after"] if r["status"] == 200])
        _, p95_during = _percentiles([r["latency_ms"] for r in windows["during"] if r["status"] == 200])
        affected = windows["during"] + windows["after"]
        recovered = _recovered_ms(windows["after"], p50_before)
        row.update(
            injected_s=round(injected / 1e3, 3),
            cleared_s=round(cleared / 1e3, 3),
            p50_before_ms=p50_before,
            p95_before_ms=p95_before,
            p95_during_ms=p95_during,
            p50_after_ms=p50_after,
            p95_after_ms=p95_after,
            slo_misses=None
            if slo_ms is None
            else sum(1 for r in affected if r["status"] != 200 or r["latency_ms"] > slo_ms),
            ready_after_s=None if event.get("ready_ms") is None else round((event["ready_ms"] - cleared) / 1e3, 3),
            recovered_after_s=None if recovered is None else round(max(0.0, recovered - cleared) / 1e3, 3),
            failures=dict(
                Counter(
                    f"{r.get('failed_hop') or '?'}: {r.get('cause') or '?'}" for r in affected if r["status"] != 200
                )
            ),
        )
        rows.append(row)
    return rows


def event_dicts(injector: FaultInjector | None) -> list[dict[str, Any]]:
    return [asdict(e) for e in injector.events] if injector is not None else []
