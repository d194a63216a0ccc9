"""Range requests served from a cached full body (RFC 9110 §14), sans-IO.

:func:`parse_range` turns a ``Range`` value into byte ranges of a representation of known
length: None when the field must be ignored (not ``bytes``, malformed, or too many
ranges: the whole representation is then sent with 200), ``[]`` when nothing is
satisfiable (416), else the ranges. :func:`if_range_matches` decides whether ``If-Range``
lets the ranges apply. :func:`multipart_parts` frames several ranges as
``multipart/byteranges``.
"""

from __future__ import annotations

__all__ = [
    "MAX_RANGES",
    "if_range_matches",
    "multipart_parts",
    "parse_range",
]

#: More ranges than this in one request is treated as no Range at all (a defence against
#: many tiny or overlapping ranges, RFC 9110 §14.2).
MAX_RANGES = 16


def parse_range(value: bytes, length: int) -> list[tuple[int, int]] | None:
    """Inclusive ``(first, last)`` byte positions of each satisfiable range, in the order
    asked; None: ignore the header; ``[]``: 416 Range Not Satisfiable."""
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    items = [item.strip() for item in spec.split(b",")]
    if not items or len(items) > MAX_RANGES or any(not item for item in items):
        return None
    out: list[tuple[int, int]] = []
    for item in items:
        first_text, dash, last_text = item.partition(b"-")
        if not dash:
            return None
        if not first_text:  # suffix: the last N bytes
            if not last_text.isdigit():
                return None
            suffix = int(last_text)
            if suffix == 0 or length == 0:
                continue  # unsatisfiable
            out.append((max(0, length - suffix), length - 1))
            continue
        if not first_text.isdigit() or (last_text and not last_text.isdigit()):
            return None
        first = int(first_text)
        if last_text and int(last_text) < first:
            return None  # invalid (§14.1.1): the whole field is ignored
        if first >= length:
            continue  # unsatisfiable
        last = int(last_text) if last_text else length - 1
        out.append((first, min(last, length - 1)))
    return out


def if_range_matches(
    if_range: bytes | None, etag: bytes | None, last_modified: bytes | None
) -> bool:
    """Whether ``If-Range`` (absent: yes) lets the Range apply (§13.1.5): a strong entity
    tag equal to the stored one, or a date equal to its Last-Modified."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(b'"') or value.startswith(b"W/"):
        return etag is not None and not value.startswith(b"W/") and value == etag.strip()
    return last_modified is not None and value == last_modified.strip()


def multipart_parts(
    ranges: list[tuple[int, int]], length: int, content_type: bytes, boundary: bytes
) -> tuple[list[tuple[bytes, int, int]], bytes]:
    """The framing of a ``multipart/byteranges`` body: ``(part head, first, last)`` for
    each range (its bytes follow the head), and the closing delimiter."""
    parts = []
    for first, last in ranges:
        head = (
            b"\r\n--" + boundary + b"\r\n"
            b"Content-Type: " + content_type + b"\r\n"
            b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (first, last, length)
        )
        parts.append((head, first, last))
    return parts, b"\r\n--" + boundary + b"--\r\n"
