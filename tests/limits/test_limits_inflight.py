"""Inflight: per-key concurrency; every exit path gives the unit back, exactly once."""

from __future__ import annotations

import gc

import pytest

from ferryman.limits import Guard, Inflight


def test_up_to_the_limit_per_key() -> None:
    inflight = Inflight(2)
    a1, a2 = inflight.acquire("a"), inflight.acquire("a")
    assert isinstance(a1, Guard) and isinstance(a2, Guard)
    assert inflight.acquire("a") is None  # at its limit
    b = inflight.acquire("b")  # another key is unaffected
    assert b is not None and inflight.count("b") == 1
    a1.release()
    assert inflight.count("a") == 1
    a3 = inflight.acquire("a")
    assert a3 is not None and inflight.count("a") == 2
    for guard in (a2, a3, b):
        guard.release()
    assert len(inflight) == 0  # keys with nothing in progress are forgotten


def test_a_double_release_frees_nothing_more() -> None:
    inflight = Inflight(1)
    first = inflight.acquire(b"k")
    assert first is not None
    first.release()
    second = inflight.acquire(b"k")
    assert second is not None
    first.release()  # (a second release of the first guard)
    assert inflight.count(b"k") == 1 and inflight.acquire(b"k") is None
    assert first.released and not second.released


def test_an_exception_in_a_with_block_releases() -> None:
    inflight = Inflight(1)
    with pytest.raises(RuntimeError):
        guard = inflight.acquire("k")
        assert guard is not None
        with guard:
            raise RuntimeError("the upstream failed")
    assert inflight.count("k") == 0


def test_a_dropped_guard_is_released_when_collected() -> None:
    inflight = Inflight(3)

    def work_that_loses_its_guard() -> None:
        guard = inflight.acquire("k")
        assert guard is not None
        raise ValueError("a hook raised before storing its guard")

    for _ in range(5):
        with pytest.raises(ValueError):
            work_that_loses_its_guard()
        gc.collect()
    assert inflight.count("k") == 0


def test_memory_follows_the_work_in_progress() -> None:
    inflight = Inflight(1)
    for i in range(10_000):
        guard = inflight.acquire(f"client-{i}")
        assert guard is not None
        guard.release()
    assert len(inflight) == 0


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Inflight(0)
