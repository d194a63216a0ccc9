"""Paced HTTP/1.1 load from a chosen source address, for the limit tests: one new
connection per request (so the kernel spreads them over the workers), bounded in time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """One request: when it was sent (seconds from the start), its status and headers."""

    at: float
    status: int
    headers: dict[str, str] = field(default_factory=dict)


async def _one(
    host: str, port: int, source: str, path: str, at: float, out: list[Outcome],
    extra: str = "",
) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0)), 5
        )
    except (OSError, asyncio.TimeoutError):
        out.append(Outcome(at, 0))
        return
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 10)
    except (OSError, asyncio.TimeoutError):
        out.append(Outcome(at, 0))
        return
    finally:
        writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split()[1])
    except (IndexError, ValueError):
        out.append(Outcome(at, 0))
        return
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    out.append(Outcome(at, status, headers))


async def paced_load(
    host: str, port: int, streams: list[tuple[str, float, str]], duration: float,
    extra: str = "",
) -> dict[str, list[Outcome]]:
    """Send, for ``duration`` seconds, from each ``(source address, requests per second,
    path)`` of ``streams``, evenly paced; returns the outcomes per source address."""
    results: dict[str, list[Outcome]] = {source: [] for source, _, _ in streams}
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()

    async def stream(source: str, rate: float, path: str) -> None:
        n = 0
        while True:
            at = n / rate
            if at >= duration:
                return
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(
                _one(host, port, source, path, time.monotonic() - start, results[source], extra)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1

    await asyncio.gather(*(stream(*s) for s in streams))
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    return results


def per_second(outcomes: list[Outcome], status: int, start: int, end: int) -> list[int]:
    """How many outcomes of ``status`` were sent in each whole second [start, end)."""
    counts = [0] * (end - start)
    for o in outcomes:
        second = int(o.at)
        if o.status == status and start <= second < end:
            counts[second - start] += 1
    return counts
