"""A route's ``limit`` entries, ready to check: key function, limiter, how to refuse."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ferryman.config.model import LimitConfig
from ferryman.limits.fleet import FleetLimiter
from ferryman.limits.limiter import Limiter, Verdict
from ferryman.protocols.headers import reason_phrase

if TYPE_CHECKING:
    from ferryman.proxy.session import Session

__all__ = ["RouteLimit", "limit_key_function", "refusal_body"]

#: The key of ``key: route``: every request of the route counts as one client.
_ROUTE_KEY: Final = b"route"


def _cookie(value: bytes, name: bytes) -> bytes | None:
    for part in value.split(b";"):
        k, _, v = part.strip().partition(b"=")
        if k == name:
            return v or None
    return None


def limit_key_function(spec: str) -> Callable[[Session], bytes | None]:
    """The function computing a request's key for ``key: spec``; None means the request
    has no such key (no header, no cookie) and is not limited."""
    if spec == "client_ip":
        return lambda s: s.client_ip
    if spec == "route":
        return lambda s: _ROUTE_KEY
    kind, _, arg = spec.partition(":")
    if kind == "header":
        name = arg.lower().encode("latin-1")
        return lambda s: s.req_header.headers.get(name) or None
    if kind == "cookie":
        cookie = arg.encode("latin-1")

        def from_cookie(s: Session) -> bytes | None:
            header = s.req_header.headers.get(b"cookie")
            return _cookie(header, cookie) if header else None

        return from_cookie
    raise ValueError(f"unknown limit key {spec!r}")


def refusal_body(status: int, reason: str | None) -> bytes:
    """The plain-text body of a refused request."""
    why = {
        "rate": "too many requests for this route; slow down",
        "concurrency": "too many requests in progress for this route",
        "unavailable": "the rate limit cannot be checked right now",
    }.get(reason or "", "refused by a limit")
    return f"{status} {reason_phrase(status).decode()}: {why}\n".encode()


class RouteLimit:
    """One ``limit`` entry of a route.

    Attributes:
        config: the entry.
        key: computes a request's key (None: not limited by this entry).
        limiter: a :class:`Limiter` (``backend: local``) or :class:`FleetLimiter`.
    """

    __slots__ = ("config", "key", "limiter", "status", "retry_after", "headers")

    def __init__(self, config: LimitConfig, name: str, fleet_name: str) -> None:
        self.config = config
        self.key = limit_key_function(config.key)
        self.status = config.status
        self.retry_after = config.retry_after
        self.headers = config.headers
        self.limiter: Limiter | FleetLimiter
        if config.backend == "redis":
            assert config.rate is not None and config.redis is not None
            self.limiter = FleetLimiter(
                config.rate,
                redis=config.redis,
                name=fleet_name,
                burst=config.burst,
                concurrency=config.concurrency,
                sync=config.sync,
                fail_open=config.fail_open,
            )
        else:
            self.limiter = Limiter(
                config.rate, burst=config.burst, concurrency=config.concurrency, name=name
            )

    def check(self, session: Session) -> Verdict | None:
        """The verdict on the session's request (counted when admitted), None when it
        has no key."""
        key = self.key(session)
        if key is None:
            return None
        return self.limiter.check(key)

    def peek(self, session: Session) -> Verdict | None:
        """What :meth:`check` would answer, counting nothing."""
        key = self.key(session)
        if key is None:
            return None
        return self.limiter.peek(key)

    async def close(self) -> None:
        """Stop a fleet limiter's syncing."""
        if isinstance(self.limiter, FleetLimiter):
            await self.limiter.close()
