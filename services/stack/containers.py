"""The compose project's containers, through the Docker SDK (the engine's API, not parsed CLI output).

The SDK is the host-only ``stack`` extra: the in-stack loadgen has no Docker access, and says so.
"""

from __future__ import annotations

from typing import Any

from services.contracts.errors import ConfigError

try:
    import docker
    from docker.errors import APIError, DockerException
except ImportError:  # the in-stack loadgen's image: no SDK, no engine to ask
    docker = None  # type: ignore[assignment]

PROJECT = "tierlab"


class NoDockerAccess(ConfigError):
    """No Docker SDK or engine reachable from this process."""


_client: Any = None


def client() -> Any:
    """One Docker client per process, checked with a ping."""
    global _client  # noqa: PLW0603 - one connection pool to the engine per process
    if _client is None:
        if docker is None:
            raise NoDockerAccess("no Docker SDK here (pip install 'tierlab[stack]')")
        try:
            engine = docker.from_env(timeout=60)
            engine.ping()
        except DockerException as exc:
            raise NoDockerAccess(f"cannot reach the Docker engine from here: {exc}") from None
        _client = engine
    return _client


def project_containers(project: str = PROJECT) -> dict[str, Any]:
    """The project's containers (running or not) by compose service name."""
    found = client().containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"})
    return {c.labels.get("com.docker.compose.service", c.name): c for c in found}


def exited(project: str = PROJECT) -> dict[str, bool]:
    """Services whose container has exited, each with whether the kernel's OOM killer stopped it."""
    return {
        service: bool(c.attrs["State"].get("OOMKilled"))
        for service, c in project_containers(project).items()
        if c.status == "exited"
    }


def update(container: Any, **changes: int) -> None:
    """``docker update`` of a running container (CPU quota/period, memory); refusals as ``ConfigError``."""
    try:
        container.update(**changes)
    except APIError as exc:
        raise ConfigError(f"Docker refused to change {container.name}'s limits {changes}: {exc.explanation}") from None
