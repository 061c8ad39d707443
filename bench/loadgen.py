"""Open-loop load at a fixed rate, latency corrected for coordinated omission.

Request i is due at start + i/rate whatever happened to the ones before it; its latency is
measured from that due time, so a stalled server is charged for every request it held up
(the correction wrk2 makes). Persistent HTTP/1.1 connections, asyncio, one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def _run(port: int, rate: float, seconds: float, connections: int,
               body_for: Callable[[int], bytes], path: str) -> dict[str, float]:
    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def connection() -> None:
        nonlocal next_index, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_index < total:
                index = next_index
                next_index += 1
                due = start + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = body_for(index)
                request = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-www-form-urlencoded"
                           f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
                try:
                    status = await _exchange(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status != 200:
                    errors += 1
                latencies.append(time.perf_counter() - due)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 2)

    return {"rate": rate, "sent": len(latencies), "errors": errors, "achieved_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": pct(100)}


def open_loop(port: int, rate: float, seconds: float, body_for: Callable[[int], bytes],
              path: str = "/api/v1/voice/webhook", connections: int = 64) -> dict[str, float]:
    return asyncio.run(_run(port, rate, seconds, connections, body_for, path))
