"""Tiny scripted HTTP/TCP servers on 127.0.0.1 for health-check and monitor tests (asyncio).

Each server runs in the test's event loop. A :class:`ScriptedServer` reads one request head
per connection, records it, then plays a script: a list of byte strings to write (with a
drain after each), optionally followed by hanging (keeping the connection open without
writing more) or closing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence


def free_port() -> int:
    """A port nothing listens on right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ScriptedServer:
    """Answers every connection with ``parts`` (after reading the request head).

    Args:
        parts: byte strings written in order.
        read_request: read the request head before answering (else answer at once).
        hang: after writing, keep the connection open until the server stops.
        close_only: read the request, then close without writing anything.
    """

    def __init__(
        self,
        parts: Sequence[bytes] = (),
        *,
        read_request: bool = True,
        hang: bool = False,
        close_only: bool = False,
    ) -> None:
        self.parts = list(parts)
        self.read_request = read_request
        self.hang = hang
        self.close_only = close_only
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._stop = asyncio.Event()

    async def start(self, port: int = 0) -> ScriptedServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.read_request:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
            if self.close_only:
                return
            for part in self.parts:
                writer.write(part)
                await writer.drain()
            if self.hang:
                await self._stop.wait()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def response(status: int = 200, body: bytes = b"", headers: str = "") -> bytes:
    """A Content-Length framed HTTP/1.1 response."""
    return (
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body
    )
