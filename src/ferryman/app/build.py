"""Turn a validated Config into a ready Server."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from ferryman.app.config_proxy import (
    DISCOVERY_WAIT,
    ConfigProxy,
    hash_key_function,
    make_discovery,
)
from ferryman.cache.purge_log import PurgeLog
from ferryman.config import Config, ConfigError, ListenerConfig, load_config
from ferryman.lb import HealthBoard, run_control_process
from ferryman.limits.arena import default_arena
from ferryman.metrics.board import MAX_WORKERS, MetricsBoard
from ferryman.metrics.recorder import MainMetrics
from ferryman.protocols.h1 import RequestLimits
from ferryman.proxy.access_log import AccessLog
from ferryman.proxy.hooks import ProxyHttp
from ferryman.proxy.options import ProxyOptions
from ferryman.proxy.service import HttpProxyService
from ferryman.server.listener import Listener, ListenerTls, SniCertificate
from ferryman.server.process import ProcessSetupError, resolve_account
from ferryman.server.server import ReloadError, Server
from ferryman.server.tls import server_ssl_context

log = logging.getLogger("ferryman.server")


class AppLoadError(Exception):
    """The ``app`` named in the config cannot be imported or is not a ProxyHttp."""


def load_app_class(spec: str) -> type[ProxyHttp]:
    """Import ``"module:Class"`` and check that it is a ProxyHttp subclass."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(f"app {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"app {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type) or not issubclass(obj, ProxyHttp):
        raise AppLoadError(f"app {spec!r}: expected a ferryman.ProxyHttp subclass, got {obj!r}")
    return obj


def proxy_options(config: Config) -> ProxyOptions:
    """Map the ``server`` section to the engine's ProxyOptions."""
    s = config.server
    return ProxyOptions(
        header_read_timeout=s.timeouts.header_read,
        keepalive_timeout=s.timeouts.keepalive,
        body_read_timeout=s.timeouts.body_read,
        body_write_timeout=s.timeouts.body_write,
        limits=RequestLimits(
            max_request_line=s.limits.max_request_line,
            max_header_bytes=s.limits.max_header_bytes,
            max_headers=s.limits.max_headers,
            max_body=s.limits.max_body,
        ),
        x_forwarded_for=s.forwarded.x_forwarded_for,
        x_forwarded_proto=s.forwarded.x_forwarded_proto,
        x_forwarded_host=s.forwarded.x_forwarded_host,
        via=s.forwarded.via,
        via_name=s.forwarded.via_name,
        request_id=s.forwarded.request_id,
        grace_period=s.grace_period,
    )


def make_listener(listener: ListenerConfig) -> Listener:
    """A server Listener for one ``listeners`` entry."""
    tls = None
    if listener.tls is not None:
        t = listener.tls
        tls = ListenerTls(
            cert=t.cert,
            key=t.key,
            sni=tuple(SniCertificate(tuple(e.server_names), e.cert, e.key) for e in t.sni),
            client_ca=t.client_ca,
            client_verify=t.client_verify,
            alpn=tuple(t.alpn),
        )
    access_log = None
    if listener.access_log is not None:
        a = listener.access_log
        access_log = AccessLog(a.path, a.format, buffer_size=a.buffer, flush_interval=a.flush)
    return Listener(
        (listener.bind[0], listener.bind[1]), tls=tls, h2c=listener.h2c, access_log=access_log
    )


def check_tls_material(config: Config) -> None:
    """Load every certificate, key and CA the config names, as serving would.

    The config layer checks that the files exist; this checks that TLS can use them, so
    that ``ferryman check`` refuses what ``ferryman run`` would, with the key path named.
    Raises :class:`AppLoadError`.
    """
    for i, lc in enumerate(config.listeners):
        listener = make_listener(lc)
        if listener.tls is None:
            continue
        try:
            server_ssl_context(listener.tls)
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = ", ".join(
                f for f in (listener.tls.cert, listener.tls.key, listener.tls.client_ca) if f
            )
            raise AppLoadError(
                f"listeners[{i}].tls: cannot load the certificate, key or CA ({files}): {exc}"
            ) from None
    for name, upstream in config.upstreams.items():
        tls = upstream.tls
        if tls is None:
            continue
        try:
            ctx = ssl.create_default_context(cafile=tls.ca)
            if tls.cert:
                ctx.load_cert_chain(tls.cert, tls.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = ", ".join(f for f in (tls.ca, tls.cert, tls.key) if f)
            raise AppLoadError(
                f"upstreams.{name}.tls: cannot load the CA or client certificate ({files}): {exc}"
            ) from None


def build_proxy(config: Config) -> ProxyHttp:
    """The proxy instance: the config's ``app`` class, or the built-in ConfigProxy.

    Raises :class:`AppLoadError` when something the config names in Python (the app, a
    ``discovery`` class, a ``python:`` hash key) cannot be loaded.
    """
    cls: type[ProxyHttp] = load_app_class(config.app) if config.app else ConfigProxy
    for name, upstream in config.upstreams.items():
        if upstream.discovery is not None:
            try:
                make_discovery(upstream)
            except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
                raise AppLoadError(
                    f"upstreams.{name}.discovery: cannot create {upstream.discovery}: {exc}"
                ) from exc
        if upstream.hash_key.startswith("python:"):
            try:
                hash_key_function(upstream.hash_key)
            except Exception as exc:  # noqa: BLE001 - any failure of user code is reported
                raise AppLoadError(
                    f"upstreams.{name}.hash_key: cannot load {upstream.hash_key[7:]}: {exc}"
                ) from exc
    return cls.from_config(config)


def build_server(
    config: Config, workers: int | None = None, config_path: str | None = None
) -> Server:
    """A Server with one HTTP proxy service for all listeners of ``config``.

    With the built-in proxy, discovery and active health checks run in one control
    process next to the workers, which read the results from a shared
    :class:`~ferryman.lb.HealthBoard`. With ``config_path``, SIGHUP reloads that file
    (see :class:`ConfigSource`).
    """
    check_tls_material(config)
    proxy = build_proxy(config)
    listeners = [make_listener(lc) for lc in config.listeners]
    server = Server(
        workers=workers if workers is not None else config.server.workers,
        grace_period=config.server.grace_period,
        pid_file=config.server.pid_file,
        error_log=config.server.error_log,
        user=config.server.user,
        group=config.server.group,
        cpus=config.server.cpu_affinity,
    )
    server.upgrade_sock = config.server.upgrade_sock
    if config.server.metrics is not None:
        # (made before any fork: workers publish to it, the metrics process reads it)
        board = MetricsBoard(workers=max(MAX_WORKERS, server.workers))
        main_metrics = MainMetrics(loaded_at=time.time())
        board.write(0, main_metrics.snapshot())
        server.metrics_board = board
        server.extra_addresses["metrics"] = config.server.metrics

        def count_reload(ok: bool) -> None:
            main_metrics.record_reload(ok)
            board.write(0, main_metrics.snapshot())

        server.on_reload = count_reload
    # (made before any fork, whether or not this config needs it: a reload may)
    source = ConfigSource(config_path or config.source, workers, HealthBoard())
    if isinstance(proxy, ConfigProxy):
        # (one worker: its purges are all there is, and PURGE can tell 404 from 200)
        proxy.caches.attach_purge_log(source.purge_log if server.workers > 1 else None)
        _hand_over_caches(proxy, config)
    server.extra_processes = source.helper_processes(server, proxy)
    server.add_service(HttpProxyService(proxy, listeners, proxy_options(config)))
    if config_path is not None:
        server.config_source = source
    source.running = config
    return server


def _hand_over_caches(proxy: ConfigProxy, config: Config) -> None:
    """Disk cache directories made by a root main process go to ``server.user``."""
    try:
        uid, gid = resolve_account(config.server.user, config.server.group)
    except ProcessSetupError:
        return  # (the server reports it when it starts)
    proxy.caches.hand_over(uid, gid)


#: ``server`` settings a reload cannot change in running processes (an upgrade can).
_FIXED_ON_RELOAD = ("user", "group", "pid_file", "error_log", "upgrade_sock", "metrics")


class ConfigSource:
    """The config file of a running server, read again on SIGHUP.

    Args:
        path: the config file (made absolute: ``--daemon`` changes directory).
        workers: the ``--workers`` override, kept across reloads (None: the file's).
        board: the health board shared by the control process and the workers.
    """

    def __init__(self, path: str, workers: int | None, board: HealthBoard) -> None:
        self.path = os.path.abspath(path)
        self.workers = workers
        self.board = board
        #: purges of per-worker caches, passed between the workers (made before the fork)
        self.purge_log = PurgeLog()
        #: the shared memory of the limits, made before the fork so that limits built
        #: on a reload (in the workers) are shared by them too
        self.arena = default_arena()
        #: the config being served (updated by :meth:`apply`)
        self.running: Config | None = None
        #: whether the config being served has a control process (discovery, checks)
        self.control_running = False

    def load(self) -> Config:
        """Read and check the file as ``ferryman check`` does; raises
        :class:`~ferryman.server.server.ReloadError` naming file, key path and reason."""
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        except OSError as exc:
            raise ReloadError(f"{self.path}: cannot read the config: {exc.strerror}") from None
        try:
            check_tls_material(config)
            build_proxy(config)
        except AppLoadError as exc:
            raise ReloadError(f"{self.path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of the user's app
            raise ReloadError(f"{self.path}: app: {exc}") from None
        running = self.running
        if running is not None:
            kept = {}
            for key in _FIXED_ON_RELOAD:
                if getattr(config.server, key) != getattr(running.server, key):
                    # (an upgrade finds the running server through the old upgrade_sock)
                    how = "restart" if key == "upgrade_sock" else "restart or upgrade"
                    log.warning(
                        "%s: server.%s changed: a reload keeps %r (%s to change it)",
                        self.path, key, getattr(running.server, key), how,
                    )
                    kept[key] = getattr(running.server, key)
            if kept:
                config = dataclasses.replace(
                    config, server=dataclasses.replace(config.server, **kept)
                )
        return config

    def addresses(self, config: Config) -> list[tuple[str, tuple[str, int]]]:
        """Every socket ``config`` listens on."""
        out = [("listener", (lc.bind[0], lc.bind[1])) for lc in config.listeners]
        if config.server.metrics is not None:
            out.append(("metrics", config.server.metrics))
        return out

    def apply(self, server: Server, config: Config) -> None:
        """Reconfigure ``server`` (main process or worker) for ``config``."""
        proxy = build_proxy(config)
        workers = self.workers if self.workers is not None else config.server.workers
        if isinstance(proxy, ConfigProxy):
            proxy.caches.attach_purge_log(self.purge_log if workers > 1 else None)
            _hand_over_caches(proxy, config)
        listeners = [make_listener(lc) for lc in config.listeners]
        server.extra_processes = self.helper_processes(server, proxy)
        service = server.services[0]
        assert isinstance(service, HttpProxyService)
        service.reconfigure(proxy, listeners, proxy_options(config), server.reload_log_fds)
        server.grace_period = config.server.grace_period
        server.workers = workers
        server.cpus = config.server.cpu_affinity
        self.running = config

    def wait_ready(self, config: Config) -> None:
        """Wait (up to the discovery wait) until the control process has published every
        upstream group without static servers, so workers never see one empty."""
        if not self.control_running:
            return
        discovered = {name for name, u in config.upstreams.items() if not u.servers}
        pending = self.board.wait_for(discovered, DISCOVERY_WAIT)
        if pending:
            log.warning(
                "reload: no servers discovered yet for upstream(s) %s after %.0fs",
                ", ".join(sorted(pending)), DISCOVERY_WAIT,
            )

    def helper_processes(self, server: Server, proxy: ProxyHttp) -> list[Callable[[], None]]:
        """The processes to run next to the workers for ``proxy``: the control process
        when some upstream group has discovery or health checks (``proxy`` then follows
        the board)."""
        helpers: list[Callable[[], None]] = []
        metrics_board = server.metrics_board
        if metrics_board is not None:

            def serve_metrics() -> None:
                from ferryman.metrics.endpoint import run_metrics_process

                sock = server.extra_sockets["metrics"][1]
                run_metrics_process(sock, metrics_board, server.supervisor_pid)

            serve_metrics.exclusive = True  # type: ignore[attr-defined]
            helpers.append(serve_metrics)
        if not isinstance(proxy, ConfigProxy):
            self.control_running = False
            return helpers
        monitors = proxy.monitors()
        self.control_running = bool(monitors)
        if not monitors:
            return helpers
        board = self.board
        proxy.board = board
        # (the supervisor's pid as of the fork: --daemon forks after build_server)
        helpers.append(
            lambda: run_control_process(board, proxy.monitors(), server.supervisor_pid)
        )
        return helpers
