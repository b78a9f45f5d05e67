"""``report.html``: one self-contained page (plotly.js inlined, opens offline) with the plots and the
statistics of an experiment, made from ``summary.json`` and ``records.csv``.

It leads with the answer table (``loadgen.recommend``, the same function ``make recommend`` and
``summary.json`` use): per subject, scenario and network, one row per stated constraint — the strategy to
use, its p95 with CI, its accuracy drop with CI, how many runs are VALID and the INVALID reasons counted by
kind; then the same answers in words with runner-ups, and each variant's accuracy (deployed, offline, drop
from identity, a flag where they disagree). Then the plots: accuracy vs p95 with the
Pareto front, latency CDFs, per-hop stacked bars (compute / queue per tier, transfer per link, the rest),
per-tier bars like the studies' tables, the bandwidth heatmap of a sweep; the statistics (Kruskal-Wallis
+ Dunn/Holm + Cliff's δ, McNemar against identity, in words); speed and link fidelity; and last the full
table of every run, grouped by subject, INVALID runs marked.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.accuracy import describe_drop
from loadgen.chaos import FAULT_COLUMNS
from loadgen.recommend import ANSWER_HEAD, answer_rows, explain, standard_answers
from loadgen.records import by_run
from loadgen.stats import pareto_front
from services.contracts.decisions import AnswerSpec, IntervalSpec, VariantAccuracySpec
from services.contracts.device import DeviceModelSpec
from services.contracts.runkey import SweepCell

REPORT_FILE = "report.html"


def _figure_html(figure: Any, first: bool) -> str:
    return str(figure.to_html(full_html=False, include_plotlyjs=first, config={"responsive": True}))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _verdict_text(e: dict[str, Any]) -> str:
    verdict = e.get("verdict")
    if verdict is None:
        return "–"
    texts = [r["text"] if isinstance(r, dict) else r for r in verdict["reasons"]]
    return "VALID" if verdict["valid"] else "INVALID: " + "; ".join(texts)


def _table_order(e: dict[str, Any]) -> tuple[str, str, str, float]:
    return e["subject"], e["network"], e["scenario"], e["latency_ms"].get("p50", math.inf)


def _strategy_table(entries: list[dict[str, Any]]) -> str:
    head = ("subject", "strategy", "scenario", "network", "verdict", "n", "p50 ms [95 % CI]", "p95 ms [95 % CI]",
            "p99 ms", "accuracy [95 % CI]", "exit rate", "errors", "req/s", "peak RSS MiB",
            "loadgen ms: lag p50 · CPU per request")  # fmt: skip
    rows = []
    for e in sorted(entries, key=_table_order):
        lat, acc = e["latency_ms"], e.get("accuracy")
        accuracy = f"{acc['value']:.3f} [{acc['low']:.3f}–{acc['high']:.3f}] {acc['metric']}" if acc else "–"
        rows.append([
            e["subject"], e["strategy"], e["scenario"], e["network"], _verdict_text(e), e["n"],
            f"{_fmt(lat.get('p50'))} [{_fmt(lat.get('p50_low'))}–{_fmt(lat.get('p50_high'))}]",
            f"{_fmt(lat.get('p95'))} [{_fmt(lat.get('p95_low'))}–{_fmt(lat.get('p95_high'))}]",
            _fmt(lat.get("p99")), accuracy, _fmt(e.get("exit_rate")), e["errors"], _fmt(e.get("throughput_rps"), 1),
            _peaks(e), _loadgen_share(e),
        ])  # fmt: skip
    return _table(head, rows)


def _loadgen_share(entry: dict[str, Any]) -> str:
    """The loadgen's own share of a run: its schedule lag (on the measured path) and its CPU per request."""
    effective = (entry.get("verdict") or {}).get("effective") or {}
    share = effective.get("loadgen_share") or {}
    return f"{_fmt(effective.get('lag_ms_p50'))} · {_fmt(share.get('cpu_ms_per_request'))}"


def _client_overhead_html(bundle: dict[str, Any]) -> str:
    measured = bundle.get("client_overhead")
    if not measured:
        return ""
    return (
        f'<p class="note">The loadgen\'s HTTP client adds {measured["overhead_ms_p50"]:.3f} ms to a round trip '
        f"(p50 of {measured['pairs']} pairs with a bare socket to the entry tier: {measured['client_ms_p50']:.3f} vs "
        f"{measured['bare_socket_ms_p50']:.3f} ms); every latency here includes it and its schedule lag, "
        "subtracted nowhere. Encoding and decoding happen off the measured path.</p>"
    )


def _peaks(entry: dict[str, Any]) -> str:
    """Each tier's peak resident memory during the run, as ``M 212 · E 180 · C 175``."""
    peaks = ((entry.get("verdict") or {}).get("effective") or {}).get("peak_rss_mib") or {}
    return " · ".join(f"{t[0].upper()} {v:.0f}" for t, v in peaks.items() if v is not None) or "–"


def _table(head: tuple[str, ...], rows: list[list[Any]], *, table_id: str | None = None) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c) if not isinstance(c, str) else html.escape(c)}</td>" for c in r)
                   + "</tr>" for r in rows)  # fmt: skip
    identity = f' id="{table_id}"' if table_id else ""
    return f"<table{identity}><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _error_bars(values: list[float], lows: list[float], highs: list[float]) -> dict[str, Any]:
    return {
        "type": "data",
        "symmetric": False,
        "array": [h - v for v, h in zip(values, highs, strict=True)],
        "arrayminus": [v - lo for v, lo in zip(values, lows, strict=True)],
    }


class _Figures:
    """The page's figures in order; plotly.js is inlined once, with the first."""

    def __init__(self) -> None:
        import plotly.graph_objects as go

        self.go = go
        self.sections: list[str] = []

    def add(self, title: str, figure: Any, note: str = "") -> None:
        figure.update_layout(title=title, template="plotly_white", height=520, margin={"t": 60})
        body = _figure_html(figure, first=not self.sections)
        self.sections.append(f"<section class='figure'>{body}<p class='note'>{html.escape(note)}</p></section>")

    def group(self, label: str, group: list[dict[str, Any]], grouped: dict[str, list[dict[str, Any]]]) -> None:
        go = self.go
        judged = [e for e in group if e.get("accuracy") and "p95" in e["latency_ms"]]
        if judged:
            self.pareto(label, judged)
        by_speed = sorted(group, key=lambda e: e["latency_ms"].get("p50", math.inf))
        cdf = go.Figure()
        for e in by_speed:
            values = np.sort([r["latency_ms"] for r in grouped[e["run"]] if r["status"] == 200])
            if len(values):
                fraction = np.arange(1, len(values) + 1) / len(values)
                cdf.add_trace(go.Scatter(x=values, y=fraction, mode="lines", name=e["strategy"]))
        cdf.update_xaxes(title="end-to-end latency (ms, from intended send time)", type="log")
        cdf.update_yaxes(title="fraction of requests")
        self.add(f"Latency CDF — {label}", cdf)

        bars = go.Figure()
        for part in sorted({k for e in group for k in e["breakdown_ms"]}):
            y = [e["breakdown_ms"].get(part, 0) for e in by_speed]
            bars.add_trace(go.Bar(x=[e["strategy"] for e in by_speed], y=y, name=part))
        bars.update_layout(barmode="stack")
        bars.update_yaxes(title="mean ms per request")
        note = "Transfer of a link = the sender's send time minus the receiver's time in tier."
        self.add(f"Where the time goes, per hop — {label}", bars, note)

        tiers = go.Figure()
        for placement in sorted({e["placement"] for e in group}, key=lambda p: (len(p), p)):
            pts = [e for e in group if e["placement"] == placement]
            lat = [e["latency_ms"] for e in pts]
            bars_error = _error_bars([x.get("p50", 0) for x in lat], [x.get("p50_low", 0) for x in lat],
                                     [x.get("p50_high", 0) for x in lat])  # fmt: skip
            y = [x.get("p50") for x in lat]
            tiers.add_trace(go.Bar(x=[e["variant"] for e in pts], y=y, name=placement, error_y=bars_error))
        tiers.update_layout(barmode="group")
        tiers.update_yaxes(title="p50 latency (ms)", type="log")
        self.add(f"Operators on each tier and split — {label}", tiers, "Like the studies' tables: a bar per placement.")

    def pareto(self, label: str, judged: list[dict[str, Any]]) -> None:
        go = self.go
        front = set(pareto_front([(e["strategy"], e["latency_ms"]["p95"], e["accuracy"]["value"]) for e in judged]))
        scatter = go.Figure()
        for on_front in (False, True):
            pts = [e for e in judged if (e["strategy"] in front) == on_front]
            acc = [e["accuracy"] for e in pts]
            errors = _error_bars([a["value"] for a in acc], [a["low"] for a in acc], [a["high"] for a in acc])
            scatter.add_trace(go.Scatter(
                x=[e["latency_ms"]["p95"] for e in pts], y=[a["value"] for a in acc], error_y=errors,
                mode="markers", text=[e["strategy"] for e in pts], name="Pareto front" if on_front else "dominated",
                marker={"size": 11 if on_front else 7},
            ))  # fmt: skip
        ordered = sorted((e for e in judged if e["strategy"] in front), key=lambda e: e["latency_ms"]["p95"])
        x, y = [e["latency_ms"]["p95"] for e in ordered], [e["accuracy"]["value"] for e in ordered]
        scatter.add_trace(go.Scatter(x=x, y=y, mode="lines", name="front", line={"dash": "dot"}))
        scatter.update_xaxes(title="p95 latency (ms)", type="log")
        scatter.update_yaxes(title=judged[0]["accuracy"]["metric"])
        self.add(
            f"Accuracy vs latency — {label}", scatter, "Front: no other strategy is both faster and more accurate."
        )

    def sweep(self, sweep: dict[str, Any]) -> None:
        go = self.go
        names = sorted(sweep["p50_ms"])
        best_index = [[names.index(s) for s in row] for row in sweep["best"]]
        best = go.Heatmap(z=best_index, text=sweep["best"], texttemplate="%{text}", colorscale="Viridis",
                          showscale=False)  # fmt: skip
        self._grid("Fastest strategy (p50) at each bandwidth", best, sweep)
        for name in names:
            p50 = go.Heatmap(z=sweep["p50_ms"][name], colorbar={"title": "p50 ms"}, texttemplate="%{z:.1f}")
            self._grid(f"p50 latency of {name} over the bandwidth grid", p50, sweep)

    def _grid(self, title: str, heatmap: Any, sweep: dict[str, Any]) -> None:
        """A heatmap over the sweep's grid: rows and columns are the two links' rates."""
        rows = [f"{r:g}" for r in sweep["rows_rate_mbit"]]
        columns = [f"{c:g}" for c in sweep["columns_rate_mbit"]]
        figure = self.go.Figure(heatmap.update(x=columns, y=rows))
        figure.update_xaxes(title=f"{sweep['columns_link']} rate (Mbit/s)", type="category")
        figure.update_yaxes(title=f"{sweep['rows_link']} rate (Mbit/s)", type="category")
        self.add(title, figure)


def _tests_html(summary: dict[str, Any]) -> str:
    parts = []
    for c in summary["comparisons"]:
        label = f"{c['subject']} · {c['scenario']} · network {c['network']}"
        rows_lat = [[v["strategy"], v["p_holm"], v["cliffs_delta"], v["words"]] for v in c["vs_fastest"]]
        rows_acc = [[v["strategy"], v["pairs"], v["only_identity_right"], v["only_this_right"], v["p"], v["words"]]
                    for v in c["accuracy_vs_identity"]]  # fmt: skip
        parts.append(
            f"<h3>{html.escape(label)}</h3><p>Kruskal-Wallis across strategies: H = {_fmt(c['kruskal_h'])}, "
            f"p = {c['kruskal_p']:.3g}. Fastest (median): <b>{html.escape(str(c.get('fastest', '–')))}</b>.</p>"
            + _table(("strategy", "Dunn p (Holm)", "Cliff's δ", "in words"), rows_lat)
            + "<p>Accuracy against identity on the same samples (exact McNemar):</p>"
            + _table(("strategy", "pairs", "only identity right", "only this right", "p", "in words"), rows_acc)
        )
    return "\n".join(parts)


FIDELITY_HEAD = ("network", "when", "link", "backend", "RTT configured ms", "RTT measured p50 ms",
                 "of it the path's own ms", "rate configured Mbit/s", "goodput measured Mbit/s")  # fmt: skip
SPEED_HEAD = ("network", "when", "tier", "speed configured", "threads", "host p50 ms", "tier p50 ms",
              "achieved speed", "p95/p50")  # fmt: skip


LOADS_HEAD = ("network", "tier", "variant", "ONNX MiB", "resident MiB", "peak MiB", "load ms", "warm-up ms")
NOT_RUNNABLE_HEAD = ("network", "variant", "placement", "tier", "why")


def _memory_html(bundle: dict[str, Any]) -> str:
    """What each variant cost to load where it ran (cold start and memory), and what did not fit."""
    loads = [[e["network"], e["tier"], e["model"], e["file_mib"], e.get("resident_mib"), e.get("peak_mib"),
              e.get("load_ms"), e.get("warmup_ms")] for e in bundle.get("loads") or []]  # fmt: skip
    refused = [
        [e["network"], e["model"], e["placement"], e["tier"], e["reason"]] for e in bundle.get("not_runnable") or []
    ]
    parts = []
    if refused:
        parts.append(f"<p><b>Not runnable on this profile</b> ({len(refused)}): the tier refused the load.</p>")
        parts.append(_table(NOT_RUNNABLE_HEAD, refused))
    parts.append(_table(LOADS_HEAD, loads) if loads else '<p class="note">every variant was loaded at start-up</p>')
    return "\n".join(parts)


DEVICES_HEAD = ("tier", "device", "cores", "fitted to", "float arithmetic", "checked networks: median |error|",
                "worst", "every network: median · worst", "against host")  # fmt: skip


def _devices_html(bundle: dict[str, Any]) -> str:
    """Each tier's device: measured (what it is fitted to, how well it predicts its own data) or relative."""
    rows = []
    for tier, info in (bundle.get("tiers") or {}).items():
        device, model = info.get("device") or {}, info.get("device_model")
        if model:
            m = DeviceModelSpec.model_validate(model)
            fit = m.fit
            rows.append([tier, m.name, m.cores, m.source.table, m.source.arithmetic, f"{fit.median_abs_err:.1%}",
                         f"{fit.worst_abs_err:.1%}" + ("" if fit.within_tolerance else " (outside tolerance)"),
                         f"{fit.median_abs_err_all:.1%} · {fit.worst_abs_err_all:.1%}", m.host])  # fmt: skip
        elif device:
            rows.append([tier, f"relative: speed {device.get('speed', 1):g} of a host core", device.get("cores"),
                         "–", "–", "–", "–", "–", "–"])  # fmt: skip
    return _table(DEVICES_HEAD, rows) if rows else ""


HOSTS_HEAD = ("tier", "node", "CPU", "CPUs", "kernel", "arch")


def _hosts_html(bundle: dict[str, Any]) -> str:
    """Which machine ran each tier (its hostname is the swarm node's on the swarm runtime)."""
    rows = [[tier, h.get("hostname"), h.get("cpu_model"), h.get("cpus"), h.get("kernel"), h.get("arch")]
            for tier, info in (bundle.get("tiers") or {}).items() if (h := info.get("host"))]  # fmt: skip
    return _table(HOSTS_HEAD, rows) if rows else ""


def _faults_html(summary: dict[str, Any]) -> str:
    """The fault table, and where the failed requests broke (empty when the spec injected no faults)."""
    rows = summary.get("faults") or []
    if not rows:
        return ""
    table = _table(tuple(head for _, head in FAULT_COLUMNS), [[r.get(k) for k, _ in FAULT_COLUMNS] for r in rows])
    failures = [
        [r["fault"], r["strategy"], where, count]
        for r in rows
        for where, count in sorted((r.get("failures") or {}).items())
    ] + [[r["fault"], r.get("strategy", ""), r["error"], 0] for r in rows if r.get("error")]
    return (
        '<h2>Faults</h2>\n<p class="note">requests counted by intended send time; recovered = the p50 of 10 '
        "consecutive answered requests within 10 % of before</p>\n"
        + table
        + (_table(("fault", "strategy", "failed at: cause", "requests"), failures) if failures else "")
    )


def _answers(summary: dict[str, Any]) -> list[AnswerSpec]:
    """The summary's answers (remade for a summary written before answers were kept in it)."""
    if "answers" in summary:
        return [AnswerSpec.model_validate(a) for a in summary["answers"]]
    return standard_answers(summary)


def _answer_html(summary: dict[str, Any]) -> str:
    """The first screen: the answer table; below it the same answers in words, with runner-ups."""
    answers = _answers(summary)
    if not answers:
        return '<p class="note">no run to answer from</p>'
    words = "".join(
        "<li>" + "<br>".join(html.escape(line) for line in explain(a, runner_ups=2)) + "</li>" for a in answers
    )
    return (
        _table(ANSWER_HEAD, [list(row) for row in answer_rows(answers)], table_id="answer")
        + '<p class="note">use: the fastest p95 among VALID runs that meet the constraint; accuracy drop from '
        "identity (the unmodified model) in points, on the variant's requests pooled over all its runs and "
        "paired with identity's on the same items, or on the offline evaluation of the whole split when the "
        "runs cover fewer items, decided at 95 % confidence.</p>"
        + f"<details><summary>The answers in words: runner-ups, undecided, ruled out</summary><ul>{words}</ul>"
        "</details>"
    )


VARIANTS_HEAD = ("subject", "variant", "metric", "deployed [95 % CI] (items)", "offline [95 % CI] (items)",
                 "offline on the deployed items", "drop from identity, points [95 % CI]",
                 "deployment check")  # fmt: skip


def _interval(interval: IntervalSpec | None) -> str:
    if interval is None:
        return "–"
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}] ({interval.n:,})"


def _check_text(v: VariantAccuracySpec) -> str:
    if not v.answers_checked:
        return "–"
    if not v.answers_differing:
        return f"same outcome as offline on all {v.answers_checked:,} answers"
    return f"{v.answers_differing} of {v.answers_checked:,} answers differ from offline (p = {v.agreement_p:.2g})"


def _variants_html(summary: dict[str, Any]) -> str:
    """Each variant's accuracy: pooled deployed, offline, its drop from identity, and the deployment check."""
    rows = []
    for document in summary.get("variants") or []:
        v = VariantAccuracySpec.model_validate(document)
        check = v.flag or _check_text(v)
        rows.append([v.subject, v.variant, v.metric, _interval(v.deployed), _interval(v.offline),
                     _fmt(v.offline_same_items, 3), describe_drop(v.drop) if v.drop else "–", check])  # fmt: skip
    return _table(VARIANTS_HEAD, rows) if rows else '<p class="note">no accuracy measured (latency only)</p>'


def _fidelity_tables(bundle: dict[str, Any]) -> tuple[str, str]:
    links, speeds = [], []
    for name, info in bundle.get("networks", {}).items():
        for when, suffix in (("before", ""), ("after", "_after")):
            for m in info.get(f"measured{suffix}") or []:
                links.append([name, when, m["link"], m["backend"], m["configured"]["delay_ms"] * 2, m["rtt_ms_p50"],
                              m.get("path_rtt_ms_p50") or "-", m["configured"]["rate_mbit"] or "unlimited",
                              m["goodput_mbit"]])  # fmt: skip
            for m in info.get(f"speed_{when}") or []:
                speeds.append([name, when, m["tier"], m["configured_speed"], m["threads"], m["host_ms_p50"],
                               m["tier_ms_p50"], m["achieved_speed"], m["p95_over_p50"]])  # fmt: skip
    return _table(FIDELITY_HEAD, links), _table(SPEED_HEAD, speeds)


def build_report(summary: dict[str, Any], records: list[dict[str, Any]], bundle: dict[str, Any]) -> str:
    grouped = dict(by_run(records))
    entries = summary["strategies"]
    figures = _Figures()
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in entries:
        if not SweepCell.names(e["network"]):
            groups.setdefault((e["subject"], e["scenario"], e["network"]), []).append(e)
    for (subject, scenario, network), group in groups.items():
        figures.group(f"{subject} · {scenario} · network {network}", group, grouped)
    if summary.get("sweep"):
        figures.sweep(summary["sweep"])
    link_fidelity, speed_fidelity = _fidelity_tables(bundle)
    stack = bundle.get("stack", {})
    meta = (
        f"stack {stack.get('runtime')} · resources {stack.get('profile')} · onnxruntime "
        f"{bundle.get('versions', {}).get('onnxruntime')} · python {bundle.get('python')} · kernel "
        f"{bundle.get('kernel')} · commit {str(bundle.get('git_commit'))[:10]}"
    )
    return _PAGE.format(
        title=html.escape(summary["run_id"]),
        meta=html.escape(meta),
        answer=_answer_html(summary),
        variants=_variants_html(summary),
        strategies=_strategy_table(entries),
        figures="\n".join(figures.sections),
        tests=_tests_html(summary),
        links=link_fidelity,
        speeds=speed_fidelity,
        memory=_memory_html(bundle),
        faults=_faults_html(summary),
        hosts=_hosts_html(bundle),
        devices=_devices_html(bundle),
        client=_client_overhead_html(bundle),
    )


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tierlab — {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem 2rem; color: #222; }}
h1 {{ font-size: 1.4rem; margin: 0 0 0.25rem; }}
table#answer td:nth-child(3) {{ font-weight: 600; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }}
th {{ background: #f3f3f3; }} .note {{ color: #555; font-size: 0.85rem; }}
section.figure {{ margin-bottom: 2rem; }}
</style></head><body>
<h1>tierlab experiment {title}</h1>
<p class="note">{meta}</p>
{answer}
<h2>Accuracy of each variant</h2>
{variants}
{hosts}
{faults}
<h2>Plots</h2>
{figures}
<h2>Statistics</h2>
{tests}
<h2>Devices (measured ones fitted to their published times, checked leave-one-network-out)</h2>
{devices}
<h2>Device speed fidelity (the calibration model on each tier vs the host)</h2>
{speeds}
<h2>Link fidelity (measured through the request path)</h2>
{links}
<h2>Memory and cold starts (each variant loaded where its runs computed)</h2>
{memory}
<h2>Every run</h2>
{client}
{strategies}
</body></html>
"""


def write_report(folder: Path, summary: dict[str, Any], records: list[dict[str, Any]], bundle: dict[str, Any]) -> Path:
    path = folder / REPORT_FILE
    path.write_text(build_report(summary, records, bundle))
    return path
