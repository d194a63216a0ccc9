"""Property-based tests (hypothesis) of HTTP/1 framing, headers and chunked coding.

Bounded: each property runs a fixed number of examples with a fixed seed, so CI time
stays flat and a failure reproduces. A failing example hypothesis finds becomes an
explicit regression test next to the parser tests.
"""

from __future__ import annotations

import pytest
from h1_recorders import RequestRecorder, ResponseRecorder, merged
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ferryman.app.routes import match_path, plain_path_end
from ferryman.errors import ProxyError, status_for
from ferryman.protocols.h1 import RequestParser, ResponseParser, chunk, last_chunk
from ferryman.protocols.headers import Headers, RequestHeader

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(TCHAR[x % len(TCHAR)] for x in b)
)
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
field_value = st.binary(min_size=0, max_size=20).map(
    lambda b: bytes(VCHAR[x % len(VCHAR)] for x in b)
)
PCHAR = b"abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
path = st.binary(min_size=0, max_size=30).map(
    lambda b: b"/" + bytes(PCHAR[x % len(PCHAR)] for x in b)
)
RESERVED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade",
            b"expect", b"te", b"trailer", b"keep-alive"}
extra_headers = st.lists(
    st.tuples(token, field_value).filter(lambda kv: kv[0].lower() not in RESERVED),
    max_size=6,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, RequestHeader, bytes]:
    """A valid request: its bytes, its head as built, and its body."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]))
    target = draw(path)
    headers = [(b"Host", b"example.test"), *draw(extra_headers)]
    body = draw(st.binary(max_size=200)) if method in (b"POST", b"PUT", b"PATCH") else b""
    chunked = bool(body) and draw(st.booleans())
    wire = list(headers)
    if chunked:
        wire.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces, last = [], 0
        for cut in [*cuts, len(body)]:
            if cut > last:
                pieces.append(body[last:cut])
                last = cut
        payload = b"".join(b"".join(chunk(p)) for p in pieces) + last_chunk()
    else:
        if body:
            wire.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    head = RequestHeader(method, target, Headers._wrap(wire), "1.1")
    return head.to_bytes() + payload, head, body


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


def _events(chunks: list[bytes]) -> list[tuple[object, ...]]:
    rec = RequestRecorder()
    parser = RequestParser(rec)
    rec.parser = parser
    for c in chunks:
        parser.feed(c)
    return merged(rec.events)


@seed(20261127)
@SETTINGS
@given(requests(), st.lists(st.integers(min_value=0), max_size=8))
def test_a_request_parses_the_same_however_it_is_split(
    req: tuple[bytes, RequestHeader, bytes], cuts: list[int]
) -> None:
    data, head, body = req
    whole = _events([data])
    assert whole == _events(_split(data, cuts))
    kind, method, target, version, headers = whole[0][:5]
    assert (kind, method, target, version) == ("head", head.raw_method, head.raw_path, "1.1")
    assert headers == list(head.headers)
    got = b"".join(e[1] for e in whole if e[0] == "body")
    assert got == body
    assert whole[-1][0] == "end"


@seed(20261127)
@SETTINGS
@given(st.lists(requests(), min_size=2, max_size=4), st.lists(st.integers(0), max_size=8))
def test_pipelined_requests_are_reported_in_order(
    reqs: list[tuple[bytes, RequestHeader, bytes]], cuts: list[int]
) -> None:
    data = b"".join(r[0] for r in reqs)
    events = _events(_split(data, cuts))
    heads = [e for e in events if e[0] == "head"]
    assert [(h[1], h[2]) for h in heads] == [(r[1].raw_method, r[1].raw_path) for r in reqs]
    assert sum(1 for e in events if e[0] == "end") == len(reqs)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes replaced, inserted or deleted."""
    data = bytearray(draw(requests())[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        byte = draw(st.sampled_from(b"\r\n\x00\t :;,-0aZ\x7f\xff"))
        if op == "replace" and data:
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif data:
            del data[at]
    return bytes(data)


@seed(20261127)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_requests(), st.binary(max_size=300)), st.lists(st.integers(0), max_size=6))
def test_hostile_bytes_give_events_or_a_proxy_error_never_a_crash(
    data: bytes, cuts: list[int]
) -> None:
    try:
        _events(_split(data, cuts))
    except ProxyError as exc:
        assert 400 <= status_for(exc) < 600


@seed(20261127)
@SETTINGS
@given(
    st.lists(st.binary(min_size=1, max_size=100), max_size=6),
    st.lists(st.integers(0), max_size=6),
)
def test_chunked_response_bodies_round_trip(pieces: list[bytes], cuts: list[int]) -> None:
    body = b"".join(b"".join(chunk(p)) for p in pieces) + last_chunk()
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    rec = ResponseRecorder()
    parser = ResponseParser(rec)
    parser.expect(b"GET")
    for c in _split(data, cuts):
        parser.feed(c)
    assert b"".join(e[1] for e in rec.events if e[0] == "body") == b"".join(pieces)
    assert rec.events[-1][0] == "end" and parser.complete


SEGMENT = st.sampled_from([b"a", b"b", b".", b"..", b"", b"%2e", b"%2E%2e", b"%2f", b"c%20d"])


@seed(20261127)
@settings(max_examples=2000, deadline=None)
@given(st.lists(SEGMENT, max_size=8), st.booleans())
def test_match_path_never_leaves_dot_segments_or_climbs(
    segments: list[bytes], query: bool
) -> None:
    raw = b"/" + b"/".join(segments) + (b"?x=/../y" if query else b"")
    normal = match_path(raw)
    if normal is None:
        return  # climbs above the root: refused with 400
    assert normal.startswith(b"/")
    parts = normal.split(b"/")[1:]
    assert b"." not in parts and b".." not in parts
    assert b"" not in parts[:-1]  # no empty segment except a trailing slash
    if plain_path_end(raw) >= 0:
        assert normal == raw.split(b"?", 1)[0]


@pytest.mark.parametrize("raw", [b"/", b"/a/", b"/a/b/..", b"/%2e%2e/x"])
def test_match_path_examples(raw: bytes) -> None:
    assert match_path(raw) in (b"/", b"/a/", None)
