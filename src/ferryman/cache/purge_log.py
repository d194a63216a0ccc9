"""PurgeLog: purges of per-process caches, passed on to every worker of a server.

A memory storage belongs to one worker process, but a ``PURGE`` (or an invalidation by an
unsafe method) reaches only the worker that received it. The workers of a server share
a :class:`PurgeLog`, a ring of purge records in an anonymous shared mapping made before
they are forked: the worker that purges appends a record, and every worker applies the
records it has not seen before its next cache lookup (one 8-byte read when there are
none). A worker that fell more than the ring's length behind empties its caches of that
scope instead (nothing purged is ever served).

Records name a *scope* (which cache: the config proxy uses the listener and route), a
kind (key, prefix or tag) and a value. Writers take a lock shared by the processes; one
that cannot get it within half a second (its holder died mid-write) writes anyway.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
from typing import NamedTuple

__all__ = ["PURGE_KEY", "PURGE_PREFIX", "PURGE_TAG", "PurgeLog", "PurgeRecord"]

#: Kinds of records: an exact key (and its variants), a key prefix, a tag.
PURGE_KEY = 1
PURGE_PREFIX = 2
PURGE_TAG = 3

_HEADER = struct.Struct("<Q")  # the sequence number of the last record written
_RECORD_HEAD = struct.Struct("<QBHH")  # sequence, kind, scope length, value length
#: Bytes per record: a longer scope plus value cannot be logged (it empties the scope).
RECORD_SIZE = 1024
#: Records the ring holds.
SLOTS = 1024
_LOCK_WAIT = 0.5


class PurgeRecord(NamedTuple):
    """One purge: in cache ``scope``, remove by ``kind`` (``PURGE_*``) ``value``; a kind
    of 0 means "everything in the scope"."""

    seq: int
    kind: int
    scope: bytes
    value: bytes


class PurgeLog:
    """The shared ring of purge records (see the module docstring). Make it before the
    worker processes are forked; each process then reads with its own position."""

    def __init__(self, slots: int = SLOTS) -> None:
        """An empty log of ``slots`` records."""
        self.slots = slots
        self._mm = mmap.mmap(-1, _HEADER.size + slots * RECORD_SIZE)
        self._lock = multiprocessing.get_context("fork").Lock()

    @property
    def sequence(self) -> int:
        """The sequence number of the last record written (0: none yet)."""
        return int(_HEADER.unpack_from(self._mm, 0)[0])

    def append(self, kind: int, scope: bytes, value: bytes) -> int:
        """Write a record; its sequence number. A record too large for a slot is written
        as "everything in the scope"."""
        if _RECORD_HEAD.size + len(scope) + len(value) > RECORD_SIZE:
            kind, value = 0, b""
            if _RECORD_HEAD.size + len(scope) > RECORD_SIZE:
                scope = b""  # (every scope)
        locked = self._lock.acquire(timeout=_LOCK_WAIT)
        try:
            mm = self._mm
            seq = int(_HEADER.unpack_from(mm, 0)[0]) + 1
            offset = _HEADER.size + (seq % self.slots) * RECORD_SIZE
            mm[offset + _RECORD_HEAD.size : offset + _RECORD_HEAD.size + len(scope)] = scope
            start = offset + _RECORD_HEAD.size + len(scope)
            mm[start : start + len(value)] = value
            _RECORD_HEAD.pack_into(mm, offset, seq, kind, len(scope), len(value))
            _HEADER.pack_into(mm, 0, seq)
            return seq
        finally:
            if locked:
                self._lock.release()

    def read_since(self, seen: int) -> tuple[int, list[PurgeRecord] | None]:
        """The records after ``seen``: ``(last sequence, records)``, records None when
        some were overwritten before they were read (the reader must empty its caches)."""
        mm = self._mm
        last = int(_HEADER.unpack_from(mm, 0)[0])
        if last <= seen:
            return last, []
        if last - seen > self.slots - 1:
            return last, None
        out = []
        for seq in range(seen + 1, last + 1):
            offset = _HEADER.size + (seq % self.slots) * RECORD_SIZE
            rseq, kind, scope_len, value_len = _RECORD_HEAD.unpack_from(mm, offset)
            if rseq != seq:  # overwritten meanwhile, or a writer died mid-record
                return last, None
            start = offset + _RECORD_HEAD.size
            scope = bytes(mm[start : start + scope_len])
            value = bytes(mm[start + scope_len : start + scope_len + value_len])
            out.append(PurgeRecord(seq, kind, scope, value))
        return last, out

    def close(self) -> None:
        """Unmap the ring (in the process that stops using it)."""
        self._mm.close()
