"""The stack's runtimes: where the tiers run — local processes, Docker containers or Swarm services.

Each implements ``services.contracts.runtime.TierRuntime`` (kill, pause, limits … as the loadgen's fault
scenarios use them, through ``services.contracts.runtime.runtime_for``, which finds them as the
``tierlab.runtimes`` entry points in ``pyproject.toml``) and adds ``up``: ``make up/down/status`` and the
loadgen go through them, never around them.

``DockerRuntime`` talks to the engine through the Docker SDK (containers found by their compose project and
service labels); ``LocalRuntime`` signals the tier processes by the pids in the state file and starts a
killed tier again with the argv it was started with. Local tiers have no cgroup: their limits read back as
none, and setting one is refused with a message that says to use the Docker runtime. ``SwarmRuntime`` is
the third: the Swarm services of ``docker stack deploy``, their containers reached through each node's
engine (``services/stack/swarm.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from services.contracts.errors import ConfigError, StackNotUp
from services.contracts.runtime import TierLimits, TierProcess, TierRun, TierRuntime, Unsupported, runtime_for
from services.contracts.specs import TIERS, TierName, network_profile_links
from services.contracts.stack_state import LocalTierSpec, StackStateSpec, write_stack_state
from services.contracts.transport import json_call, new_control_token, use_stack_token
from services.demo import local_deployment, write_deployment
from services.local import LocalStack
from services.stack.compose import (
    DockerStack,
    StackSpec,
    compose_available,
    find_manifests,
    leftovers,
    override_file,
    state_path,
)
from services.stack.containers import (
    PROJECT,
    NoDockerAccess,
    NotFound,
    project_containers,
    swarm_service,
    update,
    update_nano_cpus,
)
from services.stack.docker import docker_bridge_address, project_root
from services.stack.swarm import ENGINE_LABEL, STACK, SwarmStack, engine_client

_POLL_INTERVAL_S = 0.1


class Runtime(ABC):
    """Up, down, status and the faults a chaos scenario injects, for one way of running the tiers: a
    ``services.contracts.runtime.TierRuntime`` that also brings the stack up and down."""

    name: str

    def __init__(self, state: StackStateSpec, state_file: Path | None = None) -> None:
        self.state, self.state_file = state, state_file

    @property
    def root(self) -> Path:
        """The project the stack belongs to (its state file is ``<root>/.local/stack.json``)."""
        return self.state_file.parents[1] if self.state_file is not None else project_root()

    @classmethod
    @abstractmethod
    def up(cls, spec: StackSpec, root: Path, timeout_s: float) -> Runtime:
        """Bring the tiers up as ``spec`` says, record the state in ``.local/stack.json``, wait until ready."""

    contained = True  # tiers in containers with cgroup limits, beside Prometheus and Grafana

    @abstractmethod
    def down(self) -> list[str]:
        """Stop every tier and whatever else the runtime started; returns what was stopped."""

    def said_down(self, stopped: list[str]) -> str:
        """What ``make down`` tells the user once ``down`` returned ``stopped``."""
        return "stack down"

    def metrics_bind(self) -> str | None:
        """The address a loadgen on this host listens on so that the stack's Prometheus scrapes it (as
        ``host.docker.internal``); None where the stack's Prometheus cannot reach this host."""
        return None

    def run_loadgen(self, spec: str) -> int:
        """Run an experiment from a loadgen inside the stack; its exit code."""
        raise Unsupported(
            f"the in-stack loadgen needs the Docker stack (make up); with {self.name} tiers use make bench"
        )

    @abstractmethod
    def processes(self) -> dict[TierName, TierProcess]: ...

    @abstractmethod
    def kill(self, tier: TierName) -> None:
        """Kill the tier at once (SIGKILL): no drain, no goodbye, as a crash or a pulled plug."""

    @abstractmethod
    def start(self, tier: TierName) -> None:
        """Start a killed or exited tier again, with the configuration it was brought up with."""

    def restart(self, tier: TierName) -> None:
        """Stop the tier gracefully (SIGTERM) and start it again."""
        self.stop(tier)
        self.start(tier)

    @abstractmethod
    def stop(self, tier: TierName) -> None: ...

    @abstractmethod
    def pause(self, tier: TierName) -> None:
        """Freeze every process of the tier (it holds its connections and answers nothing)."""

    @abstractmethod
    def resume(self, tier: TierName) -> None: ...

    @abstractmethod
    def limits(self, tier: TierName) -> TierLimits: ...

    @abstractmethod
    def exec(self, tier: TierName, argv: list[str]) -> str:
        """Run ``argv`` where the tier runs (in its container; on this host for a local tier); its output.
        A command that fails raises ``ConfigError`` with what it printed."""

    @abstractmethod
    def logs(self, tail: int = 100) -> str:
        """The last ``tail`` log lines of every tier (and whatever else the runtime started)."""

    @abstractmethod
    def set_limits(self, tier: TierName, limits: TierLimits) -> None:
        """Give a running tier exactly these limits (None = unlimited): a squeeze, and putting it back."""

    def oom_killed(self) -> list[TierName]:
        """The tiers the kernel's OOM killer stopped; none where this process cannot ask (the in-stack
        loadgen has no Docker access)."""
        try:
            return [t for t, p in self.processes().items() if p.oom_killed]
        except Unsupported:
            return []

    def wait_ready(self, tier: TierName, timeout_s: float) -> float:
        """Seconds until ``tier`` answers ready (raises ``ConfigError`` after ``timeout_s``)."""
        started = time.monotonic()
        url = f"{self.state.urls[tier]}/v2/health/ready"
        while time.monotonic() - started < timeout_s:
            if json_call(url, timeout_s=1.0)[0] == 200:
                return time.monotonic() - started
            time.sleep(_POLL_INTERVAL_S)
        raise StackNotUp(f"{tier} not ready within {timeout_s:g} s after it was started again")


# ------------------------------------------------------------------------------------------- local


class LocalRuntime(Runtime):
    """Tier processes on this host (``make up RUNTIME=local``, and the integration test ring)."""

    name = "local"
    contained = False

    def said_down(self, stopped: list[str]) -> str:
        return f"stopped local tiers: {', '.join(stopped) or 'none running'}"

    @classmethod
    def up(cls, spec: StackSpec, root: Path, timeout_s: float) -> Runtime:
        models_dir = (root / spec.models_dir).resolve()
        deployment = local_deployment(
            find_manifests(models_dir, spec.subjects),
            models_dir=str(models_dir),
            links=network_profile_links(override_file("network", spec.network, root)),
        )
        path = write_deployment(deployment, root / ".local" / "stack" / "deployment-local.yaml")
        token_file = new_control_token(root / ".local" / "stack")
        env = {"TIERLAB_STARTUP_MODELS": spec.startup_models, "TIERLAB_CONTROL_TOKEN_FILE": str(token_file)}
        stack = LocalStack(path, detach=True, log_dir=root / ".local" / "logs", env=env)
        stack.start(timeout_s)
        state = stack.state().model_copy(
            update={"network": spec.network, "subjects": list(spec.subjects), "control_token_file": str(token_file)}
        )
        write_stack_state(state_path(root), state)
        use_stack_token(state)
        return cls(state, state_path(root))

    def _info(self, tier: TierName) -> LocalTierSpec:
        info = self.state.tiers.get(tier)
        if info is None:
            raise ConfigError(f"the local stack has no {tier} tier")
        return info

    def _signal(self, tier: TierName, signum: int) -> None:
        try:
            os.kill(self._info(tier).pid, signum)
        except ProcessLookupError:
            raise ConfigError(f"{tier} (pid {self._info(tier).pid}) is not running") from None

    def processes(self) -> dict[TierName, TierProcess]:
        found: dict[TierName, TierProcess] = {}
        for tier in TIERS:
            if tier not in self.state.tiers:
                found[tier] = TierProcess(tier, "missing")
                continue
            found[tier] = TierProcess(tier, process_run(self._info(tier).pid))
        return found

    def kill(self, tier: TierName) -> None:
        pid = self._info(tier).pid
        self._signal(tier, signal.SIGKILL)
        wait_gone(pid, 10.0)

    def stop(self, tier: TierName) -> None:
        pid = self._info(tier).pid
        if process_run(pid) == "paused":
            self.resume(tier)
        self._signal(tier, signal.SIGTERM)
        if not wait_gone(pid, 10.0):
            self.kill(tier)

    def start(self, tier: TierName) -> None:
        info = self._info(tier)
        if process_run(info.pid) in ("running", "paused"):
            raise ConfigError(f"{tier} is still running (pid {info.pid})")
        argv, env = info.argv, self.state.env
        if not argv or info.log is None:
            raise Unsupported(f"the state file does not say how {tier} was started: bring the stack up again")
        # posix_spawn, not Popen: the tier outlives this process (its own session), and no Popen object is
        # left behind to be collected while the child runs
        log = os.open(info.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                {**os.environ, **env},
                file_actions=[(os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)],
                setsid=True,
            )
        finally:
            os.close(log)
        self.state.tiers[tier] = info.model_copy(update={"pid": pid})
        if self.state_file is not None:  # `make down` must find the new process
            write_stack_state(self.state_file, self.state)

    def pause(self, tier: TierName) -> None:
        self._signal(tier, signal.SIGSTOP)
        self._until(tier, "paused")

    def resume(self, tier: TierName) -> None:
        self._signal(tier, signal.SIGCONT)
        self._until(tier, "running")

    def _until(self, tier: TierName, run: TierRun, timeout_s: float = 5.0) -> None:
        """Signals are delivered asynchronously: return once the kernel shows the process ``run``."""
        pid = self._info(tier).pid
        deadline = time.monotonic() + timeout_s
        while process_run(pid) != run:
            if time.monotonic() > deadline:
                raise ConfigError(f"{tier} (pid {pid}) is not {run} {timeout_s:g} s after it was signalled")
            time.sleep(_POLL_INTERVAL_S / 10)

    def limits(self, tier: TierName) -> TierLimits:
        self._info(tier)
        return TierLimits(None, None)

    def exec(self, tier: TierName, argv: list[str]) -> str:
        self._info(tier)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise ConfigError(f"`{' '.join(argv)}` failed on {tier}'s host ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def logs(self, tail: int = 100) -> str:
        out = []
        for tier, info in self.state.tiers.items():
            if info.log is None:
                continue
            lines = Path(info.log).read_text(errors="replace").splitlines(keepends=True)[-tail:]
            out.append(f"==> {tier} ({info.log})\n{''.join(lines)}")
        return "\n".join(out)

    def set_limits(self, tier: TierName, limits: TierLimits) -> None:
        raise Unsupported(
            f"the local runtime runs {tier} as a plain process without cgroup limits: "
            "CPU and memory squeezes need the Docker runtime (make up RUNTIME=docker)"
        )

    def down(self) -> list[str]:
        running = [t for t, p in self.processes().items() if p.run in ("running", "paused")]
        for tier in running:
            self.stop(tier)
        return list(running)


def process_run(pid: int) -> TierRun:
    """running, paused (stopped by a signal) or exited (gone, or a zombie) — from ``/proc``."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "exited"
    if state in ("Z", "X"):
        return "exited"
    return "paused" if state in ("T", "t") else "running"


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Until ``pid`` has exited (reaped if it is our child); False if it is still there after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: its parent reaps it
            pass
        if process_run(pid) == "exited":
            return True
        time.sleep(_POLL_INTERVAL_S / 2)
    return False


# ------------------------------------------------------------------------------------------ docker


class DockerRuntime(Runtime):
    """The compose project's tier containers, through the Docker SDK."""

    name = "docker"
    project = PROJECT

    @classmethod
    def up(cls, spec: StackSpec, root: Path, timeout_s: float) -> Runtime:
        return cls(DockerStack(spec, root).up(timeout_s=timeout_s), state_path(root))

    def _containers(self) -> dict[TierName, Any]:
        try:
            found = project_containers(self.project)
        except NoDockerAccess as exc:
            raise Unsupported(str(exc)) from None
        return {t: found[t] for t in TIERS if t in found}

    def _container(self, tier: TierName) -> Any:
        container = self._containers().get(tier)
        if container is None:
            raise StackNotUp(f"no {tier} container in the {self.project} project (make up)")
        return container

    def processes(self) -> dict[TierName, TierProcess]:
        containers = self._containers()
        found: dict[TierName, TierProcess] = {}
        for tier in TIERS:
            if tier not in containers:
                found[tier] = TierProcess(tier, "missing")
                continue
            state = containers[tier].attrs["State"]
            run: TierRun = "paused" if state["Paused"] else "running" if state["Running"] else "exited"
            found[tier] = TierProcess(tier, run, bool(state.get("OOMKilled")), state.get("ExitCode"))
        return found

    def kill(self, tier: TierName) -> None:
        self._container(tier).kill()

    def stop(self, tier: TierName) -> None:
        self._container(tier).stop(timeout=10)

    def start(self, tier: TierName) -> None:
        self._container(tier).start()

    def pause(self, tier: TierName) -> None:
        self._container(tier).pause()

    def resume(self, tier: TierName) -> None:
        self._container(tier).unpause()

    def limits(self, tier: TierName) -> TierLimits:
        host = self._container(tier).attrs["HostConfig"]
        quota, period = host.get("CpuQuota") or 0, host.get("CpuPeriod") or 100_000
        nano = host.get("NanoCpus") or 0  # `--cpus` and Swarm's limits: a quota at the default period
        cores = nano / 1e9 if nano > 0 else quota / period if quota > 0 else None
        memory, swap = host.get("Memory") or None, host.get("MemorySwap") or None
        return TierLimits(cores, memory, swap if swap and swap > 0 else None)

    def set_limits(self, tier: TierName, limits: TierLimits) -> None:
        container = self._container(tier)
        host = container.attrs["HostConfig"]
        period = host.get("CpuPeriod") or 100_000
        quota = -1 if limits.cpu_cores is None else max(1000, round(limits.cpu_cores * period))
        changes: dict[str, int] = {}
        if limits.memory_bytes is not None:  # no swap unless asked: a squeeze is felt, not paged away
            changes.update(mem_limit=limits.memory_bytes, memswap_limit=limits.memory_swap_bytes or limits.memory_bytes)
        elif host.get("Memory"):
            raise Unsupported(f"Docker cannot remove the memory limit of the running {tier} container")
        if host.get("NanoCpus"):  # the engine refuses a quota where NanoCpus is set: stay in its unit
            update_nano_cpus(container, 0 if limits.cpu_cores is None else round(limits.cpu_cores * 1e9), **changes)
            return
        update(container, cpu_period=period, cpu_quota=quota, **changes)

    def exec(self, tier: TierName, argv: list[str]) -> str:
        code, out = self._container(tier).exec_run(argv)
        text = bytes(out).decode(errors="replace")
        if code != 0:
            raise ConfigError(f"`{' '.join(argv)}` failed in {tier}'s container ({code}): {text.strip()}")
        return text

    def logs(self, tail: int = 100) -> str:
        return DockerStack(StackSpec.recorded(self.state, self.root), self.root).logs(tail)

    def down(self) -> list[str]:
        if not compose_available():
            return []
        DockerStack(StackSpec.recorded(self.state, self.root), self.root).down()
        return [t for t, p in self.processes().items() if p.run == "missing"]

    def said_down(self, stopped: list[str]) -> str:
        left = leftovers() if compose_available() else {}
        return "stack down" + ("" if not any(left.values()) else f"; still there: {left}")

    def metrics_bind(self) -> str | None:
        return docker_bridge_address()

    def run_loadgen(self, spec: str) -> int:
        return DockerStack(StackSpec.recorded(self.state, self.root), self.root).run_loadgen(spec)


# ------------------------------------------------------------------------------------------- swarm


class SwarmRuntime(DockerRuntime):
    """The stack's Swarm services; each tier's current task container through its node's own engine (the
    manager's for its own node, else the node's ``tierlab.engine`` label), so a fault is the same container
    operation as with compose. Starting a killed tier again is Swarm's: a forced update makes a new task."""

    name = "swarm"

    @classmethod
    def up(cls, spec: StackSpec, root: Path, timeout_s: float) -> Runtime:
        return cls(SwarmStack(spec, root).up(timeout_s), state_path(root))

    @property
    def stack(self) -> SwarmStack:
        return SwarmStack(StackSpec.recorded(self.state, self.root), self.root, self.state.manager)

    def _engine(self, node_id: str) -> Any:
        engine = self.state.engines.get(node_id)
        if engine is None:
            raise Unsupported(
                f"this host cannot reach the engine of swarm node {node_id}: label the node "
                f"`docker node update --label-add {ENGINE_LABEL}=ssh://user@host <node>` (or tcp://…), make up again"
            )
        try:
            return engine_client(engine)
        except NoDockerAccess as exc:
            raise Unsupported(str(exc)) from None

    def _containers(self) -> dict[TierName, Any]:
        found: dict[TierName, Any] = {}
        for tier in TIERS:
            task = self.stack.latest_task(tier)
            container_id = (task or {}).get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
            if task is None or not container_id:
                continue
            try:
                found[tier] = self._engine(task["NodeID"]).containers.get(container_id)
            except NotFound:  # the node removed it (Swarm prunes old tasks)
                continue
        return found

    def start(self, tier: TierName) -> None:
        """A new task of the tier's service (a killed task stays down: restart condition none)."""
        stack = self.stack
        service = swarm_service(f"{STACK}_{tier}", stack.manager)
        if service is None:
            raise StackNotUp(f"no {tier} service in the {STACK} stack (make up RUNTIME=swarm)")
        if self.processes()[tier].run in ("running", "paused"):
            raise ConfigError(f"{tier} is still running")
        service.force_update()
        deadline = time.monotonic() + 60
        while stack.task_state(tier) != "running":
            if time.monotonic() > deadline:
                raise ConfigError(f"Swarm has not started {tier} again within 60 s")
            time.sleep(_POLL_INTERVAL_S)

    def logs(self, tail: int = 100) -> str:
        return self.stack.logs(tail)

    def down(self) -> list[str]:
        self.stack.down(self.state)
        return list(TIERS)

    def said_down(self, stopped: list[str]) -> str:
        return "swarm stack removed"

    def metrics_bind(self) -> str | None:
        return None  # Prometheus runs on the overlay, which does not reach this host's docker0

    def run_loadgen(self, spec: str) -> int:
        return Runtime.run_loadgen(self, spec)


RUNTIMES: dict[str, type[Runtime]] = {"local": LocalRuntime, "docker": DockerRuntime, "swarm": SwarmRuntime}


def as_tier_runtime(runtime: Runtime) -> TierRuntime:
    """A runtime as its contract (the type checker proves every runtime here keeps it)."""
    return runtime


def recorded_runtime(state: StackStateSpec, state_file: Path | None = None) -> Runtime:
    """The runtime that brought up the stack ``state`` describes, with what the stack's commands need
    beyond the contract (down's message, the in-stack loadgen)."""
    runtime = runtime_for(state, state_file)
    if not isinstance(runtime, Runtime):
        raise ConfigError(f"the {runtime.name} runtime installed here is not one of tierlab's stack runtimes")
    return runtime
