"""The per-request engine: runs the hook pipeline and the retry loop for one Session.

This is the only task per request. Hooks the proxy class did not override are skipped
without being called (``proxy.overridden`` is computed once per class).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ferryman.errors import ErrorKind, ErrorSource, ProxyError, internal_error
from ferryman.protocols.h1 import BODY_CHUNKED, BODY_NONE
from ferryman.protocols.headers import Headers, RequestHeader, ResponseHeader
from ferryman.proxy.session import _WAIT_END, _WAIT_HEAD, Session

if TYPE_CHECKING:
    from ferryman.upstream.peer import HttpPeer

#: Request headers that describe one connection only; never forwarded (RFC 9110 §7.6.1).
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
_REQUEST_DROP = HOP_BY_HOP | {b"expect"}


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def strip_hop_by_hop(pairs: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list:
    """``pairs`` without hop-by-hop headers and those named in ``Connection``."""
    named: set[bytes] | None = None
    out = []
    for name, value in pairs:
        lname = name.lower()
        if lname == b"connection":
            if named is None:
                named = set()
            named |= _connection_tokens([value])
            continue
        if lname in drop:
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def build_upstream_request(session: Session) -> RequestHeader:
    """The request head to send upstream: the client's minus hop-by-hop, plus forwarding."""
    req = session.req_header
    options = session._down.service.options
    pairs = strip_hop_by_hop(req.headers._items, _REQUEST_DROP)
    up = RequestHeader.__new__(RequestHeader)
    up.raw_method = req.raw_method
    up.raw_path = req.raw_path
    up.version = "1.1"
    headers = Headers._wrap(pairs)
    up.headers = headers
    if session._upgrade:
        upgrade = req.headers.get(b"upgrade")
        if upgrade is not None:
            headers.add(b"Connection", b"upgrade")
            headers.add(b"Upgrade", upgrade)
    if options.x_forwarded_for:
        client = session.client_addr
        if client is not None:
            prior = req.headers.get_all(b"x-forwarded-for")
            ip = client[0].encode()
            headers.set(b"X-Forwarded-For", b", ".join([*prior, ip]) if prior else ip)
    if options.x_forwarded_proto:
        headers.set(b"X-Forwarded-Proto", b"https" if session.is_tls else b"http")
    if options.x_forwarded_host:
        host = req.headers.get(b"host")
        if host is not None:
            headers.set(b"X-Forwarded-Host", host)
    if options.via:
        via = f"{req.version} {options.via_name}".encode()
        prior_via = req.headers.get(b"via")
        headers.set(b"Via", prior_via + b", " + via if prior_via else via)
    body_kind = session._body_kind
    if body_kind != BODY_NONE and (body_kind == BODY_CHUNKED or session._body_filter):
        headers.remove(b"content-length")
        headers.add(b"Transfer-Encoding", b"chunked")
        session._up_chunked = True
    else:
        session._up_chunked = False
    return up


def prepare_downstream_response(session: Session, resp: ResponseHeader) -> None:
    """Remove hop-by-hop headers from an upstream response (and add Via if configured)."""
    headers = resp.headers
    if resp.status == 101:
        upgrade = headers.get(b"upgrade")
        pairs = strip_hop_by_hop(headers._items, HOP_BY_HOP)
        headers._items[:] = pairs
        headers._index = None
        if upgrade is not None:
            headers.add(b"Upgrade", upgrade)
    else:
        pairs = strip_hop_by_hop(headers._items, HOP_BY_HOP)
        headers._items[:] = pairs
        headers._index = None
    options = session._down.service.options
    if options.via:
        via = f"{resp.version} {options.via_name}".encode()
        prior = headers.get(b"via")
        headers.set(b"Via", prior + b", " + via if prior else via)


async def run_session(session: Session) -> None:
    """The task of one request: hooks, upstream exchange with retries, errors, logging."""
    proxy = session._proxy
    overridden = proxy.overridden
    down = session._down
    ctx = proxy.new_ctx() if "new_ctx" in overridden else {}
    session.ctx = ctx
    error: ProxyError | None = None
    try:
        if "early_request_filter" in overridden:
            await proxy.early_request_filter(session, ctx)
        handled = False
        if "request_filter" in overridden:
            handled = await proxy.request_filter(session, ctx)
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
        up = session._up
        session._up = None
        if up is not None:
            up.abort()
        try:
            if down.closed:
                pass
            elif session.response_header is None:
                await proxy.fail_to_proxy(session, error, ctx)
            else:
                session.keep_alive = False  # a truncated response: the client must see EOF
        except Exception:  # noqa: BLE001 - a failing fail_to_proxy must not kill the worker
            session.keep_alive = False
        if not session._done:
            session.keep_alive = False
            session._done = True
    down.request_done(session)
    if "logging" in overridden:
        try:
            await proxy.logging(session, error, ctx)
        except Exception:  # noqa: BLE001 - logging hooks must never break the connection
            pass


async def _proxy_upstream(session: Session, ctx: object) -> None:
    proxy = session._proxy
    overridden = proxy.overridden
    connector = session._down.service.connector
    req = session.req_header
    is_connect = req.raw_method == b"CONNECT"
    if not is_connect:
        session._send_continue()
    while True:
        peer: HttpPeer = await proxy.upstream_peer(session, ctx)
        session.peer = peer
        up = connector.get_idle(peer)
        reused = up is not None
        if up is None:
            try:
                up = await connector.connect(peer)
            except ProxyError as exc:
                err = exc
                if "fail_to_connect" in overridden:
                    err = await proxy.fail_to_connect(session, peer, ctx, err)
                if err.retryable and session.retries < session.max_retries:
                    session.retries += 1
                    continue
                raise err from None
        if session._error is not None:  # the client left while we connected
            up.release() if up.parser.complete or up.requests == 0 else up.close()
            raise session._error
        session._up = up
        if "connected_to_upstream" in overridden:
            await proxy.connected_to_upstream(session, reused, peer, ctx)
        if is_connect:
            await _tunnel_connect(session, up)
            return
        up_req = build_upstream_request(session)
        if "upstream_request_filter" in overridden:
            await proxy.upstream_request_filter(session, up_req, ctx)
        up.start(session, up_req.raw_method, peer.read_timeout)
        session._send_request(up, up_req.to_bytes())
        try:
            if session._up_resp is None:
                await session._wait(_WAIT_HEAD)
        except ProxyError as exc:
            err = exc
            if err.source is ErrorSource.DOWNSTREAM:
                raise
            if "error_while_proxy" in overridden:
                err = await proxy.error_while_proxy(
                    session, peer, ctx, err, session.downstream_reused
                )
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
        await proxy.upstream_response_filter(session, resp, ctx)
    if "response_filter" in overridden:
        await proxy.response_filter(session, resp, ctx)
    if resp.status == 101 and session._upgrade:
        await _tunnel_upgrade(session, resp)
        return
    session._write_head(resp, session._up_body_kind)
    session._flush_pending()
    if not session._done:
        try:
            await session._wait(_WAIT_END)
        except ProxyError as exc:
            err = exc
            if err.source is not ErrorSource.DOWNSTREAM and "error_while_proxy" in overridden:
                err = await proxy.error_while_proxy(
                    session, session.peer, ctx, err, session.downstream_reused  # type: ignore[arg-type]
                )
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


async def _tunnel_connect(session: Session, up: object) -> None:
    """Answer a permitted CONNECT with 200 and splice the client to the upstream."""
    from ferryman.upstream.connection import UpstreamConnection

    assert isinstance(up, UpstreamConnection)
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
