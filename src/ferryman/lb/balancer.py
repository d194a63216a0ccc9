"""LoadBalancer: an upstream group — its backends, a selection algorithm, and health.

A :class:`LoadBalancer` owns the current :class:`Backend` list of one group and a
:class:`~ferryman.lb.algorithms.Selector` built over it. Three things can keep a backend out
of a pick:

* the **active** health checks' verdict (``backend.healthy``, set by :meth:`set_health`,
  fed by a :class:`~ferryman.lb.monitor.GroupMonitor` running in-process or in the server's
  control process);
* **passive** ejection: ``PassiveHealth.max_fails`` consecutive failures seen in live traffic
  (:meth:`report_failure`) eject a backend for ``eject`` seconds, doubled each time it fails
  again right after coming back, up to ``max_eject``; a success (:meth:`report_success`)
  resets both;
* the caller's ``exclude`` (the backends a request already tried, so a retry fails over).

When every backend is kept out by health, selection **fails open**: it picks among them all
(minus ``exclude`` while possible), and :attr:`last_fail_open` tells the caller so that an
error response can say why.

Membership changes (:meth:`set_members`) keep the :class:`Backend` objects — and so the
:class:`HttpPeer` pool keys and pooled connections — of servers that stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from ferryman.lb.algorithms import ALGORITHMS, Selector
from ferryman.lb.backend import Backend
from ferryman.upstream.peer import HttpPeer

__all__ = ["LoadBalancer", "PassiveHealth", "NoBackendError"]


@dataclass(frozen=True, slots=True)
class PassiveHealth:
    """Passive health-check settings.

    Fields:
        max_fails: consecutive failures that eject a backend; 0 disables ejection.
        eject: seconds of the first ejection; each further ejection in a row doubles it.
        max_eject: the longest ejection, in seconds.
    """

    max_fails: int = 3
    eject: float = 10.0
    max_eject: float = 300.0


class NoBackendError(LookupError):
    """The group has no backends at all (e.g. discovery has not found any yet)."""


def _accept_all(backend: Backend) -> bool:
    return True


@mypyc_attr(allow_interpreted_subclasses=True)
class LoadBalancer:
    """Selects a backend of one upstream group for each request.

    Args:
        name: the group's name (for messages).
        backends: the initial backends (``Backend`` objects, or ``(address, weight)`` pairs
            turned into backends with ``peer_factory``).
        algorithm: a name of :data:`~ferryman.lb.algorithms.ALGORITHMS` or a
            :class:`Selector` subclass. Default ``"round_robin"``.
        passive: passive health settings. Default ``PassiveHealth()``.
        peer_factory: builds the :class:`HttpPeer` of a new backend from its address (used
            for pairs and by :meth:`set_members`); None leaves ``backend.peer`` unset.
    """

    __slots__ = (
        "name",
        "algorithm",
        "passive",
        "peer_factory",
        "backends",
        "selector",
        "uses_key",
        "_by_name",
        "_degraded",
        "last_fail_open",
        "version",
    )

    def __init__(
        self,
        name: str,
        backends: Iterable[Backend | tuple[tuple[str, int], int]] = (),
        algorithm: str | type[Selector] = "round_robin",
        *,
        passive: PassiveHealth | None = None,
        peer_factory: Callable[[tuple[str, int]], HttpPeer] | None = None,
    ) -> None:
        if isinstance(algorithm, str):
            try:
                algorithm = ALGORITHMS[algorithm]
            except KeyError:
                known = ", ".join(ALGORITHMS)
                raise ValueError(
                    f"unknown algorithm {algorithm!r}; expected one of {known}"
                ) from None
        self.name = name
        self.algorithm: type[Selector] = algorithm
        self.uses_key = algorithm.uses_key
        self.passive = passive if passive is not None else PassiveHealth()
        self.peer_factory = peer_factory
        self.backends: tuple[Backend, ...] = ()
        self.selector: Selector = algorithm(())
        self._by_name: dict[str, Backend] = {}
        self._degraded = False
        #: Whether the last :meth:`select` had to ignore health (every backend was down).
        self.last_fail_open = False
        #: Incremented on every membership change.
        self.version = 0
        self._install([self._backend(b) for b in backends])

    # membership ---------------------------------------------------------------------------

    def _backend(self, item: Backend | tuple[tuple[str, int], int]) -> Backend:
        if isinstance(item, Backend):
            return item
        address, weight = item
        peer = self.peer_factory(address) if self.peer_factory is not None else None
        return Backend(address, weight, peer)

    def _install(self, backends: list[Backend]) -> None:
        self.backends = tuple(backends)
        self._by_name = {b.name: b for b in backends}
        self.selector = self.algorithm(self.backends)
        self.version += 1
        self._recheck()

    def set_members(self, members: Sequence[tuple[tuple[str, int], int]]) -> list[Backend]:
        """Make ``members`` (``(address, weight)`` pairs) the group's backends.

        Backends of servers that stay keep their object, peer, health and counters (so their
        pooled connections stay usable; in-flight requests are not touched). A server whose
        weight changed keeps its state with the new weight. Returns the removed backends,
        whose idle pooled connections the caller may close.
        """
        new: list[Backend] = []
        keep: set[str] = set()
        reweighted = False
        for address, weight in members:
            fresh = Backend(address, weight)
            old = self._by_name.get(fresh.name)
            if old is not None:
                if old.name in keep:
                    continue
                if old.weight != weight:
                    old.weight = weight
                    reweighted = True
                new.append(old)
            else:
                if fresh.name in keep:
                    continue
                if self.peer_factory is not None:
                    fresh.peer = self.peer_factory(fresh.address)
                new.append(fresh)
            keep.add(fresh.name)
        removed = [b for b in self.backends if b.name not in keep]
        if removed or reweighted or [b.name for b in new] != [b.name for b in self.backends]:
            self._install(new)
        return removed

    def get(self, name: str) -> Backend | None:
        """The backend called ``name`` (``"host:port"``), if it is a member."""
        return self._by_name.get(name)

    # health -------------------------------------------------------------------------------

    def set_health(self, name: str, healthy: bool, reason: str = "") -> bool:
        """Record the active checks' verdict on backend ``name``; False if not a member.

        A server the checks see coming back up also leaves passive ejection: the checks'
        fresh evidence beats an ejection decided on older traffic.
        """
        backend = self._by_name.get(name)
        if backend is None:
            return False
        if healthy and not backend.healthy:
            backend.fails = 0
            backend.ejections = 0
            backend.ejected_until = 0.0
        backend.healthy = healthy
        backend.reason = "" if healthy else reason
        self._recheck()
        return True

    def _recheck(self) -> None:
        self._degraded = any(not b.healthy or b.ejected_until for b in self.backends)

    def available(self, backend: Backend, now: float) -> bool:
        """Whether health lets ``backend`` take traffic at monotonic time ``now``."""
        return backend.healthy and backend.ejected_until <= now

    def report_success(self, backend: Backend) -> None:
        """A request to ``backend`` succeeded: reset its passive failure count and backoff."""
        if backend.fails or backend.ejections:
            backend.fails = 0
            if backend.ejected_until <= time.monotonic():
                backend.ejections = 0
                if backend.ejected_until:
                    backend.ejected_until = 0.0
                    self._recheck()

    def report_failure(self, backend: Backend, reason: str = "") -> bool:
        """A request to ``backend`` failed (connect error, timeout, 5xx...).

        Ejects it after ``max_fails`` consecutive failures — or at once when it fails again
        right after an ejection ended — for a time that doubles with each ejection in a row.
        Returns True if this failure ejected it.
        """
        passive = self.passive
        if passive.max_fails <= 0:
            return False
        now = time.monotonic()
        if backend.ejected_until > now:
            return False  # already out (requests that were in flight when it was ejected)
        backend.fails += 1
        if backend.fails < passive.max_fails and not backend.ejections:
            return False
        backend.fails = 0
        duration = min(passive.eject * (2.0 ** min(backend.ejections, 32)), passive.max_eject)
        backend.ejections += 1
        backend.ejected_until = now + duration
        if reason:
            backend.reason = reason
        self._degraded = True
        return True

    # selection ----------------------------------------------------------------------------

    def select(self, key: bytes = b"", exclude: Sequence[Backend] = ()) -> Backend:
        """The backend for a request: healthy and not in ``exclude`` if possible.

        ``key`` feeds the hashing algorithms; ``exclude`` lists the backends a request
        already tried. As nginx does, a retry never goes to a server known to be down while
        some server is up: when every available (healthy, not ejected) backend is excluded,
        :class:`NoBackendError` is raised. Failing open: when *no* backend is available, one
        is picked anyway, preferring those not excluded (``last_fail_open`` is set). Raises
        :class:`NoBackendError` for an empty group too.
        """
        selector = self.selector
        if not self._degraded and not exclude:
            self.last_fail_open = False
            backend = selector.select(key, None)
            if backend is not None:
                return backend
            raise NoBackendError(f'upstream "{self.name}" has no servers')
        now = time.monotonic()
        if self._degraded and not any(
            not b.healthy or b.ejected_until > now for b in self.backends
        ):
            for b in self.backends:  # every ejection has ended
                b.ejected_until = 0.0
            self._degraded = False
        healthy = self.available
        backend = selector.select(
            key, lambda b: healthy(b, now) and b not in exclude
        )
        if backend is not None:
            self.last_fail_open = False
            return backend
        if exclude:
            if any(healthy(b, now) for b in self.backends):
                raise NoBackendError(
                    f'upstream "{self.name}": every available server was tried'
                )
            backend = selector.select(key, lambda b: b not in exclude)
            if backend is not None:
                self.last_fail_open = True
                return backend
        self.last_fail_open = True
        backend = selector.select(key, _accept_all)
        if backend is None:
            raise NoBackendError(f'upstream "{self.name}" has no servers')
        return backend

    def down_report(self) -> str:
        """Why the group's backends are out, e.g.
        ``"a:1 down: connection refused; b:2 ejected for 8s more after failures"``."""
        now = time.monotonic()
        parts = []
        for b in self.backends:
            if not b.healthy:
                parts.append(f"{b.name} down: {b.reason or 'health check failed'}")
            elif b.ejected_until > now:
                left = b.ejected_until - now
                why = f", last failure: {b.reason}" if b.reason else ""
                parts.append(f"{b.name} ejected for {left:.0f}s more after failures{why}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"LoadBalancer({self.name!r}, {self.algorithm.name}, {list(self.backends)})"
