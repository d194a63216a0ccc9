"""PurgeLog: purges of per-worker caches reach the other workers (forked processes)."""

from __future__ import annotations

import asyncio
import os

import pytest

from ferryman.cache.http_cache import HttpCache
from ferryman.cache.memory import MemoryStorage
from ferryman.cache.purge_log import (
    PURGE_KEY,
    PURGE_PREFIX,
    PURGE_TAG,
    RECORD_SIZE,
    PurgeLog,
    PurgeRecord,
)
from ferryman.cache.storage import CacheMeta


def test_records_round_trip_and_positions() -> None:
    log = PurgeLog(slots=8)
    assert log.sequence == 0 and log.read_since(0) == (0, [])
    assert log.append(PURGE_KEY, b"s", b"k1") == 1
    assert log.append(PURGE_TAG, b"s", b"t") == 2
    last, records = log.read_since(0)
    assert last == 2
    assert records == [
        PurgeRecord(1, PURGE_KEY, b"s", b"k1"), PurgeRecord(2, PURGE_TAG, b"s", b"t")
    ]
    assert log.read_since(1) == (2, [PurgeRecord(2, PURGE_TAG, b"s", b"t")])
    assert log.read_since(2) == (2, [])


def test_a_reader_too_far_behind_is_told() -> None:
    log = PurgeLog(slots=8)
    for i in range(20):
        log.append(PURGE_KEY, b"s", b"k%d" % i)
    assert log.read_since(0) == (20, None)
    last, records = log.read_since(13)
    assert last == 20 and records is not None and [r.value for r in records][0] == b"k13"


def test_a_record_too_large_becomes_everything_in_its_scope() -> None:
    log = PurgeLog(slots=4)
    log.append(PURGE_PREFIX, b"scope", b"x" * RECORD_SIZE)
    log.append(PURGE_PREFIX, b"s" * RECORD_SIZE, b"x")
    _, records = log.read_since(0)
    assert records == [PurgeRecord(1, 0, b"scope", b""), PurgeRecord(2, 0, b"", b"")]


async def _store(cache: HttpCache, key: bytes, tags: tuple[bytes, ...] = ()) -> None:
    writer = await cache.storage.begin(key, CacheMeta(200, [], tags=tags))
    writer.write(b"body")
    writer.finish()


def test_purges_reach_another_worker_process() -> None:
    log = PurgeLog()

    def make(scope: bytes) -> HttpCache:
        cache = HttpCache(MemoryStorage(1 << 20), scope=scope)
        cache.attach_purge_log(log)
        return cache

    read_fd, write_fd = os.pipe()
    go_fd, ready_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other worker: purges, then says so
        try:
            os.close(read_fd)
            os.read(go_fd, 1)

            async def purge() -> None:
                cache = make(b"route-a")
                await cache.purge_key(b"http|x|/a")
                await cache.purge_key_prefix(b"http|x|/p/")
                await cache.purge_tag(b"t1")
                other = make(b"route-b")
                await other.purge_key(b"http|x|/b")

            asyncio.run(purge())
            os.write(write_fd, b"k")
        finally:
            os._exit(0)

    async def main() -> None:
        mine = make(b"route-a")
        keys = [b"http|x|/a", b"http|x|/a#v", b"http|x|/p/1", b"http|x|/p/2", b"http|x|/b",
                b"http|x|/tagged", b"http|x|/kept"]  # fmt: skip
        for key in keys:
            await _store(mine, key, (b"t1",) if key.endswith(b"tagged") else ())
        os.write(ready_fd, b"g")
        assert os.read(read_fd, 1) == b"k"
        await mine.sync_purges()
        left = [k for k in keys if await mine.storage.lookup(k) is not None]
        assert left == [b"http|x|/b", b"http|x|/kept"]  # /b was purged in route-b's scope
        # its own purges are not applied twice: a later refill survives the next sync
        await mine.purge_key(b"http|x|/kept")
        await _store(mine, b"http|x|/kept")
        await mine.sync_purges()
        assert await mine.storage.lookup(b"http|x|/kept") is not None

    try:
        asyncio.run(main())
    finally:
        os.waitpid(pid, 0)


def test_a_worker_far_behind_empties_its_cache() -> None:
    log = PurgeLog(slots=4)
    cache = HttpCache(MemoryStorage(1 << 20), scope=b"s")
    cache.attach_purge_log(log)

    async def main() -> None:
        await _store(cache, b"k")
        for i in range(10):
            log.append(PURGE_KEY, b"other", b"x%d" % i)
        await cache.sync_purges()
        assert await cache.storage.lookup(b"k") is None

    asyncio.run(main())


def test_shared_storages_need_no_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ferryman.cache.disk import DiskStorage

    cache = HttpCache(DiskStorage(str(tmp_path), 1 << 20))
    cache.attach_purge_log(PurgeLog())
    assert not cache.shares_purges


@pytest.mark.parametrize("kind", [PURGE_KEY, PURGE_PREFIX, PURGE_TAG])
def test_kinds(kind: int) -> None:
    log = PurgeLog()
    cache = HttpCache(MemoryStorage(1 << 20), scope=b"s")
    cache.attach_purge_log(log)

    async def main() -> None:
        await _store(cache, b"ab", (b"t",))
        await _store(cache, b"ac")
        log.append(kind, b"s", {PURGE_KEY: b"ab", PURGE_PREFIX: b"a", PURGE_TAG: b"t"}[kind])
        await cache.sync_purges()
        left = [k for k in (b"ab", b"ac") if await cache.storage.lookup(k) is not None]
        assert left == {PURGE_KEY: [b"ac"], PURGE_PREFIX: [], PURGE_TAG: [b"ac"]}[kind]

    asyncio.run(main())
