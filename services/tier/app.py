"""The tier, wired from its settings: ``build_tier`` reads the deployment, verifies the manifests, reads the
cgroup limits, sizes onnxruntime and the device pacing, shapes the links and returns a :class:`Tier`
(what the routes serve, ``services.tier.routes.create_app``; the infer path is ``services.tier.infer``).
``Tier.status`` is the tier's status document (``services.contracts.tier_status``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.contracts.device import DevicePacer, DeviceSpec
from services.contracts.errors import (
    ConfigError,
)
from services.contracts.repository import MIB
from services.contracts.specs import (
    TIERS,
    DeploymentSpec,
    LinkName,
    LinkSpec,
    TierName,
    link_between,
    load_deployment,
)
from services.contracts.tier_status import (
    CgroupLimitsStatus,
    HostStatus,
    MemoryStatus,
    OnnxruntimeStatus,
    ServerStatus,
    TierStatusSpec,
)
from services.contracts.transport import read_control_token, use_control_token
from services.tier.dataplane import DataPlane, resolve_models
from services.tier.forwarder import Forwarder
from services.tier.limits import (
    CgroupLimits,
    MemoryBudget,
    host_cpu_count,
    host_facts,
    process_peak_rss_bytes,
    process_rss_bytes,
    read_cpu_throttling,
    read_limits,
)
from services.tier.links import (
    CommandRunner,
    LinkState,
    LinkTarget,
    UserspaceLink,
    clear_links,
    plan_links,
    run_command,
)
from services.tier.server import Server, ServerLimits
from services.tier.settings import TierSettings
from services.tier.telemetry import TierTelemetry

log = logging.getLogger(__name__)
DEFAULT_BODY_BUDGET_BYTES = 256 * MIB  # request bodies and their decoding held at once, at most


@dataclass
class Tier:
    """A tier realised from its settings: what it serves, under which limits, over which links."""

    settings: TierSettings
    deployment: DeploymentSpec
    dataplane: DataPlane
    links: list[LinkState]
    limits: CgroupLimits
    cpu_cores: float
    intra_op_threads: int
    allow_spinning: bool
    run: CommandRunner
    control_token: str | None = None
    host: dict[str, str | int | None] = field(default_factory=host_facts)  # the machine it runs on
    http_server: Server | None = None  # tierlab's own server, when it serves this tier (its limits follow links)
    _reshaping: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def server_limits(self) -> ServerLimits:
        """The HTTP server's limits from the settings: the body budget a share of the memory limit, and the
        minimum body rate under half the slowest link's, so a tensor an emulated link delivers at its
        configured rate is never cut off."""
        settings = self.settings
        memory = self.limits.memory_limit_bytes
        budget_bytes = (
            int(settings.body_budget_mb * MIB) if settings.body_budget_mb
            else min(DEFAULT_BODY_BUDGET_BYTES, memory // 4) if memory else DEFAULT_BODY_BUDGET_BYTES
        )  # fmt: skip
        rates = [s.spec.rate_mbit * 1e6 / 8 for s in self.links if s.spec.rate_mbit]
        return ServerLimits(
            max_connections=settings.max_connections,
            max_connections_per_peer=settings.max_connections_per_peer,
            keep_alive_s=settings.keep_alive_s,
            head_timeout_s=settings.head_timeout_s,
            body_min_rate_bytes_s=min([settings.body_min_rate_bytes_s, *(r / 2 for r in rates)]),
            body_grace_s=settings.body_grace_s,
            body_idle_s=settings.body_idle_s,
            send_timeout_s=settings.send_timeout_s,
            body_budget_bytes=budget_bytes,
        )

    def reshape(self, specs: Mapping[LinkName, LinkSpec]) -> list[LinkState]:
        """Apply new conditions to this tier's links (links not named keep theirs); no restart needed.
        One reshape at a time; the specs arrive validated (finite, bounded), and a backend that fails to
        apply them leaves the old conditions back in place."""
        with self._reshaping:
            old = {s.link: s.spec for s in self.links}
            targets = link_targets(self.settings.tier, self.deployment, {**old, **specs})
            clear_links(self.links, self.run)
            try:
                self.links = plan_links(targets, self.run)
            except Exception:
                self.links = plan_links(link_targets(self.settings.tier, self.deployment, old), self.run)
                raise
        self.dataplane.forwarder.set_links({s.peer: UserspaceLink.for_state(s) for s in self.links})
        self.dataplane.telemetry.record_links(self.links)
        if self.http_server is not None:
            self.http_server.limits = self.server_limits()  # a slower link lowers the minimum body rate
        for state in self.links:
            log.info("%s link %s now %s %s", self.settings.tier, state.link, state.backend.value, state.note)
        return self.links

    def memory_now(self) -> MemoryStatus:
        """Free memory (against the budget, the cgroup limit or the host), this process's resident set now
        and its peak since the last model load or peak reset (each starts a new peak)."""
        free_mib, of = self.dataplane.memory.free_mib()
        return MemoryStatus(
            free_mib=round(free_mib, 1),
            of=of,
            rss_mib=round(process_rss_bytes() / MIB, 1),
            peak_rss_mib=round(process_peak_rss_bytes() / MIB, 1),
        )

    def status(self) -> TierStatusSpec:
        """This tier now (``GET /tierlab/status``; ``services.contracts.tier_status`` is its reader)."""
        plane = self.dataplane
        limits = read_limits()  # now: a runtime may squeeze a running tier (onnxruntime keeps its start threads)
        return TierStatusSpec(
            tier=self.settings.tier,
            ready=plane.ready,
            load_error=plane.load_error,
            limits=CgroupLimitsStatus(
                cgroup=limits.version,
                cpu_quota_cores=limits.cpu_quota_cores,
                cpuset_cpu_count=limits.cpuset_cpu_count,
                memory_limit_bytes=limits.memory_limit_bytes,
                cpu_cores=self.cpu_cores,
            ),
            device=plane.device,
            device_model=plane.pacer.model,
            compute_slots=plane.compute_slots,
            host=HostStatus.model_validate(self.host),
            cpu_throttling=read_cpu_throttling(),
            onnxruntime=OnnxruntimeStatus(intra_op_threads=self.intra_op_threads, allow_spinning=self.allow_spinning),
            links=[state.describe() for state in self.links],
            memory=self.memory_now(),
            server=self.server_now(),
            models={entry.name: entry for entry in plane.index()},
        )

    def server_now(self) -> ServerStatus:
        """The HTTP server's limits and, under tierlab's own server, what it holds now: connections, the
        body budget's use and its peak."""
        server = self.http_server
        limits = server.limits if server is not None else self.server_limits()
        budget = server.budget if server is not None else None
        return ServerStatus(
            http_server=self.settings.http_server,
            max_connections=limits.max_connections,
            max_connections_per_peer=limits.max_connections_per_peer,
            body_budget_bytes=limits.body_budget_bytes,
            body_min_rate_bytes_s=limits.body_min_rate_bytes_s,
            memory_bound_bytes=limits.memory_bound_bytes,
            connections=len(server.connections) if server is not None and budget is not None else None,
            budget_held_bytes=budget.held_bytes if budget is not None else None,
            budget_peak_bytes=budget.peak_bytes if budget is not None else None,
            budget_refusals=budget.refused if budget is not None else None,
        )


def link_targets(tier: TierName, deployment: DeploymentSpec, specs: Mapping[LinkName, LinkSpec]) -> list[LinkTarget]:
    """This tier's links towards each peer, with the conditions ``specs`` give (unshaped if absent)."""
    return [
        LinkTarget(
            link_between(tier, peer),
            peer,
            urlsplit(deployment.tiers[peer].base_url).hostname or "",
            specs.get(link_between(tier, peer), LinkSpec()),
        )
        for peer in TIERS
        if peer != tier
    ]


def build_tier(settings: TierSettings, *, run: CommandRunner = run_command) -> Tier:
    """Read and check everything the tier needs; raises ConfigError with a clear message if it cannot."""
    tier = settings.tier
    deployment = load_deployment(settings.deployment)
    models = resolve_models(deployment, settings.deployment.resolve().parent)
    limits = read_limits()
    cores = limits.cpu_cores(host_cpu_count())
    # a device's cores are limited by the host's (and a cpuset), not by the quota, which carries its speed
    device = settings.device or DeviceSpec(cores=limits.intra_op_threads(host_cpu_count()))
    unquoted = CgroupLimits(limits.version, None, limits.cpuset_cpu_count, limits.memory_limit_bytes)
    threads = settings.intra_op_threads or device.threads(unquoted.cpu_cores(host_cpu_count()))
    try:
        pacer = DevicePacer(device, deployment.devices.get(device.model) if device.model else None)
    except ValueError as exc:
        raise ConfigError(f"{tier}: {exc} (make up fits the profile's devices into it)") from None
    if device.model:
        log.info("%s is a %s with %d core(s), paced by kernel class", tier, device.model, device.cores)
    elif device.is_paced:
        log.info("%s computes at speed %g of a host core, %d core(s)", tier, device.speed, device.cores)
    spinning = settings.allow_spinning if settings.allow_spinning is not None else limits.cpu_quota_cores is None

    configured = {**deployment.links, **(settings.links or {})} if settings.shape_links else {}
    states = plan_links(link_targets(tier, deployment, configured), run, settings.peer_resolve_s)
    for state in states:
        if state.spec.is_shaped:
            log.info("%s link %s: %s %s", tier, state.link, state.backend.value, state.note)

    forwarder = Forwarder(
        tier,
        {t: e.base_url for t, e in deployment.tiers.items()},
        {s.peer: UserspaceLink.for_state(s) for s in states},
        timeout_s=settings.forward_timeout_s,
    )
    telemetry = TierTelemetry(tier)
    telemetry.record_limits(limits, cores, threads, device)
    telemetry.record_links(states)
    plane = DataPlane(
        tier,
        models,
        forwarder,
        telemetry,
        compute_slots=settings.compute_slots or device.compute_slots(),
        max_queue=settings.max_queue,
        device=device,
        pacer=pacer,
        threads=threads,
        memory=MemoryBudget(
            int(settings.memory_budget_mb * MIB) if settings.memory_budget_mb else None,
            lambda: read_limits().memory_limit_bytes,
        ),
    )
    unknown = [n for n in settings.startup if n not in models] if isinstance(settings.startup, tuple) else []
    if unknown:
        raise ConfigError(f"startup model(s) {unknown} are not in the deployment; it has {sorted(models)}")
    token = read_control_token(settings.control_token_file) if settings.control_token_file else None
    use_control_token(token)  # this tier's own control calls (probes into a peer's sink) carry it
    return Tier(settings, deployment, plane, states, limits, cores, threads, spinning, run, token)
