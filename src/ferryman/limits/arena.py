"""SharedArena: shared memory for limit counters, one region per process and zone.

The workers of a server must see one count per key, or a limit would multiply by the
worker count. Counters shared by processes that update them concurrently lose updates
(Python has no atomic read-add-write on shared memory), and a worker that dies holding
concurrency units would leak them. So each process writes only its own *region* of a
zone, and readers add up the regions of all processes:

* no update is ever lost (one writer per region), and no lock is taken per request;
* a dead process's concurrency units are given back by zeroing the *volatile* part of its
  regions (:meth:`SharedArena.sweep`, done at most once a second by the limiters, and when
  a new process takes over its slot), while its past events (the *persistent* part: rate
  windows) keep counting until they age out.

Layout of the mapping (native-endian 64-bit integers)::

    header      bump offset, zone count
    processes   MAX_PROCESSES pids (0: free slot)
    directory   MAX_ZONES entries: 16-byte name digest, zone header offset,
                region size, volatile offset (within a region)
    zones       per zone: regions allocated (a version number readers watch), then
                MAX_PROCESSES region offsets (0: that slot has none yet)
    regions     bump-allocated, never freed

The arena is an anonymous ``MAP_SHARED`` mapping: it is shared by the processes forked
after it was made, and costs only the pages that are touched (its size is address space).
Zones are found by name, so a config reloaded in the workers finds the zones of its
unchanged limits, with their counts (as nginx keeps a ``limit_req_zone`` across reloads);
a zone whose parameters changed gets a new name and fresh regions. Space is never
reclaimed: when it runs out, :meth:`SharedArena.zone` raises :class:`ArenaFull` and the
caller falls back to counting in its own process (logged).

Structural changes (taking a slot, adding a zone or a region) take a lock shared by the
processes: a POSIX record lock on a memfd, which the kernel releases when its holder
dies. A slot records its process's pid and start time, so a new process that got a dead
one's pid is not taken for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
from typing import Final

__all__ = [
    "ArenaFull",
    "MAX_PROCESSES",
    "MAX_ZONES",
    "SharedArena",
    "Zone",
    "default_arena",
]

log = logging.getLogger("ferryman.limits")

#: Processes an arena can serve at once (a server's workers, plus those draining).
MAX_PROCESSES: Final = 128
#: Zones an arena can hold (over its whole life: reloads that change limits add zones).
MAX_ZONES: Final = 1024
#: Address space of the default arena (only touched pages cost memory).
DEFAULT_SIZE: Final = 1 << 30
#: How often a process looks for dead processes' slots (seconds).
SWEEP_INTERVAL: Final = 1.0

_WORD: Final = 8
_HEADER: Final = struct.Struct("=QQ")  # bump offset, zone count
_PIDS_AT: Final = _HEADER.size  # per slot: pid, start time (clock ticks after boot)
_DIR_AT: Final = _PIDS_AT + MAX_PROCESSES * 2 * _WORD
_ENTRY: Final = struct.Struct("=16sQQQ")  # digest, zone offset, region size, volatile offset
_DATA_AT: Final = _DIR_AT + MAX_ZONES * _ENTRY.size
_ZONE_HEADER_SIZE: Final = _WORD + MAX_PROCESSES * _WORD
_ALIGN: Final = 4096
_U64: Final = struct.Struct("=Q")
_SLOT: Final = struct.Struct("=qq")  # pid, start time
_I64: Final = struct.Struct("=q")


#: Forks this process has been through (bumped in a child after ``os.fork``): what tells
#: a process its slot and regions are not its parent's, without a getpid() per request.
fork_generation = [0]


def _forked() -> None:
    fork_generation[0] += 1


os.register_at_fork(after_in_child=_forked)


class ArenaFull(Exception):
    """The arena has no room for another zone or region."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat field 22), -1
    if it does not exist or is a zombie (dead, its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return -1
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return -1
    return int(fields[19])


def _alive(pid: int, start: int) -> bool:
    """Whether the process that took a slot as ``(pid, start)`` still runs (a new process
    that got the same pid is another process)."""
    return pid > 0 and _start_time(pid) == start


class Zone:
    """The regions of one zone: this process's region to write, every region to read.

    Made by :meth:`SharedArena.zone`; a region is ``region_size`` bytes, of which bytes
    from ``volatile_from`` on are zeroed when the process owning it dies.
    """

    __slots__ = ("arena", "name", "region_size", "volatile_from", "_at", "_seen", "_views")

    def __init__(
        self, arena: SharedArena, name: str, at: int, region_size: int, volatile_from: int
    ) -> None:
        self.arena = arena
        #: The zone's name (what finds it again after a reload).
        self.name = name
        self.region_size = region_size
        self.volatile_from = volatile_from
        self._at = at  # offset of the zone header
        self._seen = -1  # region count when _views was built
        self._views: list[tuple[int, memoryview]] = []

    def own(self) -> memoryview:
        """This process's region (allocated, zeroed, on first use; raises
        :class:`ArenaFull` when there is no room)."""
        offset = self.own_offset()
        return self.arena._view[offset : offset + self.region_size]

    def own_offset(self) -> int:
        """Where this process's region starts in the arena (bytes; allocated, zeroed, on
        first use; raises :class:`ArenaFull` when there is no room)."""
        arena = self.arena
        slot = arena.slot()
        at = self._at + _WORD + slot * _WORD
        mm = arena._mm
        offset = _U64.unpack_from(mm, at)[0]
        if offset == 0:
            with arena._locked():
                offset = _U64.unpack_from(mm, at)[0]
                if offset == 0:
                    offset = arena._allocate(self.region_size)
                    _U64.pack_into(mm, at, offset)
                    count = _U64.unpack_from(mm, self._at)[0]
                    _U64.pack_into(mm, self._at, count + 1)
        return int(offset)

    @property
    def version_word(self) -> int:
        """The index in ``arena.words`` of the zone's region count (it changes when a
        region is added)."""
        return self._at // _WORD

    def offsets(self) -> list[tuple[int, int]]:
        """``(slot, byte offset)`` of every process's region."""
        mm = self.arena._mm
        out = []
        for slot in range(MAX_PROCESSES):
            offset = _U64.unpack_from(mm, self._at + _WORD + slot * _WORD)[0]
            if offset:
                out.append((slot, int(offset)))
        return out

    def regions(self) -> list[tuple[int, memoryview]]:
        """Every process's region with its slot (this one's included once it has one). The
        list is rebuilt only when a region was added (one 8-byte read otherwise)."""
        mm = self.arena._mm
        count = _U64.unpack_from(mm, self._at)[0]
        if count != self._seen:
            views = []
            view = self.arena._view
            size = self.region_size
            for slot in range(MAX_PROCESSES):
                offset = _U64.unpack_from(mm, self._at + _WORD + slot * _WORD)[0]
                if offset:
                    views.append((slot, view[offset : offset + size]))
            self._views = views
            self._seen = count
        return self._views

    def region_of(self, slot: int) -> memoryview | None:
        """The region of process slot ``slot``, or None."""
        offset = _U64.unpack_from(self.arena._mm, self._at + _WORD + slot * _WORD)[0]
        if not offset:
            return None
        return self.arena._view[offset : offset + self.region_size]


class _Held:
    """The arena's lock held: this process's threads' lock, then the processes' one."""

    __slots__ = ("arena", "locked")

    def __init__(self, arena: SharedArena) -> None:
        self.arena = arena
        self.locked = False

    def __enter__(self) -> None:
        self.arena._thread_lock.acquire()
        try:
            fcntl.lockf(self.arena._lock_fd, fcntl.LOCK_EX)
        except BaseException:
            self.arena._thread_lock.release()
            raise
        self.locked = True

    def __exit__(self, *exc: object) -> None:
        if self.locked:
            self.locked = False
            fcntl.lockf(self.arena._lock_fd, fcntl.LOCK_UN)
        self.arena._thread_lock.release()


class SharedArena:
    """Shared memory for limit counters (see the module docstring).

    Make it before the processes that share it are forked; each process then takes a
    slot on first use (:meth:`slot`).

    Args:
        size: bytes of address space; pages cost memory only once touched.
    """

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        least = _round_up(_DATA_AT, _ALIGN) + _ALIGN  # (the header, then one zone's)
        if size < least:
            raise ValueError(f"an arena needs at least {least} bytes")
        self.size = size
        self._mm = mmap.mmap(-1, size)
        self._view = memoryview(self._mm)
        #: the whole arena as native 64-bit integers (regions are 8-byte aligned)
        self.words = self._view.cast("q")
        # a POSIX record lock: owned per process, and released by the kernel when its
        # holder dies, so a worker killed mid-change never wedges the others
        self._lock_fd = os.memfd_create("ferryman-limits-lock", os.MFD_CLOEXEC)
        self._thread_lock = threading.Lock()
        _HEADER.pack_into(self._mm, 0, _round_up(_DATA_AT, _ALIGN), 0)
        self._generation = -1  # the fork generation that holds _slot
        self._slot = -1
        #: monotonic time of the next sweep (see :meth:`sweep`)
        self.next_sweep = 0.0
        self._zones: dict[str, Zone] = {}

    # -- locking --------------------------------------------------------------------------

    def _locked(self) -> _Held:
        return _Held(self)

    # -- slots ----------------------------------------------------------------------------

    def slot(self) -> int:
        """This process's slot (taken on first use: a free one, or that of a dead
        process, whose volatile counts are zeroed first). Raises :class:`ArenaFull` when
        ``MAX_PROCESSES`` live processes hold slots."""
        if self._generation == fork_generation[0] and self._slot >= 0:
            return self._slot
        pid = os.getpid()
        start = _start_time(pid)
        mm = self._mm
        with self._locked():
            chosen = -1
            for slot in range(MAX_PROCESSES):
                holder, since = _SLOT.unpack_from(mm, _PIDS_AT + slot * _SLOT.size)
                if holder == pid and since == start:
                    chosen = slot
                    break
                if chosen < 0 and (holder == 0 or not _alive(holder, since)):
                    chosen = slot
            if chosen < 0:
                raise ArenaFull(f"{MAX_PROCESSES} processes hold arena slots")
            holder, since = _SLOT.unpack_from(mm, _PIDS_AT + chosen * _SLOT.size)
            if (holder, since) != (pid, start):
                if holder != 0:
                    self._clear_volatile(chosen)  # (a dead process's units)
                _SLOT.pack_into(mm, _PIDS_AT + chosen * _SLOT.size, pid, start)
        self._generation = fork_generation[0]
        self._slot = chosen
        return chosen

    def holders(self) -> list[int]:
        """The pid holding each slot (0: free)."""
        return [pid for pid, _ in self._holders()]

    def _holders(self) -> list[tuple[int, int]]:
        mm = self._mm
        return [
            _SLOT.unpack_from(mm, _PIDS_AT + s * _SLOT.size) for s in range(MAX_PROCESSES)
        ]

    def sweep(self, now: float | None = None) -> int:
        """Free the slots of dead processes, zeroing their regions' volatile parts (their
        concurrency units); at most once per ``SWEEP_INTERVAL`` of ``now`` (``time.
        monotonic()``), or at once when ``now`` is None. Returns how many slots were
        freed."""
        if now is not None:
            if now < self.next_sweep:
                return 0
            self.next_sweep = now + SWEEP_INTERVAL
        mm = self._mm
        dead = [
            s for s, (pid, start) in enumerate(self._holders())
            if pid != 0 and not _alive(pid, start)
        ]
        if not dead:
            return 0
        freed = 0
        with self._locked():
            for slot in dead:
                pid, start = _SLOT.unpack_from(mm, _PIDS_AT + slot * _SLOT.size)
                if pid == 0 or _alive(pid, start):
                    continue  # (taken over meanwhile)
                self._clear_volatile(slot)
                _SLOT.pack_into(mm, _PIDS_AT + slot * _SLOT.size, 0, 0)
                freed += 1
        return freed

    def _clear_volatile(self, slot: int) -> None:
        mm = self._mm
        zones = _U64.unpack_from(mm, 8)[0]
        for i in range(zones):
            _digest, at, size, volatile = _ENTRY.unpack_from(mm, _DIR_AT + i * _ENTRY.size)
            offset = _U64.unpack_from(mm, at + _WORD + slot * _WORD)[0]
            if offset and volatile < size:
                mm[offset + volatile : offset + size] = bytes(size - volatile)

    # -- zones ----------------------------------------------------------------------------

    def zone(self, name: str, region_size: int, volatile_from: int | None = None) -> Zone:
        """The zone called ``name`` (made if new): regions of ``region_size`` bytes whose
        bytes from ``volatile_from`` on (default: none) belong to work in progress.
        A zone of that name made with other sizes is a different zone."""
        if volatile_from is None:
            volatile_from = region_size
        if not 0 <= volatile_from <= region_size:
            raise ValueError("volatile_from must be within the region")
        zone = self._zones.get(name)
        if zone is not None and (zone.region_size, zone.volatile_from) == (
            region_size, volatile_from
        ):
            return zone
        digest = hashlib.blake2b(
            f"{name}\0{region_size}\0{volatile_from}".encode(), digest_size=16
        ).digest()
        mm = self._mm
        with self._locked():
            count = _U64.unpack_from(mm, 8)[0]
            at = 0
            for i in range(count):
                d, zat, _size, _vol = _ENTRY.unpack_from(mm, _DIR_AT + i * _ENTRY.size)
                if d == digest:
                    at = zat
                    break
            if at == 0:
                if count >= MAX_ZONES:
                    raise ArenaFull(f"the arena holds {MAX_ZONES} zones already")
                at = self._allocate(_ZONE_HEADER_SIZE)
                _ENTRY.pack_into(
                    mm, _DIR_AT + count * _ENTRY.size, digest, at, region_size, volatile_from
                )
                _U64.pack_into(mm, 8, count + 1)
        zone = Zone(self, name, at, region_size, volatile_from)
        self._zones[name] = zone
        return zone

    def swap(self, name: str, value: int) -> int:
        """Set the shared 64-bit cell called ``name`` (made zero if new) to ``value``;
        returns what it held, atomically for the processes of the arena (e.g. so that of
        the workers noticing an outage, only the first logs it)."""
        cell = self.zone(f"cell:{name}", 0)  # (a zone without regions: its count word)
        mm = self._mm
        with self._locked():
            old = _I64.unpack_from(mm, cell._at)[0]
            _I64.pack_into(mm, cell._at, value)
        return int(old)

    def _allocate(self, size: int) -> int:
        """Bump-allocate ``size`` zeroed bytes (caller holds the lock)."""
        mm = self._mm
        offset = _U64.unpack_from(mm, 0)[0]
        end = _round_up(offset + size, _ALIGN)
        if end > self.size:
            raise ArenaFull(f"the arena's {self.size} bytes are used up")
        _U64.pack_into(mm, 0, end)
        return offset

    @property
    def used(self) -> int:
        """Bytes allocated so far (header included)."""
        return int(_U64.unpack_from(self._mm, 0)[0])


_default: SharedArena | None = None
_default_lock = threading.Lock()


def default_arena() -> SharedArena:
    """The process's arena for limits, made on first call. ``ferryman run`` makes it
    before forking the workers, so every limit built from the config, at start or on a
    reload, is shared by all workers; an application that builds its limiters in its
    ``ProxyHttp.__init__`` (before the fork) shares them too."""
    global _default
    with _default_lock:
        if _default is None:
            for size in (DEFAULT_SIZE, DEFAULT_SIZE // 4, DEFAULT_SIZE // 16):
                try:
                    _default = SharedArena(size)
                    break
                except OSError as exc:  # (address space refused: strict overcommit)
                    log.warning("limits: cannot map %d bytes (%s); trying less", size, exc)
            if _default is None:
                _default = SharedArena(DEFAULT_SIZE // 64)
        return _default

