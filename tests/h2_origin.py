"""H2Origin: a real HTTP/2 origin server for the tests (asyncio + the ``h2`` library).

It listens on 127.0.0.1 (cleartext prior knowledge, or TLS with ALPN ``h2``) in a thread
of its own and records what it sees: connections, requests with their pseudo-headers,
streams open at once (and the most at one time), and streams the client reset.

Paths:

* ``/big?size=N``: N bytes of the test pattern, with content-length.
* ``/sha``: the request body's length and SHA-256 (``"<length> <hex>"``).
* ``/echo``: the request body back (``x-body-length`` says how long it was).
* ``/headers``: the request's fields (pseudo-headers included) as a JSON list.
* ``/trailers``: ``ok`` then trailers ``x-trailer: done``.
* ``/delay?ms=N``: ``slept`` after N milliseconds.
* ``/hang``: never answers (for cancellation).
* ``/noread``: never answers and never credits the request body's window back.
* ``/goaway?ms=N``: the head, then a GOAWAY naming this stream as the last, then the
  body ``finished`` after N milliseconds.
* ``/refuse``, ``/cancel``: RST_STREAM with REFUSED_STREAM or CANCEL.
* ``/protocol-error``: a DATA frame on stream 0 (a connection error for the client).
* ``/drop``: the head and 7 of 100,000 bytes, then the connection is reset.
* ``/goaway-before``: a GOAWAY whose last-stream-id is below this stream; no answer.
* ``/early``: ``early`` after 0.3 s, without reading (or crediting) the request body.
* ``/bigheader?size=N``: a response field ``x-big`` of N bytes.
* ``/status/N``: status N, empty body.

A fault path may end in ``-then-ok``; an origin made with ``faults=False`` answers fault
paths with ``hello h2``, so a group of a faulty and a healthy origin shows retries.
* anything else: ``hello h2``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from origin import pattern_bytes

_FAULTS = frozenset(("/refuse", "/cancel", "/protocol-error", "/drop", "/goaway-before"))


class _Stream:
    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers
        fields = dict(headers)
        self.method = fields.get(b":method", b"")
        self.target = fields.get(b":path", b"").decode()
        self.path = urlsplit(self.target).path
        self.query = {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}
        self.body = bytearray()
        self.hasher = hashlib.sha256()
        self.length = 0
        self.pending = bytearray()
        self.sent = 0  # response body bytes sent (as the client's windows allowed)
        self.end_after: list[tuple[bytes, bytes]] | bool = False  # trailers, or True
        self.done = False
        self.task: asyncio.Task[None] | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, origin: H2Origin) -> None:
        self.origin = origin
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.highest = 0
        self.active = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with self.origin.lock:
            self.origin.connections += 1
            self.serial = self.origin.connections_ever = self.origin.connections_ever + 1
        self.origin._conns.add(self)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.origin.max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.origin.window,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin._conns.discard(self)
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
            self._stream_gone(stream)
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                stream = _Stream(event.stream_id, [(bytes(n), bytes(v)) for n, v in event.headers])
                self.highest = max(self.highest, event.stream_id)
                self.streams[event.stream_id] = stream
                origin = self.origin
                self.active += 1
                with origin.lock:
                    origin.requests.append((stream.method, stream.target, stream.headers))
                    origin.served_on[stream.target] = self.serial
                    origin.served_by.add(self.serial)
                    origin.active += 1
                    origin.max_active = max(origin.max_active, origin.active)
                    origin.max_per_connection = max(origin.max_per_connection, self.active)
                # (h2 also reports StreamEnded for a request that ended with its head)
                if stream.path == "/early":  # answered without waiting for the body
                    stream.task = asyncio.get_running_loop().create_task(
                        self._later(stream, 0.3, b"early")
                    )
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.path not in ("/noread", "/early"):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                if stream is not None:
                    stream.length += len(event.data)
                    if stream.path == "/sha":
                        stream.hasher.update(event.data)
                    else:
                        stream.body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._handle(stream)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    with self.origin.lock:
                        self.origin.resets.append((stream.target, int(event.error_code)))
                    if stream.task is not None:
                        stream.task.cancel()
                    self._stream_gone(stream)
            elif isinstance(event, h2.events.TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    with self.origin.lock:
                        self.origin.request_trailers[stream.target] = [
                            (bytes(n), bytes(v)) for n, v in event.headers
                        ]
            elif isinstance(event, h2.events.PingReceived):
                with self.origin.lock:
                    self.origin.pings += 1
            elif isinstance(event, h2.events.WindowUpdated):
                for stream in list(self.streams.values()):
                    self._send_pending(stream)
        self.flush()

    def _stream_gone(self, stream: _Stream) -> None:
        if not stream.done:
            stream.done = True
            self.active -= 1
            with self.origin.lock:
                self.origin.active -= 1

    # responses ----------------------------------------------------------------------------

    def _respond(
        self,
        stream: _Stream,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        fields = [(b":status", str(status).encode())] + list(headers or [])
        if trailers is None:
            fields.append((b"content-length", str(len(body)).encode()))
        if stream.method == b"HEAD":
            body, trailers = b"", None
        self.conn.send_headers(stream.stream_id, fields, end_stream=not body and not trailers)
        if body or trailers:
            stream.pending += body
            stream.end_after = trailers or True
            self._send_pending(stream)
        else:
            self._finish(stream)
        self.flush()

    def _send_pending(self, stream: _Stream) -> None:
        if stream.done or stream.stream_id not in self.streams:
            return
        conn = self.conn
        try:
            while stream.pending:
                window = min(
                    conn.local_flow_control_window(stream.stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                piece = bytes(stream.pending[:window])
                del stream.pending[:window]
                conn.send_data(stream.stream_id, piece)
                stream.sent += len(piece)
            if not stream.pending and stream.end_after:
                if isinstance(stream.end_after, list):
                    conn.send_headers(stream.stream_id, stream.end_after, end_stream=True)
                else:
                    conn.end_stream(stream.stream_id)
                stream.end_after = False
                self._finish(stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._finish(stream)
        self.flush()

    def _finish(self, stream: _Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._stream_gone(stream)

    def _handle(self, stream: _Stream) -> None:
        path, q = stream.path, stream.query
        path = path.removesuffix("-then-ok")
        if path in _FAULTS and not self.origin.faults:
            path = "/"  # (a healthy origin answers fault paths normally)
        if path == "/big":
            self._respond(stream, 200, pattern_bytes(int(q.get("size", "1048576"))))
        elif path == "/sha":
            text = f"{stream.length} {stream.hasher.hexdigest()}".encode()
            self._respond(stream, 200, text)
        elif path == "/echo":
            body = bytes(stream.body)
            self._respond(stream, 200, body, [(b"x-body-length", str(len(body)).encode())])
        elif path == "/headers":
            data = json.dumps([[n.decode(), v.decode()] for n, v in stream.headers]).encode()
            self._respond(stream, 200, data, [(b"content-type", b"application/json")])
        elif path == "/trailers":
            self._respond(stream, 200, b"ok", None, [(b"x-trailer", b"done")])
        elif path == "/delay":
            stream.task = asyncio.get_running_loop().create_task(
                self._later(stream, int(q.get("ms", "100")) / 1000, b"slept")
            )
        elif path in ("/hang", "/noread", "/early"):
            pass
        elif path == "/bigheader":
            size = int(q.get("size", "100000"))
            self._respond(stream, 200, b"big header", [(b"x-big", b"b" * size)])
        elif path == "/goaway":
            self.conn.send_headers(stream.stream_id, [(b":status", b"200")])
            self.flush()
            # written by hand: h2's close_connection would close its state machine, and
            # the stream in flight could not be finished
            goaway = hyperframe.frame.GoAwayFrame(0)
            goaway.last_stream_id = self.highest
            assert self.transport is not None
            self.transport.write(goaway.serialize())
            self.origin.goaway_sent.set()
            stream.task = asyncio.get_running_loop().create_task(
                self._later(stream, int(q.get("ms", "300")) / 1000, b"finished", head=False)
            )
        elif path == "/refuse":
            self.conn.reset_stream(stream.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._finish(stream)
            self.flush()
        elif path == "/cancel":
            self.conn.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._finish(stream)
            self.flush()
        elif path == "/protocol-error":
            assert self.transport is not None
            self.transport.write(hyperframe.frame.DataFrame(0, b"x").serialize()[:9] + b"x")
        elif path == "/drop":
            self.conn.send_headers(
                stream.stream_id, [(b":status", b"200"), (b"content-length", b"100000")]
            )
            self.conn.send_data(stream.stream_id, b"partial")
            self.flush()
            assert self.transport is not None
            self.transport.abort()
        elif path == "/goaway-before":
            goaway = hyperframe.frame.GoAwayFrame(0)
            goaway.last_stream_id = max(0, stream.stream_id - 2)
            assert self.transport is not None
            self.transport.write(goaway.serialize())
        elif path.startswith("/status/"):
            self._respond(stream, int(path.rsplit("/", 1)[1]), b"")
        else:
            self._respond(stream, 200, b"hello h2\n")

    async def _later(self, stream: _Stream, delay: float, body: bytes, head: bool = True) -> None:
        await asyncio.sleep(delay)
        if stream.done:
            return
        if head:
            self._respond(stream, 200, body)
        else:
            stream.pending += body
            stream.end_after = True
            self._send_pending(stream)


class H2Origin:
    """An HTTP/2 origin on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        max_streams: int = 1000,
        tls: ssl.SSLContext | None = None,
        faults: bool = True,
        window: int = 1 << 20,
    ) -> None:
        self.max_streams = max_streams
        self.window = window
        self.faults = faults
        self.tls = tls
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[bytes, str, list[tuple[bytes, bytes]]]] = []
        self.resets: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0
        self.max_per_connection = 0
        self.pings = 0
        self.connections_ever = 0
        #: which connection (numbered from 1) the last request for a target came on
        self.served_on: dict[str, int] = {}
        #: the connections that carried requests since the last reset_counts
        self.served_by: set[int] = set()
        #: request trailers by target
        self.request_trailers: dict[str, list[tuple[bytes, bytes]]] = {}
        #: set when /goaway has written its GOAWAY
        self.goaway_sent = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> H2Origin:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()

            async def serve() -> None:
                self._server = await loop.create_server(
                    lambda: _Connection(self), "127.0.0.1", 0, ssl=self.tls, backlog=1024
                )
                self.port = self._server.sockets[0].getsockname()[1]
                started.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="h2-origin", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def reset_counts(self) -> None:
        with self.lock:
            self.connections = 0
            self.requests.clear()
            self.resets.clear()
            self.max_active = self.active
            self.max_per_connection = 0
            self.pings = 0
            self.served_by.clear()
            self.request_trailers.clear()
            self.goaway_sent.clear()

    def sent_for(self, target: str) -> int:
        """Response body bytes sent so far to the open stream for ``target``."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._sent_for(target), self._loop)
        return future.result(5)

    async def _sent_for(self, target: str) -> int:
        return sum(
            s.sent
            for c in list(self._conns)
            for s in c.streams.values()
            if s.target == target
        )

    def received_for(self, target: str) -> int:
        """Request body bytes received so far on the open stream for ``target``."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._received_for(target), self._loop)
        return future.result(5)

    async def _received_for(self, target: str) -> int:
        return sum(
            s.length
            for c in list(self._conns)
            for s in c.streams.values()
            if s.target == target
        )
