"""A graceful stop loses no request of a keep-alive client (``HttpProxyService.drain``).

A response whose head went out before the stop began promised keep-alive; its client may
send the next request the moment the body ends. The connection therefore stays open a
moment after that response, and the next request is answered with ``Connection: close``.
Real sockets: a raw origin that holds its body back until told, a raw client.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from ferryman import HttpPeer, ProxyHttp
from harness import ProxyHarness


class HeldBodyOrigin:
    """Answers each request with a 10-byte body: 5 bytes at once, 5 when released."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.release = threading.Event()
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")
                self.requests += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                if self.requests == 1:
                    self.release.wait(10)
                conn.sendall(b"world")

    def close(self) -> None:
        self.sock.close()


class ToOrigin(ProxyHttp):
    def __init__(self, port: int) -> None:
        self.peer = HttpPeer(f"127.0.0.1:{port}")

    def upstream_peer(self, session: object, ctx: object) -> HttpPeer:
        return self.peer


@pytest.fixture
def origin() -> Iterator[HeldBodyOrigin]:
    o = HeldBodyOrigin()
    yield o
    o.release.set()
    o.close()


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """Head and 10-byte body of one response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    while len(body) < 10:
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        body += data
    return head, body


def test_a_request_sent_right_after_a_keepalive_response_during_a_drain_is_answered(
    origin: HeldBodyOrigin,
) -> None:
    harness = ProxyHarness(ToOrigin(origin.port)).start()
    try:
        client = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
        client.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += client.recv(65536)
        assert b"connection: close" not in buf.lower()  # keep-alive was promised
        # the stop begins while the body is still coming
        harness.call(lambda: asyncio.ensure_future(harness.service.drain(5.0)))
        origin.release.set()
        rest = buf.partition(b"\r\n\r\n")[2]
        while len(rest) < 10:
            rest += client.recv(65536)
        assert rest == b"helloworld"
        # the next request, at once, on the same connection
        client.sendall(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = _read_response(client)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"connection: close" in head.lower()
        assert body == b"helloworld"
        assert client.recv(65536) == b""  # then closed
        client.close()
    finally:
        harness.stop()
