"""Hostile HTTP clients for ``benchmarks.hostile``: run in their own CPU-limited container on the device
network, as clients on other machines would be (``python attack.py --host mobile …``); standard library only,
so the tier image runs it as it is. Four kinds, a quarter each, each reconnecting as soon as it is dropped:
heads that promise a binary tensor and send nothing, bodies sent one byte a second, clients that pipeline
requests and never read an answer, and 64 MiB JSON tensors sent as fast as the socket takes them. Prints
what each kind was answered, as one JSON line, when its time is up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys

MIB = 1 << 20
_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info
KINDS = ("head-only", "byte-a-second", "never-reads", "json-64mib")


class Hostile:
    """``count`` hostile connections of the four kinds against ``host:port`` until stopped; counts what
    each kind was answered."""

    def __init__(
        self, host: str, port: int, path: str, count: int, *, header_bytes: int, kinds: tuple[str, ...] = KINDS
    ) -> None:
        self.host, self.port, self.path, self.count, self.kinds = host, port, path, count, kinds
        self.header_bytes = header_bytes  # a binary request's JSON header length: its body is not JSON
        self.answers: dict[str, dict[str, int]] = {k: {} for k in kinds}
        self.stopping = asyncio.Event()

    def _note(self, kind: str, what: str) -> None:
        self.answers[kind][what] = self.answers[kind].get(what, 0) + 1

    async def _status(self, reader: asyncio.StreamReader) -> str:
        """The status code the tier answered, or how the connection ended without one."""
        try:
            line = await reader.readline()
        except OSError as exc:
            return type(exc).__name__
        return line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "closed"

    def _head(self, length: int, json_body: bool = False) -> bytes:
        """A request head promising ``length`` bytes: a binary tensor request (within the JSON cap, so the
        tier waits for its body), or all JSON."""
        framing = (
            "content-type: application/json" if json_body else f"inference-header-content-length: {self.header_bytes}"
        )
        return (f"POST {self.path} HTTP/1.1\r\nhost: mobile\r\n{framing}\r\n"
                f"content-length: {length}\r\n\r\n").encode()  # fmt: skip

    async def _one(self, kind: str) -> None:
        while not self.stopping.is_set():
            if kind == "never-reads":
                await self._never_reads()
                continue
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self._note(kind, "connect failed")
                await asyncio.sleep(0.5)
                continue
            try:
                await self._behave(kind, reader, writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self._note(kind, type(exc).__name__)
                await asyncio.sleep(0.1)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _never_reads(self) -> None:
        """Pipelines requests on a raw socket and never reads an answer; waits for the tier to drop it."""
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (self.host, self.port))
                await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nhost: mobile\r\n\r\n" * 200)
            except OSError:
                self._note("never-reads", "connect failed")
                await asyncio.sleep(0.5)
                return
            while not self.stopping.is_set() and not _peer_closed(sock):
                await asyncio.sleep(0.5)
            if not self.stopping.is_set():
                self._note("never-reads", "dropped by the tier")

    async def _behave(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if kind == "head-only":
            writer.write(self._head(16 * MIB))
            self._note(kind, await self._status(reader))
        elif kind == "byte-a-second":
            writer.write(self._head(MIB))
            answer = asyncio.ensure_future(self._status(reader))
            while not answer.done() and not self.stopping.is_set():
                writer.write(b"{")
                await asyncio.wait([answer], timeout=1.0)
            self._note(kind, answer.result() if answer.done() else "stopped")
            answer.cancel()
        else:  # json-64mib
            writer.write(self._head(64 * MIB, json_body=True))
            answer = asyncio.ensure_future(self._status(reader))
            chunk = b"[" + b"0.0," * (MIB // 4)
            for _ in range(64):
                if answer.done() or self.stopping.is_set():
                    break
                writer.write(chunk)
                await writer.drain()
            self._note(kind, await asyncio.wait_for(answer, 30))

    async def run(self, duration_s: float) -> None:
        tasks = [asyncio.ensure_future(self._one(self.kinds[i % len(self.kinds)])) for i in range(self.count)]
        await asyncio.sleep(duration_s)
        self.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has dropped a socket we never read from: its TCP state is no longer ESTABLISHED
    (a reset or a FIN; unread bytes would hide either from a peek)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="mobile")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--path", required=True, help="the infer route: /v2/models/<model>/infer")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--header-bytes", type=int, default=200, help="the binary requests' JSON header length")
    parser.add_argument("--kinds", default=",".join(KINDS), help="the kinds to run, comma-separated, shared evenly")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes some of {', '.join(KINDS)}")
    hostile = Hostile(args.host, args.port, args.path, args.count, header_bytes=args.header_bytes, kinds=kinds)
    asyncio.run(hostile.run(args.duration_s))
    print(json.dumps(hostile.answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
