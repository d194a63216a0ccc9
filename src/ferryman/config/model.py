"""The validated configuration: frozen dataclasses, one per section of the file.

Durations are float seconds, sizes are int bytes, addresses are ``(host, port)`` tuples with
IPv6 hosts written without brackets, and file paths are absolute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Address",
    "ClientVerify",
    "Config",
    "DownstreamLimits",
    "DownstreamTimeouts",
    "ForwardedConfig",
    "ListenerConfig",
    "ListenerTls",
    "PoolConfig",
    "ServerConfig",
    "SniCert",
    "UpstreamConfig",
    "UpstreamTimeouts",
    "UpstreamTls",
    "DEFAULT_ALPN",
    "default_workers",
]

Address = tuple[str, int]
"""A ``(host, port)`` pair; IPv6 hosts without brackets, as ``socket`` expects them."""

ClientVerify = Literal["off", "optional", "required"]
"""How a TLS listener treats client certificates."""

DEFAULT_ALPN: tuple[str, ...] = ("http/1.1",)
"""The protocols a TLS listener offers in ALPN unless configured."""


def default_workers() -> int:
    """The default number of worker processes: the number of CPUs (1 if unknown)."""
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class DownstreamTimeouts:
    """Timeouts towards clients (key ``server.timeouts``), in seconds.

    Fields:
        header_read: time allowed to receive a complete request head, from the first byte
            (or from the end of the previous request); protects against slowloris.
            Default 10.0.
        keepalive: how long an idle keep-alive connection waits for the next request.
            Default 60.0.
        body_read: longest gap allowed between two reads of a request body. Default 60.0.
        body_write: longest time a write to the client may stay blocked (client not reading).
            Default 60.0.
    """

    header_read: float = 10.0
    keepalive: float = 60.0
    body_read: float = 60.0
    body_write: float = 60.0


@dataclass(frozen=True, slots=True)
class DownstreamLimits:
    """Limits on client requests (key ``server.limits``).

    Fields:
        max_request_line: longest request line in bytes (method, target and version);
            longer gets 414. Default 8192.
        max_header_bytes: largest header section in bytes, all header lines together;
            larger gets 431. Default 32768.
        max_headers: most header fields in one request; more gets 431. Default 100.
        max_body: largest request body in bytes; larger gets 413. ``0`` means unlimited.
            Default 1073741824 (1 GiB).
    """

    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body: int = 1073741824


@dataclass(frozen=True, slots=True)
class ForwardedConfig:
    """Which forwarding headers are added to requests sent upstream (key ``server.forwarded``).

    Fields:
        x_forwarded_for: append the client address to ``X-Forwarded-For``. Default True.
        x_forwarded_proto: set ``X-Forwarded-Proto`` to ``http`` or ``https``. Default True.
        x_forwarded_host: set ``X-Forwarded-Host`` to the client's ``Host``. Default True.
        via: append ``Via: 1.1 <via_name>`` to requests and responses. Default False.
        via_name: the pseudonym used in ``Via`` (an HTTP token). Default ``"ferryman"``.
    """

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    via: bool = False
    via_name: str = "ferryman"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Process-wide settings (key ``server``; optional, every field has a default).

    Fields:
        workers: number of worker processes, at least 1. Default: the number of CPUs.
        grace_period: seconds a graceful shutdown waits for in-flight requests before
            closing connections. Default 10.0.
        timeouts: timeouts towards clients; see ``DownstreamTimeouts``.
        limits: request size limits; see ``DownstreamLimits``.
        forwarded: forwarding headers added upstream; see ``ForwardedConfig``.
    """

    workers: int = field(default_factory=default_workers)
    grace_period: float = 10.0
    timeouts: DownstreamTimeouts = field(default_factory=DownstreamTimeouts)
    limits: DownstreamLimits = field(default_factory=DownstreamLimits)
    forwarded: ForwardedConfig = field(default_factory=ForwardedConfig)


@dataclass(frozen=True, slots=True)
class SniCert:
    """An extra certificate served to clients that ask for one of ``server_names`` via SNI.

    Fields:
        server_names: the names this certificate is for, lowercased; non-empty. A name may be
            a wildcard such as ``*.example.com`` (one label).
        cert: absolute path of the PEM certificate chain.
        key: absolute path of the PEM private key.
    """

    server_names: tuple[str, ...]
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """TLS settings of a listener (key ``listeners[N].tls``).

    Fields:
        cert: absolute path of the default PEM certificate chain (required).
        key: absolute path of its PEM private key (required).
        sni: extra certificates chosen by the SNI name the client sends; clients that send no
            name, or a name not listed, get ``cert``. Default ``()``.
        client_ca: absolute path of a PEM CA bundle used to verify client certificates
            (mutual TLS), or None. Default None.
        client_verify: ``"off"`` (do not ask for a client certificate), ``"optional"`` (ask,
            verify if one is sent) or ``"required"`` (refuse the handshake without a valid
            one). The loader defaults it to ``"required"`` when ``client_ca`` is set and
            ``"off"`` otherwise; the dataclass default is ``"off"``.
        alpn: protocols offered in ALPN, in order of preference: ``"http/1.1"`` and/or
            ``"h2"``. Default ``("http/1.1",)``.
    """

    cert: str
    key: str
    sni: tuple[SniCert, ...] = ()
    client_ca: str | None = None
    client_verify: ClientVerify = "off"
    alpn: tuple[str, ...] = DEFAULT_ALPN


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket (an item of ``listeners``).

    Fields:
        bind: the ``(host, port)`` to listen on; ``":8080"`` in the file means
            ``("0.0.0.0", 8080)``.
        upstream: name of the upstream group (a key of ``upstreams``) every request on this
            listener is proxied to, or None when the ``app`` class chooses. Default None.
        tls: TLS settings, or None for plain HTTP. Default None.
    """

    bind: Address
    upstream: str | None = None
    tls: ListenerTls | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Timeouts towards the servers of an upstream group (key ``upstreams.NAME.timeouts``),
    in seconds.

    Fields:
        connect: time allowed to establish a connection (TCP and TLS handshake).
            Default 5.0.
        read: longest wait for data from the server (response head or next body chunk).
            Default 60.0.
        write: longest time a write to the server may stay blocked. Default 60.0.
        idle: how long an idle pooled connection is kept before it is closed. Default 60.0.
            The loader keeps it equal to ``PoolConfig.idle_timeout``.
    """

    connect: float = 5.0
    read: float = 60.0
    write: float = 60.0
    idle: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS towards the servers of an upstream group (key ``upstreams.NAME.tls``).

    Fields:
        sni: the server name sent in SNI (and checked against the certificate), or None to use
            the host of each server address. Default None.
        verify: verify the server's certificate chain. Default True.
        verify_hostname: check that the certificate matches the server name. Default True.
        ca: absolute path of a PEM CA bundle to trust instead of the system store, or None.
            Default None.
        cert: absolute path of a client certificate presented to the server, or None.
            Default None. Set together with ``key``.
        key: absolute path of the client certificate's private key, or None. Default None.
    """

    sni: str | None = None
    verify: bool = True
    verify_hostname: bool = True
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The idle connection pool of an upstream group (key ``upstreams.NAME.pool``).

    Fields:
        max_idle: most idle connections kept per server; 0 disables reuse. Default 128.
        idle_timeout: seconds an idle connection is kept before it is closed. Default 60.0.
            The loader keeps it equal to ``UpstreamTimeouts.idle``: setting either sets both.
    """

    max_idle: int = 128
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """A group of interchangeable servers (a value of the ``upstreams`` mapping).

    Fields:
        name: the group's name (its key in ``upstreams``), made of letters, digits, ``_``,
            ``.`` and ``-``.
        servers: the ``(host, port)`` of each server; non-empty, no duplicates.
        timeouts: see ``UpstreamTimeouts``.
        tls: TLS settings, or None for plain HTTP. Default None.
        pool: see ``PoolConfig``.
        max_retries: how many times a failed request may be retried (on another server if
            there is one) when the failure is retryable. Default 1.
    """

    name: str
    servers: tuple[Address, ...]
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    tls: UpstreamTls | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_retries: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, validated configuration.

    Fields:
        source: where it was loaded from (the path given to ``load_config``, or the
            ``source`` given to ``parse_config``).
        app: ``"module:Class"`` naming a user ``ProxyHttp`` subclass to run instead of the
            built-in proxy, or None. Default None.
        server: process-wide settings; see ``ServerConfig``.
        listeners: the listening sockets, at least one when loaded from a file.
        upstreams: the upstream groups by name, in file order. Default empty.
        demo_origin: ``(host, port)`` where ``ferryman run`` also starts its tiny built-in
            greeting origin (for the quickstart), or None. Default None.
    """

    source: str
    app: str | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    demo_origin: Address | None = None
