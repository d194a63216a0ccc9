"""Property-based tests (hypothesis) of HTTP/1 framing, headers and chunked coding.

Bounded: each property runs a fixed number of examples with a fixed seed, so CI time
stays flat and a failure reproduces. A failing example hypothesis finds becomes an
explicit regression test next to the parser tests.
"""

from __future__ import annotations

import httptools
import pytest
from h1_recorders import Event, RequestRecorder, ResponseRecorder, merged
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ferryman.app.routes import match_path, plain_path_end
from ferryman.errors import ProxyError, status_for
from ferryman.protocols.h1 import (
    BODY_NONE,
    RequestLimits,
    RequestParser,
    ResponseParser,
    chunk,
    last_chunk,
)
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader, reason_phrase

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.binary(min_size=1, max_size=12).map(lambda b: bytes(TCHAR[x % len(TCHAR)] for x in b))
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
field_value = st.binary(min_size=0, max_size=20).map(
    lambda b: bytes(VCHAR[x % len(VCHAR)] for x in b)
)
PCHAR = b"abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
path = st.binary(min_size=0, max_size=30).map(
    lambda b: b"/" + bytes(PCHAR[x % len(PCHAR)] for x in b)
)
RESERVED = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"upgrade",
    b"expect",
    b"te",
    b"trailer",
    b"keep-alive",
}
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
    rec = RequestRecorder()
    parser = RequestParser(rec)
    try:
        for c in _split(data, cuts):
            parser.feed(c)
    except ProxyError as exc:
        assert 400 <= status_for(exc) < 600
        # an exception raised inside a parser callback comes out as a 400 too, made of the
        # HttpParserCallbackError httptools chains it to: that is a crash, not a verdict
        hidden = exc.__context__
        crashed = exc is not parser._error and isinstance(hidden, httptools.HttpParserCallbackError)
        assert not crashed, repr(hidden.__context__ if hidden is not None else None)


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
def test_match_path_never_leaves_dot_segments_or_climbs(segments: list[bytes], query: bool) -> None:
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


# --- header handling -------------------------------------------------------------------------

#: names that collide case-insensitively, so that operations meet existing fields
NAME_BASES = [b"Host", b"X-Dup", b"accept", b"Cookie", b"Content-Type", b"x", b"ETag"]


@st.composite
def header_names(draw: st.DrawFn) -> bytes | str:
    """A token name, often one of a few bases in random letter case; bytes or str."""
    base = draw(st.one_of(st.sampled_from(NAME_BASES), token))
    flips = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    name = bytes(
        c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(base, flips, strict=True)
    )
    return name.decode("latin-1") if draw(st.booleans()) else name


header_values = st.one_of(field_value, field_value.map(lambda b: b.decode("latin-1")))


def _lb(x: bytes | str) -> bytes:
    return x if isinstance(x, bytes) else x.encode("latin-1")


class HeadersModel:
    """The reference: a plain list of pairs, searched linearly and case-insensitively."""

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self.items = items

    def positions(self, name: bytes) -> list[int]:
        return [i for i, (k, _) in enumerate(self.items) if k.lower() == name.lower()]

    def get(self, name: bytes) -> bytes | None:
        pos = self.positions(name)
        return self.items[pos[0]][1] if pos else None

    def get_all(self, name: bytes) -> list[bytes]:
        return [self.items[i][1] for i in self.positions(name)]

    def add(self, name: bytes, value: bytes) -> None:
        self.items.append((name, value))

    def set(self, name: bytes, value: bytes) -> None:
        pos = self.positions(name)
        if not pos:
            self.items.append((name, value))
            return
        self.items[pos[0]] = (self.items[pos[0]][0], value)  # the first one keeps its case
        self.items = [kv for i, kv in enumerate(self.items) if i not in pos[1:]]

    def remove(self, name: bytes) -> int:
        pos = self.positions(name)
        self.items = [kv for i, kv in enumerate(self.items) if i not in pos]
        return len(pos)


OPS = st.one_of(
    st.tuples(st.sampled_from(["add", "set"]), header_names(), header_values),
    st.tuples(st.sampled_from(["remove", "get", "raw_append"]), header_names(), header_values),
    st.tuples(st.just("copy"), header_names(), header_values),
)


@seed(20261127)
@SETTINGS
@given(
    st.lists(st.tuples(header_names(), header_values), max_size=6),
    st.lists(OPS, max_size=25),
    st.lists(header_names(), max_size=4),
)
def test_headers_agree_with_a_list_of_pairs_under_random_operations(
    initial: list[tuple[bytes | str, bytes | str]],
    ops: list[tuple[str, bytes | str, bytes | str]],
    probes: list[bytes | str],
) -> None:
    h = Headers(initial)
    model = HeadersModel([(_lb(k), _lb(v)) for k, v in initial])
    seen = [_lb(p) for p in probes] + [k for k, _ in model.items]
    for op, name, value in ops:
        bname, bvalue = _lb(name), _lb(value)
        seen.append(bname)
        # a lookup before each mutation builds the index the mutation must keep right
        assert h.get(name) == model.get(bname)
        if op == "add":
            h.add(name, value)
            model.add(bname, bvalue)
        elif op == "set":
            h.set(name, value)
            model.set(bname, bvalue)
        elif op == "remove":
            assert h.remove(name) == model.remove(bname)
        elif op == "raw_append":  # items() is the underlying list: appending to it counts
            h.items().append((bname, bvalue))
            model.add(bname, bvalue)
        elif op == "copy":  # a copy is equal, then independent of the original
            c = h.copy()
            assert c == h
            c.add(name, value)
            c.remove(NAME_BASES[0])
        assert list(h) == model.items and len(h) == len(model.items)
        for probe in seen[-6:]:
            for form in (probe, probe.upper(), probe.lower(), probe.decode("latin-1")):
                assert h.get(form) == model.get(probe)
                assert h.get(form, b"?") == (model.get(probe) if model.positions(probe) else b"?")
                assert h.get_all(form) == model.get_all(probe)
                assert (form in h) == bool(model.positions(probe))
    assert h == Headers._wrap(list(model.items))
    for probe in seen:
        assert h.get_all(probe) == model.get_all(probe)


@seed(20261127)
@SETTINGS
@given(st.lists(st.tuples(header_names(), header_values), max_size=10))
def test_a_header_block_serializes_every_pair_in_order_with_its_case_and_repeats(
    pairs: list[tuple[bytes | str, bytes | str]],
) -> None:
    parts: list[bytes] = [b"start"]
    Headers(pairs).append_block(parts)
    assert b"".join(parts) == b"start" + b"".join(
        _lb(k) + b": " + _lb(v) + b"\r\n" for k, v in pairs
    )


#: methods llhttp knows (CONNECT is left out: its target is an authority and it upgrades)
METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"MKCOL",
    b"PURGE",
    b"SEARCH",
    b"REPORT",
    b"LOCK",
    b"COPY",
    b"MOVE",
]
NOT_WS = bytes(c for c in VCHAR)
INNER = VCHAR + b" \t"


@st.composite
def trimmed_values(draw: st.DrawFn) -> bytes:
    """A field value as a parser reports it: no leading or trailing SP/HTAB, inner ones kept."""
    inner = draw(st.binary(max_size=12).map(lambda b: bytes(INNER[x % len(INNER)] for x in b)))
    if not inner and draw(st.booleans()):
        return b""
    first, last = draw(st.sampled_from(NOT_WS)), draw(st.sampled_from(NOT_WS))
    return bytes([first]) + inner + bytes([last]) if inner else bytes([first])


ows = st.lists(st.sampled_from([b" ", b"\t"]), max_size=4).map(b"".join)
plain_headers = st.lists(
    st.tuples(header_names().map(_lb), trimmed_values()).filter(
        lambda kv: kv[0].lower() not in RESERVED
    ),
    max_size=8,
)


@seed(20261127)
@SETTINGS
@given(
    st.sampled_from(METHODS),
    path,
    st.sampled_from(["1.0", "1.1"]),
    plain_headers,
    st.integers(0, 8),
    st.sampled_from([b"Host", b"host", b"HOST", b"hOsT"]),
    st.lists(st.integers(0), max_size=8),
)
def test_a_serialized_request_head_parses_back_to_the_same_fields(
    method: bytes,
    target: bytes,
    version: str,
    extra: list[tuple[bytes, bytes]],
    host_at: int,
    host_name: bytes,
    cuts: list[int],
) -> None:
    pairs = list(extra)
    if version == "1.1" or host_at % 2:  # HTTP/1.1 needs exactly one Host; 1.0 may have one
        pairs.insert(host_at % (len(pairs) + 1), (host_name, b"h.test"))
    head = RequestHeader(method, target, Headers(pairs), version)
    data = head.to_bytes()
    assert data.startswith(method + b" " + target + b" HTTP/" + version.encode() + b"\r\n")
    assert data.endswith(b"\r\n\r\n")
    events = _events(_split(data, cuts))
    assert events == [("head", method, target, version, pairs, 0, 0), ("end", None)]


@seed(20261127)
@SETTINGS
@given(
    st.integers(200, 599),
    st.one_of(st.none(), trimmed_values().filter(bool)),
    plain_headers,
    st.lists(st.integers(0), max_size=8),
)
def test_a_serialized_response_head_parses_back_to_the_same_fields(
    status: int, reason: bytes | None, extra: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    pairs = [*extra, (b"Content-Length", b"0")]
    head = ResponseHeader(status, Headers(pairs), reason)
    rec = ResponseRecorder()
    parser = ResponseParser(rec)
    parser.expect(b"GET")
    for c in _split(head.to_bytes(), cuts):
        parser.feed(c)
    want_reason = reason if reason is not None else reason_phrase(status)
    assert rec.events == [("head", status, want_reason, "1.1", pairs, BODY_NONE), ("end", None)]
    assert parser.complete


@seed(20261127)
@SETTINGS
@given(
    plain_headers,
    st.lists(st.tuples(ows, ows), min_size=8, max_size=8),
    st.lists(st.integers(0), max_size=8),
)
def test_request_field_values_lose_surrounding_whitespace_and_keep_inner(
    fields: list[tuple[bytes, bytes]], pads: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    lines = b"".join(
        name + b":" + pads[i][0] + value + pads[i][1] + b"\r\n"
        for i, (name, value) in enumerate(fields)
    )
    data = b"GET / HTTP/1.1\r\nHost:" + pads[-1][0] + b"a" + pads[-1][1] + b"\r\n" + lines + b"\r\n"
    events = _events(_split(data, cuts))
    assert events[0][4] == [(b"Host", b"a"), *fields]
    # trailers of a chunked body are trimmed the same way
    trailer = b"0\r\n" + lines + b"\r\n"
    body = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + trailer
    events = _events(_split(body, cuts))
    assert events[-1] == ("end", fields or None)


def _status_of(chunks: list[bytes]) -> tuple[int | None, list[tuple[object, ...]]]:
    """(status of the ProxyError raised, or None; the events reported before it)."""
    rec = RequestRecorder()
    parser = RequestParser(rec)
    try:
        for c in chunks:
            parser.feed(c)
    except ProxyError as exc:
        return status_for(exc), rec.events
    return None, rec.events


NON_TCHAR = bytes(sorted(set(range(256)) - set(TCHAR) - {ord(":")}))
CTL = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])  # all but HTAB: CR, LF, NUL...


@seed(20261127)
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plain_headers,
    token,
    st.integers(0),
    st.sampled_from(NON_TCHAR),
    trimmed_values(),
    st.lists(st.integers(0), max_size=4),
)
def test_a_field_name_with_a_non_token_byte_is_400(
    fields: list[tuple[bytes, bytes]],
    name: bytes,
    at: int,
    bad: int,
    value: bytes,
    cuts: list[int],
) -> None:
    at %= len(name) + 1
    bad_name = name[:at] + bytes([bad]) + name[at:]
    lines = [n + b": " + v + b"\r\n" for n, v in fields]
    lines.insert(len(fields) // 2, bad_name + b": " + value + b"\r\n")
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(lines) + b"\r\n"
    status, events = _status_of(_split(data, cuts))
    assert (status, events) == (400, [])


@seed(20261127)
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plain_headers,
    token,
    trimmed_values(),
    st.integers(0),
    st.sampled_from(CTL),
    st.booleans(),
    st.lists(st.integers(0), max_size=4),
)
def test_a_field_value_with_cr_lf_nul_or_another_control_byte_is_400(
    fields: list[tuple[bytes, bytes]],
    name: bytes,
    value: bytes,
    at: int,
    bad: int,
    in_trailer: bool,
    cuts: list[int],
) -> None:
    at %= len(value) + 1
    line = name + b": " + value[:at] + bytes([bad]) + value[at:] + b"\r\n"
    lines = [n + b": " + v + b"\r\n" for n, v in fields]
    lines.insert(len(fields) // 2, line)
    block = b"".join(lines) + b"\r\n"
    if in_trailer:
        head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        status, events = _status_of(_split(head + b"1\r\nx\r\n0\r\n" + block, cuts))
        assert status == 400
        assert ("end", None) not in events and not any(e[0] == "end" for e in events)
    else:
        status, events = _status_of(_split(b"GET / HTTP/1.1\r\nHost: a\r\n" + block, cuts))
        assert (status, events) == (400, [])


@seed(20261127)
@SETTINGS
@given(
    plain_headers,
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-length"]),
    st.integers(0),
    st.lists(st.integers(0), max_size=4),
)
def test_two_differing_content_lengths_are_400_before_any_event(
    fields: list[tuple[bytes, bytes]],
    a: int,
    b: int,
    name: bytes,
    at: int,
    cuts: list[int],
) -> None:
    if a == b:
        b += 1
    pairs = [(b"Host", b"a"), *fields]
    pairs.insert(at % (len(pairs) + 1), (b"Content-Length", b"%d" % a))
    pairs.insert((at // 7) % (len(pairs) + 1), (name, b"%d" % b))
    data = RequestHeader(b"POST", b"/", pairs).to_bytes() + b"x" * min(a, b, 100)
    assert _status_of(_split(data, cuts)) == (400, [])


# --- limits: the exact status at and just past each boundary ----------------------------------


def _filler(total: int, host: bytes) -> list[tuple[bytes, bytes]]:
    """Fields whose parser-counted size (name + value + 4 each) is exactly ``total``."""
    pairs = [(b"Host", host)]
    left = total - (4 + len(host) + 4)
    i = 0
    while left > 0:
        name = b"X-%d" % i
        room = left - len(name) - 4
        if room < 0:  # too small for another field: widen the last one instead
            n, v = pairs[-1]
            pairs[-1] = (n, v + b"v" * left)
            break
        size = min(room, 40 + i)
        pairs.append((name, b"v" * size))
        left -= len(name) + 4 + size
        i += 1
    assert sum(len(n) + len(v) + 4 for n, v in pairs) == total
    return pairs


@seed(20261127)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 400),
    st.integers(12, 3000),
    st.integers(1, 40),
    st.integers(1, 500),
    st.booleans(),
    st.lists(st.integers(0), max_size=4),
)
def test_limits_give_414_431_413_exactly_past_the_boundary(
    max_line: int,
    max_bytes: int,
    max_headers: int,
    max_body: int,
    bytewise: bool,
    cuts: list[int],
) -> None:
    # each limit is checked on its own, the others out of the way
    big = 10**6
    only_line = RequestLimits(max_line, big, big, 0)
    only_count = RequestLimits(big, big, max_headers, 0)
    only_bytes = RequestLimits(big, max_bytes, big, 0)
    only_body = RequestLimits(big, big, big, max_body)

    def outcome(data: bytes, limits: RequestLimits) -> tuple[int | None, list[Event]]:
        rec = RequestRecorder()
        parser = RequestParser(rec, limits)
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else _split(data, cuts)
        try:
            for c in chunks:
                parser.feed(c)
        except ProxyError as exc:
            return status_for(exc), rec.events
        return None, merged(rec.events)

    def get(target: bytes, pairs: list[tuple[bytes, bytes]]) -> bytes:
        return RequestHeader(b"GET", target, pairs).to_bytes()

    host = [(b"Host", b"a")]
    # the request target: max_request_line bytes pass, one more is 414
    at = b"/" + b"t" * (max_line - 1)
    assert outcome(get(at, host), only_line)[0] is None
    assert outcome(get(at + b"t", host), only_line) == (414, [])
    # the field count: max_headers pass, one more is 431
    many = host + [(b"X-%d" % i, b"1") for i in range(max_headers - 1)]
    assert outcome(get(b"/", many), only_count)[0] is None
    assert outcome(get(b"/", [*many, (b"X-last", b"1")]), only_count) == (431, [])
    # the header section: max_header_bytes (name + value + 4 per field) pass, one more is 431
    assert outcome(get(b"/", _filler(max_bytes, b"a")), only_bytes)[0] is None
    assert outcome(get(b"/", _filler(max_bytes + 1, b"a")), only_bytes) == (431, [])
    # the trailer section is counted the same way, on its own (the head takes 37 bytes)
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    if max_bytes >= 37:
        trailers = _filler(max_bytes, b"t")
        block = b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
        assert outcome(chunked + block, only_bytes)[1][-1] == ("end", trailers)
        over = _filler(max_bytes + 1, b"t")
        block = b"".join(n + b": " + v + b"\r\n" for n, v in over) + b"\r\n"
        assert outcome(chunked + block, only_bytes)[0] == 431
    # the body: max_body bytes pass, one more is 413 (by Content-Length before any event)
    post = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
    assert outcome(post % max_body + b"b" * max_body, only_body)[1][-2:] == [
        ("body", b"b" * max_body),
        ("end", None),
    ]
    assert outcome(post % (max_body + 1) + b"b" * (max_body + 1), only_body) == (413, [])
    status, events = outcome(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"".join(chunk(b"c")) for _ in range(max_body + 1))
        + last_chunk(),
        only_body,
    )
    assert status == 413 and len(b"".join(e[1] for e in events if e[0] == "body")) <= max_body
