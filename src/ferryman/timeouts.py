"""Coarse per-connection deadlines checked by one periodic sweep per event loop.

Arming a timer per read would cost a heap operation per chunk; instead each connection
keeps a ``deadline`` float (``0.0`` = none) that the hot path overwrites freely, and one
repeating callback per loop fires :meth:`Expirable.on_deadline` for the expired ones. The
price is precision: a deadline fires up to one ``tick`` late (Pingora's pingora-timeout
makes the same trade).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Expirable(Protocol):
    """Anything with a ``deadline`` the sweep can check."""

    deadline: float

    def on_deadline(self) -> None:
        """Called once when ``deadline`` (a ``loop.time()`` value) has passed."""


class DeadlineSweep:
    """Checks the deadlines of registered objects every ``tick`` seconds."""

    __slots__ = ("_loop", "_items", "_tick", "_handle", "_on_tick", "now")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = 0.1) -> None:
        self._loop = loop
        self._items: set[Expirable] = set()
        self._tick = tick
        self._handle: asyncio.TimerHandle | None = None
        self._on_tick: list[Callable[[], None]] = []
        #: ``loop.time()`` as of the last sweep (at most one tick old): the hot path sets
        #: deadlines from it instead of asking the loop for the time
        self.now = loop.time()

    def add(self, item: Expirable) -> None:
        """Start watching ``item``."""
        self._items.add(item)
        if self._handle is None:
            self.now = self._loop.time()
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def discard(self, item: Expirable) -> None:
        """Stop watching ``item`` (no error if it was not watched)."""
        self._items.discard(item)

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Also call ``callback`` at every sweep (while any object is watched)."""
        self._on_tick.append(callback)

    def __len__(self) -> int:
        return len(self._items)

    def _sweep(self) -> None:
        now = self.now = self._loop.time()
        expired = [i for i in self._items if 0.0 < i.deadline <= now]
        for item in expired:
            item.deadline = 0.0
            try:
                item.on_deadline()
            except Exception:  # noqa: BLE001 - one bad connection must not stop the sweep
                pass
        for callback in self._on_tick:
            try:
                callback()
            except Exception:  # noqa: BLE001 - nor one bad callback
                pass
        self._handle = self._loop.call_later(self._tick, self._sweep) if self._items else None


_SWEEPS: dict[asyncio.AbstractEventLoop, DeadlineSweep] = {}


def sweep_for(loop: asyncio.AbstractEventLoop) -> DeadlineSweep:
    """The shared :class:`DeadlineSweep` of ``loop``."""
    sweep = _SWEEPS.get(loop)
    if sweep is None:
        if len(_SWEEPS) > 16:  # loops from finished tests: drop the closed ones
            for old in [lp for lp in _SWEEPS if lp.is_closed()]:
                del _SWEEPS[old]
        sweep = _SWEEPS[loop] = DeadlineSweep(loop)
    return sweep
