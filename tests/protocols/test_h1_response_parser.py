"""ResponseParser, sans-IO: framing of upstream responses, fed whole and byte by byte."""

from __future__ import annotations

import pytest
from h1_recorders import ResponseRecorder, bytewise, feed_response, merged

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, status_for
from ferryman.protocols.h1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ResponseParser,
)

CL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\nX-Sum: 9\r\n\r\n"
)


def test_content_length_response() -> None:
    parser, rec = feed_response([CL])
    assert rec.events == [
        (
            "head",
            200,
            b"OK",
            "1.1",
            [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")],
            BODY_LENGTH,
        ),
        ("body", b"hello"),
        ("end", None),
    ]
    assert parser.complete
    assert not parser.in_message
    assert parser.upgraded_rest is None


@pytest.mark.parametrize("data", [CL, CHUNKED], ids=["cl", "chunked"])
def test_byte_by_byte_equals_whole(data: bytes) -> None:
    _, whole = feed_response([data])
    _, split = feed_response(bytewise(data))
    assert merged(split.events) == merged(whole.events)


def test_split_at_every_byte_boundary() -> None:
    expected = merged(feed_response([CHUNKED])[1].events)
    for i in range(len(CHUNKED) + 1):
        _, rec = feed_response([CHUNKED[:i], CHUNKED[i:]])
        assert merged(rec.events) == expected, f"split at {i}"


def test_in_flight_flags() -> None:
    parser, rec = feed_response([CL[:10]])
    assert parser.in_message and parser.started and not parser.complete
    parser.feed(CL[10:-2])
    assert parser.in_message and not parser.complete
    parser.feed(CL[-2:])
    assert parser.complete and not parser.in_message


def test_chunked_response_with_trailers() -> None:
    parser, rec = feed_response([CHUNKED])
    assert rec.events[0] == (
        "head",
        200,
        b"OK",
        "1.1",
        [(b"Transfer-Encoding", b"chunked")],
        BODY_CHUNKED,
    )
    assert merged(rec.events)[1:] == [
        ("body", b"hello world"),
        ("end", [(b"X-Trailer", b"t"), (b"X-Sum", b"9")]),
    ]
    assert parser.complete


def test_close_delimited_body_ends_at_eof() -> None:
    parser, rec = feed_response([b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\nhello", b" world"])
    assert rec.events[0][5] == BODY_CLOSE
    assert not parser.complete
    assert parser.in_message
    parser.feed_eof()
    assert merged(rec.events)[1:] == [("body", b"hello world"), ("end", None)]
    assert parser.complete


def test_close_delimited_empty_body() -> None:
    parser, rec = feed_response([b"HTTP/1.0 200 OK\r\n\r\n"], eof=True)
    assert rec.events == [("head", 200, b"OK", "1.0", [], BODY_CLOSE), ("end", None)]
    assert parser.complete


def test_unknown_transfer_coding_is_close_delimited() -> None:
    # RFC 9112 6.3: a final coding other than chunked means read until close
    parser, rec = feed_response(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzzz"], eof=True
    )
    assert rec.events[0][5] == BODY_CLOSE
    assert merged(rec.events)[1:] == [("body", b"zzzz"), ("end", None)]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 2",
    ],
    ids=["cl_body", "chunk_data", "no_last_chunk", "head", "status_line"],
)
def test_truncated_response_at_eof_is_upstream_closed(data: bytes) -> None:
    with pytest.raises(ProxyError) as info:
        feed_response([data], eof=True)
    err = info.value
    assert err.kind is ErrorKind.UPSTREAM_CLOSED
    assert err.source is ErrorSource.UPSTREAM
    assert status_for(err) == 502


def test_eof_after_only_an_interim_response_is_upstream_closed() -> None:
    with pytest.raises(ProxyError) as info:
        feed_response([b"HTTP/1.1 100 Continue\r\n\r\n"], eof=True)
    assert info.value.kind is ErrorKind.UPSTREAM_CLOSED


def test_eof_before_any_byte_is_not_an_error_in_the_parser() -> None:
    parser, rec = feed_response([], eof=True)
    assert rec.events == []
    assert not parser.complete and not parser.started


def test_head_response_with_content_length_has_no_body() -> None:
    parser, rec = feed_response(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n"], method=b"HEAD"
    )
    assert rec.events == [
        ("head", 200, b"OK", "1.1", [(b"Content-Length", b"1000"), (b"ETag", b'"x"')], BODY_NONE),
        ("end", None),
    ]
    assert parser.complete
    assert not parser.in_message


def test_head_response_byte_by_byte() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    parser, rec = feed_response(bytewise(data), method=b"HEAD")
    assert [e[0] for e in rec.events] == ["head", "end"]
    assert rec.events[0][5] == BODY_NONE
    assert parser.complete


def test_head_response_chunked_has_no_body() -> None:
    parser, rec = feed_response(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"], method=b"HEAD"
    )
    assert [e[0] for e in rec.events] == ["head", "end"]
    assert parser.complete


def test_head_response_skips_interim_responses() -> None:
    parser, rec = feed_response(
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"],
        method=b"HEAD",
    )
    assert [e[:2] for e in rec.events] == [("head", 200), ("end", None)]


def test_bytes_after_a_head_response_are_invalid() -> None:
    with pytest.raises(ProxyError) as info:
        feed_response([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"], method=b"HEAD")
    assert info.value.kind is ErrorKind.INVALID_RESPONSE
    assert status_for(info.value) == 502


def test_parser_is_reused_across_responses_on_one_connection() -> None:
    rec = ResponseRecorder()
    parser = ResponseParser(rec)
    parser.expect(b"GET")
    parser.feed(CL)
    parser.expect(b"HEAD")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    parser.expect(b"GET")
    parser.feed(CHUNKED)
    parser.expect(b"GET")
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    parser.expect(b"GET")
    parser.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx")
    summary = [(e[0], e[1]) if e[0] == "head" else (e[0],) for e in merged(rec.events)]
    assert summary == [
        ("head", 200), ("body",), ("end",),
        ("head", 200), ("end",),
        ("head", 200), ("body",), ("end",),
        ("head", 204), ("end",),
        ("head", 404), ("body",), ("end",),
    ]
    assert parser.complete


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (204, b""),
        (204, b"Content-Length: 5\r\n"),
        (304, b""),
        (304, b"Content-Length: 5\r\n"),
        (304, b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_204_and_304_have_no_body(status: int, extra: bytes) -> None:
    data = b"HTTP/1.1 %d X\r\n%s\r\n" % (status, extra)
    parser, rec = feed_response([data])
    assert rec.events[0][1] == status
    assert rec.events[0][5] == BODY_NONE
    assert rec.events[1:] == [("end", None)]
    assert parser.complete


def test_content_length_zero_is_no_body() -> None:
    parser, rec = feed_response([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert rec.events[0][5] == BODY_NONE
    assert rec.events[1:] == [("end", None)]
    assert parser.complete


@pytest.mark.parametrize("mode", ["separate", "together", "bytewise"])
def test_100_continue_then_final(mode: str) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    if mode == "separate":
        chunks = [interim, final]
    elif mode == "together":
        chunks = [interim + final]
    else:
        chunks = bytewise(interim + final)
    parser, rec = feed_response(chunks, method=b"POST")
    assert merged(rec.events) == [
        ("head", 201, b"Created", "1.1", [(b"Content-Length", b"2")], BODY_LENGTH),
        ("body", b"ok"),
        ("end", None),
    ]
    assert parser.complete


def test_interim_state_before_final() -> None:
    parser, rec = feed_response([b"HTTP/1.1 100 Continue\r\n\r\n"])
    assert rec.events == []
    assert not parser.complete


def test_103_early_hints_is_skipped() -> None:
    parser, rec = feed_response(
        [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
         b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"]
    )
    assert [e[:2] for e in rec.events] == [("head", 200), ("body", b"x"), ("end", None)]


UPGRADE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
)


def test_101_upgrade_reports_head_and_rest() -> None:
    parser, rec = feed_response([UPGRADE_101 + b"\x81\x02hi"])
    assert rec.events[0] == (
        "head",
        101,
        b"Switching Protocols",
        "1.1",
        [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
        BODY_NONE,
    )
    assert parser.upgraded_rest == b"\x81\x02hi"


def test_101_upgrade_byte_by_byte() -> None:
    parser, rec = feed_response(bytewise(UPGRADE_101))
    assert rec.events[0][1] == 101
    assert parser.upgraded_rest == b""


def test_101_upgrade_without_rest() -> None:
    parser, rec = feed_response([UPGRADE_101])
    assert rec.events[0][1] == 101
    assert parser.upgraded_rest == b""


BAD_502 = {
    "not_http": b"this is not http\r\n\r\n",
    "html": b"<html><body>oops</body></html>",
    "bad_status_code": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "conflicting_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "invalid_cl": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "bad_chunk_size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "bare_cr": b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_502))
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_invalid_response_is_502(name: str, mode: str) -> None:
    data = BAD_502[name]
    with pytest.raises(ProxyError) as info:
        feed_response([data] if mode == "whole" else bytewise(data))
    err = info.value
    assert err.kind is ErrorKind.INVALID_RESPONSE, err
    assert err.source is ErrorSource.UPSTREAM
    assert status_for(err) == 502


def test_garbage_for_a_head_request_is_502() -> None:
    with pytest.raises(ProxyError) as info:
        feed_response([b"this is not http\r\n\r\n"], method=b"HEAD")
    assert info.value.kind is ErrorKind.INVALID_RESPONSE


def test_response_head_too_large_when_split_is_502() -> None:
    data = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(ProxyError) as info:
        feed_response([data[i : i + 100] for i in range(0, len(data), 100)], max_head=1000)
    assert info.value.kind is ErrorKind.INVALID_RESPONSE


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_response_head_too_large_in_one_read_is_502(method: bytes) -> None:
    data = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(ProxyError) as info:
        feed_response([data], method=method, max_head=1000)
    assert info.value.kind is ErrorKind.INVALID_RESPONSE


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize(("fields", "ok"), [(99, True), (100, False)])
def test_more_than_100_response_header_fields_is_502(method: bytes, fields: int, ok: bool) -> None:
    # with Content-Length, 99 + 1 fields is the limit (HAProxy's default is 101)
    data = (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(fields))
        + b"Content-Length: 0\r\n\r\n"
    )
    if ok:
        _, rec = feed_response([data], method=method)
        assert len(rec.heads[0].headers) == 100
        return
    with pytest.raises(ProxyError) as info:
        feed_response([data], method=method)
    assert info.value.kind is ErrorKind.INVALID_RESPONSE
    assert status_for(info.value) == 502


def test_http10_response_version_is_reported() -> None:
    _, rec = feed_response([b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na"])
    assert rec.events[0][3] == "1.0"
    assert rec.heads[0].version == "1.0"


def test_reason_phrase_and_header_case_are_kept() -> None:
    _, rec = feed_response(
        [b"HTTP/1.1 418 I'm A Teapot\r\nx-lower: 1\r\nX-UPPER: 2\r\nx-lower: 3\r\n"
         b"Content-Length: 0\r\n\r\n"]
    )
    head = rec.heads[0]
    assert head.status == 418
    assert head.reason == b"I'm A Teapot"
    assert list(head.headers)[:3] == [(b"x-lower", b"1"), (b"X-UPPER", b"2"), (b"x-lower", b"3")]
    assert head.headers.get_all("X-Lower") == [b"1", b"3"]


@pytest.mark.parametrize(
    "data, version",
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "1.0"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "1.1"),
        # an interim response first: the final head is not at the start of the read
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "1.0"),
    ],
)
@pytest.mark.parametrize("pattern", ["whole", "split", "bytewise"])
def test_response_version_whatever_the_reads(data: bytes, version: str, pattern: str) -> None:
    # read from the first bytes of the response when its status line starts them, else
    # asked of llhttp: both must agree
    chunks = {"whole": [data], "split": [data[:5], data[5:]], "bytewise": bytewise(data)}
    _, rec = feed_response(chunks[pattern])
    assert [h.version for h in rec.heads] == [version]


def test_the_version_of_each_response_on_a_reused_parser() -> None:
    rec = ResponseRecorder()
    parser = ResponseParser(rec)
    for version in ("1.1", "1.0", "1.1"):
        parser.expect(b"GET")
        parser.feed(f"HTTP/{version} 204 No Content\r\nConnection: keep-alive\r\n\r\n".encode())
    assert [h.version for h in rec.heads] == ["1.1", "1.0", "1.1"]
