"""HTTP caching rules (RFC 9111, with RFC 5861's stale extensions), sans-IO.

Everything here is a pure function of header values and times: what may be stored
(:func:`storable`), for how long it is fresh (:func:`freshness_lifetime`), how old a stored
response is (:func:`current_age`), and whether a request may be answered with it
(:func:`usable`). Nothing touches a socket or a clock, so each rule is tested by a table.

This is a shared cache (RFC 9111 §1: a proxy), so ``private`` responses are not stored,
``s-maxage`` wins over ``max-age``, and a request with ``Authorization`` is only stored
when the response explicitly allows it (§3.5).
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "CacheControl",
    "HEURISTIC_STATUSES",
    "Stored",
    "current_age",
    "freshness_lifetime",
    "http_date",
    "parse_cache_control",
    "stale_if_error_allows",
    "storable",
    "usable",
]

#: Statuses cacheable by default (RFC 9110 §15.1): heuristic freshness applies to them.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: Statuses this cache knows how to store (RFC 9111 §3: "understood by the cache").
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 400, 403, 500, 502, 503, 504}
#: The fraction of the time since Last-Modified used as heuristic lifetime (§4.2.2).
HEURISTIC_FRACTION = 0.1
#: The longest heuristic lifetime given (a day, as many caches use).
HEURISTIC_MAX = 86400.0


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The directives of ``Cache-Control`` field lines (request or response).

    Delta-seconds directives are None when absent; a malformed value makes the directive
    count as its strictest reading (RFC 9111 §4.2.1: a bad ``max-age`` is stale, i.e. 0).
    ``no_cache_fields``/``private_fields`` are the field names qualified forms list
    (``no-cache="Set-Cookie"``).
    """

    max_age: int | None = None
    s_maxage: int | None = None
    max_stale: int | None = None  # request: -1 = any staleness ("max-stale" alone)
    min_fresh: int | None = None
    no_cache: bool = False
    no_store: bool = False
    no_transform: bool = False
    only_if_cached: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    private: bool = False
    public: bool = False
    immutable: bool = False
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    no_cache_fields: tuple[str, ...] = field(default=())
    private_fields: tuple[str, ...] = field(default=())


_DELTA = {
    "max-age": "max_age",
    "s-maxage": "s_maxage",
    "min-fresh": "min_fresh",
    "stale-while-revalidate": "stale_while_revalidate",
    "stale-if-error": "stale_if_error",
}
_FLAGS = {
    "no-store": "no_store",
    "no-transform": "no_transform",
    "only-if-cached": "only_if_cached",
    "must-revalidate": "must_revalidate",
    "proxy-revalidate": "proxy_revalidate",
    "must-understand": "must_understand",
    "public": "public",
    "immutable": "immutable",
}


def _split(values: Iterable[bytes | str]) -> list[tuple[str, str | None]]:
    """``name[=value]`` items of comma-separated field lines; quoted commas kept."""
    out: list[tuple[str, str | None]] = []
    for raw in values:
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        item, quoted = "", False
        for ch in text + ",":
            if ch == '"':
                quoted = not quoted
                item += ch
            elif ch == "," and not quoted:
                name, eq, value = item.strip().partition("=")
                if name.strip():
                    out.append((name.strip().lower(), value.strip() if eq else None))
                item = ""
            else:
                item += ch
    return out


def _delta(value: str | None) -> int:
    """Delta-seconds; malformed or missing counts as 0 (the strict reading)."""
    if value is None:
        return 0
    value = value.strip('"')
    if not value.isdigit():
        return 0
    return min(int(value), 2**31)  # (§1.2.2: larger values are taken as 2^31)


def _fields(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(f.strip().lower() for f in value.strip('"').split(",") if f.strip())


def parse_cache_control(values: Iterable[bytes | str]) -> CacheControl:
    """The directives of the given ``Cache-Control`` field lines (unknown ones ignored).

    A directive repeated keeps its first value, as most caches do.
    """
    found: dict[str, object] = {}
    for name, value in _split(values):
        if name in _DELTA:
            found.setdefault(_DELTA[name], _delta(value))
        elif name in _FLAGS:
            found.setdefault(_FLAGS[name], True)
        elif name == "max-stale":
            found.setdefault("max_stale", -1 if value is None else _delta(value))
        elif name == "no-cache":
            found.setdefault("no_cache", True)
            if value:
                found.setdefault("no_cache_fields", _fields(value))
        elif name == "private":
            found.setdefault("private", True)
            if value:
                found.setdefault("private_fields", _fields(value))
    return CacheControl(**found)  # type: ignore[arg-type]


def http_date(value: bytes | str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) as a POSIX
    time, or None when absent or invalid (RFC 9110 §5.6.7)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        parsed = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed.timestamp()


def storable(
    method: str,
    status: int,
    request_cc: CacheControl,
    response_cc: CacheControl,
    *,
    authorization: bool = False,
    expires: bytes | None = None,
) -> bool:
    """Whether a shared cache may store this response (RFC 9111 §3, §3.5, §5.2).

    ``expires``: the response's Expires value, if any (even an invalid one counts as
    explicit freshness information: an already expired response).
    """
    if method not in ("GET", "HEAD"):
        return False  # (POST is storable only with explicit freshness and a
        # Content-Location naming the same resource: not done)
    if response_cc.must_understand:
        if status not in UNDERSTOOD_STATUSES:
            return False  # §5.2.2.3; an understood status may ignore no-store
    elif response_cc.no_store or status not in UNDERSTOOD_STATUSES:
        return False
    if request_cc.no_store:
        return False  # §5.2.1.5
    if response_cc.private and not response_cc.private_fields:
        return False  # a shared cache (§5.2.2.7)
    if authorization and not (
        response_cc.public or response_cc.must_revalidate or response_cc.s_maxage is not None
    ):
        return False  # §3.5
    return (
        response_cc.public
        or expires is not None
        or response_cc.max_age is not None
        or response_cc.s_maxage is not None
        or status in HEURISTIC_STATUSES
    )


def freshness_lifetime(
    status: int,
    response_cc: CacheControl,
    *,
    date: float | None,
    expires: bytes | None,
    last_modified: float | None,
    heuristic: bool = True,
) -> float:
    """How long the response stays fresh, in seconds (RFC 9111 §4.2.1 and §4.2.2).

    ``s-maxage`` (shared caches), then ``max-age``, then ``Expires`` minus ``Date`` (an
    invalid Expires means already expired), then, for statuses cacheable by default and
    without ``no-cache``, a tenth of the time since ``Last-Modified`` (at most a day).
    """
    if response_cc.s_maxage is not None:
        return float(response_cc.s_maxage)
    if response_cc.max_age is not None:
        return float(response_cc.max_age)
    if expires is not None:
        when = http_date(expires)
        if when is None or date is None:
            return 0.0
        return max(0.0, when - date)
    if heuristic and status in HEURISTIC_STATUSES and last_modified is not None and date:
        return min(max(0.0, (date - last_modified) * HEURISTIC_FRACTION), HEURISTIC_MAX)
    return 0.0


def current_age(
    *,
    age_value: float,
    date_value: float | None,
    request_time: float,
    response_time: float,
    now: float,
) -> float:
    """The age of a stored response at ``now`` (RFC 9111 §4.2.3).

    ``age_value``: the Age header received (0 if none); ``date_value``: its Date;
    ``request_time``/``response_time``: when the request that fetched it was sent and its
    response received (this cache's clock).
    """
    apparent_age = max(0.0, response_time - date_value) if date_value is not None else 0.0
    response_delay = response_time - request_time
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = now - response_time
    return corrected_initial_age + resident_time


@dataclass(frozen=True, slots=True)
class Stored:
    """What :func:`usable` needs of a stored response."""

    lifetime: float
    age: float
    response_cc: CacheControl


def usable(
    stored: Stored, request_cc: CacheControl, *, request_pragma_no_cache: bool = False
) -> str:
    """What the cache may do with ``stored`` for a request (RFC 9111 §4, §4.2.4, §5.2.1;
    RFC 5861): ``"fresh"`` (serve it), ``"stale-while-revalidate"`` (serve it, refresh
    in the background), ``"stale"`` (usable only if the origin fails: see
    :func:`stale_if_error_allows`), or ``"revalidate"`` (ask the origin first).
    """
    cc = stored.response_cc
    if request_cc.no_cache or (request_pragma_no_cache and not _has_cc(request_cc)):
        return "revalidate"
    if cc.no_cache and not cc.no_cache_fields:
        return "revalidate"
    age, lifetime = stored.age, stored.lifetime
    if request_cc.max_age is not None and age > request_cc.max_age:
        return "revalidate"
    fresh = lifetime > age
    if request_cc.min_fresh is not None:
        fresh = lifetime - age >= request_cc.min_fresh and fresh
    if fresh:
        return "fresh"
    staleness = age - lifetime
    no_stale = cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None
    if no_stale:
        return "revalidate"  # (§4.2.4 and §5.2.2.8: a shared cache never serves these stale)
    if request_cc.max_stale is not None and (
        request_cc.max_stale < 0 or staleness <= request_cc.max_stale
    ):
        return "fresh"  # the client accepts this much staleness
    swr = cc.stale_while_revalidate
    if swr is not None and staleness <= swr:
        return "stale-while-revalidate"
    return "stale"


def stale_if_error_allows(stored: Stored, request_cc: CacheControl) -> bool:
    """Whether ``stored`` may answer a request whose revalidation failed (an error status
    500, 502, 503, 504, or no answer) — RFC 5861 §4, from either side's directive."""
    cc = stored.response_cc
    if cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None:
        return False
    staleness = stored.age - stored.lifetime
    windows = [w for w in (cc.stale_if_error, request_cc.stale_if_error) if w is not None]
    return any(staleness <= w for w in windows)


def _has_cc(cc: CacheControl) -> bool:
    return cc != CacheControl()
