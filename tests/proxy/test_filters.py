"""Request/response filters: early answers, header and path rewrites, body rewrites."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from proxy_util import RawClient, build_request, digest, variant

from ferryman import HttpPeer, ProxyHttp, ResponseHeader
from origin import OriginServer, pattern_bytes

# --------------------------------------------------------------------------------------
# request_filter answering early


class Deny(ProxyHttp):
    """Answers /admin* itself with 403 (send_response from a plain hook)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.logged: list[tuple[str, int, Any]] = []

    def request_filter(self, session, ctx):
        if session.req_header.path.startswith("/admin"):
            session.send_response(
                403, b"forbidden by policy\n", {"X-Denied": "yes"}, content_type="text/plain"
            )
            return True
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.logged.append((session.req_header.path, session.status, error))


class AsyncDeny(Deny):
    """The same, answering with ``await session.respond`` from ``async def`` hooks."""

    async def request_filter(self, session, ctx):
        if session.req_header.path.startswith("/admin"):
            await session.respond(
                403, "forbidden by policy\n", {"X-Denied": "yes"}, content_type="text/plain"
            )
            return True
        return False

    async def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    async def logging(self, session, error, ctx):
        self.logged.append((session.req_header.path, session.status, error))


def test_request_filter_answers_403_itself(mode, origin: OriginServer, start_proxy) -> None:
    proxy = variant(mode, Deny, AsyncDeny)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/admin/users")
        assert resp.status == 403
        assert resp.body == b"forbidden by policy\n"
        assert resp.header("content-length") == str(len(b"forbidden by policy\n"))
        assert resp.header("content-type") == "text/plain"
        assert resp.header("x-denied") == "yes"
        # the connection stays usable, and a request that passes the filter is proxied
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert [path for _, path, _ in origin.requests] == ["/"]
    assert origin.connections == 1
    assert proxy.logged == [("/admin/users", 403, None), ("/", 200, None)]


def test_hook_response_to_head_has_no_body(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Deny, AsyncDeny)(origin.address))
    with RawClient(harness.port, timeout=1.0) as client:
        resp = client.request("HEAD", "/admin")
        assert resp.status == 403
        assert resp.header("content-length") == str(len(b"forbidden by policy\n"))
        resp = client.request("GET", "/")  # the next response must be read cleanly
        assert (resp.status, resp.body) == (200, b"hello world\n")


def test_request_filter_answers_a_post_without_reading_it_upstream(
    mode, origin: OriginServer, start_proxy
) -> None:
    proxy = variant(mode, Deny, AsyncDeny)(origin.address)
    harness = start_proxy(proxy)
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/admin/upload", content=b"z" * 10_000)
        assert resp.status_code == 403
        assert resp.content == b"forbidden by policy\n"
    harness.call(lambda: None)
    assert origin.requests == []
    assert origin.connections == 0
    assert len(proxy.logged) == 1
    assert proxy.logged[0][1:] == (403, None)


class BearerAuth(ProxyHttp):
    """API-gateway style auth: only ``Authorization: Bearer secret`` passes."""

    def __init__(self, address: str) -> None:
        self.address = address

    def request_filter(self, session, ctx):
        if session.req_header.headers.get("authorization") != b"Bearer secret":
            session.send_response(403, b"no entry\n")
            return True
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


class AsyncBearerAuth(BearerAuth):
    async def request_filter(self, session, ctx):
        if session.req_header.headers.get("authorization") != b"Bearer secret":
            await session.respond(403, b"no entry\n")
            return True
        return False


@pytest.mark.parametrize(
    ("auth", "status", "body"),
    [
        (None, 403, b"no entry\n"),
        ("Bearer wrong", 403, b"no entry\n"),
        ("Basic c2VjcmV0", 403, b"no entry\n"),
        ("Bearer secret", 200, b"hello world\n"),
    ],
)
def test_bearer_auth_gateway(mode, origin, start_proxy, auth, status, body) -> None:
    proxy = variant(mode, BearerAuth, AsyncBearerAuth)(origin.address)
    harness = start_proxy(proxy)
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.get("/", headers=headers)
    assert (resp.status_code, resp.content) == (status, body)
    assert len(origin.requests) == (1 if status == 200 else 0)
    if status == 200:
        # the Authorization header itself is forwarded (it is end-to-end)
        assert ("Authorization", "Bearer secret") in origin.requests[0][2]


class Streamed(ProxyHttp):
    """request_filter writes a streamed (chunked) response piece by piece."""

    def request_filter(self, session, ctx):
        path = session.req_header.path
        if path == "/teapot":
            session.send_error(418)
            return True
        if path == "/forgot":
            return True  # claims a response was sent, but sent none
        resp = ResponseHeader(200, [(b"X-Stream", b"1")])
        session.send_response_header(resp)
        for i in range(3):
            session.send_response_body(b"part%d;" % i)
        session.send_response_body(b"", end_of_stream=True)
        return True

    def upstream_peer(self, session, ctx):
        raise AssertionError("never asked: every request is answered by request_filter")


class AsyncStreamed(Streamed):
    async def request_filter(self, session, ctx):
        path = session.req_header.path
        if path == "/teapot":
            await session.respond_error(418)
            return True
        if path == "/forgot":
            return True
        await session.write_response_header(ResponseHeader(200, [(b"X-Stream", b"1")]))
        for i in range(3):
            await asyncio.sleep(0.01)
            await session.write_response_body(b"part%d;" % i)
        await session.write_response_body(b"", end_of_stream=True)
        return True


def test_request_filter_streams_its_own_response(mode, start_proxy) -> None:
    harness = start_proxy(variant(mode, Streamed, AsyncStreamed)())
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/stream")
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.header("x-stream") == "1"
        assert resp.body == b"part0;part1;part2;"
        resp = client.request("GET", "/teapot")
        assert (resp.status, resp.body) == (418, b"")
        resp = client.request("GET", "/stream", version="1.0")
        assert resp.status == 200
        assert resp.body == b"part0;part1;part2;"  # close-delimited for HTTP/1.0
        assert not resp.has("transfer-encoding")


def test_request_filter_returning_true_without_a_response_is_500(mode, start_proxy) -> None:
    harness = start_proxy(variant(mode, Streamed, AsyncStreamed)())
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/forgot")
        assert (resp.status, resp.body) == (500, b"")
        resp = client.request("GET", "/stream")
        assert resp.body == b"part0;part1;part2;"


class StrHeaders(ProxyHttp):
    def upstream_peer(self, session, ctx):
        raise AssertionError("never asked: request_filter answers")

    def request_filter(self, session, ctx):
        session.send_response_header(ResponseHeader(200, [("X-Str", "yes")]), length=2)
        session.send_response_body(b"ok", end_of_stream=True)
        return True


def test_response_header_built_from_str_pairs(mode, start_proxy) -> None:
    harness = start_proxy(variant(mode, StrHeaders)())
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.header("x-str") == "yes"


# --------------------------------------------------------------------------------------
# header, path and status rewrites


class Rewrite(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def upstream_request_filter(self, session, upstream_request, ctx):
        upstream_request.headers.add("X-Proxy-Added", "42")
        upstream_request.headers.remove("X-Client-Secret")
        if upstream_request.path == "/old":
            upstream_request.path = "/echo"

    def response_filter(self, session, response, ctx):
        response.headers.add("X-Served-By", "ferryman-test")
        response.headers.remove("Content-Type")
        if session.req_header.path == "/old":
            response.status = 201


def test_upstream_request_filter_adds_header_and_rewrites_path(
    mode, origin: OriginServer, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Rewrite)(origin.address))
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/old", content=b"payload", headers={"X-Client-Secret": "s3"})
        assert resp.status_code == 201
        assert resp.content == b"payload"  # answered by /echo
        resp = client.get("/headers")
        assert resp.status_code == 200
        seen = dict(json.loads(resp.content))
    (method, path, headers) = origin.requests[0]
    assert (method, path) == ("POST", "/echo")
    names = {k.lower(): v for k, v in headers}
    assert names["x-proxy-added"] == "42"
    assert "x-client-secret" not in names
    assert seen["X-Proxy-Added"] == "42"


def test_response_filter_adds_removes_headers_and_changes_status(
    mode, origin: OriginServer, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Rewrite)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert resp.status == 200
        assert resp.body == b"hello world\n"
        assert resp.header("x-served-by") == "ferryman-test"
        assert not resp.has("content-type")  # the origin sent text/plain
        assert resp.header("content-length") == "12"
        resp = client.request("GET", "/old")
        assert resp.status == 201
        assert resp.header("x-served-by") == "ferryman-test"
        assert resp.body == b""


def test_changed_status_gets_a_matching_reason_phrase(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Rewrite)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/old")
    assert resp.status == 201
    assert resp.reason == "Created"


class NotModified(ProxyHttp):
    """Answers 304 itself when the client already has the (only) version."""

    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def response_filter(self, session, response, ctx):
        if session.req_header.headers.get("if-none-match") == b'"v1"':
            response.status = 304


def test_response_filter_making_a_304_sends_no_body(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, NotModified)(origin.address))
    with RawClient(harness.port, timeout=1.0) as client:
        resp = client.request("GET", "/", headers=[("If-None-Match", '"v1"')])
        assert (resp.status, resp.body) == (304, b"")
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")


# --------------------------------------------------------------------------------------
# body rewrites


class Upper(ProxyHttp):
    """Upper-cases response bodies chunk by chunk."""

    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def response_body_filter(self, session, body, end_of_stream, ctx):
        return body.upper()


def test_response_body_filter_upper_cases_a_chunked_response(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert resp.status == 200
        assert resp.body == b"HELLO WORLD\n"
        assert not resp.has("content-length")
        assert resp.header("transfer-encoding") == "chunked"
        # keep-alive still works after the chunked response
        resp = client.request("GET", "/echo?x", b"abc", [("Content-Type", "text/plain")])
        assert (resp.status, resp.body) == (200, b"ABC")
        resp = client.request("GET", "/chunked?n=3&size=5")
        assert (resp.status, resp.body) == (200, b"X" * 15)
        assert resp.header("transfer-encoding") == "chunked"


def test_response_body_filter_keeps_trailers(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/chunked?n=2&size=3&trailer=abc")
        assert (resp.status, resp.body) == (200, b"XXXXXX")
        assert resp.trailers == [("X-Trailer", "abc")]
        resp = client.request("GET", "/")
        assert resp.body == b"HELLO WORLD\n"


def test_response_body_filter_with_httpx(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.get("/big", params={"size": 300_000})
        assert resp.status_code == 200
        assert "content-length" not in resp.headers
        assert digest(resp.content) == digest(pattern_bytes(300_000).upper())


def test_response_body_filter_to_http10_client_is_close_delimited(
    mode, origin, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/", version="1.0"))
        resp = client.read_response()
        assert resp.status == 200
        assert not resp.has("content-length")
        assert not resp.has("transfer-encoding")
        assert resp.header("connection") == "close"
        assert resp.body == b"HELLO WORLD\n"  # read to EOF: the proxy closed
        assert client.at_eof()


def test_response_body_filter_on_head_204_and_304(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("HEAD", "/")
        assert (resp.status, resp.body) == (200, b"")
        assert resp.header("transfer-encoding") is None
        for status in (204, 304):
            resp = client.request("GET", f"/status/{status}")
            assert (resp.status, resp.body) == (status, b"")
            assert resp.header("transfer-encoding") is None
        # framing stayed right: the connection is still in sync
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"HELLO WORLD\n")


def test_response_body_filter_with_pipelined_requests(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("GET", "/")
            + build_request("GET", "/chunked?n=2&size=3")
            + build_request("POST", "/echo", b"last one")
        )
        bodies = [client.read_response().body for _ in range(3)]
    assert bodies == [b"HELLO WORLD\n", b"XXXXXX", b"LAST ONE"]


def test_response_body_filter_to_http10_keep_alive_client_closes(mode, origin, start_proxy):
    harness = start_proxy(variant(mode, Upper)(origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("GET", "/", headers=[("Connection", "keep-alive")], version="1.0")
        )
        resp = client.read_response()  # close-delimited: read to EOF
        assert resp.status == 200
        assert resp.body == b"HELLO WORLD\n"
        assert resp.header("connection") == "close"
        assert not resp.has("content-length")


class Buffering(ProxyHttp):
    """Holds the whole response body back and emits it reversed at the end."""

    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def response_body_filter(self, session, body, end_of_stream, ctx):
        ctx.setdefault("parts", []).append(body)
        if end_of_stream:
            return b"".join(ctx["parts"])[::-1]
        return None


def test_response_body_filter_may_buffer_and_emit_at_the_end(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Buffering)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"\ndlrow olleh")
        resp = client.request("GET", "/big?size=200000")
        assert digest(resp.body) == digest(pattern_bytes(200_000)[::-1])
        resp = client.request("GET", "/chunked?n=3&size=2")
        assert resp.body == b"xxxxxx"


class UpperDeny(Upper):
    def request_filter(self, session, ctx):
        if session.req_header.path == "/admin":
            session.send_response(403, b"forbidden\n")
            return True
        return False


def test_hook_written_response_is_not_body_filtered(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, UpperDeny)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/admin")
    assert resp.status == 403
    assert resp.header("content-length") == "10"
    assert resp.body == b"forbidden\n"


class RewriteRequestBody(ProxyHttp):
    """Replaces every ``a`` of the request body by ``b`` and appends a marker at the end."""

    def __init__(self, address: str) -> None:
        self.address = address

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def request_body_filter(self, session, body, end_of_stream, ctx):
        if end_of_stream:
            return b"<end>"
        return body.replace(b"a", b"b")


@pytest.mark.parametrize("size", [10, 200_000])
def test_request_body_filter_rewrites_the_body_sent_upstream(
    mode, origin: OriginServer, start_proxy, size: int
) -> None:
    harness = start_proxy(variant(mode, RewriteRequestBody)(origin.address))
    payload = (b"abcab" * (size // 5 + 1))[:size]
    with httpx.Client(base_url=harness.url, timeout=5) as client:
        resp = client.post("/echo", content=payload)
    expected = payload.replace(b"a", b"b") + b"<end>"
    assert resp.status_code == 200
    assert digest(resp.content) == digest(expected)
    assert resp.headers["x-body-length"] == str(len(expected))
    (_, path, headers) = origin.requests[0]
    lower = {k.lower(): v for k, v in headers}
    assert lower.get("transfer-encoding") == "chunked"  # the length may have changed
    assert "content-length" not in lower


def test_request_body_filter_with_chunked_client_body(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, RewriteRequestBody)(origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
            + b"3\r\naaa\r\n4\r\nxyza\r\n0\r\n\r\n"
        )
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"bbbxyzb<end>")
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
