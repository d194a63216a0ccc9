"""UpstreamChannel, the path of one request to its upstream, and UpstreamConnection, the
HTTP/1.1 one: a pooled connection that carries one request at a time.

The HTTP/2 channel (one stream of a shared connection) is in :mod:`.h2_connection`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from mypy_extensions import trait

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.h1 import ResponseParser
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader

if TYPE_CHECKING:
    from ferryman.upstream.connector import Connector
    from ferryman.upstream.peer import HttpPeer

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


@trait
class UpstreamSink:
    """The request currently using an upstream connection receives its events.

    A mypyc trait rather than a ``typing.Protocol``: the compiled connection then calls
    its sink (the :class:`~ferryman.proxy.session.Session`) through a vtable instead of
    by attribute name, five times per request.
    """

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        """A final response head arrived."""

    def on_response_body(self, data: bytes) -> None:
        """A piece of response body."""

    def on_response_end(self, trailers: Headers | None) -> None:
        """The response is complete."""

    def on_upstream_error(self, error: ProxyError) -> None:
        """The exchange failed (the connection is already closed)."""

    def on_tunnel_data(self, data: bytes) -> None:
        """Bytes read after a 101/CONNECT, for the client."""

    def on_tunnel_eof(self) -> None:
        """The upstream half-closed or closed the tunnel."""

    def begin_batch(self) -> None:
        """The response parser is about to run on newly read bytes."""

    def end_batch(self) -> None:
        """The response parser returned."""

    def pause_source(self) -> None:
        """The upstream write buffer is full: stop reading from the client."""

    def resume_source(self) -> None:
        """The upstream write buffer drained: read from the client again."""


@trait
class UpstreamChannel:
    """The path one request takes to its upstream, as the Session and the engine use it.

    An HTTP/1.1 :class:`UpstreamConnection` is its own channel, one request at a time;
    the Session frames HTTP/1.1 bodies itself (chunking) and sends bytes with
    :meth:`write`. An HTTP/2 channel (``multiplexed``) is one stream of a shared
    connection: it takes the head and the end of the request (:meth:`send_head`,
    :meth:`end_request`) and frames them itself.

    Attributes:
        peer: the server it goes to.
        closed: it can no longer carry anything.
        reused: the connection under it carried requests before.
        multiplexed: HTTP/2: heads and ends go through :meth:`send_head` and
            :meth:`end_request`, and no HTTP/1.1 framing is done above it.
        tunnel: bytes are spliced both ways (after a 101 or a CONNECT).
    """

    peer: HttpPeer
    closed: bool
    reused: bool
    multiplexed: bool
    tunnel: bool

    def start(self, sink: UpstreamSink, method: bytes, read_timeout: float) -> None:
        """Begin an exchange: responses now go to ``sink``; the read deadline is armed."""

    def send_head(self, head: RequestHeader, end_stream: bool) -> None:
        """Send the request head (the whole request when ``end_stream``)."""

    def write(self, data: bytes) -> None:
        """Send body bytes (HTTP/1.1: already framed by the Session)."""

    def writelines(self, parts: list[bytes]) -> None:
        """Send several pieces of body at once."""

    def end_request(self, trailers: Headers | None) -> None:
        """The request body is complete (HTTP/2: END_STREAM, with trailers if any)."""

    def touch(self) -> None:
        """Request bytes went out: the response read timeout counts from now."""

    def pause_reading(self) -> None:
        """The client is slow: stop taking response bytes from the upstream."""

    def resume_reading(self) -> None:
        """The client caught up: take response bytes again."""

    def write_eof(self) -> None:
        """A tunnel's client half-closed: half-close towards the upstream."""

    def release(self) -> None:
        """The exchange ended cleanly: keep the connection for another request."""

    def close(self) -> None:
        """The exchange is over and this channel may not be reused."""

    def abort(self) -> None:
        """Drop the exchange at once (HTTP/1.1: RST; HTTP/2: RST_STREAM CANCEL)."""


class UpstreamConnection(asyncio.Protocol, UpstreamChannel):
    """An HTTP/1.1 client connection, reused across requests through the pool.

    While it sits idle in the pool it still reads: any byte, EOF or error while idle means
    the upstream gave up on it, and it is closed and dropped from the pool at once, so a
    dead pooled connection is never handed out.
    """

    __slots__ = (
        "peer",
        "connector",
        "transport",
        "parser",
        "sink",
        "deadline",
        "closed",
        "requests",
        "tunnel",
        "read_timeout",
        "write_blocked",
        "_sweep",
        "received",
        "reused",
        "multiplexed",
        "reading_paused",
    )

    def __init__(self, peer: HttpPeer, connector: Connector) -> None:
        self.peer = peer
        self.connector = connector
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self)
        self.sink: UpstreamSink | None = None
        self.deadline = 0.0
        self.closed = False
        self.requests = 0
        self.tunnel = False
        self.read_timeout = peer.read_timeout
        self.write_blocked = False
        self._sweep = connector.sweep
        #: True once any byte of the current response was read
        self.received = False
        self.reused = False
        self.multiplexed = False
        #: the session paused reading (its client is slow)
        self.reading_paused = False

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[union-attr]
        self.connector.sweep.add(self)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.close()  # unsolicited bytes on an idle connection: it is not clean
            return
        if self.tunnel:
            self.deadline = self._sweep.now + self.read_timeout
            sink.on_tunnel_data(data)
            return
        self.received = True
        self.deadline = self._sweep.now + self.read_timeout
        sink.begin_batch()
        try:
            self.parser.feed(data)
            rest = self.parser.upgraded_rest
            if rest is not None:
                self.parser.upgraded_rest = None
                self.tunnel = True
                if rest:
                    sink.on_tunnel_data(rest)
        except ProxyError as exc:
            self.fail(exc)
        finally:
            sink.end_batch()

    def eof_received(self) -> bool | None:
        sink = self.sink
        if sink is not None and self.tunnel:
            sink.on_tunnel_eof()
            return True  # keep our write side open until the client closes too
        if sink is not None:
            try:
                self.parser.feed_eof()
            except ProxyError as exc:
                exc.retryable = self.reused and not self.received
                self.fail(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connector.forget(self)
        sink = self.sink
        if sink is not None:
            if self.tunnel:
                self.sink = None
                sink.on_tunnel_eof()
            elif not self.parser.complete:
                self.sink = None
                err = ProxyError(
                    ErrorKind.UPSTREAM_CLOSED,
                    ErrorSource.UPSTREAM,
                    "upstream closed the connection",
                    retryable=self.reused and not self.received,
                    cause=exc,
                )
                sink.on_upstream_error(err)

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.deadline = self._sweep.now + self.peer.write_timeout
        if self.sink is not None:
            self.sink.pause_source()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.deadline = self._sweep.now + self.read_timeout if self.sink else 0.0
        if self.sink is not None:
            self.sink.resume_source()

    # ResponseHandler ----------------------------------------------------------------------

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        if self.sink is not None:
            self.sink.on_response_head(head, body_kind)

    def on_response_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_response_end(trailers)

    # used by the proxy ----------------------------------------------------------------------

    def start(self, sink: UpstreamSink, method: bytes, read_timeout: float) -> None:
        """Begin an exchange: responses now go to ``sink``; the read deadline is armed."""
        self.sink = sink
        self.received = False
        self.read_timeout = read_timeout
        self.parser.expect(method)
        self.requests += 1
        self.deadline = self._sweep.now + read_timeout

    def send_head(self, head: RequestHeader, end_stream: bool) -> None:
        """Send the request head as HTTP/1.1 bytes (the Session frames the body)."""
        self.write(head.to_bytes())

    def end_request(self, trailers: Headers | None) -> None:
        """Nothing to send: the Session ended the body itself (last chunk, or the length
        was reached)."""

    def touch(self) -> None:
        """Request bytes went out: the response read timeout counts from now."""
        self.deadline = self._sweep.now + self.read_timeout

    def pause_reading(self) -> None:
        """Stop reading the socket (the client is slow)."""
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again."""
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def write_eof(self) -> None:
        """Half-close towards the upstream (a tunnel's client half-closed)."""
        if self.transport is not None and not self.closed:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.close()

    def write(self, data: bytes) -> None:
        """Send bytes to the upstream (no-op once closed)."""
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: list[bytes]) -> None:
        """Send several byte strings at once (no-op once closed)."""
        if not self.closed:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def fail(self, error: ProxyError) -> None:
        """Close the connection and report ``error`` to the current exchange."""
        sink = self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.on_upstream_error(error)

    def on_deadline(self) -> None:
        sink = self.sink
        if sink is None:
            self.close()  # idle timeout in the pool
            return
        if self.write_blocked:
            kind, detail = ErrorKind.UPSTREAM_WRITE_TIMEOUT, "timed out writing to upstream"
        else:
            kind, detail = ErrorKind.READ_TIMEOUT, "timed out reading from upstream"
        if self.tunnel:
            self.sink = None
            self.close()
            sink.on_tunnel_eof()
            return
        self.fail(ProxyError(kind, ErrorSource.UPSTREAM, detail))

    def release(self) -> None:
        """The exchange ended cleanly: return the connection to the pool (or close it)."""
        self.sink = None
        parser = self.parser
        if self.closed or self.tunnel or not parser.complete or not parser.keep_alive:
            self.close()
            return
        if self.write_blocked:
            self.close()
            return
        if self.reading_paused:
            # (the response ended in the same read that made its client slow: a pooled
            # connection must read, or the next request's answer would never arrive)
            self.resume_reading()
        self.connector.release(self)

    def close(self) -> None:
        """Close now; the connection is never reused."""
        if not self.closed:
            self.closed = True
            self.connector.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection (RST) and detach the exchange."""
        self.sink = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.connector.forget(self)
            self.transport.abort()
