"""Request limits (ProxyOptions.limits): 414, 431, 413 with exact statuses, on raw sockets."""

from __future__ import annotations

import time

import pytest
from server_util import PROXY_MODES, RawClient, StartHarness, request_bytes

from ferryman import HttpPeer, ProxyOptions
from ferryman.protocols.h1 import RequestLimits
from harness import ProxyHarness
from origin import OriginServer

LIMITS = RequestLimits(max_request_line=256, max_header_bytes=512, max_headers=8, max_body=100)


@pytest.fixture(params=sorted(PROXY_MODES))
def proxy(
    request: pytest.FixtureRequest, origin: OriginServer, start_proxy: StartHarness
) -> ProxyHarness:
    options = ProxyOptions(limits=LIMITS, header_read_timeout=5, body_read_timeout=5)
    return start_proxy(PROXY_MODES[request.param](HttpPeer(origin.address)), options)


def exchange(port: int, *parts: bytes) -> bytes:
    """Send ``parts`` (pausing between them) and read everything until the proxy closes."""
    with RawClient(port, timeout=5) as client:
        for i, part in enumerate(parts):
            if i:
                time.sleep(0.1)
            try:
                client.send(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        return client.read_to_eof()


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12])


def assert_rejected(data: bytes, status: int) -> None:
    assert status_of(data) == status, data[:300]
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nConnection: close" in head
    assert data.count(b"HTTP/1.1 ") == 1  # one response, then the connection closed


def test_within_limits_is_200(proxy: ProxyHarness, origin: OriginServer) -> None:
    path = "/echo?" + "p" * (256 - len("GET /echo? HTTP/1.1") - 10)
    headers = {f"X-H{i}": "v" for i in range(5)}  # 5 + Host + Content-Length + Connection
    headers["Content-Length"] = "100"
    headers["Connection"] = "close"
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes(path, headers, "POST") + b"b" * 100)
        resp = client.read_response()
    assert resp.status == 200
    assert resp.body == b"b" * 100


def test_request_line_too_long_is_414(proxy: ProxyHarness, origin: OriginServer) -> None:
    data = exchange(proxy.port, request_bytes("/" + "a" * 300))
    assert_rejected(data, 414)
    assert origin.requests == []


def test_request_line_too_long_arriving_slowly_is_414(proxy: ProxyHarness) -> None:
    data = exchange(proxy.port, b"GET /" + b"a" * 200, b"a" * 200, b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert_rejected(data, 414)


def test_header_bytes_over_limit_is_431(proxy: ProxyHarness, origin: OriginServer) -> None:
    data = exchange(proxy.port, request_bytes("/", {"X-Big": "v" * 600}))
    assert_rejected(data, 431)
    assert origin.requests == []


def test_header_bytes_over_limit_in_pieces_is_431(proxy: ProxyHarness) -> None:
    head = request_bytes("/", {f"X-Part{i}": "v" * 80 for i in range(7)})
    assert len(head) > 512
    data = exchange(proxy.port, head[:200], head[200:400], head[400:])
    assert_rejected(data, 431)


def test_too_many_headers_is_431(proxy: ProxyHarness, origin: OriginServer) -> None:
    data = exchange(proxy.port, request_bytes("/", {f"X-N{i}": "1" for i in range(10)}))
    assert_rejected(data, 431)
    assert origin.requests == []


def test_content_length_over_max_body_is_413(proxy: ProxyHarness, origin: OriginServer) -> None:
    data = exchange(
        proxy.port, request_bytes("/echo", {"Content-Length": "101"}, "POST") + b"x" * 101
    )
    assert_rejected(data, 413)
    assert origin.requests == []


def test_content_length_over_max_body_without_sending_it_is_413(proxy: ProxyHarness) -> None:
    data = exchange(proxy.port, request_bytes("/echo", {"Content-Length": "1000000"}, "POST"))
    assert_rejected(data, 413)


def chunked(body: bytes, size: int = 50) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def test_chunked_body_within_max_body_is_200(proxy: ProxyHarness) -> None:
    head = request_bytes("/echo", {"Transfer-Encoding": "chunked", "Connection": "close"}, "POST")
    with RawClient(proxy.port, timeout=5) as client:
        client.send(head + chunked(b"c" * 100))
        resp = client.read_response()
    assert resp.status == 200
    assert resp.body == b"c" * 100


def test_chunked_body_over_max_body_sent_after_the_head_is_413(proxy: ProxyHarness) -> None:
    head = request_bytes("/echo", {"Transfer-Encoding": "chunked"}, "POST")
    data = exchange(proxy.port, head, chunked(b"c" * 150))
    assert_rejected(data, 413)


def test_chunked_body_over_max_body_in_small_chunks_is_413(proxy: ProxyHarness) -> None:
    head = request_bytes("/echo", {"Transfer-Encoding": "chunked"}, "POST")
    body = chunked(b"c" * 150, size=30)
    data = exchange(proxy.port, head, body[:40], body[40:80], body[80:])
    assert_rejected(data, 413)


def test_chunked_body_over_max_body_in_the_same_packet_as_the_head_is_413(
    proxy: ProxyHarness,
) -> None:
    head = request_bytes("/echo", {"Transfer-Encoding": "chunked"}, "POST")
    with RawClient(proxy.port, timeout=5) as client:
        client.send(head + chunked(b"c" * 150))
        data = client.read_to_eof()  # (once a hang: the error was never answered)
    assert_rejected(data, 413)


def test_connection_with_a_bad_body_in_the_head_packet_is_not_leaked(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    """Once, the session of such a request never started and the paused connection was
    held forever, even after the client left."""
    options = ProxyOptions(
        limits=LIMITS, header_read_timeout=0.5, body_read_timeout=0.5, keepalive_timeout=0.5
    )
    proxy = start_proxy(PROXY_MODES["sync"](HttpPeer(origin.address)), options)
    head = request_bytes("/echo", {"Transfer-Encoding": "chunked"}, "POST")
    with RawClient(proxy.port, timeout=5) as client:
        client.send(head + chunked(b"c" * 150))
        assert_rejected(client.read_to_eof(), 413)
    # the client is gone and every timeout has passed: the proxy must have let go of it
    assert wait_for_zero(lambda: proxy.call(lambda: len(proxy.service.connections)), 2.0)


def wait_for_zero(fn, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while fn() != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
