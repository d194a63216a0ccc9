"""Listener: an address to accept connections on, optionally with TLS."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from ferryman.upstream.peer import parse_address


@dataclass(slots=True)
class SniCertificate:
    """A certificate served to clients whose SNI matches one of ``server_names``.

    Names may start with ``*.`` to match one label (``*.example.com``).
    """

    server_names: tuple[str, ...]
    cert: str
    key: str


@dataclass(slots=True)
class ListenerTls:
    """Downstream TLS settings of a listener.

    ``cert``/``key`` is the default certificate; ``sni`` adds more, chosen by the name the
    client asks for. ``client_ca`` with ``client_verify`` ``"optional"`` or ``"required"``
    turns on client-certificate verification (mTLS). ``alpn`` lists the protocols offered:
    HTTP/1.1 only by default here, ``("h2", "http/1.1")`` to offer HTTP/2 too (a config
    file's listener offers both by default: ``alpn: h2_preferred``).
    """

    cert: str
    key: str
    sni: tuple[SniCertificate, ...] = ()
    client_ca: str | None = None
    client_verify: str = "off"
    alpn: tuple[str, ...] = ("http/1.1",)


@dataclass(slots=True)
class Listener:
    """Where a service accepts connections: ``bind`` is ``"host:port"`` or ``(host, port)``."""

    bind: str | tuple[str, int]
    tls: ListenerTls | None = None
    backlog: int = 4096
    #: accept cleartext HTTP/2 with prior knowledge next to HTTP/1.x (told apart by the
    #: connection preface)
    h2c: bool = False
    #: an :class:`~ferryman.proxy.access_log.AccessLog` for this listener's requests, or
    #: None for none
    access_log: Any = None
    address: tuple[str, int] = field(init=False)
    #: ``host:port`` as configured (the ``listener`` label of its metrics)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.address = parse_address(self.bind)
        host, port = self.address
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def make_socket(self) -> socket.socket:
        """Create, bind and listen a non-blocking socket for this listener."""
        return make_listening_socket(self.address, self.backlog)


def make_listening_socket(address: tuple[str, int], backlog: int = 4096) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` and listening."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
