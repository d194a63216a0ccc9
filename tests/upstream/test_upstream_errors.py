"""Upstream failures: refused connects, connect and read timeouts, invalid responses and
bodies cut short; each gives its exact status and the proxy keeps serving."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from upstream_util import (
    PROXY_MODES,
    RawClient,
    RawOrigin,
    StartHarness,
    StartRawOrigin,
    get,
    read_request_head,
    request_bytes,
)

from ferryman import ErrorKind, HttpPeer, ProxyError, ProxyHttp
from origin import OriginServer, free_port


class Recording(ProxyHttp):
    """Routes to ``peer`` (or ``peers[path]``) and records (status, error kind) per request."""

    def __init__(self, peer: HttpPeer, peers: dict[str, HttpPeer] | None = None) -> None:
        self.peer = peer
        self.peers = peers or {}
        self.log: list[tuple[int, ErrorKind | None]] = []

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peers.get(session.req_header.path, self.peer)

    def logging(self, session, error, ctx):  # type: ignore[no-untyped-def]
        self.log.append((session.status, error.kind if isinstance(error, ProxyError) else None))


class AsyncRecording(Recording):
    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peers.get(session.req_header.path, self.peer)


RECORDING = {"sync": Recording, "task": AsyncRecording}
assert sorted(RECORDING) == sorted(PROXY_MODES)


@pytest.mark.parametrize("mode", sorted(RECORDING))
def test_connect_refused_is_502(mode: str, start_proxy: StartHarness) -> None:
    proxy_obj = RECORDING[mode](HttpPeer(f"127.0.0.1:{free_port()}"))
    proxy = start_proxy(proxy_obj)
    resp = get(proxy.port)
    assert resp.status == 502
    assert resp.header("connection") is None or resp.header("connection") == "close"
    assert proxy_obj.log == [(502, ErrorKind.CONNECT_REFUSED)]
    connector = proxy.service.connector
    assert proxy.call(lambda: (connector.connects, len(connector.open))) == (0, 0)


def test_connect_refused_keeps_the_client_connection_usable(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    dead = HttpPeer(f"127.0.0.1:{free_port()}")
    proxy_obj = Recording(HttpPeer(origin.address), {"/dead": dead})
    proxy = start_proxy(proxy_obj)
    with RawClient(proxy.port) as client:
        client.send(request_bytes("/dead"))
        assert client.read_response().status == 502
        client.send(request_bytes("/"))
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"hello world\n")
    assert [s for s, _ in proxy_obj.log] == [502, 200]


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening socket that never accepts and whose accept queue is full: further
    connection attempts get no answer (their SYNs are dropped), like a blackhole."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.1)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.parametrize("mode", sorted(RECORDING))
def test_connect_timeout_is_504(mode: str, start_proxy: StartHarness) -> None:
    with full_backlog() as port:
        proxy_obj = RECORDING[mode](HttpPeer(f"127.0.0.1:{port}", connect_timeout=0.5))
        proxy = start_proxy(proxy_obj)
        started = time.monotonic()
        resp = get(proxy.port)
        elapsed = time.monotonic() - started
    assert resp.status == 504
    assert proxy_obj.log == [(504, ErrorKind.CONNECT_TIMEOUT)]
    # one retry (max_retries=1): two connect timeouts of 0.5 s, far below a real timeout
    assert 0.5 <= elapsed < 5.0


@pytest.mark.parametrize("mode", sorted(RECORDING))
def test_read_timeout_is_504(mode: str, origin: OriginServer, start_proxy: StartHarness) -> None:
    proxy_obj = RECORDING[mode](HttpPeer(origin.address, read_timeout=0.5))
    proxy = start_proxy(proxy_obj)
    started = time.monotonic()
    resp = get(proxy.port, "/slow?ms=3000")
    elapsed = time.monotonic() - started
    assert resp.status == 504
    assert elapsed < 2.9  # answered by the timeout, not by the origin
    assert proxy_obj.log == [(504, ErrorKind.READ_TIMEOUT)]
    # a timed-out connection is never pooled
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.idle_count()) == 0
    assert get(proxy.port).status == 200


@pytest.mark.parametrize("mode", sorted(RECORDING))
def test_garbage_response_is_502(
    mode: str, origin: OriginServer, start_proxy: StartHarness
) -> None:
    proxy_obj = RECORDING[mode](HttpPeer(origin.address))
    proxy = start_proxy(proxy_obj)
    resp = get(proxy.port, "/garbage")
    assert resp.status == 502
    assert proxy_obj.log == [(502, ErrorKind.INVALID_RESPONSE)]
    assert get(proxy.port).status == 200
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.idle_count()) == 1


def truncating_handler(conn: socket.socket, origin: RawOrigin) -> None:
    """Promise 1000 bytes, send 10, close."""
    if read_request_head(conn) is not None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        time.sleep(0.1)
    conn.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("mode", sorted(RECORDING))
def test_upstream_closing_mid_body_truncates_and_closes_the_client(
    mode: str, origin: OriginServer, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(truncating_handler)
    proxy_obj = RECORDING[mode](HttpPeer(origin.address), {"/cut": HttpPeer(upstream.address)})
    proxy = start_proxy(proxy_obj)
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/cut"))
        resp = client.read_response()  # a hang would raise TimeoutError here
        assert resp.status == 200
        assert resp.header("content-length") == "1000"
        assert resp.complete is False
        assert resp.body == b"x" * 10
        assert client.closed_by_peer()
    assert proxy_obj.log == [(200, ErrorKind.UPSTREAM_CLOSED)]
    # the proxy keeps serving
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"hello world\n")
    connector = proxy.service.connector
    assert proxy.call(lambda: len(connector.open)) == 1


def test_upstream_closing_before_any_response_is_502(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        read_request_head(conn)
        conn.shutdown(socket.SHUT_RDWR)

    upstream = raw_origin(handler)
    proxy_obj = Recording(HttpPeer(upstream.address))
    proxy = start_proxy(proxy_obj)
    assert get(proxy.port).status == 502
    # a fresh connection is not retried for this (the request may have been processed)
    assert upstream.connections == 1
    assert proxy_obj.log == [(502, ErrorKind.UPSTREAM_CLOSED)]
