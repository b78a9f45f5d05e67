"""The stack on Docker Swarm (``make up RUNTIME=swarm``): the same compose files, tiers on real nodes.

``render_stack`` turns ``docker-compose.yml`` + the resource and network overrides into a stack file for
``docker stack deploy`` (``.local/stack/swarm-stack.yml``). What Swarm says differently, and what it cannot:

- **placement**: each tier on the node labelled ``tierlab.tier=<tier>`` (``docker node update --label-add
  tierlab.tier=edge <node>``); with no labelled node, a one-node swarm runs all three, a larger one refuses.
- **CPU**: ``deploy.resources.limits.cpus`` becomes the same CFS quota, but always at Swarm's fixed 100 ms
  period (``NanoCpus``): a profile's ``cpu_period`` other than 100 ms cannot be expressed, and ``up`` says
  so. The device speed is the tier's own pacing (``TIERLAB_DEVICE``) and carries over unchanged.
- **memory**: ``deploy.resources.limits.memory``; Swarm sets no swap limit of its own (the node's default).
- **ports**: published in ``host`` mode on the node that runs the tier — the routing mesh would answer on
  every node and hide which tier it reached (and needs IPVS, which some kernels, this one included, lack).
  Swarm cannot bind a published port to 127.0.0.1: it is open on every interface of that node.
- **names**: ``endpoint_mode: dnsrr`` — a tier's name resolves to its task's own address on each overlay,
  so a link's shaping and probing see the peer itself, not a virtual IP in front of it.
- **networks**: one attachable overlay per link, plus ``control`` (management, never shaped) and
  ``device``; an overlay's MTU is 1450 (VXLAN adds 50 bytes), which the goodput expectation accounts for.
- **restarts**: ``condition: none`` — a killed tier stays down until the runtime starts it, as with
  compose's ``restart: "no"``.
- **no healthcheck**: Swarm adds a task to its peers' DNS only once healthy, and a tier shapes its links
  at start by its peers' names — with a healthcheck each tier would wait for the others'. The runtime
  polls readiness itself (``/v2/health/ready``), as for compose.
- dropped: ``extra_hosts: host-gateway`` (no such thing in Swarm: a host loadgen's metrics are not scraped;
  the run bundle keeps them), ``profiles`` (Grafana runs when its image exists; the loadgen runs on the host).

- **files**: what the services read from the stack folder and the project (the deployment, the control
  token, ``prometheus.yml``) become Swarm configs and secrets, which Swarm carries to whichever node runs
  a task. The models are the one bind mount left: they must be at the same path on every node that runs a
  tier (``rsync``; the multi-node test bind-mounts the project into each node).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.contracts.errors import ConfigError
from services.contracts.specs import TIERS, TierName
from services.contracts.stack_state import StackStateSpec, write_stack_state
from services.contracts.transport import CONTROL_TOKEN_FILE, json_call, use_stack_token
from services.stack.compose import (
    GRAFANA_PORT,
    HOST_PORTS,
    PROMETHEUS_PORT,
    STACK_MOUNT,
    DockerStack,
    StackSpec,
    state_path,
)
from services.stack.containers import PROJECT, NoDockerAccess, client, swarm_service
from services.stack.docker import require_engine, run, say
from services.stack.images import ensure_images

SWARM_CFS_PERIOD_US = 100_000  # Swarm's NanoCpus: a CFS quota at the kernel's default period
OVERLAY_MTU = 1450  # a 1500-byte underlay minus VXLAN's 50 bytes
TIER_LABEL = "tierlab.tier"
ENGINE_LABEL = "tierlab.engine"  # where this host reaches a node's own engine (faults, logs): tcp:// or ssh://
STACK_FILE = "swarm-stack.yml"
SECRET_TOKEN_PATH = f"/run/secrets/{CONTROL_TOKEN_FILE}"


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of override files for the keys tierlab uses: mappings merged key by key, the rest
    (lists, scalars) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def merged_compose(files: list[Path]) -> dict[str, Any]:
    """The compose files merged in order, as ``docker compose config`` would (anchors resolved)."""
    merged: dict[str, Any] = {}
    for path in files:
        document = yaml.safe_load(path.read_text()) or {}
        merged = _merge(merged, {k: v for k, v in document.items() if not k.startswith("x-")})
    return merged


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${NAME}`` and ``${NAME:-default}`` in every string of ``value``, from ``env``. Done here,
    not by ``docker stack deploy``: a published port must be a number in the stack file, and the file
    written then shows exactly what was deployed."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def _port(published: str) -> dict[str, Any]:
    """``127.0.0.1:8001:8000`` → a host-mode published port (Swarm binds every interface)."""
    host_port, container_port = published.split(":")[-2:]
    return {"target": int(container_port), "published": int(host_port), "protocol": "tcp", "mode": "host"}


def _absolute(volume: str, root: Path) -> str:
    source, _, rest = volume.partition(":")
    if source.startswith("./") or source == ".":
        source = str((root / source).resolve())
    return f"{source}:{rest}"


@dataclass
class SwarmFiles:
    """Files the services read, as Swarm configs and secrets: Swarm carries them to whichever node runs a
    task (a bind mount would need the file on every node). Named by content, as Swarm's are immutable."""

    configs: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, path: Path, *, secret: bool = False) -> str:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "missing"
        name = f"{path.name.replace('.', '-')}-{digest}"
        (self.secrets if secret else self.configs)[name] = {"file": str(path)}
        return name


def _stack_folder_files(service: dict[str, Any], stack_dir: Path, files: SwarmFiles) -> dict[str, Any]:
    """A tier's view of the stack folder (``/etc/tierlab``) as a config (the deployment) and a secret (the
    control token, at ``/run/secrets/control-token``)."""
    deployment = files.add(stack_dir / "deployment.yaml")
    token = files.add(stack_dir / CONTROL_TOKEN_FILE, secret=True)
    return {
        "configs": [{"source": deployment, "target": f"{STACK_MOUNT}/deployment.yaml", "mode": 0o444}],
        "secrets": [{"source": token, "target": CONTROL_TOKEN_FILE, "mode": 0o444}],
        "environment": {**service.get("environment", {}), "TIERLAB_CONTROL_TOKEN_FILE": SECRET_TOKEN_PATH},
    }


# compose keys Swarm takes in another form (deploy.*, host-mode ports, absolute mounts) or not at all
_RENDERED_APART = frozenset(
    {"cpu_period", "cpu_quota", "mem_limit", "memswap_limit", "pids_limit", "restart", "profiles", "depends_on",
     "extra_hosts", "ports", "volumes", "networks", "healthcheck", "tmpfs"}
)  # fmt: skip


def render_service(
    name: str, service: dict[str, Any], root: Path, placement: list[str], files: SwarmFiles
) -> dict[str, Any]:
    """One compose service as a Swarm service (see the module's notes for each change); the files it reads
    by bind mount become ``files``' configs and secrets."""
    out = {k: v for k, v in service.items() if k not in _RENDERED_APART}
    limits: dict[str, Any] = {}
    if service.get("cpu_quota"):
        limits["cpus"] = f"{int(service['cpu_quota']) / int(service.get('cpu_period', SWARM_CFS_PERIOD_US)):g}"
    if service.get("mem_limit"):
        limits["memory"] = str(service["mem_limit"])
    if service.get("pids_limit"):
        limits["pids"] = int(service["pids_limit"])
    out["deploy"] = {
        "mode": "replicated",
        "replicas": 1,
        "endpoint_mode": "dnsrr",
        "restart_policy": {"condition": "none"},
        "placement": {"constraints": placement},
        **({"resources": {"limits": limits}} if limits else {}),
    }
    if service.get("ports"):
        out["ports"] = [_port(p) for p in service["ports"]]
    volumes: list[str | dict[str, str]] = []
    configs: list[dict[str, Any]] = []
    for volume in (_absolute(v, root) for v in service.get("volumes") or []):
        source, target = volume.split(":")[:2]
        if target == STACK_MOUNT and name in TIERS:
            out.update(_stack_folder_files(service, Path(source), files))
        elif Path(source).is_file():  # e.g. prometheus.yml
            configs.append({"source": files.add(Path(source)), "target": target, "mode": 0o444})
        else:
            volumes.append(volume)
    # a read-only task's scratch space (onnxruntime's profiler writes there): Swarm ignores `tmpfs:`
    tmpfs = service.get("tmpfs") or []
    volumes += [{"type": "tmpfs", "target": t} for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]
    if volumes:
        out["volumes"] = volumes
    if configs:
        out["configs"] = configs
    networks = service.get("networks") or {}
    if isinstance(networks, list):
        networks = {n: None for n in networks}
    out["networks"] = {n: ({"aliases": c["aliases"]} if c and c.get("aliases") else None) for n, c in networks.items()}
    if name in TIERS:
        # which node ran the tier, for its status and the run bundle (Swarm's service templates)
        out["environment"] = {**out.get("environment", {}), "TIERLAB_NODE_HOSTNAME": "{{.Node.Hostname}}",
                              "TIERLAB_NODE_ID": "{{.Node.ID}}"}  # fmt: skip
    return out


def render_stack(
    files: list[Path], root: Path, env: Mapping[str, str], *, labelled: bool, with_grafana: bool
) -> dict[str, Any]:
    """The stack file: each tier on the node labelled for it (``labelled``; else anywhere: a one-node
    swarm), Prometheus (and Grafana) on a manager; variables taken from ``env``."""
    compose = interpolate(merged_compose(files), env)
    swarm_files = SwarmFiles()
    services: dict[str, Any] = {}
    for name, service in compose["services"].items():
        if name == "loadgen" or (name == "grafana" and not with_grafana):
            continue
        if name in TIERS:
            placement = [f"node.labels.{TIER_LABEL} == {name}"] if labelled else []
        else:
            placement = ["node.role == manager"]
        services[name] = render_service(name, service, root, placement, swarm_files)
    mtu = {"com.docker.network.driver.mtu": str(OVERLAY_MTU)}
    networks = {name: {"driver": "overlay", "attachable": True, "driver_opts": mtu} for name in compose["networks"]}
    return {"version": "3.9", "services": services, "networks": networks, "volumes": compose.get("volumes", {}),
            "configs": swarm_files.configs, "secrets": swarm_files.secrets}  # fmt: skip


def period_notes(files: list[Path]) -> list[str]:
    """What the resource profile asks that Swarm cannot express (said at ``make up``)."""
    compose = merged_compose(files)
    notes = []
    for tier in TIERS:
        period = compose["services"][tier].get("cpu_period")
        if period and int(period) != SWARM_CFS_PERIOD_US:
            notes.append(
                f"{tier}: the profile's CFS period {int(period) / 1000:g} ms cannot be expressed in Swarm "
                f"(NanoCpus, always {SWARM_CFS_PERIOD_US / 1000:g} ms): the same share of CPU at 100 ms"
            )
    return notes


def place_tiers(nodes: list[dict[str, Any]]) -> dict[TierName, str | None]:
    """Tier → the hostname of the node labelled ``tierlab.tier=<tier>``; with no labels on a one-node swarm,
    every tier anywhere (None). ``nodes`` are the engine's node descriptions (``docker node inspect``)."""
    ready = [n for n in nodes if n["Status"]["State"] == "ready" and n["Spec"].get("Availability") == "active"]
    labelled: dict[str, list[str]] = {}
    for node in ready:
        tier = node["Spec"].get("Labels", {}).get(TIER_LABEL)
        if tier:
            labelled.setdefault(tier, []).append(node["Description"]["Hostname"])
    unknown = sorted(set(labelled) - set(TIERS))
    if unknown:
        raise ConfigError(f"node label {TIER_LABEL} must be one of {', '.join(TIERS)}; found {', '.join(unknown)}")
    if not labelled:
        if len(ready) == 1:
            return {t: None for t in TIERS}
        raise ConfigError(
            f"this swarm has {len(ready)} ready nodes and none is labelled for a tier: label one per tier, e.g. "
            f"`docker node update --label-add {TIER_LABEL}=mobile <node>` (and edge, cloud)"
        )
    placed: dict[TierName, str | None] = {}
    for tier in TIERS:
        hosts = labelled.get(tier, [])
        if len(hosts) != 1:
            have = f"nodes {', '.join(hosts)} are" if hosts else "no ready node is"
            raise ConfigError(f"{have} labelled {TIER_LABEL}={tier}: label exactly one")
        placed[tier] = hosts[0]
    return placed


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: no ``&id001`` anchors for a reader to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_stack_file(stack: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STACK_FILE
    path.write_text(yaml.dump(stack, Dumper=_PlainDumper, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- deploy

LOCAL_ENGINE = "local"  # this host's default engine (the Docker socket)
STACK = PROJECT


def engine_client(engine: str | None) -> Any:
    """A client of ``engine`` (a ``tcp://``/``ssh://`` URL, or None/``local``: this host's default)."""
    return client(None if engine in (None, LOCAL_ENGINE) else engine)


def node_engine(node: dict[str, Any], manager_node_id: str, manager: str | None) -> str | None:
    """How this host reaches ``node``'s own engine: the manager's own for the manager's node, else the node's
    ``tierlab.engine`` label (None: not reachable — its containers cannot be paused, killed or squeezed)."""
    if node["ID"] == manager_node_id:
        return manager or LOCAL_ENGINE
    engine = node["Spec"].get("Labels", {}).get(ENGINE_LABEL)
    return str(engine) if engine else None


def node_address(node: dict[str, Any], manager_node_id: str, manager: str | None) -> str:
    """Where this host reaches a tier's host-mode ports on ``node``: loopback for this host's own node."""
    return "127.0.0.1" if manager is None and node["ID"] == manager_node_id else str(node["Status"]["Addr"])


@dataclass
class SwarmStack:
    """The stack on the swarm whose manager is ``manager`` (``DOCKER_HOST`` when set, else this host's
    engine), deployed with ``docker stack deploy``."""

    spec: StackSpec
    root: Path
    manager: str | None = field(default_factory=lambda: os.environ.get("DOCKER_HOST") or None)

    @property
    def compose(self) -> DockerStack:
        return DockerStack(self.spec, self.root)

    @property
    def engine(self) -> Any:
        return engine_client(self.manager)

    def _cli_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(base or os.environ)
        if self.manager:
            env["DOCKER_HOST"] = self.manager
        return env

    def swarm(self) -> tuple[dict[str, Any], bool]:
        """The manager's swarm (a one-node swarm made here if its engine is in none: True); refuses a worker."""
        info = self.engine.info()["Swarm"]
        created = False
        if info.get("LocalNodeState") != "active":
            address = default_address()
            say(f"this engine is in no swarm: making a one-node swarm (advertised on {address})")
            self.engine.swarm.init(advertise_addr=address, listen_addr=f"{address}:2377")
            info, created = self.engine.info()["Swarm"], True
        if not info.get("ControlAvailable"):
            raise ConfigError("this engine is a swarm worker: point DOCKER_HOST at a manager (or run make up there)")
        return info, created

    def up(self, timeout_s: float) -> StackStateSpec:
        require_engine()
        started = time.monotonic()
        info, created = self.swarm()
        nodes = [n.attrs for n in self.engine.nodes.list()]
        placement = place_tiers(nodes)
        images = ensure_images(with_grafana=self.spec.with_grafana)
        self.compose.prepare()
        files = self.spec.compose_files(self.root)
        for note in period_notes(files):
            say(note)
        env = self._cli_env(self.compose.environment(images))
        stack = render_stack(files, self.root, env, labelled=any(placement.values()), with_grafana=bool(images.grafana))
        path = write_stack_file(stack, self.root / ".local" / "stack")
        say(f"deploying {STACK} on {len(nodes)} node(s) from {path.relative_to(self.root)}")
        run(["docker", "stack", "deploy", "--resolve-image", "never", "--prune", "-c", str(path), STACK],
            env=env, quiet=True, timeout_s=300)  # fmt: skip
        by_id = {n["ID"]: n for n in nodes}
        manager_id = info["NodeID"]
        tier_nodes = self.wait_running(timeout_s, by_id)
        manager_address = node_address(by_id[manager_id], manager_id, self.manager)
        urls = {t: f"http://{node_address(tier_nodes[t], manager_id, self.manager)}:{HOST_PORTS[t]}" for t in TIERS}
        state = self.spec.state(
            "swarm",
            urls=urls,
            manager=self.manager,
            nodes={t: node_summary(tier_nodes[t]) for t in TIERS},
            engines={n["ID"]: node_engine(n, manager_id, self.manager) for n in nodes},
            swarm_created=created,
            prometheus=f"http://{manager_address}:{PROMETHEUS_PORT}",
            grafana=f"http://{manager_address}:{GRAFANA_PORT}" if images.grafana else None,
            images=images.spec(),
            control_token_file=str(self.root / ".local" / "stack" / CONTROL_TOKEN_FILE),
        )
        use_stack_token(state)
        self.wait_ready(urls, timeout_s - (time.monotonic() - started))
        self.compose.wait_scraped(f"http://{manager_address}:{PROMETHEUS_PORT}")
        state.up_s = round(time.monotonic() - started, 1)
        write_stack_state(state_path(self.root), state)
        return state

    def latest_task(self, tier: TierName) -> dict[str, Any] | None:
        """The newest task of the tier's service (Swarm keeps the history of killed and replaced ones)."""
        service = swarm_service(f"{STACK}_{tier}", self.manager)
        tasks = service.tasks() if service is not None else []
        return max(tasks, key=lambda t: t["CreatedAt"]) if tasks else None

    def task_state(self, tier: TierName) -> str | None:
        state = (self.latest_task(tier) or {}).get("Status", {}).get("State")
        return str(state) if state else None

    def wait_running(self, timeout_s: float, nodes: dict[str, Any]) -> dict[TierName, dict[str, Any]]:
        """Until every tier's task runs; the node each runs on. A task Swarm could not start (no such image on
        its node, a limit no node can give, no node labelled) is named with the engine's reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            placed: dict[TierName, dict[str, Any]] = {}
            reasons: dict[TierName, str] = {}
            for tier in TIERS:
                task = self.latest_task(tier)
                if task is None:
                    reasons[tier] = "no task yet"
                    continue
                status = task["Status"]
                reasons[tier] = f"{status['State']} {status.get('Err') or status.get('Message') or ''}".strip()
                if status["State"] in ("failed", "rejected"):
                    raise ConfigError(f"Swarm could not run {tier}: {reasons[tier]}")
                if status["State"] == "running":
                    placed[tier] = nodes[task["NodeID"]]
            if len(placed) == len(TIERS):
                for tier, node in placed.items():
                    say(f"{tier} running on node {node['Description']['Hostname']}")
                return placed
            if time.monotonic() > deadline:
                said = "; ".join(f"{t}: {r}" for t, r in reasons.items() if t not in placed)
                raise ConfigError(f"Swarm has not started every tier within {timeout_s:g} s: {said}")
            time.sleep(1.0)

    def wait_ready(self, urls: dict[TierName, str], timeout_s: float) -> None:
        deadline = time.monotonic() + max(timeout_s, 10.0)
        waiting = set(TIERS)
        while waiting:
            for tier in sorted(waiting):
                if json_call(f"{urls[tier]}/v2/health/ready", timeout_s=2)[0] == 200:
                    waiting.discard(tier)
                    say(f"{tier} ready")
            stopped = [t for t in waiting if self.task_state(t) != "running"]
            if stopped or (waiting and time.monotonic() > deadline):
                why = f"{', '.join(stopped)} stopped" if stopped else f"not ready within {timeout_s:g} s"
                raise ConfigError(f"the swarm stack did not come up: {why}. Last log lines:\n{self.logs(30)}")
            if waiting:
                time.sleep(1.0)

    def logs(self, tail: int = 100) -> str:
        out = []
        for name in (*TIERS, "prometheus"):
            done = run(["docker", "service", "logs", "--no-task-ids", "--tail", str(tail), f"{STACK}_{name}"],
                       check=False, quiet=True, timeout_s=60, env=self._cli_env())  # fmt: skip
            text = (done.stdout or b"") + (done.stderr or b"")
            out.append(f"==> {name}\n{text.decode(errors='replace')}")
        return "\n".join(out)

    def down(self, state: StackStateSpec) -> None:
        """``docker stack rm``, then until no container or network of the stack is left on any node this host
        reaches; a one-node swarm made by ``up`` is left again."""
        run(["docker", "stack", "rm", STACK], check=False, quiet=True, timeout_s=120, env=self._cli_env())
        engines = sorted({e for e in state.engines.values() if e} | {self.manager or LOCAL_ENGINE})
        deadline = time.monotonic() + 60
        while any((left := self.leftovers(engines)).values()):
            if time.monotonic() > deadline:
                say(f"still there 60 s after docker stack rm: {left}")
                break
            time.sleep(1.0)
        if state.swarm_created:
            self.engine.swarm.leave(force=True)
            say("left the one-node swarm make up had made")
        state_path(self.root).unlink(missing_ok=True)

    def leftovers(self, engines: list[str]) -> dict[str, list[str]]:
        """The stack's containers and networks still on any of ``engines``."""
        label = f"com.docker.stack.namespace={STACK}"
        found: dict[str, list[str]] = {"container": [], "network": []}
        for engine in engines:
            try:
                docker_engine = engine_client(engine)
            except NoDockerAccess:
                continue
            found["container"] += [c.name for c in docker_engine.containers.list(all=True, filters={"label": label})]
            found["network"] += [n.name for n in docker_engine.networks.list(filters={"label": label})]
        return found


def node_summary(node: dict[str, Any]) -> dict[str, Any]:
    description = node["Description"]
    return {
        "id": node["ID"],
        "hostname": description["Hostname"],
        "address": node["Status"]["Addr"],
        "arch": description["Platform"]["Architecture"],
        "os": description["Platform"]["OS"],
        "cpus": description["Resources"]["NanoCPUs"] / 1e9,
        "memory_bytes": description["Resources"]["MemoryBytes"],
        "engine": description["Engine"]["EngineVersion"],
        "labels": node["Spec"].get("Labels", {}),
    }


def default_address() -> str:
    """This host's address on its default route (where other nodes would reach a swarm made here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
