"""Dashboards and link measurement against real processes: a real Prometheus (Debian's) scraping three
tier processes runs every dashboard query; the link probe measures what the emulation does, and
re-shaping a link between runs changes what the probe measures."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loadgen.telemetry import LoadgenTelemetry
from services.contracts.specs import TIERS, LinkMeasurementSpec
from services.contracts.transport import json_call
from services.demo import local_deployment, write_deployment
from services.local import LocalStack, free_ports
from services.stack import dashboard
from tests.conftest import DeploymentFactory, infer_over_http, require_tool

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_INTERVAL_S = 1


@pytest.fixture(scope="module")
def tiers(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    folder = tmp_path_factory.mktemp("observed")
    ports = dict(zip(TIERS, free_ports(3), strict=True))
    spec = local_deployment(
        [f"demo-mlp/{m}/manifest.json" for m in ("identity", "partition3", "early-exit")],
        models_dir=str(demo_root),
        ports=ports,
    )
    with LocalStack(write_deployment(spec, folder / "deployment.yaml"), log_dir=folder / "logs") as running:
        yield running


def prometheus_config(stack: LocalStack, targets_dir: Path) -> dict[str, Any]:
    """dashboards/prometheus.yml with the tiers' compose names swapped for the local processes."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    for job in config["scrape_configs"]:
        if job["job_name"] == "tiers":
            for group in job["static_configs"]:
                tier = group["labels"]["tier"]
                group["targets"] = [stack.url(tier).removeprefix("http://")]
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(targets_dir / "*.json")]
    return config


@pytest.fixture(scope="module")
def prometheus_server(tiers: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    binary = require_tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "targets").mkdir()
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(tiers, folder / "targets")))
    port = free_ports(1)[0]
    with open(folder / "log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if json_call(f"{url}/-/ready")[0] == 200:
                break
            time.sleep(0.1)
        yield url, folder / "targets"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def prometheus(prometheus_server: tuple[str, Path]) -> str:
    return prometheus_server[0]


def test_promtool_accepts_the_shipped_config() -> None:
    promtool = require_tool("promtool")
    done = subprocess.run([promtool, "check", "config", str(ROOT / "dashboards" / "prometheus.yml")],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    code, body = json_call(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert code == 200 and body["status"] == "success", f"{expr}: {code} {body}"
    return list(body["data"]["result"])


def test_every_dashboard_query_returns_data_from_real_tiers(
    tiers: LocalStack, prometheus: str, sample_batch: np.ndarray
) -> None:
    mobile = tiers.url("mobile")
    for _ in range(5):  # traffic for every panel: a split pipeline, an early exit, an error
        infer_over_http(mobile, "demo-mlp.partition3", sample_batch, placement="M-E-C")
        infer_over_http(mobile, "demo-mlp.early-exit", sample_batch[:1], placement="M-C", exit_threshold=0.0)
    with pytest.raises(Exception, match="400"):
        infer_over_http(mobile, "demo-mlp.identity", sample_batch, placement="Q")
    time.sleep(4 * SCRAPE_INTERVAL_S)
    for _ in range(5):  # a second burst so rate() over the window has two samples with traffic between
        infer_over_http(mobile, "demo-mlp.partition3", sample_batch, placement="M-E-C")
    time.sleep(4 * SCRAPE_INTERVAL_S)

    up = _query(prometheus, 'up{job="tiers"}')
    assert sorted(r["metric"]["tier"] for r in up if r["value"][1] == "1") == sorted(TIERS)
    for panel in dashboard.PANELS:
        if panel.needs_loadgen:
            continue  # run by the loadgen's own integration test, which produces those series
        for query in panel.queries:
            expr = query.expr.replace(dashboard.RATE, "1m")
            assert _query(prometheus, expr), f"panel '{panel.title}': no data for {expr}"


def test_loadgen_panels_get_data_from_a_running_loadgen(prometheus_server: tuple[str, Path]) -> None:
    """The loadgen registers itself through file_sd (as with the stack) and its panels fill."""
    prometheus, targets = prometheus_server
    telemetry = LoadgenTelemetry()
    telemetry.serve("127.0.0.1", 0, targets)
    try:
        for latency_ms in (2.0, 3.0, 50.0):
            telemetry.observe(("demo-mlp.identity@M", "single-stream", "lan"), latency_ms=latency_ms, lag_ms=0.1,
                              status=200)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _query(prometheus, 'up{job="loadgen"} == 1'):
            time.sleep(0.5)
        for latency_ms in (4.0, 5.0):
            telemetry.observe(("demo-mlp.identity@M", "single-stream", "lan"), latency_ms=latency_ms, lag_ms=0.1,
                              status=200)  # fmt: skip
        time.sleep(3 * SCRAPE_INTERVAL_S)
        for panel in (p for p in dashboard.PANELS if p.needs_loadgen):
            for query in panel.queries:
                expr = query.expr.replace(dashboard.RATE, "1m")
                assert _query(prometheus, expr), f"panel '{panel.title}': no data for {expr}"
    finally:
        telemetry.close()
    assert not (targets / "loadgen.json").exists(), "the loadgen unregisters when it stops"


def test_dashboard_json_has_a_query_for_each_promised_view() -> None:
    exprs = " ".join(t["expr"] for p in dashboard.dashboard()["panels"] for t in p["targets"])  # type: ignore[attr-defined]
    for needed in ("histogram_quantile(0.99", 'phase', "process_cpu_seconds_total", "tierlab_cpu_limit_cores",
                   "process_resident_memory_bytes", "tierlab_memory_limit_bytes", "tierlab_link_delay_ms"):  # fmt: skip
        assert needed in exprs


def test_probe_measures_userspace_delay_and_rate_and_follows_a_reshape(
    make_deployment: DeploymentFactory, tmp_path: Path
) -> None:
    with LocalStack(make_deployment(), log_dir=tmp_path / "logs") as stack:
        mobile = stack.url("mobile")

        def probe() -> LinkMeasurementSpec:
            code, body = json_call(f"{mobile}/tierlab/probe", method="POST",
                                   body={"peer": "edge", "pings": 8, "bulk_s": 0.3}, timeout_s=60)  # fmt: skip
            assert code == 200, body
            return LinkMeasurementSpec.model_validate(body)

        unshaped = probe()
        assert unshaped.backend == "none" and unshaped.path_rtt_ms_p50 is None  # nothing to leave out

        code, body = json_call(f"{mobile}/tierlab/links", method="PUT",
                               body={"mobile-edge": {"delay_ms": 15, "rate_mbit": 40}})  # fmt: skip
        assert code == 200, body
        shaped = probe()
        assert shaped.backend == "userspace"
        assert shaped.problems() == [], shaped.problems()  # within ±10 % / ±1 ms RTT and ±10 % rate
        assert 29 < shaped.rtt_ms_p50 < 33
        # the path's own round trip, measured between the delayed pings: loopback, far below the 30 ms added
        assert shaped.path_rtt_ms_p50 is not None and 0 < shaped.path_rtt_ms_p50 < shaped.rtt_ms_p50 - 25

        code, body = json_call(f"{mobile}/tierlab/links", method="PUT", body={"mobile-edge": {"delay_ms": 2}})
        assert probe().rtt_ms_p50 < shaped.rtt_ms_p50 - 20  # 30 ms of delay gone, 4 ms left
        code, body = json_call(f"{mobile}/tierlab/links", method="PUT", body={"mobile-edge": {"delay_ms": -1}})
        assert code == 422
        code, body = json_call(f"{mobile}/tierlab/probe", method="POST", body={"peer": "mobile"})
        assert code == 400 and "no link towards mobile" in json.dumps(body)
