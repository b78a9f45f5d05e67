"""A fault scenario end to end on local tier processes: a three-tier pipeline under Poisson load while edge
is killed (and started again by the runtime), cloud is frozen and the edge-cloud link is cut. Every fault is
injected, cleared and recovered from; every failed request is a record naming its hop and cause; the fault
table counts them where they happened; the restarted tier is the one the state file names. A loadgen killed
(SIGKILL) mid-fault loses no issued request, and the resumed experiment first clears the fault it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loadgen.__main__ import main as loadgen_main
from loadgen.chaos import JOURNAL_FILE
from loadgen.records import issued_seqs, read_records
from services.contracts.specs import TIERS, network_profile_links
from services.contracts.stack_state import StackStateSpec, write_stack_state
from services.contracts.transport import json_call
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports
from services.stack.runtime import LocalRuntime

ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "name": "chaos-it",
    "selections": [{"subject": "fmnist-resnet", "variants": ["partition3"], "placements": ["M-E-C"]}],
    "scenarios": [{"kind": "server", "rate_rps": 10}],
    "networks": ["lan"],
    "warmup_requests": 5,
    "stopping": {"min_samples": 10, "max_samples": 100000, "max_duration_s": 16},
    "request_timeout_s": 1.0,
    "slo_ms": 500,
    "faults": [
        {"action": "kill", "tier": "edge", "at_s": 2, "duration_s": 2},
        {"action": "pause", "tier": "cloud", "at_s": 7.5, "duration_s": 1.5},
        {"action": "cut-link", "link": "edge-cloud", "at_s": 11, "duration_s": 1.5},
    ],
}


@pytest.fixture
def stack_state(built_models: Path, tmp_path: Path) -> Iterator[Path]:
    ports = dict(zip(TIERS, free_ports(3), strict=True))
    deployment = local_deployment(
        ["fmnist-resnet/partition3/manifest.json"],
        models_dir=str(built_models),
        ports=ports,
        links=network_profile_links(ROOT / "compose" / "network-lan.yml"),
    )
    state = tmp_path / "stack.json"
    stack = LocalStack(write_deployment(deployment, tmp_path / "deployment.yaml"), log_dir=tmp_path / "logs",
                       env={"TIERLAB_STARTUP_MODELS": "none"})  # fmt: skip
    with stack:
        write_stack_state(state, stack.state().model_copy(update={"network": "lan"}))
        try:
            yield state
        finally:  # a tier the runtime started again is not the fixture's child
            LocalRuntime(StackStateSpec.model_validate_json(state.read_text())).down()


def test_kill_pause_and_cut_under_load_are_recorded_and_recovered(
    stack_state: Path, built_models: Path, tmp_path: Path
) -> None:
    first_edge = json.loads(stack_state.read_text())["tiers"]["edge"]["pid"]
    spec = tmp_path / "chaos-it.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    results = tmp_path / "results"
    code = loadgen_main(["run", "--spec", str(spec), "--state", str(stack_state), "--models", str(built_models),
                         "--results", str(results), "--run-id", "chaos"])  # fmt: skip
    assert code == 0
    folder = results / "chaos"
    (info,) = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert [e["error"] for e in info["faults"]] == [None, None, None], info["faults"]
    assert all(e["injected_ms"] < e["cleared_ms"] <= e["ready_ms"] for e in info["faults"])
    assert info["stop_reason"].startswith("fault timeline")

    records = read_records(folder)
    assert len(records) == info["issued"]  # nothing issued went unrecorded
    failed = [r for r in records if r["status"] != 200]
    assert failed and all(r["failed_hop"] and r["cause"] for r in failed), failed[:3]

    summary = json.loads((folder / "summary.json").read_text())
    kill, pause, cut = summary["faults"]
    for row in (kill, pause, cut):
        assert row["error"] is None and row["requests_during"] > 0 and row["failed_during"] > 0, row
        assert row["ready_after_s"] is not None and row["failed_before"] == 0, row
    assert {where.split(":")[0] for where in kill["failures"]} == {"mobile -> edge"}, kill
    for row in (pause, cut):  # the deadline propagates: the hop that timed out is the one named
        assert Counter(row["failures"]).most_common(1)[0][0] == "edge -> cloud: timeout", row
        assert row["failed_after"] == 0, row  # a thawed tier and a restored link serve at once
    assert "<h2>Faults</h2>" in (folder / "report.html").read_text()

    # the runtime started edge again as a new process, and the state file says so (make down finds it)
    state = json.loads(stack_state.read_text())
    assert state["tiers"]["edge"]["pid"] != first_edge
    for tier in TIERS:
        assert json_call(f"{state['urls'][tier]}/v2/health/ready")[0] == 200


def test_a_loadgen_killed_mid_fault_loses_nothing_and_the_resume_clears_the_fault(
    stack_state: Path, built_models: Path, tmp_path: Path
) -> None:
    spec = {**SPEC, "faults": [{"action": "pause", "tier": "cloud", "at_s": 3, "duration_s": 6}]}
    spec_file = tmp_path / "chaos-kill.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    folder = results / "killed"
    base = [sys.executable, "-m", "loadgen", "run", "--state", str(stack_state), "--models", str(built_models),
            "--results", str(results)]  # fmt: skip
    process = subprocess.Popen([*base, "--spec", str(spec_file), "--run-id", "killed"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    journal = folder / JOURNAL_FILE
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (journal.exists() and "injecting" in journal.read_text()):
        time.sleep(0.05)
    time.sleep(1.5)  # well inside the pause: requests are out, waiting on the frozen cloud
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    runtime = LocalRuntime(StackStateSpec.model_validate_json(stack_state.read_text()))
    assert runtime.processes()["cloud"].run == "paused", "the kill left the fault in force"
    (run,) = issued_seqs(folder)
    recorded_at_kill = {int(r["seq"]) for r in read_records(folder)}
    assert recorded_at_kill < issued_seqs(folder)[run], "requests were in flight at the kill"

    done = subprocess.run([*base, "--resume", str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was still in force: cleared" in " ".join(done.stderr.split())  # rich wraps lines
    assert runtime.processes()["cloud"].run == "running"
    records = read_records(folder)
    seqs = [int(r["seq"]) for r in records]
    assert len(seqs) == len(set(seqs)) and set(seqs) == issued_seqs(folder)[run], "issued = recorded"
    lost = [r for r in records if r["cause"] == "lost (the loadgen stopped)"]
    assert {int(r["seq"]) for r in lost} == issued_seqs(folder)[run] - recorded_at_kill - {
        int(r["seq"]) for r in records if r["cause"] != "lost (the loadgen stopped)"
    }
    (info,) = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert info["sessions"] == 2 and info["issued"] == len(records)
    assert info["faults"][0]["error"].startswith("not injected: the loadgen stopped before it")
