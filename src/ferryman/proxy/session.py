"""Session: one request as hooks see it, and the state that moves its bytes.

A :class:`Session` is created per request by the downstream connection. Hooks read the
request (``req_header``, ``client_addr``, ``tls``) and may answer it themselves
(``respond``, ``write_response_header``, ``write_response_body``). Internally the session
is also the sink of both byte streams: request body chunks from the client go upstream
(or into the retry buffer), response events from the upstream connection go to the
client, with backpressure passed across in both directions.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, chunk, last_chunk
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader, reason_phrase
from ferryman.proxy.client import PAUSE_BODY, PAUSE_UPSTREAM, ClientSide
from ferryman.upstream.connection import UpstreamChannel, UpstreamSink

if TYPE_CHECKING:
    from ferryman.cache.http_cache import HttpCache, Judgement
    from ferryman.cache.storage import CacheWriter
    from ferryman.proxy.downstream import TlsInfo
    from ferryman.server.listener import Listener
    from ferryman.upstream.peer import HttpPeer

class _EngineHooks:
    """Late-bound engine entry points (engine.py imports this module, not vice versa)."""

    step: Any = None


_engine = _EngineHooks()

#: Request bodies up to this size stay replayable for a retry after they were sent.
RETRY_BUFFER: Final = 64 * 1024

#: How much :meth:`Session.send_body_from` reads from its source at a time.
SOURCE_CHUNK: Final = 64 * 1024
#: Most bytes one pass of the body-source pump sends before yielding to the event loop.
PUMP_BUDGET: Final = 1024 * 1024



_VISIBLE: Final = bytes(range(0x21, 0x7F))


def usable_request_id(value: bytes) -> bool:
    """Whether a client's ``X-Request-Id`` may be kept: 1 to 200 visible ASCII bytes."""
    return 0 < len(value) <= 200 and not value.translate(None, _VISIBLE)


class _RequestIds:
    """Request ids: a random per-process prefix and a counter (no syscall per id)."""

    def __init__(self) -> None:
        self.prefix = b""
        self.counter = 0
        self.reseed()

    def reseed(self) -> None:
        """A new prefix (at start and in each forked worker)."""
        self.prefix = os.urandom(8).hex().encode()
        self.counter = 0

    def next(self) -> bytes:
        self.counter += 1
        return b"%s%016x" % (self.prefix, self.counter)


_ids = _RequestIds()
os.register_at_fork(after_in_child=_ids.reseed)


def new_request_id() -> bytes:
    """A request id unique across processes: 32 hex digits."""
    return _ids.next()


class BodySource(Protocol):
    """Where :meth:`Session.send_body_from` pulls a response body from (a binary file)."""

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end."""

    def close(self) -> None:
        """Release the source; called once, whatever happened."""

# What the engine is waiting for.
_WAIT_NONE: Final = 0
_WAIT_HEAD: Final = 1
_WAIT_END: Final = 2
_WAIT_DRAIN: Final = 3


class Session(UpstreamSink):
    """One HTTP request/response exchange, as seen by the hooks.

    Attributes most hooks use:
        req_header: the client's request head (:class:`RequestHeader`); changes made before
            ``upstream_peer`` shape the request sent upstream.
        response_header: the response head sent to the client, once sent.
        retries: how many attempts failed so far (for ``upstream_peer``).
        max_retries: retry budget for this request (hooks may change it).
        allow_connect: set to ``True`` in a request hook to tunnel a CONNECT request.
        request_body_bytes / response_body_bytes: body bytes received / sent.
        upstream_status: the status the upstream answered, if any.
        peer: the last :class:`HttpPeer` chosen.
        start_time: ``time.time()`` when the request head arrived.
        upstream_connect_time: seconds it took to open the upstream connection (0.0 for
            a pooled or shared one; -1.0 while none was used).
        upstream_reused: the upstream connection carried requests before.
        upstream_header_at: ``time.time()`` when the upstream's response head arrived
            (0.0 if none did), recorded when a listener of the service keeps an access
            log.
    """

    __slots__ = (
        "_plan",
        "req_header",
        "response_header",
        "retries",
        "max_retries",
        "allow_connect",
        "request_body_bytes",
        "response_body_bytes",
        "upstream_status",
        "peer",
        "start_time",
        "upstream_connect_time",
        "upstream_reused",
        "upstream_header_at",
        "_request_id",
        "ctx",
        "_down",
        "_proxy",
        "_body_kind",
        "keep_alive",
        "_upgrade",
        "_upgrade_rest",
        "_req_done",
        "_req_trailers",
        "_req_buf",
        "_req_buffered",
        "_retry_buf",
        "_sent",
        "_replayable",
        "_up",
        "_up_chunked",
        "_up_streaming",
        "_up_resp",
        "_up_body_kind",
        "_up_ended",
        "_resp_trailers",
        "_pending",
        "_streaming",
        "_down_chunked",
        "_done",
        "_waiter",
        "_wait_for",
        "_body_filter",
        "_resp_body_filter",
        "_tunnel",
        "_tunnel_client_eof",
        "_tunnel_up_eof",
        "_continue_sent",
        "_error",
        "_sync",
        "_phase",
        "_batch",
        "_event_pending",
        "_trust_length",
        "_filter_ended",
        "_from_hook",
        "_request_number",
        "_resp_failed",
        "_head_only",
        "_source",
        "_pump_scheduled",
        "_source_left",
        "cache",
        "cache_judgement",
        "cache_status",
        "limit_status",
        "_cache_fill",
        "_fill_only",
        "_up_method",
        "_up_validators",
    )

    def __init__(
        self,
        down: ClientSide,
        head: RequestHeader,
        body_kind: int,
        keep_alive: bool,
    ) -> None:
        self._down = down
        plan = down._plan
        self._plan = plan
        self._proxy = plan.proxy
        self.req_header = head
        self.response_header: ResponseHeader | None = None
        self.retries = 0
        self.max_retries = plan.max_retries
        self.allow_connect = False
        self.request_body_bytes = 0
        self.response_body_bytes = 0
        self.upstream_status: int | None = None
        self.peer: HttpPeer | None = None
        self.start_time = time.time()
        self.upstream_connect_time = -1.0
        self.upstream_reused = False
        self.upstream_header_at = 0.0
        self._request_id: bytes | None = None
        self.ctx: Any = None
        self._body_kind = body_kind
        self.keep_alive = keep_alive
        self._upgrade = False
        self._upgrade_rest = b""
        self._req_done = body_kind == BODY_NONE
        self._req_trailers: Headers | None = None
        self._req_buf: list[bytes] = []
        self._req_buffered = 0
        self._retry_buf: list[bytes] | None = []
        self._sent = 0
        self._replayable = True
        self._up: UpstreamChannel | None = None
        self._up_chunked = False
        self._up_streaming = False
        self._up_resp: ResponseHeader | None = None
        self._up_body_kind = BODY_NONE
        self._up_ended = False
        self._resp_trailers: Headers | None = None
        self._pending: list[bytes] = []
        self._streaming = False
        self._down_chunked = False
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._wait_for = _WAIT_NONE
        self._body_filter = plan.request_body_filter
        self._resp_body_filter = plan.response_body_filter
        self._tunnel = False
        self._tunnel_client_eof = False
        self._tunnel_up_eof = False
        self._continue_sent = False
        self._error: ProxyError | None = None
        self._sync = False
        self._phase = 0
        self._batch = False
        self._event_pending = False
        self._trust_length = False
        self._filter_ended = False
        self._from_hook = False
        self._request_number = down.requests
        self._resp_failed = False
        self._head_only = False
        self._source: BodySource | None = None
        self._pump_scheduled = False
        self._source_left = -1
        self.cache: HttpCache | None = None
        self.cache_judgement: Judgement | None = None
        self.cache_status = ""
        #: why a limit refused the request (``rate``, ``concurrency``, ``unavailable``),
        #: "" when none did (for metrics and the access log)
        self.limit_status = ""
        self._cache_fill: CacheWriter | None = None
        self._fill_only = False
        self._up_method: bytes | None = None
        self._up_validators: list[tuple[bytes, bytes]] | None = None

    # read-only views for hooks ----------------------------------------------------------

    @property
    def client_addr(self) -> tuple[Any, ...] | None:
        """The client's socket address: ``(host, port)`` (IPv6: ``(host, port, flow, scope)``)."""
        return self._down.peer_addr()

    @property
    def client_ip(self) -> bytes:
        """The client's IP address as ASCII bytes (``b""`` if unknown); cached per connection."""
        return self._down.peer_ip()

    @property
    def server_addr(self) -> tuple[Any, ...] | None:
        """The local ``(host, port)`` the client connected to."""
        return self._down.local_addr()

    @property
    def tls(self) -> TlsInfo | None:
        """TLS details of the client connection (SNI, ALPN, peer certificate), or ``None``."""
        return self._down.tls_info

    @property
    def listener(self) -> Listener | None:
        """The :class:`~ferryman.server.Listener` the request arrived on."""
        return self._down.listener

    @property
    def http_version(self) -> str:
        """The client's HTTP version: ``"1.0"``, ``"1.1"`` or ``"2"``."""
        return self.req_header.version

    @property
    def is_tls(self) -> bool:
        """Whether the client connection is TLS."""
        return self._down.tls_info is not None

    @property
    def downstream_reused(self) -> bool:
        """Whether this client connection carried an earlier request."""
        return self._request_number > 1

    @property
    def response_started(self) -> bool:
        """Whether a response head was already sent to the client."""
        return self.response_header is not None

    @property
    def request_id(self) -> str:
        """This request's id: the client's ``X-Request-Id`` when it sent a usable one
        (1 to 200 visible ASCII characters), else one made here (32 hex digits, unique
        across processes). The same value goes upstream (``server.forwarded.request_id``)
        and into the access log."""
        return self.request_id_bytes().decode("latin-1")

    def request_id_bytes(self) -> bytes:
        """:attr:`request_id` as bytes."""
        rid = self._request_id
        if rid is None:
            given = self.req_header.headers.get(b"x-request-id")
            rid = given if given is not None and usable_request_id(given) else new_request_id()
            self._request_id = rid
        return rid

    @property
    def status(self) -> int:
        """Status of the response sent to the client (0 if none yet)."""
        return self.response_header.status if self.response_header is not None else 0

    @property
    def request_body_complete(self) -> bool:
        """Whether the whole request body has been received."""
        return self._req_done

    # writing a response from a hook -----------------------------------------------------

    def send_response(
        self,
        status: int,
        body: bytes | str = b"",
        headers: Headers | list[tuple[bytes, bytes]] | dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Send a whole response (head and body) to the client, without waiting.

        Adds Content-Length; ``content_type`` sets Content-Type. Usable from plain (sync)
        hooks; async hooks may prefer :meth:`respond`, which also waits for the write
        buffer to drain.
        """
        if isinstance(body, str):
            body = body.encode()
        if isinstance(headers, dict):
            headers = Headers(headers.items())
        resp = ResponseHeader(status, headers)
        if content_type is not None:
            resp.headers.set(b"Content-Type", content_type)
        down = self._down
        down.cork()
        self.send_response_header(resp, length=len(body))
        self.send_response_body(body, end_of_stream=True)
        down.uncork()

    async def respond(
        self,
        status: int,
        body: bytes | str = b"",
        headers: Headers | list[tuple[bytes, bytes]] | dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Send a whole response (see :meth:`send_response`) and wait for it to drain.

        For use from ``request_filter`` (then return ``True``) or ``fail_to_proxy``.
        """
        self.send_response(status, body, headers, content_type)
        await self._drain()

    def send_error(self, status: int) -> None:
        """Send an empty error response with ``status``.

        The client connection closes afterwards for statuses that mean framing is in doubt
        (400, 408, 413, 414, 431, 505) and whenever the request body was not fully read.
        """
        if status in (400, 408, 413, 414, 431, 505) or not self._req_done:
            self.keep_alive = False
        if self.req_header.raw_method == b"CONNECT":
            self.keep_alive = False  # what follows a refused CONNECT was meant for a tunnel
        self._from_hook = True
        resp = ResponseHeader(status, [(b"Content-Length", b"0")])
        self._write_head(resp, BODY_LENGTH)
        self._finish_response()

    async def respond_error(self, status: int) -> None:
        """Async form of :meth:`send_error`."""
        self.send_error(status)

    def send_response_header(
        self, response: ResponseHeader, end_of_stream: bool = False, length: int | None = None
    ) -> None:
        """Send ``response`` as the response head, without waiting.

        The body framing follows its Content-Length if set (or ``length``), else chunked
        (close-delimited for HTTP/1.0 clients). Responses that never have a body (1xx, 204,
        304) get no Content-Length from ``length`` or ``end_of_stream``.
        """
        if self.response_header is not None:
            raise RuntimeError("response header already sent")
        self._from_hook = True  # written by a hook: no response_body_filter, no re-framing
        status = response.status
        bodiless = status < 200 or status == 204 or status == 304
        if length is not None and not bodiless:
            response.headers.set(b"Content-Length", str(length))
        elif end_of_stream and not bodiless and b"content-length" not in response.headers:
            response.headers.set(b"Content-Length", b"0")
        kind = BODY_LENGTH if b"content-length" in response.headers else BODY_CHUNKED
        self._write_head(response, kind)
        if end_of_stream:
            self._finish_response()

    async def write_response_header(
        self, response: ResponseHeader, end_of_stream: bool = False, length: int | None = None
    ) -> None:
        """Send the response head (see :meth:`send_response_header`), then drain."""
        self.send_response_header(response, end_of_stream, length)
        await self._drain()

    def send_response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        """Send a piece of the response body (after the header), without waiting."""
        if self.response_header is None:
            raise RuntimeError("the response header must be sent first")
        if data:
            self._write_body(data)
        if end_of_stream:
            self._finish_response()

    async def write_response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        """Send a piece of the response body, then wait while the client is slow."""
        self.send_response_body(data, end_of_stream)
        await self._drain()

    def bypass_response_body_filter(self) -> None:
        """Send this response's body as it comes: ``response_body_filter`` is not called
        for it, and its Content-Length is kept. Call it from ``response_filter`` (or an
        earlier hook), before the response head goes out; a proxy that filters only some
        responses (compressing some, say) leaves the others untouched so."""
        if self.response_header is None:
            self._resp_body_filter = False

    def send_body_from(self, source: BodySource) -> None:
        """Stream the rest of the response body from ``source``, as fast as the client reads.

        ``source`` is a file opened in binary mode, or anything with ``read(size)`` and
        ``close()``; it is read in 64 KiB pieces only while the client connection can take
        more (no whole-body buffering, even in sync mode), then the response is ended and
        ``source`` closed — also when the client goes away or reading fails. Call it after
        the response head, from ``request_filter``, and return ``True``: the request ends
        when the body does. With a Content-Length, exactly that many bytes are sent: a
        source that gives more is cut there, one that gives fewer ends the connection.
        """
        resp = self.response_header
        if resp is None:
            raise RuntimeError("the response header must be sent first")
        if self._head_only or self._done:
            try:
                source.close()  # HEAD, 204, 304: no body goes out
            except Exception:  # noqa: BLE001 - the response is complete whatever close does
                pass
            self._finish_response()
            return
        self._source_left = -1
        if not self._down_chunked:
            value = resp.headers.get(b"content-length")
            if value is not None and value.isdigit():
                self._source_left = max(int(value) - self.response_body_bytes, 0)
        self._source = source
        self._pump()

    def _pump(self) -> None:
        """Move body bytes from the source to the client until its write buffer is full.

        At most :data:`PUMP_BUDGET` bytes per call: a fast client must not let one large
        body monopolise the event loop, so the rest continues on the next loop turn.
        """
        source = self._source
        down = self._down
        budget = PUMP_BUDGET
        while source is not None and not down.write_paused:
            if self._error is not None or not down.writable():
                self._close_source()  # the client is gone: read no further
                return
            if budget <= 0 or down.corked():  # (corked: writes would only pile up)
                if not self._pump_scheduled:
                    self._pump_scheduled = True
                    down.loop.call_soon(self._pump_later)
                return
            left = self._source_left
            try:
                data = source.read(SOURCE_CHUNK if left < 0 else min(SOURCE_CHUNK, left))
            except Exception as exc:  # noqa: BLE001 - any source failure ends the response
                self._source_failed(f"reading the response body failed: {exc!r}", exc)
                return
            if left >= 0:
                if len(data) > left:
                    data = data[:left]  # never past the Content-Length sent
                left -= len(data)
                self._source_left = left
            if not data:
                self._close_source()
                if left > 0:
                    self._source_failed(
                        f"the response body ended {left} bytes short of its Content-Length"
                    )
                    return
                self._finish_response()
                self._wake(_WAIT_END)
                return
            budget -= len(data)
            self._write_body(data)
            if left == 0:
                self._close_source()
                self._finish_response()
                self._wake(_WAIT_END)
                return

    def _pump_later(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def _source_failed(self, detail: str, cause: BaseException | None = None) -> None:
        """The body source broke: the response cannot be completed; close the connection."""
        self._close_source()
        self.keep_alive = False
        self._resp_failed = True
        self._fail_waiter(ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, detail, cause=cause))

    def _close_source(self) -> None:
        source = self._source
        self._source = None
        if source is not None:
            try:
                source.close()
            except Exception:  # noqa: BLE001 - a failing close must not break the connection
                pass

    async def _drain(self) -> None:
        if self._down.write_paused and not self._down.closed and not self._sync:
            await self._wait(_WAIT_DRAIN)

    # engine internals: waiting ----------------------------------------------------------
    #
    # A session runs in one of two modes (see engine.py). In sync mode (every overridden
    # hook is a plain function) there is no coroutine: an event calls engine.step(), which
    # advances the request on the spot, inside the callback that saw the event; events seen
    # while the upstream parser runs are gathered and stepped once it returns. In task mode
    # the request's task waits on a future that the event resolves.

    def _wake(self, what: int) -> None:
        if self._sync:
            if self._batch:
                self._event_pending = True
            else:
                _engine.step(self)
            return
        if self._wait_for != what:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(None)

    def _fail_waiter(self, error: ProxyError) -> None:
        self._error = error
        if self._sync:
            if self._batch:
                self._event_pending = True
            else:
                _engine.step(self)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_exception(error)

    async def _wait(self, what: int) -> None:
        """Task mode: suspend until ``what`` happened; raise the session's error if any."""
        if self._error is not None:
            raise self._error
        self._wait_for = what
        waiter = self._down.loop.create_future()
        self._waiter = waiter
        await waiter

    def begin_batch(self) -> None:
        """The upstream parser is about to run: gather events and writes."""
        self._batch = True
        self._down.cork()

    def end_batch(self) -> None:
        """The upstream parser returned: act on what happened, then flush the writes."""
        self._batch = False
        if self._event_pending:
            self._event_pending = False
            _engine.step(self)
        self._down.uncork()

    # request body: client → upstream ----------------------------------------------------

    def _on_req_body(self, data: bytes) -> None:
        self.request_body_bytes += len(data)
        if self._error is not None:
            return  # the request already failed: the rest of its body goes nowhere
        if self._up_streaming:
            if self._body_filter:
                out = self._filter_body(data, False)
                if not out:
                    return
                data = out
            self._send_body(data)
        else:
            # kept as received until the request goes upstream: request_body_filter runs
            # then, after request_filter, as the hook order says
            self._req_buf.append(data)
            self._req_buffered += len(data)
            if self._req_buffered > RETRY_BUFFER:
                self._down.pause(PAUSE_BODY)

    def _on_req_end(self, trailers: Headers | None) -> None:
        self._req_done = True
        self._req_trailers = trailers
        if self._error is not None or not self._up_streaming:
            return
        if self._body_filter and not self._filter_ended:
            self._filter_ended = True
            tail = self._filter_body(b"", True)
            if tail:
                self._send_body(tail)
        up = self._up
        if up is not None:
            if self._up_chunked:
                up.write(last_chunk(trailers))
            elif up.multiplexed:
                up.end_request(trailers)

    def _filter_body(self, data: bytes, end: bool) -> bytes | None:
        """Run request_body_filter; an exception in it fails the request with a 500."""
        try:
            return self._proxy.request_body_filter(self, data, end, self.ctx)
        except Exception as exc:  # noqa: BLE001 - a hook bug is the request's 500
            up = self._up
            self._up = None
            if up is not None:
                up.abort()
            self._fail_waiter(
                ProxyError(ErrorKind.HOOK_ERROR, ErrorSource.INTERNAL, repr(exc), cause=exc)
            )
            return None

    def _record_sent(self, data: bytes) -> None:
        """Count body bytes going upstream, keeping them while a retry is possible."""
        if self._replayable:
            if self._sent + len(data) <= RETRY_BUFFER:
                self._retry_buf.append(data)  # type: ignore[union-attr]
            else:
                self._replayable = False
                self._retry_buf = None
        self._sent += len(data)

    def _send_body(self, data: bytes) -> None:
        self._record_sent(data)
        up = self._up
        if up is not None:
            # the upstream's read timeout counts from the end of the request: while the
            # body is still flowing, push the deadline on
            up.touch()
            if self._up_chunked:
                up.writelines(chunk(data))
            else:
                up.write(data)

    def _send_request(self, up: UpstreamChannel, request: RequestHeader) -> None:
        """Send the head, what was sent before (on a retry) and what is buffered."""
        # (the body an earlier attempt sent, kept for a retry, goes again first)
        body = list(self._retry_buf) if self._retry_buf else []
        pieces = self._take_buffered()
        if pieces is None:
            return  # request_body_filter failed: the request is over
        body += pieces
        if up.multiplexed:
            self._send_request_multiplexed(up, request, body)
            return
        parts = [request.to_bytes()]
        chunked = self._up_chunked
        for piece in body:
            if chunked:
                parts += chunk(piece)
            else:
                parts.append(piece)
        if self._req_done and chunked:
            parts.append(last_chunk(self._req_trailers))
        up.writelines(parts)
        self._down.resume(PAUSE_BODY)

    def _take_buffered(self) -> list[bytes] | None:
        """The request body buffered so far, through ``request_body_filter`` (with its
        end-of-body call when the body is complete), counted as sent; ``None`` when the
        filter failed. From now on the body streams upstream as it arrives."""
        pending, self._req_buf = self._req_buf, []
        self._req_buffered = 0
        self._up_streaming = True
        filtered = self._body_filter and self._body_kind != BODY_NONE
        if filtered and self._req_done and not self._filter_ended:
            self._filter_ended = True
            pending.append(b"")  # marks the end-of-stream call below
            last = len(pending) - 1
        else:
            last = -1
        if not filtered:
            for piece in pending:
                self._record_sent(piece)
            return pending
        out: list[bytes] = []
        for i, piece in enumerate(pending):
            filtered_piece = self._filter_body(piece, i == last)
            if self._error is not None:
                return None
            if filtered_piece:
                self._record_sent(filtered_piece)
                out.append(filtered_piece)
        return out

    def _send_request_multiplexed(
        self, up: UpstreamChannel, request: RequestHeader, body: list[bytes]
    ) -> None:
        """:meth:`_send_request` for an HTTP/2 channel: the head (ending the stream when
        there is no body), then the body so far, then the end if it came."""
        if self._req_done and not body:
            up.send_head(request, self._req_trailers is None)
            if self._req_trailers is not None:
                up.end_request(self._req_trailers)
        else:
            up.send_head(request, False)
            for piece in body:
                up.write(piece)
            if self._req_done:
                up.end_request(self._req_trailers)
        self._down.resume(PAUSE_BODY)

    def _send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` once the request is going to be proxied."""
        if self._continue_sent or self._req_done or self.request_body_bytes:
            return
        req = self.req_header
        expect = req.headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and req.version != "1.0":
            self._continue_sent = True
            self._down.write_interim(100)

    def _reset_attempt(self) -> None:
        """Forget the failed attempt's upstream state before a retry."""
        self._up = None
        self._down.resume(PAUSE_UPSTREAM)
        self._up_streaming = False
        self._up_resp = None
        self._up_ended = False
        self._pending = []
        self._resp_trailers = None
        self._error = None

    # UpstreamSink: upstream → client ----------------------------------------------------

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        if self._plan.timed:
            self.upstream_header_at = time.time()
        self._up_resp = head
        self._up_body_kind = body_kind
        self.upstream_status = head.status
        self._wake(_WAIT_HEAD)

    def on_response_body(self, data: bytes) -> None:
        fill = self._cache_fill
        if fill is not None:
            fill.write(data)
            if self._fill_only:
                return
        if self._streaming:
            self._write_body(data)
        else:
            self._pending.append(data)

    def on_response_end(self, trailers: Headers | None) -> None:
        self._up_ended = True
        fill = self._cache_fill
        if fill is not None:
            self._cache_fill = None
            fill.finish()
        self._resp_trailers = trailers
        if self.upstream_status == 101:
            return  # the connection becomes a tunnel: keep it
        up = self._up
        self._up = None
        if up is not None:
            if self._req_done and self._up_streaming and not self._upgrade:
                up.release()
            else:
                up.close()  # answered before the request was fully sent: not clean
            # (its send buffer may have paused the client: the rest of the body goes
            # nowhere now, and the connection must read its next request)
            self._down.resume(PAUSE_UPSTREAM)
        if self._streaming:
            self._finish_response()
            self._wake(_WAIT_END)

    def on_upstream_error(self, error: ProxyError) -> None:
        self._abort_fill()
        self._up = None
        self._down.resume(PAUSE_UPSTREAM)
        self._error = error
        self._fail_waiter(error)

    def _abort_fill(self) -> None:
        """The response being stored in the cache will not be complete."""
        fill = self._cache_fill
        if fill is not None:
            self._cache_fill = None
            fill.abort()

    def pause_source(self) -> None:
        self._down.pause(PAUSE_UPSTREAM)

    def resume_source(self) -> None:
        self._down.resume(PAUSE_UPSTREAM)

    # downstream backpressure (called by the ClientSide) --------------------------------------

    def _down_paused(self) -> None:
        up = self._up
        if up is not None:
            up.pause_reading()

    def _down_resumed(self) -> None:
        up = self._up
        if up is not None:
            up.resume_reading()
        if self._source is not None:
            self._pump()
        self._wake(_WAIT_DRAIN)

    # writing to the client --------------------------------------------------------------

    def _write_head(self, resp: ResponseHeader, body_kind: int) -> None:
        """Frame and send a response head; decides chunking and keep-alive."""
        down = self._down
        req = self.req_header
        self.response_header = resp
        status = resp.status
        headers = resp.headers
        head_only = req.raw_method == b"HEAD" or status < 200 or status == 204 or status == 304
        filtered = self._resp_body_filter and not self._from_hook
        self._head_only = head_only
        if head_only:
            self._down_chunked = False
        elif body_kind == BODY_LENGTH and not filtered and (
            self._trust_length or b"content-length" in headers
        ):
            self._down_chunked = False
        else:
            headers.remove(b"content-length")
            if down.multiplexed:
                self._down_chunked = False  # (an HTTP/2 stream frames its body itself)
            elif req.version == "1.1":
                self._down_chunked = True
                headers.add(b"Transfer-Encoding", b"chunked")
            else:
                self.keep_alive = False
        self._trust_length = False
        if down.multiplexed:
            # a response that already ended with its head (a gRPC "trailers-only" answer
            # among them) stays one HEADERS frame with END_STREAM
            down.write_head(
                resp,
                head_only
                or (
                    body_kind == BODY_NONE
                    and self._up_ended
                    and not self._pending
                    and self._resp_trailers is None
                    and not filtered
                ),
            )
            return
        if down.draining or not down.service.running or not self._req_done:
            # (a response that starts before the request body was read ends the connection)
            self.keep_alive = False
        if status == 101:
            headers.set(b"Connection", b"upgrade")
        elif not self.keep_alive:
            headers.set(b"Connection", b"close")
        elif req.version == "1.0":
            headers.set(b"Connection", b"keep-alive")
        down.write(resp.to_bytes())

    def _filter_response(self, data: bytes, end: bool) -> bytes | None:
        """Run response_body_filter; an exception in it aborts the (started) response."""
        try:
            return self._proxy.response_body_filter(self, data, end, self.ctx)
        except Exception as exc:  # noqa: BLE001 - a hook bug must not look like a bad upstream
            up = self._up
            self._up = None
            if up is not None:
                up.abort()
            self.keep_alive = False
            self._resp_failed = True
            self._fail_waiter(
                ProxyError(ErrorKind.HOOK_ERROR, ErrorSource.INTERNAL, repr(exc), cause=exc)
            )
            return None

    def _write_body(self, data: bytes) -> None:
        if self._head_only:
            return  # HEAD, 1xx, 204, 304: whatever body there is never reaches the client
        if self._resp_body_filter and not self._from_hook:
            out = self._filter_response(data, False)
            if not out:
                return
            data = out
        self.response_body_bytes += len(data)
        if self._down_chunked:
            self._down.writelines(chunk(data))
        else:
            self._down.write(data)

    def _finish_response(self) -> None:
        """The response to the client is complete (body end written)."""
        if self._done:
            return
        self._done = True
        if self._resp_failed:
            return  # response_body_filter failed: no clean end, the client sees EOF
        if self._resp_body_filter and not self._from_hook:
            tail = self._filter_response(b"", True)
            if self._resp_failed:
                return
            if tail and not self._head_only:
                self.response_body_bytes += len(tail)
                if self._down_chunked:
                    self._down.writelines(chunk(tail))
                else:
                    self._down.write(tail)
        if self._down_chunked:
            self._down.write(last_chunk(self._resp_trailers))
        elif self._down.multiplexed:
            self._down.end_response(self._resp_trailers)

    def _flush_pending(self) -> None:
        """Send the head of the upstream response plus any body that already arrived."""
        pending, self._pending = self._pending, []
        self._streaming = True
        for piece in pending:
            self._write_body(piece)
        if self._up_ended:
            self._finish_response()

    # tunnels (101 Switching Protocols, CONNECT) -------------------------------------------

    def on_tunnel_data(self, data: bytes) -> None:
        if not self._tunnel:  # read with the 101 head, before the tunnel is set up
            self._pending.append(data)
            return
        self.response_body_bytes += len(data)
        self._down.write(data)

    def on_tunnel_eof(self) -> None:
        self._tunnel_up_eof = True
        self._down.write_eof()
        self._check_tunnel_done()

    def _on_client_tunnel_data(self, data: bytes) -> None:
        self.request_body_bytes += len(data)
        up = self._up
        if up is not None:
            up.write(data)

    def _on_client_tunnel_eof(self) -> None:
        self._tunnel_client_eof = True
        up = self._up
        if up is not None:
            up.write_eof()
        self._check_tunnel_done()

    def _check_tunnel_done(self) -> None:
        if self._tunnel_up_eof and self._tunnel_client_eof or self._down.closed:
            up = self._up
            self._up = None
            if up is not None:
                up.close()
            self._done = True
            self._wake(_WAIT_END)

    # the client went away or misbehaved ------------------------------------------------------

    def _on_client_error(self, error: ProxyError) -> None:
        """The client closed, timed out or sent a bad body: abandon the exchange."""
        if self._tunnel:
            self._tunnel_client_eof = True
            self._check_tunnel_done()
            return
        up = self._up
        self._up = None
        if up is not None:
            up.abort()  # never reuse a connection mid-exchange
            self._abort_fill()
        self._close_source()
        if not self._done:
            self._error = error
            self._fail_waiter(error)


def client_closed_error() -> ProxyError:
    """The error used when the client disconnects mid-request."""
    return ProxyError(
        ErrorKind.CLIENT_CLOSED, ErrorSource.DOWNSTREAM, "client closed the connection"
    )


__all__ = ["Session", "RETRY_BUFFER", "client_closed_error", "reason_phrase"]
