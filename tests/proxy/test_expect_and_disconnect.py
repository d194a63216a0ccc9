"""Expect: 100-continue, early rejection of uploads, and clients that leave mid-response."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import httpx
import pytest
from proxy_util import RawClient, build_request, digest, variant

from ferryman import ErrorKind, HttpPeer, ProxyError, ProxyHttp
from origin import OriginServer, pattern_bytes

LIMIT = 1000


class Uploads(ProxyHttp):
    """Rejects uploads announced larger than LIMIT with 413, before reading them."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.logged: list[tuple[str, int, ProxyError | None, int, int]] = []

    def request_filter(self, session, ctx):
        length = session.req_header.headers.get("content-length")
        if length is not None and int(length) > LIMIT:
            session.send_response(413, b"too large\n")
            return True
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.logged.append(
            (
                session.req_header.path,
                session.status,
                error,
                session.request_body_bytes,
                session.response_body_bytes,
            )
        )


class AsyncUploads(Uploads):
    async def request_filter(self, session, ctx):
        await asyncio.sleep(0.05)  # decides after a wait: no 100 Continue may go out before
        length = session.req_header.headers.get("content-length")
        if length is not None and int(length) > LIMIT:
            await session.respond(413, b"too large\n")
            return True
        return False

    async def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


def _expect_head(path: str, length: int) -> bytes:
    return build_request(
        "POST", path, headers=[("Content-Length", str(length)), ("Expect", "100-continue")]
    )


def test_expect_100_continue(mode, origin: OriginServer, start_proxy) -> None:
    harness = start_proxy(variant(mode, Uploads, AsyncUploads)(origin.address))
    body = b"c" * LIMIT
    with RawClient(harness.port) as client:
        client.send(_expect_head("/echo", len(body)))
        # the interim response comes before any body byte was sent
        interim = client.read_head()
        assert (interim.status, interim.reason) == (100, "Continue")
        assert interim.headers == []
        client.send(body)
        resp = client.read_response("POST")
        assert (resp.status, resp.body) == (200, body)
        # keep-alive continues, and a second 100-continue exchange works too
        client.send(_expect_head("/echo", 3))
        assert client.read_head().status == 100
        client.send(b"abc")
        resp = client.read_response("POST")
        assert (resp.status, resp.body) == (200, b"abc")
    # Expect is hop-by-hop for the proxy: the origin never saw it
    for _, _, headers in origin.requests:
        assert "expect" not in {k.lower() for k, _ in headers}


def test_no_100_continue_without_expect(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Uploads, AsyncUploads)(origin.address))
    with RawClient(harness.port) as client:
        client.send(build_request("POST", "/echo", b"abc"))
        resp = client.read_response("POST", skip_interim=False)
        assert (resp.status, resp.body) == (200, b"abc")


def test_expect_100_continue_rejected_by_request_filter(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Uploads, AsyncUploads)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(_expect_head("/upload", 10_000_000))
        # the final answer comes instead of 100 Continue; the body is never sent
        resp = client.read_response("POST", skip_interim=False)
        assert resp.status == 413
        assert resp.body == b"too large\n"
        # the unread body leaves the framing in doubt: the proxy closes the connection
        assert client.at_eof()
    harness.call(lambda: None)
    assert origin.requests == []
    assert origin.connections == 0
    assert proxy.logged == [("/upload", 413, None, 0, len(b"too large\n"))]


def test_early_rejection_announces_connection_close(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Uploads, AsyncUploads)(origin.address))
    with RawClient(harness.port) as client:
        client.send(_expect_head("/upload", 10_000_000))
        resp = client.read_response("POST", skip_interim=False)
    assert resp.status == 413
    assert resp.header("connection") == "close"


def test_rejected_upload_with_body_already_sent_closes(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Uploads, AsyncUploads)(origin.address))
    with RawClient(harness.port) as client:
        # no Expect: the client sends a part of the body right away
        client.send(build_request("POST", "/upload", headers=[("Content-Length", "5000")]))
        client.send(b"x" * 2000)
        resp = client.read_response("POST")
        assert resp.status == 413
        assert client.at_eof()
    assert origin.requests == []


# --------------------------------------------------------------------------------------
# a client that leaves in the middle of a response


class Watch(ProxyHttp):
    def __init__(self, address: str) -> None:
        self.address = address
        self.logged: list[tuple[str, ProxyError | None, int]] = []

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.logged.append((session.req_header.path, error, session.response_body_bytes))


def _wait_until(cond: Any, harness: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        harness.call(lambda: None)
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _abandon_download(port: int, size: int, read: int, reset: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(build_request("GET", f"/big?size={size}"))
        got = 0
        while got < read:
            data = sock.recv(65536)
            assert data, "EOF too early"
            got += len(data)
        if reset:  # RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_leaving_mid_download_does_not_poison_the_pool(
    mode, origin: OriginServer, start_proxy, reset: bool
) -> None:
    proxy = variant(mode, Watch)(origin.address)
    harness = start_proxy(proxy)
    # warm the pool: one clean upstream connection
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/big?size=1000")
        assert resp.body == pattern_bytes(1000)
    assert origin.connections == 1

    _abandon_download(harness.port, 50_000_000, 100_000, reset)
    _wait_until(lambda: len(proxy.logged) == 2, harness)
    path, error, sent = proxy.logged[1]
    assert path == "/big?size=50000000"
    assert isinstance(error, ProxyError)
    assert error.kind is ErrorKind.CLIENT_CLOSED
    assert 100_000 <= sent < 50_000_000

    # the abandoned upstream connection was dropped, not pooled with half a body in it
    with RawClient(harness.port) as client:
        for size in (1, 70_000, 1_000_000):
            resp = client.request("GET", f"/big?size={size}")
            assert resp.status == 200
            assert digest(resp.body) == digest(pattern_bytes(size))
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
        resp = client.request("POST", "/echo", b"still fine")
        assert (resp.status, resp.body) == (200, b"still fine")
    with httpx.Client(base_url=harness.url, timeout=5) as http:
        for _ in range(3):
            r = http.get("/big", params={"size": 200_000})
            assert r.status_code == 200
            assert digest(r.content) == digest(pattern_bytes(200_000))
    _wait_until(lambda: len(proxy.logged) == 10, harness)
    # the warm connection carried the abandoned download and was aborted; one fresh
    # connection, pooled and reused, served everything after
    assert origin.connections == 2
    assert [e for _, e, _ in proxy.logged[2:]] == [None] * 8


def test_several_abandoned_downloads_in_a_row(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Watch)(origin.address)
    harness = start_proxy(proxy)
    for i in range(3):
        _abandon_download(harness.port, 20_000_000, 50_000, reset=bool(i % 2))
        with RawClient(harness.port) as client:
            resp = client.request("GET", "/big?size=300000")
            assert digest(resp.body) == digest(pattern_bytes(300_000))
    _wait_until(lambda: len(proxy.logged) == 6, harness)
    kinds = [e.kind if e else None for _, e, _ in proxy.logged]
    assert kinds == [ErrorKind.CLIENT_CLOSED, None] * 3


def test_client_resetting_before_the_response_head(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Watch)(origin.address)
    harness = start_proxy(proxy)
    sock = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
    sock.sendall(build_request("GET", "/slow?ms=300"))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _wait_until(lambda: len(proxy.logged) == 1, harness)
    error = proxy.logged[0][1]
    assert error is not None and error.kind is ErrorKind.CLIENT_CLOSED
    with RawClient(harness.port) as client:
        for _ in range(3):
            resp = client.request("GET", "/")
            assert (resp.status, resp.body) == (200, b"hello world\n")


def test_half_closed_client_still_gets_its_response(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Watch)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/slow?ms=100"))
        client.sock.shutdown(socket.SHUT_WR)
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"slow")
        assert client.at_eof()
    _wait_until(lambda: len(proxy.logged) == 1, harness)
    assert proxy.logged[0][1] is None
