"""The metrics endpoint: a small HTTP/1.1 server answering ``GET /metrics`` with the sum of
a :class:`~ferryman.metrics.board.MetricsBoard`, in its own process.

:func:`run_metrics_process` is the body of a helper process the server's main process
forks (one per server, whatever the number of workers), given a listening socket of its
own; :func:`serve_metrics` serves on a running loop (tests run it in-process).

* ``GET /metrics`` (any query string): 200, the Prometheus text format
  (:data:`~ferryman.metrics.exposition.CONTENT_TYPE`) with a Content-Length; ``HEAD``
  the same without the body.
* Another path: 404. ``/metrics`` with another method: 405 with ``Allow: GET, HEAD``.
* A malformed request: 400, then the connection is closed. A request head over
  :data:`MAX_HEAD_BYTES`: 431; a body over :data:`MAX_BODY_BYTES`: 413 (both close).
* Keep-alive as HTTP/1.1 has it (``Connection: close`` honoured; HTTP/1.0 only with
  ``Connection: keep-alive``); pipelined requests are answered in order. A connection
  that does not complete a request within ``header_timeout`` seconds of its opening or
  of the previous response is closed (with a 408 if part of a request had arrived).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Any

import httptools

from ferryman.metrics.board import MetricsBoard
from ferryman.metrics.exposition import CONTENT_TYPE, make_registry, render

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "run_metrics_process",
    "serve_metrics",
]

log = logging.getLogger("ferryman.metrics")

#: Seconds a connection may take to send a complete request (idle time included).
HEADER_TIMEOUT = 10.0
#: Largest request line plus headers taken.
MAX_HEAD_BYTES = 16 * 1024
#: Largest request body taken (and ignored).
MAX_BODY_BYTES = 64 * 1024

_PATH = b"/metrics"
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}
_TEXT = b"text/plain; charset=utf-8"


class _Endpoint:
    """What the connections of one endpoint share."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, board: MetricsBoard, header_timeout: float
    ) -> None:
        self.loop = loop
        self.registry = make_registry(board)
        self.header_timeout = header_timeout
        self.connections: set[_MetricsConnection] = set()

    def protocol(self) -> _MetricsConnection:
        return _MetricsConnection(self)

    def render(self) -> bytes:
        return render(self.registry)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()


class _MetricsConnection(asyncio.Protocol):
    """One client connection (parsed with httptools)."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []
        self.head_bytes = 0
        self.body_bytes = 0
        self.started = False  # part of a request arrived
        self.answered = False  # the current request was answered
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None

    # connection -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.endpoint.connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.endpoint.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_writing(self) -> None:  # (a client not reading its answers)
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # an Upgrade (or CONNECT) request: answered as a plain one, then closed
            if not self.closing:
                if not self.answered and self.started:
                    self._answer(False)
                self.close()
        except httptools.HttpParserError:
            if not self.closing:
                self._error(400)

    def close(self) -> None:
        """Close the connection."""
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.endpoint.loop.call_later(self.endpoint.header_timeout, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.closing:
            return
        if self.started:
            self._error(408)
        else:
            self.close()

    # httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop  # (a request pipelined after one that closes the connection)
        self.url = []
        self.head_bytes = 0
        self.body_bytes = 0
        self.started = True
        self.answered = False

    def on_url(self, url: bytes) -> None:
        self.url.append(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES and not self.closing:
            self._error(431)
            raise _Stop  # (stops the parser: httptools raises HttpParserCallbackError)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES and not self.closing:
            self._error(413)
            raise _Stop

    def on_message_complete(self) -> None:
        if self.closing:
            return
        parser = self.parser
        # (an Upgrade request is answered as a plain one, and the connection closed)
        self._answer(bool(parser.should_keep_alive()) and not parser.should_upgrade())

    # answers ----------------------------------------------------------------------------

    def _answer(self, keep_alive: bool) -> None:
        """Answer the request just read."""
        self.answered = True
        self.started = False
        method = self.parser.get_method()
        try:
            path = httptools.parse_url(b"".join(self.url)).path or b""
        except httptools.HttpParserInvalidURLError:
            self._error(400)
            return
        head = method == b"HEAD"
        extra = b""
        if path != _PATH:
            status, ctype, body = 404, _TEXT, b"Not found: the metrics are at /metrics.\n"
        elif method != b"GET" and not head:
            status, ctype, body = 405, _TEXT, b"Method not allowed: use GET or HEAD.\n"
            extra = b"Allow: GET, HEAD\r\n"
        else:
            try:
                status, ctype, body = 200, CONTENT_TYPE.encode(), self.endpoint.render()
            except Exception:  # noqa: BLE001 - report, answer 500, keep serving
                log.exception("metrics: rendering failed")
                status, ctype, body = 500, _TEXT, b"Internal error.\n"
        if keep_alive and self.parser.get_http_version() == "1.0":
            extra += b"Connection: keep-alive\r\n"
        self._send(status, ctype, body, extra, keep_alive, head)

    def _error(self, status: int) -> None:
        """Answer ``status`` and close (the framing can no longer be trusted)."""
        reason = _REASONS[status]
        self._send(status, _TEXT, reason + b"\n", b"", False, False)

    def _send(
        self, status: int, ctype: bytes, body: bytes, extra: bytes, keep_alive: bool, head: bool
    ) -> None:
        response = b"".join(
            (
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
                b"Content-Type: ",
                ctype,
                b"\r\nContent-Length: %d\r\n" % len(body),
                extra,
                b"" if keep_alive else b"Connection: close\r\n",
                b"\r\n",
                b"" if head else body,
            )
        )
        self.transport.write(response)
        if keep_alive:
            self._arm()
        else:
            self.close()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a request that was answered."""


async def serve_metrics(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    board: MetricsBoard,
    header_timeout: float = HEADER_TIMEOUT,
) -> asyncio.Server:
    """Serve the metrics of ``board`` on ``sock`` (bound and listening) from ``loop``,
    the running loop; closing the returned server stops accepting connections."""
    server, _ = await _serve(loop, sock, board, header_timeout)
    return server


async def _serve(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    board: MetricsBoard,
    header_timeout: float,
) -> tuple[asyncio.Server, _Endpoint]:
    sock.setblocking(False)
    endpoint = _Endpoint(loop, board, header_timeout)
    server = await loop.create_server(endpoint.protocol, sock=sock)
    return server, endpoint


def run_metrics_process(sock: socket.socket, board: MetricsBoard, parent_pid: int) -> None:
    """Serve the metrics endpoint on ``sock`` until the parent process ``parent_pid``
    (the server's main process, its pid taken before the fork) goes away, or SIGTERM or
    SIGINT arrives.

    The body of the server's metrics process: ``sock`` is a bound, listening TCP socket
    of its own, and ``board`` the board created before the fork. SIGHUP is ignored (the
    main process reloads the config).
    """
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stopped = asyncio.Event()

    async def main() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopped.set)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        server, endpoint = await _serve(loop, sock, board, HEADER_TIMEOUT)
        while os.getppid() == parent_pid and not stopped.is_set():
            try:
                await asyncio.wait_for(stopped.wait(), 1.0)
            except TimeoutError:
                pass
        if not stopped.is_set():
            log.info("metrics process: parent gone, exiting")
        server.close()
        endpoint.close_connections()
        await asyncio.sleep(0)  # (let the transports close)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
