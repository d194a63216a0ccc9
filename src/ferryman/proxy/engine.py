"""The per-request engine: the hook pipeline and the retry loop for one Session.

The pipeline (hook order, retries, error handling) exists in two forms that share every
helper below:

* **sync mode** – when every hook the proxy class overrides is a plain function (the
  built-in config proxy, and any proxy whose hooks never wait), a request is a small state
  machine advanced by the protocol callbacks: :func:`begin` runs the request hooks and
  sends the request upstream, and :func:`step` acts on each upstream event right inside
  the callback that saw it. No task, no coroutine, no event-loop hop. Opening a new
  upstream connection is the one wait; it runs in a short task that then continues the
  state machine.
* **task mode** – when any overridden hook is ``async def``, :func:`run_session` runs the
  same pipeline as one asyncio task, so hooks have a current task (``asyncio.timeout``
  and friends work).

Hooks the proxy class did not override are never called.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, internal_error, status_for
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_NONE
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.proxy import cache_flow as _cache_flow
from ferryman.proxy import session as _session_module
from ferryman.proxy.cache_hit import serve_hit_now
from ferryman.proxy.session import (
    _WAIT_END,
    _WAIT_HEAD,
    Session,
    new_request_id,
    usable_request_id,
)

if TYPE_CHECKING:
    from ferryman.upstream.connection import UpstreamChannel
    from ferryman.upstream.peer import HttpPeer

log = logging.getLogger("ferryman.engine")

#: Headers that describe one connection only; never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP: Final = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    )
)
#: bit n set: some hop-by-hop name is n bytes long (most headers are skipped by length)
_HOP_LENS: Final = sum({1 << len(n) for n in HOP_BY_HOP})
_REQ_SPECIAL: Final = HOP_BY_HOP | {
    b"expect",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
    b"x-request-id",
}
_REQ_LENS: Final = sum({1 << len(n) for n in _REQ_SPECIAL})
#: Fields a cache fetch replaces with its own (RFC 9111 §4.3.1: the cache validates
#: what it stored, and fetches whole responses).
_CLIENT_CONDITIONALS: Final = frozenset(
    (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
     b"if-range", b"range")
)
#: Methods whose request may be sent again after a failure (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# sync-mode phases
_PH_BUSY: Final = 0  #: pipeline code is running; events are examined when it returns
_PH_CONNECTING: Final = 1  #: a task is opening the upstream connection
_PH_WAIT_HEAD: Final = 2  #: request sent, waiting for the response head
_PH_STREAMING: Final = 3  #: response head sent, body flowing
_PH_TUNNEL: Final = 4  #: bytes spliced both ways
_PH_DONE: Final = 5


def _method_not_allowed() -> ProxyError:
    return ProxyError(ErrorKind.METHOD_NOT_ALLOWED, ErrorSource.DOWNSTREAM, "CONNECT not allowed")


def start_session(session: Session) -> None:
    """Begin processing ``session``: sync mode when its proxy allows it, else a task."""
    if session._plan.any_async:
        session._down.loop.create_task(run_session(session))
    else:
        session._sync = True
        begin(session)


# --------------------------------------------------------------------------------------
# headers


_NOT_HEADER_TOKENS: Final = HOP_BY_HOP | {b"close"}


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


def _connection_tokens(value: bytes) -> set[bytes] | frozenset[bytes]:
    """Header names listed in a Connection value, minus those dropped anyway."""
    if value.lower() in _NOT_HEADER_TOKENS:
        return _NO_TOKENS  # "keep-alive" / "close" / "upgrade": the common cases
    tokens = {t.strip().lower() for t in value.split(b",")}
    tokens -= _NOT_HEADER_TOKENS
    tokens.discard(b"")
    return tokens


def build_upstream_request(session: Session) -> RequestHeader:
    """The request head to send upstream: the client's minus hop-by-hop, plus forwarding."""
    req = session.req_header
    down = session._down
    options = session._plan
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | frozenset[bytes] | None = None
    xff: bytes | None = None
    via: bytes | None = None
    host: bytes | None = None
    given_id: bytes | None = None
    for pair in req.headers._items:
        name = pair[0]
        if (_REQ_LENS >> len(name)) & 1:
            lname = name.lower()
            if lname in _REQ_SPECIAL:
                if lname == b"host":
                    host = pair[1]
                elif lname == b"connection":
                    named = _connection_tokens(pair[1]) | (named or set())
                    continue
                elif lname in HOP_BY_HOP or lname == b"expect":
                    continue
                elif lname == b"x-forwarded-for":
                    if options.x_forwarded_for:
                        xff = pair[1] if xff is None else xff + b", " + pair[1]
                        continue
                elif lname == b"x-forwarded-proto":
                    if options.x_forwarded_proto:
                        continue
                elif lname == b"x-forwarded-host":
                    if options.x_forwarded_host:
                        continue
                elif lname == b"via" and options.via:
                    via = pair[1] if via is None else via + b", " + pair[1]
                    continue
                elif lname == b"x-request-id" and options.request_id:
                    if given_id is None:  # (the first, as Headers.get gives hooks)
                        given_id = pair[1]
                    continue  # (re-added below: the client's when usable, else ours)
        out.append(pair)
    if named:
        out = [p for p in out if p[0].lower() not in named]
    if session._upgrade:
        upgrade = req.headers.get(b"upgrade")
        if upgrade is not None:
            out.append((b"Connection", b"upgrade"))
            out.append((b"Upgrade", upgrade))
    if options.x_forwarded_for:
        ip = down.peer_ip()
        if ip:
            out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    if options.x_forwarded_proto:
        out.append((b"X-Forwarded-Proto", b"https" if down.tls_info is not None else b"http"))
    if options.x_forwarded_host and host is not None:
        out.append((b"X-Forwarded-Host", host))
    if host is None:  # an HTTP/1.0 request may lack Host; HTTP/1.1 upstream needs one
        peer = session.peer
        if peer is not None:
            out.append((b"Host", peer.name.encode()))
    if options.via:
        mine = options.via_value
        out.append((b"Via", via + b", " + mine if via else mine))
    if options.request_id:
        rid = session._request_id
        if rid is None:  # (no hook asked for it yet)
            if given_id is not None and usable_request_id(given_id):
                rid = given_id
            else:
                rid = new_request_id()
            session._request_id = rid
        out.append((b"X-Request-Id", rid))
    body_kind = session._body_kind
    up = session._up
    if up is not None and up.multiplexed:
        # HTTP/2 frames the body itself; what the client's TE offered is kept for it
        # (gRPC needs "te: trailers" to reach its server)
        session._up_chunked = False
        te = req.headers.get(b"te")
        if te is not None and b"trailers" in te.lower():
            out.append((b"te", b"trailers"))
        if session._body_filter:
            out = [p for p in out if p[0].lower() != b"content-length"]
    elif body_kind != BODY_NONE and (body_kind == BODY_CHUNKED or session._body_filter):
        out = [p for p in out if p[0].lower() != b"content-length"]
        out.append((b"Transfer-Encoding", b"chunked"))
        session._up_chunked = True
    else:
        session._up_chunked = False
    validators = session._up_validators
    if validators is not None:  # a cache fetch: its own conditionals, never a Range
        out = [p for p in out if p[0].lower() not in _CLIENT_CONDITIONALS] + validators
    method = session._up_method
    return RequestHeader(
        req.raw_method if method is None else method, req.raw_path, Headers._wrap(out), "1.1"
    )


def prepare_downstream_response(session: Session, resp: ResponseHeader) -> None:
    """Strip hop-by-hop headers from an upstream response; add Via if configured."""
    if resp.status == 101 and not session._upgrade:
        raise ProxyError(
            ErrorKind.INVALID_RESPONSE,
            ErrorSource.UPSTREAM,
            "upstream switched protocols although the client asked for no upgrade",
        )
    headers = resp.headers
    items = headers._items
    named: set[bytes] | frozenset[bytes] | None = None
    upgrade: bytes | None = None
    for pair in items:
        if (_HOP_LENS >> len(pair[0])) & 1:
            break
    else:
        items = None  # type: ignore[assignment]  # nothing to strip: the common case
    if items is not None:
        out = []
        for pair in items:
            name = pair[0]
            if (_HOP_LENS >> len(name)) & 1:
                lname = name.lower()
                if lname == b"connection":
                    named = _connection_tokens(pair[1]) | (named or set())
                    continue
                if lname in HOP_BY_HOP:
                    if lname == b"upgrade":
                        upgrade = pair[1]
                    continue
            out.append(pair)
        if named:
            out = [p for p in out if p[0].lower() not in named]
        if resp.status == 101 and upgrade is not None:
            out.append((b"Upgrade", upgrade))
        headers._items = out
        headers._index = None
    plan = session._plan
    if plan.via:
        mine = plan.via_value
        prior = headers.get(b"via")
        headers.set(b"Via", prior + b", " + mine if prior else mine)


# --------------------------------------------------------------------------------------
# sync mode


def begin(session: Session) -> None:
    """Sync mode: request hooks, then choose the peer and send the request."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    session._phase = _PH_BUSY
    try:
        ctx = session.ctx = proxy.new_ctx() if plan.new_ctx else {}
        if session._error is not None:  # its body was malformed before it started
            raise session._error
        if plan.early_request_filter or plan.request_filter:
            if plan.early_request_filter:
                proxy.early_request_filter(session, ctx)
            if plan.request_filter and proxy.request_filter(session, ctx):
                if session._error is not None:
                    raise session._error  # e.g. a body source failed while it was sent
                if not session._done:
                    if session.response_header is None:
                        raise internal_error("request_filter returned True without a response")
                    if session._source is not None:  # send_body_from: wait for its end
                        session._phase = _PH_STREAMING
                        step(session)
                        return
                    session._finish_response()
                _complete(session, None)
                return
        if session.req_header.raw_method == b"CONNECT":
            if not session.allow_connect:
                raise _method_not_allowed()
        else:
            if plan.request_cache_filter:
                cache = proxy.request_cache_filter(session, ctx)
                if cache is not None:
                    session.cache = cache
                    if serve_hit_now(session, ctx, cache):
                        if session._done:
                            _complete(session, None)
                        else:  # (a large body, pumped as the client reads)
                            session._phase = _PH_STREAMING
                            step(session)
                        return
                    # the cache waits (storage, lock): the rest of the request is a task
                    session._sync = False
                    session._down.loop.create_task(_run_cached(session))
                    return
            session._send_continue()
        _choose_peer(session)
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        _fail_sync(session, as_proxy_error(exc))


async def _run_cached(session: Session) -> None:
    """A sync-mode request that uses a cache, from its cache phase on, as a task."""
    ctx = session.ctx
    error: ProxyError | None = None
    try:
        await _cache_flow.serve(session, ctx)
    except asyncio.CancelledError:
        error = ProxyError(ErrorKind.CLIENT_CLOSED, ErrorSource.DOWNSTREAM, "cancelled")
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        error = as_proxy_error(exc)
    await _end_task(session, error, ctx)


def _choose_peer(session: Session) -> None:
    """Sync mode: ask ``upstream_peer``; use a pooled connection or go connect one."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    peer: HttpPeer = proxy.upstream_peer(session, session.ctx)
    session.peer = peer
    up = session._plan.connector.get_idle(peer)
    if up is None:
        session._phase = _PH_CONNECTING
        session._down.loop.create_task(_connect_then_send(session, peer))
        return
    _send_upstream(session, up, True)


async def _connect_then_send(session: Session, peer: HttpPeer) -> None:
    """Sync mode's one wait: open a connection (with fail_to_connect and retries)."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    connector = plan.connector
    try:
        while True:
            try:
                began = time.monotonic()
                up = await connector.connect(peer)
                session.upstream_connect_time = time.monotonic() - began
                break
            except ProxyError as failure:
                err = failure
                if plan.fail_to_connect:
                    err = proxy.fail_to_connect(session, peer, session.ctx, err)
                if not (err.retryable and session.retries < session.max_retries):
                    raise err from None
                session.retries += 1
                peer = proxy.upstream_peer(session, session.ctx)
                session.peer = peer
                pooled = connector.get_idle(peer)
                if pooled is not None:
                    up = pooled
                    break
        if session._error is not None:  # the client left while we connected
            up.release()
            raise session._error
        session._phase = _PH_BUSY
        _send_upstream(session, up, up.reused)
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        _fail_sync(session, as_proxy_error(exc))


def _send_upstream(session: Session, up: UpstreamChannel, reused: bool) -> None:
    """Sync mode: hooks around the connection, then send head and buffered body."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    ctx = session.ctx
    session._up = up
    session._phase = _PH_BUSY
    session.upstream_reused = reused
    if reused:
        session.upstream_connect_time = 0.0
    try:
        if plan.connected_to_upstream:
            proxy.connected_to_upstream(session, reused, up.peer, ctx)
        if up.multiplexed:
            _check_multiplexable(session)
        if session.req_header.raw_method == b"CONNECT":
            _start_connect_tunnel(session, up)
            session._phase = _PH_TUNNEL
            return
        up_req = build_upstream_request(session)
        if plan.upstream_request_filter:
            proxy.upstream_request_filter(session, up_req, ctx)
        up.start(session, up_req.raw_method, up.peer.read_timeout)
        session._send_request(up, up_req)
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        _fail_sync(session, as_proxy_error(exc))
        return
    session._phase = _PH_WAIT_HEAD
    step(session)  # the answer (or an error) may already be there


def step(session: Session) -> None:
    """Sync mode: act on whatever happened since the last step."""
    phase = session._phase
    if phase == _PH_WAIT_HEAD:
        if session._error is not None:
            _upstream_failed(session, session._error)
        elif session._up_resp is not None:
            _on_head(session)
    elif phase == _PH_STREAMING:
        if session._error is not None:
            err = session._error
            _fail_sync(session, _after_error_hook(session, err))
        elif session._done:
            _complete(session, None)
    elif phase == _PH_TUNNEL:
        if session._done:
            _complete(session, None)


def _upstream_failed(session: Session, error: ProxyError) -> None:
    """Sync mode: an error before the response head; retry or give up."""
    session._phase = _PH_BUSY
    try:
        if error.source is not ErrorSource.UPSTREAM:
            _fail_sync(session, error)
            return
        err = _after_error_hook(session, _replay_policy(session, error))
        if err.retryable and session.retries < session.max_retries and session._replayable:
            session.retries += 1
            session._reset_attempt()
            _choose_peer(session)
            return
        _fail_sync(session, err)
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        _fail_sync(session, as_proxy_error(exc))


def _replay_policy(session: Session, error: ProxyError) -> ProxyError:
    """A reused upstream connection that died before answering makes the error retryable,
    but only for idempotent methods: a POST may have been acted on (as nginx decides).
    A request the upstream refused unprocessed (HTTP/2) may be sent again whatever it is."""
    if (
        error.retryable
        and error.kind is not ErrorKind.UPSTREAM_REFUSED
        and session.req_header.raw_method not in IDEMPOTENT_METHODS
    ):
        error.retryable = False
    return error


def _after_error_hook(session: Session, error: ProxyError) -> ProxyError:
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    peer = session.peer
    if (
        peer is not None
        and session._plan.error_while_proxy
        and error.source is not ErrorSource.DOWNSTREAM
    ):
        return proxy.error_while_proxy(
            session, peer, session.ctx, error, session.downstream_reused
        )
    return error


def _on_head(session: Session) -> None:
    """Sync mode: the response head arrived: response hooks, then send it downstream."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    resp = session._up_resp
    assert resp is not None
    session._phase = _PH_BUSY
    try:
        prepare_downstream_response(session, resp)
        if not plan.trust_length:
            if plan.upstream_response_filter:
                proxy.upstream_response_filter(session, resp, session.ctx)
            if plan.response_filter:
                proxy.response_filter(session, resp, session.ctx)
        if resp.status == 101 and session._upgrade:
            _start_upgrade_tunnel(session, resp)
            session._phase = _PH_TUNNEL
            step(session)
            return
        _send_response_start(session, resp)
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        _fail_sync(session, as_proxy_error(exc))
        return
    session._phase = _PH_STREAMING
    step(session)


def _fail_sync(session: Session, error: ProxyError) -> None:
    """Sync mode: give up on the request (error response unless one started)."""
    session._phase = _PH_BUSY
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    _abandon_upstream(session, error)
    if _cancel_instead(session, error):
        pass
    elif not session._down.closed:
        if session.response_header is None:
            try:
                if session._plan.fail_to_proxy:
                    proxy.fail_to_proxy(session, error, session.ctx)
                else:
                    session.send_error(status_for(error))
            except Exception:  # noqa: BLE001 - a failing fail_to_proxy must not kill the worker
                log.exception("fail_to_proxy failed")
                session.keep_alive = False
                if session.response_header is None:
                    session.send_error(500)
        else:
            session.keep_alive = False  # a truncated response: the client must see EOF
    _complete(session, error)


def _complete(session: Session, error: ProxyError | None) -> None:
    """Sync mode: the request is over; next request, then the logging hook."""
    if session._phase == _PH_DONE:
        return
    session._phase = _PH_DONE
    if not session._done:
        session.keep_alive = False
        session._done = True
    session._down.request_done(session)
    if session._plan.logging:
        proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
        try:
            proxy.logging(session, error, session.ctx)
        except Exception:  # noqa: BLE001 - a logging hook must never break the connection
            log.exception("logging hook failed")
    if session._plan.timed:
        _access_log(session, error)
        if session._plan.metrics is not None:
            _count(session)


# --------------------------------------------------------------------------------------
# shared by both modes


def _access_log(session: Session, error: ProxyError | None) -> None:
    """Add the request's line to its listener's access log, if that listener keeps one."""
    listener = session._down.listener
    if listener is not None and listener.access_log is not None:
        try:
            listener.access_log.record(session, error)
        except Exception:  # noqa: BLE001 - logging must never break the connection
            log.exception("access log failed")


def _count(session: Session) -> None:
    """Add the finished request to the worker's metrics."""
    metrics = session._plan.metrics
    if metrics is None:
        return
    proxy: Any = session._proxy
    try:
        route, upstream = proxy.metric_labels(session, session.ctx)
    except Exception:  # noqa: BLE001 - a failing hook must not lose the count
        log.exception("metric_labels failed")
        route, upstream = "", ""
    listener = session._down.listener
    start = session.start_time
    header_at = session.upstream_header_at
    metrics.record(
        listener.name if listener is not None else "",
        route,
        upstream,
        session.status,
        time.time() - start,
        header_at - start if header_at else -1.0,
        session.request_body_bytes,
        session.response_body_bytes,
        session.upstream_connect_time >= 0.0,
        session.upstream_reused,
        session.retries,
    )
    if session.cache_status:
        metrics.record_cache(route, session.cache_status)
    if session.limit_status:
        metrics.record_limited(route, session.limit_status)


def _hook_error(exc: Exception) -> ProxyError:
    return ProxyError(ErrorKind.HOOK_ERROR, ErrorSource.INTERNAL, repr(exc), cause=exc)


def as_proxy_error(exc: Exception) -> ProxyError:
    """``exc`` itself if it is a ProxyError, else a 500 hook error wrapping it."""
    return exc if isinstance(exc, ProxyError) else _hook_error(exc)


def _abandon_upstream(session: Session, error: ProxyError) -> None:
    up = session._up
    session._up = None
    if up is not None:
        up.abort()
        session._abort_fill()
    session._close_source()
    session._error = error


def _cancel_instead(session: Session, error: ProxyError) -> bool:
    """An upstream that cancelled its stream has an HTTP/2 client's stream cancelled (no
    error response): its client then sees what the upstream said (gRPC: CANCELLED)."""
    if error.kind is ErrorKind.UPSTREAM_CANCELLED and session._down.multiplexed:
        session.keep_alive = False
        return True
    return False


def _send_response_start(session: Session, resp: ResponseHeader) -> None:
    """Send the response head and whatever body already arrived, in one write."""
    down = session._down
    down.cork()
    # the parser framed the body by Content-Length: trust it unless a hook could have
    # removed that header
    session._trust_length = session._plan.trust_length
    session._write_head(resp, session._up_body_kind)
    session._flush_pending()
    down.uncork()


def _check_multiplexable(session: Session) -> None:
    """A CONNECT tunnel needs a connection of its own, not one of an HTTP/2 upstream's
    streams (RFC 8441's extended CONNECT is not offered): 502. An Upgrade offer goes
    without the upgrade, as a plain request, and its answer declines it."""
    if session.req_header.raw_method == b"CONNECT":
        raise ProxyError(
            ErrorKind.UPSTREAM_PROTOCOL,
            ErrorSource.UPSTREAM,
            "cannot tunnel (CONNECT) through an HTTP/2 upstream connection",
        )
    session._upgrade = False


def _start_upgrade_tunnel(session: Session, resp: ResponseHeader) -> None:
    """Forward a 101 and start splicing the two connections."""
    session._tunnel = True
    session.keep_alive = False
    up = session._up
    session._write_head(resp, BODY_NONE)
    down = session._down
    early = session._upgrade_rest + down.start_tunnel(session)
    if up is not None and early:
        up.write(early)
    pending, session._pending = session._pending, []
    for piece in pending:
        session.on_tunnel_data(piece)


def _start_connect_tunnel(session: Session, up: UpstreamChannel) -> None:
    """Answer a permitted CONNECT with 200 and start splicing client and upstream."""
    session._tunnel = True
    session.keep_alive = False
    up.start(session, b"CONNECT", up.peer.read_timeout)
    up.tunnel = True
    down = session._down
    session.response_header = ResponseHeader(200, reason=b"Connection Established")
    down.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    early = session._upgrade_rest + down.start_tunnel(session)
    if early:
        up.write(early)


# --------------------------------------------------------------------------------------
# task mode


async def run_session(session: Session) -> None:
    """Task mode: one request as one task (some hook is ``async def``)."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    async_hooks = proxy.async_hooks
    ctx = session.ctx = proxy.new_ctx() if plan.new_ctx else {}
    error: ProxyError | None = None
    try:
        if session._error is not None:  # its body was malformed before it started
            raise session._error
        if plan.early_request_filter:
            r = proxy.early_request_filter(session, ctx)
            if "early_request_filter" in async_hooks:
                await r
        handled = False
        if plan.request_filter:
            r = proxy.request_filter(session, ctx)
            handled = (await r) if "request_filter" in async_hooks else r
        if not handled:
            if session.req_header.raw_method == b"CONNECT" and not session.allow_connect:
                raise _method_not_allowed()
            cache = None
            if plan.request_cache_filter:
                r = proxy.request_cache_filter(session, ctx)
                cache = (await r) if "request_cache_filter" in async_hooks else r
            if cache is not None:
                session.cache = cache
                if serve_hit_now(session, ctx, cache):
                    if not session._done:
                        await session._wait(_WAIT_END)
                else:
                    await _cache_flow.serve(session, ctx)
            else:
                await _proxy_upstream(session, ctx)
        elif session._error is not None:
            raise session._error  # e.g. a body source failed while it was sent
        elif not session._done:
            if session.response_header is None:
                raise internal_error("request_filter returned True without a response")
            if session._source is not None:  # send_body_from: wait for its end
                await session._wait(_WAIT_END)
            else:
                session._finish_response()
    except asyncio.CancelledError:
        error = ProxyError(ErrorKind.CLIENT_CLOSED, ErrorSource.DOWNSTREAM, "cancelled")
    except Exception as exc:  # noqa: BLE001 - ProxyError, or a hook that raised
        error = as_proxy_error(exc)
    await _end_task(session, error, ctx)


async def _end_task(session: Session, error: ProxyError | None, ctx: Any) -> None:
    """Task mode: the request is over (with ``error``: answer it first); next request,
    then ``logging`` and the logs."""
    if error is not None:
        await _fail_task(session, error, ctx)
    proxy: Any = session._proxy
    plan = session._plan
    if not session._done:
        session.keep_alive = False
        session._done = True
    session._down.request_done(session)
    if plan.logging:
        try:
            r = proxy.logging(session, error, ctx)
            if "logging" in proxy.async_hooks:
                await r
        except Exception:  # noqa: BLE001 - a logging hook must never break the connection
            log.exception("logging hook failed")
    if plan.timed:
        _access_log(session, error)
        if plan.metrics is not None:
            _count(session)


async def _fail_task(session: Session, error: ProxyError, ctx: Any) -> None:
    """Task mode: answer with an error status unless a response started."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    _abandon_upstream(session, error)
    try:
        if session._down.closed or _cancel_instead(session, error):
            pass
        elif session.response_header is None:
            if session._plan.fail_to_proxy:
                r = proxy.fail_to_proxy(session, error, ctx)
                if "fail_to_proxy" in proxy.async_hooks:
                    await r
            else:
                session.send_error(status_for(error))
        else:
            session.keep_alive = False  # a truncated response: the client must see EOF
    except Exception:  # noqa: BLE001 - a failing fail_to_proxy must not kill the worker
        log.exception("fail_to_proxy failed")
        session.keep_alive = False
        if session.response_header is None and not session._down.closed:
            session.send_error(500)


async def _proxy_upstream(session: Session, ctx: Any) -> None:
    peer = await upstream_head(session, ctx)
    if peer is None:
        return  # a CONNECT tunnel, done
    resp = session._up_resp
    assert resp is not None
    await upstream_response_hooks(session, ctx, resp)
    await deliver_upstream_response(session, ctx, peer, resp)


async def upstream_head(session: Session, ctx: Any) -> HttpPeer | None:
    """Task mode: choose a peer, connect, send the request and wait for the response
    head (``session._up_resp``), with ``fail_to_connect``/``error_while_proxy`` and
    retries; the peer that answered. A CONNECT request becomes a tunnel instead, run to
    its end: None."""
    proxy: Any = session._proxy  # hooks may be plain or async: called dynamically
    plan = session._plan
    async_hooks = proxy.async_hooks
    connector = plan.connector
    is_connect = session.req_header.raw_method == b"CONNECT"
    if not is_connect:
        session._send_continue()
    while True:
        r: Any = proxy.upstream_peer(session, ctx)
        peer: HttpPeer = (await r) if "upstream_peer" in async_hooks else r
        session.peer = peer
        up = connector.get_idle(peer)
        reused = up is not None
        if up is None:
            try:
                began = time.monotonic()
                up = await connector.connect(peer)
                session.upstream_connect_time = time.monotonic() - began
            except ProxyError as exc:
                err = exc
                if plan.fail_to_connect:
                    r = proxy.fail_to_connect(session, peer, ctx, err)
                    err = (await r) if "fail_to_connect" in async_hooks else r
                if err.retryable and session.retries < session.max_retries:
                    session.retries += 1
                    continue
                raise err from None
        if session._error is not None:  # the client left while we connected
            up.release()
            raise session._error
        session._up = up
        session.upstream_reused = reused
        if reused:
            session.upstream_connect_time = 0.0
        if plan.connected_to_upstream:
            r = proxy.connected_to_upstream(session, reused, peer, ctx)
            if "connected_to_upstream" in async_hooks:
                await r
        if up.multiplexed:
            _check_multiplexable(session)
        if is_connect:
            _start_connect_tunnel(session, up)
            if not session._done:
                await session._wait(_WAIT_END)
            return None
        up_req = build_upstream_request(session)
        if plan.upstream_request_filter:
            r = proxy.upstream_request_filter(session, up_req, ctx)
            if "upstream_request_filter" in async_hooks:
                await r
        up.start(session, up_req.raw_method, peer.read_timeout)
        session._send_request(up, up_req)
        try:
            if session._error is not None:
                raise session._error
            if session._up_resp is None:
                await session._wait(_WAIT_HEAD)
        except ProxyError as exc:
            err = exc
            if err.source is not ErrorSource.UPSTREAM:
                raise
            err = _replay_policy(session, err)
            if plan.error_while_proxy:
                r = proxy.error_while_proxy(session, peer, ctx, err, session.downstream_reused)
                err = (await r) if "error_while_proxy" in async_hooks else r
            if err.retryable and session.retries < session.max_retries and session._replayable:
                session.retries += 1
                session._reset_attempt()
                continue
            raise err from None
        return peer


async def upstream_response_hooks(session: Session, ctx: Any, resp: ResponseHeader) -> None:
    """Task mode: strip the upstream response's hop-by-hop fields, then
    ``upstream_response_filter``."""
    prepare_downstream_response(session, resp)
    if session._plan.upstream_response_filter:
        proxy: Any = session._proxy
        r = proxy.upstream_response_filter(session, resp, ctx)
        if "upstream_response_filter" in proxy.async_hooks:
            await r


async def deliver_upstream_response(
    session: Session, ctx: Any, peer: HttpPeer, resp: ResponseHeader
) -> None:
    """Task mode: ``response_filter``, then send the upstream response to the client
    (or start a 101 tunnel) and wait until it is complete."""
    proxy: Any = session._proxy
    plan = session._plan
    async_hooks = proxy.async_hooks
    if plan.response_filter:
        r = proxy.response_filter(session, resp, ctx)
        if "response_filter" in async_hooks:
            await r
    if resp.status == 101 and session._upgrade:
        _start_upgrade_tunnel(session, resp)
        if not session._done:
            await session._wait(_WAIT_END)
        return
    _send_response_start(session, resp)
    if not session._done:
        try:
            await session._wait(_WAIT_END)
        except ProxyError as exc:
            err = exc
            if err.source is not ErrorSource.DOWNSTREAM and plan.error_while_proxy:
                r = proxy.error_while_proxy(session, peer, ctx, err, session.downstream_reused)
                err = (await r) if "error_while_proxy" in async_hooks else r
            raise err from None


_session_module._engine.step = step
