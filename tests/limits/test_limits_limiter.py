"""Limiter: rates parsed from text, sliding-window admission at explicit times (quota,
interpolation across windows, burst), the verdict's fields and headers, concurrency
guards, both limits together, and counts shared by forked processes (the quota holds
for all of them; a dead process's concurrency units are given back by the sweep).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ferryman.limits import Limiter, LimitGuard, SharedArena, Verdict, parse_rate
from ferryman.limits.arena import SWEEP_INTERVAL
from forked import in_child

SIZE = 64 << 20


@pytest.fixture
def arena() -> SharedArena:
    """A fresh, small arena per test (so no counts leak between tests)."""
    return SharedArena(SIZE)


# -- forked processes -----------------------------------------------------------------------


_ANSWER = struct.Struct("=q")


class _Worker:
    """A forked process that runs ``step`` each time it is told to (:meth:`run`) and
    answers with the int it returned; told to stop, it leaves with ``os._exit``."""

    def __init__(self, step: Callable[[], int]) -> None:
        cmd_r, cmd_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(cmd_w)
                os.close(ans_r)
                while os.read(cmd_r, 1) == b"c":
                    try:
                        answer = step()
                    except BaseException:  # noqa: BLE001 - reported as -1
                        traceback.print_exc()
                        sys.stderr.flush()
                        answer = -1
                    os.write(ans_w, _ANSWER.pack(answer))
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(ans_w)
        self.pid = pid
        self._cmd = cmd_w
        self._ans = ans_r

    def start(self) -> None:
        """Tell it to run ``step`` once (without waiting)."""
        os.write(self._cmd, b"c")

    def answer(self) -> int:
        """What ``step`` returned (waits)."""
        data = b""
        while len(data) < _ANSWER.size:
            chunk = os.read(self._ans, _ANSWER.size - len(data))
            assert chunk, "the worker died"
            data += chunk
        value = int(_ANSWER.unpack(data)[0])
        assert value >= 0, "the worker's step raised (see the captured stderr)"
        return value

    def run(self) -> int:
        self.start()
        return self.answer()

    def stop(self) -> None:
        os.write(self._cmd, b"q")
        os.close(self._cmd)
        os.waitpid(self.pid, 0)
        os.close(self._ans)


@pytest.fixture
def workers() -> Iterator[Callable[[Callable[[], int]], _Worker]]:
    """``workers(step)`` forks a :class:`_Worker`; all are stopped at teardown."""
    made: list[_Worker] = []

    def make(step: Callable[[], int]) -> _Worker:
        worker = _Worker(step)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()


# -- parse_rate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("100/s", (100, 1.0)),
        ("6000/m", (6000, 60.0)),
        ("1000/h", (1000, 3600.0)),
        ("10000/d", (10000, 86400.0)),
        ("5/sec", (5, 1.0)),
        ("5/second", (5, 1.0)),
        ("5/min", (5, 60.0)),
        ("5/minute", (5, 60.0)),
        ("5/hour", (5, 3600.0)),
        ("5/day", (5, 86400.0)),
        ("10/5s", (10, 5.0)),
        ("10/0.5s", (10, 0.5)),
        ("10/.5s", (10, 0.5)),
        ("30/1.5m", (30, 90.0)),
        ("10/2h", (10, 7200.0)),
        ("100r/s", (100, 1.0)),  # nginx
        ("100req/s", (100, 1.0)),
        ("100 request / minute", (100, 60.0)),
        ("100 requests/min", (100, 60.0)),
        ("  7 / 2 m  ", (7, 120.0)),
        ("100R/S", (100, 1.0)),
        ("1/s", (1, 1.0)),
    ],
)
def test_parse_rate_accepts(text: str, parsed: tuple[int, float]) -> None:
    """Every documented form: N/UNIT, N/<number>UNIT, nginx's r suffix, long unit names,
    spaces, any case."""
    assert parse_rate(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a rate"),
        ("100", "is not a rate"),
        ("100/", "is not a rate"),
        ("/s", "is not a rate"),
        ("-1/s", "is not a rate"),
        ("1.5/s", "is not a rate"),
        ("ten/s", "is not a rate"),
        ("100 per s", "is not a rate"),
        ("100/s/s", "is not a rate"),
        ("100/-1s", "is not a rate"),
        ("100/ms", "unknown unit"),
        ("100/seconds", "unknown unit"),
        ("100/w", "unknown unit"),
        ("0/s", "at least 1 event"),
        ("10/0s", "at least 1 event"),
        ("10/0.0m", "at least 1 event"),
    ],
)
def test_parse_rate_refuses(text: str, message: str) -> None:
    """Malformed text, unknown units, no events, an empty period: ValueError."""
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


# -- making a limiter -----------------------------------------------------------------------


def test_the_quota_and_window_follow_rate_and_burst(arena: SharedArena) -> None:
    """Without burst the window is the period and holds the rate's count; with burst it
    is the time the rate takes to earn ``burst`` events, and holds ``burst``."""
    plain = Limiter("100/s", arena=arena)
    assert (plain.count, plain.period, plain.quota, plain.window) == (100, 1.0, 100, 1.0)
    burst = Limiter("100/s", burst=10, arena=arena)
    assert (burst.quota, burst.window) == (10, 0.1)
    per_minute = Limiter("6000/m", burst=50, arena=arena)
    assert (per_minute.quota, per_minute.window) == (50, 0.5)
    as_tuple = Limiter((5, 2.0), arena=arena)
    assert (as_tuple.quota, as_tuple.window) == (5, 2.0)
    concurrency_only = Limiter(concurrency=3, arena=arena)
    assert (concurrency_only.quota, concurrency_only.window) == (0, 0.0)
    assert concurrency_only.concurrency == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs a rate, a concurrency or both"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"rate": "10/s", "concurrency": -1}, "concurrency must be at least 1"),
        ({"rate": "10/s", "burst": 0}, "burst must be at least 1"),
        ({"concurrency": 2, "burst": 5}, "burst needs a rate"),
        ({"rate": "ten/s"}, "is not a rate"),
        ({"rate": "0/s"}, "at least 1 event"),
    ],
)
def test_invalid_arguments(arena: SharedArena, kwargs: dict[str, Any], message: str) -> None:
    """Each invalid combination raises ValueError with a message saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        Limiter(arena=arena, **kwargs)


@pytest.mark.parametrize("rate", [(0, 1.0), (10, 0.0), (10, -1.0)])
def test_an_invalid_rate_tuple_is_refused(arena: SharedArena, rate: tuple[int, float]) -> None:
    """A rate as ``(count, period)`` must have ``count >= 1`` and ``period > 0``, as
    :func:`parse_rate` requires of the text form."""
    with pytest.raises(ValueError):
        Limiter(rate, arena=arena)


# -- the rate -------------------------------------------------------------------------------


def test_the_quota_is_admitted_then_refused(arena: SharedArena) -> None:
    """10/s: ten requests at once are admitted (remaining counting down), the eleventh
    is refused for the rate; refusals are not counted; another key is not affected."""
    limiter = Limiter("10/s", arena=arena)
    remaining = []
    for _ in range(10):
        verdict = limiter.check(b"client", now=100.25)
        assert verdict.admitted and verdict.reason is None and verdict.guard is None
        remaining.append(verdict.remaining)
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    for _ in range(5):
        refused = limiter.check(b"client", now=100.25)
        assert not refused.admitted
        assert refused.reason == "rate"
        assert refused.remaining == 0
    assert limiter.rate(b"client", now=100.25) == 10.0  # (refusals not counted)
    assert limiter.check(b"other", now=100.25).admitted
    assert limiter.rate(b"other", now=100.25) == 1.0


def test_a_str_key_is_its_utf8_bytes(arena: SharedArena) -> None:
    """``"k"`` and ``b"k"`` are the same key."""
    limiter = Limiter("2/s", arena=arena)
    assert limiter.check("k", now=5.5).admitted
    assert limiter.check(b"k", now=5.5).admitted
    assert not limiter.check("k", now=5.5).admitted


@pytest.mark.parametrize(
    ("into_next", "admitted"),
    [(0.0, 0), (0.25, 3), (0.5, 5), (0.75, 8)],
)
def test_the_previous_window_counts_pro_rata(
    arena: SharedArena, into_next: float, admitted: int
) -> None:
    """After a full window of 10, ``f`` of the way into the next one the previous
    window still weighs ``10 * (1 - f)``: half-way, 5 more are admitted."""
    limiter = Limiter("10/s", arena=arena)
    assert sum(limiter.check(b"k", now=100.5).admitted for _ in range(20)) == 10
    now = 101.0 + into_next
    assert limiter.rate(b"k", now=now) == 10 * (1 - into_next)
    assert sum(limiter.check(b"k", now=now).admitted for _ in range(20)) == admitted


def test_half_way_into_the_next_window_remaining_counts_down_to_zero(
    arena: SharedArena,
) -> None:
    """Half-way into the window after a full one: 5 admitted, remaining 4..0, and the
    window's reset is the time left in it while some remain."""
    limiter = Limiter("10/s", arena=arena)
    for _ in range(10):
        limiter.check(b"k", now=100.5)
    verdicts = [limiter.check(b"k", now=101.5) for _ in range(6)]
    assert [v.admitted for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0, 0]
    assert [v.reset for v in verdicts[:4]] == [0.5] * 4


def test_two_windows_later_the_whole_quota_is_back(arena: SharedArena) -> None:
    """Once the window of the counts is no longer the previous one, it weighs nothing."""
    limiter = Limiter("10/s", arena=arena)
    assert sum(limiter.check(b"k", now=100.5).admitted for _ in range(20)) == 10
    assert limiter.rate(b"k", now=102.0) == 0.0
    assert sum(limiter.check(b"k", now=102.0).admitted for _ in range(20)) == 10
    # and much later (the window slots are reused, not misread)
    assert sum(limiter.check(b"k", now=1000.75).admitted for _ in range(20)) == 10


def test_burst_makes_a_short_window_that_holds_the_burst(arena: SharedArena) -> None:
    """100/s with burst 10: a 0.1 s window of 10; after it, 10 more; over a second of
    steady over-demand about 100 are admitted (the rate)."""
    limiter = Limiter("100/s", burst=10, arena=arena)
    verdicts = [limiter.check(b"k", now=5.0) for _ in range(11)]
    assert [v.admitted for v in verdicts] == [True] * 10 + [False]
    assert verdicts[0].quota == 10 and verdicts[0].window == 0.1
    assert verdicts[-1].retry_after == pytest.approx(0.1)
    assert sum(limiter.check(b"k", now=5.25).admitted for _ in range(20)) == 10
    # one request a millisecond for a second: ten times the rate
    steady = Limiter("100/s", burst=10, arena=arena, name="steady")
    admitted = sum(steady.check(b"k", now=10.0 + i / 1000).admitted for i in range(1000))
    assert 100 <= admitted <= 110


def test_limiters_of_one_name_and_window_share_counts(arena: SharedArena) -> None:
    """Limiters with the same name and window in one arena count together (a reloaded
    config finds its counts), also when only the quota changed; another window or name
    counts apart."""
    first = Limiter("10/s", name="route", arena=arena)
    assert sum(first.check(b"k", now=7.5).admitted for _ in range(6)) == 6
    reloaded = Limiter("10/s", name="route", arena=arena)
    assert sum(reloaded.check(b"k", now=7.5).admitted for _ in range(10)) == 4
    raised = Limiter("20/s", name="route", arena=arena)
    assert sum(raised.check(b"k", now=7.5).admitted for _ in range(20)) == 10
    other_window = Limiter("10/2s", name="route", arena=arena)
    assert sum(other_window.check(b"k", now=7.5).admitted for _ in range(20)) == 10
    other_name = Limiter("10/s", name="elsewhere", arena=arena)
    assert sum(other_name.check(b"k", now=7.5).admitted for _ in range(20)) == 10


# -- verdicts -------------------------------------------------------------------------------


def test_verdict_fields_when_admitted_and_refused(arena: SharedArena) -> None:
    """10/s, a quarter into a window: the first verdict has 9 remaining and resets at the
    window's end (0.75 s); the last admitted and the refused ones say the same 0.75 s
    (the current window must end), refused with retry_after 0.75 s."""
    limiter = Limiter("10/s", arena=arena)
    first = limiter.check(b"k", now=100.25)
    assert (first.admitted, first.reason, first.quota, first.remaining) == (True, None, 10, 9)
    assert first.reset == pytest.approx(0.75)
    assert (first.retry_after, first.window, first.guard) == (0.0, 1.0, None)
    for _ in range(8):
        limiter.check(b"k", now=100.25)
    last = limiter.check(b"k", now=100.25)
    assert last.admitted and last.remaining == 0
    assert last.reset == pytest.approx(0.75)
    refused = limiter.check(b"k", now=100.25)
    assert (refused.admitted, refused.reason, refused.quota, refused.remaining) == (
        False, "rate", 10, 0,
    )
    assert refused.retry_after == pytest.approx(0.75)
    assert refused.reset == pytest.approx(0.75)
    assert refused.window == 1.0 and refused.guard is None


@pytest.mark.parametrize(
    ("admitted_before", "refused_at"),
    [
        ([(100.25, 10)], 100.25),  # the current window is full: wait for its end
        ([(100.5, 10), (101.25, 3)], 101.25),  # the previous window must fade further
        ([(100.5, 10), (101.75, 8)], 101.75),
    ],
)
def test_retry_after_is_when_a_request_is_admitted_again(
    arena: SharedArena, admitted_before: list[tuple[float, int]], refused_at: float
) -> None:
    """Refused at t with retry_after r: still refused a little before t + r, admitted
    just after it."""
    for now, count in admitted_before:
        for _ in range(count):
            assert Limiter("10/s", arena=arena, name="shared").check(b"k", now=now).admitted
    limiter = Limiter("10/s", arena=arena, name="shared")
    refused = limiter.check(b"k", now=refused_at)
    assert not refused.admitted
    r = refused.retry_after
    assert r > 0.001
    assert not limiter.check(b"k", now=refused_at + r - 0.001).admitted
    assert limiter.check(b"k", now=refused_at + r + 1e-6).admitted


def test_a_refused_verdict_never_says_retry_now(arena: SharedArena) -> None:
    """Refused at the start of the window after a full one (the estimate is exactly the
    quota): retry_after must be positive, a retry at once is refused again."""
    limiter = Limiter("10/s", arena=arena)
    for _ in range(10):
        limiter.check(b"k", now=100.5)
    refused = limiter.check(b"k", now=101.0)
    assert not refused.admitted
    assert refused.retry_after > 0.0


def test_headers_of_a_rate_verdict(arena: SharedArena) -> None:
    """RateLimit-Limit, -Remaining, -Reset (whole seconds, rounded up) and -Policy
    (quota;w=window) for a whole-second window."""
    limiter = Limiter("6000/m", arena=arena)
    verdict = limiter.check(b"k", now=60 * 1000 + 15.5)
    assert verdict.headers() == [
        (b"RateLimit-Limit", b"6000"),
        (b"RateLimit-Remaining", b"5999"),
        (b"RateLimit-Reset", b"45"),  # 44.5 s left in the window
        (b"RateLimit-Policy", b"6000;w=60"),
    ]


@pytest.mark.parametrize(("rate", "burst"), [("10/1.5s", None), ("100/s", 10)])
def test_the_policy_is_left_out_for_a_window_of_a_fraction_of_a_second(
    arena: SharedArena, rate: str, burst: int | None
) -> None:
    """A 1.5 s or a 0.1 s window cannot be said in the policy's whole seconds."""
    verdict = Limiter(rate, burst=burst, arena=arena).check(b"k", now=30.0)
    names = [name for name, _value in verdict.headers()]
    assert names == [b"RateLimit-Limit", b"RateLimit-Remaining", b"RateLimit-Reset"]


def test_no_headers_without_a_rate(arena: SharedArena) -> None:
    """A concurrency-only verdict, admitted or refused, has no RateLimit headers."""
    limiter = Limiter(concurrency=1, arena=arena)
    admitted = limiter.check(b"k")
    refused = limiter.check(b"k")
    assert admitted.admitted and not refused.admitted
    assert admitted.headers() == [] and refused.headers() == []
    assert Verdict(True).headers() == []


@pytest.mark.parametrize(
    ("retry_after", "value"),
    [(0.0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.01, b"2"), (2.5, b"3"), (59.999, b"60")],
)
def test_retry_after_value_is_whole_seconds_at_least_one(
    retry_after: float, value: bytes
) -> None:
    """Rounded up, never 0."""
    assert Verdict(False, "rate", retry_after=retry_after).retry_after_value() == value


# -- concurrency ----------------------------------------------------------------------------


def test_concurrency_admits_up_to_the_limit_per_key(arena: SharedArena) -> None:
    """Two at once per key: the third is refused (reason "concurrency", retry_after 1 s,
    no guard); a released unit lets the next one in; another key is not affected."""
    limiter = Limiter(concurrency=2, arena=arena)
    one, two = limiter.check(b"k"), limiter.check(b"k")
    assert one.admitted and two.admitted
    assert isinstance(one.guard, LimitGuard) and one.guard.key == b"k"
    assert (one.quota, one.remaining, one.window) == (0, 0, 0.0)
    refused = limiter.check(b"k")
    assert (refused.admitted, refused.reason, refused.retry_after, refused.guard) == (
        False, "concurrency", 1.0, None,
    )
    assert limiter.inflight(b"k") == 2
    other = limiter.check(b"other")
    assert other.admitted and limiter.inflight(b"other") == 1
    assert one.guard is not None
    one.guard.release()
    assert one.guard.released and limiter.inflight(b"k") == 1
    three = limiter.check(b"k")
    assert three.admitted and limiter.inflight(b"k") == 2
    for verdict in (two, three, other):
        assert verdict.guard is not None
        verdict.guard.release()
    assert limiter.inflight(b"k") == 0 and limiter.inflight(b"other") == 0


def test_release_is_idempotent(arena: SharedArena) -> None:
    """A second release of a guard frees nothing: not someone else's unit."""
    limiter = Limiter(concurrency=1, arena=arena)
    first = limiter.check(b"k").guard
    assert first is not None
    first.release()
    second = limiter.check(b"k").guard
    assert second is not None
    first.release()
    first.release()
    assert limiter.inflight(b"k") == 1
    assert not limiter.check(b"k").admitted
    assert first.released and not second.released
    second.release()
    assert limiter.inflight(b"k") == 0


def test_a_with_block_releases(arena: SharedArena) -> None:
    """A guard used as a context manager is released on leaving, by an exception too."""
    limiter = Limiter(concurrency=1, arena=arena)
    guard = limiter.check(b"k").guard
    assert guard is not None
    with pytest.raises(RuntimeError), guard:
        assert limiter.inflight(b"k") == 1
        raise RuntimeError("the upstream failed")
    assert guard.released and limiter.inflight(b"k") == 0


def test_a_dropped_guard_is_released_when_collected(arena: SharedArena) -> None:
    """A verdict thrown away with its guard (a hook that raised before storing it) gives
    the unit back when collected."""
    limiter = Limiter(concurrency=3, arena=arena)

    def work_that_loses_its_guard() -> None:
        verdict = limiter.check(b"k")
        assert verdict.admitted
        raise ValueError("a hook raised")

    for _ in range(5):
        with pytest.raises(ValueError):
            work_that_loses_its_guard()
        gc.collect()
    assert limiter.inflight(b"k") == 0
    held = [limiter.check(b"k") for _ in range(3)]
    assert all(v.admitted for v in held) and limiter.inflight(b"k") == 3
    del held
    gc.collect()
    assert limiter.inflight(b"k") == 0


# -- rate and concurrency together ----------------------------------------------------------


def test_a_rate_refusal_gives_the_concurrency_unit_back(arena: SharedArena) -> None:
    """3/s with 5 at once: 3 admitted and held; the 4th is refused for the rate and does
    not keep the unit it took."""
    limiter = Limiter("3/s", concurrency=5, arena=arena)
    held = [limiter.check(b"k", now=50.5) for _ in range(3)]
    assert all(v.admitted and v.guard is not None for v in held)
    assert held[0].quota == 3 and held[0].remaining == 2
    assert limiter.inflight(b"k") == 3
    for _ in range(4):
        refused = limiter.check(b"k", now=50.5)
        assert (refused.admitted, refused.reason, refused.guard) == (False, "rate", None)
    assert limiter.inflight(b"k") == 3
    for verdict in held:
        assert verdict.guard is not None
        verdict.guard.release()
    assert limiter.inflight(b"k") == 0


def test_a_concurrency_refusal_is_not_counted_in_the_rate(arena: SharedArena) -> None:
    """10/s with 1 at once: while one is in progress the others are refused for
    concurrency and not counted; after its release the next one is."""
    limiter = Limiter("10/s", concurrency=1, arena=arena)
    first = limiter.check(b"k", now=50.5)
    assert first.admitted and first.guard is not None
    for _ in range(5):
        assert limiter.check(b"k", now=50.5).reason == "concurrency"
    assert limiter.rate(b"k", now=50.5) == 1.0
    first.guard.release()
    second = limiter.check(b"k", now=50.5)
    assert second.admitted and second.remaining == 8
    assert limiter.rate(b"k", now=50.5) == 2.0


# -- shared by processes --------------------------------------------------------------------


def test_forked_processes_taking_turns_share_the_quota_exactly(
    arena: SharedArena, workers: Callable[[Callable[[], int]], _Worker]
) -> None:
    """Two children, one check each in turn, 20 tries each against 20/s: 20 admitted in
    all, 10 each (each sees the other's counts); the parent sees the 20 too."""
    limiter = Limiter("20/s", arena=arena)

    def one_check() -> int:
        return int(limiter.check(b"k", now=500.5).admitted)

    a, b = workers(one_check), workers(one_check)
    admitted = {a.pid: 0, b.pid: 0}
    for _ in range(20):
        for worker in (a, b):
            admitted[worker.pid] += worker.run()
    assert sorted(admitted.values()) == [10, 10]
    assert limiter.rate(b"k", now=500.5) == 20.0
    assert not limiter.check(b"k", now=500.5).admitted


def test_forked_processes_one_after_the_other_share_the_quota(arena: SharedArena) -> None:
    """A child admits what it can (30 tries against 20/s), another then gets nothing
    more; a third child a window later gets the quota again."""
    limiter = Limiter("20/s", arena=arena)

    def tries(now: float) -> Callable[[], int]:
        return lambda: sum(limiter.check(b"k", now=now).admitted for _ in range(30))

    assert in_child(tries(500.5))[1] == 20
    assert in_child(tries(500.5))[1] == 0
    assert in_child(tries(502.0))[1] == 20


def test_forked_processes_at_once_hold_the_quota_and_lose_no_count(
    arena: SharedArena, workers: Callable[[Callable[[], int]], _Worker]
) -> None:
    """Two children checking as fast as they can, 200 tries each against 50/s: what
    they admitted is exactly what the counts say (no lost update), and never more than
    the quota (a check adds to its own region, then reads the sum, and takes its count
    back if over: no lock). Racing for the last unit, both may refuse it; later tries
    take it, unless the race was over the very last tries."""
    limiter = Limiter("50/s", arena=arena)

    def burst() -> int:
        return sum(limiter.check(b"k", now=600.5).admitted for _ in range(200))

    a, b = workers(burst), workers(burst)
    a.start()
    b.start()
    total = a.answer() + b.answer()
    assert limiter.rate(b"k", now=600.5) == total
    assert 49 <= total <= 50


def test_units_held_by_a_dead_process_are_given_back_by_sweep(arena: SharedArena) -> None:
    """A child takes 2 of 3 units and 2 of 10/s and dies without releasing: the units
    count until a sweep (the parent gets one more, then is refused); after the sweep the
    units are back, while the child's admitted requests still count in the rate."""
    limiter = Limiter("10/s", concurrency=3, arena=arena)
    # (this process takes its slot first: else it would take over the dead child's,
    # which zeroes the units as well: see test_limits_arena)
    assert limiter.inflight(b"k") == 0
    arena.sweep(time.monotonic())  # (so that no check sweeps within the next second)
    kept: list[Verdict] = []  # (in the child: alive until it exits)

    def dies_holding() -> list[bool]:
        kept.extend(limiter.check(b"k", now=700.5) for _ in range(2))
        return [v.admitted for v in kept]

    _pid, admitted = in_child(dies_holding)
    assert admitted == [True, True]
    assert limiter.inflight(b"k") == 2
    mine = limiter.check(b"k", now=700.5)
    assert mine.admitted
    assert limiter.check(b"k", now=700.5).reason == "concurrency"
    assert arena.sweep() == 1
    assert limiter.inflight(b"k") == 1  # (this process's own unit)
    assert limiter.rate(b"k", now=700.5) == 3.0
    assert mine.guard is not None
    mine.guard.release()
    assert limiter.inflight(b"k") == 0


def test_check_gives_a_dead_process_units_back_within_the_sweep_interval(
    arena: SharedArena,
) -> None:
    """No explicit sweep: the limiter sweeps by itself (at most once per interval), so a
    key a dead child held at its limit is admitted again within about a second."""
    limiter = Limiter(concurrency=1, arena=arena)
    assert limiter.check(b"warm-up").admitted  # (this process's slot and region)

    kept: list[Verdict] = []  # (in the child: alive until it exits)

    def dies_holding() -> bool:
        kept.append(limiter.check(b"k"))
        return kept[0].admitted

    assert in_child(dies_holding)[1]
    died = time.monotonic()
    deadline = died + SWEEP_INTERVAL + 2.0
    while True:
        verdict = limiter.check(b"k")
        if verdict.admitted or time.monotonic() > deadline:
            break
        assert verdict.reason == "concurrency"
        time.sleep(0.02)
    assert verdict.admitted
    assert time.monotonic() - died <= SWEEP_INTERVAL + 0.5


def test_a_limiter_without_room_for_its_zone_counts_in_its_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An arena with no room for the limiter's zone: counted per process (logged), the
    limits still hold."""
    base = SharedArena(SIZE).used
    full = SharedArena(base + 4096)
    full.zone("filler", 0)  # (takes the last page)
    with caplog.at_level(logging.ERROR, logger="ferryman.limits"):
        limiter = Limiter("3/s", concurrency=2, name="no-room", arena=full, slots=64)
    assert any("counted per process" in r.getMessage() for r in caplog.records)
    verdicts = [limiter.check(b"k", now=9.5) for _ in range(3)]
    assert [v.admitted for v in verdicts] == [True, True, False]
    assert verdicts[-1].reason == "concurrency"
    assert limiter.inflight(b"k") == 2
    for verdict in verdicts[:2]:
        assert verdict.guard is not None
        verdict.guard.release()
    assert limiter.check(b"k", now=9.5).admitted
    assert not limiter.check(b"k", now=9.5).admitted  # (the rate: 3 counted)
    assert limiter.rate(b"k", now=9.5) == 3.0


def test_a_zone_whose_region_does_not_fit_is_counted_in_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Room for the zone but not for this process's region: the first check finds out
    (logged) and the counts are this process's own from then on, limits holding."""
    base = SharedArena(SIZE).used
    tight = SharedArena(base + 4096)
    limiter = Limiter("3/s", name="no-region", arena=tight, slots=64)
    with caplog.at_level(logging.ERROR, logger="ferryman.limits"):
        verdicts = [limiter.check(b"k", now=9.5) for _ in range(4)]
    assert any("counted per process" in r.getMessage() for r in caplog.records)
    assert [v.admitted for v in verdicts] == [True, True, True, False]


def test_rate_and_inflight_read_every_process(arena: SharedArena) -> None:
    """``rate`` and ``inflight`` add up all processes' regions, also in a process that
    never checked anything itself (the dead child's units count until swept)."""
    limiter = Limiter("10/s", concurrency=5, arena=arena)
    arena.slot()  # (not the dead child's slot, which would zero its units)
    kept: list[Verdict] = []  # (in the child: alive until it exits)

    def child() -> int:
        kept.extend(limiter.check(b"k", now=800.5) for _ in range(4))
        guard = kept[0].guard
        assert guard is not None
        guard.release()
        return sum(v.admitted for v in kept)

    assert in_child(child)[1] == 4
    assert limiter.rate(b"k", now=800.5) == 4.0
    assert limiter.rate(b"k", now=801.5) == 2.0
    assert limiter.inflight(b"k") == 3
    assert math.isclose(limiter.rate(b"k", now=802.0), 0.0)


# -- peeking, names, periods -----------------------------------------------------------------


def test_peek_says_what_check_would_without_counting(arena: SharedArena) -> None:
    """peek answers as check would, counting nothing and taking no unit."""
    limiter = Limiter("3/s", concurrency=1, arena=arena)
    for _ in range(5):
        verdict = limiter.peek(b"k", now=10.0)
        assert verdict.admitted and verdict.guard is None and verdict.remaining == 2
    assert limiter.rate(b"k", now=10.0) == 0 and limiter.inflight(b"k") == 0
    held = limiter.check(b"k", now=10.0)
    assert held.admitted and held.guard is not None
    assert limiter.peek(b"k", now=10.0).reason == "concurrency"
    held.guard.release()
    for _ in range(2):
        limiter.check(b"k", now=10.0).guard.release()  # type: ignore[union-attr]
    assert limiter.peek(b"k", now=10.0).reason == "rate"


def test_limiters_without_a_name_never_share_counts(arena: SharedArena) -> None:
    """Two limiters with the same rate but no name count apart; with one name, together."""
    a, b = Limiter("2/s", arena=arena), Limiter("2/s", arena=arena)
    assert [a.check(b"k", now=5.0).admitted for _ in range(3)] == [True, True, False]
    assert b.check(b"k", now=5.0).admitted
    c, d = Limiter("2/s", arena=arena, name="n"), Limiter("2/s", arena=arena, name="n")
    assert c.check(b"k", now=5.0).admitted and d.check(b"k", now=5.0).admitted
    assert not c.check(b"k", now=5.0).admitted


@pytest.mark.parametrize("text", ["1/400d", "1/" + "9" * 400 + "s"])
def test_a_period_longer_than_a_year_is_refused(text: str) -> None:
    """A window must stay finite and at most a year (a longer one would overflow)."""
    with pytest.raises(ValueError, match="longer than a year"):
        parse_rate(text)


def test_a_burst_making_a_window_longer_than_a_year_is_refused(arena: SharedArena) -> None:
    with pytest.raises(ValueError, match="longer than a year"):
        Limiter("1/d", burst=400, arena=arena)
