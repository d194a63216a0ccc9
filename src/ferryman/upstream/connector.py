"""Connector: opens upstream connections and keeps idle ones in a pool keyed by peer."""

from __future__ import annotations

import asyncio
import errno
import ssl
from typing import Any

from ferryman.errors import ErrorKind, ErrorSource, ProxyError
from ferryman.timeouts import sweep_for
from ferryman.upstream.connection import UpstreamConnection
from ferryman.upstream.peer import HttpPeer


class Connector:
    """A per-event-loop upstream connector with a connection pool.

    ``get_idle(peer)`` returns a pooled connection (most recently used first) or ``None``;
    ``connect(peer)`` opens a new one. Connections come back through
    :meth:`UpstreamConnection.release`; the pool keeps at most ``peer.max_idle`` idle
    connections per pool key and closes those idle longer than ``peer.idle_timeout``.

    Counters ``connects`` and ``reuses`` give the connection reuse ratio.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.sweep = sweep_for(self.loop)
        self._idle: dict[int, list[UpstreamConnection]] = {}
        self._ssl: dict[tuple[Any, ...], ssl.SSLContext] = {}
        self.connects = 0
        self.reuses = 0
        self.open: set[UpstreamConnection] = set()

    def get_idle(self, peer: HttpPeer) -> UpstreamConnection | None:
        """A clean idle pooled connection for ``peer``, or ``None``."""
        idle = self._idle.get(peer.key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                self.reuses += 1
                conn.reused = True
                conn.deadline = 0.0
                return conn
        return None

    async def connect(self, peer: HttpPeer) -> UpstreamConnection:
        """Open a new connection to ``peer`` (TCP, then TLS if asked).

        Raises a retryable :class:`ProxyError`: CONNECT_REFUSED, CONNECT_TIMEOUT,
        TLS_HANDSHAKE or CONNECT_ERROR.
        """
        ctx = self._ssl_context(peer) if peer.tls else None
        try:
            async with asyncio.timeout(peer.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(peer, self),
                    peer.host,
                    peer.port,
                    ssl=ctx,
                    server_hostname=peer.sni if ctx is not None else None,
                )
        except TimeoutError as timeout:
            raise ProxyError(
                ErrorKind.CONNECT_TIMEOUT,
                ErrorSource.UPSTREAM,
                f"timed out connecting to {peer.name}",
                retryable=True,
                cause=timeout,
            ) from None
        except ssl.SSLError as tls_error:
            raise ProxyError(
                ErrorKind.TLS_HANDSHAKE,
                ErrorSource.UPSTREAM,
                f"TLS handshake with {peer.name} failed: {tls_error}",
                retryable=True,
                cause=tls_error,
            ) from None
        except OSError as exc:
            kind = (
                ErrorKind.CONNECT_REFUSED
                if exc.errno == errno.ECONNREFUSED
                else ErrorKind.CONNECT_ERROR
            )
            raise ProxyError(
                kind,
                ErrorSource.UPSTREAM,
                f"cannot connect to {peer.name}: {exc.strerror or exc}",
                retryable=True,
                cause=exc,
            ) from None
        self.connects += 1
        self.open.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Put a clean connection back in the pool, or close it if the pool is full."""
        peer = conn.peer
        if peer.retired:
            conn.close()  # its server left its group: never reused
            return
        idle = self._idle.get(peer.key)
        if idle is None:
            idle = self._idle[peer.key] = []
        if len(idle) >= peer.max_idle:
            conn.close()
            return
        conn.deadline = self.sweep.now + peer.idle_timeout
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a closed connection from the pool and the bookkeeping."""
        self.open.discard(conn)
        self.sweep.discard(conn)
        idle = self._idle.get(conn.peer.key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_count(self, peer: HttpPeer | None = None) -> int:
        """Idle pooled connections, for ``peer`` or in total."""
        if peer is not None:
            return len(self._idle.get(peer.key, ()))
        return sum(len(v) for v in self._idle.values())

    def retire(self, peer: HttpPeer) -> int:
        """``peer``'s server left its group: close its idle pooled connections now, and
        its connections in use when they are released (``peer.retired``). Connections
        made for another peer object with the same pool key (the same server in another
        group) are kept. Returns how many idle connections were closed."""
        peer.retired = True
        idle = self._idle.get(peer.key)
        if not idle:
            return 0
        mine = [conn for conn in idle if conn.peer is peer]
        if mine:
            idle[:] = [conn for conn in idle if conn.peer is not peer]
            for conn in mine:
                conn.close()
        return len(mine)

    def close_all(self) -> None:
        """Close every pooled and open connection (used at shutdown)."""
        for conn in list(self.open):
            conn.close()
        self._idle.clear()

    def _ssl_context(self, peer: HttpPeer) -> ssl.SSLContext:
        key = (peer.verify_cert, peer.verify_hostname, peer.ca, peer.client_cert, peer.client_key)
        ctx = self._ssl.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=peer.ca)
            if not peer.verify_cert:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif not peer.verify_hostname:
                ctx.check_hostname = False
            if peer.client_cert:
                ctx.load_cert_chain(peer.client_cert, peer.client_key)
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl[key] = ctx
        return ctx
