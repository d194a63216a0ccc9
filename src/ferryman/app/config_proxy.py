"""ConfigProxy: the proxy that ``ferryman run`` serves, built from a Config.

It is an ordinary :class:`~ferryman.ProxyHttp` subclass using only the public API, with
plain-function hooks only (so requests run in the engine's task-free sync mode):

* ``request_filter`` finds the listener's route (:mod:`ferryman.app.routes`) and carries
  out local actions — redirect, fixed response, static files;
* ``upstream_peer`` picks a server of the route's upstream group with its
  :class:`~ferryman.lb.LoadBalancer` (health-aware; a retry excludes servers already tried,
  so it fails over);
* ``upstream_request_filter`` / ``response_filter`` apply the route's path rewrite and
  header edits;
* ``fail_to_connect`` / ``error_while_proxy`` / ``logging`` feed passive health checks and
  the least-connections / latency counters; ``fail_to_proxy`` explains a failure in the
  response body (naming the servers marked down when every server was).

Active health checks and discovery run in one place per server: the control process
(``ferryman run``), which publishes on a :class:`~ferryman.lb.HealthBoard` that each worker
polls — or, when no board is given (library use, tests), in the worker's own loop.
"""

from __future__ import annotations

import importlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote_from_bytes

from mypy_extensions import mypyc_attr

from ferryman.app.caches import CacheRegistry
from ferryman.app.route_limits import RouteLimit, refusal_body
from ferryman.app.routes import Route, Router, match_path, plain_path_end, to_origin_form
from ferryman.app.static import StaticFiles
from ferryman.config.model import Config, HeaderEdits, RouteConfig, UpstreamConfig
from ferryman.errors import ErrorKind, ErrorSource, ProxyError, status_for
from ferryman.lb import (
    Backend,
    DnsDiscovery,
    FileDiscovery,
    GroupMonitor,
    HealthBoard,
    HealthCheck,
    HttpHealthCheck,
    LoadBalancer,
    NoBackendError,
    PassiveHealth,
    ServiceDiscovery,
    StaticDiscovery,
    TcpHealthCheck,
    apply_snapshot,
)
from ferryman.limits.limiter import LimitGuard, Verdict
from ferryman.modules.compression import (
    DEFAULT_CONTENT_TYPES,
    CompressionConfig,
    Encoder,
    apply_response_headers,
    negotiate,
    new_encoder,
    should_compress,
)
from ferryman.protocols.headers import Headers, ResponseHeader, reason_phrase
from ferryman.proxy.engine import IDEMPOTENT_METHODS
from ferryman.proxy.hooks import ProxyHttp
from ferryman.proxy.session import Session
from ferryman.upstream.peer import HttpPeer

if TYPE_CHECKING:
    from ferryman.cache.http_cache import HttpCache
    from ferryman.protocols.headers import RequestHeader
    from ferryman.proxy.service import HttpProxyService

__all__ = ["ConfigProxy", "UpstreamGroup", "RequestState", "make_discovery", "make_check"]

log = logging.getLogger("ferryman.app")

#: How often a worker looks at the health board for news (seconds).
BOARD_POLL_INTERVAL: Final = 0.1
#: How long a starting worker waits for the first discovery of its groups (seconds).
DISCOVERY_WAIT: Final = 5.0


# --------------------------------------------------------------------------------------
# upstream groups


def _import(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _cookie(value: bytes, name: bytes) -> bytes:
    for part in value.split(b";"):
        k, _, v = part.strip().partition(b"=")
        if k == name:
            return v
    return b""


def hash_key_function(spec: str) -> Callable[[Session], bytes]:
    """The function computing the balancing key named by ``hash_key``."""
    if spec == "client_ip":
        return lambda s: s.client_ip
    if spec == "uri":
        return lambda s: s.req_header.raw_path
    if spec == "path":
        return lambda s: s.req_header.raw_path.partition(b"?")[0]
    kind, _, arg = spec.partition(":")
    if kind == "header":
        name = arg.lower().encode()
        return lambda s: s.req_header.headers.get(name) or b""
    if kind == "cookie":
        cookie = arg.encode()
        return lambda s: _cookie(s.req_header.headers.get(b"cookie") or b"", cookie)
    if kind == "python":
        fn = _import(arg)

        def call(s: Session) -> bytes:
            key = fn(s)
            return key.encode() if isinstance(key, str) else bytes(key or b"")

        return call
    raise ValueError(f"unknown hash_key {spec!r}")


def make_peer_factory(upstream: UpstreamConfig) -> Callable[[tuple[str, int]], HttpPeer]:
    """Builds the :class:`HttpPeer` of each server of ``upstream`` (TLS, timeouts, pool)."""
    tls = upstream.tls
    timeouts = upstream.timeouts

    def make(address: tuple[str, int]) -> HttpPeer:
        return HttpPeer(
            address,
            tls=tls is not None,
            sni=tls.sni if tls is not None else None,
            verify_cert=tls.verify if tls is not None else True,
            verify_hostname=tls.verify_hostname if tls is not None else True,
            ca=tls.ca if tls is not None else None,
            client_cert=tls.cert if tls is not None else None,
            client_key=tls.key if tls is not None else None,
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read,
            write_timeout=timeouts.write,
            idle_timeout=min(timeouts.idle, upstream.pool.idle_timeout),
            max_idle=upstream.pool.max_idle,
            protocol=upstream.protocol,
            ping_interval=timeouts.ping,
            max_streams=upstream.pool.max_streams,
        )

    return make


def make_discovery(upstream: UpstreamConfig) -> ServiceDiscovery:
    """The membership source of ``upstream``: static servers, DNS, a file or a class."""
    if upstream.dns is not None:
        d = upstream.dns
        return DnsDiscovery(d.name, d.port, d.type, refresh=d.refresh, resolver=d.resolver)
    if upstream.file is not None:
        return FileDiscovery(upstream.file)
    if upstream.discovery is not None:
        cls = _import(upstream.discovery)
        if not (isinstance(cls, type) and issubclass(cls, ServiceDiscovery)):
            raise TypeError(
                f"upstreams.{upstream.name}.discovery: {upstream.discovery} is not a "
                "ferryman.lb.ServiceDiscovery subclass"
            )
        instance: ServiceDiscovery = cls()
        return instance
    return StaticDiscovery([(s.address, s.weight) for s in upstream.servers])


def make_check(upstream: UpstreamConfig) -> HealthCheck | None:
    """The active health check of ``upstream``, or None."""
    hc = upstream.health_check
    if hc is None:
        return None
    tls_ctx: ssl.SSLContext | None = None
    server_hostname = None
    if upstream.tls is not None:
        t = upstream.tls
        tls_ctx = ssl.create_default_context(cafile=t.ca)
        tls_ctx.check_hostname = t.verify and t.verify_hostname
        if not t.verify:
            tls_ctx.verify_mode = ssl.CERT_NONE
        if t.cert:
            tls_ctx.load_cert_chain(t.cert, t.key)
        server_hostname = t.sni
    if hc.type == "tcp":
        return TcpHealthCheck(
            interval=hc.interval, timeout=hc.timeout, rise=hc.rise, fall=hc.fall,
            tls=tls_ctx, server_hostname=server_hostname,
        )
    return HttpHealthCheck(
        method=hc.method,
        path=hc.path,
        host=hc.host,
        expect_status=hc.expect_status,
        body_contains=hc.body_contains.encode() if hc.body_contains is not None else None,
        interval=hc.interval,
        timeout=hc.timeout,
        rise=hc.rise,
        fall=hc.fall,
        tls=tls_ctx,
        server_hostname=server_hostname,
    )


class UpstreamGroup:
    """An upstream group as the config proxy uses it: its balancer and settings.

    Attributes:
        name: the group's name.
        config: its :class:`UpstreamConfig`.
        balancer: the :class:`LoadBalancer` choosing its servers.
        key: computes the balancing key of a request (hash/consistent), else None.
        max_retries: retries allowed for its requests.
        on_5xx: whether 5xx answers count as passive failures.
        timed: whether request latency is measured (``p2c_ewma``).
        counted: whether in-flight requests are counted (``least_conn``, ``p2c_ewma``).
    """

    __slots__ = ("name", "config", "balancer", "key", "max_retries", "on_5xx", "timed", "counted")

    def __init__(self, upstream: UpstreamConfig) -> None:
        self.name = upstream.name
        self.config = upstream
        p = upstream.passive
        static = upstream.dns is None and upstream.file is None and upstream.discovery is None
        members = [(s.address, s.weight) for s in upstream.servers] if static else []
        self.balancer = LoadBalancer(
            upstream.name,
            members,
            upstream.lb,
            passive=PassiveHealth(max_fails=p.max_fails, eject=p.eject, max_eject=p.max_eject),
            peer_factory=make_peer_factory(upstream),
        )
        self.key = hash_key_function(upstream.hash_key) if self.balancer.uses_key else None
        self.max_retries = upstream.max_retries
        self.on_5xx = p.on_5xx
        self.timed = upstream.lb == "p2c_ewma"
        self.counted = upstream.lb in ("least_conn", "p2c_ewma")


# --------------------------------------------------------------------------------------
# route actions


class Edits:
    """A route's header edits, encoded once: names and values as bytes."""

    __slots__ = ("remove", "set", "add", "any")

    def __init__(self, edits: HeaderEdits) -> None:
        self.remove = tuple(n.encode("latin-1") for n in edits.remove)
        self.set = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.set)
        self.add = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.add)
        self.any = bool(self.remove or self.set or self.add)

    def apply(self, headers: Headers) -> None:
        """Remove, then set, then add."""
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


#: Characters left as they are when a normalised path is re-encoded for the upstream.
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"


class ProxyAction:
    """Proxy to an upstream group, with path rewrite and header edits."""

    __slots__ = (
        "group", "strip", "rewrite", "rewrite_to", "request_edits", "changes_request", "cache",
    )

    def __init__(
        self, route: RouteConfig, group: UpstreamGroup, cache: HttpCache | None = None
    ) -> None:
        #: the group requests are proxied to
        self.group = group
        #: the route's cache, or None
        self.cache = cache
        self.strip = route.strip_prefix.encode() if route.strip_prefix else None
        if self.strip is not None and self.strip.endswith(b"/") and self.strip != b"/":
            self.strip = self.strip[:-1]
        self.rewrite = re.compile(route.rewrite.regex.encode()) if route.rewrite else None
        self.rewrite_to = route.rewrite.to.encode() if route.rewrite else b""
        self.request_edits = Edits(route.request_headers)
        self.changes_request = (
            self.strip is not None or self.rewrite is not None or self.request_edits.any
        )

    def rewrite_request(self, req: RequestHeader, normal: bytes | None) -> None:
        """Apply strip_prefix, rewrite and request header edits to the upstream request.

        ``normal`` is the path routing matched (decoded, dot segments resolved): the prefix
        is stripped from that form, re-encoded, so ``/%61pi/x`` and ``/api/./x`` lose
        ``/api`` just like ``/api/x`` does.
        """
        if self.strip is not None or self.rewrite is not None:
            path, q, query = req.raw_path.partition(b"?")
            if normal is not None and normal != path:
                path = quote_from_bytes(normal, _PATH_SAFE).encode("ascii")
            strip = self.strip
            if strip is not None and path.startswith(strip):
                rest = path[len(strip) :]
                if not rest:
                    path = b"/"
                elif rest.startswith(b"/"):
                    path = rest
            if self.rewrite is not None:
                path = self.rewrite.sub(self.rewrite_to, path, count=1)
                if not path.startswith(b"/"):
                    path = b"/" + path
            req.raw_path = path + q + query
        self.request_edits.apply(req.headers)


class RedirectResponder:
    """Answer with a redirect."""

    __slots__ = ("to", "status", "keep_query", "templated")

    def __init__(self, route: RouteConfig) -> None:
        r = route.redirect
        assert r is not None
        self.to = r.to
        self.status = r.status
        self.keep_query = r.keep_query
        self.templated = "$path" in r.to or "$query" in r.to

    def location(self, req: RequestHeader) -> str:
        """The Location for ``req``."""
        path, q, query = req.raw_path.decode("latin-1").partition("?")
        to = self.to
        if self.templated:
            if "$query" in to:
                to = to.replace("$path", path).replace("$query", q + query)
                q = ""
            else:
                to = to.replace("$path", path)
        if self.keep_query and q and "?" not in to:
            to = f"{to}?{query}"
        if to.startswith("//"):
            to = "/" + to.lstrip("/")  # "//host/..." would send the client to another site
        return to


class FixedResponder:
    """Answer with a configured status, body and headers."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, route: RouteConfig) -> None:
        r = route.respond
        assert r is not None
        self.status = r.status
        self.body = r.body.encode()
        content_type = r.content_type
        if content_type is None and r.body:
            content_type = "text/plain; charset=utf-8"
        headers = list(r.headers)
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class RouteAction:
    """What the config proxy does with a route's requests (attached as ``Route.action``)."""

    __slots__ = (
        "proxy", "redirect", "fixed", "static", "response_edits", "edits_response",
        "compression", "limits", "edit_response",
    )

    proxy: ProxyAction | None

    def __init__(
        self,
        route: RouteConfig,
        groups: dict[str, UpstreamGroup],
        caches: CacheRegistry | None = None,
        scope: str = "",
    ) -> None:
        cache = None
        if route.cache is not None and caches is not None:
            cache = caches.cache(route.cache, scope, route.name)
        self.proxy = (
            ProxyAction(route, groups[route.upstream], cache) if route.upstream else None
        )
        self.redirect = RedirectResponder(route) if route.redirect else None
        self.fixed = FixedResponder(route) if route.respond else None
        c = route.compress
        compression = None
        if c is not None:
            compression = CompressionConfig(
                algorithms=c.algorithms,
                min_size=c.min_size,
                content_types=c.types if c.types is not None else DEFAULT_CONTENT_TYPES,
            )
        s = route.static
        self.static = (
            StaticFiles(s.root, s.index, s.max_age, compression) if s is not None else None
        )
        self.response_edits = Edits(route.response_headers)
        self.edits_response = self.response_edits.any
        #: applies the response edits to a local response's head, or None
        self.edit_response: Callable[[ResponseHeader], None] | None = None
        if self.edits_response:
            edits = self.response_edits
            self.edit_response = lambda resp: edits.apply(resp.headers)
        #: how the route's proxied responses are compressed, or None
        self.compression: CompressionConfig | None = compression if route.upstream else None
        #: the route's limits, checked in order before its action
        self.limits = tuple(
            RouteLimit(lc, f"{scope}/limit[{i}]", f"{route.name}/limit[{i}]")
            for i, lc in enumerate(route.limit)
        )


_RATELIMIT_FIELDS: Final = (
    b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset", b"ratelimit-policy",
)


def _add_fields(headers: Headers, fields: list[tuple[bytes, bytes]]) -> None:
    """Add ``fields`` (RateLimit-*), replacing the origin's own RateLimit-* fields."""
    for name in _RATELIMIT_FIELDS:
        if name in headers:
            for other in _RATELIMIT_FIELDS:
                headers.remove(other)
            break
    headers.items().extend(fields)


def _refuse(session: Session, action: RouteAction, limit: RouteLimit, verdict: Verdict) -> None:
    """Answer a request ``limit`` refused: its status, a plain body saying why,
    Retry-After, the RateLimit-* fields of a rate, the route's response header edits."""
    headers = verdict.headers()
    if limit.retry_after:
        headers.append((b"Retry-After", verdict.retry_after_value()))
    status = limit.status
    session.limit_status = verdict.reason or "limit"
    head = Headers(headers)
    head.set(b"Content-Type", b"text/plain; charset=utf-8")
    if action.edits_response:
        action.response_edits.apply(head)
    session.send_response(status, refusal_body(status, verdict.reason), head)


# --------------------------------------------------------------------------------------
# the proxy


class RequestState:
    """Per-request state of the config proxy (its ``ctx``).

    Attributes:
        route: the matched route, or None before routing.
        group: the upstream group of a proxied request.
        backend: the backend of the current attempt.
        tried: backends of earlier failed attempts (excluded on retry).
        reported: whether the current attempt's outcome was fed to passive health.
        start: when the current attempt was sent (monotonic), for latency.
        fail_open: whether health ruled out every server when choosing.
        path: the normalised request path routing matched (see ``match_path``).
        error: the failure of the last attempt, if it failed.
        stale: the last attempt failed on a pooled connection the server had closed (not
            the server's fault: it is not excluded from the retry, nor counted as failing).
    """

    __slots__ = (
        "route", "group", "backend", "tried", "reported", "start", "fail_open", "path",
        "error", "stale", "encoder", "guards", "limit_headers",
    )

    def __init__(self) -> None:
        self.route: Route | None = None
        self.path: bytes | None = None
        self.error: ProxyError | None = None
        self.stale = False
        self.group: UpstreamGroup | None = None
        self.backend: Backend | None = None
        self.tried: tuple[Backend, ...] = ()
        self.reported = False
        self.start = 0.0
        self.fail_open = False
        self.encoder: Encoder | None = None
        #: concurrency units held by the request (released by the logging hook)
        self.guards: list[LimitGuard] | None = None
        #: RateLimit-* fields for the response, or None
        self.limit_headers: list[tuple[bytes, bytes]] | None = None


#: Failures before the response head after which an idempotent request is retried on
#: another server (nginx's default ``proxy_next_upstream error timeout``).
_NEXT_UPSTREAM: Final = frozenset(
    (ErrorKind.UPSTREAM_CLOSED, ErrorKind.READ_TIMEOUT, ErrorKind.UPSTREAM_WRITE_TIMEOUT)
)

#: Seconds after ``worker_stop`` at which the cache storages of a replaced config are
#: closed (their connections and files), when requests that started with it are done.
STORAGE_CLOSE_DELAY: Final = 60.0

_NOT_FOUND: Final = b"404 Not Found: no route for this request\n"
_BAD_TARGET: Final = b"400 Bad Request: the request target is not a path or an http(s) URL\n"
_BAD_PATH: Final = b"400 Bad Request: the path climbs above the root\n"


@mypyc_attr(allow_interpreted_subclasses=True)
class ConfigProxy(ProxyHttp):
    """Routes requests per listener, load-balances proxied ones, serves local actions.

    Args:
        config: the validated configuration.
        board: the health board published by the server's control process, or None to run
            discovery and health checks in each worker's own loop.
    """

    def __init__(self, config: Config, board: HealthBoard | None = None) -> None:
        self.config = config
        self.board = board
        self.groups = {name: UpstreamGroup(u) for name, u in config.upstreams.items()}
        self.routers: dict[tuple[str, int], Router] = {}
        self.caches = CacheRegistry(
            [
                (rc.cache, rc.name)
                for lc in config.listeners
                for rc in lc.routes
                if rc.cache is not None
            ]
        )
        for listener in config.listeners:
            bind = f"{listener.bind[0]}:{listener.bind[1]}"
            routes = [
                Route(rc, RouteAction(rc, self.groups, self.caches, f"{bind}/{rc.name}"))
                for rc in listener.routes
            ]
            self.routers[(listener.bind[0], listener.bind[1])] = Router(routes)
        self._only = next(iter(self.routers.values())) if len(self.routers) == 1 else None
        self._monitors: list[GroupMonitor] = []
        self._service: HttpProxyService | None = None
        self._poll: Any = None
        self._narrow_hooks()

    def _narrow_hooks(self) -> None:
        """Leave out of ``overridden`` the hooks of this class that this config does not
        need (no route rewrites requests, say), so the engine does not call them at all.
        A subclass's own override of such a hook is kept."""
        actions = [r.action for router in self.routers.values() for r in router.routes]
        needed = {
            "upstream_request_filter": any(a.proxy and a.proxy.changes_request for a in actions),
            "response_filter": any(
                a.proxy
                and (a.edits_response or a.compression or any(lim.headers for lim in a.limits))
                for a in actions
            ),
            "response_body_filter": any(a.proxy and a.compression for a in actions),
            "upstream_response_filter": any(g.timed for g in self.groups.values()),
            "request_cache_filter": any(a.proxy and a.proxy.cache for a in actions),
        }
        cls = type(self)
        unused = {
            name
            for name, need in needed.items()
            if not need and getattr(cls, name) is getattr(ConfigProxy, name)
        }
        if unused:
            self.overridden = self.overridden - unused  # (the class's set, narrowed)
            self.async_hooks = self.async_hooks - unused

    @classmethod
    def from_config(cls, config: Any) -> ProxyHttp:
        """Build from a validated :class:`~ferryman.config.Config`."""
        return cls(config)

    def monitors(self) -> list[GroupMonitor]:
        """A :class:`GroupMonitor` per upstream group that needs one (discovery other than
        a static list, or active health checks)."""
        out = []
        for name, group in self.groups.items():
            u = group.config
            dynamic = u.dns is not None or u.file is not None or u.discovery is not None
            check = make_check(u)
            if dynamic or check is not None:
                out.append(GroupMonitor(name, make_discovery(u), check))
        return out

    # lifecycle ----------------------------------------------------------------------------

    def worker_start(self, service: HttpProxyService) -> None:
        """Follow the health board, or run discovery and checks in this worker."""
        self._service = service
        if self.board is not None:
            if getattr(service, "reloading", False):
                # (a reload, on a loop that serves: no blocking wait; the main process
                # waited for the control process's first word already)
                current = self.board.latest()
                if current is not None:
                    self.apply_state(current)
            else:
                self._await_discovery(self.board)
            self._poll = service.loop.call_later(BOARD_POLL_INTERVAL, self._poll_board)
            return
        for monitor in self.monitors():
            monitor.on_change = self._applier(monitor.name)
            monitor.start(service.loop)
            self._monitors.append(monitor)

    def worker_stop(self, service: HttpProxyService) -> None:
        """Stop polling and monitoring."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        for monitor in self._monitors:
            monitor.stop()
        self._monitors.clear()
        fleet = [
            lim
            for router in self.routers.values()
            for r in router.routes
            for lim in r.action.limits
            if lim.config.backend == "redis"
        ]
        if fleet:

            async def close_fleet() -> None:
                for lim in fleet:
                    await lim.close()

            service.loop.create_task(close_fleet())
        if self.caches.storages:
            # (requests in flight may still use them while they drain: closed later)
            service.loop.call_later(
                STORAGE_CLOSE_DELAY, lambda: service.loop.create_task(self.caches.close())
            )

    def _await_discovery(self, board: HealthBoard) -> None:
        """Before serving, wait (a bounded time) for the control process's first word on
        every group whose members are discovered, so that the first requests do not find
        such a group empty. Runs before the worker's loop serves, so it may block."""
        discovered = {name for name, group in self.groups.items() if not group.config.servers}
        pending = board.wait_for(discovered, DISCOVERY_WAIT, self.apply_state)
        if pending:
            log.warning(
                "no servers discovered yet for upstream(s) %s after %.0fs; serving anyway",
                ", ".join(sorted(pending)), DISCOVERY_WAIT,
            )

    def _applier(self, name: str) -> Callable[[list[dict[str, Any]]], None]:
        def apply(snapshot: list[dict[str, Any]]) -> None:
            self.apply_state({name: snapshot})

        return apply

    def apply_state(self, state: dict[str, list[dict[str, Any]]]) -> None:
        """Apply published group snapshots (membership and health) to the balancers."""
        service = self._service
        for name, snapshot in state.items():
            group = self.groups.get(name)
            if group is None:
                continue
            try:
                removed = apply_snapshot(group.balancer, snapshot)
            except Exception:  # noqa: BLE001 - one bad group must not stop the others
                log.exception("upstream %s: applying the published state failed", name)
                continue
            for gone in removed:
                if gone.peer is not None and service is not None:
                    service.connector.retire(gone.peer)

    def _poll_board(self) -> None:
        service = self._service
        board = self.board
        if service is None or board is None:
            return
        try:
            state = board.read()
            if state is not None:
                self.apply_state(state)
        except Exception:  # noqa: BLE001 - a bad document must not stop polling
            log.exception("reading the health board failed")
        self._poll = service.loop.call_later(BOARD_POLL_INTERVAL, self._poll_board)

    def health_report(self) -> list[tuple[str, str, bool]]:
        """Every server of every group: healthy unless a check failed or passive health
        ejected it."""
        now = time.monotonic()
        return [
            (name, b.name, b.healthy and not b.ejected_until > now)
            for name, group in self.groups.items()
            for b in group.balancer.backends
        ]

    # hooks --------------------------------------------------------------------------------

    def metric_labels(self, session: Session, ctx: RequestState) -> tuple[str, str]:
        """The matched route's name and the upstream group's."""
        route = ctx.route
        group = ctx.group
        return (route.name if route is not None else "", group.name if group is not None else "")

    def new_ctx(self) -> RequestState:
        """A :class:`RequestState`."""
        return RequestState()

    def router_for(self, session: Session) -> Router | None:
        """The router of the listener ``session`` arrived on."""
        if self._only is not None:
            return self._only
        listener = session.listener
        if listener is None:
            return None
        return self.routers.get(listener.address)

    def _find_route(self, session: Session, ctx: RequestState) -> Route | bytes | None:
        """The route for the request (recording the matched path in ``ctx``); bytes: why
        the target is refused with 400; None: no route accepts it."""
        req = session.req_header
        raw = req.raw_path
        end = plain_path_end(raw)
        path: bytes | None
        if end >= 0:  # the common case, match_path's fast path inlined
            path = raw if end == len(raw) else raw[:end]
        elif raw == b"*":
            if req.raw_method != b"OPTIONS":
                return _BAD_TARGET  # asterisk-form is for OPTIONS only (RFC 9112 §3.2.4)
            path = raw
        elif req.raw_method == b"CONNECT":
            path = None  # authority-form: routed on host alone (tunnels need allow_connect)
        elif not to_origin_form(req):
            return _BAD_TARGET
        else:
            path = match_path(req.raw_path)
        ctx.path = path
        if path is None and req.raw_path != b"*" and req.raw_method != b"CONNECT":
            return _BAD_PATH
        router = self._only
        if router is None:
            router = self.router_for(session)
        return router.route(req, path) if router is not None else None

    def request_filter(self, session: Session, ctx: RequestState) -> bool:  # type: ignore[override]
        """Route the request; answer it here unless it is proxied."""
        route = self._find_route(session, ctx)
        if not isinstance(route, Route):
            if route is None:
                session.send_response(404, _NOT_FOUND, content_type="text/plain; charset=utf-8")
            else:
                session.send_response(400, route, content_type="text/plain; charset=utf-8")
            return True
        ctx.route = route
        action: RouteAction = route.action
        if action.limits and self._refused(session, ctx, action):
            return True
        p = action.proxy
        if p is not None:
            ctx.group = p.group
            return False
        edit = self._response_editor(action, ctx.limit_headers)
        if action.static is not None:
            action.static.serve(session, edit=edit)
            return True
        if action.redirect is not None:
            r = action.redirect
            resp = ResponseHeader(r.status, [(b"Location", r.location(session.req_header))])
            self._send_local(session, resp, b"", edit)
            return True
        fixed = action.fixed
        assert fixed is not None
        resp = ResponseHeader(fixed.status, list(fixed.headers))
        self._send_local(session, resp, fixed.body, edit)
        return True

    def request_cache_filter(  # type: ignore[override]
        self, session: Session, ctx: RequestState
    ) -> HttpCache | None:
        """The matched route's cache, if it has one."""
        route = ctx.route
        if route is None:
            return None
        p = route.action.proxy
        return p.cache if p is not None else None

    def _late_route(self, session: Session, ctx: RequestState) -> UpstreamGroup:
        """Route in ``upstream_peer`` when a subclass's ``request_filter`` did not call
        this class's (so ``ctx.group`` is unset), with the same path checks."""
        route = self._find_route(session, ctx)
        if isinstance(route, bytes):
            raise ProxyError(ErrorKind.BAD_REQUEST, ErrorSource.DOWNSTREAM, route.decode().strip())
        proxy = route.action.proxy if route is not None else None
        if route is None or proxy is None:
            raise ProxyError(
                ErrorKind.NO_PEER, ErrorSource.INTERNAL, "no route proxies this request"
            )
        ctx.route = route
        ctx.group = proxy.group
        return proxy.group

    @staticmethod
    def _refused(session: Session, ctx: RequestState, action: RouteAction) -> bool:
        """Check the route's limits; answer and return True when one refuses (the
        route's response header edits apply to the refusal too). The concurrency units
        taken go to ``ctx.guards``, the fields to show to ``ctx.limit_headers`` (those of
        the limit with the fewest requests left).

        With several limits, all are asked first without counting: a request one of
        them refuses is counted by none (an abusive client does not use up a shared
        limit checked before its own)."""
        limits = action.limits
        if len(limits) > 1:
            for limit in limits:
                verdict = limit.peek(session)
                if verdict is not None and not verdict.admitted:
                    _refuse(session, action, limit, verdict)
                    return True
        shown: Verdict | None = None
        for limit in limits:
            verdict = limit.check(session)
            if verdict is None:
                continue
            if not verdict.admitted:  # (another worker took the last unit meanwhile)
                guards = ctx.guards
                if guards is not None:
                    for held in guards:
                        held.release()
                    ctx.guards = None
                _refuse(session, action, limit, verdict)
                return True
            guard = verdict.guard
            if guard is not None:
                if ctx.guards is None:
                    ctx.guards = [guard]
                else:
                    ctx.guards.append(guard)
            if limit.headers and verdict.quota and (
                shown is None or verdict.remaining < shown.remaining
            ):
                shown = verdict
        if shown is not None:
            ctx.limit_headers = shown.headers()
        return False

    @staticmethod
    def _response_editor(
        action: RouteAction, extra: list[tuple[bytes, bytes]] | None = None
    ) -> Callable[[ResponseHeader], None] | None:
        if not extra:
            return action.edit_response  # (made once per route)
        edits = action.response_edits if action.edits_response else None

        def edit(resp: ResponseHeader) -> None:
            if edits is not None:
                edits.apply(resp.headers)
            _add_fields(resp.headers, extra)

        return edit

    @staticmethod
    def _send_local(
        session: Session,
        resp: ResponseHeader,
        body: bytes,
        edit: Callable[[ResponseHeader], None] | None,
    ) -> None:
        if edit is not None:
            edit(resp)
        session.send_response_header(resp, end_of_stream=not body, length=len(body))
        if body:
            session.send_response_body(body, end_of_stream=True)

    def upstream_peer(self, session: Session, ctx: RequestState) -> HttpPeer:  # type: ignore[override]
        """Pick a server of the route's group; a retry excludes servers already tried."""
        group = ctx.group
        if group is None:
            group = self._late_route(session, ctx)
        previous = ctx.backend
        if previous is not None:  # a retry: the last attempt failed
            if ctx.stale:
                ctx.stale = False  # a dead pooled connection: the server may be tried again
            else:
                ctx.tried += (previous,)
            if group.counted:
                previous.inflight -= 1
        else:
            session.max_retries = group.max_retries
        try:
            key = group.key
            backend = group.balancer.select(b"" if key is None else key(session), ctx.tried)
        except NoBackendError as exc:
            ctx.backend = None
            last = ctx.error
            if ctx.tried and last is not None:
                # every server still believed healthy was tried: answer with the failure
                # of the last attempt rather than try a server known to be down
                last.retryable = False
                raise last from None
            raise ProxyError(
                ErrorKind.NO_PEER, ErrorSource.UPSTREAM,
                "no servers to send the request to (discovery has found none)", cause=exc,
            ) from None
        ctx.fail_open = group.balancer.last_fail_open
        ctx.backend = backend
        ctx.reported = False
        if group.counted:
            backend.inflight += 1
        if group.timed:
            ctx.start = time.monotonic()
        peer = backend.peer
        assert peer is not None
        return peer

    def upstream_request_filter(  # type: ignore[override]
        self, session: Session, upstream_request: RequestHeader, ctx: RequestState
    ) -> None:
        """Path rewrite and request header edits of the route."""
        route = ctx.route
        if route is not None:
            p = route.action.proxy
            if p is not None and p.changes_request:
                p.rewrite_request(upstream_request, ctx.path)

    def response_filter(  # type: ignore[override]
        self, session: Session, response: ResponseHeader, ctx: RequestState
    ) -> None:
        """Response header edits of the route, and its compression."""
        route = ctx.route
        if route is None:
            return
        action: RouteAction = route.action
        if action.edits_response:
            action.response_edits.apply(response.headers)
        extra = ctx.limit_headers
        if extra:
            _add_fields(response.headers, extra)
        compression = action.compression
        if compression is None:
            return
        req = session.req_header
        if should_compress(response.status, req.method, response.headers, compression):
            encoding = negotiate(req.headers.get_all(b"accept-encoding"), compression.algorithms)
            apply_response_headers(response.headers, encoding)  # (Vary in any case)
            if encoding is not None:
                ctx.encoder = new_encoder(encoding, compression)
                return
        session.bypass_response_body_filter()  # (sent as it is, Content-Length kept)

    def response_body_filter(
        self, session: Session, body: bytes, end_of_stream: bool, ctx: RequestState
    ) -> bytes | None:
        """Compress the body when ``response_filter`` chose an encoding."""
        encoder = ctx.encoder
        if encoder is None:
            return body
        out = encoder.compress(body) if body else b""
        if end_of_stream:
            out += encoder.finish()
            ctx.encoder = None
        return out

    def upstream_response_filter(  # type: ignore[override]
        self, session: Session, upstream_response: ResponseHeader, ctx: RequestState
    ) -> None:
        """Record the time to the response head for ``p2c_ewma`` (called only when some
        group uses it): the client's own download time must not count."""
        group = ctx.group
        backend = ctx.backend
        if group is not None and backend is not None and group.timed:
            now = time.monotonic()
            group.balancer.selector.observe(backend, now - ctx.start, now)

    def _failed(self, ctx: RequestState, error: ProxyError) -> None:
        backend = ctx.backend
        group = ctx.group
        if backend is None or group is None or ctx.reported:
            return
        if error.source is ErrorSource.UPSTREAM:
            ctx.error = error
            ctx.reported = True
            if group.balancer.report_failure(backend, error.detail or error.kind.value):
                log.warning(
                    "upstream %s: server %s ejected after failures (%s)",
                    group.name, backend.name, error.detail or error.kind.value,
                )

    def fail_to_connect(  # type: ignore[override]
        self, session: Session, peer: HttpPeer, ctx: RequestState, error: ProxyError
    ) -> ProxyError:
        """Count the failure for passive health (connect failures stay retryable)."""
        self._failed(ctx, error)
        return error

    def error_while_proxy(  # type: ignore[override]
        self,
        session: Session,
        peer: HttpPeer,
        ctx: RequestState,
        error: ProxyError,
        client_reused: bool,
    ) -> ProxyError:
        """Count the failure for passive health — unless it is a pooled connection that
        died before answering (the engine made that retryable): the server merely closed an
        idle connection, so the retry may go to it again on a fresh one."""
        if error.retryable and error.source is ErrorSource.UPSTREAM and not ctx.reported:
            ctx.stale = True
            return error
        self._failed(ctx, error)
        if (
            error.kind in _NEXT_UPSTREAM
            and not session.response_started
            and session.req_header.raw_method in IDEMPOTENT_METHODS
        ):
            # like nginx's default "proxy_next_upstream error timeout": an idempotent
            # request whose server failed before answering goes to another server
            error.retryable = True
        return error

    def fail_to_proxy(  # type: ignore[override]
        self, session: Session, error: ProxyError, ctx: RequestState
    ) -> int:
        """Error response; for upstream failures the body says what failed and why."""
        status = status_for(error)
        if session.response_started:
            return status
        group = ctx.group
        if group is None or error.source is not ErrorSource.UPSTREAM:
            session.send_error(status)
            return status
        lines = [f"{status} {reason_phrase(status).decode()}"]
        where = f' ({ctx.backend.name})' if ctx.backend is not None else ""
        lines.append(f'upstream "{group.name}"{where}: {error.detail or error.kind.value}')
        if ctx.fail_open:
            lines.append(
                f"every server of the group was marked down, tried anyway: "
                f"{group.balancer.down_report()}"
            )
        if ctx.tried:
            lines.append("also tried: " + ", ".join(b.name for b in ctx.tried))
        session.send_response(
            status, "\n".join(lines) + "\n", content_type="text/plain; charset=utf-8"
        )
        return status

    def logging(  # type: ignore[override]
        self, session: Session, error: ProxyError | None, ctx: RequestState
    ) -> None:
        """Give back concurrency units, release the in-flight count, record latency and
        success for passive health."""
        guards = ctx.guards
        if guards is not None:
            ctx.guards = None
            for guard in guards:
                guard.release()
        backend = ctx.backend
        group = ctx.group
        if backend is None or group is None:
            return
        if group.counted:
            backend.inflight -= 1
        if ctx.reported:
            return
        status = session.upstream_status
        if status is None:
            return  # no answer and no upstream error: the client left first
        balancer = group.balancer
        if group.on_5xx and status >= 500:
            if balancer.report_failure(backend, f"status {status}"):
                log.warning(
                    "upstream %s: server %s ejected after failures (status %d)",
                    group.name, backend.name, status,
                )
            return
        if backend.fails or backend.ejections:
            balancer.report_success(backend)
