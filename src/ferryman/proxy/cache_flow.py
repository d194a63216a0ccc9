"""The cache phase of a request: lookups, the cache lock, filling, stale serving, purge.

A request whose ``request_cache_filter`` returned an
:class:`~ferryman.cache.http_cache.HttpCache` runs :func:`serve` as a task (storages and
the lock wait). In order:

1. ``PURGE`` from an allowed address removes the URL's entries (a trailing ``*``: every
   URL with that prefix; ``Cache-Tag``/``Surrogate-Key`` fields: those tags) and answers
   200, or 404 when nothing was stored; from elsewhere 403. Other methods than GET and
   HEAD go upstream, and an unsafe one answered with 2xx or 3xx invalidates the URL's
   entries, and those of its Location and Content-Location on the same host (RFC 9111
   §4.4).
2. ``cache_key_callback`` gives the primary key; the entry under it, or, for a response
   that varies, the variant ``cache_vary_filter`` names, is looked up; ``cache_hit_filter``
   may declare it expired.
3. A fresh entry is served (``Age``, ``Cache-Status``, the client's conditionals and
   Range answered from it); HEAD from a stored GET.
4. A stale one within ``stale-while-revalidate`` is served at once when
   ``should_serve_stale(error=None)`` agrees, and refreshed in the background (once: the
   refresh holds the cache lock).
5. Otherwise the request takes the cache lock for its key. Waiters (bounded by the
   cache's ``lock_timeout``) are then served from what the holder stored, even while it
   is still streaming in; for a storage shared by processes, the holder also takes the
   storage's ``fill_lock`` or polls for another process's result.
6. The holder runs ``cache_miss`` (on a miss) and goes upstream: conditionally when it
   has a stale entry. A 304 refreshes the stored headers and the entry is served; an
   error (or 5xx) serves the stale entry when ``should_serve_stale(error)`` agrees
   (``stale-if-error``); a full response passes ``upstream_response_filter`` and
   ``response_cache_filter`` and, if storable, is teed into storage as it streams to
   the client.

``session.cache_status`` records the outcome as nginx's ``$upstream_cache_status`` does:
HIT, MISS, EXPIRED, STALE, UPDATING, REVALIDATED, BYPASS (and PURGE).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ferryman.cache.lock import LockOutcome, ReadHandle, WritePermit
from ferryman.cache.policy import CacheControl
from ferryman.cache.ranges import if_range_matches, multipart_parts, parse_range
from ferryman.cache.status import cache_status
from ferryman.cache.storage import CacheEntry, CacheMeta, CacheWriteAborted, ChunkSource
from ferryman.cache.variants import conditional_headers, merge_not_modified
from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_LENGTH
from ferryman.protocols.headers import Headers, ResponseHeader
from ferryman.proxy.cache_hit import hit_head
from ferryman.proxy.fetch import UpstreamFetch

if TYPE_CHECKING:
    from ferryman.cache.http_cache import HttpCache, Judgement
    from ferryman.cache.storage import CacheWriter
    from ferryman.proxy.session import Session
    from ferryman.upstream.peer import HttpPeer

log = logging.getLogger("ferryman.cache")

_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
#: Statuses for which a stale entry may answer instead (RFC 5861 §4).
_ERROR_STATUSES = frozenset((500, 502, 503, 504))
#: How often a process polls a shared storage for another process's fetch.
SHARED_POLL_INTERVAL = 0.05
#: Fields a 304 answer to the client carries from the stored response (RFC 9110 §15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary",
     b"last-modified")
)
#: Background refreshes and unlocks in flight (kept referenced until done).
_refreshes: set[asyncio.Task[None]] = set()
_NO_DIRECTIVES = CacheControl()


class _Vanished(Exception):
    """A stored entry could not be read any more (purged, evicted or replaced since its
    lookup), found before anything was sent: the request goes on as a miss."""


class _BodyReader:
    """An entry's body, opened before the response head goes out (so a vanished entry
    can still be treated as a miss): a synchronous source, or the async iteration with
    its first chunk already read."""

    __slots__ = ("source", "chunks", "first")

    def __init__(self) -> None:
        self.source: Any = None
        self.chunks: Any = None
        self.first: bytes | None = None

    async def open(self, entry: CacheEntry) -> None:
        """Open ``entry``'s body; raises :class:`_Vanished` if it cannot be read."""
        source = entry.open_source()
        if source is not None:
            self.source = source
            return
        if entry.complete and entry.size == 0:
            self.first = b""
            return
        chunks = entry.body().__aiter__()
        try:
            self.first = await chunks.__anext__()
        except StopAsyncIteration:
            self.first = b""
            return
        except CacheWriteAborted as exc:
            raise _Vanished(str(exc)) from None
        self.chunks = chunks

    def close(self) -> None:
        """Release what was opened, when the body is not sent after all."""
        source, self.source = self.source, None
        if source is not None:
            source.close()
        chunks, self.chunks = self.chunks, None
        if chunks is not None:
            _close_later(chunks)


def _close_later(chunks: Any) -> None:
    """Close an async generator left unfinished (in the background)."""
    try:
        asyncio.get_running_loop().create_task(chunks.aclose())
    except RuntimeError:
        pass


def _engine() -> Any:
    from ferryman.proxy import engine  # (engine imports this module: bound late)

    return engine


async def _call(session: Session, name: str, *args: Any) -> Any:
    """Call hook ``name`` of the session's proxy, awaiting it if it is async."""
    proxy: Any = session._proxy
    result = getattr(proxy, name)(session, *args)
    if name in proxy.async_hooks or name not in proxy.overridden:
        result = await result  # (the defaults are async def)
    return result


async def serve(session: Session, ctx: Any) -> None:
    """The cache phase and the rest of the request (see the module docstring)."""
    try:
        await _serve(session, ctx)
    except _Vanished as exc:  # (a stale entry to revalidate or fall back on went away)
        raise ProxyError(
            ErrorKind.INTERNAL, ErrorSource.INTERNAL,
            f"the stored response could not be read: {exc}",
        ) from None


async def _serve(session: Session, ctx: Any) -> None:
    cache = session.cache
    assert cache is not None
    req = session.req_header
    method = req.raw_method
    if method == b"PURGE" and cache.purge_from is not None:
        await _purge(session, ctx, cache)
        return
    if method != b"GET" and method != b"HEAD":
        session.cache_status = "BYPASS"
        cache.count("bypass")
        engine = _engine()
        session._send_continue()
        peer = await engine.upstream_head(session, ctx)
        if peer is None:
            return  # (a CONNECT tunnel, run to its end)
        resp = session._up_resp
        assert resp is not None
        await engine.upstream_response_hooks(session, ctx, resp)
        if cache.status_header and resp.status != 101:
            resp.headers.add(
                b"Cache-Status", _status_value(cache, fwd="method", fwd_status=resp.status)
            )
        await engine.deliver_upstream_response(session, ctx, peer, resp)
        status = session.upstream_status
        if method not in _SAFE_METHODS and status is not None and 200 <= status < 400:
            await _invalidate(session, ctx, cache)
        return
    await cache.sync_purges()
    key: bytes = await _call(session, "cache_key_callback", ctx)
    request_cc, pragma = cache.request_cc(req.headers.get_all)
    entry, miss = await _lookup(session, ctx, cache, key)
    judgement: Judgement | None = None
    if entry is not None:
        judgement = await _judge(session, ctx, cache, entry, request_cc, pragma)
        try:
            if judgement.verdict == "fresh":
                await _serve_hit(session, ctx, cache, entry, entry.meta, judgement, "HIT")
                return
            if judgement.verdict == "stale-while-revalidate" and await _call(
                session, "should_serve_stale", ctx, None
            ):
                await _serve_updating(session, ctx, cache, key, entry, judgement)
                return
        except _Vanished:
            entry, judgement, miss = None, None, "uri-miss"  # (purged or evicted meanwhile)
    if request_cc.only_if_cached:
        session.cache_status = "MISS"
        session.send_error(504)  # RFC 9111 §5.2.1.7
        return
    if cache.passes(key):  # (recently uncacheable: straight to the origin, no lock)
        await _pass(session, ctx, cache)
        return
    collapsed = False
    fill = _Fill(cache, key)
    lock = cache.lock.lock(key)
    try:
        if isinstance(lock, ReadHandle):
            outcome = await lock.wait()
            collapsed = True
            if outcome is LockOutcome.DONE:
                found = await _collapsed_entry(session, ctx, cache, key, lock.value)
                if found is not None:
                    j = await _judge(session, ctx, cache, found, request_cc, pragma)
                    if j.verdict == "fresh" or not found.complete:
                        try:
                            await _serve_hit(
                                session, ctx, cache, found, found.meta, j, "HIT",
                                collapsed=True,
                            )
                            return
                        except _Vanished:
                            pass
        else:
            fill.permit = lock
            if cache.storage.shared:
                fill.shared, other = await _shared_wait(
                    session, ctx, cache, key, request_cc, pragma
                )
                if other is not None:
                    entry_found, j = other
                    fill.release(LockOutcome.DONE, entry_found)
                    try:
                        await _serve_hit(
                            session, ctx, cache, entry_found, entry_found.meta, j, "HIT",
                            collapsed=True,
                        )
                        return
                    except _Vanished:
                        pass
        await _fetch(session, ctx, cache, key, entry, judgement, miss, fill, collapsed)
    finally:
        fill.release(LockOutcome.FAILED)


class _Fill:
    """The right to fetch a key: the cache lock's permit (waiters in this worker) and,
    for a shared storage, its fill lock (other processes). The permit is given back as
    soon as the response head shows whether it is stored (waiters here stream the entry
    as it is written); the fill lock then too, unless the response is being stored:
    other processes see it only once it is complete, so they wait for that."""

    __slots__ = ("cache", "key", "permit", "shared")

    def __init__(self, cache: HttpCache, key: bytes) -> None:
        self.cache = cache
        self.key = key
        self.permit: WritePermit | None = None
        self.shared = False

    def release(
        self, outcome: LockOutcome, value: object = None, keep_shared: bool = False
    ) -> None:
        """Wake the waiters with ``outcome`` (and ``value``, the entry); idempotent.
        ``keep_shared``: hold the shared fill lock until a later call."""
        permit, self.permit = self.permit, None
        if permit is not None:
            self.cache.lock.release(permit, outcome, value)
        if self.shared and not keep_shared:
            self.shared = False
            _background(self.cache.storage.fill_unlock(self.key))


def _background(coro: Any) -> None:
    """Run ``coro`` as a task kept referenced until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _refreshes.add(task)
    task.add_done_callback(_refreshes.discard)


async def _collapsed_entry(
    session: Session, ctx: Any, cache: HttpCache, key: bytes, value: object
) -> CacheEntry | None:
    """What a request that waited on the cache lock is answered from: the entry the
    fetch stored (handed over, even if the storage did not keep it) when it is this
    request's variant, else whatever storage has now."""
    if isinstance(value, CacheEntry) and not value.aborted:
        fields = value.meta.vary
        if not fields:
            return value
        proxy: Any = session._proxy
        if proxy.cache_vary_filter(session, fields, ctx) == value.meta.variant:
            return value
    found, _ = await _lookup(session, ctx, cache, key)
    return found


async def _pass(session: Session, ctx: Any, cache: HttpCache) -> None:
    """A key recently found uncacheable: proxied as it is (Range, conditionals and HEAD
    reach the origin), without the cache lock, as Varnish's hit-for-miss."""
    session.cache_status = "MISS"
    cache.count("miss")
    engine = _engine()
    session._send_continue()
    peer = await engine.upstream_head(session, ctx)
    assert peer is not None  # (GET and HEAD never tunnel)
    resp = session._up_resp
    assert resp is not None
    await engine.upstream_response_hooks(session, ctx, resp)
    if cache.status_header:
        resp.headers.add(
            b"Cache-Status",
            _status_value(cache, fwd="miss", fwd_status=resp.status, detail="uncacheable"),
        )
    await engine.deliver_upstream_response(session, ctx, peer, resp)


async def _judge(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    entry: CacheEntry,
    request_cc: Any,
    pragma: bool,
) -> Judgement:
    judgement = cache.judge(entry.meta, request_cc, pragma)
    proxy: Any = session._proxy
    if "cache_hit_filter" in proxy.overridden and await _call(
        session, "cache_hit_filter", entry.meta, ctx
    ):
        judgement.verdict = "revalidate"
    session.cache_judgement = judgement
    return judgement


async def _lookup(
    session: Session, ctx: Any, cache: HttpCache, key: bytes
) -> tuple[CacheEntry | None, str]:
    """The entry answering this request, or None and why (``uri-miss``/``vary-miss``)."""
    storage = cache.storage
    entry = await storage.lookup(key)
    if entry is None or entry.aborted:
        return None, "uri-miss"
    meta = entry.meta
    if meta.status != 0:
        return entry, ""
    fields = meta.vary  # a Vary marker: the response varies on these fields
    if not fields:
        return None, "uri-miss"
    proxy: Any = session._proxy
    variant = proxy.cache_vary_filter(session, fields, ctx)
    found = await storage.lookup(cache.variant_key(key, variant))
    if found is None or found.aborted or found.meta.variant != variant:
        return None, "vary-miss"
    return found, ""


async def _shared_wait(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    key: bytes,
    request_cc: Any,
    pragma: bool,
) -> tuple[bool, tuple[CacheEntry, Judgement] | None]:
    """Take the shared storage's fill lock, or wait for the process holding it to store
    the key: (whether this process holds it, the fresh entry another one stored)."""
    storage = cache.storage
    deadline = time.monotonic() + cache.lock_timeout
    while True:
        if await storage.fill_lock(key, cache.lock_timeout + 1.0):
            return True, None
        if time.monotonic() >= deadline:
            return False, None
        await asyncio.sleep(SHARED_POLL_INTERVAL)
        found, _ = await _lookup(session, ctx, cache, key)
        if found is not None and found.complete:
            j = await _judge(session, ctx, cache, found, request_cc, pragma)
            if j.verdict == "fresh":
                return False, (found, j)


def _status_value(cache: HttpCache, **params: Any) -> bytes:
    return cache_status(cache.name, **params)


async def _fetch(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    key: bytes,
    stale: CacheEntry | None,
    judgement: Judgement | None,
    miss: str,
    fill: _Fill,
    collapsed: bool,
) -> None:
    """Go upstream for the key (conditionally when ``stale`` is set), store what may be
    stored, and answer the client; ``fill`` is released as soon as that is known."""
    engine = _engine()
    req = session.req_header
    try:
        if stale is not None:
            meta = stale.meta
            fields = {n.lower(): v for n, v in meta.headers}
            session._up_validators = conditional_headers(
                fields.get(b"etag"), fields.get(b"last-modified")
            )
        else:
            session._up_validators = []
            await _call(session, "cache_miss", ctx)
        if req.raw_method == b"HEAD":
            session._up_method = b"GET"  # (fetch the body, to store it)
        session._send_continue()
        request_time = time.time()
        try:
            peer = await engine.upstream_head(session, ctx)
        except ProxyError as failure:
            if stale is not None and await _call(session, "should_serve_stale", ctx, failure):
                fill.release(LockOutcome.FAILED)
                engine._abandon_upstream(session, failure)
                session._error = None
                try:
                    await _serve_stale_on_error(session, ctx, cache, stale, judgement, None)
                except _Vanished:
                    raise failure from None
                return
            raise
        assert peer is not None  # (GET and HEAD never tunnel)
        resp = session._up_resp
        assert resp is not None
        response_time = time.time()
        status = resp.status
        if stale is not None and status in _ERROR_STATUSES:
            err = ProxyError(
                ErrorKind.INVALID_RESPONSE, ErrorSource.UPSTREAM, f"origin answered {status}"
            )
            if await _call(session, "should_serve_stale", ctx, err):
                fill.release(LockOutcome.FAILED)
                up = session._up
                session._up = None
                if up is not None:
                    up.abort()  # (its body is not wanted)
                try:
                    await _serve_stale_on_error(session, ctx, cache, stale, judgement, status)
                except _Vanished:
                    raise err from None
                return
        if stale is not None and status == 304:
            await engine.upstream_response_hooks(session, ctx, resp)
            updated = await _refreshed(cache, stale, resp, request_time, response_time)
            fill.release(LockOutcome.DONE, stale)
            j = cache.judge(updated, *cache.request_cc(req.headers.get_all))
            session.cache_judgement = j
            try:
                await _serve_hit(
                    session, ctx, cache, stale, updated, j, "REVALIDATED",
                    fwd=_why_forward(judgement),
                    fwd_status=304,
                )
            except _Vanished:  # (evicted or purged since: fetch it whole)
                session._reset_attempt()
                await _fetch(session, ctx, cache, key, None, None, "uri-miss", fill, collapsed)
            return
        await engine.upstream_response_hooks(session, ctx, resp)
        writer = None
        if status != 101:
            lifetime = await _call(session, "response_cache_filter", resp, ctx)
            if lifetime is not None:
                writer = await _begin_store(
                    session, ctx, cache, key, resp, float(lifetime), request_time,
                    response_time,
                )
        if writer is not None:
            fill.release(LockOutcome.DONE, writer.entry, keep_shared=True)
        else:
            fill.release(LockOutcome.FAILED)
            if (
                200 <= status < 400
                and _why_forward(judgement) != "request"
                and _uncacheable(cache, resp)
            ):
                # the response forbids storing whoever asks (not because of this
                # request's directives, cookie or credentials): what is stored is
                # outdated, and the next requests go straight through for a while
                await cache.purge_key(key)
                if not cache.vary_of(resp.headers.items()):
                    cache.pass_for(key)
        if stale is not None:
            session.cache_status = "EXPIRED"
            fwd = _why_forward(judgement)
        else:
            session.cache_status = "MISS"
            fwd = "request" if judgement is not None else miss or "miss"
        cache.count(session.cache_status.lower())
        if cache.status_header:
            resp.headers.add(
                b"Cache-Status",
                _status_value(
                    cache, fwd=fwd, fwd_status=status,
                    stored=writer is not None and writer.stored,
                    collapsed=collapsed,
                ),
            )
        if writer is not None and b"range" in req.headers and writer.stored:
            await _serve_range_from_fill(session, ctx, cache, writer, resp)
            return
        await engine.deliver_upstream_response(session, ctx, peer, resp)
    finally:
        fill.release(LockOutcome.FAILED)
        session._abort_fill()  # (a fill still open here did not complete)
        session._up_validators = None
        session._up_method = None


def _why_forward(judgement: Judgement | None) -> str:
    """Cache-Status ``fwd`` of a stored response that was revalidated: ``stale``, or
    ``request`` when it was fresh but the request (or ``cache_hit_filter``) would not
    take it unvalidated (RFC 9211 §2.2)."""
    if judgement is not None and judgement.ttl > 0:
        return "request"
    return "stale"


def _uncacheable(cache: HttpCache, resp: ResponseHeader) -> bool:
    """Whether the response forbids storing it whoever asks: no-store, private,
    ``Vary: *``, no freshness nor validators... — a Set-Cookie does not count (an origin
    may set one for some clients only)."""
    return (
        cache.decide(
            method=b"GET",
            status=resp.status,
            headers=[p for p in resp.headers.items() if p[0].lower() != b"set-cookie"],
            request_cc=_NO_DIRECTIVES,
            authorization=False,
        )
        is None
    )


async def _begin_store(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    key: bytes,
    resp: ResponseHeader,
    lifetime: float,
    request_time: float,
    response_time: float,
) -> CacheWriter | None:
    """Start storing the upstream response and tee its body into storage."""
    storage = cache.storage
    headers = resp.headers.items()
    fields = cache.vary_of(headers)
    if fields is None:
        return None
    store_key = key
    variant = b""
    if fields:
        proxy: Any = session._proxy
        variant = proxy.cache_vary_filter(session, fields, ctx)
        store_key = cache.variant_key(key, variant)
    meta = cache.meta_for(
        status=resp.status,
        headers=headers,
        lifetime=lifetime,
        variant=variant,
        request_time=request_time,
        response_time=response_time,
    )
    if fields:
        marker = CacheMeta(0, [], vary=fields, keep_for=meta.keep_for)
        marker_writer = await storage.begin(key, marker)
        marker_writer.finish()
    writer = await storage.begin(store_key, meta)
    for piece in session._pending:  # (body that came with the head)
        writer.write(piece)
    if session._up_ended:
        writer.finish()
    else:
        session._cache_fill = writer
    return writer


async def _refreshed(
    cache: HttpCache,
    stale: CacheEntry,
    not_modified: ResponseHeader,
    request_time: float,
    response_time: float,
) -> CacheMeta:
    """The stored metadata updated by a 304 (RFC 9111 §4.3.4), saved to storage."""
    old = stale.meta
    merged = merge_not_modified(old.headers, not_modified.headers.items())
    age = [pair for pair in merged if pair[0].lower() == b"age"]
    # (what the 304 carries is stored by the same rules as a full response: never
    # Set-Cookie, nor private="F" / no-cache="F" fields; its Age is kept for the age)
    headers = cache.storable_fields(merged) + age[-1:]
    updated = CacheMeta(
        old.status,
        headers,
        stored_at=response_time,
        request_time=request_time,
        response_time=response_time,
        vary=old.vary,
        variant=old.variant,
        length=old.length,
        tags=old.tags,
        keep_for=old.keep_for,
    )
    lifetime = cache.relifetime(updated)
    updated.fresh_for = lifetime if lifetime is not None else 0.0
    if await cache.storage.update_meta(stale.key, updated):
        stale.meta = updated
    return updated


async def _serve_updating(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    key: bytes,
    entry: CacheEntry,
    judgement: Judgement,
) -> None:
    """Serve a stale entry at once and refresh it in the background (once per key)."""
    lock = cache.lock.try_lock(key)
    if lock is not None:  # (else a refresh or fetch of the key is running already)
        try:
            peer, request = await _refresh_request(session, ctx, entry)
        except Exception:  # noqa: BLE001 - no refresh now; the stale answer still goes out
            log.warning("cannot start a background refresh of %r", key, exc_info=True)
            cache.lock.release(lock, LockOutcome.FAILED)
        else:
            task = session._down.loop.create_task(
                _refresh(session, ctx, cache, key, entry, lock, peer, request)
            )
            _refreshes.add(task)
            task.add_done_callback(_refreshes.discard)
    await _serve_hit(session, ctx, cache, entry, entry.meta, judgement, "UPDATING")


async def _refresh_request(
    session: Session, ctx: Any, entry: CacheEntry
) -> tuple[HttpPeer, Any]:
    """Choose the peer and build the conditional GET of a background refresh, with the
    hooks of the request that started it."""
    engine = _engine()
    fields = {n.lower(): v for n, v in entry.meta.headers}
    session._up_validators = conditional_headers(
        fields.get(b"etag"), fields.get(b"last-modified")
    )
    session._up_method = b"GET"
    try:
        peer = await _call(session, "upstream_peer", ctx)
        request = engine.build_upstream_request(session)
        if session._plan.upstream_request_filter:
            await _call(session, "upstream_request_filter", request, ctx)
    finally:
        session._up_validators = None
        session._up_method = None
    return peer, request


async def _refresh(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    key: bytes,
    stale: CacheEntry,
    permit: WritePermit,
    peer: HttpPeer,
    request: Any,
) -> None:
    """The background refresh of a stale entry; holds the cache lock for ``key``."""
    outcome = LockOutcome.FAILED
    connector = session._plan.connector
    writer: CacheWriter | None = None
    fetch: UpstreamFetch | None = None
    try:
        up = connector.get_idle(peer)
        if up is None:
            up = await connector.connect(peer)
        fetch = UpstreamFetch(session._down.loop, up)
        up.start(fetch, b"GET", peer.read_timeout)
        if up.multiplexed:
            up.send_head(request, True)
        else:
            up.writelines([request.to_bytes()])
        request_time = time.time()
        head = await fetch.head()
        response_time = time.time()
        engine = _engine()
        engine.prepare_downstream_response(session, head)  # (hop-by-hop fields out)
        proxy: Any = session._proxy
        if session._plan.upstream_response_filter:
            await _call(session, "upstream_response_filter", head, ctx)
        if head.status == 304:
            await _refreshed(cache, stale, head, request_time, response_time)
            outcome = LockOutcome.DONE
            cache.count("refreshed")
            return
        lifetime = None
        if head.status not in _ERROR_STATUSES:
            lifetime = await _call(session, "response_cache_filter", head, ctx)
        fields = cache.vary_of(head.headers.items())
        if lifetime is None or fields is None:
            return
        store_key = key
        variant = b""
        if fields:
            variant = proxy.cache_vary_filter(session, fields, ctx)
            store_key = cache.variant_key(key, variant)
        meta = cache.meta_for(
            status=head.status,
            headers=head.headers.items(),
            lifetime=float(lifetime),
            variant=variant,
            request_time=request_time,
            response_time=response_time,
        )
        if fields and stale.meta.vary != fields:  # (the marker names the fields)
            marker = CacheMeta(0, [], vary=fields, keep_for=meta.keep_for)
            marker_writer = await cache.storage.begin(key, marker)
            marker_writer.finish()
        writer = await cache.storage.begin(store_key, meta)
        fetch.take_body(writer.write)
        await fetch.done()
        writer.finish()
        writer = None
        outcome = LockOutcome.DONE
        cache.count("refreshed")
    except BaseException as exc:  # a failed refresh leaves the stale entry
        if writer is not None:
            writer.abort()
        if not isinstance(exc, Exception):
            raise  # (cancelled: the worker stops)
        log.info("background refresh of %r failed: %r", key, exc)
    finally:
        if fetch is not None and not fetch.ended:
            fetch.discard()  # (nothing more of its body is wanted, nor kept)
        cache.lock.release(permit, outcome)


async def _serve_stale_on_error(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    stale: CacheEntry,
    judgement: Judgement | None,
    status: int | None,
) -> None:
    session._up_resp = None
    session._up_ended = False
    session._pending = []
    session._error = None
    j = judgement if judgement is not None else cache.judge(stale.meta, *cache.request_cc(
        session.req_header.headers.get_all))
    await _serve_hit(
        session, ctx, cache, stale, stale.meta, j, "STALE", fwd="stale", fwd_status=status,
        detail="stale-if-error",
    )


async def _serve_hit(
    session: Session,
    ctx: Any,
    cache: HttpCache,
    entry: CacheEntry,
    meta: CacheMeta,
    judgement: Judgement,
    result: str,
    *,
    fwd: str | None = None,
    fwd_status: int | None = None,
    collapsed: bool = False,
    detail: str | None = None,
) -> None:
    """Answer the client from a stored entry (raises :class:`_Vanished`, having sent
    nothing, when the entry cannot be read any more)."""
    req = session.req_header
    status_value = None
    if cache.status_header:
        params: dict[str, Any] = {"ttl": judgement.ttl, "collapsed": collapsed}
        if fwd is None:
            params["hit"] = True
        else:
            params["fwd"] = fwd
            params["fwd_status"] = fwd_status
        if detail is not None:
            params["detail"] = detail
        elif result == "UPDATING":
            params["detail"] = "stale-while-revalidate"
        status_value = _status_value(cache, **params)
    size = entry.size if entry.complete else None
    resp = hit_head(meta, size, judgement.age, status_value)
    reader = _BodyReader()
    not_modified = meta.status == 200 and _not_modified(req.headers, meta.headers)
    plain = (
        req.raw_method != b"HEAD"
        and meta.status not in (204, 304)
        and not not_modified
        and not (b"range" in req.headers and meta.status == 200)
    )
    if plain:
        await reader.open(entry)  # (raises _Vanished: nothing was sent yet)
    session.cache_status = result
    cache.count(result.lower())
    if not_modified:
        kept = [(n, v) for n, v in resp.headers.items()
                if n.lower() in _NOT_MODIFIED_FIELDS or n in (b"Age", b"Cache-Status")]
        resp = ResponseHeader(304, Headers._wrap(kept))
        await _send_head(session, ctx, resp, 0)
        session._finish_response()
        return
    range_value = req.headers.get(b"range")
    if (
        range_value is not None
        and meta.status == 200
        and req.raw_method == b"GET"
        and if_range_matches(req.headers.get(b"if-range"), _field(meta, b"etag"),
                             _field(meta, b"last-modified"))
    ):
        if size is None:
            try:
                body = await entry.read()  # (a range of an entry still streaming in)
            except CacheWriteAborted as exc:
                raise _Vanished(str(exc)) from None
            size = len(body)
        ranges = parse_range(range_value, size)
        if ranges is not None:
            await _send_ranges(session, ctx, resp, entry, ranges, size)
            return
    if not plain and req.raw_method != b"HEAD" and meta.status not in (204, 304):
        await reader.open(entry)  # (a Range not applied: the whole body after all)
    try:
        await _send_head(session, ctx, resp, size)
    except BaseException:
        reader.close()
        raise
    await _send_entry_body(session, entry, reader)


def _field(meta: CacheMeta, name: bytes) -> bytes | None:
    for n, v in meta.headers:
        if n.lower() == name:
            return v
    return None


def _not_modified(request: Headers, stored: list[tuple[bytes, bytes]]) -> bool:
    """Whether the client's own conditionals say it has the stored response (RFC 9110
    §13.1.2, §13.1.3; If-None-Match takes precedence)."""
    inm = request.get_all(b"if-none-match")
    if inm:
        etag = None
        for n, v in stored:
            if n.lower() == b"etag":
                etag = v.strip()
        if etag is None:
            return False
        weak = etag[2:] if etag.startswith(b"W/") else etag
        for value in inm:
            for tag in value.split(b","):
                tag = tag.strip()
                if tag == b"*" or (tag[2:] if tag.startswith(b"W/") else tag) == weak:
                    return True
        return False
    ims = request.get(b"if-modified-since")
    if ims is None:
        return False
    from ferryman.cache.policy import http_date

    since = http_date(ims)
    last_modified = None
    for n, v in stored:
        if n.lower() == b"last-modified":
            last_modified = http_date(v)
    return since is not None and last_modified is not None and last_modified <= since


async def _send_head(
    session: Session, ctx: Any, resp: ResponseHeader, length: int | None
) -> None:
    """``response_filter``, then the head (bodies framed by ``length`` or chunked)."""
    proxy: Any = session._proxy
    if session._plan.response_filter:
        await _call(session, "response_filter", resp, ctx)
    session._from_hook = False  # (response_body_filter applies to cached bodies too)
    kind = BODY_LENGTH if b"content-length" in resp.headers else BODY_CHUNKED
    session._trust_length = kind == BODY_LENGTH and "response_body_filter" not in proxy.overridden
    session._write_head(resp, kind)


async def _send_entry_body(session: Session, entry: CacheEntry, reader: _BodyReader) -> None:
    """Stream an entry's body (opened by ``reader``, or not at all for a HEAD) to the
    client, as fast as it reads."""
    if session._done or session._head_only:
        reader.close()
        if not session._done:
            session._finish_response()
        return
    if reader.source is not None:
        source, reader.source = reader.source, None
        session.send_body_from(source)
        if not session._done:
            await _wait_end(session)
        return
    if reader.first:
        session._write_body(reader.first)
    chunks, reader.chunks = reader.chunks, None
    if chunks is not None:
        try:
            await session._drain()
            async for chunk in chunks:
                session._write_body(chunk)
                if session._error is not None:
                    raise session._error
                await session._drain()
        except CacheWriteAborted as exc:
            session.keep_alive = False
            raise ProxyError(
                ErrorKind.INTERNAL, ErrorSource.INTERNAL,
                "the stored response broke off", cause=exc,
            ) from None
        finally:
            await chunks.aclose()
    session._finish_response()


async def _wait_end(session: Session) -> None:
    from ferryman.proxy.session import _WAIT_END

    await session._wait(_WAIT_END)


async def _send_ranges(
    session: Session,
    ctx: Any,
    resp: ResponseHeader,
    entry: CacheEntry,
    ranges: list[tuple[int, int]],
    size: int,
) -> None:
    """A 206 (or 416) built from a complete stored body."""
    headers = resp.headers
    if not ranges:
        kept = [(n, v) for n, v in headers.items()
                if n.lower() not in (b"content-length", b"content-type")]
        out = ResponseHeader(416, Headers._wrap(kept))
        out.headers.set(b"Content-Range", b"bytes */%d" % size)
        out.headers.set(b"Content-Length", b"0")
        await _send_head(session, ctx, out, 0)
        session._finish_response()
        return
    out = ResponseHeader(206, Headers._wrap([
        (n, v) for n, v in headers.items() if n.lower() not in (b"content-length",)
    ]))
    if len(ranges) == 1:
        first, last = ranges[0]
        parts = [(b"", first, last)]
        closing = b""
        out.headers.set(b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))
    else:
        boundary = os.urandom(12).hex().encode()
        content_type = headers.get(b"content-type") or b"application/octet-stream"
        parts, closing = multipart_parts(ranges, size, content_type, boundary)
        out.headers.remove(b"content-type")
        out.headers.set(b"Content-Type", b"multipart/byteranges; boundary=" + boundary)
    length = sum(len(head) + last + 1 - first for head, first, last in parts) + len(closing)
    out.headers.set(b"Content-Length", str(length))
    probe = entry.open_source()
    if probe is not None:  # (complete and readable without waiting)
        probe.close()
        source: Any = _RangesSource(entry, parts, closing)
    else:
        try:
            body = await entry.read()
        except CacheWriteAborted as exc:
            raise _Vanished(str(exc)) from None
        source = ChunkSource(
            [piece for head, first, last in parts for piece in (head, body[first : last + 1])]
            + [closing]
        )
    await _send_head(session, ctx, out, length)
    if session._head_only:
        source.close()
        session._finish_response()
        return
    session.send_body_from(source)
    if not session._done:
        await _wait_end(session)


class _RangesSource:
    """The body of a 206: each part's head, then its bytes read from a stored entry
    (each from a reader of its own, skipping to the part's first byte: memory stays
    bounded whatever the entry's size), then the closing delimiter."""

    def __init__(
        self, entry: CacheEntry, parts: list[tuple[bytes, int, int]], closing: bytes
    ) -> None:
        self._entry = entry
        self._parts = list(reversed(parts))
        self._closing = closing
        self._source: Any = None
        self._left = 0

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes of the 206 body; ``b""`` at its end."""
        while True:
            source = self._source
            if source is not None:
                if self._left > 0:
                    data = source.read(min(size, self._left))
                    if data:
                        self._left -= len(data)
                        return data
                    raise OSError("the stored body is shorter than it was")
                source.close()
                self._source = None
            if not self._parts:
                closing, self._closing = self._closing, b""
                return closing
            head, first, last = self._parts.pop()
            source = self._entry.open_source()
            if source is None:
                raise OSError("the stored body can no longer be read")
            try:
                skip = getattr(source, "skip", None)
                skipped = skip(first) if skip is not None else 0
                left = first - skipped
                while left > 0:  # (a source that cannot skip: read up to the range)
                    data = source.read(min(left, 256 * 1024))
                    if not data:
                        raise OSError("the stored body is shorter than it was")
                    left -= len(data)
            except BaseException:
                source.close()
                raise
            self._source = source
            self._left = last + 1 - first
            if head:
                return head

    def close(self) -> None:
        """Close the part being read."""
        source, self._source = self._source, None
        if source is not None:
            source.close()
        self._parts = []


async def _serve_range_from_fill(
    session: Session, ctx: Any, cache: HttpCache, writer: CacheWriter, resp: ResponseHeader
) -> None:
    """A Range request that missed: the whole response is stored, the range is cut
    from it (the upstream body goes to storage only)."""
    session._fill_only = True
    session._pending = []
    entry = writer.entry
    try:
        body = await entry.read()
    except CacheWriteAborted as exc:
        raise ProxyError(
            ErrorKind.UPSTREAM_CLOSED, ErrorSource.UPSTREAM,
            "the upstream response broke off", cause=exc,
        ) from None
    req_headers = session.req_header.headers
    ranges = None
    if if_range_matches(
        req_headers.get(b"if-range"), resp.headers.get(b"etag"),
        resp.headers.get(b"last-modified"),
    ):
        ranges = parse_range(req_headers.get(b"range") or b"", len(body))
    if ranges is None:
        resp.headers.set(b"Content-Length", str(len(body)))
        await _send_head(session, ctx, resp, len(body))
        session._write_body(body)
        session._finish_response()
        return
    await _send_ranges(session, ctx, resp, entry, ranges, len(body))


async def _invalidate(session: Session, ctx: Any, cache: HttpCache) -> None:
    """RFC 9111 §4.4: an unsafe request that succeeded invalidates what is stored for its
    URL and, on the same host, its Location and Content-Location."""
    req = session.req_header
    keys = [await _call(session, "cache_key_callback", ctx)]
    host = req.headers.get(b"host") or b""
    resp = session.response_header
    if resp is not None:
        for name in (b"location", b"content-location"):
            value = resp.headers.get(name)
            if not value:
                continue
            target = _same_host_target(value, host)
            if target is not None:
                keys.append(cache.primary_key(
                    scheme=b"https" if session.is_tls else b"http",
                    method=b"GET",
                    target=target,
                    header=req.headers.get_all,
                ))
    for key in dict.fromkeys(keys):
        await cache.purge_key(key)


def _same_host_target(value: bytes, host: bytes) -> bytes | None:
    """The request target a Location/Content-Location names on ``host``, else None."""
    if value.startswith(b"/") and not value.startswith(b"//"):
        return value
    for scheme in (b"http://", b"https://"):
        if value.lower().startswith(scheme):
            rest = value[len(scheme):]
            authority, slash, path = rest.partition(b"/")
            if authority.lower() == host.lower():
                return b"/" + path if slash else b"/"
    return None


async def _purge(session: Session, ctx: Any, cache: HttpCache) -> None:
    """PURGE: remove the URL's entries (or a prefix's, or tags') for allowed clients."""
    session.cache_status = "PURGE"
    if not cache.purge_allowed(session.client_ip):
        session.send_response(403, b"purge not allowed from this address\n",
                              content_type="text/plain")
        return
    req = session.req_header
    tags = [t for v in req.headers.get_all(b"cache-tag") + req.headers.get_all(b"surrogate-key")
            for t in v.replace(b",", b" ").split()]
    if tags:
        count = 0
        for tag in tags:
            count += await cache.purge_tag(tag)
    elif req.raw_path.endswith(b"*"):
        scheme = "https" if session.is_tls else "http"
        host = (req.headers.get(b"host") or b"").decode("latin-1")
        try:
            prefix = cache.url_prefix(f"{scheme}://{host}{req.raw_path[:-1].decode('latin-1')}")
        except ValueError as exc:
            session.send_response(400, str(exc) + "\n", content_type="text/plain")
            return
        count = await cache.purge_key_prefix(prefix)
    else:
        count = await cache.purge_key(await _call(session, "cache_key_callback", ctx))
    body = b'{"purged": %d}\n' % count
    # (with a purge log the other workers' entries are purged too, uncounted here)
    found = count or cache.shares_purges
    session.send_response(200 if found else 404, body, content_type="application/json")
