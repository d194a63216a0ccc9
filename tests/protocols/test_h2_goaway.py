"""GoawayFilter: GOAWAY frames taken out of an HTTP/2 byte stream, byte by byte (no sockets)."""

from __future__ import annotations

import struct

import pytest
from h2_frames import frame
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ferryman.protocols.h2_goaway import GoawayFilter


def goaway(last: int, code: int = 0, debug: bytes = b"") -> bytes:
    return frame(7, 0, 0, struct.pack(">II", last, code) + debug)


def run(data: bytes, cuts: list[int]) -> tuple[bytes, list[tuple[int, int]]]:
    """Feed ``data`` cut at ``cuts``; return what was passed on and the GOAWAYs seen."""
    flt = GoawayFilter()
    out = b""
    seen: list[tuple[int, int]] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += flt.feed(data[start:cut])
        seen += flt.received
        flt.received.clear()
        start = cut
    return out, seen


SETTINGS = frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64")
HEADERS = frame(1, 0x4, 1, b"h" * 30)
DATA = frame(0, 0, 1, b"d" * 5000)
END = frame(0, 1, 1, b"e" * 10)


def test_frames_without_goaway_pass_unchanged_and_uncopied() -> None:
    data = SETTINGS + HEADERS + DATA + END
    flt = GoawayFilter()
    assert flt.feed(data) is data
    assert flt.received == []


def test_goaway_is_removed_and_reported() -> None:
    data = SETTINGS + HEADERS + goaway(1, 0, b"bye") + DATA + END
    assert run(data, []) == (SETTINGS + HEADERS + DATA + END, [(1, 0)])


def test_reserved_bit_of_last_stream_id_is_ignored_and_code_is_read() -> None:
    assert run(goaway(0x80000005, 0xB), [])[1] == [(5, 0xB)]


def test_malformed_short_goaway_counts_as_protocol_error() -> None:
    data = frame(7, 0, 0, b"\x00\x00") + HEADERS
    assert run(data, []) == (HEADERS, [(0, 1)])


def test_goaway_with_empty_payload() -> None:
    assert run(frame(7) + END, [3]) == (END, [(0, 1)])


@pytest.mark.parametrize("cut", range(1, 40))
def test_a_split_frame_header_is_held_back_until_complete(cut: int) -> None:
    data = HEADERS + goaway(3, 0, b"debug data") + END
    assert run(data, [cut, cut + 1, cut + 5]) == (HEADERS + END, [(3, 0)])


def test_byte_by_byte() -> None:
    data = SETTINGS + goaway(9) + HEADERS + goaway(11, 2, b"x" * 100) + DATA
    out, seen = run(data, list(range(1, len(data))))
    assert out == SETTINGS + HEADERS + DATA
    assert seen == [(9, 0), (11, 2)]


_frames = st.lists(
    st.one_of(
        st.builds(
            lambda kind, stream, size: frame(kind, 0, stream, b"p" * size),
            st.sampled_from([0, 1, 3, 4, 6, 8, 9]),
            st.integers(0, 9),
            st.integers(0, 300),
        ),
        st.builds(
            lambda last, code, debug: ("goaway", last, code, goaway(last, code, b"d" * debug)),
            st.integers(0, 2**31 - 1),
            st.integers(0, 13),
            st.integers(0, 50),
        ),
    ),
    max_size=12,
)


@seed(20261127)
@settings(max_examples=400, deadline=None)
@given(items=_frames, data=st.data())
def test_property_any_cut_gives_the_same_result(items: list, data: st.DataObject) -> None:
    wire = b""
    expected_out = b""
    expected_seen = []
    for item in items:
        if isinstance(item, tuple):
            _, last, code, raw = item
            wire += raw
            expected_seen.append((last, code))
        else:
            wire += item
            expected_out += item
    cuts = data.draw(st.lists(st.integers(0, max(0, len(wire))), max_size=10))
    assert run(wire, cuts) == (expected_out, expected_seen)
