"""A real HTTP/1.1 origin server for tests (threaded, standard library only).

Paths:
  /                 ``hello world\\n``
  /echo             echoes the request body (X-Echo-Method, X-Body-Length headers)
  /headers          JSON object of the request headers as received (list of pairs)
  /slow?ms=N        sleeps N ms, then answers ``slow``
  /big?size=N       N bytes of a repeating pattern, Content-Length framed
  /chunked?n=K&size=S  K chunks of S bytes, chunked
  /close            a close-delimited body (no Content-Length, Connection: close)
  /status/NNN       empty response with that status
  /garbage          a response that is not HTTP
  /hopbyhop         a response carrying hop-by-hop headers
It counts accepted connections in ``server.connections``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size: int) -> bytes:
    """The first ``size`` bytes of the test pattern."""
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OriginServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(out)
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:  # noqa: N802
        self.handle_any()

    def handle_any(self) -> None:
        self.server.requests.append((self.command, self.path, list(self.headers.items())))
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._read_body()
        path = url.path
        if path == "/echo":
            self._send(200, body, {"X-Echo-Method": self.command, "X-Body-Length": str(len(body))})
        elif path == "/headers":
            data = json.dumps(list(self.headers.items())).encode()
            self._send(200, data, {"Content-Type": "application/json"})
        elif path == "/slow":
            time.sleep(int(q.get("ms", "1000")) / 1000)
            self._send(200, b"slow")
        elif path == "/big":
            size = int(q.get("size", "1048576"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if self.command != "HEAD":
                sent = 0
                while sent < size:
                    n = min(len(PATTERN), size - sent)
                    self.wfile.write(PATTERN[:n])
                    sent += n
        elif path == "/chunked":
            n, size = int(q.get("n", "3")), int(q.get("size", "10"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(n):
                self.wfile.write(b"%x\r\n" % size + b"x" * size + b"\r\n")
            trailer = q.get("trailer")
            tail = f"X-Trailer: {trailer}\r\n".encode() if trailer else b""
            self.wfile.write(b"0\r\n" + tail + b"\r\n")
        elif path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"close-delimited body")
            self.close_connection = True
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"")
        elif path == "/garbage":
            self.wfile.write(b"this is not http\r\n\r\n")
            self.close_connection = True
        elif path == "/hopbyhop":
            self._send(
                200,
                b"ok",
                {"Connection": "X-Secret", "X-Secret": "s", "Keep-Alive": "timeout=5",
                 "Proxy-Connection": "keep-alive", "Trailer": "X-T", "Upgrade": "h2c"},
            )
        else:
            self._send(200, b"hello world\n", {"Content-Type": "text/plain"})


class OriginServer(ThreadingHTTPServer):
    """The threaded test origin; ``start()`` serves in a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # bursts of new upstream connections must not hit SYN drops

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.connections = 0
        self.requests: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OriginServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
