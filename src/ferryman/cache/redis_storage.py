"""A :class:`~ferryman.cache.storage.CacheStorage` in Redis, shared by a fleet of servers.

Every ferryman server (and every worker process of each) pointing :class:`RedisStorage` at
the same Redis sees the same entries, so the fleet behaves as one cache. Redis is an
accelerator, never a dependency: any error or timeout counts in :meth:`RedisStorage.stats`
and degrades to a miss (lookups), a dropped write, or a purge that removed nothing; after a
connection error a circuit breaker skips Redis for ``breaker`` seconds (fast misses instead
of a timeout per request), then one request probes it again.

Key layout (``P`` is ``key_prefix``, ``b"ferryman:"`` by default)::

    P m:<cache key>          the entry: a 32-byte header, CacheMeta.encode(), inline body
    P c:<gen hex>:<n>        body chunk n (0-based) of generation <gen>, chunk_size bytes
                             each (the last one shorter)
    P t:<tag>                a set of the cache keys tagged <tag> (for purge_tag)
    P l:<cache key>          a fill lock (fill_lock / fill_unlock), with a random token

The header (``_HEAD``) holds a magic, the layout version, a random 8-byte generation id
chosen by each write, the chunk size, the chunk count, the body length and the metadata's
length. A body of at most ``chunk_size`` bytes is stored inline after the metadata (count
0): a lookup is then one GET, one round trip. A larger body lives in chunks whose keys
carry the generation, so a write that replaces an entry never mixes its chunks with the old
ones; its commit swaps the entry key atomically (``SET ... GET``) and gives the old chunks a
short grace TTL (``replaced_grace``) so readers still streaming them finish. A lookup of a
chunked entry checks with EXISTS (no body bytes move) that every chunk is there: Redis may
evict keys under memory pressure, and a broken entry is deleted and reported as a miss;
a chunk evicted while a reader streams raises
:class:`~ferryman.cache.storage.CacheWriteAborted` in that reader.

Every key has a TTL: ``meta.keep_for`` (``default_keep`` when None) plus ``ttl_margin``
for the entry and tag keys, chunks another ``ttl_margin`` (they never expire before the
entry key that names them); chunks written before the commit are re-armed by it.

Writing is synchronous for the caller (see :mod:`ferryman.cache.storage`): the writer
buffers, cuts ``chunk_size`` pieces, and one background task per writer SETs them in
order (pipelined); :meth:`~ferryman.cache.storage.CacheWriter.finish` schedules the last
chunk and the entry key last, in one MULTI/EXEC, so no process ever sees an entry key
whose body is incomplete. Meanwhile the entry is an ordinary in-memory
:class:`~ferryman.cache.storage.CacheEntry` that lookups in the same process return, so
local clients stream it while it is written; other processes see it once committed. The
map of such local entries is bounded (``max_pending`` entries, ``max_pending_bytes``
bytes): beyond that the oldest stop being visible locally (their Redis write goes on).

Requires Redis 6.2 or newer (``SET ... GET``, ``GETDEL``) and redis-py 5 or newer; the
hiredis parser is used when installed. The client (and its connection pool) is created
lazily for the running event loop and process: a storage built before the workers fork
gets one pool per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from ferryman.cache.storage import (
    BodySource,
    CacheEntry,
    CacheMeta,
    CacheStorage,
    CacheWriteAborted,
    CacheWriter,
)

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ferryman.cache.redis_storage needs redis-py: pip install 'redis[hiredis]>=5'"
    ) from exc

__all__ = ["RedisStorage"]

_log = logging.getLogger("ferryman.cache")

#: magic, layout version, generation, chunk size, chunk count, body length, meta length.
_HEAD = struct.Struct(">3sB8sIIQI")
_MAGIC = b"FMC"
_LAYOUT = 1
#: Where the generation sits in an entry value (GETRANGE offsets, inclusive).
_GEN_START = 4
_GEN_END = 11

#: Errors that mean Redis is unreachable or too slow: they open the circuit breaker.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
#: Body bytes a reader fetches per round trip (the next batch is fetched while the
#: current one is consumed).
_READ_BATCH = 1 << 20
#: Keys per purge round trip.
_PURGE_BATCH = 500
#: Non-connection errors (a full Redis, a script error) are logged at most this often.
_WARN_EVERY = 60.0

#: Delete KEYS[2..] and the entry key KEYS[1] if it still holds generation ARGV[1].
_DELETE_IF_GEN = """
if redis.call('GETRANGE', KEYS[1], 4, 11) ~= ARGV[1] then return 0 end
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
#: Delete KEYS[1] if it holds ARGV[1] (a fill lock's token).
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Add ARGV[1] to the set KEYS[1] and make its TTL at least ARGV[2] ms.
_TAG_ADD = """
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 or ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
#: Make the TTL of each existing key in KEYS at most ARGV[1] ms.
_SHORTEN_TTL = """
for i = 1, #KEYS do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -1 or ttl > tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"""

_GLOB_SPECIAL = frozenset(b"\\*?[]")

#: Every storage, so that a forked child forgets its parent's clients (see _redis).
_INSTANCES: weakref.WeakSet[RedisStorage] = weakref.WeakSet()
#: In a forked child, what it inherited from the parent's storages, kept unreachable but
#: alive: closing (or collecting) a connection of the parent's event loop would remove its
#: socket from that loop's epoll set, which the child shares with the parent.
_INHERITED: list[object] = []


def _forget_after_fork() -> None:
    """In a forked child: set aside the parent's clients, writers, tasks and lock tokens;
    each storage makes a client of its own on first use."""
    for storage in list(_INSTANCES):
        _INHERITED.append((storage._client, storage._pending, storage._tasks))
        storage._client = None
        storage._client_loop = None
        storage._pending = {}
        storage._pending_bytes = 0
        storage._tasks = set()
        storage._lock_tokens = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _glob_escape(data: bytes) -> bytes:
    """``data`` as a Redis glob pattern that matches exactly it."""
    out = bytearray()
    for byte in data:
        if byte in _GLOB_SPECIAL:
            out.append(0x5C)
        out.append(byte)
    return bytes(out)


class _Stored(NamedTuple):
    """An entry value, decoded."""

    gen: bytes
    chunk_size: int
    chunks: int
    length: int
    meta: CacheMeta
    body: bytes


def _pack(gen: bytes, chunk_size: int, count: int, length: int, meta: bytes,
          body: bytes) -> bytes:
    return b"".join(
        (_HEAD.pack(_MAGIC, _LAYOUT, gen, chunk_size, count, length, len(meta)), meta, body)
    )


def _unpack_head(value: bytes) -> tuple[bytes, int, int, int, int]:
    """(gen, chunk size, count, length, meta length); ValueError if not an entry."""
    if len(value) < _HEAD.size:
        raise ValueError("cache entry value too short")
    magic, layout, gen, chunk_size, count, length, meta_len = _HEAD.unpack_from(value)
    if magic != _MAGIC or layout != _LAYOUT:
        raise ValueError("unknown cache entry layout")
    if len(value) < _HEAD.size + meta_len:
        raise ValueError("cache entry value truncated")
    return gen, chunk_size, count, length, meta_len


def _unpack(value: bytes) -> _Stored:
    """The entry ``value`` holds; ValueError if it is not one."""
    gen, chunk_size, count, length, meta_len = _unpack_head(value)
    end = _HEAD.size + meta_len
    meta = CacheMeta.decode(value[_HEAD.size:end])
    body = value[end:]
    if count == 0 and len(body) != length:
        raise ValueError("inline cache body has the wrong length")
    return _Stored(gen, chunk_size, count, length, meta, body)


class _RedisEntry(CacheEntry):
    """A complete entry whose body is in Redis chunks, fetched as it is read."""

    __slots__ = ("_storage", "_chunk_keys")

    def __init__(self, storage: RedisStorage, key: bytes, meta: CacheMeta,
                 chunk_keys: list[bytes], length: int) -> None:
        super().__init__(key, meta)
        self._storage = storage
        self._chunk_keys = chunk_keys
        self._size = length
        self.finish()

    def append(self, chunk: bytes) -> None:
        """Not writable: the entry was read from Redis."""
        raise RuntimeError("cache entry is no longer being written")

    def open_source(self) -> BodySource | None:
        """None: the body is not in memory (iterate :meth:`body`)."""
        return None

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks, fetched in pipelined batches (the next batch while this one
        is consumed). Raises :class:`CacheWriteAborted` if a chunk is gone (evicted,
        purged) or Redis fails."""
        storage = self._storage
        keys = self._chunk_keys
        step = storage._read_batch
        self._readers += 1
        ahead: asyncio.Task[list[bytes] | None] | None = None
        try:
            chunks = await storage._get_chunks(keys[:step])
            start = step
            while True:
                if chunks is None:
                    raise CacheWriteAborted("cache entry body is no longer in Redis")
                if start < len(keys):
                    ahead = asyncio.get_running_loop().create_task(
                        storage._get_chunks(keys[start : start + step])
                    )
                    start += step
                for chunk in chunks:
                    yield chunk
                if ahead is None:
                    return
                chunks = await ahead
                ahead = None
        finally:
            self._readers -= 1
            if ahead is not None:
                ahead.cancel()


class _RedisWriter(CacheWriter):
    """Writes one entry: buffers, flushes chunks in a background task, commits last."""

    def __init__(self, storage: RedisStorage, key: bytes, meta: CacheMeta,
                 store: bool) -> None:
        self._storage = storage
        self._key = key
        self._entry = CacheEntry(key, meta)
        self._loop = asyncio.get_running_loop()
        self._gen = os.urandom(8)
        self._chunk_base = storage._cprefix + self._gen.hex().encode() + b":"
        #: Still meant to be stored (False once dropped, detached, aborted or failed).
        self._storing = store
        #: finish() or abort() was called.
        self._done = False
        self._finished = False
        self._committed = False
        self._length = 0
        self._buf = bytearray()
        #: Chunks cut but not yet sent, and how many were sent before them.
        self._queue: list[bytes] = []
        self._sent = 0
        #: Chunk keys that may exist in Redis (sent, or being sent).
        self._allocated = 0
        self._task: asyncio.Task[None] | None = None
        #: Bytes charged to the storage's local pending budget (-1: not listed).
        self._charged = -1

    @property
    def entry(self) -> CacheEntry:
        """The in-memory entry being written (local readers stream it)."""
        return self._entry

    @property
    def stored(self) -> bool:
        """Whether the entry is (or, once the background writes land, will be) in
        Redis: False once dropped (too large), replaced, purged, aborted or failed."""
        return self._storing

    def chunk_key(self, index: int) -> bytes:
        """The Redis key of body chunk ``index`` of this write."""
        return self._chunk_base + b"%d" % index

    def write(self, chunk: bytes) -> None:
        """Append a body chunk: local readers get it now, Redis in the background."""
        if self._done:
            raise RuntimeError("cache writer is closed")
        self._entry.append(chunk)
        size = len(chunk)
        if not size:
            return
        storage = self._storage
        if self._charged >= 0:
            storage._charge(self, size)
        if not self._storing:
            return
        self._length += size
        if self._length > storage._max_entry:
            storage._counters["dropped"] += 1
            self._stop()
            return
        buf = self._buf
        buf += chunk
        chunk_size = storage._chunk_size
        if len(buf) > chunk_size:  # cut whole chunks, keep 1..chunk_size bytes back
            data = bytes(buf)
            count = (len(data) - 1) // chunk_size
            queue = self._queue
            for i in range(count):
                queue.append(data[i * chunk_size : (i + 1) * chunk_size])
            self._buf = bytearray(data[count * chunk_size :])
            self._kick()

    def finish(self) -> None:
        """The body is complete: the last chunk and the entry key are written in the
        background (the entry key last)."""
        if self._entry.aborted:
            raise RuntimeError("cache writer was aborted")
        if self._done:
            return
        self._done = True
        self._entry.finish()
        if self._storing:
            self._finished = True
            self._kick()

    def abort(self) -> None:
        """Readers raise :class:`CacheWriteAborted`; chunks already sent are deleted."""
        if self._done:
            return
        self._done = True
        self._entry.abort()
        self._storage._counters["aborted"] += 1
        self._stop()

    async def wait(self) -> bool:
        """Wait for the background writes in progress; whether the entry is stored."""
        while self._task is not None:
            await asyncio.wait([self._task])
        return self._storing

    # -- internals ---------------------------------------------------------------------

    def _stop(self) -> None:
        """Stop storing (local readers carry on); sent chunks are deleted."""
        self._storage._unlist(self)
        if not self._storing:
            return
        self._storing = False
        self._buf = bytearray()
        self._queue = []
        if self._allocated and not self._committed:
            self._kick()

    def _kick(self) -> None:
        if self._task is None:
            if self._loop.is_closed():  # (written to after its event loop ended)
                self._storing = False
                self._storage._unlist(self)
                return
            task = self._loop.create_task(self._run())
            self._task = task
            tasks = self._storage._tasks
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _run(self) -> None:
        storage = self._storage
        try:
            while True:
                if not self._storing:
                    if self._allocated and not self._committed:
                        keys = [self.chunk_key(i) for i in range(self._allocated)]
                        self._allocated = 0
                        await storage._delete_quietly(keys)
                    return
                if self._finished:
                    await storage._commit(self)
                    return
                if not self._queue:
                    return
                chunks = self._queue
                self._queue = []
                first = self._sent
                self._allocated = first + len(chunks)
                if await storage._set_chunks(self, first, chunks):
                    self._sent = first + len(chunks)
                elif self._storing:
                    storage._counters["dropped"] += 1
                    self._stop()
        except Exception as exc:  # never "Task exception was never retrieved"
            storage._failed(exc, "write")
            self._storing = False
            storage._unlist(self)
        finally:
            self._task = None
            if self._done or not self._storing:
                storage._unlist(self)


class RedisStorage(CacheStorage):
    """Cache entries in Redis (``url``, e.g. ``redis://127.0.0.1:6379/0``), shared by
    every process and server that uses the same Redis and ``key_prefix``.

    Bodies larger than ``max_entry`` bytes are not stored; bodies are stored in
    ``chunk_size`` pieces (inline in the entry key when they fit in one). ``timeout``
    bounds each connect and each reply; ``default_keep`` is the TTL of entries whose
    :attr:`~ferryman.cache.storage.CacheMeta.keep_for` is None. After a connection error
    or timeout, Redis is skipped for ``breaker`` seconds. See the module docstring for the
    key layout and the remaining knobs.
    """

    shared = True

    def __init__(
        self,
        url: str,
        max_entry: int = 16 << 20,
        chunk_size: int = 512 << 10,
        key_prefix: bytes = b"ferryman:",
        timeout: float = 0.5,
        default_keep: float = 3600.0,
        *,
        breaker: float = 1.0,
        ttl_margin: float = 5.0,
        replaced_grace: float = 120.0,
        max_pending: int = 256,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        """A storage on the Redis at ``url``; nothing connects until first use."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if max_entry < 0:
            raise ValueError("max_entry must not be negative")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._url = url
        self._max_entry = max_entry
        self._chunk_size = chunk_size
        self._prefix = key_prefix
        self._mprefix = key_prefix + b"m:"
        self._cprefix = key_prefix + b"c:"
        self._tprefix = key_prefix + b"t:"
        self._lprefix = key_prefix + b"l:"
        self._timeout = timeout
        self._default_keep = default_keep
        self._breaker = breaker
        self._margin = ttl_margin
        self._grace_ms = max(1, int(replaced_grace * 1000))
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._read_batch = max(1, _READ_BATCH // chunk_size)
        self._client: Redis | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        #: Writers whose entries lookups in this process return, oldest first.
        self._pending: dict[bytes, _RedisWriter] = {}
        self._pending_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock_tokens: dict[bytes, bytes] = {}
        #: monotonic() before which Redis is skipped (0: the breaker is closed).
        self._down_until = 0.0
        self._outage = False
        self._warned_at = -_WARN_EVERY
        self._counters = dict.fromkeys(
            ("hits", "hits_in_progress", "misses", "inserts", "stored", "dropped",
             "aborted", "purged", "errors", "skipped", "broken"),
            0,
        )
        _INSTANCES.add(self)

    @property
    def max_entry(self) -> int:
        """The largest body stored, in bytes."""
        return self._max_entry

    @property
    def chunk_size(self) -> int:
        """The size of a body chunk (bodies up to this size are stored inline)."""
        return self._chunk_size

    def meta_key(self, key: bytes) -> bytes:
        """The Redis key of the entry stored under cache key ``key``."""
        return self._mprefix + key

    def tag_key(self, tag: bytes) -> bytes:
        """The Redis key of the set of cache keys tagged ``tag``."""
        return self._tprefix + tag

    def lock_key(self, key: bytes) -> bytes:
        """The Redis key of the fill lock of cache key ``key``."""
        return self._lprefix + key

    # -- the client, the breaker ---------------------------------------------------------

    def _redis(self) -> Redis:
        """The client of the running loop in this process (made on first use)."""
        loop = asyncio.get_running_loop()
        client = self._client
        if client is None or self._client_loop is not loop:
            # (a client of another loop is dropped, not closed: its connections belong to
            # that loop; close() the storage before its loop ends. A forked child forgets
            # its parent's client: _forget_after_fork)
            client = Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # one immediate retry, on a connection error only: a pooled connection
                # that died (Redis restarted) is replaced without failing the request
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
                decode_responses=False,
            )
            self._client = client
            self._client_loop = loop
        return client

    def _available(self) -> bool:
        """Whether to use Redis now: False while the breaker is open. When it is due to
        close, the caller probes Redis and the others keep skipping until that probe
        ends (a failure reopens the breaker, a success closes it)."""
        until = self._down_until
        if until:
            now = time.monotonic()
            if now < until:
                self._counters["skipped"] += 1
                return False
            self._down_until = now + 3 * self._timeout + 0.1
        return True

    def _is_down(self) -> bool:
        return bool(self._down_until) and time.monotonic() < self._down_until

    def _succeeded(self) -> None:
        if self._down_until or self._outage:
            self._down_until = 0.0
            if self._outage:
                self._outage = False
                _log.info("cache: Redis at %s is reachable again", self._url)

    def _failed(self, exc: Exception, what: str) -> None:
        """Count a Redis failure; a connection error or timeout opens the breaker. Logs
        once per outage (other errors at most once a minute)."""
        self._counters["errors"] += 1
        now = time.monotonic()
        if isinstance(exc, _TRANSIENT):
            self._down_until = now + self._breaker
            if not self._outage:
                self._outage = True
                _log.warning(
                    "cache: Redis at %s failed (%s: %s: %s); serving misses, retrying every "
                    "%.1fs", self._url, what, type(exc).__name__, exc, self._breaker,
                )
        elif now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            _log.warning("cache: Redis at %s: %s failed: %s: %s", self._url, what,
                         type(exc).__name__, exc)

    def _ttls(self, meta: CacheMeta) -> tuple[int, int]:
        """(entry and tag TTL, chunk TTL) in milliseconds."""
        keep = self._default_keep if meta.keep_for is None else meta.keep_for
        entry = max(1, int((max(keep, 0.0) + self._margin) * 1000))
        return entry, entry + int(self._margin * 1000)

    # -- the local map of entries being written ------------------------------------------

    def _list(self, writer: _RedisWriter) -> None:
        self._pending[writer._key] = writer
        writer._charged = 0
        while len(self._pending) > self._max_pending:
            self._unlist(next(iter(self._pending.values())))

    def _charge(self, writer: _RedisWriter, size: int) -> None:
        writer._charged += size
        self._pending_bytes += size
        while self._pending_bytes > self._max_pending_bytes and self._pending:
            self._unlist(next(iter(self._pending.values())))

    def _unlist(self, writer: _RedisWriter) -> None:
        """Lookups in this process no longer return ``writer``'s entry."""
        if writer._charged < 0:
            return
        self._pending_bytes -= writer._charged
        writer._charged = -1
        if self._pending.get(writer._key) is writer:
            del self._pending[writer._key]
        writer._entry.release()

    def _detach_local(self, keys: list[bytes]) -> None:
        for key in keys:
            writer = self._pending.get(key)
            if writer is not None:
                writer._stop()

    # -- Redis operations used by entries and writers ------------------------------------

    async def _get_chunks(self, keys: list[bytes]) -> list[bytes] | None:
        """The chunks under ``keys``; None if one is missing or Redis fails (counted)."""
        if not self._available():
            return None
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.execute_command("GET", key)
                values: list[bytes | None] = await pipe.execute()
        except Exception as exc:
            self._failed(exc, "read")
            return None
        self._succeeded()
        if any(value is None for value in values):
            self._counters["broken"] += 1
            return None
        return values  # type: ignore[return-value]

    async def _set_chunks(self, writer: _RedisWriter, first: int,
                          chunks: list[bytes]) -> bool:
        if not self._available():
            return False
        _, chunk_ttl = self._ttls(writer._entry.meta)
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                for i, chunk in enumerate(chunks, first):
                    pipe.execute_command("SET", writer.chunk_key(i), chunk, "PX", chunk_ttl)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc, "write")
            return False
        self._succeeded()
        return True

    async def _commit(self, writer: _RedisWriter) -> None:
        """Send the last chunks and then the entry key (one MULTI/EXEC)."""
        if not self._available():
            self._counters["dropped"] += 1
            writer._stop()
            return
        key = writer._key
        meta = writer._entry.meta
        tail = writer._queue
        rest = bytes(writer._buf)
        writer._queue = []
        writer._buf = bytearray()
        sent = writer._sent
        if sent == 0 and not tail:
            count, inline = 0, rest
        else:
            if rest:
                tail.append(rest)
            count, inline = sent + len(tail), b""
        writer._allocated = count
        value = _pack(writer._gen, self._chunk_size, count, writer._length, meta.encode(),
                      inline)
        entry_ttl, chunk_ttl = self._ttls(meta)
        mkey = self._mprefix + key
        try:
            async with self._redis().pipeline(transaction=True) as pipe:
                for i in range(sent):  # re-arm: they were sent with an earlier TTL
                    pipe.execute_command("PEXPIRE", writer.chunk_key(i), chunk_ttl)
                for i, chunk in enumerate(tail, sent):
                    pipe.execute_command("SET", writer.chunk_key(i), chunk, "PX", chunk_ttl)
                pipe.execute_command("SET", mkey, value, "PX", entry_ttl, "GET", get=True)
                for tag in meta.tags:
                    pipe.execute_command("EVAL", _TAG_ADD, 1, self._tprefix + tag, key,
                                         entry_ttl)
                results: list[Any] = await pipe.execute()
        except Exception as exc:
            self._failed(exc, "write")
            writer._storing = False
            self._unlist(writer)
            await self._delete_quietly([writer.chunk_key(i) for i in range(count)])
            return
        self._succeeded()
        writer._committed = True
        if not all(results[:sent]):  # a chunk sent earlier was evicted meanwhile
            self._counters["broken"] += 1
            writer._storing = False
            await self._delete_if_gen(mkey, writer._gen, count, writer._chunk_base)
            return
        if not writer._storing:  # purged or replaced while committing
            await self._delete_if_gen(mkey, writer._gen, count, writer._chunk_base)
            return
        self._counters["stored"] += 1
        old = results[sent + len(tail)]
        if old:
            try:
                gen, _, old_count, _, _ = _unpack_head(old)
            except ValueError:
                return
            if old_count and gen != writer._gen:  # old readers get a grace period
                base = self._cprefix + gen.hex().encode() + b":"
                keys = [base + b"%d" % i for i in range(old_count)]
                try:
                    await self._redis().execute_command(
                        "EVAL", _SHORTEN_TTL, len(keys), *keys, self._grace_ms
                    )
                except Exception as exc:
                    self._failed(exc, "write")

    async def _delete_quietly(self, keys: list[bytes]) -> None:
        if not keys or self._is_down():
            return
        try:
            await self._redis().execute_command("DEL", *keys)
        except Exception as exc:
            self._failed(exc, "delete")

    async def _delete_if_gen(self, mkey: bytes, gen: bytes, count: int,
                             chunk_base: bytes) -> int:
        """Delete the entry key ``mkey`` and its chunks if it still holds ``gen``."""
        keys = [mkey] + [chunk_base + b"%d" % i for i in range(count)]
        try:
            done = await self._redis().execute_command(
                "EVAL", _DELETE_IF_GEN, len(keys), *keys, gen
            )
        except Exception as exc:
            self._failed(exc, "delete")
            return 0
        return int(done)

    def _chunk_keys(self, gen: bytes, count: int) -> list[bytes]:
        base = self._cprefix + gen.hex().encode() + b":"
        return [base + b"%d" % i for i in range(count)]

    async def _delete_entries(self, keys: list[bytes]) -> list[bytes]:
        """Delete the entries under ``keys`` and their chunks; the keys that had one."""
        client = self._redis()
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command("GETDEL", self._mprefix + key)
            values: list[bytes | None] = await pipe.execute()
        deleted: list[bytes] = []
        chunk_keys: list[bytes] = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            deleted.append(key)
            try:
                gen, _, count, _, _ = _unpack_head(value)
            except ValueError:
                continue
            chunk_keys.extend(self._chunk_keys(gen, count))
        for i in range(0, len(chunk_keys), _PURGE_BATCH):
            await client.execute_command("DEL", *chunk_keys[i : i + _PURGE_BATCH])
        return deleted

    # -- the CacheStorage interface ------------------------------------------------------

    async def lookup(self, key: bytes) -> CacheEntry | None:
        """The entry under ``key``: one being written in this process, else the one in
        Redis (one round trip when its body is inline, one more to check that a chunked
        body's chunks are all there); None on a miss, and when Redis fails."""
        counters = self._counters
        writer = self._pending.get(key)
        if writer is not None:
            counters["hits"] += 1
            counters["hits_in_progress"] += 1
            return writer._entry
        if not self._available():
            counters["misses"] += 1
            return None
        try:
            entry = await self._fetch(key)
        except Exception as exc:
            self._failed(exc, "lookup")
            counters["misses"] += 1
            return None
        self._succeeded()
        if entry is None:
            counters["misses"] += 1
        else:
            counters["hits"] += 1
        return entry

    async def _fetch(self, key: bytes) -> CacheEntry | None:
        client = self._redis()
        mkey = self._mprefix + key
        value = await client.execute_command("GET", mkey)
        if value is None:
            return None
        try:
            stored = _unpack(value)
        except ValueError:
            self._counters["broken"] += 1
            await client.execute_command("DEL", mkey)
            return None
        if stored.chunks == 0:
            entry = CacheEntry(key, stored.meta)
            entry.append(stored.body)
            entry.finish()
            return entry
        keys = self._chunk_keys(stored.gen, stored.chunks)
        present = await client.execute_command("EXISTS", *keys)
        if present != stored.chunks:  # evicted by Redis: the entry is broken
            self._counters["broken"] += 1
            await self._delete_if_gen(mkey, stored.gen, stored.chunks,
                                      self._cprefix + stored.gen.hex().encode() + b":")
            return None
        return _RedisEntry(self, key, stored.meta, keys, stored.length)

    async def begin(self, key: bytes, meta: CacheMeta) -> CacheWriter:
        """Start storing under ``key``; lookups in this process see the entry at once,
        other processes once it is complete and written. An entry announced larger than
        ``max_entry``, or begun while Redis is unreachable, is not stored."""
        old = self._pending.get(key)
        if old is not None:
            old._stop()
        store = True
        if meta.length is not None and meta.length > self._max_entry:
            self._counters["dropped"] += 1
            store = False
        elif self._is_down():
            self._counters["skipped"] += 1
            store = False
        writer = _RedisWriter(self, key, meta, store)
        if store:
            self._counters["inserts"] += 1
            self._list(writer)
        return writer

    async def purge(self, key: bytes) -> bool:
        """Delete the entry under ``key`` and its chunks; whether there was one (False
        when Redis fails)."""
        local = key in self._pending
        self._detach_local([key])
        found = local
        if self._available():
            try:
                found = bool(await self._delete_entries([key])) or local
            except Exception as exc:
                self._failed(exc, "purge")
            else:
                self._succeeded()
        if found:
            self._counters["purged"] += 1
        return found

    async def purge_prefix(self, prefix: bytes) -> int:
        """Delete every entry whose key starts with ``prefix`` (a SCAN of the entry keys,
        so its cost grows with the whole key space); how many (0 when Redis fails)."""
        local = {key for key in self._pending if key.startswith(prefix)}
        self._detach_local(list(local))
        purged = set(local)
        if self._available():
            try:
                client = self._redis()
                pattern = _glob_escape(self._mprefix + prefix) + b"*"
                skip = len(self._mprefix)
                batch: list[bytes] = []
                async for mkey in client.scan_iter(match=pattern, count=1000):
                    batch.append(mkey[skip:])
                    if len(batch) >= _PURGE_BATCH:
                        purged.update(await self._delete_entries(batch))
                        batch = []
                if batch:
                    purged.update(await self._delete_entries(batch))
            except Exception as exc:
                self._failed(exc, "purge")
            else:
                self._succeeded()
        self._counters["purged"] += len(purged)
        return len(purged)

    async def purge_tag(self, tag: bytes) -> int:
        """Delete every entry tagged ``tag`` (the tag's set names candidates; each entry's
        metadata is checked, so a key since stored without the tag stays); how many (0
        when Redis fails)."""
        local = [k for k, w in self._pending.items() if tag in w._entry.meta.tags]
        self._detach_local(local)
        purged = set(local)
        if self._available():
            try:
                purged.update(await self._purge_tag(tag))
            except Exception as exc:
                self._failed(exc, "purge")
            else:
                self._succeeded()
        self._counters["purged"] += len(purged)
        return len(purged)

    async def _purge_tag(self, tag: bytes) -> list[bytes]:
        client = self._redis()
        tkey = self._tprefix + tag
        members = sorted(await client.execute_command("SMEMBERS", tkey))
        purged: list[bytes] = []
        for i in range(0, len(members), _PURGE_BATCH):
            batch: list[bytes] = members[i : i + _PURGE_BATCH]
            async with client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.execute_command("GET", self._mprefix + key)
                values: list[bytes | None] = await pipe.execute()
            targets: list[tuple[bytes, _Stored]] = []
            for key, value in zip(batch, values, strict=True):
                if value is None:
                    continue
                try:
                    stored = _unpack(value)
                except ValueError:
                    continue
                if tag in stored.meta.tags:
                    targets.append((key, stored))
            if targets:
                async with client.pipeline(transaction=False) as pipe:
                    for key, stored in targets:
                        keys = [self._mprefix + key, *self._chunk_keys(stored.gen,
                                                                       stored.chunks)]
                        pipe.execute_command("EVAL", _DELETE_IF_GEN, len(keys), *keys,
                                             stored.gen)
                    done: list[int] = await pipe.execute()
                purged.extend(key for (key, _), ok in zip(targets, done, strict=True) if ok)
            await client.execute_command("SREM", tkey, *batch)
        return purged

    async def update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        """Replace the metadata of the entry under ``key``, keeping its body, and restart
        the TTLs of its keys from ``meta.keep_for``; whether there was one (False when
        Redis fails, unless it is being written in this process)."""
        writer = self._pending.get(key)
        if writer is not None:
            writer._entry.meta = meta  # its commit writes this meta
        local = writer is not None
        if not self._available():
            return local
        try:
            found = await self._update_meta(key, meta)
        except WatchError:  # replaced meanwhile by a newer entry
            found = True
        except Exception as exc:
            self._failed(exc, "update")
            return local
        self._succeeded()
        return found or local

    async def _update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        mkey = self._mprefix + key
        entry_ttl, chunk_ttl = self._ttls(meta)
        async with self._redis().pipeline(transaction=True) as pipe:
            await pipe.watch(mkey)
            value: Any = await pipe.execute_command("GET", mkey)
            if value is None:
                return False
            try:
                stored = _unpack(value)
            except ValueError:
                return False
            new = _pack(stored.gen, stored.chunk_size, stored.chunks, stored.length,
                        meta.encode(), stored.body)
            pipe.multi()
            pipe.execute_command("SET", mkey, new, "PX", entry_ttl)
            for chunk_key in self._chunk_keys(stored.gen, stored.chunks):
                pipe.execute_command("PEXPIRE", chunk_key, chunk_ttl)
            for tag in meta.tags:
                pipe.execute_command("EVAL", _TAG_ADD, 1, self._tprefix + tag, key, entry_ttl)
            await pipe.execute()
        return True

    def stats(self) -> dict[str, int]:
        """Counters of this process: ``hits`` (``hits_in_progress`` of them on entries
        being written here), ``misses``, ``inserts`` (writes begun), ``stored`` (written to
        Redis), ``dropped`` (too large, or Redis failed mid-write), ``aborted``,
        ``purged``, ``errors`` (Redis errors and timeouts), ``skipped`` (operations the
        open breaker skipped), ``broken`` (entries whose chunks Redis had evicted); gauges
        ``pending`` and ``pending_size`` (entries being written here, and their bytes),
        ``breaker_open``. ``entries`` and ``size`` are 0: Redis holds them for the whole
        fleet, and counting them would cost a scan (use Redis's own INFO)."""
        out = dict(self._counters)
        out["entries"] = 0
        out["size"] = 0
        out["pending"] = len(self._pending)
        out["pending_size"] = self._pending_bytes
        out["breaker_open"] = int(self._is_down())
        return out

    async def fill_lock(self, key: bytes, ttl: float) -> bool:
        """``SET lock token NX PX ttl``: True if this process may fetch ``key`` (also when
        Redis fails: fetching is then the right call), False if another holds the lock."""
        if not self._available():
            return True
        token = os.urandom(16).hex().encode()
        try:
            ok = await self._redis().execute_command(
                "SET", self._lprefix + key, token, "NX", "PX", max(1, int(ttl * 1000))
            )
        except Exception as exc:
            self._failed(exc, "lock")
            return True
        self._succeeded()
        if ok:
            self._lock_tokens[key] = token
            return True
        return False

    async def fill_unlock(self, key: bytes) -> None:
        """Release the lock :meth:`fill_lock` took, only if it still holds this process's
        token (it may have lapsed and been taken by another)."""
        token = self._lock_tokens.pop(key, None)
        if token is None or not self._available():
            return
        try:
            await self._redis().execute_command(
                "EVAL", _DELETE_IF_EQUAL, 1, self._lprefix + key, token
            )
        except Exception as exc:
            self._failed(exc, "unlock")
            return
        self._succeeded()

    async def flush(self) -> None:
        """Wait until the background writes of this event loop are done."""
        loop = asyncio.get_running_loop()
        while True:
            tasks = [task for task in self._tasks if task.get_loop() is loop]
            if not tasks:
                return
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Let background writes finish (briefly), then close the connection pool."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop]
        if tasks:
            await asyncio.wait(tasks, timeout=max(1.0, 4 * self._timeout))
            for task in tasks:
                task.cancel()
        client, client_loop = self._client, self._client_loop
        self._client = None
        self._client_loop = None
        if client is not None and client_loop is loop:
            try:
                await client.aclose(close_connection_pool=True)
            except Exception:  # closing a broken connection
                pass
