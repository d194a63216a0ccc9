"""FleetLimiter against a real redis-server: one limiter's quota and its counters in
Redis, servers (separate arenas) sharing one limit, demand shares,
pruning of idle keys, and an outage: logged once per server, fail-open (held per server
by the local limit) or fail-closed (refused, "unavailable"), and the recovery.

Decisions are made at explicit times with a fake wall clock and ``sync=60`` (syncs are
made by the test: the background task syncs once at start, when there is nothing to
send, then sleeps); the tests of the real-time behaviour run on the real clock for a
few seconds and allow 10%.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from redis_server import RedisServer

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
if not shutil.which(REDIS_SERVER):
    pytest.skip("redis-server is not installed", allow_module_level=True)
redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ferryman.limits.arena import SharedArena  # noqa: E402
from ferryman.limits.fleet import FleetLimiter  # noqa: E402
from ferryman.limits.limiter import Verdict  # noqa: E402

SIZE = 64 << 20
#: A wall-clock time half-way into an hour (windows of "N/h" limits are hours).
T = 500_000 * 3600 + 1800.0
INDEX = 500_000


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """One redis-server for the tests that keep it running."""
    instance = RedisServer().start()
    yield instance
    instance.stop()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test stops and starts."""
    instance = RedisServer().start()
    yield instance
    instance.stop()


@pytest.fixture
def name() -> str:
    """A limit name of the test's own (the tests share a Redis)."""
    return f"test-{uuid.uuid4().hex[:12]}"


class Clock:
    """A wall clock the test sets."""

    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _run(test: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    """Run the coroutine function ``test`` on a new loop, bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(test(), timeout)

    asyncio.run(bounded())


async def _manual(*limiters: FleetLimiter) -> None:
    """Start the limiters' sync tasks and let them make their first sync (nothing to
    send yet: no Redis call), after which they sleep ``sync`` (60 s): from then on the
    test's own ``sync_now`` calls are the only syncs."""
    for limiter in limiters:
        limiter.start()
    await asyncio.sleep(0.01)


async def _close(*limiters: FleetLimiter) -> None:
    for limiter in limiters:
        await limiter.close()


def _counter(url: str, name: str, kind: str, index: int) -> int | None:
    """The fleet's counter ``kind`` ("a": admitted, "s": seen) of the one key used
    under limit ``name`` in window ``index``, or None if Redis has none."""
    client = redis.Redis.from_url(url)
    try:
        keys = client.keys(f"ferryman:limit:{name}:*:{kind}:{index}")
        assert len(keys) <= 1, keys
        if not keys:
            return None
        return int(client.get(keys[0]))
    finally:
        client.close()


def _fleet(url: str, name: str, arena: SharedArena, clock: Clock | None = None,
           **kwargs: Any) -> FleetLimiter:
    """A fleet limiter of 20 per hour (so the per-server limit, on the real clock, does
    not see a window end within a test), synced by the test."""
    options: dict[str, Any] = {"sync": 60.0, "clock": clock or Clock()}
    options.update(kwargs)
    return FleetLimiter(
        options.pop("rate", "20/h"), redis=url, name=name, arena=arena, **options
    )


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ferryman.limits" and text in r.getMessage()]


async def _until_synced(limiter: FleetLimiter, seconds: float = 10.0) -> None:
    """Sync until Redis answers (it was just started again)."""
    deadline = time.monotonic() + seconds
    while not await limiter.sync_now():
        assert time.monotonic() < deadline, "Redis did not answer again"
        await asyncio.sleep(0.05)


# -- arguments, no loop ---------------------------------------------------------------------


def test_invalid_arguments() -> None:
    """sync must be positive; the rate is checked as a Limiter's."""
    arena = SharedArena(SIZE)
    with pytest.raises(ValueError, match="sync"):
        FleetLimiter("10/s", redis="redis://127.0.0.1:1/0", name="x", arena=arena, sync=0)
    with pytest.raises(ValueError, match="at least 1 event"):
        FleetLimiter("0/s", redis="redis://127.0.0.1:1/0", name="x", arena=arena)
    with pytest.raises(ValueError, match="burst"):
        FleetLimiter("10/s", redis="redis://127.0.0.1:1/0", name="x", arena=arena, burst=0)


def test_without_a_running_loop_the_local_limit_holds() -> None:
    """Called from no event loop nothing syncs (and nothing is attempted): the limit
    is then the server's own."""
    limiter = _fleet("redis://127.0.0.1:1/0", "no-loop", SharedArena(SIZE), rate="3/h")
    verdicts = [limiter.check(b"k", now=T) for _ in range(5)]
    assert [v.admitted for v in verdicts] == [True, True, True, False, False]
    assert verdicts[-1].reason == "rate"
    assert (limiter.syncs, limiter.failures, limiter.healthy) == (0, 0, True)


# -- one limiter ----------------------------------------------------------------------------


def test_one_limiter_admits_the_quota_and_counts_it_in_redis(
    server: RedisServer, name: str
) -> None:
    """20/h half-way into an hour: 20 of 30 admitted (remaining 19..0, reset the half
    hour left), the others refused for the rate (retry after the half hour). A sync
    adds 20 admitted and 30 seen to the window's counters (with a TTL of two windows
    and a second), creates nothing for the previous window, and records one
    participant; afterwards the fleet's count refuses the key."""
    limiter = _fleet(server.url, name, SharedArena(SIZE))

    async def test() -> None:
        await _manual(limiter)
        try:
            verdicts = [limiter.check(b"client", now=T) for _ in range(30)]
            admitted = [v for v in verdicts if v.admitted]
            refused = [v for v in verdicts if not v.admitted]
            assert [v.remaining for v in admitted] == list(range(19, -1, -1))
            assert all(v.reset == 1800.0 and v.quota == 20 for v in admitted)
            assert len(refused) == 10
            for v in refused:
                assert (v.reason, v.quota, v.remaining, v.window) == ("rate", 20, 0, 3600.0)
                assert v.retry_after == pytest.approx(1800.0)
            assert await limiter.sync_now() is True
            assert (limiter.syncs, limiter.failures, limiter.healthy) == (1, 0, True)
            assert _counter(server.url, name, "a", INDEX) == 20
            assert _counter(server.url, name, "s", INDEX) == 30
            assert _counter(server.url, name, "a", INDEX - 1) is None
            client = redis.Redis.from_url(server.url)
            try:
                [key] = client.keys(f"ferryman:limit:{name}:*:a:{INDEX}")
                assert 7_200_000 < client.pttl(key) <= 7_201_000
            finally:
                client.close()
            assert limiter.check(b"client", now=T).reason == "rate"
            assert await limiter.sync_now() is True  # (nothing admitted: read only)
            assert _counter(server.url, name, "a", INDEX) == 20
            assert _counter(server.url, name, "s", INDEX) == 31
        finally:
            await _close(limiter)

    _run(test)


async def _traffic(
    limiters: list[FleetLimiter], seconds: float, per_second: float = 300.0
) -> dict[int, list[int]]:
    """From the start of a wall-clock second, every ``1 / per_second`` s each limiter
    checks one key; returns, per wall-clock second, what each admitted."""
    await asyncio.sleep(math.ceil(time.time()) - time.time())
    counts: dict[int, list[int]] = collections.defaultdict(lambda: [0] * len(limiters))
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        for i, limiter in enumerate(limiters):
            if limiter.check(b"203.0.113.9").admitted:
                counts[math.floor(time.time())][i] += 1
        tick += 1
        await asyncio.sleep(max(0.0, start + tick / per_second - time.monotonic()))
    return counts


def test_one_limiter_admits_the_quota_every_second(server: RedisServer, name: str) -> None:
    """100/s asked 300 times a second on the real clock: once the start is over, about
    100 (within 10%) in each wall-clock second."""
    limiter = FleetLimiter("100/s", redis=server.url, name=name, arena=SharedArena(SIZE))

    async def test() -> None:
        try:
            counts = await _traffic([limiter], 4.0)
        finally:
            await _close(limiter)
        first = min(counts)
        steady = [sum(counts[first + s]) for s in (2, 3)]
        assert all(90 <= n <= 110 for n in steady), dict(counts)
        assert limiter.failures == 0 and limiter.syncs > 10

    _run(test)


# -- servers sharing a limit ----------------------------------------------------------------


def test_two_servers_share_the_limit(server: RedisServer, name: str) -> None:
    """Two servers (an arena each) asked 300 times a second each for one key of a
    100/s limit of the same name: together about 100 a second (within 10%) once the
    start is over, each taking part."""
    one = FleetLimiter("100/s", redis=server.url, name=name, arena=SharedArena(SIZE))
    two = FleetLimiter("100/s", redis=server.url, name=name, arena=SharedArena(SIZE))

    async def test() -> None:
        try:
            counts = await _traffic([one, two], 4.0)
        finally:
            await _close(one, two)
        first = min(counts)
        for s in (2, 3):
            per_server = counts[first + s]
            assert 90 <= sum(per_server) <= 110, dict(counts)
            assert min(per_server) >= 20, dict(counts)

    _run(test)


def test_servers_taking_turns_admit_the_quota_within_one(
    server: RedisServer, name: str
) -> None:
    """Two servers taking turns, each syncing after each decision: a server reads the
    key's fleet count at its first sync after using it, so each decision knows all but
    the other server's latest admission. Of 40 requests, 20 or 21 pass (quota 20),
    about 10 each, and Redis holds what they admitted and all 40 seen."""
    one = _fleet(server.url, name, SharedArena(SIZE))
    two = _fleet(server.url, name, SharedArena(SIZE))

    async def test() -> None:
        await _manual(one, two)
        try:
            admitted = [0, 0]
            for _ in range(20):
                for i, limiter in enumerate((one, two)):
                    admitted[i] += limiter.check(b"k", now=T).admitted
                    assert await limiter.sync_now()
            assert 20 <= sum(admitted) <= 21 and min(admitted) >= 9, admitted
            assert _counter(server.url, name, "a", INDEX) == sum(admitted)
            assert _counter(server.url, name, "s", INDEX) == 40
        finally:
            await _close(one, two)

    _run(test)


def test_a_key_new_to_a_server_is_judged_on_its_own_counts_until_it_syncs(
    server: RedisServer, name: str
) -> None:
    """Server one admits 10 of a quota of 20 and syncs. Server two has never seen the
    key: until its first sync it knows nothing of the fleet's count (a share of 1), so
    only its own per-server limit holds it, at 20. A key idle at a server since its
    last sync is read again at the first sync after it is used: one more admission on
    what it knew, then the fleet's count holds."""
    one = _fleet(server.url, name, SharedArena(SIZE))
    two = _fleet(server.url, name, SharedArena(SIZE))

    async def test() -> None:
        await _manual(one, two)
        try:
            assert sum(one.check(b"k", now=T).admitted for _ in range(10)) == 10
            assert await one.sync_now()
            assert sum(two.check(b"k", now=T).admitted for _ in range(30)) == 20
            assert await two.sync_now()
            # one has not used the key since its sync: a sync has nothing of it to send
            # or read, and its next decision is on what it knew (10 admitted)
            assert await one.sync_now()
            assert one.check(b"k", now=T).admitted
            assert await one.sync_now()  # (sent, and the fleet's 31 read)
            assert [one.check(b"k", now=T).admitted for _ in range(3)] == [False] * 3
            assert [two.check(b"k", now=T).admitted for _ in range(3)] == [False] * 3
            assert _counter(server.url, name, "a", INDEX) == 31
        finally:
            await _close(one, two)

    _run(test)




# -- the key table --------------------------------------------------------------------------


def test_keys_idle_for_two_windows_are_pruned(server: RedisServer, name: str) -> None:
    """A key unused for two windows (and a sync interval) is forgotten at the next sync;
    one used since is kept; with no key left a sync asks Redis nothing."""
    clock = Clock()
    limiter = _fleet(server.url, name, SharedArena(SIZE), clock)
    horizon = 2 * 3600.0 + 60.0

    async def test() -> None:
        await _manual(limiter)
        try:
            limiter.check(b"old", now=T)
            limiter.check(b"new", now=T)
            assert await limiter.sync_now()
            clock.now = T + 3600.0
            limiter.check(b"new", now=clock.now)
            assert await limiter.sync_now()
            assert set(limiter._keys) == {b"old", b"new"}  # (the table of keys in use)
            clock.now = T + horizon - 1.0
            assert await limiter.sync_now()
            assert set(limiter._keys) == {b"old", b"new"}
            clock.now = T + horizon + 1.0
            assert await limiter.sync_now()
            assert set(limiter._keys) == {b"new"}
            assert limiter.syncs == 2  # (a sync sends only the keys used since the last)
            clock.now = T + 3600.0 + horizon + 1.0
            assert await limiter.sync_now()
            assert set(limiter._keys) == set()
            assert limiter.syncs == 2  # (nothing to sync)
        finally:
            await _close(limiter)

    _run(test)


def test_a_full_key_table_forgets_the_least_recently_used_key(
    server: RedisServer, name: str
) -> None:
    """``max_keys`` keys in use (none idle): a new one makes room by forgetting the
    least recently used one."""
    limiter = _fleet(server.url, name, SharedArena(SIZE), max_keys=10)

    async def test() -> None:
        await _manual(limiter)
        try:
            for i in range(10):
                limiter.check(b"k%d" % i, now=T + i)
            limiter.check(b"k0", now=T + 10)  # (k0 used again: k1 is now the oldest)
            limiter.check(b"k10", now=T + 11)
            assert set(limiter._keys) == {b"k%d" % i for i in range(11)} - {b"k1"}
        finally:
            await _close(limiter)

    _run(test)


# -- Redis down -----------------------------------------------------------------------------


def test_fail_open_holds_the_limit_per_server_and_recovers(
    own_server: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers of one server (one arena) and another server, one limit. Redis
    stops: syncs fail, ``healthy`` turns False, one warning per server (arena). Traffic
    goes on, each server admitting its own quota (the workers of one server sharing
    it). Redis starts again: ``healthy`` comes back, one "answers again" per server,
    and what was admitted meanwhile is sent, also what failed syncs tried to send (the
    restarted Redis had nothing)."""
    caplog.set_level(logging.INFO, logger="ferryman.limits")
    url = own_server.url
    server_a = SharedArena(SIZE)
    worker_1 = _fleet(url, name, server_a)
    worker_2 = _fleet(url, name, server_a)
    server_b = _fleet(url, name, SharedArena(SIZE))
    every = (worker_1, worker_2, server_b)

    async def test() -> None:
        await _manual(*every)
        try:
            for limiter in every:
                assert limiter.check(b"k", now=T).admitted
                assert await limiter.sync_now()
            assert _records(caplog, "") == []
            own_server.stop()
            for limiter in every:
                # (a sync contacts Redis when there is something to send: a request
                # admitted before the outage is noticed)
                assert limiter.check(b"k", now=T).admitted
                assert await limiter.sync_now() is False
                assert limiter.healthy is False
                assert limiter.failures == 1
            assert await worker_1.sync_now() is False
            warnings = _records(caplog, "Redis is unreachable")
            assert len(warnings) == 2  # (one per server)
            assert all(r.levelno == logging.WARNING for r in warnings)
            assert all(name in r.getMessage() and "fail-open" in r.getMessage()
                       for r in warnings)
            # fail-open: each server admits up to its quota (20 a window; two each
            # were admitted before)
            on_a: list[Verdict] = []
            for _ in range(20):
                on_a += [worker_1.check(b"k", now=T), worker_2.check(b"k", now=T)]
            on_b = [server_b.check(b"k", now=T) for _ in range(40)]
            assert sum(v.admitted for v in on_a) == 16
            assert sum(v.admitted for v in on_b) == 18
            assert {v.reason for v in on_a + on_b if not v.admitted} == {"rate"}
            for limiter in every:  # (what a failed sync was sending is kept)
                assert await limiter.sync_now() is False
            own_server.start()
            for limiter in every:
                await _until_synced(limiter)
                assert limiter.healthy is True
            assert len(_records(caplog, "answers again")) == 2  # (one per server)
            assert len(_records(caplog, "Redis is unreachable")) == 2
            assert _counter(url, name, "a", INDEX) == 3 + 16 + 18
            assert _counter(url, name, "s", INDEX) == 3 + 40 + 40
            worker_1.check(b"k", now=T)  # (used again: its next sync reads the key)
            assert await worker_1.sync_now()
            refused = worker_1.check(b"k", now=T)  # (by the fleet's count: 37 of 20)
            assert (refused.admitted, refused.reason) == (False, "rate")
            assert refused.retry_after == pytest.approx((0.5 + 1 - 20 / 37) * 3600)
        finally:
            await _close(*every)

    _run(test)


def test_fail_closed_refuses_while_redis_is_down(
    own_server: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``fail_open=False``: while Redis is down requests are refused, reason
    "unavailable" (with the RateLimit fields and a retry after 1 s); the warning says
    so. When Redis is back, requests are admitted again."""
    caplog.set_level(logging.INFO, logger="ferryman.limits")
    limiter = _fleet(own_server.url, name, SharedArena(SIZE), fail_open=False)

    async def test() -> None:
        await _manual(limiter)
        try:
            assert limiter.check(b"k", now=T).admitted
            assert await limiter.sync_now()
            own_server.stop()
            assert limiter.check(b"k", now=T).admitted  # (not noticed yet)
            assert await limiter.sync_now() is False
            assert limiter.healthy is False
            [warning] = _records(caplog, "Redis is unreachable")
            assert "fail-closed" in warning.getMessage()
            refused = limiter.check(b"k", now=T)
            assert (refused.admitted, refused.reason, refused.quota, refused.remaining) == (
                False, "unavailable", 20, 0,
            )
            assert (refused.reset, refused.retry_after, refused.window) == (1.0, 1.0, 3600.0)
            assert refused.guard is None
            assert refused.headers()[:3] == [
                (b"RateLimit-Limit", b"20"),
                (b"RateLimit-Remaining", b"0"),
                (b"RateLimit-Reset", b"1"),
            ]
            own_server.start()
            await _until_synced(limiter)
            assert limiter.healthy is True
            assert len(_records(caplog, "answers again")) == 1
            assert limiter.check(b"k", now=T).admitted
        finally:
            await _close(limiter)

    _run(test)


def test_fail_closed_recovers_after_an_outage_longer_than_two_windows(
    own_server: RedisServer, name: str
) -> None:
    """An outage longer than the keys are kept: when Redis is back, the limiter finds
    out and admits requests again."""
    clock = Clock()
    limiter = _fleet(own_server.url, name, SharedArena(SIZE), clock, fail_open=False)

    async def test() -> None:
        await _manual(limiter)
        try:
            assert limiter.check(b"k", now=T).admitted
            assert await limiter.sync_now()
            own_server.stop()
            assert limiter.check(b"k", now=T).admitted  # (not noticed yet)
            assert await limiter.sync_now() is False
            for minutes in range(0, 3 * 60 + 1, 10):  # three hours of refusals
                clock.now = T + 60.0 * minutes
                assert limiter.check(b"k", now=clock.now).reason == "unavailable"
                await limiter.sync_now()
            own_server.start()
            for _ in range(10):
                clock.now += 1.0
                limiter.check(b"k", now=clock.now)
                await limiter.sync_now()
                if limiter.healthy:
                    break
                await asyncio.sleep(0.05)
            assert limiter.healthy is True
            assert limiter.check(b"k", now=clock.now).admitted
        finally:
            await _close(limiter)

    _run(test)


def test_the_sync_task_notices_the_outage_and_the_recovery(
    own_server: RedisServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On the real clock with the default sync interval, nothing but traffic: the
    background task finds Redis gone (healthy False, logged once), traffic is admitted
    meanwhile, and it finds Redis back (healthy True, logged once)."""
    caplog.set_level(logging.INFO, logger="ferryman.limits")
    limiter = FleetLimiter("1000/s", redis=own_server.url, name=name, arena=SharedArena(SIZE))

    async def until(condition: Callable[[], bool], seconds: float) -> list[Verdict]:
        verdicts = []
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline
            verdicts.append(limiter.check(b"k"))
            await asyncio.sleep(0.02)
        return verdicts

    async def test() -> None:
        try:
            await until(lambda: limiter.syncs >= 2, 3.0)
            own_server.stop()
            await until(lambda: not limiter.healthy, 5.0)
            during = await until(lambda: limiter.failures >= 2, 5.0)
            assert during and all(v.admitted for v in during)
            own_server.start()
            await until(lambda: limiter.healthy, 10.0)
            assert len(_records(caplog, "Redis is unreachable")) == 1
            assert len(_records(caplog, "answers again")) == 1
        finally:
            await _close(limiter)

    _run(test)


def test_a_closed_limiter_does_not_sync_again(server: RedisServer, name: str) -> None:
    """After close (a replaced config's limiter), requests still being checked do not
    start a new sync task."""
    limiter = FleetLimiter("100/s", redis=server.url, name=name, arena=SharedArena(SIZE))

    async def test() -> None:
        assert limiter.check(b"k").admitted
        await limiter.close()
        assert limiter.check(b"k").admitted
        assert limiter._task is None

    _run(test)
