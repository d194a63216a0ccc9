"""The per-request engine: the hook pipeline and the retry loop for one Session.

:func:`run_session` is written once, as a coroutine, and run in one of two ways:

* **inline** – when every hook the proxy class overrides is a plain function, the
  coroutine is driven by hand (:func:`drive`) from the protocol callbacks: it runs until
  it must wait for the upstream, parks, and the callback that sees the upstream's answer
  resumes it on the spot. No task, no event-loop hop. If it meets real asynchronous work
  (opening a new upstream connection) it is adopted by an asyncio Task from then on.
* **as a Task** – when any overridden hook is ``async def``, so hooks always run with a
  current task (``asyncio.timeout`` and friends work).

Hooks the proxy class did not override are never called.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, internal_error, status_for
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_NONE
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.proxy import session as _session_module
from ferryman.proxy.session import _WAIT_END, _WAIT_HEAD, Session

if TYPE_CHECKING:
    from ferryman.upstream.connection import UpstreamConnection
    from ferryman.upstream.peer import HttpPeer

log = logging.getLogger("ferryman.engine")

#: Headers that describe one connection only; never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
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
_HOP_LENS = frozenset(len(n) for n in HOP_BY_HOP)
_REQ_SPECIAL = HOP_BY_HOP | {
    b"expect",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
}
_REQ_LENS = frozenset(len(n) for n in _REQ_SPECIAL)
_RESPONSE_HOOKS = frozenset(("upstream_response_filter", "response_filter"))

# --------------------------------------------------------------------------------------
# driving the coroutine


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_PARK = _Signal("park")
_ADOPT = _Signal("adopt")


@types.coroutine
def park() -> Generator[Any, None, None]:
    """Inline mode: suspend until a callback resumes the session."""
    yield _PARK


@types.coroutine
def to_task() -> Generator[Any, None, None]:
    """Inline mode: continue inside an asyncio Task from here on (no-op in a Task)."""
    yield _ADOPT


@types.coroutine
def _adopt(coro: Any, first: Any) -> Generator[Any, Any, Any]:
    """Run a coroutine that was started inline as (the body of) an asyncio Task."""
    value: Any = None
    exc: BaseException | None = None
    if first is not _ADOPT:
        try:
            value = yield first  # the future the coroutine is blocked on
        except BaseException as e:  # noqa: BLE001 - forwarded into the coroutine
            exc = e
    while True:
        try:
            step = coro.throw(exc) if exc is not None else coro.send(value)
        except StopIteration as stop:
            return stop.value
        value, exc = None, None
        if step is _ADOPT:
            continue
        try:
            value = yield step
        except BaseException as e:  # noqa: BLE001 - forwarded into the coroutine
            exc = e


def drive(session: Session) -> None:
    """Advance an inline session's coroutine until it parks, finishes or needs a Task."""
    coro = session._coro
    if coro is None:
        return
    try:
        step = coro.send(None)
    except StopIteration:
        session._coro = None
        return
    except BaseException:  # noqa: BLE001 - run_session handles everything; be safe anyway
        session._coro = None
        log.exception("request engine crashed")
        return
    if step is _PARK:
        session._parked = True
        return
    session._inline = False
    session._coro = None
    session._down.loop.create_task(_adopt(coro, step))


_session_module._engine.drive = drive
_session_module._engine.park = park


def start_session(session: Session) -> None:
    """Begin processing ``session`` (inline when its proxy allows it)."""
    coro = run_session(session)
    if session._proxy.async_hooks:
        session._down.loop.create_task(coro)
    else:
        session._inline = True
        session._coro = coro
        drive(session)


# --------------------------------------------------------------------------------------
# headers


_NOT_HEADER_TOKENS = HOP_BY_HOP | {b"close"}


_NO_TOKENS: frozenset[bytes] = frozenset()


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
    options = down.service.options
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | frozenset[bytes] | None = None
    xff: bytes | None = None
    via: bytes | None = None
    host: bytes | None = None
    for pair in req.headers._items:
        name = pair[0]
        if len(name) in _REQ_LENS:
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
        out.append(pair)
    if named:
        out = [p for p in out if p[0].lower() not in named]
    if session._upgrade:
        upgrade = req.headers.get(b"upgrade")
        if upgrade is not None:
            out.append((b"Connection", b"upgrade"))
            out.append((b"Upgrade", upgrade))
    if options.x_forwarded_for:
        ip = down.client_ip
        if ip:
            out.append((b"X-Forwarded-For", xff + b", " + ip if xff else ip))
    if options.x_forwarded_proto:
        out.append((b"X-Forwarded-Proto", b"https" if down.tls_info is not None else b"http"))
    if options.x_forwarded_host and host is not None:
        out.append((b"X-Forwarded-Host", host))
    if options.via:
        mine = b"1.1 " + options.via_name.encode()
        out.append((b"Via", via + b", " + mine if via else mine))
    body_kind = session._body_kind
    if body_kind != BODY_NONE and (body_kind == BODY_CHUNKED or session._body_filter):
        out = [p for p in out if p[0].lower() != b"content-length"]
        out.append((b"Transfer-Encoding", b"chunked"))
        session._up_chunked = True
    else:
        session._up_chunked = False
    up = RequestHeader.__new__(RequestHeader)
    up.raw_method = req.raw_method
    up.raw_path = req.raw_path
    up.version = "1.1"
    up.headers = Headers._wrap(out)
    return up


def prepare_downstream_response(session: Session, resp: ResponseHeader) -> None:
    """Strip hop-by-hop headers from an upstream response; add Via if configured."""
    headers = resp.headers
    items = headers._items
    named: set[bytes] | frozenset[bytes] | None = None
    upgrade: bytes | None = None
    for pair in items:
        if len(pair[0]) in _HOP_LENS:
            break
    else:
        items = None  # type: ignore[assignment]  # nothing to strip: the common case
    if items is not None:
        out = []
        for pair in items:
            name = pair[0]
            if len(name) in _HOP_LENS:
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
    options = session._down.service.options
    if options.via:
        mine = b"1.1 " + options.via_name.encode()
        prior = headers.get(b"via")
        headers.set(b"Via", prior + b", " + mine if prior else mine)


# --------------------------------------------------------------------------------------
# the pipeline


async def run_session(session: Session) -> None:
    """One request: hooks, upstream exchange with retries, errors, logging."""
    proxy = session._proxy
    overridden = proxy.overridden
    async_hooks = proxy.async_hooks
    down = session._down
    ctx = proxy.new_ctx() if "new_ctx" in overridden else {}
    session.ctx = ctx
    error: ProxyError | None = None
    try:
        if "early_request_filter" in overridden:
            r = proxy.early_request_filter(session, ctx)
            if "early_request_filter" in async_hooks:
                await r
        handled = False
        if "request_filter" in overridden:
            r = proxy.request_filter(session, ctx)
            handled = (await r) if "request_filter" in async_hooks else r
        if not handled:
            if session.req_header.raw_method == b"CONNECT" and not session.allow_connect:
                raise ProxyError(
                    ErrorKind.METHOD_NOT_ALLOWED, ErrorSource.DOWNSTREAM, "CONNECT not allowed"
                )
            await _proxy_upstream(session, ctx)
        elif not session._done:
            if session.response_header is None:
                raise internal_error("request_filter returned True without a response")
            session._finish_response()
    except ProxyError as exc:
        error = exc
    except asyncio.CancelledError:
        error = ProxyError(ErrorKind.CLIENT_CLOSED, ErrorSource.DOWNSTREAM, "cancelled")
    except Exception as exc:  # a hook raised
        error = ProxyError(ErrorKind.HOOK_ERROR, ErrorSource.INTERNAL, repr(exc), cause=exc)
    if error is not None:
        await _fail(session, error, ctx)
    down.request_done(session)
    if "logging" in overridden:
        try:
            r = proxy.logging(session, error, ctx)
            if "logging" in async_hooks:
                await r
        except Exception:  # noqa: BLE001 - a logging hook must never break the connection
            log.exception("logging hook failed")


async def _fail(session: Session, error: ProxyError, ctx: Any) -> None:
    """Give up on the request: answer with an error status unless a response started."""
    proxy = session._proxy
    up = session._up
    session._up = None
    if up is not None:
        up.abort()
    session._error = error
    down = session._down
    try:
        if down.closed:
            pass
        elif session.response_header is None:
            if "fail_to_proxy" in proxy.overridden:
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
    if not session._done:
        session.keep_alive = False
        session._done = True


async def _proxy_upstream(session: Session, ctx: Any) -> None:
    proxy = session._proxy
    overridden = proxy.overridden
    async_hooks = proxy.async_hooks
    connector = session._down.service.connector
    req = session.req_header
    is_connect = req.raw_method == b"CONNECT"
    if not is_connect:
        session._send_continue()
    while True:
        r: Any = proxy.upstream_peer(session, ctx)
        peer: HttpPeer = (await r) if "upstream_peer" in async_hooks else r
        session.peer = peer
        up = connector.get_idle(peer)
        reused = up is not None
        if up is None:
            if session._inline:
                await to_task()  # connecting waits on the network: continue in a Task
            try:
                up = await connector.connect(peer)
            except ProxyError as exc:
                err = exc
                if "fail_to_connect" in overridden:
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
        if "connected_to_upstream" in overridden:
            r = proxy.connected_to_upstream(session, reused, peer, ctx)
            if "connected_to_upstream" in async_hooks:
                await r
        if is_connect:
            await _tunnel_connect(session, up)
            return
        up_req = build_upstream_request(session)
        if "upstream_request_filter" in overridden:
            r = proxy.upstream_request_filter(session, up_req, ctx)
            if "upstream_request_filter" in async_hooks:
                await r
        up.start(session, up_req.raw_method, peer.read_timeout)
        session._send_request(up, up_req.to_bytes())
        try:
            if session._up_resp is None:
                await session._wait(_WAIT_HEAD)
            elif session._error is not None:
                raise session._error
        except ProxyError as exc:
            err = exc
            if err.source is ErrorSource.DOWNSTREAM:
                raise
            if "error_while_proxy" in overridden:
                r = proxy.error_while_proxy(session, peer, ctx, err, session.downstream_reused)
                err = (await r) if "error_while_proxy" in async_hooks else r
            if err.retryable and session.retries < session.max_retries and session._can_retry():
                session.retries += 1
                session._reset_attempt()
                continue
            raise err from None
        break
    resp = session._up_resp
    assert resp is not None
    prepare_downstream_response(session, resp)
    if "upstream_response_filter" in overridden:
        r = proxy.upstream_response_filter(session, resp, ctx)
        if "upstream_response_filter" in async_hooks:
            await r
    if "response_filter" in overridden:
        r = proxy.response_filter(session, resp, ctx)
        if "response_filter" in async_hooks:
            await r
    if resp.status == 101 and session._upgrade:
        await _tunnel_upgrade(session, resp)
        return
    down = session._down
    down.cork()
    # the parser framed the body by Content-Length: trust it unless a hook could have
    # removed that header
    session._trust_length = not (_RESPONSE_HOOKS & overridden)
    session._write_head(resp, session._up_body_kind)
    session._flush_pending()
    down.uncork()
    if not session._done:
        try:
            await session._wait(_WAIT_END)
        except ProxyError as exc:
            err = exc
            if err.source is not ErrorSource.DOWNSTREAM and "error_while_proxy" in overridden:
                r = proxy.error_while_proxy(session, peer, ctx, err, session.downstream_reused)
                err = (await r) if "error_while_proxy" in async_hooks else r
            raise err from None


async def _tunnel_upgrade(session: Session, resp: ResponseHeader) -> None:
    """Forward a 101 and splice the two connections until both sides are done."""
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
    if not session._done:
        await session._wait(_WAIT_END)


async def _tunnel_connect(session: Session, up: UpstreamConnection) -> None:
    """Answer a permitted CONNECT with 200 and splice the client to the upstream."""
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
    if not session._done:
        await session._wait(_WAIT_END)
