"""WorkerMetrics: a worker's request counters, updated at the end of every request.

Each worker process keeps one :class:`WorkerMetrics`: plain in-process integers and lists,
no locks, no shared memory on the hot path. :meth:`WorkerMetrics.record` costs one dict
lookup (the series of a ``(listener, route, upstream, status)`` key, cached on first
use), a few integer additions and, per histogram, a few comparisons with the fixed
:data:`BUCKETS` (:func:`bucket_index`). A publisher
(:class:`~ferryman.metrics.board.WorkerPublisher`) copies :meth:`WorkerMetrics.snapshot`
to the worker's slot of a shared :class:`~ferryman.metrics.board.MetricsBoard` ten times a
second when it changed, and the metrics process sums the slots
(:mod:`ferryman.metrics.exposition`).

Gauges cost nothing per request: the worker gives a callable that is read when a snapshot
is taken (:meth:`WorkerMetrics.set_connections_source`,
:meth:`WorkerMetrics.set_health_source`), or sets values directly.

The main process keeps its own counters (config reloads) in a :class:`MainMetrics`,
published to slot 0 of the board.

A snapshot is built only of dict, list, tuple, str, int and float, so that ``marshal``
can carry it (layout: :data:`SNAPSHOT_VERSION`; see :meth:`WorkerMetrics.snapshot`).

This module is compiled with mypyc: keep it typed and free of dynamic tricks, and its
module constants ``Final``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final, final

__all__ = [
    "BUCKETS",
    "SNAPSHOT_VERSION",
    "STATUS_CLASSES",
    "MainMetrics",
    "WorkerMetrics",
    "bucket_index",
    "status_class",
]

#: Upper bounds (seconds) of the latency histograms' buckets, Prometheus's defaults; a
#: last, implicit ``+Inf`` bucket follows. A value equal to a bound counts in that
#: bound's bucket (Prometheus's ``le``: less than or equal).
BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
)
#: Per-bucket counts held for each histogram: one per bound, then ``+Inf``.
_NCOUNTS: Final = 15

#: The layout of :meth:`WorkerMetrics.snapshot` and :meth:`MainMetrics.snapshot`; a
#: snapshot of another version is ignored by :meth:`WorkerMetrics.load_base` and by
#: the aggregation.
SNAPSHOT_VERSION: Final = 1

#: The ``status_class`` label values: "1xx" to "5xx", and "other" for status 0 (no
#: response was sent, e.g. the client went away first) and codes outside 100..599.
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def bucket_index(value: float) -> int:
    """The index of the histogram bucket ``value`` counts in: that of the first bound of
    :data:`BUCKETS` greater than or equal to it (``bisect_left``), 14 (``+Inf``) past the
    last, 0 for NaN.

    A tree of comparisons with the bounds written out: compiled, 5 ns where calling
    ``bisect.bisect_left`` costs 50 (a test checks it agrees with :data:`BUCKETS`).
    """
    if not value > 0.1:
        if not value > 0.025:
            if not value > 0.005:
                return 0
            return 1 if value <= 0.01 else 2
        if value <= 0.05:
            return 3
        return 4 if value <= 0.075 else 5
    if value <= 1.0:
        if value <= 0.25:
            return 6
        if value <= 0.5:
            return 7
        return 8 if value <= 0.75 else 9
    if value <= 5.0:
        return 10 if value <= 2.5 else 11
    if value <= 7.5:
        return 12
    return 13 if value <= 10.0 else 14


def status_class(status: int) -> str:
    """The ``status_class`` label of ``status`` (see :data:`STATUS_CLASSES`)."""
    if 100 <= status <= 599:
        return STATUS_CLASSES[status // 100 - 1]
    return "other"


@final
class _Count:
    """One counter (requests of one series)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@final
class _Histogram:
    """Per-bucket (not cumulative) counts and the sum of the observed values."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * _NCOUNTS
        self.total = 0.0


@final
class _Traffic:
    """Body bytes received and sent on one listener."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0


@final
class _Upstream:
    """Everything counted per upstream."""

    __slots__ = ("connects", "reuses", "retries", "response")

    def __init__(self) -> None:
        self.connects = 0
        self.reuses = 0
        self.retries = 0
        self.response = _Histogram()


@final
class _Entry:
    """The counters one ``(listener, route, upstream, status)`` key updates."""

    __slots__ = ("requests", "duration", "traffic", "upstream")

    def __init__(
        self, requests: _Count, duration: _Histogram, traffic: _Traffic, upstream: _Upstream
    ) -> None:
        self.requests = requests
        self.duration = duration
        self.traffic = traffic
        self.upstream = upstream


class WorkerMetrics:
    """The counters of one worker process (see the module docstring).

    Label values (listener, route and upstream names) must come from the configuration,
    never from requests: every distinct key is kept for the life of the worker, and a
    worker's snapshot must fit in its board slot.
    """

    def __init__(self) -> None:
        #: Grows by one with every :meth:`record` and every gauge set directly: a
        #: publisher compares it with the value it last published.
        self.version = 0
        self._entries: dict[tuple[str, str, str, int], _Entry] = {}
        self._requests: dict[tuple[str, str, str, str], _Count] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        self._traffic: dict[str, _Traffic] = {}
        self._upstreams: dict[str, _Upstream] = {}
        self._active = 0
        self._connections_source: Callable[[], int] | None = None
        self._health: dict[tuple[str, str], bool] = {}
        self._health_source: Callable[[], Iterable[tuple[str, str, bool]]] | None = None
        self._cache: dict[tuple[str, str], _Count] = {}
        self._limited: dict[tuple[str, str], _Count] = {}

    # the hot path -----------------------------------------------------------------------

    def record(
        self,
        listener: str,
        route: str,
        upstream: str,
        status: int,
        duration: float,
        upstream_header: float,
        bytes_in: int,
        bytes_out: int,
        upstream_used: bool,
        reused: bool,
        retries: int,
    ) -> None:
        """Count one finished request.

        Args:
            listener: the listener's name.
            route: the route's name (``""`` when none matched).
            upstream: the upstream group's name (``""`` when none was chosen).
            status: the status sent to the client (0 if none was: counted as "other").
            duration: seconds from the request head to the end of the response.
            upstream_header: seconds from the request head to the upstream's response
                head, or a negative number when no upstream answered.
            bytes_in: request body bytes received.
            bytes_out: response body bytes sent.
            upstream_used: an upstream connection was used; then ``reused`` tells whether
                it had carried requests before (a pool reuse), else it was a new connect.
            reused: see ``upstream_used``.
            retries: attempts that failed and were retried.
        """
        entry = self._entries.get((listener, route, upstream, status))
        if entry is None:
            entry = self._entry(listener, route, upstream, status)
        entry.requests.value += 1
        if not duration >= 0.0:  # a clock step backwards, or NaN
            duration = 0.0
        hist = entry.duration
        hist.counts[bucket_index(duration)] += 1
        hist.total += duration
        traffic = entry.traffic
        traffic.received += bytes_in
        traffic.sent += bytes_out
        up = entry.upstream
        if upstream_header >= 0.0:
            resp = up.response
            resp.counts[bucket_index(upstream_header)] += 1
            resp.total += upstream_header
        if upstream_used:
            if reused:
                up.reuses += 1
            else:
                up.connects += 1
        if retries:
            up.retries += retries
        self.version += 1

    def record_cache(self, route: str, result: str) -> None:
        """Count the cache's outcome for a request of ``route`` (``result``: HIT, MISS,
        EXPIRED, STALE, UPDATING, REVALIDATED, BYPASS or PURGE, as
        ``Session.cache_status`` says)."""
        key = (route, result)
        count = self._cache.get(key)
        if count is None:
            count = self._cache[key] = _Count()
        count.value += 1
        self.version += 1

    def record_limited(self, route: str, reason: str) -> None:
        """Count a request of ``route`` refused by a limit (``reason``: rate,
        concurrency or unavailable, as ``Session.limit_status`` says)."""
        key = (route, reason)
        count = self._limited.get(key)
        if count is None:
            count = self._limited[key] = _Count()
        count.value += 1
        self.version += 1

    def _entry(self, listener: str, route: str, upstream: str, status: int) -> _Entry:
        """Make (once per key) the entry of a key, sharing the counters it updates."""
        rkey = (listener, route, upstream, status_class(status))
        count = self._requests.get(rkey)
        if count is None:
            count = self._requests[rkey] = _Count()
        entry = _Entry(
            count,
            self._duration(listener, route),
            self._listener(listener),
            self._upstream(upstream),
        )
        self._entries[(listener, route, upstream, status)] = entry
        return entry

    def _duration(self, listener: str, route: str) -> _Histogram:
        hist = self._durations.get((listener, route))
        if hist is None:
            hist = self._durations[(listener, route)] = _Histogram()
        return hist

    def _listener(self, listener: str) -> _Traffic:
        traffic = self._traffic.get(listener)
        if traffic is None:
            traffic = self._traffic[listener] = _Traffic()
        return traffic

    def _upstream(self, upstream: str) -> _Upstream:
        up = self._upstreams.get(upstream)
        if up is None:
            up = self._upstreams[upstream] = _Upstream()
        return up

    # gauges -----------------------------------------------------------------------------

    def set_active_connections(self, count: int) -> None:
        """Set the number of open client connections (used when no source is set)."""
        self._active = count
        self.version += 1

    def set_connections_source(self, source: Callable[[], int] | None) -> None:
        """Read the number of open client connections from ``source()`` whenever a
        snapshot is taken (e.g. ``lambda: len(service.connections)``); ``None`` goes
        back to the value of :meth:`set_active_connections`."""
        self._connections_source = source

    def set_health(self, upstream: str, server: str, healthy: bool) -> None:
        """Set the health of one server of an upstream group as this worker sees it."""
        self._health[(upstream, server)] = healthy
        self.version += 1

    def set_health_source(
        self, source: Callable[[], Iterable[tuple[str, str, bool]]] | None
    ) -> None:
        """Read ``(upstream, server, healthy)`` triples from ``source()`` whenever a
        snapshot is taken (they win over :meth:`set_health` values for the same server);
        ``None`` removes the source."""
        self._health_source = source

    def active_connections(self) -> int:
        """The active connections gauge as the next snapshot will report it (0 if the
        source fails)."""
        source = self._connections_source
        if source is None:
            return self._active
        try:
            return int(source())
        except Exception:  # noqa: BLE001 - a broken gauge must not stop publishing
            return 0

    def health(self) -> list[tuple[str, str, int]]:
        """The health gauges as the next snapshot will report them: ``(upstream, server,
        1 or 0)``, sorted."""
        states = dict(self._health)
        source = self._health_source
        if source is not None:
            try:
                for upstream, server, healthy in source():
                    states[(upstream, server)] = bool(healthy)
            except Exception:  # noqa: BLE001 - a broken gauge must not stop publishing
                pass
        return sorted((key[0], key[1], 1 if ok else 0) for key, ok in states.items())

    # snapshots --------------------------------------------------------------------------

    def snapshot(self, gauges: bool = True) -> dict[str, Any]:
        """Everything counted so far, made only of dict, list, tuple, str, int and float
        (``marshal``-able). With ``gauges=False`` (a worker that stops) the active
        connections are 0 and no server health is reported.

        Keys: ``version`` (:data:`SNAPSHOT_VERSION`), ``kind`` (``"worker"``),
        ``requests`` [(listener, route, upstream, status_class, count)],
        ``request_duration`` [(listener, route, [per-bucket counts], sum)],
        ``upstream_response`` [(upstream, [per-bucket counts], sum)] (upstreams that
        answered at least once), ``traffic`` [(listener, received, sent)],
        ``upstreams`` [(upstream, connects, reuses, retries)],
        ``active_connections`` (int), ``health`` [(upstream, server, 1 or 0)],
        ``cache`` [(route, result, count)], ``limited`` [(route, reason, count)].
        Per-bucket counts are not cumulative; the last one is ``+Inf``'s.
        """
        requests = [(k[0], k[1], k[2], k[3], c.value) for k, c in self._requests.items()]
        durations = [
            (k[0], k[1], list(h.counts), h.total) for k, h in self._durations.items()
        ]
        responses = []
        upstreams = []
        for name, up in self._upstreams.items():
            upstreams.append((name, up.connects, up.reuses, up.retries))
            if sum(up.response.counts):
                responses.append((name, list(up.response.counts), up.response.total))
        traffic = [(name, t.received, t.sent) for name, t in self._traffic.items()]
        return {
            "version": SNAPSHOT_VERSION,
            "kind": "worker",
            "requests": requests,
            "request_duration": durations,
            "upstream_response": responses,
            "traffic": traffic,
            "upstreams": upstreams,
            "active_connections": self.active_connections() if gauges else 0,
            "health": self.health() if gauges else [],
            "cache": [(k[0], k[1], c.value) for k, c in self._cache.items()],
            "limited": [(k[0], k[1], c.value) for k, c in self._limited.items()],
        }

    def load_base(self, snapshot: dict[str, Any]) -> None:
        """Add the counters of ``snapshot`` (a previous worker's, in the same slot) to
        this one's, so that the slot's counters never go backwards when a worker is
        restarted. Gauges are not taken. Call it once, before the first publication; a
        snapshot of another kind or version is ignored."""
        if snapshot.get("version") != SNAPSHOT_VERSION or snapshot.get("kind") != "worker":
            return
        for listener, route, upstream, klass, value in snapshot["requests"]:
            rkey = (str(listener), str(route), str(upstream), str(klass))
            count = self._requests.get(rkey)
            if count is None:
                count = self._requests[rkey] = _Count()
            count.value += int(value)
        for listener, route, counts, total in snapshot["request_duration"]:
            _add_histogram(self._duration(str(listener), str(route)), counts, total)
        for upstream, counts, total in snapshot["upstream_response"]:
            _add_histogram(self._upstream(str(upstream)).response, counts, total)
        for listener, received, sent in snapshot["traffic"]:
            traffic = self._listener(str(listener))
            traffic.received += int(received)
            traffic.sent += int(sent)
        for upstream, connects, reuses, retries in snapshot["upstreams"]:
            up = self._upstream(str(upstream))
            up.connects += int(connects)
            up.reuses += int(reuses)
            up.retries += int(retries)
        for route, result, value in snapshot.get("cache", []):
            ckey = (str(route), str(result))
            cached = self._cache.get(ckey)
            if cached is None:
                cached = self._cache[ckey] = _Count()
            cached.value += int(value)
        for route, reason, value in snapshot.get("limited", []):
            lkey = (str(route), str(reason))
            limited = self._limited.get(lkey)
            if limited is None:
                limited = self._limited[lkey] = _Count()
            limited.value += int(value)
        self.version += 1


def _add_histogram(hist: _Histogram, counts: list[Any], total: Any) -> None:
    if len(counts) != _NCOUNTS:
        return  # other buckets: cannot be merged
    mine = hist.counts
    for i in range(_NCOUNTS):
        mine[i] += int(counts[i])
    hist.total += float(total)


class MainMetrics:
    """The main process's own counters, published to slot 0 of the board: config
    reloads, and when the last one (or the first load) succeeded.

    Args:
        loaded_at: ``time.time()`` of the initial config load (the last-success gauge's
            value until a reload succeeds); 0 if unknown.
    """

    def __init__(self, loaded_at: float = 0.0) -> None:
        self.reloads_success = 0
        self.reloads_failure = 0
        self.last_success = loaded_at

    def record_reload(self, success: bool, when: float | None = None) -> None:
        """Count a config reload; a successful one also sets the last-success time
        (``when``, default now)."""
        if success:
            self.reloads_success += 1
            self.last_success = time.time() if when is None else when
        else:
            self.reloads_failure += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters (``marshal``-able): ``version``, ``kind`` (``"main"``),
        ``reloads_success``, ``reloads_failure``, ``last_reload_success``."""
        return {
            "version": SNAPSHOT_VERSION,
            "kind": "main",
            "reloads_success": self.reloads_success,
            "reloads_failure": self.reloads_failure,
            "last_reload_success": self.last_success,
        }

    def load_base(self, snapshot: dict[str, Any]) -> None:
        """Continue from a previous main snapshot (counters add up; the last-success
        time is the later one)."""
        if snapshot.get("version") != SNAPSHOT_VERSION or snapshot.get("kind") != "main":
            return
        self.reloads_success += int(snapshot["reloads_success"])
        self.reloads_failure += int(snapshot["reloads_failure"])
        self.last_success = max(self.last_success, float(snapshot["last_reload_success"]))
