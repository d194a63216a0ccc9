"""RequestPlan: what the engine does for every request of one service, decided once.

The engine asks on every request which hooks the proxy overrides and which forwarding
headers the options want. Asked of the proxy (a frozenset lookup behind an attribute of
an interpreted object) and of the options each time, that cost about 0.5 us per request;
a plan holds the answers as plain fields of a compiled object.

A service builds its plan when a worker starts, so changes made to ``proxy.overridden``
or to the options before serving are seen; changes made while serving are not.
"""

from __future__ import annotations

from typing import Any

from ferryman.metrics.recorder import WorkerMetrics
from ferryman.proxy.options import ProxyOptions
from ferryman.upstream.connector import Connector


class RequestPlan:
    """Per-worker answers the engine reads on every request of one service.

    Each hook name is a bool: whether the proxy overrides that hook (see
    :class:`~ferryman.proxy.hooks.ProxyHttp`). ``any_async``: some overridden hook is
    ``async def`` (the request then runs as a task). ``trust_length``: no response hook
    can change the upstream response's framing headers. The forwarding switches copy
    :class:`~ferryman.proxy.options.ProxyOptions`; ``via_value`` is this proxy's own
    ``Via`` entry (``1.1 <via_name>``). ``connector`` is the worker's upstream pool.
    ``timed``: some listener of the service keeps an access log, or metrics are kept, so
    requests record the times they report. ``metrics``: the worker's
    :class:`~ferryman.metrics.recorder.WorkerMetrics`, or None.
    """

    __slots__ = (
        "proxy",
        "options",
        "connector",
        "new_ctx",
        "early_request_filter",
        "request_filter",
        "connected_to_upstream",
        "upstream_request_filter",
        "request_body_filter",
        "upstream_response_filter",
        "response_filter",
        "response_body_filter",
        "fail_to_connect",
        "error_while_proxy",
        "fail_to_proxy",
        "logging",
        "request_cache_filter",
        "any_async",
        "trust_length",
        "max_retries",
        "x_forwarded_for",
        "x_forwarded_proto",
        "x_forwarded_host",
        "via",
        "via_value",
        "request_id",
        "timed",
        "metrics",
    )

    def __init__(
        self,
        proxy: Any,
        options: ProxyOptions,
        connector: Connector,
        timed: bool = False,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.proxy: Any = proxy
        self.options = options
        self.connector = connector
        hooks: frozenset[str] = proxy.overridden
        self.new_ctx = "new_ctx" in hooks
        self.early_request_filter = "early_request_filter" in hooks
        self.request_filter = "request_filter" in hooks
        self.connected_to_upstream = "connected_to_upstream" in hooks
        self.upstream_request_filter = "upstream_request_filter" in hooks
        self.request_body_filter = "request_body_filter" in hooks
        self.upstream_response_filter = "upstream_response_filter" in hooks
        self.response_filter = "response_filter" in hooks
        self.response_body_filter = "response_body_filter" in hooks
        self.fail_to_connect = "fail_to_connect" in hooks
        self.error_while_proxy = "error_while_proxy" in hooks
        self.fail_to_proxy = "fail_to_proxy" in hooks
        self.logging = "logging" in hooks
        self.request_cache_filter = "request_cache_filter" in hooks
        self.any_async = bool(proxy.async_hooks)
        self.trust_length = not (self.upstream_response_filter or self.response_filter)
        self.max_retries: int = options.max_retries
        self.x_forwarded_for: bool = options.x_forwarded_for
        self.x_forwarded_proto: bool = options.x_forwarded_proto
        self.x_forwarded_host: bool = options.x_forwarded_host
        self.via: bool = options.via
        self.via_value = b"1.1 " + options.via_name.encode()
        self.request_id: bool = options.request_id
        #: the worker's metrics, counted at the end of each request, or None
        self.metrics = metrics
        self.timed = timed or metrics is not None
