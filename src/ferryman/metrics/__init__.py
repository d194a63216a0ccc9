"""Prometheus metrics, counted in each worker and summed over the server's processes.

* :mod:`~ferryman.metrics.recorder`: :class:`WorkerMetrics`, a worker's counters
  (:meth:`WorkerMetrics.record` at the end of each request: a dict lookup and a few
  integer additions), and :class:`MainMetrics`, the main process's (config reloads).
* :mod:`~ferryman.metrics.board`: :class:`MetricsBoard`, shared memory created before
  the fork with one slot per process, and :class:`WorkerPublisher`, which copies a
  worker's snapshot to its slot from the event loop.
* :mod:`~ferryman.metrics.exposition`: the slots summed, in the Prometheus text format
  (``prometheus_client``).
* :mod:`~ferryman.metrics.endpoint`: the HTTP endpoint serving it, in a process of its
  own (:func:`run_metrics_process`).

Wiring::

    board = MetricsBoard(workers=max(64, workers))      # main process, before forking
    main_metrics = MainMetrics(loaded_at=time.time())
    board.write(0, main_metrics.snapshot())
    # metrics process: run_metrics_process(sock, board, parent_pid=main_pid)
    # worker i, once its loop runs:
    metrics = WorkerMetrics()
    metrics.set_connections_source(lambda: len(service.connections))
    publisher = WorkerPublisher(loop, metrics, board, worker_slot(i))
    publisher.start()
    # ... metrics.record(...) per request; at exit: publisher.stop()

The recorder and the board are imported eagerly (the workers need them); the exposition
and endpoint names, which load ``prometheus_client``, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferryman.metrics.board import (
    MetricsBoard,
    SlotRecord,
    WorkerPublisher,
    pid_alive,
    worker_slot,
)
from ferryman.metrics.recorder import BUCKETS, MainMetrics, WorkerMetrics, status_class

if TYPE_CHECKING:
    from ferryman.metrics.endpoint import run_metrics_process, serve_metrics
    from ferryman.metrics.exposition import aggregate, make_registry, render

__all__ = [
    "BUCKETS",
    "MainMetrics",
    "MetricsBoard",
    "SlotRecord",
    "WorkerMetrics",
    "WorkerPublisher",
    "aggregate",
    "make_registry",
    "pid_alive",
    "render",
    "run_metrics_process",
    "serve_metrics",
    "status_class",
    "worker_slot",
]

_LAZY = {
    "aggregate": "ferryman.metrics.exposition",
    "make_registry": "ferryman.metrics.exposition",
    "render": "ferryman.metrics.exposition",
    "run_metrics_process": "ferryman.metrics.endpoint",
    "serve_metrics": "ferryman.metrics.endpoint",
}


def __getattr__(name: str) -> Any:
    """Load the exposition and endpoint names on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ferryman.metrics' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
