"""HttpProxyService: binds a ProxyHttp to the server's listeners and worker loop."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ferryman.metrics.recorder import WorkerMetrics
from ferryman.proxy.downstream import H1Downstream, ParserLender
from ferryman.proxy.h2_downstream import PrefaceSniffer
from ferryman.proxy.hooks import ProxyHttp
from ferryman.proxy.options import ProxyOptions
from ferryman.proxy.plan import RequestPlan
from ferryman.timeouts import DeadlineSweep, sweep_for
from ferryman.upstream.connector import Connector

if TYPE_CHECKING:
    from ferryman.server.listener import Listener

log = logging.getLogger("ferryman.service")

#: How long a graceful stop leaves an idle HTTP/1.1 keep-alive connection open for a
#: request its client may have sent already (it is answered with ``Connection: close``).
DRAIN_IDLE_WAIT = 1.0


class HttpProxyService:
    """Serves HTTP/1.x on ``listeners`` with ``proxy``'s hooks.

    It implements the small interface :class:`ferryman.server.Server` knows services by:
    ``listeners``, ``start(loop)`` (once per worker, after fork), ``protocol_factory()``
    and ``drain(grace)``. Each worker gets its own :class:`Connector` (upstream pool).
    """

    def __init__(
        self,
        proxy: ProxyHttp,
        listeners: list[Listener],
        options: ProxyOptions | None = None,
    ) -> None:
        if not isinstance(proxy, ProxyHttp):
            raise TypeError(f"{proxy!r} is not a ferryman.ProxyHttp")
        if "upstream_peer" not in proxy.overridden:
            raise TypeError(f"{type(proxy).__name__} must implement upstream_peer")
        self.proxy = proxy
        self.listeners = listeners
        self.options = options or ProxyOptions()
        self.connections: set[H1Downstream] = set()
        #: request parsers lent to client connections while they read a request
        self.parsers = ParserLender(self.options.limits)
        self.running = False
        #: True while a reload runs the new proxy's ``worker_start`` on a loop that serves
        self.reloading = False
        #: access logs of a previous config, closed a grace period after the reload
        self._retired_logs: list[Any] = []
        #: the worker's metrics (set by the server before :meth:`start`), or None
        self.metrics: WorkerMetrics | None = None
        # Set by start(), in the worker (plain attributes: read on every request).
        #: the worker's event loop
        self.loop: asyncio.AbstractEventLoop
        #: the worker's upstream connector and pool
        self.connector: Connector
        #: the worker loop's deadline sweep
        self.sweep: DeadlineSweep
        #: what the engine does for each request (hooks, forwarding), decided at start
        self.plan: RequestPlan

    @property
    def handshake_timeout(self) -> float:
        """Seconds a client may take for the TLS handshake (the header read timeout)."""
        return self.options.header_read_timeout

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Prepare per-worker state on ``loop``."""
        self.loop = loop
        self.sweep = sweep_for(loop)
        self.connector = Connector(loop)
        self.sweep.on_tick(self.parsers.reclaim)
        self.running = True
        self.proxy.worker_start(self)
        # after worker_start, which may still change the proxy's hooks or the options
        logs = [lst.access_log for lst in self.listeners if lst.access_log is not None]
        for access_log in logs:
            access_log.open(loop)
        self.plan = RequestPlan(
            self.proxy, self.options, self.connector, timed=bool(logs), metrics=self.metrics
        )

    def reconfigure(
        self,
        proxy: ProxyHttp,
        listeners: list[Listener],
        options: ProxyOptions,
        log_fds: dict[str, int] | None = None,
    ) -> None:
        """Reload: serve new requests with ``proxy``, ``listeners`` and ``options``.

        In a worker (after :meth:`start`): the old proxy's ``worker_stop`` and the new one's
        ``worker_start`` run; requests in flight finish with the proxy and plan they
        started with, and the next request on a kept connection uses the new ones. The
        upstream connector, and with it every pooled connection, is kept. Connections of a
        listener that is gone are drained; access logs whose settings did not change are
        kept open, the others closed once the grace period has passed. New request size
        limits apply to new connections. ``log_fds``: access log files the main process
        opened (path -> descriptor, duplicated here), since a worker may have switched to
        an unprivileged user. Client TLS files of upstreams are read again. In the main
        process (before :meth:`start`) it only replaces what workers started later use.
        """
        if not isinstance(proxy, ProxyHttp):
            raise TypeError(f"{proxy!r} is not a ferryman.ProxyHttp")
        if "upstream_peer" not in proxy.overridden:
            raise TypeError(f"{type(proxy).__name__} must implement upstream_peer")
        old_by_address = {lst.address: lst for lst in self.listeners}
        kept_logs: set[int] = set()
        for lst in listeners:
            old = old_by_address.get(lst.address)
            if (
                old is not None
                and old.access_log is not None
                and lst.access_log is not None
                and old.access_log.settings() == lst.access_log.settings()
            ):
                lst.access_log = old.access_log
                kept_logs.add(id(old.access_log))
        old_proxy, old_listeners, old_options = self.proxy, self.listeners, self.options
        self.proxy, self.listeners, self.options = proxy, listeners, options
        if not self.running:
            return
        try:
            old_proxy.worker_stop(self)
        except Exception:  # noqa: BLE001 - the reload goes on whatever the old hook does
            log.exception("worker_stop of the previous config failed")
        self.connector.forget_tls()
        if _limits(options) != _limits(old_options):
            self.parsers = ParserLender(options.limits)
            self.sweep.on_tick(self.parsers.reclaim)
        self.reloading = True  # (worker_start must not block this running loop)
        try:
            self.proxy.worker_start(self)
        finally:
            self.reloading = False
        logs = [lst.access_log for lst in listeners if lst.access_log is not None]
        given = log_fds or {}
        for access_log in logs:
            if id(access_log) not in kept_logs:
                fd = given.get(access_log.path) if access_log.path is not None else None
                access_log.open(self.loop, os.dup(fd) if fd is not None else -1)
        self.plan = RequestPlan(
            self.proxy, options, self.connector, timed=bool(logs), metrics=self.metrics
        )
        by_address = {lst.address: lst for lst in listeners}
        wait = min(DRAIN_IDLE_WAIT, options.grace_period)
        for conn in list(self.connections):
            current = conn.listener
            new = by_address.get(current.address) if current is not None else None
            if current is not None and new is None:
                conn.start_draining(wait)  # its listener was removed
                continue
            conn.listener = new
            conn._options = options
            if isinstance(conn, H1Downstream):
                conn._plan = self.plan
        retired = [
            lst.access_log
            for lst in old_listeners
            if lst.access_log is not None and id(lst.access_log) not in kept_logs
        ]
        if retired:
            # (requests in flight on a removed listener may still write a line)
            self._retired_logs.extend(retired)
            self.loop.call_later(options.grace_period + 1.0, self._close_retired, retired)

    def _close_retired(self, logs: list[Any]) -> None:
        for access_log in logs:
            if access_log in self._retired_logs:
                self._retired_logs.remove(access_log)
                _close_logs([access_log])

    def reopen_logs(self) -> None:
        """SIGUSR1: write what the access logs buffered and open their files afresh (after
        a rotation moved them)."""
        for listener in self.listeners:
            if listener.access_log is not None:
                try:
                    listener.access_log.reopen()
                except OSError:
                    log.exception("cannot reopen the access log %s", listener.access_log.path)

    def protocol_factory(self, listener: Listener | None = None) -> Callable[[], asyncio.Protocol]:
        """A factory of client-connection protocols for ``loop.create_server``."""
        if listener is not None and listener.h2c:
            return lambda: PrefaceSniffer(self, listener, lambda: H1Downstream(self, listener))
        return lambda: H1Downstream(self, listener)

    async def drain(self, grace: float) -> bool:
        """Graceful stop: idle connections close now, busy ones after their response.

        Returns True if every connection finished within ``grace`` seconds; the rest are
        closed then.
        """
        if self.running:
            self.running = False
            try:
                self.proxy.worker_stop(self)
            except Exception:  # noqa: BLE001 - shutdown goes on whatever the hook does
                log.exception("worker_stop failed")
        wait = min(DRAIN_IDLE_WAIT, grace)
        for conn in list(self.connections):
            conn.start_draining(wait)
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        clean = not self.connections
        for conn in list(self.connections):
            conn._abort()
        if not clean:
            # (the aborted requests end, and log their lines, on the next loop turns)
            await asyncio.sleep(0.05)
        self.connector.close_all()
        for listener in self.listeners:
            if listener.access_log is not None:
                listener.access_log.close()  # (what is buffered is written)
        _close_logs(self._retired_logs)
        self._retired_logs = []
        return clean


def _close_logs(logs: list[Any]) -> None:
    for access_log in logs:
        try:
            access_log.close()
        except OSError:
            log.exception("cannot close the access log %s", access_log.path)


def _limits(options: ProxyOptions) -> tuple[int, int, int, int]:
    limits = options.limits
    return (
        limits.max_request_line, limits.max_header_bytes, limits.max_headers, limits.max_body
    )
