"""The Grafana dashboard, written as code: ``python -m services stack dashboard`` regenerates
``dashboards/grafana/dashboards/tierlab.json`` (a test keeps the committed file equal to this).

Every panel's PromQL lives in ``PANELS``, so the test that runs each query against a real Prometheus
scraping real tiers reads the same list the dashboard is made of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.contracts import metrics as m

DATASOURCE = {"type": "prometheus", "uid": "tierlab-prometheus"}
RATE = "$__rate_interval"
DASHBOARD_PATH = Path("dashboards/grafana/dashboards/tierlab.json")


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    kind: str = "timeseries"
    needs_loadgen: bool = False


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)} {legend}"
        )
        for q in (0.5, 0.95, 0.99)
    )


def _mean(metric: str, by: str, selector: str = "") -> str:
    sel = f"{{{selector}}}" if selector else ""
    return f"sum by ({by}) (rate({metric}_sum{sel}[{RATE}])) / sum by ({by}) (rate({metric}_count{sel}[{RATE}]))"


LOADGEN_LATENCY = "tierlab_loadgen_latency_seconds"
PANELS: tuple[Panel, ...] = (
    Panel(
        "End-to-end latency by strategy (loadgen, from intended send time)",
        "s",
        _quantiles(LOADGEN_LATENCY, m.STRATEGY, "{{strategy}}"),
        "Coordinated-omission safe: measured from when each request was due, not when it was sent.",
        needs_loadgen=True,
    ),
    Panel(
        "Latency in each tier by strategy (p50/p95/p99, downstream tiers included)",
        "s",
        _quantiles(m.REQUEST_SECONDS, f"{m.TIER}, {m.STRATEGY}", "{{tier}} {{strategy}}"),
    ),
    Panel(
        "Inference vs transfer vs queue: mean time per request in each tier",
        "s",
        (Query(_mean(m.STAGE_SECONDS, f"{m.TIER}, {m.PHASE}"), "{{tier}} {{phase}}"),),
        "compute = onnxruntime; send = forwarding to the next tier (serialise + link + remote); queue = waiting "
        "for a compute slot.",
    ),
    Panel(
        "Requests per second by strategy (as they enter the pipeline)",
        "reqps",
        (
            Query(
                f'sum by ({m.STRATEGY}) (rate({m.REQUEST_SECONDS}_count{{{m.TIER}="mobile"}}[{RATE}]))', "{{strategy}}"
            ),
        ),
    ),
    Panel(
        "Early exits per second by strategy",
        "reqps",
        (Query(f"sum by ({m.TIER}, {m.STRATEGY}) (rate({m.EARLY_EXITS}_total[{RATE}]))", "{{tier}} {{strategy}}"),),
    ),
    Panel(
        "Errors per second by tier and status",
        "reqps",
        (Query(f"sum by ({m.TIER}, {m.STATUS}) (rate({m.ERRORS}_total[{RATE}]))", "{{tier}} {{status}}"),),
    ),
    Panel(
        "CPU used vs the tier's limit (cores)",
        "none",
        (
            Query(f'rate(process_cpu_seconds_total{{job="tiers"}}[{RATE}])', "{{tier}} used"),
            Query(m.CPU_LIMIT_CORES, "{{tier}} limit"),
        ),
    ),
    Panel(
        "Memory used vs the tier's limit",
        "bytes",
        (
            Query('process_resident_memory_bytes{job="tiers"}', "{{tier}} resident"),
            Query(m.MEMORY_LIMIT_BYTES, "{{tier}} limit"),
        ),
        "A limit of 0 means the tier has none (local processes).",
    ),
    Panel(
        "Link conditions in force (one-way delay ms, rate Mbit/s; backend in the legend)",
        "none",
        (
            Query(m.LINK_DELAY_MS, "{{tier}} {{link}} delay ms ({{backend}})"),
            Query(m.LINK_RATE_MBIT, "{{tier}} {{link}} Mbit/s ({{backend}})"),
        ),
    ),
    Panel(
        "Targets up and tiers ready",
        "none",
        (Query('up{job="tiers"}', "{{tier}} up"), Query(m.READY, "{{tier}} ready")),
        kind="stat",
    ),
)


def _panel_json(panel: Panel, index: int) -> dict[str, object]:
    width = 12
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }


def dashboard() -> dict[str, object]:
    return {
        "uid": "tierlab",
        "title": "tierlab: tiers, strategies, links",
        "tags": ["tierlab"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "panels": [_panel_json(panel, i) for i, panel in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def write(root: Path) -> Path:
    path = root / DASHBOARD_PATH
    path.write_text(render())
    return path
