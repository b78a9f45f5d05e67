"""Link emulation: tc argv builders, backend choice and fallbacks, userspace link arithmetic."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from services.contracts.specs import LinkSpec
from services.tier.links import (
    CommandResult,
    LinkBackend,
    LinkTarget,
    UserspaceLink,
    clear_argv,
    netem_argv,
    netem_limit_packets,
    parse_route_device,
    plan_links,
    route_argv,
    tbf_argv,
    tbf_burst_bytes,
    tc_failure_kind,
)


def test_netem_argv_carries_every_condition() -> None:
    spec = LinkSpec(delay_ms=20, jitter_ms=5, loss_pct=0.5, rate_mbit=100)
    assert netem_argv("eth1", spec) == [
        "tc",
        "qdisc",
        "replace",
        "dev",
        "eth1",
        "root",
        "netem",
        "delay",
        "20ms",
        "5ms",
        "distribution",
        "normal",
        "loss",
        "0.5%",
        "rate",
        "100mbit",
        "limit",
        str(netem_limit_packets(spec)),
    ]


def test_netem_argv_omits_what_is_not_set() -> None:
    argv = netem_argv("eth0", LinkSpec(delay_ms=1.5))
    assert argv[:9] == ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "1.5ms"]
    assert "loss" not in argv and "rate" not in argv and "distribution" not in argv


def test_netem_limit_is_sized_to_the_bandwidth_delay_product() -> None:
    # 1 Gbit/s × 100 ms = 12.5 MB ≈ 8334 frames of 1500 B; twice that
    assert netem_limit_packets(LinkSpec(delay_ms=100, rate_mbit=1000)) == 16667
    assert netem_limit_packets(LinkSpec(delay_ms=1, rate_mbit=10)) == 1000  # never below netem's default
    assert netem_limit_packets(LinkSpec(delay_ms=100, rate_mbit=1000, queue_limit_packets=50)) == 50
    assert netem_limit_packets(LinkSpec(delay_ms=100)) > netem_limit_packets(LinkSpec(delay_ms=100, rate_mbit=100))


def test_tbf_argv_and_burst() -> None:
    assert tbf_burst_bytes(1) == 3000  # two frames at least: an idle slow link must still cost small messages
    assert tbf_burst_bytes(1000) == 500000  # 4 ms at 1 Gbit/s
    assert tbf_argv("veth0", 50) == [
        "tc",
        "qdisc",
        "replace",
        "dev",
        "veth0",
        "root",
        "tbf",
        "rate",
        "50mbit",
        "burst",
        str(tbf_burst_bytes(50)),
        "latency",
        "50ms",
    ]
    assert clear_argv("veth0") == ["tc", "qdisc", "del", "dev", "veth0", "root"]


def test_route_parsing() -> None:
    assert route_argv("10.0.0.2") == ["ip", "-o", "route", "get", "10.0.0.2"]
    assert parse_route_device("10.0.0.2 dev eth1 src 10.0.0.1 uid 0 \\    cache") == "eth1"
    assert parse_route_device("garbage") is None


@pytest.mark.parametrize(
    ("stderr", "kind"),
    [
        ("Error: Specified qdisc kind is unknown.", "no-qdisc"),
        ("RTNETLINK answers: Operation not permitted", "no-privilege"),
        ("Cannot find device", "other"),
    ],
)
def test_tc_failures_are_classified(stderr: str, kind: str) -> None:
    assert tc_failure_kind(stderr) == kind


class FakeShell:
    """Answers ``ip route`` with a device per address and ``tc`` as a given kernel would."""

    def __init__(self, tc: dict[str, CommandResult]) -> None:
        self.tc = tc
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        if argv[0] == "ip":
            return CommandResult(0, f"{argv[-1]} dev eth-{argv[-1].rsplit('.', 1)[1]} src 10.0.0.1", "")
        return self.tc.get(argv[6], CommandResult(0, "", ""))


OK = CommandResult(0, "", "")
NO_NETEM = CommandResult(2, "", "Error: Specified qdisc kind is unknown.")
NO_PRIVILEGE = CommandResult(2, "", "RTNETLINK answers: Operation not permitted")
SPEC = LinkSpec(delay_ms=10, jitter_ms=1, rate_mbit=20, loss_pct=1)


def target(host: str = "10.0.0.2", spec: LinkSpec = SPEC) -> LinkTarget:
    return LinkTarget("edge-cloud", "cloud", host, spec)


def test_netem_when_the_kernel_has_it() -> None:
    shell = FakeShell({"netem": OK})
    (state,) = plan_links([target()], shell)
    assert state.backend is LinkBackend.NETEM and state.device == "eth-2"
    assert state.loss_emulated and not state.userspace_delay
    assert shell.calls[-1][:7] == ["tc", "qdisc", "replace", "dev", "eth-2", "root", "netem"]


def test_no_netem_falls_back_to_tbf_rate_and_userspace_delay() -> None:
    shell = FakeShell({"netem": NO_NETEM, "tbf": OK})
    (state,) = plan_links([target()], shell)
    assert state.backend is LinkBackend.TBF_USERSPACE
    assert state.userspace_delay and not state.userspace_rate
    assert "no sch_netem" in state.note and "loss not emulated" in state.note
    assert shell.calls[-1][6] == "tbf"


def test_no_netem_and_no_rate_is_userspace_delay_only() -> None:
    (state,) = plan_links([target(spec=LinkSpec(delay_ms=5))], FakeShell({"netem": NO_NETEM}))
    assert state.backend is LinkBackend.USERSPACE and state.userspace_delay and not state.userspace_rate


def test_no_privilege_shapes_in_userspace_and_says_so() -> None:
    (state,) = plan_links([target()], FakeShell({"netem": NO_PRIVILEGE}))
    assert state.backend is LinkBackend.USERSPACE
    assert state.userspace_delay and state.userspace_rate
    assert "CAP_NET_ADMIN" in state.note


def test_loopback_peers_and_unshaped_links() -> None:
    shell = FakeShell({})
    loop, unshaped = plan_links([target("127.0.0.1"), target(spec=LinkSpec())], shell)
    assert loop.backend is LinkBackend.USERSPACE and "loopback" in loop.note
    assert unshaped.backend is LinkBackend.NONE
    assert shell.calls == []  # neither touched tc


def test_a_device_is_shaped_for_one_link_only() -> None:
    shell = FakeShell({"netem": OK})
    first, second = plan_links([target(), LinkTarget("mobile-cloud", "mobile", "10.0.0.2", SPEC)], shell)
    assert first.backend is LinkBackend.NETEM
    assert second.backend is LinkBackend.USERSPACE and "already shapes edge-cloud" in second.note


def test_userspace_rate_is_a_fifo_bottleneck() -> None:
    link = UserspaceLink(LinkSpec(delay_ms=10, rate_mbit=8), emulate_delay=True, emulate_rate=True)
    # 8 Mbit/s moves 1 MB in 1 s; a second message queues behind the first
    assert link._deadline(link._up, 1_000_000, now_s=100.0) == pytest.approx(101.010)
    assert link._deadline(link._up, 1_000_000, now_s=100.5) == pytest.approx(102.010)
    # the other direction has its own queue; an idle link starts at once
    assert link._deadline(link._down, 1000, now_s=100.0) == pytest.approx(100.011)
    assert link._deadline(link._up, 1000, now_s=200.0) == pytest.approx(200.011)


def test_userspace_jitter_is_seeded_and_never_negative() -> None:
    spec = LinkSpec(delay_ms=1, jitter_ms=5)
    a = UserspaceLink(spec, True, False, random.Random(1))
    b = UserspaceLink(spec, True, False, random.Random(1))
    delays = [a.one_way_delay_s() for _ in range(200)]
    assert delays == [b.one_way_delay_s() for _ in range(200)]
    assert min(delays) == 0.0 < max(delays)


CUT = LinkSpec(delay_ms=10, rate_mbit=20, loss_pct=100)


def test_a_cut_link_without_netem_is_a_kernel_blackhole() -> None:
    shell = FakeShell({"netem": NO_NETEM, "blackhole": OK})
    (state,) = plan_links([target(spec=CUT)], shell)
    assert state.backend is LinkBackend.BLACKHOLE and state.device == "eth-2" and state.loss_emulated
    assert shell.calls[-1] == ["tc", "qdisc", "replace", "dev", "eth-2", "root", "blackhole"]
    assert UserspaceLink.for_state(state) is None  # the kernel drops it all: nothing to hold in userspace


def test_a_cut_link_with_netem_is_netem_at_100_percent_loss() -> None:
    shell = FakeShell({"netem": OK})
    (state,) = plan_links([target(spec=CUT)], shell)
    assert state.backend is LinkBackend.NETEM and "100%" in shell.calls[-1]


def test_a_cut_link_in_userspace_holds_requests_until_their_deadline() -> None:
    (state,) = plan_links([target("127.0.0.1", spec=CUT)], FakeShell({}))
    assert state.backend is LinkBackend.USERSPACE and state.loss_emulated and "cut" in state.note
    link = UserspaceLink.for_state(state)
    assert link is not None and link.cut

    async def send() -> None:
        await asyncio.wait_for(link.send(100), timeout=0.2)

    with pytest.raises(TimeoutError):
        asyncio.run(send())
    # restored (any loss below 100 %): the same request goes through after its delay
    uncut = UserspaceLink(LinkSpec(delay_ms=1), emulate_delay=True, emulate_rate=False)
    asyncio.run(asyncio.wait_for(uncut.send(100), timeout=1.0))
