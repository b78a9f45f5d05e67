"""Talking to Docker from the host: is an engine there, which compose, run a command with its output shown.

Compose comes in two spellings: the v2 plugin (``docker compose``) and the v1.29 Python tool
(``docker-compose``, what Debian bookworm ships). Both read the same files; tierlab uses whichever answers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from services.contracts.errors import ConfigError, MissingTool

NO_DOCKER_HELP = (
    "Docker is not available: {reason}.\n"
    "  Install it:   sudo apt-get install -y docker.io docker-compose   (then start dockerd)\n"
    "  Or run the tiers as local processes instead:   make up RUNTIME=local"
)


class DockerUnavailable(MissingTool):
    """No Docker engine answers; the message says how to get one or how to go without."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    quiet: bool = False,
    timeout_s: float | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; output goes to the terminal unless ``quiet`` (then it is captured for errors)."""
    capture = subprocess.PIPE if quiet else None
    try:
        done = subprocess.run(
            list(argv), stdout=capture, stderr=capture, timeout=timeout_s, check=False, cwd=cwd, env=env
        )
    except FileNotFoundError:
        raise ConfigError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{' '.join(argv[:3])} …` did not finish within {timeout_s:g} s") from None
    if check and done.returncode != 0:
        detail = (done.stderr or b"").decode(errors="replace").strip()[-2000:]
        raise ConfigError(f"`{' '.join(argv)}` failed ({done.returncode})" + (f":\n{detail}" if detail else ""))
    return done


def output(argv: Sequence[str], *, timeout_s: float = 60.0) -> str:
    return run(argv, quiet=True, timeout_s=timeout_s).stdout.decode().strip()


def require_engine() -> None:
    """Raise :class:`DockerUnavailable` unless a Docker client and engine both answer."""
    if shutil.which("docker") is None:
        raise DockerUnavailable(NO_DOCKER_HELP.format(reason="no `docker` command"))
    done = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, quiet=True, timeout_s=20)
    if done.returncode != 0:
        reason = "the engine does not answer (is dockerd running?)"
        raise DockerUnavailable(NO_DOCKER_HELP.format(reason=reason))


def compose_command() -> list[str]:
    """``docker compose`` (v2) when the plugin answers, else ``docker-compose`` (v1.29)."""
    if run(["docker", "compose", "version"], check=False, quiet=True, timeout_s=20).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    raise DockerUnavailable(NO_DOCKER_HELP.format(reason="neither `docker compose` nor `docker-compose` is installed"))


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False, quiet=True, timeout_s=30).returncode == 0


def try_pull(tag: str, timeout_s: float = 300.0) -> bool:
    """Pull ``tag`` if a registry answers; False (quickly, on a closed network) if not."""
    if image_exists(tag):
        return True
    try:
        done = run(["docker", "pull", "--quiet", tag], check=False, quiet=True, timeout_s=timeout_s)
    except ConfigError:
        return False
    return done.returncode == 0


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def docker_bridge_address() -> str | None:
    """The host's address on docker0, which containers reach as ``host.docker.internal`` (host-gateway)."""
    try:
        text = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "docker0"], capture_output=True,
                              text=True, timeout=5, check=False).stdout  # fmt: skip
    except OSError:
        return None
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", text)
    return match.group(1) if match else None
