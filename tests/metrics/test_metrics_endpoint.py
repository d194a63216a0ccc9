"""The metrics endpoint over real sockets: in-process (serve_metrics) and as a process."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from ferryman.metrics.board import MetricsBoard, pid_alive, worker_slot
from ferryman.metrics.endpoint import MAX_HEAD_BYTES, run_metrics_process, serve_metrics
from ferryman.metrics.recorder import MainMetrics, WorkerMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def filled_board() -> MetricsBoard:
    board = MetricsBoard(workers=2, slot_size=64 * 1024)
    w = WorkerMetrics()
    w.record("main", "api", "backend", 200, 0.01, 0.005, 10, 20, True, False, 0)
    w.record("main", "api", "backend", 200, 0.02, 0.005, 0, 20, True, True, 0)
    w.set_active_connections(2)
    board.write(worker_slot(0), w.snapshot())
    board.write(0, MainMetrics(loaded_at=123.0).snapshot())
    return board


def requests_total(body: str) -> float:
    for family in text_string_to_metric_families(body):
        if family.name == "ferryman_requests":
            return sum(s.value for s in family.samples)
    raise AssertionError("no ferryman_requests_total")


class Endpoint:
    """serve_metrics on a uvloop loop in a thread."""

    def __init__(self, board: MetricsBoard, **kwargs: Any) -> None:
        self.board = board
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.loop = uvloop.new_event_loop()
        self.server: asyncio.Server | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.server = await serve_metrics(self.loop, self.sock, board, **kwargs)

            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()
            assert self.server is not None
            self.server.close()
            self.loop.run_until_complete(self.server.wait_closed())
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5), "metrics endpoint did not start"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


@pytest.fixture
def start_endpoint() -> Iterator[Callable[..., Endpoint]]:
    started: list[tuple[Endpoint, MetricsBoard]] = []

    def start(**kwargs: Any) -> Endpoint:
        board = filled_board()
        endpoint = Endpoint(board, **kwargs)
        started.append((endpoint, board))
        return endpoint

    yield start
    for endpoint, board in started:
        endpoint.stop()
        board.close()


@pytest.fixture
def endpoint(start_endpoint: Callable[..., Endpoint]) -> Endpoint:
    return start_endpoint()


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the peer closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_get_metrics(endpoint: Endpoint) -> None:
    conn = endpoint.connection()
    conn.request("GET", "/metrics?name[]=x")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == CONTENT_TYPE
    assert resp.getheader("Content-Length") == str(len(body))
    assert requests_total(body.decode()) == 2
    conn.close()


def test_head(endpoint: Endpoint) -> None:
    conn = endpoint.connection()
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    length = len(resp.read())
    conn.request("HEAD", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == CONTENT_TYPE
    assert resp.getheader("Content-Length") == str(length)
    assert resp.read() == b""
    conn.close()
    with endpoint.raw() as sock:  # and no body bytes on the wire
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(sock).endswith(b"\r\n\r\n")


def test_not_found(endpoint: Endpoint) -> None:
    conn = endpoint.connection()
    for path in ("/", "/metrics/", "/metricsx", "/other?metrics"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404, path
    conn.close()


def test_method_not_allowed(endpoint: Endpoint) -> None:
    conn = endpoint.connection()
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        conn.request(method, "/metrics", body=b"x=1" if method != "OPTIONS" else None)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 405, method
        assert resp.getheader("Allow") == "GET, HEAD"
    conn.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ],
)
def test_malformed_request(endpoint: Endpoint, request_bytes: bytes) -> None:
    with endpoint.raw() as sock:
        sock.sendall(request_bytes)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in answer


def test_keep_alive(endpoint: Endpoint) -> None:
    conn = endpoint.connection()
    conn.request("GET", "/metrics")
    first = conn.getresponse()
    first.read()
    assert not first.will_close
    assert conn.sock is not None
    local = conn.sock.getsockname()
    conn.request("GET", "/metrics")
    second = conn.getresponse()
    assert second.status == 200 and requests_total(second.read().decode()) == 2
    assert conn.sock is not None and conn.sock.getsockname() == local  # the same connection
    conn.close()


def test_pipelined_requests_answered_in_order(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"  # after the close: not answered
        )
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 ") == 3
    assert answer.startswith(b"HTTP/1.1 404 ")
    second = answer.index(b"HTTP/1.1 200 ")
    assert answer.index(b"HTTP/1.1 200 ", second + 1) > second


def test_connection_close_honoured(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert requests_total(body.decode()) == 2


def test_http10(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = read_all(sock)  # closed after the answer
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    with endpoint.raw() as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        sock.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert b"\r\nConnection: keep-alive\r\n" in head


def test_oversize_head(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(MAX_HEAD_BYTES // 1000 + 2):
                sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_oversize_body(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        try:
            sock.sendall(b"a" * 200_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            answer = read_all(sock)
        except ConnectionResetError:  # (unread bytes in the kernel's buffer at the close)
            answer = b"HTTP/1.1 413 "
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_header_timeout(start_endpoint: Callable[..., Endpoint]) -> None:
    endpoint = start_endpoint(header_timeout=0.3)
    with endpoint.raw() as idle, endpoint.raw() as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        assert read_all(idle) == b""  # closed, silently
        assert read_all(slow).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3
    # a connection that keeps sending requests is not cut
    conn = endpoint.connection()
    for _ in range(4):
        conn.request("GET", "/metrics")
        assert conn.getresponse().read()
        time.sleep(0.15)
    conn.close()


def test_upgrade_request_answered_then_closed(endpoint: Endpoint) -> None:
    with endpoint.raw() as sock:
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n\r\n" in answer
    with endpoint.raw() as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")  # (no path to serve)


# the metrics process -------------------------------------------------------------------------


def fetch(port: int, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of GET /metrics, retried until the server is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read().decode()
            conn.close()
            return resp.status, resp.getheader("Content-Type") or "", body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def reap(pid: int, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    return None


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_metrics_process_serves_then_stops_on_sigterm() -> None:
    board = filled_board()
    sock = listening_socket()
    port = sock.getsockname()[1]
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            run_metrics_process(sock, board, parent)
            code = 0
        finally:
            os._exit(code)
    sock.close()
    try:
        status, ctype, body = fetch(port)
        assert (status, ctype) == (200, CONTENT_TYPE)
        assert requests_total(body) == 2
        # a worker publishing later is seen by the next scrape
        w = WorkerMetrics()
        w.record("main", "api", "backend", 503, 0.01, -1.0, 0, 0, False, False, 0)
        board.write(worker_slot(1), w.snapshot())
        assert requests_total(fetch(port)[2]) == 3
        os.kill(pid, signal.SIGTERM)
        assert reap(pid) == 0
    finally:
        kill(pid)
        board.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_metrics_process_exits_when_its_parent_goes() -> None:
    board = filled_board()
    sock = listening_socket()
    port = sock.getsockname()[1]
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - child: the "main process", which forks the helper
        code = 1
        try:
            me = os.getpid()
            helper = os.fork()
            if helper == 0:
                hcode = 1
                try:
                    run_metrics_process(sock, board, me)
                    hcode = 0
                finally:
                    os._exit(hcode)
            os.write(write_end, str(helper).encode())
            time.sleep(0.5)
            code = 0
        finally:
            os._exit(code)
    sock.close()
    os.close(write_end)
    helper = int(os.read(read_end, 64))
    os.close(read_end)
    try:
        assert fetch(port)[0] == 200
        assert reap(middle) == 0  # the parent is gone
        deadline = time.monotonic() + 5
        while pid_alive(helper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(helper)
    finally:
        try:
            os.kill(helper, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill(middle)
        board.close()


def test_render_failure_is_a_500(endpoint: Endpoint) -> None:
    endpoint.board.close()  # reading the board now fails
    conn = endpoint.connection()
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 500
    conn.request("GET", "/elsewhere")  # the connection and the server go on
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 404
    conn.close()
