"""The cache lock: concurrent misses for one key make one upstream request.

As Pingora's cache lock: the first request to miss a key gets the *write* permit and goes
upstream; the others get a *read* handle and wait, up to a bound, for the writer's
outcome. When the writer stored the response they look the key up again and are served
from it (it may still be streaming in); when the writer failed, gave up, or the wait timed
out, each waiter goes upstream itself, so a stuck writer never stalls them for long.

This lock serves the requests of one worker (one event loop). Across workers of a
server, a shared storage brings its own coordination (see the storage backends).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

__all__ = ["CacheLock", "LockOutcome", "ReadHandle", "WritePermit"]


class LockOutcome(enum.Enum):
    """How a writer finished, as its waiters see it."""

    #: the response was stored (or is streaming into storage): look it up again
    DONE = "done"
    #: the writer's request failed, or its response was not cacheable: go upstream
    FAILED = "failed"
    #: the waiter gave up waiting (the lock's ``timeout``): go upstream
    TIMEOUT = "timeout"


@dataclass(slots=True)
class _Entry:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: LockOutcome = LockOutcome.FAILED
    waiters: int = 0
    value: object = None


@dataclass(slots=True)
class WritePermit:
    """Held by the one request that fetches the key; release it exactly once."""

    key: bytes
    _entry: _Entry
    released: bool = False


@dataclass(slots=True)
class ReadHandle:
    """Held by a request waiting for the writer of ``key``."""

    key: bytes
    _entry: _Entry
    _timeout: float

    async def wait(self) -> LockOutcome:
        """The writer's outcome, or TIMEOUT after the lock's timeout."""
        try:
            await asyncio.wait_for(self._entry.done.wait(), self._timeout)
        except TimeoutError:
            return LockOutcome.TIMEOUT
        finally:
            self._entry.waiters -= 1
        return self._entry.outcome

    @property
    def value(self) -> object:
        """What the writer handed to its waiters with a DONE (say, the entry it is
        storing, which the storage may not keep), or None."""
        return self._entry.value


class CacheLock:
    """Per-key write permits with bounded waits.

    Args:
        timeout: the longest a waiter waits for the writer (seconds).
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._entries: dict[bytes, _Entry] = {}

    def lock(self, key: bytes) -> WritePermit | ReadHandle:
        """A write permit if nobody is fetching ``key``, else a handle to wait on."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            return WritePermit(key, entry)
        entry.waiters += 1
        return ReadHandle(key, entry, self.timeout)

    def try_lock(self, key: bytes) -> WritePermit | None:
        """A write permit if nobody is fetching ``key``, else None (nothing to wait on:
        for work that is skipped when someone else does it, as a background refresh)."""
        if key in self._entries:
            return None
        entry = self._entries[key] = _Entry()
        return WritePermit(key, entry)

    def release(
        self, permit: WritePermit, outcome: LockOutcome, value: object = None
    ) -> None:
        """The writer is done with ``key``: wake its waiters with ``outcome`` (DONE or
        FAILED) and ``value`` (:attr:`ReadHandle.value`). The next miss of the key gets a
        new permit."""
        if permit.released:
            return
        permit.released = True
        if self._entries.get(permit.key) is permit._entry:
            del self._entries[permit.key]
        permit._entry.outcome = outcome
        permit._entry.value = value
        permit._entry.done.set()

    def waiting(self, key: bytes) -> int:
        """How many requests wait for ``key``'s writer."""
        entry = self._entries.get(key)
        return entry.waiters if entry is not None else 0

    def __len__(self) -> int:
        return len(self._entries)
