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
    except (TimeoutError, OSError):
        out.append(Outcome(at, 0))
        return
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 10)
    except (TimeoutError, OSError):
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


@dataclass
class Stream:
    """Requests to send: ``rate`` per second from ``source`` to ``port`` for ``path``."""

    label: str
    port: int
    source: str
    rate: float
    path: str = "/"


async def paced_streams(
    streams: list[Stream], duration: float, extra: str = "", host: str = "127.0.0.1"
) -> dict[str, list[Outcome]]:
    """Send each stream for ``duration`` seconds, evenly paced; the outcomes per label."""
    results: dict[str, list[Outcome]] = {s.label: [] for s in streams}
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()

    async def run(s: Stream) -> None:
        n = 0
        while True:
            at = n / s.rate
            if at >= duration:
                return
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(
                _one(host, s.port, s.source, s.path, time.monotonic() - start,
                     results[s.label], extra)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1

    await asyncio.gather(*(run(s) for s in streams))
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    return results


async def paced_load(
    host: str, port: int, streams: list[tuple[str, float, str]], duration: float,
    extra: str = "",
) -> dict[str, list[Outcome]]:
    """Send, for ``duration`` seconds, from each ``(source address, requests per second,
    path)`` of ``streams`` to ``port``, evenly paced; the outcomes per source address."""
    return await paced_streams(
        [Stream(source, port, source, rate, path) for source, rate, path in streams],
        duration, extra, host,
    )


def per_second(outcomes: list[Outcome], status: int, start: int, end: int) -> list[int]:
    """How many outcomes of ``status`` were sent in each whole second [start, end)."""
    counts = [0] * (end - start)
    for o in outcomes:
        second = int(o.at)
        if o.status == status and start <= second < end:
            counts[second - start] += 1
    return counts
