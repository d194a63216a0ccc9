"""Inflight: per-key concurrency, with a guard that is released on every exit path.

``Inflight(limit)`` counts what is in progress per key (requests per client IP, say).
:meth:`Inflight.acquire` gives a :class:`Guard` while the key is under its limit, else
None; the guard gives its unit back exactly once, whichever way the work ends:
:meth:`Guard.release` called by the code that finished (the proxy's ``logging`` hook
runs once per request, after client aborts and upstream errors too), a ``with`` block
left by an exception, or, as a last resort, the guard being garbage-collected. A
released guard releases nothing more, so a double release never frees someone else's
unit.

Counts live in a dict of the keys in progress only (a key whose count falls to zero is
removed): memory is bounded by the work in progress, not by how many keys were seen.
This counts within one process; sharing the counts between the workers of a server is a
separate layer (see ``ferryman.limits``).
"""

from __future__ import annotations

from types import TracebackType

__all__ = ["Guard", "Inflight"]


class Guard:
    """One unit of a key's concurrency, held until :meth:`release`."""

    __slots__ = ("_owner", "key", "__weakref__")

    def __init__(self, owner: Inflight, key: bytes | str) -> None:
        self._owner: Inflight | None = owner
        #: The key the unit was taken for.
        self.key = key

    @property
    def released(self) -> bool:
        """Whether the unit was given back."""
        return self._owner is None

    def release(self) -> None:
        """Give the unit back (idempotent)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self.key)

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # (a guard dropped without release, e.g. by a hook that raised before it could
        # store it: its unit must not leak)
        self.release()


class Inflight:
    """Per-key counts of work in progress, each bounded by ``limit``.

    Args:
        limit: the most units a key may hold at once (at least 1).
    """

    __slots__ = ("limit", "_counts")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._counts: dict[bytes | str, int] = {}

    def acquire(self, key: bytes | str) -> Guard | None:
        """A guard holding one unit of ``key``, or None when ``key`` is at its limit."""
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return None
        self._counts[key] = count + 1
        return Guard(self, key)

    def count(self, key: bytes | str) -> int:
        """The units ``key`` holds now."""
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """How many keys hold units now."""
        return len(self._counts)

    def _release(self, key: bytes | str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)
