"""The swarm runtime's pure parts: the stack file rendered from the compose files (every profile), tier
placement by node label, compose variables, and the host facts a tier reports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.contracts.errors import ConfigError
from services.contracts.specs import LINKS, TIERS, LinkMeasurementSpec, LinkSpec
from services.stack.compose import HOST_PORTS, StackSpec, available
from services.stack.swarm import (
    OVERLAY_MTU,
    TIER_LABEL,
    interpolate,
    merged_compose,
    period_notes,
    place_tiers,
    render_stack,
    write_stack_file,
)
from services.tier.limits import host_facts, parse_cpu_model

ROOT = Path(__file__).resolve().parents[2]
ENV = {"TIERLAB_MODELS_DIR": "/srv/models", "TIERLAB_STACK_DIR": "/srv/stack", "TIERLAB_TIER_IMAGE": "tierlab/tier:x"}


def rendered(profile: str, network: str = "lan", *, labelled: bool = True) -> dict[str, Any]:
    files = StackSpec(profile, network).compose_files(ROOT)
    return render_stack(files, ROOT, ENV, labelled=labelled, with_grafana=False)


@pytest.mark.parametrize("profile", available("resources", ROOT))
def test_every_profile_renders_its_limits_as_swarm_resources(profile: str) -> None:
    compose = merged_compose(StackSpec(profile).compose_files(ROOT))
    stack = rendered(profile)
    for tier in TIERS:
        want, got = compose["services"][tier], stack["services"][tier]
        limits = got["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) == pytest.approx(want["cpu_quota"] / want["cpu_period"])
        assert limits["memory"] == want["mem_limit"]
        assert got["deploy"]["placement"]["constraints"] == [f"node.labels.{TIER_LABEL} == {tier}"]
        assert got["deploy"]["endpoint_mode"] == "dnsrr" and got["deploy"]["restart_policy"] == {"condition": "none"}
        # nothing Swarm ignores is left in, nothing compose gave is lost
        assert not {"cpu_quota", "cpu_period", "mem_limit", "restart", "extra_hosts", "healthcheck"} & set(got)
        assert got["cap_add"] == ["NET_ADMIN"] and got["read_only"] and got["user"] == want["user"]
        assert got["environment"]["TIERLAB_DEVICE"] == want["environment"]["TIERLAB_DEVICE"]
        assert got["environment"]["TIERLAB_NODE_HOSTNAME"] == "{{.Node.Hostname}}"
        assert got["ports"] == [{"target": 8000, "published": HOST_PORTS[tier], "protocol": "tcp", "mode": "host"}]
        # variables taken from the environment given; the read-only task's /tmp as a tmpfs mount Swarm honours
        assert got["volumes"] == ["/srv/models:/models:ro", {"type": "tmpfs", "target": "/tmp"}]
        assert "tmpfs" not in got
        # what a tier reads from the stack folder travels with the stack, to whichever node runs it
        assert got["configs"][0]["target"] == "/etc/tierlab/deployment.yaml"
        assert got["secrets"][0]["target"] == "control-token"
        assert got["environment"]["TIERLAB_CONTROL_TOKEN_FILE"] == "/run/secrets/control-token"
        assert got["image"] == "tierlab/tier:x"
    assert stack["services"]["prometheus"]["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    prometheus_config = stack["services"]["prometheus"]["configs"][0]
    assert prometheus_config["target"] == "/etc/prometheus/prometheus.yml"
    assert stack["configs"][prometheus_config["source"]]["file"] == str(ROOT / "dashboards" / "prometheus.yml")
    assert "loadgen" not in stack["services"] and "grafana" not in stack["services"]


def test_links_are_attachable_overlays_and_aliases_survive() -> None:
    stack = rendered("laptop")
    assert set(LINKS) <= set(stack["networks"])
    for network in stack["networks"].values():
        assert network["driver"] == "overlay" and network["attachable"]
        assert network["driver_opts"]["com.docker.network.driver.mtu"] == str(OVERLAY_MTU)
    assert stack["services"]["edge"]["networks"]["mobile-edge"] == {"aliases": ["edge-link"]}
    assert stack["services"]["edge"]["networks"]["control"] is None


def test_a_one_node_swarm_places_nothing() -> None:
    stack = rendered("laptop", labelled=False)
    assert all(stack["services"][t]["deploy"]["placement"]["constraints"] == [] for t in TIERS)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_accepts_the_stack_file(tmp_path: Path) -> None:
    path = write_stack_file(rendered("rpi4", "4g"), tmp_path)
    assert "&id" not in path.read_text()  # written out in full, no anchors to chase
    done = subprocess.run(["docker", "stack", "config", "-c", str(path)], capture_output=True, text=True, check=False)
    if "unknown command" in done.stderr or "is not a docker command" in done.stderr:
        pytest.skip("this docker CLI has no `stack config`")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert config["services"]["mobile"]["deploy"]["resources"]["limits"]["pids"] == 512


def test_a_period_swarm_cannot_express_is_said(tmp_path: Path) -> None:
    override = tmp_path / "resources-short.yml"
    override.write_text("services:\n  edge: {cpu_period: 10000, cpu_quota: 5000}\n")
    notes = period_notes([ROOT / "docker-compose.yml", override])
    assert len(notes) == 1 and notes[0].startswith("edge: the profile's CFS period 10 ms")
    assert period_notes(StackSpec().compose_files(ROOT)) == []


def node(hostname: str, tier: str | None = None, state: str = "ready") -> dict[str, Any]:
    labels = {TIER_LABEL: tier} if tier else {}
    return {"ID": hostname, "Status": {"State": state}, "Spec": {"Availability": "active", "Labels": labels},
            "Description": {"Hostname": hostname}}  # fmt: skip


def test_tiers_go_to_the_nodes_labelled_for_them() -> None:
    nodes = [node("pi", "mobile"), node("nuc", "edge"), node("vm", "cloud"), node("spare")]
    assert place_tiers(nodes) == {"mobile": "pi", "edge": "nuc", "cloud": "vm"}
    assert place_tiers([node("laptop")]) == {t: None for t in TIERS}


@pytest.mark.parametrize(
    ("nodes", "says"),
    [
        ([node("a"), node("b")], "none is labelled"),
        ([node("a", "mobile"), node("b", "edge")], "no ready node is labelled tierlab.tier=cloud"),
        ([node("a", "mobile"), node("b", "mobile"), node("c", "edge"), node("d", "cloud")], "nodes a, b are"),
        ([node("a", "phone"), node("b", "edge"), node("c", "cloud")], "must be one of"),
        ([node("a", "mobile", "down"), node("b", "edge"), node("c", "cloud")], "tierlab.tier=mobile"),
    ],
)
def test_a_placement_that_cannot_be_made_is_refused(nodes: list[dict[str, Any]], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        place_tiers(nodes)


def test_compose_variables_are_interpolated() -> None:
    env = {"A": "1", "EMPTY": ""}
    value = {"x": ["${A}", "${A:-9}", "${B:-9}", "${EMPTY:-d}", "${B}", "a${A}b"], "n": 3}
    assert interpolate(value, env) == {"x": ["1", "1", "9", "d", "", "a1b"], "n": 3}


def test_the_cpu_is_named_on_x86_and_arm() -> None:
    assert parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    pi = "processor\t: 0\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert parse_cpu_model(pi) == "Raspberry Pi 4 Model B Rev 1.4"
    assert parse_cpu_model("processor\t: 0\nCPU part\t: 0xd0c\n") == "0xd0c"
    assert parse_cpu_model("") is None
    facts = host_facts()
    assert facts["kernel"] and facts["arch"] and facts["hostname"]


def test_goodput_is_expected_at_the_shaped_interface_mtu() -> None:
    def measured(mtu: int) -> LinkMeasurementSpec:
        return LinkMeasurementSpec(link="mobile-edge", sender="mobile", backend="tbf+userspace",
                                   configured=LinkSpec(rate_mbit=100), rtt_ms_min=1, rtt_ms_p50=1, rtt_ms_p90=1,
                                   bulk_bytes=1, goodput_mbit=95.0, mtu_bytes=mtu)  # fmt: skip

    assert measured(1500).expected_goodput_mbit == pytest.approx(100 * 1448 / 1514)
    assert measured(OVERLAY_MTU).expected_goodput_mbit == pytest.approx(100 * 1398 / 1464)
