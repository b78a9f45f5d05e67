"""The loadgen's pure parts: scenario timing in virtual time, coordinated-omission correction against a
stalled fake server, the stopping rule, statistics against scipy and known values, records that
survive a crash, specs and their schema, the recommendation."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats

from loadgen import stats
from loadgen.engine import Done, Issue, StopRule, drive, open_loop_offsets_ns
from loadgen.recommend import answer, answer_rows, explain
from loadgen.records import RecordWriter, finished_runs, mark_finished, read_records, resume_state
from loadgen.spec import SCHEMA_FILE_NAME, SPECS_DIR, ScenarioSpec, StoppingSpec, json_schema, load_spec
from services.contracts.errors import ConfigError

MS = 1_000_000


class FakeClock:
    """Virtual time for asyncio tasks: sleepers wake in deadline order when every task is waiting."""

    def __init__(self) -> None:
        self.now = 0
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now_ns(self) -> int:
        return self.now

    async def sleep_until_ns(self, deadline_ns: int, *, precise: bool = True) -> None:
        if deadline_ns <= self.now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline_ns, next(self._order), future))
        await future

    async def run(self, main: Any) -> Any:
        task = asyncio.ensure_future(main)
        while not task.done():
            for _ in range(20):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if self._sleepers and not task.done():
                deadline, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, deadline)
                future.set_result(None)
        return task.result()


def fake_server(clock: FakeClock, service_ms: Any, log: list[tuple[Issue, int, int]]) -> Any:
    async def send(issue: Issue, started_ns: int) -> Done:
        await clock.sleep_until_ns(started_ns + int(service_ms(issue.seq) * MS))
        log.append((issue, started_ns, clock.now_ns()))
        return Done(clock.now_ns())

    return send


def stop_after(n: int) -> StopRule:
    return StopRule(StoppingSpec(min_samples=n, max_samples=n, max_duration_s=1e6), 0)


def test_single_stream_sends_the_next_request_when_the_previous_answers() -> None:
    clock = FakeClock()
    log: list[tuple[Issue, int, int]] = []
    issued = asyncio.run(clock.run(drive(ScenarioSpec(kind="single-stream"), fake_server(clock, lambda _: 5.0, log),
                                         stop_after(10), clock)))  # fmt: skip
    assert issued == 10
    starts = [started for _, started, _ in log]
    assert starts == [i * 5 * MS for i in range(10)]
    assert all(issue.intended_ns == started for issue, started, _ in log)  # closed loop: due when free


def test_server_scenario_is_poisson_at_the_rate() -> None:
    offsets = list(itertools.islice(open_loop_offsets_ns(ScenarioSpec(kind="server", rate_rps=200),
                                                         np.random.default_rng(1)), 20000))  # fmt: skip
    gaps = np.diff([0, *offsets]) / 1e9
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 200, rel=0.05)  # exponential: std = mean
    assert scipy_stats.kstest(gaps, "expon", args=(0, 1 / 200)).pvalue > 0.01


def test_burst_scenario_sends_each_burst_at_once() -> None:
    offsets = list(itertools.islice(open_loop_offsets_ns(
        ScenarioSpec(kind="burst", burst_size=3, burst_interval_s=0.5), np.random.default_rng(0)), 7))  # fmt: skip
    assert offsets == [0, 0, 0, 500 * MS, 500 * MS, 500 * MS, 1000 * MS]


def test_open_loop_keeps_its_schedule_while_answers_are_slow() -> None:
    clock = FakeClock()
    log: list[tuple[Issue, int, int]] = []
    scenario = ScenarioSpec(kind="burst", burst_size=2, burst_interval_s=0.01)
    asyncio.run(clock.run(drive(scenario, fake_server(clock, lambda _: 50.0, log), stop_after(10), clock)))
    intended = sorted(issue.intended_ns for issue, _, _ in log)
    assert intended[:6] == [0, 0, 10 * MS, 10 * MS, 20 * MS, 20 * MS]
    assert all(started == issue.intended_ns for issue, started, _ in log)  # no waiting for answers


@pytest.mark.parametrize("kind", ["burst", "single-stream"])
def test_requests_are_prepared_before_they_are_due(kind: str) -> None:
    """The loadgen's own work on a request (sample, encode) is off the measured path: an open-loop request is
    prepared before its due time, a closed-loop one before it is stamped due; each send gets its own."""
    clock = FakeClock()
    log: list[tuple[Issue, int, int]] = []
    prepared_at: dict[int, int] = {}

    def prepare(seq: int) -> str:
        prepared_at[seq] = clock.now_ns()
        clock.now += MS  # preparing takes time (less than the open loop's lead), which no latency may include
        return f"request {seq}"

    scenario = ScenarioSpec(kind=kind, burst_size=1, burst_interval_s=0.01)
    asyncio.run(clock.run(drive(scenario, fake_server(clock, lambda _: 1.0, log), stop_after(10), clock,
                                prepare=prepare)))  # fmt: skip
    for issue, started, ended in log[1:]:  # (the very first open-loop request is due as the run starts)
        assert issue.prepared == f"request {issue.seq}"
        assert prepared_at[issue.seq] + MS <= issue.intended_ns <= started
        assert (ended - issue.intended_ns) / MS == pytest.approx(1.0)  # the service time, and nothing else


def test_a_stalled_server_shows_as_latency_from_the_intended_time() -> None:
    """Coordinated omission: with one connection and a 500 ms stall, the requests due during the stall
    wait; measured from their intended time they are slow, as a user would see them."""
    clock = FakeClock()
    log: list[tuple[Issue, int, int]] = []
    stop = stop_after(60)
    scenario = ScenarioSpec(kind="burst", burst_size=1, burst_interval_s=0.01)  # one every 10 ms
    service = fake_server(clock, lambda seq: 500.0 if seq == 10 else 1.0, log)
    asyncio.run(clock.run(drive(scenario, service, stop, clock, max_inflight=1)))
    by_seq = {issue.seq: (issue, started, ended) for issue, started, ended in log}
    issue, started, ended = by_seq[20]  # due at 200 ms, in the middle of the stall (100 → 600 ms)
    assert started - issue.intended_ns >= 390 * MS  # it had to wait for the connection
    assert (ended - issue.intended_ns) / MS >= 390  # and its latency says so
    assert (ended - started) / MS == pytest.approx(1.0)  # the naive, CO-prone measure would say 1 ms
    latencies = np.array(stop.latencies_ms)
    assert np.percentile(latencies, 90) > 100  # the stall reaches the tail instead of vanishing


def test_stop_rule_stops_when_the_percentile_cis_are_narrow_and_not_before_the_floor() -> None:
    rule = StopRule(StoppingSpec(min_samples=50, max_samples=1000, ci_rel_width=0.05, check_every=10), 0)
    rng = np.random.default_rng(0)
    for value in rng.normal(10.0, 0.1, 49):
        rule.add(float(value))
        assert not rule.done(0)
    rule.add(10.0)
    assert rule.done(0) and "CIs" in rule.reason
    noisy = StopRule(StoppingSpec(min_samples=20, max_samples=200, ci_rel_width=0.01, check_every=10), 0)
    for value in rng.lognormal(1.0, 1.5, 200):
        noisy.add(float(value))
        if noisy.done(0):
            break
    assert "max_samples" in noisy.reason


def test_cliffs_delta_matches_its_definition_and_words() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 50)
    brute = np.mean([np.sign(x - y) for x in a for y in b])
    assert stats.cliffs_delta(a, b) == pytest.approx(brute)
    assert stats.cliffs_delta([3, 4], [1, 2]) == 1.0
    assert stats.cliffs_delta([1, 2], [1, 2]) == 0.0
    assert [stats.delta_words(d) for d in (0.1, 0.2, 0.4, -0.8)] == ["negligible", "small", "medium", "large"]


def test_wilson_interval_known_values() -> None:
    p, low, high = stats.wilson(8, 10)
    assert (p, round(low, 4), round(high, 4)) == (0.8, 0.4902, 0.9433)


def test_kruskal_and_mcnemar_agree_with_scipy_on_fixed_data() -> None:
    groups = {"a": [1.1, 2.0, 3.2, 4.1, 5.3], "b": [2.2, 3.1, 4.0, 5.5, 6.1], "c": [7.0, 8.2, 9.1, 10.0, 11.3]}
    h, p = stats.kruskal(groups)
    expected = scipy_stats.kruskal(*groups.values())
    assert (h, p) == pytest.approx((expected.statistic, expected.pvalue))
    a = [True] * 30 + [False] * 5 + [True] * 2 + [False] * 3
    b = [True] * 30 + [True] * 5 + [False] * 2 + [False] * 3
    only_a, only_b, p_mc = stats.mcnemar_exact(a, b)
    assert (only_a, only_b) == (2, 5)
    assert p_mc == pytest.approx(scipy_stats.binomtest(2, 7, 0.5).pvalue)  # 0.453125
    assert p_mc == pytest.approx(0.453125)


def test_dunn_holm_separates_distinct_groups_only() -> None:
    rng = np.random.default_rng(0)
    same_a, same_b, far = rng.normal(0, 1, 60), rng.normal(0, 1, 60), rng.normal(3, 1, 60)
    table = stats.dunn_holm({"a": same_a, "b": same_b, "far": far})
    assert table[("a", "far")] < 1e-6 and table[("b", "far")] < 1e-6
    assert table[("a", "b")] > 0.05
    assert table[("a", "b")] == table[("b", "a")]


def test_percentile_ci_brackets_the_estimate() -> None:
    samples = np.random.default_rng(2).exponential(5.0, 2000)
    estimate, low, high = stats.percentile_ci(samples, 95)
    assert low < estimate < high
    assert estimate == pytest.approx(np.percentile(samples, 95))
    assert estimate == pytest.approx(5.0 * np.log(20), rel=0.1)  # the exponential's 95th percentile


def test_pareto_front() -> None:
    points = [("fast-bad", 1.0, 0.7), ("slow-good", 9.0, 0.9), ("dominated", 5.0, 0.69), ("mid", 4.0, 0.8)]
    assert stats.pareto_front(points) == ["fast-bad", "mid", "slow-good"]


def _record(run: str, seq: int) -> dict[str, Any]:
    return {"run": run, "seq": seq, "sample_id": seq, "latency_ms": 1.5, "status": 200, "bytes_in": 10}


def test_records_survive_a_crash_mid_line_and_resume_continues(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path)
    for seq in range(5):
        writer.write(_record("a|x|lan", seq))
    mark_finished(tmp_path, {"run": "a|x|lan", "n": 5})
    for seq in range(3):
        writer.write(_record("b|x|lan", seq))
    writer.close()
    with (tmp_path / "records.csv").open("a") as handle:
        handle.write("b|x|lan,,,,,,,3,3,")  # a kill during a write leaves half a row
    with (tmp_path / "runs.jsonl").open("a") as handle:
        handle.write('{"run": "c|x')  # and half a line here
    records = read_records(tmp_path)
    assert [(r["run"], r["seq"]) for r in records] == [("a|x|lan", s) for s in range(5)] + [
        ("b|x|lan", s) for s in range(3)
    ]
    assert set(finished_runs(tmp_path)) == {"a|x|lan"}
    finished, partial = resume_state(tmp_path)
    assert finished == {"a|x|lan"} and [r["seq"] for r in partial["b|x|lan"].records] == [0, 1, 2]


def test_built_in_specs_load_and_the_schema_file_is_current() -> None:
    quick, default = load_spec("quick"), load_spec("default")
    assert quick.stopping.max_samples <= 300
    variants = {v for s in default.selections for v in ([] if s.variants == "all" else s.variants)}
    assert not variants, "the default spec runs every variant the operators built"
    assert default.sweep is not None and len(default.sweep.cells()) == 36
    committed = json.loads((SPECS_DIR / SCHEMA_FILE_NAME).read_text())
    assert committed == json_schema(), "run `python -m loadgen schema --write`"


def test_a_bad_spec_names_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nselections: [{subject: x}]\nscenarios: [{kind: server}]\n")
    with pytest.raises(ConfigError, match="rate_rps"):
        load_spec(str(path))
    with pytest.raises(ConfigError, match="built-in specs: chaos, default, devices, quick"):
        load_spec("nope")


def _entry(strategy: str, p95: float, errors: float = 0.0, valid: bool = True) -> dict[str, Any]:
    variant = strategy.split("@", maxsplit=1)[0].split(".")[1]
    verdict = {"valid": valid, "reasons": [] if valid else [{"kind": "schedule lag", "text": "lagged"}],
               "notes": [], "requested": {}, "effective": {}}  # fmt: skip
    return {"subject": "s", "scenario": "single-stream", "network": "lan", "strategy": strategy, "variant": variant,
            "placement": strategy.split("@")[1], "error_rate": errors, "verdict": verdict,
            "latency_ms": {"p50": p95 / 2, "p95": p95, "p95_low": p95 * 0.9, "p95_high": p95 * 1.1}}  # fmt: skip


def _variant(name: str, drop: float, half: float) -> dict[str, Any]:
    """A variant's accuracy document with its drop from identity (offline evidence)."""
    interval = {"value": drop, "low": drop - half, "high": drop + half, "n": 1500, "source": "offline",
                "split_items": 1500}  # fmt: skip
    return {"subject": "s", "variant": name, "metric": "accuracy", "deployed": None, "offline": None, "drop": interval}


def test_recommend_honours_the_budget_and_the_accuracy_drop() -> None:
    summary = {
        "strategies": [_entry("s.identity@C", 30.0), _entry("s.identity@M", 12.0), _entry("s.sptq@M", 6.0),
                       _entry("s.distill@M", 3.0), _entry("s.partition2@M-E", 8.0, errors=0.2)],
        "variants": [_variant("sptq", 0.005, 0.01), _variant("distill", 0.10, 0.02), _variant("partition2", 0, 0)],
    }  # fmt: skip
    (found,) = answer(summary, p95_ms=15, max_drop=0.02)
    assert found.winner is not None and found.winner.strategy == "s.sptq@M"
    assert [n.strategy for n in found.runner_ups] == ["s.identity@M"]
    reasons = {r.strategy: (r.kind, r.why) for r in found.ruled_out}
    assert reasons["s.distill@M"][0] == "accuracy" and "beyond 2 points" in reasons["s.distill@M"][1]
    assert "> 15 ms" in reasons["s.identity@C"][1] and reasons["s.partition2@M-E"][0] == "errors"
    text = "\n".join(explain(found))
    assert "use s.sptq@M" in text and "runner-up s.identity@M" in text
    (none,) = answer(summary, p95_ms=1, max_drop=0.0)
    assert none.winner is None and "no VALID strategy meets" in explain(none)[0]


def test_recommend_never_picks_an_invalid_run_and_says_when_only_one_would_do() -> None:
    summary = {"strategies": [_entry("s.identity@M", 12.0), _entry("s.sptq@M", 2.0, valid=False)],
               "variants": [_variant("sptq", 0.0, 0.005)]}  # fmt: skip
    (found,) = answer(summary, p95_ms=15, max_drop=0.02)
    assert found.winner is not None and found.winner.strategy == "s.identity@M"
    assert {r.strategy: r.why for r in found.ruled_out}["s.sptq@M"] == "INVALID run: lagged"
    assert found.valid_runs == 1 and found.invalid_kinds == {"schedule lag": 1}
    (tight,) = answer(summary, p95_ms=5, max_drop=0.02)
    assert tight.winner is None
    assert "s.sptq@M would, but its run is INVALID" in "\n".join(explain(tight))


def test_a_faster_strategy_the_data_cannot_decide_is_named_not_ruled_out() -> None:
    summary = {"strategies": [_entry("s.identity@M", 12.0), _entry("s.dsptq@M", 4.0)],
               "variants": [_variant("dsptq", 0.02, 0.013)]}  # fmt: skip
    (found,) = answer(summary, p95_ms=None, max_drop=0.03)
    assert found.winner is not None and found.winner.strategy == "s.identity@M"
    assert [u.strategy for u in found.undecided] == ["s.dsptq@M"]
    assert "dsptq@M" not in {r.strategy for r in found.ruled_out}
    decision = found.undecided[0].accuracy
    assert decision.outcome == "inconclusive" and decision.more_items and decision.more_items > 0
    (row,) = answer_rows([found])
    assert row[2] == "identity@M" and "faster, accuracy undecided: dsptq@M" in row[7]
