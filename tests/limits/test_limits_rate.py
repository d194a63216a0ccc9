"""Rate: the sliding-window interpolation against an exact count on a trace; TokenBucket."""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Callable

import pytest

from ferryman.limits import Rate, TokenBucket

WINDOW = 1.0
WINDOWS = 60


def _rate_functions() -> dict[str, Callable[[float], float]]:
    """Arrival rates in events per second (= per window) as functions of time."""
    return {
        # smooth traffic: the interpolation's assumption (even arrivals) nearly holds
        "steady": lambda t: 3000.0,
        "sine": lambda t: 3000.0 * (1.0 + 0.5 * math.sin(2.0 * math.pi * t / 30.0)),
        "ramp": lambda t: 500.0 + 4500.0 * t / (WINDOWS * WINDOW),
        # abrupt steps in the middle of windows: the assumption breaks for a window
        "steps": lambda t: (1000.0, 4000.0, 2000.0)[int(t / 7.3) % 3],
    }


_PEAK = 5000.0


@functools.cache
def _trace(seed: int = 9) -> list[tuple[float, str]]:
    """A recorded trace: (time, key), sorted; for each key an inhomogeneous Poisson process
    drawn by thinning, from a seeded generator so it is the same on every run."""
    rng = random.Random(seed)
    events: list[tuple[float, str]] = []
    for name, fn in _rate_functions().items():
        t = 0.0
        while True:
            t += rng.expovariate(_PEAK)
            if t >= WINDOWS * WINDOW:
                break
            if rng.random() * _PEAK < fn(t):
                events.append((t, name))
    events.sort()
    return events



def _replay(rate: Rate, until: float = math.inf) -> dict[str, list[tuple[float, int]]]:
    """Observe every event of the trace (before ``until``); per key, (estimate, exact) at
    each event, the exact count being the events in (t - window, t], this one included."""
    times: dict[str, list[float]] = {}
    out: dict[str, list[tuple[float, int]]] = {}
    for t, key in _trace():
        if t >= until:
            break
        estimate = rate.observe(key, now=t)
        ts = times.setdefault(key, [])
        ts.append(t)
        exact = len(ts) - bisect.bisect_right(ts, t - WINDOW)
        out.setdefault(key, []).append((estimate, exact))
    return out


def _relative_error(samples: list[tuple[float, int]]) -> float:
    """Aggregate relative error: sum of |estimate - exact| over sum of exact."""
    return sum(abs(e - x) for e, x in samples) / sum(x for _, x in samples)


def _disagreements(samples: list[tuple[float, int]], limit: float) -> float:
    """Fraction of events on which "over the limit" differs between estimate and exact."""
    return sum((e > limit) != (x > limit) for e, x in samples) / len(samples)


class _NoInterpolation(Rate):
    """Broken: counts only the current window (fraction elapsed taken as 1)."""

    __slots__ = ()

    def _advance(self, now: float) -> float:
        super()._advance(now)
        return 1.0


class _TwoFullWindows(Rate):
    """Broken: adds the whole previous window (fraction elapsed taken as 0)."""

    __slots__ = ()

    def _advance(self, now: float) -> float:
        super()._advance(now)
        return 0.0


class _ReversedWeight(Rate):
    """Broken: weighs the previous window by the elapsed fraction instead of the rest."""

    __slots__ = ()

    def _advance(self, now: float) -> float:
        return 1.0 - super()._advance(now)


@pytest.fixture(scope="module")
def replayed() -> dict[str, list[tuple[float, int]]]:
    return _replay(Rate(WINDOW))


def test_rate_matches_exact_sliding_window_within_1_percent(
    replayed: dict[str, list[tuple[float, int]]],
) -> None:
    """The issue's criterion, stated precisely: on a recorded trace of ~60 windows of
    Poisson arrivals at 500 to 5000 events per window whose rates vary smoothly (steady, a
    30-window sine, a ramp), the estimate returned by ``observe`` at every event is compared
    with the exact count of events in (t - window, t]; the aggregate relative error
    sum|estimate - exact| / sum(exact) is at most 1% over the trace and for each key.

    What remains is mostly Poisson noise: the exact count of the previous window's events
    still in the sliding window is binomial around the interpolated share, so the error
    shrinks like 1/sqrt(events per window) (about 0.5% at 3000 per window, 1.4% at 500).
    Abrupt changes within a window break the even-arrivals assumption (next test).
    """
    smooth = [s for key in ("steady", "sine", "ramp") for s in replayed[key]]
    assert len(smooth) > 150_000
    assert _relative_error(smooth) <= 0.01
    for key in ("steady", "sine", "ramp"):
        assert _relative_error(replayed[key]) <= 0.01, key


def test_rate_abrupt_steps_stay_within_3_percent(
    replayed: dict[str, list[tuple[float, int]]],
) -> None:
    """Rates that jump mid-window (x4, /2) break the even-arrivals assumption for the window
    after each jump; over the trace the aggregate error stays under 3% (measured: ~1.5%)."""
    assert _relative_error(replayed["steps"]) <= 0.03


@pytest.mark.parametrize("broken", [_NoInterpolation, _TwoFullWindows, _ReversedWeight])
def test_the_criterion_rejects_broken_interpolation(broken: type[Rate]) -> None:
    """The 1% criterion can fail: without interpolation (current window only, or both
    windows whole) or with the weight reversed, the error on the same trace (its first 15
    windows, to save time) is ~50%."""
    replayed = _replay(broken(WINDOW), until=15 * WINDOW)
    smooth = [s for key in ("steady", "sine", "ramp") for s in replayed[key]]
    assert _relative_error(smooth) > 0.2


def test_rate_interpolates_between_windows() -> None:
    rate = Rate(10.0)
    for i in range(100):  # 100 events evenly over [0, 10)
        rate.observe(b"k", now=i * 0.1)
    assert rate.rate(b"k", now=9.99) == pytest.approx(100, abs=0.01)
    # 2.5 s into the next window, 75% of the previous one is still inside the sliding window
    assert rate.rate(b"k", now=12.5) == pytest.approx(75.0)
    assert rate.observe(b"k", 5, now=12.5) == pytest.approx(80.0)
    assert rate.rate("k", now=19.999) == pytest.approx(5.01, abs=0.01)
    assert rate.rate(b"other", now=12.5) == 0.0


def test_rate_rotation_clears_after_a_whole_window() -> None:
    rate = Rate(1.0)
    rate.observe(b"k", 10, now=5.5)
    assert rate.rate(b"k", now=6.0) == pytest.approx(10.0)
    assert rate.rate(b"k", now=6.5) == pytest.approx(5.0)
    assert rate.rate(b"k", now=7.0) == 0.0  # the window of 5.5 is two windows back
    rate.observe(b"k", 3, now=7.2)
    assert rate.rate(b"k", now=100.0) == 0.0  # many windows later: both cleared
    rate.observe(b"k", 1, now=100.5)
    assert rate.rate(b"k", now=100.5) == pytest.approx(1.0)
    # time going backwards counts as no time passing
    assert rate.observe(b"k", 1, now=99.0) == pytest.approx(2.0)


def test_rate_default_clock() -> None:
    now = [50.0]
    rate = Rate(1.0, clock=lambda: now[0])
    rate.observe(b"k")
    rate.observe(b"k")
    assert rate.rate(b"k") == 2.0
    now[0] = 51.5
    assert rate.rate(b"k") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Rate(0.0)


# -- TokenBucket --------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0)
    assert [bucket.take(b"a", now=0.0)[0] for _ in range(5)] == [True] * 5
    allowed, retry = bucket.take(b"a", now=0.0)
    assert not allowed and retry == pytest.approx(0.1)
    assert bucket.take(b"a", now=0.05) == (False, pytest.approx(0.05))
    assert bucket.take(b"a", now=0.1) == (True, 0.0)  # back exactly at the retry-after
    # sustained: over 10 s at 100 attempts per second, ~10 per second get through
    allowed_count = sum(bucket.take(b"a", now=0.1 + i * 0.01)[0] for i in range(1, 1001))
    assert allowed_count == pytest.approx(100, abs=1)
    # another key has its own full bucket
    assert bucket.tokens(b"b", now=10.0) == 5.0
    assert bucket.take(b"b", 5, now=10.0) == (True, 0.0)


def test_token_bucket_retry_after_is_exact() -> None:
    bucket = TokenBucket(rate=4.0, burst=8.0)
    assert bucket.take("k", 8, now=100.0) == (True, 0.0)
    allowed, retry = bucket.take("k", 3, now=100.25)  # 1 token refilled
    assert not allowed and retry == pytest.approx(0.5)
    assert bucket.take("k", 3, now=100.25 + retry - 0.01)[0] is False
    assert bucket.take("k", 3, now=100.25 + retry) == (True, 0.0)
    assert bucket.tokens("k", now=100.75) == pytest.approx(0.0)
    # refill is capped at burst
    assert bucket.tokens("k", now=1000.0) == 8.0
    # more than a burst never fits
    assert bucket.take("k", 9, now=1000.0) == (False, math.inf)
    assert bucket.take("new", 9, now=1000.0) == (False, math.inf)
    assert len(bucket) == 1  # the refused new key got no bucket


def test_token_bucket_memory_is_bounded() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, max_keys=100)
    for i in range(10_000):  # 10 000 keys, one request each, 5 ms apart
        assert bucket.take(i, now=i * 0.005) == (True, 0.0)
        assert len(bucket) <= 100
    # each bucket is evicted 0.5 s after its request, when it holds 1.5 of 2 tokens
    assert bucket.lossy_evictions == 10_000 - 100

    idle = TokenBucket(rate=1.0, burst=2.0, max_keys=100)
    for i in range(10_000):  # one key a second: each bucket is full again after 1 s
        idle.take(i, now=float(i))
    assert len(idle) == 100 and idle.lossy_evictions == 0


def test_token_bucket_expire_drops_only_full_buckets() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0)  # empty to full in 2 s
    for i in range(10):
        bucket.take(i, 4, now=float(i))  # key i emptied at time i
    assert bucket.expire(now=9.5) == 8  # keys 0..7 idle for >= 2 s
    assert len(bucket) == 2
    assert bucket.tokens(8, now=9.5) == pytest.approx(3.0)  # kept: still owed a token
    bucket.take(8, now=9.6)  # recently used keys move to the end
    assert bucket.expire(now=11.0) == 1 and bucket.tokens(8, now=11.0) > 0
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1.0)

