"""Which HTTP client should a tier forward with? Measured side by side against one null tier.

Each client posts the same V2 binary body (4 KB, 200 KB, 1 MB) to the null tier under uvicorn, kept
alive, one request at a time, on the same uvloop event loop a tier runs: the tier's own forwarder
(asyncio protocol over httptools), aiohttp and httpx. ``python -m benchmarks.forwarding``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import numpy as np
import uvloop

from benchmarks.overhead import RELAY_SIZES_BYTES, null_tier
from services.contracts import codec
from services.contracts.transport import Pool
from services.local import free_ports

Post = Callable[[codec.Encoded], Awaitable[bytes]]


async def _time(post: Post, encoded: codec.Encoded, requests: int) -> float:
    for _ in range(requests // 10):
        await post(encoded)
    times = []
    for _ in range(requests):
        started = time.perf_counter_ns()
        await post(encoded)
        times.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(times)


async def measure(url: str, requests: int) -> dict[str, dict[str, float]]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    pool = Pool(host, int(port))

    async def tierlab(encoded: codec.Encoded) -> bytes:
        return (await pool.post("/", encoded.http_headers(), encoded.chunks, encoded.size_bytes)).body

    results: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as session, httpx.AsyncClient() as client:

        async def with_aiohttp(encoded: codec.Encoded) -> bytes:
            async with session.post(url, data=encoded.body(), headers=encoded.http_headers()) as reply:
                return await reply.read()

        async def with_httpx(encoded: codec.Encoded) -> bytes:
            return (await client.post(url, content=encoded.body(), headers=encoded.http_headers())).content

        for label, size in RELAY_SIZES_BYTES.items():
            encoded = codec.encode_request({"x": np.zeros(size // 4, np.float32)})
            results[label] = {
                name: await _time(post, encoded, requests)
                for name, post in (("tierlab", tierlab), ("aiohttp", with_aiohttp), ("httpx", with_httpx))
            }
    pool.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    with null_tier(free_ports(1)[0]) as url:
        results = uvloop.run(measure(url, args.requests))
    print("round trip to a null tier, p50 ms (lower is better)")
    print(f"{'body':>6} {'tierlab':>9} {'aiohttp':>9} {'httpx':>9}")
    for label, row in results.items():
        print(f"{label:>6} {row['tierlab']:9.3f} {row['aiohttp']:9.3f} {row['httpx']:9.3f}")
    print(json.dumps({"forward_ms_p50": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
