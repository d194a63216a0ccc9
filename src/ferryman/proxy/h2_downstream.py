"""H2Downstream: the asyncio.Protocol serving one HTTP/2 client connection.

The ``h2`` library does the framing, HPACK and the protocol state machine; this module
does the rest: each stream becomes a :class:`~ferryman.proxy.session.Session` running the
same hook pipeline as an HTTP/1.1 request, with an :class:`H2Stream` as its client side.

Flow control follows consumption. Request body bytes are acknowledged (WINDOW_UPDATE)
when the session takes them, except while the session has paused the body (its upstream
is slow or its retry buffer is full): the client's window then closes and it stops
sending. Response bytes go out as the client's windows allow; each stream buffers at most
:data:`STREAM_HIGH_WATER` bytes beyond them before it reports itself write-paused, which
makes the session stop reading from its upstream.

A connection arrives here in one of two ways: TLS with ALPN ``h2``, or cleartext with the
HTTP/2 connection preface on a listener with ``h2c: true``. In both cases
:class:`~ferryman.proxy.downstream.H1Downstream` hands the transport over
(:func:`take_over`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_LENGTH, BODY_NONE
from ferryman.protocols.h2_goaway import GoawayFilter
from ferryman.protocols.h2_guard import ENHANCE_YOUR_CALM, FrameGuard
from ferryman.protocols.h2_send import (
    CONNECTION_SPECIFIC,
    new_connection,
    send_end,
    send_within_window,
)
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.proxy.client import ClientSide
from ferryman.proxy.engine import start_session
from ferryman.proxy.session import Session, client_closed_error

if TYPE_CHECKING:
    from ferryman.proxy.downstream import TlsInfo
    from ferryman.proxy.service import HttpProxyService
    from ferryman.server.listener import Listener

log = logging.getLogger("ferryman.h2")

#: The client connection preface (RFC 9113 §3.4): how h2c prior knowledge is recognised.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_CONCURRENT_STREAMS: Final = 128
#: The receive window per stream and, as a whole, per connection.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 1024 * 1024
#: Streams the client may see cancelled (by its resets, or by h2 for its errors) per
#: second before the connection is ended: rapid reset (CVE-2023-44487), whichever way.
MAX_CANCELS_PER_SECOND: Final = 100
#: A stream holding more response bytes than this (beyond the client's windows) reports
#: itself write-paused; it resumes below the low mark.
STREAM_HIGH_WATER: Final = 256 * 1024
STREAM_LOW_WATER: Final = 64 * 1024

_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH: Final = re.compile(rb"/[\x21-\x7e\x80-\xff]*|\*")

class H2Downstream(asyncio.Protocol):
    """One client connection speaking HTTP/2 (see the module docstring)."""

    def __init__(
        self,
        service: HttpProxyService,
        listener: Listener | None,
        tls_info: TlsInfo | None,
    ) -> None:
        self.service = service
        self.listener = listener
        self.loop = service.loop
        self.tls_info = tls_info
        self.transport: asyncio.Transport | None = None
        self.conn = new_connection(client_side=False)
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.draining = False
        self.requests = 0
        self.transport_paused = False
        self.deadline = 0.0
        self._cork = 0
        self._sweep = service.sweep
        self._options = service.options
        self._client_addr: Any = None
        self._server_addr: Any = None
        self._client_ip: bytes | None = None
        #: frame-level abuse checks h2 does not make (floods, rapid reset, CONTINUATION)
        self.guard = FrameGuard(max(65536, 2 * self._options.limits.max_header_bytes))
        #: the client's GOAWAY is handled here: h2 would close its state machine on it
        self.goaway_filter = GoawayFilter(preface=True)
        self._cancel_window = 0.0
        self._cancels = 0

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        conn = self.conn
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    self._options.limits.max_header_bytes
                ),
            },
        )
        # The HPACK decoder keeps its own limit on decoded header bytes (its default is
        # 64 KiB, whatever SETTINGS say): twice ours, so a section between the two gets
        # its 431 and only one far past it ends the connection (GOAWAY 0xB). Its dynamic
        # table stays at the 4096 bytes SETTINGS_HEADER_TABLE_SIZE announces.
        conn.decoder.max_header_list_size = 2 * max(
            32768, self._options.limits.max_header_bytes
        )
        conn.decoder.max_allowed_table_size = 4096
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.service.connections.add(self)  # type: ignore[arg-type]
        self._sweep.add(self)
        self.deadline = self._sweep.now + self._options.keepalive_timeout
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        problem = self.guard.feed(data, self.loop.time())
        if problem is not None:
            self._goaway(ENHANCE_YOUR_CALM, problem)
            return
        goaways = self.goaway_filter
        data = goaways.feed(data)
        try:
            events = self.conn.receive_data(data) if data else []
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._cork += 1
        try:
            for event in events:
                self._dispatch(event)
            if goaways.received:
                received, goaways.received = goaways.received, []
                for _, code in received:
                    self._client_goaway(code)
        finally:
            self._cork -= 1
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.service.connections.discard(self)
        self._sweep.discard(self)
        for stream in list(self.streams.values()):
            stream.client_gone()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.transport_paused = True
        # a client that does not read gets no more of its frames read either: what it
        # sends would only make more to write (acks, refusals)
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
        for stream in self.streams.values():
            stream.update_paused()

    def resume_writing(self) -> None:
        self.transport_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            stream.update_paused()

    # events -----------------------------------------------------------------------------

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                # a stream already answered and forgotten: give the window back
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.on_end()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = Headers._wrap(
                    [(bytes(n), bytes(v)) for n, v in event.headers if not n.startswith(b":")]
                )
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self.streams.values()):
                    stream.send_buffered()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.send_buffered()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.client_gone()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in list(self.streams.values()):
                stream.send_buffered()
        # (the client's GOAWAY never reaches h2: see _client_goaway)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        method = path = authority = b""
        scheme = b""
        fields: list[tuple[bytes, bytes]] = []
        has_host = False
        length: bytes | None = None
        size = 0  # as HTTP/1.1 counts max_header_bytes: name, value and 4 per field
        for name, value in event.headers:
            name = bytes(name)
            value = bytes(value)
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
                continue
            if name == b"host":
                has_host = True
            elif name == b"content-length":
                if length is not None:  # (h2 versions differ on duplicates)
                    self._refuse(stream_id, 400, event.stream_ended is not None)
                    return
                length = value
            fields.append((name, value))
        if self.draining:  # after our GOAWAY: the client retries it elsewhere
            self._reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        limits = self._options.limits
        if size > limits.max_header_bytes or len(fields) > limits.max_headers:
            self._refuse(stream_id, 431, event.stream_ended is not None)  # as HTTP/1.1 does
            return
        if method == b"CONNECT":
            self._refuse(stream_id, 405, event.stream_ended is not None)  # (no CONNECT tunnels)
            return
        # h2 has checked the pseudo-header rules, not what becomes the upstream request
        # line: a token for a method, an origin-form path (or * for OPTIONS)
        if (
            not scheme
            or _METHOD.fullmatch(method) is None
            or _PATH.fullmatch(path) is None
            or (path == b"*" and method != b"OPTIONS")
        ):
            self._refuse(stream_id, 400, event.stream_ended is not None)
            return
        if not has_host and authority:
            fields.insert(0, (b"host", authority))
        if event.stream_ended is not None:
            body_kind, content_length = BODY_NONE, 0
        elif length is not None and length.isdigit():
            content_length = int(length)
            body_kind = BODY_LENGTH if content_length else BODY_NONE
        else:
            body_kind, content_length = BODY_CHUNKED, 0
        max_body = self._options.limits.max_body
        if max_body and content_length > max_body:
            self._refuse(stream_id, 413, event.stream_ended is not None)
            return
        self.requests += 1
        self.deadline = 0.0
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        head = RequestHeader(method, path, Headers._wrap(fields), "2")
        session = Session(stream, head, body_kind, True)
        stream.session = session
        stream.receiving = body_kind != BODY_NONE
        if stream.receiving:
            stream.read_deadline = self._sweep.now + self._options.body_read_timeout
            self.arm(stream.read_deadline)
        start_session(session)

    def _client_goaway(self, code: int) -> None:
        """The client's GOAWAY. NO_ERROR: it is leaving; the streams in flight are answered
        and the connection closes after the last. An error code: the streams are abandoned
        (their upstream requests cancelled) and the connection closed now."""
        self.draining = True
        if code or not self.streams:
            for stream in list(self.streams.values()):
                stream.client_gone()
            self.streams.clear()
            self.close()

    def _refuse(self, stream_id: int, status: int, client_done: bool = True) -> None:
        """Answer ``status`` without a session; stop the client's upload, if any."""
        try:
            self.conn.send_headers(
                stream_id, [(b":status", str(status).encode()), (b"content-length", b"0")], True
            )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if not client_done:
            self._reset(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _reset(self, stream_id: int, code: int) -> None:
        try:
            self.conn.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def note_cancel(self) -> None:
        """A stream was cancelled before its response completed (rapid-reset check)."""
        now = self.loop.time()
        if now - self._cancel_window >= 1.0:
            self._cancel_window = now
            self._cancels = 0
        self._cancels += 1
        if self._cancels > MAX_CANCELS_PER_SECOND and not self.closed:
            self.loop.call_soon(
                self._goaway,
                ENHANCE_YOUR_CALM,
                f"more than {MAX_CANCELS_PER_SECOND} streams cancelled in a second",
            )

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        code = getattr(exc, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR
        self._goaway(int(code), str(exc))

    def _goaway(self, code: int, reason: str) -> None:
        """End the connection with GOAWAY(``code``); the open streams are abandoned."""
        log.info("HTTP/2 client %s: GOAWAY %d: %s", self.client_addr, code, reason)
        # (for some errors h2 has queued its own GOAWAY and closed the state machine)
        if self.conn.state_machine.state != h2.connection.ConnectionState.CLOSED:
            try:
                self.conn.close_connection(error_code=code, additional_data=reason.encode()[:200])
            except h2.exceptions.ProtocolError:
                pass
        self.close()

    # used by the streams ----------------------------------------------------------------

    def flush(self) -> None:
        """Write what the h2 state machine has queued (unless corked)."""
        if self._cork or self.closed:
            return
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def stream_done(self, stream: H2Stream) -> None:
        """``stream`` is finished: forget it; close a draining connection once idle."""
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if not self.streams:
            if self.draining or not self.service.running:
                self.close()
            else:
                self.deadline = self._sweep.now + self._options.keepalive_timeout

    def close(self) -> None:
        """Close after writing what h2 has queued (even inside a cork)."""
        if not self.closed and self.transport is not None:
            self._cork = 0
            self.flush()
            self.closed = True
            self._sweep.discard(self)
            self.transport.close()

    def start_draining(self, idle_wait: float = 0.0) -> None:
        """Graceful shutdown: GOAWAY now, close once the open streams are done
        (``idle_wait`` is for HTTP/1.1's sake: GOAWAY tells a client which streams were
        seen, so nothing is lost by closing an idle connection at once).

        The GOAWAY is written as a frame of its own: h2's ``close_connection`` would also
        close its state machine, and the streams in flight could not be answered.
        """
        if not self.draining and not self.closed and self.transport is not None:
            goaway = hyperframe.frame.GoAwayFrame(0)
            goaway.last_stream_id = self.conn.highest_inbound_stream_id
            goaway.error_code = 0
            self.flush()
            self.transport.write(goaway.serialize())
        self.draining = True
        if not self.streams:
            self.close()

    def _abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()
        self.closed = True

    def on_deadline(self) -> None:
        if self.closed:
            return
        if not self.streams:
            self.start_draining()  # idle past the keep-alive timeout
            return
        now = self._sweep.now
        for stream in list(self.streams.values()):
            if 0.0 < stream.stall_deadline <= now:
                stream.write_timed_out()
            elif 0.0 < stream.read_deadline <= now:
                stream.read_timed_out()
        self.rearm()

    def rearm(self) -> None:
        """Set the deadline to the earliest stream deadline, a write stall or a body read
        (the idle one is set when the last stream ends)."""
        if self.streams:
            self.deadline = min(
                (
                    d
                    for st in self.streams.values()
                    for d in (st.stall_deadline, st.read_deadline)
                    if d
                ),
                default=0.0,
            )

    def arm(self, when: float) -> None:
        """Make sure the sweep calls back by ``when``."""
        if not self.deadline or when < self.deadline:
            self.deadline = when

    @property
    def client_addr(self) -> tuple[Any, ...] | None:
        if self._client_addr is None and self.transport is not None:
            self._client_addr = self.transport.get_extra_info("peername")
        return self._client_addr

    @property
    def server_addr(self) -> tuple[Any, ...] | None:
        if self._server_addr is None and self.transport is not None:
            self._server_addr = self.transport.get_extra_info("sockname")
        return self._server_addr

    @property
    def client_ip(self) -> bytes:
        ip = self._client_ip
        if ip is None:
            addr = self.client_addr
            ip = self._client_ip = addr[0].encode() if addr else b""
        return ip


class H2Stream(ClientSide):
    """One request/response exchange on an HTTP/2 connection: a Session's client side."""

    def __init__(self, owner: H2Downstream, stream_id: int) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.service = owner.service
        self.loop = owner.loop
        self.closed = False
        self.draining = False
        self.write_paused = False
        self.requests = owner.requests
        self.tls_info = owner.tls_info
        self.listener = owner.listener
        self.multiplexed = True
        self._plan = owner.service.plan
        self.session: Session | None = None
        self.receiving = False
        self.trailers: Headers | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._end: tuple[Headers | None] | None = None
        self._ended = False
        self._pause_mask = 0
        self._unacked = 0
        self._finished = False
        self._body_bytes = 0
        #: when a write-paused stream times out (body_write), or 0.0
        self.stall_deadline = 0.0
        #: when a request body that stopped arriving times out (body_read), or 0.0; not
        #: while the session itself holds the body back
        self.read_deadline = 0.0
        #: the request failed: body bytes still arriving are acknowledged and dropped
        self._discard = False

    # request side -----------------------------------------------------------------------

    def on_data(self, data: bytes, flow_length: int) -> None:
        session = self.session
        if self._pause_mask and self.receiving and not self._discard:
            self._unacked += flow_length
        else:
            self.owner.conn.acknowledge_received_data(flow_length, self.stream_id)
        if session is not None and self.receiving and not self._discard:
            if self.read_deadline:
                self.read_deadline = self.owner._sweep.now + self.owner._options.body_read_timeout
            self._body_bytes += len(data)
            max_body = self.owner._options.limits.max_body
            if max_body and self._body_bytes > max_body:
                self._discard = True  # the rest of the body is dropped (and acknowledged)
                session._on_client_error(
                    ProxyError(
                        ErrorKind.BODY_TOO_LARGE, ErrorSource.DOWNSTREAM, "request body too large"
                    )
                )
                return
            session._on_req_body(data)

    def on_end(self) -> None:
        session = self.session
        self.read_deadline = 0.0
        if session is not None and self.receiving:
            self.receiving = False
            session._on_req_end(self.trailers)

    def client_gone(self) -> None:
        """The client reset the stream or the connection closed."""
        if self.closed:
            return
        self.closed = True
        self._ack_held()
        session = self.session
        if session is not None and not session._done:
            self.owner.note_cancel()
            session._on_client_error(client_closed_error())
        elif self._finished:
            self._release()  # its end was waiting for window space: nothing more to send

    # response side ----------------------------------------------------------------------

    def write_head(self, response: ResponseHeader, end_stream: bool) -> None:
        if self.closed:
            return
        fields = [(b":status", b"%d" % response.status)]
        for name, value in response.headers._items:
            lname = name.lower()
            if lname not in CONNECTION_SPECIFIC:
                fields.append((lname, value))
        try:
            self.owner.conn.send_headers(self.stream_id, fields, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.client_gone()
            return
        if end_stream:
            self._ended = True
        self.owner.flush()

    def write_interim(self, status: int) -> None:
        if not self.closed:
            try:
                self.owner.conn.send_headers(self.stream_id, [(b":status", b"%d" % status)])
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.client_gone()
                return
            self.owner.flush()

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self.send_buffered()

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def end_response(self, trailers: Headers | None) -> None:
        if self.closed or self._ended:
            return
        self._end = (trailers,)
        self.send_buffered()

    def send_buffered(self) -> None:
        """Send buffered body bytes as far as the windows allow; end the stream after."""
        if self.closed:
            return
        conn = self.owner.conn
        stream_id = self.stream_id
        buffer = self._buffer
        try:
            self._buffered -= send_within_window(conn, stream_id, buffer)
            if not buffer and self._end is not None and not self._ended:
                self._ended = True
                send_end(conn, stream_id, self._end[0])
                if self._finished:
                    self.owner.flush()
                    self._release()
                    return
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.client_gone()
            if self._finished:
                self._release()
            return
        self.owner.flush()
        self.update_paused()

    def update_paused(self) -> None:
        """Report write-paused to the session above the high mark, resumed below the low."""
        session = self.session
        paused = self.owner.transport_paused or self._buffered > STREAM_HIGH_WATER
        if paused and not self.write_paused:
            self.write_paused = True
            owner = self.owner
            self.stall_deadline = owner._sweep.now + owner._options.body_write_timeout
            owner.rearm()
            if session is not None:
                session._down_paused()
        elif (
            self.write_paused
            and not self.owner.transport_paused
            and (self._buffered <= STREAM_LOW_WATER)
        ):
            self.write_paused = False
            self.stall_deadline = 0.0
            self.owner.rearm()
            if session is not None:
                session._down_resumed()

    def read_timed_out(self) -> None:
        """The request body stopped arriving for body_read seconds: fail with 408."""
        self.read_deadline = 0.0
        session = self.session
        if session is not None and self.receiving and not self.closed and not self._discard:
            self._discard = True  # (still receiving: the stream is reset once answered)
            session._on_client_error(
                ProxyError(
                    ErrorKind.BODY_READ_TIMEOUT,
                    ErrorSource.DOWNSTREAM,
                    "timed out reading the request body",
                )
            )

    def write_timed_out(self) -> None:
        """The client took no response bytes for body_write seconds: reset the stream."""
        self.stall_deadline = 0.0
        self.owner._reset(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.owner.flush()
        if self.closed:
            return
        self.closed = True
        self._ack_held()
        session = self.session
        if session is not None and not session._done:
            session._on_client_error(
                ProxyError(
                    ErrorKind.WRITE_TIMEOUT, ErrorSource.DOWNSTREAM, "the client stopped reading"
                )
            )
        elif self._finished:
            self._release()

    # the rest of ClientSide ---------------------------------------------------------------

    def writable(self) -> bool:
        return not self.closed and not self.owner.closed

    def corked(self) -> bool:
        return self.owner._cork > 0

    def cork(self) -> None:
        self.owner._cork += 1

    def uncork(self) -> None:
        owner = self.owner
        owner._cork -= 1
        if owner._cork <= 0:
            owner._cork = 0
            owner.flush()

    def write_eof(self) -> None:
        """Tunnels are not offered over HTTP/2: nothing to half-close."""

    def pause(self, reason: int) -> None:
        self._pause_mask |= reason
        self.read_deadline = 0.0  # (the client waits for us now, not we for it)

    def resume(self, reason: int) -> None:
        if self._pause_mask & reason:
            self._pause_mask &= ~reason
            if not self._pause_mask and self.receiving and not self.closed:
                owner = self.owner
                self.read_deadline = owner._sweep.now + owner._options.body_read_timeout
                owner.arm(self.read_deadline)
            if not self._pause_mask and self._unacked and not self.closed:
                unacked, self._unacked = self._unacked, 0
                try:
                    self.owner.conn.acknowledge_received_data(unacked, self.stream_id)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    return
                self.owner.flush()

    def start_tunnel(self, session: Session) -> bytes:
        raise ProxyError(
            ErrorKind.METHOD_NOT_ALLOWED, ErrorSource.DOWNSTREAM, "no tunnels over HTTP/2"
        )

    def request_done(self, session: Session) -> None:
        self._finished = True
        if self._ended or self.closed:
            self._release()
        elif self._end is None:
            # the response did not end cleanly (an error after it started, or the upstream
            # cancelled): reset, with CANCEL when the upstream cancelled
            self.closed = True
            error = session._error
            code = (
                h2.errors.ErrorCodes.CANCEL
                if error is not None and error.kind is ErrorKind.UPSTREAM_CANCELLED
                else h2.errors.ErrorCodes.INTERNAL_ERROR
            )
            try:
                self.owner.conn.reset_stream(self.stream_id, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self.owner.flush()
            self._release()
        # else: the end waits for the client's window (send_buffered releases the stream)

    def _release(self) -> None:
        self._ack_held()
        if self.receiving and not self.closed:
            # answered before the client finished its body: ask it to stop (RFC 9113 §8.1)
            self.receiving = False
            self.owner._reset(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            self.owner.flush()
        self.session = None
        self._buffer = []
        self.owner.stream_done(self)

    def _ack_held(self) -> None:
        """Give back the window of request bytes held while paused (the connection's
        window would otherwise shrink for good)."""
        unacked, self._unacked = self._unacked, 0
        if unacked:
            try:
                self.owner.conn.acknowledge_received_data(unacked, self.stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass

    def peer_ip(self) -> bytes:
        return self.owner.client_ip

    def peer_addr(self) -> tuple[Any, ...] | None:
        return self.owner.client_addr

    def local_addr(self) -> tuple[Any, ...] | None:
        return self.owner.server_addr


def take_over(
    transport: asyncio.Transport,
    service: HttpProxyService,
    listener: Listener | None,
    tls_info: TlsInfo | None,
    first: bytes = b"",
) -> H2Downstream:
    """Serve ``transport`` as HTTP/2 from now on; ``first`` is what was already read."""
    protocol = H2Downstream(service, listener, tls_info)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if first:
        protocol.data_received(first)
    return protocol


class PrefaceSniffer(asyncio.Protocol):
    """The first protocol of a connection on an ``h2c: true`` listener.

    It reads until it can tell the HTTP/2 connection preface from an HTTP/1.x request
    line, then hands the connection to :class:`H2Downstream` or to the HTTP/1.x protocol
    ``make_h1`` builds, with the bytes read so far. Listeners without ``h2c`` never see it.
    """

    def __init__(
        self,
        service: HttpProxyService,
        listener: Listener | None,
        make_h1: Any,
    ) -> None:
        self.service = service
        self.listener = listener
        self.make_h1 = make_h1
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sweep = self.service.sweep
        sweep.add(self)  # a silent connection is closed after the header read timeout
        self.deadline = sweep.now + self.service.options.header_read_timeout

    def on_deadline(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        transport = self.transport
        assert transport is not None
        if buffer[: len(PREFACE)] == PREFACE[: len(buffer)] and len(buffer) < len(PREFACE):
            self.buffer = buffer  # a prefix of the preface so far: wait for more
            return
        self.buffer = b""
        self.service.sweep.discard(self)
        if buffer.startswith(PREFACE):
            take_over(transport, self.service, self.listener, None, buffer)
            return
        h1 = self.make_h1()
        transport.set_protocol(h1)
        h1.connection_made(transport)
        h1.data_received(buffer)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.sweep.discard(self)
