"""Helpers for the server tests: proxies, a raw HTTP client, TLS clients, a test PKI."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferryman import HttpPeer, ProxyHttp

StartHarness = Callable[..., Any]  # start_proxy(proxy, options=None, listeners=None)


class SyncProxy(ProxyHttp):
    """Sync mode (plain-function hooks only): every request goes to ``peer``."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer


class AsyncProxy(ProxyHttp):
    """Task mode (an ``async def`` hook): every request goes to ``peer``."""

    def __init__(self, peer: HttpPeer) -> None:
        self.peer = peer

    async def upstream_peer(self, session, ctx):  # type: ignore[no-untyped-def]
        return self.peer


PROXY_MODES = {"sync": SyncProxy, "task": AsyncProxy}


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
    """A blocking client socket (plain or TLS) framing Content-Length and chunked bodies."""

    def __init__(self, port: int = 0, timeout: float = 10.0, sock: socket.socket | None = None):
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
        while True:
            try:
                if not self._fill():
                    break
            except ConnectionResetError:
                break
        out, self.buf = self.buf, b""
        return out

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


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Response:
    """One GET on a fresh connection (``Connection: close``)."""
    with RawClient(port) as c:
        c.send(request_bytes(path, dict(headers or {}, Connection="close")))
        return c.read_response()


@dataclass
class ServerPki:
    ca_file: str
    default_cert: str
    default_key: str
    sni_cert: str
    sni_key: str
    client_cert: str
    client_key: str
    stranger_cert: str
    stranger_key: str


# --- TLS --------------------------------------------------------------------------------------


def client_context(
    ca_file: str | None,
    *,
    check_hostname: bool = True,
    alpn: list[str] | None = None,
    cert: tuple[str, str] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = check_hostname
    if ca_file is not None:
        ctx.load_verify_locations(ca_file)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def tls_connect(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None, timeout: float = 10.0
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def san_dns_names(cert: dict[str, Any]) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
