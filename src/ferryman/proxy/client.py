"""ClientSide: the client end of one request, as the Session and the engine use it.

An HTTP/1.x connection (:class:`~ferryman.proxy.downstream.H1Downstream`) carries its
requests one after another; an HTTP/2 connection carries each request on a stream of its
own (:class:`~ferryman.proxy.h2_downstream.H2Stream`). Both are a ``ClientSide``: the
session writes the response through it, pauses and resumes the request body with it, and
tells it when the exchange is over.

A mypyc trait rather than a ``typing.Protocol``: the compiled session reaches its client
side through a vtable, as it does its upstream connection (``UpstreamSink``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import trait

if TYPE_CHECKING:
    from ferryman.protocols.headers import Headers, ResponseHeader
    from ferryman.proxy.downstream import TlsInfo
    from ferryman.proxy.plan import RequestPlan
    from ferryman.proxy.service import HttpProxyService
    from ferryman.proxy.session import Session
    from ferryman.server.listener import Listener

#: Reasons to stop reading from the client (bits of one mask).
PAUSE_PIPELINE: Final = 1  #: a pipelined request waits for the one before it
PAUSE_BODY: Final = 2  #: the request body is buffered up to its limit
PAUSE_UPSTREAM: Final = 4  #: the upstream cannot take more of the request body
PAUSE_TUNNEL: Final = 8  #: an upgrade or CONNECT is being decided


@trait
class ClientSide:
    """The client end of a request (see the module docstring).

    Attributes:
        service: the service the connection belongs to.
        loop: the worker's event loop.
        closed: the client connection (or stream) is gone; writes are dropped.
        draining: the connection closes after the current response.
        write_paused: the client is not reading fast enough; the session slows its source.
        requests: requests received on the connection so far, this one included.
        tls_info: TLS details of the connection, or None for cleartext.
        listener: the listener the connection came in on, if known.
        multiplexed: True for an HTTP/2 stream: no chunked coding, no Connection header,
            and the end of the response is signalled by :meth:`end_response`.
    """

    service: HttpProxyService
    loop: asyncio.AbstractEventLoop
    closed: bool
    draining: bool
    write_paused: bool
    requests: int
    tls_info: TlsInfo | None
    listener: Listener | None
    multiplexed: bool
    _plan: RequestPlan

    def write(self, data: bytes) -> None:
        """Send response bytes (a serialized head, or body bytes)."""

    def writelines(self, parts: list[bytes]) -> None:
        """Send several byte strings at once."""

    def write_head(self, response: ResponseHeader, end_stream: bool) -> None:
        """Send the response head; ``end_stream`` when no body follows."""

    def write_interim(self, status: int) -> None:
        """Send an interim (1xx) response head, such as 100 Continue."""

    def end_response(self, trailers: Headers | None) -> None:
        """The response body is complete (multiplexed clients: end the stream)."""

    def writable(self) -> bool:
        """Whether the client can still be written to (not closed or closing)."""
        raise NotImplementedError

    def corked(self) -> bool:
        """Whether writes are being gathered (inside :meth:`cork`)."""
        raise NotImplementedError

    def cork(self) -> None:
        """Gather writes until the matching :meth:`uncork`."""

    def uncork(self) -> None:
        """End a :meth:`cork`; the outermost one flushes the gathered writes."""

    def write_eof(self) -> None:
        """Half-close towards the client (tunnels)."""

    def pause(self, reason: int) -> None:
        """Stop reading from the client for ``reason`` (a ``PAUSE_*`` bit)."""

    def resume(self, reason: int) -> None:
        """Clear ``reason``; read again once no reason is left."""

    def start_tunnel(self, session: Session) -> bytes:
        """Switch to raw byte splicing for ``session``; returns bytes already read."""
        raise NotImplementedError

    def request_done(self, session: Session) -> None:
        """The exchange of ``session`` is over (its response complete or failed)."""

    def peer_ip(self) -> bytes:
        """The client's IP address as bytes (for X-Forwarded-For)."""
        raise NotImplementedError

    def peer_addr(self) -> tuple[Any, ...] | None:
        """The client's socket address."""
        raise NotImplementedError

    def local_addr(self) -> tuple[Any, ...] | None:
        """The local (server) socket address."""
        raise NotImplementedError
