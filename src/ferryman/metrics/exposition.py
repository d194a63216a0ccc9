"""The sum of every slot of a :class:`~ferryman.metrics.board.MetricsBoard`, in the
Prometheus text format (made by ``prometheus_client``).

Counters and histogram buckets add up over every slot that holds a snapshot, the slots
of dead workers included (their requests happened). Gauges come only from *live*
workers: a slot whose writer is alive (:func:`~ferryman.metrics.board.pid_alive`) and
did not stop cleanly. Active connections add up over those; a server is healthy (1) only
if every live worker that reports it says so, else 0. The config reload metrics come
from the main process's snapshot (slot 0).

Metrics (all with HELP text; label values as the workers recorded them):

* ``ferryman_requests_total{listener,route,upstream,status_class}``
* ``ferryman_request_duration_seconds{listener,route}`` (histogram)
* ``ferryman_upstream_response_seconds{upstream}`` (histogram: time to the response head)
* ``ferryman_received_bytes_total{listener}``, ``ferryman_sent_bytes_total{listener}``
* ``ferryman_active_connections``, ``ferryman_workers`` (gauges)
* ``ferryman_upstream_connects_total{upstream}``, ``ferryman_upstream_reuses_total``,
  ``ferryman_upstream_retries_total``, and ``ferryman_upstream_reuse_ratio{upstream}``
  (reuses / (reuses + connects), for upstreams with at least one connection used)
* ``ferryman_upstream_server_healthy{upstream,server}`` (1 or 0)
* ``ferryman_cache_requests_total{route,result}``: requests of routes with a cache by
  outcome (``hit``, ``miss``, ``expired``, ``stale``, ``updating``, ``revalidated``,
  ``bypass``, ``purge``)
* ``ferryman_limited_requests_total{route,reason}``: requests refused by a route's limit
  (``rate``, ``concurrency``, ``unavailable``: a fail-closed Redis limit without Redis)
* ``ferryman_config_reloads_total{result="success"|"failure"}``,
  ``ferryman_config_last_reload_success_timestamp_seconds``

The per-upstream metrics leave out the empty upstream name (requests no upstream served)
unless something was counted for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ferryman.metrics.board import MetricsBoard, SlotRecord, pid_alive
from ferryman.metrics.recorder import BUCKETS, SNAPSHOT_VERSION

try:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # prometheus-client < 0.22, where "latest" still meant 0.0.4
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = [
    "CONTENT_TYPE",
    "BoardCollector",
    "Totals",
    "aggregate",
    "families",
    "make_registry",
    "render",
]

#: The ``le`` label values of the histogram buckets, ``+Inf`` last.
_LE = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]
_NCOUNTS = len(BUCKETS) + 1


@dataclass
class Totals:
    """The board's snapshots summed (see the module docstring). Histograms hold
    per-bucket (not cumulative) counts, ``+Inf``'s last, and their sum."""

    requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(listener, route, upstream, status_class) → requests"""
    request_duration: dict[tuple[str, str], tuple[list[int], list[float]]] = field(
        default_factory=dict
    )
    """(listener, route) → (bucket counts, [sum])"""
    upstream_response: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """upstream → (bucket counts, [sum])"""
    traffic: dict[str, list[int]] = field(default_factory=dict)
    """listener → [received, sent]"""
    upstreams: dict[str, list[int]] = field(default_factory=dict)
    """upstream → [connects, reuses, retries]"""
    health: dict[tuple[str, str], int] = field(default_factory=dict)
    """(upstream, server) → 1 if every live worker reporting it says healthy, else 0"""
    active_connections: int = 0
    """open client connections of the live workers"""
    workers: int = 0
    """live worker slots"""
    reloads_success: int = 0
    """successful config reloads"""
    reloads_failure: int = 0
    """failed config reloads"""
    last_reload_success: float = 0.0
    """``time.time()`` of the last successful config load"""
    cache: dict[tuple[str, str], int] = field(default_factory=dict)
    """(route, result) → requests the cache answered so"""
    limited: dict[tuple[str, str], int] = field(default_factory=dict)
    """(route, reason) → requests a limit refused"""


def aggregate(
    records: Iterable[SlotRecord], alive: Callable[[int], bool] = pid_alive
) -> Totals:
    """Sum ``records`` (:meth:`MetricsBoard.read_all`); ``alive(pid)`` tells whether a
    worker's writer still runs (its gauges count only then). Snapshots of another layout
    version are skipped."""
    totals = Totals()
    for record in records:
        snap = record.snapshot
        if snap.get("version") != SNAPSHOT_VERSION:
            continue
        kind = snap.get("kind")
        if kind == "main":
            totals.reloads_success += int(snap["reloads_success"])
            totals.reloads_failure += int(snap["reloads_failure"])
            totals.last_reload_success = max(
                totals.last_reload_success, float(snap["last_reload_success"])
            )
        elif kind == "worker":
            _add_worker(totals, snap, not record.final and alive(record.pid))
    return totals


def _add_worker(totals: Totals, snap: dict[str, Any], live: bool) -> None:
    requests = totals.requests
    for listener, route, upstream, klass, value in snap["requests"]:
        key = (listener, route, upstream, klass)
        requests[key] = requests.get(key, 0) + value
    for listener, route, counts, total in snap["request_duration"]:
        _add_histogram(totals.request_duration, (listener, route), counts, total)
    for upstream, counts, total in snap["upstream_response"]:
        _add_histogram(totals.upstream_response, upstream, counts, total)
    for listener, received, sent in snap["traffic"]:
        traffic = totals.traffic.setdefault(listener, [0, 0])
        traffic[0] += received
        traffic[1] += sent
    for upstream, connects, reuses, retries in snap["upstreams"]:
        up = totals.upstreams.setdefault(upstream, [0, 0, 0])
        up[0] += connects
        up[1] += reuses
        up[2] += retries
    for route, result, value in snap.get("cache", []):
        ckey = (route, result)
        totals.cache[ckey] = totals.cache.get(ckey, 0) + value
    for route, reason, value in snap.get("limited", []):
        lkey = (route, reason)
        totals.limited[lkey] = totals.limited.get(lkey, 0) + value
    if live:
        totals.workers += 1
        totals.active_connections += int(snap["active_connections"])
        health = totals.health
        for upstream, server, healthy in snap["health"]:
            where = (upstream, server)
            health[where] = min(health.get(where, 1), 1 if healthy else 0)


def _add_histogram(
    into: dict[Any, tuple[list[int], list[float]]], key: Any, counts: list[int], total: float
) -> None:
    if len(counts) != _NCOUNTS:
        return  # other buckets: cannot be merged
    hist = into.get(key)
    if hist is None:
        into[key] = (list(counts), [float(total)])
        return
    mine = hist[0]
    for i, count in enumerate(counts):
        mine[i] += count
    hist[1][0] += total


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs."""
    out = []
    running = 0
    for le, count in zip(_LE, counts, strict=True):
        running += count
        out.append((le, float(running)))
    return out


def families(totals: Totals) -> list[Metric]:
    """The metric families of ``totals`` (see the module docstring for the names)."""
    requests = CounterMetricFamily(
        "ferryman_requests_total",
        "Requests answered, by listener, route, upstream group and status class.",
        labels=["listener", "route", "upstream", "status_class"],
    )
    for key, value in sorted(totals.requests.items()):
        requests.add_metric(list(key), value)

    duration = HistogramMetricFamily(
        "ferryman_request_duration_seconds",
        "Time from a request's head to the end of its response, in seconds.",
        labels=["listener", "route"],
    )
    for (listener, route), (counts, total) in sorted(totals.request_duration.items()):
        duration.add_metric([listener, route], _buckets(counts), total[0])

    response = HistogramMetricFamily(
        "ferryman_upstream_response_seconds",
        "Time from a request's head to its upstream's response head, in seconds.",
        labels=["upstream"],
    )
    for upstream, (counts, total) in sorted(totals.upstream_response.items()):
        response.add_metric([upstream], _buckets(counts), total[0])

    received = CounterMetricFamily(
        "ferryman_received_bytes_total",
        "Request body bytes received from clients, by listener.",
        labels=["listener"],
    )
    sent = CounterMetricFamily(
        "ferryman_sent_bytes_total",
        "Response body bytes sent to clients, by listener.",
        labels=["listener"],
    )
    for listener, (rx, tx) in sorted(totals.traffic.items()):
        received.add_metric([listener], rx)
        sent.add_metric([listener], tx)

    connects = CounterMetricFamily(
        "ferryman_upstream_connects_total",
        "Requests that opened a new upstream connection, by upstream group.",
        labels=["upstream"],
    )
    reuses = CounterMetricFamily(
        "ferryman_upstream_reuses_total",
        "Requests that reused a pooled (or shared) upstream connection, by upstream group.",
        labels=["upstream"],
    )
    ratio = GaugeMetricFamily(
        "ferryman_upstream_reuse_ratio",
        "Share of upstream connections used that were reused: reuses / (reuses + connects).",
        labels=["upstream"],
    )
    retries = CounterMetricFamily(
        "ferryman_upstream_retries_total",
        "Upstream attempts that failed and were retried, by upstream group.",
        labels=["upstream"],
    )
    for upstream, (n_connects, n_reuses, n_retries) in sorted(totals.upstreams.items()):
        if not upstream and not (n_connects or n_reuses or n_retries):
            continue  # requests no upstream served
        connects.add_metric([upstream], n_connects)
        reuses.add_metric([upstream], n_reuses)
        retries.add_metric([upstream], n_retries)
        if n_connects + n_reuses:
            ratio.add_metric([upstream], n_reuses / (n_connects + n_reuses))

    healthy = GaugeMetricFamily(
        "ferryman_upstream_server_healthy",
        "1 if every live worker sees the upstream server as healthy, else 0.",
        labels=["upstream", "server"],
    )
    for (upstream, server), value in sorted(totals.health.items()):
        healthy.add_metric([upstream, server], value)

    active = GaugeMetricFamily(
        "ferryman_active_connections",
        "Open client connections, over all live workers.",
        value=totals.active_connections,
    )
    workers = GaugeMetricFamily(
        "ferryman_workers", "Worker processes running.", value=totals.workers
    )
    reloads = CounterMetricFamily(
        "ferryman_config_reloads_total",
        "Config reloads, by result.",
        labels=["result"],
    )
    reloads.add_metric(["success"], totals.reloads_success)
    reloads.add_metric(["failure"], totals.reloads_failure)
    last = GaugeMetricFamily(
        "ferryman_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful config load or reload.",
        value=totals.last_reload_success,
    )
    cache = CounterMetricFamily(
        "ferryman_cache_requests_total",
        "Requests of routes with a cache, by route and cache result (hit, miss, expired, "
        "stale, updating, revalidated, bypass, purge).",
        labels=["route", "result"],
    )
    for (route, result), value in sorted(totals.cache.items()):
        cache.add_metric([route, result.lower()], value)
    limited = CounterMetricFamily(
        "ferryman_limited_requests_total",
        "Requests refused by a limit, by route and reason (rate, concurrency, unavailable).",
        labels=["route", "reason"],
    )
    for (route, reason), value in sorted(totals.limited.items()):
        limited.add_metric([route, reason], value)
    return [
        requests, duration, response, received, sent, active, workers,
        connects, reuses, ratio, retries, healthy, reloads, last, cache, limited,
    ]  # fmt: skip


class BoardCollector:
    """A ``prometheus_client`` collector that reads the board at each collection.

    Args:
        board: the board of the server's processes.
        alive: tells whether a pid still runs (default :func:`pid_alive`).
    """

    def __init__(self, board: MetricsBoard, alive: Callable[[int], bool] = pid_alive) -> None:
        self.board = board
        self.alive = alive

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the board's current sum."""
        yield from families(aggregate(self.board.read_all(), self.alive))


def make_registry(
    board: MetricsBoard, alive: Callable[[int], bool] = pid_alive
) -> CollectorRegistry:
    """A private registry holding only a :class:`BoardCollector` of ``board`` (no process
    or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(board, alive))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (:data:`CONTENT_TYPE`) of ``registry``."""
    return generate_latest(registry)
