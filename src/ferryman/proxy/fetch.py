"""UpstreamFetch: a request the proxy makes for itself, with no client waiting on it.

A cache refreshing a stale entry in the background (``stale-while-revalidate``) sends a
conditional GET upstream after its client was answered. :class:`UpstreamFetch` is the
upstream connection's sink for such an exchange: it keeps the response head for a
coroutine to await and hands each body chunk to a callback (a cache writer), then gives
the connection back to the pool. Compiled with the connection classes (their sink is a
mypyc trait, which interpreted classes cannot implement).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from ferryman.errors import ProxyError
from ferryman.upstream.connection import UpstreamSink

if TYPE_CHECKING:
    from ferryman.protocols.headers import Headers, ResponseHeader
    from ferryman.upstream.connection import UpstreamChannel


class UpstreamFetch(UpstreamSink):
    """Receives one upstream response for the proxy itself.

    Use: ``fetch = UpstreamFetch(loop)``, ``up.start(fetch, b"GET", timeout)``, send the
    request, ``await fetch.head()``; set :attr:`on_body` (and :attr:`on_end`) to take
    the body, or call :meth:`discard`; ``await fetch.done()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, up: UpstreamChannel) -> None:
        """A fetch over ``up`` (already started with this sink)."""
        self._up: UpstreamChannel | None = up
        self._head_future: asyncio.Future[ResponseHeader] = loop.create_future()
        self._end_future: asyncio.Future[None] = loop.create_future()
        #: Called with each body chunk (until then, chunks are kept).
        self.on_body: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.ended = False

    async def head(self) -> ResponseHeader:
        """The response head; raises the exchange's :class:`ProxyError`."""
        return await self._head_future

    async def done(self) -> None:
        """Wait for the end of the body; raises the exchange's :class:`ProxyError`."""
        await self._end_future

    def take_body(self, on_body: Callable[[bytes], None]) -> None:
        """Send the body to ``on_body`` from now on (what arrived already first)."""
        early, self._early = self._early, []
        for piece in early:
            on_body(piece)
        self.on_body = on_body

    def discard(self) -> None:
        """The body is not wanted: drop the exchange (the connection is not reused)."""
        up = self._up
        self._up = None
        if up is not None and not self.ended:
            up.abort()
        self._early = []
        if not self._end_future.done():
            self._end_future.set_result(None)

    # UpstreamSink ------------------------------------------------------------------------

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        if not self._head_future.done():
            self._head_future.set_result(head)

    def on_response_body(self, data: bytes) -> None:
        on_body = self.on_body
        if on_body is not None:
            on_body(data)
        elif self._up is not None:
            self._early.append(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        self.ended = True
        up = self._up
        self._up = None
        if up is not None:
            up.release()
        if not self._end_future.done():
            self._end_future.set_result(None)

    def on_upstream_error(self, error: ProxyError) -> None:
        self._up = None
        for future in (self._head_future, self._end_future):
            if not future.done():
                future.set_exception(error)
                future.exception()  # (retrieved: nobody may be waiting on both)

    def on_tunnel_data(self, data: bytes) -> None:
        return None

    def on_tunnel_eof(self) -> None:
        return None

    def begin_batch(self) -> None:
        return None

    def end_batch(self) -> None:
        return None

    def pause_source(self) -> None:
        return None

    def resume_source(self) -> None:
        return None
