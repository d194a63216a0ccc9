"""End to end: malformed requests get the exact 4xx, and the proxy closes where framing is
in doubt; misbehaving clients never hurt later requests."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from e2e_util import (
    Pair,
    ProxyProcess,
    RawConn,
    ScriptedOrigin,
    StartFerryman,
    raw_exchange,
    read_request_head,
)

from origin import OriginServer


def status_line(resp_head: bytes) -> bytes:
    return resp_head.split(b"\r\n", 1)[0]


def assert_still_serving(proxy: ProxyProcess) -> None:
    with RawConn(proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"hello world\n")


def test_cl_and_te_is_400_and_connection_closed(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.head.startswith(b"HTTP/1.1 400 ")
        assert resp.header("connection") == b"close"
        assert conn.sock.recv(1) == b""  # closed by the proxy, within the 5 s timeout
    assert_still_serving(shared_proxy)


BAD_400 = {
    "duplicate_cl_differing": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "duplicate_cl_same": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    "invalid_cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\nabc",
    "te_not_chunked_last": b"POST /echo HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_gzip_only": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "invalid_chunk_size": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    "nul_in_header": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
}


# Among these, a request whose head is fine but whose body is malformed, all in one read:
# the session for the head is created, then the parser raises on the body before it is
# started; it must still be answered (it once hung).
def _bad_400_params() -> list[object]:
    return [pytest.param(data, id=name) for name, data in BAD_400.items()]


@pytest.mark.parametrize("data", _bad_400_params())
def test_malformed_request_is_400_and_closed(shared_proxy: ProxyProcess, data: bytes) -> None:
    resp, closed = raw_exchange(shared_proxy.port, data, timeout=2)
    assert status_line(resp.head) == b"HTTP/1.1 400 Bad Request"
    assert closed


def test_invalid_chunk_size_in_a_later_read_is_400(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        conn.send(b"zz\r\nabc\r\n0\r\n\r\n")
        resp = conn.read_response()  # (an unsolicited 100 Continue may come first)
        assert status_line(resp.head) == b"HTTP/1.1 400 Bad Request"
        assert conn.at_eof()
    assert_still_serving(shared_proxy)


def test_bad_request_after_good_pipelined_one(shared_proxy: ProxyProcess) -> None:
    with RawConn(shared_proxy.port, timeout=2) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"hello world\n")
        second = conn.read_response()
        assert second.status == 400
        assert conn.at_eof()


def test_http2_request_line_is_505(shared_proxy: ProxyProcess) -> None:
    resp, closed = raw_exchange(shared_proxy.port, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert status_line(resp.head) == b"HTTP/1.1 505 HTTP Version Not Supported"
    assert closed


def test_connect_is_405_by_default(shared_proxy: ProxyProcess) -> None:
    resp, _ = raw_exchange(
        shared_proxy.port,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        wait_close=False,
    )
    assert status_line(resp.head) == b"HTTP/1.1 405 Method Not Allowed"


def test_h2_prior_knowledge_preface_is_refused(shared_proxy: ProxyProcess) -> None:
    # like nginx and HAProxy on an HTTP/1.1-only port: 400 (not 505)
    resp, closed = raw_exchange(shared_proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert status_line(resp.head) == b"HTTP/1.1 400 Bad Request"
    assert closed


def test_request_line_over_the_limit_is_414(shared_proxy: ProxyProcess) -> None:
    target = b"/" + b"a" * 9000  # the default max_request_line is 8192
    resp, closed = raw_exchange(
        shared_proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert status_line(resp.head) == b"HTTP/1.1 414 URI Too Long"
    assert closed
    assert_still_serving(shared_proxy)


def test_oversized_headers_are_431(shared_proxy: ProxyProcess) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
    resp, closed = raw_exchange(
        shared_proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    )  # 40 KB > the default max_header_bytes of 32 KiB
    assert status_line(resp.head) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert closed


def test_too_many_headers_are_431(shared_proxy: ProxyProcess) -> None:
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(150))  # default max_headers: 100
    resp, closed = raw_exchange(
        shared_proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    )
    assert status_line(resp.head) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert closed


def test_client_disconnect_mid_upload(shared_proxy: ProxyProcess) -> None:
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", shared_proxy.port), timeout=5)
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
        )
        time.sleep(0.1)
        sock.close()
        assert_still_serving(shared_proxy)


def test_client_disconnect_mid_upload_closes_the_upstream_connection(
    ferryman: StartFerryman,
) -> None:
    seen: list[tuple[int, bool]] = []  # (body bytes the origin got, saw the end of stream)
    done = threading.Event()

    def sink(conn: socket.socket) -> None:
        head = read_request_head(conn)
        got = len(head.split(b"\r\n\r\n", 1)[1])
        try:
            while piece := conn.recv(65536):
                got += len(piece)
            seen.append((got, True))
        except TimeoutError:
            seen.append((got, False))
        except OSError:
            seen.append((got, True))  # reset counts as closed
        done.set()

    origin = ScriptedOrigin(sink)
    try:
        proxy = ferryman(origin.address)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
        )
        time.sleep(0.3)
        sock.close()
        assert done.wait(5), "the upstream connection was left open"
        assert len(seen) == 1
        got, closed = seen[0]
        assert closed
        assert got <= 1000  # never more than the client sent
    finally:
        origin.stop()


def test_no_descriptor_leak_after_abuse(private: Pair) -> None:
    proxy = private.proxy
    assert_still_serving(proxy)  # one pooled upstream connection from now on
    (worker,) = proxy.worker_pids()
    baseline = proxy.open_fds(worker)
    for i in range(20):
        raw_exchange(proxy.port, BAD_400["obs_fold"], timeout=3)
        raw_exchange(proxy.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 99\r\n\r\nab")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"GET /big?size=5000000 HTTP/1.1\r\nHost: a\r\n\r\n")
            sock.recv(1000)
        if i % 5 == 0:
            raw_exchange(proxy.port, b"GET /garbage HTTP/1.1\r\nHost: a\r\n\r\n",
                         wait_close=False)
    assert_still_serving(proxy)
    deadline = time.monotonic() + 5
    while proxy.open_fds(worker) > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.open_fds(worker) <= baseline + 2, (baseline, proxy.open_fds(worker))


def test_client_reset_mid_download(shared_proxy: ProxyProcess) -> None:
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", shared_proxy.port), timeout=5)
        sock.sendall(b"GET /big?size=20000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
    assert_still_serving(shared_proxy)


# --- limits and timeouts configured small ------------------------------------------------------


@pytest.fixture
def strict_proxy(shared_origin: OriginServer, ferryman: StartFerryman) -> ProxyProcess:
    return ferryman(
        shared_origin.address,
        read="5s",  # longer than body_read, so a stalled body is the client's 408
        server_extra=(
            ", limits: {max_request_line: 256, max_header_bytes: 1024, max_headers: 10, "
            "max_body: 1000}, timeouts: {header_read: 1s, body_read: 1s}"
        ),
    )


def test_configured_limits_give_exact_statuses(strict_proxy: ProxyProcess) -> None:
    port = strict_proxy.port
    ok, _ = raw_exchange(
        port, b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
    )
    assert ok.status == 200
    resp, closed = raw_exchange(port, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (resp.status, closed) == (414, True)
    big = b"X: " + b"v" * 1100 + b"\r\n"
    resp, closed = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert (resp.status, closed) == (431, True)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(12))
    resp, closed = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert (resp.status, closed) == (431, True)


def test_body_over_max_body_by_content_length_is_413(strict_proxy: ProxyProcess) -> None:
    resp, closed = raw_exchange(
        strict_proxy.port, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n"
    )
    assert status_line(resp.head) == b"HTTP/1.1 413 Content Too Large"
    assert closed


def test_body_at_max_body_is_accepted(strict_proxy: ProxyProcess) -> None:
    resp, _ = raw_exchange(
        strict_proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000,
        wait_close=False,
    )
    assert (resp.status, resp.body) == (200, b"b" * 1000)


def test_streamed_chunked_body_over_max_body_is_413(strict_proxy: ProxyProcess) -> None:
    body = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    resp, closed = raw_exchange(
        strict_proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
        timeout=2,
    )
    assert status_line(resp.head) == b"HTTP/1.1 413 Content Too Large"
    assert closed


def test_streamed_chunked_body_over_max_body_in_later_reads_is_413(
    strict_proxy: ProxyProcess,
) -> None:
    with RawConn(strict_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        try:
            for _ in range(5):
                conn.send(b"100\r\n" + b"c" * 256 + b"\r\n")
                time.sleep(0.05)
        except OSError:
            pass  # the proxy may close as soon as the limit is crossed
        resp = conn.read_response()
        assert status_line(resp.head) == b"HTTP/1.1 413 Content Too Large"
        assert conn.at_eof()


def test_slow_request_head_is_408(strict_proxy: ProxyProcess) -> None:
    with RawConn(strict_proxy.port, timeout=5) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        resp = conn.read_response()
        assert status_line(resp.head) == b"HTTP/1.1 408 Request Timeout"
        assert conn.at_eof()


def test_slow_request_body_is_408(strict_proxy: ProxyProcess) -> None:
    with RawConn(strict_proxy.port, timeout=5) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        resp = conn.read_response()
        assert status_line(resp.head) == b"HTTP/1.1 408 Request Timeout"
        assert conn.at_eof()
    assert_still_serving(strict_proxy)
