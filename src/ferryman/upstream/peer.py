"""HttpPeer: where and how to connect to one upstream server."""

from __future__ import annotations

from typing import Any


def parse_address(address: str | tuple[Any, ...]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` → ``(host, port)``."""
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)


_KEYS: dict[tuple[object, ...], int] = {}


def _intern_key(*fields: object) -> int:
    """A small int standing for a tuple of peer fields (cheap to hash on the hot path)."""
    key = _KEYS.get(fields)
    if key is None:
        key = _KEYS[fields] = len(_KEYS) + 1
    return key


class HttpPeer:
    """One upstream server and the options for connecting to it.

    Attributes:
        host, port: where to connect.
        tls: whether to speak TLS. Verification is on by default.
        sni: server name sent in TLS; defaults to ``host``.
        verify_cert: check the certificate chain (against ``ca`` or the system store).
        verify_hostname: check that the certificate matches ``sni`` (or ``host``).
        ca: CA bundle file to trust instead of the system store.
        client_cert, client_key: client certificate for mutual TLS.
        connect_timeout: seconds to establish TCP (+TLS); 504 when exceeded.
        read_timeout: longest gap between two reads of the response; 504 when exceeded.
        write_timeout: longest a write to the upstream may stay blocked.
        idle_timeout: how long an idle pooled connection is kept.
        max_idle: how many idle connections to this peer the pool keeps at most.
        protocol: ``"h1"`` (HTTP/1.1), ``"h2"`` (HTTP/2 negotiated with ALPN over TLS,
            HTTP/1.1 when the server does not pick it) or ``"h2c"`` (cleartext HTTP/2 by
            prior knowledge). HTTP/2 connections are shared by concurrent requests.
        ping_interval: an HTTP/2 connection without streams for this long gets a PING;
            no answer within ``connect_timeout`` closes it.
        max_streams: most concurrent streams on one HTTP/2 connection, also when the
            server allows more (its SETTINGS_MAX_CONCURRENT_STREAMS, when lower, wins).
        retired: set by :meth:`Connector.retire` when the server left its group: its
            connections are closed when released instead of pooled.

    Everything that makes a connection distinct (address and TLS settings) goes into
    :attr:`key`, the pool key: two peers with equal keys share pooled connections.
    """

    __slots__ = (
        "host",
        "port",
        "tls",
        "sni",
        "verify_cert",
        "verify_hostname",
        "ca",
        "client_cert",
        "client_key",
        "connect_timeout",
        "read_timeout",
        "write_timeout",
        "idle_timeout",
        "max_idle",
        "protocol",
        "multiplexed",
        "ping_interval",
        "max_streams",
        "key",
        "name",
        "retired",
    )

    def __init__(
        self,
        address: str | tuple[Any, ...],
        tls: bool = False,
        sni: str | None = None,
        *,
        verify_cert: bool = True,
        verify_hostname: bool = True,
        ca: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        write_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        max_idle: int = 128,
        protocol: str = "h1",
        ping_interval: float = 30.0,
        max_streams: int = 1000,
    ) -> None:
        if protocol not in ("h1", "h2", "h2c"):
            raise ValueError(f"protocol must be h1, h2 or h2c, got {protocol!r}")
        self.host, self.port = parse_address(address)
        self.tls = tls
        self.sni = sni if sni is not None else self.host
        self.verify_cert = verify_cert
        self.verify_hostname = verify_hostname
        self.ca = ca
        self.client_cert = client_cert
        self.client_key = client_key
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.protocol = protocol
        #: requests share connections (HTTP/2) instead of taking one each from the pool
        self.multiplexed = protocol != "h1"
        self.ping_interval = ping_interval
        self.max_streams = max_streams
        self.key = _intern_key(
            protocol,
            # (how a shared HTTP/2 connection behaves is part of what makes it distinct)
            ping_interval if self.multiplexed else None,
            max_streams if self.multiplexed else None,
            self.host,
            self.port,
            tls,
            self.sni if tls else None,
            verify_cert,
            verify_hostname,
            ca,
            client_cert,
            client_key,
        )
        self.name = f"{self.host}:{self.port}"
        self.retired = False

    def __repr__(self) -> str:
        return f"HttpPeer({self.name}, tls={self.tls}, protocol={self.protocol})"
