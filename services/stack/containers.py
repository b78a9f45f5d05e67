"""The compose project's containers, through the Docker SDK (the engine's API, not parsed CLI output).

The SDK is the host-only ``stack`` extra: the in-stack loadgen has no Docker access, and says so.
"""

from __future__ import annotations

from typing import Any

from services.contracts.errors import ConfigError, MissingTool

try:
    import docker
    from docker.errors import APIError, DockerException, NotFound
except ImportError:  # the in-stack loadgen's image: no SDK, no engine to ask
    docker = None  # type: ignore[assignment]

    class NotFound(Exception):  # type: ignore[no-redef]
        """Stands in for the SDK's: nothing can be found without one."""


__all__ = ["PROJECT", "NoDockerAccess", "NotFound", "client", "exited", "project_containers", "swarm_service",
           "update", "update_nano_cpus"]  # fmt: skip
PROJECT = "tierlab"


class NoDockerAccess(MissingTool):
    """No Docker SDK or engine reachable from this process."""


_clients: dict[str | None, Any] = {}


def client(base_url: str | None = None) -> Any:
    """One Docker client per engine and process, checked with a ping: this host's (``DOCKER_HOST`` or the
    socket) by default, or a swarm node's own engine (``tcp://…``, ``ssh://…``)."""
    if base_url not in _clients:
        if docker is None:
            raise NoDockerAccess("no Docker SDK here (pip install 'tierlab[stack]')")
        try:
            engine = (
                docker.from_env(timeout=60)
                if base_url is None
                else docker.DockerClient(base_url=base_url, timeout=60, use_ssh_client=base_url.startswith("ssh://"))
            )
            engine.ping()
        except DockerException as exc:
            where = "here" if base_url is None else base_url
            raise NoDockerAccess(f"cannot reach the Docker engine at {where}: {exc}") from None
        _clients[base_url] = engine
    return _clients[base_url]


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


def update_nano_cpus(container: Any, nano_cpus: int, **changes: int) -> None:
    """``docker update --cpus``: a Swarm task's CPU limit is ``NanoCpus``, which the engine will not let a
    CFS quota replace, and which the SDK's ``update`` cannot set (so: the engine's own update endpoint)."""
    api = container.client.api
    body = {"NanoCpus": nano_cpus}
    if "mem_limit" in changes:
        body.update(Memory=changes["mem_limit"], MemorySwap=changes.get("memswap_limit", changes["mem_limit"]))
    response = api.post(f"{api.base_url}/v{api.api_version}/containers/{container.id}/update", json=body)
    if response.status_code != 200:
        message = response.json().get("message", response.text) if response.content else response.reason
        raise ConfigError(f"Docker refused to change {container.name}'s limits {body}: {message}")


def swarm_service(name: str, manager: str | None = None) -> Any | None:
    """A Swarm service by name, asked of a manager's engine (None when there is none)."""
    try:
        return client(manager).services.get(name)
    except NotFound:
        return None
