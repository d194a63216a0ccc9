"""A standalone HTTP/1.1 origin for the load-balancing end-to-end tests, run as its own
process (so that a test can SIGKILL it and start it again on the same port).

    python origin_proc.py --port P --log FILE [--host H] [--name NAME] [--delay-ms N]
                          [--status N]

Every response carries ``X-Origin: NAME`` (default: the port). The log file gets one line
per accepted connection (``conn CLIENT_PORT``) and per request (``req CLIENT_PORT METHOD
PATH``), flushed at once, so that the test can count requests, health checks and distinct
upstream connections even after the process was killed.

Paths:
  /healthz            ``ok`` (200)
  /slow?ms=N&size=S   sleeps N ms, then S bytes (default 4) of ``slow`` repeated
  /status/NNN         that status, empty body
  /headers            JSON list of the request headers as received
  /...                ``hello from NAME PATH`` (the path as received, query included)
``--delay-ms`` makes every request (except /healthz) sleep first; ``--status`` answers every
request (except /healthz) with that status.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Origin

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        # head and body are two writes: without this, Nagle + delayed ACK cost 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.log(f"conn {self.client_address[1]}")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Origin", self.server.name)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self) -> None:
        srv = self.server
        srv.log(f"req {self.client_address[1]} {self.command} {self.path}")
        length = int(self.headers.get("Content-Length", "0") or 0)
        if length:
            self.rfile.read(length)
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/healthz":
            self._send(200, b"ok\n", {"Content-Type": "text/plain"})
            return
        if srv.delay:
            time.sleep(srv.delay)
        if srv.status:
            self._send(srv.status, f"status {srv.status} from {srv.name}\n".encode())
        elif url.path == "/slow":
            time.sleep(int(q.get("ms", "1000")) / 1000)
            size = int(q.get("size", "4"))
            self._send(200, (b"slow" * (size // 4 + 1))[:size])
        elif url.path.startswith("/status/"):
            self._send(int(url.path.rsplit("/", 1)[1]), b"")
        elif url.path == "/headers":
            data = json.dumps(list(self.headers.items())).encode()
            self._send(200, data, {"Content-Type": "application/json"})
        else:
            self._send(200, f"hello from {srv.name} {self.path}\n".encode(),
                       {"Content-Type": "text/plain"})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


class Origin(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self, host: str, port: int, log_path: str, name: str, delay: float, status: int
    ) -> None:
        super().__init__((host, port), Handler)
        self.name = name
        self.delay = delay
        self.status = status
        self._lock = threading.Lock()
        self._log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as we do

    def log(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--status", type=int, default=0)
    args = parser.parse_args()
    name = args.name or str(args.port)
    server = Origin(args.host, args.port, args.log, name, args.delay_ms / 1000, args.status)
    server.serve_forever()


if __name__ == "__main__":
    main()
