"""Sleeping until a moment, sub-millisecond precise: what userspace links and the load schedule both need.

The event loop's timers overshoot by a few hundred microseconds (epoll has 1 ms resolution), so sleep
coarsely to just before the deadline, then yield to the loop until it passes: other tasks still run.
"""

from __future__ import annotations

import asyncio
import time

# below this the loop's timer cannot be trusted; yield the rest
SPIN_WINDOW_S = 0.0015


async def sleep_until(deadline_s: float) -> None:
    """Sleep until ``time.perf_counter() >= deadline_s``."""
    remaining = deadline_s - time.perf_counter()
    if remaining > SPIN_WINDOW_S:
        await asyncio.sleep(remaining - SPIN_WINDOW_S)
    while time.perf_counter() < deadline_s:
        await asyncio.sleep(0)
