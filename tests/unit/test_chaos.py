"""Fault scenarios apart from a stack: the spec's rules, where a failure is placed and why, the fault table
from known records, and the local runtime's kill/pause/start on a real process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from loadgen.chaos import RECOVERY_WINDOW, FaultJournal, clear_left_in_force, fault_rows
from loadgen.spec import ExperimentSpec, FaultSpec
from loadgen.target import Stack
from services.contracts.errors import failure_of
from services.contracts.runtime import TierLimits, Unsupported
from services.contracts.stack_state import LocalTierSpec, StackStateSpec
from services.stack.runtime import LocalRuntime, process_run, wait_gone

BASE: dict[str, Any] = {
    "name": "chaos-test",
    "selections": [{"subject": "s"}],
    "scenarios": [{"kind": "server", "rate_rps": 10}],
    "stopping": {"max_duration_s": 30},
}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"action": "kill", "at_s": 1, "duration_s": 2}, "needs a tier"),
        ({"action": "cut-link", "tier": "edge", "at_s": 1, "duration_s": 2}, "needs a link"),
        ({"action": "cpu", "tier": "edge", "at_s": 1, "duration_s": 2}, "needs cpu_cores"),
        ({"action": "memory", "tier": "edge", "at_s": 1, "duration_s": 2}, "needs memory_mib"),
        ({"action": "pause", "tier": "edge", "at_s": 1}, "needs duration_s"),
        ({"action": "restart", "tier": "edge", "at_s": 1, "duration_s": 2}, "at once"),
        ({"action": "explode", "tier": "edge", "at_s": 1, "duration_s": 2}, "action"),
    ],
)
def test_a_fault_says_what_it_is_missing(fault: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FaultSpec.model_validate(fault)


def test_faults_must_not_overlap_and_must_leave_time_to_recover() -> None:
    kill = {"action": "kill", "tier": "edge", "at_s": 5, "duration_s": 10}
    pause = {"action": "pause", "tier": "cloud", "at_s": 12, "duration_s": 2}
    with pytest.raises(ValidationError, match="overlap"):
        ExperimentSpec.model_validate({**BASE, "faults": [kill, pause]})
    late = {**pause, "at_s": 25, "duration_s": 5}
    with pytest.raises(ValidationError, match="leave time after it"):
        ExperimentSpec.model_validate({**BASE, "faults": [late]})
    spec = ExperimentSpec.model_validate({**BASE, "faults": [kill, {**pause, "at_s": 16}]})
    assert [f.name for f in spec.faults] == ["kill edge @5+10s", "pause cloud @16+2s"]


@pytest.mark.parametrize(
    ("status", "message", "hop", "cause"),
    [
        (504, "mobile -> edge answered 504: edge -> cloud: no answer within 1.2 s", "edge -> cloud", "timeout"),
        (502, "mobile -> edge: cannot reach http://edge:8000: [Errno 111] refused", "mobile -> edge", "unreachable"),
        (502, "mobile -> edge answered 400: model 'm' is not loaded on edge", "mobile -> edge", "refused (400)"),
        (503, "mobile -> edge answered 503: edge is not ready", "mobile -> edge", "unavailable"),
        (0, "loadgen -> mobile: no answer within 2 s", "loadgen -> mobile", "timeout"),
        (0, "loadgen -> mobile: cannot reach http://127.0.0.1:8001: refused", "loadgen -> mobile", "unreachable"),
        (400, "tensor 'x' has shape [1, 3], the model takes [-1, 4]", "loadgen -> mobile", "refused (400)"),
        (500, "internal error in mobile: ValueError: x -> y", "loadgen -> mobile", "tier error (500)"),
    ],
)
def test_a_failure_names_the_innermost_hop_and_its_cause(status: int, message: str, hop: str, cause: str) -> None:
    assert failure_of(status, message, entry="mobile") == (hop, cause)


def _record(intended_ms: float, latency_ms: float, status: int = 200, hop: str = "", cause: str = "") -> dict[str, Any]:
    return {"intended_ms": intended_ms, "end_ms": intended_ms + latency_ms, "latency_ms": latency_ms,
            "status": status, "failed_hop": hop, "cause": cause}  # fmt: skip


def test_the_fault_table_counts_each_window_and_finds_the_recovery() -> None:
    """One request every 100 ms for 20 s; the fault is 5–8 s: everything sent in it fails at edge, then
    latency is doubled until 10 s and back to normal after."""
    records = []
    for k in range(200):
        t = k * 100.0
        if 5000 <= t < 8000:
            records.append(_record(t, 50.0, 502, "mobile -> edge", "unreachable"))
        else:
            records.append(_record(t, 20.0 if t < 5000 or t >= 10_000 else 40.0))
    records.append(_record(4990.0, 30.0, 502, "mobile -> edge", "unreachable"))  # out when the fault began
    events = [{"fault": "kill edge", "injected_ms": 5000.0, "cleared_ms": 8000.0, "ready_ms": 9000.0}]
    (row,) = fault_rows(records, events, slo_ms=30.0, run_end_ms=20_000.0)
    assert (row["requests_before"], row["requests_during"], row["requests_after"]) == (50, 31, 120)
    assert (row["failed_before"], row["failed_during"], row["failed_after"]) == (0, 31, 0)
    assert row["p50_before_ms"] == 20.0 and row["p50_after_ms"] == 20.0
    assert row["slo_misses"] == 31 + 20  # the failures, and the 40 ms answers from 8 to 10 s
    assert row["ready_after_s"] == 1.0
    # the first window of RECOVERY_WINDOW answers with a p50 within 10 % of 20 ms starts once fewer than
    # half of them are the slow ones
    assert row["recovered_after_s"] == pytest.approx(2.0 - (RECOVERY_WINDOW // 2) * 0.1 + 0.1)
    assert row["failures"] == {"mobile -> edge: unreachable": 31}


def test_a_fault_that_was_not_injected_is_a_row_that_says_why() -> None:
    events = [{"fault": "cpu mobile", "injected_ms": None, "error": "not injected: no cgroup"}]
    assert fault_rows([_record(0.0, 1.0)], events, slo_ms=None, run_end_ms=1000.0) == [
        {"fault": "cpu mobile", "error": "not injected: no cgroup"}
    ]


def test_the_local_runtime_pauses_kills_and_starts_a_real_process(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    state = StackStateSpec(runtime="local", urls={})
    runtime = LocalRuntime(state, tmp_path / "stack.json")
    state.tiers["edge"] = LocalTierSpec(pid=2**22 + 1, url="", log=str(tmp_path / "edge.log"), argv=argv)
    runtime.start("edge")  # a pid that does not exist counts as exited: started
    first = state.tiers["edge"].pid
    try:
        assert runtime.processes()["edge"].run == "running"
        assert runtime.processes()["mobile"].run == "missing"
        runtime.pause("edge")
        assert process_run(first) == "paused"
        runtime.resume("edge")
        assert process_run(first) == "running"
        runtime.kill("edge")
        assert runtime.processes()["edge"].run == "exited"
        runtime.start("edge")
        second = state.tiers["edge"].pid
        assert second != first and process_run(second) == "running"
        assert f'"pid": {second}' in (tmp_path / "stack.json").read_text()  # `make down` finds the new one
        assert runtime.limits("edge") == TierLimits(None, None)
        with pytest.raises(Unsupported, match="Docker runtime"):
            runtime.set_limits("edge", TierLimits(0.5, None))
        assert runtime.down() == ["edge"]
        assert wait_gone(second, 5.0)
    finally:
        runtime.down()


def test_a_resume_undoes_only_the_faults_left_in_force(tmp_path: Path) -> None:
    """The journal: a fault injected and cleared, or refused, is closed; a torn last line is ignored; only a
    fault still in force is undone (here a paused process, thawed)."""
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    state = StackStateSpec(runtime="local", urls={"mobile": "http://127.0.0.1:9"})
    state.tiers["cloud"] = LocalTierSpec(pid=2**22 + 1, url="", log=str(tmp_path / "cloud.log"), argv=argv)
    runtime = LocalRuntime(state)
    runtime.start("cloud")
    try:
        journal = FaultJournal(tmp_path, "run-a")
        pause = FaultSpec(action="pause", tier="cloud", at_s=1, duration_s=1)
        squeeze = FaultSpec(action="cpu", tier="edge", cpu_cores=0.5, at_s=3, duration_s=1)
        journal.write(squeeze, "injecting", restore_limits={"cpu_cores": None, "memory_bytes": None})
        journal.write(squeeze, "not injected")  # refused: a resume must not try to undo it
        journal.write(pause, "injecting")
        runtime.pause("cloud")
        with (tmp_path / "faults.jsonl").open("a") as handle:
            handle.write('{"run": "run-a", "fault": "torn')
        stack = Stack(state.urls, state)
        cleared = clear_left_in_force(tmp_path, stack, runtime)
        assert cleared == ["pause cloud @1+1s (run-a) was still in force: cleared"]
        assert runtime.processes()["cloud"].run == "running"
        assert clear_left_in_force(tmp_path, stack, runtime) == []  # cleared once, journalled
    finally:
        runtime.down()
