"""RedisStorage against a real redis-server: sharing between servers, chunked bodies, TTLs,
purges, fill locks, and an outage that degrades to misses."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from redis_server import RedisServer

if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not on PATH (apt install redis-server)", allow_module_level=True)
redis = pytest.importorskip("redis", reason="redis-py is not installed")

from ferryman.cache.redis_storage import RedisStorage, _unpack_head  # noqa: E402
from ferryman.cache.storage import CacheMeta, CacheWriteAborted  # noqa: E402

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    instance = RedisServer().start()
    yield instance
    instance.stop()


@pytest.fixture
def raw(server: RedisServer) -> Iterator[Any]:
    """A synchronous client on an emptied database, to look at the keys."""
    client = redis.Redis.from_url(server.url)
    client.flushall()
    yield client
    client.close()


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    """Run an async test body with a deadline; fail on any exception the loop reports
    (such as "Task exception was never retrieved")."""
    reported: list[dict[str, Any]] = []

    async def bounded() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        result = await asyncio.wait_for(test(), timeout=15)
        gc.collect()
        await asyncio.sleep(0)
        return result

    result = asyncio.run(bounded())
    assert not reported, reported
    return result


def meta(length: int | None = None, *, tags: tuple[bytes, ...] = (),
         keep_for: float | None = 100.0) -> CacheMeta:
    return CacheMeta(status=200, headers=[(b"content-type", b"text/plain")], length=length,
                     tags=tags, keep_for=keep_for)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from chunk to chunk (a misplaced chunk shows)."""
    block = bytes((i * 7 + seed) % 251 for i in range(4093))
    return (block * (size // len(block) + 1))[:size]


async def store(storage: RedisStorage, key: bytes, body: bytes, piece: int = 64 * KiB,
                **kwargs: Any) -> bool:
    """Write ``body`` in ``piece``-sized writes and wait until it is in Redis."""
    writer = await storage.begin(key, meta(len(body), **kwargs))
    for i in range(0, len(body), piece):
        writer.write(body[i : i + piece])
    writer.finish()
    return await writer.wait()  # type: ignore[attr-defined, no-any-return]


def chunk_keys(raw: Any, storage: RedisStorage, key: bytes) -> list[bytes]:
    """The chunk keys the entry under ``key`` names."""
    gen, _, count, _, _ = _unpack_head(raw.get(storage.meta_key(key)))
    return [b"ferryman:c:" + gen.hex().encode() + b":%d" % i for i in range(count)]


# -- round trips, sharing ----------------------------------------------------------------


def test_small_body_round_trip_is_inline(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        writer = await a.begin(b"k", meta(11))
        writer.write(b"hello ")
        writer.write(b"world")
        writer.finish()
        await a.flush()
        assert writer.stored
        entry = await b.lookup(b"k")  # another "server"
        assert entry is not None and entry.complete and entry.size == 11
        assert entry.meta.status == 200 and entry.meta.headers == meta().headers
        assert await entry.read() == b"hello world"
        source = entry.open_source()  # small: in memory, synchronous
        assert source is not None and source.read(100) == b"hello world"
        assert raw.keys(b"*") == [a.meta_key(b"k")]  # inline: one key
        assert await b.lookup(b"other") is None
        stats = b.stats()
        assert stats["hits"] == 1 and stats["misses"] == 1 and stats["errors"] == 0
        assert a.stats()["stored"] == 1 and a.stats()["pending"] == 0
        await a.close()
        await b.close()

    run(body)


def test_large_body_round_trip_in_chunks(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        data = pattern(3 * MiB + 123)
        assert await store(a, b"big", data, piece=100_000)
        keys = chunk_keys(raw, a, b"big")
        assert len(keys) == 7
        assert [raw.strlen(k) for k in keys] == [512 * KiB] * 6 + [123]
        entry = await b.lookup(b"big")
        assert entry is not None and entry.complete and entry.size == len(data)
        assert entry.open_source() is None  # not in memory
        chunks = [chunk async for chunk in entry.body()]
        assert len(chunks) == 7 and b"".join(chunks) == data
        assert await entry.read() == data  # readable again
        # a body of exactly one chunk is inline
        assert await store(a, b"one", pattern(512 * KiB))
        assert raw.strlen(a.meta_key(b"one")) > 512 * KiB
        assert len(chunk_keys(raw, a, b"one")) == 0
        one = await b.lookup(b"one")
        assert one is not None and await one.read() == pattern(512 * KiB)
        await a.close()
        await b.close()

    run(body)


def test_in_progress_entry_streams_locally_and_is_hidden_elsewhere(
    server: RedisServer, raw: Any
) -> None:
    async def body() -> None:
        a = RedisStorage(server.url, chunk_size=64 * KiB)
        b = RedisStorage(server.url, chunk_size=64 * KiB)
        data = pattern(1 * MiB)
        writer = await a.begin(b"k", meta())
        writer.write(data[: 300 * KiB])
        entry = await a.lookup(b"k")  # this process: the entry being written
        assert entry is writer.entry and not entry.complete
        reader = asyncio.create_task(entry.read())
        await a.flush()
        assert len(raw.keys(b"ferryman:c:*")) == 4  # chunks sent in the background
        assert await b.lookup(b"k") is None  # no entry key until finished
        writer.write(data[300 * KiB :])
        writer.finish()
        assert await reader == data
        await a.flush()
        shared = await b.lookup(b"k")
        assert shared is not None and await shared.read() == data
        assert a.stats()["pending"] == 0 and a.stats()["pending_size"] == 0
        after = await a.lookup(b"k")  # from Redis now
        assert after is not None and after is not writer.entry
        assert a.stats()["hits_in_progress"] == 1
        await a.close()
        await b.close()

    run(body)


def test_replacing_an_entry_while_a_reader_streams_the_old_one(
    server: RedisServer, raw: Any
) -> None:
    async def body() -> None:
        a = RedisStorage(server.url, chunk_size=16 * KiB, replaced_grace=30)
        b = RedisStorage(server.url, chunk_size=16 * KiB)
        old_body, new_body = pattern(40 * 16 * KiB, 1), pattern(20 * 16 * KiB + 5, 2)
        assert await store(a, b"k", old_body)
        old_keys = chunk_keys(raw, a, b"k")
        old = await b.lookup(b"k")
        assert old is not None
        stream = old.body()
        first = await stream.__anext__()  # reading; later batches not fetched yet
        assert await store(a, b"k", new_body)
        rest = [chunk async for chunk in stream]
        assert first + b"".join(rest) == old_body  # old generation intact
        assert all(0 < raw.pttl(k) <= 30_000 for k in old_keys)  # then it goes
        assert chunk_keys(raw, a, b"k") != old_keys
        new = await b.lookup(b"k")
        assert new is not None and await new.read() == new_body
        # in one process, a new begin() detaches the old writer at once
        w1 = await a.begin(b"j", meta())
        w1.write(b"1" * 40 * KiB)
        w2 = await a.begin(b"j", meta())
        w2.write(b"2" * 40 * KiB)
        w1.write(b"1")
        w1.finish()
        w2.finish()
        await a.flush()
        assert not w1.stored and w2.stored
        j = await b.lookup(b"j")
        assert j is not None and await j.read() == b"2" * 40 * KiB
        assert len(raw.keys(b"ferryman:c:*")) == 40 + 20 + 1 + 3  # w1's chunks deleted
        await a.close()
        await b.close()

    run(body)


# -- TTLs, limits --------------------------------------------------------------------------


def test_every_key_has_a_ttl_and_entries_expire(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a = RedisStorage(server.url, chunk_size=16 * KiB)
        assert await store(a, b"small", b"s" * 100, tags=(b"t1",))
        assert await store(a, b"large", pattern(100 * KiB), tags=(b"t1", b"t2"))
        assert await store(a, b"default", b"d", keep_for=None)
        assert await a.fill_lock(b"large", 30)
        keys = raw.keys(b"*")
        assert len(keys) == 3 + 7 + 2 + 1
        for key in keys:
            if key != a.meta_key(b"default"):
                assert 0 < raw.pttl(key) <= (100 + 10) * 1000, key
        assert 3600_000 < raw.pttl(a.meta_key(b"default")) <= 3610_000  # default_keep
        await a.close()

        short = RedisStorage(server.url, chunk_size=16 * KiB, ttl_margin=0)
        assert await store(short, b"s2", b"x" * 10, keep_for=0.3, tags=(b"t3",))
        assert await store(short, b"l2", pattern(50 * KiB), keep_for=0.3)
        l2_keys = chunk_keys(raw, short, b"l2")
        assert await short.lookup(b"s2") is not None
        await asyncio.sleep(0.5)
        assert await short.lookup(b"s2") is None and await short.lookup(b"l2") is None
        assert raw.exists(*l2_keys, short.tag_key(b"t3"), short.meta_key(b"s2")) == 0
        await short.close()

    run(body)


def test_max_entry_refuses_large_bodies(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a = RedisStorage(server.url, max_entry=100_000, chunk_size=16 * KiB)
        # announced too large
        writer = await a.begin(b"big", meta(length=200_000))
        assert not writer.stored
        writer.write(b"x" * 200_000)
        writer.finish()
        assert await a.lookup(b"big") is None
        # grows too large: chunks already sent are deleted; attached readers get it all
        writer = await a.begin(b"grow", meta())
        writer.write(b"a" * 60_000)
        entry = await a.lookup(b"grow")
        assert entry is not None
        reader = asyncio.create_task(entry.read())
        await a.flush()
        assert raw.keys(b"ferryman:c:*")
        writer.write(b"b" * 60_000)
        assert not writer.stored
        writer.write(b"c" * 10)
        writer.finish()
        assert await reader == b"a" * 60_000 + b"b" * 60_000 + b"c" * 10
        await a.flush()
        assert raw.keys(b"*") == []
        assert await a.lookup(b"grow") is None
        assert a.stats()["dropped"] == 2
        assert await store(a, b"fits", b"f" * 100_000)
        await a.close()

    run(body)


def test_abort_deletes_sent_chunks(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a = RedisStorage(server.url, chunk_size=16 * KiB)
        writer = await a.begin(b"k", meta())
        writer.write(b"p" * 50 * KiB)
        entry = await a.lookup(b"k")
        assert entry is not None
        reader = asyncio.create_task(entry.read())
        await a.flush()
        writer.abort()
        with pytest.raises(CacheWriteAborted):
            await reader
        await a.flush()
        assert raw.keys(b"*") == [] and await a.lookup(b"k") is None
        assert a.stats()["aborted"] == 1 and a.stats()["pending"] == 0
        with pytest.raises(RuntimeError):
            writer.write(b"more")
        with pytest.raises(RuntimeError):
            writer.finish()
        await a.close()

    run(body)


def test_missing_chunk_raises_and_breaks_the_entry(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        assert await store(a, b"k", pattern(3 * 512 * KiB))
        keys = chunk_keys(raw, a, b"k")
        entry = await b.lookup(b"k")
        assert entry is not None
        raw.delete(keys[1])  # Redis evicted it
        with pytest.raises(CacheWriteAborted):
            await entry.read()
        assert await b.lookup(b"k") is None  # checked at lookup: a miss
        assert raw.keys(b"*") == []  # the broken entry was deleted
        assert b.stats()["broken"] == 2 and b.stats()["errors"] == 0
        await a.close()
        await b.close()

    run(body)


# -- purges, metadata updates, fill locks --------------------------------------------------


def test_purge_and_purge_prefix_with_glob_characters(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        keys = [b"GET:a.com/*", b"GET:a.com/?x", b"GET:a.com/[ab]", b"GET:a.com/a",
                b"GET:a.comZ", b"GET:a.co*", b"GET:b.com/1", b"GET:a\\b"]
        for key in keys:
            assert await store(a, key, b"v")
        assert await store(a, b"GET:a.com/big", pattern(600 * KiB))
        pending = await a.begin(b"GET:a.com/pending", meta())  # being written, local
        pending.write(b"p")
        assert await b.purge_prefix(b"GET:a.com/[") == 1  # not "GET:a.com/a"
        assert await b.purge_prefix(b"GET:a.co*") == 1  # only the literal key
        assert await b.purge_prefix(b"GET:a\\") == 1
        assert await b.lookup(b"GET:a.com/a") is not None
        assert await a.purge_prefix(b"GET:a.com/") == 5  # *, ?x, a, big, pending
        assert await a.purge_prefix(b"GET:a.com/") == 0
        pending.write(b"q")
        pending.finish()
        await a.flush()
        assert not pending.stored and await b.lookup(b"GET:a.com/pending") is None
        assert raw.keys(b"ferryman:c:*") == []
        assert await b.purge(b"GET:b.com/1") and not await b.purge(b"GET:b.com/1")
        remaining = sorted(k[len(b"ferryman:m:"):] for k in raw.keys(b"*"))
        assert remaining == [b"GET:a.comZ"]
        assert b.stats()["purged"] == 4 and a.stats()["purged"] == 5
        await a.close()
        await b.close()

    run(body)


def test_purge_tag(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        assert await store(a, b"k0", b"0", tags=(b"a",))
        assert await store(a, b"k1", pattern(700 * KiB), tags=(b"a", b"b"))
        assert await store(a, b"k2", b"2")
        assert await store(a, b"k3", b"3", tags=(b"a",))
        assert await store(a, b"k3", b"3 again")  # re-stored without the tag
        assert await b.purge_tag(b"a") == 2
        assert await b.lookup(b"k0") is None and await b.lookup(b"k1") is None
        assert await b.lookup(b"k2") is not None and await b.lookup(b"k3") is not None
        assert raw.keys(b"ferryman:c:*") == []
        assert not raw.exists(b.tag_key(b"a"))
        assert raw.smembers(b.tag_key(b"b")) == {b"k1"}  # a stale member, checked later
        assert await b.purge_tag(b"a") == 0 and await b.purge_tag(b"b") == 0
        await a.close()
        await b.close()

    run(body)


def test_update_meta_keeps_the_body_and_refreshes_ttls(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        data = pattern(1 * MiB + 1)
        writer = await a.begin(b"k", meta(keep_for=10))
        writer.write(data)
        writer.finish()
        await a.flush()
        assert await store(a, b"small", b"body", keep_for=10)
        fresh = CacheMeta(200, [(b"etag", b'"v2"')], keep_for=1000, tags=(b"t",))
        assert await b.update_meta(b"k", fresh)
        assert await b.update_meta(b"small", fresh)
        for key in (b"k", b"small"):
            entry = await a.lookup(key)
            assert entry is not None and entry.meta.headers == [(b"etag", b'"v2"')]
        entry = await a.lookup(b"k")
        assert entry is not None and await entry.read() == data
        small = await a.lookup(b"small")
        assert small is not None and await small.read() == b"body"
        for key in [a.meta_key(b"k"), *chunk_keys(raw, a, b"k"), a.tag_key(b"t")]:
            assert raw.pttl(key) > 900_000, key
        assert not await b.update_meta(b"missing", fresh)
        assert await a.purge_tag(b"t") == 2
        await a.close()
        await b.close()

    run(body)


def test_fill_lock_is_exclusive_and_unlock_is_token_safe(server: RedisServer, raw: Any) -> None:
    async def body() -> None:
        a, b = RedisStorage(server.url), RedisStorage(server.url)
        assert a.shared and b.shared
        assert await a.fill_lock(b"k", 5)
        assert not await b.fill_lock(b"k", 5)
        await b.fill_unlock(b"k")  # b holds nothing: no effect
        assert raw.exists(a.lock_key(b"k"))
        await a.fill_unlock(b"k")
        assert await b.fill_lock(b"k", 5)
        await b.fill_unlock(b"k")
        # a's lock lapses and b takes it: a's unlock must not release b's
        assert await a.fill_lock(b"j", 0.1)
        await asyncio.sleep(0.2)
        assert await b.fill_lock(b"j", 5)
        await a.fill_unlock(b"j")
        assert raw.exists(b.lock_key(b"j"))
        assert not await a.fill_lock(b"j", 5)
        await a.close()
        await b.close()

    run(body)


def test_client_is_made_per_event_loop(server: RedisServer, raw: Any) -> None:
    storage = RedisStorage(server.url)  # built before any loop runs (as before a fork)

    async def first() -> None:
        assert await store(storage, b"k", b"v")
        await storage.close()  # (the worker stops; the next loop gets a new client)

    async def second() -> None:
        entry = await storage.lookup(b"k")
        assert entry is not None and await entry.read() == b"v"
        await storage.close()

    run(first)
    run(second)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_worker_gets_its_own_client(server: RedisServer, raw: Any) -> None:
    storage = RedisStorage(server.url)

    def child() -> bool:
        # the parent's client (its sockets) was forgotten at the fork
        if storage._client is not None:
            return False
        results: list[bool] = []

        async def work() -> None:
            entry = await storage.lookup(b"k")
            ok = entry is not None and await entry.read() == b"parent"
            ok = ok and await store(storage, b"from-child", b"child")
            await storage.close()
            results.append(bool(ok))

        thread = threading.Thread(target=lambda: asyncio.run(work()))
        thread.start()
        thread.join(10)
        return results == [True]

    async def body() -> None:
        assert await store(storage, b"k", b"parent")  # the parent's pool is connected
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                code = 0 if child() else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        # the parent's connections were not disturbed by the child
        entry = await storage.lookup(b"from-child")
        assert entry is not None and await entry.read() == b"child"
        await storage.close()

    run(body)


# -- outage --------------------------------------------------------------------------------


def test_outage_degrades_to_misses_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    own = RedisServer().start()  # a server of its own, stopped mid-test
    try:
        caplog.set_level(logging.INFO, logger="ferryman.cache")

        async def body() -> None:
            storage = RedisStorage(own.url, chunk_size=16 * KiB, timeout=0.3, breaker=0.5)
            assert await store(storage, b"k", b"v")
            assert await storage.lookup(b"k") is not None
            midway = await storage.begin(b"mid", meta())
            midway.write(b"m" * 40 * KiB)
            await storage.flush()

            own.stop()
            started = time.monotonic()
            for i in range(30):
                t0 = time.monotonic()
                assert await storage.lookup(b"k") is None
                assert time.monotonic() - t0 < 2
                writer = await storage.begin(b"w%d" % i, meta())
                writer.write(b"w" * 20 * KiB)
                writer.finish()
                await asyncio.sleep(0.01)
            midway.write(b"m" * 40 * KiB)
            midway.finish()
            await storage.flush()
            assert not midway.stored
            assert not await storage.purge(b"k")
            assert await storage.purge_prefix(b"") == 0
            assert await storage.purge_tag(b"t") == 0
            assert not await storage.update_meta(b"k", meta())
            assert await storage.fill_lock(b"k", 5)  # fetch it yourself
            await storage.fill_unlock(b"k")
            assert time.monotonic() - started < 10
            stats = storage.stats()
            assert stats["errors"] >= 1 and stats["skipped"] >= 1
            assert stats["misses"] >= 30
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage

            own.start()  # same port, empty
            deadline = time.monotonic() + 5
            while not await store(storage, b"back", b"again"):
                assert time.monotonic() < deadline, storage.stats()
                await asyncio.sleep(0.1)
            entry = await storage.lookup(b"back")
            assert entry is not None and await entry.read() == b"again"
            assert storage.stats()["breaker_open"] == 0
            assert any("reachable again" in r.getMessage() for r in caplog.records)
            await storage.close()

        run(body)
    finally:
        own.stop()
