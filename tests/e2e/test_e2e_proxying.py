"""End to end: ``ferryman run`` proxying real clients to a real origin."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from e2e_util import Pair, ProxyProcess, RawConn, StartFerryman

from origin import PATTERN, OriginServer, pattern_bytes


def client(proxy: ProxyProcess, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def get(conn: http.client.HTTPConnection, path: str, **headers: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def origin_headers(body: bytes) -> list[tuple[str, str]]:
    return [(k, v) for k, v in json.loads(body)]


def names(pairs: list[tuple[str, str]]) -> set[str]:
    return {k.lower() for k, _ in pairs}


def test_get_returns_the_origin_body(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b"hello world\n"
    assert resp.getheader("Content-Type") == "text/plain"
    assert resp.getheader("Content-Length") == "12"
    conn.close()


def test_status_codes_pass_through(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    for status in (201, 404, 418, 500, 503):
        assert get(conn, f"/status/{status}") == (status, b"")
    conn.close()


def test_keep_alive_and_upstream_pooling(private: Pair) -> None:
    """200 requests on one client connection, then 20 client connections open at once.

    The test origin answers most paths with two writes (head, then body), which costs a
    delayed-ACK round (~40 ms) per response; the 200-request loop therefore uses the
    single-write /status/200 and checks the origin saw every request, in order, and a
    sample of body-carrying requests checks bodies. The 20 concurrent client connections
    keep at most two requests in flight at any time (a semaphore): what is measured is
    that the proxy shares its upstream pool across client connections, not how many
    connections truly parallel requests need.
    """
    conn = client(private.proxy)
    for i in range(200):
        status, body = get(conn, f"/status/200?i={i}")
        assert (status, body) == (200, b""), i
    for i in range(10):
        assert get(conn, f"/?j={i}") == (200, b"hello world\n")
    conn.close()
    seen = [path for _, path, _ in private.origin.requests]
    assert seen[:200] == [f"/status/200?i={i}" for i in range(200)]
    assert private.origin.connections == 1

    in_flight = threading.Semaphore(2)
    all_open = threading.Barrier(20, timeout=10)

    def few_requests(n: int) -> list[tuple[int, bytes]]:
        c = client(private.proxy)
        try:
            c.connect()
            all_open.wait()  # every client connection is open before any request
            out = []
            for _ in range(3):
                with in_flight:
                    out.append(get(c, f"/big?size={100 + n}"))
            return out
        finally:
            c.close()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(few_requests, range(20)))
    for n, res in enumerate(results):
        assert res == [(200, pattern_bytes(100 + n))] * 3
    assert private.origin.connections <= 4, private.origin.connections


def test_upstream_connection_reused_across_client_connections(private: Pair) -> None:
    for _ in range(10):
        conn = client(private.proxy)
        assert get(conn, "/") == (200, b"hello world\n")
        conn.close()
    assert private.origin.connections == 1


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_8mib_chunked_upload_arrives_intact(shared_proxy: ProxyProcess) -> None:
    data = os.urandom(8 * 1024 * 1024)
    conn = client(shared_proxy, timeout=30)
    conn.request("POST", "/echo", body=_chunks(data, 64 * 1024), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("X-Body-Length") == str(len(data))
    assert resp.getheader("X-Echo-Method") == "POST"
    digest = hashlib.sha256()
    total = 0
    while chunk := resp.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    assert total == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    # the connection is still usable
    assert get(conn, "/") == (200, b"hello world\n")
    conn.close()


def test_content_length_upload_arrives_intact(shared_proxy: ProxyProcess) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    conn = client(shared_proxy, timeout=30)
    conn.request("PUT", "/echo", body=data)
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("X-Body-Length") == str(len(data))
    assert resp.getheader("X-Echo-Method") == "PUT"
    assert resp.read() == data
    conn.close()


def test_50mb_download_arrives_intact(shared_proxy: ProxyProcess) -> None:
    size = 52428800
    expected = hashlib.sha256()
    for _ in range(size // len(PATTERN)):
        expected.update(PATTERN)
    conn = client(shared_proxy, timeout=30)
    conn.request("GET", f"/big?size={size}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == str(size)
    digest = hashlib.sha256()
    total = 0
    while chunk := resp.read(1 << 20):
        digest.update(chunk)
        total += len(chunk)
    assert total == size
    assert digest.hexdigest() == expected.hexdigest()
    assert get(conn, "/") == (200, b"hello world\n")
    conn.close()


def test_hop_by_hop_request_headers_are_not_forwarded(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    conn.putrequest("GET", "/headers", skip_host=True, skip_accept_encoding=True)
    for name, value in [
        ("Host", "front.example"),
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("X-Private", "1"),
        ("X-Keep", "yes"),
        ("x-MiXeD-Case", "kept"),
    ]:
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 200
    received = origin_headers(resp.read())
    got = names(received)
    for hop in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "x-private"):
        assert hop not in got, (hop, received)
    assert ("X-Keep", "yes") in received
    assert ("x-MiXeD-Case", "kept") in received  # case preserved end to end
    assert ("Host", "front.example") in received
    assert dict(received)["X-Forwarded-For"] == "127.0.0.1"
    assert dict(received)["X-Forwarded-Proto"] == "http"
    assert dict(received)["X-Forwarded-Host"] == "front.example"
    conn.close()


def test_x_forwarded_for_is_appended(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    status, body = get(conn, "/headers", **{"X-Forwarded-For": "10.0.0.1"})
    assert status == 200
    received = origin_headers(body)
    assert [v for k, v in received if k.lower() == "x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    conn.close()


def test_upgrade_header_without_connection_upgrade_is_stripped(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    status, body = get(conn, "/headers", Upgrade="websocket")
    assert status == 200
    assert "upgrade" not in names(origin_headers(body))
    assert get(conn, "/") == (200, b"hello world\n")
    conn.close()


def test_refused_upgrade_gets_the_origin_response_and_connection_is_reusable(
    shared_proxy: ProxyProcess,
) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(
            b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
        received = origin_headers(resp.body)
        assert ("Upgrade", "foo/1") in received  # offered to the origin, which declined
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        again = conn.read_response()
        assert (again.status, again.body) == (200, b"hello world\n")


def test_refused_upgrade_then_pipelined_request(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=2) as conn:
        conn.send(
            b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert conn.read_response().status == 200
        again = conn.read_response()
        assert (again.status, again.body) == (200, b"hello world\n")


def test_h2c_upgrade_post_with_body_is_answered(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"hello")


def test_hop_by_hop_response_headers_are_not_forwarded(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    conn.request("GET", "/hopbyhop")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b"ok"
    got = {k.lower(): v for k, v in resp.getheaders()}
    for hop in ("x-secret", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert hop not in got, (hop, resp.getheaders())
    assert "x-secret" not in got.get("connection", "").lower()
    assert get(conn, "/") == (200, b"hello world\n")
    conn.close()


def test_chunked_response_with_trailers_arrives_intact(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(b"GET /chunked?n=3&size=5&trailer=t HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.header("transfer-encoding") == b"chunked"
        assert resp.body == b"x" * 15
        assert resp.trailers == [(b"X-Trailer", b"t")]
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().body == b"hello world\n"


def test_chunked_response_via_http_client(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    assert get(conn, "/chunked?n=50&size=1000") == (200, b"x" * 50000)
    conn.close()


def test_close_delimited_response_arrives_intact(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"close-delimited body"
        # re-framed for an HTTP/1.1 client, so its connection survives the origin's close
        assert resp.header("transfer-encoding") == b"chunked"
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().body == b"hello world\n"


def test_close_delimited_response_to_http10_client(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(b"GET /close HTTP/1.0\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"close-delimited body"
        assert resp.header("transfer-encoding") is None


def test_http10_request_gets_response_and_close(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world\n"
        assert resp.header("transfer-encoding") is None
        assert conn.at_eof()


def test_http10_keep_alive_keeps_the_connection(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        for _ in range(3):
            conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"hello world\n")
            assert resp.header("connection").lower() == b"keep-alive"
        conn.send(b"GET / HTTP/1.0\r\n\r\n")  # the last one without: closed after it
        assert conn.read_response().body == b"hello world\n"
        assert conn.at_eof()


def test_http10_chunked_origin_response_is_close_delimited(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"GET /chunked?n=2&size=3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, status, _, _, headers = conn.read_head()
        assert status == 200
        assert b"transfer-encoding" not in {k.lower() for k, _ in headers}
        assert conn.read_to_eof() == b"xxxxxx"


def test_http10_request_without_host_gets_a_host_upstream(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"GET /headers HTTP/1.0\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert "host" in names(origin_headers(resp.body))


def test_http10_post_body(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"hello")


def test_no_interim_response_to_http10_client(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.0\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.3)
        conn.send(b"hello")
        head, status, _, _, _ = conn.read_head()
        assert status == 200, head


def test_head_request(shared_proxy: ProxyProcess) -> None:
    conn = client(shared_proxy)
    conn.request("HEAD", "/big?size=12345")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Length") == "12345"
    assert resp.read() == b""
    assert get(conn, "/") == (200, b"hello world\n")
    conn.close()


def test_head_request_raw_has_no_body_bytes(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(
            b"HEAD /big?size=999 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        first = conn.read_response(b"HEAD")
        assert first.status == 200
        assert first.header("content-length") == b"999"
        second = conn.read_response()
        assert second.status == 204  # the next bytes were the next response, not a body


def test_expect_100_continue(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = conn.read_until(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        conn.send(b"hello world")
        resp = conn.read_response(skip_interim=False)
        assert resp.status == 200
        assert resp.body == b"hello world"
        assert resp.header("x-body-length") == b"11"
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().body == b"hello world\n"


def test_expect_header_is_not_forwarded(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(
            b"POST /headers HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        conn.read_until(b"\r\n\r\n")
        conn.send(b"hi")
        resp = conn.read_response()
        assert resp.status == 200
        assert "expect" not in names(origin_headers(resp.body))


def test_pipelined_requests_are_answered_in_order(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port) as conn:
        conn.send(
            b"GET /slow?ms=200 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /status/404 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        )
        r1, r2, r3 = conn.read_response(), conn.read_response(), conn.read_response()
        assert (r1.status, r1.body) == (200, b"slow")
        assert (r2.status, r2.body) == (404, b"")
        assert (r3.status, r3.body) == (200, b"abc")


def test_many_pipelined_requests(shared_proxy: ProxyProcess) -> None:
    n = 20
    with RawConn(shared_proxy.port) as conn:
        conn.send(b"".join(b"GET /big?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n)))
        for i in range(n):
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, pattern_bytes(i)), i


def test_connection_close_from_client_is_honoured(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        resp = conn.read_response()
        assert resp.body == b"hello world\n"
        assert resp.header("connection").lower() == b"close"
        assert conn.at_eof()


def test_concurrent_clients(origin: OriginServer, ferryman: StartFerryman) -> None:
    """100 client connections × 20 requests, all at once, each checking its own bodies.

    The stdlib test origin listens with a backlog of 5, so a burst of 100 new upstream
    connections can sit in SYN/accept retries for over a second: this instance gets
    generous upstream timeouts, so that what is tested is the proxy, not that backlog.
    """
    proxy = ferryman(origin.address, read="10s", connect="5s")
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> int:
        conn = client(proxy, timeout=30)
        ok = 0
        try:
            for j in range(20):
                size = 1 + (n * 20 + j) % 3000
                status, body = get(conn, f"/big?size={size}")
                if status == 200 and body == pattern_bytes(size):
                    ok += 1
                else:
                    with lock:
                        errors.append(f"client {n} request {j}: {status} {len(body)}")
        finally:
            conn.close()
        return ok

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(worker, range(100)))
    assert errors == []
    assert sum(results) == 2000


def test_origin_saw_forwarded_requests(
    shared_origin: OriginServer, shared_proxy: ProxyProcess
) -> None:
    conn = client(shared_proxy)
    marker = f"/status/200?marker={time.monotonic_ns()}"
    assert get(conn, marker) == (200, b"")
    conn.close()
    assert any(path == marker for _, path, _ in list(shared_origin.requests))
