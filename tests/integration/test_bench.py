"""The bench end to end on local tier processes (no Docker): the `quick` spec against variants built
in the test ring, a report whose numbers match the records and that renders in headless Chromium,
a recommendation, and a killed experiment resumed without losing a written record."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loadgen.__main__ import main as loadgen_main
from loadgen.records import FIELDS, read_records
from services.contracts.specs import TIERS, network_profile_links
from services.contracts.stack_state import write_stack_state
from services.contracts.transport import json_call
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
QUICK_VARIANTS = ("identity", "partition2", "sptq", "early-exit")


@pytest.fixture(scope="module")
def stack_state(built_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("bench")
    ports = dict(zip(TIERS, free_ports(3), strict=True))
    deployment = local_deployment(
        [f"fmnist-resnet/{v}/manifest.json" for v in QUICK_VARIANTS],
        models_dir=str(built_models),
        ports=ports,
        links=network_profile_links(ROOT / "compose" / "network-lan.yml"),
    )
    # the tiers start empty, as `make up` starts them: the loadgen loads what each run group needs
    with LocalStack(
        write_deployment(deployment, folder / "deployment.yaml"),
        log_dir=folder / "logs",
        env={"TIERLAB_STARTUP_MODELS": "none"},
    ) as stack:
        state = folder / "stack.json"
        write_stack_state(state, stack.state().model_copy(update={"network": "lan"}))
        yield state


def run_loadgen(*args: str) -> int:
    return loadgen_main(list(args))


def check_peak_memory_per_run(folder: Path, summary: dict[str, Any]) -> None:
    """Every run has each tier's peak resident memory during it, and no tier went down."""
    for line in (folder / "runs.jsonl").read_text().splitlines():
        info = json.loads(line)
        assert info["oom_killed"] == [] and info["unreachable"] == [], info
        assert {t for t, m in info["memory_mib"].items() if m["peak_rss_mib"] >= m["rss_mib"] > 0} == set(TIERS)
    for entry in summary["strategies"]:
        assert set(entry["verdict"]["effective"]["peak_rss_mib"]) == set(TIERS)
    assert "peak RSS MiB" in (folder / "report.html").read_text()


def check_one_answer_everywhere(folder: Path, summary: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """summary.json, the report and recommend give one answer; the variants' accuracies are pooled and checked."""
    # one function answers for summary.json, the report and recommend: the same winner, named as `use …`
    kept = next(a for a in summary["answers"] if a["constraint"] == "fastest, within 3 points")
    code = run_loadgen("recommend", str(folder), "--p95-ms", "1e9", "--max-accuracy-drop", "0.03")
    printed = capsys.readouterr().out
    if kept["winner"] is not None:
        chosen = re.search(r"use (\S+):", printed)
        assert code == 0 and chosen and chosen.group(1) == kept["winner"]["strategy"], printed
        assert kept["winner"]["valid"]
    else:  # a busy machine may leave no VALID run: then it says which would do
        assert code == 1 and "no VALID strategy meets" in printed, printed
    variants = {v["variant"]: v for v in summary["variants"]}
    assert set(variants) == set(QUICK_VARIANTS)
    for name, accuracy in variants.items():  # the deployed tiers compute what was evaluated offline
        assert accuracy["flag"] is None and accuracy["offline"]["n"] > 0, accuracy
        assert (accuracy["drop"] is None) == (name == "identity"), accuracy
    # each placement answered its own share of the split: the variant's pooled items outnumber any one of its
    # runs' (another variant's run may be longer: a bimodal early exit runs to its cap while identity converges)
    identity_runs = [e["n"] for e in summary["strategies"] if e["variant"] == "identity"]
    assert len(identity_runs) > 1 and variants["identity"]["deployed"]["n"] > max(identity_runs)


def test_quick_spec_report_matches_its_records_and_renders(
    stack_state: Path, built_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    code = run_loadgen("run", "--spec", "quick", "--state", str(stack_state), "--models", str(built_models),
                       "--results", str(results), "--run-id", "it")  # fmt: skip
    assert code == 0
    folder = results / "it"
    for name in ("spec.yaml", "bundle.json", "records.csv", "runs.jsonl", "summary.json", "report.html"):
        assert (folder / name).is_file(), name
    printed = capsys.readouterr().out
    assert "fmnist-resnet · single-stream · network lan" in printed and "identity@" in printed

    records = read_records(folder)
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["strategies"]) == 16  # 4 variants × 5 placements, minus 1-stage splits
    for entry in summary["strategies"]:
        rows = [r for r in records if r["run"] == entry["run"]]
        ok = [r for r in rows if r["status"] == 200]
        assert entry["n"] == len(rows) and entry["errors"] == len(rows) - len(ok) == 0
        assert entry["latency_ms"]["p50"] == pytest.approx(np.percentile([r["latency_ms"] for r in ok], 50), abs=1e-3)
        assert entry["accuracy"]["value"] == pytest.approx(np.mean([r["correct"] for r in ok]))
        assert entry["latency_ms"]["p50_low"] <= entry["latency_ms"]["p50"] <= entry["latency_ms"]["p50_high"]
        for r in ok:  # every record has its per-hop breakdown and a latency from the intended time
            assert r["hops"] >= 1 and r["hop0_tier"] == "mobile"
            assert r["latency_ms"] >= r["service_ms"] > 0
        if entry["placement"] in ("E", "C"):  # the device relays the input over its link
            assert all(r["hops"] == 2 and r["hop0_first_stage"] == -1 for r in ok)
    exits = [e for e in summary["strategies"] if e["variant"] == "early-exit"]
    assert all(0 < e["exit_rate"] < 1 for e in exits)

    bundle = json.loads((folder / "bundle.json").read_text())
    assert bundle["networks"]["lan"]["backends"] == ["userspace"]
    assert {m["link"] for m in bundle["networks"]["lan"]["measured"]} == {"mobile-edge", "edge-cloud", "mobile-cloud"}
    assert bundle["versions"]["onnxruntime"] and bundle["seed"] == 1

    figures = 4  # one group: CDF, accuracy-latency, per-hop, per-tier
    dom, errors = render_in_chromium(folder / "report.html", tmp_path)
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == figures
    assert dom.count('class="main-svg"') >= figures
    assert errors == []

    # each variant was loaded where its runs computed, measured, and unloaded after its last run
    loads = bundle["loads"]
    assert {e["model"] for e in loads} == {f"fmnist-resnet.{v}" for v in QUICK_VARIANTS} and bundle[
        "not_runnable"
    ] == []
    assert {e["tier"] for e in loads} == set(TIERS) and all(
        e["load_ms"] > 0 and e["resident_mib"] is not None for e in loads
    )
    urls = json.loads(stack_state.read_text())["urls"]
    for tier, url in urls.items():
        assert json_call(f"{url}/v2/repository/index", method="POST", body={"ready": True}) == (200, []), tier
    assert "Memory and cold starts" in (folder / "report.html").read_text()
    check_peak_memory_per_run(folder, summary)

    for entry in summary["strategies"]:  # every run has a verdict; an INVALID one says why
        assert entry["verdict"]["valid"] == (entry["verdict"]["reasons"] == []), entry["verdict"]
    lan = bundle["networks"]["lan"]
    for when in ("before", "after"):
        assert {m["tier"] for m in lan[f"speed_{when}"]} == set(TIERS), lan[f"speed_{when}"]

    check_one_answer_everywhere(folder, summary, capsys)


def test_the_reports_first_screen_is_the_answer_table(stack_state: Path, built_models: Path, tmp_path: Path) -> None:
    """At 1400 × 900 in headless Chromium, the first thing on the page is the answer table: one row per stated
    constraint for every subject and network of the quick spec, its first rows within the screen."""
    results = tmp_path / "results"
    spec = yaml.safe_load((ROOT / "loadgen" / "specs" / "quick.yaml").read_text())
    spec["selections"][0].update(variants=["identity", "sptq"], placements=["M", "E"])
    spec["stopping"] = {"min_samples": 20, "max_samples": 20, "max_duration_s": 30, "check_every": 10}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code = run_loadgen("run", "--spec", str(tmp_path / "spec.yaml"), "--state", str(stack_state), "--models",
                       str(built_models), "--results", str(results), "--run-id", "screen")  # fmt: skip
    assert code == 0
    layout = first_screen(results / "screen" / "report.html", tmp_path)
    assert layout["firstTable"] == "answer" and layout["before"] == ["H1", "P"], layout
    assert layout["top"] < 200 and layout["secondRowBottom"] <= 900, layout
    constraints = {"fastest, within 1 point", "fastest, within 3 points", "fastest, any accuracy"}
    assert layout["rows"] == [["fmnist-resnet · single-stream · lan", c] for c in sorted(constraints)], layout


LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("table");
  const rows = [...table.querySelectorAll("tbody tr")];
  const before = [];
  for (let node = document.body.firstElementChild; node && node !== table; node = node.nextElementSibling)
    before.push(node.tagName);
  document.body.setAttribute("data-layout", JSON.stringify({
    firstTable: table.id, before, top: table.getBoundingClientRect().top,
    secondRowBottom: rows[Math.min(1, rows.length - 1)].getBoundingClientRect().bottom,
    rows: rows.map(r => [r.cells[0].textContent, r.cells[1].textContent]).sort((a, b) => a[1].localeCompare(b[1])),
  }));
});
</script>"""


def first_screen(page: Path, scratch: Path) -> dict[str, Any]:
    """Where the page's first table sits in a 1400 × 900 window (the page's own layout, read back by a probe)."""
    probed = scratch / "probed.html"
    probed.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    dom, errors = render_in_chromium(probed, scratch, "--window-size=1400,900")
    assert errors == []
    found = re.search(r'data-layout="([^"]*)"', dom)
    assert found, dom[:2000]
    return dict(json.loads(html.unescape(found.group(1))))


def test_runs_a_tier_cannot_hold_are_not_runnable_and_the_experiment_goes_on(
    built_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = local_deployment(
        ["fmnist-resnet/identity/manifest.json", "fmnist-resnet/sptq/manifest.json"],
        models_dir=str(built_models),
        ports=dict(zip(TIERS, free_ports(3), strict=True)),
    )
    spec = yaml.safe_load((ROOT / "loadgen" / "specs" / "quick.yaml").read_text())
    spec["selections"][0].update(variants=["identity", "sptq"], placements=["M", "E"])
    spec["stopping"] = {"min_samples": 20, "max_samples": 20, "max_duration_s": 30, "check_every": 10}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # a 1 MiB memory budget: no tier can hold any variant
    env = {"TIERLAB_STARTUP_MODELS": "none", "TIERLAB_MEMORY_BUDGET_MB": "1"}
    with LocalStack(write_deployment(deployment, tmp_path / "d.yaml"), log_dir=tmp_path / "logs", env=env) as stack:
        state = tmp_path / "stack.json"
        write_stack_state(state, stack.state().model_copy(update={"network": "lan"}))
        code = run_loadgen("run", "--spec", str(tmp_path / "spec.yaml"), "--state", str(state), "--models",
                           str(built_models), "--results", str(tmp_path / "results"), "--run-id", "small")  # fmt: skip
    printed = capsys.readouterr()
    folder = tmp_path / "results" / "small"
    refused = json.loads((folder / "bundle.json").read_text())["not_runnable"]
    assert len(refused) == 4 and all("does not fit: needs ~" in e["reason"] for e in refused), refused
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and all("does not fit" in r["not_runnable"] for r in runs)
    assert "not runnable on this profile" in printed.err and read_records(folder) == []
    assert (folder / "report.html").exists() and "Not runnable on this profile" in (folder / "report.html").read_text()
    assert code == 0, printed.err[-2000:]


def render_in_chromium(page: Path, scratch: Path, *flags: str) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console error Chromium logged."""
    chromium = require_tool("chromium")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={scratch / 'chromium'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=15000", *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return done.stdout, errors


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:  # the writer has just created it
        return []
    header = rows[0]
    return [r for r in rows[1:] if len(r) == len(header)]


def test_a_killed_experiment_resumes_without_losing_records(
    stack_state: Path, built_models: Path, tmp_path: Path
) -> None:
    spec = yaml.safe_load((ROOT / "loadgen" / "specs" / "quick.yaml").read_text())
    spec["stopping"] = {"min_samples": 40, "max_samples": 40, "max_duration_s": 30, "check_every": 20}
    spec["selections"][0]["variants"] = ["identity", "sptq"]
    spec["selections"][0]["placements"] = ["M", "E"]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    base = [sys.executable, "-m", "loadgen", "run", "--state", str(stack_state), "--models", str(built_models),
            "--results", str(results)]  # fmt: skip
    records = results / "killed" / "records.csv"
    process = subprocess.Popen([*base, "--spec", str(spec_file), "--run-id", "killed"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not records.exists() or len(_rows(records)) < 60):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # no clean-up, no flush beyond what was written
    process.wait()
    before = _rows(records)
    runs_file = results / "killed" / "runs.jsonl"
    finished_at_kill = {json.loads(line)["run"] for line in runs_file.read_text().splitlines()}
    assert 60 <= len(before) < 160, "killed mid-experiment"

    done = subprocess.run([*base, "--resume", str(results / "killed")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    after = _rows(records)
    assert after[: len(before)] == before, "every record written before the kill is still there"
    keys = [(r[0], r[7]) for r in after]  # (run, seq)
    assert len(keys) == len(set(keys)), "no request recorded twice"
    infos = [json.loads(line) for line in (results / "killed" / "runs.jsonl").read_text().splitlines()]
    assert len({info["run"] for info in infos}) == len(infos) == 4
    continued = [info["run"] for info in infos if info["sessions"] == 2]
    assert len(continued) <= 1, "only the run the kill cut spans two sessions"
    if before[-1][0] not in finished_at_kill:  # the kill cut the run of its last row
        assert continued == [before[-1][0]]
    latency = FIELDS.index("latency_ms")
    for info in infos:  # issued = recorded: a request in flight at the kill is a failed row, not a gap
        rows = [r for r in after if r[0] == info["run"]]
        assert info["issued"] == len(rows) and sorted(int(r[7]) for r in rows) == list(range(len(rows)))
        assert sum(1 for r in rows if r[latency]) == 40, info
    assert (results / "killed" / "report.html").exists()
