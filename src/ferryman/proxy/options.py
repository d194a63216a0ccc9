"""ProxyOptions: downstream timeouts, limits and forwarding headers for a proxy service."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.protocols.h1 import RequestLimits


@dataclass(slots=True)
class ProxyOptions:
    """Per-service knobs of the HTTP proxy engine (all have sane defaults).

    Timeouts are seconds:

    * ``header_read_timeout`` – to receive a whole request head once its first byte
      arrived (and the first request of a new connection); 408 when exceeded.
    * ``keepalive_timeout`` – idle time allowed between two requests on one connection.
    * ``body_read_timeout`` – longest gap between two reads of a request body; 408.
    * ``body_write_timeout`` – longest a write to the client may stay blocked.

    Limits (``limits``) give 414, 431 and 413. The ``x_forwarded_*`` and ``via`` switches
    decide which forwarding headers are added to the request sent upstream (``via`` also
    to the response). ``request_id`` sends ``X-Request-Id`` upstream, the client's or one
    made here (``Session.request_id``). ``max_retries`` is how many times a retryable
    failure may send the request back to ``upstream_peer``.
    """

    header_read_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    body_read_timeout: float = 60.0
    body_write_timeout: float = 60.0
    limits: RequestLimits = field(default_factory=lambda: RequestLimits(max_body=1 << 30))
    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    via: bool = False
    via_name: str = "ferryman"
    request_id: bool = True
    max_retries: int = 1
    grace_period: float = 10.0
