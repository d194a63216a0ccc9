"""Session.send_body_from: a response body pulled from a file-like source as the client reads.

A proxy's ``request_filter`` sends a head, hands an instrumented source (a real file, counting
its reads and closes) to ``send_body_from`` and returns True, in both engine modes. The
clients are raw sockets and http.client over 127.0.0.1. What is checked: the whole body
arrives; the source is read only as fast as the client takes the bytes (backpressure);
``close()`` runs exactly once on every path (end, HEAD, client gone, read error, stalled
client); the connection stays usable after a complete body and is closed after a broken one.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_util import IO_TIMEOUT, variant

from ferryman import ProxyError, ProxyHttp, ProxyOptions, ResponseHeader, Session
from harness import ProxyHarness

MIB = 1024 * 1024
BIG_SIZE = 20 * MIB
FAIL_AFTER = 8 * MIB  # /fail, /raise: read() raises once this much was read (mid-body)
SMALL = b"small body\n" * 10


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bodies")
    big = base / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG_SIZE // MIB):
            f.write(os.urandom(MIB))
    small = base / "small.txt"
    small.write_bytes(SMALL)
    return {"big": big, "small": small}


class Source:
    """A file opened for ``send_body_from`` that records how it is used."""

    def __init__(
        self, path: Path, fail_after: int | None = None, exc: type[Exception] = OSError
    ) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close(), as the engine must
        self.fail_after = fail_after
        self.exc = exc
        self.read_bytes = 0
        self.reads = 0
        self.closes = 0
        self.read_after_close = False
        self.closed_event = threading.Event()
        self.in_filter = False  # set while request_filter runs (send_body_from's first burst)
        self.failed_in_filter: bool | None = None  # where read() raised, if it did

    def read(self, size: int, /) -> bytes:
        if self.closes:
            self.read_after_close = True
        self.reads += 1
        if self.fail_after is not None and self.read_bytes >= self.fail_after:
            self.failed_in_filter = self.in_filter
            if self.exc is OSError:
                raise OSError(errno.EIO, "input/output error")
            raise self.exc("broken source")
        data = self.file.read(size)
        self.read_bytes += len(data)
        return data

    def close(self) -> None:
        self.closes += 1
        self.file.close()
        self.closed_event.set()


class ShortSource(Source):
    """Gives only ``limit`` bytes, then EOF (a file that shrank after its size was sent)."""

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path)
        self.limit = limit

    def read(self, size: int, /) -> bytes:
        return super().read(max(0, min(size, self.limit - self.read_bytes)))


class ResettingSource(Source):
    """Resets the client's connection (RST) from inside read(), once 512 KiB were read:
    the client vanishes while send_body_from's first burst is still running."""

    def __init__(self, path: Path, client: socket.socket | None) -> None:
        super().__init__(path)
        self.client = client

    def read(self, size: int, /) -> bytes:
        client = self.client
        if client is not None and self.read_bytes >= 512 * 1024:
            self.client = None
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        return super().read(size)


class Streamer(ProxyHttp):
    """Answers every request from a :class:`Source`; which one depends on the path.

    ``/big`` (20 MiB, Content-Length), ``/chunked`` (the same, no Content-Length),
    ``/small``, ``/fail`` (read raises OSError after 8 MiB), ``/fail-early`` (after 64 KiB,
    still inside request_filter), ``/raise`` (ValueError after 8 MiB), ``/short`` (ends
    10 bytes early), ``/reset`` (resets ``victim``, the client socket, mid-burst).
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.sources: list[Source] = []
        self.logged: list[ProxyError | None] = []
        self.victim: socket.socket | None = None

    def request_filter(self, session: Session, ctx: Any) -> bool:
        path = session.req_header.path
        big = self.files["big"]
        length: int | None = BIG_SIZE
        if path == "/big":
            source = Source(big)
        elif path == "/chunked":
            source = Source(big)
            length = None
        elif path == "/small":
            source = Source(self.files["small"])
            length = len(SMALL)
        elif path == "/fail":
            source = Source(big, fail_after=FAIL_AFTER)
        elif path == "/fail-early":
            source = Source(big, fail_after=64 * 1024)
        elif path == "/raise":
            source = Source(big, fail_after=FAIL_AFTER, exc=ValueError)
        elif path == "/reset":
            source = ResettingSource(big, self.victim)
        elif path == "/short":
            source = ShortSource(self.files["small"], len(SMALL) - 10)
            length = len(SMALL)
        elif path == "/long":  # a file that grew after its size was sent
            source = Source(big)
            length = len(SMALL)
        else:
            session.send_response(404)
            return True
        self.sources.append(source)
        resp = ResponseHeader(200, [(b"Content-Type", b"application/octet-stream")])
        session.send_response_header(resp, length=length)
        source.in_filter = True
        try:
            session.send_body_from(source)
        finally:
            source.in_filter = False
        return True

    def upstream_peer(self, session: Session, ctx: Any) -> Any:
        raise AssertionError("never called: request_filter answers everything")

    def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
        self.logged.append(error)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Client:
    """A raw client connection reading responses at its own pace."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.buf = b""
        self.received = 0  # body and head bytes taken off the socket

    def close(self) -> None:
        self.sock.close()

    def get(self, path: str, method: str = "GET") -> None:
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test.local\r\n\r\n".encode())

    def _fill(self, max_bytes: int = 65536) -> bool:
        data = self.sock.recv(max_bytes)
        self.received += len(data)
        self.buf += data
        return bool(data)

    def head(self) -> dict[str, str]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before a head: {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {"status": lines[0].split(" ")[1]}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return headers

    def body(self, n: int, hasher: Any = None) -> int:
        """Read ``n`` body bytes (feeding ``hasher``); returns how many came before EOF."""
        got = 0
        while got < n:
            if not self.buf and not self._fill(min(65536, n - got)):
                break
            take, self.buf = self.buf[: n - got], self.buf[n - got :]
            got += len(take)
            if hasher is not None:
                hasher.update(take)
        return got

    def dechunk(self) -> bytes:
        out = []
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    raise EOFError("EOF in a chunk size line")
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise EOFError("EOF in a chunk")
            out.append(self.buf[:size])
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return b"".join(out)

    def at_eof(self, timeout: float = IO_TIMEOUT) -> bool:
        """Whether the proxy closed the connection (nothing more arrives) within ``timeout``."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return not self._fill()
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(IO_TIMEOUT)


@pytest.fixture
def streamer(mode: str, files: dict[str, Path], start_proxy: Any) -> Iterator[ProxyHarness]:
    proxy = variant(mode, Streamer)(files)
    harness: ProxyHarness = start_proxy(proxy)
    yield harness
    sources: list[Source] = proxy.sources
    for source in sources:
        assert source.closed_event.wait(5), "a source was never closed"
        assert source.closes == 1, "a source was closed more than once"
        assert not source.read_after_close


def proxy_of(harness: ProxyHarness) -> Streamer:
    proxy = harness.proxy
    assert isinstance(proxy, Streamer)
    return proxy


def big_digest(files: dict[str, Path]) -> str:
    return hashlib.sha256(files["big"].read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------


def test_whole_body_then_keep_alive(streamer: ProxyHarness, files: dict[str, Path]) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    try:
        client.get("/big")
        head = client.head()
        assert head["status"] == "200"
        assert head["content-length"] == str(BIG_SIZE)
        assert "transfer-encoding" not in head and "connection" not in head
        hasher = hashlib.sha256()
        assert client.body(BIG_SIZE, hasher) == BIG_SIZE
        assert hasher.hexdigest() == big_digest(files)
        assert wait_for(lambda: proxy.sources[0].closes == 1)
        # the same connection carries the next requests
        client.get("/small")
        assert client.head()["status"] == "200"
        assert client.body(len(SMALL)) == len(SMALL) and client.buf == b""
        client.get("/chunked")
        head = client.head()
        assert head["transfer-encoding"] == "chunked"
        assert hashlib.sha256(client.dechunk()).hexdigest() == big_digest(files)
        client.get("/small")
        assert client.head()["status"] == "200"
    finally:
        client.close()
    assert wait_for(lambda: len(proxy.logged) == 4)
    assert proxy.logged == [None, None, None, None]
    assert [s.closes for s in proxy.sources] == [1, 1, 1, 1]


def test_http_client_reads_it(streamer: ProxyHarness, files: dict[str, Path]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", streamer.port, timeout=IO_TIMEOUT)
    try:
        for path in ("/big", "/chunked", "/big"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200
            assert hashlib.sha256(resp.read()).hexdigest() == big_digest(files)
    finally:
        conn.close()


def _shrink_proxy_send_buffers(harness: ProxyHarness) -> bool:
    """Pin SO_SNDBUF of the proxy's client sockets (no autotuning up to tcp_wmem's 4 MiB),
    so that what may sit in kernel buffers is small and the bound below can be tight."""

    def shrink() -> bool:
        done = False
        for down in harness.service.connections:
            sock = down.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
                done = True
        return done

    try:
        return bool(harness.call(shrink))
    except (OSError, AttributeError):
        return False


def slow_client(harness: ProxyHarness) -> tuple[Client, bool]:
    """A client with a small receive buffer whose proxy-side send buffer is pinned small
    too (``True`` if that worked): little fits in the kernel before backpressure starts."""
    client = Client(harness.port, rcvbuf=64 * 1024)
    assert wait_for(lambda: len(harness.service.connections) == 1)
    return client, _shrink_proxy_send_buffers(harness)


def test_source_is_read_only_as_fast_as_the_client_reads(
    streamer: ProxyHarness, files: dict[str, Path]
) -> None:
    proxy = proxy_of(streamer)
    client, pinned = slow_client(streamer)
    try:
        # ahead of the client at most: kernel buffers both sides (doubled by Linux), the
        # transport's 256 KiB high-water mark plus one 64 KiB read, with some slack; without
        # a pinned send buffer, the 4 MiB of tcp_wmem autotuning as well
        slack = 2 * MIB if pinned else 6 * MIB
        client.get("/big")
        assert client.head()["status"] == "200"
        hasher = hashlib.sha256()
        total = 0
        for _ in range(3):
            total += client.body(MIB, hasher)
            time.sleep(0.3)
            source = proxy.sources[0]
            ahead = source.read_bytes - client.received
            assert ahead <= slack, f"read {source.read_bytes}, client has {client.received}"
            # while the client reads nothing, nothing more is read
            before = source.read_bytes
            time.sleep(0.2)
            assert source.read_bytes == before
        assert source.read_bytes < BIG_SIZE // 2
        total += client.body(BIG_SIZE - total, hasher)
        assert total == BIG_SIZE
        assert hasher.hexdigest() == big_digest(files)
        assert wait_for(lambda: source.closes == 1)
        # 64 KiB reads, plus the one that saw the end
        assert source.reads == BIG_SIZE // (64 * 1024)  # stops at the Content-Length: no EOF read
    finally:
        client.close()


def paused(source: Source) -> bool:
    """Whether ``source`` is no longer being read (the proxy waits for the client)."""
    before = source.read_bytes
    time.sleep(0.1)
    return source.read_bytes == before


def test_client_disconnect_closes_the_source(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port, rcvbuf=64 * 1024)
    client.get("/big")
    assert client.head()["status"] == "200"
    assert client.body(256 * 1024) == 256 * 1024
    source = proxy.sources[0]
    assert wait_for(lambda: paused(source)), "the proxy never stopped reading"
    client.close()
    assert source.closed_event.wait(5), "close() not called after the client left"
    time.sleep(0.2)
    assert source.closes == 1
    assert source.read_bytes < BIG_SIZE
    assert wait_for(lambda: len(proxy.logged) == 1)
    assert proxy.logged[0] is not None  # the request failed: the client closed
    # the proxy goes on serving other connections
    other = Client(streamer.port)
    try:
        other.get("/small")
        assert other.head()["status"] == "200"
        assert other.body(len(SMALL)) == len(SMALL)
    finally:
        other.close()


def test_stalled_client_is_dropped_and_source_closed(
    mode: str, files: dict[str, Path], start_proxy: Any
) -> None:
    proxy = variant(mode, Streamer)(files)
    harness = start_proxy(proxy, ProxyOptions(body_write_timeout=0.5))
    client = Client(harness.port, rcvbuf=64 * 1024)
    try:
        client.get("/big")
        assert client.head()["status"] == "200"
        source = proxy.sources[0]
        assert source.closed_event.wait(8), "the stalled client was never dropped"
        assert source.closes == 1 and source.read_bytes < BIG_SIZE
    finally:
        client.close()


def test_read_error_truncates_and_closes(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client, _ = slow_client(streamer)
    try:
        client.get("/fail")
        head = client.head()
        assert head["status"] == "200" and head["content-length"] == str(BIG_SIZE)
        got = client.body(BIG_SIZE)
        assert got == FAIL_AFTER  # everything read before the error, then EOF
        assert client.at_eof()
    finally:
        client.close()
    source = proxy.sources[0]
    assert source.failed_in_filter is False, "the error must come mid-body, on a drain"
    assert source.closed_event.wait(5)
    assert wait_for(lambda: len(proxy.logged) == 1)
    assert isinstance(proxy.logged[0], ProxyError)
    assert "reading the response body failed" in str(proxy.logged[0])
    assert small_request_works(streamer)


def small_request_works(harness: ProxyHarness) -> bool:
    """A new connection gets /small answered (the proxy still serves)."""
    other = Client(harness.port)
    try:
        other.get("/small")
        return other.head()["status"] == "200" and other.body(len(SMALL)) == len(SMALL)
    finally:
        other.close()


def test_read_error_in_the_first_burst_truncates_and_closes(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    try:
        client.get("/fail-early")
        assert client.head()["status"] == "200"
        assert client.body(BIG_SIZE) == 64 * 1024
        assert client.at_eof()
    finally:
        client.close()
    assert proxy.sources[0].failed_in_filter is True
    assert proxy.sources[0].closed_event.wait(5)
    assert small_request_works(streamer)


def test_read_error_in_the_first_burst_is_logged(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    try:
        client.get("/fail-early")
        client.head()
        client.body(BIG_SIZE)
    finally:
        client.close()
    assert wait_for(lambda: len(proxy.logged) == 1)
    assert isinstance(proxy.logged[0], ProxyError)


def test_other_read_exception_mid_body_closes_source(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client, _ = slow_client(streamer)
    client.sock.settimeout(3)  # (with the bug, the rest of the body never comes)
    try:
        client.get("/raise")
        assert client.head()["status"] == "200"
        assert client.body(BIG_SIZE) == FAIL_AFTER
        assert proxy.sources[0].failed_in_filter is False
        assert client.at_eof(timeout=2)
        assert proxy.sources[0].closed_event.wait(2)
    finally:
        client.close()
        # leave the fixture's teardown checks a closed source whatever happened
        for source in proxy.sources:
            if not source.closes:
                source.close()


def test_client_reset_during_first_burst_stops_reading(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    proxy.victim = client.sock  # ResettingSource closes it with an RST from read()
    client.get("/reset")
    source = proxy.sources[0] if wait_for(lambda: bool(proxy.sources)) else None
    assert source is not None
    assert source.closed_event.wait(5)
    assert source.closes == 1
    assert source.read_bytes < 4 * MIB, f"read {source.read_bytes} bytes for a gone client"


def test_source_shorter_than_content_length_closes_connection(streamer: ProxyHarness) -> None:
    client = Client(streamer.port)
    try:
        client.get("/short")
        head = client.head()
        assert head["content-length"] == str(len(SMALL))
        assert client.body(len(SMALL) - 10) == len(SMALL) - 10
        assert client.at_eof(timeout=1)
    finally:
        client.close()


def test_source_longer_than_content_length_is_cut_there(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    try:
        client.get("/long")
        head = client.head()
        assert head["content-length"] == str(len(SMALL))
        assert client.body(len(SMALL)) == len(SMALL)
        client.get("/small")  # the connection is still in step: no stray body bytes
        assert client.head()["status"] == "200"
        assert client.body(len(SMALL)) == len(SMALL)
    finally:
        client.close()
    assert proxy.sources[0].read_bytes == len(SMALL)
    assert proxy.sources[0].closes == 1


def test_head_closes_source_without_reading(streamer: ProxyHarness) -> None:
    proxy = proxy_of(streamer)
    client = Client(streamer.port)
    try:
        client.get("/big", "HEAD")
        head = client.head()
        assert head["status"] == "200" and head["content-length"] == str(BIG_SIZE)
        client.get("/small")  # no body came after the HEAD answer
        assert client.head()["status"] == "200"
        assert client.body(len(SMALL)) == len(SMALL)
    finally:
        client.close()
    source = proxy.sources[0]
    assert source.closes == 1 and source.reads == 0


def test_pipelined_requests_after_a_streamed_body(
    streamer: ProxyHarness, files: dict[str, Path]
) -> None:
    client = Client(streamer.port)
    try:
        client.sock.sendall(
            b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        expected = big_digest(files)
        for size in (BIG_SIZE, len(SMALL), BIG_SIZE):
            assert client.head()["status"] == "200"
            hasher = hashlib.sha256()
            assert client.body(size, hasher) == size
            if size == BIG_SIZE:
                assert hasher.hexdigest() == expected
        assert client.buf == b""
    finally:
        client.close()
    assert [s.closes for s in proxy_of(streamer).sources] == [1, 1, 1]


def test_many_concurrent_streams(streamer: ProxyHarness, files: dict[str, Path]) -> None:
    expected = big_digest(files)
    results: list[str] = []

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", streamer.port, timeout=IO_TIMEOUT)
        try:
            conn.request("GET", "/big")
            results.append(hashlib.sha256(conn.getresponse().read()).hexdigest())
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [expected] * 4
