"""Link emulation: make the links a tier sends on behave like the deployment's ``LinkSpec``.

Backends, best first (the one in force is reported in health, metrics and the run bundle):

``netem``          kernel ``tc netem`` on the device towards the peer: delay, jitter (normal), loss, rate,
                   queue ``limit`` sized to the bandwidth-delay product. Each tier shapes its own egress,
                   so a round trip crosses the delay twice.
``tbf+userspace``  the kernel has no ``sch_netem`` (this build machine's kernel): ``tc tbf`` caps the rate
                   in the kernel; delay and jitter are added in userspace by the tier that sends the
                   request, once for each direction. Loss is not emulated.
``userspace``      no usable ``tc`` (no CAP_NET_ADMIN, no route, or the peer is on loopback as with local
                   tier processes): delay, jitter and rate (as serialisation delay through a FIFO
                   bottleneck) are all added in userspace by the requesting tier. Loss is not emulated.
``blackhole``      the link is cut (``loss_pct: 100``) and the kernel has no ``sch_netem``: ``tc blackhole``
                   drops every packet the tier sends on it (a chaos scenario's link cut).
``none``           the link is unshaped.

A cut link on the ``userspace`` backend holds every new request until its deadline, as a blackholed link
would (requests already in flight complete).

Command builders are pure functions returning argv lists (tested without root); ``plan_links`` runs them
through an injectable runner and falls back on the errors it recognises, never crashing a tier.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from services.contracts.clock import sleep_until
from services.contracts.specs import ETHERNET_MTU, LinkName, LinkSpec, TierName
from services.contracts.tier_status import LinkStatus

# netem with no rate still queues every delayed packet; size for a fast veth
_UNLIMITED_RATE_MBIT = 10_000.0
_NETEM_DEFAULT_LIMIT_PACKETS = 1000
_TBF_MAX_QUEUE_LATENCY_MS = 50.0


class LinkBackend(StrEnum):
    NETEM = "netem"
    TBF_USERSPACE = "tbf+userspace"
    USERSPACE = "userspace"
    BLACKHOLE = "blackhole"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run a command, never raising: a missing binary is a failed command like any other."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CommandResult(127, "", str(exc))
    return CommandResult(done.returncode, done.stdout, done.stderr)


# ------------------------------------------------------------------------------------- command builders


def netem_limit_packets(spec: LinkSpec, mtu_bytes: int = ETHERNET_MTU) -> int:
    """netem queue size: twice the bandwidth-delay product in packets, never below netem's default."""
    if spec.queue_limit_packets is not None:
        return spec.queue_limit_packets
    rate_bit_s = (spec.rate_mbit or _UNLIMITED_RATE_MBIT) * 1e6
    window_s = (spec.delay_ms + 3.0 * spec.jitter_ms) / 1000.0
    bdp_packets = rate_bit_s * window_s / (8.0 * mtu_bytes)
    return max(_NETEM_DEFAULT_LIMIT_PACKETS, math.ceil(2.0 * bdp_packets))


def _ms(value: float) -> str:
    return f"{value:g}ms"


def netem_argv(device: str, spec: LinkSpec) -> list[str]:
    argv = ["tc", "qdisc", "replace", "dev", device, "root", "netem", "delay", _ms(spec.delay_ms)]
    if spec.jitter_ms:
        argv += [_ms(spec.jitter_ms), "distribution", "normal"]
    if spec.loss_pct:
        argv += ["loss", f"{spec.loss_pct:g}%"]
    if spec.rate_mbit:
        argv += ["rate", f"{spec.rate_mbit:g}mbit"]
    return [*argv, "limit", str(netem_limit_packets(spec))]


def interface_mtu(device: str | None, sys_net: Path = Path("/sys/class/net")) -> int:
    """The MTU of the interface a link is shaped on (Ethernet's 1500 where there is none: userspace links)."""
    if device is None:
        return ETHERNET_MTU
    try:
        return int((sys_net / device / "mtu").read_text())
    except (OSError, ValueError):
        return ETHERNET_MTU


def tbf_burst_bytes(rate_mbit: float, mtu_bytes: int = ETHERNET_MTU) -> int:
    """Token bucket depth: what the rate delivers in 4 ms (a 250 Hz tick, below which tbf under-delivers),
    at least two frames. Kept that small because an idle link lets a whole bucket through at line speed:
    a larger one would let small requests on slow links skip the rate they should pay."""
    return max(2 * mtu_bytes, math.ceil(rate_mbit * 1e6 / 8.0 * 0.004))


def tbf_argv(device: str, rate_mbit: float) -> list[str]:
    return [
        "tc",
        "qdisc",
        "replace",
        "dev",
        device,
        "root",
        "tbf",
        "rate",
        f"{rate_mbit:g}mbit",
        "burst",
        str(tbf_burst_bytes(rate_mbit)),
        "latency",
        _ms(_TBF_MAX_QUEUE_LATENCY_MS),
    ]


def blackhole_argv(device: str) -> list[str]:
    """Drop everything sent on ``device``: ``sch_blackhole`` is built into every kernel with tc, netem or not."""
    return ["tc", "qdisc", "replace", "dev", device, "root", "blackhole"]


def clear_argv(device: str) -> list[str]:
    return ["tc", "qdisc", "del", "dev", device, "root"]


def route_argv(address: str) -> list[str]:
    return ["ip", "-o", "route", "get", address]


def parse_route_device(text: str) -> str | None:
    match = re.search(r"\bdev (\S+)", text)
    return match.group(1) if match else None


def tc_failure_kind(stderr: str) -> str:
    """Classify a failed ``tc``: ``no-qdisc`` (kernel lacks it), ``no-privilege`` or ``other``."""
    lowered = stderr.lower()
    if "qdisc kind is unknown" in lowered or "unknown qdisc" in lowered:
        return "no-qdisc"
    if "operation not permitted" in lowered or "permission denied" in lowered:
        return "no-privilege"
    return "other"


# ------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class LinkState:
    """How one link of this tier is emulated right now."""

    link: LinkName
    peer: TierName
    spec: LinkSpec
    backend: LinkBackend
    device: str | None = None
    note: str = ""
    userspace_delay: bool = False
    userspace_rate: bool = False

    @property
    def loss_emulated(self) -> bool:
        return self.backend in (LinkBackend.NETEM, LinkBackend.BLACKHOLE) or (
            self.backend is LinkBackend.USERSPACE and self.spec.is_cut
        )

    def describe(self) -> LinkStatus:
        return LinkStatus(
            link=self.link,
            peer=self.peer,
            backend=self.backend.value,
            device=self.device,
            note=self.note,
            **self.spec.model_dump(),
        )


@dataclass(frozen=True, slots=True)
class LinkTarget:
    link: LinkName
    peer: TierName
    peer_host: str
    spec: LinkSpec


def _resolve(host: str, timeout_s: float = 0.0) -> str | None:
    """The peer's address, waiting up to ``timeout_s`` for its name to appear: under Swarm a task's peers
    start after it, and a name resolves only once its task runs (compose creates every name at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(_RESOLVE_RETRY_S)


_RESOLVE_RETRY_S = 0.5


def _userspace(target: LinkTarget, note: str) -> LinkState:
    if target.spec.is_cut:
        note = f"{note}; cut: new requests held until their deadline"
    return LinkState(
        target.link,
        target.peer,
        target.spec,
        LinkBackend.USERSPACE,
        None,
        note,
        userspace_delay=True,
        userspace_rate=target.spec.rate_mbit is not None,
    )


def plan_link(
    target: LinkTarget, run: CommandRunner, devices_in_use: dict[str, LinkName], resolve_s: float = 0.0
) -> LinkState:
    """Shape one link with the best backend that works here, and say which."""
    spec = target.spec
    if not spec.is_shaped:
        return LinkState(target.link, target.peer, spec, LinkBackend.NONE)
    address = _resolve(target.peer_host, resolve_s)
    if address is None:
        return _userspace(target, f"cannot resolve {target.peer_host}; shaping in userspace")
    if ipaddress.ip_address(address).is_loopback:
        return _userspace(target, "peer is on loopback; shaping in userspace")
    route = run(route_argv(address))
    device = parse_route_device(route.stdout) if route.returncode == 0 else None
    if device is None:
        return _userspace(target, f"no route device towards {address}; shaping in userspace")
    if device in devices_in_use:
        return _userspace(target, f"{device} already shapes {devices_in_use[device]}; shaping in userspace")

    netem = run(netem_argv(device, spec))
    if netem.returncode == 0:
        devices_in_use[device] = target.link
        return LinkState(target.link, target.peer, spec, LinkBackend.NETEM, device)
    kind = tc_failure_kind(netem.stderr)
    if kind == "no-privilege":
        return _userspace(target, "no CAP_NET_ADMIN for tc; shaping in userspace")
    if kind != "no-qdisc":
        return _userspace(target, f"tc netem failed ({netem.stderr.strip()}); shaping in userspace")
    if spec.is_cut:
        blackhole = run(blackhole_argv(device))
        if blackhole.returncode == 0:
            devices_in_use[device] = target.link
            return LinkState(target.link, target.peer, spec, LinkBackend.BLACKHOLE, device, "cut: tc blackhole")
        return _userspace(target, f"kernel has no sch_netem and tc blackhole failed ({blackhole.stderr.strip()})")
    lost = "; loss not emulated" if spec.loss_pct else ""
    if spec.rate_mbit is None:
        return _userspace(target, f"kernel has no sch_netem; delay in userspace{lost}")
    tbf = run(tbf_argv(device, spec.rate_mbit))
    if tbf.returncode != 0:
        return _userspace(target, f"kernel has no sch_netem and tbf failed ({tbf.stderr.strip()}){lost}")
    devices_in_use[device] = target.link
    return LinkState(
        target.link,
        target.peer,
        spec,
        LinkBackend.TBF_USERSPACE,
        device,
        f"kernel has no sch_netem; rate by tbf, delay in userspace{lost}",
        userspace_delay=True,
    )


def plan_links(
    targets: Sequence[LinkTarget], run: CommandRunner = run_command, resolve_s: float = 0.0
) -> list[LinkState]:
    """Shape every link; a peer's name may take ``resolve_s`` to resolve (at start only: a re-shape finds
    the peers up)."""
    devices_in_use: dict[str, LinkName] = {}
    deadline = time.monotonic() + resolve_s  # one wait for every peer, not one each
    return [plan_link(t, run, devices_in_use, max(0.0, deadline - time.monotonic())) for t in targets]


def clear_links(states: Sequence[LinkState], run: CommandRunner = run_command) -> None:
    for state in states:
        if state.device is not None:
            run(clear_argv(state.device))


# ------------------------------------------------------------------------------- userspace emulation


@dataclass
class _Direction:
    busy_until_s: float = 0.0


@dataclass
class UserspaceLink:
    """Delay, jitter and (optionally) rate of one link, added by the tier that sends the request.

    Rate is serialisation delay through one FIFO bottleneck per direction: a message of ``n`` bytes
    occupies the link for ``8n / rate`` seconds after everything queued before it.
    """

    spec: LinkSpec
    emulate_delay: bool
    emulate_rate: bool
    rng: random.Random = field(default_factory=random.Random)
    _up: _Direction = field(default_factory=_Direction)
    _down: _Direction = field(default_factory=_Direction)

    @classmethod
    def for_state(cls, state: LinkState, seed: int | None = None) -> UserspaceLink | None:
        if not (state.userspace_delay or state.userspace_rate):
            return None
        return cls(state.spec, state.userspace_delay, state.userspace_rate, random.Random(seed))

    @property
    def cut(self) -> bool:
        return self.spec.is_cut

    def one_way_delay_s(self) -> float:
        if not self.emulate_delay:
            return 0.0
        delay_ms = self.spec.delay_ms
        if self.spec.jitter_ms:
            delay_ms = max(0.0, self.rng.gauss(delay_ms, self.spec.jitter_ms))
        return delay_ms / 1000.0

    def _deadline(self, direction: _Direction, size_bytes: int, now_s: float) -> float:
        arrival = now_s
        if self.emulate_rate and self.spec.rate_mbit:
            start = max(now_s, direction.busy_until_s)
            direction.busy_until_s = start + size_bytes * 8.0 / (self.spec.rate_mbit * 1e6)
            arrival = direction.busy_until_s
        return arrival + self.one_way_delay_s()

    async def send(self, size_bytes: int) -> None:
        """Hold a request of ``size_bytes`` as long as the link would before it reaches the peer; on a cut
        link, until the caller's deadline cancels it."""
        if self.cut:
            await asyncio.Event().wait()
        await sleep_until(self._deadline(self._up, size_bytes, time.perf_counter()))

    async def receive(self, size_bytes: int) -> None:
        """Hold a response of ``size_bytes`` as long as the link would on its way back."""
        await sleep_until(self._deadline(self._down, size_bytes, time.perf_counter()))
