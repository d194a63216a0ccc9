"""A disk :class:`~ferryman.cache.storage.CacheStorage`: one directory, shared by the workers.

:class:`DiskStorage` keeps each entry in one file of a directory that every worker process
of a server opens with its own instance (``shared = True``). Entries survive restarts;
the directory is bounded by size, least recently used entries going first; a file that is
truncated, partial or garbage is detected when looked up, unlinked, and never served.

Layout (as nginx's ``levels=1:2``)
----------------------------------
The file of key ``k`` is ``ROOT/h[0]/h[1:3]/h`` where ``h`` is the hex SHA-256 of ``k``
(64 characters, no dot). Beside it live, never mistaken for entries:

* ``h.PID.RANDOM.tmp``: an entry being written by process PID (renamed into place when
  complete, so a reader only ever opens complete files);
* ``h.lock``: the cross-process fill lock of the key (:meth:`DiskStorage.fill_lock`).

At the root: ``.evict.lock`` (flocked by the one process running a maintenance pass) and
``.state`` (that pass's measurements, JSON, for the other workers).

File format (version 1, integers little-endian)
-----------------------------------------------
=========  ===========================================================================
offset     content
=========  ===========================================================================
0          header, 32 bytes: magic ``b"FRYC"``, u16 format version (1), u16 flags (0),
           u32 key length K, u32 meta length M, u64 body length B, u32 reserved (0),
           u32 header CRC-32 (over the 28 header bytes before it, the key and the meta)
32         the key (K bytes): checked against the key looked up (hash collisions, files
           copied to the wrong place)
32+K       :meth:`CacheMeta.encode` (M bytes)
32+K+M     the body (B bytes)
end-16     trailer: u64 body length B (again), u32 CRC-32 of the body, ``b"FEND"``
=========  ===========================================================================

A lookup reads the header, key and meta (one small read), the trailer, and the file size:
the magic, version, header CRC, key, ``32 + K + M + B + 16 == file size``, the trailer's
length and end marker must all agree, else the file is unlinked and counted ``corrupt``.
The body is not read at lookup unless the whole file is at most 80 KiB (a 64 KiB body and
its head: then it is read in the same call, its CRC checked, and the entry served from
memory). A larger body's CRC is verified while it streams (``verify_body``): a mismatch is
only known at the end, so the last read fails instead of returning the last piece (the
response is cut short, never completed with bad bytes), and the file is unlinked.

Each instance remembers the last ``meta_cache`` (4096; up to about 16 MiB) files its lookups
checked, with their decoded metadata: a hit of a known file reuses the same
:class:`CacheMeta` object (no JSON decode; ``HttpCache`` keeps its parse on it) when the
whole small file reads back as the bytes that were checked (its body CRC still checked), or,
for a larger file, when ``stat`` gives the same inode, size, mtime and ctime to the
nanosecond (nothing read at lookup: an entry file never changes in place, see
:class:`_Known`). Anything else is checked in full. :meth:`DiskStorage.lookup_nowait` is
:meth:`DiskStorage.lookup` for complete entries only, without a coroutine (the proxy's sync
mode serves fresh hits through it).

File times: **mtime** is the last use (set when written, touched by a hit when a minute
old, at most once a minute per process), which eviction orders by; **atime** carries the
expiry (``stored_at + keep_for``; ten years ahead without ``keep_for``), so a scan learns
both from one ``stat``. Files are read with ``O_NOATIME`` (relatime never moves a future
atime either).

Writing
-------
:meth:`DiskStorage.begin` creates the temporary file and writes a zeroed header, the key
and the meta; :meth:`CacheWriter.write` appends each chunk with a blocking ``os.write``
(page-cache speed; nginx does the same without aio); ``finish`` writes the trailer, the
real header (at offset 0), the file times, and renames the file into place (no fsync: a
crash may lose recent entries, never serve a torn one, since a file only gets its magic
at ``finish``). An I/O error (ENOSPC...) never raises out of the writer: the temporary
file is removed and counted in ``errors``, and local readers still get every byte.

A body announced larger than ``max_entry`` (``meta.length``) never gets a file; one that
grows past it is dropped when it does (``dropped``).

In-process streaming
--------------------
The writer's :attr:`~CacheWriter.entry` is an in-memory :class:`CacheEntry`, and
:meth:`DiskStorage.lookup` in the same process returns it until ``finish``, so a second
local client streams the response as it arrives (other processes see the key only once it
is renamed into place; :meth:`DiskStorage.fill_lock` makes them wait for it). It keeps
its chunks for late readers only up to ``stream_window`` bytes (default: 4 MiB or
``max_entry`` if smaller): past that it leaves the in-process index (the disk write goes
on) and, if no local reader is attached, stops keeping chunks. Readers already attached
keep receiving every chunk (held in memory until they finish: bounded by ``max_entry``).

Reading
-------
Entries looked up from disk do not keep a file descriptor: :meth:`CacheEntry.open_source`
and :meth:`CacheEntry.body` open the file when called. If the file is gone or was
replaced since the lookup (purged, evicted, rewritten), ``open_source`` returns None and
``body()`` raises :class:`CacheWriteAborted`. Reads are blocking ``pread`` calls of 64 KiB
on the event loop (page cache; as nginx without aio).

Size bound and maintenance
--------------------------
Each process keeps an estimate of the directory's size (from the last measurement, plus
what it stores since). When the estimate exceeds ``max_size``, and at most every
``scan_interval`` seconds while it writes, a maintenance pass runs in a thread
(``run_in_executor``): under a non-blocking ``flock`` of ``.evict.lock`` (one process at
a time; the others adopt the ``.state`` it leaves), it walks the tree with
``os.scandir``, sums the sizes (``st_size``; temporary files count, they occupy the disk),
removes stale temporary files (their process is dead, or unmodified for ``stale_after``
seconds) and unused lock files, and, above ``max_size``, unlinks entries down to 90% of
it: expired ones (atime in the past) first, then the least recently used (by mtime, to
within 2% of their age: the pass keeps a histogram of bytes by age, not a list of the
files, so its memory does not grow with the entries; it walks the tree a second time to
evict). Other processes' writes since the last pass are not in an estimate, so the
directory may overshoot by what the workers write in ``scan_interval``. A pass costs a
``stat`` per file: fine for some hundred thousand entries, slow (seconds, in the thread,
holding the GIL part of the time) beyond.

Expired entries (``meta.keep_for`` run out) are treated as gone by lookups (unlinked,
counted ``expired``) and are the first to go in eviction.

Cross-process fill lock
-----------------------
``fill_lock`` takes ``flock(LOCK_EX | LOCK_NB)`` on the key's lock file, re-checking
after locking that the path still names the locked inode (``fill_unlock`` unlinks the file
before unlocking it, the maintenance pass reaps unused ones the same way). A lock dies
with its process (kill -9 included). flock knows no ttl: the holder writes its deadline
(now + ttl) into the file, and a contender that finds the deadline passed gets True
without holding the lock (the holder is presumed stuck); waiters bound their wait anyway.
flock belongs to an open file description: two instances in one process exclude each
other. Create instances in the workers, after fork (a forked copy of a held lock's
descriptor would keep it held).

Limitations: purges race fills in flight in another process (a response fetched before a
purge may be stored just after it); ``update_meta`` rewrites the file on disk only, not
an entry still being written in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import stat
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from ferryman.cache.storage import (
    BodySource,
    CacheEntry,
    CacheMeta,
    CacheStorage,
    CacheWriteAborted,
    CacheWriter,
)

__all__ = ["DiskStorage"]

_MAGIC = b"FRYC"
_VERSION = 1
_END = b"FEND"
#: magic, version, flags, key length, meta length, body length, reserved, header CRC
_HEADER = struct.Struct("<4sHHIIQII")
#: body length, body CRC, end marker
_TRAILER = struct.Struct("<QI4s")
_HEADER_CRC_AT = _HEADER.size - 4
_PLACEHOLDER = bytes(_HEADER.size)

#: Body pieces read from files.
_CHUNK = 64 * 1024
#: Files up to this size are read whole (and checked) at lookup, and served from memory
#: (a 64 KiB body with up to 16 KiB of head and trailer: one read instead of two opens).
_INLINE = 80 * 1024
#: The first read of a larger file (header, key and meta, usually).
_HEAD_READ = 8 * 1024
#: Sanity bounds on the header's lengths.
_MAX_KEY = 1 << 20
_MAX_META = 1 << 20
#: A hit touches the file's mtime only if it is older than this (seconds).
_TOUCH_AFTER = 60.0
#: Entry files whose decoded metadata a storage instance remembers (:class:`_Known`), and
#: the memory they may take at most (roughly: their heads twice over).
_KNOWN_ENTRIES = 4096
_KNOWN_BYTES = 16 << 20
#: Nanoseconds in a second (a file time that is a whole second: a coarse file system).
_NS = 1_000_000_000
#: Expiry (atime) of entries without ``keep_for``: this far ahead (stays below 2038).
_FOREVER = 10 * 365 * 86400.0
#: An eviction pass brings the directory down to this fraction of ``max_size``.
_EVICT_TO = 0.9
#: Least time between two passes triggered by the size estimate (seconds).
_URGENT_GAP = 1.0
#: Lock files unused for this long are reaped by maintenance passes (seconds).
_LOCK_REAP_AGE = 60.0
#: Resolution of the age histogram of eviction passes (buckets per doubling of age).
_BUCKETS_PER_DOUBLING = 32
#: Hex digits, for recognising entry file names.
_HEXDIGITS = "0123456789abcdef"

_EVICT_LOCK = ".evict.lock"
_STATE = ".state"

_COUNTERS = (
    "hits", "hits_in_progress", "misses", "stored", "dropped", "aborted", "corrupt",
    "errors", "evicted", "expired", "purged", "stale_removed", "scans", "lock_lapsed",
)


class _Corrupt(Exception):
    """A file that is not a valid entry."""


@dataclass(slots=True)
class _Head:
    """What :func:`_read_head` found in a valid entry file."""

    key: bytes
    meta: bytes
    body_offset: int
    body_len: int
    body_crc: int
    #: The body, when the whole file was read (and its CRC checked).
    body: bytes | None
    #: The file's first ``body_offset`` bytes (header, key and meta) and its trailer.
    raw: bytes
    trailer: bytes


def _digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _pack_header(key: bytes, meta: bytes, body_len: int) -> bytes:
    """The 32-byte header of an entry, with its CRC."""
    fixed = _HEADER.pack(_MAGIC, _VERSION, 0, len(key), len(meta), body_len, 0, 0)
    crc = zlib.crc32(meta, zlib.crc32(key, zlib.crc32(fixed[:_HEADER_CRC_AT])))
    return fixed[:_HEADER_CRC_AT] + crc.to_bytes(4, "little")


def _read_head(fd: int, size: int, inline: int) -> _Head:
    """Check an entry file's header, key, meta and trailer (and its body, when the file is
    at most ``inline`` bytes: it is then read whole). Raises :class:`_Corrupt`."""
    if size < _HEADER.size + _TRAILER.size:
        raise _Corrupt("file too short")
    whole = size <= inline
    data = os.pread(fd, size if whole else min(size, _HEAD_READ), 0)
    if len(data) < _HEADER.size:
        raise _Corrupt("short read")
    magic, version, flags, key_len, meta_len, body_len, reserved, crc = (
        _HEADER.unpack_from(data)
    )
    if magic != _MAGIC:
        raise _Corrupt("bad magic")
    if version != _VERSION or flags or reserved:
        raise _Corrupt("unknown format version")
    if key_len > _MAX_KEY or meta_len > _MAX_META:
        raise _Corrupt("bad lengths")
    body_offset = _HEADER.size + key_len + meta_len
    if body_offset + body_len + _TRAILER.size != size:
        raise _Corrupt("file size does not match the header")
    if len(data) < body_offset:
        data += os.pread(fd, body_offset - len(data), len(data))
        if len(data) < body_offset:
            raise _Corrupt("short read")
    view = memoryview(data)
    check = zlib.crc32(view[_HEADER.size:body_offset], zlib.crc32(view[:_HEADER_CRC_AT]))
    if check != crc:
        raise _Corrupt("header checksum mismatch")
    if whole:
        trailer = data[size - _TRAILER.size:]
    else:
        trailer = os.pread(fd, _TRAILER.size, size - _TRAILER.size)
        if len(trailer) != _TRAILER.size:
            raise _Corrupt("short read")
    trailer_len, body_crc, end = _TRAILER.unpack(trailer)
    if end != _END or trailer_len != body_len:
        raise _Corrupt("bad trailer")
    body = None
    if whole:
        body = data[body_offset : body_offset + body_len]
        if zlib.crc32(body) != body_crc:
            raise _Corrupt("body checksum mismatch")
    return _Head(
        bytes(view[_HEADER.size : _HEADER.size + key_len]),
        bytes(view[_HEADER.size + key_len : body_offset]),
        body_offset, body_len, body_crc, body,
        data if len(data) == body_offset else bytes(view[:body_offset]), trailer,
    )


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(view):
            n = os.write(fd, view[written:])
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            written += n


def _expiry(meta: CacheMeta, now: float) -> float:
    """When an entry stops being of use (its file's atime)."""
    if meta.keep_for is None:
        return now + _FOREVER
    return meta.stored_at + meta.keep_for


def _expired(meta: CacheMeta, now: float) -> bool:
    return meta.keep_for is not None and meta.stored_at + meta.keep_for < now


def _unlink_if_same(path: str, ino: int, dev: int) -> bool:
    """Unlink ``path`` if it still names inode ``ino``; whether it did."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if st.st_ino != ino or st.st_dev != dev:
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_flags() -> int:
    return os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


def _open_read(path: str, flags: int) -> int:
    """Open an entry file for reading (``O_NOATIME`` is refused on files of other users:
    retried without)."""
    try:
        return os.open(path, flags)
    except PermissionError:
        noatime = getattr(os, "O_NOATIME", 0)
        if not flags & noatime:
            raise
        return os.open(path, flags & ~noatime)


# -- entries read from disk ----------------------------------------------------------------


class _FileSource:
    """Reads an entry's body from its file: exactly the body bytes, checking the body CRC
    before returning the last piece (:class:`~ferryman.cache.storage.BodySource`)."""

    __slots__ = ("_fd", "_pos", "_left", "_crc", "_expect", "_entry")

    def __init__(self, fd: int, entry: _DiskEntry, verify: bool) -> None:
        self._fd = fd
        self._pos = entry._offset
        self._left = entry._length
        self._crc = 0
        self._expect: int | None = entry._crc if verify else None
        self._entry = entry

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` body bytes; ``b""`` at the end. OSError if the file turns out
        truncated or its body checksum does not match (then it is unlinked)."""
        left = self._left
        if left <= 0 or size <= 0:
            return b""
        if self._fd < 0:
            raise ValueError("read from a closed cache body source")
        data = os.pread(self._fd, size if size < left else left, self._pos)
        if not data:
            self._entry._corrupted()
            raise OSError(errno.EIO, "cache entry file is truncated")
        n = len(data)
        self._pos += n
        self._left = left = left - n
        if self._expect is not None:
            self._crc = crc = zlib.crc32(data, self._crc)
            if left == 0 and crc != self._expect:
                self._entry._corrupted()
                raise OSError(errno.EIO, "cache entry body checksum mismatch")
        return data

    def skip(self, count: int) -> int:
        """Move ``count`` body bytes on without reading them (a Range's start); how many
        were skipped. The body CRC can no longer be checked by this reader."""
        count = max(0, min(count, self._left))
        self._pos += count
        self._left -= count
        self._expect = None
        return count

    def close(self) -> None:
        """Close the file."""
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            _close_quietly(fd)

    def __del__(self) -> None:
        self.close()


class _DiskEntry(CacheEntry):
    """A complete entry whose body is in a file (opened when read, not at lookup)."""

    __slots__ = ("_storage", "_path", "_ino", "_dev", "_offset", "_length", "_crc")

    def __init__(
        self, storage: DiskStorage, key: bytes, meta: CacheMeta, path: str, ino: int,
        dev: int, offset: int, length: int, crc: int,
    ) -> None:
        super().__init__(key, meta)
        self._storage = storage
        self._path = path
        self._ino = ino
        self._dev = dev
        self._offset = offset
        self._length = length
        self._crc = crc
        self.finish()

    @property
    def size(self) -> int:
        """The body length."""
        return self._length

    def open_source(self) -> BodySource | None:
        """A reader of the body from the file; None if the file is gone or was replaced
        since the lookup (then :meth:`body` raises :class:`CacheWriteAborted` too)."""
        try:
            fd = _open_read(self._path, self._storage._read_flags)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            _close_quietly(fd)
            return None
        if st.st_ino != self._ino or st.st_dev != self._dev:
            _close_quietly(fd)
            return None
        return _FileSource(fd, self, self._storage._verify_body)

    async def body(self) -> AsyncIterator[bytes]:
        """The body in 64 KiB chunks read from the file. Raises
        :class:`CacheWriteAborted` if the file is gone (purged, evicted, replaced since
        the lookup), unreadable, or found corrupt (before its last chunk)."""
        source = self.open_source()
        if source is None:
            raise CacheWriteAborted("cache entry file is gone (purged, evicted or replaced)")
        self._readers += 1
        try:
            while True:
                try:
                    chunk = source.read(_CHUNK)
                except OSError as exc:
                    raise CacheWriteAborted(f"cache entry file unreadable: {exc}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            self._readers -= 1
            source.close()

    def _corrupted(self) -> None:
        """The body turned out bad while read: drop the file."""
        self._storage._counters["corrupt"] += 1
        self._storage._drop_known(self.key)
        if _unlink_if_same(self._path, self._ino, self._dev):
            self._storage._removed(self._offset + self._length + _TRAILER.size)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells an entry file from any other, and from itself modified: inode, device,
    size, mtime and ctime (nanoseconds)."""
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Known:
    """An entry file a lookup of this process checked in full, with its decoded metadata,
    so that later hits of the same file skip decoding it (:meth:`DiskStorage._load`).

    A hit of a known file is served without decoding its metadata again when either:

    * the whole file (at most ``_INLINE`` bytes) reads back with exactly :attr:`size`
      bytes, starting with :attr:`raw` (header, key and meta: the bytes that were checked
      and decoded) and ending with :attr:`trailer`, and its body matches the trailer's
      CRC: every byte is read and checked as a first lookup would, only the JSON decode
      (and the header CRC over bytes equal to checked ones) is skipped; or
    * (larger files) ``stat`` of the path gives :attr:`ident`: the same inode, device and
      size, and the same mtime and ctime to the nanosecond, as when the file was checked.
      Nothing of the file is read then (:meth:`_DiskEntry.open_source` reads the body,
      checked against the body CRC of the trailer read when the file was checked). Safe
      because an entry file never changes after its rename into place: ``update_meta``,
      replacements and purges make new files (a new inode) or unlink them, the only
      change made in place is the mtime touch (a new mtime and ctime: checked in full
      again), and the kernel sets the ctime on any other change (a write, ``utime``,
      truncation), which userspace cannot set back. A new file reusing the inode would
      also need the same size and an mtime equal to the nanosecond (set from
      ``time.time()`` when written or touched). On a file system with whole-second file
      times that last point fails (:attr:`ident` is None: such files are always read).

    A hit also needs :attr:`touch_due` not reached: the mtime touch goes through the full
    check (which gives the file's new times). Every other case (a changed, replaced or
    touched file; corruption) is checked in full as a first lookup, and the decoded
    metadata is still reused if the head's bytes are :attr:`raw`.
    """

    __slots__ = ("path", "raw", "trailer", "meta", "size", "offset", "length", "crc",
                 "ident", "touch_due", "charge")

    def __init__(self, path: str, head: _Head, meta: CacheMeta, st: os.stat_result,
                 touch_due: float) -> None:
        self.path = path
        self.raw = head.raw
        self.trailer = head.trailer
        self.meta = meta
        self.size = st.st_size
        self.offset = head.body_offset
        self.length = head.body_len
        self.crc = head.body_crc
        self.ident = _identity(st) if st.st_mtime_ns % _NS else None
        #: When (``time.time()``) the file's mtime is to be touched by a hit.
        self.touch_due = touch_due
        #: Roughly the memory this takes, in bytes.
        self.charge = len(path) + len(self.raw) + meta.approx_size() + 256


# -- writing -------------------------------------------------------------------------------


class _DiskWriter(CacheWriter):
    """Writes one entry: to its in-memory :class:`CacheEntry` (local readers) and, while
    the storage keeps it, to a temporary file renamed into place by :meth:`finish`."""

    def __init__(
        self, storage: DiskStorage, entry: CacheEntry, fd: int | None = None,
        tmp: str = "", path: str = "", meta: bytes = b"", expires: float = 0.0,
    ) -> None:
        self._storage = storage
        self._entry = entry
        self._fd = fd
        self._tmp = tmp
        self._path = path
        self._meta = meta
        self._expires = expires
        self._body_len = 0
        self._crc = 0
        self._done = False
        self._stored = False
        #: Whether lookups in this process find the in-memory entry.
        self.pending = fd is not None

    @property
    def entry(self) -> CacheEntry:
        """The entry being written (in memory)."""
        return self._entry

    @property
    def stored(self) -> bool:
        """Whether the entry is being written to disk, or was stored there."""
        return self._fd is not None or self._stored

    @property
    def tmp(self) -> str:
        """The temporary file's path ("" when not writing to disk)."""
        return self._tmp if self._fd is not None else ""

    def write(self, chunk: bytes) -> None:
        """Append a body chunk (in memory for local readers, and to the file)."""
        if self._done:
            raise RuntimeError("cache writer is closed")
        entry = self._entry
        entry.append(chunk)
        fd = self._fd
        if fd is None or not chunk:
            return
        storage = self._storage
        if self.pending and entry.size > storage._window:
            storage._unpend(self)
        n = len(chunk)
        if self._body_len + n > storage._max_entry:
            storage._counters["dropped"] += 1
            self._discard()
            return
        try:
            _write_all(fd, chunk)
        except OSError:
            storage._counters["errors"] += 1
            self._discard()
            return
        self._crc = zlib.crc32(chunk, self._crc)
        self._body_len += n

    def finish(self) -> None:
        """The body is complete: the file gets its trailer and header and is renamed into
        place (an I/O error only means the entry is not stored)."""
        if self._entry.aborted:
            raise RuntimeError("cache writer was aborted")
        if self._done:
            return
        self._done = True
        self._entry.finish()
        fd = self._fd
        if fd is None:
            return
        storage = self._storage
        storage._unpend(self)
        storage._forget(self)
        self._fd = None
        key = self._entry.key
        size = _HEADER.size + len(key) + len(self._meta) + self._body_len + _TRAILER.size
        try:
            try:
                _write_all(fd, _TRAILER.pack(self._body_len, self._crc, _END))
                if os.pwrite(fd, _pack_header(key, self._meta, self._body_len), 0) != (
                    _HEADER.size
                ):
                    raise OSError(errno.EIO, "short write")
                os.utime(fd, (self._expires, time.time()))
            finally:
                os.close(fd)
            os.rename(self._tmp, self._path)
        except OSError:
            storage._counters["errors"] += 1
            _unlink_quietly(self._tmp)
            return
        self._stored = True
        storage._drop_known(key)  # (a new inode: would not be taken for the old one)
        storage._added(size)

    def abort(self) -> None:
        """Readers raise :class:`CacheWriteAborted`; the temporary file is removed."""
        if self._done:
            return
        self._done = True
        self._entry.abort()
        self._storage._counters["aborted"] += 1
        self._discard()

    def _discard(self) -> None:
        """Stop storing: remove the temporary file (the in-memory entry goes on)."""
        storage = self._storage
        storage._unpend(self)
        fd = self._fd
        if fd is not None:
            self._fd = None
            storage._forget(self)
            _close_quietly(fd)
            _unlink_quietly(self._tmp)


# -- maintenance (runs in a thread) --------------------------------------------------------


@dataclass(slots=True)
class _ScanResult:
    """What a maintenance pass measured and did."""

    at: float
    size: int
    entries: int
    scanned: bool = True
    evicted: int = 0
    expired: int = 0
    stale_removed: int = 0
    errors: int = 0


@dataclass(slots=True)
class _PurgeResult:
    keys: set[bytes] = field(default_factory=set)
    freed: int = 0
    corrupt: int = 0
    errors: int = 0


def _walk(root: str, stop: threading.Event) -> Iterator[os.DirEntry[str]]:
    """The files of the two-level tree (entries, temporary and lock files), until
    ``stop`` is set (the storage closes)."""
    with os.scandir(root) as tops:
        top_dirs = [d.path for d in tops
                    if len(d.name) == 1 and not d.name.strip(_HEXDIGITS)
                    and d.is_dir(follow_symlinks=False)]
    for top in top_dirs:
        try:
            with os.scandir(top) as subs:
                sub_dirs = [d.path for d in subs
                            if len(d.name) == 2 and not d.name.strip(_HEXDIGITS)
                            and d.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for sub in sub_dirs:
            try:
                with os.scandir(sub) as files:
                    for item in files:
                        if stop.is_set():
                            return
                        yield item
            except OSError:
                continue


def _is_entry_name(name: str) -> bool:
    return len(name) == 64 and not name.strip(_HEXDIGITS)


def _age_bucket(now: float, mtime: float) -> int:
    """A histogram bucket of an entry's age since its last use: 32 per doubling."""
    return int(math.log2(max(now - mtime, 0.0) + 1.0) * _BUCKETS_PER_DOUBLING)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def _stale_tmp(name: str, mtime: float, now: float, stale_after: float) -> bool:
    """Whether a temporary file was left by a dead process or is unmodified for long."""
    if now - mtime > stale_after:
        return True
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    return not _pid_alive(int(parts[1]))


def _reap_lock(path: str) -> bool:
    """Unlink an unused lock file (one nobody holds); whether it did."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        return _unlink_if_same(path, st.st_ino, st.st_dev)
    except OSError:
        return False
    finally:
        _close_quietly(fd)


def _read_state(root: str) -> tuple[float, int, int] | None:
    try:
        with open(os.path.join(root, _STATE), "rb") as f:
            state = json.loads(f.read(4096))
        return float(state["at"]), int(state["size"]), int(state["entries"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write_state(root: str, at: float, size: int, entries: int) -> None:
    tmp = os.path.join(root, f"{_STATE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps({"at": at, "size": size, "entries": entries}).encode())
        os.rename(tmp, os.path.join(root, _STATE))
    except OSError:
        _unlink_quietly(tmp)


def _maintain_dir(
    root: str, max_size: int, own_tmps: frozenset[str], stale_after: float,
    interval: float, synced_at: float, added: int, force: bool, stop: threading.Event,
) -> _ScanResult | None:
    """A maintenance pass: adopt another process's recent measurement (plus the ``added``
    bytes this process stored since its last one) if that is within ``max_size``, or
    (holding the evict lock) measure the tree, clean stale files and evict down to 90%
    if above ``max_size``. None if another process is running a pass (a forced pass
    waits for it instead), or if ``stop`` is set meanwhile."""
    now = time.time()
    if not force:
        state = _read_state(root)
        if (state is not None and state[0] > synced_at and now - state[0] < interval
                and state[1] + added <= max_size):
            return _ScanResult(state[0], state[1] + added, state[2], scanned=False)
    lock_fd = os.open(os.path.join(root, _EVICT_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                      0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX if force else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        result = _scan_and_evict(root, max_size, own_tmps, stale_after, time.time(), stop)
        if stop.is_set():
            return None
        _write_state(root, result.at, result.size, result.entries)
        return result
    finally:
        os.close(lock_fd)  # (unlocks)


def _scan_and_evict(
    root: str, max_size: int, own_tmps: frozenset[str], stale_after: float, now: float,
    stop: threading.Event,
) -> _ScanResult:
    """Measure the tree (removing stale temporary and lock files); above ``max_size``,
    walk it again evicting expired entries, then the least recently used.

    Memory stays flat whatever the number of entries: the first walk keeps a histogram
    of bytes by age bucket (:func:`_age_bucket`), from which the age beyond which every
    entry goes is chosen; the second walk evicts those (and, in the boundary bucket,
    only as many bytes as still needed, in directory order).
    """
    result = _ScanResult(now, 0, 0)
    total = 0
    entries = 0
    expired_bytes = 0
    by_age: dict[int, int] = {}
    for item in _walk(root, stop):
        name = item.name
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if _is_entry_name(name):
            total += st.st_size
            entries += 1
            if st.st_atime < now:
                expired_bytes += st.st_size
            else:
                bucket = _age_bucket(now, st.st_mtime)
                by_age[bucket] = by_age.get(bucket, 0) + st.st_size
        elif name.endswith(".tmp"):
            if item.path not in own_tmps and _stale_tmp(name, st.st_mtime, now, stale_after):
                try:
                    os.unlink(item.path)
                    result.stale_removed += 1
                    continue
                except FileNotFoundError:
                    continue
                except OSError:
                    result.errors += 1
            total += st.st_size
        elif name.endswith(".lock") and now - st.st_mtime > _LOCK_REAP_AGE:
            _reap_lock(item.path)
    if total > max_size:
        need = total - int(max_size * _EVICT_TO)
        # every entry older than `cutoff` goes; `boundary` bytes of the cutoff bucket
        cutoff = -1 if need > expired_bytes else 1 << 62
        boundary = 0
        left = need - expired_bytes
        for bucket in sorted(by_age, reverse=True):
            if left <= 0:
                break
            if by_age[bucket] >= left:
                cutoff, boundary = bucket, left
                break
            left -= by_age[bucket]
        expired_left = need
        for item in _walk(root, stop):
            if not _is_entry_name(item.name):
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            expired = st.st_atime < now
            if expired:
                if expired_left <= 0:
                    continue
            else:
                bucket = _age_bucket(now, st.st_mtime)
                if bucket < cutoff or (bucket == cutoff and boundary <= 0):
                    continue
            if not _unlink_if_same(item.path, st.st_ino, st.st_dev):
                continue
            total -= st.st_size
            entries -= 1
            result.evicted += 1
            if expired:
                result.expired += 1
                expired_left -= st.st_size
            elif bucket == cutoff:
                boundary -= st.st_size
    result.size = total
    result.entries = entries
    return result


def _purge_scan(
    root: str, match: Callable[[bytes, bytes], bool], flags: int, stop: threading.Event,
) -> _PurgeResult:
    """Unlink the entry files whose (key, meta bytes) ``match`` (and corrupt ones)."""
    result = _PurgeResult()
    for item in _walk(root, stop):
        if not _is_entry_name(item.name):
            continue
        path = item.path
        try:
            fd = _open_read(path, flags)
        except FileNotFoundError:
            continue
        except OSError:
            result.errors += 1
            continue
        try:
            st = os.fstat(fd)
            try:
                head = _read_head(fd, st.st_size, 0)
                hit = match(head.key, head.meta)
            except (_Corrupt, ValueError):
                if _unlink_if_same(path, st.st_ino, st.st_dev):
                    result.corrupt += 1
                continue
            if hit and _unlink_if_same(path, st.st_ino, st.st_dev):
                result.keys.add(head.key)
                result.freed += st.st_size
        except OSError:
            result.errors += 1
        finally:
            os.close(fd)
    return result


def _copy_range(src: int, src_offset: int, dst: int, count: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``src_offset`` to ``dst``'s position, in the
    kernel (``copy_file_range``, else ``sendfile``, else through memory)."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, src_offset + done)
            if n <= 0:
                raise _Corrupt("file shorter than its header says")
            done += n
        return
    except OSError as exc:
        if done or exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                     errno.EOPNOTSUPP, errno.EPERM):
            raise
    try:
        while done < count:
            n = os.sendfile(dst, src, src_offset + done, count - done)
            if n <= 0:
                raise _Corrupt("file shorter than its header says")
            done += n
        return
    except OSError as exc:
        if done or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while done < count:
        data = os.pread(src, min(_CHUNK, count - done), src_offset + done)
        if not data:
            raise _Corrupt("file shorter than its header says")
        _write_all(dst, data)
        done += len(data)


def _rewrite_meta(
    path: str, tmp: str, key: bytes, meta: bytes, expires: float, flags: int,
) -> int | None:
    """Rewrite the entry at ``path`` with new meta (temporary file, kernel-side body copy,
    rename); the size change, or None if there is no valid entry for ``key`` (or it was
    replaced meanwhile). Raises :class:`_Corrupt` (the file is then unlinked)."""
    try:
        src = _open_read(path, flags)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(src)
        try:
            head = _read_head(src, st.st_size, 0)
            if head.key != key:
                raise _Corrupt("another key's file")
        except _Corrupt:
            _unlink_if_same(path, st.st_ino, st.st_dev)
            raise
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(dst, _pack_header(key, meta, head.body_len) + key + meta)
                _copy_range(src, head.body_offset, dst, head.body_len + _TRAILER.size)
                os.utime(dst, (expires, time.time()))
            finally:
                os.close(dst)
            cur = os.stat(path, follow_symlinks=False)
            if cur.st_ino != st.st_ino or cur.st_dev != st.st_dev:
                _unlink_quietly(tmp)
                return None
            os.rename(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return (_HEADER.size + len(key) + len(meta) + head.body_len + _TRAILER.size
                - st.st_size)
    finally:
        os.close(src)


def _read_known(fd: int, key: bytes, known: _Known, now: float) -> CacheEntry | None:
    """A known small file, read whole: the entry if every byte checks against ``known``
    (see :class:`_Known`), else None (the caller checks it in full)."""
    size = known.size
    data = os.pread(fd, size + 1, 0)  # (one byte more: a longer file shows)
    if (len(data) != size or not data.startswith(known.raw)
            or not data.endswith(known.trailer) or _expired(known.meta, now)):
        return None
    body = data[known.offset : size - _TRAILER.size]
    if zlib.crc32(body) != known.crc:
        return None
    entry = CacheEntry(key, known.meta)
    entry.append(body)
    entry.finish()
    return entry


# -- the storage ---------------------------------------------------------------------------


class DiskStorage(CacheStorage):
    """Cache entries in files under ``path``, shared by the worker processes of a server.

    Args:
        path: the cache directory (created if missing).
        max_size: the bound on the directory's total size, in bytes (kept by eviction
            passes; may overshoot by what the workers write between two passes).
        max_entry: the largest body stored (default: ``max_size // 8``; at most
            ``max_size``).
        stream_window: how many body bytes an entry being written keeps in memory for
            late local readers (default: 4 MiB, at most ``max_entry``).
        scan_interval: least seconds between two periodic maintenance passes.
        stale_after: temporary files unmodified this long are removed (seconds).
        verify_body: check the body CRC of entries streamed from files.
        meta_cache: how many checked entry files (their decoded metadata) this instance
            remembers, so that their hits skip decoding it (0: none; see :class:`_Known`).

    See the module docstring for the layout, file format and policies.
    """

    shared = True

    def __init__(
        self, path: str, max_size: int, max_entry: int | None = None, *,
        stream_window: int = 4 << 20, scan_interval: float = 10.0,
        stale_after: float = 600.0, verify_body: bool = True,
        meta_cache: int = _KNOWN_ENTRIES,
    ) -> None:
        """A storage in directory ``path`` of at most ``max_size`` bytes."""
        if max_size < 1:
            raise ValueError("max_size must be positive")
        if max_entry is not None and max_entry < 0:
            raise ValueError("max_entry must not be negative")
        root = os.path.abspath(path)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the cache directory {path!r}: "
                          f"{exc.strerror}") from exc
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"the cache directory {path!r} is not "
                                  "writable")
        self._root = root
        self._max_size = max_size
        self._max_entry = max(1, max_size // 8) if max_entry is None else min(max_entry,
                                                                              max_size)
        self._window = min(max(stream_window, 0), self._max_entry)
        self._scan_interval = scan_interval
        self._stale_after = stale_after
        self._verify_body = verify_body
        self._read_flags = _read_flags()
        #: Entry files checked by lookups, by key, least recently hit first.
        self._known: OrderedDict[bytes, _Known] = OrderedDict()
        self._known_max = max(meta_cache, 0)
        self._known_bytes = 0
        #: Writers storing to disk, by key (at most one per key in this process).
        self._writing: dict[bytes, _DiskWriter] = {}
        #: Fill locks held: key -> (lock file descriptor, deadline).
        self._locks: dict[bytes, tuple[int, float]] = {}
        self._dirs: set[str] = set()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._size = 0
        self._entries = 0
        self._synced_at = 0.0
        self._next_scan = 0.0
        self._next_urgent = 0.0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Tells passes running in threads to stop (set by :meth:`close`).
        self._stop = threading.Event()
        #: Bytes stored by this process since its estimate was last measured.
        self._added_since = 0
        self._closed = False

    # -- properties ------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The cache directory (absolute)."""
        return self._root

    @property
    def max_size(self) -> int:
        """The bound on the directory's size."""
        return self._max_size

    @property
    def max_entry(self) -> int:
        """The largest body stored, in bytes."""
        return self._max_entry

    def path_of(self, key: bytes) -> str:
        """The file an entry for ``key`` is stored in."""
        h = _digest(key)
        return f"{self._root}/{h[0]}/{h[1:3]}/{h}"

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(self, key: bytes) -> CacheEntry | None:
        """The entry under ``key``: one being written in this process, else the file's
        (checked; corrupt or expired files are unlinked). None on a miss or an I/O error."""
        counters = self._counters
        writer = self._writing.get(key)
        if writer is not None and writer.pending:
            counters["hits"] += 1
            counters["hits_in_progress"] += 1
            return writer.entry
        if self._next_scan == 0.0:
            self._maybe_maintain()  # the first pass: measure, clean up after a crash
        entry = None if self._closed else self._load(key)
        counters["hits" if entry is not None else "misses"] += 1
        return entry

    def lookup_nowait(self, key: bytes) -> CacheEntry | None:
        """The complete entry stored under ``key`` (a hit), read without waiting; None
        (not counted) on a miss, for an entry being written in this process (the
        :meth:`lookup` that follows streams it), before this instance's first
        maintenance pass has started (:meth:`lookup` starts it) and on any failure."""
        writer = self._writing.get(key)
        if writer is not None and writer.pending:
            return None
        if self._closed or (self._next_scan == 0.0 and self._task is None):
            return None
        entry = self._load(key)
        if entry is not None:
            self._counters["hits"] += 1
        return entry

    def _load(self, key: bytes) -> CacheEntry | None:
        """The entry in ``key``'s file, checked (see :class:`_Known` for the files already
        checked by this process); corrupt and expired files are unlinked."""
        now = time.time()
        known = self._known.get(key)
        if known is None:
            path = self.path_of(key)
        else:
            self._known.move_to_end(key)
            path = known.path
            if now < known.touch_due and known.size > _INLINE and known.ident is not None:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    self._drop_known(key)
                    return None
                except OSError:
                    self._counters["errors"] += 1
                    return None
                if _identity(st) == known.ident and not _expired(known.meta, now):
                    return _DiskEntry(self, key, known.meta, path, st.st_ino, st.st_dev,
                                      known.offset, known.length, known.crc)
        try:
            fd = _open_read(path, self._read_flags)
        except FileNotFoundError:
            if known is not None:
                self._drop_known(key)
            return None
        except OSError:
            self._counters["errors"] += 1
            return None
        try:
            if known is not None and known.size <= _INLINE and now < known.touch_due:
                entry = _read_known(fd, key, known, now)
                if entry is not None:
                    return entry
            return self._check(fd, key, path, known, now)
        except OSError:
            self._counters["errors"] += 1
            return None
        finally:
            os.close(fd)

    def _check(self, fd: int, key: bytes, path: str, known: _Known | None,
               now: float) -> CacheEntry | None:
        """Check the open file of ``key`` in full (as :func:`_read_head`), decoding its
        metadata unless its head is ``known``'s; touch its mtime if due; remember it."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self._counters["errors"] += 1
            return None
        try:
            head = _read_head(fd, st.st_size, _INLINE)
            if head.key != key:
                raise _Corrupt("another key's file")
            if known is not None and head.raw == known.raw:
                meta = known.meta  # the very bytes decoded before
            else:
                meta = CacheMeta.decode(head.meta)
        except (_Corrupt, ValueError):
            self._counters["corrupt"] += 1
            self._drop_known(key)
            if _unlink_if_same(path, st.st_ino, st.st_dev):
                self._removed(st.st_size)
            return None
        if _expired(meta, now):
            self._drop_known(key)
            if _unlink_if_same(path, st.st_ino, st.st_dev):
                self._counters["expired"] += 1
                self._removed(st.st_size)
            return None
        touch_due = st.st_mtime + _TOUCH_AFTER
        if now > touch_due:
            touch_due = now + _TOUCH_AFTER
            with contextlib.suppress(OSError):
                os.utime(fd, (_expiry(meta, now), now))
                st = os.fstat(fd)  # (its new times identify the file from now on)
        if self._known_max:
            self._remember(key, _Known(path, head, meta, st, touch_due))
        if head.body is None:
            return _DiskEntry(self, key, meta, path, st.st_ino, st.st_dev, head.body_offset,
                              head.body_len, head.body_crc)
        entry = CacheEntry(key, meta)
        entry.append(head.body)
        entry.finish()
        return entry

    def _remember(self, key: bytes, known: _Known) -> None:
        """Remember a checked file (forgetting the least recently hit beyond the bounds)."""
        entries = self._known
        self._drop_known(key)
        entries[key] = known
        self._known_bytes += known.charge
        while len(entries) > self._known_max or self._known_bytes > _KNOWN_BYTES:
            _, old = entries.popitem(last=False)
            self._known_bytes -= old.charge

    def _drop_known(self, key: bytes) -> None:
        """Forget the file checked for ``key``, if any."""
        old = self._known.pop(key, None)
        if old is not None:
            self._known_bytes -= old.charge

    # -- writing ---------------------------------------------------------------------------

    async def begin(self, key: bytes, meta: CacheMeta) -> CacheWriter:
        """Start storing a response under ``key``: a temporary file, renamed into place by
        the writer's ``finish``; lookups in this process find the entry at once (others
        once it is finished). A body announced larger than ``max_entry`` gets no file."""
        entry = CacheEntry(key, meta)
        old = self._writing.get(key)
        if old is not None:
            old._discard()  # replaced: its readers keep it, its file is not stored
        if self._closed:
            return _DiskWriter(self, entry)
        if meta.length is not None and meta.length > self._max_entry:
            self._counters["dropped"] += 1
            return _DiskWriter(self, entry)
        meta_bytes = meta.encode()
        path = self.path_of(key)
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = self._create(tmp)
        except OSError:
            self._counters["errors"] += 1
            return _DiskWriter(self, entry)
        try:
            _write_all(fd, _PLACEHOLDER + key + meta_bytes)
        except OSError:
            self._counters["errors"] += 1
            _close_quietly(fd)
            _unlink_quietly(tmp)
            return _DiskWriter(self, entry)
        writer = _DiskWriter(self, entry, fd, tmp, path, meta_bytes,
                             _expiry(meta, time.time()))
        self._writing[key] = writer
        self._maybe_maintain()
        return writer

    def _create(self, tmp: str) -> int:
        """Create a new temporary file (and its directories)."""
        directory = os.path.dirname(tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the directory went away under us
            os.makedirs(directory, exist_ok=True)
            return os.open(tmp, flags, 0o644)

    def _unpend(self, writer: _DiskWriter) -> None:
        """Lookups in this process no longer find the writer's in-memory entry (which
        stops keeping its chunks unless a reader is attached)."""
        if writer.pending:
            writer.pending = False
            writer.entry.release()

    def _forget(self, writer: _DiskWriter) -> None:
        key = writer.entry.key
        if self._writing.get(key) is writer:
            del self._writing[key]

    def _added(self, size: int) -> None:
        """A file of ``size`` bytes was stored."""
        self._counters["stored"] += 1
        self._size += size
        self._added_since += size
        self._entries += 1
        self._maybe_maintain()

    def _removed(self, size: int) -> None:
        """A file of ``size`` bytes was unlinked."""
        self._size = max(0, self._size - size)
        self._entries = max(0, self._entries - 1)

    # -- purges and updates ----------------------------------------------------------------

    async def purge(self, key: bytes) -> bool:
        """Remove the entry under ``key`` (its file, and any write of it in progress in
        this process); whether there was one."""
        existed = False
        writer = self._writing.get(key)
        if writer is not None:
            writer._discard()
            existed = True
        self._drop_known(key)
        path = self.path_of(key)
        try:
            st = os.stat(path, follow_symlinks=False)
            os.unlink(path)
            self._removed(st.st_size)
            existed = True
        except FileNotFoundError:
            pass
        except OSError:
            self._counters["errors"] += 1
        if existed:
            self._counters["purged"] += 1
        return existed

    async def purge_prefix(self, prefix: bytes) -> int:
        """Remove every entry whose key starts with ``prefix`` (a scan reading each file's
        header, in a thread); how many."""
        return await self._purge_matching(
            lambda key: key.startswith(prefix),
            lambda key, meta: key.startswith(prefix),
        )

    async def purge_tag(self, tag: bytes) -> int:
        """Remove every entry tagged ``tag`` (a scan reading each file's header, in a
        thread); how many."""

        def file_match(key: bytes, meta: bytes) -> bool:
            return tag in CacheMeta.decode(meta).tags

        return await self._purge_matching(lambda key: False, file_match, tag)

    async def _purge_matching(
        self, key_match: Callable[[bytes], bool], file_match: Callable[[bytes, bytes], bool],
        tag: bytes | None = None,
    ) -> int:
        keys: set[bytes] = set()
        for key, writer in list(self._writing.items()):
            if key_match(key) or (tag is not None and tag in writer.entry.meta.tags):
                writer._discard()
                keys.add(key)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                None, _purge_scan, self._root, file_match, self._read_flags, self._stop)
        except OSError:
            self._counters["errors"] += 1
            result = _PurgeResult()
        keys |= result.keys
        for key in keys:
            self._drop_known(key)
        self._counters["corrupt"] += result.corrupt
        self._counters["errors"] += result.errors
        self._counters["purged"] += len(keys)
        self._size = max(0, self._size - result.freed)
        self._entries = max(0, self._entries - len(result.keys))
        return len(keys)

    async def update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        """Replace the metadata of the entry stored under ``key`` (a new file, the body
        copied in the kernel, renamed into place; in a thread); whether there was one."""
        if self._closed:
            return False
        self._drop_known(key)
        path = self.path_of(key)
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        job = functools.partial(_rewrite_meta, path, tmp, key, meta.encode(),
                                _expiry(meta, time.time()), self._read_flags)
        try:
            delta = await asyncio.get_running_loop().run_in_executor(None, job)
        except _Corrupt:
            self._counters["corrupt"] += 1
            return False
        except OSError:
            self._counters["errors"] += 1
            return False
        finally:
            self._drop_known(key)  # (a hit may have checked the old file meanwhile)
        if delta is None:
            return False
        self._size = max(0, self._size + delta)
        return True

    # -- cross-process fill lock -----------------------------------------------------------

    async def fill_lock(self, key: bytes, ttl: float) -> bool:
        """Ask for the right to fetch ``key`` across the workers: ``flock`` on the key's
        lock file (released by :meth:`fill_unlock`, or when the process dies). True also
        when the holder's ttl has run out (it is presumed stuck; it keeps its lock), and
        when the lock file cannot be used (no coordination rather than no caching)."""
        now = time.time()
        held = self._locks.get(key)
        if held is not None:
            if now < held[1]:
                return False
            self._counters["lock_lapsed"] += 1
            return True
        if self._closed:
            return True
        h = _digest(key)
        path = f"{self._root}/{h[0]}/{h[1:3]}/{h}.lock"
        try:
            return self._try_lock(key, path, now, now + ttl)
        except OSError:
            self._counters["errors"] += 1
            return True

    def _try_lock(self, key: bytes, path: str, now: float, deadline: float) -> bool:
        directory = os.path.dirname(path)
        if directory not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(directory)
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    theirs = float(os.pread(fd, 64, 0).split()[0])
                except (OSError, ValueError, IndexError):
                    theirs = float("inf")  # being written: not lapsed
                finally:
                    os.close(fd)
                if now > theirs:
                    self._counters["lock_lapsed"] += 1
                    return True
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.fstat(fd)
                cur = os.stat(path)
                same = (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev)
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if not same:  # unlinked by its last holder after we opened it: again
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, b"%.3f %d\n" % (deadline, os.getpid()), 0)
            except OSError:
                pass  # the deadline is advisory
            self._locks[key] = (fd, deadline)
            return True
        return False

    async def fill_unlock(self, key: bytes) -> None:
        """Give back the lock :meth:`fill_lock` took (a no-op if it did not)."""
        held = self._locks.pop(key, None)
        if held is None:
            return
        h = _digest(key)
        _unlink_quietly(f"{self._root}/{h[0]}/{h[1:3]}/{h}.lock")  # still ours: we hold it
        _close_quietly(held[0])

    # -- maintenance -----------------------------------------------------------------------

    def _maybe_maintain(self) -> None:
        """Start a maintenance pass in the background if one is due: every
        ``scan_interval`` (checked when writing), or soon when the size estimate exceeds
        ``max_size`` (at most once a second: later if a pass just ran)."""
        if self._task is not None or self._closed:
            return
        now = time.monotonic()
        if now < self._next_scan:
            if self._size <= self._max_size:
                return
            if now < self._next_urgent:
                self._retry_later(self._next_urgent - now)
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._next_urgent = now + _URGENT_GAP
        self._task = loop.create_task(self._maintain(False))

    def _retry_later(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self._maybe_maintain()

    async def _maintain(self, force: bool) -> None:
        scanned = True
        try:
            own = frozenset(w.tmp for w in self._writing.values())
            added = self._added_since
            job = functools.partial(
                _maintain_dir, self._root, self._max_size, own, self._stale_after,
                self._scan_interval, self._synced_at, added, force, self._stop)
            result = await asyncio.get_running_loop().run_in_executor(None, job)
            scanned = result is not None and result.scanned
            if result is not None:
                self._added_since -= added  # (what was stored meanwhile stays counted)
                self._size = result.size + self._added_since
                self._entries = result.entries
                self._synced_at = result.at
                counters = self._counters
                counters["scans"] += result.scanned
                counters["evicted"] += result.evicted
                counters["expired"] += result.expired
                counters["stale_removed"] += result.stale_removed
                counters["errors"] += result.errors
        except Exception:  # noqa: BLE001 - a failed pass must not kill the task loudly
            self._counters["errors"] += 1
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            self._next_scan = time.monotonic() + self._scan_interval
        if not scanned and self._size > self._max_size:
            self._maybe_maintain()  # another process was at it: look again in a while

    async def sweep(self) -> None:
        """Run a maintenance pass now (measure the directory, remove stale temporary and
        lock files, evict down to 90% of ``max_size`` if above it), after any pass in
        progress, here or in another process."""
        running = self._task
        if running is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await running
        task = asyncio.get_running_loop().create_task(self._maintain(True))
        self._task = task
        await task

    # -- the rest --------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: ``hits`` (``hits_in_progress`` of them on entries being written in
        this process), ``misses``, ``stored``, ``dropped`` (too large),
        ``aborted``, ``corrupt`` (files found bad and unlinked), ``errors`` (I/O),
        ``evicted`` (``expired`` also counts expired files found by lookups), ``purged``,
        ``stale_removed`` (temporary files), ``scans``, ``lock_lapsed``; and estimates
        ``entries``, ``size``, with ``max_size`` and ``writing``."""
        out = dict(self._counters)
        out["entries"] = self._entries
        out["size"] = self._size
        out["max_size"] = self._max_size
        out["writing"] = len(self._writing)
        return out

    async def close(self) -> None:
        """Abort the writes in progress, give back the fill locks, stop maintenance."""
        self._closed = True
        self._known.clear()
        self._known_bytes = 0
        for writer in list(self._writing.values()):
            writer.abort()
        for key in list(self._locks):
            await self.fill_unlock(key)
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:  # (its thread stops at the next file)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
