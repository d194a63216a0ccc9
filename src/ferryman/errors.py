"""One typed error hierarchy for the proxy, and the one place that maps errors to statuses.

Every failure the engine can meet while serving a request is a :class:`ProxyError` with

* ``kind`` – what went wrong (:class:`ErrorKind`),
* ``source`` – whose fault it is (:class:`ErrorSource`: downstream client, upstream server,
  or ferryman itself),
* ``retryable`` – whether the request may be sent again to (another) upstream,
* ``cause`` – the underlying exception, if any.

:func:`status_for` is the single mapping from an error to the HTTP status written to the
client; hooks such as ``fail_to_proxy`` use it by default.
"""

from __future__ import annotations

import enum
from typing import Final


class ErrorSource(enum.Enum):
    """Which side of the proxy an error came from."""

    DOWNSTREAM = "downstream"
    UPSTREAM = "upstream"
    INTERNAL = "internal"


class ErrorKind(enum.Enum):
    """What went wrong. The value is a short stable name used in logs."""

    # downstream (client) problems
    BAD_REQUEST = "bad_request"
    REQUEST_LINE_TOO_LONG = "request_line_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    VERSION_NOT_SUPPORTED = "version_not_supported"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_IMPLEMENTED = "not_implemented"
    HEADER_READ_TIMEOUT = "header_read_timeout"
    BODY_READ_TIMEOUT = "body_read_timeout"
    WRITE_TIMEOUT = "write_timeout"
    CLIENT_CLOSED = "client_closed"
    # upstream problems
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_ERROR = "connect_error"
    TLS_HANDSHAKE = "tls_handshake"
    READ_TIMEOUT = "read_timeout"
    UPSTREAM_WRITE_TIMEOUT = "upstream_write_timeout"
    UPSTREAM_CLOSED = "upstream_closed"
    INVALID_RESPONSE = "invalid_response"
    #: the upstream broke HTTP/2's rules, reset the stream, or cannot carry the request
    UPSTREAM_PROTOCOL = "upstream_protocol"
    #: the upstream cancelled the exchange (HTTP/2 RST_STREAM CANCEL): an HTTP/2 client's
    #: stream is cancelled the same way
    UPSTREAM_CANCELLED = "upstream_cancelled"
    #: the upstream refused the request without acting on it (HTTP/2 REFUSED_STREAM, or a
    #: stream above a GOAWAY's last-stream-id): any method may be sent again
    UPSTREAM_REFUSED = "upstream_refused"
    NO_PEER = "no_peer"
    # ferryman itself
    INTERNAL = "internal"
    HOOK_ERROR = "hook_error"


class ProxyError(Exception):
    """An error met while proxying one request.

    Attributes:
        kind: what went wrong.
        source: downstream, upstream or internal.
        retryable: whether the request may be retried on an(other) upstream peer.
            Hooks (``fail_to_connect``, ``error_while_proxy``) may change it.
        cause: the exception this error wraps, if any.
        status: an explicit status overriding :func:`status_for`, or ``None``.
    """

    __slots__ = ("kind", "source", "retryable", "cause", "status", "detail")

    def __init__(
        self,
        kind: ErrorKind,
        source: ErrorSource,
        detail: str = "",
        *,
        retryable: bool = False,
        cause: BaseException | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail or kind.value)
        self.kind = kind
        self.source = source
        self.detail = detail
        self.retryable = retryable
        self.cause = cause
        self.status = status
        if cause is not None:
            self.__cause__ = cause

    def __repr__(self) -> str:
        return (
            f"ProxyError({self.kind.value}, {self.source.value}, {self.detail!r}, "
            f"retryable={self.retryable})"
        )


def internal_error(detail: str, cause: BaseException | None = None) -> ProxyError:
    """Build an error caused by ferryman itself or by a hook raising."""
    return ProxyError(ErrorKind.INTERNAL, ErrorSource.INTERNAL, detail, cause=cause)


_STATUS: Final[dict[ErrorKind, int]] = {
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.REQUEST_LINE_TOO_LONG: 414,
    ErrorKind.HEADERS_TOO_LARGE: 431,
    ErrorKind.BODY_TOO_LARGE: 413,
    ErrorKind.VERSION_NOT_SUPPORTED: 505,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.NOT_IMPLEMENTED: 501,
    ErrorKind.HEADER_READ_TIMEOUT: 408,
    ErrorKind.BODY_READ_TIMEOUT: 408,
    ErrorKind.WRITE_TIMEOUT: 408,
    ErrorKind.CLIENT_CLOSED: 499,
    ErrorKind.CONNECT_REFUSED: 502,
    ErrorKind.CONNECT_TIMEOUT: 504,
    ErrorKind.CONNECT_ERROR: 502,
    ErrorKind.TLS_HANDSHAKE: 502,
    ErrorKind.READ_TIMEOUT: 504,
    ErrorKind.UPSTREAM_WRITE_TIMEOUT: 504,
    ErrorKind.UPSTREAM_CLOSED: 502,
    ErrorKind.INVALID_RESPONSE: 502,
    ErrorKind.UPSTREAM_PROTOCOL: 502,
    ErrorKind.UPSTREAM_CANCELLED: 502,
    ErrorKind.UPSTREAM_REFUSED: 502,
    ErrorKind.NO_PEER: 502,
    ErrorKind.INTERNAL: 500,
    ErrorKind.HOOK_ERROR: 500,
}


def status_for(error: BaseException | None) -> int:
    """The HTTP status to answer the client with for ``error``.

    This is the only place errors become statuses: 4xx for client faults, 502 for an
    unreachable, refusing or misbehaving upstream, 504 for an upstream timeout, 500 for
    anything unexpected.
    """
    if error is None:
        return 200
    if isinstance(error, ProxyError):
        if error.status is not None:
            return error.status
        return _STATUS.get(error.kind, 500)
    return 500
