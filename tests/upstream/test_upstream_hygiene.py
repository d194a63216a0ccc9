"""Which upstream connections may go back to the pool: only clean ones, whose response ended
exactly, that allow keep-alive and that said nothing more afterwards."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from upstream_util import (
    PROXY_MODES,
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

from ferryman import HttpPeer, ProxyHttp
from origin import OriginServer


def scripted(*responses: bytes):  # type: ignore[no-untyped-def]
    """A handler answering the n-th request of each connection with ``responses[n]`` (the
    last one repeats); afterwards it waits for the proxy to close and notes it."""

    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        n = 0
        while True:
            head = read_request_head(conn)
            if head is None:
                origin.note_closed()
                return
            conn.sendall(responses[min(n, len(responses) - 1)])
            n += 1

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_head_response_connection_is_reused(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    peer = HttpPeer(origin.address)
    proxy = start_proxy(SyncProxy(peer))
    with RawClient(proxy.port) as client:
        client.send(b"HEAD /big?size=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        while b"\r\n\r\n" not in client.buf:
            assert client._fill()
        head, _, rest = client.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"Content-Length: 5000" in head
        assert rest == b""
        client.buf = b""
        client.send(request_bytes("/"))
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"hello world\n")
    assert origin.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http10"],
)
def test_response_without_keepalive_is_not_pooled(
    response: bytes, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(scripted(response))
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(SyncProxy(peer))
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"ok")
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.idle_count(peer)) == 0
    assert wait_until(lambda: upstream.closed == 1, 3.0)  # the proxy closed it
    assert get(proxy.port).status == 200
    assert upstream.connections == 2


def test_http10_response_with_keepalive_is_pooled(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(
        scripted(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
    )
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(SyncProxy(peer))
    for _ in range(3):
        assert get(proxy.port).status == 200
    assert upstream.connections == 1


def test_max_idle_zero_never_pools(origin: OriginServer, start_proxy: StartHarness) -> None:
    peer = HttpPeer(origin.address, max_idle=0)
    proxy = start_proxy(SyncProxy(peer))
    for _ in range(3):
        assert get(proxy.port).status == 200
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.idle_count(peer)) == 0
    assert origin.connections == 3


def test_unsolicited_bytes_on_an_idle_connection_close_it(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    """Like nginx answering a keep-alive timeout with a 408 before closing."""

    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        if read_request_head(conn) is None:
            return
        conn.sendall(OK)
        time.sleep(0.2)
        conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        if conn.recv(1) == b"":
            origin.note_closed()

    upstream = raw_origin(handler)
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(SyncProxy(peer))
    assert get(proxy.port).status == 200
    connector = proxy.service.connector
    assert wait_until(lambda: upstream.closed == 1, 3.0)
    assert proxy.call(lambda: connector.idle_count(peer)) == 0
    resp = get(proxy.port)
    assert (resp.status, resp.body) == (200, b"ok")
    assert upstream.connections == 2


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",  # a whole extra response
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nEVIL",  # a partial extra response
        b"HT",  # the start of one
    ],
    ids=["whole", "partial", "prefix"],
)
def test_bytes_after_the_response_in_the_same_read_make_the_connection_unusable(
    extra: bytes, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    upstream = raw_origin(
        scripted(OK + extra, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    )
    peer = HttpPeer(upstream.address, read_timeout=1.0)
    proxy = start_proxy(SyncProxy(peer))
    first = get(proxy.port)
    assert (first.status, first.body) == (200, b"ok")
    time.sleep(0.2)
    with RawClient(proxy.port, timeout=2) as client:  # the "partial" case hangs forever
        client.send(request_bytes("/", {"Connection": "close"}))
        second = client.read_response()
    # the dirty connection is never reused: a new one answers the first request again
    assert (second.status, second.body) == (200, b"ok")
    assert upstream.connections == 2


def test_response_before_the_request_body_was_sent_is_not_pooled(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    """The origin answers without reading the body: that connection is not clean."""

    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        if read_request_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        while True:
            try:
                if not conn.recv(65536):
                    break
            except OSError:
                break
        origin.note_closed()

    upstream = raw_origin(handler)
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(SyncProxy(peer))
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/upload", {"Content-Length": "100"}, "PUT") + b"x" * 10)
        resp = client.read_response()
        assert (resp.status, resp.body) == (403, b"no")
    connector = proxy.service.connector
    assert wait_until(lambda: upstream.closed == 1, 3.0)
    assert proxy.call(lambda: connector.idle_count(peer)) == 0


def test_pool_hands_out_the_most_recently_used_connection(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    """LIFO: of two idle connections, the one released last is reused first."""
    ids: dict[int, int] = {}
    lock = threading.Lock()

    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        with lock:
            my_id = ids.setdefault(id(conn), len(ids) + 1)
        while True:
            head = read_request_head(conn)
            if head is None:
                return
            if head.startswith(b"GET /early"):
                time.sleep(0.3)
            elif head.startswith(b"GET /late"):
                time.sleep(0.6)
            body = str(my_id).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    upstream = raw_origin(handler)
    peer = HttpPeer(upstream.address)
    proxy = start_proxy(SyncProxy(peer))
    bodies: dict[str, bytes] = {}

    def fetch(path: str) -> None:
        bodies[path] = get(proxy.port, path).body

    threads = [threading.Thread(target=fetch, args=(p,)) for p in ("/early", "/late")]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(5)
    assert upstream.connections == 2
    assert bodies["/early"] != bodies["/late"]
    connector = proxy.service.connector
    assert proxy.call(lambda: connector.idle_count(peer)) == 2
    assert get(proxy.port, "/next").body == bodies["/late"]


class _Logged(ProxyHttp):
    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer
        self.log: list[tuple[int, str | None]] = []

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer

    def logging(self, session, error, ctx):  # type: ignore[no-untyped-def]
        self.log.append((session.status, error.kind.value if error is not None else None))


def test_read_timeout_is_between_reads_not_total(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        if read_request_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # 4 × 0.25 s = 1 s in total, with gaps of 0.25 s
            time.sleep(0.25)
            conn.sendall(b"3\r\nabc\r\n")
        conn.sendall(b"0\r\n\r\n")
        read_request_head(conn)

    upstream = raw_origin(handler)
    proxy_obj = _Logged(HttpPeer(upstream.address, read_timeout=0.6))
    proxy = start_proxy(proxy_obj)
    resp = get(proxy.port)
    assert (resp.status, resp.body, resp.complete) == (200, b"abc" * 4, True)
    assert proxy_obj.log == [(200, None)]


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_read_timeout_mid_body_truncates_and_closes(
    mode: str, raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        if read_request_head(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 10)
        conn.recv(1)  # until the proxy gives up

    upstream = raw_origin(handler)
    peer = HttpPeer(upstream.address, read_timeout=0.5)
    proxy = start_proxy(PROXY_MODES[mode](peer))
    with RawClient(proxy.port, timeout=5) as client:
        started = time.monotonic()
        client.send(request_bytes("/"))
        resp = client.read_response()
        elapsed = time.monotonic() - started
    assert resp.status == 200
    assert (resp.body, resp.complete) == (b"y" * 10, False)
    assert elapsed < 4.0
    assert proxy.call(lambda: len(proxy.service.connector.open)) == 0


@pytest.mark.parametrize("mode", sorted(PROXY_MODES))
def test_write_timeout_when_upstream_does_not_read_the_body(
    mode: str, start_proxy: StartHarness
) -> None:
    """The origin accepts but never reads: the upload blocks, then UPSTREAM_WRITE_TIMEOUT."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    peer = HttpPeer(f"127.0.0.1:{listener.getsockname()[1]}", write_timeout=0.5)

    class Logged(_Logged):
        pass

    if mode == "task":

        class Logged(_Logged):  # type: ignore[no-redef]
            async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
                return self.peer

    proxy_obj = Logged(peer)
    proxy = start_proxy(proxy_obj)
    total = 256 * 1024 * 1024
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)

    def upload() -> None:
        try:
            client.sendall(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % total)
            block = b"z" * 65536
            for _ in range(total // len(block)):
                client.sendall(block)
        except OSError:
            pass

    sender = threading.Thread(target=upload, daemon=True)
    sender.start()
    try:
        assert wait_until(lambda: proxy_obj.log, 10.0), "no write timeout"
        assert proxy_obj.log == [(504, "upstream_write_timeout")]
        assert proxy.call(lambda: len(proxy.service.connector.open)) == 0
    finally:
        client.close()
        sender.join(5)
        stop.set()
        acceptor.join(2)
        for s in accepted:
            s.close()
        listener.close()


# --- TLS mismatches -----------------------------------------------------------------------


def test_tls_peer_to_a_plaintext_origin_is_502(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    proxy = start_proxy(SyncProxy(HttpPeer(origin.address, tls=True, verify_cert=False)))
    assert get(proxy.port).status == 502
    assert get(proxy.port).status == 502


def test_tls_handshake_never_answered_is_connect_timeout_504(
    raw_origin: StartRawOrigin, start_proxy: StartHarness
) -> None:
    def handler(conn: socket.socket, origin: RawOrigin) -> None:
        conn.recv(65536)  # the ClientHello; never answered
        conn.recv(1)

    upstream = raw_origin(handler)
    peer = HttpPeer(upstream.address, tls=True, verify_cert=False, connect_timeout=0.5)
    proxy_obj = _Logged(peer)
    proxy = start_proxy(proxy_obj)
    assert get(proxy.port).status == 504
    assert proxy_obj.log == [(504, "connect_timeout")]
