"""RequestParserPool: parsers lent to connections while they read a request, sans-IO."""

from __future__ import annotations

import pytest
from h1_recorders import RequestRecorder, merged

from ferryman.errors import ProxyError, status_for
from ferryman.protocols.h1 import RequestLimits, RequestParser, RequestParserPool
from ferryman.protocols.headers import Headers

GET_A = b"GET /a?x=1 HTTP/1.1\r\nHost: one\r\nX-A: 1\r\n\r\n"
GET_B = b"GET /b HTTP/1.1\r\nHost: two\r\n\r\n"
POST = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"


def _take(pool: RequestParserPool) -> tuple[RequestParser, RequestRecorder]:
    rec = RequestRecorder()
    parser = pool.take(rec)
    rec.parser = parser
    return parser, rec


def test_a_given_back_parser_serves_the_next_connection_with_no_state_of_the_last() -> None:
    pool = RequestParserPool()
    first, rec1 = _take(pool)
    first.feed(GET_A)
    assert pool.give(first)
    assert len(pool) == 1
    second, rec2 = _take(pool)
    assert second is first and len(pool) == 0
    second.feed(GET_B[:9])
    second.feed(GET_B[9:])
    head = rec2.heads[0]
    assert (head.raw_path, head.headers.get("host")) == (b"/b", b"two")
    assert list(head.headers.items()) == [(b"Host", b"two")]
    assert rec2.events[-1] == ("end", None)
    # the first handler hears nothing more
    assert len(rec1.heads) == 1


def test_give_refuses_a_parser_inside_a_head_or_a_body() -> None:
    pool = RequestParserPool()
    parser, rec = _take(pool)
    parser.feed(GET_A[:20])
    assert not pool.give(parser)
    parser.feed(GET_A[20:] + POST + b"ab")
    assert not pool.give(parser)
    parser.feed(b"cde")
    assert pool.give(parser)
    assert [h.raw_path for h in rec.heads] == [b"/a?x=1", b"/p"]
    assert [e for e in merged(rec.events) if e[0] == "body"] == [("body", b"abcde")]


def test_give_refuses_a_parser_after_an_error() -> None:
    pool = RequestParserPool()
    parser, _ = _take(pool)
    with pytest.raises(ProxyError) as info:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert status_for(info.value) == 400
    assert not pool.give(parser)
    assert len(pool) == 0


def test_give_refuses_a_parser_after_an_upgrade() -> None:
    pool = RequestParserPool()
    parser, rec = _take(pool)
    parser.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw"
    )
    assert rec.events[-1] == ("upgrade", b"raw")
    assert not pool.give(parser)


class _GivesBackAtEnd(RequestRecorder):
    """Tries to give its parser back from inside a callback, as a response completed
    synchronously at the end of a request would."""

    pool: RequestParserPool
    gave: list[bool]

    def on_request_end(self, trailers: Headers | None) -> None:
        super().on_request_end(trailers)
        assert self.parser is not None
        self.gave.append(self.pool.give(self.parser))


def test_give_refuses_a_parser_while_it_is_parsing() -> None:
    # two pipelined requests in one read: when the first ends, llhttp still has the
    # second to parse, so the parser may not be handed on
    pool = RequestParserPool()
    rec = _GivesBackAtEnd()
    rec.pool, rec.gave = pool, []
    parser = pool.take(rec)
    rec.parser = parser
    parser.feed(GET_A + GET_B)
    assert rec.gave == [False, False]
    assert [h.raw_path for h in rec.heads] == [b"/a?x=1", b"/b"]
    assert pool.give(parser)


def test_the_pool_keeps_at_most_cap_parsers_and_uses_its_limits() -> None:
    pool = RequestParserPool(RequestLimits(max_request_line=50), cap=2)
    parsers = [_take(pool)[0] for _ in range(3)]
    assert all(pool.give(p) for p in parsers)
    assert len(pool) == 2
    parser, _ = _take(pool)
    with pytest.raises(ProxyError) as info:
        parser.feed(b"GET /" + b"a" * 60 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_for(info.value) == 414
