"""HTTP/1.x wire protocol, sans-IO: bytes in, handler callbacks out.

:class:`RequestParser` (downstream side) and :class:`ResponseParser` (upstream side) wrap
llhttp (through httptools) for tokenizing and add what a proxy needs on top: limits with
precise errors (414, 431, 413), refusal of ambiguous framing, version checks, trailers,
HEAD responses, close-delimited bodies and upgrades. Neither touches a socket: feed them
bytes and they call methods on a handler object, so they are testable byte by byte.

The serializers at the bottom build request/response heads and chunked framing.
"""

from __future__ import annotations

from typing import Final, Protocol

import httptools

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.headers import HeaderPair, Headers, RequestHeader, ResponseHeader

# Body framing of one message.
BODY_NONE: Final = 0  #: no body (GET without length, HEAD response, 204, 304, 1xx)
BODY_LENGTH: Final = 1  #: Content-Length delimited
BODY_CHUNKED: Final = 2  #: chunked transfer coding
BODY_CLOSE: Final = 3  #: delimited by the connection closing (responses only)

_BODY_METHODS_NO_RESPONSE_BODY: Final = (b"HEAD",)


_NO_HEADERS: Final[list[HeaderPair]] = []  # shared placeholder, never appended to
_OWS: Final = (0x20, 0x09)


def _bad(detail: str, kind: ErrorKind = ErrorKind.BAD_REQUEST) -> ProxyError:
    return ProxyError(kind, ErrorSource.DOWNSTREAM, detail)


def _bad_upstream(detail: str) -> ProxyError:
    return ProxyError(ErrorKind.INVALID_RESPONSE, ErrorSource.UPSTREAM, detail)


def _version_at(src: bytes, pos: int, after: int) -> str | None:
    """``"1.1"`` or ``"1.0"`` if ``src`` holds ``HTTP/1.1`` or ``HTTP/1.0`` at ``pos``,
    followed by the byte ``after``; else None.

    The parsers read a message's version from the bytes it arrived in when they can:
    httptools' ``get_http_version()`` formats a new string on every call (~0.13 us).
    Only a start line llhttp accepted gets here, so a misplaced ``pos`` fails the check:
    a request line is ``METHOD SP target SP version CR`` and no CR precedes its end; a
    status line starts with its version (``pos`` 0), which no other byte sequence of an
    accepted line matches at offset 0 but itself.
    """
    if pos < 0 or pos + 9 > len(src) or src[pos + 8] != after:
        return None
    if (
        src[pos] != 0x48  # H
        or src[pos + 1] != 0x54  # T
        or src[pos + 2] != 0x54  # T
        or src[pos + 3] != 0x50  # P
        or src[pos + 4] != 0x2F  # /
        or src[pos + 5] != 0x31  # 1
        or src[pos + 6] != 0x2E  # .
    ):
        return None
    minor = src[pos + 7]
    if minor == 0x31:
        return "1.1"
    if minor == 0x30:
        return "1.0"
    return None


class RequestHandler(Protocol):
    """What a :class:`RequestParser` reports to."""

    def on_request_head(self, head: RequestHeader, body_kind: int, content_length: int) -> None:
        """A complete request head arrived; ``body_kind`` is one of the ``BODY_*`` values."""

    def on_request_body(self, data: bytes) -> None:
        """A piece of (de-chunked) request body."""

    def on_request_end(self, trailers: Headers | None) -> None:
        """The request message is complete (with trailers for chunked bodies, if any)."""

    def on_request_upgrade(self, rest: bytes) -> None:
        """The request asked for an upgrade (or was CONNECT); parsing stops here.

        ``rest`` is whatever followed the head in the same read. Later bytes are held by
        the parser until :meth:`RequestParser.resume` or :meth:`RequestParser.take_buffer`.
        """


class RequestLimits:
    """Limits on a request head and body; exceeding one is a 414, 431 or 413."""

    __slots__ = ("max_request_line", "max_header_bytes", "max_headers", "max_body")

    def __init__(
        self,
        max_request_line: int = 8192,
        max_header_bytes: int = 32768,
        max_headers: int = 100,
        max_body: int = 0,
    ) -> None:
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body = max_body  # 0 = unlimited


class RequestParser:
    """Parses a stream of HTTP/1.x requests from one client connection.

    Pipelined requests are reported in order. Ambiguous framing (Content-Length with
    Transfer-Encoding, repeated Content-Length, invalid chunk sizes, bare CR or LF,
    obs-fold, NUL and other invalid bytes) raises a 400 :class:`ProxyError`; the caller
    must then close the connection, since framing is in doubt.
    """

    __slots__ = (
        "_handler",
        "_limits",
        "_parser",
        "_url",
        "_headers",
        "_header_bytes",
        "_head_bytes",
        "_bound",
        "_in_head",
        "_in_body",
        "_body_bytes",
        "_feed_body",
        "_trailers",
        "_error",
        "_upgraded",
        "_held",
        "_head_limit",
        "_manual_body",
        "_feeding",
        "_line_src",
        "_closing",
    )

    def __init__(self, handler: RequestHandler, limits: RequestLimits | None = None) -> None:
        self._handler = handler
        self._limits = limits = limits or RequestLimits()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[HeaderPair] = _NO_HEADERS  # replaced at each message begin
        self._header_bytes = 0
        self._head_bytes = 0
        # an upper bound of the size of any head completed during the current feed
        self._bound = 0
        self._in_head = False
        self._in_body = False
        self._body_bytes = 0
        # body bytes passed on during the current feed (to bound a head begun mid-read)
        self._feed_body = 0
        self._trailers: list[HeaderPair] | None = None
        self._error: ProxyError | None = None
        self._upgraded = False
        self._held: list[bytes] | None = None
        self._head_limit = limits.max_request_line + limits.max_header_bytes + 64
        # Content-Length bytes still to pass on by hand: llhttp skips the body of a
        # request that asks for an Upgrade, so for one that has a body (h2c upgrades from
        # curl do) the upgrade is ignored and its body counted out here
        self._manual_body = 0
        # inside feed(): a handler that completes a response from a callback must not
        # hand this parser on while the rest of the bytes are still being parsed
        self._feeding = False
        # the bytes the current message began in, when it began at their start: its
        # request line (and so its version) is usually there
        self._line_src: bytes | None = None
        # llhttp read "Connection: close" in the trailers of the last message: it takes
        # no further bytes (the head said keep-alive, so the handler must be told)
        self._closing = False

    @property
    def in_message(self) -> bool:
        """True while a request has started but not completed (head or body pending)."""
        return self._in_head or self._in_body

    @property
    def head_started(self) -> bool:
        """True while a request head is partially received."""
        return self._in_head

    @property
    def reusable(self) -> bool:
        """True between two messages: nothing pending, no error, no upgrade.

        If the last message was a keep-alive one, such a parser can go on with another
        connection's stream (see :class:`RequestParserPool`). After a message that
        closes the connection llhttp refuses further bytes, and that is not tracked
        here: the caller knows (``should_keep_alive()`` at the head).
        """
        return not (
            self._feeding
            or self._closing
            or self._in_head
            or self._in_body
            or self._upgraded
            or self._manual_body
            or self._held
            or self._error is not None
        )

    def feed(self, data: bytes) -> None:
        """Parse ``data``; report events to the handler; raise ``ProxyError`` on bad input."""
        error = self._error
        if error is not None:  # (an error found outside llhttp leaves llhttp parsing)
            raise error
        self._feeding = True
        try:
            self._feed(data)
        finally:
            self._feeding = False

    def _feed(self, data: bytes) -> None:
        if self._upgraded:
            if self._held is None:
                self._held = []
            self._held.append(data)
            return
        if self._manual_body:
            data = self._feed_manual_body(data)
            if not data:
                return
        # (bytes between messages, such as stray empty lines, count towards no head)
        partial = self._head_bytes if self._in_head else 0
        self._bound = partial + len(data)
        self._feed_body = 0
        if not self._in_body:
            self._head_bytes = partial + len(data)
            if not self._in_head:
                self._line_src = data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if self._manual_body:  # not an upgrade after all: the rest is its body
                if rest:
                    self._feed(rest)
                return
            self._upgraded = True
            self._handler.on_request_upgrade(rest)
            return
        except httptools.HttpParserError as exc:
            err = self._error
            if err is not None:
                raise err from None
            if "HTTP version" in str(exc):
                kind = ErrorKind.VERSION_NOT_SUPPORTED
                raise _bad(f"unsupported HTTP version: {exc}", kind) from None
            raise _bad(f"malformed request: {exc}") from None
        if self._in_head:
            if self._head_bytes < 0:
                self._head_bytes = self._partial_head_bound(data)
            if self._head_bytes > self._head_limit:
                if not self._headers and len(self._url) > self._limits.max_request_line:
                    self._error = _bad("request line too long", ErrorKind.REQUEST_LINE_TOO_LONG)
                else:
                    self._error = _bad(
                        "request header section too large", ErrorKind.HEADERS_TOO_LARGE
                    )
                raise self._error

    def _partial_head_bound(self, data: bytes) -> int:
        """An upper bound of the size of a head that began inside ``data`` after an earlier
        message ended there, and is still incomplete.

        The bytes fed bound a head that began with a read; this one began mid-read, at an
        offset llhttp does not tell. Two bounds, the smaller wins: everything in ``data``
        that was not body; and the head's parts, which are its request line, the fields
        httptools has reported and the lines in progress. Those start after the last LF
        in ``data`` or, when ``data`` ends with a line end (CR), after the LF before it:
        httptools reports a field only when the next one begins. The request line is
        counted on its own only once complete (a line in progress that starts with the
        method and a space is the request line itself).
        """
        end = len(data)
        if end and data[end - 1] == 0x0D:
            end -= 1
        if end and data[end - 1] == 0x0A:
            end -= 1
        start = data.rfind(b"\n", 0, end) + 1
        size = len(data) - start
        method = self._parser.get_method() or b""
        if not (data.startswith(method, start) and data.startswith(b" ", start + len(method))):
            size += len(method) + len(self._url) + 12
        for name, value in self._headers:
            size += len(name) + len(value) + 4
        return min(size, len(data) - self._feed_body)

    def _feed_manual_body(self, data: bytes) -> bytes:
        """Pass on body bytes of an ignored upgrade; return what follows the body."""
        remaining = self._manual_body
        piece = data[:remaining]
        self._manual_body = remaining - len(piece)
        self.on_body(piece)
        if not self._manual_body:
            self._end_message()
        return data[len(piece) :]

    def resume(self, rest: bytes = b"") -> None:
        """Continue parsing after an upgrade the upstream refused (no tunnel was made).

        ``rest`` is what :meth:`RequestHandler.on_request_upgrade` was given; it is parsed
        first, then whatever arrived since.
        """
        self._upgraded = False
        held, self._held = self._held, None
        for data in (rest, *(held or ())):
            if data:
                self.feed(data)

    def take_buffer(self) -> bytes:
        """Bytes received after an accepted upgrade, for the tunnel."""
        held, self._held = self._held, None
        return b"".join(held) if held else b""

    # httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        # (_header_bytes, _body_bytes and _trailers are reset when a message ends)
        self._in_head = True
        self._url = b""
        self._headers = []
        if not self._head_bytes:
            # a head or a body ended earlier in this read, so where in it this head began
            # is unknown: if the read ends inside it, _feed bounds its size from what was
            # parsed (_partial_head_bound). (A read that begins a head sets its length.)
            self._head_bytes = -1

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        self._url = url
        if len(url) > self._limits.max_request_line:
            self._error = _bad("request line too long", ErrorKind.REQUEST_LINE_TOO_LONG)
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in _OWS:
            stripped = value.rstrip(b" \t")  # RFC 9112 §5: trailing whitespace is not value
            # except a HTAB after a Transfer-Encoding, which llhttp refuses once the head
            # was reported: kept, so that the head is refused first (_transfer_coding_error)
            if not (len(name) == 17 and b"\t" in value and name.lower() == b"transfer-encoding"):
                value = stripped
        if self._in_head:
            # sizes and counts are checked once the head is complete (or, for a head
            # still incomplete, by the bytes fed so far), not per header
            self._headers.append((name, value))
        else:
            trailers = self._trailers
            if trailers is None:
                trailers = self._trailers = []
            self._header_bytes += len(name) + len(value) + 4
            if self._header_bytes > self._limits.max_header_bytes:
                self._error = _bad("trailer section too large", ErrorKind.HEADERS_TOO_LARGE)
                raise self._error
            trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        head_bytes = self._bound
        self._head_bytes = 0
        parser = self._parser
        method = parser.get_method()
        src = self._line_src
        self._line_src = None
        found = None
        if src is not None:  # "METHOD SP target SP HTTP/1.1 CR LF" from its start
            found = _version_at(src, len(method) + len(self._url) + 2, 0x0D)
        version = found if found is not None else parser.get_http_version()
        if version != "1.1" and version != "1.0":
            if version.startswith("0."):
                self._error = _bad(f"unsupported HTTP version {version}")
            else:
                self._error = _bad(
                    f"unsupported HTTP version {version}", ErrorKind.VERSION_NOT_SUPPORTED
                )
            raise self._error
        items = self._headers
        hosts = 0
        te: bytes | None = None
        cl: bytes | None = None
        for name, value in items:
            n = len(name)
            if n == 4 or n == 14 or n == 17:
                lname = name.lower()
                if lname == b"host":
                    hosts += 1
                elif lname == b"content-length":
                    cl = value
                elif lname == b"transfer-encoding":
                    te = value if te is None else te + b"," + value
                elif lname == b"content_length" or lname == b"transfer_encoding":
                    # a server that maps "_" to "-" (CGI, WSGI) would read a second framing
                    # header that this proxy ignores: refuse the look-alike outright
                    self._error = _bad(f"invalid header name {name.decode('latin-1')}")
                    raise self._error
        limits = self._limits
        # the bytes read for this head bound its size: count precisely only when needed
        if (
            head_bytes > limits.max_header_bytes
            and sum(len(n) + len(v) + 4 for n, v in items) > limits.max_header_bytes
        ) or len(items) > limits.max_headers:
            self._error = _bad("too many or too large headers", ErrorKind.HEADERS_TOO_LARGE)
            raise self._error
        if hosts > 1 or (not hosts and version == "1.1"):
            self._error = _bad("exactly one Host header is required")
            raise self._error
        headers = Headers._wrap(items)
        content_length = 0
        if te is not None:
            if version == "1.0":
                # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
                # framing (a 1.0 recipient downstream may read it by Content-Length)
                self._error = _bad("Transfer-Encoding in an HTTP/1.0 request")
                raise self._error
            if te.lower() != b"chunked":
                error = _transfer_coding_error(te)
                if error is not None:
                    self._error = error
                    raise error
            body_kind = BODY_CHUNKED
        elif cl is not None:
            content_length = int(cl)
            body_kind = BODY_LENGTH if content_length else BODY_NONE
        else:
            body_kind = BODY_NONE
        max_body = self._limits.max_body
        if max_body and content_length > max_body:
            self._error = _bad("request body too large", ErrorKind.BODY_TOO_LARGE)
            raise self._error
        self._in_body = body_kind != BODY_NONE
        if self._in_body and parser.should_upgrade():
            if body_kind == BODY_CHUNKED:
                self._error = _bad("an Upgrade request with a chunked body is not supported")
                raise self._error
            self._manual_body = content_length
        head = RequestHeader(method, self._url, headers, version)
        self._handler.on_request_head(head, body_kind, content_length)

    def on_body(self, data: bytes) -> None:
        self._feed_body += len(data)
        max_body = self._limits.max_body
        if max_body:
            self._body_bytes += len(data)
            if self._body_bytes > max_body:
                self._error = _bad("request body too large", ErrorKind.BODY_TOO_LARGE)
                raise self._error
        self._handler.on_request_body(data)

    def on_message_complete(self) -> None:
        if self._manual_body:
            return  # llhttp skipped the body of an upgrade request; it is counted by hand
        self._end_message()

    def _end_message(self) -> None:
        self._in_body = False
        self._in_head = False
        trailers = self._trailers
        if trailers is not None:
            self._trailers = None
            self._header_bytes = 0
            # a Connection: close in the trailers ends the stream (llhttp's verdict, which
            # it reports only inside this callback)
            if not self._parser.should_keep_alive():
                self._closing = True
        self._body_bytes = 0
        self._handler.on_request_end(Headers._wrap(trailers) if trailers else None)

    @property
    def closing(self) -> bool:
        """True once a message ended the stream after its head (``Connection: close`` in
        its trailers): the connection must close after the response."""
        return self._closing


class _NoHandler:
    """The handler of a pooled parser: no connection is listening to it."""

    def on_request_head(self, head: RequestHeader, body_kind: int, content_length: int) -> None:
        raise AssertionError("a pooled RequestParser was fed")

    def on_request_body(self, data: bytes) -> None:
        raise AssertionError("a pooled RequestParser was fed")

    def on_request_end(self, trailers: Headers | None) -> None:
        raise AssertionError("a pooled RequestParser was fed")

    def on_request_upgrade(self, rest: bytes) -> None:
        raise AssertionError("a pooled RequestParser was fed")


_NO_HANDLER: Final = _NoHandler()


def _transfer_coding_error(te: bytes) -> ProxyError | None:
    """The error for a request's Transfer-Encoding list (all its field lines joined), or
    None when it is ``chunked`` alone (with optional spaces around it).

    llhttp refuses CL+TE itself, but some bad lists only once it reads the body, after the
    head was reported: every verdict is made here, before. RFC 9112 §6.1 and §6.3: chunked
    must be the final coding and appear once (else 400); a coding this proxy does not
    implement gets 501, as nginx answers. llhttp refuses OWS other than SP around a coding,
    so a HTAB is refused here too (400), keeping one verdict for the head.
    """
    if b"\t" in te:
        return _bad("invalid Transfer-Encoding")
    # (empty list elements are allowed and ignored: RFC 9110 §5.6.1)
    codings = [c for c in (c.strip(b" ").lower() for c in te.split(b",")) if c]
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        return _bad("Transfer-Encoding must end with chunked, once")
    if len(codings) == 1:
        return None
    return ProxyError(
        ErrorKind.NOT_IMPLEMENTED,
        ErrorSource.DOWNSTREAM,
        "transfer coding not implemented: " + te.decode("latin-1"),
    )


class RequestParserPool:
    """Request parsers lent to client connections while they have a request to read.

    An idle keep-alive connection needs no parser: between two requests the parser holds
    no state that the next request depends on. A parser with its llhttp state and bound
    callbacks is about 1.1 KiB, over a third of an idle connection's memory, so a
    connection gives its parser back here when it goes idle and takes one (this one or
    another) when bytes arrive. At most ``cap`` parsers are kept; more are dropped.
    """

    __slots__ = ("_free", "_limits", "_cap", "made")

    def __init__(self, limits: RequestLimits | None = None, cap: int = 256) -> None:
        self._free: list[RequestParser] = []
        self._limits = limits or RequestLimits()
        self._cap = cap
        #: parsers made so far (lent ones are reused first)
        self.made = 0

    def take(self, handler: RequestHandler) -> RequestParser:
        """A parser at a message boundary, reporting to ``handler``."""
        free = self._free
        if free:
            parser = free.pop()
            parser._handler = handler
            return parser
        self.made += 1
        return RequestParser(handler, self._limits)

    def give(self, parser: RequestParser) -> bool:
        """Take ``parser`` back if it is between messages; False if it was not taken.

        Give back only a parser whose last message was a keep-alive one (llhttp refuses
        bytes after a ``Connection: close`` message); one inside a message, after an
        error or an upgrade is refused here.
        """
        if not parser.reusable:
            return False
        parser._handler = _NO_HANDLER
        parser._url = b""
        parser._headers = _NO_HEADERS
        parser._head_bytes = 0
        parser._line_src = None
        if len(self._free) < self._cap:
            self._free.append(parser)
        return True

    def __len__(self) -> int:
        return len(self._free)


class ResponseHandler(Protocol):
    """What a :class:`ResponseParser` reports to."""

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        """A final (non-1xx, or 101) response head arrived."""

    def on_response_body(self, data: bytes) -> None:
        """A piece of (de-chunked) response body."""

    def on_response_end(self, trailers: Headers | None) -> None:
        """The response is complete."""


class ResponseParser:
    """Parses the responses read from one upstream connection.

    Call :meth:`expect` before each request is sent, naming its method, so that a HEAD
    response (headers only, whatever its Content-Length) is framed right; bytes that
    arrive when no response is expected (after the last one ended) are an error. Interim 1xx
    responses other than 101 are skipped. At end of stream call :meth:`feed_eof`: it ends
    a close-delimited body, and reports a truncated one as an error. A head of more than
    ``max_head`` bytes or ``max_headers`` fields is an error too (502), as in HAProxy, whose
    default is 101 fields.
    """

    __slots__ = (
        "_handler",
        "_parser",
        "_status",
        "_headers",
        "_trailers",
        "_in_head",
        "_in_body",
        "_body_kind",
        "_head_only",
        "_head_buf",
        "_max_head",
        "_max_headers",
        "_head_bytes",
        "_bound",
        "_error",
        "_line_src",
        "_first_read",
        "upgraded_rest",
        "complete",
        "keep_alive",
    )

    def __init__(
        self, handler: ResponseHandler, max_head: int = 65536, max_headers: int = 100
    ) -> None:
        self._handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._status = b""
        self._headers: list[HeaderPair] = []
        self._trailers: list[HeaderPair] | None = None
        self._in_head = False
        self._in_body = False
        self._body_kind = BODY_NONE
        self._head_only = False
        self._head_buf = b""
        self._max_head = max_head
        self._max_headers = max_headers
        self._head_bytes = 0
        # an upper bound of the size of any head completed during the current feed
        self._bound = 0
        self._error: ProxyError | None = None
        # the first bytes read for the expected response (its status line starts them)
        self._line_src: bytes | None = None
        self._first_read = False
        #: bytes that followed a 101 response head (tunnel data), else ``None``
        self.upgraded_rest: bytes | None = None
        #: True when no response is in progress (none expected yet, or the last one ended)
        self.complete = True
        #: whether the upstream allows another request on this connection
        self.keep_alive = True

    def expect(self, method: bytes) -> None:
        """Prepare for the response to a request with ``method``."""
        self._head_only = method in _BODY_METHODS_NO_RESPONSE_BODY
        self.complete = False
        self._head_buf = b""
        self._first_read = True

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raise ``ProxyError`` (502) on an invalid response."""
        if self._head_only:
            self._feed_head_only(data)
            return
        if self._first_read:
            self._first_read = False
            self._line_src = data
        partial = self._head_bytes
        self._bound = partial + len(data)
        if not self._in_body:
            self._head_bytes = partial + len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded_rest = data[upgrade.args[0] :]
            return
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise _bad_upstream(f"invalid response from upstream: {exc}") from None
        if self._in_head and self._head_bytes > self._max_head:
            raise _bad_upstream("upstream response head too large")

    def _feed_head_only(self, data: bytes) -> None:
        buf = self._head_buf + data if self._head_buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self._max_head:
                raise _bad_upstream("upstream response head too large")
            self._head_buf = buf
            return
        head, rest = buf[: end + 4], buf[end + 4 :]
        self._head_buf = b""
        if len(head) > self._max_head:
            raise _bad_upstream("upstream response head too large")
        # A throwaway parser tokenizes the head; the body it announces is never read.
        sub = _HeadCollector()
        try:
            sub.parser.feed_data(head)
        except httptools.HttpParserError as exc:
            raise _bad_upstream(f"invalid response from upstream: {exc}") from None
        if sub.status_code is None:
            raise _bad_upstream("invalid response head from upstream")
        if len(sub.headers) > self._max_headers:
            raise _bad_upstream(
                f"upstream response has more than {self._max_headers} header fields"
            )
        if 100 <= sub.status_code < 200:
            # interim response to a HEAD: skip it and keep looking for the final one
            if rest:
                self._feed_head_only(rest)
            return
        self._head_only = False
        head_obj = ResponseHeader(sub.status_code, Headers._wrap(sub.headers), sub.reason)
        head_obj.version = sub.version
        self.keep_alive = sub.parser.should_keep_alive()
        self._handler.on_response_head(head_obj, BODY_NONE)
        self.complete = True
        self._handler.on_response_end(None)
        if rest:
            raise _bad_upstream("upstream sent data after a HEAD response")

    def feed_eof(self) -> None:
        """The upstream closed its side: finish a close-delimited body or report truncation."""
        if self._in_body and self._body_kind == BODY_CLOSE:
            self._in_body = False
            self.complete = True
            self._handler.on_response_end(None)
            return
        if self._in_head or self._in_body or self._head_buf:
            raise ProxyError(
                ErrorKind.UPSTREAM_CLOSED,
                ErrorSource.UPSTREAM,
                "upstream closed the connection mid-response",
            )

    @property
    def in_message(self) -> bool:
        """True while a response is partially received."""
        return self._in_head or self._in_body or bool(self._head_buf)

    @property
    def started(self) -> bool:
        """True once any byte of the current response was parsed."""
        return self._in_head or self._in_body or self.complete or bool(self._head_buf)

    # httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # bytes after the response (none was asked for): the connection is not clean
            self._error = _bad_upstream("upstream sent data after the response")
            raise self._error
        self._in_head = True
        self._headers = []
        self._trailers = None
        self._status = b""

    def on_status(self, status: bytes) -> None:
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        head_bytes = self._bound
        self._head_bytes = 0
        parser = self._parser
        status = parser.get_status_code()
        src = self._line_src
        self._line_src = None
        if status < 200 and status != 101:
            # interim response: llhttp frames it as bodiless; skip it and keep waiting
            # for the final head (an EOF now is a truncated response)
            self._in_head = True
            return
        items = self._headers
        te: bytes | None = None
        cl: bytes | None = None
        for name, value in items:
            n = len(name)
            if n == 14 or n == 17:
                lname = name.lower()
                if lname == b"content-length":
                    if cl is not None and cl != value:
                        self._error = _bad_upstream("upstream sent conflicting Content-Length")
                        raise self._error
                    cl = value
                elif lname == b"transfer-encoding":
                    te = value
        if head_bytes > self._max_head and (
            sum(len(n) + len(v) + 4 for n, v in items) > self._max_head
        ):
            self._error = _bad_upstream("upstream response head too large")
            raise self._error
        if len(items) > self._max_headers:
            self._error = _bad_upstream(
                f"upstream response has more than {self._max_headers} header fields"
            )
            raise self._error
        headers = Headers._wrap(items)
        if status == 101 or status == 204 or status == 304:
            body_kind = BODY_NONE
        elif te is not None:
            # RFC 9112 §6.3: chunked must be the final coding, else read until close
            if te.rstrip().lower().endswith(b"chunked"):
                body_kind = BODY_CHUNKED
            else:
                body_kind = BODY_CLOSE
        elif cl is not None:
            body_kind = BODY_LENGTH if int(cl) else BODY_NONE
        else:
            body_kind = BODY_CLOSE
        self._body_kind = body_kind
        self._in_body = body_kind != BODY_NONE
        self.keep_alive = body_kind != BODY_CLOSE and parser.should_keep_alive()
        found = _version_at(src, 0, 0x20) if src is not None else None  # "HTTP/1.1 200"
        head = ResponseHeader(status, headers, self._status, found or parser.get_http_version())
        self._handler.on_response_head(head, body_kind)

    def on_body(self, data: bytes) -> None:
        self._handler.on_response_body(data)

    def on_message_complete(self) -> None:
        if self._in_head:
            return
        if not self._in_body and self._parser.get_status_code() < 200:
            if self._parser.get_status_code() != 101:
                return  # end of an interim response
        self._in_body = False
        self.complete = True
        trailers = self._trailers
        self._handler.on_response_end(Headers._wrap(trailers) if trailers else None)


class _HeadCollector:
    """httptools callback target that records one response head."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status_code: int | None = None
        self.reason = b""
        self.headers: list[HeaderPair] = []
        self.version = "1.1"

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status_code = self.parser.get_status_code()
        self.version = self.parser.get_http_version()


# Serializers --------------------------------------------------------------------------

CHUNK_END: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"


def chunk(data: bytes) -> list[bytes]:
    """Frame ``data`` as one chunk of the chunked coding (as parts for ``writelines``)."""
    return [b"%x\r\n" % len(data), data, CRLF]


def last_chunk(trailers: Headers | None = None) -> bytes:
    """The last chunk, with ``trailers`` if given."""
    if not trailers:
        return CHUNK_END
    parts = [b"0\r\n"]
    trailers.append_block(parts)
    parts.append(CRLF)
    return b"".join(parts)
