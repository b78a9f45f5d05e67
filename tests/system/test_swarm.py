"""The stack across a real multi-node Docker Swarm on this machine (marker ``docker``).

Three Docker-in-Docker nodes (``services/stack/nodes.py``: each its own engine, made offline, tierlab's
images loaded, no registry) form a swarm — the first the manager, one node labelled per tier — and
``SwarmStack`` deploys the same compose files across them from this host (``DOCKER_HOST`` = the manager).
Checked: each tier on its own labelled node, and each tier names that node; the resource profile's CPU and
memory limits applied by Swarm and read back by the runtime, the kernel and the tier; every link shaped
across nodes (VXLAN overlays, MTU 1450) within its tolerance, on what it adds to the overlay's own round trip
(1.1 ms measured here, the emulated part 16.18 ms of 16); a three-tier request equal to in-process
onnxruntime; a fault through the runtime on a worker node's engine (pause, kill and start again); and
``down`` leaves no container or network on any node.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from loadgen.target import Stack
from services.contracts.runtime import runtime_for
from services.contracts.specs import TIERS
from services.contracts.transport import json_call, probe_links
from services.demo import build_demo_mlp
from services.stack.cli import network_links
from services.stack.compose import StackSpec, read_state, state_path
from services.stack.nodes import Node, nodes_down, nodes_up
from services.stack.swarm import OVERLAY_MTU, SwarmStack
from tests.conftest import infer_over_http
from tests.system.test_stack import profile_limits, require_docker_and_no_stack

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
PROFILE, NETWORK = "laptop", "wan"
CGROUP_LIMITS = (
    "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us "
    "/sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.max"
)


@pytest.fixture(scope="module")
def swarm() -> Iterator[list[Node]]:
    require_docker_and_no_stack()
    nodes_down()  # what an interrupted run left
    try:
        yield nodes_up(3, ROOT)
    finally:
        nodes_down()


def test_the_stack_across_three_swarm_nodes(swarm: list[Node]) -> None:
    models_dir = ROOT / ".local" / "system-test-models"  # under the project: bind-mounted into every node
    build_demo_mlp(models_dir, seed=7)
    for path in [models_dir, *models_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    spec = StackSpec(PROFILE, NETWORK, models_dir, ("demo-mlp",), with_grafana=False)
    stack = SwarmStack(spec, ROOT, manager=swarm[0].engine)
    state = stack.up(timeout_s=300)
    runtime = runtime_for(state, state_path(ROOT))
    try:
        urls = state.urls
        # placement: the node labelled for each tier, three distinct nodes, each tier says which
        placed = {t: state.nodes[t]["hostname"] for t in TIERS}
        assert placed == {t: swarm[i].name for i, t in enumerate(TIERS)}, placed
        for tier in TIERS:
            code, status = json_call(f"{urls[tier]}/tierlab/status")
            assert code == 200 and status["ready"], (tier, code, status)
            assert status["host"]["hostname"] == placed[tier] and status["host"]["node_id"] == state.nodes[tier]["id"]

        # limits: Swarm's NanoCpus are the profile's quota at 100 ms; the runtime, the kernel and the tier agree
        expected = profile_limits(PROFILE)
        for tier in TIERS:
            cores, memory = expected[tier]
            limits = runtime.limits(tier)
            assert limits.cpu_cores == pytest.approx(cores) and limits.memory_bytes == memory, (tier, limits)
            quota, period, kernel_memory = runtime.exec(tier, ["sh", "-c", CGROUP_LIMITS]).split()[:3]
            assert int(quota) / int(period) == pytest.approx(cores) and int(kernel_memory) == memory
            status = json_call(f"{urls[tier]}/tierlab/status")[1]
            assert status["limits"]["cpu_quota_cores"] == pytest.approx(cores)

        # links across nodes: VXLAN overlays, shaped at the sending tier, within tolerance
        configured = network_links(NETWORK, ROOT)
        measured = probe_links(urls, pings=40, repeats=3)
        assert {m.link for m in measured} == set(configured)
        for m in measured:
            # an overlay (VXLAN below it): MTU 1450, or less on a smaller underlay; its own RTT measured
            assert m.mtu_bytes <= OVERLAY_MTU and (m.path_rtt_ms_p50 is None) == (m.backend == "netem"), m
            assert m.problems() == [], m.problems()

        # a three-tier request equals the model in-process
        x = np.random.default_rng(5).normal(size=(3, 64)).astype(np.float32)
        reference = ort.InferenceSession(str(models_dir / "demo-mlp" / "identity" / "stage0.onnx"))
        model = "demo-mlp.partition3"
        client = Stack(urls, state)
        for tier in TIERS:
            assert not isinstance(client.load(tier, model), str)
        answer = infer_over_http(urls["mobile"], model, x, placement="M-E-C")
        np.testing.assert_allclose(answer.outputs["logits"], reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
        assert answer.parameters["hops"] == 3

        # a fault on a worker node, through its own engine: freeze edge, then kill it and let Swarm start it
        runtime.pause("edge")
        assert runtime.processes()["edge"].run == "paused"
        runtime.resume("edge")
        runtime.kill("edge")
        assert runtime.processes()["edge"].run == "exited"
        runtime.start("edge")
        runtime.wait_ready("edge", 120)
        assert json_call(f"{urls['edge']}/tierlab/status")[1]["host"]["hostname"] == placed["edge"]
        assert not isinstance(client.load("edge", model), str)
        assert infer_over_http(urls["mobile"], model, x, placement="M-E-C").parameters["hops"] == 3
    finally:
        runtime.down()
    assert stack.leftovers([n.engine for n in swarm]) == {"container": [], "network": []}
    assert read_state(ROOT) is None
