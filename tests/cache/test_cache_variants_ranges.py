"""Vary (RFC 9111 §4.1), validation (§3.2, §4.3) and ranges from a cached body (RFC 9110
§14), as tables over ``ferryman.cache.variants`` and ``ferryman.cache.ranges``."""

from __future__ import annotations

import pytest

from ferryman.cache.ranges import MAX_RANGES, if_range_matches, multipart_parts, parse_range
from ferryman.cache.variants import (
    NEVER_MATCHES,
    conditional_headers,
    merge_not_modified,
    vary_fields,
    vary_key,
)


def _request(**fields: list[bytes]) -> dict[bytes, list[bytes]]:
    return {name.replace("_", "-").encode(): values for name, values in fields.items()}


# -- §4.1 Vary -----------------------------------------------------------------------------

@pytest.mark.parametrize(("lines", "expected"), [
    ([b"Accept-Encoding"], (b"accept-encoding",)),
    ([b"accept-encoding, Accept-Language", b"ACCEPT-ENCODING"],
     (b"accept-encoding", b"accept-language")),
    ([b""], ()),
    ([b"Accept, *"], None),
])
def test_vary_fields(lines: list[bytes], expected: tuple[bytes, ...] | None) -> None:
    assert vary_fields(lines) == expected


def _key(vary: list[bytes], request: dict[bytes, list[bytes]]) -> bytes:
    return vary_key(vary, lambda name: request.get(name, []))


VARY_CASES = [
    # vary, first request, second request, same variant?
    ([b"Accept-Encoding"], _request(accept_encoding=[b"gzip"]),
     _request(accept_encoding=[b"gzip"]), True, "same value"),
    ([b"Accept-Encoding"], _request(accept_encoding=[b"gzip"]),
     _request(accept_encoding=[b"br"]), False, "another value: another variant"),
    ([b"Accept-Encoding"], _request(accept_encoding=[b"gzip, br"]),
     _request(accept_encoding=[b"gzip,br"]), True, "whitespace normalised"),
    ([b"Accept-Encoding"], _request(accept_encoding=[b"gzip", b"br"]),
     _request(accept_encoding=[b"gzip, br"]), True, "field lines combined"),
    ([b"Accept-Encoding"], _request(), _request(accept_encoding=[b""]), False,
     "absent is not empty"),
    ([b"Accept-Encoding"], _request(other=[b"x"]), _request(), True, "other fields ignored"),
    ([], _request(accept_encoding=[b"gzip"]), _request(), True, "no Vary: one variant"),
]


@pytest.mark.parametrize(
    ("vary", "first", "second", "same", "why"), VARY_CASES, ids=[c[-1] for c in VARY_CASES]
)
def test_vary_key(
    vary: list[bytes], first: dict[bytes, list[bytes]], second: dict[bytes, list[bytes]],
    same: bool, why: str,
) -> None:
    assert (_key(vary, first) == _key(vary, second)) is same


def test_vary_star_never_matches() -> None:
    assert _key([b"*"], _request()) == NEVER_MATCHES


# -- §4.3.1 conditional requests, §3.2 a 304 updates the stored fields --------------------

@pytest.mark.parametrize(("etag", "last_modified", "expected"), [
    (b'"v1"', None, [(b"If-None-Match", b'"v1"')]),
    (None, b"Sun, 06 Nov 1994 08:49:37 GMT",
     [(b"If-Modified-Since", b"Sun, 06 Nov 1994 08:49:37 GMT")]),
    (b'W/"v1"', b"Sun, 06 Nov 1994 08:49:37 GMT",
     [(b"If-None-Match", b'W/"v1"'), (b"If-Modified-Since", b"Sun, 06 Nov 1994 08:49:37 GMT")]),
    (None, None, []),
])
def test_conditional_headers(
    etag: bytes | None, last_modified: bytes | None, expected: list[tuple[bytes, bytes]]
) -> None:
    assert conditional_headers(etag, last_modified) == expected


def test_a_304_replaces_the_fields_it_carries_but_not_the_framing() -> None:
    stored = [
        (b"Content-Type", b"text/plain"), (b"Content-Length", b"100"),
        (b"Cache-Control", b"max-age=10"), (b"ETag", b'"v1"'), (b"X-A", b"1"), (b"X-A", b"2"),
    ]
    not_modified = [
        (b"Cache-Control", b"max-age=60"), (b"Date", b"now"), (b"Content-Length", b"0"),
        (b"x-a", b"3"),
    ]
    assert merge_not_modified(stored, not_modified) == [
        (b"Content-Type", b"text/plain"), (b"Content-Length", b"100"), (b"ETag", b'"v1"'),
        (b"Cache-Control", b"max-age=60"), (b"Date", b"now"), (b"x-a", b"3"),
    ]


# -- RFC 9110 §14.1.2 / §14.2 Range ----------------------------------------------------------

RANGE_CASES = [
    (b"bytes=0-9", 100, [(0, 9)], "first ten"),
    (b"bytes=90-", 100, [(90, 99)], "open-ended"),
    (b"bytes=-10", 100, [(90, 99)], "suffix"),
    (b"bytes=-200", 100, [(0, 99)], "suffix longer than the body"),
    (b"bytes=50-500", 100, [(50, 99)], "last beyond the end is clipped"),
    (b"bytes=0-0,-1", 100, [(0, 0), (99, 99)], "two ranges, kept in order"),
    (b"BYTES = 0-1", 100, [(0, 1)], "unit case-insensitive"),
    (b"bytes=100-", 100, [], "starts at the end: 416"),
    (b"bytes=-0", 100, [], "empty suffix: 416"),
    (b"bytes=200-300, 300-400", 100, [], "none satisfiable: 416"),
    (b"bytes=200-300,0-1", 100, [(0, 1)], "the satisfiable ones"),
    (b"items=0-1", 100, None, "another unit: ignored"),
    (b"bytes=5-1", 100, None, "last before first: ignored"),
    (b"bytes=a-b", 100, None, "not numbers: ignored"),
    (b"bytes=0-1,,2-3", 100, None, "empty item: ignored"),
    (b"bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(MAX_RANGES + 1)), 100, None,
     "too many ranges: ignored"),
    (b"bytes=0-", 0, [], "empty body: 416"),
]


@pytest.mark.parametrize(
    ("value", "length", "expected", "why"), RANGE_CASES, ids=[c[-1] for c in RANGE_CASES]
)
def test_parse_range(
    value: bytes, length: int, expected: list[tuple[int, int]] | None, why: str
) -> None:
    assert parse_range(value, length) == expected


IF_RANGE_CASES = [
    (None, b'"v1"', None, True, "no If-Range"),
    (b'"v1"', b'"v1"', None, True, "same strong tag"),
    (b'"v2"', b'"v1"', None, False, "another tag"),
    (b'W/"v1"', b'W/"v1"', None, False, "weak tags never match (§13.1.5)"),
    (b"Sun, 06 Nov 1994 08:49:37 GMT", None, b"Sun, 06 Nov 1994 08:49:37 GMT", True,
     "same date"),
    (b"Sun, 06 Nov 1994 08:49:38 GMT", None, b"Sun, 06 Nov 1994 08:49:37 GMT", False,
     "another date"),
]


@pytest.mark.parametrize(
    ("if_range", "etag", "last_modified", "expected", "why"),
    IF_RANGE_CASES, ids=[c[-1] for c in IF_RANGE_CASES],
)
def test_if_range(
    if_range: bytes | None, etag: bytes | None, last_modified: bytes | None, expected: bool,
    why: str,
) -> None:
    assert if_range_matches(if_range, etag, last_modified) is expected


def test_multipart_byteranges_framing() -> None:
    body = bytes(range(100))
    parts, end = multipart_parts([(0, 1), (98, 99)], 100, b"application/octet-stream", b"B")
    assembled = b"".join(head + body[first : last + 1] for head, first, last in parts) + end
    assert assembled == (
        b"\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/100"
        b"\r\n\r\n\x00\x01"
        b"\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 98-99/100"
        b"\r\n\r\nbc\r\n--B--\r\n"
    )
