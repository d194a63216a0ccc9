"""Limiter: a rate and concurrency limit per key, counted for all workers of a server.

A :class:`Limiter` holds one limit (a rate, a concurrency, or both) for any number of
keys (client addresses, API keys, ...). Its counts live in a :class:`~ferryman.limits.
arena.Zone` of shared memory: each process counts in its own region, and a decision
adds up every process's region, so the workers of a server share one limit (it does not
multiply by the worker count) without a lock or a lost update.

Rate: a sliding window (Cloudflare's method, as :class:`~ferryman.limits.Rate`) over
count-min sketches. ``rate`` events per ``period`` seconds; with ``burst``, the window is
the time the rate takes to earn ``burst`` events (``burst * period / rate``) and holds
``burst`` of them: at most ``burst`` requests at once, ``rate`` per ``period`` on
average (as Traefik's ``average``/``burst``; nginx's ``burst=B nodelay`` is about
``burst: B + 1``). Without ``burst`` the window is the period itself: ``100/s`` lets 100
requests through in any one second, all at once if they come at once. Only admitted
requests are counted, so a client that keeps sending too fast still gets the rate.

A request is admitted while the window's estimate, ``previous * (1 - elapsed) +
current``, is below the quota. Estimates never read low (count-min), so the limit is
never exceeded by counting error; keys colliding in the sketch may be limited slightly
early, by about ``N / slots`` requests where N is the total a process admitted in a
window (16384 slots per row by default).

Concurrency: requests in progress per key; :meth:`Limiter.check` returns a
:class:`~ferryman.limits.inflight.Guard` to release when the request ends (the proxy does
it in its ``logging`` hook, which runs on every exit path). A process that dies with
units held gives them back within a second (:meth:`~ferryman.limits.arena.SharedArena.
sweep`).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from typing import Final

from ferryman.limits.arena import ArenaFull, SharedArena, Zone, default_arena, log
from ferryman.limits.estimator import Estimator, Key
from ferryman.limits.inflight import Guard

__all__ = ["Limiter", "Verdict", "parse_rate", "RATE_UNITS"]

#: Seconds per unit of a rate (``100/s``, ``6000/m``, ``1000/h``, ``10000/d``).
RATE_UNITS: Final = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
_RATE_RE: Final = re.compile(r"^\s*(\d+)\s*(?:r|req|requests?)?\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*$")

_WORD: Final = 8
_IDS: Final = 2 * _WORD  # the window index each of the two estimators holds


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/s"`` → ``(100, 1.0)``: events and the period in seconds. Accepts
    ``N/UNIT``, ``N/<number>UNIT`` (``10/5s``), and nginx's ``100r/s``; units s, m, h, d
    (or sec, min, minute, hour, day). Raises ValueError."""
    m = _RATE_RE.match(text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a rate such as 100/s, 6000/m or 10/5s")
    count = int(m.group(1))
    unit = RATE_UNITS.get(m.group(3))
    if unit is None:
        raise ValueError(f"{text!r}: unknown unit {m.group(3)!r} (s, m, h or d)")
    scale = float(m.group(2)) if m.group(2) not in ("", ".") else 1.0
    if count < 1 or not scale > 0:
        raise ValueError(f"{text!r}: a rate needs at least 1 event per a positive period")
    return count, unit * scale


class Verdict:
    """The answer to one request.

    Attributes:
        admitted: whether the request may go on.
        reason: why it may not: ``"rate"`` or ``"concurrency"`` (None when admitted).
        quota: requests the window admits (0 without a rate).
        remaining: requests left in the window after this one (0 when refused).
        reset: seconds until the window's quota is back (0.0 without a rate).
        retry_after: when refused, seconds until a request would be admitted.
        window: the window's length in seconds (0.0 without a rate).
        guard: the concurrency unit to release when the request ends, or None.
    """

    __slots__ = ("admitted", "reason", "quota", "remaining", "reset", "retry_after", "window",
                 "guard")

    def __init__(
        self,
        admitted: bool,
        reason: str | None = None,
        quota: int = 0,
        remaining: int = 0,
        reset: float = 0.0,
        retry_after: float = 0.0,
        window: float = 0.0,
        guard: Guard | None = None,
    ) -> None:
        self.admitted = admitted
        self.reason = reason
        self.quota = quota
        self.remaining = remaining
        self.reset = reset
        self.retry_after = retry_after
        self.window = window
        self.guard = guard

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``RateLimit-Limit``, ``-Remaining``, ``-Reset`` and ``-Policy`` (draft-ietf-
        httpapi-ratelimit-headers-06; the policy's ``w`` is whole seconds, so it is left
        out for a window that is not), empty without a rate."""
        if not self.quota:
            return []
        out = [
            (b"RateLimit-Limit", b"%d" % self.quota),
            (b"RateLimit-Remaining", b"%d" % self.remaining),
            (b"RateLimit-Reset", b"%d" % math.ceil(self.reset)),
        ]
        if self.window == int(self.window):
            out.append((b"RateLimit-Policy", b"%d;w=%d" % (self.quota, self.window)))
        return out

    def retry_after_value(self) -> bytes:
        """``Retry-After`` in whole seconds, at least 1 (RFC 9110 §10.2.3)."""
        return b"%d" % max(1, math.ceil(self.retry_after))


class _SharedGuard(Guard):
    """A concurrency unit counted in this process's region of a zone."""

    __slots__ = ("_est", "_hash")

    def __init__(self, est: Estimator, h: int, key: bytes | str) -> None:
        self._owner = None  # (the base class's owner is unused)
        self.key = key
        self._est: Estimator | None = est
        self._hash = h

    @property
    def released(self) -> bool:
        return self._est is None

    def release(self) -> None:
        est, self._est = self._est, None
        if est is not None:
            est.incr_hash(self._hash, -1)


class _Region:
    """Views over one process's region: the window ids, the two window sketches and the
    in-progress sketch."""

    __slots__ = ("ids", "windows", "inflight")

    def __init__(self, view: memoryview, hashes: int, slots: int, inflight_slots: int,
                 windowed: bool) -> None:
        at = 0
        self.ids = view[0:_IDS].cast("q")
        at = _IDS
        size = Estimator.buffer_size(hashes, slots) if windowed else 0
        if windowed:
            self.windows: tuple[Estimator, ...] = (
                Estimator(hashes, slots, buffer=view[at : at + size]),
                Estimator(hashes, slots, buffer=view[at + size : at + 2 * size]),
            )
        else:
            self.windows = ()
        at += 2 * size
        self.inflight = (
            Estimator(hashes, inflight_slots, buffer=view[at:]) if inflight_slots else None
        )


class Limiter:
    """A rate and/or concurrency limit per key, shared by the processes of an arena.

    Args:
        rate: events per period, e.g. ``"100/s"`` or ``(100, 1.0)``; None: no rate.
        burst: requests admitted at once (see the module docstring); None: the rate's
            count.
        concurrency: requests in progress at once per key; None: no such limit.
        name: the zone's name in the arena: limiters of the same name, window and sizes
            share counts (so a reloaded config keeps them, also when only the quota
            changed); default a name of the limits.
        arena: the shared memory; default :func:`~ferryman.limits.arena.default_arena`.
            Built in a process other than the one that made the arena, or when the arena
            is full, the counts are this process's own (logged).
        hashes, slots: the rate sketches' rows and counters per row.
        inflight_slots: counters per row of the concurrency sketch.
        clock: seconds, monotonic; the same clock in every process.
    """

    def __init__(
        self,
        rate: str | tuple[int, float] | None = None,
        *,
        burst: int | None = None,
        concurrency: int | None = None,
        name: str | None = None,
        arena: SharedArena | None = None,
        hashes: int = 4,
        slots: int = 16384,
        inflight_slots: int = 4096,
        seed: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is None and concurrency is None:
            raise ValueError("a limiter needs a rate, a concurrency or both")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        if burst is not None and rate is None:
            raise ValueError("burst needs a rate")
        self.count, self.period = parse_rate(rate) if isinstance(rate, str) else (rate or (0, 0.0))
        #: requests the window admits, and the window's length (seconds)
        self.quota = burst if burst is not None else self.count
        self.window = self.quota * self.period / self.count if self.count else 0.0
        self.concurrency = concurrency or 0
        self.hashes = hashes
        self.clock = clock
        self._seed = seed
        self._slots = slots if self.quota else 0
        self._inflight_slots = inflight_slots if self.concurrency else 0
        windows = 2 * Estimator.buffer_size(hashes, self._slots) if self.quota else 0
        volatile_from = _IDS + windows
        region_size = volatile_from + Estimator.buffer_size(hashes, self._inflight_slots)
        if name is None:
            name = f"limit:{self.quota}/{self.window}:{self.concurrency}"
        self.name = name
        self._hasher = Estimator(1, 1, seed=seed)  # (hashing only)
        if arena is None:
            arena = default_arena()
        self.arena = arena
        self._zone: Zone | None = None
        try:
            # (the window is in the zone's name: counts of another window length mean
            # nothing to this one, but a new quota over the same window keeps them)
            self._zone = arena.zone(
                f"{name}:{self.window!r}:{hashes}x{slots}:{inflight_slots}:{seed.hex()}",
                region_size, volatile_from,
            )
        except ArenaFull as exc:
            log.error("limit %s: counted per process, not shared (%s)", name, exc)
        self._region_size = region_size
        self._volatile_from = volatile_from
        self._private: memoryview | None = None
        self._own: _Region | None = None
        self._own_pid = 0
        self._regions: list[_Region] = []
        self._seen: list[tuple[int, memoryview]] | None = None

    # -- regions --------------------------------------------------------------------------

    def _mine(self) -> _Region:
        pid = os.getpid()
        own = self._own
        if own is not None and self._own_pid == pid:
            return own
        view: memoryview | None = None
        if self._zone is not None:
            try:
                view = self._zone.own()
            except ArenaFull as exc:
                log.error("limit %s: counted per process, not shared (%s)", self.name, exc)
                self._zone = None
        if view is None:
            view = self._private = memoryview(bytearray(self._region_size))
        own = _Region(view, self.hashes, self._slots, self._inflight_slots, bool(self.quota))
        ids = own.ids
        if ids[0] == 0 and ids[1] == 0:
            ids[0] = ids[1] = -1  # (zeroed memory: window 0 is a real window)
        self._own = own
        self._own_pid = pid
        self._seen = None
        return own

    def _all(self) -> list[_Region]:
        zone = self._zone
        if zone is None:
            own = self._own
            return [own] if own is not None else []
        views = zone.regions()
        if views is not self._seen:
            mine = self._own
            slot = self.arena.slot()
            regions = []
            for s, v in views:
                if s == slot and mine is not None:
                    regions.append(mine)
                else:
                    regions.append(
                        _Region(v, self.hashes, self._slots, self._inflight_slots,
                                bool(self.quota))
                    )
            self._regions = regions
            self._seen = views
        return self._regions

    # -- deciding -------------------------------------------------------------------------

    def key_hash(self, key: Key) -> int:
        """The hash :meth:`check_hash` takes (the same in every process)."""
        return self._hasher.key_hash(key)

    def check(self, key: Key, now: float | None = None) -> Verdict:
        """Admit or refuse a request of ``key`` at ``now``, counting it when admitted."""
        return self.check_hash(self._hasher.key_hash(key), key, now)

    def check_hash(self, h: int, key: Key = b"", now: float | None = None) -> Verdict:
        """``check`` by the key's :meth:`key_hash` (``key`` is only recorded on the guard)."""
        own = self._mine()
        regions = self._all()
        if now is None:
            now = self.clock()
        self.arena.sweep(time.monotonic())  # (its own clock: ``now`` may be anyone's)
        guard: Guard | None = None
        if self.concurrency:
            inflight = 0
            for r in regions:
                est = r.inflight
                if est is not None:
                    inflight += est.get_hash(h)
            if inflight >= self.concurrency:
                return Verdict(False, "concurrency", retry_after=1.0)
            est = own.inflight
            assert est is not None
            est.incr_hash(h, 1)
            guard = _SharedGuard(est, h, key)
        if not self.quota:
            return Verdict(True, guard=guard)
        window = self.window
        index = math.floor(now / window)
        fraction = now / window - index
        if fraction < 0.0:
            fraction = 0.0
        prev_index = index - 1
        ids = own.ids
        if ids[index & 1] != index:
            self._rotate(own, index)
        previous = 0
        current = 0
        for r in regions:
            rids = r.ids
            if rids[index & 1] == index:
                current += r.windows[index & 1].get_hash(h)
            if rids[prev_index & 1] == prev_index:
                previous += r.windows[prev_index & 1].get_hash(h)
        estimate = previous * (1.0 - fraction) + current
        quota = self.quota
        if estimate >= quota:
            if guard is not None:
                guard.release()
            return Verdict(
                False, "rate", quota, 0,
                reset=self._wait(previous, current, fraction),
                retry_after=self._wait(previous, current, fraction),
                window=window,
            )
        own.windows[index & 1].incr_hash(h, 1)
        estimate += 1
        remaining = max(0, math.floor(quota - estimate))
        reset = (1.0 - fraction) * window if remaining else self._wait(
            previous, current + 1, fraction
        )
        return Verdict(True, None, quota, remaining, reset, 0.0, window, guard)

    def _wait(self, previous: float, current: float, fraction: float) -> float:
        """Seconds until the estimate falls below the quota again (nothing more counted)."""
        quota = self.quota
        window = self.window
        if current < quota:
            if previous <= 0:
                return 0.0
            # previous * (1 - f') + current < quota
            target = 1.0 - (quota - current) / previous
            return max(0.0, target - fraction) * window
        # the next window: current * (1 - f'') < quota
        return (1.0 - fraction + max(0.0, 1.0 - quota / current)) * window

    @staticmethod
    def _rotate(own: _Region, index: int) -> None:
        """Start window ``index`` in this process's region (readers see it empty until
        its id is written, after the zeroing)."""
        slot = index & 1
        own.ids[slot] = -1
        own.windows[slot].reset()
        own.ids[slot] = index

    # -- reading --------------------------------------------------------------------------

    def inflight(self, key: Key) -> int:
        """Requests of ``key`` in progress, all processes together."""
        self._mine()
        h = self._hasher.key_hash(key)
        return sum(r.inflight.get_hash(h) for r in self._all() if r.inflight is not None)

    def rate(self, key: Key, now: float | None = None) -> float:
        """The window's estimate for ``key`` at ``now``, all processes together."""
        if not self.quota:
            return 0.0
        self._mine()
        if now is None:
            now = self.clock()
        h = self._hasher.key_hash(key)
        index = math.floor(now / self.window)
        fraction = max(0.0, now / self.window - index)
        previous = current = 0
        for r in self._all():
            if r.ids[index & 1] == index:
                current += r.windows[index & 1].get_hash(h)
            if r.ids[(index - 1) & 1] == index - 1:
                previous += r.windows[(index - 1) & 1].get_hash(h)
        return previous * (1.0 - fraction) + current
