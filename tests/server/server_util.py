"""Helpers for the server tests: proxies, a raw HTTP client, TLS clients, a test PKI."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rawhttp
from ferryman import HttpPeer, ProxyHttp
from rawhttp import Response, request_bytes  # noqa: F401 - re-exported for the tests

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


class RawClient(rawhttp.RawClient):
    """rawhttp.RawClient where a reset by the peer counts as EOF when reading to the end."""

    def read_to_eof(self) -> bytes:
        while True:
            try:
                if not self._fill():
                    break
            except ConnectionResetError:
                break
        out, self.buf = self.buf, b""
        return out


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Response:
    """One GET on a fresh connection (``Connection: close``)."""
    return rawhttp.get(port, path, headers, client=RawClient)


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
