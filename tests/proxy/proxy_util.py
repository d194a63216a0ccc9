"""Helpers for the proxy-engine tests (tests/proxy): mode variants, a raw HTTP/1.x client,
raw TCP upstreams and a quick-to-stop test origin. Fixtures live in conftest.py.

``variant(mode, SyncCls, AsyncCls)`` pairs a proxy class whose hooks are plain ``def`` (sync
mode, no task per request) with one whose hooks are ``async def`` (task mode); when no
hand-written async class is given, one is derived from the sync class by :func:`asyncify`
(each hook becomes an ``async def`` that first yields to the loop, then runs the same code).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferryman import ProxyHttp
from ferryman.proxy.hooks import HOOKS
from origin import OriginServer
from rawhttp import RawSocket, TcpServer

IO_TIMEOUT = 5.0
_SYNC_ONLY = ("new_ctx", "request_body_filter", "response_body_filter")


# --------------------------------------------------------------------------------------
# sync / async variants of one proxy class


def asyncify(cls: type[ProxyHttp]) -> type[ProxyHttp]:
    """A subclass of ``cls`` whose awaitable hooks are ``async def`` versions of its own.

    Each wrapper awaits ``asyncio.sleep(0)`` first, so the request task really suspends
    inside the hook, then runs the plain hook. ``new_ctx`` and the body filters stay plain.
    """
    ns: dict[str, Any] = {}
    for name in HOOKS:
        if name in _SYNC_ONLY or name not in cls.overridden:
            continue
        plain = getattr(cls, name)

        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def hook(self: ProxyHttp, *args: Any) -> Any:
                await asyncio.sleep(0)
                return fn(self, *args)

            hook.__name__ = fn.__name__
            return hook

        ns[name] = make(plain)
    return type("Async" + cls.__name__, (cls,), ns)


def variant(
    mode: str, sync_cls: type[ProxyHttp], async_cls: type[ProxyHttp] | None = None
) -> type[ProxyHttp]:
    """The class to use for ``mode`` (``"sync"`` or ``"async"``), checked for its mode."""
    if mode == "sync":
        assert sync_cls.async_hooks == frozenset(), sync_cls.async_hooks
        return sync_cls
    cls = async_cls if async_cls is not None else asyncify(sync_cls)
    assert cls.async_hooks, f"{cls.__name__} has no async hook"
    return cls


# --------------------------------------------------------------------------------------
# proxies


# --------------------------------------------------------------------------------------
# a raw HTTP/1.x client


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def has(self, name: str) -> bool:
        return self.header(name) is not None


class RawClient(RawSocket):
    """One client TCP connection speaking HTTP/1.x by hand (exact bytes, exact framing)."""

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        super().__init__(port, timeout)

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def read_head(self) -> RawResponse:
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k, v.strip()))
        return RawResponse(version, int(status), reason[0] if reason else "", headers)

    def read_response(self, method: str = "GET", skip_interim: bool = True) -> RawResponse:
        """Read one response; interim 1xx heads are skipped unless ``skip_interim`` is False."""
        while True:
            resp = self.read_head()
            if not (100 <= resp.status < 200 and resp.status != 101 and skip_interim):
                break
        if method == "HEAD" or resp.status < 200 or resp.status in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", te
            parts = []
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    break
                parts.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            while True:
                line = self.read_until(b"\r\n")
                if line == b"\r\n":
                    break
                k, _, v = line.decode("latin-1").partition(":")
                resp.trailers.append((k, v.strip()))
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = self.read_exact(int(cl))
        else:
            resp.body = self.read_to_eof()
        return resp

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        version: str = "1.1",
    ) -> RawResponse:
        self.send(build_request(method, path, body, headers, version))
        return self.read_response(method)


def build_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    version: str = "1.1",
) -> bytes:
    """The bytes of one request (Host and Content-Length added unless given)."""
    hs = list(headers or [])
    names = {k.lower() for k, _ in hs}
    if "host" not in names:
        hs.insert(0, ("Host", "test.local"))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        hs.append(("Content-Length", str(len(body))))
    head = f"{method} {path} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs)
    return head.encode("latin-1") + b"\r\n" + body


# --------------------------------------------------------------------------------------
# raw TCP servers used as upstreams


def echo_handler(conn: socket.socket) -> None:
    """Echo every byte back until the peer half-closes."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def read_http_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """Read one request (head, de-chunked body) from a raw server socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            raise EOFError("EOF in request head")
        buf += data
    i = buf.index(b"\r\n\r\n") + 4
    head, rest = buf[:i], buf[i:]
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while b"0\r\n\r\n" not in rest or not _chunked_complete(rest):
            data = conn.recv(65536)
            if not data:
                raise EOFError("EOF in chunked body")
            rest += data
        return head, _dechunk(rest)
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            raise EOFError("EOF in body")
        rest += data
    return head, rest


def _chunked_complete(data: bytes) -> bool:
    try:
        _dechunk(data)
    except (ValueError, IndexError):
        return False
    return True


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            if data[pos : pos + 2] != b"\r\n":
                raise ValueError("trailers or incomplete")
            return b"".join(out)
        if len(data) < pos + size + 2:
            raise ValueError("incomplete")
        out.append(data[pos : pos + size])
        pos += size + 2


class HangupServer(TcpServer):
    """Accepts, reads one whole request, then closes without answering."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bytes]] = []
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        head, body = read_http_request(conn)
        self.received.append((head, body))


def start_origin() -> OriginServer:
    """The test origin, polling its shutdown flag often so that stopping it is quick.

    Its per-request error printing is silenced: the tests abort upstream exchanges on
    purpose, and on CPython 3.11 a traceback printed by a server thread (``traceback``
    parses source with ``ast`` for its carets) while pytest formats a failure in the main
    thread can crash pytest with "SystemError: AST constructor recursion depth mismatch".
    """
    server = OriginServer()
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    server._thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    server._thread.start()
    return server


def digest(data: bytes) -> tuple[int, str]:
    """Length and hash of a body: compare large bodies by this, for short failure output."""
    return len(data), hashlib.sha256(data).hexdigest()[:16]
