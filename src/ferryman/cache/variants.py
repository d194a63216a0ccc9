"""Secondary cache keys (``Vary``, RFC 9111 §4.1) and validation (§4.3), sans-IO.

A stored response answers a request only if the request header fields its ``Vary`` names
match those of the request that fetched it (:func:`vary_key`); ``Vary: *`` never
matches. A stale response is revalidated with a conditional request built from its
validators (:func:`conditional_headers`), and a 304 updates the stored header fields
(:func:`merge_not_modified`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = [
    "NEVER_MATCHES",
    "conditional_headers",
    "merge_not_modified",
    "vary_fields",
    "vary_key",
]

#: The secondary key of a response with ``Vary: *``: no request matches it.
NEVER_MATCHES = b"*"

#: Fields a 304 must not change in the stored response (RFC 9111 §3.2: framing and
#: connection fields describe the 304 itself, not the stored content).
_KEEP_ON_304 = frozenset(
    (
        b"content-length", b"content-encoding", b"content-range", b"transfer-encoding",
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    )
)


def vary_fields(vary_lines: Iterable[bytes]) -> tuple[bytes, ...] | None:
    """The lowercased field names ``Vary`` lists, sorted and deduplicated; None for
    ``Vary: *``."""
    names: set[bytes] = set()
    for line in vary_lines:
        for item in line.split(b","):
            name = item.strip().lower()
            if name == b"*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


def _normalise(values: list[bytes]) -> bytes:
    """Field lines combined as one value, whitespace around commas dropped (§4.1 allows
    normalising by the field's syntax; this is the list syntax most Vary targets use)."""
    items = [item.strip() for value in values for item in value.split(b",")]
    return b",".join(item for item in items if item)


def vary_key(
    vary_lines: Iterable[bytes], request_values: Callable[[bytes], list[bytes]]
) -> bytes:
    """The secondary key of a request for a response varying on ``vary_lines``:
    each named field's normalised value (absent and empty differ), or
    :data:`NEVER_MATCHES`. ``request_values(name)`` gives a request's field lines."""
    fields = vary_fields(vary_lines)
    if fields is None:
        return NEVER_MATCHES
    parts = []
    for name in fields:
        values = request_values(name)
        parts.append(name + (b"=" + _normalise(values) if values else b"!"))
    return b"\n".join(parts)


def conditional_headers(
    etag: bytes | None, last_modified: bytes | None
) -> list[tuple[bytes, bytes]]:
    """The validators to send upstream to revalidate a stored response (§4.3.1):
    ``If-None-Match`` with its entity tag, else ``If-Modified-Since`` with its
    Last-Modified (both when both exist, as RFC 9110 §13.1.3 recommends)."""
    out = []
    if etag:
        out.append((b"If-None-Match", etag))
    if last_modified:
        out.append((b"If-Modified-Since", last_modified))
    return out


def merge_not_modified(
    stored: list[tuple[bytes, bytes]], not_modified: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The stored response's header fields updated by a 304's (§3.2, §4.3.4): each field
    the 304 carries replaces all stored lines of that name, except framing fields."""
    replaced = {
        name.lower() for name, _ in not_modified if name.lower() not in _KEEP_ON_304
    }
    merged = [(n, v) for n, v in stored if n.lower() not in replaced]
    merged += [(n, v) for n, v in not_modified if n.lower() in replaced]
    return merged
