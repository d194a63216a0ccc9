"""HTTP/2 to upstream servers: one shared connection, one channel per request.

An :class:`H2UpstreamConnection` is a client connection that many requests use at once,
each as an :class:`H2Channel` (one stream). The :class:`~ferryman.upstream.connector.
Connector` hands out channels while the connection is under its stream limit (the
server's SETTINGS_MAX_CONCURRENT_STREAMS, or the peer's ``max_streams`` when lower) and
opens another connection when every one is full.

The ``h2`` library does framing, HPACK and the stream state machines; the rest is here:

* **Flow control follows consumption.** Response bytes are credited back to the server
  per stream when the session has taken them, and held while the session has paused the
  upstream (its client is slow), so the server's window for that stream closes and it
  stops; at most :data:`STREAM_WINDOW` bytes of a paused stream are in flight. The
  connection's window is credited as bytes arrive, so one paused stream never stalls the
  others. Request bytes go out as the server's windows allow; a stream holding more than
  :data:`SEND_HIGH_WATER` beyond them pauses the client (``pause_source``).
* **GOAWAY.** A :class:`~ferryman.protocols.h2_goaway.GoawayFilter` takes GOAWAY frames
  out before ``h2`` sees them (``h2`` would close its state machine): the connection takes
  no new streams, streams above the last-stream-id fail as retryable (the server did not
  process them), the others finish, and the connection closes when none is left.
* **Keepalive.** A connection without streams sends a PING every ``ping_interval``; no
  answer within ``connect_timeout`` closes it. One idle for ``idle_timeout`` is closed
  with GOAWAY(NO_ERROR).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_LENGTH, BODY_NONE
from ferryman.protocols.h2_goaway import GoawayFilter
from ferryman.protocols.h2_send import (
    CONNECTION_SPECIFIC,
    new_connection,
    send_end,
    send_within_window,
)
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.upstream.connection import WRITE_HIGH_WATER, WRITE_LOW_WATER, UpstreamChannel

if TYPE_CHECKING:
    from ferryman.upstream.connection import UpstreamSink
    from ferryman.upstream.connector import Connector
    from ferryman.upstream.peer import HttpPeer

log = logging.getLogger("ferryman.upstream.h2")

#: The receive window per stream: response bytes a paused stream may have in flight.
STREAM_WINDOW: Final = 256 * 1024
#: The connection's receive window (credited as bytes arrive, see the module docstring).
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
#: Credit is given back in pieces of at least this much (fewer WINDOW_UPDATE frames).
_CREDIT_BATCH: Final = 32 * 1024
#: A stream holding more request bytes than this beyond the server's windows pauses the
#: client; it resumes below the low mark.
SEND_HIGH_WATER: Final = 256 * 1024
SEND_LOW_WATER: Final = 64 * 1024
#: Most bytes of response header fields accepted (SETTINGS_MAX_HEADER_LIST_SIZE).
MAX_HEADER_LIST: Final = 256 * 1024

_H2_ERRORS: Final = (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError)
#: A connection whose stream ids reach this takes no new streams (the last is 2^31 - 1).
_LAST_STREAM_IDS: Final = 2**31 - 2**16


def _closed_error(detail: str, retryable: bool) -> ProxyError:
    return ProxyError(
        ErrorKind.UPSTREAM_CLOSED, ErrorSource.UPSTREAM, detail, retryable=retryable
    )


def _refused_error(detail: str) -> ProxyError:
    """The server did not act on the request: safe to send again, whatever the method."""
    return ProxyError(ErrorKind.UPSTREAM_REFUSED, ErrorSource.UPSTREAM, detail, retryable=True)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream server, shared by concurrent requests."""

    def __init__(self, peer: HttpPeer, connector: Connector) -> None:
        self.peer = peer
        self.connector = connector
        self.loop = connector.loop
        self.transport: asyncio.Transport | None = None
        self.h2 = new_connection(client_side=True)
        # (the limit announced in SETTINGS below is the one the HPACK decoder enforces)
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST
        #: open streams by id
        self.streams: dict[int, H2Channel] = {}
        #: channels handed out and not yet done (reserved ones have no stream yet)
        self.active = 0
        #: streams opened over the connection's life
        self.requests = 0
        self.closed = False
        #: no new streams: the server sent GOAWAY, or the server left its group
        self.goaway = False
        #: TLS ALPN picked HTTP/1.1: the connector turns it into an HTTP/1.1 connection
        self.downgraded = False
        #: the server's SETTINGS arrived (or the connection failed first)
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.transport_paused = False
        self.deadline = 0.0
        self._sweep = connector.sweep
        self._filter = GoawayFilter()
        self._credit = 0  # connection window to give back
        self._idle_since = 0.0
        self._ping_out = False
        self._cork = 0

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.peer.tls:
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                self.downgraded = True
                if not self.ready.done():
                    self.ready.set_result(None)
                return
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[union-attr]
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._sweep.add(self)
        self._arm_idle()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.downgraded:
            return
        data = self._filter.feed(data)
        events: list[Any] = []
        if data:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._fail_all(
                    ProxyError(
                        ErrorKind.UPSTREAM_PROTOCOL,
                        ErrorSource.UPSTREAM,
                        f"HTTP/2 protocol error from {self.peer.name}: {exc}",
                        cause=exc,
                    )
                )
                self.flush()  # (h2 queued its GOAWAY)
                self.close()
                return
        self._cork += 1
        batch: list[tuple[H2Channel, UpstreamSink]] = []
        try:
            for event in events:
                self._dispatch(event, batch)
            if self._filter.received:
                received, self._filter.received = self._filter.received, []
                for last_stream_id, code in received:
                    self._on_goaway(last_stream_id, code)
        finally:
            for channel, sink in batch:
                channel._in_batch = False
                sink.end_batch()
            self._cork -= 1
        if self._credit >= _CREDIT_BATCH and not self.closed:
            credit, self._credit = self._credit, 0
            self.h2.increment_flow_control_window(credit)
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.goaway = True
        self._sweep.discard(self)
        self.connector.forget_shared(self)
        if not self.ready.done():
            self.ready.set_result(None)
        if not self.downgraded:
            for channel in list(self.streams.values()):
                channel.fail(
                    _closed_error(
                        f"upstream {self.peer.name} closed the connection",
                        channel.reused and not channel.received,
                    )
                )

    def pause_writing(self) -> None:
        self.transport_paused = True
        for channel in list(self.streams.values()):
            channel.update_source()

    def resume_writing(self) -> None:
        self.transport_paused = False
        for channel in list(self.streams.values()):
            channel.update_source()

    # events -----------------------------------------------------------------------------

    def _dispatch(self, event: Any, batch: list[tuple[H2Channel, UpstreamSink]]) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.DataReceived):
            self._credit += event.flow_controlled_length
            channel = self.streams.get(stream_id)
            if channel is not None:
                channel.enter_batch(batch)
                channel.on_data(event.data, event.flow_controlled_length)
            return
        if isinstance(event, h2.events.WindowUpdated):
            if stream_id == 0:
                for channel in list(self.streams.values()):
                    channel.send_buffered()
            else:
                channel = self.streams.get(stream_id)
                if channel is not None:
                    channel.send_buffered()
            return
        if isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            for channel in list(self.streams.values()):
                channel.send_buffered()  # (the initial window may have grown)
            return
        if isinstance(event, h2.events.PingAckReceived):
            self._ping_out = False
            if not self.active:
                self._arm_idle(keep_since=True)
            return
        channel = self.streams.get(stream_id) if stream_id else None
        if channel is None:
            return
        channel.enter_batch(batch)
        if isinstance(event, h2.events.ResponseReceived):
            channel.on_head(event.headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.TrailersReceived):
            channel.trailers = Headers._wrap(
                [(bytes(n), bytes(v)) for n, v in event.headers if n[:1] != b":"]
            )
        elif isinstance(event, h2.events.StreamEnded):
            channel.on_end()
        elif isinstance(event, h2.events.StreamReset):
            channel.on_reset(int(event.error_code))
        # InformationalResponseReceived (1xx) is dropped: 100-continue was answered to the
        # client by the proxy itself

    def _on_goaway(self, last_stream_id: int, code: int) -> None:
        """The server's GOAWAY: no new streams; those it will not answer fail (retryable)."""
        if code:
            log.info("upstream %s: GOAWAY error code %d", self.peer.name, code)
        self.goaway = True
        self.connector.forget_shared(self)
        for stream_id, channel in list(self.streams.items()):
            if stream_id > last_stream_id:
                channel.fail(
                    _refused_error(f"upstream {self.peer.name} refused the stream (GOAWAY)")
                )
        if not self.active:
            self.close()

    def _fail_all(self, error: ProxyError) -> None:
        """A connection error: every stream fails; those that saw no answer on a reused
        connection may be retried (as after a lost connection)."""
        self.goaway = True
        self.connector.forget_shared(self)
        for channel in list(self.streams.values()):
            channel.fail(
                ProxyError(
                    error.kind,
                    error.source,
                    error.detail,
                    retryable=channel.reused and not channel.received,
                    cause=error.cause,
                )
            )

    # used by the connector and the channels ---------------------------------------------

    def limit(self) -> int:
        """How many streams may be open at once."""
        return min(self.peer.max_streams, self.h2.remote_settings.max_concurrent_streams)

    def open_channel(self, reused: bool) -> H2Channel | None:
        """A channel for one more request, or ``None`` when full or going away."""
        if self.closed or self.goaway or self.downgraded or self.active >= self.limit():
            return None
        self.active += 1
        self.deadline = 0.0
        return H2Channel(self, reused)

    def channel_done(self, channel: H2Channel) -> None:
        """``channel`` will carry nothing more: its slot is free."""
        if channel.stream_id:
            self.streams.pop(channel.stream_id, None)
        self.active -= 1
        if self.active:
            return
        if self.goaway:
            self.close()
        else:
            self._arm_idle()

    def flush(self) -> None:
        """Write what the h2 state machine has queued (unless corked)."""
        if self._cork or self.transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def retire(self) -> None:
        """The server left its group: no new streams; close once the last one is done."""
        self.goaway = True
        self.connector.forget_shared(self)
        if not self.active:
            self.close()

    def close(self) -> None:
        """Close now, saying GOAWAY(NO_ERROR) first when the state machine still can."""
        if self.closed:
            return
        self.goaway = True
        self.closed = True
        self.connector.forget_shared(self)
        self._sweep.discard(self)
        if self.transport is not None:
            if not self.downgraded:
                try:
                    self.h2.close_connection()
                except h2.exceptions.ProtocolError:
                    pass
                data = self.h2.data_to_send()
                if data:
                    self.transport.write(data)
            self.transport.close()

    # keepalive ----------------------------------------------------------------------------

    def _arm_idle(self, keep_since: bool = False) -> None:
        now = self._sweep.now
        if not keep_since:
            self._idle_since = now
        peer = self.peer
        until_idle = self._idle_since + peer.idle_timeout - now
        self.deadline = now + max(0.0, min(peer.ping_interval, until_idle))

    def on_deadline(self) -> None:
        """Idle keepalive: PING, close a silent connection, or close after idle_timeout."""
        if self.active or self.closed:
            return
        now = self._sweep.now
        if self._ping_out:
            log.info("upstream %s: no PING answer; closing the connection", self.peer.name)
            self.close()
            return
        if now - self._idle_since >= self.peer.idle_timeout:
            self.close()
            return
        try:
            self.h2.ping(b"ferryman")
        except h2.exceptions.ProtocolError:
            self.close()
            return
        self._ping_out = True
        self.deadline = now + self.peer.connect_timeout
        self.flush()


class H2Channel(UpstreamChannel):
    """One request on an :class:`H2UpstreamConnection`: a stream, as a Session's channel."""

    def __init__(self, conn: H2UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self.peer = conn.peer
        self.closed = False
        self.reused = reused
        self.multiplexed = True
        self.tunnel = False
        self.stream_id = 0
        self.sink: UpstreamSink | None = None
        self.deadline = 0.0
        self.read_timeout = conn.peer.read_timeout
        #: response bytes (or the head) arrived
        self.received = False
        self.trailers: Headers | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._end: tuple[Headers | None] | None = None
        self._ended = False  # END_STREAM sent
        self._response_ended = False
        self._paused = False  # response credit held back
        self._unacked = 0
        self._source_paused = False
        self._in_batch = False
        self._done = False

    # UpstreamChannel --------------------------------------------------------------------

    def start(self, sink: UpstreamSink, method: bytes, read_timeout: float) -> None:
        self.sink = sink
        self.read_timeout = read_timeout
        self.deadline = self.conn._sweep.now + read_timeout
        self.conn._sweep.add(self)

    def send_head(self, head: RequestHeader, end_stream: bool) -> None:
        conn = self.conn
        if conn.closed or conn.goaway:
            self.fail(_refused_error(f"upstream {self.peer.name} is going away"))
            return
        authority = b""
        path = head.raw_path
        if path[:1] != b"/" and path != b"*":
            # absolute-form (RFC 9112 §3.2.2): HTTP/2 takes its authority and an
            # origin-form :path (RFC 9113 §8.3.1)
            _, _, rest = path.partition(b"://")
            authority, slash, tail = rest.partition(b"/")
            path = b"/" + tail if slash else b"/"
            if b"?" in authority:  # ("http://host?q")
                authority, _, query = authority.partition(b"?")
                path = b"/?" + query
        fields: list[tuple[bytes, bytes]] = [
            (b":method", head.raw_method),
            (b":scheme", b"https" if self.peer.tls else b"http"),
            (b":authority", b""),
            (b":path", path),
        ]
        for name, value in head.headers._items:
            lname = name.lower()
            if lname == b"host":
                if not authority:
                    authority = value
                continue
            if lname in CONNECTION_SPECIFIC or (lname == b"te" and value != b"trailers"):
                continue
            fields.append((lname, value))
        fields[2] = (b":authority", authority or self.peer.name.encode())
        h2c = conn.h2
        try:
            stream_id = h2c.get_next_available_stream_id()
            h2c.send_headers(stream_id, fields, end_stream=end_stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            if isinstance(exc, h2.exceptions.NoAvailableStreamIDError):
                conn.retire()
            # (the server lowered its stream limit, or the state machine closed)
            self.fail(
                ProxyError(
                    ErrorKind.UPSTREAM_REFUSED,  # (nothing was sent)
                    ErrorSource.UPSTREAM,
                    f"cannot open a stream to {self.peer.name}: {exc}",
                    retryable=True,
                    cause=exc,
                )
            )
            return
        self.stream_id = stream_id
        conn.streams[stream_id] = self
        conn.requests += 1
        if stream_id >= _LAST_STREAM_IDS:
            conn.retire()  # stream ids are running out: new requests go to a new connection
        self._ended = end_stream
        conn.flush()

    def write(self, data: bytes) -> None:
        if self.closed or self._ended or not data or self._end is not None:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self.send_buffered()

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def end_request(self, trailers: Headers | None) -> None:
        if self.closed or self._ended or self._end is not None:
            return
        self._end = (trailers,)
        self.send_buffered()

    def touch(self) -> None:
        self.deadline = self.conn._sweep.now + self.read_timeout

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        if self._unacked and not self.closed and not self._response_ended:
            unacked, self._unacked = self._unacked, 0
            self._credit_stream(unacked)
            self.conn.flush()

    def write_eof(self) -> None:
        self.close()  # (no tunnels over HTTP/2 streams)

    def release(self) -> None:
        self.sink = None
        if not self._ended or not self._response_ended:
            self._reset(h2.errors.ErrorCodes.CANCEL if not self._response_ended else 0)
        self._finish()

    def close(self) -> None:
        self.sink = None
        if not (self._ended and self._response_ended):
            self._reset(h2.errors.ErrorCodes.CANCEL if not self._response_ended else 0)
        self._finish()

    def abort(self) -> None:
        self.sink = None
        if not (self._ended and self._response_ended):
            self._reset(h2.errors.ErrorCodes.CANCEL)
        self._finish()

    # events from the connection -----------------------------------------------------------

    def enter_batch(self, batch: list[tuple[H2Channel, UpstreamSink]]) -> None:
        """Gather this stream's events of one read into one batch of its sink."""
        sink = self.sink
        if not self._in_batch and sink is not None:
            self._in_batch = True
            batch.append((self, sink))
            sink.begin_batch()

    def on_head(self, raw: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.received = True
        self.deadline = self.conn._sweep.now + self.read_timeout
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        length = False
        for name, value in raw:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
                continue
            if name == b"content-length":
                length = True
            fields.append((bytes(name), bytes(value)))
        head = ResponseHeader(status, Headers._wrap(fields), version="2")
        if ended:
            body_kind = BODY_NONE
        else:
            body_kind = BODY_LENGTH if length else BODY_CHUNKED
        sink = self.sink
        if sink is not None:
            sink.on_response_head(head, body_kind)
        if ended:
            self.on_end()

    def on_data(self, data: bytes, flow_length: int) -> None:
        self.received = True
        if self._paused:
            self._unacked += flow_length
        else:
            self._unacked += flow_length
            if self._unacked >= _CREDIT_BATCH:
                unacked, self._unacked = self._unacked, 0
                self._credit_stream(unacked)
        sink = self.sink
        if sink is not None:
            self.deadline = self.conn._sweep.now + self.read_timeout
            sink.on_response_body(data)

    def on_end(self) -> None:
        if self._response_ended:
            return
        self._response_ended = True
        self._unacked = 0
        self.deadline = 0.0
        sink = self.sink
        if sink is not None:
            sink.on_response_end(self.trailers)  # (the session releases or closes us)
        elif self._ended:
            self._finish()

    def on_reset(self, code: int) -> None:
        self.closed = True  # (h2 closed the stream: nothing more may be sent on it)
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            error = _refused_error(f"upstream {self.peer.name} refused the stream")
        elif code == h2.errors.ErrorCodes.CANCEL:
            error = ProxyError(
                ErrorKind.UPSTREAM_CANCELLED,
                ErrorSource.UPSTREAM,
                f"upstream {self.peer.name} cancelled the stream",
            )
        else:
            error = ProxyError(
                ErrorKind.UPSTREAM_PROTOCOL,
                ErrorSource.UPSTREAM,
                f"upstream {self.peer.name} reset the stream (error code {code})",
            )
        self.fail(error)

    def fail(self, error: ProxyError) -> None:
        """End the exchange with ``error`` (reported to the session, if any)."""
        sink = self.sink
        self.sink = None
        if not (self._ended and self._response_ended):
            self._reset(h2.errors.ErrorCodes.CANCEL)
        self._finish()
        if sink is not None:
            sink.on_upstream_error(error)

    def on_deadline(self) -> None:
        """The response stopped arriving for ``read_timeout``: cancel the stream."""
        if self.sink is None:
            return
        self.fail(
            ProxyError(
                ErrorKind.READ_TIMEOUT,
                ErrorSource.UPSTREAM,
                f"timed out reading from upstream {self.peer.name}",
            )
        )
        self.conn.flush()

    # sending ------------------------------------------------------------------------------

    def send_buffered(self) -> None:
        """Send buffered body bytes as far as the windows allow; END_STREAM after."""
        if self.closed or not self.stream_id:
            return
        conn = self.conn
        h2c = conn.h2
        stream_id = self.stream_id
        buffer = self._buffer
        try:
            self._buffered -= send_within_window(h2c, stream_id, buffer)
            if not buffer and self._end is not None and not self._ended:
                self._ended = True
                send_end(h2c, stream_id, self._end[0])
        except _H2_ERRORS as exc:
            self.fail(
                ProxyError(
                    ErrorKind.UPSTREAM_PROTOCOL,
                    ErrorSource.UPSTREAM,
                    f"cannot send to {self.peer.name}: {exc}",
                    cause=exc,
                )
            )
            return
        conn.flush()
        self.update_source()

    def update_source(self) -> None:
        """Pause the client above the high mark (or while the socket is full); resume it
        below the low one."""
        sink = self.sink
        if sink is None:
            return
        paused = self.conn.transport_paused or self._buffered > SEND_HIGH_WATER
        if paused and not self._source_paused and not self._ended:
            self._source_paused = True
            sink.pause_source()
        elif self._source_paused and not paused and self._buffered <= SEND_LOW_WATER:
            self._source_paused = False
            sink.resume_source()

    # internals ----------------------------------------------------------------------------

    def _credit_stream(self, size: int) -> None:
        try:
            self.conn.h2.increment_flow_control_window(size, self.stream_id)
        except _H2_ERRORS:
            pass

    def _reset(self, code: int) -> None:
        if self.stream_id and not self.closed:
            self.closed = True
            try:
                self.conn.h2.reset_stream(self.stream_id, code)
            except _H2_ERRORS:
                pass
            self.conn.flush()
        self.closed = True

    def _finish(self) -> None:
        self.closed = True
        if self._done:
            return
        self._done = True
        self.deadline = 0.0
        self._buffer = []
        self._buffered = 0
        self.conn._sweep.discard(self)
        self.conn.channel_done(self)
