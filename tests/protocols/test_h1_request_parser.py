"""RequestParser, sans-IO: bytes in, events out, fed whole, split and byte by byte."""

from __future__ import annotations

import random

import pytest
from h1_recorders import RequestRecorder, bytewise, feed_request, merged, request_error

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, status_for
from ferryman.protocols.h1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    RequestLimits,
    RequestParser,
)

GET = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"
POST_CL = b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"
POST_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value;flag\r\nhello\r\n"
    b"6\r\n world\r\n"
    b'A;x="quoted"\r\n0123456789\r\n'
    b"0;last=1\r\nX-Checksum: abc\r\nX-Other: 2\r\n\r\n"
)
PIPELINE = GET + POST_CL + POST_CHUNKED + b"DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n"

PIPELINE_EVENTS = [
    (
        "head",
        b"GET",
        b"/index.html?q=1",
        "1.1",
        [(b"Host", b"example.com"), (b"User-Agent", b"t")],
        BODY_NONE,
        0,
    ),
    ("end", None),
    (
        "head",
        b"POST",
        b"/form",
        "1.1",
        [(b"Host", b"example.com"), (b"Content-Length", b"11")],
        BODY_LENGTH,
        11,
    ),
    ("body", b"hello world"),
    ("end", None),
    (
        "head",
        b"POST",
        b"/up",
        "1.1",
        [(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")],
        BODY_CHUNKED,
        0,
    ),
    ("body", b"hello world0123456789"),
    ("end", [(b"X-Checksum", b"abc"), (b"X-Other", b"2")]),
    ("head", b"DELETE", b"/x", "1.1", [(b"Host", b"h")], BODY_NONE, 0),
    ("end", None),
]


# --- well-formed requests ------------------------------------------------------------------


def test_simple_get() -> None:
    parser, rec = feed_request([GET])
    assert rec.events == PIPELINE_EVENTS[:2]
    head = rec.heads[0]
    assert head.method == "GET"
    assert head.path == "/index.html?q=1"
    assert head.host == "example.com"
    assert not parser.in_message
    assert not parser.head_started


def test_empty_feed_is_no_event() -> None:
    parser, rec = feed_request([b""])
    assert rec.events == []
    assert not parser.in_message


def test_partial_head_reports_nothing_and_sets_flags() -> None:
    parser, rec = feed_request([GET[:20]])
    assert rec.events == []
    assert parser.head_started
    assert parser.in_message
    parser.feed(GET[20:])
    assert merged(rec.events) == PIPELINE_EVENTS[:2]
    assert not parser.in_message


def test_content_length_body() -> None:
    parser, rec = feed_request([POST_CL])
    assert rec.events == PIPELINE_EVENTS[2:5]


def test_content_length_body_in_flight_flags() -> None:
    parser, rec = feed_request([POST_CL[:-3]])
    assert parser.in_message
    assert not parser.head_started  # the head is complete, the body is not
    assert merged(rec.events) == [PIPELINE_EVENTS[2], ("body", b"hello wo")]
    parser.feed(POST_CL[-3:])
    assert merged(rec.events) == PIPELINE_EVENTS[2:5]
    assert not parser.in_message


def test_content_length_zero_has_no_body() -> None:
    _, rec = feed_request([b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"])
    assert rec.events == [
        ("head", b"POST", b"/", "1.1", [(b"Host", b"a"), (b"Content-Length", b"0")], BODY_NONE, 0),
        ("end", None),
    ]


def test_chunked_body_with_extensions_and_trailers() -> None:
    _, rec = feed_request([POST_CHUNKED])
    assert merged(rec.events) == PIPELINE_EVENTS[5:8]


def test_chunked_without_trailers_reports_none() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    _, rec = feed_request([data])
    assert rec.events[1:] == [("body", b"abc"), ("end", None)]


def _chunked_post(te: bytes) -> bytes:
    """A POST with ``te`` as its Transfer-Encoding value and a chunked body "abc"."""
    return (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + te + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "te",
    [b"gzip, chunked", b"cow, chunked", b"identity, chunked", b"gzip,chunked"],
)
def test_a_coding_before_chunked_is_not_implemented(te: bytes) -> None:
    # RFC 9112 §6.1: a coding the proxy does not implement gets 501 (as from nginx),
    # before the head is reported: re-framing the body as plain chunked would drop it
    data = _chunked_post(te)
    err, rec = request_error([data])
    assert status_for(err) == 501
    assert err.kind is ErrorKind.NOT_IMPLEMENTED
    assert rec.events == []


def test_codings_over_several_field_lines_make_one_list() -> None:
    err, rec = request_error([_chunked_post(b"gzip\r\nTransfer-Encoding: chunked")])
    assert status_for(err) == 501
    assert rec.events == []


@pytest.mark.parametrize(
    "te",
    [b"chunked\t", b"chunked, chunked", b"chunked\r\nTransfer-Encoding: chunked", b", ,"],
)
def test_chunked_twice_a_trailing_htab_or_no_coding_is_a_bad_request(te: bytes) -> None:
    data = _chunked_post(te)
    err, rec = request_error([data])
    assert status_for(err) == 400
    assert rec.events == []


@pytest.mark.parametrize("te", [b", chunked", b"chunked ", b"CHUNKED"])
def test_empty_list_elements_spaces_and_case_are_ignored(te: bytes) -> None:
    data = _chunked_post(te)
    _, rec = feed_request([data])
    assert rec.events[0][5] == BODY_CHUNKED
    assert rec.events[1:] == [("body", b"abc"), ("end", None)]


@pytest.mark.parametrize("name", [b"Transfer_Encoding", b"content_length", b"CONTENT_LENGTH"])
def test_an_underscore_look_alike_of_a_framing_header_is_a_bad_request(name: bytes) -> None:
    # CGI-style backends map "_" to "-": they would see a framing header the proxy ignored
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n" + name + b": 5\r\n\r\nabc"
    err, rec = request_error([data])
    assert status_for(err) == 400
    assert rec.events == []


def test_pipelined_requests_in_one_feed() -> None:
    parser, rec = feed_request([PIPELINE])
    assert merged(rec.events) == PIPELINE_EVENTS
    assert not parser.in_message


@pytest.mark.parametrize("data", [GET, POST_CL, POST_CHUNKED, PIPELINE], ids=lambda d: d[:6])
def test_one_byte_at_a_time(data: bytes) -> None:
    _, whole = feed_request([data])
    _, split = feed_request(bytewise(data))
    assert merged(split.events) == merged(whole.events)


def test_split_at_every_byte_boundary() -> None:
    expected = merged(feed_request([PIPELINE])[1].events)
    for i in range(len(PIPELINE) + 1):
        _, rec = feed_request([PIPELINE[:i], PIPELINE[i:]])
        assert merged(rec.events) == expected, f"split at {i}"


def test_split_into_three_pieces_everywhere_in_chunked_framing() -> None:
    expected = merged(feed_request([POST_CHUNKED])[1].events)
    start = POST_CHUNKED.index(b"\r\n\r\n") + 4  # splits inside the chunked framing
    for i in range(start, len(POST_CHUNKED)):
        for j in range(i, len(POST_CHUNKED), 7):
            _, rec = feed_request([POST_CHUNKED[:i], POST_CHUNKED[i:j], POST_CHUNKED[j:]])
            assert merged(rec.events) == expected, (i, j)


def test_leading_whitespace_of_values_is_trimmed() -> None:
    _, rec = feed_request([b"GET / HTTP/1.1\r\nHost: a\r\nX:  \tv w\r\n\r\n"])
    assert rec.heads[0].headers.get("x") == b"v w"


def test_leading_empty_lines_are_ignored() -> None:
    _, rec = feed_request([b"\r\n" + GET])
    assert rec.events == PIPELINE_EVENTS[:2]


def test_header_case_order_and_repeats_preserved() -> None:
    data = b"GET / HTTP/1.1\r\nhOsT: a\r\nX-Dup: 1\r\nx-dup: 2\r\nACCEPT: */*\r\nX-DUP: 3\r\n\r\n"
    _, rec = feed_request([data])
    head = rec.heads[0]
    assert list(head.headers) == [
        (b"hOsT", b"a"),
        (b"X-Dup", b"1"),
        (b"x-dup", b"2"),
        (b"ACCEPT", b"*/*"),
        (b"X-DUP", b"3"),
    ]
    assert head.headers.get_all("x-dup") == [b"1", b"2", b"3"]
    assert head.host == "a"


def test_optional_whitespace_around_values_is_trimmed() -> None:
    _, rec = feed_request([b"GET / HTTP/1.1\r\nHost: a\r\nX:  \tv w \t\r\n\r\n"])
    assert rec.heads[0].headers.get("x") == b"v w"


def test_absolute_form_and_asterisk_targets() -> None:
    _, rec = feed_request(
        [b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"]
    )
    assert [e[2] for e in rec.events if e[0] == "head"] == [b"http://a/x?y", b"*"]


# --- HTTP/1.0 and keep-alive -----------------------------------------------------------------


def test_http10_request_without_host_is_accepted() -> None:
    _, rec = feed_request([b"GET /old HTTP/1.0\r\n\r\n"])
    assert rec.events == [("head", b"GET", b"/old", "1.0", [], BODY_NONE, 0), ("end", None)]
    assert rec.heads[0].host is None


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-foo, close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_keep_alive_flag_at_head(data: bytes, keep_alive: bool) -> None:
    _, rec = feed_request([data])
    assert rec.keep_alive == [keep_alive]


def test_keep_alive_flags_of_pipelined_requests() -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    _, rec = feed_request(bytewise(data))
    assert rec.keep_alive == [True, False]


# --- Upgrade and CONNECT -------------------------------------------------------------------

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def test_upgrade_reports_head_end_then_upgrade_with_rest() -> None:
    parser, rec = feed_request([UPGRADE + b"\x81\x05hello"])
    assert rec.events[0][:3] == ("head", b"GET", b"/chat")
    assert rec.events[0][5] == BODY_NONE
    assert rec.events[1:] == [("end", None), ("upgrade", b"\x81\x05hello")]


def test_upgrade_holds_later_bytes_for_take_buffer() -> None:
    parser, rec = feed_request([UPGRADE + b"early"])
    parser.feed(b"later-1")
    parser.feed(b"GET /not-parsed HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[0] for e in rec.events] == ["head", "end", "upgrade"]  # nothing parsed after
    assert parser.take_buffer() == b"later-1GET /not-parsed HTTP/1.1\r\nHost: a\r\n\r\n"
    assert parser.take_buffer() == b""


def test_upgrade_byte_by_byte() -> None:
    parser, rec = feed_request(bytewise(UPGRADE + b"XY"))
    assert [e[0] for e in rec.events] == ["head", "end", "upgrade"]
    rest = rec.events[2][1]
    assert rest + parser.take_buffer() == b"XY"


def test_refused_upgrade_resume_parses_held_requests() -> None:
    parser, rec = feed_request([UPGRADE])
    assert rec.events[-1] == ("upgrade", b"")
    parser.feed(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[0] for e in rec.events] == ["head", "end", "upgrade"]
    parser.resume()
    assert rec.events[3:] == [
        ("head", b"GET", b"/next", "1.1", [(b"Host", b"a")], BODY_NONE, 0),
        ("end", None),
    ]
    parser.feed(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")  # parsing goes on normally
    assert rec.events[-2][2] == b"/after"


def test_upgrade_header_without_connection_upgrade_is_a_plain_request() -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    _, rec = feed_request([data])
    assert [e[0] for e in rec.events] == ["head", "end", "head", "end"]


def test_connect_reports_upgrade_with_rest() -> None:
    parser, rec = feed_request(
        [b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"]
    )
    assert rec.events == [
        (
            "head",
            b"CONNECT",
            b"example.com:443",
            "1.1",
            [(b"Host", b"example.com:443")],
            BODY_NONE,
            0,
        ),
        ("end", None),
        ("upgrade", b"\x16\x03\x01"),
    ]
    assert rec.heads[0].path == "example.com:443"
    parser.feed(b"more tls")
    assert parser.take_buffer() == b"more tls"


def test_upgrade_request_with_body_is_a_plain_request() -> None:
    # llhttp would skip the body of an upgrade request; ferryman ignores the upgrade of a
    # request with a body (h2c from curl) instead, so the body is reported and what
    # follows is parsed as the next request
    data = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\n"
        b"helloGET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    for pieces in ([data], [data[:150], data[150:]], [bytes([b]) for b in data]):
        _, rec = feed_request(pieces)
        assert rec.events[0][5:] == (BODY_LENGTH, 5)
        assert (
            rec.events[1:3] == [("body", b"hello"), ("end", None)]
            or b"".join(e[1] for e in rec.events if e[0] == "body") == b"hello"
        )
        kinds = [e[0] for e in rec.events]
        assert "upgrade" not in kinds
        assert kinds.count("head") == 2 and kinds.count("end") == 2


# --- limits --------------------------------------------------------------------------------

LIMITS = RequestLimits(max_request_line=100, max_header_bytes=200, max_headers=5, max_body=10)


def _line(target_len: int) -> bytes:
    return b"GET /" + b"a" * (target_len - 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n"


def test_default_limits() -> None:
    limits = RequestLimits()
    assert (limits.max_request_line, limits.max_header_bytes) == (8192, 32768)
    assert (limits.max_headers, limits.max_body) == (100, 0)


def test_request_target_at_the_limit_is_accepted() -> None:
    _, rec = feed_request([_line(100)], LIMITS)
    assert len(rec.events[0][2]) == 100


@pytest.mark.parametrize("mode", ["whole", "bytewise", "unterminated"])
def test_request_line_too_long_is_414(mode: str) -> None:
    data = _line(101)
    if mode == "unterminated":
        chunks = [data[:300].split(b" HTTP")[0] + b"a" * 200]  # no end of line yet
    else:
        chunks = [data] if mode == "whole" else bytewise(data)
    err, rec = request_error(chunks, LIMITS)
    assert err.kind is ErrorKind.REQUEST_LINE_TOO_LONG
    assert err.source is ErrorSource.DOWNSTREAM
    assert status_for(err) == 414
    assert rec.events == []


def test_request_line_too_long_with_default_limits() -> None:
    err, _ = request_error([b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"])
    assert err.kind is ErrorKind.REQUEST_LINE_TOO_LONG
    assert status_for(err) == 414


def _headers_of(total: int) -> bytes:
    """A head whose header section (name + value + 4 per field) is ``total`` bytes."""
    host = b"Host: a\r\n"  # 9 bytes by the parser's count
    filler = total - len(host)
    value = b"v" * (filler - len(b"X: \r\n"))
    return b"GET / HTTP/1.1\r\n" + host + b"X: " + value + b"\r\n\r\n"


def test_header_section_at_the_limit_is_accepted() -> None:
    _, rec = feed_request([_headers_of(200)], LIMITS)
    assert rec.events[-1] == ("end", None)


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_header_section_too_large_is_431(mode: str) -> None:
    data = _headers_of(201)
    err, rec = request_error([data] if mode == "whole" else bytewise(data), LIMITS)
    assert err.kind is ErrorKind.HEADERS_TOO_LARGE
    assert status_for(err) == 431
    assert rec.events == []


def test_unterminated_huge_header_is_431() -> None:
    err, _ = request_error([b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 1000], LIMITS)
    assert err.kind is ErrorKind.HEADERS_TOO_LARGE
    assert status_for(err) == 431


def test_header_section_too_large_with_default_limits() -> None:
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
    err, _ = request_error([b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"])
    assert err.kind is ErrorKind.HEADERS_TOO_LARGE
    assert status_for(err) == 431


def test_max_headers_is_inclusive() -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(4))
    _, rec = feed_request([b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"], LIMITS)
    assert len(rec.events[0][4]) == 5


def test_too_many_headers_is_431() -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(5))
    err, rec = request_error([b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"], LIMITS)
    assert err.kind is ErrorKind.HEADERS_TOO_LARGE
    assert status_for(err) == 431
    assert rec.events == []


def test_trailer_section_too_large_is_431() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        b"X-T: " + b"t" * 300 + b"\r\n\r\n"
    )
    err, _ = request_error([data], LIMITS)
    assert err.kind is ErrorKind.HEADERS_TOO_LARGE
    assert status_for(err) == 431


def test_body_at_the_limit_is_accepted() -> None:
    _, rec = feed_request(
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"], LIMITS
    )
    assert rec.events[1:] == [("body", b"0123456789"), ("end", None)]


def test_body_too_large_by_content_length_is_413_before_any_event() -> None:
    err, rec = request_error([b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"], LIMITS)
    assert err.kind is ErrorKind.BODY_TOO_LARGE
    assert status_for(err) == 413
    assert rec.events == []


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_body_too_large_streamed_chunked_is_413(mode: str) -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\n012345\r\n5\r\n67890\r\n0\r\n\r\n"
    )
    err, rec = request_error([data] if mode == "whole" else bytewise(data), LIMITS)
    assert err.kind is ErrorKind.BODY_TOO_LARGE
    assert status_for(err) == 413
    delivered = b"".join(e[1] for e in rec.events if e[0] == "body")
    assert len(delivered) <= 10  # never more than the limit reaches the handler
    assert ("end", None) not in rec.events


def test_chunked_body_at_the_limit_is_accepted() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"
    )
    _, rec = feed_request(bytewise(data), LIMITS)
    assert merged(rec.events)[1:] == [("body", b"0123456789"), ("end", None)]


def test_max_body_zero_is_unlimited() -> None:
    body = b"x" * 100_000
    _, rec = feed_request(
        [b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + body],
        RequestLimits(max_body=0),
    )
    assert merged(rec.events)[1:] == [("body", body), ("end", None)]


def test_limits_apply_to_every_pipelined_request() -> None:
    small = RequestLimits(max_request_line=100, max_header_bytes=200, max_headers=5)
    data = GET * 50  # 50 small requests in one read: far more than one head's limit
    _, rec = feed_request([data], small)
    assert len([e for e in rec.events if e[0] == "head"]) == 50


# --- bad input: each exactly 400 (or 505) --------------------------------------------------

BAD_400 = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n0\r\n\r\n",
    "duplicate_cl_same": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "duplicate_cl_differing": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl_not_a_number": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    "cl_trailing_garbage": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc",
    "cl_negative": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\nabc",
    "cl_plus_sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "cl_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "te_not_ending_in_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip"
    b"\r\n\r\nabc",
    "te_gzip_only": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te_chunked_twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk_size_not_hex": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk_size_negative": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-3\r\nabc\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "chunk_size_bare_lf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\nabc\r\n0\r\n\r\n",
    "chunk_data_overrun": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcd\r\n0\r\n\r\n",
    "bare_cr_after_request_line": b"GET / HTTP/1.1\rHost: a\r\n\r\n",
    "bare_cr_in_header_value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "bare_lf_line_endings": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare_lf_after_header": b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n",
    "whitespace_before_first_header": b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    "nul_in_header_value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "ctl_in_header_value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "nul_in_target": b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "space_in_header_name": b"GET / HTTP/1.1\r\nHost: a\r\nX Y: 1\r\n\r\n",
    "missing_host_http11": b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
    "two_host_headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two_host_headers_other_case": b"GET / HTTP/1.1\r\nhost: a\r\nHOST: a\r\n\r\n",
    "two_host_headers_http10": b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    "invalid_method": b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "space_in_target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "http_0_9": b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    "h2_prior_knowledge_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "not_http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


@pytest.mark.parametrize("name", list(BAD_400))
def test_bad_request_is_400(name: str) -> None:
    err, _ = request_error([BAD_400[name]])
    assert err.kind is ErrorKind.BAD_REQUEST, err
    assert err.source is ErrorSource.DOWNSTREAM
    assert status_for(err) == 400


@pytest.mark.parametrize("name", list(BAD_400))
def test_bad_request_is_400_byte_by_byte(name: str) -> None:
    err, _ = request_error(bytewise(BAD_400[name]))
    assert err.kind is ErrorKind.BAD_REQUEST, err
    assert status_for(err) == 400


@pytest.mark.parametrize(
    "name",
    [
        "cl_and_te",
        "te_and_cl",
        "duplicate_cl_same",
        "duplicate_cl_differing",
        "cl_list",
        "te_not_ending_in_chunked",
        "te_chunked_twice",
        "missing_host_http11",
        "two_host_headers",
        "obs_fold",
        "nul_in_header_value",
        "space_before_colon",
    ],
)
def test_rejected_head_is_never_reported(name: str) -> None:
    _, rec = request_error([BAD_400[name]])
    assert rec.events == []


def test_te_gzip_only_head_is_never_reported() -> None:
    _, rec = request_error([BAD_400["te_gzip_only"]])
    assert rec.events == []


def test_bad_request_after_a_good_one_reports_the_good_one() -> None:
    err, rec = request_error([GET + BAD_400["cl_and_te"]])
    assert status_for(err) == 400
    assert rec.events == PIPELINE_EVENTS[:2]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_http2_request_line_is_505(mode: str) -> None:
    data = b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"
    err, rec = request_error([data] if mode == "whole" else bytewise(data))
    assert err.kind is ErrorKind.VERSION_NOT_SUPPORTED
    assert status_for(err) == 505
    assert rec.events == []


def test_http3_request_line_is_505() -> None:
    err, _ = request_error([b"GET / HTTP/3.0\r\nHost: a\r\n\r\n"])
    assert status_for(err) == 505


def test_parser_direct_construction_uses_default_limits() -> None:
    from h1_recorders import RequestRecorder

    rec = RequestRecorder()
    parser = RequestParser(rec)
    parser.feed(b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rec.events[-1] == ("end", None)


def test_oversized_head_pipelined_after_a_small_one_in_one_read_is_431() -> None:
    # the size bound must hold for every head completed in a read, not just the first
    limits = RequestLimits(max_request_line=100, max_header_bytes=200, max_headers=50)
    small = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    big = b"GET /b HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"v" * 300 + b"\r\n\r\n"
    rec = RequestRecorder()
    parser = RequestParser(rec, limits)
    with pytest.raises(ProxyError) as info:
        parser.feed(small + big)
    assert status_for(info.value) == 431
    assert len(rec.heads) == 1


# The version is read from the bytes a request arrived in when its line starts them,
# else asked of llhttp: both must agree, whatever the feeding pattern.
@pytest.mark.parametrize(
    "data, versions",
    [
        (b"GET / HTTP/1.0\r\n\r\n", ["1.0"]),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ["1.1"]),
        # a target that spells a version itself
        (b"GET /HTTP/1.1 HTTP/1.0\r\n\r\n", ["1.0"]),
        (b"GET /x?v=HTTP/1.0 HTTP/1.1\r\nHost: a\r\n\r\n", ["1.1"]),
        # blank lines before the request line (allowed between requests)
        (b"\r\n\r\nGET / HTTP/1.0\r\n\r\n", ["1.0"]),
        # pipelined: the second line is not at the start of the read
        (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.0\r\n\r\n", ["1.1", "1.0"]),
        (
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
            ["1.0", "1.1"],
        ),
        (b"OPTIONS * HTTP/1.0\r\n\r\n", ["1.0"]),
        (b"GET http://a.example/p HTTP/1.0\r\n\r\n", ["1.0"]),
    ],
)
@pytest.mark.parametrize("pattern", ["whole", "split", "bytewise"])
def test_request_version_whatever_the_reads(data: bytes, versions: list[str], pattern: str) -> None:
    if pattern == "whole":
        chunks = [data]
    elif pattern == "split":
        chunks = [data[:9], data[9:20], data[20:]]
    else:
        chunks = bytewise(data)
    _, rec = feed_request(chunks)
    assert [h.version for h in rec.heads] == versions


def test_an_unsupported_version_is_still_refused_on_the_fast_path() -> None:
    err, _ = request_error([b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"])
    assert status_for(err) == 505
    err, _ = request_error([b"GET / HTTP/0.9\r\nHost: a\r\n\r\n"])
    assert status_for(err) == 400


def test_transfer_encoding_in_http10_is_400() -> None:
    # RFC 9112 §6.1: the framing of an HTTP/1.0 message with Transfer-Encoding is faulty
    err, rec = request_error([b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])
    assert status_for(err) == 400
    assert rec.heads == []


# --- the header-size limit, however the reads cut the heads ------------------------------

_FIRST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
_POST = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + b"b" * 3000


def _outcome(chunks: list[bytes]) -> int | None:
    parser = RequestParser(RequestRecorder())
    try:
        for c in chunks:
            parser.feed(c)
    except ProxyError as exc:
        return status_for(exc)
    return None


def test_a_big_field_whose_read_ends_at_its_line_end_is_431() -> None:
    # httptools reports a field only when the next begins: the read that ends right after
    # it must still count it, for a head that began with the read and one that began in it
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 100_000 + b"\r\n"
    assert _outcome([big, b"\r\n"]) == 431
    assert _outcome([_FIRST + big, b"\r\n"]) == 431
    assert _outcome([_FIRST + big + b"\r", b"\n"]) == 431


def test_a_head_pipelined_after_a_large_body_is_not_counted_with_the_body() -> None:
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 50000\r\n\r\n" + b"b" * 50_000
    assert _outcome([post + b"GET / HT", b"TP/1.1\r\nHost: a\r\n\r\n"]) is None


def test_a_near_limit_head_split_in_its_request_line_is_accepted() -> None:
    fields = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 240) for i in range(99))
    head = b"GET /" + b"u" * 7990 + b" HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    assert _outcome([head[:8000], head[8000:-2], head[-2:]]) is None
    assert _outcome([_FIRST + head[:8000], head[8000:-2], head[-2:]]) is None


def _head_of_field_bytes(total: int, count: int) -> bytes:
    """A request head whose fields take exactly ``total`` bytes (name + value + 4 each)."""
    fields = [(b"Host", b"a")]
    size = 9
    for i in range(count):
        name = b"X-%d" % i
        fields.append((name, b"v"))
        size += len(name) + 5
    name, value = fields[1]
    fields[1] = (name, value + b"w" * (total - size))
    return b"GET /x HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"


@pytest.mark.parametrize(
    "prefix", [b"", _FIRST, _POST, _FIRST * 3], ids=["alone", "after-get", "after-body", "after-3"]
)
def test_max_header_bytes_holds_exactly_however_the_reads_cut(prefix: bytes) -> None:
    limit = RequestLimits().max_header_bytes
    rng = random.Random(5)
    for _ in range(150):
        count = rng.randrange(1, 60)
        for total, expected in ((limit, None), (limit + 1, 431)):
            data = prefix + _head_of_field_bytes(total, count)
            cuts = sorted(rng.randrange(1, len(data)) for _ in range(rng.randrange(1, 5)))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            assert _outcome(chunks) == expected, (total, count, cuts)
