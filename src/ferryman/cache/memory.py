"""An in-memory :class:`~ferryman.cache.storage.CacheStorage`: S3-FIFO with TinyLFU.

:class:`MemoryStorage` is bounded by total bytes (body plus a rough metadata size) and
sharded by key hash, each shard with its own budget (``max_size // shards``), queues and
frequency sketch. Eviction is S3-FIFO (Yang et al., "FIFO queues are all you need for
cache eviction", SOSP 2023): new entries enter a small FIFO (~10% of the bytes); those
read again while there move to the main FIFO, the others leave and their keys go to a
ghost FIFO; a key found in the ghost FIFO enters the main FIFO directly; the main FIFO
reinserts entries read since their last pass, decrementing their frequency (0 to 3).

Admission is TinyLFU (Einziger et al., "TinyLFU: a highly efficient cache admission
policy"): a count-min sketch (4 rows of counters saturating at 15, halved after about 10
increments per counter column) estimates how often each key was looked up; when room must
be made, a newcomer whose estimate is below the eviction victim's is not admitted.

Entries being written count their bytes as they grow and are not eviction candidates
(they join the small or main FIFO when finished); one that outgrows ``max_entry`` or
cannot make room is dropped from the index, while readers already attached keep
receiving its bytes. The storage belongs to one event loop (no locking).
"""

from __future__ import annotations

from collections import OrderedDict

from ferryman.cache.storage import CacheEntry, CacheMeta, CacheStorage, CacheWriter

__all__ = ["MemoryStorage"]

_MASK64 = (1 << 64) - 1
#: S3-FIFO's frequency saturates at 3 (two bits).
_MAX_FREQ = 3
#: Count-min sketch counters saturate here (four bits).
_MAX_COUNT = 15
_ROWS = 4
#: Halving every counter is a byte translation.
_HALVE = bytes(i >> 1 for i in range(256))
#: The sketch has about one column per this many bytes of budget (a guess at the mean
#: entry size), clamped to [_MIN_WIDTH, _MAX_WIDTH].
_BYTES_PER_COLUMN = 256
_MIN_WIDTH = 64
_MAX_WIDTH = 1 << 18
#: Keys the ghost FIFO keeps at least.
_MIN_GHOST = 32

_PENDING = 0
_SMALL = 1
_MAIN = 2


def _key_hash(key: bytes) -> int:
    return hash(key) & _MASK64


class _Sketch:
    """A count-min sketch with conservative update and periodic halving."""

    __slots__ = ("rows", "mask", "additions", "period")

    def __init__(self, width: int) -> None:
        self.rows = [bytearray(width) for _ in range(_ROWS)]
        self.mask = width - 1
        self.additions = 0
        self.period = 10 * width

    def _indexes(self, h: int) -> tuple[int, int, int, int]:
        # double hashing (Kirsch and Mitzenmacher) from the key's 64-bit hash: bits 8-31
        # and 32-63 (the lowest bits chose the shard)
        mask = self.mask
        h1 = h >> 8
        h2 = (h >> 32) | 1
        return h1 & mask, (h1 + h2) & mask, (h1 + 2 * h2) & mask, (h1 + 3 * h2) & mask

    def increment(self, key: bytes, h: int) -> None:
        j0, j1, j2, j3 = self._indexes(h)
        r0, r1, r2, r3 = self.rows
        c0, c1, c2, c3 = r0[j0], r1[j1], r2[j2], r3[j3]
        least = min(c0, c1, c2, c3)
        if least < _MAX_COUNT:  # conservative update: only the smallest counters grow
            more = least + 1
            if c0 == least:
                r0[j0] = more
            if c1 == least:
                r1[j1] = more
            if c2 == least:
                r2[j2] = more
            if c3 == least:
                r3[j3] = more
        self.additions += 1
        if self.additions >= self.period:
            self.rows = [row.translate(_HALVE) for row in self.rows]
            self.additions //= 2

    def estimate(self, key: bytes, h: int) -> int:
        j0, j1, j2, j3 = self._indexes(h)
        r0, r1, r2, r3 = self.rows
        return min(r0[j0], r1[j1], r2[j2], r3[j3])


class _Node:
    """An indexed entry: its charge in bytes, S3-FIFO frequency and queue."""

    __slots__ = ("key", "hash", "entry", "charge", "freq", "queue", "ghost_hit")

    def __init__(self, key: bytes, h: int, entry: CacheEntry) -> None:
        self.key = key
        self.hash = h
        self.entry = entry
        self.charge = 0
        self.freq = 0
        self.queue = _PENDING
        self.ghost_hit = False


class _Shard:
    """One shard: index, S3-FIFO queues, ghost keys, sketch and counters."""

    def __init__(self, budget: int, max_entry: int) -> None:
        self.budget = budget
        self.max_entry = max_entry
        self.small_target = max(1, budget // 10)
        self.index: dict[bytes, _Node] = {}
        # first item = tail (oldest), last item = head (newest)
        self.small: OrderedDict[bytes, _Node] = OrderedDict()
        self.main: OrderedDict[bytes, _Node] = OrderedDict()
        self.ghost: OrderedDict[bytes, None] = OrderedDict()
        self.small_bytes = 0
        self.main_bytes = 0
        self.used = 0
        width = _MIN_WIDTH
        while width < min(budget // _BYTES_PER_COLUMN, _MAX_WIDTH):
            width <<= 1
        self.sketch = _Sketch(width)
        self.counters = dict.fromkeys(
            ("hits", "hits_in_progress", "misses", "inserts", "stored", "rejected",
             "evicted", "dropped", "aborted", "purged"),
            0,
        )

    # -- lookups and admission ----------------------------------------------------------

    def lookup(self, key: bytes, h: int, count_miss: bool = True) -> CacheEntry | None:
        node = self.index.get(key)
        if node is None:
            if count_miss:
                self.sketch.increment(key, h)
                self.counters["misses"] += 1
            return None
        self.sketch.increment(key, h)
        self.counters["hits"] += 1
        if node.queue == _PENDING:
            self.counters["hits_in_progress"] += 1
        if node.freq < _MAX_FREQ:
            node.freq += 1
        return node.entry

    def _victim(self) -> _Node | None:
        """The next entry S3-FIFO evicts, moving entries along the way (promotions from
        the small to the main FIFO, reinsertions in the main FIFO); it stays in place."""
        while True:
            if self.small and (self.small_bytes >= self.small_target or not self.main):
                node = next(iter(self.small.values()))
                if node.freq == 0:
                    return node
                del self.small[node.key]
                self.small_bytes -= node.charge
                node.freq = 0
                node.queue = _MAIN
                self.main[node.key] = node
                self.main_bytes += node.charge
            elif self.main:
                node = next(iter(self.main.values()))
                if node.freq == 0:
                    return node
                node.freq -= 1
                self.main.move_to_end(node.key)
            else:
                return None

    def make_room(self, extra: int, newcomer: _Node | None) -> bool:
        """Evict until ``extra`` more bytes fit. With a ``newcomer``, each victim must not
        be more frequent than it (TinyLFU); False if it is, or if nothing is left."""
        while self.used + extra > self.budget:
            victim = self._victim()
            if victim is None:
                return False
            if newcomer is not None:
                wanted = self.sketch.estimate(newcomer.key, newcomer.hash)
                if wanted < self.sketch.estimate(victim.key, victim.hash):
                    self.counters["rejected"] += 1
                    return False
            self.unlink(victim, to_ghost=True)
            self.counters["evicted"] += 1
        return True

    # -- index changes -----------------------------------------------------------------

    def unlink(self, node: _Node, *, to_ghost: bool = False) -> None:
        """Remove ``node`` from the index and its queue, releasing its entry."""
        if self.index.get(node.key) is node:
            del self.index[node.key]
        if node.queue == _SMALL:
            del self.small[node.key]
            self.small_bytes -= node.charge
            if to_ghost:
                self.ghost[node.key] = None
                self.ghost.move_to_end(node.key)
                limit = max(_MIN_GHOST, len(self.index))
                while len(self.ghost) > limit:
                    self.ghost.popitem(last=False)
        elif node.queue == _MAIN:
            del self.main[node.key]
            self.main_bytes -= node.charge
        self.used -= node.charge
        node.charge = 0
        node.queue = _PENDING
        node.entry.release()

    def begin(self, key: bytes, h: int, meta: CacheMeta) -> _MemoryWriter:
        old = self.index.get(key)
        if old is not None:
            self.unlink(old)
        entry = CacheEntry(key, meta)
        node = _Node(key, h, entry)
        charge = meta.approx_size()
        if (meta.length is not None and meta.length > self.max_entry) or (
            charge > self.budget
        ):
            self.counters["dropped"] += 1
            return _MemoryWriter(self, None, entry)
        if not self.make_room(charge, node):
            return _MemoryWriter(self, None, entry)
        if key in self.ghost:
            del self.ghost[key]
            node.ghost_hit = True
        node.charge = charge
        self.used += charge
        self.index[key] = node
        self.counters["inserts"] += 1
        return _MemoryWriter(self, node, entry)

    def live(self, node: _Node) -> bool:
        return self.index.get(node.key) is node

    def grow(self, node: _Node, extra: int) -> bool:
        """Charge ``extra`` body bytes to a pending entry; False if it was dropped."""
        if not self.live(node):
            return False
        if node.entry.size > self.max_entry or node.charge + extra > self.budget:
            self.counters["dropped"] += 1
            self.unlink(node)
            return False
        if not self.make_room(extra, node):
            if self.live(node):
                self.counters["dropped"] += 1
                self.unlink(node)
            return False
        node.charge += extra
        self.used += extra
        return True

    def finished(self, node: _Node) -> None:
        """A pending entry is complete: it joins the small FIFO (main on a ghost hit)."""
        if not self.live(node):
            return
        self.counters["stored"] += 1
        if node.ghost_hit:
            node.queue = _MAIN
            self.main[node.key] = node
            self.main_bytes += node.charge
        else:
            node.queue = _SMALL
            self.small[node.key] = node
            self.small_bytes += node.charge

    def update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        node = self.index.get(key)
        if node is None:
            return False
        old = node.entry.meta.approx_size()
        node.entry.meta = meta
        delta = meta.approx_size() - old
        if node.charge + delta > self.budget:
            self.counters["dropped"] += 1
            self.unlink(node)
            return True
        node.charge += delta
        self.used += delta
        if node.queue == _SMALL:
            self.small_bytes += delta
        elif node.queue == _MAIN:
            self.main_bytes += delta
        if not self.make_room(0, None):  # only pending entries left: drop this one
            if self.live(node):
                self.counters["dropped"] += 1
                self.unlink(node)
        return True


class _MemoryWriter(CacheWriter):
    """Writes an entry of a :class:`MemoryStorage` shard."""

    def __init__(self, shard: _Shard, node: _Node | None, entry: CacheEntry) -> None:
        self._shard = shard
        self._node = node
        self._entry = entry
        self._done = False

    @property
    def entry(self) -> CacheEntry:
        """The entry being written."""
        return self._entry

    @property
    def stored(self) -> bool:
        """Whether the storage still keeps the entry."""
        return self._node is not None and self._shard.live(self._node)

    def write(self, chunk: bytes) -> None:
        """Append a body chunk (charged to the shard while it keeps the entry)."""
        if self._done:
            raise RuntimeError("cache writer is closed")
        self._entry.append(chunk)
        if self._node is not None and chunk:
            if not self._shard.grow(self._node, len(chunk)):
                self._node = None

    def finish(self) -> None:
        """The body is complete; the entry becomes an eviction candidate."""
        if self._entry.aborted:
            raise RuntimeError("cache writer was aborted")
        if self._done:
            return
        self._done = True
        self._entry.finish()
        if self._node is not None:
            self._shard.finished(self._node)

    def abort(self) -> None:
        """Readers raise :class:`~ferryman.cache.storage.CacheWriteAborted`; the entry is
        removed."""
        if self._done:
            return
        self._done = True
        self._entry.abort()
        self._shard.counters["aborted"] += 1
        if self._node is not None and self._shard.live(self._node):
            self._shard.unlink(self._node)
        self._node = None


class MemoryStorage(CacheStorage):
    """Cache entries in process memory, bounded to ``max_size`` bytes in total.

    ``shards`` independent shards (chosen by key hash) each get ``max_size // shards``
    bytes; an entry whose body exceeds ``max_entry`` bytes (default: an eighth of a
    shard's budget; never more than the budget) is not kept.
    """

    def __init__(self, max_size: int, shards: int = 8, max_entry: int | None = None) -> None:
        """A storage of at most ``max_size`` bytes over ``shards`` shards."""
        if shards < 1:
            raise ValueError("shards must be at least 1")
        if max_size < shards:
            raise ValueError("max_size must be at least one byte per shard")
        if max_entry is not None and max_entry < 0:
            raise ValueError("max_entry must not be negative")
        budget = max_size // shards
        per_entry = max(1, budget // 8) if max_entry is None else min(max_entry, budget)
        self._max_size = max_size
        self._shards = [_Shard(budget, per_entry) for _ in range(shards)]

    @property
    def max_size(self) -> int:
        """The bound on :attr:`total_size`."""
        return self._max_size

    @property
    def max_entry(self) -> int:
        """The largest body kept, in bytes."""
        return self._shards[0].max_entry

    @property
    def total_size(self) -> int:
        """The bytes charged to entries now (complete and in progress)."""
        return sum(shard.used for shard in self._shards)

    def __len__(self) -> int:
        """The number of entries indexed (complete and in progress)."""
        return sum(len(shard.index) for shard in self._shards)

    def shard_of(self, key: bytes) -> int:
        """The index of the shard holding ``key``."""
        return _key_hash(key) % len(self._shards)

    def shard_entries(self) -> list[int]:
        """The number of entries in each shard."""
        return [len(shard.index) for shard in self._shards]

    def _shard(self, key: bytes) -> tuple[_Shard, int]:
        h = _key_hash(key)
        return self._shards[h % len(self._shards)], h

    async def lookup(self, key: bytes) -> CacheEntry | None:
        """The entry under ``key``, complete or in progress; None on a miss."""
        shard, h = self._shard(key)
        return shard.lookup(key, h)

    def lookup_nowait(self, key: bytes) -> CacheEntry | None:
        """:meth:`lookup` without waiting; a miss is not counted (the caller looks up
        again with :meth:`lookup` when it goes on as a miss)."""
        shard, h = self._shard(key)
        return shard.lookup(key, h, False)

    async def begin(self, key: bytes, meta: CacheMeta) -> CacheWriter:
        """Start storing under ``key`` (subject to the size limits and admission)."""
        shard, h = self._shard(key)
        return shard.begin(key, h, meta)

    async def purge(self, key: bytes) -> bool:
        """Remove the entry under ``key``; whether there was one."""
        shard, _ = self._shard(key)
        node = shard.index.get(key)
        if node is None:
            return False
        shard.unlink(node)
        shard.counters["purged"] += 1
        return True

    async def purge_prefix(self, prefix: bytes) -> int:
        """Remove the entries whose key starts with ``prefix``; how many."""
        count = 0
        for shard in self._shards:
            for node in [n for k, n in shard.index.items() if k.startswith(prefix)]:
                shard.unlink(node)
                shard.counters["purged"] += 1
                count += 1
        return count

    async def purge_tag(self, tag: bytes) -> int:
        """Remove the entries tagged ``tag``; how many (a scan of every entry)."""
        count = 0
        for shard in self._shards:
            for node in [n for n in shard.index.values() if tag in n.entry.meta.tags]:
                shard.unlink(node)
                shard.counters["purged"] += 1
                count += 1
        return count

    async def update_meta(self, key: bytes, meta: CacheMeta) -> bool:
        """Replace the metadata of the entry under ``key``; whether there was one."""
        shard, _ = self._shard(key)
        return shard.update_meta(key, meta)

    def stats(self) -> dict[str, int]:
        """Counters summed over the shards: ``hits`` (``hits_in_progress`` of them on
        entries still being written), ``misses``, ``inserts`` (begun and indexed),
        ``stored`` (finished while indexed), ``rejected`` (by admission), ``evicted``,
        ``dropped`` (too large or no room), ``aborted``, ``purged``; and gauges
        ``entries``, ``size``, ``max_size``, ``small_size``, ``main_size``,
        ``ghost_entries``."""
        out: dict[str, int] = {}
        for shard in self._shards:
            for name, value in shard.counters.items():
                out[name] = out.get(name, 0) + value
        out["entries"] = len(self)
        out["size"] = self.total_size
        out["max_size"] = self._max_size
        out["small_size"] = sum(shard.small_bytes for shard in self._shards)
        out["main_size"] = sum(shard.main_bytes for shard in self._shards)
        out["ghost_entries"] = sum(len(shard.ghost) for shard in self._shards)
        return out
