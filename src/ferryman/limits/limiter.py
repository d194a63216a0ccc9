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
early. Each process's sketch over-counts a key by at most ``e * N / slots`` with
probability ``1 - exp(-hashes)`` (N: what that process admitted in the window, all keys
together), so the sum over P processes by at most ``e * N_total / slots``, N_total the
server's total (4 rows of 4096 slots by default: at 10,000 requests a window, about 7;
raise ``slots`` for busier servers). A region costs ``16 * hashes * slots`` bytes per
process for the rate and ``8 * hashes * inflight_slots`` for the concurrency.

Between processes no lock is taken per request: a decision counts the request first,
then reads every process's count, and takes its count back if that was one too many. So
the limit is never exceeded; two processes deciding at the same instant over a key's
last unit may both refuse (one request under, rarely).

Keys are hashed with Python's ``hash`` (keyed per interpreter, and the same in every
process forked from it: all that shares an arena).

Concurrency: requests in progress per key; :meth:`Limiter.check` returns a
:class:`LimitGuard` to release when the request ends (the proxy does
it in its ``logging`` hook, which runs on every exit path). A process that dies with
units held gives them back within a second (:meth:`~ferryman.limits.arena.SharedArena.
sweep`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Callable
from typing import Final

from ferryman.limits.arena import (
    ArenaFull,
    SharedArena,
    Zone,
    default_arena,
    fork_generation,
    log,
)
from ferryman.limits.estimator import Estimator, Key

__all__ = ["LimitGuard", "Limiter", "Verdict", "parse_rate", "RATE_UNITS"]

#: Seconds per unit of a rate (``100/s``, ``6000/m``, ``1000/h``, ``10000/d``).
RATE_UNITS: Final = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
    "d": 86400.0, "day": 86400.0,
}
#: The longest period (and window) a limit may have: a year.
MAX_PERIOD: Final = 366 * 86400.0
_RATE_RE: Final = re.compile(r"^\s*(\d+)\s*(?:r|req|requests?)?\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*$")

_WORD: Final = 8
_IDS: Final = 2 * _WORD  # the window index each of the two estimators holds
_MASK32: Final = 0xFFFFFFFF
_MASK64: Final = 0xFFFFFFFFFFFFFFFF


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
    if not unit * scale <= MAX_PERIOD:
        raise ValueError(f"{text!r}: the period is longer than a year")
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
        guard: LimitGuard | None = None,
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
        quota = self.quota
        if not quota:
            return []
        fixed = _FIXED_FIELDS.get((quota, self.window))
        if fixed is None:
            fixed = _fixed_fields(quota, self.window)
        out = [
            fixed[0],
            (b"RateLimit-Remaining", b"%d" % self.remaining),
            (b"RateLimit-Reset", b"%d" % math.ceil(self.reset)),
        ]
        if fixed[1] is not None:
            out.append(fixed[1])
        return out

    def retry_after_value(self) -> bytes:
        """``Retry-After`` in whole seconds, at least 1 (RFC 9110 §10.2.3)."""
        return b"%d" % max(1, math.ceil(self.retry_after))


#: The fields that depend only on the limit, per (quota, window): RateLimit-Limit and
#: RateLimit-Policy (None for a window of a fraction of a second).
_FIXED_FIELDS: dict[
    tuple[int, float], tuple[tuple[bytes, bytes], tuple[bytes, bytes] | None]
] = {}


def _fixed_fields(
    quota: int, window: float
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes] | None]:
    policy = None
    if window == int(window):
        policy = (b"RateLimit-Policy", b"%d;w=%d" % (quota, window))
    fixed = ((b"RateLimit-Limit", b"%d" % quota), policy)
    if len(_FIXED_FIELDS) < 1024:
        _FIXED_FIELDS[(quota, window)] = fixed
    return fixed


class LimitGuard:
    """One concurrency unit of a :class:`Limiter`, held until :meth:`release`: the
    counters of this process's region it added one to. Released exactly once, whichever
    way the request ends: :meth:`release` (idempotent), a ``with`` block, or, as a last
    resort, garbage collection."""

    __slots__ = ("key", "_words", "_cells")

    def __init__(self, words: memoryview, cells: list[int], key: bytes | str) -> None:
        #: The key the unit was taken for.
        self.key = key
        self._words: memoryview | None = words
        self._cells = cells

    @property
    def released(self) -> bool:
        """Whether the unit was given back."""
        return self._words is None

    def release(self) -> None:
        """Give the unit back (idempotent)."""
        words = self._words
        if words is not None:
            self._words = None
            for cell in self._cells:
                words[cell] -= 1

    def __enter__(self) -> LimitGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class Limiter:
    """A rate and/or concurrency limit per key, shared by the processes of an arena.

    Args:
        rate: events per period, e.g. ``"100/s"`` or ``(100, 1.0)``; None: no rate.
        burst: requests admitted at once (see the module docstring); None: the rate's
            count.
        concurrency: requests in progress at once per key; None: no such limit.
        name: the zone's name in the arena: limiters of the same name, window and sizes
            share counts (so a reloaded config keeps them, also when only the quota
            changed); default a name of this limiter alone.
        arena: the shared memory; default :func:`~ferryman.limits.arena.default_arena`.
            Its counts are shared by the processes forked after the arena was made (the
            limiter itself may be built before or after the fork). When the arena is
            full, they are this process's own (logged).
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
        slots: int = 4096,
        inflight_slots: int = 1024,
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
        if rate is not None and not (self.count >= 1 and 0 < self.period <= MAX_PERIOD):
            raise ValueError(
                f"a rate needs at least 1 event per a positive period of at most a year: "
                f"{rate!r}"
            )
        if burst is not None and not burst * self.period / self.count <= MAX_PERIOD:
            raise ValueError(f"burst {burst} makes a window longer than a year")
        #: requests the window admits, and the window's length (seconds)
        self.quota = burst if burst is not None else self.count
        self.window = self.quota * self.period / self.count if self.count else 0.0
        self.concurrency = concurrency or 0
        self.hashes = hashes
        self.clock = clock
        self._slots = slots if self.quota else 0
        self._inflight_slots = inflight_slots if self.concurrency else 0
        windows = 2 * Estimator.buffer_size(hashes, self._slots) if self.quota else 0
        volatile_from = _IDS + windows
        region_size = volatile_from + Estimator.buffer_size(hashes, self._inflight_slots)
        if name is None:
            # (unique to this limiter, and the same in the processes forked after it
            # was made, which share it: two limiters never share counts by accident)
            name = f"limit#{os.getpid()}.{next(_LIMITER_IDS)}"
        self.name = name
        if arena is None:
            arena = default_arena()
        self.arena = arena
        self._zone: Zone | None = None
        try:
            # (the window is in the zone's name: counts of another window length mean
            # nothing to this one, but a new quota over the same window keeps them)
            self._zone = arena.zone(
                f"{name}:{self.window!r}:{hashes}x{slots}:{inflight_slots}",
                region_size, volatile_from,
            )
        except ArenaFull as exc:
            log.error("limit %s: counted per process, not shared (%s)", name, exc)
        self._region_size = region_size
        # region layout, in 64-bit words: the two windows' ids, the two windows' sketches
        # (hashes rows of slots), the in-progress sketch (hashes rows of inflight_slots)
        self._wsize = hashes * self._slots
        self._inflight_at = 2 + 2 * self._wsize
        self._words: memoryview = memoryview(bytearray(8)).cast("q")
        self._own = -1  # word offset of this process's region
        self._offsets: list[int] = []  # word offsets of every process's region
        self._version = -1  # the zone's region count when _offsets was read
        self._version_word = self._zone.version_word if self._zone is not None else -1
        self._generation = -1  # fork generation _own belongs to

    # -- regions --------------------------------------------------------------------------

    def _bind(self) -> None:
        """Find this process's region (after a fork, a new one) and everybody's."""
        zone = self._zone
        own = -1
        if zone is not None:
            try:
                own = zone.own_offset() // 8
            except ArenaFull as exc:
                log.error("limit %s: counted per process, not shared (%s)", self.name, exc)
                self._zone = zone = None
                self._version_word = -1
        if zone is None:
            self._words = memoryview(bytearray(self._region_size)).cast("q")
            own = 0
            self._offsets = [0]
        else:
            self._words = self.arena.words
        words = self._words
        if words[own] == 0 and words[own + 1] == 0:
            words[own] = words[own + 1] = -1  # (zeroed memory: window 0 is a real window)
        self._own = own
        self._generation = fork_generation[0]
        self._version = -1
        self._refresh()

    def _refresh(self) -> None:
        zone = self._zone
        if zone is None:
            return
        version = self._words[self._version_word]
        if version != self._version:
            self._offsets = [offset // 8 for _slot, offset in zone.offsets()]
            self._version = version

    # -- deciding -------------------------------------------------------------------------

    def key_hash(self, key: Key) -> int:
        """The hash :meth:`check_hash` takes (the same in every process of a fork tree,
        all an arena can be shared by: Python's ``hash``, keyed per interpreter)."""
        if isinstance(key, str):
            key = key.encode()
        return hash(key) & _MASK64

    def check(self, key: Key, now: float | None = None) -> Verdict:
        """Admit or refuse a request of ``key`` at ``now``, counting it when admitted."""
        if isinstance(key, str):
            key = key.encode()
        return self.check_hash(hash(key) & _MASK64, key, now)

    def peek(self, key: Key, now: float | None = None) -> Verdict:
        """What :meth:`check` would answer, counting nothing and taking no unit (to
        check several limits before counting the request in any of them)."""
        if isinstance(key, str):
            key = key.encode()
        return self.check_hash(hash(key) & _MASK64, key, now, commit=False)

    def check_hash(
        self, h: int, key: Key = b"", now: float | None = None, commit: bool = True
    ) -> Verdict:
        """``check`` by the key's :meth:`key_hash` (``key`` is only recorded on the
        guard); with ``commit`` false, ``peek``."""
        if self._generation != fork_generation[0]:
            self._bind()
        elif self._version_word >= 0 and self._words[self._version_word] != self._version:
            self._refresh()
        arena = self.arena
        mono = time.monotonic()
        if mono >= arena.next_sweep:
            arena.sweep(mono)
        if now is None:
            now = self.clock()
        words = self._words
        offsets = self._offsets
        own = self._own
        hashes = self.hashes
        h1 = h & _MASK32
        h2 = (h >> 32) | 1
        guard: LimitGuard | None = None
        if self.concurrency:
            islots = self._inflight_slots
            cells = []
            at = self._inflight_at
            x = h1
            for _ in range(hashes):
                cells.append(at + x % islots)
                at += islots
                x += h2
            # (committing: take the unit first, then look, and give it back if that
            # made too many — two processes racing then both refuse rather than both
            # admit: the limit is never exceeded)
            mine = [own + c for c in cells]
            if commit:
                for c in mine:
                    words[c] += 1
            inflight = 0
            for o in offsets:
                inflight += _least(words, o, cells)
            if inflight > self.concurrency or (not commit and inflight >= self.concurrency):
                if commit:
                    for c in mine:
                        words[c] -= 1
                return Verdict(False, "concurrency", retry_after=1.0)
            if commit:
                guard = LimitGuard(words, mine, key)
        quota = self.quota
        if not quota:
            return Verdict(True, guard=guard)
        window = self.window
        index = math.floor(now / window)
        fraction = now / window - index
        if fraction < 0.0:
            fraction = 0.0
        cur_id = index & 1
        prev_id = cur_id ^ 1
        wsize = self._wsize
        cur_at = 2 + cur_id * wsize
        prev_at = 2 + prev_id * wsize
        slots = self._slots
        cells = []
        at = 0
        x = h1
        for _ in range(hashes):
            cells.append(at + x % slots)
            at += slots
            x += h2
        if words[own + cur_id] != index:
            self._rotate(own, cur_id, index)
        # (as for concurrency: count first, then look, and take it back if over)
        b = own + cur_at
        if commit:
            for c in cells:
                words[b + c] += 1
        previous = 0
        current = 0
        for o in offsets:
            if words[o + cur_id] == index:
                current += _least(words, o + cur_at, cells)
            if words[o + prev_id] == index - 1:
                previous += _least(words, o + prev_at, cells)
        if commit:
            current -= 1  # (this request's own count: the estimate is of those before)
        estimate = previous * (1.0 - fraction) + current
        if estimate >= quota:
            if commit:
                for c in cells:
                    words[b + c] -= 1
            if guard is not None:
                guard.release()
            # (at least a moment: at exactly the quota the estimate must still fall)
            wait = max(self._wait(previous, current, fraction), window * 1e-3)
            return Verdict(False, "rate", quota, 0, wait, wait, window)
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

    def _rotate(self, own: int, slot: int, index: int) -> None:
        """Start window ``index`` in this process's region (readers see it empty until
        its id is written, after the zeroing)."""
        words = self._words
        words[own + slot] = -1
        start = own + 2 + slot * self._wsize
        words[start : start + self._wsize] = _zeros(self._wsize)
        words[own + slot] = index

    # -- reading --------------------------------------------------------------------------

    def _sum(self, at: int, rows: int, h: int) -> int:
        """Every process's count-min estimate in the sketch at word ``at`` of a region."""
        if self._generation != fork_generation[0]:
            self._bind()
        self._refresh()
        words = self._words
        h1 = h & _MASK32
        h2 = (h >> 32) | 1
        cells = [r * rows + (h1 + r * h2) % rows for r in range(self.hashes)]
        return sum(min(words[o + at + c] for c in cells) for o in self._offsets)

    def inflight(self, key: Key) -> int:
        """Requests of ``key`` in progress, all processes together."""
        if not self.concurrency:
            return 0
        return self._sum(self._inflight_at, self._inflight_slots, self.key_hash(key))

    def rate(self, key: Key, now: float | None = None) -> float:
        """The window's estimate for ``key`` at ``now``, all processes together."""
        if not self.quota:
            return 0.0
        if now is None:
            now = self.clock()
        h = self.key_hash(key)
        index = math.floor(now / self.window)
        fraction = max(0.0, now / self.window - index)
        current = self._sum_window(index, h)
        previous = self._sum_window(index - 1, h)
        return previous * (1.0 - fraction) + current

    def _sum_window(self, index: int, h: int) -> int:
        if self._generation != fork_generation[0]:
            self._bind()
        self._refresh()
        words = self._words
        slot = index & 1
        at = 2 + slot * self._wsize
        slots = self._slots
        h1 = h & _MASK32
        h2 = (h >> 32) | 1
        cells = [r * slots + (h1 + r * h2) % slots for r in range(self.hashes)]
        return sum(
            min(words[o + at + c] for c in cells)
            for o in self._offsets
            if words[o + slot] == index
        )


def _least(words: memoryview, base: int, cells: list[int]) -> int:
    """A count-min estimate: the least of the counters ``base + cell`` of a sketch."""
    least: int = words[base + cells[0]]
    for c in cells:
        v: int = words[base + c]
        if v < least:
            least = v
    return least


_ZEROS: dict[int, memoryview] = {}
_LIMITER_IDS = itertools.count(1)


def _zeros(n: int) -> memoryview:
    """``n`` zero 64-bit words (kept: windows are cleared once per window length)."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = memoryview(bytes(8 * n)).cast("q")
    return z
