"""A count-min sketch of event counts per key, in bounded memory (Pingora's pingora-limits).

``Estimator`` keeps ``hashes`` rows of ``slots`` signed 64-bit counters. An increment adds to
one counter per row (chosen by the key's hash) and the estimate is the smallest of those
counters, so memory is ``8 * hashes * slots`` bytes whatever the number of distinct keys.

Error bound (Cormode and Muthukrishnan), for non-negative increments, with ``N`` the total
of all increments, ``ε = e / slots`` and ``δ = exp(-hashes)``::

    true count <= estimate                                        (always)
    estimate   <= true count + ε·N        with probability >= 1 - δ   (per key)

``Estimator.for_error(epsilon, delta)`` sizes the sketch from a target ``ε`` and ``δ``
(``slots = ceil(e/ε)``, ``hashes = ceil(ln(1/δ))``); ``epsilon`` and ``delta`` report the
bound of any sketch.

Hashing. By default keys are hashed with an 8-byte BLAKE2b digest, which is the same in
every process and on every machine, so a sketch kept in a shared buffer (see below) means
the same thing to every process that maps it; ``seed`` keys the hash (a secret seed stops
clients from choosing keys that collide with someone else's). ``deterministic=False`` uses
Python's ``hash()`` instead, about 0.35 µs faster per call: ``hash()`` of ``bytes``/``str``
is randomised per interpreter (PYTHONHASHSEED), and forked workers inherit their parent's
seed, so it agrees between the workers of one server but not between servers or
separately started processes — never use it for a buffer shared beyond one fork tree.
``str`` keys are UTF-8 encoded, so ``"a"`` and ``b"a"`` are the same key.

Shared counts. With ``buffer=`` (any writable buffer of at least
``Estimator.buffer_size(hashes, slots)`` bytes, e.g. a ``memoryview`` over an ``mmap``
shared by the workers of one server, or an ``array('q')``), the counters live in that
buffer: ``hashes * slots`` native-endian signed 64-bit integers, row after row, starting at
its first byte, nothing else (no header). Every process must use the same ``hashes``,
``slots``, ``deterministic`` and ``seed``. Updates are plain read-add-write, not atomic:
processes racing on one counter can lose an increment, so a shared sketch may undercount
slightly under contention (the ``estimate >= true count`` guarantee is per process).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from hashlib import blake2b
from typing import Any

__all__ = ["Estimator", "Key"]

Key = bytes | str

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_ITEM = 8  # bytes per counter (array typecode 'q')
_ABOVE_ANY = 1 << 63  # above any int64 counter


class Estimator:
    """A count-min sketch: per-key event counts that never underestimate, in fixed memory.

    ``hashes`` rows of ``slots`` counters (``8 * hashes * slots`` bytes, whatever the key
    cardinality); ``buffer`` optionally holds the counters (see the module docstring for
    the layout and the cross-process rules), ``deterministic`` and ``seed`` choose the
    hash. Estimates are within ``epsilon * total()`` of the true count with probability
    ``1 - delta`` per key, and never below it.
    """

    __slots__ = ("hashes", "slots", "deterministic", "_counts", "_raw", "_hasher", "_bases")

    def __init__(
        self,
        hashes: int = 4,
        slots: int = 1024,
        *,
        buffer: Any = None,
        deterministic: bool = True,
        seed: bytes = b"",
    ) -> None:
        if hashes < 1 or slots < 1:
            raise ValueError("hashes and slots must be at least 1")
        if slots > 1 << 32:
            raise ValueError("slots must be at most 2**32")
        if len(seed) > 64:
            raise ValueError("seed must be at most 64 bytes")
        self.hashes = hashes
        self.slots = slots
        self.deterministic = deterministic
        size = self.buffer_size(hashes, slots)
        if buffer is None:
            raw = memoryview(bytearray(size))
        else:
            raw = memoryview(buffer).cast("B")
            if raw.readonly:
                raise ValueError("buffer is read-only")
            if raw.nbytes < size:
                raise ValueError(
                    f"buffer has {raw.nbytes} bytes, {hashes}x{slots} counters need {size}"
                )
            raw = raw[:size]
        self._raw = raw
        self._counts = raw.cast("q")
        self._bases = tuple(range(0, hashes * slots, slots))  # where each row starts
        # a keyed (possibly empty-keyed) BLAKE2b state, copied per key
        self._hasher = blake2b(digest_size=8, key=seed)

    # -- sizing ---------------------------------------------------------------------------

    @classmethod
    def for_error(cls, epsilon: float, delta: float, **kwargs: Any) -> Estimator:
        """A sketch whose estimates exceed the true count by at most ``epsilon * N`` (N the
        total of all increments) with probability at least ``1 - delta``:
        ``slots = ceil(e / epsilon)``, ``hashes = ceil(ln(1 / delta))``. Other keyword
        arguments go to the constructor."""
        if not 0 < epsilon < 1 or not 0 < delta < 1:
            raise ValueError("epsilon and delta must be between 0 and 1")
        slots = math.ceil(math.e / epsilon)
        hashes = max(1, math.ceil(math.log(1 / delta)))
        return cls(hashes, slots, **kwargs)

    @staticmethod
    def buffer_size(hashes: int, slots: int) -> int:
        """Bytes a ``buffer`` must have for ``hashes`` rows of ``slots`` counters."""
        return _ITEM * hashes * slots

    @property
    def epsilon(self) -> float:
        """The relative error ``e / slots``: overestimates stay within ``epsilon * N``."""
        return math.e / self.slots

    @property
    def delta(self) -> float:
        """The probability ``exp(-hashes)`` that an estimate exceeds the ``epsilon`` bound."""
        return math.exp(-self.hashes)

    @property
    def buffer(self) -> memoryview:
        """The counters' bytes (the caller's buffer, or the sketch's own)."""
        return self._raw

    # -- hashing --------------------------------------------------------------------------

    def key_hash(self, key: Key) -> int:
        """The key's 64-bit hash, to pass to ``incr_hash``/``get_hash`` when one key is used
        several times (sketches built with the same ``deterministic`` and ``seed`` agree)."""
        if isinstance(key, str):
            key = key.encode()
        if not self.deterministic:
            return hash(key) & _MASK64
        h = self._hasher.copy()
        h.update(key)
        return int.from_bytes(h.digest(), "little")

    # -- counting -------------------------------------------------------------------------

    def incr(self, key: Key, value: int = 1) -> int:
        """Add ``value`` to the key's count; returns its new estimate."""
        return self.incr_hash(self.key_hash(key), value)

    def incr_hash(self, h: int, value: int = 1) -> int:
        """``incr`` by the key's ``key_hash``."""
        counts = self._counts
        slots = self.slots
        # double hashing (Kirsch and Mitzenmacher): row r uses h1 + r * h2
        h1 = h & _MASK32
        h2 = (h >> 32) | 1
        least = _ABOVE_ANY
        for base in self._bases:
            i = base + h1 % slots
            c = counts[i] + value
            counts[i] = c
            if c < least:
                least = c
            h1 += h2
        return least

    def incr_many(self, keys: Iterable[Key], value: int = 1) -> None:
        """Add ``value`` to the count of each key of the iterable ``keys`` (repeats count
        again): ``incr`` in one loop, for bulk loads."""
        counts = self._counts
        slots = self.slots
        bases = self._bases
        deterministic = self.deterministic
        hasher = self._hasher
        from_bytes = int.from_bytes
        for key in keys:
            if isinstance(key, str):
                key = key.encode()
            if deterministic:
                hh = hasher.copy()
                hh.update(key)
                h = from_bytes(hh.digest(), "little")
            else:
                h = hash(key) & _MASK64
            h1 = h & _MASK32
            h2 = (h >> 32) | 1
            for base in bases:
                counts[base + h1 % slots] += value
                h1 += h2

    def get(self, key: Key) -> int:
        """The key's estimated count (0 for a key never seen, unless it collides)."""
        return self.get_hash(self.key_hash(key))

    def get_hash(self, h: int) -> int:
        """``get`` by the key's ``key_hash``."""
        counts = self._counts
        slots = self.slots
        h1 = h & _MASK32
        h2 = (h >> 32) | 1
        least = _ABOVE_ANY
        for base in self._bases:
            c = counts[base + h1 % slots]
            if c < least:
                least = c
            h1 += h2
        return least

    def total(self) -> int:
        """N, the total of all increments (the sum of any one row)."""
        return sum(self._counts[: self.slots])

    def release(self) -> None:
        """Release the views on the buffer (so an ``mmap`` under it can be closed); the
        estimator is unusable afterwards."""
        self._counts.release()
        self._raw.release()

    def reset(self) -> None:
        """Set every count to zero (in place, so a shared buffer is cleared for all)."""
        self._raw[:] = bytes(self._raw.nbytes)
