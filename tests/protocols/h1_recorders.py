"""Recording handlers for the sans-IO HTTP/1 parsers (shared by the protocol tests).

They turn parser callbacks into a list of plain tuples, so that a test can compare the
events of one feeding pattern (whole, split, byte by byte) with another.
"""

from __future__ import annotations

from typing import Any

from ferryman.errors import ProxyError
from ferryman.protocols.h1 import RequestLimits, RequestParser, ResponseParser
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader

Event = tuple[Any, ...]


class RequestRecorder:
    """A RequestHandler that records every event (and llhttp's keep-alive verdict)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.heads: list[RequestHeader] = []
        self.keep_alive: list[bool] = []
        self.parser: RequestParser | None = None

    def on_request_head(self, head: RequestHeader, body_kind: int, content_length: int) -> None:
        self.heads.append(head)
        self.events.append(
            (
                "head",
                head.raw_method,
                head.raw_path,
                head.version,
                list(head.headers),
                body_kind,
                content_length,
            )
        )
        if self.parser is not None:
            # the downstream connection reads keep-alive exactly here (proxy/downstream.py)
            self.keep_alive.append(bool(self.parser._parser.should_keep_alive()))

    def on_request_body(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.events.append(("body", data))

    def on_request_end(self, trailers: Headers | None) -> None:
        self.events.append(("end", list(trailers) if trailers is not None else None))

    def on_request_upgrade(self, rest: bytes) -> None:
        self.events.append(("upgrade", rest))


class ResponseRecorder:
    """A ResponseHandler that records every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.heads: list[ResponseHeader] = []

    def on_response_head(self, head: ResponseHeader, body_kind: int) -> None:
        self.heads.append(head)
        self.events.append(
            ("head", head.status, head.reason, head.version, list(head.headers), body_kind)
        )

    def on_response_body(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.events.append(("body", data))

    def on_response_end(self, trailers: Headers | None) -> None:
        self.events.append(("end", list(trailers) if trailers is not None else None))


def merged(events: list[Event]) -> list[Event]:
    """``events`` with consecutive body pieces joined (feeding patterns split bodies)."""
    out: list[Event] = []
    for ev in events:
        if ev[0] == "body" and out and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + ev[1])
        elif ev[0] == "body" and not ev[1]:
            continue
        else:
            out.append(ev)
    return out


def feed_request(
    chunks: list[bytes], limits: RequestLimits | None = None
) -> tuple[RequestParser, RequestRecorder]:
    """Feed ``chunks`` to a fresh RequestParser; ProxyError propagates."""
    rec = RequestRecorder()
    parser = RequestParser(rec, limits)
    rec.parser = parser
    for c in chunks:
        parser.feed(c)
    return parser, rec


def request_error(
    chunks: list[bytes], limits: RequestLimits | None = None
) -> tuple[ProxyError, RequestRecorder]:
    """Feed ``chunks`` and return the ProxyError raised (fails if none is)."""
    rec = RequestRecorder()
    parser = RequestParser(rec, limits)
    rec.parser = parser
    for c in chunks:
        try:
            parser.feed(c)
        except ProxyError as exc:
            return exc, rec
    raise AssertionError(f"no ProxyError; events: {rec.events!r}")


def bytewise(data: bytes) -> list[bytes]:
    """``data`` as one-byte chunks."""
    return [data[i : i + 1] for i in range(len(data))]


def feed_response(
    chunks: list[bytes], method: bytes = b"GET", eof: bool = False, max_head: int = 65536
) -> tuple[ResponseParser, ResponseRecorder]:
    """Feed ``chunks`` to a fresh ResponseParser expecting ``method``; ProxyError propagates."""
    rec = ResponseRecorder()
    parser = ResponseParser(rec, max_head=max_head)
    parser.expect(method)
    for c in chunks:
        parser.feed(c)
    if eof:
        parser.feed_eof()
    return parser, rec
