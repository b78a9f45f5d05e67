"""The experiment runner: drive each run ``loadgen.planning`` planned, record every request.

An experiment writes ``results/<run-id>/``: ``spec.yaml``, ``bundle.json`` (``loadgen.environment``: what
makes it reproducible: versions, kernel, git commit, seeds, stack and profiles, the link backend in force
and each network's measured fidelity), ``records.csv`` (one row per request, as it comes) and
``runs.jsonl`` (one line per finished run). ``summary.json`` and ``report.html`` are made from the
records at the end (and can be remade with ``python -m loadgen report``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
import yaml

from loadgen.accuracy import snapshot_offline
from loadgen.chaos import FaultInjector, FaultJournal, event_dicts
from loadgen.engine import Done, Issue, RealClock, StopRule, drive
from loadgen.environment import environment_bundle
from loadgen.loads import ModelLoads
from loadgen.planning import Plan, RunPlan, network_links, placement_offset
from loadgen.records import LOST_CAUSE, LOST_ERROR, RecordWriter, Resumed, mark_finished, resume_state
from loadgen.spec import ExperimentSpec
from loadgen.target import Answer, PreparedRequest, Stack
from loadgen.telemetry import LoadgenTelemetry
from services.contracts import pipeline as p
from services.contracts.calibration import measure_speeds
from services.contracts.device import CpuThrottlingSpec
from services.contracts.errors import BadParameter, ConfigError, failure_of
from services.contracts.manifest import load_manifest
from services.contracts.runkey import SweepCell
from services.contracts.samples import SampleSet, load_samples
from services.contracts.scoring import score_item
from services.contracts.specs import LinkName, LinkSpec


@dataclass
class LoadgenShare:
    """The loadgen's own work per request, kept off the measured path and reported beside the results,
    subtracted from nothing (as MLPerf LoadGen shows its overhead): preparing a request before it is due,
    completing it once its reply is in (decode, score, record, metrics), and its CPU per request. What
    stays on the path is the schedule's lag (per record) and the HTTP client, measured once per experiment
    against a bare socket (``client_overhead`` in the bundle)."""

    prepare_ns: int = 0
    complete_ns: int = 0

    def summary(self, requests: int, cpu_s: float) -> dict[str, float] | None:
        if requests <= 0:
            return None
        return {
            "prepare_ms_mean": round(self.prepare_ns / requests / 1e6, 4),
            "complete_ms_mean": round(self.complete_ns / requests / 1e6, 4),
            "cpu_ms_per_request": round(cpu_s * 1e3 / requests, 4),
        }


def score(answer: Answer, output: str, target: np.ndarray) -> dict[str, Any]:
    """Prediction and correctness (classification) or the item's IoU (segmentation), as record columns."""
    values = answer.outputs.get(output)
    return {} if values is None else score_item(values[0], target).columns()


def hop_columns(parameters: dict[str, Any]) -> dict[str, Any]:
    """An answer's hop records as record columns (``hop{k}_<field>``), or the error that they are malformed."""
    try:
        hops = p.hops_from_parameters(parameters)
    except BadParameter as exc:
        return {"error": f"bad hop records: {exc.message}"}
    columns: dict[str, Any] = {"hops": len(hops)}
    for i, hop in enumerate(hops):
        columns.update(hop.to_parameters(i))
    return columns


def request_record(
    plan: RunPlan, issue: Issue, answer: Answer, *, seq: int, sample_id: int, times_ns: tuple[int, int, int]
) -> dict[str, Any]:
    """One request's row (``loadgen.records.FIELDS``) but its score: its identity, its times since the run's
    start, its status, and for an answer its hop records and exit, for a failure where and why it broke.
    ``times_ns``: the run's start, the request's actual start, and its end."""
    run_started_ns, started_ns, ended_ns = times_ns
    record: dict[str, Any] = {
        "run": plan.key, "subject": plan.subject, "strategy": plan.strategy, "variant": plan.variant,
        "placement": plan.placement, "scenario": plan.scenario.name, "network": plan.network,
        "seq": seq, "sample_id": sample_id,
        "intended_ms": round((issue.intended_ns - run_started_ns) / 1e6, 4),
        "start_ms": round((started_ns - run_started_ns) / 1e6, 4),
        "end_ms": round((ended_ns - run_started_ns) / 1e6, 4),
        "latency_ms": round((ended_ns - issue.intended_ns) / 1e6, 4),
        "service_ms": round((ended_ns - started_ns) / 1e6, 4),
        "lag_ms": round((started_ns - issue.intended_ns) / 1e6, 4),
        "status": answer.status, "error": answer.error, "bytes_out": answer.bytes_out, "bytes_in": answer.bytes_in,
    }  # fmt: skip
    if answer.status == 200:
        record.update(hop_columns(answer.parameters))
        record["exit_stage"] = answer.parameters.get(p.EXIT_STAGE)
        record["exited_early"] = answer.parameters.get(p.EXITED_EARLY)
    else:
        record["failed_hop"], record["cause"] = failure_of(answer.status, answer.error, entry="mobile")
    return record


class Experiment:
    def __init__(
        self,
        spec: ExperimentSpec,
        stack: Stack,
        folder: Path,
        *,
        models_dir: Path,
        telemetry: LoadgenTelemetry | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.spec, self.stack, self.folder, self.models_dir = spec, stack, folder, models_dir
        self.telemetry = telemetry or LoadgenTelemetry()
        self.say = say
        self.samples: dict[str, SampleSet] = {}
        self.orders: dict[str, np.ndarray] = {}
        self.outputs: dict[str, str] = {}

    def _samples(self, subject: str) -> SampleSet:
        if subject not in self.samples:
            self.samples[subject] = load_samples(self.models_dir / subject)
            n = len(self.samples[subject])
            # the same sample sequence for every run of a subject: accuracy comparisons are paired
            self.orders[subject] = np.random.default_rng(self.spec.seed).permutation(n)
        return self.samples[subject]

    def sample_id(self, plan: RunPlan, seq: int) -> int:
        """The sample request ``seq`` of a run sends: the subject's seeded order, from the run's placement's own
        place in it, so runs of one placement are paired item by item and a variant's placements together
        cover more of the evaluation split (``loadgen.accuracy`` pools them)."""
        order = self.orders[plan.subject]
        return int(order[(placement_offset(plan.placement, len(order)) + seq) % len(order)])

    def _output(self, plan: RunPlan) -> str:
        if plan.model not in self.outputs:
            self.outputs[plan.model] = load_manifest(self.models_dir / plan.subject / plan.variant).outputs[0].name
        return self.outputs[plan.model]

    async def run_one(
        self,
        plan: RunPlan,
        writer: RecordWriter,
        resumed: Resumed,
        on_sample: Callable[[], None],
        injector: FaultInjector | None = None,
    ) -> dict[str, Any]:
        """Drive one run; a resumed run continues its seqs, its clock and its error count, and first records
        the requests its last session sent but never saw answered. With an ``injector`` the run lasts its
        whole ``max_duration_s`` while the spec's faults are injected into it."""
        samples, output = self._samples(plan.subject), self._output(plan)
        done_before = resumed.records + [self._lost(plan, writer, seq) for seq in resumed.lost_seqs]
        for k in range(plan.warmup if not done_before else 0):
            await self.stack.infer(
                plan.model,
                samples.item(self.sample_id(plan, k)),
                placement=plan.placement,
                request_id=f"warmup-{k}",
                timeout_s=self.spec.request_timeout_s,
            )
        clock = RealClock()
        stop = StopRule(
            plan.stopping,
            clock.now_ns() - round(resumed.elapsed_ms * 1e6),
            until_s=plan.stopping.max_duration_s if injector is not None else None,
        )
        for record in done_before:
            if record["latency_ms"] is not None:
                mode = record.get("exit_stage")
                stop.add(float(record["latency_ms"]), None if mode is None else int(mode))
        first_seq = resumed.next_seq
        labels = (plan.strategy, plan.scenario.name, plan.network)
        errors = sum(1 for record in done_before if record["status"] != 200)
        share = LoadgenShare()
        prepare = self._preparer(plan, first_seq, share)

        async def send(issue: Issue, started_ns: int) -> Done:
            nonlocal errors
            seq = first_seq + issue.seq
            sample_id = self.sample_id(plan, seq)
            writer.issued(plan.key, seq)  # before the request leaves: a kill after it shows it as lost
            sent = await self.stack.send(issue.prepared, timeout_s=self.spec.request_timeout_s)
            answer = self.stack.answer(issue.prepared, sent)
            record = request_record(plan, issue, answer, seq=seq, sample_id=sample_id,
                                    times_ns=(stop.started_ns, started_ns, sent.ended_ns))  # fmt: skip
            if answer.status == 200:
                record.update(score(answer, output, samples.targets[sample_id]))
            else:
                errors += 1
            writer.write(record)
            self.telemetry.observe(labels, latency_ms=record["latency_ms"], lag_ms=record["lag_ms"],
                                   status=answer.status)  # fmt: skip
            on_sample()
            share.complete_ns += time.perf_counter_ns() - sent.ended_ns
            mode = record.get("exit_stage") if answer.status == 200 else None
            return Done(sent.ended_ns, None if mode is None else int(mode))

        throttling_before, _ = self._readings()
        for tier in self.stack.urls:
            self.stack.reset_peak(tier)
        started, cpu_started = time.monotonic(), time.process_time()
        faults = asyncio.create_task(injector.run(stop.started_ns)) if injector is not None else None
        issued = await drive(plan.scenario, send, stop, clock, seed=self.spec.seed + first_seq, prepare=prepare)
        if faults is not None:
            await faults  # a fault's recovery may outlast the load: the stack is whole before the next run
        session_s = time.monotonic() - started
        duration_s = session_s + resumed.elapsed_ms / 1e3
        throttling_after, memory_after = self._readings()
        # a tier that stopped answering: name the OOM kill when the runtime saw one
        unreachable = [t for t in self.stack.urls if t not in memory_after]
        oom_killed = self.stack.oom_killed() if errors or unreachable else []
        return {
            "run": plan.key,
            "strategy": plan.strategy,
            "scenario": plan.scenario.name,
            "network": plan.network,
            "n": len(stop.latencies_ms),
            "issued": len(done_before) + issued,
            "sessions": 1 + bool(done_before),
            "errors": errors,
            "stop_reason": stop.reason,
            "duration_s": round(duration_s, 3),
            "requested": {
                "scenario_kind": plan.scenario.kind,
                "rate_rps": plan.scenario.rate_rps,
                "min_samples": plan.stopping.min_samples,
                "max_samples": plan.stopping.max_samples,
                "max_duration_s": plan.stopping.max_duration_s,
                "ci_rel_width": plan.stopping.ci_rel_width,
            },
            "loadgen_cpu": round((time.process_time() - cpu_started) / session_s, 4) if session_s > 0 else None,
            "loadgen_share": share.summary(issued, time.process_time() - cpu_started),
            "cpu_throttling": {
                tier: after.since(throttling_before[tier]).model_dump(mode="json")
                for tier, after in throttling_after.items()
                if tier in throttling_before
            },
            "memory_mib": memory_after,
            "unreachable": unreachable,
            "oom_killed": oom_killed,
            **({"faults": event_dicts(injector)} if injector is not None else {}),
        }

    def _preparer(self, plan: RunPlan, first_seq: int, share: LoadgenShare) -> Callable[[int], PreparedRequest]:
        """What the engine calls before a request is due: its sample, encoded and framed (timed into ``share``)."""
        samples = self._samples(plan.subject)

        def prepare(index: int) -> PreparedRequest:
            began_ns = time.perf_counter_ns()
            seq = first_seq + index
            request = self.stack.prepare(
                plan.model,
                samples.item(self.sample_id(plan, seq)),
                placement=plan.placement,
                request_id=f"{seq}",
                timeout_s=self.spec.request_timeout_s,
            )
            share.prepare_ns += time.perf_counter_ns() - began_ns
            return request

        return prepare

    def injector(self, loads: ModelLoads, key: str, network: str, elapsed_s: float) -> FaultInjector | None:
        """The spec's faults for one run (None without faults); a resumed run skips those already past."""
        if not self.spec.faults:
            return None
        links = self.network_links(network)
        journal = FaultJournal(self.folder, key)
        runtime = self.stack.runtime_control()
        return FaultInjector(
            list(self.spec.faults), self.stack, runtime, loads, links, journal=journal, resumed_at_s=elapsed_s
        )

    @staticmethod
    def _lost(plan: RunPlan, writer: RecordWriter, seq: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "run": plan.key, "subject": plan.subject, "strategy": plan.strategy, "variant": plan.variant,
            "placement": plan.placement, "scenario": plan.scenario.name, "network": plan.network, "seq": seq,
            "status": 0, "error": LOST_ERROR, "failed_hop": Stack.entry_hop, "cause": LOST_CAUSE,
            "latency_ms": None, "end_ms": None,
        }  # fmt: skip
        writer.write(record)
        return record

    def _readings(self) -> tuple[dict[str, CpuThrottlingSpec], dict[str, dict[str, float]]]:
        """Each tier's CFS counters now (tiers without a quota or cgroup have none), and its resident set
        now and at its peak since the run started; a tier that does not answer has neither."""
        throttling: dict[str, CpuThrottlingSpec] = {}
        memory: dict[str, dict[str, float]] = {}
        for tier in self.stack.urls:
            try:
                status = self.stack.status(tier)
            except ConfigError:  # down (killed?): the run records it as unreachable
                continue
            if status.cpu_throttling is not None:
                throttling[tier] = status.cpu_throttling
            memory[tier] = status.memory.model_dump(include={"rss_mib", "peak_rss_mib", "free_mib"})
        return throttling, memory

    def network_links(self, network: str) -> dict[LinkName, LinkSpec]:
        """The link conditions of a network of this experiment (a profile, or a sweep cell)."""
        if SweepCell.names(network):
            assert self.spec.sweep is not None
            cell = SweepCell.parse(network)
            return self.spec.sweep.links(network_links(self.spec.networks[0]), cell.row_mbit_s, cell.column_mbit_s)
        return network_links(network)

    def apply_network(self, network: str, bundle: dict[str, Any], *, measure: bool) -> None:
        links = self.network_links(network)
        states = self.stack.shape(links)
        if measure:
            bundle["networks"][network] = {
                "links": {k: v.model_dump(mode="json") for k, v in links.items()},
                "backends": sorted({s["backend"] for s in states}),
                "notes": sorted({s["note"] for s in states if s["note"]}),
            }
            self.measure_fidelity(network, bundle, "before")

    def measure_fidelity(self, network: str, bundle: dict[str, Any], when: str) -> None:
        """Links and device speeds, measured ``before`` or ``after`` a network's runs, into the bundle."""
        entry = bundle["networks"][network]
        measured = self.stack.measure_links(pings=20, bulk_s=0.3)
        speeds = measure_speeds(self.stack.urls, runs=30)
        suffix = "" if when == "before" else "_after"
        entry[f"measured{suffix}"] = [m.model_dump(mode="json") for m in measured]
        entry[f"problems{suffix}"] = [problem for m in measured for problem in m.problems()]
        entry[f"speed_{when}"] = [
            {
                **m.model_dump(mode="json"),
                "achieved_speed": round(m.achieved_speed, 4),
                "p95_over_p50": round(m.p95_over_p50, 4),
            }
            for m in speeds
        ]
        entry[f"speed_problems_{when}"] = [problem for m in speeds for problem in m.problems()]
        for problem in entry[f"problems{suffix}"]:
            self.say(f"link fidelity {when} the runs: {problem}")
        for problem in entry[f"speed_problems_{when}"]:
            self.say(f"speed fidelity {when} the runs: {problem}")


def _close_network(experiment: Experiment, network: str | None, bundle: dict[str, Any], bundle_path: Path) -> None:
    """After a network's runs: measure its links and speeds again (drift during the runs invalidates them)."""
    if network is not None and network in bundle["networks"]:
        experiment.measure_fidelity(network, bundle, "after")
        write_json(bundle_path, bundle)


def write_json(path: Path, document: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str))
    tmp.replace(path)


def start_folder(results: Path, spec: ExperimentSpec, run_id: str | None) -> Path:
    run_id = run_id or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{spec.name}"
    folder = results / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return folder


def execute(experiment: Experiment, plan: Plan, progress: Any) -> None:
    """Run every planned run not finished yet, network by network (re-shaping between them), on one
    uvloop event loop (the connection pool to the stack lives as long as the experiment)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_execute(experiment, plan, progress))


async def _execute(experiment: Experiment, plan: Plan, progress: Any) -> None:
    folder = experiment.folder
    bundle_path = folder / "bundle.json"
    bundle = (
        json.loads(bundle_path.read_text())
        if bundle_path.exists()
        else environment_bundle(experiment.stack, experiment.spec)
    )
    bundle["skipped"] = plan.skipped
    bundle["offline_missing"] = snapshot_offline(
        experiment.models_dir, folder, {(run.subject, run.variant) for run in plan.runs}
    )
    for missing in bundle["offline_missing"]:
        experiment.say(f"no offline outcomes for {missing}: its accuracy is decided on its requests alone")
    if "client_overhead" not in bundle:
        bundle["client_overhead"] = await experiment.stack.client_overhead()
    write_json(bundle_path, bundle)
    finished, partial = resume_state(folder)
    todo = [r for r in plan.runs if r.key not in finished]
    progress.start(len(plan.runs), len(plan.runs) - len(todo))
    writer = RecordWriter(folder)
    current_network: str | None = None
    loads = ModelLoads(experiment.stack, bundle)
    try:
        for i, run in enumerate(todo):
            if run.network != current_network:
                _close_network(experiment, current_network, bundle, bundle_path)
                experiment.apply_network(run.network, bundle, measure=not SweepCell.names(run.network))
                write_json(bundle_path, bundle)
                current_network = run.network
            why_not = loads.prepare(run.model, run.placement, run.network)
            if why_not is None:
                resumed = partial.get(run.key, Resumed())
                progress.begin_run(run.key, run.stopping.max_samples, len(resumed.records))
                injector = experiment.injector(loads, run.key, run.network, resumed.elapsed_ms / 1e3)
                info = await experiment.run_one(run, writer, resumed, progress.sample, injector)
            else:  # not runnable on this profile: said once, recorded, and the experiment goes on
                info = {"run": run.key, "strategy": run.strategy, "network": run.network, "not_runnable": why_not}
            mark_finished(folder, info)
            write_json(bundle_path, bundle)
            progress.end_run(info)
            if i + 1 == len(todo) or todo[i + 1].model != run.model:
                loads.release(run.model)
        _close_network(experiment, current_network, bundle, bundle_path)
    finally:
        loads.release()
        writer.close()
        experiment.stack.close()
        own = experiment.stack.state.network
        if current_network is not None and own and own != current_network:
            experiment.stack.shape(network_links(str(own)))  # leave the stack as `make up` made it
