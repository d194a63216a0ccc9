"""CONNECT tunnels and WebSocket (HTTP/1.1 Upgrade) through the proxy."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from proxy_util import (
    RawClient,
    TcpServer,
    build_request,
    digest,
    echo_handler,
    read_http_request,
    variant,
)
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from ferryman import ErrorKind, HttpPeer, ProxyError, ProxyHttp
from origin import OriginServer

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# --------------------------------------------------------------------------------------
# CONNECT


class Plain(ProxyHttp):
    """Forwards everything to one peer; CONNECT is left at its default (refused)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.logged: list[tuple[str, int, ProxyError | None]] = []
        self.peers_asked = 0

    def upstream_peer(self, session, ctx):
        self.peers_asked += 1
        return HttpPeer(self.address)

    def logging(self, session, error, ctx):
        self.logged.append((session.req_header.method, session.status, error))


class AllowConnect(Plain):
    """Tunnels CONNECT requests to the authority they name."""

    def request_filter(self, session, ctx):
        if session.req_header.method == "CONNECT":
            session.allow_connect = True
        return False

    def upstream_peer(self, session, ctx):
        self.peers_asked += 1
        if session.req_header.method == "CONNECT":
            return HttpPeer(session.req_header.path)
        return HttpPeer(self.address)


def _connect_request(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def test_connect_is_refused_with_405_by_default(
    mode, origin: OriginServer, echo_server: TcpServer, start_proxy
) -> None:
    proxy = variant(mode, Plain)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(_connect_request(echo_server.address))
        resp = client.read_response()
        assert resp.status == 405
        assert resp.body == b""
    harness.call(lambda: None)
    assert echo_server.accepted == 0
    assert proxy.peers_asked == 0
    method, status, error = proxy.logged[0]
    assert (method, status) == ("CONNECT", 405)
    assert error is not None and error.kind is ErrorKind.METHOD_NOT_ALLOWED


def test_connect_refusal_closes_the_connection(mode, origin, echo_server, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(origin.address))
    with RawClient(harness.port, timeout=1.0) as client:
        client.send(_connect_request(echo_server.address))
        resp = client.read_response()
        assert resp.status == 405
        assert resp.header("connection") == "close"
        assert client.at_eof()


def test_bytes_after_a_refused_connect_are_never_proxied(
    mode, origin, echo_server, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Plain)(origin.address))
    with RawClient(harness.port, timeout=1.0) as client:
        client.send(_connect_request(echo_server.address))
        assert client.read_response().status == 405
        try:
            client.send(build_request("GET", "/smuggled"))
            client.read_to_eof()
        except OSError:
            pass
    harness.call(lambda: None)
    assert origin.requests == []


def test_connect_tunnel_echoes_bytes(mode, origin, echo_server, start_proxy) -> None:
    proxy = variant(mode, AllowConnect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(_connect_request(echo_server.address))
        assert client.read_exact(len(ESTABLISHED)) == ESTABLISHED
        for message in (b"ping", b"hello through the tunnel", b"\x00\xff" * 10):
            client.send(message)
            assert client.read_exact(len(message)) == message
        big = os.urandom(1 << 20)
        sender = threading.Thread(target=client.send, args=(big,))
        sender.start()
        assert digest(client.read_exact(len(big))) == digest(big)
        sender.join(5)
        # half-close: the echo server sees EOF, closes its side, the client sees EOF
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_to_eof() == b""
    harness.call(lambda: None)
    assert echo_server.accepted == 1
    assert proxy.logged[0][:2] == ("CONNECT", 200)
    assert proxy.logged[0][2] is None


def test_connect_with_early_data_in_the_head_packet(mode, origin, echo_server, start_proxy):
    proxy = variant(mode, AllowConnect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(_connect_request(echo_server.address) + b"early bytes")
        assert client.read_exact(len(ESTABLISHED)) == ESTABLISHED
        assert client.read_exact(len(b"early bytes")) == b"early bytes"
        client.send(b"late")
        assert client.read_exact(4) == b"late"


def test_connect_to_a_dead_peer_is_502(mode, origin, dead_port, start_proxy) -> None:
    proxy = variant(mode, AllowConnect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(_connect_request(f"127.0.0.1:{dead_port}"))
        resp = client.read_response()
        assert resp.status == 502
    # plain requests still work
    with RawClient(harness.port) as client:
        assert client.request("GET", "/").status == 200


def test_two_tunnels_at_once(mode, origin, echo_server, start_proxy) -> None:
    proxy = variant(mode, AllowConnect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as a, RawClient(harness.port) as b:
        for c in (a, b):
            c.send(_connect_request(echo_server.address))
            assert c.read_exact(len(ESTABLISHED)) == ESTABLISHED
        for i in range(5):
            a.send(b"A%d" % i)
            b.send(b"B%d" % i)
            assert a.read_exact(2) == b"A%d" % i
            assert b.read_exact(2) == b"B%d" % i


# --------------------------------------------------------------------------------------
# WebSocket


class WsOrigin:
    """A real ``websockets`` echo server in a thread."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.closed_codes: list[int | None] = []
        self.headers: list[Any] = []
        self.server = ws_serve(self._handler, "127.0.0.1", 0, max_size=4 << 20)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self, ws: ServerConnection) -> None:
        self.paths.append(ws.request.path)
        self.headers.append(ws.request.headers)
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed_codes.append(ws.close_code)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.socket.getsockname()[1]}"

    def start(self) -> WsOrigin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def ws_origin() -> Iterator[WsOrigin]:
    server = WsOrigin().start()
    yield server
    server.stop()


def test_websocket_handshake_through_the_proxy(mode, ws_origin: WsOrigin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(ws_origin.address))
    key = base64.b64encode(os.urandom(16)).decode()
    accept = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()
    with RawClient(harness.port) as client:
        client.send(
            build_request(
                "GET",
                "/ws",
                headers=[
                    *UPGRADE,
                    ("Sec-WebSocket-Key", key),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        head = client.read_head()
    assert head.status == 101
    assert head.header("upgrade") == "websocket"
    assert head.header("connection").lower() == "upgrade"
    assert head.header("sec-websocket-accept") == accept
    assert not head.has("content-length") and not head.has("transfer-encoding")


def test_websocket_through_the_proxy(mode, ws_origin: WsOrigin, start_proxy) -> None:
    proxy = variant(mode, Plain)(ws_origin.address)
    harness = start_proxy(proxy)
    big = os.urandom(1 << 20)
    with ws_connect(
        f"ws://127.0.0.1:{harness.port}/chat?room=1",
        max_size=4 << 20,
        open_timeout=5,
        close_timeout=5,
    ) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01\x02binary")
        assert ws.recv(timeout=5) == b"\x00\x01\x02binary"
        ws.send("ünïcödé ✓")
        assert ws.recv(timeout=5) == "ünïcödé ✓"
        ws.send(big)
        assert digest(ws.recv(timeout=5)) == digest(big)
        for i in range(20):
            ws.send(f"msg {i}")
        assert [ws.recv(timeout=5) for _ in range(20)] == [f"msg {i}" for i in range(20)]
        ws.close()
        assert ws.close_code == 1000
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)
    harness.call(lambda: None)
    assert ws_origin.paths == ["/chat?room=1"]
    # the upgrade headers the client sent were forwarded to the origin
    assert ws_origin.headers[0]["Upgrade"].lower() == "websocket"
    assert ws_origin.headers[0]["Sec-WebSocket-Key"]
    # the proxy logged the exchange once, as a 101 without error
    _wait_for(lambda: len(proxy.logged) == 1, harness)
    assert proxy.logged == [("GET", 101, None)]


def test_two_websockets_at_once(mode, ws_origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(ws_origin.address))
    url = f"ws://127.0.0.1:{harness.port}/"
    with ws_connect(url, open_timeout=5) as a, ws_connect(url, open_timeout=5) as b:
        for i in range(10):
            a.send(f"a{i}")
            b.send(f"b{i}")
        assert [a.recv(timeout=5) for _ in range(10)] == [f"a{i}" for i in range(10)]
        assert [b.recv(timeout=5) for _ in range(10)] == [f"b{i}" for i in range(10)]


def _wait_for(cond: Any, harness: Any, tries: int = 100) -> None:
    import time

    for _ in range(tries):
        harness.call(lambda: None)
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "websocket")]


def test_refused_upgrade_is_answered_and_keep_alive_continues(
    mode, origin: OriginServer, start_proxy
) -> None:
    harness = start_proxy(variant(mode, Plain)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/", headers=UPGRADE)
        assert (resp.status, resp.body) == (200, b"hello world\n")
        assert not resp.has("upgrade")
        resp = client.request("POST", "/echo", b"after the upgrade")
        assert (resp.status, resp.body) == (200, b"after the upgrade")
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
    # the origin saw the upgrade request (with its Upgrade header) and the next ones
    seen = [(m, p) for m, p, _ in origin.requests]
    assert seen == [("GET", "/"), ("POST", "/echo"), ("GET", "/")]
    first = {k.lower(): v for k, v in origin.requests[0][2]}
    assert first.get("upgrade") == "websocket"


def test_refused_upgrade_then_request_in_a_later_packet(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(origin.address))
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/", headers=UPGRADE))
        first = client.read_response()
        client.send(build_request("POST", "/echo", b"next"))
        second = client.read_response()
    assert (first.status, first.body) == (200, b"hello world\n")
    assert (second.status, second.body) == (200, b"next")


def test_refused_upgrade_then_pipelined_request(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(origin.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("GET", "/", headers=UPGRADE) + build_request("POST", "/echo", b"next")
        )
        first = client.read_response()
        second = client.read_response()
    assert (first.status, first.body) == (200, b"hello world\n")
    assert (second.status, second.body) == (200, b"next")


def test_websocket_refused_by_a_plain_origin_via_websockets_client(
    mode, origin, start_proxy
) -> None:
    from websockets.exceptions import InvalidStatus

    harness = start_proxy(variant(mode, Plain)(origin.address))
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"ws://127.0.0.1:{harness.port}/", open_timeout=5)
    assert info.value.response.status_code == 200


# --------------------------------------------------------------------------------------
# raw upgrades


def _switch_then_echo(conn: socket.socket) -> None:
    """Answers any request with 101 plus server-first bytes, then echoes."""
    read_http_request(conn)
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nHELLO"
    )
    echo_handler(conn)


@pytest.fixture
def switching_server() -> Iterator[TcpServer]:
    server = TcpServer(_switch_then_echo).start()
    yield server
    server.stop()


def test_upgrade_with_server_first_bytes(mode, switching_server, start_proxy) -> None:
    harness = start_proxy(variant(mode, Plain)(switching_server.address))
    with RawClient(harness.port) as client:
        client.send(
            build_request("GET", "/", headers=[("Connection", "Upgrade"), ("Upgrade", "foo")])
        )
        head = client.read_head()
        assert head.status == 101
        assert head.header("upgrade") == "foo"
        assert client.read_exact(5) == b"HELLO"
        for data in (b"ping", b"x" * 100_000):
            client.send(data)
            assert client.read_exact(len(data)) == data
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_to_eof() == b""


def test_unrequested_101_is_a_bad_gateway(mode, switching_server, start_proxy) -> None:
    proxy = variant(mode, Plain)(switching_server.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/")  # no Upgrade asked for
        assert resp.status == 502
    harness.call(lambda: None)
    error = proxy.logged[0][2]
    assert error is not None and error.kind is ErrorKind.INVALID_RESPONSE


class CountingEcho(TcpServer):
    def __init__(self) -> None:
        self.finished = threading.Event()
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        try:
            echo_handler(conn)
        finally:
            self.finished.set()


def test_client_closing_a_tunnel_closes_the_upstream_side(mode, origin, start_proxy) -> None:
    echo = CountingEcho().start()
    try:
        harness = start_proxy(variant(mode, AllowConnect)(origin.address))
        client = RawClient(harness.port)
        client.send(_connect_request(echo.address))
        assert client.read_exact(len(ESTABLISHED)) == ESTABLISHED
        client.send(b"abc")
        assert client.read_exact(3) == b"abc"
        client.close()  # a full close, not a half-close
        assert echo.finished.wait(5), "the upstream side of the tunnel was left open"
    finally:
        echo.stop()
