"""Measure a link the way requests cross it: round trips and bulk transfers to the peer's sink.

The probe goes through the tier's forwarder, so whatever emulates the link (netem, tbf, userspace delay)
acts on it exactly as on a forwarded tensor; the numbers are measured, never read back from the config.
RTT is the round trip of an empty body, taken in rounds spaced apart; its p50 is the median of the
rounds' medians, so a burst of scheduling noise on a busy machine (which delays a run of consecutive
pings, not scattered ones) spoils one round and not the estimate. Where userspace adds the delay, each
ping is followed by one that leaves it out: the round trip of the path itself (network, both servers),
which a link adds its delay to. The emulation is judged on the difference, so a path that is slow for
reasons of its own (a Swarm overlay: 1.1 ms measured) is reported, not taken for a wrong delay.

Goodput is the slope between a bulk transfer and one a quarter its size — (¾ · bytes · 8) /
(t_full − t_quarter), each the best of a few — so the RTT, TCP slow start and a token bucket's initial
burst (which both transfers get) cancel out instead of inflating it; after one discarded transfer that
lets TCP settle to the link.
"""

from __future__ import annotations

import asyncio
import statistics

from services.contracts.errors import BadParameter, NextTierError
from services.contracts.specs import LinkMeasurementSpec, LinkProbeSpec, TierName
from services.contracts.transport import control_headers
from services.tier.forwarder import Forwarder
from services.tier.links import LinkState, interface_mtu

SINK_PATH = "/tierlab/sink"
_NS_PER_MS = 1e6
# sizes for an unlimited link: large enough to be bandwidth-bound on a veth, small enough to be quick
_UNLIMITED_BULK_BYTES = 32 << 20
_MIN_BULK_BYTES = 128 << 10  # a quarter of it still exceeds tbf's burst at 1 Mbit/s
_MAX_BULK_BYTES = 64 << 20  # one probe call moves at most bulk_repeats × 1.25 × this
_CHUNK_BYTES = 1 << 20
_ROUND_GAP_S = 0.05  # longer than a scheduler time slice: rounds see independent noise
_MIN_PINGS_PER_ROUND = 4


def bulk_size_bytes(state: LinkState, bulk_s: float) -> int:
    """What the configured rate moves in ``bulk_s`` seconds (unlimited links get a fixed large body)."""
    if state.spec.rate_mbit is None:
        return _UNLIMITED_BULK_BYTES
    return min(_MAX_BULK_BYTES, max(_MIN_BULK_BYTES, int(state.spec.rate_mbit * 1e6 / 8 * bulk_s)))


async def _send(forwarder: Forwarder, peer: TierName, size_bytes: int, *, emulate_link: bool = True) -> float:
    """One POST of ``size_bytes`` to the peer's sink; elapsed milliseconds."""
    full, rest = divmod(size_bytes, _CHUNK_BYTES)
    block = bytes(_CHUNK_BYTES) if full else b""
    chunks = [memoryview(block)] * full + ([memoryview(bytes(rest))] if rest else [])
    headers = {"Content-Type": "application/octet-stream", **control_headers()}
    reply, elapsed_ns = await forwarder.exchange(
        peer, SINK_PATH, headers, chunks, size_bytes, emulate_link=emulate_link
    )
    if reply.status != 200:
        raise NextTierError(f"probe to {peer}'s sink answered {reply.status}")
    return elapsed_ns / _NS_PER_MS


async def probe_link(forwarder: Forwarder, states: list[LinkState], probe: LinkProbeSpec) -> LinkMeasurementSpec:
    state = next((s for s in states if s.peer == probe.peer), None)
    if state is None:
        raise BadParameter(f"no link towards {probe.peer} from this tier")
    await _send(forwarder, probe.peer, 0)  # open the connection outside the measurement
    pings = max(probe.pings, state.spec.pings_for_p50())  # a jittered link needs more for a steady p50
    rounds = max(1, min(probe.rounds, pings // _MIN_PINGS_PER_ROUND))
    measure_path = state.userspace_delay  # a kernel's delay (netem) cannot be left out of a ping
    round_medians, path_medians, rtts = [], [], []
    for k in range(rounds):
        if k:
            await asyncio.sleep(_ROUND_GAP_S)
            await _send(forwarder, probe.peer, 0)  # the first exchange after a pause wakes what slept
        size = pings // rounds + (1 if k < pings % rounds else 0)
        block, path = [], []
        for _ in range(size):
            block.append(await _send(forwarder, probe.peer, 0))
            if measure_path:
                path.append(await _send(forwarder, probe.peer, 0, emulate_link=False))
        round_medians.append(statistics.median(block))
        if path:
            path_medians.append(statistics.median(path))
        rtts += block
    rtts.sort()
    bulk = bulk_size_bytes(state, probe.bulk_s)
    goodput: float | None = None
    if probe.bulk_repeats:
        # a discarded transfer first, then quarter and full in turns, the best of four each: a transfer into
        # tbf's queue behind userspace delay sometimes stalls ~130 ms in TCP loss recovery (measured on 4g:
        # quarters 105-150 ms, stalled ones 215-285 ms; two quarters back to back stalled half the time), and
        # a stalled quarter reads as up to twice the rate (21 Mbit/s measured on a 10 Mbit/s link)
        quarter = bulk // 4
        await _send(forwarder, probe.peer, bulk)
        quarters, fulls = [], []
        for _ in range(probe.bulk_repeats):
            quarters.append(await _send(forwarder, probe.peer, quarter))
            fulls.append(await _send(forwarder, probe.peer, bulk))
        quarter_ms, full_ms = min(quarters), min(fulls)
        transfer_ms = max(full_ms - quarter_ms, 1e-3)
        goodput = round((bulk - quarter) * 8 / (transfer_ms / 1e3) / 1e6, 3)
    deciles = statistics.quantiles(rtts, n=10) if len(rtts) > 1 else [rtts[0]] * 9
    return LinkMeasurementSpec(
        link=state.link,
        sender=forwarder.tier,
        backend=state.backend.value,
        configured=state.spec,
        rtt_ms_min=round(rtts[0], 3),
        rtt_ms_p50=round(statistics.median(round_medians), 3),
        rtt_ms_p90=round(deciles[8], 3),
        path_rtt_ms_p50=round(statistics.median(path_medians), 3) if path_medians else None,
        bulk_bytes=bulk,
        goodput_mbit=goodput,
        mtu_bytes=interface_mtu(state.device),
    )
