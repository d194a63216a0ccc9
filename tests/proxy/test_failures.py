"""Retries and failover, fail_to_proxy, and hooks that raise."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import httpx
import pytest
from proxy_util import (
    HangupServer,
    RawClient,
    TcpServer,
    asyncify,
    build_request,
    digest,
    read_http_request,
    variant,
)

from ferryman import ErrorKind, HttpPeer, ProxyError, ProxyHttp, ProxyOptions
from origin import OriginServer

# --------------------------------------------------------------------------------------
# failover


class Failover(ProxyHttp):
    """Attempt n goes to ``peers[n]`` (the last one repeats)."""

    def __init__(self, peers: list[str]) -> None:
        self.peers = peers
        self.seen: list[tuple[int, str]] = []
        self.logged: list[tuple[ProxyError | None, int, int]] = []

    def upstream_peer(self, session, ctx):
        address = self.peers[min(session.retries, len(self.peers) - 1)]
        self.seen.append((session.retries, address))
        return HttpPeer(address)

    def logging(self, session, error, ctx):
        self.logged.append((error, session.retries, session.status))


def test_failover_from_a_dead_peer_to_a_live_one(mode, origin, dead_port, start_proxy) -> None:
    dead = f"127.0.0.1:{dead_port}"
    proxy = variant(mode, Failover)([dead, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
    assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert proxy.seen == [(0, dead), (1, origin.address)]
    assert proxy.logged == [(None, 1, 200)]


def test_failover_with_a_post_body(mode, origin, dead_port, start_proxy) -> None:
    dead = f"127.0.0.1:{dead_port}"
    proxy = variant(mode, Failover)([dead, origin.address])
    harness = start_proxy(proxy)
    payload = bytes(range(256)) * 1000  # 256 000 bytes: buffered while connecting
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/echo", content=payload)
    assert resp.status_code == 200
    assert digest(resp.content) == digest(payload)
    assert proxy.seen == [(0, dead), (1, origin.address)]


def test_max_retries_zero_gives_502(mode, origin, dead_port, start_proxy) -> None:
    dead = f"127.0.0.1:{dead_port}"
    proxy = variant(mode, Failover)([dead, origin.address])
    harness = start_proxy(proxy, ProxyOptions(max_retries=0))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (502, b"")
        resp = client.request("GET", "/")  # keep-alive survives a 502
        assert resp.status == 502
    harness.call(lambda: None)
    assert proxy.seen == [(0, dead), (0, dead)]
    assert origin.requests == []
    error = proxy.logged[0][0]
    assert error is not None and error.kind is ErrorKind.CONNECT_REFUSED


class HookSetsRetries(Failover):
    def request_filter(self, session, ctx):
        session.max_retries = int(session.req_header.headers.get("x-retries", b"1"))
        return False


@pytest.mark.parametrize(("retries", "status"), [(0, 502), (2, 502), (3, 200), (5, 200)])
def test_max_retries_set_by_a_hook(mode, origin, start_proxy, retries, status) -> None:
    from origin import free_port

    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    proxy = variant(mode, HookSetsRetries)([*dead, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/", headers=[("X-Retries", str(retries))])
    assert resp.status == status
    harness.call(lambda: None)
    attempts = min(retries, 3) + 1
    assert [n for n, _ in proxy.seen] == list(range(attempts))


class NoRetryOnConnect(Failover):
    def __init__(self, peers: list[str]) -> None:
        super().__init__(peers)
        self.connect_errors: list[tuple[str, ErrorKind, bool]] = []

    def fail_to_connect(self, session, peer, ctx, error):
        self.connect_errors.append((peer.name, error.kind, error.retryable))
        error.retryable = False
        return error


def test_fail_to_connect_can_forbid_the_retry(mode, origin, dead_port, start_proxy) -> None:
    dead = f"127.0.0.1:{dead_port}"
    proxy = variant(mode, NoRetryOnConnect)([dead, origin.address])
    harness = start_proxy(proxy, ProxyOptions(max_retries=3))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
    assert (resp.status, resp.body) == (502, b"")
    harness.call(lambda: None)
    assert proxy.seen == [(0, dead)]
    # connect failures arrive retryable by default; the hook's answer is what counts
    assert proxy.connect_errors == [(dead, ErrorKind.CONNECT_REFUSED, True)]
    assert origin.requests == []
    assert proxy.logged[0][0].retryable is False


# --------------------------------------------------------------------------------------
# retry after the request (and its body) went upstream


class RetryMidExchange(Failover):
    """Marks every error after connect retryable (the first peer hangs up)."""

    def __init__(self, peers: list[str]) -> None:
        super().__init__(peers)
        self.proxy_errors: list[tuple[ErrorKind, bool]] = []

    def error_while_proxy(self, session, peer, ctx, error, client_reused):
        self.proxy_errors.append((error.kind, client_reused))
        error.retryable = True
        return error


@pytest.mark.parametrize("size", [1, 1000, 65536])
def test_small_body_is_replayed_after_the_upstream_hangs_up(
    mode, origin: OriginServer, hangup_server: HangupServer, start_proxy, size: int
) -> None:
    proxy = variant(mode, RetryMidExchange)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    payload = bytes((i * 7) % 251 for i in range(size))
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/echo", content=payload)
    assert resp.status_code == 200
    assert digest(resp.content) == digest(payload)
    harness.call(lambda: None)
    assert proxy.seen == [(0, hangup_server.address), (1, origin.address)]
    assert [kind for kind, _ in proxy.proxy_errors] == [ErrorKind.UPSTREAM_CLOSED]
    # both upstreams got the whole body
    assert [digest(body) for _, body in hangup_server.received] == [digest(payload)]
    assert origin.requests[0][:2] == ("POST", "/echo")
    assert proxy.logged == [(None, 1, 200)]


class RetryWithBodyFilter(RetryMidExchange):
    """Also rewrites the request body: a replay must not filter it a second time."""

    def __init__(self, peers: list[str]) -> None:
        super().__init__(peers)
        self.filtered: list[tuple[bytes, bool]] = []

    def request_body_filter(self, session, body, end_of_stream, ctx):
        self.filtered.append((bytes(body), end_of_stream))
        return b"<end>" if end_of_stream else body.replace(b"a", b"b")


def test_replayed_body_is_filtered_once(mode, origin, hangup_server, start_proxy) -> None:
    proxy = variant(mode, RetryWithBodyFilter)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("POST", "/echo", b"banana")
    assert (resp.status, resp.body) == (200, b"bbnbnb<end>")
    assert [body for _, body in hangup_server.received] == [b"bbnbnb<end>"]
    assert b"".join(b for b, _ in proxy.filtered) == b"banana"
    assert [end for _, end in proxy.filtered].count(True) == 1


def test_error_while_proxy_is_told_whether_the_client_connection_was_reused(
    mode, origin, hangup_server, start_proxy
) -> None:
    proxy = variant(mode, RetryMidExchange)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        for _ in range(2):
            resp = client.request("GET", "/")
            assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert proxy.proxy_errors == [
        (ErrorKind.UPSTREAM_CLOSED, False),
        (ErrorKind.UPSTREAM_CLOSED, True),
    ]


def test_small_chunked_body_is_replayed_after_the_upstream_hangs_up(
    mode, origin, hangup_server, start_proxy
) -> None:
    proxy = variant(mode, RetryMidExchange)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(
            build_request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
            + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"hello world")
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
    # (the GET went to the hangup server first too, then to the origin)
    assert [body for _, body in hangup_server.received] == [b"hello world", b""]


@pytest.mark.parametrize("size", [65537, 300_000])
def test_large_body_is_not_replayed(mode, origin, hangup_server, start_proxy, size) -> None:
    proxy = variant(mode, RetryMidExchange)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    payload = b"L" * size
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/echo", content=payload)
    assert resp.status_code == 502
    harness.call(lambda: None)
    assert proxy.seen == [(0, hangup_server.address)]
    assert origin.requests == []
    assert [digest(body) for _, body in hangup_server.received] == [digest(payload)]
    error = proxy.logged[0][0]
    assert error is not None and error.kind is ErrorKind.UPSTREAM_CLOSED


def test_hangup_on_a_fresh_connection_is_not_retried_by_default(
    mode, origin, hangup_server, start_proxy
) -> None:
    proxy = variant(mode, Failover)([hangup_server.address, origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
    assert (resp.status, resp.body) == (502, b"")
    harness.call(lambda: None)
    assert proxy.seen == [(0, hangup_server.address)]
    assert origin.requests == []


class AnswerOnceThenHangup(TcpServer):
    """Per connection: answers the first request (keep-alive), hangs up on the second."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes, bytes]] = []
        self.lock = threading.Lock()
        self.conn_ids = 0
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.conn_ids += 1
            conn_id = self.conn_ids
        head, body = read_http_request(conn)
        self.received.append((conn_id, head.split(b"\r\n")[0], body))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        head, body = read_http_request(conn)
        self.received.append((conn_id, head.split(b"\r\n")[0], body))


@pytest.fixture
def answer_once() -> Any:
    server = AnswerOnceThenHangup().start()
    yield server
    server.stop()


def test_idempotent_request_on_a_stale_pooled_connection_is_retried(
    mode, answer_once: AnswerOnceThenHangup, start_proxy
) -> None:
    proxy = variant(mode, Failover)([answer_once.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        assert client.request("GET", "/a").body == b"first"
        resp = client.request("GET", "/b")  # sent on the pooled connection, which hangs up
        assert (resp.status, resp.body) == (200, b"first")
    assert [(c, line) for c, line, _ in answer_once.received] == [
        (1, b"GET /a HTTP/1.1"),
        (1, b"GET /b HTTP/1.1"),
        (2, b"GET /b HTTP/1.1"),
    ]


def test_post_on_a_stale_pooled_connection_is_not_replayed_by_default(
    mode, answer_once: AnswerOnceThenHangup, start_proxy
) -> None:
    proxy = variant(mode, Failover)([answer_once.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        assert client.request("GET", "/a").body == b"first"
        resp = client.request("POST", "/order", b"buy 1")
    assert resp.status == 502
    posts = [line for _, line, _ in answer_once.received if line.startswith(b"POST")]
    assert posts == [b"POST /order HTTP/1.1"]


# --------------------------------------------------------------------------------------
# fail_to_proxy


PAGE = b"<h1>We'll be right back</h1>\n"


class CustomErrorPage(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address
        self.logged: list[tuple[ProxyError | None, int]] = []
        self.returned: list[int] = []

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def fail_to_proxy(self, session, error, ctx):
        session.send_response(503, PAGE, {"Retry-After": "5"}, content_type="text/html")
        self.returned.append(503)
        return 503

    def logging(self, session, error, ctx):
        self.logged.append((error, session.status))


class AsyncCustomErrorPage(CustomErrorPage):
    async def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    async def fail_to_proxy(self, session, error, ctx):
        await session.respond(503, PAGE, {"Retry-After": "5"}, content_type="text/html")
        self.returned.append(503)
        return 503

    async def logging(self, session, error, ctx):
        self.logged.append((error, session.status))


def test_fail_to_proxy_writes_a_custom_503_page(mode, dead_port, start_proxy) -> None:
    proxy = variant(mode, CustomErrorPage, AsyncCustomErrorPage)(f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert resp.status == 503
        assert resp.body == PAGE
        assert resp.header("content-type") == "text/html"
        assert resp.header("retry-after") == "5"
        assert resp.header("content-length") == str(len(PAGE))
        resp = client.request("GET", "/again")  # the connection stays usable
        assert (resp.status, resp.body) == (503, PAGE)
    harness.call(lambda: None)
    assert proxy.returned == [503, 503]
    assert len(proxy.logged) == 2
    for error, status in proxy.logged:
        assert isinstance(error, ProxyError)
        assert error.kind is ErrorKind.CONNECT_REFUSED
        assert status == 503


# --------------------------------------------------------------------------------------
# hooks that raise


class Base(ProxyHttp):
    def __init__(self, address: str, dead: str) -> None:
        self.address = address
        self.dead = dead
        self.logged: list[ProxyError | None] = []

    def upstream_peer(self, session, ctx):
        if b"dead" in session.req_header.raw_path:
            return HttpPeer(self.dead)
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.logged.append(error)


def _raising(hook: str) -> Any:
    def raising(self, session, *args):
        if b"boom" in session.req_header.raw_path:
            raise RuntimeError(f"{hook} exploded")
        if hook == "upstream_peer":
            return Base.upstream_peer(self, session, *args)
        if hook == "logging":
            return Base.logging(self, session, *args)
        if hook == "fail_to_connect":
            return args[-1]
        if hook == "request_filter":
            return False
        if hook.endswith("body_filter"):
            return args[0]
        return None

    return raising


def raising_proxy(mode: str, hook: str, address: str, dead: str) -> Base:
    cls = type(f"Raise_{hook}", (Base,), {hook: _raising(hook)})
    return variant(mode, cls)(address, dead)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("hook", "path"),
    [
        ("early_request_filter", "/boom"),
        ("request_filter", "/boom"),
        ("upstream_peer", "/boom"),
        ("connected_to_upstream", "/boom"),
        ("upstream_request_filter", "/boom"),
        ("upstream_response_filter", "/boom"),
        ("response_filter", "/boom"),
        ("fail_to_connect", "/dead/boom"),
    ],
)
def test_a_raising_hook_gives_500_and_the_worker_keeps_serving(
    mode, origin, dead_port, start_proxy, hook: str, path: str
) -> None:
    proxy = raising_proxy(mode, hook, origin.address, f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", path)
        assert (resp.status, resp.body) == (500, b"")
        resp = client.request("GET", "/")  # same connection
        assert (resp.status, resp.body) == (200, b"hello world\n")
        resp = client.request("POST", "/echo", b"after")
        assert (resp.status, resp.body) == (200, b"after")
    with RawClient(harness.port) as client:  # new connection
        for _ in range(2):
            resp = client.request("GET", path)
            assert resp.status == 500
            resp = client.request("GET", "/big?size=100000")
            assert resp.status == 200 and len(resp.body) == 100_000
    harness.call(lambda: None)
    errors = [e for e in proxy.logged if e is not None]
    assert len(errors) == 3
    for error in errors:
        assert error.kind is ErrorKind.HOOK_ERROR
        assert isinstance(error.cause, RuntimeError)


def test_a_raising_logging_hook_does_not_break_the_connection(mode, origin, start_proxy) -> None:
    proxy = raising_proxy(mode, "logging", origin.address, origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        for path in ("/boom", "/", "/boom", "/"):
            resp = client.request("GET", path)
            assert (resp.status, resp.body) == (200, b"hello world\n")


def test_a_raising_error_while_proxy_gives_500(mode, origin, hangup_server, start_proxy) -> None:
    proxy = raising_proxy(mode, "error_while_proxy", origin.address, hangup_server.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/dead/boom")
        assert resp.status == 500
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")


def test_a_raising_response_body_filter_truncates_and_closes(mode, origin, start_proxy) -> None:
    proxy = raising_proxy(mode, "response_body_filter", origin.address, origin.address)
    # response_body_filter must stay plain: the async variant differs by its other hooks
    proxy_cls = type(proxy)
    assert "response_body_filter" not in proxy_cls.async_hooks
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/boom"))
        head = client.read_head()
        # the head was committed before the filter ran: the body is cut short and the
        # connection closed, so the client cannot take it for a complete response
        assert head.status == 200
        assert head.header("transfer-encoding") == "chunked"
        assert not client.read_to_eof().endswith(b"0\r\n\r\n")
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/big?size=70000")
        assert resp.status == 200 and len(resp.body) == 70_000


def test_a_raising_request_body_filter_gives_500(mode, origin, start_proxy) -> None:
    proxy = raising_proxy(mode, "request_body_filter", origin.address, origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(
            build_request(
                "POST", "/boom", headers=[("Content-Length", "3"), ("Expect", "100-continue")]
            )
        )
        assert client.read_head().status == 100
        client.send(b"abc")
        resp = client.read_response()
    assert resp.status == 500
    harness.call(lambda: None)
    assert proxy.logged[0] is not None and proxy.logged[0].kind is ErrorKind.HOOK_ERROR


def test_a_raising_request_body_filter_with_body_in_the_head_packet(
    mode, origin, start_proxy
) -> None:
    proxy = raising_proxy(mode, "request_body_filter", origin.address, origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port, timeout=1.0) as client:
        client.send(build_request("POST", "/boom", b"abc"))
        resp = client.read_response()
    assert resp.status == 500


def test_bad_chunked_body_in_the_head_packet_gets_400(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Base)(origin.address, origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")]) + b"ZZZ\r\n"
        )
        resp = client.read_response()
        assert resp.status == 400
        assert client.at_eof()


def test_bad_chunked_body_after_the_head_gets_400(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Base)(origin.address, origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request(
                "POST",
                "/echo",
                headers=[("Transfer-Encoding", "chunked"), ("Expect", "100-continue")],
            )
        )
        assert client.read_head().status == 100
        client.send(b"ZZZ\r\n")
        resp = client.read_response()
        assert resp.status == 400
        assert client.at_eof()


def test_a_raising_fail_to_proxy_still_answers_500(mode, dead_port, start_proxy) -> None:
    dead = f"127.0.0.1:{dead_port}"
    proxy = raising_proxy(mode, "fail_to_proxy", dead, dead)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        try:
            resp = client.request("GET", "/boom")
        except EOFError:
            pytest.fail("no response: connection closed")
    assert resp.status == 500


def test_a_raising_fail_to_proxy_does_not_kill_the_worker(mode, origin, dead_port, start_proxy):
    proxy = raising_proxy(mode, "fail_to_proxy", origin.address, f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/dead/boom"))
        client.read_to_eof()  # whatever was sent, the connection ends
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")


def test_asyncify_keeps_plain_only_hooks_plain() -> None:
    cls = asyncify(type("X", (Base,), {"response_body_filter": lambda s, *a: a[0]}))
    assert "response_body_filter" in cls.overridden
    assert "response_body_filter" not in cls.async_hooks
    assert "upstream_peer" in cls.async_hooks


# --------------------------------------------------------------------------------------
# more failure paths


def test_failure_with_an_unread_request_body_closes_the_connection(
    mode, dead_port, start_proxy
) -> None:
    proxy = variant(mode, CustomErrorPage, AsyncCustomErrorPage)(f"127.0.0.1:{dead_port}")
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(build_request("POST", "/upload", headers=[("Content-Length", "200000")]))
        client.send(b"u" * 100_000)  # half of it: the proxy answers before the rest
        resp = client.read_response("POST")
        assert (resp.status, resp.body) == (503, PAGE)
        assert resp.header("connection") == "close"
        assert client.at_eof()


class Timeouts(Failover):
    def upstream_peer(self, session, ctx):
        self.seen.append((session.retries, self.peers[0]))
        return HttpPeer(self.peers[0], read_timeout=0.3)


def test_upstream_read_timeout_is_504(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Timeouts)([origin.address])
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/slow?ms=1500")
        assert (resp.status, resp.body) == (504, b"")
        resp = client.request("GET", "/")  # a fresh upstream connection answers this
        assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    error = proxy.logged[0][0]
    assert error is not None and error.kind is ErrorKind.READ_TIMEOUT
    assert proxy.seen == [(0, origin.address), (0, origin.address)]  # not retried


def _truncating(conn: socket.socket) -> None:
    read_http_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"t" * 300)


def test_upstream_closing_mid_body_truncates_the_response(mode, start_proxy) -> None:
    server = TcpServer(_truncating).start()
    try:
        proxy = variant(mode, RetryMidExchange)([server.address])
        harness = start_proxy(proxy)
        with RawClient(harness.port) as client:
            client.send(build_request("GET", "/"))
            head = client.read_head()
            assert head.status == 200
            assert head.header("content-length") == "1000"
            # the head was sent; the body stops short and the connection ends
            assert client.read_to_eof() == b"t" * 300
        _wait_for_log(proxy, harness)
        error = proxy.logged[0][0]
        assert error is not None and error.kind is ErrorKind.UPSTREAM_CLOSED
        assert [kind for kind, _ in proxy.proxy_errors] == [ErrorKind.UPSTREAM_CLOSED]
        assert server.accepted == 1  # a started response is never retried
    finally:
        server.stop()


def _wait_for_log(proxy: Any, harness: Any) -> None:
    import time

    deadline = time.monotonic() + 5
    while not proxy.logged and time.monotonic() < deadline:
        harness.call(lambda: None)
        time.sleep(0.01)


class SlowGate(Failover):
    """An async request_filter that takes a while (an auth service, say)."""

    async def request_filter(self, session, ctx):
        await asyncio.sleep(0.3)
        return False


def test_client_gone_while_an_async_hook_waits(origin, start_proxy) -> None:
    proxy = SlowGate([origin.address])
    harness = start_proxy(proxy)
    sock = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
    sock.sendall(build_request("GET", "/"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST while request_filter is still waiting
    _wait_for_log(proxy, harness)
    error = proxy.logged[0][0]
    assert error is not None and error.kind is ErrorKind.CLIENT_CLOSED
    assert origin.requests == []
    with RawClient(harness.port) as client:
        assert client.request("GET", "/").status == 200
