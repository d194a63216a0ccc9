"""End to end: upstream failures become 502/504, timeouts are idle timeouts, tunnels work."""

from __future__ import annotations

import socket
import time

import pytest
from e2e_util import (
    ProxyProcess,
    RawConn,
    ScriptedOrigin,
    StartFerryman,
    raw_exchange,
    read_request_head,
)

from origin import OriginServer, free_port


def assert_still_serving(proxy: ProxyProcess) -> None:
    resp, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False)
    assert (resp.status, resp.body) == (200, b"hello world\n")


def test_dead_upstream_is_502(ferryman: StartFerryman) -> None:
    proxy = ferryman(f"127.0.0.1:{free_port()}")  # nobody listens there
    for _ in range(2):
        resp, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False)
        assert resp.head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_upstream_slower_than_read_timeout_is_504(shared_proxy: ProxyProcess) -> None:
    start = time.monotonic()
    resp, _ = raw_exchange(
        shared_proxy.port, b"GET /slow?ms=3000 HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
    )
    assert resp.head.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert time.monotonic() - start < 2.9  # answered at the read timeout, not at 3 s
    assert_still_serving(shared_proxy)


def test_upstream_within_read_timeout_is_fine(shared_proxy: ProxyProcess) -> None:
    resp, _ = raw_exchange(
        shared_proxy.port, b"GET /slow?ms=300 HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
    )
    assert (resp.status, resp.body) == (200, b"slow")


def test_garbage_from_upstream_is_502(shared_proxy: ProxyProcess) -> None:
    resp, _ = raw_exchange(
        shared_proxy.port, b"GET /garbage HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
    )
    assert resp.head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert_still_serving(shared_proxy)


@pytest.fixture
def scripted() -> list[ScriptedOrigin]:
    started: list[ScriptedOrigin] = []
    yield started  # type: ignore[misc]
    for origin in started:
        origin.stop()


def test_upstream_closing_without_response_is_502(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    def close_at_once(conn: socket.socket) -> None:
        read_request_head(conn)

    origin = ScriptedOrigin(close_at_once)
    scripted.append(origin)
    proxy = ferryman(origin.address)
    resp, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False)
    assert resp.head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_truncated_upstream_body_closes_the_client_connection(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    def truncate(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"t" * 40)
        time.sleep(0.2)

    origin = ScriptedOrigin(truncate)
    scripted.append(origin)
    proxy = ferryman(origin.address)
    with RawConn(proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head, status, _, _, headers = conn.read_head()
        assert status == 200
        rest = conn.read_to_eof()  # the proxy must close: the client sees the truncation
        assert rest == b"t" * 40


def test_read_timeout_is_an_idle_timeout(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    def trickle(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            time.sleep(0.4)  # 2 s in total, but never 1 s without a byte
            conn.sendall(b"2\r\nok\r\n")
        conn.sendall(b"0\r\n\r\n")
        time.sleep(0.2)

    origin = ScriptedOrigin(trickle)
    scripted.append(origin)
    proxy = ferryman(origin.address)  # read: 1s
    with RawConn(proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"ok" * 5)


def test_slow_steady_upload_longer_than_read_timeout(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n")
        try:
            for _ in range(8):  # 2.4 s in all; body_read (60 s) is never at risk
                conn.send(b"u")
                time.sleep(0.3)
        except OSError:
            pass
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"u" * 8)


def test_switching_protocols_tunnel(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    def upgrade_then_echo(conn: socket.socket) -> None:
        head = read_request_head(conn)
        assert b"upgrade: echo" in head.lower(), head
        rest = head.split(b"\r\n\r\n", 1)[1]
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        if rest:
            conn.sendall(rest.upper())
        while data := conn.recv(65536):
            conn.sendall(data.upper())

    origin = ScriptedOrigin(upgrade_then_echo)
    scripted.append(origin)
    proxy = ferryman(origin.address)
    with RawConn(proxy.port, timeout=5) as conn:
        conn.send(
            b"GET /tunnel HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        resp = conn.read_response(skip_interim=False)
        assert resp.status == 101
        assert resp.header("upgrade") == b"echo"
        for word in (b"hello", b"tunnel", b"bytes"):
            conn.send(word)
            assert conn.read_exact(len(word)) == word.upper()


def test_origin_connection_count_for_sequential_clients(
    origin: OriginServer, ferryman: StartFerryman
) -> None:
    proxy = ferryman(origin.address)
    for _ in range(5):
        assert_still_serving(proxy)
    assert origin.connections == 1


def test_pooled_connection_closed_by_origin_while_idle(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    def one_then_close(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.1)  # then an idle timeout on the origin side

    origin = ScriptedOrigin(one_then_close)
    scripted.append(origin)
    proxy = ferryman(origin.address)
    with RawConn(proxy.port, timeout=5) as conn:
        for _ in range(3):
            conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"ok")
            time.sleep(0.4)
    assert origin.connections == 3


def test_reused_connection_closed_before_answering_is_retried(
    ferryman: StartFerryman, scripted: list[ScriptedOrigin]
) -> None:
    """The keep-alive race: the origin closes a pooled connection just as the proxy reuses
    it. Nothing of the response was received, so the proxy may retry on a new connection."""
    first = [True]

    def racy(conn: socket.socket) -> None:
        is_first, first[0] = first[0], False
        answered = 0
        while read_request_head(conn):
            if is_first and answered:
                return  # the second request on the first connection: close, no answer
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            answered += 1

    origin = ScriptedOrigin(racy)
    scripted.append(origin)
    proxy = ferryman(origin.address)
    with RawConn(proxy.port, timeout=5) as conn:
        for _ in range(2):
            conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"ok")
    assert origin.connections == 2
