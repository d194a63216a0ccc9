"""A tiny built-in origin server for the quickstart (answers every request with a greeting).

Not a web server: it exists so that ``ferryman run -c examples/quickstart.yaml`` has
something to proxy to on a fresh machine.
"""

from __future__ import annotations

import asyncio

import httptools
import uvloop

GREETING = b"hello from the ferryman demo origin\n"
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
    % (len(GREETING), GREETING)
)


class _DemoOrigin(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(_RESPONSE)
            if not self.parser.should_keep_alive():
                self.transport.close()


def serve_demo_origin(host: str, port: int) -> None:
    """Serve the greeting on ``host:port`` until the process is killed."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(loop.create_server(_DemoOrigin, host, port))
    loop.run_forever()
