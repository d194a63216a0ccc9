"""Routes of a listener (key ``listeners[N].routes``): what each route matches, what it does,
the header changes it makes, and the check that no route is hidden by an earlier one.

``match_covers(earlier, later)`` is the (conservative) test behind the "unreachable" error:
it is true only when every request ``later`` matches is certainly matched by ``earlier`` too.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ferryman.cache.http_cache import IGNORABLE, key_part_valid
from ferryman.limits.limiter import parse_rate

from .common import (
    TOKEN,
    check_upstream_ref,
    header_edit_name,
    header_name,
    header_value,
    is_server_name,
    regex,
    regex_error,
    string_or_list,
    subsection,
)
from .document import node_line
from .model import (
    CacheConfig,
    CompressConfig,
    FixedResponse,
    HeaderEdits,
    HeaderMatch,
    LimitConfig,
    PathRewrite,
    RedirectAction,
    RouteConfig,
    RouteMatch,
    StaticAction,
)
from .reader import Reader, Section, child_path

__all__ = ["build_routes", "match_covers", "host_covers", "path_has_prefix"]

ROUTE_KEYS = (
    "match",
    "upstream",
    "redirect",
    "respond",
    "static",
    "strip_prefix",
    "rewrite",
    "request_headers",
    "response_headers",
    "name",
    "cache",
    "compress",
    "limit",
)
ACTIONS = ("upstream", "redirect", "respond", "static")
UPSTREAM_ONLY = ("strip_prefix", "rewrite", "request_headers", "cache", "compress")
MATCH_KEYS = ("host", "path_prefix", "path", "path_regex", "methods", "headers")
PATH_KEYS = ("path_prefix", "path", "path_regex")
HEADER_EDIT_KEYS = ("set", "add", "remove")
HEADER_REGEX_KEYS = ("regex",)
REDIRECT_KEYS = ("to", "status", "keep_query")
RESPOND_KEYS = ("status", "body", "content_type", "headers")
STATIC_KEYS = ("root", "index", "max_age")
REWRITE_KEYS = ("regex", "to")
CACHE_KEYS = (
    "storage", "path", "redis", "max_size", "max_entry", "default_ttl", "key", "ignore",
    "stale_while_revalidate", "stale_if_error", "lock_timeout", "purge", "status_header",
)
CACHE_STORAGES = ("memory", "disk", "redis")
COMPRESS_KEYS = ("algorithms", "min_size", "types")
COMPRESS_ALGORITHMS = ("br", "zstd", "gzip")
LIMIT_KEYS = (
    "key", "rate", "burst", "concurrency", "status", "retry_after", "headers", "backend",
    "redis", "sync", "fail_open",
)
LIMIT_BACKENDS = ("local", "redis")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
NO_BODY_STATUSES = (204, 304)

ROUTES_EXPECTED = "a non-empty list of routes"
ROUTE_EXPECTED = "a mapping with keys " + ", ".join(ROUTE_KEYS)
ACTION_EXPECTED = "exactly one action: upstream, redirect, respond or static"
UPSTREAM_REF_EXPECTED = "the name of an upstream group"
ROUTE_NAME_EXPECTED = "a route name (a non-empty string)"
MATCH_EXPECTED = "a mapping with keys " + ", ".join(MATCH_KEYS)
ONE_PATH_EXPECTED = "at most one of path_prefix, path and path_regex"
HOST_EXPECTED = 'a host name such as "example.com" or "*.example.com", without port'
HOSTS_EXPECTED = 'a host name such as "example.com" or "*.example.com", or a list of them'
PATH_EXPECTED = 'a path starting with "/", such as "/api"'
METHOD_EXPECTED = 'an HTTP method such as "GET"'
METHODS_EXPECTED = 'an HTTP method such as "GET", or a list of them'
HEADER_MATCHES_EXPECTED = "a mapping of header names to conditions"
HEADER_MATCH_EXPECTED = (
    'a string (exact value), true (present), false (absent) or {regex: "..."}'
)
HEADER_EDITS_EXPECTED = "a mapping with keys set, add, remove"
HEADER_PAIRS_EXPECTED = "a mapping of header names to values"
HEADER_NAMES_EXPECTED = "a header name, or a list of them"
HEADER_NAME_EXPECTED = 'a header name (an HTTP token such as "X-Env")'
REDIRECT_TO_EXPECTED = (
    'a path such as "/new" or an absolute URL such as "https://example.com/new"'
)
REDIRECT_STATUS_EXPECTED = "one of 301, 302, 303, 307 or 308"
RESPOND_STATUS_EXPECTED = "a status code 200..599"
BODY_EXPECTED = "a string"
CONTENT_TYPE_EXPECTED = 'a media type such as "text/html; charset=utf-8"'
INDEX_EXPECTED = 'a file name such as "index.html", or a list of them'
INDEX_NAME_EXPECTED = 'a file name such as "index.html" (without "/")'
MAX_AGE_EXPECTED = 'a whole number of seconds, or a duration such as "1h" or "30s"'
REPLACEMENT_EXPECTED = "a replacement that refers only to groups of the regex"
COMPRESS_EXPECTED = "true, or a mapping with keys " + ", ".join(COMPRESS_KEYS)
COMPRESS_ALGORITHMS_EXPECTED = "a list of: br, zstd, gzip"
COMPRESS_ALGORITHM_EXPECTED = "one of br, zstd, gzip"
COMPRESS_TYPES_EXPECTED = 'a media type such as "text/*" or "application/json", or a list'
COMPRESS_TYPE_EXPECTED = 'a media type such as "text/*" or "application/json"'
CACHE_EXPECTED = "a mapping with keys " + ", ".join(CACHE_KEYS)
CACHE_STORAGE_EXPECTED = "one of memory, disk, redis"
CACHE_KEY_EXPECTED = (
    "a list of key parts: scheme, host, method, path, query, uri, header:NAME, "
    "cookie:NAME or arg:NAME"
)
CACHE_KEY_PART_EXPECTED = (
    "a key part: scheme, host, method, path, query, uri, header:NAME, cookie:NAME or "
    "arg:NAME"
)
CACHE_IGNORE_EXPECTED = (
    "a list of: cache-control, expires, set-cookie, vary, client-cache-control"
)
CACHE_IGNORE_ITEM_EXPECTED = (
    "one of cache-control, expires, set-cookie, vary, client-cache-control"
)
CACHE_PATH_EXPECTED = "a directory path for the disk cache"
CACHE_REDIS_EXPECTED = 'a Redis URL such as "redis://127.0.0.1:6379/0"'
CACHE_PURGE_EXPECTED = 'an address or network such as "127.0.0.1" or "10.0.0.0/8", or a list'
CACHE_NETWORK_EXPECTED = 'an address or network such as "127.0.0.1" or "10.0.0.0/8"'
LIMITS_EXPECTED = "a mapping with keys " + ", ".join(LIMIT_KEYS) + ", or a list of them"
LIMIT_EXPECTED = "a mapping with keys " + ", ".join(LIMIT_KEYS)
LIMIT_KEY_EXPECTED = "client_ip, header:NAME, cookie:NAME or route"
LIMIT_RATE_EXPECTED = 'a rate such as "100/s", "6000/m" or "10/5s"'
LIMIT_STATUS_EXPECTED = "a status code 400..599"
LIMIT_BACKEND_EXPECTED = "one of local, redis"
LIMIT_NEEDS_EXPECTED = "rate, concurrency or both"
REPLACEMENT_STRING_EXPECTED = 'a replacement string such as "/v2/\\1"'

_PATH = re.compile(r"/[^\s?#\x00-\x1f\x7f]*")
_PORT_SUFFIX = re.compile(r".+:[0-9]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(slots=True)
class _Built:
    """A route as read, with what the listener-level checks need."""

    route: RouteConfig
    node: Node
    path: str
    clean: bool  # no problem was found in it (only clean routes take part in shadowing)


def build_routes(
    listener: Section, reader: Reader, upstream_names: list[str] | None
) -> tuple[RouteConfig, ...]:
    """The routes of a listener section (its ``routes`` key, which must be present): each
    validated, names unique, and every route reachable."""
    node = listener.get("routes")
    if node is None:
        return ()
    items = reader.sequence(node, listener.path_of("routes"), ROUTES_EXPECTED, non_empty=True)
    if items is None:
        return ()
    built: list[_Built] = []
    names: dict[str, str] = {}
    for path, item in items:
        before = len(reader.problems)
        result = _route(item, path, reader, upstream_names)
        if result is None:
            continue
        route, name_node = result
        if route.name in names:
            reader.problem(
                name_node if name_node is not None else item,
                child_path(path, "name"),
                f"expected a route name not used by another route of this listener, got "
                f"{route.name!r} (already the name of {names[route.name]})",
                "a route name not used by another route of this listener",
            )
        else:
            names[route.name] = path
        built.append(_Built(route, item, path, len(reader.problems) == before))
    _report_unreachable(built, reader)
    return tuple(b.route for b in built)


def _report_unreachable(built: list[_Built], reader: Reader) -> None:
    for i, later in enumerate(built):
        if not later.clean:
            continue
        for earlier in built[:i]:
            if earlier.clean and match_covers(earlier.route.match, later.route.match):
                reader.problem(
                    later.node,
                    later.path,
                    f"unreachable: {earlier.path} (line {node_line(earlier.node)}) already "
                    "matches every request this route matches",
                    f"a route that matches some request {earlier.path} does not "
                    "(put it first, or narrow the earlier route)",
                )
                break


# -- one route ---------------------------------------------------------------------------------


def _and(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _route(
    node: Node, path: str, reader: Reader, upstream_names: list[str] | None
) -> tuple[RouteConfig, Node | None] | None:
    sec = reader.section(node, path, ROUTE_KEYS, ROUTE_EXPECTED)
    if sec is None:
        return None
    match = _match(sec, reader)
    actions = [key for key in sec.entries if key in ACTIONS]
    if len(actions) != 1:
        got = "none" if not actions else _and(actions)
        reader.problem(node, path, f"expected {ACTION_EXPECTED}, got {got}", ACTION_EXPECTED)
    elif actions[0] != "upstream":
        for key in UPSTREAM_ONLY:
            if key == "compress" and actions[0] == "static":
                continue  # (files are compressed too)
            if key in sec:
                why = {
                    "cache": "it stores upstream responses",
                    "compress": "it compresses proxied responses and static files",
                }.get(key, "it changes the request sent upstream")
                reader.problem(
                    sec.key_node(key),
                    sec.path_of(key),
                    f"{key} is only used with "
                    f"{'upstream or static' if key == 'compress' else 'upstream'} "
                    f"({why}; this route uses {actions[0]})",
                    f"a route with {'upstream or static' if key == 'compress' else 'upstream'}"
                    f", or no {key}",
                )

    upstream = None
    upstream_node = sec.get("upstream")
    if upstream_node is not None:
        upstream_path = sec.path_of("upstream")
        upstream = reader.string(upstream_node, upstream_path, UPSTREAM_REF_EXPECTED)
        if upstream is not None and not check_upstream_ref(
            reader, upstream_node, upstream_path, upstream, upstream_names
        ):
            upstream = None

    name_node = sec.get("name")
    name = sec.read("name", lambda n, p: reader.string(n, p, ROUTE_NAME_EXPECTED), path)
    route = RouteConfig(
        match=match,
        upstream=upstream,
        redirect=_redirect(sec, reader),
        respond=_respond(sec, reader),
        static=_static(sec, reader),
        strip_prefix=_optional_path(sec, "strip_prefix", reader),
        rewrite=_rewrite(sec, reader),
        request_headers=_header_edits(sec, "request_headers", reader),
        response_headers=_header_edits(sec, "response_headers", reader),
        name=name,
        cache=_cache(sec, reader),
        compress=_compress(sec, reader),
        limit=_limits(sec, reader),
    )
    return route, name_node


def _path(reader: Reader, node: Node, path: str) -> str | None:
    text = reader.string(node, path, PATH_EXPECTED)
    if text is None:
        return None
    if not _PATH.fullmatch(text):
        detail = None
        if text.startswith("/") and ("?" in text or "#" in text):
            detail = "a path has no query string or fragment"
        elif text.startswith("/"):
            detail = "spaces and control characters are not allowed; use %20"
        reader.expected(node, path, PATH_EXPECTED, detail)
        return None
    return text


def _optional_path(sec: Section, key: str, reader: Reader) -> str | None:
    node = sec.get(key)
    return None if node is None else _path(reader, node, sec.path_of(key))


# -- match -------------------------------------------------------------------------------------


def _match(route: Section, reader: Reader) -> RouteMatch:
    sec = subsection(route, "match", MATCH_KEYS, MATCH_EXPECTED)
    if sec is None:
        return RouteMatch()
    paths = [key for key in sec.entries if key in PATH_KEYS]
    if len(paths) > 1:
        reader.problem(
            sec.key_node(paths[1]),
            sec.path_of(paths[1]),
            f"expected {ONE_PATH_EXPECTED}, got {_and(paths)}",
            ONE_PATH_EXPECTED,
        )
    path_regex = None
    regex_node = sec.get("path_regex")
    if regex_node is not None:
        pattern = regex(reader, regex_node, sec.path_of("path_regex"))
        path_regex = None if pattern is None else pattern.pattern
    return RouteMatch(
        hosts=_hosts(sec, reader),
        path_prefix=_optional_path(sec, "path_prefix", reader),
        path=_optional_path(sec, "path", reader),
        path_regex=path_regex,
        methods=_methods(sec, reader),
        headers=_header_matches(sec, reader),
    )


def _host(reader: Reader, node: Node, path: str) -> str | None:
    text = reader.string(node, path, HOST_EXPECTED)
    if text is None:
        return None
    if not is_server_name(text):
        detail = None
        if _PORT_SUFFIX.fullmatch(text) and is_server_name(text.rpartition(":")[0]):
            detail = "a port is not allowed: routes match the host name only"
        reader.expected(node, path, HOST_EXPECTED, detail)
        return None
    name = text.lower()
    return name[:-1] if name.endswith(".") else name


def _unique(
    reader: Reader, values: list[tuple[str, Node, str]], what: str
) -> tuple[str, ...]:
    """The values, each once; a repeated one is reported."""
    seen: dict[str, str] = {}
    result: list[str] = []
    for path, node, value in values:
        if value in seen:
            reader.expected(node, path, f"each {what} once", f"already listed as {seen[value]}")
            continue
        seen[value] = path
        result.append(value)
    return tuple(result)


def _hosts(sec: Section, reader: Reader) -> tuple[str, ...]:
    node = sec.get("host")
    if node is None:
        return ()
    values = string_or_list(
        reader, node, sec.path_of("host"), HOSTS_EXPECTED, lambda n, p: _host(reader, n, p)
    )
    return () if values is None else _unique(reader, values, "host")


def _method(reader: Reader, node: Node, path: str) -> str | None:
    text = reader.string(node, path, METHOD_EXPECTED, lambda s: bool(TOKEN.fullmatch(s)))
    return None if text is None else text.upper()


def _methods(sec: Section, reader: Reader) -> tuple[str, ...]:
    node = sec.get("methods")
    if node is None:
        return ()
    values = string_or_list(
        reader, node, sec.path_of("methods"), METHODS_EXPECTED, lambda n, p: _method(reader, n, p)
    )
    return () if values is None else _unique(reader, values, "method")


def _header_matches(sec: Section, reader: Reader) -> tuple[HeaderMatch, ...]:
    node = sec.get("headers")
    if node is None:
        return ()
    path = sec.path_of("headers")
    entries = reader.items(node, path, HEADER_MATCHES_EXPECTED)
    if entries is None:
        return ()
    matches: list[HeaderMatch] = []
    seen: dict[str, str] = {}
    for name, key_node, value_node in entries:
        item_path = child_path(path, name)
        if not TOKEN.fullmatch(name):
            reader.expected(key_node, item_path, HEADER_NAME_EXPECTED)
            continue
        lower = name.lower()
        if lower in seen:
            reader.expected(
                key_node, item_path, "each header once", f"already listed as {seen[lower]}"
            )
            continue
        seen[lower] = item_path
        match = _header_match(lower, value_node, item_path, reader)
        if match is not None:
            matches.append(match)
    return tuple(matches)


def _header_match(name: str, node: Node, path: str, reader: Reader) -> HeaderMatch | None:
    if isinstance(node, MappingNode):
        sec = reader.section(node, path, HEADER_REGEX_KEYS, HEADER_MATCH_EXPECTED)
        if sec is None:
            return None
        regex_node = sec.require("regex", "a regular expression")
        if regex_node is None:
            return None
        pattern = regex(reader, regex_node, sec.path_of("regex"))
        return None if pattern is None else HeaderMatch(name, regex=pattern.pattern)
    ok, value = reader.scalar(node, path, HEADER_MATCH_EXPECTED)
    if not ok:
        return None
    if value is True:
        return HeaderMatch(name)
    if value is False:
        return HeaderMatch(name, absent=True)
    if not isinstance(value, str) or _CONTROL.search(value):
        detail = "quote numbers" if isinstance(value, int | float) else None
        reader.expected(node, path, HEADER_MATCH_EXPECTED, detail)
        return None
    return HeaderMatch(name, value=value)


# -- header edits ------------------------------------------------------------------------------


def _header_edits(route: Section, key: str, reader: Reader) -> HeaderEdits:
    sec = subsection(route, key, HEADER_EDIT_KEYS, HEADER_EDITS_EXPECTED)
    if sec is None:
        return HeaderEdits()
    remove: tuple[str, ...] = ()
    remove_node = sec.get("remove")
    if remove_node is not None:
        values = string_or_list(
            reader, remove_node, sec.path_of("remove"), HEADER_NAMES_EXPECTED,
            lambda n, p: header_name(reader, n, p),
        )
        remove = () if values is None else tuple(
            v for p, n, v in values if header_edit_name(reader, n, p, v)
        )
    return HeaderEdits(
        remove=remove,
        set=_header_pairs(sec, "set", reader, unique=True),
        add=_header_pairs(sec, "add", reader, unique=False),
    )


def _header_pairs(
    sec: Section, key: str, reader: Reader, *, unique: bool
) -> tuple[tuple[str, str], ...]:
    """``(name, value)`` pairs from a mapping of header names to values; with ``unique`` a
    name may not appear twice in any letter case."""
    node = sec.get(key)
    if node is None:
        return ()
    path = sec.path_of(key)
    entries = reader.items(node, path, HEADER_PAIRS_EXPECTED)
    if entries is None:
        return ()
    pairs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name, key_node, value_node in entries:
        item_path = child_path(path, name)
        if not TOKEN.fullmatch(name):
            reader.expected(key_node, item_path, HEADER_NAME_EXPECTED)
            continue
        if not header_edit_name(reader, key_node, item_path, name):
            continue
        value = header_value(reader, value_node, item_path)
        if unique and name.lower() in seen:
            reader.expected(
                key_node, item_path, "each header once", f"already set as {seen[name.lower()]}"
            )
            continue
        seen[name.lower()] = item_path
        if value is not None:
            pairs.append((name, value))
    return tuple(pairs)


# -- actions -----------------------------------------------------------------------------------


def _is_redirect_target(text: str) -> bool:
    if _WHITESPACE.search(text):
        return False
    if text.startswith("/"):
        return not text.startswith("//")
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _status(
    reader: Reader, node: Node, path: str, expected: str, allowed: range | tuple[int, ...]
) -> int | None:
    ok, value = reader.scalar(node, path, expected)
    if not ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        reader.expected(node, path, expected)
        return None
    return value


def _redirect(route: Section, reader: Reader) -> RedirectAction | None:
    sec = subsection(route, "redirect", REDIRECT_KEYS)
    if sec is None:
        return None
    to = None
    to_node = sec.require("to", REDIRECT_TO_EXPECTED)
    if to_node is not None:
        to_path = sec.path_of("to")
        to = reader.string(to_node, to_path, REDIRECT_TO_EXPECTED)
        if to is not None and not _is_redirect_target(to):
            detail = None
            if to.startswith("//"):
                detail = 'browsers read "//name" as a host; write "https://name/..."'
            reader.expected(to_node, to_path, REDIRECT_TO_EXPECTED, detail)
            to = None
        elif to is not None and not to.isascii():
            reader.expected(
                to_node, to_path, REDIRECT_TO_EXPECTED,
                "percent-encode characters outside ASCII in a Location",
            )
            to = None
    d = RedirectAction(to="/")
    status = sec.read(
        "status",
        lambda n, p: _status(reader, n, p, REDIRECT_STATUS_EXPECTED, REDIRECT_STATUSES),
        d.status,
    )
    keep_query = sec.boolean("keep_query", d.keep_query)
    if to is None:
        return None
    return RedirectAction(to=to, status=status, keep_query=keep_query)


def _string(reader: Reader, node: Node, path: str, expected: str) -> str | None:
    """A string, possibly empty."""
    ok, value = reader.scalar(node, path, expected)
    if not ok:
        return None
    if not isinstance(value, str):
        reader.expected(node, path, expected)
        return None
    return value


def _respond(route: Section, reader: Reader) -> FixedResponse | None:
    sec = subsection(route, "respond", RESPOND_KEYS)
    if sec is None:
        return None
    d = FixedResponse()
    status = sec.read(
        "status",
        lambda n, p: _status(reader, n, p, RESPOND_STATUS_EXPECTED, range(200, 600)),
        d.status,
    )
    body = sec.read("body", lambda n, p: _string(reader, n, p, BODY_EXPECTED), d.body)
    body_node = sec.get("body")
    if body and body_node is not None and status in NO_BODY_STATUSES:
        reader.expected(
            body_node, sec.path_of("body"), f"no body with status {status}",
            f"a {status} response has no body",
        )
    content_type = None
    type_node = sec.get("content_type")
    if type_node is not None:
        content_type = reader.string(
            type_node, sec.path_of("content_type"), CONTENT_TYPE_EXPECTED,
            lambda s: not _CONTROL.search(s) and s.isascii(),
        )
    return FixedResponse(
        status=status,
        body=body,
        content_type=content_type,
        headers=_header_pairs(sec, "headers", reader, unique=True),
    )


def _index_name(reader: Reader, node: Node, path: str) -> str | None:
    return reader.string(
        node, path, INDEX_NAME_EXPECTED,
        lambda s: "/" not in s and "\\" not in s and s not in (".", "..") and "\0" not in s,
    )


def _max_age(reader: Reader, node: Node, path: str) -> int | None:
    seconds = reader.duration(node, path)
    if seconds is None:
        return None
    if not seconds.is_integer():
        reader.expected(node, path, MAX_AGE_EXPECTED, "not a whole number of seconds")
        return None
    return int(seconds)


def _static(route: Section, reader: Reader) -> StaticAction | None:
    sec = subsection(route, "static", STATIC_KEYS)
    if sec is None:
        return None
    d = StaticAction(root="/")
    root_node = sec.require("root", "a path to the directory to serve")
    root = None if root_node is None else reader.directory(root_node, sec.path_of("root"))
    index = d.index
    index_node = sec.get("index")
    if index_node is not None:
        values = string_or_list(
            reader, index_node, sec.path_of("index"), INDEX_EXPECTED,
            lambda n, p: _index_name(reader, n, p),
        )
        index = () if values is None else _unique(reader, values, "file name")
    max_age_node = sec.get("max_age")
    max_age = None
    if max_age_node is not None:
        max_age = _max_age(reader, max_age_node, sec.path_of("max_age"))
    if root is None:
        return None
    return StaticAction(root=root, index=index, max_age=max_age)


def _cache(route: Section, reader: Reader) -> CacheConfig | None:
    sec = subsection(route, "cache", CACHE_KEYS, CACHE_EXPECTED)
    if sec is None:
        return None
    d = CacheConfig()
    storage: str = sec.read(
        "storage",
        lambda n, p: reader.string(n, p, CACHE_STORAGE_EXPECTED, lambda v: v in CACHE_STORAGES),
        str(d.storage),
    )
    path = None
    path_node = sec.get("path")
    if storage == "disk":
        if path_node is None:
            reader.problem(
                sec.node, sec.path_of("path"), "a disk cache needs a path", CACHE_PATH_EXPECTED
            )
        else:
            text = reader.string(path_node, sec.path_of("path"), CACHE_PATH_EXPECTED)
            if text is not None:
                path = _cache_directory(reader, path_node, sec.path_of("path"), text)
    elif path_node is not None:
        reader.problem(
            sec.key_node("path"), sec.path_of("path"),
            f"path is only used with storage: disk (this cache uses {storage})",
            "storage: disk, or no path",
        )
    redis_url = None
    redis_node = sec.get("redis")
    if storage == "redis":
        redis_url = _required_redis_url(sec, reader, "a redis cache needs a redis URL")
    elif redis_node is not None:
        reader.problem(
            sec.key_node("redis"), sec.path_of("redis"),
            f"redis is only used with storage: redis (this cache uses {storage})",
            "storage: redis, or no redis",
        )
    max_size = sec.size("max_size", d.max_size, positive=True)
    max_entry = sec.read(
        "max_entry", lambda n, p: reader.size(n, p, positive=True), d.max_entry
    )
    default_ttl = sec.read(
        "default_ttl", lambda n, p: reader.duration(n, p, positive=True), d.default_ttl
    )
    key = d.key
    key_node = sec.get("key")
    if key_node is not None:
        items = reader.sequence(key_node, sec.path_of("key"), CACHE_KEY_EXPECTED, non_empty=True)
        if items is not None:
            parts = [
                reader.string(n, p, CACHE_KEY_PART_EXPECTED, key_part_valid) for p, n in items
            ]
            if all(part is not None for part in parts):
                key = tuple(part for part in parts if part is not None)
    ignore = d.ignore
    ignore_node = sec.get("ignore")
    if ignore_node is not None:
        values = string_or_list(
            reader, ignore_node, sec.path_of("ignore"), CACHE_IGNORE_EXPECTED,
            lambda n, p: reader.string(
                n, p, CACHE_IGNORE_ITEM_EXPECTED, lambda v: v.lower() in IGNORABLE
            ),
        )
        if values is not None:
            ignore = tuple(dict.fromkeys(v.lower() for _, _, v in values))
    purge = d.purge
    purge_node = sec.get("purge")
    if purge_node is not None:
        values = string_or_list(
            reader, purge_node, sec.path_of("purge"), CACHE_PURGE_EXPECTED,
            lambda n, p: reader.string(n, p, CACHE_NETWORK_EXPECTED, _is_network),
        )
        if values is not None:
            purge = tuple(v for _, _, v in values)
    return CacheConfig(
        storage=storage,  # type: ignore[arg-type]  # (one of CACHE_STORAGES)
        path=path,
        redis=redis_url,
        max_size=max_size,
        max_entry=max_entry,
        default_ttl=default_ttl,
        key=key,
        ignore=ignore,
        stale_while_revalidate=sec.duration("stale_while_revalidate", 0.0),
        stale_if_error=sec.duration("stale_if_error", 0.0),
        lock_timeout=sec.duration("lock_timeout", d.lock_timeout, positive=True),
        purge=purge,
        status_header=sec.boolean("status_header", True),
    )


def _compress(route: Section, reader: Reader) -> CompressConfig | None:
    node = route.get("compress")
    if node is None:
        return None
    path = route.path_of("compress")
    if isinstance(node, ScalarNode):
        on = reader.boolean(node, path)
        return CompressConfig() if on else None
    sec = reader.section(node, path, COMPRESS_KEYS, COMPRESS_EXPECTED)
    if sec is None:
        return None
    d = CompressConfig()
    algorithms = d.algorithms
    algorithms_node = sec.get("algorithms")
    if algorithms_node is not None:
        values = string_or_list(
            reader, algorithms_node, sec.path_of("algorithms"), COMPRESS_ALGORITHMS_EXPECTED,
            lambda n, p: reader.string(
                n, p, COMPRESS_ALGORITHM_EXPECTED, lambda v: v in COMPRESS_ALGORITHMS
            ),
        )
        if values:
            algorithms = tuple(dict.fromkeys(v for _, _, v in values))
    types = d.types
    types_node = sec.get("types")
    if types_node is not None:
        values = string_or_list(
            reader, types_node, sec.path_of("types"), COMPRESS_TYPES_EXPECTED,
            lambda n, p: reader.string(n, p, COMPRESS_TYPE_EXPECTED, _is_media_pattern),
        )
        if values:
            types = tuple(v.lower() for _, _, v in values)
    return CompressConfig(
        algorithms=algorithms,
        min_size=sec.size("min_size", d.min_size),
        types=types,
    )


def _limits(route: Section, reader: Reader) -> tuple[LimitConfig, ...]:
    node = route.get("limit")
    if node is None:
        return ()
    path = route.path_of("limit")
    if isinstance(node, SequenceNode):
        items = reader.sequence(node, path, LIMITS_EXPECTED, non_empty=True)
        if items is None:
            return ()
        limits = [_limit(n, p, reader) for p, n in items]
        return tuple(limit for limit in limits if limit is not None)
    one = _limit(node, path, reader)
    return () if one is None else (one,)


def _limit_key(text: str) -> bool:
    if text in ("client_ip", "route"):
        return True
    kind, colon, name = text.partition(":")
    return bool(colon) and kind in ("header", "cookie") and bool(TOKEN.fullmatch(name))


def _limit(node: Node, path: str, reader: Reader) -> LimitConfig | None:
    sec = reader.section(node, path, LIMIT_KEYS, LIMIT_EXPECTED)
    if sec is None:
        return None
    d = LimitConfig()
    key = sec.read(
        "key", lambda n, p: reader.string(n, p, LIMIT_KEY_EXPECTED, _limit_key), d.key
    )
    rate: tuple[int, float] | None = None
    rate_node = sec.get("rate")
    if rate_node is not None:
        text = reader.string(rate_node, sec.path_of("rate"), LIMIT_RATE_EXPECTED)
        if text is not None:
            try:
                rate = parse_rate(text)
            except ValueError:
                reader.expected(rate_node, sec.path_of("rate"), LIMIT_RATE_EXPECTED)
    burst = None
    if "burst" in sec:
        burst = sec.integer("burst", 0, minimum=1) or None
        if rate_node is None:
            reader.problem(
                sec.key_node("burst"), sec.path_of("burst"),
                "burst needs a rate (it is how many of the rate's requests may come at once)",
                "a rate with the burst, or no burst",
            )
    concurrency = sec.integer("concurrency", 0, minimum=1) or None
    if rate_node is None and "concurrency" not in sec:
        reader.problem(
            sec.node, path, f"a limit needs {LIMIT_NEEDS_EXPECTED}", LIMIT_NEEDS_EXPECTED
        )
    status = sec.read(
        "status",
        lambda n, p: _status(reader, n, p, LIMIT_STATUS_EXPECTED, range(400, 600)),
        d.status,
    )
    backend: str = sec.read(
        "backend",
        lambda n, p: reader.string(n, p, LIMIT_BACKEND_EXPECTED, lambda v: v in LIMIT_BACKENDS),
        str(d.backend),
    )
    redis_url = None
    if backend == "redis":
        redis_url = _required_redis_url(sec, reader, "backend: redis needs a redis URL")
        if rate_node is None and "concurrency" in sec:
            reader.problem(
                sec.key_node("backend"), sec.path_of("backend"),
                "backend: redis shares rates; concurrency is counted per server",
                "a rate with backend: redis, or backend: local",
            )
    else:
        for only in ("redis", "sync", "fail_open"):
            if only in sec:
                reader.problem(
                    sec.key_node(only), sec.path_of(only),
                    f"{only} is only used with backend: redis (this limit is local)",
                    f"backend: redis, or no {only}",
                )
    return LimitConfig(
        key=key,
        rate=rate,
        burst=burst,
        concurrency=concurrency,
        status=status,
        retry_after=sec.boolean("retry_after", d.retry_after),
        headers=sec.boolean("headers", d.headers),
        backend=backend,  # type: ignore[arg-type]  # (one of LIMIT_BACKENDS)
        redis=redis_url,
        sync=sec.duration("sync", d.sync, positive=True),
        fail_open=sec.boolean("fail_open", d.fail_open),
    )


def _required_redis_url(sec: Section, reader: Reader, missing: str) -> str | None:
    """The section's ``redis`` URL, which it must have (``missing`` says why if not)."""
    node = sec.get("redis")
    if node is None:
        reader.problem(sec.node, sec.path_of("redis"), missing, CACHE_REDIS_EXPECTED)
        return None
    return reader.string(node, sec.path_of("redis"), CACHE_REDIS_EXPECTED, _is_redis_url)


def _is_redis_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("redis", "rediss", "unix") and bool(parts.netloc or parts.path)


def _is_media_pattern(text: str) -> bool:
    kind, slash, sub = text.partition("/")
    return bool(slash and kind and sub) and not _WHITESPACE.search(text)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _cache_directory(reader: Reader, node: Node, path: str, text: str) -> str | None:
    """The absolute path of a disk cache's directory: it may be created, or is usable."""
    full = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(text)))
    probe = full
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        reader.expected(node, path, CACHE_PATH_EXPECTED, f"{probe} is not a directory")
        return None
    if not os.access(probe, os.W_OK | os.X_OK):
        reader.expected(node, path, CACHE_PATH_EXPECTED, f"{probe} is not writable")
        return None
    return full


def replacement_error(pattern: re.Pattern[str], replacement: str) -> str | None:
    """Why ``replacement`` cannot be used with ``pattern.sub``, or None when it can: it may
    only refer to groups the pattern has, and only use escapes ``re`` knows."""
    names = {index: name for name, index in pattern.groupindex.items()}
    groups = "".join(
        f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pattern.groups + 1)
    )
    match = re.match(groups, "")
    assert match is not None  # only empty groups: always matches
    try:
        match.expand(replacement)
    except (re.error, IndexError) as exc:
        return regex_error(exc)
    return None


def _rewrite(route: Section, reader: Reader) -> PathRewrite | None:
    sec = subsection(route, "rewrite", REWRITE_KEYS)
    if sec is None:
        return None
    regex_node = sec.require("regex", "a regular expression")
    to_node = sec.require("to", REPLACEMENT_STRING_EXPECTED)
    pattern = None if regex_node is None else regex(reader, regex_node, sec.path_of("regex"))
    to = None
    if to_node is not None:
        to_path = sec.path_of("to")
        to = _string(reader, to_node, to_path, REPLACEMENT_STRING_EXPECTED)
        if to is not None and pattern is not None:
            error = replacement_error(pattern, to)
            if error is not None:
                reader.expected(to_node, to_path, REPLACEMENT_EXPECTED, error)
                to = None
    if pattern is None or to is None:
        return None
    return PathRewrite(regex=pattern.pattern, to=to)


# -- reachability ------------------------------------------------------------------------------


def path_has_prefix(path: str, prefix: str) -> bool:
    """Whether ``path`` is matched by ``path_prefix: prefix``: it starts with ``prefix``, on a
    segment boundary unless ``prefix`` ends in ``/`` (``/v1`` matches ``/v1`` and ``/v1/x``
    but not ``/v10``)."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def host_covers(earlier: str, later: str) -> bool:
    """Whether every host the route host pattern ``later`` accepts is accepted by
    ``earlier`` (both lowercased, exact names or ``*.suffix`` wildcards)."""
    if earlier == later:
        return True
    if not earlier.startswith("*."):
        return False
    # "*.example.com" accepts "a.example.com", "a.b.example.com" and so "*.a.example.com".
    name = later[2:] if later.startswith("*.") else later
    return name.endswith(earlier[1:])


def _paths_cover(earlier: RouteMatch, later: RouteMatch) -> bool:
    if earlier.path_prefix is None and earlier.path is None and earlier.path_regex is None:
        return True
    if earlier.path_prefix is not None:
        prefix = earlier.path_prefix
        if later.path_prefix is not None:
            # The paths later accepts all start with its prefix, and include the prefix
            # itself (or, ending in "/", the prefix plus any segment): exactly the test.
            return path_has_prefix(later.path_prefix, prefix)
        if later.path is not None:
            return path_has_prefix(later.path, prefix)
        return False
    if earlier.path is not None:
        return later.path == earlier.path
    return later.path_regex == earlier.path_regex


def match_covers(earlier: RouteMatch, later: RouteMatch) -> bool:
    """Whether ``earlier`` certainly matches every request ``later`` matches (so that a
    route with ``later`` placed after one with ``earlier`` is never used). Conservative:
    False whenever that cannot be shown simply (regexes are only compared as text)."""
    if not set(earlier.headers) <= set(later.headers):
        return False
    if earlier.methods and not (later.methods and set(later.methods) <= set(earlier.methods)):
        return False
    if earlier.hosts and not (
        later.hosts and all(any(host_covers(e, h) for e in earlier.hosts) for h in later.hosts)
    ):
        return False
    return _paths_cover(earlier, later)
