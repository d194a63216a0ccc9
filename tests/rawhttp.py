"""Raw HTTP/1.x helpers shared by the test suites: buffered client sockets, a response reader,
request builders, scripted raw TCP origins and a quiet test origin.

Everything runs on real sockets on 127.0.0.1; nothing is mocked. The suite-specific helper
modules (``server_util``, ``upstream_util``, ``e2e_util``, ``proxy_util``) build on these.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from origin import OriginServer

# --- a buffered client socket -------------------------------------------------------------


class RawSocket:
    """A blocking client socket (plain or TLS) with a read buffer and framing primitives."""

    def __init__(
        self, port: int = 0, timeout: float = 10.0, sock: socket.socket | None = None
    ) -> None:
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before {marker!r}; got {self.buf[:200]!r}")
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def at_eof(self) -> bool:
        """True if the peer closed (after whatever is buffered); waits up to the timeout."""
        if self.buf:
            return False
        try:
            return not self._fill()
        except ConnectionResetError:
            return True


# --- a lenient response reader (str headers, ``complete`` flag) ---------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class RawClient(RawSocket):
    """Frames Content-Length, chunked and close-delimited responses; never raises on a short
    body (``Response.complete`` is False instead)."""

    def read_response(self) -> Response:
        """One response; ``complete`` is False if the peer closed before its end."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"EOF before a response head; got {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        resp = Response(status, headers, b"")  # type: ignore[arg-type]
        length = resp.header("content-length")
        if length is not None:
            n = int(length)
            while len(self.buf) < n:
                if not self._fill():
                    resp.complete = False
                    break
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        elif resp.header("transfer-encoding") is None:
            resp.body = self.read_to_eof()
        else:
            resp.body, resp.complete = self._read_chunked()
        return resp

    def _read_chunked(self) -> tuple[bytes, bool]:
        out = []
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    return b"".join(out), False
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + self.buf:
                    if not self._fill():
                        return b"".join(out), False
                _, _, self.buf = (b"\r\n" + self.buf).partition(b"\r\n\r\n")
                return b"".join(out), True
            while len(self.buf) < size + 2:
                if not self._fill():
                    out.append(self.buf[:size])
                    return b"".join(out), False
            out.append(self.buf[:size])
            self.buf = self.buf[size + 2 :]

    def closed_by_peer(self) -> bool:
        """True once the peer closed (EOF or reset) with nothing more to read."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def wait_closed(self) -> float:
        """Read until the peer closes; return how long that took (bytes must not come)."""
        started = time.monotonic()
        data = self.read_to_eof()
        assert data == b"", f"unexpected bytes before close: {data[:200]!r}"
        return time.monotonic() - started


def request_bytes(
    path: str = "/", headers: dict[str, str] | None = None, method: str = "GET"
) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def get(
    port: int,
    path: str = "/",
    headers: dict[str, str] | None = None,
    client: type[RawClient] = RawClient,
) -> Response:
    """One GET on a fresh connection (``Connection: close``)."""
    with client(port) as c:
        c.send(request_bytes(path, dict(headers or {}, Connection="close")))
        return c.read_response()


# --- scripted raw TCP origins -------------------------------------------------------------


class TcpServer:
    """A threaded TCP server on 127.0.0.1 running ``handler(conn)`` per connection.

    ``accepted`` counts accepted connections. Exceptions of the types in ``swallow`` end a
    handler quietly; the connection is closed after the handler either way.
    """

    swallow: tuple[type[BaseException], ...] = (OSError, EOFError)

    def __init__(
        self,
        handler: Callable[[socket.socket], None],
        *,
        poll: float = 0.05,
        conn_timeout: float = 5.0,
    ) -> None:
        self.handler = handler
        self.conn_timeout = conn_timeout
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(poll)
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.conns: list[socket.socket] = []
        self._count_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.conn_timeout)
            with self._count_lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except self.swallow:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()
        with self._count_lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass


# --- a quiet, quick-to-stop origin --------------------------------------------------------


class QuietOrigin(OriginServer):
    """origin.OriginServer without tracebacks for connections the proxy aborts on purpose,
    and quick to stop (serve_forever polls every 50 ms instead of 500 ms)."""

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        pass

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self
