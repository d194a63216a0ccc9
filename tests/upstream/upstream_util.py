"""Helpers for the upstream tests: proxies, raw and TLS origins, a raw HTTP client.

Everything runs on real sockets on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trustme

from ferryman import HttpPeer, ProxyHttp
from rawhttp import (  # noqa: F401 - RawClient, get and request_bytes are re-exported
    QuietOrigin,
    RawClient,
    TcpServer,
    get,
    request_bytes,
)

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


# --- a scriptable raw origin --------------------------------------------------------------


class RawOrigin(TcpServer):
    """A TCP origin whose every connection runs ``handler(sock, origin)`` in a thread.

    ``connections`` counts accepted connections; ``closed`` counts connections whose
    handler saw the client (the proxy) close; ``events`` is appended to by handlers.
    """

    swallow = (OSError,)

    def __init__(self, handler: Callable[[socket.socket, RawOrigin], None]) -> None:
        self.closed = 0
        self.events: list[str] = []
        self.lock = threading.Lock()
        super().__init__(lambda conn: handler(conn, self), poll=0.2, conn_timeout=10)
        self.start()

    @property
    def connections(self) -> int:
        return self.accepted

    def note_closed(self) -> None:
        with self.lock:
            self.closed += 1


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


class TlsOriginServer(QuietOrigin):
    """tests/origin.OriginServer behind TLS; the handshake runs in the handler thread.

    ``handshake_failures`` counts connections whose TLS handshake failed; ``client_cns``
    records the CN of each verified client certificate.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context
        self.handshake_failures = 0
        self.client_cns: list[str] = []

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
