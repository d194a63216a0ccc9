"""Patterns and checks shared by the schema modules (``schema``, ``routes``, ``upstreams``)."""

from __future__ import annotations

import re
from collections.abc import Callable

from yaml.nodes import Node, ScalarNode, SequenceNode

from .address import is_hostname
from .reader import Reader, Section

__all__ = [
    "APP",
    "APP_EXPECTED",
    "TOKEN",
    "check_upstream_ref",
    "FRAMING_HEADERS",
    "header_edit_name",
    "header_name",
    "header_value",
    "is_server_name",
    "regex",
    "regex_error",
    "string_or_list",
    "subsection",
]

APP = re.compile(r"[\w.]+:[\w.]+")
"""``module:attribute``: the shape of ``app``, ``discovery`` and ``python:`` hash keys."""
APP_EXPECTED = '"module:Class" such as "mypkg.proxy:MyProxy"'
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP token (RFC 9110): header names, methods."""

HEADER_NAME_EXPECTED = 'a header name (an HTTP token such as "X-Env")'
HEADER_VALUE_EXPECTED = "a header value: a string without CR, LF or NUL"
HEADER_EDIT_NAME_EXPECTED = (
    "a header name other than Connection, Content-Length, Keep-Alive, Proxy-Connection, "
    "TE, Trailer, Transfer-Encoding and Upgrade"
)
#: Headers that frame a message or describe one connection: ferryman sets these itself, so
#: configured edits may not (a wrong Content-Length would desynchronise the connection).
FRAMING_HEADERS = frozenset(
    (
        "connection", "content-length", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade",
    )
)
REGEX_EXPECTED = "a regular expression"
_BAD_VALUE_CHARS = re.compile(r"[\r\n\0]")


def is_server_name(name: str) -> bool:
    """A DNS name or IPv4 address, or a ``*.`` wildcard over a DNS name."""
    return is_hostname(name[2:] if name.startswith("*.") else name)


def subsection(
    parent: Section, key: str, keys: tuple[str, ...], expected: str = "a mapping"
) -> Section | None:
    """The mapping under ``key`` of ``parent`` with allowed ``keys``, or None when absent or
    not a mapping (problem recorded)."""
    node = parent.get(key)
    if node is None:
        return None
    return parent.reader.section(node, parent.path_of(key), keys, expected)


def check_upstream_ref(
    reader: Reader, node: Node, path: str, name: str, upstream_names: list[str] | None
) -> bool:
    """Whether ``name`` is a defined upstream group; reports ``unknown upstream`` otherwise.
    ``upstream_names`` None (the ``upstreams`` section itself is broken) accepts any name."""
    if upstream_names is None or name in upstream_names:
        return True
    if upstream_names:
        defined = "defined: " + ", ".join(upstream_names)
        expected = "one of: " + ", ".join(upstream_names)
    else:
        defined = expected = "no upstreams are defined"
    reader.problem(node, path, f'unknown upstream "{name}" ({defined})', expected)
    return False


def regex_error(exc: BaseException) -> str:
    """A short description of why a pattern or a replacement is invalid."""
    if isinstance(exc, re.error):
        if exc.pos is not None:
            return f"{exc.msg} at position {exc.pos}"
        return str(exc.msg)
    return str(exc)


def regex(reader: Reader, node: Node, path: str) -> re.Pattern[str] | None:
    """A regular expression that compiles (``re.compile``) — also as the bytes pattern
    the proxy matches raw request bytes with (so ``\\u00e9``-style escapes, which only
    ``str`` patterns know, are refused here rather than at start); the compile error and
    its position are reported otherwise."""
    text = reader.string(node, path, REGEX_EXPECTED)
    if text is None:
        return None
    try:
        pattern = re.compile(text)
        re.compile(text.encode("utf-8"))
        return pattern
    except (re.error, RecursionError, OverflowError) as exc:
        reader.expected(node, path, REGEX_EXPECTED, regex_error(exc))
        return None


def header_name(reader: Reader, node: Node, path: str) -> str | None:
    """An HTTP header name (a token), as written."""
    return reader.string(node, path, HEADER_NAME_EXPECTED, lambda s: bool(TOKEN.fullmatch(s)))


def header_value(reader: Reader, node: Node, path: str) -> str | None:
    """A header value: a string (possibly empty) without CR, LF or NUL."""
    ok, value = reader.scalar(node, path, HEADER_VALUE_EXPECTED)
    if not ok:
        return None
    if not isinstance(value, str):
        detail = "quote numbers and booleans" if isinstance(value, int | float) else None
        reader.expected(node, path, HEADER_VALUE_EXPECTED, detail)
        return None
    if _BAD_VALUE_CHARS.search(value):
        reader.expected(node, path, HEADER_VALUE_EXPECTED)
        return None
    try:
        value.encode("latin-1")
    except UnicodeEncodeError as exc:
        reader.expected(
            node, path, HEADER_VALUE_EXPECTED,
            f"{value[exc.start]!r} is not Latin-1: header values are bytes; "
            "percent-encode other characters",
        )
        return None
    return value


def header_edit_name(reader: Reader, node: Node, path: str, name: str) -> bool:
    """Whether ``name`` may be edited by configuration (not a framing header); reports it
    otherwise."""
    if name.lower() in FRAMING_HEADERS:
        reader.expected(
            node, path, HEADER_EDIT_NAME_EXPECTED,
            "ferryman sets framing and connection headers itself",
        )
        return False
    return True


def string_or_list(
    reader: Reader,
    node: Node,
    path: str,
    expected: str,
    item: Callable[[Node, str], str | None],
) -> list[tuple[str, Node, str]] | None:
    """A scalar or a non-empty list of scalars, each converted by ``item(node, path)``:
    ``(key path, node, value)`` for each valid one (a single scalar keeps ``path``).
    None when ``node`` is neither (problem recorded)."""
    if isinstance(node, ScalarNode) and not reader.is_null(node):
        value = item(node, path)
        return [] if value is None else [(path, node, value)]
    if not isinstance(node, SequenceNode):
        reader.expected(node, path, expected)
        return None
    items = reader.sequence(node, path, expected, non_empty=True)
    if items is None:
        return None
    result: list[tuple[str, Node, str]] = []
    for item_path, item_node in items:
        value = item(item_node, item_path)
        if value is not None:
            result.append((item_path, item_node, value))
    return result
