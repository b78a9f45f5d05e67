"""The Docker stack: compose files for a resource and a network profile, up, down, status, logs.

``DockerStack`` is the live thing; ``StackSpec`` says what to bring up (profile, network, which models).
The tiers read a deployment written to ``.local/stack/deployment.yaml`` (models by path under the
read-only ``/models`` mount, peers by compose service name); links come from the network profile's
``TIERLAB_LINKS``. A state file records what is running so ``down``/``status`` need no options.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.contracts.device import DeviceModelSpec, DeviceSpec
from services.contracts.errors import ConfigError
from services.contracts.specs import TIERS, DeploymentSpec, ModelEntrySpec, TierEndpointSpec, TierName
from services.contracts.stack_state import StackStateSpec, read_stack_state, write_stack_state
from services.contracts.transport import CONTROL_TOKEN_FILE, json_call, new_control_token, use_stack_token
from services.demo import DEFAULT_PORTS
from services.devices.cli import device_models
from services.stack.containers import PROJECT, exited
from services.stack.docker import compose_command, output, project_root, require_engine, run, say
from services.stack.images import ImageSet, ensure_images

CONTAINER_MODELS_DIR = "/models"
CONTAINER_PORT = 8000
HOST_PORTS: dict[TierName, int] = DEFAULT_PORTS  # docker-compose.yml publishes the tiers where local ones listen
PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000
DEFAULT_SUBJECTS = ("fmnist-resnet", "fmnist-resnext")


def available(kind: str, root: Path) -> list[str]:
    """Profiles of ``kind`` (``resources`` or ``network``) that compose/ has an override file for."""
    return sorted(p.stem.removeprefix(f"{kind}-") for p in (root / "compose").glob(f"{kind}-*.yml"))


def override_file(kind: str, name: str, root: Path) -> Path:
    path = root / "compose" / f"{kind}-{name}.yml"
    if not path.is_file():
        raise ConfigError(f"no {kind} profile '{name}'; choose one of: {', '.join(available(kind, root))}")
    return path


@dataclass(frozen=True)
class StackSpec:
    profile: str = "laptop"
    network: str = "lan"
    models_dir: Path = Path("models")
    subjects: tuple[str, ...] = DEFAULT_SUBJECTS  # () = every manifest under models_dir
    with_grafana: bool = True
    startup_models: str = "none"  # the tiers' TIERLAB_STARTUP_MODELS: none, all, or names

    def state(self, runtime: str, **recorded: Any) -> StackStateSpec:
        """The state a runtime records for a stack brought up from this spec (``recorded`` reads it back)."""
        return StackStateSpec(
            runtime=runtime,
            profile=self.profile,
            network=self.network,
            models_dir=str(self.models_dir),
            subjects=list(self.subjects),
            **recorded,
        )

    @classmethod
    def recorded(cls, state: StackStateSpec, root: Path) -> StackSpec:
        """The spec a recorded stack was brought up with (the defaults where a profile file is gone since:
        the containers are found by project and service name, not by the files)."""
        profile, network = state.profile or cls.profile, state.network or cls.network
        return cls(
            profile if profile in available("resources", root) else cls.profile,
            network if network in available("network", root) else cls.network,
            Path(state.models_dir or cls.models_dir),
        )

    def compose_files(self, root: Path) -> list[Path]:
        return [
            root / "docker-compose.yml",
            override_file("resources", self.profile, root),
            override_file("network", self.network, root),
        ]


def find_manifests(models_dir: Path, subjects: tuple[str, ...]) -> list[str]:
    """Manifests under ``models_dir`` (of ``subjects`` if given), relative to it; ``_work`` folders skipped."""
    found = sorted(
        p.relative_to(models_dir).as_posix()
        for p in models_dir.rglob("manifest.json")
        if "_work" not in p.parts and (not subjects or p.relative_to(models_dir).parts[0] in subjects)
    )
    if not found:
        wanted = f" for {', '.join(subjects)}" if subjects else ""
        raise ConfigError(f"no built variants in {models_dir}{wanted}: run `make models` first")
    return found


def profile_devices(override: Path) -> dict[TierName, DeviceSpec]:
    """The devices a resource profile gives its tiers (their ``TIERLAB_DEVICE``)."""
    services = (yaml.safe_load(override.read_text()) or {}).get("services") or {}
    found: dict[TierName, DeviceSpec] = {}
    for tier in TIERS:
        text = ((services.get(tier) or {}).get("environment") or {}).get("TIERLAB_DEVICE")
        if text:
            try:
                found[tier] = DeviceSpec.model_validate_json(text)
            except ValueError as exc:
                raise ConfigError(f"{override}: {tier}'s TIERLAB_DEVICE is not a device: {exc}") from None
    return found


def stack_deployment(manifests: list[str], devices: dict[str, DeviceModelSpec] | None = None) -> DeploymentSpec:
    return DeploymentSpec(
        models_dir=CONTAINER_MODELS_DIR,
        models=tuple(ModelEntrySpec(manifest=m) for m in manifests),
        # `<tier>-link` resolves only on the link network two tiers share (docker-compose.yml)
        tiers={t: TierEndpointSpec(url=f"http://{t}-link:{CONTAINER_PORT}") for t in TIERS},
        devices=devices or {},
    )


@dataclass
class DockerStack:
    spec: StackSpec
    root: Path = field(default_factory=project_root)

    @property
    def stack_dir(self) -> Path:
        return self.root / ".local" / "stack"

    def environment(self, images: ImageSet | None) -> dict[str, str]:
        """The variables the compose files read (image names, mounts, ids, start-up models)."""
        env = dict(os.environ)
        uid, gid = loadgen_ids()
        env.update(
            TIERLAB_MODELS_DIR=str((self.root / self.spec.models_dir).resolve()),
            TIERLAB_STACK_DIR=str(self.stack_dir.resolve()),
            TIERLAB_UID=str(uid),
            TIERLAB_GID=str(gid),
            TIERLAB_STARTUP_MODELS=self.spec.startup_models,
        )
        if images is not None:
            env.update(images.environment())
        return env

    def _compose_argv(self, *profiles: str) -> list[str]:
        argv = [*compose_command(), "-p", PROJECT]
        for path in self.spec.compose_files(self.root):
            argv += ["-f", str(path)]
        for profile in profiles:
            argv += ["--profile", profile]
        return argv

    def _compose(
        self, *args: str, images: ImageSet | None = None, quiet: bool = False, profiles: tuple[str, ...] = ()
    ) -> str:
        argv = [*self._compose_argv(*profiles), *args]
        done = run(argv, env=self.environment(images), quiet=quiet, timeout_s=900, cwd=self.root)
        return (done.stdout or b"").decode()

    def prepare(self) -> tuple[list[str], Path, Path]:
        """What every tier reads from the stack folder: the deployment, a fresh control token (mounted, never
        in an image) and Grafana's admin password; returns the manifests and both files."""
        models_dir = (self.root / self.spec.models_dir).resolve()
        manifests = find_manifests(models_dir, self.spec.subjects)
        (self.stack_dir / "targets").mkdir(parents=True, exist_ok=True)
        token_file = new_control_token(self.stack_dir)
        grafana_password = new_control_token(self.stack_dir, GRAFANA_PASSWORD_FILE)
        measured = sorted({d.model for d in profile_devices(self.spec.compose_files(self.root)[1]).values() if d.model})
        if measured:
            say(f"fitting the measured devices {', '.join(measured)} against this host")
        deployment = stack_deployment(manifests, device_models(measured, self.root) if measured else None)
        (self.stack_dir / "deployment.yaml").write_text(
            yaml.safe_dump(deployment.model_dump(mode="json", exclude_none=True), sort_keys=False)
        )
        say(
            f"starting the stack: resources '{self.spec.profile}', network '{self.spec.network}', "
            f"{len(manifests)} variants"
        )
        return manifests, token_file, grafana_password

    def up(self, timeout_s: float = 300.0) -> StackStateSpec:
        require_engine()
        started = time.monotonic()
        images = ensure_images(with_grafana=self.spec.with_grafana)
        _, token_file, grafana_password = self.prepare()
        grafana = images.grafana is not None
        self._compose("up", "-d", "--remove-orphans", images=images, profiles=("grafana",) if grafana else ())
        self.wait_ready(timeout_s)
        self.wait_scraped(f"http://127.0.0.1:{PROMETHEUS_PORT}")
        state = self.spec.state(
            "docker",
            urls={t: f"http://127.0.0.1:{HOST_PORTS[t]}" for t in TIERS},
            prometheus=f"http://127.0.0.1:{PROMETHEUS_PORT}",
            grafana=f"http://127.0.0.1:{GRAFANA_PORT}" if grafana else None,
            grafana_admin_password_file=str(grafana_password) if grafana else None,
            images=images.spec(),
            up_s=round(time.monotonic() - started, 1),
            control_token_file=str(token_file),
        )
        write_stack_state(state_path(self.root), state)
        use_stack_token(state)
        # the same, as a loadgen container inside the stack sees the tiers
        urls: dict[TierName, str] = {t: f"http://{t}:{CONTAINER_PORT}" for t in TIERS}
        urls["mobile"] = f"http://mobile-device:{CONTAINER_PORT}"
        inside = state.model_copy(update={"urls": urls, "control_token_file": f"{STACK_MOUNT}/{CONTROL_TOKEN_FILE}"})
        write_stack_state(self.stack_dir / "stack-internal.json", inside)
        return state

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(TIERS)
        while waiting:
            for tier in sorted(waiting):
                code, _ = json_call(f"http://127.0.0.1:{HOST_PORTS[tier]}/v2/health/ready", timeout_s=2)
                if code == 200:
                    waiting.discard(tier)
                    say(f"{tier} ready")
            if not waiting:
                return
            gone = exited()
            if gone or time.monotonic() > deadline:
                logs = self._compose("logs", "--tail", "30", *sorted(waiting), quiet=True)
                reason = (
                    ", ".join(
                        f"{name} exited" + (" (OOM-killed: over its memory limit)" if oom else "")
                        for name, oom in sorted(gone.items())
                    )
                    if gone
                    else f"not ready within {timeout_s:g} s"
                )
                raise ConfigError(f"the stack did not come up: {reason}. Last log lines:\n{logs}")
            time.sleep(1.0)

    def wait_scraped(self, prometheus: str, timeout_s: float = 30.0) -> None:
        """Until Prometheus has scraped every tier once (so `make status` right after shows them up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code, body = json_call(f"{prometheus}/api/v1/targets", timeout_s=2)
            if code == 200:
                up = {t["labels"].get("tier") for t in body["data"]["activeTargets"] if t["health"] == "up"}
                if set(TIERS) <= up:
                    say("prometheus scraping every tier")
                    return
            time.sleep(1.0)
        say(f"prometheus has not scraped every tier within {timeout_s:g} s (see make status)")

    def down(self) -> None:
        if not compose_available():
            return
        self._compose("down", "--volumes", "--remove-orphans", profiles=("grafana", "loadgen"))
        state = state_path(self.root)
        if state.exists():
            state.unlink()

    def run_loadgen(self, spec: str) -> int:
        """Run an experiment from the loadgen container (compose profile ``loadgen``) and wait for it."""
        for folder in (self.root / "results", self.stack_dir / "targets"):
            writable_by_loadgen(folder)
        images = ensure_images(with_grafana=False)  # the loadgen runs the current code
        argv = [*self._compose_argv("loadgen"), "run", "--rm", "--use-aliases", "loadgen", "--spec", spec]
        return run(argv, env=self.environment(images), check=False, cwd=self.root).returncode

    def logs(self, tail: int = 100) -> str:
        return self._compose("logs", "--tail", str(tail), quiet=True)


def compose_available() -> bool:
    try:
        require_engine()
        compose_command()
    except ConfigError:
        return False
    return True


def leftovers() -> dict[str, list[str]]:
    """What of the tierlab project Docker still has: containers, networks, volumes (all should be empty)."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        kind: [
            line
            for line in output(
                ["docker", kind, "ls", "-q", "--filter", label] + (["-a"] if kind == "container" else [])
            ).splitlines()
            if line
        ]
        for kind in ("container", "network", "volume")
    }


UNPRIVILEGED_ID = 10001  # the tiers' uid and gid (docker-compose.yml), and the loadgen's when make runs as root


def loadgen_ids() -> tuple[int, int]:
    """The uid and gid the in-stack loadgen runs as: whoever ran make (its results are theirs), never root —
    as root, the tiers' unprivileged ids."""
    if os.getuid() == 0:
        return UNPRIVILEGED_ID, UNPRIVILEGED_ID
    return os.getuid(), os.getgid()


def writable_by_loadgen(folder: Path) -> None:
    """Let the in-stack loadgen write into ``folder``: as root, the folder's group becomes the loadgen's,
    group-writable and setgid (what it creates stays in that group); otherwise the loadgen is the user."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(folder, -1, UNPRIVILEGED_ID)
        folder.chmod(0o2775)


GRAFANA_PASSWORD_FILE = "grafana-admin-password"  # Grafana's admin password, random per `make up`
STACK_MOUNT = "/etc/tierlab"  # where the tiers and the in-stack loadgen see the stack folder (docker-compose.yml)


def state_path(root: Path) -> Path:
    return root / ".local" / "stack.json"


def read_state(root: Path) -> StackStateSpec | None:
    """The running stack's state (None when none is up); this process's control calls carry its token."""
    state = read_stack_state(state_path(root))
    if state is not None:
        use_stack_token(state)
    return state
