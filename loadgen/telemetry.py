"""The loadgen's own Prometheus metrics while it runs: end-to-end latency by strategy (from the intended
send time), requests by status, schedule lag. Prometheus finds it through a file_sd target file the
loadgen writes on start and removes at the end (``dashboards/prometheus.yml``, job ``loadgen``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.contracts import metrics as m

LATENCY = "tierlab_loadgen_latency_seconds"


class LoadgenTelemetry:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        labels = [m.STRATEGY, "scenario", "network"]
        self.latency = Histogram(LATENCY, "End-to-end latency from the intended send time", labels,
                                 buckets=m.LATENCY_BUCKETS_S, registry=r)  # fmt: skip
        self.requests = Counter("tierlab_loadgen_requests", "Requests answered, by status", [m.STRATEGY, m.STATUS],
                                registry=r)  # fmt: skip
        self.lag = Gauge("tierlab_loadgen_schedule_lag_seconds", "Last request's schedule lag", registry=r)
        self._server: Any = None
        self._target_file: Path | None = None

    def observe(self, labels: tuple[str, str, str], *, latency_ms: float, lag_ms: float, status: int) -> None:
        """``labels`` = (strategy, scenario, network)."""
        self.latency.labels(*labels).observe(latency_ms / 1e3)
        self.requests.labels(labels[0], str(status)).inc()
        self.lag.set(lag_ms / 1e3)

    def serve(self, address: str, port: int, targets_dir: Path | None, target_host: str | None = None) -> str:
        """Expose /metrics; register with Prometheus's file_sd if ``targets_dir`` is given. Returns the URL."""
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        bound = self._server.server_port
        if targets_dir is not None and targets_dir.is_dir():
            self._target_file = targets_dir / "loadgen.json"
            entry = [{"targets": [f"{target_host or address}:{bound}"], "labels": {"job": "loadgen"}}]
            self._target_file.write_text(json.dumps(entry))
        return f"http://{address}:{bound}/metrics"

    def close(self) -> None:
        if self._target_file is not None:
            self._target_file.unlink(missing_ok=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
