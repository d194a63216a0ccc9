"""The cache storage interface: stored responses whose bodies stream while written.

A backend (:class:`CacheStorage`) maps a cache key (bytes; the caller folds the
secondary key of ``Vary`` into it) to a :class:`CacheEntry`: the response's
:class:`CacheMeta` and a body that readers iterate with ``async for chunk in
entry.body()`` (or, once complete, read synchronously through
:meth:`CacheEntry.open_source`). An entry is visible to :meth:`CacheStorage.lookup` from
:meth:`CacheStorage.begin` on, so a second client can stream a response while the first
fetch is still writing it; a reader waits for more chunks until the writer finishes, and
raises :class:`CacheWriteAborted` if the writer aborts.

Writing is synchronous (:class:`CacheWriter` methods are plain functions): the proxy tees
each response body chunk into the writer from inside the protocol callback that received
it, and a coroutine per chunk would cost on every chunk. A backend whose I/O must wait
(Redis) buffers and finishes in the background.

Storages shared by several processes (``shared = True``: a disk directory, Redis) also
coordinate fetches across them: :meth:`CacheStorage.fill_lock` grants one process the
right to fetch a key, the others poll :meth:`CacheStorage.lookup` until it is stored.

Freshness is not this layer's business (:mod:`ferryman.cache.policy` decides); backends
only bound their size and choose what to keep.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BodySource",
    "ChunkSource",
    "CacheEntry",
    "CacheMeta",
    "CacheStorage",
    "CacheWriteAborted",
    "CacheWriter",
]

#: Rough fixed cost of an entry's bookkeeping (objects, index slots), in bytes.
_META_OVERHEAD = 256
#: Rough per-header-field cost beyond the name and value bytes.
_FIELD_OVERHEAD = 48

#: Bump when :meth:`CacheMeta.encode`'s layout changes (older entries then read as
#: corrupt, and are dropped).
_CODEC_VERSION = 2

_WRITING = 0
_COMPLETE = 1
_ABORTED = 2


class CacheWriteAborted(Exception):
    """The body of a cache entry will not be completed: its writer aborted (the origin
    response broke off), or the entry was dropped before this reader could attach."""


@dataclass
class CacheMeta:
    """What is stored of a response besides its body."""

    #: The response status code.
    status: int
    #: The response header fields as received (hop-by-hop ones removed), in order.
    headers: list[tuple[bytes, bytes]]
    #: When the entry was stored (``time.time()``).
    stored_at: float = field(default_factory=time.time)
    #: When the request that fetched the response was sent (RFC 9111 §4.2.3).
    request_time: float = field(default_factory=time.time)
    #: When the response was received (RFC 9111 §4.2.3).
    response_time: float = field(default_factory=time.time)
    #: The field names ``Vary`` lists (:func:`ferryman.cache.variants.vary_fields`);
    #: None for ``Vary: *``, ``()`` without ``Vary``.
    vary: tuple[bytes, ...] | None = ()
    #: The secondary key (:func:`ferryman.cache.variants.vary_key`).
    variant: bytes = b""
    #: The body length if known in advance (``Content-Length``), a size hint.
    length: int | None = None
    #: Surrogate keys (``Cache-Tag`` / ``Surrogate-Key``) that
    #: :meth:`CacheStorage.purge_tag` removes the entry by.
    tags: tuple[bytes, ...] = ()
    #: How long (seconds from :attr:`stored_at`) the entry can still be of use: its
    #: freshness plus any stale-serving or revalidation window. Storages with expiry
    #: (Redis TTLs, disk eviction) may drop it after that; None: no bound is known.
    keep_for: float | None = None
    #: The freshness lifetime decided when it was stored (RFC 9111 §4.2.1, or the
    #: cache's ``default_ttl``), in seconds.
    fresh_for: float = 0.0
    #: What a cache parsed of :attr:`headers` to judge the entry (its owner's business:
    #: kept with the object, never stored or compared).
    parsed: object = field(default=None, compare=False, repr=False)

    def encode(self) -> bytes:
        """The metadata as bytes (compact JSON), for storages outside process memory;
        :meth:`decode` reverses it."""
        return json.dumps(
            [
                _CODEC_VERSION,
                self.status,
                [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                self.stored_at,
                self.request_time,
                self.response_time,
                None if self.vary is None else [n.decode("latin-1") for n in self.vary],
                self.variant.decode("latin-1"),
                self.length,
                [t.decode("latin-1") for t in self.tags],
                self.keep_for,
                self.fresh_for,
            ],
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> CacheMeta:
        """The metadata :meth:`encode` made; ValueError if ``data`` is not that."""
        try:
            fields = json.loads(data)
            if not isinstance(fields, list) or fields[0] != _CODEC_VERSION:
                raise ValueError("unknown cache metadata version")
            (_, status, headers, stored_at, request_time, response_time, vary, variant,
             length, tags, keep_for, fresh_for) = fields
            return cls(
                int(status),
                [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
                float(stored_at),
                float(request_time),
                float(response_time),
                None if vary is None else tuple(n.encode("latin-1") for n in vary),
                variant.encode("latin-1"),
                None if length is None else int(length),
                tuple(t.encode("latin-1") for t in tags),
                None if keep_for is None else float(keep_for),
                float(fresh_for),
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                UnicodeError) as exc:
            raise ValueError(f"corrupt cache metadata: {exc}") from exc

    def approx_size(self) -> int:
        """A rough count of the bytes this metadata occupies in memory."""
        size = _META_OVERHEAD + len(self.variant)
        for name, value in self.headers:
            size += len(name) + len(value) + _FIELD_OVERHEAD
        if self.vary:
            size += sum(len(name) + 8 for name in self.vary)
        for tag in self.tags:
            size += len(tag) + 8
        return size


class CacheEntry:
    """A stored response: :attr:`meta` and a body of chunks, readable while written.

    The writer side (:meth:`append`, :meth:`finish`, :meth:`abort`, :meth:`release`) is
    for storage backends; callers write through a :class:`CacheWriter`. Not thread-safe:
    an entry belongs to one event loop.
    """

    __slots__ = ("key", "meta", "_chunks", "_size", "_state", "_changed", "_readers",
                 "_retain")

    def __init__(self, key: bytes, meta: CacheMeta) -> None:
        """An empty entry being written."""
        #: The cache key the entry was stored under.
        self.key = key
        #: The response metadata (replaced after a 304, see
        #: :meth:`CacheStorage.update_meta`).
        self.meta = meta
        self._chunks: list[bytes] = []
        self._size = 0
        self._state = _WRITING
        self._changed: asyncio.Event | None = None
        self._readers = 0
        self._retain = True

    @property
    def complete(self) -> bool:
        """Whether the writer finished: the body is all there."""
        return self._state == _COMPLETE

    @property
    def aborted(self) -> bool:
        """Whether the writer aborted: the body will never be complete."""
        return self._state == _ABORTED

    @property
    def size(self) -> int:
        """The body bytes written so far."""
        return self._size

    @property
    def readers(self) -> int:
        """How many :meth:`body` iterations are in progress."""
        return self._readers

    def append(self, chunk: bytes) -> None:
        """Add a body chunk (backends only); readers waiting for more wake up."""
        if self._state != _WRITING:
            raise RuntimeError("cache entry is no longer being written")
        if not chunk:
            return
        self._size += len(chunk)
        if self._retain:
            self._chunks.append(bytes(chunk))
        self._wake()

    def finish(self) -> None:
        """Mark the body complete (backends only)."""
        if self._state == _ABORTED:
            raise RuntimeError("cache entry was aborted")
        self._state = _COMPLETE
        self._wake()

    def abort(self) -> None:
        """Mark the body broken (backends only): readers raise :class:`CacheWriteAborted`.
        A no-op on a complete entry."""
        if self._state == _COMPLETE:
            return
        self._state = _ABORTED
        self._chunks = []
        self._wake()

    def release(self) -> None:
        """The backend no longer indexes this entry (backends only). An entry still
        being written with no reader attached stops keeping its chunks (nobody could
        read them from the start any more); later :meth:`body` calls raise
        :class:`CacheWriteAborted`. Attached readers keep receiving every chunk."""
        if self._state == _WRITING and self._readers == 0:
            self._retain = False
            self._chunks = []

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks from the start, waiting for more until the writer finishes.

        Raises :class:`CacheWriteAborted` if the writer aborts (or aborted), or if the
        entry was dropped mid-write before this reader attached.
        """
        if not self._retain:
            raise CacheWriteAborted("cache entry was dropped while being written")
        self._readers += 1
        try:
            index = 0
            while True:
                if self._state == _ABORTED:
                    raise CacheWriteAborted("cache entry writer aborted")
                if index < len(self._chunks):
                    chunk = self._chunks[index]
                    index += 1
                    yield chunk
                    continue
                if self._state == _COMPLETE:
                    return
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
        finally:
            self._readers -= 1

    async def read(self) -> bytes:
        """The whole body (waiting for the writer to finish)."""
        return b"".join([chunk async for chunk in self.body()])

    def open_source(self) -> BodySource | None:
        """A synchronous reader of the complete body (``read(size)`` and ``close()``, as
        :meth:`ferryman.proxy.session.Session.send_body_from` takes), or None when the
        body is not complete (or not readable without waiting): use :meth:`body`."""
        if self._state != _COMPLETE or not self._retain:
            return None
        return ChunkSource(self._chunks)

    def _wake(self) -> None:
        event = self._changed
        if event is not None:
            self._changed = None
            event.set()


class BodySource(Protocol):
    """A synchronous body reader: what :meth:`CacheEntry.open_source` returns."""

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes; ``b""`` at the end."""

    def close(self) -> None:
        """Release what the reader holds."""


class ChunkSource:
    """Reads a list of in-memory chunks as one stream (for :meth:`CacheEntry.open_source`)."""

    __slots__ = ("_chunks", "_index", "_offset")

    def __init__(self, chunks: list[bytes]) -> None:
        """A reader over ``chunks`` (not copied: they must not change)."""
        self._chunks = chunks
        self._index = 0
        self._offset = 0

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes (at most one chunk's worth per call); ``b""`` at the end."""
        chunks = self._chunks
        index = self._index
        if index >= len(chunks) or size <= 0:
            return b""
        chunk = chunks[index]
        offset = self._offset
        if offset == 0 and len(chunk) <= size:
            self._index = index + 1
            return chunk
        piece = chunk[offset : offset + size]
        offset += len(piece)
        if offset >= len(chunk):
            self._index = index + 1
            offset = 0
        self._offset = offset
        return piece

    def skip(self, count: int) -> int:
        """Move ``count`` bytes on without copying them; how many were skipped."""
        chunks = self._chunks
        done = 0
        while done < count and self._index < len(chunks):
            rest = len(chunks[self._index]) - self._offset
            step = min(rest, count - done)
            done += step
            self._offset += step
            if self._offset >= len(chunks[self._index]):
                self._index += 1
                self._offset = 0
        return done

    def close(self) -> None:
        """Forget the chunks."""
        self._chunks = []
        self._index = 0


class CacheWriter(abc.ABC):
    """Writes one entry's body; from :meth:`CacheStorage.begin`.

    :meth:`write` and :meth:`finish` always succeed even if the backend decided not to
    keep the entry (too large, not admitted, evicted, purged, an I/O error): readers
    already attached still receive the bytes, but :meth:`CacheStorage.lookup` no longer
    finds it. The methods are plain functions that never block for long (see the module
    docstring); a backend that must wait for I/O buffers and completes in the background.
    """

    @property
    @abc.abstractmethod
    def entry(self) -> CacheEntry:
        """The entry being written."""

    @property
    @abc.abstractmethod
    def stored(self) -> bool:
        """Whether the backend still keeps the entry (lookup can find it)."""

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append a body chunk. Raises RuntimeError after :meth:`finish` or
        :meth:`abort`."""

    @abc.abstractmethod
    def finish(self) -> None:
        """The body is complete. Idempotent; RuntimeError after :meth:`abort`."""

    @abc.abstractmethod
    def abort(self) -> None:
        """The body will not be completed: readers raise :class:`CacheWriteAborted` and
        the entry is removed. A no-op after :meth:`finish` or a previous abort."""


class CacheStorage(abc.ABC):
    """A cache backend: keys to entries, bounded in size, async for I/O backends.

    A backend's lookups never raise for an I/O failure (a broken file, Redis down): they
    count it and answer None, so a failing storage degrades to misses.
    """

    #: Whether several processes use the same entries (a disk directory, Redis), so
    #: fetches are coordinated with :meth:`fill_lock` as well as in-process.
    shared: bool = False

    @abc.abstractmethod
    async def lookup(self, key: bytes) -> CacheEntry | None:
        """The entry stored under ``key``, complete or still being written; None if
        there is none. Counts as an access for the eviction policy."""

    @abc.abstractmethod
    async def begin(self, key: bytes, meta: CacheMeta) -> CacheWriter:
        """Start storing a response under ``key``, replacing any entry there (readers
        of the old one keep it). The entry is visible to :meth:`lookup` at once."""

    @abc.abstractmethod
    async def purge(self, key: bytes) -> bool:
        """Remove the entry under ``key``; whether there was one."""

    @abc.abstractmethod
    async def purge_prefix(self, prefix: bytes) -> int:
        """Remove every entry whose key starts with ``prefix``; how many."""

    @abc.abstractmethod
    async def purge_tag(self, tag: bytes) -> int:
        """Remove every entry whose :attr:`CacheMeta.tags` include ``tag``; how many."""

    @abc.abstractmethod
    async def update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        """Replace the metadata of the entry under ``key`` (after a 304, RFC 9111
        §4.3.4); whether there was one."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters (at least ``hits``, ``misses``, ``entries``, ``size``)."""

    def lookup_nowait(self, key: bytes) -> CacheEntry | None:
        """The entry under ``key`` if this storage can tell without waiting (its index
        is in process memory), else None; a None is not counted as a miss. The proxy's
        sync mode serves fresh hits through it without a task. Default: None."""
        return None

    async def fill_lock(self, key: bytes, ttl: float) -> bool:
        """Ask for the right to fetch and store ``key`` across processes.

        True: this process fetches it, and calls :meth:`fill_unlock` when done (the
        right lapses by itself after ``ttl`` seconds, or when the process dies). False:
        another process is fetching it; look it up again a little later. Storages of one
        process (``shared = False``) always answer True: the in-process
        :class:`~ferryman.cache.lock.CacheLock` is enough.
        """
        return True

    async def fill_unlock(self, key: bytes) -> None:
        """Give back the right :meth:`fill_lock` granted. Default: nothing."""
        return None

    async def close(self) -> None:
        """Release connections and files (the worker stops). Default: nothing."""
        return None
