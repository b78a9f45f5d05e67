"""A run's verdict, as MLPerf LoadGen gives one: VALID or INVALID with the reasons, requested vs effective.

A run is INVALID when its numbers cannot be trusted as a measurement of the strategy on the profile:

- its stopping rule gave up (``max_samples``/``max_duration_s``) before its statistics were as narrow as
  asked (unless the spec fixed the sample count: ``min_samples == max_samples``), judged by the same rule the
  run stops by (``loadgen.convergence``): one latency mode, the p50's CI; a bimodal run (early exit), each
  mode's p50 CI. A p95 CI still wider than asked is only noted: a tail needs far more samples
  than a median for the same width (on a 2-core host a p95 from 200 samples was commonly ±30 %), its CI is in
  every table, and recommend compares CIs;
- more than ``MAX_ERROR_RATE`` of its requests failed;
- an open-loop run fell behind its schedule (lag p99 over ``MAX_LAG_MS_P99``) or delivered less than
  ``MIN_RATE_SHARE`` of the requested rate;
- a link of its network was outside tolerance when measured before or after the network's runs;
- a tier it used computed outside its configured speed (speed fidelity before or after);
- single-stream, a tier it used was CFS-throttled in more than ``MAX_THROTTLED_SHARE`` of the periods
  (throttling under load is the device being busy, and is only noted);
- the loadgen itself used more than ``MAX_LOADGEN_CPU`` of a core (it may have been the bottleneck);
- a tier it used was OOM-killed (Docker's ``OOMKilled``) or stopped answering during the run;
- on a tier it used, the host alone ran longer than the device would have in more than ``MAX_OVERRAN_SHARE``
  of the hops that computed there (the emulated device was slower than its profile: a host too slow for it).

A tier whose measured device predicts its own published times outside tolerance (``services.devices.fit``)
is noted: the run measures the emulated device faithfully, the emulated device is the doubtful part.

The effective values include each tier's peak resident memory during the run.

A run with faults (a chaos scenario) measures what the faults did: its failures, unreachable tiers and
throttling are the measurement, noted, not reasons; it is INVALID when a fault could not be injected or
the stack did not recover from it, or when the loadgen could not keep its schedule.
"""

from __future__ import annotations

from typing import Any

from services.contracts.decisions import ReasonSpec, VerdictSpec
from services.contracts.device import DeviceModelSpec
from services.contracts.specs import placement_tiers

MAX_ERROR_RATE = 0.01
MAX_LAG_MS_P99 = 5.0
MIN_RATE_SHARE = 0.9
MAX_THROTTLED_SHARE = 0.10
MAX_LOADGEN_CPU = 0.9
MAX_OVERRAN_SHARE = 0.10
OPEN_LOOP = ("server", "burst")


def tiers_used(placement: str) -> list[str]:
    """The tiers a placement's requests touch: the device always (requests enter there), then its stages'."""
    return list(dict.fromkeys(["mobile", *placement_tiers(placement)]))


def ci_half_widths(latency_ms: dict[str, Any]) -> dict[str, float]:
    """Each percentile's 95 % CI half-width relative to its estimate (``p50``, ``p95``), where recorded."""
    widths = {}
    for q in ("p50", "p95"):
        low, high, estimate = latency_ms.get(f"{q}_low"), latency_ms.get(f"{q}_high"), latency_ms.get(q)
        if low is not None and high is not None and estimate:
            widths[q] = round((high - low) / 2 / estimate, 4)
    return widths


class _Findings:
    """What a run's verdict collects: reasons (INVALID) by kind, and notes."""

    def __init__(self) -> None:
        self.reasons: list[ReasonSpec] = []
        self.notes: list[str] = []

    def reason(self, kind: str, text: str) -> None:
        self.reasons.append(ReasonSpec(kind=kind, text=text))

    def either(self, invalidates: bool, kind: str, text: str) -> None:
        """A reason when ``invalidates``, else a note."""
        if invalidates:
            self.reason(kind, text)
        else:
            self.notes.append(text)


def _failures(entry: dict[str, Any], info: dict[str, Any], found: _Findings) -> None:
    """Failed requests invalidate a run, unless faults were injected to cause them; a fault that could not be
    injected or recovered from does."""
    faults = info.get("faults") or []
    if entry["error_rate"] > MAX_ERROR_RATE:
        failed = f"{entry['error_rate']:.1%} of requests failed (at most {MAX_ERROR_RATE:.0%})"
        found.either(not faults, "errors", failed)
    for event in faults:
        if event.get("error"):
            found.reason("fault not injected", f"{event['fault']}: {event['error']}")


def _convergence(entry: dict[str, Any], stop_reason: str, asked: float | None, found: _Findings) -> None:
    """A run that gave up before its statistics were as narrow as asked, by the rule it stops by."""
    judged = entry.get("convergence")
    if judged is None:  # results summarised before the rule was recorded: the p50 alone
        widths = ci_half_widths(entry.get("latency_ms") or {})
        judged = {"rule": "quantiles", "half_widths": widths}
    widths = judged["half_widths"]
    if judged["rule"] == "modes":
        if asked is None or any(w > asked for w in widths.values()):
            shown = ", ".join(f"{k} ±{w:.0%}" for k, w in widths.items())
            found.reason("CI unmet (bimodal)", f"stopped at {stop_reason} with {shown} (bimodal: each mode's p50), "
                                               f"wider than the ±{asked} asked")  # fmt: skip
        return
    p50, p95 = widths.get("p50"), widths.get("p95")
    if asked is None or p50 is None or p50 > asked:
        shown = f"±{p50:.0%}" if p50 is not None else "unknown"
        found.reason("p50 CI unmet", f"stopped at {stop_reason} with the p50 CI {shown}, wider than the ±{asked} asked")
    elif p95 is not None and p95 > asked:
        found.notes.append(f"p95 CI ±{p95:.0%} at {stop_reason}, wider than the ±{asked} asked: compare tails by CI")


def _emulation_gaps(entry: dict[str, Any], used: list[str], devices: dict[str, Any], found: _Findings) -> None:
    """Where the emulation could not be its device: the host overran the device time, or the device model
    itself is outside its tolerance against its published data."""
    for tier, counts in (entry.get("emulation") or {}).items():
        share = counts["overran"] / counts["hops"] if counts.get("hops") else 0.0
        if tier in used and share > MAX_OVERRAN_SHARE:
            text = f"{tier}: the host alone took longer than the device would in {share:.0%} of its hops"
            found.reason("host slower than device", text)
    for tier in used:
        if not devices.get(tier):
            continue
        model = DeviceModelSpec.model_validate(devices[tier])
        if not model.fit.within_tolerance:
            found.notes.append(
                f"{tier} is the measured device {model.name}, whose model predicts its own published times at "
                f"median {model.fit.median_abs_err:.0%}, worst {model.fit.worst_abs_err:.0%}: outside tolerance"
            )


def judge(
    entry: dict[str, Any],
    info: dict[str, Any] | None,
    network: dict[str, Any] | None,
    devices: dict[str, Any] | None = None,
) -> VerdictSpec:
    """The verdict of one run from its summary ``entry``, its ``runs.jsonl`` line, its network's fidelity and
    the measured devices of its tiers (``bundle.json``: ``tiers.<tier>.device_model``)."""
    found = _Findings()
    info = info or {}
    chaos = bool(info.get("faults"))
    requested: dict[str, Any] = dict(info.get("requested") or {})
    stop_reason = info.get("stop_reason")
    effective: dict[str, Any] = {
        "samples": entry["n"],
        "duration_s": info.get("duration_s"),
        "rate_rps": entry.get("throughput_rps"),
        "stop_reason": stop_reason,
        "error_rate": entry["error_rate"],
        "lag_ms_p99": entry["lag_ms_p99"],
        "loadgen_cpu": info.get("loadgen_cpu"),
        "lag_ms_p50": entry.get("lag_ms_p50"),
        "loadgen_share": info.get("loadgen_share"),
        "cpu_throttling": info.get("cpu_throttling") or {},
        "peak_rss_mib": {t: m.get("peak_rss_mib") for t, m in (info.get("memory_mib") or {}).items()},
    }
    if not info:
        found.reason("unfinished", "the run did not finish (no line in runs.jsonl)")
    fixed_count = requested.get("min_samples") == requested.get("max_samples")
    ci_met = bool(stop_reason) and not str(stop_reason).startswith("max_")
    widths = ci_half_widths(entry.get("latency_ms") or {})
    effective["ci_met"] = ci_met
    effective["ci_rel_half_width"] = widths
    if entry.get("convergence"):
        effective["convergence"] = entry["convergence"]
    if stop_reason and not ci_met and not fixed_count and not chaos:
        _convergence(entry, str(stop_reason), requested.get("ci_rel_width"), found)
    _failures(entry, info, found)
    if requested.get("scenario_kind") in OPEN_LOOP:
        if entry["lag_ms_p99"] > MAX_LAG_MS_P99:
            found.reason(
                "schedule lag",
                f"the loadgen lagged its schedule: lag p99 {entry['lag_ms_p99']:.1f} ms > {MAX_LAG_MS_P99:g}",
            )
        wanted = requested.get("rate_rps")
        got = entry.get("throughput_rps")
        if wanted and got is not None and got < MIN_RATE_SHARE * wanted and not chaos:
            found.reason("rate not delivered", f"delivered {got:.1f} req/s of the {wanted:g} requested")
    used = [] if chaos else tiers_used(entry["placement"])  # a fault scenario's outages are its measurement
    for tier in info.get("oom_killed") or []:
        message = f"{tier} was OOM-killed during the run: the strategy does not fit its memory limit on this profile"
        found.either(tier in used, "OOM-killed", message)
    for tier in set(info.get("unreachable") or []) - set(info.get("oom_killed") or []):
        found.either(tier in used, "unreachable", f"{tier} stopped answering during the run")
    if network is None:
        found.notes.append("links and device speed not measured for this network (sweep cell)")
    else:
        for when in ("before", "after"):
            for problem in network.get("problems" if when == "before" else "problems_after") or []:
                found.reason("link fidelity", f"link fidelity {when} the runs: {problem}")
            for problem in network.get(f"speed_problems_{when}") or []:
                if problem.split(":")[0] in used:
                    found.reason("speed fidelity", f"speed fidelity {when} the runs: {problem}")
    for tier, throttling in (info.get("cpu_throttling") or {}).items():
        if tier not in used or not throttling.get("periods"):
            continue
        share = throttling["throttled_periods"] / throttling["periods"]
        if share > MAX_THROTTLED_SHARE:
            message = f"{tier} CFS-throttled in {share:.0%} of periods ({throttling['throttled_s']:.2f} s)"
            found.either(requested.get("scenario_kind") == "single-stream", "throttled", message)
    _emulation_gaps(entry, used, devices or {}, found)
    loadgen_cpu = info.get("loadgen_cpu")
    if loadgen_cpu is not None and loadgen_cpu > MAX_LOADGEN_CPU:
        found.reason("loadgen CPU", f"the loadgen used {loadgen_cpu:.0%} of a core: it may have been the bottleneck")
    return VerdictSpec(valid=not found.reasons, reasons=tuple(found.reasons), notes=tuple(found.notes),
                       requested=requested, effective=effective)  # fmt: skip
