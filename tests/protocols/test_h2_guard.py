"""FrameGuard: HTTP/2 frame-level abuse checks, byte by byte (no sockets)."""

from __future__ import annotations

import pytest
from h2_frames import frame
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from ferryman.protocols.h2_guard import FrameGuard

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def feed_all(guard: FrameGuard, data: bytes, now: float = 0.0, step: int = 0) -> str | None:
    """Feed ``data`` whole, or in pieces of ``step`` bytes."""
    pieces = [data] if not step else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        problem = guard.feed(piece, now)
        if problem is not None:
            return problem
    return None


SETTINGS = frame(4)
HEADERS_OPEN = frame(1, 0, 1, b"h" * 1000)  # no END_HEADERS
CONTINUATION = frame(9, 0, 1, b"c" * 1000)


@pytest.mark.parametrize("step", [0, 1, 7])
def test_ordinary_traffic_passes_however_it_is_cut(step: int) -> None:
    data = PREFACE + SETTINGS + frame(1, 0x5, 1, b"h" * 50) + frame(0, 0, 3, b"d" * 100)
    data += frame(6, 0, 0, b"p" * 8) + frame(3, 0, 1, b"\0\0\0\x08") + frame(0, 1, 3, b"")
    assert feed_all(FrameGuard(), data, step=step) is None


@pytest.mark.parametrize("step", [0, 5])
def test_a_continuation_flood_is_stopped_at_the_header_block_limit(step: int) -> None:
    guard = FrameGuard(max_header_block=10_000)
    data = PREFACE + HEADERS_OPEN + CONTINUATION * 8  # 9,000 bytes: within the limit
    assert feed_all(guard, data, step=step) is None
    problem = feed_all(guard, CONTINUATION * 2, step=step)
    assert problem == "header block larger than 10000 bytes"


def test_a_header_block_ended_resets_the_count() -> None:
    guard = FrameGuard(max_header_block=3000)
    block = frame(1, 0, 1, b"h" * 1000) + frame(9, 0x4, 1, b"c" * 1000)  # END_HEADERS
    assert feed_all(guard, PREFACE + block * 10) is None


@pytest.mark.parametrize(
    ("flood", "reason"),
    [
        (frame(3, 0, 1, b"\0\0\0\x08"), "more than 100 stream resets in a second"),
        (SETTINGS, "more than 100 SETTINGS frames in a second"),
        (frame(6, 0, 0, b"p" * 8), "more than 100 PING frames in a second"),
        (frame(0, 0, 1, b""), "more than 100 empty DATA frames in a second"),
    ],
    ids=["rst", "settings", "ping", "empty-data"],
)
def test_floods_are_stopped_past_the_rate(flood: bytes, reason: str) -> None:
    guard = FrameGuard(max_per_second=100)
    assert feed_all(guard, PREFACE + flood * 100, now=10.0) is None
    assert feed_all(guard, flood, now=10.5) == reason


def test_the_rate_window_moves_on() -> None:
    guard = FrameGuard(max_per_second=100)
    ping = frame(6, 0, 0, b"p" * 8)
    for second in range(5):  # 100 a second is allowed, however long it goes on
        assert feed_all(guard, (PREFACE if second == 0 else b"") + ping * 100, now=second) is None


def test_acks_and_data_with_content_are_not_counted() -> None:
    guard = FrameGuard(max_per_second=10)
    data = PREFACE + frame(4, 1) * 50 + frame(6, 1, 0, b"p" * 8) * 50 + frame(0, 0, 1, b"x") * 50
    assert feed_all(guard, data) is None


# --- properties: however the reads cut the stream, the verdict is the same ----------------


_KINDS = [0, 1, 3, 4, 6, 8, 9]  # DATA HEADERS RST SETTINGS PING WINDOW_UPDATE CONTINUATION

frames_strategy = st.lists(
    st.tuples(st.sampled_from(_KINDS), st.integers(0, 255), st.binary(max_size=300)),
    max_size=60,
)


def _verdict_and_where(guard: FrameGuard, data: bytes, cuts: list[int]) -> tuple[str | None, int]:
    """The guard's verdict and the number of bytes fed when it came."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    fed = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        problem = guard.feed(data[a:b], 0.0)
        fed = b
        if problem is not None:
            return problem, fed
    return None, fed


@seed(20261127)
@settings(max_examples=300, deadline=None)
@given(frames_strategy, st.lists(st.integers(0, 20000), max_size=8))
def test_the_verdict_does_not_depend_on_how_reads_cut_the_frames(
    frames: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    data = PREFACE + b"".join(frame(k, f, 1, p) for k, f, p in frames)
    whole, _ = _verdict_and_where(FrameGuard(max_header_block=2000, max_per_second=5), data, [])
    split, _ = _verdict_and_where(FrameGuard(max_header_block=2000, max_per_second=5), data, cuts)
    assert split == whole
    bytewise = FrameGuard(max_header_block=2000, max_per_second=5)
    assert _verdict_and_where(bytewise, data, list(range(len(data))))[0] == whole
