"""HTTP header blocks: request and response heads that keep case, order and repeats.

Headers are a list of ``(name, value)`` byte pairs exactly as received. Lookups are
case-insensitive through a lowercase index that is built only when first needed and
dropped on every mutation. Serialization is one ``b"".join`` per header block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

HeaderPair = tuple[bytes, bytes]

_REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    203: b"Non-Authoritative Information",
    205: b"Reset Content",
    206: b"Partial Content",
    300: b"Multiple Choices",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    406: b"Not Acceptable",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    426: b"Upgrade Required",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


#: status lines with the standard reason phrase, built once
_STATUS_LINES: Final[dict[int, bytes]] = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in _REASONS.items()
}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (``b"Unknown"`` when there is none)."""
    return _REASONS.get(status, b"Unknown")




def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class Headers:
    """An ordered, case-preserving multi-map of header names to values.

    Names and values may be given as ``str`` or ``bytes``; they are stored as bytes.
    ``get`` returns the first value, ``get_all`` every value in order.
    """

    __slots__ = ("_items", "_index")

    def __init__(
        self, items: Iterable[tuple[str | bytes, str | bytes]] | None = None
    ) -> None:
        self._items: list[HeaderPair] = (
            [(_b(k), _b(v)) for k, v in items] if items is not None else []
        )
        self._index: dict[bytes, list[int]] | None = None

    @staticmethod
    def _wrap(items: list[HeaderPair]) -> Headers:
        """Adopt ``items`` without copying (used by the parsers)."""
        h = Headers()
        h._items = items
        return h

    def _lookup(self, name: bytes) -> list[int] | None:
        index = self._index
        if index is None:
            index = {}
            for i, (k, _) in enumerate(self._items):
                index.setdefault(k.lower(), []).append(i)
            self._index = index
        return index.get(name.lower())

    def get(self, name: str | bytes, default: bytes | None = None) -> bytes | None:
        """The first value of ``name`` or ``default``."""
        pos = self._lookup(_b(name))
        return self._items[pos[0]][1] if pos else default

    def get_all(self, name: str | bytes) -> list[bytes]:
        """Every value of ``name``, in order."""
        pos = self._lookup(_b(name))
        return [self._items[i][1] for i in pos] if pos else []

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str | bytes):
            return False
        return bool(self._lookup(_b(name)))

    def add(self, name: str | bytes, value: str | bytes) -> None:
        """Append a header, keeping any existing ones with the same name."""
        self._items.append((_b(name), _b(value)))
        self._index = None

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every header called ``name`` with one, at the first one's position."""
        bname, bvalue = _b(name), _b(value)
        pos = self._lookup(bname)
        if not pos:
            self._items.append((bname, bvalue))
        else:
            first = pos[0]
            self._items[first] = (self._items[first][0], bvalue)
            for i in reversed(pos[1:]):
                del self._items[i]
        self._index = None

    def remove(self, name: str | bytes) -> int:
        """Remove every header called ``name``; return how many were removed."""
        pos = self._lookup(_b(name))
        if not pos:
            return 0
        for i in reversed(pos):
            del self._items[i]
        self._index = None
        return len(pos)

    def items(self) -> list[HeaderPair]:
        """The underlying list of pairs (mutating it directly bypasses the index)."""
        self._index = None
        return self._items

    def copy(self) -> Headers:
        """A shallow copy that can be mutated independently."""
        return Headers._wrap(self._items.copy())

    def __iter__(self) -> Iterator[HeaderPair]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._items == other._items
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def append_block(self, parts: list[bytes]) -> None:
        """Append ``name: value\\r\\n`` lines to ``parts`` (for one join by the caller)."""
        # one list of pieces and one join: measured faster than joining per pair
        for name, value in self._items:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")


class RequestHeader:
    """A request head: method, target, version and headers.

    ``method`` and ``path`` are ``str`` views over the raw bytes the parser produced;
    assigning to them (or to ``raw_method`` / ``raw_path``) changes what is sent upstream.
    ``version`` is ``"1.0"`` or ``"1.1"``.
    """

    __slots__ = ("raw_method", "raw_path", "version", "headers")

    def __init__(
        self,
        method: str | bytes,
        path: str | bytes,
        headers: Headers | Iterable[tuple[str | bytes, str | bytes]] | None = None,
        version: str = "1.1",
    ) -> None:
        self.raw_method = _b(method)
        self.raw_path = _b(path)
        self.version = version
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.headers: Headers = headers

    @property
    def method(self) -> str:
        """The request method, e.g. ``"GET"``."""
        return self.raw_method.decode("latin-1")

    @method.setter
    def method(self, value: str) -> None:
        self.raw_method = _b(value)

    @property
    def path(self) -> str:
        """The request target as sent (path and query, or authority for CONNECT)."""
        return self.raw_path.decode("latin-1")

    @path.setter
    def path(self, value: str) -> None:
        self.raw_path = _b(value)

    @property
    def host(self) -> str | None:
        """The Host header as ``str``, or ``None``."""
        h = self.headers.get(b"host")
        return h.decode("latin-1") if h is not None else None

    def copy(self) -> RequestHeader:
        """A copy whose headers can be changed without touching this one."""
        return RequestHeader(self.raw_method, self.raw_path, self.headers.copy(), self.version)

    def to_bytes(self) -> bytes:
        """Serialize as an HTTP/1.x request head, ending with the blank line."""
        version = self.version
        parts = [
            self.raw_method,
            b" ",
            self.raw_path,
            b" HTTP/1.1\r\n" if version == "1.1" else b" HTTP/" + version.encode() + b"\r\n",
        ]
        self.headers.append_block(parts)
        parts.append(b"\r\n")
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"RequestHeader({self.method} {self.path} HTTP/{self.version}, {self.headers!r})"


class ResponseHeader:
    """A response head: status, reason phrase, version and headers.

    ``reason`` is the phrase given with the status (the upstream's, or the standard one);
    changing ``status`` without setting ``reason`` again yields the standard phrase of the
    new status.
    """

    __slots__ = ("status", "_reason", "_reason_status", "version", "headers")

    def __init__(
        self,
        status: int,
        headers: Headers | Iterable[tuple[str | bytes, str | bytes]] | None = None,
        reason: bytes | str | None = None,
        version: str = "1.1",
    ) -> None:
        self.status = status
        self._reason = _b(reason) if reason is not None else reason_phrase(status)
        self._reason_status = status
        self.version = version
        if headers is None:
            headers = Headers()
        elif not isinstance(headers, Headers):
            headers = Headers(headers)
        self.headers: Headers = headers

    @property
    def reason(self) -> bytes:
        """The reason phrase sent with :attr:`status`."""
        if self._reason_status == self.status:
            return self._reason
        return reason_phrase(self.status)

    @reason.setter
    def reason(self, value: bytes | str) -> None:
        self._reason = _b(value)
        self._reason_status = self.status

    def copy(self) -> ResponseHeader:
        """A copy whose headers can be changed without touching this one."""
        return ResponseHeader(self.status, self.headers.copy(), self.reason, self.version)

    def to_bytes(self) -> bytes:
        """Serialize as an HTTP/1.1 status line and header block."""
        status = self.status
        line = _STATUS_LINES.get(status)
        if self._reason_status == status:
            reason = self._reason
            if line is None or reason != _REASONS[status]:
                line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        elif line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
        parts = [line]
        self.headers.append_block(parts)
        parts.append(b"\r\n")
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"ResponseHeader({self.status}, {self.headers!r})"
