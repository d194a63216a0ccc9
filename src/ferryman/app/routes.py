"""Routes compiled once at load: a listener's ordered routes and the matcher over them.

A :class:`Router` answers "which route takes this request?" with as little per-request work
as possible: host conditions are resolved to a per-host candidate list that is cached, the
remaining conditions (path, method, headers) are plain byte comparisons, and a regex is run
only for routes that use one. The first route whose conditions all hold wins.

Paths are matched on the request path without its query, percent-decoded and with ``.``,
``..`` and repeated ``/`` segments resolved (as nginx matches locations), so ``/%61dmin``
and ``/x/../admin`` are matched as ``/admin``. A path that climbs above ``/`` matches no
path condition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

from ferryman.config.model import RouteConfig

if TYPE_CHECKING:
    from ferryman.protocols.headers import RequestHeader

__all__ = ["Route", "Router", "host_name", "match_path", "request_host", "to_origin_form"]

_PATH_NONE: Final = 0
_PATH_PREFIX: Final = 1
_PATH_EXACT: Final = 2
_PATH_REGEX: Final = 3

#: Distinct Host values whose candidate lists are cached; beyond that the cache restarts.
HOST_CACHE_SIZE: Final = 4096
#: Longer Host values (no valid name is) are matched without caching.
MAX_CACHED_HOST: Final = 255


def plain_path_end(raw_path: bytes) -> int:
    """Where the path of an origin-form target ends (at ``?`` or the end) when it needs no
    normalising: it starts with ``/`` and holds no ``%``, ``/.`` or ``//``. Else -1.

    One compiled pass over the bytes: four ``bytes.find`` calls cost about six times as
    much (each is a method call by name with its arguments parsed), and ``in`` more still
    (``bytes.__contains__`` first tries its argument as an int and clears the TypeError).
    """
    n = len(raw_path)
    if n == 0 or raw_path[0] != 0x2F:  # "/"
        return -1
    prev = 0
    i = 0
    while i < n:
        c = raw_path[i]
        if c == 0x3F:  # "?"
            return i
        if c == 0x25 or (prev == 0x2F and (c == 0x2E or c == 0x2F)):  # "%", "/.", "//"
            return -1
        prev = c
        i += 1
    return n


def match_path(raw_path: bytes) -> bytes | None:
    """The path routes are matched against: no query, percent-decoded, dot segments and
    repeated slashes resolved. None when it climbs above the root (never matches)."""
    end = plain_path_end(raw_path)
    if end >= 0:  # the common case: nothing to normalise
        return raw_path if end == len(raw_path) else raw_path[:end]
    q = raw_path.find(b"?")
    path = raw_path if q < 0 else raw_path[:q]
    if path.find(b"%") < 0 and path.find(b"/.") < 0 and path.find(b"//") < 0:
        return path
    if b"%" in path:
        path = unquote_to_bytes(path)
    out: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if not out:
                return None
            out.pop()
        elif segment != b"." and segment != b"":
            out.append(segment)
    trailing = path.endswith((b"/", b"/.", b"/.."))
    normal = b"/" + b"/".join(out)
    if trailing and out:
        normal += b"/"
    return normal


def to_origin_form(req: RequestHeader) -> bool:
    """Turn an absolute-form target (``GET http://host/path``) into origin-form, moving its
    authority into ``Host`` (RFC 9112 §3.2.2: it replaces any Host header), so that routing
    and the upstream see one host and one path. Returns False for a target that is neither
    (``*`` excepted), which the caller answers with 400."""
    raw = req.raw_path
    if raw[:1] == b"/" or raw == b"*":
        return True
    scheme_end = raw.find(b"://")
    if scheme_end < 0 or raw[:scheme_end].lower() not in (b"http", b"https"):
        return False
    rest = raw[scheme_end + 3 :]
    end = len(rest)
    for stop in (b"/", b"?"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if not authority or b"@" in authority:
        return False
    path = rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    req.raw_path = path
    req.headers.set(b"Host", authority)
    return True


def request_host(req: RequestHeader) -> str:
    """The request's host name: ``Host`` lowercased, without port or trailing dot."""
    value = req.headers.get(b"host")
    if not value:
        return ""
    return host_name(value)


def host_name(value: bytes) -> str:
    """A ``Host`` value as a name: lowercased, without port or trailing dot."""
    host = value.decode("latin-1").lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


class Route:
    """One compiled route: its conditions as bytes/regex objects, its config, and
    ``action`` — whatever the proxy attached to carry it out (set by the caller).

    Attributes:
        name: the route's name (for logs and metrics).
        config: the :class:`RouteConfig` it was compiled from.
        action: the object handling matched requests (set by the config proxy).
    """

    __slots__ = (
        "name",
        "config",
        "action",
        "_exact_hosts",
        "_suffixes",
        "_any_host",
        "_path_kind",
        "_path",
        "_path_dir",
        "_regex",
        "_methods",
        "_headers",
        "_simple",
    )

    def __init__(self, config: RouteConfig, action: Any = None) -> None:
        self.name = config.name
        self.config = config
        self.action = action
        m = config.match
        self._exact_hosts = frozenset(h for h in m.hosts if not h.startswith("*."))
        # "*.example.com" matches any name ending in ".example.com"
        self._suffixes = tuple(h[1:] for h in m.hosts if h.startswith("*."))
        self._any_host = not m.hosts
        self._path_kind = _PATH_NONE
        self._path = b""
        self._path_dir = b""
        self._regex: re.Pattern[bytes] | None = None
        if m.path_prefix is not None:
            self._path_kind = _PATH_PREFIX
            self._path = m.path_prefix.encode()
            self._path_dir = self._path if self._path.endswith(b"/") else self._path + b"/"
        elif m.path is not None:
            self._path_kind = _PATH_EXACT
            self._path = m.path.encode()
        elif m.path_regex is not None:
            self._path_kind = _PATH_REGEX
            self._regex = re.compile(m.path_regex.encode())
        self._methods = frozenset(x.encode() for x in m.methods)
        self._headers = tuple(
            (
                h.name.lower().encode(),
                None if h.value is None else h.value.encode(),
                None if h.regex is None else re.compile(h.regex.encode()),
                h.absent,
            )
            for h in m.headers
        )
        self._simple = (
            self._path_kind == _PATH_NONE or (
                self._path_kind == _PATH_PREFIX and self._path == b"/"
            )
        ) and not self._methods and not self._headers

    def accepts_host(self, host: str) -> bool:
        """Whether the host condition holds for ``host`` (lowercase, no port)."""
        if self._any_host or host in self._exact_hosts:
            return True
        return any(host.endswith(s) for s in self._suffixes)

    def matches(self, req: RequestHeader, path: bytes | None) -> bool:
        """Whether every condition except the host holds (``path`` from :func:`match_path`)."""
        if self._simple:
            return True
        if self._methods and req.raw_method not in self._methods:
            return False
        kind = self._path_kind
        if kind:
            if path is None:
                return False
            if kind == _PATH_PREFIX:
                if not (path.startswith(self._path_dir) or path == self._path):
                    return False
            elif kind == _PATH_EXACT:
                if path != self._path:
                    return False
            elif self._regex is not None and self._regex.match(path) is None:
                return False
        for name, value, regex, absent in self._headers:
            got = req.headers.get(name)
            if absent:
                if got is not None:
                    return False
                continue
            if got is None:
                return False
            if value is not None and got != value:
                return False
            if regex is not None and regex.search(got) is None:
                return False
        return True

    def __repr__(self) -> str:
        return f"Route({self.name})"


class Router:
    """The ordered routes of one listener.

    ``route(req, path)`` returns the first route accepting the request, or None.
    """

    __slots__ = ("routes", "_host_free", "_only", "_by_host")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._host_free = all(r._any_host for r in self.routes)
        first = self.routes[0] if self.routes else None
        self._only = first if first is not None and first._simple and first._any_host else None
        self._by_host: dict[bytes, tuple[Route, ...]] = {}

    def candidates(self, host: bytes) -> tuple[Route, ...]:
        """The routes whose host condition accepts the ``Host`` value ``host``, in order
        (cached per distinct value, for values of a plausible length)."""
        found = self._by_host.get(host)
        if found is None:
            name = host_name(host) if host else ""
            found = tuple(r for r in self.routes if r.accepts_host(name))
            if len(host) <= MAX_CACHED_HOST:
                if len(self._by_host) >= HOST_CACHE_SIZE:
                    self._by_host.clear()
                self._by_host[host] = found
        return found

    def route(self, req: RequestHeader, path: bytes | None = None) -> Route | None:
        """The route for ``req``, or None when no route accepts it. ``path`` is
        :func:`match_path` of its target, computed here if not given."""
        only = self._only
        if only is not None:
            return only  # a catch-all first route: nothing to compare
        if self._host_free:
            routes = self.routes
        else:
            routes = self.candidates(req.headers.get(b"host") or b"")
        if not routes:
            return None
        if path is None:
            path = match_path(req.raw_path)
        for route in routes:
            if route.matches(req, path):
                return route
        return None
