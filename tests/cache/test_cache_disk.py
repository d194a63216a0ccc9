"""The disk cache storage: file format checks, crash safety, sharing between processes,
eviction, purges, fill locks and I/O failures."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ferryman.cache import disk as disk_module
from ferryman.cache.disk import DiskStorage
from ferryman.cache.storage import CacheMeta, CacheWriteAborted

BIG = 200_000  # bodies above the 64 KiB read whole at lookup


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    """Run an async test body with a deadline."""

    async def bounded() -> Any:
        return await asyncio.wait_for(test(), timeout=10)

    return asyncio.run(bounded())


def meta(length: int | None = None, **kwargs: Any) -> CacheMeta:
    """A 200 response's metadata."""
    return CacheMeta(status=200, headers=[(b"content-type", b"text/plain")], length=length,
                     **kwargs)


def body_of(key: bytes, size: int) -> bytes:
    """A recognisable body of ``size`` bytes."""
    return (key + b"|" + bytes(range(256)) * 2)[:size] * (size // 100 + 1)


async def store(storage: DiskStorage, key: bytes, body: bytes, **kwargs: Any) -> None:
    """Write a complete entry in 4 KiB chunks."""
    writer = await storage.begin(key, meta(len(body), **kwargs))
    for i in range(0, len(body), 4096):
        writer.write(body[i : i + 4096])
    writer.finish()
    assert writer.stored


def files(root: Path) -> list[Path]:
    """Every file in the two-level tree (entries, temporary and lock files)."""
    return sorted(p for p in root.glob("?/??/*") if p.is_file())


def tree_size(root: Path) -> int:
    """The bytes of the tree's files (some may vanish meanwhile: eviction runs)."""
    total = 0
    for path in files(root):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def tmp_files(root: Path) -> list[Path]:
    return [p for p in files(root) if p.name.endswith(".tmp")]


# -- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 11, 60_000, BIG])
def test_round_trip(tmp_path: Path, size: int) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        data = body_of(b"k", size)[:size]
        stored_meta = meta(size, tags=(b"t1", b"t2"), keep_for=3600.0, vary=(b"accept",),
                           variant=b"v")
        writer = await storage.begin(b"k", stored_meta)
        for i in range(0, size, 5000):
            writer.write(data[i : i + 5000])
        writer.finish()
        writer.finish()  # idempotent
        writer.abort()  # no-op after finish
        assert writer.stored
        assert len(files(tmp_path)) == 1 and not tmp_files(tmp_path)
        entry = await storage.lookup(b"k")
        assert entry is not None and entry.complete and not entry.aborted
        assert entry.meta == stored_meta and entry.size == size and entry.key == b"k"
        source = entry.open_source()
        assert source is not None
        pieces = []
        while piece := source.read(1000):  # backpressure-sized reads
            assert len(piece) <= 1000
            pieces.append(piece)
        assert source.read(1000) == b""
        source.close()
        source.close()
        assert b"".join(pieces) == data
        chunks = [chunk async for chunk in entry.body()]
        assert all(len(chunk) <= 64 * 1024 for chunk in chunks)
        assert b"".join(chunks) == data
        assert await entry.read() == data  # readable again
        assert await storage.lookup(b"other") is None
        stats = storage.stats()
        assert stats["hits"] == 1 and stats["misses"] == 1 and stats["stored"] == 1
        assert stats["corrupt"] == stats["errors"] == 0
        await storage.close()

    run(body)


def test_reader_streams_while_writing_then_reads_the_file(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        writer = await storage.begin(b"k", meta())
        writer.write(b"a")
        entry = await storage.lookup(b"k")  # in progress, in memory
        assert entry is writer.entry and not entry.complete
        received: list[bytes] = []

        async def reader(into: list[bytes]) -> None:
            async for chunk in entry.body():
                into.append(chunk)

        late: list[bytes] = []
        first = asyncio.create_task(reader(received))
        for part in (b"b", b"c"):
            await asyncio.sleep(0)
            writer.write(part)
        second = asyncio.create_task(reader(late))  # joins mid-write: from the start
        await asyncio.sleep(0)
        assert received == [b"a", b"b", b"c"] and not first.done()
        writer.write(b"d")
        writer.finish()
        await asyncio.gather(first, second)
        assert received == late == [b"a", b"b", b"c", b"d"]
        assert storage.stats()["hits_in_progress"] == 1
        done = await storage.lookup(b"k")  # now from the file
        assert done is not None and done is not entry and done.complete
        assert await done.read() == b"abcd"

    run(body)


def test_another_instance_sees_finished_entries_only(tmp_path: Path) -> None:
    async def body() -> None:
        first = DiskStorage(str(tmp_path), 1 << 24)
        other = DiskStorage(str(tmp_path), 1 << 24)  # another worker
        writer = await first.begin(b"k", meta())
        writer.write(b"x" * BIG)
        assert len(tmp_files(tmp_path)) == 1
        assert await other.lookup(b"k") is None
        writer.finish()
        entry = await other.lookup(b"k")
        assert entry is not None and await entry.read() == b"x" * BIG
        assert not tmp_files(tmp_path)

    run(body)


def test_restart_serves_surviving_entries_and_close_aborts_writes(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        bodies = {b"a": b"1" * 10, b"b": body_of(b"b", BIG), b"c": b""}
        for key, data in bodies.items():
            await store(storage, key, data)
        writer = await storage.begin(b"unfinished", meta())
        writer.write(b"partial")
        entry = await storage.lookup(b"unfinished")
        assert entry is not None
        task = asyncio.create_task(entry.read())
        await asyncio.sleep(0)
        await storage.close()
        with pytest.raises(CacheWriteAborted):
            await task
        assert not tmp_files(tmp_path)
        assert await storage.lookup(b"a") is None  # closed

        restarted = DiskStorage(str(tmp_path), 1 << 24)
        for key, data in bodies.items():
            found = await restarted.lookup(key)
            assert found is not None and await found.read() == data
        assert await restarted.lookup(b"unfinished") is None
        await restarted.sweep()
        stats = restarted.stats()
        assert stats["entries"] == 3 and stats["size"] == tree_size(tmp_path)

    run(body)


def test_begin_replaces_a_write_in_progress(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        old = await storage.begin(b"k", meta())
        old.write(b"old-")
        old_entry = await storage.lookup(b"k")
        assert old_entry is not None
        task = asyncio.create_task(old_entry.read())
        await asyncio.sleep(0)
        new = await storage.begin(b"k", meta())
        assert not old.stored and len(tmp_files(tmp_path)) == 1
        new.write(b"new")
        new.finish()
        old.write(b"body")  # detached: still reaches its reader
        old.finish()
        assert await task == b"old-body"
        current = await storage.lookup(b"k")
        assert current is not None and await current.read() == b"new"
        assert not tmp_files(tmp_path)

    run(body)


def test_stream_window_bounds_what_an_entry_in_progress_keeps(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24, stream_window=1000)
        writer = await storage.begin(b"k", meta())
        writer.write(b"a" * 600)
        attached = await storage.lookup(b"k")
        assert attached is not None
        task = asyncio.create_task(attached.read())
        await asyncio.sleep(0)
        writer.write(b"b" * 600)  # past the window: no longer found in memory
        assert writer.stored and await storage.lookup(b"k") is None
        writer.write(b"c" * 600)
        writer.finish()
        assert await task == b"a" * 600 + b"b" * 600 + b"c" * 600
        entry = await storage.lookup(b"k")  # from the file
        assert entry is not None and await entry.read() == await task
        # without a reader attached, the chunks are let go
        writer = await storage.begin(b"j", meta())
        writer.write(b"a" * 600)
        held = await storage.lookup(b"j")  # looked up, not reading yet
        assert held is not None
        writer.write(b"b" * 600)
        assert writer.stored and await storage.lookup(b"j") is None
        with pytest.raises(CacheWriteAborted):
            await held.read()
        writer.finish()
        entry = await storage.lookup(b"j")
        assert entry is not None and await entry.read() == b"a" * 600 + b"b" * 600


# -- detection of bad files ----------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, by: int) -> None:
    os.truncate(path, path.stat().st_size - by)


def _junk_meta_with_valid_crc(path: Path, key: bytes) -> None:
    junk, data = b"not json at all", b"body"
    trailer = disk_module._TRAILER.pack(len(data), zlib.crc32(data), b"FEND")
    path.write_bytes(disk_module._pack_header(key, junk, len(data)) + key + junk + data
                     + trailer)


CORRUPTIONS: dict[str, tuple[int, Callable[[Path, DiskStorage], None]]] = {
    "truncated body": (BIG, lambda p, s: _truncate(p, 1000)),
    "truncated small file": (100, lambda p, s: _truncate(p, 1)),
    "missing trailer": (BIG, lambda p, s: _truncate(p, 16)),
    "flipped meta byte": (BIG, lambda p, s: _flip(p, 32 + 1 + 10)),
    "flipped key byte": (BIG, lambda p, s: _flip(p, 32)),
    "flipped length byte": (100, lambda p, s: _flip(p, 20)),
    "flipped small body byte": (100, lambda p, s: _flip(p, p.stat().st_size - 20)),
    "wrong magic": (100, lambda p, s: p.write_bytes(b"XXXX" + p.read_bytes()[4:])),
    "wrong version": (100, lambda p, s: _flip(p, 4)),
    "bad end marker": (BIG, lambda p, s: _flip(p, p.stat().st_size - 1)),
    "bad small end marker": (100, lambda p, s: _flip(p, p.stat().st_size - 1)),
    "garbage": (100, lambda p, s: p.write_bytes(random.Random(1).randbytes(5000))),
    "zero length": (100, lambda p, s: p.write_bytes(b"")),
    "another key's file": (
        100, lambda p, s: p.write_bytes(Path(s.path_of(b"j")).read_bytes())),
    "junk meta with a valid checksum": (100, lambda p, s: _junk_meta_with_valid_crc(p, b"k")),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_are_detected_unlinked_and_not_served(tmp_path: Path, case: str) -> None:
    size, corrupt = CORRUPTIONS[case]

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"k", body_of(b"k", size)[:size])
        await store(storage, b"j", body_of(b"j", size)[:size])
        path = Path(storage.path_of(b"k"))
        corrupt(path, storage)
        fresh = DiskStorage(str(tmp_path), 1 << 24)
        assert await fresh.lookup(b"k") is None
        assert not path.exists()
        assert await fresh.lookup(b"k") is None
        stats = fresh.stats()
        assert stats["corrupt"] == 1 and stats["misses"] == 2 and stats["errors"] == 0
        other = await fresh.lookup(b"j")  # its neighbour is fine
        assert other is not None and await other.read() == body_of(b"j", size)[:size]

    run(body)


def test_body_checksum_cuts_a_large_body_short(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        data = body_of(b"k", BIG)
        await store(storage, b"k", data)
        path = Path(storage.path_of(b"k"))
        _flip(path, path.stat().st_size - 16 - 100)  # a body byte near the end
        entry = await storage.lookup(b"k")  # header fine: not read in full at lookup
        assert entry is not None
        source = entry.open_source()
        assert source is not None
        sent = b""
        with pytest.raises(OSError):
            while piece := source.read(64 * 1024):
                sent += piece
        source.close()
        assert len(sent) < len(data)  # the last piece never went out
        assert not path.exists() and storage.stats()["corrupt"] == 1
        await store(storage, b"k", data)
        entry = await storage.lookup(b"k")
        assert entry is not None
        _flip(path, path.stat().st_size - 16 - 100)  # same inode: rewritten in place
        with pytest.raises(CacheWriteAborted):
            await entry.read()
        assert not path.exists() and storage.stats()["corrupt"] == 2
        # without verification the bytes are served as they are
        loose = DiskStorage(str(tmp_path), 1 << 24, verify_body=False)
        await store(loose, b"k", data)
        _flip(path, path.stat().st_size - 16 - 100)
        entry = await loose.lookup(b"k")
        assert entry is not None and len(await entry.read()) == len(data)

    run(body)


def test_file_gone_between_lookup_and_read(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"k", b"x" * BIG)
        entry = await storage.lookup(b"k")
        assert entry is not None
        os.unlink(storage.path_of(b"k"))  # purged by another worker
        assert entry.open_source() is None
        with pytest.raises(CacheWriteAborted):
            await entry.read()
        await store(storage, b"k", b"y" * BIG)
        entry = await storage.lookup(b"k")
        assert entry is not None
        await store(storage, b"k", b"z" * BIG)  # replaced: not the entry looked up
        assert entry.open_source() is None
        with pytest.raises(CacheWriteAborted):
            await entry.read()

    run(body)


def test_expired_entries_are_gone(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"old", b"x", stored_at=time.time() - 100, keep_for=10.0)
        await store(storage, b"new", b"y", keep_for=3600.0)
        assert await storage.lookup(b"old") is None
        assert not os.path.exists(storage.path_of(b"old"))
        assert await storage.lookup(b"new") is not None
        assert storage.stats()["expired"] == 1

    run(body)


# -- lookups without waiting, and the files a lookup already checked ------------------------


def _keep_times(path: Path, corrupt: Callable[[], None]) -> None:
    """Run ``corrupt`` and set the file's atime and mtime back (its ctime still moves)."""
    st = os.stat(path)
    corrupt()
    if path.exists():
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("size", [10, 60_000, BIG])
def test_lookup_nowait(tmp_path: Path, size: int) -> None:
    async def body() -> None:
        data = body_of(b"k", size)[:size]
        writer_side = DiskStorage(str(tmp_path), 1 << 24)
        await store(writer_side, b"k", data)
        storage = DiskStorage(str(tmp_path), 1 << 24)
        assert storage.lookup_nowait(b"k") is None  # lookup starts the first pass
        assert await storage.lookup(b"missing") is None
        entry = storage.lookup_nowait(b"k")
        assert entry is not None and entry.complete and entry.size == size
        assert entry.meta.headers == meta().headers and entry.meta.length == size
        source = entry.open_source()
        assert source is not None
        assert source.read(1 << 20) + source.read(1 << 20) == data
        source.close()
        assert storage.lookup_nowait(b"missing") is None  # a miss: not counted
        stats = storage.stats()
        assert stats["hits"] == 1 and stats["misses"] == 1
        # being written in this process: None (lookup streams it), nothing counted
        writer = await storage.begin(b"k", meta())
        writer.write(b"new")
        assert storage.lookup_nowait(b"k") is None
        assert storage.stats()["hits"] == 1
        streaming = await storage.lookup(b"k")
        assert streaming is writer.entry and storage.stats()["hits_in_progress"] == 1
        writer.finish()
        entry = storage.lookup_nowait(b"k")
        assert entry is not None and await entry.read() == b"new"
        assert storage.stats()["hits"] == 3 and storage.stats()["misses"] == 1
        # expired, corrupt: None, unlinked, counted as such (not as misses)
        await store(storage, b"old", b"x", stored_at=time.time() - 100, keep_for=10.0)
        assert storage.lookup_nowait(b"old") is None
        assert not os.path.exists(storage.path_of(b"old"))
        await store(storage, b"bad", data)
        _flip(Path(storage.path_of(b"bad")), 33)
        assert storage.lookup_nowait(b"bad") is None
        stats = storage.stats()
        assert stats["expired"] == 1 and stats["corrupt"] == 1 and stats["misses"] == 1
        await storage.close()
        assert storage.lookup_nowait(b"k") is None

    run(body)


def test_lookup_nowait_past_the_stream_window_finds_the_file(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24, stream_window=1000)
        await store(storage, b"k", b"old")
        writer = await storage.begin(b"k", meta())
        writer.write(b"a" * 600)
        assert storage.lookup_nowait(b"k") is None
        writer.write(b"b" * 600)  # no longer streamed locally: as lookup, the file
        for found in (storage.lookup_nowait(b"k"), await storage.lookup(b"k")):
            assert found is not None and await found.read() == b"old"
        writer.finish()
        found = storage.lookup_nowait(b"k")
        assert found is not None and await found.read() == b"a" * 600 + b"b" * 600

    run(body)


@pytest.mark.parametrize("size", [10, 60_000, BIG])
def test_hits_reuse_the_decoded_meta_until_the_file_changes(tmp_path: Path,
                                                            size: int) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        other = DiskStorage(str(tmp_path), 1 << 24)  # another worker
        data = body_of(b"k", size)[:size]
        await store(storage, b"k", data)
        path = Path(storage.path_of(b"k"))
        first = await storage.lookup(b"k")
        assert first is not None
        for _ in range(3):
            again = storage.lookup_nowait(b"k")
            assert again is not None and again.meta is first.meta
            assert await again.read() == data
        first.meta.parsed = "judged"  # (what HttpCache.judge keeps on it)
        # touched by another worker (new mtime and ctime): the same bytes, the same meta
        os.utime(path, (path.stat().st_atime, time.time()))
        again = await storage.lookup(b"k")
        assert again is not None and again.meta is first.meta
        # update_meta here, then in another worker: the new meta, at once
        for updater, tag in ((storage, b"here"), (other, b"there")):
            fresh = meta(size, tags=(tag,))
            assert await updater.update_meta(b"k", fresh)
            for found in (storage.lookup_nowait(b"k"), await storage.lookup(b"k")):
                assert found is not None and found.meta == fresh
                assert found.meta.parsed is None and await found.read() == data
        # replaced in another worker
        await store(other, b"k", data[::-1], tags=(b"replaced",))
        found = storage.lookup_nowait(b"k")
        assert found is not None and found.meta.tags == (b"replaced",)
        assert await found.read() == data[::-1]
        # purged here, then in another worker (and stored again by it)
        assert await storage.purge(b"k")
        assert storage.lookup_nowait(b"k") is None and await storage.lookup(b"k") is None
        await store(other, b"k", data, tags=(b"back",))
        found = storage.lookup_nowait(b"k")
        assert found is not None and found.meta.tags == (b"back",)
        assert await other.purge(b"k")
        assert storage.lookup_nowait(b"k") is None and await storage.lookup(b"k") is None
        await store(other, b"k", data, tags=(b"red",))
        assert storage.lookup_nowait(b"k") is not None
        assert await other.purge_tag(b"red") == 1
        assert storage.lookup_nowait(b"k") is None
        assert storage.stats()["corrupt"] == 0

    run(body)


def test_a_same_sized_file_in_place_with_the_old_mtime_is_not_taken_for_the_old(
    tmp_path: Path,
) -> None:
    """What inode reuse could look like: same inode, size and mtime, other bytes."""

    async def body() -> None:
        elsewhere = DiskStorage(str(tmp_path / "elsewhere"), 1 << 24)
        storage = DiskStorage(str(tmp_path / "cache"), 1 << 24)
        at = time.time()
        for size in (10, BIG):
            key = b"k%d" % size
            data = body_of(key, size)[:size]
            same = {"stored_at": at, "request_time": at, "response_time": at}
            await store(storage, key, data, tags=(b"aaaa",), **same)
            await store(elsewhere, key, data[::-1], tags=(b"bbbb",), **same)
            first = storage.lookup_nowait(key)
            assert first is not None and first.meta.tags == (b"aaaa",)
            path = Path(storage.path_of(key))
            other = Path(elsewhere.path_of(key)).read_bytes()
            assert len(other) == path.stat().st_size
            ino = path.stat().st_ino
            _keep_times(path, lambda p=path, b=other: p.write_bytes(b))  # type: ignore[misc]
            assert path.stat().st_ino == ino
            found = storage.lookup_nowait(key)
            assert found is not None and found.meta.tags == (b"bbbb",)
            assert await found.read() == data[::-1]

    run(body)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_after_a_hit_is_not_served(tmp_path: Path, case: str) -> None:
    size, corrupt = CORRUPTIONS[case]

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"k", body_of(b"k", size)[:size])
        await store(storage, b"j", body_of(b"j", size)[:size])
        path = Path(storage.path_of(b"k"))
        for _ in range(2):  # checked, then known
            found = await storage.lookup(b"k")
            assert found is not None and storage.lookup_nowait(b"k") is not None
        _keep_times(path, lambda: corrupt(path, storage))
        assert storage.lookup_nowait(b"k") is None
        assert not path.exists()
        assert await storage.lookup(b"k") is None
        stats = storage.stats()
        assert stats["corrupt"] == 1 and stats["errors"] == 0
        other = storage.lookup_nowait(b"j")
        assert other is not None and await other.read() == body_of(b"j", size)[:size]

    run(body)


def test_a_known_large_body_flipped_in_place_is_cut_short(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        data = body_of(b"k", BIG)
        await store(storage, b"k", data)
        assert await storage.lookup(b"k") is not None
        path = Path(storage.path_of(b"k"))
        _keep_times(path, lambda: _flip(path, path.stat().st_size - 16 - 100))
        entry = storage.lookup_nowait(b"k")  # the body is not read at lookup
        assert entry is not None
        with pytest.raises(CacheWriteAborted):
            await entry.read()
        assert not path.exists() and storage.stats()["corrupt"] == 1
        assert storage.lookup_nowait(b"k") is None

    run(body)


def test_known_files_bound_and_whole_second_file_times(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24, meta_cache=2)
        keys = [b"a", b"b", b"c"]
        for key in keys:
            await store(storage, key, b"x" * BIG)
            assert await storage.lookup(key) is not None
        assert list(storage._known) == [b"b", b"c"]  # type: ignore[attr-defined]
        assert storage.lookup_nowait(b"b") is not None
        assert list(storage._known) == [b"c", b"b"]  # type: ignore[attr-defined]
        # whole-second file times (a coarse file system): such files are always read
        path = storage.path_of(b"c")
        os.utime(path, ns=(os.stat(path).st_atime_ns, int(time.time()) * 1_000_000_000))
        first = await storage.lookup(b"c")
        assert first is not None
        assert storage._known[b"c"].ident is None  # type: ignore[attr-defined]
        reads = 0
        real_pread = os.pread

        def counting(*args: Any) -> bytes:
            nonlocal reads
            reads += 1
            return real_pread(*args)

        monkeypatch.setattr(os, "pread", counting)
        again = storage.lookup_nowait(b"c")
        assert again is not None and again.meta is first.meta and reads > 0
        reads = 0
        assert storage.lookup_nowait(b"b") is not None and reads == 0  # (stat only)
        # no memory of checked files at all
        plain = DiskStorage(str(tmp_path), 1 << 24, meta_cache=0)
        assert await plain.lookup(b"a") is not None
        found = plain.lookup_nowait(b"a")
        assert found is not None and await found.read() == b"x" * BIG
        assert not plain._known  # type: ignore[attr-defined]
        # and bounded in bytes
        monkeypatch.setattr(disk_module, "_KNOWN_BYTES", 60_000)
        small = DiskStorage(str(tmp_path), 1 << 24)
        big_head = (b"x-big", b"h" * 20_000)
        for key in keys:
            writer = await small.begin(key, CacheMeta(200, [big_head]))
            writer.write(b"body")
            writer.finish()
            found = await small.lookup(key)
            assert found is not None and found.meta.headers == [big_head]
        assert list(small._known) == [b"c"]  # type: ignore[attr-defined]
        assert 40_000 < small._known_bytes < 60_000  # type: ignore[attr-defined]

    run(body)


def test_known_files_are_still_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_module, "_TOUCH_AFTER", 0.3)

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        for key, size in ((b"small", 10), (b"large", BIG)):
            await store(storage, key, b"x" * size, keep_for=3600.0)
            assert await storage.lookup(key) is not None
            path = storage.path_of(key)
            expiry = os.stat(path).st_atime
            _age(path, 1000)
            await asyncio.sleep(0.4)
            assert storage.lookup_nowait(key) is not None  # due: touched
            st = os.stat(path)
            assert time.time() - st.st_mtime < 5 and abs(st.st_atime - expiry) < 1

    run(body)


# -- crashes -------------------------------------------------------------------------------

CHILD_WRITES_ONE = """
import asyncio, sys
from ferryman.cache.disk import DiskStorage
from ferryman.cache.storage import CacheMeta

async def main():
    storage = DiskStorage(sys.argv[1], 1 << 24)
    writer = await storage.begin(b"killed", CacheMeta(200, [], length=100000))
    writer.write(b"x" * 5000)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""

CHILD_WRITES_MANY = """
import asyncio, sys, time
from ferryman.cache.disk import DiskStorage
from ferryman.cache.storage import CacheMeta

async def main():
    storage = DiskStorage(sys.argv[1], 1 << 30)
    print("ready", flush=True)
    i = 0
    while True:
        key = b"key-%d" % (i % 10)
        body = key * (1000 + (i * 7919) % 20000)
        writer = await storage.begin(key, CacheMeta(200, [], length=len(body)))
        for j in range(0, len(body), 4096):
            writer.write(body[j:j + 4096])
            time.sleep(0.0002)  # (as a response arriving: kills land mostly mid-write)
        writer.finish()
        i += 1

asyncio.run(main())
"""


def spawn(script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """A python child running ``script``, and the first line it printed."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert child.stdout is not None
    child.stdout.close()


def test_kill_9_during_a_write_leaves_nothing_servable(tmp_path: Path) -> None:
    child, line = spawn(CHILD_WRITES_ONE, str(tmp_path))
    assert line == "ready"
    kill(child)
    leftovers = tmp_files(tmp_path)
    assert len(leftovers) == 1 and f".{child.pid}." in leftovers[0].name

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        assert await storage.lookup(b"killed") is None
        await storage.sweep()  # (after the one its first lookup started)
        assert not tmp_files(tmp_path) and storage.stats()["stale_removed"] == 1
        assert await storage.lookup(b"killed") is None

    run(body)


def test_kill_9_at_random_moments_never_serves_a_torn_entry(tmp_path: Path) -> None:
    rng = random.Random(5)
    torn = 0
    for _ in range(3):
        child, line = spawn(CHILD_WRITES_MANY, str(tmp_path))
        assert line == "ready"
        time.sleep(rng.uniform(0.02, 0.15))
        kill(child)
        torn += len(tmp_files(tmp_path))
    assert torn  # some kills landed mid-write

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 30)
        served = 0
        for i in range(10):
            key = b"key-%d" % i
            entry = await storage.lookup(key)
            if entry is None:
                continue
            data = await entry.read()
            assert data == key * (len(data) // len(key)) and len(data) == entry.meta.length
            served += 1
        assert served > 0
        await storage.sweep()
        assert not tmp_files(tmp_path)
        assert storage.stats()["corrupt"] == 0

    run(body)


# -- fill lock -----------------------------------------------------------------------------

CHILD_LOCKS = """
import asyncio, sys
from ferryman.cache.disk import DiskStorage

async def main():
    storage = DiskStorage(sys.argv[1], 1 << 24)
    print(await storage.fill_lock(b"k", 60.0), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_fill_lock_between_instances(tmp_path: Path) -> None:
    async def body() -> None:
        one = DiskStorage(str(tmp_path), 1 << 24)
        two = DiskStorage(str(tmp_path), 1 << 24)  # its own open file: excluded too
        assert await one.fill_lock(b"k", 30.0)
        assert not await two.fill_lock(b"k", 30.0)
        assert not await one.fill_lock(b"k", 30.0)  # held in this instance
        assert await two.fill_lock(b"other", 30.0)  # per key
        lock_file = Path(one.path_of(b"k") + ".lock")
        assert lock_file.exists()
        await one.fill_unlock(b"k")
        assert not lock_file.exists()
        assert await two.fill_lock(b"k", 30.0)
        assert not await one.fill_lock(b"k", 30.0)
        await two.close()  # gives its locks back
        assert await one.fill_lock(b"k", 30.0)
        await one.fill_unlock(b"k")
        await one.fill_unlock(b"k")  # not held: no-op
        # a holder past its ttl is presumed stuck
        assert await one.fill_lock(b"slow", 0.05)
        assert not await DiskStorage(str(tmp_path), 1 << 24).fill_lock(b"slow", 30.0)
        await asyncio.sleep(0.1)
        three = DiskStorage(str(tmp_path), 1 << 24)
        assert await three.fill_lock(b"slow", 30.0)
        assert three.stats()["lock_lapsed"] == 1
        assert await one.fill_lock(b"slow", 30.0)  # its own, lapsed
        await one.fill_unlock(b"slow")
        four = DiskStorage(str(tmp_path), 1 << 24)
        assert await four.fill_lock(b"slow", 30.0)

    run(body)


def test_fill_lock_dies_with_its_process(tmp_path: Path) -> None:
    child, line = spawn(CHILD_LOCKS, str(tmp_path))
    assert line == "True"

    async def check(expected: bool) -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        assert await storage.fill_lock(b"k", 30.0) is expected
        await storage.close()

    try:
        run(lambda: check(False))
    finally:
        kill(child)
    run(lambda: check(True))


# -- size bound and eviction ---------------------------------------------------------------


def _age(path: str, seconds: float) -> None:
    """Make a file look last used ``seconds`` ago (its atime, the expiry, kept)."""
    st = os.stat(path)
    os.utime(path, (st.st_atime, time.time() - seconds))


def test_eviction_is_lru_with_expired_entries_first(tmp_path: Path) -> None:
    async def body() -> None:
        roomy = DiskStorage(str(tmp_path), 1 << 30)
        keys = [b"k%d" % i for i in range(11)]
        for key in keys:
            await store(roomy, key, b"x" * 9000)
        for i, key in enumerate(keys):  # k0 least recently used ... k10 most
            _age(roomy.path_of(key), 2.0 ** (22 - i))
        await store(roomy, b"expired", b"x" * 9000, stored_at=time.time() - 100, keep_for=10.0)
        entry_size = os.path.getsize(roomy.path_of(b"k0"))
        assert 9000 < entry_size < 9200
        await roomy.close()

        storage = DiskStorage(str(tmp_path), 100_000, scan_interval=3600.0)
        assert await storage.lookup(b"k0") is not None  # a hit: now the most recent
        assert time.time() - os.stat(storage.path_of(b"k0")).st_mtime < 5
        assert os.stat(storage.path_of(b"k0")).st_atime > time.time() + 86400  # expiry kept
        await storage.sweep()
        gone = {key for key in [*keys, b"expired"] if not os.path.exists(storage.path_of(key))}
        # 12 entries (~110 KB) down to 90 KB: the expired one, then k1 and k2
        assert gone == {b"expired", b"k1", b"k2"}
        assert tree_size(tmp_path) <= 90_000
        stats = storage.stats()
        assert stats["evicted"] == 3 and stats["expired"] == 1 and stats["entries"] == 9
        assert stats["size"] == tree_size(tmp_path)

    run(body)


def test_writes_past_max_size_trigger_eviction(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 50_000, scan_interval=3600.0)
        assert storage.max_entry == 6250
        for i in range(40):
            await store(storage, b"k%d" % i, b"x" * 5000)
            await asyncio.sleep(0.002)
        for _ in range(200):  # the background pass (at most a second after the last)
            if tree_size(tmp_path) <= 50_000 and storage.stats()["evicted"]:
                break
            await asyncio.sleep(0.02)
        assert tree_size(tmp_path) <= 45_000
        assert storage.stats()["evicted"] >= 30 and storage.stats()["size"] <= 45_000
        assert os.path.exists(storage.path_of(b"k39"))  # the newest survive
        assert not os.path.exists(storage.path_of(b"k0"))

    run(body)


def test_max_entry(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24, max_entry=1000)
        # announced too large: no file at all
        writer = await storage.begin(b"big", meta(length=5000))
        assert not writer.stored and not files(tmp_path)
        writer.write(b"x" * 5000)
        writer.finish()
        assert await storage.lookup(b"big") is None
        # grows too large while a local reader streams it
        writer = await storage.begin(b"grow", meta())
        writer.write(b"a" * 600)
        entry = await storage.lookup(b"grow")
        assert entry is not None and len(tmp_files(tmp_path)) == 1
        task = asyncio.create_task(entry.read())
        await asyncio.sleep(0)
        writer.write(b"b" * 600)
        assert not writer.stored and not tmp_files(tmp_path)
        assert await storage.lookup(b"grow") is None
        writer.write(b"c" * 600)
        writer.finish()
        assert await task == b"a" * 600 + b"b" * 600 + b"c" * 600
        assert await storage.lookup(b"grow") is None
        assert storage.stats()["dropped"] == 2
        assert DiskStorage(str(tmp_path), 80_000).max_entry == 10_000

    run(body)


# -- purges and updates --------------------------------------------------------------------


def test_purges(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        other = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"/a/1", b"1", tags=(b"red",))
        await store(storage, b"/a/2", b"2", tags=(b"red", b"blue"))
        await store(storage, b"/b/1", b"3", tags=(b"blue",))
        await store(storage, b"/b/2", b"4")
        await store(storage, b"/c", b"5" * BIG, tags=(b"green",))
        assert await other.purge_tag(b"blue") == 2
        assert await storage.lookup(b"/a/2") is None and await storage.lookup(b"/b/1") is None
        assert await storage.lookup(b"/a/1") is not None
        assert await other.purge_prefix(b"/a/") == 1
        assert await other.purge_prefix(b"/a/") == 0
        assert await storage.purge_tag(b"green") == 1
        assert await other.purge(b"/b/2")
        assert not await other.purge(b"/b/2")
        assert not files(tmp_path)
        assert other.stats()["purged"] == 4 and storage.stats()["purged"] == 1
        # a write in progress is purged too: finishing it stores nothing
        writer = await storage.begin(b"/d", meta(tags=(b"red",)))
        writer.write(b"partial")
        assert await storage.purge_tag(b"red") == 1
        assert not writer.stored and not tmp_files(tmp_path)
        writer.finish()
        assert await storage.lookup(b"/d") is None
        writer = await storage.begin(b"/e", meta())
        writer.write(b"partial")
        assert await storage.purge(b"/e")
        writer.finish()
        assert await storage.lookup(b"/e") is None

    run(body)


def test_update_meta_keeps_the_body(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        data = body_of(b"k", BIG)
        await store(storage, b"k", data, tags=(b"t",))
        before = os.stat(storage.path_of(b"k"))
        fresh = CacheMeta(status=200, headers=[(b"etag", b'"v2"'), (b"x-long", b"y" * 500)],
                          length=len(data), keep_for=7200.0)
        assert await storage.update_meta(b"k", fresh)
        after = os.stat(storage.path_of(b"k"))
        assert after.st_ino != before.st_ino and after.st_size > before.st_size
        assert abs(after.st_atime - (fresh.stored_at + 7200.0)) < 1
        assert not tmp_files(tmp_path)
        entry = await DiskStorage(str(tmp_path), 1 << 24).lookup(b"k")
        assert entry is not None and entry.meta == fresh and await entry.read() == data
        assert not await storage.update_meta(b"missing", fresh)
        small = b"small body"
        await store(storage, b"s", small)
        assert await storage.update_meta(b"s", fresh)
        entry = await storage.lookup(b"s")
        assert entry is not None and entry.meta == fresh and await entry.read() == small

    run(body)


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "read and write"])
def test_update_meta_copy_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    way: str) -> None:
    def unsupported(*args: Any) -> int:
        raise OSError(errno.EXDEV if way == "sendfile" else errno.EINVAL, "unsupported")

    if way != "copy_file_range":
        monkeypatch.setattr(os, "copy_file_range", unsupported)
    if way == "read and write":
        monkeypatch.setattr(os, "sendfile", unsupported)

    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        data = body_of(b"k", BIG)
        await store(storage, b"k", data)
        fresh = meta(len(data), tags=(b"new",))
        assert await storage.update_meta(b"k", fresh)
        entry = await storage.lookup(b"k")
        assert entry is not None and entry.meta == fresh and await entry.read() == data

    run(body)


# -- housekeeping --------------------------------------------------------------------------


def test_sweep_removes_stale_temporary_and_lock_files(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24, stale_after=300.0)
        await store(storage, b"k", b"x")
        base = storage.path_of(b"k")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        dead_pid = int(dead.stdout)
        old = Path(f"{base}.{os.getpid()}.aaaa.tmp")
        fresh = Path(f"{base}.{os.getpid()}.bbbb.tmp")
        orphan = Path(f"{base}.{dead_pid}.cccc.tmp")
        for path in (old, fresh, orphan):
            path.write_bytes(b"partial")
        os.utime(old, (time.time() - 1000, time.time() - 1000))
        unused_lock = Path(storage.path_of(b"u") + ".lock")
        unused_lock.parent.mkdir(parents=True, exist_ok=True)
        unused_lock.write_bytes(b"")
        os.utime(unused_lock, (time.time() - 1000, time.time() - 1000))
        assert await storage.fill_lock(b"held", 30.0)
        held_lock = Path(storage.path_of(b"held") + ".lock")
        os.utime(held_lock, (time.time() - 1000, time.time() - 1000))
        await storage.sweep()
        assert not old.exists() and not orphan.exists() and fresh.exists()
        assert not unused_lock.exists() and held_lock.exists()
        assert storage.stats()["stale_removed"] == 2
        assert await storage.lookup(b"k") is not None

    run(body)


def test_state_is_shared_between_instances(tmp_path: Path) -> None:
    async def body() -> None:
        one = DiskStorage(str(tmp_path), 1 << 24)
        for i in range(3):
            await store(one, b"k%d" % i, b"x" * 1000)
        await one.sweep()
        two = DiskStorage(str(tmp_path), 1 << 24)
        assert await two.lookup(b"k0") is not None  # its first pass adopts one's measurement
        for _ in range(100):
            if two.stats()["entries"]:
                break
            await asyncio.sleep(0.01)
        stats = two.stats()
        assert stats["entries"] == 3 and stats["size"] == tree_size(tmp_path)
        assert stats["scans"] == 0

    run(body)


# -- I/O failures --------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_writing(tmp_path: Path) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        writer = await storage.begin(b"k", meta())
        writer.write(b"a" * 1000)
        entry = await storage.lookup(b"k")
        assert entry is not None
        task = asyncio.create_task(entry.read())
        await asyncio.sleep(0)
        full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        os.dup2(full, writer._fd)  # type: ignore[attr-defined]
        os.close(full)
        writer.write(b"b" * 1000)  # does not raise
        assert not writer.stored and not tmp_files(tmp_path)
        writer.write(b"c")
        writer.finish()
        assert await task == b"a" * 1000 + b"b" * 1000 + b"c"
        assert await storage.lookup(b"k") is None
        assert storage.stats()["errors"] == 1
        await store(storage, b"k", b"fine")  # the next write works
        found = await storage.lookup(b"k")
        assert found is not None and await found.read() == b"fine"

    run(body)


def test_failures_when_finishing_and_reading(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        storage = DiskStorage(str(tmp_path), 1 << 24)
        await store(storage, b"k", b"x" * BIG)
        writer = await storage.begin(b"j", meta())
        writer.write(b"data")

        def fail(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.EIO, "simulated I/O error")

        with monkeypatch.context() as patch:
            patch.setattr(os, "rename", fail)
            writer.finish()  # does not raise
        assert not writer.stored and not tmp_files(tmp_path)
        assert await storage.lookup(b"j") is None
        with monkeypatch.context() as patch:
            patch.setattr(os, "pread", fail)
            assert await storage.lookup(b"k") is None  # an error, not corruption
        assert os.path.exists(storage.path_of(b"k"))
        stats = storage.stats()
        assert stats["errors"] == 2 and stats["corrupt"] == 0
        entry = await storage.lookup(b"k")
        assert entry is not None
        with monkeypatch.context() as patch:
            patch.setattr(os, "pread", fail)
            with pytest.raises(CacheWriteAborted):
                await entry.read()
        assert await entry.read() == b"x" * BIG

    run(body)


def test_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError, match="cache directory"):
        DiskStorage(str(blocker / "cache"), 1 << 20)
    with pytest.raises(ValueError):
        DiskStorage(str(tmp_path), 0)
    created = DiskStorage(str(tmp_path / "new" / "cache"), 1 << 20)
    assert os.path.isdir(created.path) and created.shared
    assert DiskStorage(str(tmp_path), 1000, max_entry=5000).max_entry == 1000
