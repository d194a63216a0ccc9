"""Helpers for the upstream tests: proxies, raw and TLS origins, a raw HTTP client.

Everything runs on real sockets on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trustme

from ferryman import HttpPeer, ProxyHttp
from origin import OriginServer

# --- proxies ------------------------------------------------------------------------------


class AsyncProxy(ProxyHttp):
    """Task mode (an ``async def`` hook): every request goes to ``peer``."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer


class SyncProxy(ProxyHttp):
    """Sync mode (plain-function hooks only): every request goes to ``peer``."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer


class ByHeaderProxy(ProxyHttp):
    """Chooses ``peers[X-Peer]`` (a request header naming the peer)."""

    def __init__(self, peers: dict[str, HttpPeer]) -> None:
        self.peers = peers

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        name = session.req_header.headers.get(b"x-peer", b"").decode()
        return self.peers[name]


PROXY_MODES = {"sync": SyncProxy, "task": AsyncProxy}


StartHarness = Callable[..., Any]  # start_proxy(proxy, options=None) -> ProxyHarness
StartRawOrigin = Callable[..., "RawOrigin"]  # raw_origin(handler) -> RawOrigin
StartTlsOrigin = Callable[..., "TlsOriginServer"]  # tls_origin(require_client_cert=False)


# --- waiting ------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(step)


# --- a raw HTTP client --------------------------------------------------------------------


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


class RawClient:
    """A blocking client socket that frames Content-Length / close-delimited responses."""

    def __init__(self, port: int, timeout: float = 10.0, sock: socket.socket | None = None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def __enter__(self) -> RawClient:
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

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def closed_by_peer(self) -> bool:
        """True once the peer closed (EOF or reset) with nothing more to read."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Response:
    """One GET on a fresh connection (``Connection: close``)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with RawClient(port) as c:
        c.send(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n".encode())
        return c.read_response()


def request_bytes(
    path: str = "/", headers: dict[str, str] | None = None, method: str = "GET"
) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


# --- a scriptable raw origin --------------------------------------------------------------


@dataclass
class RawOrigin:
    """A TCP origin whose every connection runs ``handler(sock, origin)`` in a thread.

    ``connections`` counts accepted connections; ``closed`` counts connections whose
    handler saw the client (the proxy) close; ``events`` is appended to by handlers.
    """

    handler: Callable[[socket.socket, RawOrigin], None]
    connections: int = 0
    closed: int = 0
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            with self.lock:
                self.connections += 1
                self._socks.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def note_closed(self) -> None:
        with self.lock:
            self.closed += 1

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        with self.lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def read_request_head(conn: socket.socket) -> bytes | None:
    """Read one request head (GET, no body); ``None`` at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return buf


@dataclass
class Pki:
    """A trustme CA, a server certificate for ``localhost`` and a client certificate."""

    ca: trustme.CA
    ca_file: str
    server: trustme.LeafCert
    client_cert: str
    client_key: str
    other_ca_file: str



# --- a TLS origin ---------------------------------------------------------------------------


class TlsOriginServer(OriginServer):
    """tests/origin.OriginServer behind TLS; the handshake runs in the handler thread.

    ``handshake_failures`` counts connections whose TLS handshake failed; ``client_cns``
    records the CN of each verified client certificate.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context
        self.handshake_failures = 0
        self.client_cns: list[str] = []

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        pass

    def start(self) -> TlsOriginServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def finish_request(self, request, client_address):  # type: ignore[no-untyped-def]
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            with self.lock:
                self.handshake_failures += 1
            return
        try:
            cert = tls.getpeercert()
            if cert:
                for rdn in cert.get("subject", ()):
                    for key, value in rdn:
                        if key == "commonName":
                            self.client_cns.append(value)
            super().finish_request(tls, client_address)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()
