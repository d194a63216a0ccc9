"""Per-key rates: a sliding-window ``Rate`` over count-min sketches, and a ``TokenBucket``.

Both are pure functions of the ``now`` passed in (seconds, any monotonic origin; the
default clock is ``time.monotonic``): nothing sleeps, so tests drive them with explicit
times.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ferryman.limits.estimator import Estimator, Key

__all__ = ["Rate", "TokenBucket"]

#: tokens that float rounding may lose: a client coming back after exactly the
#: retry-after it was given is let in
_SLACK = 1e-9


class Rate:
    """Events per key over a sliding window, estimated Cloudflare's way.

    Time is cut into windows aligned on multiples of ``window`` seconds (so processes
    sharing a clock agree on them). Two count-min ``Estimator``\\ s count the current and
    the previous window; the rate at ``now``, ``elapsed`` seconds into the current window,
    is ``previous * (window - elapsed) / window + current``: the previous window's events
    are assumed spread evenly over it, and the part of it still inside the sliding window
    ``(now - window, now]`` is counted pro rata. That is exact for evenly spread arrivals
    and close for anything whose rate changes slowly compared with the window (see
    ``tests/limits/test_limits_rate.py`` for how close on a trace). Rates are in events per
    window. The estimators' count-min error (``hashes``, ``slots``, see ``Estimator``) adds
    to this; keys never read below their true windows' counts.

    When ``now`` enters the next window the current estimator becomes the previous one and
    the older one is cleared; when more than one whole window passed, both are cleared.
    Time going backwards is treated as no time passing.
    """

    __slots__ = ("window", "_clock", "_ests", "_ids", "_start", "_cur", "_prev")

    def __init__(
        self,
        window: float,
        *,
        hashes: int = 4,
        slots: int = 1024,
        deterministic: bool = True,
        seed: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window > 0:
            raise ValueError("window must be positive")
        self.window = float(window)
        self._clock = clock
        self._ests = (
            Estimator(hashes, slots, deterministic=deterministic, seed=seed),
            Estimator(hashes, slots, deterministic=deterministic, seed=seed),
        )
        # the window index each estimator counts (estimator i holds windows with parity i)
        self._ids = [-2, -1]
        self._start = -math.inf  # start of the current window; first call rotates
        self._cur = self._ests[0]
        self._prev = self._ests[1]

    def _advance(self, now: float) -> float:
        """Rotate to the window holding ``now``; returns the fraction of it elapsed."""
        window = self.window
        elapsed = now - self._start
        if 0.0 <= elapsed < window:
            return elapsed / window
        if elapsed < 0.0:  # time went backwards: stay in the current window, at its start
            return 0.0
        index = math.floor(now / window)
        ests = self._ests
        ids = self._ids
        cur = ests[index & 1]
        if ids[index & 1] != index:
            cur.reset()
            ids[index & 1] = index
        prev = ests[(index - 1) & 1]
        if ids[(index - 1) & 1] != index - 1:  # more than a whole window went by
            prev.reset()
            ids[(index - 1) & 1] = index - 1
        self._cur = cur
        self._prev = prev
        self._start = index * window
        return min(max((now - self._start) / window, 0.0), 1.0)

    def observe(self, key: Key, events: int = 1, now: float | None = None) -> float:
        """Count ``events`` for ``key`` at ``now``; returns its rate (events per window)
        including them."""
        if now is None:
            now = self._clock()
        fraction = self._advance(now)
        cur = self._cur
        h = cur.key_hash(key)
        return self._prev.get_hash(h) * (1.0 - fraction) + cur.incr_hash(h, events)

    def rate(self, key: Key, now: float | None = None) -> float:
        """The key's rate at ``now`` (events per window), without counting anything."""
        if now is None:
            now = self._clock()
        fraction = self._advance(now)
        cur = self._cur
        h = cur.key_hash(key)
        return self._prev.get_hash(h) * (1.0 - fraction) + cur.get_hash(h)


class TokenBucket:
    """A token bucket per key: bursts of up to ``burst`` tokens, refilled at ``rate`` tokens
    per second.

    A key seen for the first time starts with a full bucket. Memory is bounded by
    ``max_keys`` buckets, kept in least-recently-used order: a bucket that has refilled to
    full is the same as no bucket, so ``expire(now)`` drops those that are certainly full
    (idle for ``burst / rate`` seconds or more) for free, and a new key arriving when
    ``max_keys`` buckets exist evicts the least recently used one; if that one was not yet
    full the eviction forgets its debt (counted in ``lossy_evictions``) — size ``max_keys``
    above the number of keys active within ``burst / rate`` seconds to avoid that.
    """

    __slots__ = ("rate", "burst", "max_keys", "lossy_evictions", "_buckets", "_clock")

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError("rate and burst must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        #: evictions of buckets that were not full (their keys got a fresh burst)
        self.lossy_evictions = 0
        # key -> [tokens, time of last update]; oldest (least recently used) first
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self, key: Hashable, tokens: float = 1, now: float | None = None
    ) -> tuple[bool, float]:
        """Take ``tokens`` from the key's bucket at ``now``. Returns ``(True, 0.0)`` if they
        were there (and are now taken), else ``(False, seconds)``: nothing is taken, and
        ``seconds`` from ``now`` the bucket will hold them (``inf`` if ``tokens > burst``)."""
        if now is None:
            now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if tokens > self.burst + _SLACK:
                return False, math.inf
            if len(buckets) >= self.max_keys:
                self._evict_one(now)
            buckets[key] = [self.burst - tokens, now]
            return True, 0.0
        buckets.move_to_end(key)
        level = bucket[0]
        elapsed = now - bucket[1]
        if elapsed > 0.0:
            level += elapsed * self.rate
            if level > self.burst:
                level = self.burst
            bucket[1] = now
        if level + _SLACK >= tokens:
            bucket[0] = level - tokens
            return True, 0.0
        bucket[0] = level
        if tokens > self.burst + _SLACK:
            return False, math.inf
        return False, (tokens - level) / self.rate

    def tokens(self, key: Hashable, now: float | None = None) -> float:
        """Tokens in the key's bucket at ``now`` (``burst`` for a key without a bucket)."""
        if now is None:
            now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)

    def _evict_one(self, now: float) -> None:
        _key, bucket = self._buckets.popitem(last=False)
        if bucket[0] + (now - bucket[1]) * self.rate < self.burst - _SLACK:
            self.lossy_evictions += 1

    def expire(self, now: float | None = None) -> int:
        """Drop the buckets idle long enough to be full again (for a periodic sweep);
        returns how many. Walks from the least recently used and stops at the first bucket
        used within ``burst / rate`` seconds, so the work is proportional to the drops."""
        if now is None:
            now = self._clock()
        buckets = self._buckets
        horizon = now - self.burst / self.rate
        dropped = 0
        while buckets:
            key = next(iter(buckets))
            if buckets[key][1] > horizon:
                break
            del buckets[key]
            dropped += 1
        return dropped
