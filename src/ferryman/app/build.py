"""Turn a validated Config into a ready Server."""

from __future__ import annotations

import importlib
import ssl
from typing import Any

from ferryman.app.config_proxy import ConfigProxy, hash_key_function, make_discovery
from ferryman.config import Config, ListenerConfig
from ferryman.lb import HealthBoard, run_control_process
from ferryman.protocols.h1 import RequestLimits
from ferryman.proxy.access_log import AccessLog
from ferryman.proxy.hooks import ProxyHttp
from ferryman.proxy.options import ProxyOptions
from ferryman.proxy.service import HttpProxyService
from ferryman.server.listener import Listener, ListenerTls, SniCertificate
from ferryman.server.server import Server
from ferryman.server.tls import server_ssl_context


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


def build_server(config: Config, workers: int | None = None) -> Server:
    """A Server with one HTTP proxy service for all listeners of ``config``.

    With the built-in proxy, discovery and active health checks run in one control
    process next to the workers, which read the results from a shared
    :class:`~ferryman.lb.HealthBoard`.
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
    if isinstance(proxy, ConfigProxy) and proxy.monitors():
        board = HealthBoard()
        proxy.board = board
        # (the supervisor's pid as of the fork: --daemon forks after this function)
        server.extra_processes.append(
            lambda: run_control_process(board, proxy.monitors(), server.supervisor_pid)
        )
    server.add_service(HttpProxyService(proxy, listeners, proxy_options(config)))
    return server
