"""H1Downstream: the asyncio.Protocol serving one HTTP/1.x client connection.

It feeds bytes to the sans-IO :class:`RequestParser`, creates a :class:`Session` per
request and runs one task per request. Pipelined requests are answered in order: the
next one starts when the previous response is complete, and reading pauses while one is
queued. Deadlines (header read, keep-alive idle, body read, blocked write) are checked by
the loop's shared sweep, not by per-read timers.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, status_for
from ferryman.protocols.h1 import BODY_NONE, RequestLimits, RequestParser, RequestParserPool
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader, reason_phrase
from ferryman.proxy.client import (
    PAUSE_BODY,
    PAUSE_PIPELINE,
    PAUSE_TUNNEL,
    PAUSE_UPSTREAM,
    ClientSide,
)
from ferryman.proxy.engine import start_session
from ferryman.proxy.h2_downstream import take_over
from ferryman.proxy.plan import RequestPlan
from ferryman.proxy.session import Session, client_closed_error

if TYPE_CHECKING:
    from ferryman.proxy.service import HttpProxyService
    from ferryman.server.listener import Listener

WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


@dataclass(slots=True)
class TlsInfo:
    """TLS details of a client connection.

    ``peer_cert`` is the verified client certificate as returned by
    :meth:`ssl.SSLSocket.getpeercert` (empty when none was sent or verification is off),
    ``peer_cert_der`` its DER bytes.
    """

    version: str | None
    cipher: str | None
    sni: str | None
    alpn: str | None
    peer_cert: dict[str, Any]
    peer_cert_der: bytes | None


log = logging.getLogger("ferryman.proxy")


def _error_response(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (
        status,
        reason_phrase(status),
    )


class ParserLender:
    """Lends request parsers to client connections, and takes them back from idle ones.

    A connection takes a parser when bytes arrive and it has none. When a response
    completes and the connection goes idle it is listed here, and at the next sweep
    (:meth:`reclaim`, at most a tick later), or sooner when the pool runs empty, its
    parser goes back to the pool if it is still idle. Giving back at once would cost
    every keep-alive request a give and a take (measured: +0.17 us per request in
    ``benchmarks/engine_micro.py``); this way a busy connection keeps its parser and an
    idle one loses it.
    """

    __slots__ = ("pool", "_idle")

    def __init__(self, limits: RequestLimits | None = None) -> None:
        self.pool = RequestParserPool(limits)
        self._idle: list[H1Downstream] = []

    def take(self, conn: H1Downstream) -> RequestParser:
        """A parser for ``conn``, which has bytes to parse and no parser.

        With the pool empty, the listed idle connections give theirs back first: a
        burst of new connections then shares a few parsers instead of each making one.
        """
        pool = self.pool
        if self._idle and not len(pool):
            self.reclaim()
        return pool.take(conn)

    def went_idle(self, conn: H1Downstream) -> None:
        """``conn`` finished a response and waits for the next request."""
        self._idle.append(conn)

    def reclaim(self) -> None:
        """Take back the parsers of the connections listed idle that still are."""
        idle, self._idle = self._idle, []
        pool = self.pool
        for conn in idle:
            conn._idle_listed = False
            parser = conn.parser
            # no request active or queued: the last one completed with keep-alive
            # (the connection is closed otherwise), so llhttp takes further messages
            if (
                parser is not None
                and conn.active is None
                and not conn.queue
                and not conn.closed
                and pool.give(parser)
            ):
                conn.parser = None

    def __len__(self) -> int:
        return len(self.pool)


class H1Downstream(asyncio.Protocol, ClientSide):
    """One client connection speaking HTTP/1.0 or HTTP/1.1."""

    PAUSE_PIPELINE = PAUSE_PIPELINE
    PAUSE_BODY = PAUSE_BODY
    PAUSE_UPSTREAM = PAUSE_UPSTREAM
    PAUSE_TUNNEL = PAUSE_TUNNEL

    __slots__ = (
        "service",
        "loop",
        "transport",
        "parser",
        "active",
        "receiving",
        "queue",
        "deadline",
        "closed",
        "requests",
        "draining",
        "_drain_wait",
        "write_paused",
        "_pause_mask",
        "_client_addr",
        "_server_addr",
        "tls_info",
        "_tunnel",
        "_reject",
        "_options",
        "listener",
        "_out",
        "_cork",
        "_to_start",
        "_client_ip",
        "_sweep",
        "_parsers",
        "_idle_listed",
        "_plan",
        "multiplexed",
    )

    def __init__(self, service: HttpProxyService, listener: Listener | None = None) -> None:
        self.service = service
        self.listener = listener
        self.loop = service.loop
        self._options = service.options
        self.transport: asyncio.Transport | None = None
        #: lent by the service's pool while a request is being read; None while idle
        self.parser: RequestParser | None = None
        self._parsers: ParserLender = service.parsers
        self._idle_listed = False
        self._plan: RequestPlan = service.plan
        self.active: Session | None = None
        self.receiving: Session | None = None
        #: pipelined requests waiting for the active one (a list: usually empty, and an
        #: empty deque would cost ~600 bytes per idle connection)
        self.queue: list[Session] = []
        self.deadline = 0.0
        self.closed = False
        self.requests = 0
        self.draining = False
        #: a graceful stop's wait for a request already sent on a kept-alive connection
        self._drain_wait = 0.0
        self.write_paused = False
        self._pause_mask = 0
        self._client_addr: Any = None
        self._server_addr: Any = None
        self.tls_info: TlsInfo | None = None
        self._tunnel: Session | None = None
        self._reject: ProxyError | None = None
        self._out: list[bytes] | None = None
        self._cork = 0
        self._to_start: Session | None = None
        self._client_ip: bytes | None = None
        self._sweep = service.sweep
        self.multiplexed = False

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[union-attr]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_info = tls = _tls_info(ssl_object)
            listener = self.listener
            if tls.alpn == "h2" or (
                listener is not None and listener.tls is not None and listener.tls.alpn == ("h2",)
            ):  # (h2_only: a client that did not negotiate h2 is spoken to in HTTP/2 anyway)
                take_over(transport, self.service, self.listener, tls)  # type: ignore[arg-type]
                self.closed = True  # (this protocol never serves the connection)
                return
        self.service.connections.add(self)
        self._sweep.add(self)
        self.deadline = self._sweep.now + self._options.header_read_timeout

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel._on_client_tunnel_data(data)
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = self._parsers.take(self)  # (between messages)
        if self.active is None and not (parser._in_head or parser._in_body):
            self.deadline = self._sweep.now + self._options.header_read_timeout
        try:
            parser.feed(data)
        except ProxyError as exc:
            self._bad_request(exc)
        session = self._to_start
        if session is not None:
            # started after the parser returned: the body bytes of this read are buffered
            # by then (sent with the head), and no hook runs inside the parser. A session
            # whose body was malformed starts too: it fails at once with its 4xx.
            self._to_start = None
            start_session(session)

    def eof_received(self) -> bool | None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel._on_client_tunnel_eof()
            return True
        parser = self.parser
        if parser is not None and parser.in_message:
            receiving = self.receiving or self.active
            if receiving is not None:
                receiving._on_client_error(client_closed_error())
            return None
        if self.active is not None:
            self.draining = True  # half-closed after a full request: answer, then close
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.service.connections.discard(self)
        self._sweep.discard(self)
        err = client_closed_error()
        active = self.active
        if active is not None:
            active._on_client_error(err)
        for queued in self.queue:
            queued._on_client_error(err)
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self._sweep.now + self._options.body_write_timeout
        active = self.active
        if active is not None:
            active._down_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.deadline = 0.0
        active = self.active
        if active is not None:
            active._down_resumed()

    # RequestHandler (parser callbacks) ----------------------------------------------------

    def on_request_head(self, head: RequestHeader, body_kind: int, content_length: int) -> None:
        self.requests += 1
        parser = self.parser
        # (only the parser calls this: it is lent to this connection now)
        keep_alive = parser is not None and bool(parser._parser.should_keep_alive())
        session = Session(self, head, body_kind, keep_alive)
        if body_kind != BODY_NONE:
            self.receiving = session
            self.deadline = self._sweep.now + self._options.body_read_timeout
        else:
            self.receiving = None
            self.deadline = 0.0
        if self.active is None:
            self.active = session
            self._to_start = session
        else:
            self.queue.append(session)
            self.pause(self.PAUSE_PIPELINE)

    def on_request_body(self, data: bytes) -> None:
        receiving = self.receiving
        if receiving is not None:
            self.deadline = self._sweep.now + self._options.body_read_timeout
            receiving._on_req_body(data)

    def on_request_end(self, trailers: Headers | None) -> None:
        receiving = self.receiving
        parser = self.parser
        if parser is not None and parser.closing:
            self.draining = True  # "Connection: close" in the trailers: close after it
        if receiving is not None:
            self.receiving = None
            self.deadline = 0.0
            receiving._on_req_end(trailers)

    def on_request_upgrade(self, rest: bytes) -> None:
        session = self.queue[-1] if self.queue else self.active
        if session is None:
            return
        session._upgrade_rest = rest
        session._upgrade = session.req_header.raw_method != b"CONNECT"
        self.pause(self.PAUSE_TUNNEL)

    # used by Session and the engine --------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes to the client (dropped once the connection is closed)."""
        out = self._out
        if out is not None:
            out.append(data)
        elif not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: list[bytes]) -> None:
        """Send several byte strings at once (dropped once closed)."""
        out = self._out
        if out is not None:
            out += parts
        elif not self.closed:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def write_head(self, response: ResponseHeader, end_stream: bool) -> None:
        """Send the serialized response head (the session framed it for HTTP/1.x)."""
        self.write(response.to_bytes())

    def write_interim(self, status: int) -> None:
        """Send an interim response head such as ``100 Continue``."""
        self.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason_phrase(status)))

    def end_response(self, trailers: Headers | None) -> None:
        """Nothing to do: the session wrote the body's end (last chunk) itself."""

    def peer_ip(self) -> bytes:
        """The client's IP address as bytes (for X-Forwarded-For)."""
        return self.client_ip

    def peer_addr(self) -> tuple[Any, ...] | None:
        """The client's socket address."""
        return self.client_addr

    def local_addr(self) -> tuple[Any, ...] | None:
        """The local socket address."""
        return self.server_addr

    def writable(self) -> bool:
        """Whether the connection can still be written to."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def corked(self) -> bool:
        """Whether writes are being gathered (inside :meth:`cork`)."""
        return self._out is not None

    def cork(self) -> None:
        """Gather writes until the matching :meth:`uncork`, then send them in one go."""
        self._cork += 1
        if self._out is None:
            self._out = []

    def uncork(self) -> None:
        """End a :meth:`cork`; the outermost one flushes the gathered writes."""
        self._cork -= 1
        if self._cork <= 0:
            self._cork = 0
            self._flush()

    def _flush(self) -> None:
        out = self._out
        self._out = None
        if not out or self.closed:
            return
        if len(out) == 1:
            self.transport.write(out[0])  # type: ignore[union-attr]
        else:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]

    @property
    def client_ip(self) -> bytes:
        """The client's IP address as bytes (for X-Forwarded-For)."""
        ip = self._client_ip
        if ip is None:
            addr = self.client_addr
            ip = self._client_ip = addr[0].encode() if addr else b""
        return ip

    def write_eof(self) -> None:
        """Half-close towards the client (tunnels)."""
        self._flush()
        transport = self.transport
        if not self.closed and transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def pause(self, reason: int) -> None:
        """Stop reading from the client for ``reason`` (a ``PAUSE_*`` bit)."""
        if not self._pause_mask and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._pause_mask |= reason

    def resume(self, reason: int) -> None:
        """Clear ``reason``; read again once no reason is left."""
        if self._pause_mask & reason:
            self._pause_mask &= ~reason
            if not self._pause_mask and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def start_tunnel(self, session: Session) -> bytes:
        """Switch to raw byte splicing for ``session``; returns bytes already read."""
        self._tunnel = session
        self.deadline = 0.0
        parser = self.parser
        early = parser.take_buffer() if parser is not None else b""
        self.resume(self.PAUSE_TUNNEL | self.PAUSE_PIPELINE | self.PAUSE_BODY)
        return early

    def request_done(self, session: Session) -> None:
        """The response to ``session`` is complete: start the next request or close."""
        if self.active is not session:
            return
        self.active = None
        if self.closed:
            return
        if self._tunnel is not None:
            self._tunnel = None
            self.close()
            return
        if (
            not session.keep_alive
            or not session._req_done
            or (self.draining and self._drain_wait <= 0.0)
        ):
            self.close()
            return
        # (draining for a graceful stop, after a response that promised keep-alive because
        # it began before the stop: the client may send its next request at once, so it is
        # waited for, a moment, and answered with "Connection: close")
        if self._pause_mask & self.PAUSE_TUNNEL:
            # the upgrade was refused: what followed the head is HTTP again; parse it
            self.resume(self.PAUSE_TUNNEL)
            parser = self.parser
            try:
                if parser is not None:  # (an upgraded parser is never given back)
                    parser.resume(session._upgrade_rest)
            except ProxyError as exc:
                self._bad_request(exc)
            if self.closed:
                return
        nxt = self._to_start
        if nxt is not None:
            self._to_start = None
        elif self.active is None and self.queue:
            nxt = self.queue.pop(0)
            if not self.queue:
                self.resume(self.PAUSE_PIPELINE)
            self.active = nxt
        if nxt is not None:
            # a loop hop, so that many pipelined requests answered without waiting do
            # not nest one call stack per request
            self.loop.call_soon(start_session, nxt)
            return
        if self._reject is not None:
            self._send_reject(self._reject)
            return
        parser = self.parser
        if parser is not None and parser.head_started:
            # the next request's head began with this one's
            self.deadline = self._sweep.now + self._options.header_read_timeout
        elif self.draining:
            self.deadline = self._sweep.now + self._drain_wait
        elif parser is None:
            self.deadline = self._sweep.now + self._options.keepalive_timeout
        elif not parser.in_message:
            self.deadline = self._sweep.now + self._options.keepalive_timeout
            if not self._idle_listed:
                # if still idle at the next sweep, its parser goes back to the pool
                self._idle_listed = True
                self._parsers.went_idle(self)

    def close(self) -> None:
        """Close after flushing what was written."""
        if not self.closed:
            self._flush()
            self.closed = True
            self._sweep.discard(self)
            self.transport.close()  # type: ignore[union-attr]

    def start_draining(self, idle_wait: float = 0.0) -> None:
        """Graceful shutdown: close once idle for ``idle_wait`` seconds (now if 0), after
        the current response if there is one.

        An idle keep-alive client may have sent its next request already: closing at once
        would lose it (the client sees the connection close with no answer). Waiting a
        moment lets that request arrive; it is answered with ``Connection: close``.
        """
        self.draining = True
        self._drain_wait = idle_wait
        parser = self.parser
        if self.active is None and (parser is None or not parser.in_message):
            if idle_wait <= 0.0:
                self.close()
                return
            deadline = self._sweep.now + idle_wait
            if self.deadline == 0.0 or deadline < self.deadline:
                self.deadline = deadline

    @property
    def client_addr(self) -> tuple[Any, ...] | None:
        """The peer address of the client socket."""
        if self._client_addr is None and self.transport is not None:
            self._client_addr = self.transport.get_extra_info("peername")
        return self._client_addr

    @property
    def server_addr(self) -> tuple[Any, ...] | None:
        """The local address of the client socket."""
        if self._server_addr is None and self.transport is not None:
            self._server_addr = self.transport.get_extra_info("sockname")
        return self._server_addr

    # errors and deadlines ------------------------------------------------------------------

    def _bad_request(self, error: ProxyError) -> None:
        """Malformed input: answer with the precise 4xx and close; framing is in doubt."""
        self.pause(self.PAUSE_PIPELINE)
        receiving = self.receiving
        if receiving is not None:
            self.receiving = None
            receiving._on_client_error(error)
            return  # its task writes the error response (the session fails with `error`)
        if self.active is not None:
            self._reject = error  # answer it after the responses already in flight
            return
        self._send_reject(error)

    def _send_reject(self, error: ProxyError) -> None:
        status = status_for(error)
        self.write(_error_response(status))
        self.close()
        # a request that never became a session: logged and counted all the same
        listener = self.listener
        if listener is not None and listener.access_log is not None:
            try:
                listener.access_log.record_reject(self.client_ip, status, error)
            except Exception:  # noqa: BLE001 - logging must never break the connection
                log.exception("access log failed")
        metrics = self._plan.metrics
        if metrics is not None:
            metrics.record(
                listener.name if listener is not None else "", "", "", status,
                0.0, -1.0, 0, 0, False, False, 0,
            )

    def on_deadline(self) -> None:
        if self.closed:
            return
        if self.write_paused:
            self._abort()
            return
        receiving = self.receiving
        if receiving is not None:
            self.receiving = None
            receiving._on_client_error(
                ProxyError(
                    ErrorKind.BODY_READ_TIMEOUT,
                    ErrorSource.DOWNSTREAM,
                    "timed out reading the request body",
                )
            )
            return
        parser = self.parser
        if parser is not None and parser.head_started:
            self._send_reject(
                ProxyError(
                    ErrorKind.HEADER_READ_TIMEOUT,
                    ErrorSource.DOWNSTREAM,
                    "timed out reading the request head",
                )
            )
            return
        if self.active is None:
            self.close()  # keep-alive idle timeout (or a silent new connection)

    def _abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()
        self.closed = True


def _tls_info(ssl_object: ssl.SSLObject) -> TlsInfo:
    try:
        der = ssl_object.getpeercert(binary_form=True)
        cert = ssl_object.getpeercert() or {}
    except (ValueError, ssl.SSLError):
        der, cert = None, {}
    cipher = ssl_object.cipher()
    return TlsInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        sni=getattr(ssl_object, "server_hostname", None) or _sni_of(ssl_object),
        alpn=ssl_object.selected_alpn_protocol(),
        peer_cert=cert,
        peer_cert_der=der,
    )


def _sni_of(ssl_object: ssl.SSLObject) -> str | None:
    # recorded on the SSL object by the SNI callback (server/tls.py)
    return getattr(ssl_object, "ferryman_sni", None)
