"""A fault-injecting origin: each way an upstream can fail, and what the client gets
(issue 5, item 4).

One ``ferryman run`` process (read timeout 1 s) in front of a scripted origin that picks
its fault from the request path. For each fault: the client's exact outcome, the proxy
still serving, and no upstream connection used again after it failed (the origin records
which connection carried which request).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from e2e_util import ProxyProcess, RawConn, ScriptedOrigin, ferryman_in_front_of

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class FaultOrigin:
    """Serves ``/ok``; ``/fault/<name>`` misbehaves as named."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[int, bytes]] = []  # (connection number, path), in order
        self.next_conn = 0
        self.server = ScriptedOrigin(self._handle)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def reuse_after_fault(self) -> list[tuple[int, bytes]]:
        """Requests that arrived on a connection after a fault on it."""
        faulted: set[int] = set()
        bad = []
        with self.lock:
            for conn_no, path in self.log:
                if conn_no in faulted:
                    bad.append((conn_no, path))
                if path.startswith(b"/fault/"):
                    faulted.add(conn_no)
        return bad

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            conn_no = self.next_conn
            self.next_conn += 1
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            with self.lock:
                self.log.append((conn_no, path))
            if path == b"/ok":
                conn.sendall(OK)
                continue
            fault = path[len(b"/fault/") :]
            if fault == b"close":
                conn.close()
            elif fault == b"reset-mid-head":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
                time.sleep(0.05)
                _reset(conn)
            elif fault == b"reset-mid-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                time.sleep(0.05)
                _reset(conn)
            elif fault == b"garbage":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                time.sleep(0.2)
                conn.close()
            elif fault == b"head-too-large":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n")
                time.sleep(0.2)
                conn.close()
            elif fault == b"too-many-headers":  # 150 small fields: 1.4 KB, past 100 fields
                fields = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
                time.sleep(0.2)
                conn.close()
            elif fault == b"invalid-header":
                conn.sendall(b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.2)
                conn.close()
            elif fault == b"body-longer":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
                time.sleep(0.2)  # keep the connection open: the proxy must drop it
                continue
            elif fault == b"body-shorter":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
                time.sleep(0.05)
                conn.close()
            elif fault == b"bad-chunk":
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
                time.sleep(0.1)  # the head went out: the error comes mid-body
                conn.sendall(b"zz\r\nok\r\n")
                time.sleep(0.2)
                conn.close()
            elif fault == b"stall":
                time.sleep(2.5)
                conn.close()
            elif fault == b"drip":
                for byte in b"HTTP/1.1 200 OK\r\n":  # a byte every 1.5 s: past the timeout
                    conn.sendall(bytes([byte]))
                    time.sleep(1.5)
            return

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, FaultOrigin]]:
    origin = FaultOrigin()
    workdir = tmp_path_factory.mktemp("ferryman-faults")
    with ferryman_in_front_of(origin.address, workdir, read="1s") as proxy:
        yield proxy, origin
    origin.stop()


def _get(port: int, path: str) -> tuple[RawConn, object]:
    conn = RawConn(port, timeout=8)
    conn.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return conn, conn.read_head()


#: faults that end before any response byte reached the client: (path, exact status)
BEFORE_HEAD = [
    ("close", 502),
    ("reset-mid-head", 502),
    ("garbage", 502),
    ("head-too-large", 502),
    ("too-many-headers", 502),
    ("invalid-header", 502),
    ("stall", 504),
    ("drip", 504),
]


@pytest.mark.parametrize(("fault", "status"), BEFORE_HEAD, ids=[f for f, _ in BEFORE_HEAD])
def test_a_fault_before_the_response_head(rig, fault: str, status: int) -> None:
    proxy, origin = rig
    with RawConn(proxy.port, timeout=8) as conn:
        conn.send(f"GET /fault/{fault} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        resp = conn.read_response()
        assert resp.status == status, resp.head
        # the client connection itself is fine: the next request on it works
        conn.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        again = conn.read_response()
        assert (again.status, again.body) == (200, b"ok")
    assert origin.reuse_after_fault() == []


#: faults after the response started: (path, body the client gets before the close)
AFTER_HEAD = [
    ("reset-mid-body", b"0123456789"),
    ("body-shorter", b"ok"),
    ("bad-chunk", b"ok"),
]


@pytest.mark.parametrize(("fault", "partial"), AFTER_HEAD, ids=[f for f, _ in AFTER_HEAD])
def test_a_fault_after_the_response_started_truncates_and_closes(
    rig, fault: str, partial: bytes
) -> None:
    proxy, origin = rig
    with RawConn(proxy.port, timeout=8) as conn:
        conn.send(f"GET /fault/{fault} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        status = conn.read_head()[1]
        assert status == 200
        rest = conn.read_to_eof()  # the proxy closes: the client sees the truncation
        assert partial in rest and len(rest) < 100 + 16
    with RawConn(proxy.port, timeout=8) as conn:
        conn.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().status == 200
    assert origin.reuse_after_fault() == []


def test_a_body_longer_than_its_length_is_cut_and_the_connection_not_pooled(rig) -> None:
    proxy, origin = rig
    with RawConn(proxy.port, timeout=8) as conn:
        conn.send(b"GET /fault/body-longer HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"ok")
        conn.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.read_response().body == b"ok"
    time.sleep(0.3)
    with RawConn(proxy.port, timeout=8) as conn:
        for _ in range(3):
            conn.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
            assert conn.read_response().body == b"ok"
    assert origin.reuse_after_fault() == []


def test_an_upstream_that_refuses_connections_gets_502(tmp_path) -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        with ferryman_in_front_of(dead, tmp_path) as proxy, RawConn(proxy.port, timeout=8) as conn:
            for _ in range(2):  # the client connection stays usable after each 502
                conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                resp = conn.read_response()
                assert resp.status == 502
                assert b"Connection refused" in resp.body, resp.body
