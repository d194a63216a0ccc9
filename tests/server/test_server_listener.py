"""Listener addresses and sockets, Server.bind/addresses, and non-TLS bytes on a TLS port."""

from __future__ import annotations

import socket

import pytest
from server_util import RawClient, ServerPki, StartHarness, SyncProxy, get, request_bytes

from ferryman import HttpPeer, HttpProxyService, Listener, ListenerTls, Server
from ferryman.upstream import parse_address
from harness import ProxyHarness
from origin import OriginServer


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        (("127.0.0.1", 8080), ("127.0.0.1", 8080)),
        (("127.0.0.1", "8080"), ("127.0.0.1", 8080)),
        ("[::1]:8443", ("::1", 8443)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listener_address(bind: str | tuple[str, int], expected: tuple[str, int]) -> None:
    assert Listener(bind).address == expected
    assert parse_address(bind) == expected


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.1:", ":", "127.0.0.1:http", "[::1]"])
def test_listener_rejects_bad_addresses(bind: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        Listener(bind)


def test_make_socket_listens_nonblocking() -> None:
    sock = Listener("127.0.0.1:0").make_socket()
    try:
        assert sock.getblocking() is False
        assert sock.getsockname()[0] == "127.0.0.1"
        with socket.create_connection(sock.getsockname(), timeout=2):
            pass
    finally:
        sock.close()


def test_make_socket_on_a_port_in_use_raises_and_closes() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            Listener(f"127.0.0.1:{port}").make_socket()


def test_server_bind_is_idempotent_and_reports_addresses(origin: OriginServer) -> None:
    service = HttpProxyService(
        SyncProxy(HttpPeer(origin.address)),
        [Listener("127.0.0.1:0"), Listener("127.0.0.1:0")],
    )
    server = Server(workers=1)
    server.add_service(service)
    server.bind()
    try:
        first = server.addresses()
        server.bind()
        assert server.addresses() == first
        assert len(first) == 2
        assert first[0][1] != first[1][1]
        assert all(host == "127.0.0.1" and port > 0 for host, port in first)
    finally:
        for _, _, sock in server._sockets:
            sock.close()


def test_workers_default_to_cpu_count() -> None:
    import os

    assert Server().workers == (os.cpu_count() or 1)
    assert Server(workers=3).workers == 3


def test_two_listeners_on_one_service_both_serve(
    origin: OriginServer, start_proxy: StartHarness
) -> None:
    listeners = [Listener("127.0.0.1:0"), Listener("127.0.0.1:0")]
    proxy: ProxyHarness = start_proxy(SyncProxy(HttpPeer(origin.address)), None, listeners)
    for _, port in proxy.server.addresses():
        assert get(port).status == 200
    assert origin.connections == 1  # one worker, one pool


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_listener(origin: OriginServer, start_proxy: StartHarness) -> None:
    proxy: ProxyHarness = start_proxy(
        SyncProxy(HttpPeer(origin.address)), None, [Listener("[::1]:0")]
    )
    host, port = proxy.server.addresses()[0]
    assert host == "::1"
    sock = socket.create_connection(("::1", port), timeout=5)
    with RawClient(sock=sock) as client:
        client.send(request_bytes("/headers", {"Connection": "close"}))
        resp = client.read_response()
    assert resp.status == 200
    assert b'"X-Forwarded-For", "::1"' in resp.body


def test_plaintext_http_on_a_tls_listener_is_closed_and_serving_goes_on(
    origin: OriginServer, start_proxy: StartHarness, server_pki: ServerPki
) -> None:
    from server_util import client_context, tls_connect

    listener = Listener(
        "127.0.0.1:0", tls=ListenerTls(server_pki.default_cert, server_pki.default_key)
    )
    proxy: ProxyHarness = start_proxy(SyncProxy(HttpPeer(origin.address)), None, [listener])
    with RawClient(proxy.port, timeout=5) as client:
        client.send(request_bytes("/", {"Connection": "close"}))
        data = client.read_to_eof()
    assert not data.startswith(b"HTTP/1.1 200")
    assert origin.requests == []
    ctx = client_context(server_pki.ca_file)
    with RawClient(sock=tls_connect(proxy.port, ctx, "default.test")) as client:
        client.send(request_bytes("/", {"Connection": "close"}))
        assert client.read_response().status == 200
