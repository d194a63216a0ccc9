"""What hooks see on the Session: addresses, the request head, reuse, statuses, byte counts."""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import pytest
from proxy_util import RawClient, build_request, variant

from ferryman import HttpPeer, ProxyHttp
from origin import OriginServer


class Inspect(ProxyHttp):
    """Records what the session says at each point of the pipeline."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.peer = HttpPeer(address)
        self.requests: list[dict[str, Any]] = []
        self.connected: list[bool] = []
        self.upstream_statuses: list[int | None] = []
        self.logged: list[dict[str, Any]] = []

    def request_filter(self, session, ctx):
        req = session.req_header
        self.requests.append(
            {
                "client_addr": session.client_addr,
                "server_addr": session.server_addr,
                "method": req.method,
                "path": req.path,
                "version": req.version,
                "headers": list(req.headers.items()),
                "host": req.host,
                "downstream_reused": session.downstream_reused,
                "is_tls": session.is_tls,
                "tls": session.tls,
                "retries": session.retries,
                "response_started": session.response_started,
                "status": session.status,
                "upstream_status": session.upstream_status,
                "start_time": session.start_time,
            }
        )
        return False

    def upstream_peer(self, session, ctx):
        return self.peer

    def connected_to_upstream(self, session, reused, peer, ctx):
        assert peer is self.peer
        self.connected.append(reused)

    def upstream_response_filter(self, session, upstream_response, ctx):
        self.upstream_statuses.append(session.upstream_status)
        assert session.upstream_status == upstream_response.status

    def logging(self, session, error, ctx):
        self.logged.append(
            {
                "error": error,
                "status": session.status,
                "upstream_status": session.upstream_status,
                "request_body_bytes": session.request_body_bytes,
                "response_body_bytes": session.response_body_bytes,
                "downstream_reused": session.downstream_reused,
                "peer": session.peer,
                "response_started": session.response_started,
                "request_body_complete": session.request_body_complete,
            }
        )


def test_session_attributes_over_one_keep_alive_connection(
    mode, origin: OriginServer, start_proxy
) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    before = time.time()
    with RawClient(harness.port) as client:
        resp = client.request(
            "GET", "/?q=1", headers=[("Host", "example.test"), ("X-Test", "abc"), ("x-lower", "1")]
        )
        assert (resp.status, resp.body) == (200, b"hello world\n")
        payload = b"b" * 1000
        resp = client.request("POST", "/echo", payload, headers=[("Host", "example.test")])
        assert (resp.status, resp.body) == (200, payload)
        resp = client.request("GET", "/status/404", headers=[("Host", "example.test")])
        assert (resp.status, resp.body) == (404, b"")
        client_port = client.local_port
    harness.call(lambda: None)

    first, second, third = proxy.requests
    assert first["client_addr"] == ("127.0.0.1", client_port)
    assert first["server_addr"] == ("127.0.0.1", harness.port)
    assert (first["method"], first["path"], first["version"]) == ("GET", "/?q=1", "1.1")
    assert first["host"] == "example.test"
    # headers as received: order and case preserved
    assert first["headers"] == [(b"Host", b"example.test"), (b"X-Test", b"abc"), (b"x-lower", b"1")]
    assert first["downstream_reused"] is False
    assert second["downstream_reused"] is True
    assert third["downstream_reused"] is True
    assert (second["method"], second["path"]) == ("POST", "/echo")
    assert (b"Content-Length", b"1000") in second["headers"]
    for seen in (first, second, third):
        assert seen["is_tls"] is False
        assert seen["tls"] is None
        assert seen["retries"] == 0
        assert seen["response_started"] is False
        assert seen["status"] == 0
        assert seen["upstream_status"] is None
        assert before - 1 <= seen["start_time"] <= time.time()
    assert third["client_addr"] == ("127.0.0.1", client_port)

    # one upstream connection, pooled and reused
    assert proxy.connected == [False, True, True]
    assert origin.connections == 1
    assert proxy.upstream_statuses == [200, 200, 404]

    log1, log2, log3 = proxy.logged
    assert [log["error"] for log in proxy.logged] == [None, None, None]
    assert [log["status"] for log in proxy.logged] == [200, 200, 404]
    assert [log["upstream_status"] for log in proxy.logged] == [200, 200, 404]
    # (downstream_reused as seen by logging: see the pipelining test below)
    assert (log1["request_body_bytes"], log1["response_body_bytes"]) == (0, 12)
    assert (log2["request_body_bytes"], log2["response_body_bytes"]) == (1000, 1000)
    assert (log3["request_body_bytes"], log3["response_body_bytes"]) == (0, 0)
    assert all(log["peer"] is proxy.peer for log in proxy.logged)
    assert all(log["response_started"] for log in proxy.logged)
    assert all(log["request_body_complete"] for log in proxy.logged)


def test_downstream_reused_with_pipelined_requests(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        client.send(build_request("GET", "/?n=1") + build_request("GET", "/?n=2"))
        for _ in range(2):
            resp = client.read_response()
            assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert [r["path"] for r in proxy.requests] == ["/?n=1", "/?n=2"]
    assert [r["downstream_reused"] for r in proxy.requests] == [False, True]
    assert [log["downstream_reused"] for log in proxy.logged] == [False, True]


def test_a_new_connection_is_not_downstream_reused(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    ports = []
    for _ in range(2):
        with RawClient(harness.port) as client:
            assert client.request("GET", "/").status == 200
            ports.append(client.local_port)
    harness.call(lambda: None)
    assert [r["downstream_reused"] for r in proxy.requests] == [False, False]
    assert [r["client_addr"] for r in proxy.requests] == [("127.0.0.1", p) for p in ports]
    # the upstream connection is pooled across client connections
    assert proxy.connected == [False, True]


def test_byte_counts_for_chunked_and_large_bodies(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", "/chunked?n=7&size=1000")
        assert (resp.status, len(resp.body)) == (200, 7000)
        resp = client.request("GET", "/big?size=1000000")
        assert (resp.status, len(resp.body)) == (200, 1_000_000)
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
        )
        resp = client.read_response()
        assert (resp.status, resp.body) == (200, b"abcdefg")
    harness.call(lambda: None)
    counts = [(log["request_body_bytes"], log["response_body_bytes"]) for log in proxy.logged]
    assert counts == [(0, 7000), (0, 1_000_000), (7, 7)]


def test_head_request_counts_no_body(mode, origin, start_proxy) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("HEAD", "/big?size=5000")
        assert resp.status == 200
        assert resp.header("content-length") == "5000"
        resp = client.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"hello world\n")
    harness.call(lambda: None)
    assert proxy.logged[0]["response_body_bytes"] == 0
    assert proxy.logged[0]["status"] == 200


class RewriteInRequestFilter(ProxyHttp):
    """Changes to session.req_header in the request hooks shape the upstream request."""

    def __init__(self, address: str) -> None:
        self.address = address

    def early_request_filter(self, session, ctx):
        req = session.req_header
        if req.path.startswith("/api/"):
            req.path = req.path[len("/api") :]

    def request_filter(self, session, ctx):
        session.req_header.headers.set("X-Route", "api")
        session.req_header.method = "POST" if session.req_header.path == "/echo" else "GET"
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)


def test_request_hooks_may_change_the_request_head(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, RewriteInRequestFilter)(origin.address))
    with RawClient(harness.port) as client:
        resp = client.request("PUT", "/api/echo", b"data")
        assert (resp.status, resp.body) == (200, b"data")
        assert resp.header("x-echo-method") == "POST"
    method, path, headers = origin.requests[0]
    assert (method, path) == ("POST", "/echo")
    assert ("X-Route", "api") in headers


@pytest.mark.parametrize("status", [200, 201, 204, 301, 404, 500, 503])
def test_upstream_status_is_reported(mode, origin, start_proxy, status: int) -> None:
    proxy = variant(mode, Inspect)(origin.address)
    harness = start_proxy(proxy)
    with RawClient(harness.port) as client:
        resp = client.request("GET", f"/status/{status}")
        assert resp.status == status
    harness.call(lambda: None)
    assert proxy.logged[0]["upstream_status"] == status
    assert proxy.logged[0]["status"] == status
    assert proxy.logged[0]["error"] is None


class CtxEcho(ProxyHttp):
    """Carries a per-request value from request_filter to response_filter through ctx."""

    def __init__(self, address: str) -> None:
        self.address = address

    def new_ctx(self):
        return {}

    def request_filter(self, session, ctx):
        ctx["id"] = session.req_header.headers.get("x-id")
        return False

    def upstream_peer(self, session, ctx):
        return HttpPeer(self.address)

    def response_filter(self, session, response, ctx):
        response.headers.set("X-Id", ctx["id"])


def test_concurrent_clients_keep_their_own_ctx(mode, origin, start_proxy) -> None:
    harness = start_proxy(variant(mode, CtxEcho)(origin.address))
    errors: list[str] = []

    def client_thread(n: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=5)
            for i in range(5):
                tag = f"{n}-{i}"
                body = tag.encode() * (100 * (i + 1))
                conn.request("POST", "/echo", body=body, headers={"X-Id": tag})
                resp = conn.getresponse()
                data = resp.read()
                if (resp.status, data, resp.getheader("X-Id")) != (200, body, tag):
                    errors.append(f"{tag}: {resp.status} {resp.getheader('X-Id')} {len(data)}")
            conn.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{n}: {exc!r}")

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert len(origin.requests) == 60
