"""The upstream connection pool: reuse, counters, max_idle, idle_timeout, dead connections."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest
from upstream_util import (
    PROXY_MODES,
    ByHeaderProxy,
    RawClient,
    RawOrigin,
    StartHarness,
    StartRawOrigin,
    SyncProxy,
    get,
    read_request_head,
    request_bytes,
    wait_until,
)

from ferryman import HttpPeer
from origin import OriginServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def keepalive_handler(conn: socket.socket, origin: RawOrigin) -> None:
    """Answer every request with a keep-alive 200; note when the proxy closes."""
    while True:
        head = read_request_head(conn)
        if head is None:
            origin.note_closed()
            return
        conn.sendall(OK)


def one_shot_handler(conn: socket.socket, origin: RawOrigin) -> None:
    """Answer one request *with* keep-alive framing, then close the connection anyway."""
    if read_request_head(conn) is not None:
        conn.sendall(OK)
    conn.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_sequential_requests_from_five_clients_share_one_upstream_connection(
    mode: str, origin: OriginServer, start_proxy: StartHarness
) -> None:
    peer = HttpPeer(origin.address)
    proxy = start_proxy(PROXY_MODES[mode](peer))
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            for _ in range(4):
                conn.request("GET", "/")
                resp = conn.getresponse()
                assert resp.status == 200
                assert resp.read() == b"hello world\n"
        finally:
            conn.close()
    assert origin.connections == 1
    assert len(origin.requests) == 20
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 19)
    assert proxy.call(lambda: connector.idle_count(peer)) == 1


def test_counters_count_new_connections_and_reuses(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    peer = HttpPeer(origin.address)
    proxy = start_proxy(SyncProxy(peer))
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (0, 0)
    assert get(proxy.port).status == 200
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 0)
    assert get(proxy.port).status == 200
    assert get(proxy.port).status == 200
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 2)
    # a response that closes its connection is not pooled: the next request connects again
    assert get(proxy.port, "/close").status == 200
    assert proxy.call(lambda: connector.idle_count(peer)) == 0
    assert get(proxy.port).status == 200
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (2, 3)
    assert origin.connections == 2


def test_max_idle_caps_the_idle_connections_kept_per_peer(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    peer = HttpPeer(origin.address, max_idle=2)
    proxy = start_proxy(SyncProxy(peer))
    barrier = threading.Barrier(10)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.connect()
            barrier.wait(5)
            conn.request("GET", "/slow?ms=600")
            resp = conn.getresponse()
            resp.read()
            with lock:
                statuses.append(resp.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert statuses == [200] * 10
    # normally all ten are in flight at once (ten connections); never fewer than three
    assert origin.connections >= 3
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.connects) == origin.connections
    assert proxy.call(lambda: connector.idle_count(peer)) == 2
    assert proxy.call(lambda: len(connector.open)) == 2  # the others were closed


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_idle_timeout_closes_pooled_connection(
    mode: str, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(keepalive_handler)
    peer = HttpPeer(upstream.address, idle_timeout=0.5)
    proxy = start_proxy(PROXY_MODES[mode](peer))
    connector = proxy.service.connector
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"ok")
    assert proxy.call(lambda: connector.idle_count(peer)) == 1
    assert upstream.closed == 0
    # the pool closes it after ~0.5 s (plus at most a sweep tick)
    assert wait_until(lambda: proxy.call(lambda: connector.idle_count(peer)) == 0, 3.0)
    assert wait_until(lambda: upstream.closed == 1, 3.0)
    assert proxy.call(lambda: len(connector.open)) == 0
    # and the next request simply opens a new connection
    assert get(proxy.port).status == 200
    assert upstream.connections == 2


def test_reused_connection_is_not_closed_by_its_previous_idle_deadline(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(keepalive_handler)
    peer = HttpPeer(upstream.address, idle_timeout=0.5)
    proxy = start_proxy(SyncProxy(peer))
    with RawClient(proxy.port) as client:
        for _ in range(4):  # 4 × 0.2 s of keep-alive use: longer than idle_timeout
            client.send(request_bytes("/"))
            assert client.read_response().status == 200
            threading.Event().wait(0.2)
    assert upstream.connections == 1
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 3)


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_pooled_connection_closed_by_upstream_is_dropped_not_reused(
    mode: str, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(one_shot_handler)
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(PROXY_MODES[mode](peer))
    connector = proxy.service.connector
    first = get(proxy.port)
    assert (first.status, first.body) == (200, b"ok")
    # the upstream closed the idle keep-alive connection: the pool notices and drops it
    assert wait_until(lambda: proxy.call(lambda: connector.idle_count(peer)) == 0, 3.0)
    assert proxy.call(lambda: len(connector.open)) == 0
    second = get(proxy.port)
    assert (second.status, second.body) == (200, b"ok")
    assert upstream.connections == 2
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (2, 0)


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_back_to_back_requests_survive_upstream_closing_after_each_response(
    mode: str, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    """No pause between requests: whether or not the close was seen yet, no error."""
    upstream = raw_origin(one_shot_handler)
    proxy = start_proxy(PROXY_MODES[mode](HttpPeer(upstream.address)))
    with RawClient(proxy.port) as client:
        for _ in range(10):
            client.send(request_bytes("/"))
            resp = client.read_response()
            assert (resp.status, resp.body) == (200, b"ok")
    assert upstream.connections == 10


def test_peers_with_equal_keys_share_connections(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    peers = {
        "a": HttpPeer(origin.address),
        "b": HttpPeer(("127.0.0.1", origin.port), read_timeout=30, max_idle=4),
    }
    assert peers["a"] is not peers["b"]
    assert peers["a"].key == peers["b"].key
    proxy = start_proxy(ByHeaderProxy(peers))
    for name in "abab":
        assert get(proxy.port, headers={"X-Peer": name}).status == 200
    assert origin.connections == 1
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, connector.reuses)) == (1, 3)
