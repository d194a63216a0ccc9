"""MetricsBoard: every process's metrics snapshot, in shared memory, summed by the reader.

The board is an anonymous shared memory region (``mmap``) that the main process creates
before it forks, so its workers and the metrics process see the same bytes. It is cut
into fixed-size slots, one per writer: slot 0 is the main process's
(:class:`~ferryman.metrics.recorder.MainMetrics`), slot ``i + 1`` the worker of index
``i`` (:func:`worker_slot`). Each slot has a single writer, which replaces the
``marshal``-ed snapshot of its process now and then (:class:`WorkerPublisher`: every
0.1 s when something changed, and at least every second).

A slot holds two copies, each guarded seqlock-style by a sequence counter (as
:mod:`ferryman.lb.shared`'s board): the writer overwrites the older copy, making its
counter odd, writing, then making it even and newer than the other's; a reader keeps the
newest copy whose counter was even and unchanged across its read. So a writer killed in
the middle of a write leaves the previous copy whole: the counters of a killed worker
still count (its requests happened), and its restarted successor continues from them
(:meth:`~ferryman.metrics.recorder.WorkerMetrics.load_base`).

Each copy also records the writer's pid, the time it was written, and whether it is
*final* (written by a process that stopped cleanly, with zeroed gauges). The aggregation
(:mod:`ferryman.metrics.exposition`) counts gauges only from slots whose writer is alive
(:func:`pid_alive`) and not stopped.

Pages of an anonymous shared mapping are only allocated when touched: the default 65
slots of 1 MiB reserve 65 MiB of address space but cost what the snapshots use.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import mmap
import os
import struct
import time
from typing import Any, NamedTuple

from ferryman.metrics.recorder import WorkerMetrics

__all__ = [
    "MAX_WORKERS",
    "SLOT_SIZE",
    "MetricsBoard",
    "SlotRecord",
    "WorkerPublisher",
    "pid_alive",
    "worker_slot",
]

log = logging.getLogger("ferryman.metrics")

#: Worker slots a board has by default (slots 1..64; more workers need a larger board).
MAX_WORKERS = 64
#: Bytes per slot by default; a snapshot may use a little less than half (two copies).
SLOT_SIZE = 1024 * 1024

#: A copy's header: sequence, payload length, writer pid, time written, flags.
_HEADER = struct.Struct("<QQqdQ")
_SEQ = struct.Struct("<Q")
_FINAL = 1
#: Attempts at a consistent read of a slot being written.
_READ_TRIES = 5


class SlotRecord(NamedTuple):
    """What a slot holds: its latest consistent snapshot, with who wrote it and when."""

    slot: int
    """The slot's index (0: the main process; ``i + 1``: worker ``i``)."""
    pid: int
    """The writer's process id."""
    snapshot: dict[str, Any]
    """The snapshot written (see :meth:`~ferryman.metrics.recorder.WorkerMetrics.snapshot`)."""
    final: bool
    """Written by a process that stopped cleanly (its gauges are zero)."""
    written_at: float
    """``time.time()`` of the write."""


def worker_slot(index: int) -> int:
    """The slot of the worker of index ``index`` (0-based): ``index + 1``."""
    return index + 1


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead worker its parent has
    not reaped yet)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all there is


class MetricsBoard:
    """Shared slots of metrics snapshots (see the module docstring).

    Create it in the main process before forking. ``workers`` is the number of worker
    slots (slots 1..workers; slot 0 is the main process's); writing to a slot beyond
    raises ValueError, so give at least the configured worker count (the default, 64,
    covers most machines). A snapshot must fit in ``slot_size // 2 - 40`` bytes once
    marshalled (about 512 KiB by default: thousands of label combinations).

    Args:
        workers: worker slots.
        slot_size: bytes per slot (two copies of a snapshot and their headers).
    """

    def __init__(self, workers: int = MAX_WORKERS, slot_size: int = SLOT_SIZE) -> None:
        if workers < 1:
            raise ValueError(f"a metrics board needs at least 1 worker slot, got {workers}")
        if slot_size < 4 * _HEADER.size:
            raise ValueError(f"metrics board slot size {slot_size} is too small")
        self.workers = workers
        self.slots = workers + 1
        self.slot_size = slot_size
        self._copy = slot_size // 2
        #: the largest marshalled snapshot a slot takes
        self.capacity = self._copy - _HEADER.size
        self._mm = mmap.mmap(-1, self.slots * slot_size)  # MAP_SHARED|MAP_ANONYMOUS

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise ValueError(
                f"metrics board slot {slot} out of range: the board has slots 0..{self.slots - 1}"
                f" (the main process and {self.workers} workers)"
            )
        return slot * self.slot_size

    def write(self, slot: int, snapshot: dict[str, Any], final: bool = False) -> None:
        """Replace ``slot``'s snapshot (by the slot's single writer only). ``final``: the
        writer is stopping (and ``snapshot`` has zeroed gauges). Raises ValueError if the
        slot does not exist or the snapshot does not fit (the slot keeps its previous
        content)."""
        base = self._offset(slot)
        data = marshal.dumps(snapshot)
        if len(data) > self.capacity:
            raise ValueError(
                f"metrics snapshot of {len(data)} bytes does not fit in a board slot"
                f" ({self.capacity} bytes): too many distinct label values? (listener, route"
                " and upstream names must come from the configuration)"
            )
        mm = self._mm
        seq_a = _SEQ.unpack_from(mm, base)[0]
        seq_b = _SEQ.unpack_from(mm, base + self._copy)[0]
        # overwrite a copy left torn by a writer killed mid-write, else the older one
        if seq_a & 1:
            older = base
        elif seq_b & 1:
            older = base + self._copy
        else:
            older = base if seq_a <= seq_b else base + self._copy
        newest = max(seq_a, seq_b) | 1  # odd, above both
        _SEQ.pack_into(mm, older, newest)
        start = older + _HEADER.size
        mm[start : start + len(data)] = data
        flags = _FINAL if final else 0
        _HEADER.pack_into(mm, older, newest, len(data), os.getpid(), time.time(), flags)
        _SEQ.pack_into(mm, older, newest + 1)

    def read(self, slot: int) -> SlotRecord | None:
        """``slot``'s latest consistent snapshot, or None if it was never written (or
        could not be read consistently: a writer kept overwriting it)."""
        base = self._offset(slot)
        for _ in range(_READ_TRIES):
            best: tuple[int, bytes, int, float, int] | None = None
            torn = False
            for copy in (base, base + self._copy):
                got = self._read_copy(copy)
                if got is None:
                    continue
                if got[0] < 0:
                    torn = True
                elif best is None or got[0] > best[0]:
                    best = got
            if best is not None:
                seq, data, pid, written_at, flags = best
                try:
                    snapshot = marshal.loads(data)
                except (ValueError, EOFError, TypeError):
                    return None
                if not isinstance(snapshot, dict):
                    return None
                return SlotRecord(slot, pid, snapshot, bool(flags & _FINAL), written_at)
            if not torn:
                return None  # never written
        return None

    def _read_copy(self, offset: int) -> tuple[int, bytes, int, float, int] | None:
        """A copy's (sequence, payload, pid, time, flags); None if never written; a
        negative sequence if it is being written or changed during the read."""
        mm = self._mm
        seq, length, pid, written_at, flags = _HEADER.unpack_from(mm, offset)
        if seq == 0:
            return None
        if seq & 1 or length > self.capacity:
            return (-1, b"", 0, 0.0, 0)
        start = offset + _HEADER.size
        data = mm[start : start + length]
        if _SEQ.unpack_from(mm, offset)[0] != seq:
            return (-1, b"", 0, 0.0, 0)
        return (seq, data, pid, written_at, flags)

    def read_all(self) -> list[SlotRecord]:
        """The snapshot of every slot that holds one, in slot order."""
        records = []
        for slot in range(self.slots):
            record = self.read(slot)
            if record is not None:
                records.append(record)
        return records

    def close(self) -> None:
        """Unmap the region (in this process)."""
        self._mm.close()


class WorkerPublisher:
    """Copies a worker's :class:`WorkerMetrics` to its board slot from the event loop.

    :meth:`start` first continues the slot's counters (a worker restarted at the same
    index), publishes, then publishes again every ``interval`` seconds when a request was
    counted since, and at least every ``refresh`` seconds (gauges read from sources change
    without requests). :meth:`stop` publishes the final state with zeroed gauges.

    Args:
        loop: the worker's event loop.
        metrics: the worker's counters.
        board: the board, created before the fork.
        slot: the worker's slot (:func:`worker_slot`).
        interval: seconds between checks for changes.
        refresh: longest time between two publications.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        metrics: WorkerMetrics,
        board: MetricsBoard,
        slot: int,
        interval: float = 0.1,
        refresh: float = 1.0,
    ) -> None:
        board._offset(slot)  # (raises ValueError for a slot the board does not have)
        self.loop = loop
        self.metrics = metrics
        self.board = board
        self.slot = slot
        self.interval = interval
        self.refresh = refresh
        self._published = -1
        self._published_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False

    def start(self) -> None:
        """Continue from the slot's previous counters, publish, and keep publishing."""
        previous = self.board.read(self.slot)
        if previous is not None:
            self.metrics.load_base(previous.snapshot)
        self.publish_now()
        if self._timer is None:
            self._timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)
        if (
            self.metrics.version != self._published
            or time.monotonic() - self._published_at >= self.refresh
        ):
            self.publish_now()

    def publish_now(self) -> None:
        """Publish the current state now (errors are logged, once, not raised)."""
        self._publish(self.metrics.snapshot(), False)

    def _publish(self, snapshot: dict[str, Any], final: bool) -> None:
        version = self.metrics.version
        try:
            self.board.write(self.slot, snapshot, final)
        except ValueError as exc:
            if not self._failed:
                self._failed = True
                log.error("metrics not published: %s", exc)
            return
        self._failed = False
        self._published = version
        self._published_at = time.monotonic()

    def stop(self) -> None:
        """Stop publishing, after a last publication with zeroed gauges (marked final:
        the aggregation counts no gauge of this slot until it is written again)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._publish(self.metrics.snapshot(gauges=False), True)
