"""ProxyHttp: the hooks a proxy overrides, in the order they run.

Subclass :class:`ProxyHttp`, implement :meth:`upstream_peer`, and override whatever else
you need. The engine detects, once per class, which hooks a subclass overrides: a hook
left at its default is never called (and so never awaited), so unused hooks cost nothing.

Phase order per request (see docs for the chart)::

    new_ctx → early_request_filter → request_filter ─(True: response sent)──────────┐
      → [request_body_filter per chunk] → upstream_peer → connected_to_upstream      │
      → upstream_request_filter → upstream_response_filter → response_filter         │
      → [response_body_filter per chunk] → logging ◄─────────────────────────────────┘
    on failure: fail_to_connect / error_while_proxy (retry → back to upstream_peer),
                then fail_to_proxy, then logging.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ferryman.errors import ProxyError, status_for

if TYPE_CHECKING:
    from ferryman.cache.http_cache import HttpCache
    from ferryman.cache.storage import CacheMeta
    from ferryman.protocols.headers import RequestHeader, ResponseHeader
    from ferryman.proxy.service import HttpProxyService
    from ferryman.proxy.session import Session
    from ferryman.upstream.peer import HttpPeer

#: The hook names, in pipeline order.
HOOKS = (
    "new_ctx",
    "early_request_filter",
    "request_filter",
    "request_body_filter",
    "upstream_peer",
    "connected_to_upstream",
    "upstream_request_filter",
    "upstream_response_filter",
    "response_filter",
    "response_body_filter",
    "fail_to_connect",
    "error_while_proxy",
    "fail_to_proxy",
    "logging",
)


#: The cache phase's hooks (Pingora's names). They run only for a request that
#: ``request_cache_filter`` gave a cache, between ``request_filter`` and
#: ``upstream_peer`` (lookups) and after ``upstream_response_filter`` (storing); see
#: docs/hooks.md for the chart.
CACHE_HOOKS = (
    "request_cache_filter",
    "cache_key_callback",
    "cache_hit_filter",
    "cache_miss",
    "cache_vary_filter",
    "response_cache_filter",
    "should_serve_stale",
)


_SYNC_ONLY = frozenset(
    ("new_ctx", "request_body_filter", "response_body_filter", "cache_vary_filter")
)


class ProxyHttp:
    """Base class of every ferryman proxy. Override hooks to program it.

    A single instance serves every request of a worker, so per-request state belongs in
    the ``ctx`` object made by :meth:`new_ctx`, not on ``self``.

    Hooks shown as ``async def`` may be overridden either with ``async def`` (awaited, so
    they may do I/O) or with a plain ``def`` (called directly). When every overridden hook
    is a plain function, the engine runs a request without creating any task: use plain
    functions for hooks that never wait. ``new_ctx`` and the body filters must be plain.
    Hooks that want to answer the client from a plain function use the non-waiting
    ``session.send_response(...)`` family.
    """

    #: Names of the hooks this class overrides (computed at class creation). The engine
    #: reads it per request, so an instance may narrow it in ``__init__`` to leave out
    #: overrides its configuration does not need; it must never add a hook.
    overridden: frozenset[str] = frozenset()
    #: The overridden hooks defined with ``async def`` (awaited); the others are called.
    async_hooks: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = frozenset(
            name
            for name in HOOKS + CACHE_HOOKS
            if getattr(cls, name) is not getattr(ProxyHttp, name)
        )
        async_hooks = frozenset(
            name for name in overridden if inspect.iscoroutinefunction(getattr(cls, name))
        )
        for name in _SYNC_ONLY & async_hooks:
            raise TypeError(f"{cls.__name__}.{name} must be a plain function, not async def")
        cls.overridden = overridden
        cls.async_hooks = async_hooks

    @classmethod
    def from_config(cls, config: Any) -> ProxyHttp:
        """Build the proxy named by a config's ``app`` key. Default: ``cls()``."""
        return cls()

    # lifecycle (not per request) ------------------------------------------------------
    def worker_start(self, service: HttpProxyService) -> None:
        """Runs once in each worker process when ``service`` starts, before any request.

        ``service.loop`` is the worker's event loop and ``service.connector`` its upstream
        pool. Start background work here (health checks, discovery, polling shared state)
        with ``service.loop.create_task(...)``. Plain function. Default: nothing.
        """

    def worker_stop(self, service: HttpProxyService) -> None:
        """Runs once in each worker when ``service`` begins to drain (shutdown). Stop
        background work started in :meth:`worker_start`. Plain function. Default: nothing.
        """

    def metric_labels(self, session: Session, ctx: Any) -> tuple[str, str]:
        """The ``route`` and ``upstream`` labels of a finished request's metrics.

        Runs once per request, after ``logging``, only when the server keeps metrics
        (``server.metrics``). Plain function; return names from a small fixed set (each
        distinct pair is a time series). Default: ``("", "")``; the config proxy gives the
        route's and the upstream group's names.
        """
        return ("", "")

    def health_report(self) -> list[tuple[str, str, bool]]:
        """``(upstream, server, healthy)`` for each server this proxy balances over, as
        exported in the metrics (read a few times a second, not per request).
        Default: ``[]``."""
        return []

    # 1 -------------------------------------------------------------------------------
    def new_ctx(self) -> Any:
        """Create the per-request state object passed to every later hook.

        Runs first, once per request, synchronously. Default: a new empty ``dict``.
        """
        return {}

    # 2 -------------------------------------------------------------------------------
    async def early_request_filter(self, session: Session, ctx: Any) -> None:
        """Runs once the request head is parsed, before any module or other hook.

        May change ``session.req_header``. Default: nothing.
        """

    # 3 -------------------------------------------------------------------------------
    async def request_filter(self, session: Session, ctx: Any) -> bool:
        """Authenticate, route, rate-limit or answer the request early.

        May change ``session.req_header`` (the upstream request is built from it) or write
        a whole response with ``await session.respond(...)``. Return ``True`` when a
        response was sent, which ends the request (only ``logging`` still runs). A
        CONNECT request is refused with 405 after this hook unless it sets
        ``session.allow_connect = True``. Default: ``False``.
        """
        return False

    # cache phase (runs only when request_cache_filter returns a cache) ----------------
    async def request_cache_filter(self, session: Session, ctx: Any) -> HttpCache | None:
        """Decide whether this request may be answered from, and stored in, a cache.

        Runs after ``request_filter`` (when it did not answer). Return the
        :class:`~ferryman.cache.http_cache.HttpCache` to use, or None to proxy the
        request without a cache. With a cache, GET and HEAD are looked up; other
        methods go upstream and, when unsafe and successful, invalidate the URL's
        entries (RFC 9111 §4.4); ``PURGE`` from the cache's ``purge_from`` networks
        removes the URL's entries. Default: None (the config proxy returns the route's
        ``cache``).
        """
        return None

    async def cache_key_callback(self, session: Session, ctx: Any) -> bytes:
        """The primary cache key of this request (bytes).

        Runs once per cached request, after ``request_cache_filter``. Variants of a
        response with ``Vary`` are stored under this key plus their secondary key.
        Default: ``session.cache.primary_key(...)`` from the cache's ``key`` parts
        (scheme, Host and the request target unless configured otherwise).
        """
        return default_cache_key(session)

    async def cache_hit_filter(self, session: Session, meta: CacheMeta, ctx: Any) -> bool:
        """A stored response was found for the request; return True to treat it as
        expired (it is then revalidated with the origin before use).

        ``meta`` is the stored :class:`~ferryman.cache.storage.CacheMeta` (status,
        headers, times); do not change it. Default: False.
        """
        return False

    async def cache_miss(self, session: Session, ctx: Any) -> None:
        """Nothing usable was stored: the request is about to go upstream to fill the
        cache (it holds the cache lock for its key). Default: nothing."""

    def cache_vary_filter(
        self, session: Session, fields: tuple[bytes, ...], ctx: Any
    ) -> bytes:
        """The secondary key of this request for a response that varies on ``fields``
        (the lowercased names its ``Vary`` lists).

        Runs when such a response is stored and when one is looked up; requests with
        equal secondary keys share a variant. Plain function. Default: the request's
        values of those fields, normalised (RFC 9111 §4.1); override to normalise more
        (say, to ``gzip`` or nothing from ``Accept-Encoding``).
        """
        return default_secondary_key(session, fields)

    async def response_cache_filter(
        self, session: Session, response: ResponseHeader, ctx: Any
    ) -> float | None:
        """Decide whether the upstream response is stored, and for how long it is fresh.

        Runs after ``upstream_response_filter`` (whose changes are what gets stored)
        and before ``response_filter`` (whose changes are per client, not stored).
        Return the freshness lifetime in seconds, or None not to store it. Default:
        RFC 9111 for a shared cache (``no-store``, ``private``, ``Authorization``,
        ``Set-Cookie``, ``s-maxage``/``max-age``/``Expires``, heuristic freshness),
        with the cache's ``default_ttl`` and ``ignore`` applied.
        """
        return default_cacheability(session, response)

    async def should_serve_stale(
        self, session: Session, ctx: Any, error: ProxyError | None
    ) -> bool:
        """Whether a stale stored response answers this request instead of the origin.

        With ``error`` set, revalidating it failed (a connect error, a timeout, or the
        origin answered 500, 502, 503 or 504): True serves the stale response. With
        ``error`` None, the response is stale within its ``stale-while-revalidate``
        window: True serves it now and refreshes it in the background, False waits for
        the origin. Default: what RFC 5861 allows (``stale-if-error`` and
        ``stale-while-revalidate`` from the response, the request or the cache's
        config).
        """
        return default_serve_stale(session, error)

    # 4 -------------------------------------------------------------------------------
    def request_body_filter(
        self, session: Session, body: bytes, end_of_stream: bool, ctx: Any
    ) -> bytes | None:
        """Inspect or rewrite each request body chunk on its way upstream.

        Plain function (it runs per chunk). Called with ``end_of_stream=True`` and
        ``body=b""`` once at the end. Return the bytes to send (``None`` or ``b""`` sends
        nothing). When overridden, the body is sent upstream chunked, since its length may
        change. Default: the chunk unchanged.
        """
        return body

    # 5 -------------------------------------------------------------------------------
    async def upstream_peer(self, session: Session, ctx: Any) -> HttpPeer:
        """Choose the upstream server for this request (load balancing goes here).

        Called again for each retry; ``session.retries`` tells how many failed before.
        Must be provided: there is no default.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement upstream_peer")

    # 6 -------------------------------------------------------------------------------
    async def connected_to_upstream(
        self, session: Session, reused: bool, peer: HttpPeer, ctx: Any
    ) -> None:
        """Runs when a connection to ``peer`` is ready; ``reused`` is True if pooled.

        For observation (metrics, logs). Default: nothing.
        """

    # 7 -------------------------------------------------------------------------------
    async def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        """Rewrite the request head about to be sent upstream.

        ``upstream_request`` is a copy of the client's request with hop-by-hop headers
        removed and forwarding headers added; change it in place. Default: nothing.
        """

    # 8 -------------------------------------------------------------------------------
    async def upstream_response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        """Inspect or change the upstream's response head, before cache and modules.

        Default: nothing.
        """

    # 9 -------------------------------------------------------------------------------
    async def response_filter(self, session: Session, response: ResponseHeader, ctx: Any) -> None:
        """Rewrite the response head about to be sent to the client. Default: nothing."""

    # 10 ------------------------------------------------------------------------------
    def response_body_filter(
        self, session: Session, body: bytes, end_of_stream: bool, ctx: Any
    ) -> bytes | None:
        """Inspect or rewrite each response body chunk on its way to the client.

        Plain function (runs per chunk); called once more with ``end_of_stream=True`` and
        ``body=b""`` at the end. When overridden the response loses its Content-Length
        and is sent chunked (or close-delimited to HTTP/1.0 clients). Default: unchanged.
        """
        return body

    # 11 ------------------------------------------------------------------------------
    async def fail_to_connect(
        self, session: Session, peer: HttpPeer, ctx: Any, error: ProxyError
    ) -> ProxyError:
        """Connecting to ``peer`` failed (refused, timeout, TLS). Return the error to use.

        Set ``error.retryable`` to decide whether ``upstream_peer`` is asked again (up to
        ``session.max_retries``). Default: the error unchanged (connect failures are
        retryable).
        """
        return error

    # 12 ------------------------------------------------------------------------------
    async def error_while_proxy(
        self,
        session: Session,
        peer: HttpPeer,
        ctx: Any,
        error: ProxyError,
        client_reused: bool,
    ) -> ProxyError:
        """An error after the connection was made (write failure, bad response, timeout).

        ``client_reused`` tells whether the client connection served earlier requests.
        Errors on a reused upstream connection before any response byte are retryable
        for idempotent methods. A retry is only possible while the request body sent so
        far fits the 64 KiB retry buffer. Default: the error unchanged.
        """
        return error

    # 13 ------------------------------------------------------------------------------
    async def fail_to_proxy(self, session: Session, error: ProxyError, ctx: Any) -> int:
        """Write the error response for a failed request and return its status.

        Runs once, after retries are exhausted or on a non-retryable error. If a
        response was already started it cannot be replaced; the client connection is
        closed instead. Default: an empty response with :func:`ferryman.errors.status_for`.
        """
        status = status_for(error)
        if not session.response_started:
            await session.respond_error(status)
        return status

    # 14 ------------------------------------------------------------------------------
    async def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
        """Runs last, exactly once per request, success or failure. Default: nothing."""


def default_cache_key(session: Session) -> bytes:
    """The key :meth:`ProxyHttp.cache_key_callback` gives by default."""
    cache = session.cache
    if cache is None:
        raise RuntimeError("the request has no cache")
    req = session.req_header
    return cache.primary_key(
        scheme=b"https" if session.is_tls else b"http",
        method=req.raw_method,
        target=req.raw_path,
        header=req.headers.get_all,
    )


def default_secondary_key(session: Session, fields: tuple[bytes, ...]) -> bytes:
    """The secondary key :meth:`ProxyHttp.cache_vary_filter` gives by default."""
    from ferryman.cache.http_cache import HttpCache

    return HttpCache.secondary_key(fields, session.req_header.headers.get_all)


def default_cacheability(session: Session, response: ResponseHeader) -> float | None:
    """What :meth:`ProxyHttp.response_cache_filter` answers by default."""
    cache = session.cache
    if cache is None:
        return None
    req = session.req_header
    request_cc, _ = cache.request_cc(req.headers.get_all)
    return cache.decide(
        method=req.raw_method,
        status=response.status,
        headers=response.headers.items(),
        request_cc=request_cc,
        authorization=b"authorization" in req.headers,
    )


def default_serve_stale(session: Session, error: ProxyError | None) -> bool:
    """What :meth:`ProxyHttp.should_serve_stale` answers by default."""
    from ferryman.cache.policy import stale_if_error_allows

    judgement = session.cache_judgement
    if judgement is None:
        return False
    if error is None:
        return judgement.verdict == "stale-while-revalidate"
    return stale_if_error_allows(judgement.stored, judgement.request_cc)
