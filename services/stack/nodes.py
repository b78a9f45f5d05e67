"""A multi-node Docker Swarm on this one machine: each node a Docker-in-Docker container with its own engine.

``make swarm-nodes`` (``python -m services stack nodes up``) starts ``--count`` node containers (every
capability but one, their own cgroup namespace and ``dockerd``, ``/var/lib/docker`` on a volume each) on a
bridge network of their own, from an image made offline like the tier's base (``debootstrap`` with
Debian's ``docker.io``; no registry), loads tierlab's images into each engine (``docker save`` → ``load``:
nothing is pulled), makes the first node the manager and joins the rest as workers, and labels one node
per tier (``tierlab.tier``) and each with where this host reaches its engine (``tierlab.engine``). The
project folder is bind-mounted at the same path on every node, so the models are where the stack file says
(on real hosts: ``rsync`` them; the rest travels as Swarm configs and secrets).
Then ``DOCKER_HOST=<the manager> make up RUNTIME=swarm`` deploys across them; ``make swarm-nodes-down``
removes the nodes, their volumes and network.

The node engines listen on TCP without TLS, on the nodes' own bridge network only (not published): a test
harness, not a way to run a swarm.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.contracts.errors import ConfigError
from services.contracts.specs import TIERS
from services.stack.containers import NoDockerAccess, client
from services.stack.docker import image_exists, run, say
from services.stack.images import BASE_PACKAGES, debootstrap_image, ensure_images, host_arch
from services.stack.swarm import ENGINE_LABEL, TIER_LABEL

NODE_IMAGE = "tierlab/swarm-node:bookworm"
NODE_PACKAGES = (*BASE_PACKAGES, "docker.io", "iptables", "procps")
NODE_PREFIX = "tierlab-node-"
NODE_NETWORK = "tierlab-nodes"
NODE_LABEL = "org.tierlab.swarm-node"
ENGINE_PORT = 2375

# What a node's own engine needs (cgroups, iptables, overlay mounts, network namespaces, VXLAN): everything
# ``--privileged`` gives but CAP_SYS_RESOURCE, which this kind of VM's root lacks in its bounding set, so
# ``--privileged`` itself fails here ("unable to apply caps: operation not permitted")
NODE_PRIVILEGES = ("--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
                   "--security-opt", "apparmor=unconfined", "--security-opt", "systempaths=unconfined",
                   "--cgroupns", "private", "--device-cgroup-rule", "a *:* rwm")  # fmt: skip
# a node's boot: its own cgroup hierarchies (its private cgroup namespace makes its cgroup their root, so
# the tiers' limits nest inside the node's), then its engine, on the socket and on TCP for this host
NODE_BOOT = f"""set -e
umount -R /sys/fs/cgroup 2>/dev/null || umount -l /sys/fs/cgroup
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
for controller in $(awk 'NR > 1 && $4 == 1 {{print $1}}' /proc/cgroups); do
  mkdir -p /sys/fs/cgroup/$controller
  mount -t cgroup -o $controller cgroup /sys/fs/cgroup/$controller || rmdir /sys/fs/cgroup/$controller
done
exec dockerd --host unix:///var/run/docker.sock --host tcp://0.0.0.0:{ENGINE_PORT} --storage-driver overlay2
"""


def ensure_node_image() -> str:
    """The node image: Debian bookworm with its docker.io, made by debootstrap (about 3 minutes, once)."""
    if image_exists(NODE_IMAGE):
        return NODE_IMAGE
    say(f"building the swarm node image {NODE_IMAGE} with debootstrap (once, about 3 minutes)")
    return debootstrap_image(NODE_IMAGE, host_arch(), NODE_PACKAGES, changes=('CMD ["bash", "-c", "exec dockerd"]',))


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    address: str

    @property
    def engine(self) -> str:
        return f"tcp://{self.address}:{ENGINE_PORT}"


def node_containers() -> list[Any]:
    return sorted(client().containers.list(all=True, filters={"label": NODE_LABEL}), key=lambda c: c.name)


def start_nodes(count: int, root: Path) -> list[Node]:
    engine = client()
    if not engine.networks.list(names=[NODE_NETWORK]):
        engine.networks.create(NODE_NETWORK, driver="bridge", labels={NODE_LABEL: "1"})
    nodes = []
    for index in range(1, count + 1):
        name = f"{NODE_PREFIX}{index}"
        # the CLI, not the SDK: the SDK cannot unmask /proc/sys (systempaths=unconfined), where an engine
        # switches IP forwarding on
        run(["docker", "run", "--detach", "--name", name, "--hostname", name, "--network", NODE_NETWORK,
             "--label", f"{NODE_LABEL}=1", "--volume", f"{name}-docker:/var/lib/docker",
             "--volume", f"{root}:{root}:ro", *NODE_PRIVILEGES, NODE_IMAGE, "bash", "-c", NODE_BOOT],
            quiet=True, timeout_s=120)  # fmt: skip
        container = engine.containers.get(name)
        container.reload()
        address = container.attrs["NetworkSettings"]["Networks"][NODE_NETWORK]["IPAddress"]
        nodes.append(Node(name, address))
    for node in nodes:
        wait_engine(node)
    return nodes


def wait_engine(node: Node, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client(node.engine)
        except NoDockerAccess:
            if time.monotonic() > deadline:
                logs = client().containers.get(node.name).logs(tail=20).decode(errors="replace")
                raise ConfigError(f"the engine of {node.name} did not answer within {timeout_s:g} s:\n{logs}") from None
            time.sleep(1.0)


def load_images(node: Node, tags: list[str]) -> None:
    """Copy images from this host's engine into a node's (``docker save | docker load``: no registry)."""
    with subprocess.Popen(["docker", "save", *tags], stdout=subprocess.PIPE) as save:
        load = subprocess.run(["docker", "-H", node.engine, "load", "--quiet"], stdin=save.stdout,
                              capture_output=True, check=False)  # fmt: skip
    if load.returncode != 0 or save.returncode != 0:
        raise ConfigError(f"loading {', '.join(tags)} into {node.name} failed: {load.stderr.decode().strip()}")


def form_swarm(nodes: list[Node]) -> None:
    """The first node the manager, the others workers; one tier per node (cycling when fewer than three)."""
    manager = client(nodes[0].engine)
    manager.swarm.init(advertise_addr=nodes[0].address, listen_addr=f"{nodes[0].address}:2377")
    token = manager.swarm.attrs["JoinTokens"]["Worker"]
    for node in nodes[1:]:
        client(node.engine).swarm.join(
            remote_addrs=[f"{nodes[0].address}:2377"], join_token=token, advertise_addr=node.address
        )
    by_hostname = {n.attrs["Description"]["Hostname"]: n for n in manager.nodes.list()}
    for index, node in enumerate(nodes):
        labels = {ENGINE_LABEL: node.engine}
        if index < len(TIERS):
            labels[TIER_LABEL] = TIERS[index]
        swarm_node = by_hostname[node.name]
        spec = dict(swarm_node.attrs["Spec"])
        spec["Labels"] = {**spec.get("Labels", {}), **labels}
        swarm_node.update(spec)


def nodes_up(count: int, root: Path, *, join: bool = True) -> list[Node]:
    """Start ``count`` nodes with tierlab's images and (``join``) form the swarm; returns the nodes, manager
    first. Without ``join`` the engines stand alone, for the README's steps to be tried by hand."""
    if count < 1:
        raise ConfigError("a swarm needs at least one node")
    if node_containers():
        raise ConfigError("swarm nodes are already running: make swarm-nodes-down first")
    images = ensure_images(with_grafana=False)
    ensure_node_image()
    started = time.monotonic()
    nodes = start_nodes(count, root)
    tags = [images.tier, images.prometheus, images.base]
    for node in nodes:
        load_images(node, tags)
    say(f"{len(nodes)} node engines up with {len(tags)} images each in {time.monotonic() - started:.0f} s")
    if join:
        form_swarm(nodes)
    return nodes


def nodes_down() -> list[str]:
    """Remove every node container, its engine's volume and the nodes' network."""
    engine = client()
    removed = []
    for container in node_containers():
        container.remove(force=True, v=True)
        removed.append(container.name)
    for volume in engine.volumes.list():
        if volume.name.startswith(NODE_PREFIX):
            volume.remove(force=True)
    for network in engine.networks.list(names=[NODE_NETWORK]):
        network.remove()
    return removed
