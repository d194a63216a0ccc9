"""The proxy the soak runs: ferryman's built-in ConfigProxy plus a per-worker stats writer.

``benchmarks/soak`` names this class as the config's ``app``. Only the lifecycle methods
are overridden, so the engine's request path (which hooks it calls) is exactly the stock
one. Each worker appends one JSON line per second to ``$FERRYMAN_SOAK_STATS/worker-<pid>.jsonl``
with what can only be seen from inside the process: the event loop's task count, client
connections open, idle pooled upstream connections, request parsers held, the number of
objects the garbage collector tracks, plus RSS and open descriptors.

The writer runs from ``loop.call_later`` callbacks, not a task, so it does not add to the
task count it reports.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

from ferryman.app.config_proxy import ConfigProxy
from ferryman.proxy.service import HttpProxyService

INTERVAL = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class SoakProxy(ConfigProxy):
    """ConfigProxy that reports its worker's resource counts once a second."""

    def worker_start(self, service: HttpProxyService) -> None:
        """Start the stats writer, then what ConfigProxy does."""
        super().worker_start(service)
        directory = os.environ.get("FERRYMAN_SOAK_STATS")
        self._soak_file: Any = None
        self._soak_handle: asyncio.TimerHandle | None = None
        if directory:
            path = os.path.join(directory, f"worker-{os.getpid()}.jsonl")
            self._soak_file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in stop
            self._soak_service = service
            self._soak_handle = service.loop.call_later(INTERVAL, self._soak_sample)

    def worker_stop(self, service: HttpProxyService) -> None:
        """Stop the stats writer, then what ConfigProxy does."""
        if self._soak_handle is not None:
            self._soak_handle.cancel()
            self._soak_handle = None
        if self._soak_file is not None:
            self._soak_file.close()
            self._soak_file = None
        super().worker_stop(service)

    def _soak_sample(self) -> None:
        service = self._soak_service
        loop = service.loop
        record = {
            "t": time.time(),
            "pid": os.getpid(),
            "tasks": len(asyncio.all_tasks(loop)),
            "client_conns": len(service.connections),
            "pooled_idle": service.connector.idle_count(),
            "parsers_pooled": len(service.parsers.pool),
            "parsers_made": service.parsers.pool.made,
            "gc_objects": len(gc.get_objects()),
            "rss": _rss_bytes(),
            "fds": len(os.listdir("/proc/self/fd")),
        }
        self._soak_file.write(json.dumps(record) + "\n")
        self._soak_handle = loop.call_later(INTERVAL, self._soak_sample)
