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
    "CacheConfig",
    "CompressConfig",
    "LimitConfig",
    "DnsDiscovery",
    "FixedResponse",
    "HeaderEdits",
    "HeaderMatch",
    "HealthCheckConfig",
    "LbAlgorithm",
    "PassiveHealthConfig",
    "PathRewrite",
    "RedirectAction",
    "RouteConfig",
    "RouteMatch",
    "ServerEntry",
    "StaticAction",
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

DEFAULT_ALPN: tuple[str, ...] = ("h2", "http/1.1")
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
        request_id: send ``X-Request-Id`` upstream: the client's when it sent a usable one
            (1 to 200 visible ASCII characters), else a new one (32 hex digits). The same
            id is ``Session.request_id`` and the access log's ``request_id``. Default True.
    """

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    via: bool = False
    via_name: str = "ferryman"
    request_id: bool = True


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """A listener's access log (key ``listeners[].access_log``).

    Fields:
        format: ``"combined"`` (the combined log format, then ``key=value`` fields) or
            ``"json"`` (one JSON object per line). Default ``"combined"``.
        path: absolute path of the file appended to, or None for standard output
            (``"-"`` in the file). Default None.
        buffer: bytes gathered before a write. Default 65536.
        flush: longest time in seconds a line waits in the buffer. Default 1.0.
    """

    format: Literal["combined", "json"] = "combined"
    path: str | None = None
    buffer: int = 65536
    flush: float = 1.0


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
        pid_file: absolute path where the main process writes its pid (removed at exit),
            or None. Default None.
        error_log: absolute path of the file the processes' log lines (standard error)
            go to, or None for standard error itself. Required with ``--daemon``;
            reopened on SIGUSR1. Default None.
        user, group: the user and group the workers and the control process switch to
            after the listening sockets are bound (the main process keeps its rights, as
            nginx's master does), or None to stay. Default None.
        cpu_affinity: the CPUs workers are pinned to, worker ``i`` on the ``i``-th (round
            robin); ``()`` for no pinning. ``auto`` in the file is every CPU this process
            may use, in order. Default ``()``.
        upgrade_sock: absolute path of the unix socket a running server listens on for
            ``ferryman run --upgrade`` (which asks it for its listening sockets), or None:
            no upgrade. Default None.
        metrics: ``(host, port)`` of the Prometheus endpoint (``/metrics``, served by a
            process of its own with the counters of every worker), or None. Default None.
    """

    workers: int = field(default_factory=default_workers)
    grace_period: float = 10.0
    timeouts: DownstreamTimeouts = field(default_factory=DownstreamTimeouts)
    limits: DownstreamLimits = field(default_factory=DownstreamLimits)
    forwarded: ForwardedConfig = field(default_factory=ForwardedConfig)
    pid_file: str | None = None
    error_log: str | None = None
    user: str | None = None
    group: str | None = None
    cpu_affinity: tuple[int, ...] = ()
    upgrade_sock: str | None = None
    metrics: tuple[str, int] | None = None


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
        alpn: protocols offered in ALPN, in order of preference: ``"h2"`` and/or
            ``"http/1.1"``. In the file, a policy: ``h2_preferred`` (``("h2", "http/1.1")``,
            the default), ``h1_only`` or ``h2_only``; or an explicit list.
    """

    cert: str
    key: str
    sni: tuple[SniCert, ...] = ()
    client_ca: str | None = None
    client_verify: ClientVerify = "off"
    alpn: tuple[str, ...] = DEFAULT_ALPN

@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One header condition of a route match (an item of ``match.headers``).

    Fields:
        name: the header name, lowercased.
        value: the exact value required, or None. Default None.
        regex: a regular expression the value must match (``re.search``), or None.
            Default None. With neither ``value`` nor ``regex`` the header only has to be
            present; with ``absent`` it must not be.
        absent: the header must not be present. Default False.
    """

    name: str
    value: str | None = None
    regex: str | None = None
    absent: bool = False


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a route accepts (key ``listeners[N].routes[M].match``); every given condition
    must hold, and an empty match accepts every request.

    Fields:
        hosts: accepted ``Host`` names, lowercased, without port: exact names or
            ``*.suffix`` wildcards (any number of labels before the suffix). Empty: any host.
        path_prefix: the path must start with this, on a segment boundary when it does not
            end in ``/`` (``/v1`` matches ``/v1`` and ``/v1/x`` but not ``/v10``), or None.
        path: the path must equal this exactly, or None.
        path_regex: the path must match this regular expression (``re.match``, anchored at
            the start), or None.
        methods: accepted methods, uppercase. Empty: any method.
        headers: header conditions, all of which must hold.
    """

    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    path: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Header changes (keys ``request_headers`` / ``response_headers`` of a route), applied
    in the order remove, set, add.

    Fields:
        remove: names of headers to remove (case-insensitive).
        set: ``(name, value)`` pairs replacing any existing header of that name.
        add: ``(name, value)`` pairs appended (existing headers kept).
    """

    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RedirectAction:
    """Answer with a redirect (key ``redirect`` of a route).

    Fields:
        to: the ``Location``: a path (``/new``) or an absolute URL. ``$path`` in it stands
            for the request path and ``$query`` for the query string (with its ``?``).
        status: 301, 302, 303, 307 or 308. Default 302.
        keep_query: append the request's query string when ``to`` has none and does not use
            ``$query``. Default True.
    """

    to: str
    status: int = 302
    keep_query: bool = True


@dataclass(frozen=True, slots=True)
class FixedResponse:
    """Answer with a fixed response (key ``respond`` of a route).

    Fields:
        status: the status code, 200..599. Default 200.
        body: the body text (UTF-8). Default ``""``.
        content_type: the Content-Type, or None for none (``text/plain; charset=utf-8``
            when ``body`` is set and no type is given). Default None.
        headers: extra ``(name, value)`` response headers.
    """

    status: int = 200
    body: str = ""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StaticAction:
    """Serve files from a directory (key ``static`` of a route).

    Fields:
        root: absolute path of the directory served; request paths are resolved inside it
            and never leave it.
        index: file names tried, in order, for a request naming a directory.
            Default ``("index.html",)``.
        max_age: seconds for ``Cache-Control: max-age``, or None to send no Cache-Control.
            Default None.
    """

    root: str
    index: tuple[str, ...] = ("index.html",)
    max_age: int | None = None


CacheStorageKind = Literal["memory", "disk", "redis"]


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Cache the responses of an upstream route (key ``cache`` of a route).

    Fields:
        storage: ``memory`` (each worker's own), ``disk`` (a directory all workers
            share, kept across restarts) or ``redis`` (shared by every server using the
            same Redis). Default ``memory``.
        path: the directory of a ``disk`` storage (created if missing).
        redis: the ``redis://`` URL of a ``redis`` storage.
        max_size: the storage's bound in bytes (memory: per worker; disk: the
            directory). Redis is bounded by its own ``maxmemory``. Default 64 MiB.
        max_entry: the largest response body stored, or None for the storage's
            default: memory ``max_size``/64 (an eighth of each of its 8 shards), disk
            ``max_size``/8, redis 16 MiB.
        default_ttl: freshness of responses that state none, or None (RFC 9111's
            heuristic only).
        key: the cache key's parts. Default ``(scheme, host, uri)``.
        ignore: caching instructions disregarded (``cache-control``, ``expires``,
            ``set-cookie``, ``vary``, ``client-cache-control``).
        stale_while_revalidate / stale_if_error: seconds of RFC 5861 stale serving
            when the response does not say. Default 0.
        lock_timeout: the longest a request waits for another's fetch of the same
            key. Default 5 s.
        purge: networks whose clients may send ``PURGE``, or None (PURGE not handled).
        status_header: add ``Cache-Status``. Default true.
    """

    storage: CacheStorageKind = "memory"
    path: str | None = None
    redis: str | None = None
    max_size: int = 64 * 1024 * 1024
    max_entry: int | None = None
    default_ttl: float | None = None
    key: tuple[str, ...] = ("scheme", "host", "uri")
    ignore: tuple[str, ...] = ()
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    lock_timeout: float = 5.0
    purge: tuple[str, ...] | None = None
    status_header: bool = True


@dataclass(frozen=True, slots=True)
class CompressConfig:
    """Compress the responses of an upstream route (key ``compress`` of a route).

    Fields:
        algorithms: the codings offered, in preference order among those a client
            accepts equally. Default ``(br, zstd, gzip)``.
        min_size: responses whose Content-Length is below this are sent as they are.
            Default 1 KiB.
        types: media types compressed (``text/*``, ``application/json``,
            ``*+xml``...), or None for the default list (text, JSON, JavaScript, XML,
            SVG...).
    """

    algorithms: tuple[str, ...] = ("br", "zstd", "gzip")
    min_size: int = 1024
    types: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """A rate and/or concurrency limit of a route (key ``limit``: one, or a list).

    Fields:
        key: what is limited: ``client_ip``, ``header:NAME``, ``cookie:NAME`` or ``route``
            (all requests of the route together). Requests without the header or cookie
            are not limited by it. Default ``client_ip``.
        rate: ``(events, period in seconds)`` from ``100/s``, ``6000/m``, ``10/5s``; or
            None.
        burst: requests admitted at once: the rate is held over a window of
            ``burst / rate`` seconds holding ``burst`` requests; None: the rate's own
            period and count.
        concurrency: requests of one key in progress at once, or None.
        status: the status of refused requests. Default 429.
        retry_after: whether refusals carry ``Retry-After``. Default true.
        headers: whether admitted responses carry ``RateLimit-Limit``/``-Remaining``/
            ``-Reset``/``-Policy`` too (refusals by the rate always do). Default false (as Envoy's:
            four more fields cost about 2 µs a response).
        backend: ``local`` (shared by the workers of this server) or ``redis`` (shared by
            every server using the same Redis). Default ``local``.
        redis: the Redis URL of ``backend: redis``.
        sync: seconds between a worker's syncs with Redis (the staleness bound).
            Default 0.05.
        fail_open: when Redis is down: true holds the limit per server, false refuses
            requests. Default true.
    """

    key: str = "client_ip"
    rate: tuple[int, float] | None = None
    burst: int | None = None
    concurrency: int | None = None
    status: int = 429
    retry_after: bool = True
    headers: bool = False
    backend: Literal["local", "redis"] = "local"
    redis: str | None = None
    sync: float = 0.05
    fail_open: bool = True


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """Rewrite the request path sent upstream with a regular expression (key ``rewrite``).

    Fields:
        regex: the pattern searched in the path (``re.sub``, first occurrence only).
        to: the replacement; ``\\1`` / ``\\g<name>`` refer to groups.
    """

    regex: str
    to: str


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One route of a listener: a match and exactly one action.

    Fields:
        match: which requests it takes; see ``RouteMatch``.
        upstream: name of the upstream group to proxy to, or None.
        redirect: a redirect to answer with, or None.
        respond: a fixed response to answer with, or None.
        static: a directory to serve files from, or None.
        strip_prefix: for ``upstream``: removed from the start of the path sent upstream
            (``/v1/users`` becomes ``/users``; a path left empty becomes ``/``), or None.
        rewrite: for ``upstream``: a regex rewrite of the path sent upstream, applied after
            ``strip_prefix``, or None.
        request_headers: changes to the request sent upstream.
        response_headers: changes to the response sent to the client (every action).
        name: a name for logs and metrics; defaults to its key path, ``listeners[N].routes[M]``.
        cache: for ``upstream``: cache its responses, or None.
        compress: for ``upstream``: compress its responses (gzip, brotli, zstd), or None.
        limit: rate and concurrency limits checked before the route's action.
    """

    match: RouteMatch = field(default_factory=RouteMatch)
    upstream: str | None = None
    redirect: RedirectAction | None = None
    respond: FixedResponse | None = None
    static: StaticAction | None = None
    strip_prefix: str | None = None
    rewrite: PathRewrite | None = None
    request_headers: HeaderEdits = field(default_factory=HeaderEdits)
    response_headers: HeaderEdits = field(default_factory=HeaderEdits)
    name: str = ""
    cache: CacheConfig | None = None
    compress: CompressConfig | None = None
    limit: tuple[LimitConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listening socket (an item of ``listeners``).

    Fields:
        bind: the ``(host, port)`` to listen on; ``":8080"`` in the file means
            ``("0.0.0.0", 8080)``.
        upstream: name of the upstream group (a key of ``upstreams``) every request on this
            listener is proxied to, or None when the ``app`` class chooses. Default None.
        tls: TLS settings, or None for plain HTTP. Default None.
        routes: the ordered routes; the first whose match accepts a request handles it.
            ``upstream: NAME`` in the file is shorthand for one catch-all route proxying to
            NAME (and is also kept in ``upstream``). A request no route matches gets 404.
            Default ``()``.
        h2c: accept cleartext HTTP/2 with prior knowledge next to HTTP/1.x (the connection
            preface tells them apart). Default False.
        access_log: the listener's access log, or None for none. Default None.
    """

    bind: Address
    upstream: str | None = None
    tls: ListenerTls | None = None
    routes: tuple[RouteConfig, ...] = ()
    h2c: bool = False
    access_log: AccessLogConfig | None = None


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
        ping: HTTP/2 only: an open connection without streams sends a PING this often and
            is closed when no answer comes within ``connect``. Default 30.0.
    """

    connect: float = 5.0
    read: float = 60.0
    write: float = 60.0
    idle: float = 60.0
    ping: float = 30.0


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
        max_streams: HTTP/2 only: most concurrent requests on one connection (the server's
            SETTINGS_MAX_CONCURRENT_STREAMS wins when lower); another connection is opened
            when every one is full. Default 1000.
    """

    max_idle: int = 128
    idle_timeout: float = 60.0
    max_streams: int = 1000


LbAlgorithm = Literal["round_robin", "random", "hash", "consistent", "least_conn", "p2c_ewma"]
#: How requests go to an upstream group's servers (``upstreams.NAME.protocol``).
UpstreamProtocol = Literal["h1", "h2", "h2c"]
"""The load-balancing algorithms of ``upstreams.NAME.lb``."""


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One statically listed server (an item of ``upstreams.NAME.servers``), written
    ``"host:port"`` or ``"host:port weight=3"``.

    Fields:
        address: its ``(host, port)``.
        weight: its relative share of traffic, 1..1000. Default 1.
    """

    address: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """Servers found in DNS (key ``upstreams.NAME.dns``), re-resolved as records expire.

    Fields:
        name: the DNS name to resolve.
        port: the port of every server for A/AAAA records (SRV records carry their own).
            Default 80.
        type: ``"A"``, ``"AAAA"`` or ``"SRV"``. Default ``"A"``.
        refresh: seconds between resolutions, or None to follow the records' TTL (at least
            1 s). Default None.
        resolver: ``(host, port)`` of the DNS server to ask, or None for the system's.
            Default None.
    """

    name: str
    port: int = 80
    type: Literal["A", "AAAA", "SRV"] = "A"
    refresh: float | None = None
    resolver: Address | None = None


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks of an upstream group (key ``upstreams.NAME.health_check``), run
    once per server process whatever the number of workers.

    Fields:
        type: ``"tcp"`` (a connection is made) or ``"http"`` (a request is answered).
            Default ``"http"``.
        method: HTTP method. Default ``"GET"``.
        path: HTTP path. Default ``"/"``.
        host: the ``Host`` header, or None for the server's address. Default None.
        expect_status: accepted status codes. Default 200..399.
        body_contains: a string the response body must contain, or None. Default None.
        interval: seconds between checks of one server. Default 5.0.
        timeout: seconds a check may take. Default 2.0.
        rise: consecutive successes that mark a down server up. Default 2.
        fall: consecutive failures that mark an up server down. Default 3.
    """

    type: Literal["tcp", "http"] = "http"
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    expect_status: tuple[int, ...] = tuple(range(200, 400))
    body_contains: str | None = None
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True, slots=True)
class PassiveHealthConfig:
    """Passive health checks from live traffic (key ``upstreams.NAME.passive``), per worker.

    Fields:
        max_fails: consecutive failures (connect errors, timeouts, and 5xx answers when
            ``on_5xx``) that eject a server; 0 disables passive checks. Default 3.
        eject: seconds a server is first ejected for; doubled each time it fails again right
            after coming back. Default 10.0.
        max_eject: the longest ejection. Default 300.0.
        on_5xx: count 5xx responses as failures. Default True.
    """

    max_fails: int = 3
    eject: float = 10.0
    max_eject: float = 300.0
    on_5xx: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """A group of interchangeable servers (a value of the ``upstreams`` mapping).

    Fields:
        name: the group's name (its key in ``upstreams``), made of letters, digits, ``_``,
            ``.`` and ``-``.
        servers: the statically listed servers (with weights); no duplicates. Empty when
            servers come from ``dns``, ``file`` or ``discovery``.
        timeouts: see ``UpstreamTimeouts``.
        tls: TLS settings, or None for plain HTTP. Default None.
        pool: see ``PoolConfig``.
        max_retries: how many times a failed request may be retried (on another server if
            there is one) when the failure is retryable. Default 1.
        lb: the load-balancing algorithm. Default ``"round_robin"``.
        hash_key: for ``hash``/``consistent``: ``"client_ip"``, ``"uri"``, ``"path"``,
            ``"header:NAME"``, ``"cookie:NAME"`` or ``"python:module:function"`` (called
            with the session, returns ``bytes``/``str``). Default ``"client_ip"``.
        dns: servers from DNS, or None. Default None.
        file: absolute path of a JSON/YAML file listing servers (same item syntax as
            ``servers``), watched for changes, or None. Default None.
        discovery: ``"module:Class"`` naming a ``ferryman.lb.ServiceDiscovery`` subclass, or
            None. Default None. Exactly one of servers/dns/file/discovery is used.
        health_check: active health checks, or None for none. Default None.
        passive: passive health checks; see ``PassiveHealthConfig``.
        protocol: ``"h1"`` (HTTP/1.1, the default), ``"h2"`` (HTTP/2 chosen with ALPN over
            TLS, HTTP/1.1 when the server does not pick it; needs ``tls``) or ``"h2c"``
            (cleartext HTTP/2 by prior knowledge). HTTP/2 connections carry many requests
            at once.
    """

    name: str
    servers: tuple[ServerEntry, ...]
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    tls: UpstreamTls | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_retries: int = 1
    lb: LbAlgorithm = "round_robin"
    hash_key: str = "client_ip"
    dns: DnsDiscovery | None = None
    file: str | None = None
    discovery: str | None = None
    health_check: HealthCheckConfig | None = None
    passive: PassiveHealthConfig = field(default_factory=PassiveHealthConfig)
    protocol: UpstreamProtocol = "h1"


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
    """

    source: str
    app: str | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
