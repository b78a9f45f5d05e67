"""The traffic pattern, apart from the system under test (MLPerf LoadGen's split): when each request is
due, how many are in flight, and when to stop. Coordinated-omission safe: every request carries its
*intended* send time and latency is measured from it, so a stalled server or a late client shows up
as latency, and the schedule lag (actual − intended start) is recorded beside it.

- ``single-stream``: one at a time; the next is due when the previous answers (closed loop).
- ``offline``: ``concurrency`` closed loops at once (maximum throughput).
- ``server``: Poisson arrivals at ``rate_rps`` (open loop: due times never wait for answers).
- ``burst``: ``burst_size`` requests due at once every ``burst_interval_s`` (open loop).

The clock is injected (``Clock``), so tests drive the whole engine in virtual time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from loadgen.convergence import convergence
from loadgen.spec import ScenarioSpec, StoppingSpec
from services.contracts.clock import sleep_until

_NS = 1_000_000_000
# an open-loop request's task starts this long before it is due and waits out the rest precisely: measured at
# 100 req/s on this machine, starting a task at the due time itself put 60 µs of schedule lag on every request.
# The lead is longer than the clock's spin window plus a timer's overshoot, which the coarse wait for it has.
OPEN_LOOP_LEAD_NS = 4_000_000


class Clock(Protocol):
    def now_ns(self) -> int: ...

    async def sleep_until_ns(self, deadline_ns: int, *, precise: bool = True) -> None: ...


class RealClock:
    def now_ns(self) -> int:
        return time.perf_counter_ns()

    async def sleep_until_ns(self, deadline_ns: int, *, precise: bool = True) -> None:
        """Until ``deadline_ns``: to the microsecond (spinning its last stretch), or as the loop's timer
        wakes (``precise=False``: may overshoot by a millisecond or two, costs no CPU)."""
        if precise:
            await sleep_until(deadline_ns / _NS)
        else:
            await asyncio.sleep(max(0.0, (deadline_ns - time.perf_counter_ns()) / _NS))


@dataclass(frozen=True, slots=True)
class Issue:
    """One request the schedule asks for: its sequence number, when it is due, and what ``prepare`` made of
    it before then (None without a ``prepare``)."""

    seq: int
    intended_ns: int
    prepared: Any = None


@dataclass(frozen=True, slots=True)
class Done:
    """A request's end (ns) and its latency mode: the stage that answered (None when it failed)."""

    ended_ns: int
    mode: int | None = None


# the system under test: sends request ``Issue`` and returns when the answer is in
Send = Callable[[Issue, int], Awaitable[Done]]
# the loadgen's own work on request ``seq`` (choose its sample, encode it): done before the request is due,
# so the measured latency holds only what sending costs
Prepare = Callable[[int], Any]


def open_loop_offsets_ns(scenario: ScenarioSpec, rng: np.random.Generator) -> Iterator[int]:
    """Due times, relative to the run's start, of an open-loop scenario (never waits for answers)."""
    if scenario.kind == "server":
        assert scenario.rate_rps is not None
        t = 0.0
        while True:
            t += rng.exponential(1.0 / scenario.rate_rps)
            yield int(t * _NS)
    elif scenario.kind == "burst":
        k = 0
        while True:
            for _ in range(scenario.burst_size):
                yield int(k * scenario.burst_interval_s * _NS)
            k += 1
    else:
        raise ValueError(f"{scenario.kind} is a closed-loop scenario")


@dataclass
class StopRule:
    """Decides after each answer whether the run has enough (see ``StoppingSpec``; ``loadgen.convergence``
    says when a latency distribution is narrow enough, for one latency mode or several)."""

    spec: StoppingSpec
    started_ns: int
    until_s: float | None = None  # a fault scenario's run: exactly this long, whatever the samples say
    latencies_ms: list[float] = field(default_factory=list)
    modes: list[int] = field(default_factory=list)
    reason: str = ""
    _next_check: int = 0

    def add(self, latency_ms: float, mode: int | None = None) -> None:
        """One answer's latency and its mode (the stage that answered; None for a failed request)."""
        self.latencies_ms.append(latency_ms)
        self.modes.append(-1 if mode is None else mode)

    def done(self, now_ns: int) -> bool:
        n = len(self.latencies_ms)
        if self.until_s is not None:
            if (now_ns - self.started_ns) / _NS >= self.until_s:
                self.reason = f"fault timeline ({self.until_s:g} s)"
        elif n >= self.spec.max_samples:
            self.reason = f"max_samples ({self.spec.max_samples})"
        elif (now_ns - self.started_ns) / _NS >= self.spec.max_duration_s and n >= min(self.spec.min_samples, 10):
            self.reason = f"max_duration_s ({self.spec.max_duration_s:g} s)"
        elif n >= max(self.spec.min_samples, self._next_check):
            self._next_check = n + self.spec.check_every
            judged = convergence(np.asarray(self.latencies_ms), np.asarray(self.modes), self.spec.ci_rel_width,
                                 resamples=200, seed=n)  # fmt: skip
            if judged.met:
                self.reason = judged.stop_reason()
        return bool(self.reason)


async def drive(
    scenario: ScenarioSpec,
    send: Send,
    stop: StopRule,
    clock: Clock,
    *,
    seed: int = 0,
    max_inflight: int = 512,
    prepare: Prepare | None = None,
) -> int:
    """Run the scenario until ``stop`` says enough; returns how many requests were issued.

    ``send(issue, started_ns)`` is called with the intended time in ``issue`` and the actual start; it
    returns the end time and the answer's latency mode. Open-loop requests beyond ``max_inflight`` wait for a
    slot, and the wait is latency (it counts from the intended time), never dropped. ``prepare(seq)``, when
    given, runs before a request's intended time (open loop: before the wait for it; closed loop: before it is
    stamped due).
    """

    def ready(seq: int) -> Any:
        return prepare(seq) if prepare is not None else None

    start_ns = clock.now_ns()
    issued = 0

    async def one(issue: Issue) -> None:
        started = clock.now_ns()
        done = await send(issue, started)
        stop.add((done.ended_ns - issue.intended_ns) / 1e6, done.mode)

    if scenario.kind in ("single-stream", "offline"):
        workers = 1 if scenario.kind == "single-stream" else scenario.concurrency

        async def loop() -> None:
            nonlocal issued
            while not stop.done(clock.now_ns()):
                seq = issued
                issued += 1
                prepared = ready(seq)
                issue = Issue(seq, clock.now_ns(), prepared)
                await one(issue)

        await asyncio.gather(*(loop() for _ in range(workers)))
        return issued

    slots = asyncio.Semaphore(max_inflight)
    pending: set[asyncio.Task[None]] = set()

    async def held(issue: Issue) -> None:
        async with slots:
            # the request's own task waits out the last stretch: its start follows the due time at once
            await clock.sleep_until_ns(issue.intended_ns)
            await one(issue)

    for offset in open_loop_offsets_ns(scenario, np.random.default_rng(seed)):
        due = start_ns + offset
        issue = Issue(issued, due, ready(issued))
        await clock.sleep_until_ns(due - OPEN_LOOP_LEAD_NS, precise=False)
        if stop.done(clock.now_ns()):
            break
        task = asyncio.create_task(held(issue))
        issued += 1
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return issued
