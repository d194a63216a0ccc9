"""The ``Cache-Status`` response field (RFC 9211), sans-IO.

Each cache a response passed through adds one list member: its name, then parameters:
``hit`` (served from storage without going forward), ``fwd`` (why it went forward:
``uri-miss``, ``vary-miss``, ``miss``, ``request``, ``stale``, ``bypass``), ``fwd-status``
(the status the next hop answered), ``ttl`` (seconds of freshness left, negative when
stale), ``stored`` (the forwarded response was stored), ``collapsed`` (it waited for
another request's fetch: the cache lock) and ``detail``.
"""

from __future__ import annotations

import math
import re

__all__ = ["FORWARD_REASONS", "cache_status"]

#: The ``fwd`` values RFC 9211 §2.2 defines.
FORWARD_REASONS = frozenset(
    ("bypass", "method", "uri-miss", "vary-miss", "miss", "request", "stale", "partial")
)
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9:/!#$%&'*+.^_`|~-]*")


def _item(value: str) -> str:
    """An sf-token when ``value`` is one, else an sf-string."""
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cache_status(
    name: str,
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    ttl: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str | None = None,
) -> bytes:
    """This cache's ``Cache-Status`` member, e.g. ``ferryman; fwd=uri-miss; stored``."""
    if hit and fwd is not None:
        raise ValueError("a response is either a hit or forwarded, not both")
    if fwd is not None and fwd not in FORWARD_REASONS:
        raise ValueError(f"fwd must be one of {sorted(FORWARD_REASONS)}, got {fwd!r}")
    parts = [_item(name)]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        parts.append(f"ttl={math.floor(ttl)}")  # (a slightly stale response: -1, not 0)
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail is not None:
        parts.append(f"detail={_item(detail)}")
    return "; ".join(parts).encode()
