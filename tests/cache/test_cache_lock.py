"""The cache lock (``ferryman.cache.lock``): one writer per key, bounded waits."""

from __future__ import annotations

import asyncio

from ferryman.cache.lock import CacheLock, LockOutcome, ReadHandle, WritePermit


def test_the_first_miss_writes_and_the_others_wait_for_it() -> None:
    async def main() -> None:
        lock = CacheLock(timeout=5.0)
        permit = lock.lock(b"k")
        assert isinstance(permit, WritePermit)
        handles = [lock.lock(b"k") for _ in range(100)]
        assert all(isinstance(h, ReadHandle) for h in handles)
        assert lock.waiting(b"k") == 100
        waits = [asyncio.ensure_future(h.wait()) for h in handles]  # type: ignore[union-attr]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waits)
        lock.release(permit, LockOutcome.DONE)
        assert await asyncio.gather(*waits) == [LockOutcome.DONE] * 100
        assert lock.waiting(b"k") == 0
        assert len(lock) == 0

    asyncio.run(main())


def test_other_keys_are_independent() -> None:
    async def main() -> None:
        lock = CacheLock()
        assert isinstance(lock.lock(b"a"), WritePermit)
        assert isinstance(lock.lock(b"b"), WritePermit)
        assert isinstance(lock.lock(b"a"), ReadHandle)

    asyncio.run(main())


def test_a_failed_writer_sends_the_waiters_upstream_and_frees_the_key() -> None:
    async def main() -> None:
        lock = CacheLock()
        permit = lock.lock(b"k")
        assert isinstance(permit, WritePermit)
        handle = lock.lock(b"k")
        assert isinstance(handle, ReadHandle)
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0)
        lock.release(permit, LockOutcome.FAILED)
        assert await waiter == LockOutcome.FAILED
        assert isinstance(lock.lock(b"k"), WritePermit)  # the next miss writes again

    asyncio.run(main())


def test_a_stuck_writer_does_not_stall_its_waiters_past_the_timeout() -> None:
    async def main() -> None:
        lock = CacheLock(timeout=0.05)
        permit = lock.lock(b"k")
        handle = lock.lock(b"k")
        assert isinstance(handle, ReadHandle)
        assert await handle.wait() == LockOutcome.TIMEOUT
        assert lock.waiting(b"k") == 0
        assert isinstance(permit, WritePermit)
        lock.release(permit, LockOutcome.DONE)  # (late: nobody waits any more)
        lock.release(permit, LockOutcome.FAILED)  # released once only
        assert len(lock) == 0

    asyncio.run(main())
