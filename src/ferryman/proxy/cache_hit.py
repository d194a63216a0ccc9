"""A fresh cache hit answered at once, in the protocol callback that parsed the request.

:func:`serve_hit_now` is the cache phase's fast path (see
:mod:`ferryman.proxy.cache_flow` for the whole of it): when nothing has to wait — a GET
or HEAD without Range or conditionals, a storage whose index is in process memory, a
complete and fresh entry, the hooks involved plain functions — the response is written
without a task or a coroutine, head and a small body in one write. Anything else goes the
full way. Compiled with mypyc, as the rest of the per-request path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from ferryman.protocols.h1 import BODY_CHUNKED, BODY_LENGTH
from ferryman.protocols.headers import Headers, ResponseHeader

if TYPE_CHECKING:
    from ferryman.proxy.session import Session

#: A fresh hit up to this size is written with its head in one write; a larger one is
#: pumped as fast as the client reads.
SMALL_BODY: Final = 256 * 1024


def serve_hit_now(session: Session, ctx: Any, cache: Any) -> bool:
    """Answer a fresh hit at once (see the module docstring). False: nothing was sent,
    the request needs the full cache phase (:func:`ferryman.proxy.cache_flow.serve`)."""
    req = session.req_header
    method = req.raw_method
    if method != b"GET" and method != b"HEAD":
        return False
    log: Any = cache._purge_log
    if log is not None and log.sequence != cache._seen:
        return False  # (other workers' purges to apply first: the full way waits for it)
    headers = req.headers
    if b"range" in headers or b"if-none-match" in headers or b"if-modified-since" in headers:
        return False
    proxy: Any = session._proxy
    hooks: frozenset[str] = proxy.overridden
    async_hooks: frozenset[str] = proxy.async_hooks
    key: Any
    if "cache_key_callback" in hooks:
        if "cache_key_callback" in async_hooks:
            return False
        key = proxy.cache_key_callback(session, ctx)
    else:
        scheme = b"https" if session._down.tls_info is not None else b"http"
        key = cache.fast_key(scheme, req.raw_path, headers.get(b"host"))
        if key is None:
            key = cache.primary_key(
                scheme=scheme, method=method, target=req.raw_path, header=headers.get_all
            )
    storage: Any = cache.storage
    entry: Any = storage.lookup_nowait(key)
    if entry is None or not entry.complete:
        return False
    meta: Any = entry.meta
    if meta.status == 0:  # a Vary marker
        fields = meta.vary
        if not fields:
            return False
        variant = proxy.cache_vary_filter(session, fields, ctx)
        entry = storage.lookup_nowait(cache.variant_key(key, variant))
        if entry is None or not entry.complete or entry.meta.variant != variant:
            return False
        meta = entry.meta
    request_cc, pragma = cache.request_cc(headers.get_all)
    judgement: Any = cache.judge(meta, request_cc, pragma)
    if judgement.verdict != "fresh":
        return False
    if "cache_hit_filter" in hooks:
        if "cache_hit_filter" in async_hooks or proxy.cache_hit_filter(session, meta, ctx):
            return False
    plan = session._plan
    if plan.response_filter and "response_filter" in async_hooks:
        return False  # (it must be awaited: the full way)
    source: Any = entry.open_source()
    if source is None:
        return False
    session.cache_judgement = judgement
    session.cache_status = "HIT"
    cache.count("hit")
    size: int = entry.size
    resp = hit_head(
        meta, size, judgement.age,
        cache.hit_status(judgement.ttl) if cache.status_header else None,
    )
    if plan.response_filter:
        try:
            proxy.response_filter(session, resp, ctx)  # (a plain function: checked above)
        except BaseException:
            source.close()
            raise
    session._from_hook = False
    session._trust_length = not plan.response_body_filter
    down = session._down
    down.cork()
    try:
        session._write_head(
            resp, BODY_LENGTH if b"content-length" in resp.headers else BODY_CHUNKED
        )
        if session._head_only:
            source.close()
            session._finish_response()
        elif size <= SMALL_BODY:
            while True:
                piece: bytes = source.read(SMALL_BODY)
                if not piece:
                    break
                session._write_body(piece)
            source.close()
            session._finish_response()
        else:
            session.send_body_from(source)
    finally:
        down.uncork()
    return True


def hit_head(
    meta: Any, size: int | None, age: float, cache_status: bytes | None
) -> ResponseHeader:
    """The head of a response served from a stored entry (``meta``, judged by
    :meth:`~ferryman.cache.http_cache.HttpCache.judge`, which parsed its fields once):
    the stored fields less Age and Content-Length, then Content-Length (``size``, or the
    stored length while the body is still coming in; never for a 204, RFC 9110 §8.6),
    Age and ``cache_status``."""
    out: list[tuple[bytes, bytes]] = list(meta.parsed.base)
    length = size if size is not None else meta.length
    if length is not None and meta.status != 204:
        out.append((b"Content-Length", b"%d" % length))
    out.append((b"Age", b"%d" % int(age) if age > 0.0 else b"0"))
    if cache_status is not None:
        out.append((b"Cache-Status", cache_status))
    return ResponseHeader(meta.status, Headers._wrap(out))
