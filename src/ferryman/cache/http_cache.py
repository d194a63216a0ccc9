"""HttpCache: one cache as a proxy uses it — storage, key, policy settings, lock, purge.

A proxy's ``request_cache_filter`` hook returns an :class:`HttpCache` to cache a request
(the config proxy makes one per ``cache:`` block). Everything here works on header lists
and times, never on sockets: the proxy engine (:mod:`ferryman.proxy.cache_flow`) asks it
for the key of a request (:meth:`HttpCache.primary_key`), whether and for how long an
upstream response may be stored (:meth:`HttpCache.decide`), what to store of it
(:meth:`HttpCache.meta_for`) and what a stored response is good for now
(:meth:`HttpCache.judge`).

Keys are bytes made of the parts :attr:`HttpCache.key` lists, joined by ``|``; a request
whose response varies (``Vary``) is stored under ``primary + "#" + digest of the
secondary key``, so purging a key, or a prefix, purges its variants too. HEAD and GET
share keys: a cached GET answers a HEAD.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ferryman.cache.lock import CacheLock
from ferryman.cache.policy import (
    HEURISTIC_STATUSES,
    UNDERSTOOD_STATUSES,
    CacheControl,
    Stored,
    current_age,
    freshness_lifetime,
    http_date,
    parse_cache_control,
    storable,
    usable,
)
from ferryman.cache.purge_log import PURGE_KEY, PURGE_PREFIX, PURGE_TAG, PurgeLog
from ferryman.cache.storage import CacheMeta, CacheStorage
from ferryman.cache.variants import vary_fields, vary_key

__all__ = [
    "DEFAULT_KEY",
    "IGNORABLE",
    "KEY_PARTS",
    "HttpCache",
    "Judgement",
    "key_part_valid",
]

#: The default cache key: as nginx's ``$scheme$proxy_host$request_uri``, with the Host
#: the client asked for.
DEFAULT_KEY = ("scheme", "host", "uri")
#: Key parts taking no argument: ``scheme``, ``host`` (lowercased, port kept),
#: ``method`` (GET and HEAD both count as GET), ``path``, ``query``, ``uri`` (path and
#: query). With an argument: ``header:NAME``, ``cookie:NAME``, ``arg:NAME`` (a query
#: parameter).
KEY_PARTS = frozenset(("scheme", "host", "method", "path", "query", "uri"))
_KEY_PREFIXES = ("header:", "cookie:", "arg:")
#: What ``ignore`` may name: response fields whose caching instructions are not followed
#: (``cache-control``, ``expires``, ``vary``), ``set-cookie`` (store such responses,
#: without their Set-Cookie), and ``client-cache-control`` (the client's Cache-Control
#: and Pragma: a client then cannot force a revalidation).
IGNORABLE = frozenset(("cache-control", "expires", "set-cookie", "vary", "client-cache-control"))
#: Statuses ``default_ttl`` applies to when the response gives no freshness itself
#: (those cacheable by default, less 206: partial responses are not stored).
DEFAULT_TTL_STATUSES = HEURISTIC_STATUSES - {206}
#: Seconds a key whose response forbade storing goes straight to the origin.
PASS_TIME = 60.0
#: Keys remembered so at most (the oldest are forgotten first).
PASS_KEYS = 10_000
#: How long an entry with validators is kept past its freshness, for revalidation.
REVALIDATION_KEEP = 3600.0
_TAG_FIELDS = (b"cache-tag", b"surrogate-key")
_UNSTORED_FIELDS = frozenset((b"set-cookie", b"age"))


def key_part_valid(part: str) -> bool:
    """Whether ``part`` is a key part :class:`HttpCache` knows."""
    if part in KEY_PARTS:
        return True
    return any(part.startswith(p) and len(part) > len(p) for p in _KEY_PREFIXES)


@dataclass(slots=True)
class Judgement:
    """What a stored response is good for, for one request (:meth:`HttpCache.judge`)."""

    #: ``"fresh"``, ``"stale-while-revalidate"``, ``"stale"`` or ``"revalidate"``
    #: (:func:`ferryman.cache.policy.usable`).
    verdict: str
    #: Its age now, in seconds.
    age: float
    #: Its freshness lifetime, in seconds.
    lifetime: float
    #: What :func:`ferryman.cache.policy.stale_if_error_allows` needs.
    stored: Stored
    #: The request's Cache-Control (empty when ignored).
    request_cc: CacheControl

    @property
    def ttl(self) -> float:
        """Seconds of freshness left (negative when stale)."""
        return self.lifetime - self.age


def _query_args(query: bytes) -> dict[bytes, bytes]:
    args: dict[bytes, bytes] = {}
    for item in query.split(b"&"):
        name, _, value = item.partition(b"=")
        if name and name not in args:
            args[name] = value
    return args


def _cookies(values: list[bytes]) -> dict[bytes, bytes]:
    jar: dict[bytes, bytes] = {}
    for value in values:
        for item in value.split(b";"):
            name, eq, val = item.strip().partition(b"=")
            if eq and name and name not in jar:
                jar[name] = val
    return jar


@dataclass
class HttpCache:
    """A cache: where entries live and the rules for filling and using them.

    Attributes:
        storage: the :class:`~ferryman.cache.storage.CacheStorage` holding entries.
        name: this cache's name in ``Cache-Status`` (RFC 9211).
        default_ttl: freshness given to responses that state none (no ``max-age``,
            ``s-maxage`` or ``Expires``), for statuses cacheable by default; None: RFC
            9111's heuristic (a tenth of the time since ``Last-Modified``), else not
            stored.
        key: the parts of the cache key (see :data:`KEY_PARTS`).
        ignore: what of the exchange the cache disregards (see :data:`IGNORABLE`).
        stale_while_revalidate: seconds a stale response may be served while it is
            refreshed in the background, when the response does not say (RFC 5861).
        stale_if_error: seconds a stale response may answer when the origin fails, when
            neither side says (RFC 5861).
        lock_timeout: the longest a request waits for another's fetch of the same key.
        purge_from: networks whose clients may send ``PURGE``; None: PURGE is not
            handled by the cache (it goes upstream as any method).
        status_header: add ``Cache-Status`` to responses.
        scope: this cache's name in a :class:`~ferryman.cache.purge_log.PurgeLog`
            (see :meth:`attach_purge_log`).
        namespace: put before every key (with ``|``), so that caches sharing a storage
            (two routes on one disk directory or Redis) keep their entries apart.
    """

    storage: CacheStorage
    name: str = "ferryman"
    default_ttl: float | None = None
    key: tuple[str, ...] = DEFAULT_KEY
    ignore: frozenset[str] = frozenset()
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    lock_timeout: float = 5.0
    purge_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    status_header: bool = True
    scope: bytes = b""
    namespace: bytes = b""
    #: The in-process cache lock (one per worker: the object is copied into each).
    lock: CacheLock = field(init=False)
    #: Counters of cache results (``hit``, ``miss``, ``stale``, ``expired``,
    #: ``revalidated``, ``updating``, ``bypass``, ``purge``), per worker.
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        for part in self.key:
            if not key_part_valid(part):
                raise ValueError(f"unknown cache key part {part!r}")
        unknown = set(self.ignore) - IGNORABLE
        if unknown:
            raise ValueError(f"cannot ignore {sorted(unknown)!r}")
        self.lock = CacheLock(self.lock_timeout)
        self.counts = {}
        self._purge_log: PurgeLog | None = None
        self._hit_prefix: bytes | None = None
        self._pass: dict[bytes, float] = {}
        self._seen = 0
        self._mine: set[int] = set()

    def attach_purge_log(self, log: PurgeLog | None) -> None:
        """Share purges with the other workers through ``log`` (made before they were
        forked): purges of this cache are logged, and those other workers logged for the
        same :attr:`scope` are applied before each lookup. Only for storages of one
        process (a shared storage sees every purge already)."""
        if self.storage.shared:
            return
        self._purge_log = log
        self._seen = log.sequence if log is not None else 0
        self._mine = set()

    async def sync_purges(self) -> None:
        """Apply the purges other workers logged since the last call (cheap when there
        are none: one read of the log's sequence number)."""
        log = self._purge_log
        if log is None or log.sequence == self._seen:
            return
        last, records = log.read_since(self._seen)
        self._seen = last
        storage = self.storage
        if records is None:  # (fell behind: empty the cache, never serve what was purged)
            await storage.purge_prefix(b"")
            self._mine.clear()
            return
        for record in records:
            if record.seq in self._mine:
                self._mine.discard(record.seq)
                continue
            if record.scope not in (self.scope, b""):
                continue
            if record.kind == PURGE_KEY:
                await storage.purge(record.value)
                await storage.purge_prefix(record.value + b"#")
            elif record.kind == PURGE_PREFIX:
                await storage.purge_prefix(record.value)
            elif record.kind == PURGE_TAG:
                await storage.purge_tag(record.value)
            else:
                await storage.purge_prefix(b"")

    @property
    def shares_purges(self) -> bool:
        """Whether purges reach other workers through a purge log (so how many entries
        one removed is not known where it was asked)."""
        return self._purge_log is not None

    def _tag(self, tag: bytes) -> bytes:
        """A tag as stored: in this cache's namespace (so a tag purge of one route never
        removes another's entries from a shared storage)."""
        return self.namespace + b"|" + tag if self.namespace else tag

    def _log(self, kind: int, value: bytes) -> None:
        log = self._purge_log
        if log is not None:
            self._mine.add(log.append(kind, self.scope, value))

    def passes(self, key: bytes) -> bool:
        """Whether ``key`` was found uncacheable less than :data:`PASS_TIME` ago: its
        requests then go to the origin as they are, without the cache lock (Varnish's
        hit-for-miss)."""
        until = self._pass.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._pass[key]
        return False

    def pass_for(self, key: bytes) -> None:
        """Remember that ``key``'s response forbids storing (see :meth:`passes`)."""
        passing = self._pass
        passing.pop(key, None)
        passing[key] = time.monotonic() + PASS_TIME
        if len(passing) > PASS_KEYS:
            del passing[next(iter(passing))]

    def hit_status(self, ttl: float) -> bytes:
        """The ``Cache-Status`` of a hit with ``ttl`` seconds of freshness left."""
        prefix = self._hit_prefix
        if prefix is None:
            from ferryman.cache.status import cache_status

            prefix = self._hit_prefix = cache_status(self.name, hit=True) + b"; ttl="
        return prefix + b"%d" % math.floor(ttl)

    def count(self, result: str) -> None:
        """Add one to the ``result`` counter."""
        self.counts[result] = self.counts.get(result, 0) + 1

    # keys --------------------------------------------------------------------------------

    def fast_key(self, scheme: bytes, target: bytes, host: bytes | None) -> bytes | None:
        """The key of a request when :attr:`key` is the default (scheme, Host, target),
        made without :meth:`primary_key`'s generality; None for other keys."""
        if self.key != DEFAULT_KEY:
            return None
        host = host.lower() if host else b""
        if self.namespace:
            return b"%s|%s|%s|%s" % (self.namespace, scheme, host, target)
        return b"%s|%s|%s" % (scheme, host, target)

    def primary_key(
        self,
        *,
        scheme: bytes,
        method: bytes,
        target: bytes,
        header: Callable[[bytes], list[bytes]],
    ) -> bytes:
        """The key of a request: :attr:`key`'s parts joined by ``|``.

        ``target`` is the request target (path and query); ``header(name)`` gives the
        request's field lines of a lowercased name.
        """
        path, _, query = target.partition(b"?")
        out: list[bytes] = []
        args: dict[bytes, bytes] | None = None
        for part in self.key:
            if part == "scheme":
                out.append(scheme)
            elif part == "host":
                hosts = header(b"host")
                out.append(hosts[0].lower() if hosts else b"")
            elif part == "uri":
                out.append(target)
            elif part == "path":
                out.append(path)
            elif part == "query":
                out.append(query)
            elif part == "method":
                out.append(b"GET" if method == b"HEAD" else method)
            elif part.startswith("header:"):
                out.append(b",".join(header(part[7:].lower().encode())))
            elif part.startswith("cookie:"):
                out.append(_cookies(header(b"cookie")).get(part[7:].encode(), b""))
            else:  # arg:NAME
                if args is None:
                    args = _query_args(query)
                out.append(args.get(part[4:].encode(), b""))
        if self.namespace:
            out.insert(0, self.namespace)
        return b"|".join(out)

    def url_key(self, url: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
        """The primary key a GET of ``url`` (``scheme://host/path?query``) has, for the
        purge API; ``headers`` supply ``header:``/``cookie:`` parts."""
        parts = urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        fields: dict[bytes, list[bytes]] = {b"host": [parts.netloc.encode()]}
        for name, value in headers:
            fields.setdefault(name.lower().encode(), []).append(value.encode())
        return self.primary_key(
            scheme=parts.scheme.encode(),
            method=b"GET",
            target=target.encode(),
            header=lambda name: fields.get(name, []),
        )

    def url_prefix(self, url_prefix: str) -> bytes:
        """The key prefix shared by every URL starting with ``url_prefix``: usable when
        the key ends with ``uri`` or ``path`` and only ``scheme``/``host`` come before."""
        if not self.key or self.key[-1] not in ("uri", "path") or any(
            part not in ("scheme", "host") for part in self.key[:-1]
        ):
            raise ValueError(
                "a URL prefix purge needs a cache key of scheme/host parts ending with "
                f"uri or path; this cache's key is {list(self.key)}"
            )
        parts = urlsplit(url_prefix)
        target = parts.path + ("?" + parts.query if parts.query else "")
        out = [self.namespace] if self.namespace else []
        for part in self.key[:-1]:
            out.append(parts.scheme.encode() if part == "scheme" else parts.netloc.lower().encode())
        out.append(target.encode())
        return b"|".join(out)

    @staticmethod
    def variant_key(primary: bytes, variant: bytes) -> bytes:
        """Where the variant ``variant`` (a secondary key) of ``primary`` is stored."""
        return primary + b"#" + hashlib.blake2b(variant, digest_size=16).hexdigest().encode()

    def vary_of(self, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, ...] | None:
        """The fields a response varies on (lowercased), ``()`` when none, None for
        ``Vary: *``; ``()`` when ``vary`` is ignored."""
        if "vary" in self.ignore:
            return ()
        lines = [v for n, v in headers if n.lower() == b"vary"]
        return vary_fields(lines) if lines else ()

    @staticmethod
    def secondary_key(fields: tuple[bytes, ...], header: Callable[[bytes], list[bytes]]) -> bytes:
        """A request's secondary key for a response varying on ``fields``."""
        return vary_key([b",".join(fields)], header)

    # storing -----------------------------------------------------------------------------

    def request_cc(self, header: Callable[[bytes], list[bytes]]) -> tuple[CacheControl, bool]:
        """The request's Cache-Control and whether it has ``Pragma: no-cache``
        (nothing when ``client-cache-control`` is ignored)."""
        if "client-cache-control" in self.ignore:
            return _NO_DIRECTIVES, False
        values = header(b"cache-control")
        pragmas = header(b"pragma")
        pragma = bool(pragmas) and any(b"no-cache" in v.lower() for v in pragmas)
        return (parse_cache_control(values) if values else _NO_DIRECTIVES), pragma

    def response_cc(self, headers: list[tuple[bytes, bytes]]) -> CacheControl:
        """A response's Cache-Control (empty when ignored)."""
        if "cache-control" in self.ignore:
            return CacheControl()
        return parse_cache_control(v for n, v in headers if n.lower() == b"cache-control")

    def decide(
        self,
        *,
        method: bytes,
        status: int,
        headers: list[tuple[bytes, bytes]],
        request_cc: CacheControl,
        authorization: bool,
        now: float | None = None,
    ) -> float | None:
        """The freshness lifetime to store an upstream response with, or None when it
        must not (or need not) be stored: RFC 9111 §3 for a shared cache, with
        :attr:`default_ttl` and :attr:`ignore` applied."""
        if status == 206 or status not in UNDERSTOOD_STATUSES:
            return None
        fields: dict[bytes, bytes] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), value)
        if b"set-cookie" in fields and "set-cookie" not in self.ignore:
            return None
        if self.vary_of(headers) is None:
            return None  # Vary: * matches no later request
        cc = self.response_cc(headers)
        expires = None if "expires" in self.ignore else fields.get(b"expires")
        explicit = expires is not None or cc.max_age is not None or cc.s_maxage is not None
        default = (
            self.default_ttl is not None and not explicit and status in DEFAULT_TTL_STATUSES
        )
        verb = "HEAD" if method == b"HEAD" else method.decode("latin-1")
        if not storable(
            verb, status, request_cc, cc, authorization=authorization, expires=expires
        ) and not (
            default
            and verb in ("GET", "HEAD")
            and not self._forbidden(cc, request_cc, authorization)
        ):
            return None
        if default:
            assert self.default_ttl is not None
            lifetime = self.default_ttl
        else:
            date = http_date(fields.get(b"date"))
            lifetime = freshness_lifetime(
                status,
                cc,
                date=date if date is not None else (now if now is not None else time.time()),
                expires=expires,
                last_modified=http_date(fields.get(b"last-modified")),
            )
        validators = b"etag" in fields or b"last-modified" in fields
        stale = max(
            cc.stale_while_revalidate or 0, cc.stale_if_error or 0,
            self.stale_while_revalidate, self.stale_if_error,
        )
        if lifetime <= 0 and not validators and not stale:
            return None  # nothing could ever use it
        return lifetime

    @staticmethod
    def _forbidden(cc: CacheControl, request_cc: CacheControl, authorization: bool) -> bool:
        """What ``default_ttl`` never overrides: no-store, private, the client's
        no-store, and a request with Authorization the response does not make shareable
        (RFC 9111 §3.5)."""
        return (
            cc.no_store
            or (cc.private and not cc.private_fields)
            or request_cc.no_store
            or (
                authorization
                and not (cc.public or cc.must_revalidate or cc.s_maxage is not None)
            )
        )

    def meta_for(
        self,
        *,
        status: int,
        headers: list[tuple[bytes, bytes]],
        lifetime: float,
        variant: bytes,
        request_time: float,
        response_time: float,
    ) -> CacheMeta:
        """What to store of a response :meth:`decide` allowed: its fields (as received;
        Set-Cookie never), the times, its Vary, tags and keep time."""
        cc = self.response_cc(headers)
        stored = self.storable_fields(headers, cc)
        age = 0.0
        length = None
        tags: list[bytes] = []
        has_validators = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"age" and value.strip().isdigit():
                age = float(value.strip())
            elif lname == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif lname in _TAG_FIELDS:
                tags.extend(t for t in value.replace(b",", b" ").split() if t)
            elif lname in (b"etag", b"last-modified"):
                has_validators = True
        if age:
            stored.append((b"Age", str(int(age)).encode()))  # (kept for current_age)
        keep = lifetime + max(
            cc.stale_while_revalidate or 0, cc.stale_if_error or 0,
            self.stale_while_revalidate, self.stale_if_error,
        )
        if has_validators:
            keep += REVALIDATION_KEEP
        return CacheMeta(
            status,
            stored,
            stored_at=response_time,
            request_time=request_time,
            response_time=response_time,
            vary=self.vary_of(headers),
            variant=variant,
            length=length,
            tags=tuple(dict.fromkeys(self._tag(t) for t in tags)),
            keep_for=keep,
            fresh_for=lifetime,
        )

    def storable_fields(
        self, headers: list[tuple[bytes, bytes]], cc: CacheControl | None = None
    ) -> list[tuple[bytes, bytes]]:
        """The fields of a response that may be stored: never Set-Cookie or Age, nor the
        fields of one client (``private="F"``) or never to be reused unvalidated
        (``no-cache="F"``; RFC 9111 §5.2.2.4, §5.2.2.7)."""
        if cc is None:
            cc = self.response_cc(headers)
        unstored = _UNSTORED_FIELDS
        if cc.private_fields or cc.no_cache_fields:
            unstored = unstored.union(
                name.lower().encode("latin-1")
                for name in cc.private_fields + cc.no_cache_fields
            )
        return [(n, v) for n, v in headers if n.lower() not in unstored]

    # using -------------------------------------------------------------------------------

    def judge(
        self,
        meta: CacheMeta,
        request_cc: CacheControl,
        pragma_no_cache: bool,
        now: float | None = None,
    ) -> Judgement:
        """What ``meta``'s response is good for now, for a request with ``request_cc``."""
        now = time.time() if now is None else now
        parsed = meta.parsed
        if type(parsed) is not _Parsed or parsed.cache is not self:
            parsed = meta.parsed = self._parse(meta)
        date = parsed.date
        age_value = parsed.age_value
        age = current_age(
            age_value=age_value,
            date_value=date,
            request_time=meta.request_time,
            response_time=meta.response_time,
            now=now,
        )
        stored = Stored(lifetime=meta.fresh_for, age=age, response_cc=parsed.cc)
        if (
            request_cc is _NO_DIRECTIVES
            and not pragma_no_cache
            and parsed.plain
            and meta.fresh_for > age
        ):
            verdict = "fresh"  # (what usable() says, without its checks)
        else:
            verdict = usable(stored, request_cc, request_pragma_no_cache=pragma_no_cache)
        return Judgement(verdict, age, meta.fresh_for, stored, request_cc)

    def _parse(self, meta: CacheMeta) -> _Parsed:
        """What judging ``meta`` needs of its headers, parsed once per stored object."""
        date = None
        age_value = 0.0
        for name, value in meta.headers:
            lname = name.lower()
            if lname == b"date":
                date = http_date(value)
            elif lname == b"age" and value.strip().isdigit():
                age_value = float(value.strip())
        cc = self.response_cc(meta.headers)
        if self.stale_while_revalidate and cc.stale_while_revalidate is None:
            cc = _with(cc, stale_while_revalidate=int(self.stale_while_revalidate))
        if self.stale_if_error and cc.stale_if_error is None:
            cc = _with(cc, stale_if_error=int(self.stale_if_error))
        plain = not (cc.no_cache and not cc.no_cache_fields)
        base = [p for p in meta.headers if p[0].lower() not in (b"age", b"content-length")]
        return _Parsed(self, date, age_value, cc, plain, base)

    def relifetime(self, meta: CacheMeta, now: float | None = None) -> float | None:
        """The freshness lifetime of a stored response whose fields a 304 refreshed
        (None: it may no longer be stored)."""
        return self.decide(
            method=b"GET",
            status=meta.status,
            headers=meta.headers,
            request_cc=CacheControl(),
            authorization=False,
            now=now,
        )

    # purging -----------------------------------------------------------------------------

    def purge_allowed(self, ip: bytes) -> bool:
        """Whether a client at ``ip`` may send PURGE."""
        if self.purge_from is None:
            return False
        try:
            address = ipaddress.ip_address(ip.decode("latin-1"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.purge_from)

    async def purge_key(self, key: bytes) -> int:
        """Remove the entry under the primary key ``key`` and its variants; how many
        (in this worker, for storages of one process: the other workers are told)."""
        await self.sync_purges()
        self._pass.pop(key, None)
        count = int(await self.storage.purge(key))
        count += await self.storage.purge_prefix(key + b"#")
        self._log(PURGE_KEY, key)
        if count:
            self.count("purge")
        return count

    async def purge_key_prefix(self, prefix: bytes) -> int:
        """Remove every entry whose key starts with ``prefix``; how many (in this worker
        for storages of one process: the other workers are told)."""
        await self.sync_purges()
        for passing in [k for k in self._pass if k.startswith(prefix)]:
            del self._pass[passing]
        count = await self.storage.purge_prefix(prefix)
        self._log(PURGE_PREFIX, prefix)
        if count:
            self.count("purge")
        return count

    async def purge_url(self, url: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Remove what a GET of ``url`` would be answered with (every variant)."""
        return await self.purge_key(self.url_key(url, headers))

    async def purge_prefix(self, url_prefix: str) -> int:
        """Remove every entry whose URL starts with ``url_prefix``."""
        return await self.purge_key_prefix(self.url_prefix(url_prefix))

    async def purge_tag(self, tag: str | bytes) -> int:
        """Remove every entry tagged ``tag`` (``Cache-Tag``/``Surrogate-Key``)."""
        value = self._tag(tag.encode() if isinstance(tag, str) else tag)
        await self.sync_purges()
        self._pass.clear()
        count = await self.storage.purge_tag(value)
        self._log(PURGE_TAG, value)
        if count:
            self.count("purge")
        return count


#: The directives of a request without Cache-Control (compared by identity).
_NO_DIRECTIVES = CacheControl()


@dataclass(slots=True)
class _Parsed:
    """A stored response's headers as :meth:`HttpCache.judge` needs them."""

    cache: HttpCache
    date: float | None
    age_value: float
    cc: CacheControl
    plain: bool  # no unqualified no-cache: a fresh entry may be used as it is
    base: list[tuple[bytes, bytes]]  # the fields served, less Age and Content-Length


def _with(cc: CacheControl, **changes: int) -> CacheControl:
    from dataclasses import replace

    return replace(cc, **changes)  # type: ignore[arg-type]
