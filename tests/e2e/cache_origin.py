"""A programmable HTTP/1.1 origin for the cache end-to-end tests.

``CacheOrigin`` is a ``ThreadingHTTPServer`` (keep-alive, one thread per connection) whose
answer per path is set by the test with :meth:`CacheOrigin.route` (status, headers, body,
delay, slow streaming, 304 revalidation). It counts the requests per path and records
each request's method and header fields, so a test can assert that the origin was (not)
reached and what it was asked (``If-None-Match``, ``Range``...). :meth:`CacheOrigin.stop`
closes the keep-alive connections too, so a stopped origin really refuses connections;
:meth:`CacheOrigin.restart` listens again on the same port with the same routes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Body = bytes | Callable[["Seen"], bytes]


@dataclass
class Seen:
    """One request as the origin received it (header names lowercased)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    """How the origin answers a path."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Body = b""
    delay: float = 0.0
    #: answer 304 when the request's If-None-Match names the reply's ETag, or its
    #: If-Modified-Since is not older than its Last-Modified
    revalidate: bool = True
    #: extra fields of such a 304
    not_modified_headers: list[tuple[str, str]] = field(default_factory=list)
    #: stream the body in pieces of this size with ``chunk_delay`` between them (0: at once)
    chunk_size: int = 0
    chunk_delay: float = 0.0
    #: frame the body chunked instead of with Content-Length
    chunked: bool = False
    #: send only this many body bytes, then close the connection (a broken response)
    truncate_at: int | None = None
    #: send a ``Date`` field (off by default: without it a response's age is exactly the
    #: time the cache held it, so ``ttl=`` values are exact to the second)
    date: bool = False

    def field(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CacheOrigin

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.log_request(code)
        self.send_response_only(code, message)
        if self._reply is not None and self._reply.date:
            self.send_header("Date", self.date_time_string())

    _reply: Reply | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def do_GET(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", "0") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                    body)
        reply = self._reply = self.server.record(path, seen)
        if reply.delay:
            time.sleep(reply.delay)
        payload = reply.body(seen) if callable(reply.body) else reply.body
        if reply.revalidate and reply.status == 200 and _not_modified(seen, reply):
            self.send_response(304)
            replaced = {name.lower() for name, _ in reply.not_modified_headers}
            for name, value in reply.headers:
                if name.lower() in ("etag", "cache-control", "expires", "vary",
                                    "last-modified") and name.lower() not in replaced:
                    self.send_header(name, value)
            for name, value in reply.not_modified_headers:
                self.send_header(name, value)
            self.end_headers()
            return
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "HEAD" or reply.status in (204, 304):
            return
        if reply.truncate_at is not None:
            payload = payload[: reply.truncate_at]
        step = reply.chunk_size or max(len(payload), 1)
        for start in range(0, len(payload), step):
            piece = payload[start : start + step]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if reply.chunked else piece)
            self.wfile.flush()
            if reply.chunk_delay:
                time.sleep(reply.chunk_delay)
        if reply.truncate_at is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif reply.chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET


def _not_modified(seen: Seen, reply: Reply) -> bool:
    inm = seen.header("if-none-match")
    etag = reply.field("etag")
    if inm is not None:
        return etag is not None and etag in [t.strip() for t in inm.split(",")]
    ims = seen.header("if-modified-since")
    last_modified = reply.field("last-modified")
    if ims is None or last_modified is None:
        return False
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(last_modified) <= parsedate_to_datetime(ims)
    except (TypeError, ValueError):
        return False


class CacheOrigin(ThreadingHTTPServer):
    """The programmable origin; ``start()`` serves in a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.lock = threading.Lock()
        self.replies: dict[str, Reply] = {}
        self.seen: dict[str, list[Seen]] = {}
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # (a client that went away mid-body: expected in these tests)

    def start(self) -> CacheOrigin:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (keep-alive ones included)."""
        self.shutdown()
        self.server_close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restart(self) -> CacheOrigin:
        """A new origin on the same port, with the same routes and records."""
        again = CacheOrigin(self.port)
        again.replies, again.seen = self.replies, self.seen
        return again.start()

    # -- used by the handler ------------------------------------------------------------

    def track(self, conn: socket.socket) -> None:
        with self.lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self.lock:
            self._conns.discard(conn)

    def record(self, path: str, seen: Seen) -> Reply:
        with self.lock:
            self.seen.setdefault(path, []).append(seen)
            reply = self.replies.get(f"{seen.method} {path}") or self.replies.get(path)
        if reply is None:
            reply = Reply(body=f"body of {path}\n".encode(),
                          headers=[("Content-Type", "text/plain")])
        return reply

    # -- used by the tests --------------------------------------------------------------

    def route(self, path: str, method: str | None = None, **reply: object) -> Reply:
        """Answer ``path`` (requests of ``method`` only, if given) as ``Reply(**reply)``
        says from now on."""
        made = Reply(**reply)  # type: ignore[arg-type]
        with self.lock:
            self.replies[f"{method} {path}" if method else path] = made
        return made

    def count(self, path: str) -> int:
        with self.lock:
            return len(self.seen.get(path, []))

    def requests(self, path: str) -> list[Seen]:
        with self.lock:
            return list(self.seen.get(path, []))
