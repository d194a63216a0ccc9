"""Downstream timeouts (ProxyOptions): header read, keep-alive idle, body read."""

from __future__ import annotations

import socket
import time

import pytest
from server_util import (
    PROXY_MODES,
    RawClient,
    ServerPki,
    StartHarness,
    SyncProxy,
    request_bytes,
)

from ferryman import HttpPeer, Listener, ListenerTls, ProxyOptions
from origin import OriginServer

SHORT = ProxyOptions(header_read_timeout=0.5, keepalive_timeout=0.5, body_read_timeout=0.5)


@pytest.fixture(params=sorted(PROXY_MODES))
def proxy(request: pytest.FixtureRequest, origin: OriginServer, start_proxy: StartHarness):  # type: ignore[no-untyped-def]
    return start_proxy(PROXY_MODES[request.param](HttpPeer(origin.address)), SHORT)


def read_all_until_close(client: RawClient) -> tuple[bytes, float]:
    started = time.monotonic()
    data = client.read_to_eof()
    return data, time.monotonic() - started


def test_partial_head_then_stall_gets_408_and_close(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Partial: ")
        data, elapsed = read_all_until_close(client)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nConnection: close\r\n" in data
    assert 0.3 <= elapsed < 3.0


def test_head_trickled_byte_by_byte_still_times_out(proxy) -> None:  # type: ignore[no-untyped-def]
    """The header timeout bounds the whole head, not the gap between bytes (slowloris)."""
    head = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: " + b"a" * 100 + b"\r\n\r\n"
    with RawClient(proxy.port, timeout=5) as client:
        started = time.monotonic()
        for i in range(len(head) - 2):  # never complete the head
            try:
                client.send(head[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3.0:
                break
        data = client.read_to_eof()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 4.0


def test_silent_connection_is_closed_without_response(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        data, elapsed = read_all_until_close(client)
    assert data == b""
    assert 0.3 <= elapsed < 3.0


def test_idle_keepalive_connection_is_closed(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/"))
        resp = client.read_response()
        assert resp.status == 200
        assert resp.header("connection") != "close"
        data, elapsed = read_all_until_close(client)
    assert data == b""
    assert 0.3 <= elapsed < 3.0


def test_keepalive_connection_used_within_the_timeout_stays_open(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        for _ in range(4):  # 4 × 0.2 s: longer than any of the timeouts in total
            client.send(request_bytes("/"))
            assert client.read_response().status == 200
            time.sleep(0.2)
        client.send(request_bytes("/", {"Connection": "close"}))
        assert client.read_response().status == 200


def test_slow_upstream_is_not_cut_by_downstream_timeouts(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/slow?ms=900"))
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"slow")


def test_body_stall_gets_408(proxy, origin: OriginServer) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/echo", {"Content-Length": "100"}, "POST") + b"x" * 10)
        data, elapsed = read_all_until_close(client)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.3 <= elapsed < 3.0


def test_body_stall_after_head_only_gets_408(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/echo", {"Content-Length": "100"}, "POST"))
        time.sleep(0.1)
        client.send(b"y" * 10)
        data, _ = read_all_until_close(client)
    assert data.startswith(b"HTTP/1.1 408 ")


def test_slow_but_steady_body_is_not_a_timeout(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    """``body_read_timeout`` is the longest gap between reads, not a total budget."""
    proxy = start_proxy(SyncProxy(HttpPeer(origin.address)), SHORT)
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/echo", {"Content-Length": "25"}, "POST"))
        for _ in range(5):  # 5 × 0.2 s = 1 s in total, gaps of 0.2 s
            time.sleep(0.2)
            client.send(b"abcde")
        resp = client.read_response()
    assert resp.status == 200
    assert resp.body == b"abcde" * 5


def test_partial_second_request_on_keepalive_gets_408(proxy) -> None:  # type: ignore[no-untyped-def]
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/"))
        assert client.read_response().status == 200
        client.send(b"GET /again HTTP/1.1\r\nHost")
        data, elapsed = read_all_until_close(client)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.3 <= elapsed < 3.0


def test_partial_head_pipelined_with_a_request_gets_408(proxy) -> None:  # type: ignore[no-untyped-def]
    # the second head starts in the same write as the first request: its header timeout
    # runs from when the first response is done, not never
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/") + b"GET / HTTP/1.1\r\nHo")
        first = client.read_response()
        assert first.status == 200
        data, elapsed = read_all_until_close(client)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.3 <= elapsed < 3.0


def test_client_not_reading_the_response_is_dropped(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    """body_write_timeout: a client that stops reading a large response is disconnected
    and the upstream connection is not kept."""
    options = ProxyOptions(body_write_timeout=0.5)
    proxy = start_proxy(SyncProxy(HttpPeer(origin.address)), options)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        sock.sendall(request_bytes("/big?size=67108864"))
        first = sock.recv(100)
        assert first.startswith(b"HTTP/1.1 200 ")
        # now never read again: the proxy's write buffer fills, then the timeout fires

        def gone() -> bool:
            return proxy.call(lambda: len(proxy.service.connections)) == 0

        deadline = time.monotonic() + 8
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone()
        assert proxy.call(lambda: len(proxy.service.connector.open)) == 0
    finally:
        sock.close()


@pytest.mark.parametrize("first_bytes", [b"", b"\x16\x03\x01\x02\x00"], ids=["nothing", "hello"])
def test_silent_tls_client_is_closed_by_the_header_timeout(
    first_bytes: bytes, origin: OriginServer, start_proxy: StartHarness, server_pki: ServerPki
) -> None:
    listener = Listener(
        "127.0.0.1:0", tls=ListenerTls(server_pki.default_cert, server_pki.default_key)
    )
    proxy = start_proxy(SyncProxy(HttpPeer(origin.address)), SHORT, [listener])
    with RawClient(proxy.port, timeout=2) as client:
        if first_bytes:
            client.send(first_bytes)
        started = time.monotonic()
        client.read_to_eof()  # TimeoutError while the proxy holds the connection
    assert time.monotonic() - started < 2.0
