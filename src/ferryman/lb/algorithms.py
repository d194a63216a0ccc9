"""Load-balancing selection algorithms: which backend of an upstream group serves a request.

Every algorithm is a :class:`Selector` over a fixed, immutable list of :class:`Backend`
objects; a membership change builds a new selector. Per-request cost is what matters here,
so everything that depends only on the list (cumulative weights, the consistent-hash ring)
is precomputed in ``__init__``, and the common case (``accept`` is None, or accepts the
first candidate) takes the shortest path.

=================  =========================================================================
``round_robin``    nginx's smooth weighted round robin
``random``         weighted random
``hash``           FNV-1a 64 of a caller-supplied key, proportional to weights, nginx rehash
``consistent``     Ketama ring, point-for-point compatible with nginx ``hash $key consistent``
``least_conn``     nginx's least_conn: fewest in-flight requests per weight
``p2c_ewma``       power of two choices over a peak-EWMA of latency (Finagle / Linkerd)
=================  =========================================================================

The ``accept`` predicate passed to :meth:`Selector.select` is how callers exclude backends
(unhealthy, ejected, already tried by this request): a rejected backend is never returned,
and each algorithm degrades the way nginx does when a peer is down or already tried.
"""

from __future__ import annotations

import math
import time
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from hashlib import blake2b
from random import random
from typing import ClassVar, Final

from mypy_extensions import mypyc_attr

from ferryman.lb.backend import Backend

__all__ = [
    "ALGORITHMS",
    "Consistent",
    "Hash",
    "LeastConn",
    "P2CEwma",
    "Random",
    "RoundRobin",
    "Selector",
    "chash_points",
    "chash_server_base",
    "fnv1a_64",
]

Accept = Callable[[Backend], bool]

_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
_MASK64: Final = 0xFFFFFFFFFFFFFFFF

#: Keys longer than this are condensed with BLAKE2b before FNV-1a (see ``Hash.select``).
MAX_FNV_KEY: Final = 64
#: nginx's limit on rehash / ring-walk attempts before it gives up on the key.
_HASH_TRIES: Final = 20
#: Ring points per unit of weight (nginx and Cache::Memcached::Fast use 160).
_POINTS_PER_WEIGHT: Final = 160
#: Random draws tried before falling back to a scan of the accepted backends.
_RANDOM_TRIES: Final = 3
#: p2c: a cost must be below this fraction of the other's to win (float rounding is a tie).
_TIE: Final = 1.0 - 1e-9


def fnv1a_64(data: bytes) -> int:
    """The 64-bit FNV-1a hash of ``data`` (offset basis 0xcbf29ce484222325, prime 2**40+0x1b3)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


class _SmoothWRR:
    """nginx's smooth weighted round robin state (``ngx_http_upstream_get_peer``).

    Each pick adds every eligible peer's weight to its ``current`` weight, takes the peer with
    the largest ``current`` (the first one on ties) and subtracts the eligible total from it.
    Ineligible peers are left out of the pick entirely and keep their ``current`` weight.
    Over any run of picks with a fixed eligible set, each peer gets exactly its share of
    every ``sum(weights)`` picks, interleaved as evenly as possible.
    """

    __slots__ = ("weights", "current", "total")

    def __init__(self, weights: list[int]) -> None:
        self.weights = weights
        self.current = [0] * len(weights)
        self.total = sum(weights)

    def pick(self, backends: Sequence[Backend], accept: Accept | None) -> int:
        """The index picked among the backends ``accept`` allows, or -1 if it allows none."""
        weights = self.weights
        current = self.current
        best = -1
        best_cw = 0
        if accept is None:
            for i in range(len(weights)):
                cw = current[i] + weights[i]
                current[i] = cw
                if best < 0 or cw > best_cw:
                    best = i
                    best_cw = cw
            if best >= 0:
                current[best] = best_cw - self.total
            return best
        total = 0
        for i in range(len(weights)):
            if not accept(backends[i]):
                continue
            w = weights[i]
            cw = current[i] + w
            current[i] = cw
            total += w
            if best < 0 or cw > best_cw:
                best = i
                best_cw = cw
        if best >= 0:
            current[best] = best_cw - total
        return best

    def pick_among(self, indices: list[int]) -> int:
        """The index picked among ``indices`` (all eligible, non-empty)."""
        weights = self.weights
        current = self.current
        best = -1
        best_cw = 0
        total = 0
        for i in indices:
            w = weights[i]
            cw = current[i] + w
            current[i] = cw
            total += w
            if best < 0 or cw > best_cw:
                best = i
                best_cw = cw
        current[best] = best_cw - total
        return best


def _cumulative(weights: list[int]) -> list[int]:
    out: list[int] = []
    acc = 0
    for w in weights:
        acc += w
        out.append(acc)
    return out


@mypyc_attr(allow_interpreted_subclasses=True)
class Selector:
    """Base class: chooses one backend among a fixed list.

    Contract:

    * ``backends`` is fixed for the selector's life (a tuple, possibly empty); a change of
      membership or weights means building a new selector. State that belongs to the
      algorithm (round-robin positions) lives in the selector; per-backend live state
      (``inflight``, ``ewma``, health) lives on the :class:`Backend` objects, which the
      caller maintains.
    * :meth:`select` returns a backend for which ``accept(backend)`` is true (``accept`` None
      means every backend is acceptable), or None when no backend is accepted or the list is
      empty. Callers use ``accept`` to exclude unhealthy or ejected backends and the ones a
      retried request already tried. ``accept`` may be called several times per selection
      and should be cheap and free of side effects.
    * ``key`` is only used by algorithms with ``uses_key`` True (``hash``, ``consistent``);
      the caller computes it (client address, a header, a cookie...). As in nginx, an empty
      key means "no key": those algorithms then spread requests by smooth weighted round
      robin instead of sending every keyless request to one backend.
    * :meth:`observe` reports a finished request's latency (used by ``p2c_ewma``).
    * Every algorithm honours ``Backend.weight`` (>= 1), read once at construction.
    * Selectors are not thread-safe; use one per event loop / thread.
    """

    __slots__ = ("backends", "_weights", "_cum", "_total", "_equal")

    #: The algorithm's name in configuration files.
    name: ClassVar[str] = ""
    #: True when :meth:`select` needs the caller to compute a ``key``.
    uses_key: ClassVar[bool] = False

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        # the weight tables most algorithms draw on, built once
        self._weights = [b.weight for b in self.backends]
        self._cum = _cumulative(self._weights)
        self._total = sum(self._weights)
        self._equal = len(set(self._weights)) <= 1

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """Return a backend with ``accept(b)`` true (``accept`` None = every backend), or None
        when no backend is accepted (or the list is empty). Each algorithm provides it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement select()")

    def observe(self, backend: Backend, latency: float, now: float) -> None:
        """Record that a request to ``backend`` took ``latency`` seconds, finishing at ``now``
        (``time.monotonic()``). No-op except for latency-aware algorithms."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(b.name for b in self.backends)})"


@mypyc_attr(allow_interpreted_subclasses=True)
class RoundRobin(Selector):
    """nginx's smooth weighted round robin.

    Each pick adds every eligible backend's weight to its current weight, picks the backend
    with the highest current weight (the earliest on ties) and subtracts the eligible total
    from it (``ngx_http_upstream_get_peer``). Weights 5, 1, 1 give ``a a b a c a a``: each
    backend gets exactly its share of every ``sum(weights)`` picks, spread evenly rather than
    in bursts.

    Rejected backends (``accept`` false) are excluded from the pick, as nginx skips down and
    already-tried peers: the others share the traffic by their weights and the rejected one
    keeps its current weight for when it comes back.

    When all weights are equal the same sequence is a plain rotating index (O(1) when
    ``accept`` is None); rejected backends are skipped and the rotation continues after the
    chosen one, which is what the smooth algorithm does with equal weights.
    """

    __slots__ = ("_next", "_wrr")

    name: ClassVar[str] = "round_robin"
    uses_key: ClassVar[bool] = False

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._next = 0
        self._wrr = _SmoothWRR(self._weights)

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """The next backend in smooth weighted round-robin order that ``accept`` allows."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return None
        if not self._equal:
            i = self._wrr.pick(backends, accept)
            return backends[i] if i >= 0 else None
        i = self._next
        if accept is None:
            self._next = i + 1 if i + 1 < n else 0
            return backends[i]
        for _ in range(n):
            b = backends[i]
            i = i + 1 if i + 1 < n else 0
            if accept(b):
                self._next = i
                return b
        return None


@mypyc_attr(allow_interpreted_subclasses=True)
class Random(Selector):
    """Weighted random choice.

    A backend of weight ``w`` is drawn with probability ``w / sum(weights)`` (cumulative
    weights and a bisection over ``random.random()``). A rejected draw is retried a few times;
    if those draws are all rejected, the choice is made by weight among the accepted backends
    (so the distribution stays proportional among them, and None means none is accepted).
    """

    __slots__ = ()

    name: ClassVar[str] = "random"
    uses_key: ClassVar[bool] = False

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """A random backend, by weight, among those ``accept`` allows."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return None
        equal = self._equal
        cum = self._cum
        total = self._total
        for _ in range(_RANDOM_TRIES):
            if equal:
                b = backends[int(random() * n)]
            else:
                b = backends[bisect_right(cum, random() * total)]
            if accept is None or accept(b):
                return b
        ok = [b for b in backends if accept is None or accept(b)]
        if not ok:
            return None
        r = random() * sum(b.weight for b in ok)
        for b in ok:
            r -= b.weight
            if r < 0:
                return b
        return ok[-1]


@mypyc_attr(allow_interpreted_subclasses=True)
class Hash(Selector):
    """Hashing of a caller-supplied key: the same key goes to the same backend.

    The key's 64-bit FNV-1a hash, modulo the total weight, falls into one backend's span of
    the cumulative weights, so each backend gets keys in proportion to its weight. While
    membership and health are unchanged a key always maps to the same backend; a membership
    change remaps most keys (use ``consistent`` to move only ~1/N of them).

    If the chosen backend is rejected, the key is rehashed as nginx does (the attempt number
    is prefixed to the key: ``b"1" + key``, ``b"2" + key``, ...) up to 20 times; then the
    backends are scanned in list order from the originally hashed one and the first accepted
    is used (nginx switches to round robin there; the scan keeps the choice stable per key).
    Keys of accepted backends never move when other backends are rejected.

    An empty key means "no key" (nginx behaviour): smooth weighted round robin. Keys longer
    than ``MAX_FNV_KEY`` bytes are condensed with BLAKE2b first (FNV-1a costs a Python step
    per byte), so a long key costs no more than a short one.
    """

    __slots__ = ("_wrr",)

    name: ClassVar[str] = "hash"
    uses_key: ClassVar[bool] = True

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._wrr = _SmoothWRR(self._weights)

    def _index(self, h: int) -> int:
        if self._equal:
            return h % len(self.backends)
        return bisect_right(self._cum, h % self._total)

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """The backend ``key`` hashes to, or its nginx-style rehash if that one is rejected."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return None
        if not key:
            i = self._wrr.pick(backends, accept)
            return backends[i] if i >= 0 else None
        if len(key) > MAX_FNV_KEY:
            # FNV-1a runs a Python step per byte: a long (possibly attacker-sized) key is
            # first condensed at C speed, so every key costs about the same
            key = blake2b(key, digest_size=16).digest()
        first = self._index(fnv1a_64(key))
        b = backends[first]
        if accept is None or accept(b):
            return b
        if n == 1:
            return None
        rejected = {first}
        for attempt in range(1, _HASH_TRIES + 1):
            i = self._index(fnv1a_64(b"%d" % attempt + key))
            if i in rejected:
                continue
            b = backends[i]
            if accept(b):
                return b
            rejected.add(i)
            if len(rejected) == n:
                return None
        for step in range(1, n):
            i = (first + step) % n
            if i in rejected:
                continue
            b = backends[i]
            if accept(b):
                return b
        return None


def chash_server_base(server: bytes) -> int:
    """nginx's per-server base CRC32 of the consistent-hash ring (``ngx_http_upstream_init_chash``).

    The server string as written in the configuration (``host:port``, ``[v6]:port``,
    ``unix:/path``) is split like nginx does: ``unix:`` prefix -> host is the path, no port;
    otherwise a trailing ``:digits`` is the port; otherwise no port. The base is
    ``crc32(host + b"\\0" + port)`` left unfinalised in nginx and continued per point; zlib's
    ``crc32(data, start)`` continuation is equivalent.
    """
    if server[:5].lower() == b"unix:":
        host, port = server[5:], b""
    else:
        j = len(server)
        while j > 0 and 48 <= server[j - 1] <= 57:
            j -= 1
        if j > 0 and server[j - 1] == 58:  # ':'
            host, port = server[: j - 1], server[j:]
        else:
            host, port = server, b""
    return zlib.crc32(host + b"\0" + port)


def chash_points(servers: Sequence[tuple[bytes, int]]) -> tuple[list[int], list[int]]:
    """The nginx consistent-hash ring of ``(server, weight)`` pairs: ``(hashes, owners)``.

    ``160 * weight`` points per server: ``point_j = crc32(prev_hash as 4 little-endian bytes)``
    continued from the server's base CRC, ``prev_hash`` starting at 0 and then being the
    previous point. Points are sorted by hash and duplicate hashes dropped, keeping the first
    (nginx's qsort keeps the earlier server in practice; collisions are astronomically rare).
    ``owners[i]`` is the index in ``servers`` of the server owning ``hashes[i]``.
    """
    points: list[tuple[int, int]] = []
    for index, (server, weight) in enumerate(servers):
        base = chash_server_base(server)
        prev = 0
        for _ in range(_POINTS_PER_WEIGHT * weight):
            prev = zlib.crc32(prev.to_bytes(4, "little"), base)
            points.append((prev, index))
    points.sort(key=lambda p: p[0])  # stable: equal hashes keep server order
    hashes: list[int] = []
    owners: list[int] = []
    last = -1
    for h, index in points:
        if h != last:
            hashes.append(h)
            owners.append(index)
            last = h
    return hashes, owners


@mypyc_attr(allow_interpreted_subclasses=True)
class Consistent(Selector):
    """Consistent hashing on a Ketama ring compatible with nginx's ``hash $key consistent``.

    Ring (``ngx_http_upstream_init_chash``): each backend contributes ``160 * weight`` points
    derived from its name (``"host:port"``, exactly the server string nginx hashes) so the
    same backends and weights give nginx's ring point for point; see :func:`chash_points`.

    Lookup (``ngx_http_upstream_get_chash_peer``): ``h = crc32(key)``; the key belongs to the
    first point with hash >= ``h``, wrapping to the first point. A backend's share of keys is
    approximately proportional to its weight (the ring's arcs vary by a few percent).
    Adding or removing a backend moves only the keys of the arcs it gains or loses (~1/N).

    Rejected backends: the walk continues to the following points of the ring until a point
    of an accepted backend is found; so a rejected backend's keys spread over its neighbours
    and every other key stays put. nginx walks 20 points further and then gives up on the
    key (round robin); here the walk goes on around the ring, which returns the same backend
    whenever nginx's walk finds one and stays deterministic per key when it would not.
    None only when no backend is accepted.

    An empty key means "no key" (nginx behaviour): smooth weighted round robin.
    """

    __slots__ = ("_hashes", "_owners", "_wrr")

    name: ClassVar[str] = "consistent"
    uses_key: ClassVar[bool] = True

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._hashes, self._owners = chash_points(
            [(b.name.encode(), b.weight) for b in self.backends]
        )
        self._wrr = _SmoothWRR(self._weights)

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """The owner of the first ring point at or after ``crc32(key)`` that ``accept`` allows."""
        backends = self.backends
        hashes = self._hashes
        npoints = len(hashes)
        if npoints == 0:
            return None
        if not key:
            i = self._wrr.pick(backends, accept)
            return backends[i] if i >= 0 else None
        p = bisect_left(hashes, zlib.crc32(key))
        if p == npoints:
            p = 0
        owners = self._owners
        b = backends[owners[p]]
        if accept is None or accept(b):
            return b
        n = len(backends)
        verdict: list[int] = [0] * n  # 0 unknown, 1 accepted, -1 rejected
        verdict[owners[p]] = -1
        rejected = 1
        if rejected == n:
            return None
        for _ in range(npoints - 1):
            p += 1
            if p == npoints:
                p = 0
            index = owners[p]
            v = verdict[index]
            if v == 0:
                b = backends[index]
                if accept(b):
                    return b
                verdict[index] = -1
                rejected += 1
                if rejected == n:
                    return None
        for b in backends:  # only reachable if a backend lost all its points to collisions
            if accept(b):
                return b
        return None


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastConn(Selector):
    """nginx's least_conn: the backend with the fewest in-flight requests per unit of weight.

    Among accepted backends, the one minimising ``inflight / weight`` wins (compared without
    division: ``a.inflight * b.weight < b.inflight * a.weight``). Ties are broken by smooth
    weighted round robin among the tied backends (``ngx_http_upstream_get_least_conn_peer``),
    so with equal load the traffic follows the weights exactly. Rejected backends are left
    out of both steps. The caller maintains ``Backend.inflight`` (increment when a request is
    sent, decrement when it ends).
    """

    __slots__ = ("_wrr",)

    name: ClassVar[str] = "least_conn"
    uses_key: ClassVar[bool] = False

    def __init__(self, backends: Sequence[Backend]) -> None:
        super().__init__(backends)
        self._wrr = _SmoothWRR(self._weights)

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """The least loaded accepted backend (relative to weight)."""
        backends = self.backends
        weights = self._weights
        best = -1
        best_inflight = 0
        best_weight = 1
        tied: list[int] = []
        for i in range(len(backends)):
            b = backends[i]
            if accept is not None and not accept(b):
                continue
            inflight = b.inflight
            w = weights[i]
            if best < 0 or inflight * best_weight < best_inflight * w:
                best = i
                best_inflight = inflight
                best_weight = w
                tied = [i]
            elif inflight * best_weight == best_inflight * w:
                tied.append(i)
        if best < 0:
            return None
        if len(tied) > 1:
            best = self._wrr.pick_among(tied)
        return backends[best]


@mypyc_attr(allow_interpreted_subclasses=True)
class P2CEwma(Selector):
    """Power of two choices over a peak-EWMA of latency (Finagle's / Linkerd's balancer).

    Each selection draws two distinct accepted backends at random, by weight (one accepted
    backend: that one), and takes the one with the lower cost
    ``ewma * (1 + inflight / weight)``; on equal costs (within float rounding) the first
    drawn wins, which is itself a weighted random choice. Comparing just two random
    candidates avoids the herd behaviour of always choosing the global minimum while still
    steering most traffic away from slow or loaded backends.

    Weights: they enter twice, consistently. Candidates are drawn in proportion to weight,
    so with equal latencies and no load the traffic follows the weights exactly; and load is
    counted per unit of weight (``inflight / weight``), so a backend of weight 3 is as
    "busy" with 3 requests in flight as a weight-1 backend with 1. (Dividing the whole cost
    by the weight instead would make a heavier backend win every comparison it takes part in
    when idle: weights 3, 1, 1 would send it ~90% of the traffic, not 60%.)

    ``ewma`` is the backend's peak-EWMA latency (:meth:`observe`), decayed towards zero with
    the time since its last observation when read (as Finagle and Linkerd do), so a backend
    that was slow once is eventually tried again instead of being starved forever. A backend
    never observed (``ewma_time == 0.0``) counts as average: it uses the mean (decayed) EWMA
    of the observed ones, or ``default_ewma`` (1 ms) if none is, so a new backend gets
    traffic right away, winning against slower-than-average ones and tying with average ones.

    Rejected backends: a rejected draw is redrawn a few times, then the candidates are drawn
    among the accepted backends only.
    """

    __slots__ = ("decay", "default_ewma", "clock")

    name: ClassVar[str] = "p2c_ewma"
    uses_key: ClassVar[bool] = False

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        decay: float = 10.0,
        default_ewma: float = 0.001,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``decay``: the EWMA time constant in seconds; ``default_ewma``: the latency assumed
        for unobserved backends when no backend has been observed; ``clock``: the monotonic
        clock :meth:`observe` timestamps come from."""
        super().__init__(backends)
        if decay <= 0:
            raise ValueError(f"decay must be > 0, got {decay}")
        self.decay = decay
        self.default_ewma = default_ewma
        self.clock = clock

    def _draw(self, exclude: int) -> int:
        """A random index by weight, never ``exclude`` (-1: none excluded); needs n >= 2."""
        if exclude < 0:
            return bisect_right(self._cum, random() * self._total)
        w = self._weights[exclude]
        r = random() * (self._total - w)
        if r >= self._cum[exclude] - w:  # skip over the excluded backend's span
            r += w
        n = len(self._weights)
        i = bisect_right(self._cum, r)
        if i >= n:  # r + w rounded up to the total
            i = n - 1
        return i if i != exclude else (i + 1) % n

    def _draw_accepted(self, accept: Accept | None, exclude: int) -> int:
        """A random accepted index by weight, not ``exclude``; -1 if there is none."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return -1
        if n == 1:
            if exclude < 0 and (accept is None or accept(backends[0])):
                return 0
            return -1
        for _ in range(_RANDOM_TRIES):
            i = self._draw(exclude)
            if accept is None or accept(backends[i]):
                return i
        if accept is None:  # unreachable: draws without accept always succeed
            return -1
        ok = [i for i in range(n) if i != exclude and accept(backends[i])]
        if not ok:
            return -1
        r = random() * sum(self._weights[i] for i in ok)
        for i in ok:
            r -= self._weights[i]
            if r < 0:
                return i
        return ok[-1]

    def _ewma(self, b: Backend, now: float) -> float:
        elapsed = now - b.ewma_time
        return b.ewma * math.exp(-elapsed / self.decay) if elapsed > 0 else b.ewma

    def _unobserved_ewma(self, now: float) -> float:
        total = 0.0
        count = 0
        for b in self.backends:
            if b.ewma_time != 0.0:
                total += self._ewma(b, now)
                count += 1
        return total / count if count else self.default_ewma

    def _cost(self, b: Backend, now: float, default: float) -> float:
        ewma = default if b.ewma_time == 0.0 else self._ewma(b, now)
        return ewma * (1.0 + b.inflight / b.weight)

    def select(self, key: bytes = b"", accept: Accept | None = None) -> Backend | None:
        """The cheaper of two random accepted backends."""
        backends = self.backends
        first = self._draw_accepted(accept, -1)
        if first < 0:
            return None
        second = self._draw_accepted(accept, first)
        if second < 0:
            return backends[first]
        a = backends[first]
        b = backends[second]
        now = self.clock()
        default = 0.0
        if a.ewma_time == 0.0 or b.ewma_time == 0.0:
            default = self._unobserved_ewma(now)
        cost_a = self._cost(a, now, default)
        cost_b = self._cost(b, now, default)
        # Costs within rounding of each other (same latency) are a tie: the first drawn wins.
        return b if cost_b < cost_a * _TIE else a

    def observe(self, backend: Backend, latency: float, now: float) -> None:
        """Update ``backend``'s peak EWMA with a request latency (seconds) finished at ``now``.

        A latency above the current value replaces it at once (peak sensitivity: a backend
        turning slow is avoided immediately); a lower one is blended in with weight
        ``1 - exp(-(now - ewma_time) / decay)``, so the value recovers over ~``decay`` seconds.
        """
        if latency < 0.0:
            latency = 0.0
        last = backend.ewma_time
        if last == 0.0 or latency > backend.ewma:
            backend.ewma = latency
        else:
            elapsed = now - last
            w = math.exp(-elapsed / self.decay) if elapsed > 0 else 1.0
            backend.ewma = backend.ewma * w + latency * (1.0 - w)
        backend.ewma_time = now


#: Algorithm name (as written in configuration) -> selector class.
ALGORITHMS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (RoundRobin, Random, Hash, Consistent, LeastConn, P2CEwma)
}
